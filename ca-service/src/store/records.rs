//! Stored values: prost messages behind a schema version byte.
//!
//! Every value is `u8 SCHEMA_VERSION || protobuf`, so a later schema can be told apart and
//! migrated. Secret fields (enrollment secrets, shares, group secrets) are wiped on drop.

use prost::Message;
use zeroize::Zeroize;

use super::StoreError;

/// The schema version byte in front of every stored value.
pub const SCHEMA_VERSION: u8 = 1;

/// Encodes a record as `u8 SCHEMA_VERSION || protobuf`.
pub fn encode<M: Message>(m: &M) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + m.encoded_len());
    out.push(SCHEMA_VERSION);
    out.extend_from_slice(&m.encode_to_vec());
    out
}

/// Decodes a record written by [`encode`].
///
/// # Errors
/// [`StoreError::Corrupt`] for an unknown schema version or undecodable bytes.
pub fn decode<M: Message + Default>(bytes: &[u8], what: &'static str) -> Result<M, StoreError> {
    match bytes.split_first() {
        Some((&SCHEMA_VERSION, body)) => M::decode(body).map_err(|_| StoreError::Corrupt(what)),
        _ => Err(StoreError::Corrupt(what)),
    }
}

/// The counters row.
#[derive(Clone, PartialEq, Message)]
pub struct MetaRecord {
    /// The next certificate serial (serials start at 1 and only grow).
    #[prost(uint64, tag = "1")]
    pub next_serial: u64,
    /// The next notice sequence number (from 1).
    #[prost(uint64, tag = "2")]
    pub next_notice_seq: u64,
    /// The next audit sequence number (from 1).
    #[prost(uint64, tag = "3")]
    pub next_audit_seq: u64,
    /// Creation time of the store.
    #[prost(uint64, tag = "4")]
    pub created_ms: u64,
    /// Total epochs committed, for status.
    #[prost(uint64, tag = "5")]
    pub rekeys: u64,
}

/// A device's lifecycle state (the proto `DeviceState`), stored as its `i32` in
/// [`DeviceRecord::state`]; domain code reads and writes it through
/// [`DeviceRecord::device_state`] and [`DeviceRecord::set_device_state`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceState {
    /// Registered, enrollment secret outstanding.
    Registered,
    /// Holds a certificate.
    Enrolled,
    /// Revoked by the owner.
    Revoked,
}

impl DeviceState {
    /// The stored (and proto) value.
    pub fn to_i32(self) -> i32 {
        match self {
            DeviceState::Registered => 1,
            DeviceState::Enrolled => 2,
            DeviceState::Revoked => 3,
        }
    }

    /// The state of a stored value; `None` for a value no version wrote.
    pub fn from_i32(v: i32) -> Option<DeviceState> {
        match v {
            1 => Some(DeviceState::Registered),
            2 => Some(DeviceState::Enrolled),
            3 => Some(DeviceState::Revoked),
            _ => None,
        }
    }

    /// The state as text, for listings.
    pub fn name(self) -> &'static str {
        match self {
            DeviceState::Registered => "registered",
            DeviceState::Enrolled => "enrolled",
            DeviceState::Revoked => "revoked",
        }
    }
}

/// A registered device.
#[derive(Clone, PartialEq, Message)]
pub struct DeviceRecord {
    /// Device ID.
    #[prost(string, tag = "1")]
    pub id: String,
    /// A [`DeviceState`] as its `i32`; read it with [`DeviceRecord::device_state`].
    #[prost(int32, tag = "2")]
    pub state: i32,
    /// Owner's note.
    #[prost(string, tag = "3")]
    pub note: String,
    /// Registration time.
    #[prost(uint64, tag = "4")]
    pub registered_ms: u64,
    /// The outstanding one-time enrollment secret; empty once spent by the first use of a
    /// certificate (PROTOCOL.md §3), or wiped by a revocation.
    #[prost(bytes = "vec", tag = "5")]
    pub enroll_secret: Vec<u8>,
    /// The certificate in use (its first use seen), 0 if none.
    #[prost(uint64, tag = "6")]
    pub serial: u64,
    /// Revocation time, 0 if not revoked.
    #[prost(uint64, tag = "7")]
    pub revoked_ms: u64,
    /// Revocation reason.
    #[prost(string, tag = "8")]
    pub revoke_reason: String,
    /// The latest certificate issued and not used yet, 0 if none.
    #[prost(uint64, tag = "9")]
    pub pending_serial: u64,
    /// When the outstanding secret expires, Unix ms (inclusive); 0 in rows written before
    /// secrets expired (then the registration time plus the default lifetime applies).
    #[prost(uint64, tag = "10")]
    pub secret_expires_ms: u64,
}

