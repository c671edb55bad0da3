//! The bridge's cache of public CA data: Q_CA, each group's signed info and members per epoch,
//! device keys and revoked certificates.
//!
//! Implements the bridge side of PROTOCOL.md §4 (the bridge checks Q_P and Q_S against the member
//! list) and the [`quva_client::message::Directory`] that §6's checks query: a group is known,
//! its epoch is current or the previous one within the grace period (§5), a sender is a member of
//! the right role. Nothing here is secret.
//!
//! # Usage
//! ```
//! use quva_bridge::directory::BridgeDirectory;
//! let dir = BridgeDirectory::new(30_000);
//! assert!(dir.ca_public().is_none());
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use quva_client::codec::{Decode, Encode};
use quva_client::curve::Point;
use quva_client::enrollment::ImplicitCert;
use quva_client::group::{GroupInfo, Member, Privacy, SignedGroupInfo};
use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
use quva_client::message::{Directory, GroupLookupError, GroupPublicKeys};
use quva_client::ota::SignerListing;
use quva_client::schnorr::VerifyingKey;

use crate::ca::GroupSnapshot;

/// Why a group snapshot from the CA was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The CA public key is not known yet.
    #[error("CA public key unknown")]
    NoCaKey,
    /// The signed group info does not decode or is not signed by the CA.
    #[error("group info invalid")]
    BadGroupInfo,
    /// A member certificate or share point is invalid or from another CA.
    #[error("member certificate invalid")]
    BadMember,
    /// The member list does not match the group info's counts, digest or keys.
    #[error("members do not match the group info")]
    MembersMismatch,
}

/// One epoch of a group.
#[derive(Clone, Debug)]
struct EpochData {
    info: GroupInfo,
    members: Vec<Member>,
    certs: Vec<(Role, Vec<u8>, Point)>,
    signed_ginfo: Vec<u8>,
}

#[derive(Clone, Debug)]
struct GroupEntry {
    current: EpochData,
    previous: Option<(EpochData, u64)>,
    fetched_ms: u64,
}

#[derive(Clone, Debug)]
struct DeviceEntry {
    key: VerifyingKey,
    serial: u64,
    not_after: u64,
}

#[derive(Debug, Default)]
struct State {
    ca_public: Option<Point>,
    groups: HashMap<GroupId, GroupEntry>,
    devices: HashMap<DeviceId, DeviceEntry>,
    revoked: HashSet<u64>,
    revoked_devices: HashSet<DeviceId>,
}

/// The cache. Shared between connections; every method takes `&self`.
#[derive(Debug)]
pub struct BridgeDirectory {
    grace_ms: u64,
    state: RwLock<State>,
}

