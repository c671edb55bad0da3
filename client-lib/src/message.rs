//! Protected group messages: the PUBLISH payloads of options 1, 2 and 3, sealed and verified.
//!
//! Implements PROTOCOL.md §6 (the paper's §4.3 with the fixes of §9.1 and §9.2).
//! `hdr = u8 1 || u8 kind || str(group) || u32 E || u64 T_ms`, kind = option (1, 2, 3) plus 0x80
//! for a query (subscriber → publishers).
//!
//! - Option 1 ([`Protection::Authenticated`]): `hdr || str(sender) || blob(M) || sig`.
//! - Option 2 ([`Protection::Confidential`]): `hdr || str(sender) || salt || blob(ct) || sig`,
//!   encrypted under a key derived from `xdh(d_i, Q_target)`.
//! - Option 3 ([`Protection::Anonymous`]): `hdr || pt(Z) || blob(ct) || sig`, the sender and its
//!   own signature inside the ciphertext, the outer signature made with the sender's group key.
//!
//! Senders use a [`Sealer`]. Receivers parse, then verify, as types:
//! [`UnverifiedMessage::decode`] checks the size limit before anything else, then
//! [`UnverifiedMessage::verify`] (a device: decrypts with its held group key) or
//! [`UnverifiedMessage::check_at_bridge`] (the bridge: no secret at all, batchable) yields a
//! [`VerifiedMessage`] or [`BridgeVerified`], or one [`Rejection`] that names the reason.
//!
//! # Usage
//! ```
//! use std::collections::HashMap;
//! use quva_client::curve::{KeyPair, Point};
//! use quva_client::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
//! use quva_client::message::{
//!     Directory, Direction, GroupLookupError, GroupPublicKeys, HeldKeys, Policy, Sealer,
//!     UnverifiedMessage,
//! };
//! use quva_client::replay::ReplayCache;
//! use rand_core::OsRng;
//! use quva_client::schnorr::VerifyingKey;
//!
//! struct Demo { group: GroupId, sender: DeviceId, q_i: Point, d_p: KeyPair, d_s: KeyPair }
//! impl Directory for Demo {
//!     fn group_keys(&self, g: &GroupId, e: Epoch, _now: u64)
//!         -> Result<GroupPublicKeys, GroupLookupError> {
//!         if *g != self.group { return Err(GroupLookupError::UnknownGroup) }
//!         if e != Epoch(1) { return Err(GroupLookupError::WrongEpoch) }
//!         Ok(GroupPublicKeys { q_p: *self.d_p.public(), q_s: *self.d_s.public() })
//!     }
//!     fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey> {
//!         (*id == self.sender).then_some(VerifyingKey(self.q_i))
//!     }
//!     fn is_member(&self, _g: &GroupId, _e: Epoch, id: &DeviceId, role: Role) -> bool {
//!         *id == self.sender && role == Role::Publisher
//!     }
//! }
//! impl HeldKeys for Demo {
//!     fn group_secret(&self, _g: &GroupId, _e: Epoch, kind: GroupKeyKind) -> Option<&KeyPair> {
//!         (kind == GroupKeyKind::P).then_some(&self.d_p)
//!     }
//! }
//!
//! let mut rng = OsRng;
//! let d_i = KeyPair::random(&mut rng);
//! let demo = Demo {
//!     group: GroupId::new("plant/line-3/temp").unwrap(),
//!     sender: DeviceId::new("sensor-01").unwrap(),
//!     q_i: *d_i.public(),
//!     d_p: KeyPair::random(&mut rng),
//!     d_s: KeyPair::random(&mut rng),
//! };
//! let now = 1_700_000_000_000;
//! let sealer = Sealer {
//!     group: &demo.group,
//!     epoch: Epoch(1),
//!     direction: Direction::Forward,
//!     sender: &demo.sender,
//!     key: &d_i,
//! };
//! let wire = sealer.option2(now, demo.d_p.public(), b"21.5 C", &mut rng).unwrap();
//!
//! let msg = UnverifiedMessage::decode(&wire).unwrap();
//! let mut replay = ReplayCache::default();
//! let verified = msg.verify(&demo, &demo, &Policy::default(), &mut replay, now).unwrap();
//! assert_eq!(verified.payload(), b"21.5 C");
//! assert_eq!(verified.sender(), &demo.sender);
//! // The same bytes again are a replay.
//! assert!(msg.verify(&demo, &demo, &Policy::default(), &mut replay, now).is_err());
//! ```

