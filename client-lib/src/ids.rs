//! Identifiers and small wire enums of PROTOCOL.md §2 and §4: [`DeviceId`], [`GroupId`],
//! [`Epoch`], [`Role`] and [`GroupKeyKind`].
//!
//! # Usage
//! ```
//! use quva_client::ids::{DeviceId, GroupId};
//! assert!(DeviceId::new("sensor-01").is_ok());
//! assert!(DeviceId::new("bad id").is_err());
//! assert!(GroupId::new("plant/line-3/temp").is_ok());
//! assert!(GroupId::new("quva/k/x").is_err());
//! ```

use core::fmt;

use crate::codec::{DecodeError, Reader, put_str};

/// Maximum length of a device ID in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 64;
/// Maximum length of a group ID in bytes.
pub const MAX_GROUP_ID_LEN: usize = 128;

/// A text that is not a valid identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid {0}")]
pub struct InvalidId(pub &'static str);

/// A device ID: 1..=64 bytes of `[A-Za-z0-9._-]`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates a device ID.
    ///
    /// # Errors
    /// [`InvalidId`] if empty, longer than 64 bytes or with other characters.
    pub fn new(id: &str) -> Result<Self, InvalidId> {
        let ok = !id.is_empty()
            && id.len() <= MAX_DEVICE_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(DeviceId(id.to_owned()))
        } else {
            Err(InvalidId("device id"))
        }
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Reads `str(id)` and validates it.
    ///
    /// # Errors
    /// [`DecodeError::InvalidId`] besides the reader's errors.
    pub fn read(r: &mut Reader<'_>, what: &'static str) -> Result<Self, DecodeError> {
        Self::new(r.str(what)?).map_err(|_| DecodeError::InvalidId(what))
    }

    /// Appends `str(id)`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, &self.0);
    }
}

/// A group ID: an MQTT topic name of 1..=128 bytes, no wildcards, not starting with `$` or `quva/`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(String);

impl GroupId {
    /// Validates a group ID.
    ///
    /// # Errors
    /// [`InvalidId`] if empty, too long, with `+`, `#` or NUL, or starting with `$` or `quva/`.
    pub fn new(id: &str) -> Result<Self, InvalidId> {
        let ok = !id.is_empty()
            && id.len() <= MAX_GROUP_ID_LEN
            && !id.contains(['+', '#', '\0'])
            && !id.starts_with('$')
            && !id.starts_with("quva/");
        if ok {
            Ok(GroupId(id.to_owned()))
        } else {
            Err(InvalidId("group id"))
        }
    }

    /// The ID as text (also the data topic).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Reads `str(group)` and validates it.
    ///
    /// # Errors
    /// [`DecodeError::InvalidId`] besides the reader's errors.
    pub fn read(r: &mut Reader<'_>, what: &'static str) -> Result<Self, DecodeError> {
        Self::new(r.str(what)?).map_err(|_| DecodeError::InvalidId(what))
    }

    /// Appends `str(group)`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, &self.0);
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($t), self.0)
            }
        }
    )*};
}
display_as_str!(DeviceId, GroupId);

/// A group epoch: grows by one at every rekey.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u32);

impl Epoch {
    /// The following epoch, or `None` at `u32::MAX`.
    pub fn next(self) -> Option<Epoch> {
        self.0.checked_add(1).map(Epoch)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A member's role in a group (wire `u8`: 1 publisher, 2 subscriber).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Publishes data; holds d_S.
    Publisher = 1,
    /// Subscribes to data; holds d_P.
    Subscriber = 2,
}

impl Role {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// Parses the wire byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Role::Publisher),
            2 => Some(Role::Subscriber),
            _ => None,
        }
    }

    /// Reads the role byte.
    ///
    /// # Errors
    /// [`DecodeError::InvalidValue`] for anything but 1 or 2.
    pub fn read(r: &mut Reader<'_>, what: &'static str) -> Result<Self, DecodeError> {
        Self::from_u8(r.u8(what)?).ok_or(DecodeError::InvalidValue(what))
    }

    /// The group key members of this role hold: subscribers hold d_P, publishers d_S (§9.3).
    pub fn held_key(self) -> GroupKeyKind {
        match self {
            Role::Publisher => GroupKeyKind::S,
            Role::Subscriber => GroupKeyKind::P,
        }
    }

    /// The other role.
    pub fn other(self) -> Role {
        match self {
            Role::Publisher => Role::Subscriber,
            Role::Subscriber => Role::Publisher,
        }
    }

    /// The key-topic segment: `pub` or `sub` (PROTOCOL.md §8).
    pub fn topic_segment(self) -> &'static str {
        match self {
            Role::Publisher => "pub",
            Role::Subscriber => "sub",
        }
    }
}

/// Which group key (wire `u8`: 1 for P, 2 for S).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GroupKeyKind {
    /// d_P / Q_P: the publisher-side key; publishers encrypt to Q_P, subscribers hold d_P.
    P = 1,
    /// d_S / Q_S: the subscriber-side key; subscribers encrypt queries to Q_S, publishers hold d_S.
    S = 2,
}

impl GroupKeyKind {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// The role of the members whose shares sum into this key: P over publishers, S over
    /// subscribers.
    pub fn summed_role(self) -> Role {
        match self {
            GroupKeyKind::P => Role::Publisher,
            GroupKeyKind::S => Role::Subscriber,
        }
    }

    /// The role of the members who hold this key's secret.
    pub fn holder_role(self) -> Role {
        match self {
            GroupKeyKind::P => Role::Subscriber,
            GroupKeyKind::S => Role::Publisher,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_rules() {
        assert!(DeviceId::new(&"a".repeat(64)).is_ok());
        assert!(DeviceId::new(&"a".repeat(65)).is_err());
        assert!(DeviceId::new("").is_err());
        assert!(DeviceId::new("a/b").is_err());
        assert!(DeviceId::new("é").is_err());
        assert!(DeviceId::new("Pi-3B.plus_1").is_ok());
    }

    #[test]
    fn group_id_rules() {
        assert!(GroupId::new(&"g".repeat(128)).is_ok());
        assert!(GroupId::new(&"g".repeat(129)).is_err());
        for bad in ["", "a/+/b", "a/#", "$SYS/x", "quva/c/x", "a\0b"] {
            assert!(GroupId::new(bad).is_err(), "{bad:?}");
        }
        assert!(GroupId::new("quvax/a").is_ok());
    }

    #[test]
    fn roles_hold_the_other_sides_key() {
        assert_eq!(Role::Subscriber.held_key(), GroupKeyKind::P);
        assert_eq!(Role::Publisher.held_key(), GroupKeyKind::S);
        for k in [GroupKeyKind::P, GroupKeyKind::S] {
            assert_eq!(k.holder_role().held_key(), k);
            assert_eq!(k.summed_role(), k.holder_role().other());
        }
    }
}
