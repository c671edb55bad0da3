//! Direct messages on the device (PROTOCOL.md §7.1), without I/O: sealing for a recipient found
//! in a group's member list, and the recipient's checks with a per-sender floor.
//!
//! The [`DirectBook`] is the durable state: for each recipient, the last T_ms this device sent
//! (T_ms grows strictly per recipient, also across restarts and clock steps backwards), and for
//! each sender, the [`DirectFloor`] of the last message accepted from it. The driver saves the
//! book in the key store ([`DirectBook::save`]) *before* publishing a sealed message and *before*
//! acting on a received one, so that a crash cannot make it reuse a T_ms or accept a replay.
//!
//! # Usage
//! ```
//! use quva_client::direct::DirectFloor;
//! use quva_client::ids::DeviceId;
//! use quva_node::DirectBook;
//! let mut book = DirectBook::default();
//! let b = DeviceId::new("sensor-01").unwrap();
//! assert_eq!(book.next_send_time(&b, 1_000), 1_000);
//! assert_eq!(book.next_send_time(&b, 1_000), 1_001); // same millisecond: still increasing
//! assert_eq!(book.next_send_time(&b, 900), 1_002); // the clock stepped back
//! book.raise_floor(&b, DirectFloor::at(5));
//! let again = DirectBook::from_bytes(&book.to_bytes()).unwrap();
//! assert_eq!(again.floor(&b), DirectFloor::at(5));
//! ```

use std::collections::BTreeMap;

use quva_client::codec::{DecodeError, Reader, put_u32, put_u64};
use quva_client::direct::{
    DirectFloor, DirectRejection, DirectSealError, DirectSealer, StagedDirect, UnverifiedDirect,
    VerifiedDirect,
};
use quva_client::ids::{DeviceId, GroupId};
use quva_client::topics;
use rand_core::CryptoRngCore;

use crate::store::{KeyStore, StoreError};
use quva_client::device::Device;

/// The key-store record of the book.
const BOOK_FILE: &str = "direct";
/// Its record kind.
const KIND_DIRECT_BOOK: u8 = 0x20;

/// Sent timestamps per recipient and accepted floors per sender.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectBook {
    sent: BTreeMap<DeviceId, u64>,
    floors: BTreeMap<DeviceId, u64>,
}

impl DirectBook {
    /// The T_ms for the next message to `recipient`: `now_ms`, or one more than the last one
    /// sent to it if that is not below. Recorded at once; save the book before sending.
    pub fn next_send_time(&mut self, recipient: &DeviceId, now_ms: u64) -> u64 {
        let t = match self.sent.get(recipient) {
            Some(last) if *last >= now_ms => last.saturating_add(1),
            _ => now_ms,
        };
        self.sent.insert(recipient.clone(), t);
        t
    }

    /// The floor stored for `sender`.
    pub fn floor(&self, sender: &DeviceId) -> DirectFloor {
        self.floors
            .get(sender)
            .map_or(DirectFloor::NONE, |t| DirectFloor::at(*t))
    }

    /// Records the floor of a message accepted from `sender` (never lowers it).
    pub fn raise_floor(&mut self, sender: &DeviceId, floor: DirectFloor) {
        if let Some(t) = floor.last_accepted() {
            let e = self.floors.entry(sender.clone()).or_insert(t);
            *e = (*e).max(t);
        }
    }

    /// `u32 n || n × (str(recipient) || u64 T_ms) || u32 m || m × (str(sender) || u64 floor)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for map in [&self.sent, &self.floors] {
            put_u32(&mut out, u32::try_from(map.len()).unwrap_or(u32::MAX));
            for (id, t) in map {
                id.encode(&mut out);
                put_u64(&mut out, *t);
            }
        }
        out
    }

    /// Parses [`to_bytes`](Self::to_bytes).
    ///
    /// # Errors
    /// [`DecodeError`] for anything else.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let mut maps = [BTreeMap::new(), BTreeMap::new()];
        for map in &mut maps {
            let n = r.u32("direct book count")?;
            for _ in 0..n {
                let id = DeviceId::read(&mut r, "direct book device")?;
                let t = r.u64("direct book time")?;
                map.insert(id, t);
            }
        }
        r.finish("direct book")?;
        let [sent, floors] = maps;
        Ok(DirectBook { sent, floors })
    }

    /// Loads the book from the key store (empty if none was saved).
    ///
    /// # Errors
    /// [`StoreError`] if the record cannot be read or is corrupt.
    pub fn load(store: &KeyStore) -> Result<Self, StoreError> {
        match store.load_named(BOOK_FILE, KIND_DIRECT_BOOK)? {
            None => Ok(DirectBook::default()),
            Some(bytes) => Self::from_bytes(&bytes).map_err(|_| StoreError::Corrupt {
                path: store.path().join(BOOK_FILE),
                what: "malformed direct-message book",
            }),
        }
    }

    /// Takes in what another process saved (the highest T_ms and floor per device), then saves
    /// the book in the key store (atomically, synced): `run`, `subscribe` and `send` may run at
    /// the same time, and no floor may go down.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn save(&mut self, store: &KeyStore) -> Result<(), StoreError> {
        let on_disk = Self::load(store)?;
        self.merge(&on_disk);
        store.save_named(BOOK_FILE, KIND_DIRECT_BOOK, &self.to_bytes())
    }

    /// Keeps the higher of the two values for every device.
    fn merge(&mut self, other: &DirectBook) {
        for (mine, theirs) in [
            (&mut self.sent, &other.sent),
            (&mut self.floors, &other.floors),
        ] {
            for (id, t) in theirs {
                let e = mine.entry(id.clone()).or_insert(*t);
                *e = (*e).max(*t);
            }
        }
    }
}