use core::fmt;
use core::ops::Range;

use zeroize::Zeroizing;

use crate::codec::{Decode, DecodeError, Encode, Reader, put_u8, put_u32, put_u64};
use crate::curve::{KeyPair, Point, sha256};
use crate::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use crate::schnorr::{Signature, VerifyingKey};
use crate::symmetric::TAG_LEN;

mod seal;
mod verify;

#[cfg(test)]
mod paper;
#[cfg(test)]
mod testkit;

pub use seal::{MAX_SEAL_PAYLOAD, SealError, Sealer};
pub use verify::{
    BridgeCheck, BridgeVerified, SignedCheck, VerifiedMessage, verify_batch_at_bridge,
    verify_signatures,
};

/// The partition of the bridge's replay cache a message falls in (PROTOCOL.md §8 v1.1): its
/// group and its claimed sender, or for option 3 (no sender visible) the group's anonymous
/// senders of that direction. Every copy of a message falls in the same partition, whoever
/// sends it, so per-partition floors never reopen a replay.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReplayPartition {
    /// Option 1/2: the sender named in the message (the signer).
    Sender(GroupId, DeviceId),
    /// Option 3: every anonymous sender of the group in this direction.
    Anonymous(GroupId, Direction),
}

/// The bridge's replay cache: one partition per group and sender, each with its own quota.
pub type BridgeReplay = crate::replay::PartitionedReplay<ReplayPartition>;

/// Default maximum PUBLISH payload: 256 KiB (PROTOCOL.md §6 limits).
pub const DEFAULT_MAX_PAYLOAD: usize = 256 * 1024;
/// Default timestamp window: 60 s.
pub const DEFAULT_WINDOW_MS: u64 = 60_000;
/// Length of the option-2 salt.
pub const SALT_LEN: usize = 16;
/// The bit added to the kind byte for a query (subscriber → publishers).
pub const QUERY_BIT: u8 = 0x80;

/// Signature tag of option 1.
pub const TAG_MSG1: &str = "quva/v1/msg1";
/// Signature and key-derivation tag of option 2.
pub const TAG_MSG2: &str = "quva/v1/msg2";
/// Key-derivation tag of option 3.
pub const TAG_MSG3: &str = "quva/v1/msg3";
/// Tag of option 3's inner (sender's) signature.
pub const TAG_MSG3_INNER: &str = "quva/v1/msg3-inner";
/// Tag of option 3's outer (group) signature.
pub const TAG_MSG3_OUTER: &str = "quva/v1/msg3-outer";

/// The protection option of a message (the low bits of the kind byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protection {
    /// Option 1: authentication and non-repudiation; the payload is in clear.
    Authenticated = 1,
    /// Option 2: option 1 plus confidentiality.
    Confidential = 2,
    /// Option 3: option 2 plus anonymity and unlinkability towards the bridge.
    Anonymous = 3,
}

impl Protection {
    /// The option number, 1 to 3.
    pub fn number(self) -> u8 {
        self as u8
    }

    /// The option for a number 1 to 3.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            1 => Some(Protection::Authenticated),
            2 => Some(Protection::Confidential),
            3 => Some(Protection::Anonymous),
            _ => None,
        }
    }
}

/// Which way a message flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Publisher → subscribers: target key Q_P, option-3 group signing key d_S.
    Forward,
    /// Subscriber → publishers (a query): target key Q_S, option-3 group signing key d_P.
    Query,
}