impl DeviceRecord {
    /// The lifecycle state; `None` for a value no version wrote.
    pub fn device_state(&self) -> Option<DeviceState> {
        DeviceState::from_i32(self.state)
    }

    /// Sets the lifecycle state.
    pub fn set_device_state(&mut self, state: DeviceState) {
        self.state = state.to_i32();
    }

    /// Whether the owner revoked the device.
    pub fn is_revoked(&self) -> bool {
        self.device_state() == Some(DeviceState::Revoked)
    }

    /// The certificate to show for the device: the one in use, else the pending one, 0 if none.
    pub fn current_serial(&self) -> u64 {
        if self.serial != 0 {
            self.serial
        } else {
            self.pending_serial
        }
    }
}

impl Drop for DeviceRecord {
    fn drop(&mut self) {
        self.enroll_secret.zeroize();
    }
}

/// An issued certificate.
#[derive(Clone, PartialEq, Message)]
pub struct CertRecord {
    /// Serial.
    #[prost(uint64, tag = "1")]
    pub serial: u64,
    /// Device ID.
    #[prost(string, tag = "2")]
    pub device_id: String,
    /// The encoded certificate.
    #[prost(bytes = "vec", tag = "3")]
    pub cert: Vec<u8>,
    /// pt(Q_i), the device public key opened from the certificate.
    #[prost(bytes = "vec", tag = "4")]
    pub public_key: Vec<u8>,
    /// pt(G_i).
    #[prost(bytes = "vec", tag = "5")]
    pub share_point: Vec<u8>,
    /// Validity start.
    #[prost(uint64, tag = "6")]
    pub not_before_ms: u64,
    /// Validity end.
    #[prost(uint64, tag = "7")]
    pub not_after_ms: u64,
    /// Revocation time, 0 if valid.
    #[prost(uint64, tag = "8")]
    pub revoked_ms: u64,
}

/// A group: the owner's settings plus the sealed state of the current epoch.
#[derive(Clone, PartialEq, Message)]
pub struct GroupRecord {
    /// Group ID.
    #[prost(string, tag = "1")]
    pub id: String,
    /// 1 standard, 2 anonymous.
    #[prost(uint32, tag = "2")]
    pub privacy: u32,
    /// Periodic rekey interval in seconds, 0 for none.
    #[prost(uint64, tag = "3")]
    pub rekey_interval_secs: u64,
    /// Creation time.
    #[prost(uint64, tag = "4")]
    pub created_ms: u64,
    /// Current epoch (also inside `state`; kept here for listings).
    #[prost(uint32, tag = "5")]
    pub epoch: u32,
    /// Start of the current epoch.
    #[prost(uint64, tag = "6")]
    pub epoch_started_ms: u64,
    /// `GroupState::to_record` of quva-client: the signed info of the current epoch and when it
    /// began. Public; the shares are in the member rows, written in the same batch.
    #[prost(bytes = "vec", tag = "7")]
    pub state: Vec<u8>,
}

/// A device's permission in one role of a group and, once it has joined, its share.
///
/// The rows with a share are the group's joined members: the CA rebuilds the group state from
/// them and the group record, and checks the keys they give against the signed info. Every
/// epoch change writes the rows it changes in the same batch as the group record.
#[derive(Clone, PartialEq, Message)]
pub struct MemberRecord {
    /// Device ID.
    #[prost(string, tag = "1")]
    pub device: String,
    /// 1 publisher, 2 subscriber.
    #[prost(uint32, tag = "2")]
    pub role: u32,
    /// Serial of the certificate whose share is joined, 0 if not joined.
    #[prost(uint64, tag = "4")]
    pub serial: u64,
    /// When the share was accepted.
    #[prost(uint64, tag = "5")]
    pub joined_ms: u64,
    /// When the permission was granted.
    #[prost(uint64, tag = "6")]
    pub allowed_ms: u64,
    /// sc(v_i), the joined share (secret), empty if not joined.
    #[prost(bytes = "vec", tag = "7")]
    pub share: Vec<u8>,
    /// The member's leaf in its role's key tree (PROTOCOL.md §5.1), meaningful once joined.
    #[prost(uint32, tag = "8")]
    pub leaf: u32,
}

