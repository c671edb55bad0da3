//! Status reports (PROTOCOL.md §7.2): option-2 queries from devices to the group's publishers,
//! `M = u8 2 (ota-status) || u64 v || u8 state || str(detail)`, and the signer's book of the
//! latest state per (device, v).

use std::collections::BTreeMap;

use rand_core::CryptoRngCore;

use super::{MAX_DETAIL_LEN, OtaError, TYPE_OTA_STATUS};
use crate::codec::{Decode, DecodeError, Reader, put_str, put_u8, put_u64};
use crate::curve::Point;
use crate::ids::{DeviceId, GroupId};
use crate::message::{Direction, Protection, Sealer, VerifiedMessage};

/// The state a device reports for a release.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OtaState {
    /// The manifest is verified; the release is available.
    Available = 1,
    /// Chunks are being fetched.
    Downloading = 2,
    /// Every chunk and H(image) verified.
    Verified = 3,
    /// The apply command succeeded; the version is recorded.
    Applied = 4,
    /// Something failed (the detail says what).
    Failed = 5,
    /// The device cannot open the key message and asks for K_c by a direct message.
    NeedKey = 6,
}

impl OtaState {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// Parses the wire byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => OtaState::Available,
            2 => OtaState::Downloading,
            3 => OtaState::Verified,
            4 => OtaState::Applied,
            5 => OtaState::Failed,
            6 => OtaState::NeedKey,
            _ => return None,
        })
    }
}

/// The plaintext M of a status report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusReport {
    /// The release version v.
    pub version: u64,
    /// The reported state.
    pub state: OtaState,
    /// Free text (at most [`MAX_DETAIL_LEN`] bytes), for example why an update failed.
    pub detail: String,
}

impl StatusReport {
    /// The encoded M.
    ///
    /// # Errors
    /// [`OtaError::DetailTooLong`].
    pub fn to_bytes(&self) -> Result<Vec<u8>, OtaError> {
        if self.detail.len() > MAX_DETAIL_LEN {
            return Err(OtaError::DetailTooLong);
        }
        let mut out = Vec::with_capacity(12 + self.detail.len());
        put_u8(&mut out, TYPE_OTA_STATUS);
        put_u64(&mut out, self.version);
        put_u8(&mut out, self.state.to_u8());
        put_str(&mut out, &self.detail);
        Ok(out)
    }

    /// Decodes M.
    ///
    /// # Errors
    /// [`DecodeError`] for another type byte, an unknown state, a detail over
    /// [`MAX_DETAIL_LEN`], truncation or trailing bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let m = Self::read(&mut r)?;
        r.finish("ota status")?;
        Ok(m)
    }

    /// Seals the report as an option-2 query of the group (to Q_S), with `sealer` the device's
    /// [`Sealer`] for the current epoch in the query direction.
    ///
    /// # Errors
    /// [`OtaError::NotOtaMessage`] if `sealer` is not a query, [`OtaError::DetailTooLong`], or a
    /// sealing error.
    pub fn seal(
        &self,
        sealer: &Sealer<'_>,
        q_s: &Point,
        t_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<u8>, OtaError> {
        if !sealer.direction.is_query() {
            return Err(OtaError::NotOtaMessage);
        }
        Ok(sealer.option2(t_ms, q_s, &self.to_bytes()?, rng)?)
    }
}

impl Decode for StatusReport {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        if r.u8("ota message type")? != TYPE_OTA_STATUS {
            return Err(DecodeError::InvalidValue("ota message type"));
        }
        let version = r.u64("ota status version")?;
        let state = OtaState::from_u8(r.u8("ota status state")?)
            .ok_or(DecodeError::InvalidValue("ota status state"))?;
        let detail = r.str("ota status detail")?;
        if detail.len() > MAX_DETAIL_LEN {
            return Err(DecodeError::TooLarge("ota status detail"));
        }
        Ok(StatusReport {
            version,
            state,
            detail: detail.to_owned(),
        })
    }
}

/// A status report a signer received: the verified sender and timestamp with the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedStatus {
    /// The group the report was sent in.
    pub group: GroupId,
    /// The reporting device (authenticated by the option-2 signature).
    pub device: DeviceId,
    /// The device's timestamp.
    pub t_ms: u64,
    /// The report.
    pub report: StatusReport,
}

impl ReceivedStatus {
    /// Reads a report from a verified option-2 query (verified with
    /// [`verify_without_window`](crate::message::UnverifiedMessage::verify_without_window):
    /// a signer collects reports late from its persistent session).
    ///
    /// # Errors
    /// [`OtaError::NotOtaMessage`] for another protection or direction, or
    /// [`OtaError::Malformed`].
    pub fn from_message(msg: &VerifiedMessage) -> Result<Self, OtaError> {
        if msg.protection() != Protection::Confidential || msg.direction() != Direction::Query {
            return Err(OtaError::NotOtaMessage);
        }
        Ok(ReceivedStatus {
            group: msg.group().clone(),
            device: msg.sender().clone(),
            t_ms: msg.t_ms(),
            report: StatusReport::from_bytes(msg.payload())?,
        })
    }
}

/// The latest known state of one device for one release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusEntry {
    /// The timestamp of the report that set it.
    pub t_ms: u64,
    /// The state.
    pub state: OtaState,
    /// The detail.
    pub detail: String,
}

/// The signer's view of its releases: per (group, device, version), the state with the highest
/// T_ms. Reports arrive late and out of order from a persistent session; an older or equally old
/// report never overwrites a newer one.
#[derive(Clone, Debug, Default)]
pub struct StatusBook {
    entries: BTreeMap<(GroupId, DeviceId, u64), StatusEntry>,
}

impl StatusBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `status` if its T_ms is higher than the one held for its (group, device, v).
    /// Returns whether the book changed.
    pub fn record(&mut self, status: ReceivedStatus) -> bool {
        let key = (status.group, status.device, status.report.version);
        let entry = StatusEntry {
            t_ms: status.t_ms,
            state: status.report.state,
            detail: status.report.detail,
        };
        match self.entries.get(&key) {
            Some(held) if held.t_ms >= entry.t_ms => false,
            _ => {
                self.entries.insert(key, entry);
                true
            }
        }
    }

    /// The latest state of `device` for version `version` in `group`.
    pub fn get(&self, group: &GroupId, device: &DeviceId, version: u64) -> Option<&StatusEntry> {
        self.entries.get(&(group.clone(), device.clone(), version))
    }

    /// Every (group, device, version) with its latest state, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&(GroupId, DeviceId, u64), &StatusEntry)> {
        self.entries.iter()
    }

    /// The devices whose latest state for `version` in `group` is `state` (for example
    /// [`OtaState::NeedKey`], to answer with a direct message).
    pub fn devices_in<'a>(
        &'a self,
        group: &'a GroupId,
        version: u64,
        state: OtaState,
    ) -> impl Iterator<Item = &'a DeviceId> + 'a {
        self.entries
            .iter()
            .filter(move |((g, _, v), e)| g == group && *v == version && e.state == state)
            .map(|((_, d, _), _)| d)
    }
}