impl Direction {
    /// `Query` if `query`, else `Forward`.
    pub fn from_query(query: bool) -> Self {
        if query {
            Direction::Query
        } else {
            Direction::Forward
        }
    }

    /// Whether this is a query.
    pub fn is_query(self) -> bool {
        self == Direction::Query
    }

    /// The role a sender must have: publishers send forward, subscribers query.
    pub fn sender_role(self) -> Role {
        match self {
            Direction::Forward => Role::Publisher,
            Direction::Query => Role::Subscriber,
        }
    }

    /// The group key messages are encrypted to: P forward, S for queries. Its holders receive.
    pub fn target_key(self) -> GroupKeyKind {
        match self {
            Direction::Forward => GroupKeyKind::P,
            Direction::Query => GroupKeyKind::S,
        }
    }

    /// The group key that signs option-3 messages: the one the sender holds (S forward, P for
    /// queries).
    pub fn signing_key(self) -> GroupKeyKind {
        self.sender_role().held_key()
    }
}

/// The common header `hdr` of every message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// The protection option.
    pub protection: Protection,
    /// Forward or query.
    pub direction: Direction,
    /// The group (also the data topic).
    pub group: GroupId,
    /// The group epoch whose keys protect the message.
    pub epoch: Epoch,
    /// The sender's timestamp, Unix milliseconds.
    pub t_ms: u64,
}

impl Header {
    /// The kind byte: option number, plus [`QUERY_BIT`] for a query.
    pub fn kind(&self) -> u8 {
        let q = if self.direction.is_query() {
            QUERY_BIT
        } else {
            0
        };
        self.protection.number() | q
    }
}

impl Encode for Header {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u8(out, 1);
        put_u8(out, self.kind());
        self.group.encode(out);
        put_u32(out, self.epoch.0);
        put_u64(out, self.t_ms);
    }
}

impl Decode for Header {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version("message")?;
        let kind = r.u8("message kind")?;
        let protection = Protection::from_number(kind & !QUERY_BIT)
            .ok_or(DecodeError::InvalidValue("message kind"))?;
        Ok(Header {
            protection,
            direction: Direction::from_query(kind & QUERY_BIT != 0),
            group: GroupId::read(r, "message group")?,
            epoch: Epoch(r.u32("message epoch")?),
            t_ms: r.u64("message timestamp")?,
        })
    }
}

/// The option-specific part of a decoded message; ranges index the raw message bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Content {
    Authenticated {
        sender: DeviceId,
        sender_end: usize,
        payload: Range<usize>,
    },
    Confidential {
        sender: DeviceId,
        sender_end: usize,
        salt: [u8; SALT_LEN],
        ciphertext: Range<usize>,
    },
    Anonymous {
        z: Point,
        ciphertext: Range<usize>,
    },
}

/// A message that decoded but is not verified: it exposes routing facts (header, claimed sender,
/// hash, the signature to check) and its raw bytes for forwarding, but no payload accessor.
#[derive(Clone, PartialEq, Eq)]
pub struct UnverifiedMessage {
    raw: Vec<u8>,
    hash: [u8; 32],
    header: Header,
    hdr_end: usize,
    body_end: usize,
    content: Content,
    signature: Signature,
}

impl UnverifiedMessage {
    /// Decodes a PUBLISH payload under the default size limit ([`DEFAULT_MAX_PAYLOAD`]).
    ///
    /// # Errors
    /// [`Rejection::TooLarge`] (checked first) or [`Rejection::Malformed`].
    pub fn decode(bytes: &[u8]) -> Result<Self, Rejection> {
        Self::decode_with_limit(bytes, DEFAULT_MAX_PAYLOAD)
    }