impl BridgeDirectory {
    /// An empty cache keeping the previous epoch for `grace_ms` after a rekey.
    pub fn new(grace_ms: u64) -> Self {
        BridgeDirectory {
            grace_ms,
            state: RwLock::new(State::default()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Q_CA, once known.
    pub fn ca_public(&self) -> Option<Point> {
        self.read().ca_public
    }

    /// Sets Q_CA.
    pub fn set_ca_public(&self, q: Point) {
        self.write().ca_public = Some(q);
    }

    /// Records a revoked certificate serial (and its device, if named).
    pub fn revoke(&self, serial: u64, device: Option<&DeviceId>) {
        let mut s = self.write();
        s.revoked.insert(serial);
        if let Some(d) = device {
            if s.devices.get(d).is_some_and(|e| e.serial == serial) {
                s.devices.remove(d);
            }
            s.revoked_devices.insert(d.clone());
        }
    }

    /// Whether a newer certificate of the device is known (from a member list, so it was used):
    /// the older one is superseded and never passes again (PROTOCOL.md §3).
    pub fn is_superseded(&self, id: &DeviceId, serial: u64) -> bool {
        self.read()
            .devices
            .get(id)
            .is_some_and(|e| e.serial > serial)
    }

    /// Whether a certificate serial is known to be revoked.
    pub fn is_revoked(&self, serial: u64) -> bool {
        self.read().revoked.contains(&serial)
    }

    /// Whether the group is cached and was fetched after `min_fetched_ms`.
    pub fn is_fresh(&self, group: &GroupId, min_fetched_ms: u64) -> bool {
        self.read()
            .groups
            .get(group)
            .is_some_and(|g| g.fetched_ms >= min_fetched_ms)
    }

    /// The current epoch of a cached group.
    pub fn current_epoch(&self, group: &GroupId) -> Option<Epoch> {
        self.read().groups.get(group).map(|g| g.current.info.epoch)
    }

    /// The privacy mode of a cached group.
    pub fn privacy(&self, group: &GroupId) -> Option<Privacy> {
        self.read()
            .groups
            .get(group)
            .map(|g| g.current.info.privacy)
    }

    /// Whether `id` is a joined member of `group` in `role` at the current epoch.
    pub fn is_current_member(&self, group: &GroupId, id: &DeviceId, role: Role) -> bool {
        let s = self.read();
        if s.revoked_devices.contains(id) && !s.devices.contains_key(id) {
            return false;
        }
        s.groups.get(group).is_some_and(|g| {
            g.current
                .members
                .iter()
                .any(|m| &m.id == id && m.role == role)
        })
    }

    /// The `quva/c/<group>` payload of the current epoch.
    pub fn certificate_list(&self, group: &GroupId) -> Option<(Epoch, Vec<u8>)> {
        let s = self.read();
        let g = s.groups.get(group)?;
        Some((
            g.current.info.epoch,
            quva_client::members::encode(
                &g.current.signed_ginfo,
                g.current
                    .certs
                    .iter()
                    .map(|(role, cert, gi)| (*role, cert.as_slice(), gi)),
            ),
        ))
    }

    /// Verifies a snapshot from the CA and makes it the group's current epoch (the former current
    /// epoch stays valid for the grace period when the epoch advanced). Returns the devices that
    /// were members (in some role) of the former current epoch and are not in that role now: their
    /// sessions must end (PROTOCOL.md §8).
    ///
    /// # Errors
    /// [`SnapshotError`]; the cache is left unchanged then.
    pub fn apply_snapshot(
        &self,
        snap: &GroupSnapshot,
        now_ms: u64,
    ) -> Result<Vec<DeviceId>, SnapshotError> {
        let ca = self.ca_public().ok_or(SnapshotError::NoCaKey)?;
        let signed = SignedGroupInfo::from_bytes(&snap.signed_ginfo)
            .map_err(|_| SnapshotError::BadGroupInfo)?;
        let info = signed
            .verify(&VerifyingKey(ca))
            .map_err(|_| SnapshotError::BadGroupInfo)?
            .clone();
        if info.group != snap.group {
            return Err(SnapshotError::BadGroupInfo);
        }
        let mut members = Vec::with_capacity(snap.members.len());
        let mut certs = Vec::with_capacity(snap.members.len());
        let mut devices = Vec::new();
        for m in &snap.members {
            let role = Role::from_u8(m.role).ok_or(SnapshotError::BadMember)?;
            let cert = ImplicitCert::from_bytes(&m.cert).map_err(|_| SnapshotError::BadMember)?;
            let q = cert.open(&ca).map_err(|_| SnapshotError::BadMember)?;
            let g = Point::from_bytes(&m.share_point).ok_or(SnapshotError::BadMember)?;
            if &g != cert.group_base() {
                return Err(SnapshotError::BadMember);
            }
            members.push(Member {
                id: cert.id().clone(),
                role,
                q: q.0,
                g,
            });
            certs.push((role, m.cert.clone(), g));
            devices.push((
                cert.id().clone(),
                DeviceEntry {
                    key: q,
                    serial: cert.serial(),
                    not_after: cert.not_after(),
                },
            ));
        }
        info.check_members(&members)
            .map_err(|_| SnapshotError::MembersMismatch)?;
        let data = EpochData {
            info,
            members,
            certs,
            signed_ginfo: snap.signed_ginfo.clone(),
        };
        let mut s = self.write();
        for (id, entry) in devices {
            if s.revoked.contains(&entry.serial) {
                continue;
            }
            let newer = s.devices.get(&id).is_none_or(|e| e.serial <= entry.serial);
            if newer {
                s.revoked_devices.remove(&id);
                s.devices.insert(id, entry);
            }
        }
        let mut departed = Vec::new();
        match s.groups.get_mut(&snap.group) {
            Some(entry) if data.info.epoch >= entry.current.info.epoch => {
                for m in &entry.current.members {
                    let stays = data
                        .members
                        .iter()
                        .any(|n| n.id == m.id && n.role == m.role);
                    if !stays && !departed.contains(&m.id) {
                        departed.push(m.id.clone());
                    }
                }
                if data.info.epoch > entry.current.info.epoch {
                    let old = std::mem::replace(&mut entry.current, data);
                    entry.previous = Some((old, now_ms));
                } else {
                    entry.current = data;
                }
                entry.fetched_ms = now_ms;
            }
            Some(_) => {}
            None => {
                s.groups.insert(
                    snap.group.clone(),
                    GroupEntry {
                        current: data,
                        previous: None,
                        fetched_ms: now_ms,
                    },
                );
            }
        }
        Ok(departed)
    }

    /// A [`Directory`] view at `now_ms` for the §6 checks.
    pub fn view(&self, now_ms: u64) -> DirectoryView<'_> {
        DirectoryView { dir: self, now_ms }
    }

    fn epoch_data<R>(
        &self,
        group: &GroupId,
        epoch: Epoch,
        now_ms: u64,
        f: impl FnOnce(&EpochData) -> R,
    ) -> Result<R, GroupLookupError> {
        let s = self.read();
        let g = s.groups.get(group).ok_or(GroupLookupError::UnknownGroup)?;
        if g.current.info.epoch == epoch {
            return Ok(f(&g.current));
        }
        match &g.previous {
            Some((prev, superseded))
                if prev.info.epoch == epoch
                    && now_ms <= superseded.saturating_add(self.grace_ms) =>
            {
                Ok(f(prev))
            }
            _ => Err(GroupLookupError::WrongEpoch),
        }
    }

    /// Q_P and Q_S of a group's current epoch (for group-level CONNECT proofs).
    pub fn current_keys(&self, group: &GroupId) -> Option<GroupPublicKeys> {
        let s = self.read();
        s.groups.get(group).map(|g| GroupPublicKeys {
            q_p: g.current.info.q_p,
            q_s: g.current.info.q_s,
        })
    }
}

/// A [`Directory`] over the cache at one instant.
#[derive(Debug, Clone, Copy)]
pub struct DirectoryView<'a> {
    dir: &'a BridgeDirectory,
    now_ms: u64,
}

impl Directory for DirectoryView<'_> {
    fn group_keys(
        &self,
        group: &GroupId,
        epoch: Epoch,
        now_ms: u64,
    ) -> Result<GroupPublicKeys, GroupLookupError> {
        self.dir
            .epoch_data(group, epoch, now_ms, |d| GroupPublicKeys {
                q_p: d.info.q_p,
                q_s: d.info.q_s,
            })
    }

    fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey> {
        let s = self.dir.read();
        let e = s.devices.get(id)?;
        if s.revoked.contains(&e.serial) || self.now_ms > e.not_after {
            return None;
        }
        Some(e.key)
    }

    fn is_member(&self, group: &GroupId, epoch: Epoch, id: &DeviceId, role: Role) -> bool {
        self.dir
            .epoch_data(group, epoch, self.now_ms, |d| {
                d.members.iter().any(|m| &m.id == id && m.role == role)
            })
            .unwrap_or(false)
    }
}

/// The OTA signer check of PROTOCOL.md §7.2: `cert` (opening to `q`) is, byte for byte, the
/// certificate of a publisher in the group's current member list, and not revoked.
impl SignerListing for DirectoryView<'_> {
    fn lists_publisher(&self, group: &GroupId, cert: &ImplicitCert, q: &VerifyingKey) -> bool {
        let s = self.dir.read();
        if s.revoked.contains(&cert.serial()) {
            return false;
        }
        let Some(g) = s.groups.get(group) else {
            return false;
        };
        let bytes = cert.to_bytes();
        let listed = g
            .current
            .certs
            .iter()
            .any(|(role, c, _)| *role == Role::Publisher && *c == bytes);
        let member = g
            .current
            .members
            .iter()
            .any(|m| &m.id == cert.id() && m.role == Role::Publisher && m.q == q.0);
        listed && member
    }
}