impl MemberRecord {
    /// Whether the member has joined (an accepted share is in the group state).
    pub fn joined(&self) -> bool {
        self.serial != 0
    }

    /// A permission granted at `allowed_ms`, not joined yet.
    pub fn allowed(device: &str, role: u32, allowed_ms: u64) -> MemberRecord {
        let mut m = MemberRecord::default();
        m.device = device.to_owned();
        m.role = role;
        m.allowed_ms = allowed_ms;
        m
    }

    /// The permission without the share: the member left but may join again.
    pub fn left(&self) -> MemberRecord {
        MemberRecord::allowed(&self.device, self.role, self.allowed_ms)
    }
}

impl Drop for MemberRecord {
    fn drop(&mut self) {
        self.share.zeroize();
    }
}

/// A member that joined or left in an epoch.
#[derive(Clone, PartialEq, Message)]
pub struct EpochMember {
    /// Device ID.
    #[prost(string, tag = "1")]
    pub device: String,
    /// 1 publisher, 2 subscriber.
    #[prost(uint32, tag = "2")]
    pub role: u32,
    /// Certificate serial.
    #[prost(uint64, tag = "3")]
    pub serial: u64,
}

/// The public record of one epoch.
#[derive(Clone, PartialEq, Message)]
pub struct EpochRecord {
    /// Epoch number.
    #[prost(uint32, tag = "1")]
    pub epoch: u32,
    /// Start time.
    #[prost(uint64, tag = "2")]
    pub started_ms: u64,
    /// `ginfo || sig`.
    #[prost(bytes = "vec", tag = "3")]
    pub signed_ginfo: Vec<u8>,
    /// Members new in this epoch (first joins and new certificates), sorted.
    #[prost(message, repeated, tag = "7")]
    pub joined: Vec<EpochMember>,
    /// Members gone in this epoch (including a renewed member's old certificate), sorted.
    #[prost(message, repeated, tag = "8")]
    pub departed: Vec<EpochMember>,
    /// Why the epoch began (`join`, `leave`, `periodic`, ...), comma-separated.
    #[prost(string, tag = "5")]
    pub reason: String,
    /// Sequence number of the last notice of this epoch change, 0 if none.
    #[prost(uint64, tag = "6")]
    pub last_notice_seq: u64,
}

/// A replay-cache entry.
#[derive(Clone, PartialEq, Message)]
pub struct NonceRecord {
    /// When the entry may be dropped.
    #[prost(uint64, tag = "1")]
    pub expires_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_check() {
        let m = MetaRecord {
            next_serial: 5,
            next_notice_seq: 7,
            next_audit_seq: 9,
            created_ms: 1,
            rekeys: 2,
        };
        let bytes = encode(&m);
        assert_eq!(bytes[0], SCHEMA_VERSION);
        assert_eq!(decode::<MetaRecord>(&bytes, "meta").unwrap(), m);
        let mut other = bytes.clone();
        other[0] = 2;
        assert_eq!(
            decode::<MetaRecord>(&other, "meta"),
            Err(StoreError::Corrupt("meta"))
        );
        assert!(decode::<MetaRecord>(&[], "meta").is_err());
    }

    #[test]
    fn device_states_keep_their_proto_values() {
        use quva_proto::v1::DeviceState as Proto;
        for (state, proto) in [
            (DeviceState::Registered, Proto::Registered),
            (DeviceState::Enrolled, Proto::Enrolled),
            (DeviceState::Revoked, Proto::Revoked),
        ] {
            assert_eq!(state.to_i32(), proto as i32);
            assert_eq!(DeviceState::from_i32(proto as i32), Some(state));
        }
        assert_eq!(DeviceState::from_i32(0), None);
    }
}