    /// Decodes a PUBLISH payload of at most `max_payload` bytes. The length is checked before any
    /// parsing or cryptography.
    ///
    /// # Errors
    /// [`Rejection::TooLarge`] (checked first) or [`Rejection::Malformed`].
    pub fn decode_with_limit(bytes: &[u8], max_payload: usize) -> Result<Self, Rejection> {
        if bytes.len() > max_payload {
            return Err(Rejection::TooLarge);
        }
        Self::from_bytes(bytes).map_err(Rejection::Malformed)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The replay-cache key: SHA-256 of the body, i.e. the message without its signature. Keying
    /// on the body rather than the whole message matters for option 3: every holder of the group
    /// signing key can re-sign another member's body, and such a copy must still count as a
    /// replay.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// The bridge's replay partition for this message ([`ReplayPartition`]).
    pub fn replay_partition(&self) -> ReplayPartition {
        let group = self.header.group.clone();
        match self.claimed_sender() {
            Some(sender) => ReplayPartition::Sender(group, sender.clone()),
            None => ReplayPartition::Anonymous(group, self.header.direction),
        }
    }

    /// The claimed sender of an option-1/2 message; `None` for option 3, whose sender is hidden.
    pub fn claimed_sender(&self) -> Option<&DeviceId> {
        match &self.content {
            Content::Authenticated { sender, .. } | Content::Confidential { sender, .. } => {
                Some(sender)
            }
            Content::Anonymous { .. } => None,
        }
    }

    /// The signed body: everything before the (outer) signature.
    pub fn body(&self) -> &[u8] {
        self.raw.get(..self.body_end).unwrap_or_default()
    }

    /// The (outer) signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The domain tag of the (outer) signature.
    pub fn signature_tag(&self) -> &'static str {
        match self.header.protection {
            Protection::Authenticated => TAG_MSG1,
            Protection::Confidential => TAG_MSG2,
            Protection::Anonymous => TAG_MSG3_OUTER,
        }
    }

    /// The whole message as received.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn hdr(&self) -> &[u8] {
        self.raw.get(..self.hdr_end).unwrap_or_default()
    }

    fn slice(&self, range: Range<usize>) -> &[u8] {
        self.raw.get(range).unwrap_or_default()
    }
}

impl fmt::Debug for UnverifiedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnverifiedMessage")
            .field("header", &self.header)
            .field("claimed_sender", &self.claimed_sender())
            .field("len", &self.raw.len())
            .finish_non_exhaustive()
    }
}

impl Encode for UnverifiedMessage {
    fn encode(&self, out: &mut Vec<u8>) {
        // Decoding is canonical (lengths, compressed points and scalars below n have one
        // encoding), so the received bytes are the encoding.
        out.extend_from_slice(&self.raw);
    }
}

impl Decode for UnverifiedMessage {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let start = r.position();
        let header = Header::read(r)?;
        let hdr_end = r.position() - start;
        let content = match header.protection {
            Protection::Authenticated => {
                let sender = DeviceId::read(r, "message sender")?;
                let sender_end = r.position() - start;
                let payload = blob_range(r, start, "message payload")?;
                Content::Authenticated {
                    sender,
                    sender_end,
                    payload,
                }
            }
            Protection::Confidential => {
                let sender = DeviceId::read(r, "message sender")?;
                let sender_end = r.position() - start;
                let salt = r.take_array::<SALT_LEN>("message salt")?;
                let ciphertext = blob_range(r, start, "message ciphertext")?;
                if ciphertext.len() < TAG_LEN {
                    return Err(DecodeError::InvalidValue("message ciphertext"));
                }
                Content::Confidential {
                    sender,
                    sender_end,
                    salt,
                    ciphertext,
                }
            }
            Protection::Anonymous => {
                let z = r.point("message Z")?;
                let ciphertext = blob_range(r, start, "message ciphertext")?;
                if ciphertext.len() < TAG_LEN {
                    return Err(DecodeError::InvalidValue("message ciphertext"));
                }
                Content::Anonymous { z, ciphertext }
            }
        };
        let body_end = r.position() - start;
        let signature = Signature::read(r)?;
        let raw = r
            .consumed()
            .get(start..)
            .ok_or(DecodeError::Truncated("message"))?
            .to_vec();
        let body = raw
            .get(..body_end)
            .ok_or(DecodeError::Truncated("message"))?;
        Ok(UnverifiedMessage {
            hash: sha256(&[body]),
            raw,
            header,
            hdr_end,
            body_end,
            content,
            signature,
        })
    }
}