/// Why a direct message could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DirectSendError {
    /// The newest member list of the group does not list the recipient with a valid
    /// certificate (or no list is held).
    #[error("{recipient} is not listed with a valid certificate in the member list of {group}")]
    NotListed {
        /// The recipient.
        recipient: DeviceId,
        /// The group whose list was searched.
        group: GroupId,
    },
    /// Sealing failed.
    #[error("cannot seal the direct message: {0}")]
    Seal(#[from] DirectSealError),
}

/// Seals `message` for `recipient`, whose key is taken from the newest verified member list of
/// `group`, with the next T_ms for it from `book`. Returns the topic `quva/d/<recipient>`, the
/// payload and T_ms. Save `book` before publishing.
///
/// # Errors
/// [`DirectSendError`].
pub fn seal_direct(
    device: &Device,
    book: &mut DirectBook,
    group: &GroupId,
    recipient: &DeviceId,
    message: &[u8],
    now_ms: u64,
    rng: &mut impl CryptoRngCore,
) -> Result<(String, Vec<u8>, u64), DirectSendError> {
    let q =
        device
            .member_key(group, recipient, now_ms)
            .ok_or_else(|| DirectSendError::NotListed {
                recipient: recipient.clone(),
                group: group.clone(),
            })?;
    let creds = device.credentials();
    let sealer = DirectSealer {
        key: creds.key(),
        cert: creds.cert(),
    };
    let t_ms = book.next_send_time(recipient, now_ms);
    let bytes = sealer.seal(recipient, &q, t_ms, message, rng)?;
    Ok((topics::direct(recipient), bytes, t_ms))
}

/// The recipient's checks of a PUBLISH received on `topic`: the topic is this device's
/// `quva/d/<self>`, the payload decodes within the device's size limit, and
/// [`Device::open_direct`] accepts it against the floor `book` holds for its sender. The caller
/// raises the floor ([`DirectBook::raise_floor`] with [`StagedDirect::floor`]), saves the book,
/// and only then takes the payload ([`StagedDirect::commit`]).
///
/// # Errors
/// The first failing check's [`DirectRejection`] (`NotForMe` for another device's topic).
pub fn receive_direct(
    device: &Device,
    book: &DirectBook,
    topic: &str,
    payload: &[u8],
    now_ms: u64,
) -> Result<StagedDirect, DirectRejection> {
    if topics::parse_direct(topic).as_ref() != Some(device.id()) {
        return Err(DirectRejection::NotForMe);
    }
    let msg = UnverifiedDirect::decode_with_limit(payload, device.config().policy.max_payload)?;
    device.open_direct(&msg, book.floor(msg.sender()), now_ms)
}

/// What became of a received direct message.
#[derive(Debug)]
pub enum DirectOutcome {
    /// Verified, and the sender's new floor is saved: act on it.
    Accepted(VerifiedDirect),
    /// Refused by a check; nothing was saved.
    Refused {
        /// The sender the message claims (unverified), for the log.
        claimed_sender: Option<DeviceId>,
        /// Why.
        reason: DirectRejection,
    },
}

/// [`receive_direct`], then the sender's raised floor saved in `store` before the payload is
/// handed out: the daemon's and `subscribe`'s one way of accepting a direct message. `book`
/// changes only once the save succeeded.
///
/// # Errors
/// [`StoreError`] if the floor cannot be saved; the message is then not handed out.
pub fn accept_direct(
    device: &Device,
    book: &mut DirectBook,
    store: &KeyStore,
    topic: &str,
    payload: &[u8],
    now_ms: u64,
) -> Result<DirectOutcome, StoreError> {
    let staged = match receive_direct(device, book, topic, payload, now_ms) {
        Ok(s) => s,
        Err(reason) => {
            let claimed_sender = UnverifiedDirect::decode(payload)
                .ok()
                .map(|m| m.sender().clone());
            return Ok(DirectOutcome::Refused {
                claimed_sender,
                reason,
            });
        }
    };
    let (sender, floor) = staged.floor();
    let mut next = book.clone();
    next.raise_floor(sender, floor);
    next.save(store)?;
    *book = next;
    Ok(DirectOutcome::Accepted(staged.commit()))
}

#[cfg(test)]
mod tests;