/// Reads `blob(x)` and returns its range relative to `start`.
fn blob_range(
    r: &mut Reader<'_>,
    start: usize,
    what: &'static str,
) -> Result<Range<usize>, DecodeError> {
    let len = r.blob(what)?.len();
    let end = r.position() - start;
    Ok(end - len..end)
}

/// The plaintext inside an option-3 ciphertext:
/// `str(sender) || pt(V1) || sc(s1) || blob(M)`.
pub(crate) struct AnonymousInner {
    sender: DeviceId,
    signature: Signature,
    payload: Zeroizing<Vec<u8>>,
}

impl Encode for AnonymousInner {
    fn encode(&self, out: &mut Vec<u8>) {
        self.sender.encode(out);
        self.signature.encode(out);
        crate::codec::put_blob(out, &self.payload);
    }
}

impl Decode for AnonymousInner {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(AnonymousInner {
            sender: DeviceId::read(r, "inner sender")?,
            signature: Signature::read(r)?,
            payload: Zeroizing::new(r.blob("inner payload")?.to_vec()),
        })
    }
}

/// Why a message was refused. One variant per reason, so that the bridge can count them
/// ([`Rejection::label`]) and answer a QoS 1 PUBLISH ([`Rejection::puback_reason_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The bytes are not a well-formed message (also an option-3 plaintext that is not).
    #[error("malformed message: {0}")]
    Malformed(DecodeError),
    /// Larger than the configured maximum; refused before any parsing or cryptography.
    #[error("message too large")]
    TooLarge,
    /// The group is not known.
    #[error("unknown group")]
    UnknownGroup,
    /// The epoch is neither current nor the previous one within its grace period.
    #[error("wrong epoch")]
    WrongEpoch,
    /// The timestamp is more than the window before now.
    #[error("stale timestamp")]
    StaleTimestamp,
    /// The timestamp is more than the window after now.
    #[error("timestamp in the future")]
    FutureTimestamp,
    /// A signature (option 1/2, option-3 outer or inner) does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The message was already accepted inside the window.
    #[error("replayed message")]
    Replayed,
    /// The sender is known but not a member of the role this message needs (publisher forward,
    /// subscriber for queries), or a group-level connection sent outside its role.
    #[error("sender not a member of the required role")]
    NotMember,
    /// No certificate is known for the claimed sender.
    #[error("unknown sender")]
    UnknownSender,
    /// At the bridge: the claimed sender is not the identity of the connection.
    #[error("sender is not the connection's identity")]
    SenderMismatch,
    /// The ciphertext did not decrypt.
    #[error("decryption failed")]
    DecryptionFailed,
    /// The receiver holds no group key for this group, epoch and direction.
    #[error("group key not held")]
    KeyNotHeld,
}

impl Rejection {
    /// Every label [`Rejection::label`] can return, for pre-registering counters.
    pub const LABELS: [&'static str; 13] = [
        "malformed",
        "too_large",
        "unknown_group",
        "wrong_epoch",
        "stale_timestamp",
        "future_timestamp",
        "bad_signature",
        "replayed",
        "not_member",
        "unknown_sender",
        "sender_mismatch",
        "decryption_failed",
        "key_not_held",
    ];

    /// A stable snake_case name of the reason, for counters and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Malformed(_) => "malformed",
            Rejection::TooLarge => "too_large",
            Rejection::UnknownGroup => "unknown_group",
            Rejection::WrongEpoch => "wrong_epoch",
            Rejection::StaleTimestamp => "stale_timestamp",
            Rejection::FutureTimestamp => "future_timestamp",
            Rejection::BadSignature => "bad_signature",
            Rejection::Replayed => "replayed",
            Rejection::NotMember => "not_member",
            Rejection::UnknownSender => "unknown_sender",
            Rejection::SenderMismatch => "sender_mismatch",
            Rejection::DecryptionFailed => "decryption_failed",
            Rejection::KeyNotHeld => "key_not_held",
        }
    }

    /// The MQTT 5 PUBACK reason code for a dropped QoS 1 PUBLISH: 0x99 (payload format invalid)
    /// for malformed or oversize payloads, 0x87 (not authorized) otherwise.
    pub fn puback_reason_code(&self) -> u8 {
        match self {
            Rejection::Malformed(_) | Rejection::TooLarge => crate::reasons::PAYLOAD_FORMAT_INVALID,
            _ => crate::reasons::NOT_AUTHORIZED,
        }
    }
}

/// The public keys of a group at one epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupPublicKeys {
    /// Q_P: forward messages are encrypted to it; subscribers hold d_P.
    pub q_p: Point,
    /// Q_S: queries are encrypted to it; publishers hold d_S.
    pub q_s: Point,
}

impl GroupPublicKeys {
    /// The public key of `kind`.
    pub fn key(&self, kind: GroupKeyKind) -> &Point {
        match kind {
            GroupKeyKind::P => &self.q_p,
            GroupKeyKind::S => &self.q_s,
        }
    }

    /// The key messages in `direction` are encrypted to (Q_P forward, Q_S for queries).
    pub fn target(&self, direction: Direction) -> &Point {
        self.key(direction.target_key())
    }

    /// The key that verifies option-3 outer signatures in `direction` (Q_S forward, Q_P for
    /// queries).
    pub fn outer_verifier(&self, direction: Direction) -> VerifyingKey {
        VerifyingKey(*self.key(direction.signing_key()))
    }
}

/// Why a [`Directory`] cannot give a group's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupLookupError {
    /// The group is not known.
    UnknownGroup,
    /// The epoch is neither current nor the previous one within its grace period.
    WrongEpoch,
}

/// Public knowledge a verifier needs: groups, their keys per epoch, devices and memberships.
/// The bridge implements it over the CA's group data; a device over its verified group info and
/// member certificates. No method returns a secret.
pub trait Directory {
    /// Q_P and Q_S of `group` at `epoch`, if the group is known and `epoch` is current or the
    /// previous epoch still within its grace period at `now_ms`.
    ///
    /// # Errors
    /// [`GroupLookupError`] otherwise.
    fn group_keys(
        &self,
        group: &GroupId,
        epoch: Epoch,
        now_ms: u64,
    ) -> Result<GroupPublicKeys, GroupLookupError>;

    /// The public key Q_i of a device with a valid (unexpired, unrevoked) certificate.
    fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey>;

    /// Whether `id` is a member of `group` in `role` at `epoch`.
    fn is_member(&self, group: &GroupId, epoch: Epoch, id: &DeviceId, role: Role) -> bool;
}

/// The group secrets a device holds: d_P as a subscriber, d_S as a publisher, per epoch.
pub trait HeldKeys {
    /// The held key of `kind` for `group` at `epoch`, if any.
    fn group_secret(&self, group: &GroupId, epoch: Epoch, kind: GroupKeyKind) -> Option<&KeyPair>;
}

/// Verification limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Largest accepted message in bytes (default 256 KiB).
    pub max_payload: usize,
    /// Accepted |T − now| in milliseconds (default 60 s).
    pub window_ms: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_payload: DEFAULT_MAX_PAYLOAD,
            window_ms: DEFAULT_WINDOW_MS,
        }
    }
}

/// Who is on the other end of the bridge connection a PUBLISH came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionIdentity {
    /// A connection authenticated with a device certificate (`quva-cert-v1`).
    Device(DeviceId),
    /// A group-level connection of an anonymous group (`quva-group-v1`): it may publish only
    /// option-3 traffic of its role in its group.
    Group {
        /// The group the proof was made for.
        group: GroupId,
        /// The role whose group key signed the proof.
        role: Role,
    },
}

#[cfg(test)]
mod tests {
    use super::testkit::World;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trip_and_kind_byte() {
        for (p, d, kind) in [
            (Protection::Authenticated, Direction::Forward, 0x01),
            (Protection::Confidential, Direction::Forward, 0x02),
            (Protection::Anonymous, Direction::Forward, 0x03),
            (Protection::Authenticated, Direction::Query, 0x81),
            (Protection::Confidential, Direction::Query, 0x82),
            (Protection::Anonymous, Direction::Query, 0x83),
        ] {
            let h = Header {
                protection: p,
                direction: d,
                group: GroupId::new("a/b/c").unwrap(),
                epoch: Epoch(0x0102_0304),
                t_ms: 0x0a0b_0c0d_0e0f_1011,
            };
            let bytes = h.to_bytes();
            assert_eq!(
                bytes,
                [
                    &[1u8, kind, 0, 5][..],
                    b"a/b/c",
                    &[1, 2, 3, 4, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11]
                ]
                .concat()
            );
            assert_eq!(Header::from_bytes(&bytes), Ok(h));
        }
    }

    #[test]
    fn header_rejects_unknown_version_kind_and_bad_group() {
        let h = Header {
            protection: Protection::Authenticated,
            direction: Direction::Forward,
            group: GroupId::new("g").unwrap(),
            epoch: Epoch(1),
            t_ms: 2,
        };
        let good = h.to_bytes();
        let mut v2 = good.clone();
        v2[0] = 2;
        assert_eq!(
            Header::from_bytes(&v2),
            Err(DecodeError::UnknownVersion("message"))
        );
        for kind in [0u8, 4, 0x7f, 0x80, 0x84, 0x41, 0xff] {
            let mut bad = good.clone();
            bad[1] = kind;
            assert_eq!(
                Header::from_bytes(&bad),
                Err(DecodeError::InvalidValue("message kind")),
                "kind {kind:#x}"
            );
        }
        let mut wildcard = good.clone();
        wildcard[4] = b'#';
        assert_eq!(
            Header::from_bytes(&wildcard),
            Err(DecodeError::InvalidId("message group"))
        );
        let mut long = good;
        long.push(0);
        assert!(matches!(
            Header::from_bytes(&long),
            Err(DecodeError::TrailingBytes(_))
        ));
    }

    #[test]
    fn message_decoding_rejects_trailing_and_truncated_bytes() {
        let w = World::new(1);
        for p in World::PROTECTIONS {
            let wire = w.seal(p, Direction::Forward, b"m", w.now);
            let msg = UnverifiedMessage::decode(&wire).unwrap();
            assert_eq!(msg.to_bytes(), wire);
            let mut long = wire.clone();
            long.push(0);
            assert!(matches!(
                UnverifiedMessage::decode(&long),
                Err(Rejection::Malformed(DecodeError::TrailingBytes(_)))
            ));
            for cut in 0..wire.len() {
                assert!(
                    matches!(
                        UnverifiedMessage::decode(&wire[..cut]),
                        Err(Rejection::Malformed(_))
                    ),
                    "{p:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn short_ciphertexts_are_malformed() {
        let w = World::new(2);
        let wire = w.seal(Protection::Confidential, Direction::Forward, b"", w.now);
        let msg = UnverifiedMessage::decode(&wire).unwrap();
        // Rebuild with a 15-byte ciphertext.
        let Content::Confidential { ciphertext, .. } = &msg.content else {
            panic!("option 2 expected");
        };
        let mut bad = wire[..ciphertext.start - 4].to_vec();
        bad.extend_from_slice(&15u32.to_be_bytes());
        bad.extend_from_slice(&[0u8; 15]);
        bad.extend_from_slice(&msg.signature.to_bytes());
        assert_eq!(
            UnverifiedMessage::decode(&bad),
            Err(Rejection::Malformed(DecodeError::InvalidValue(
                "message ciphertext"
            )))
        );
    }

    #[test]
    fn oversize_is_refused_before_parsing() {
        // Garbage that would be malformed is reported as too large: the length is checked first.
        let junk = vec![0xffu8; DEFAULT_MAX_PAYLOAD + 1];
        assert_eq!(UnverifiedMessage::decode(&junk), Err(Rejection::TooLarge));
        let w = World::new(3);
        let wire = w.seal(Protection::Authenticated, Direction::Forward, b"hi", w.now);
        assert_eq!(
            UnverifiedMessage::decode_with_limit(&wire, wire.len() - 1),
            Err(Rejection::TooLarge)
        );
        assert!(UnverifiedMessage::decode_with_limit(&wire, wire.len()).is_ok());
    }

    #[test]
    fn labels_are_distinct_and_listed() {
        let all = [
            Rejection::Malformed(DecodeError::Truncated("x")),
            Rejection::TooLarge,
            Rejection::UnknownGroup,
            Rejection::WrongEpoch,
            Rejection::StaleTimestamp,
            Rejection::FutureTimestamp,
            Rejection::BadSignature,
            Rejection::Replayed,
            Rejection::NotMember,
            Rejection::UnknownSender,
            Rejection::SenderMismatch,
            Rejection::DecryptionFailed,
            Rejection::KeyNotHeld,
        ];
        let labels: Vec<&str> = all.iter().map(Rejection::label).collect();
        assert_eq!(labels, Rejection::LABELS);
        assert_eq!(Rejection::TooLarge.puback_reason_code(), 0x99);
        assert_eq!(Rejection::BadSignature.puback_reason_code(), 0x87);
    }

    #[test]
    fn directions_pick_the_spec_keys() {
        assert_eq!(Direction::Forward.target_key(), GroupKeyKind::P);
        assert_eq!(Direction::Forward.signing_key(), GroupKeyKind::S);
        assert_eq!(Direction::Query.target_key(), GroupKeyKind::S);
        assert_eq!(Direction::Query.signing_key(), GroupKeyKind::P);
        let w = World::new(4);
        let keys = w.group_keys();
        assert_eq!(keys.target(Direction::Forward), w.d_p.public());
        assert_eq!(keys.outer_verifier(Direction::Forward).0, *w.d_s.public());
        assert_eq!(keys.target(Direction::Query), w.d_s.public());
        assert_eq!(keys.outer_verifier(Direction::Query).0, *w.d_p.public());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn header_codec_round_trips(
            p in 1u8..=3,
            query: bool,
            group in "[a-z0-9]{1,10}(/[A-Za-z0-9_.-]{1,10}){0,5}",
            epoch: u32,
            t_ms: u64,
        ) {
            let h = Header {
                protection: Protection::from_number(p).unwrap(),
                direction: Direction::from_query(query),
                group: GroupId::new(&group).unwrap(),
                epoch: Epoch(epoch),
                t_ms,
            };
            prop_assert_eq!(Header::from_bytes(&h.to_bytes()), Ok(h));
        }

        #[test]
        fn message_codec_round_trips(
            p in 1u8..=3,
            query: bool,
            payload in proptest::collection::vec(any::<u8>(), 0..200),
            seed: u64,
        ) {
            let w = World::new(seed);
            let p = Protection::from_number(p).unwrap();
            let wire = w.seal(p, Direction::from_query(query), &payload, w.now);
            let msg = UnverifiedMessage::decode(&wire).unwrap();
            prop_assert_eq!(msg.to_bytes(), wire.clone());
            prop_assert_eq!(msg.header().protection, p);
            prop_assert_eq!(msg.header().direction, Direction::from_query(query));
            prop_assert_eq!(msg.hash(), &sha256(&[&wire[..wire.len() - 65]]));
            let again = UnverifiedMessage::from_bytes(&msg.to_bytes()).unwrap();
            prop_assert_eq!(again, msg);
        }
    }
}
