//! Direct messages: a pairwise channel between two enrolled devices, on `quva/d/<b>`.
//!
//! Implements PROTOCOL.md §7.1 (after Chien & Wang's E2E OTA). Implicit certificates give every
//! pair of enrolled identities a static shared secret with no extra round trip:
//! xdh(d_a, Q_b) = xdh(d_b, Q_a).
//!
//! ```text
//! dbody   = u8 1 || u8 4 || str(a) || str(b) || u64 T_ms || 16-byte salt || blob(cert_a) || blob(ct)
//! K       = KDF(salt, xdh(d_a, Q_b), "quva/v1/direct" || str(a) || str(b) || u64 T_ms)
//! ct      = AEAD_K(M, all dbody bytes before blob(ct))
//! message = dbody || sign(d_a, "quva/v1/direct", dbody)
//! ```
//!
//! Senders use a [`DirectSealer`]. The recipient parses ([`UnverifiedDirect::decode`]), looks up
//! the [`DirectFloor`] it stored for the claimed sender, and [`UnverifiedDirect::open`]s the
//! message: b is itself, cert_a opens under Q_CA and is valid at the recipient's `now`, a is listed
//! with exactly cert_a in a current member list of one of its groups ([`DirectMembership`]), T_ms
//! is above the floor, the signature verifies, the ciphertext opens. The result is a
//! [`StagedDirect`]: the caller persists [`StagedDirect::floor`] and only then takes the payload
//! with [`StagedDirect::commit`]. There is no time window at the recipient (direct messages may
//! wait in a persistent session); the floor refuses replays, also after a reboot.
//!
//! The bridge calls [`UnverifiedDirect::verify_at_bridge`]: window, replay cache, sender = the
//! connection's identity, the sender's current certificate, signature. It holds no secret and
//! learns nothing of M.
//!
//! Direct messages have no forward secrecy (static keys): use them for keys and commands, and
//! rotate what they carry.
//!
//! # Usage
//! ```
//! use quva_client::curve::KeyPair;
//! use quva_client::direct::{DirectFloor, DirectSealer, MembershipFn, UnverifiedDirect};
//! use quva_client::enrollment::{EnrollRequest, EnrollResponse, EnrollmentSecret, ImplicitCert,
//!     PendingEnrollment};
//! use quva_client::ids::DeviceId;
//! use rand_core::OsRng;
//! use quva_client::schnorr::VerifyingKey;
//!
//! let mut rng = OsRng;
//! let now = 1_700_000_000_000u64;
//! let ca = KeyPair::random(&mut rng);
//! let enroll = |name: &str, rng: &mut OsRng| {
//!     let secret = EnrollmentSecret::random(rng);
//!     let p = PendingEnrollment::new(DeviceId::new(name).unwrap(), now, rng);
//!     let resp = p.enroll_request(&secret).verify(&secret, now, 60_000).unwrap()
//!         .issue(&ca, 1, now, now + 86_400_000, rng).unwrap();
//!     p.accept(&resp, ca.public()).unwrap()
//! };
//! let (a, b) = (enroll("owner", &mut rng), enroll("sensor-01", &mut rng));
//!
//! let sealer = DirectSealer { key: a.key(), cert: a.cert() };
//! let wire = sealer
//!     .seal(b.cert().id(), b.key().public(), now, b"rotate: 42", &mut rng)
//!     .unwrap();
//!
//! // b: every member list it holds says "owner" is listed with this certificate.
//! let lists = MembershipFn(|_: &ImplicitCert, _: &VerifyingKey| true);
//! let msg = UnverifiedDirect::decode(&wire).unwrap();
//! let staged = msg
//!     .open(b.cert().id(), b.key(), ca.public(), &lists, DirectFloor::NONE, now + 3_600_000)
//!     .unwrap();
//! let (sender, floor) = staged.floor(); // persist (sender, floor) first …
//! assert_eq!(floor.last_accepted(), Some(now));
//! let opened = staged.commit();         // … then act on the payload.
//! assert_eq!(opened.payload(), b"rotate: 42");
//! assert_eq!(opened.sender().as_str(), "owner");
//! // The same message again is below the floor.
//! assert!(msg.open(b.cert().id(), b.key(), ca.public(), &lists, floor, now).is_err());
//! ```

use core::fmt;
use core::ops::Range;

use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::codec::{Decode, DecodeError, Encode, Reader, put_blob, put_u8, put_u64};
use crate::curve::{CurveError, KeyPair, Point, sha256};
use crate::enrollment::{EnrollError, ImplicitCert};
use crate::ids::DeviceId;
use crate::members::MemberList;
use crate::message::{DEFAULT_MAX_PAYLOAD, DEFAULT_WINDOW_MS, Directory, SALT_LEN};
use crate::replay::{PartitionedReplay, ReplayError};
use crate::schnorr::{Signature, VerifyingKey};
use crate::symmetric::{TAG_LEN, aead_open, aead_seal, kdf};

/// Signature and key-derivation tag of direct messages.
pub const TAG_DIRECT: &str = "quva/v1/direct";
/// The kind byte of a direct message (after the options 1–3 of §6).
pub const KIND_DIRECT: u8 = 4;
/// Largest encoded certificate a direct message may carry. A certificate is 101 bytes plus its
/// device ID (at most 64 bytes).
pub const MAX_CERT_LEN: usize = 101 + crate::ids::MAX_DEVICE_ID_LEN;
/// Largest payload a [`DirectSealer`] accepts: the default PUBLISH limit less the framing of a
/// message between two 64-byte IDs.
pub const MAX_DIRECT_PAYLOAD: usize =
    DEFAULT_MAX_PAYLOAD - (2 + 2 * (2 + 64) + 8 + SALT_LEN + 4 + MAX_CERT_LEN + 4 + TAG_LEN + 65);

/// The bridge's replay cache of direct messages: one partition per sender, each with its own
/// quota, so that no sender can raise another's floor.
pub type DirectReplay = PartitionedReplay<DeviceId>;

/// Why a direct message could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DirectSealError {
    /// The payload is larger than [`MAX_DIRECT_PAYLOAD`].
    #[error("payload too large")]
    TooLarge,
    /// A curve operation produced a forbidden value (probability 2⁻²⁵⁶).
    #[error(transparent)]
    Curve(#[from] CurveError),
}

/// Why a direct message was refused, at the recipient or at the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DirectRejection {
    /// Larger than the configured maximum; refused before any parsing or cryptography.
    #[error("message too large")]
    TooLarge,
    /// The bytes are not a well-formed direct message.
    #[error("malformed direct message: {0}")]
    Malformed(DecodeError),
    /// The message is addressed to another device.
    #[error("message for another recipient")]
    NotForMe,
    /// The sender's certificate names another CA or does not open into a key.
    #[error("invalid sender certificate")]
    BadCertificate,
    /// The sender's certificate has expired (by the checker's clock).
    #[error("sender certificate expired")]
    CertificateExpired,
    /// The sender's certificate is not yet valid (by the checker's clock).
    #[error("sender certificate not yet valid")]
    CertificateNotYetValid,
    /// The certificate is another device's than the claimed sender's, or (at the bridge) the
    /// sender is not the connection's identity.
    #[error("sender mismatch")]
    SenderMismatch,
    /// The sender is not listed with exactly this certificate in a current member list of a
    /// group of the recipient (revoked, superseded, or a stranger); at the bridge: not the
    /// sender's current certificate.
    #[error("sender certificate not current")]
    NotListed,
    /// The timestamp is not above the last one accepted from this sender (recipient), or the
    /// message hash was already seen (bridge).
    #[error("replayed or out-of-order message")]
    Replayed,
    /// At the bridge: the timestamp is more than the window before now.
    #[error("stale timestamp")]
    StaleTimestamp,
    /// At the bridge: the timestamp is more than the window after now.
    #[error("timestamp in the future")]
    FutureTimestamp,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The ciphertext did not decrypt.
    #[error("decryption failed")]
    DecryptionFailed,
}

impl DirectRejection {
    /// Every label [`DirectRejection::label`] can return, for pre-registering counters.
    pub const LABELS: [&'static str; 13] = [
        "too_large",
        "malformed",
        "not_for_me",
        "bad_certificate",
        "certificate_expired",
        "certificate_not_yet_valid",
        "sender_mismatch",
        "not_listed",
        "replayed",
        "stale_timestamp",
        "future_timestamp",
        "bad_signature",
        "decryption_failed",
    ];

    /// A stable snake_case name of the reason, for counters and logs.
    pub fn label(&self) -> &'static str {
        match self {
            DirectRejection::TooLarge => "too_large",
            DirectRejection::Malformed(_) => "malformed",
            DirectRejection::NotForMe => "not_for_me",
            DirectRejection::BadCertificate => "bad_certificate",
            DirectRejection::CertificateExpired => "certificate_expired",
            DirectRejection::CertificateNotYetValid => "certificate_not_yet_valid",
            DirectRejection::SenderMismatch => "sender_mismatch",
            DirectRejection::NotListed => "not_listed",
            DirectRejection::Replayed => "replayed",
            DirectRejection::StaleTimestamp => "stale_timestamp",
            DirectRejection::FutureTimestamp => "future_timestamp",
            DirectRejection::BadSignature => "bad_signature",
            DirectRejection::DecryptionFailed => "decryption_failed",
        }
    }

    /// The MQTT 5 PUBACK reason code at the bridge: 0x99 for malformed or oversize payloads,
    /// 0x87 (not authorized) otherwise.
    pub fn puback_reason_code(&self) -> u8 {
        match self {
            DirectRejection::Malformed(_) | DirectRejection::TooLarge => {
                crate::reasons::PAYLOAD_FORMAT_INVALID
            }
            _ => crate::reasons::NOT_AUTHORIZED,
        }
    }
}

/// The recipient's membership check (PROTOCOL.md §7.1): whether the sender named in `cert`
/// appears with exactly `cert` (opening to `q`) in the current member list of a group the
/// recipient belongs to. The device daemon implements it over the verified lists it holds;
/// implementations exist for a slice of [`MemberList`]s and for functions ([`MembershipFn`]).
pub trait DirectMembership {
    /// Whether `cert`, opening to `q`, is listed in a current member list of one of the
    /// recipient's groups (any role).
    fn lists(&self, cert: &ImplicitCert, q: &VerifyingKey) -> bool;
}

impl DirectMembership for [MemberList] {
    fn lists(&self, cert: &ImplicitCert, q: &VerifyingKey) -> bool {
        self.iter().any(|l| l.entries_of(cert, q).next().is_some())
    }
}

impl DirectMembership for Vec<MemberList> {
    fn lists(&self, cert: &ImplicitCert, q: &VerifyingKey) -> bool {
        self.as_slice().lists(cert, q)
    }
}

/// A [`DirectMembership`] given by a function (a daemon's lookup, a test's answer).
#[derive(Clone, Copy, Debug)]
pub struct MembershipFn<F>(pub F);

impl<F: Fn(&ImplicitCert, &VerifyingKey) -> bool> DirectMembership for MembershipFn<F> {
    fn lists(&self, cert: &ImplicitCert, q: &VerifyingKey) -> bool {
        (self.0)(cert, q)
    }
}

/// The per-sender floor of a recipient: the T_ms of the last direct message it accepted from
/// one sender. Only a strictly greater T_ms is accepted next. The daemon stores one per sender,
/// durably, and persists the new one before acting on a message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DirectFloor(Option<u64>);

impl DirectFloor {
    /// No message accepted from this sender yet.
    pub const NONE: DirectFloor = DirectFloor(None);

    /// The floor after accepting a message with `t_ms`.
    pub fn at(t_ms: u64) -> Self {
        DirectFloor(Some(t_ms))
    }

    /// The T_ms of the last accepted message, if any.
    pub fn last_accepted(&self) -> Option<u64> {
        self.0
    }

    /// The new floor if `t_ms` is strictly above this one.
    ///
    /// # Errors
    /// [`DirectRejection::Replayed`] otherwise.
    pub fn admit(&self, t_ms: u64) -> Result<DirectFloor, DirectRejection> {
        match self.0 {
            Some(last) if t_ms <= last => Err(DirectRejection::Replayed),
            _ => Ok(DirectFloor::at(t_ms)),
        }
    }
}

/// A sender's credentials for direct messages: its key pair and current certificate.
#[derive(Clone, Copy, Debug)]
pub struct DirectSealer<'a> {
    /// The sender's key pair (d_a, Q_a).
    pub key: &'a KeyPair,
    /// The sender's certificate, whose ID is the sender a.
    pub cert: &'a ImplicitCert,
}

impl DirectSealer<'_> {
    /// Seals `m` for `recipient`, whose public key is `q_recipient`, with a fresh salt. T_ms must
    /// grow strictly per recipient (the recipient refuses anything not above its floor).
    ///
    /// # Errors
    /// [`DirectSealError`].
    pub fn seal(
        &self,
        recipient: &DeviceId,
        q_recipient: &Point,
        t_ms: u64,
        m: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<u8>, DirectSealError> {
        let mut salt = [0u8; SALT_LEN];
        rng.fill_bytes(&mut salt);
        let mut rand = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut rand[..]);
        self.seal_with(recipient, q_recipient, t_ms, m, &salt, &rand)
    }

    /// [`seal`](Self::seal) with the salt and the signature's random bytes given (test vectors).
    /// The salt must be fresh: it makes the static-DH key single-use.
    ///
    /// # Errors
    /// [`DirectSealError`].
    pub fn seal_with(
        &self,
        recipient: &DeviceId,
        q_recipient: &Point,
        t_ms: u64,
        m: &[u8],
        salt: &[u8; SALT_LEN],
        rand: &[u8; 32],
    ) -> Result<Vec<u8>, DirectSealError> {
        if m.len() > MAX_DIRECT_PAYLOAD {
            return Err(DirectSealError::TooLarge);
        }
        let sender = self.cert.id();
        let mut body = Vec::with_capacity(m.len() + 512);
        put_u8(&mut body, 1);
        put_u8(&mut body, KIND_DIRECT);
        let ids_start = body.len();
        sender.encode(&mut body);
        recipient.encode(&mut body);
        put_u64(&mut body, t_ms);
        let shared = self.key.xdh(q_recipient)?;
        let key = direct_key(salt, &shared, body.get(ids_start..).unwrap_or_default());
        body.extend_from_slice(salt);
        put_blob(&mut body, &self.cert.to_bytes());
        let ct = aead_seal(&key, &body, m);
        put_blob(&mut body, &ct);
        let sig = self.key.sign_with_entropy(TAG_DIRECT, &body, rand)?;
        sig.encode(&mut body);
        Ok(body)
    }
}

/// K = KDF(salt, xdh, "quva/v1/direct" || str(a) || str(b) || u64 T_ms).
fn direct_key(salt: &[u8], shared: &[u8; 32], ids_and_time: &[u8]) -> Zeroizing<[u8; 32]> {
    kdf(salt, &shared[..], &[TAG_DIRECT.as_bytes(), ids_and_time])
}

/// A direct message that decoded but is not verified: routing facts and the raw bytes, no
/// payload.
#[derive(Clone, PartialEq, Eq)]
pub struct UnverifiedDirect {
    raw: Vec<u8>,
    sender: DeviceId,
    recipient: DeviceId,
    t_ms: u64,
    salt: [u8; SALT_LEN],
    cert: ImplicitCert,
    /// str(a) || str(b) || u64 T_ms, the KDF info after the tag.
    ids_and_time: Range<usize>,
    /// Everything before blob(ct): the AEAD associated data.
    aad_end: usize,
    ciphertext: Range<usize>,
    body_end: usize,
    signature: Signature,
    hash: [u8; 32],
}

impl UnverifiedDirect {
    /// Decodes a PUBLISH payload under the default size limit ([`DEFAULT_MAX_PAYLOAD`]).
    ///
    /// # Errors
    /// [`DirectRejection::TooLarge`] (checked first) or [`DirectRejection::Malformed`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DirectRejection> {
        Self::decode_with_limit(bytes, DEFAULT_MAX_PAYLOAD)
    }

    /// Decodes a PUBLISH payload of at most `max_payload` bytes, checked before any parsing.
    ///
    /// # Errors
    /// [`DirectRejection::TooLarge`] (checked first) or [`DirectRejection::Malformed`].
    pub fn decode_with_limit(bytes: &[u8], max_payload: usize) -> Result<Self, DirectRejection> {
        if bytes.len() > max_payload {
            return Err(DirectRejection::TooLarge);
        }
        Self::from_bytes(bytes).map_err(DirectRejection::Malformed)
    }

    /// The claimed sender a (also the ID in the carried certificate, checked at decoding).
    pub fn sender(&self) -> &DeviceId {
        &self.sender
    }

    /// The addressee b.
    pub fn recipient(&self) -> &DeviceId {
        &self.recipient
    }

    /// The sender's timestamp.
    pub fn t_ms(&self) -> u64 {
        self.t_ms
    }

    /// The sender's certificate as carried (not yet opened or checked).
    pub fn cert(&self) -> &ImplicitCert {
        &self.cert
    }

    /// SHA-256 of dbody (the message without its signature): the bridge's replay-cache key.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// The signed dbody.
    pub fn body(&self) -> &[u8] {
        self.raw.get(..self.body_end).unwrap_or_default()
    }

    /// The signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The whole message as received.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// Opens the certificate under Q_CA, checks it is valid at `now_ms` and names the sender.
    fn sender_key(&self, q_ca: &Point, now_ms: u64) -> Result<VerifyingKey, DirectRejection> {
        let q = self
            .cert
            .open(q_ca)
            .map_err(|_| DirectRejection::BadCertificate)?;
        self.cert.check_validity(now_ms).map_err(|e| match e {
            EnrollError::NotYetValid => DirectRejection::CertificateNotYetValid,
            _ => DirectRejection::CertificateExpired,
        })?;
        Ok(q)
    }

    fn check_signature(&self, q: &VerifyingKey) -> Result<(), DirectRejection> {
        q.verify(TAG_DIRECT, self.body(), &self.signature)
            .map_err(|_| DirectRejection::BadSignature)
    }

    /// Verifies and decrypts at the recipient `me` (key `my_key`), in this order: addressed to
    /// `me`; cert_a opens under `q_ca` and is valid at `now_ms` (the recipient's clock, not the
    /// sender's T_ms); `members` lists a with exactly cert_a; T_ms above `floor`, the floor
    /// stored for [`sender`](Self::sender); the signature; the decryption. No time window.
    ///
    /// # Errors
    /// The first failing check's [`DirectRejection`].
    pub fn open(
        &self,
        me: &DeviceId,
        my_key: &KeyPair,
        q_ca: &Point,
        members: &(impl DirectMembership + ?Sized),
        floor: DirectFloor,
        now_ms: u64,
    ) -> Result<StagedDirect, DirectRejection> {
        if &self.recipient != me {
            return Err(DirectRejection::NotForMe);
        }
        let q_a = self.sender_key(q_ca, now_ms)?;
        if !members.lists(&self.cert, &q_a) {
            return Err(DirectRejection::NotListed);
        }
        let new_floor = floor.admit(self.t_ms)?;
        self.check_signature(&q_a)?;
        let shared = my_key
            .xdh(&q_a.0)
            .map_err(|_| DirectRejection::DecryptionFailed)?;
        let info = self.raw.get(self.ids_and_time.clone()).unwrap_or_default();
        let key = direct_key(&self.salt, &shared, info);
        let aad = self.raw.get(..self.aad_end).unwrap_or_default();
        let ct = self.raw.get(self.ciphertext.clone()).unwrap_or_default();
        let payload = aead_open(&key, aad, ct).map_err(|_| DirectRejection::DecryptionFailed)?;
        Ok(StagedDirect {
            opened: VerifiedDirect {
                sender: self.sender.clone(),
                t_ms: self.t_ms,
                payload,
            },
            floor: new_floor,
        })
    }

    /// The bridge's checks (PROTOCOL.md §7.1), with no secret: T_ms within `window_ms` of
    /// `now_ms`; the sender is `connection` (the identity of the publishing connection); cert_a
    /// opens under `q_ca`, is valid now and is the sender's current certificate
    /// (`dir.device_key(a)` gives the same key: a revoked or superseded certificate has none or
    /// another); the hash is unseen in the sender's replay partition; the signature; then the
    /// hash is recorded. The recipient's floor is not the bridge's business. Whether the
    /// PUBLISH's topic is `quva/d/<b>` for this message's b is the caller's check
    /// ([`crate::topics::direct`]).
    ///
    /// # Errors
    /// The first failing check's [`DirectRejection`]; nothing is recorded then.
    pub fn verify_at_bridge(
        &self,
        connection: &DeviceId,
        q_ca: &Point,
        dir: &impl Directory,
        replay: &mut DirectReplay,
        window_ms: u64,
        now_ms: u64,
    ) -> Result<BridgeDirect, DirectRejection> {
        if self.t_ms < now_ms.saturating_sub(window_ms) {
            return Err(DirectRejection::StaleTimestamp);
        }
        if self.t_ms > now_ms.saturating_add(window_ms) {
            return Err(DirectRejection::FutureTimestamp);
        }
        if &self.sender != connection {
            return Err(DirectRejection::SenderMismatch);
        }
        let q_a = self.sender_key(q_ca, now_ms)?;
        if dir.device_key(&self.sender) != Some(q_a) {
            return Err(DirectRejection::NotListed);
        }
        if replay.contains(&self.sender, &self.hash) {
            return Err(DirectRejection::Replayed);
        }
        self.check_signature(&q_a)?;
        replay
            .check_and_insert(self.sender.clone(), self.hash, self.t_ms, now_ms)
            .map_err(|e| match e {
                ReplayError::Replayed | ReplayError::BelowFloor => DirectRejection::Replayed,
                ReplayError::OutsideWindow if self.t_ms < now_ms => DirectRejection::StaleTimestamp,
                ReplayError::OutsideWindow => DirectRejection::FutureTimestamp,
            })?;
        Ok(BridgeDirect {
            sender: self.sender.clone(),
            recipient: self.recipient.clone(),
            t_ms: self.t_ms,
            hash: self.hash,
        })
    }
}

impl fmt::Debug for UnverifiedDirect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnverifiedDirect")
            .field("sender", &self.sender)
            .field("recipient", &self.recipient)
            .field("t_ms", &self.t_ms)
            .field("len", &self.raw.len())
            .finish_non_exhaustive()
    }
}

impl Encode for UnverifiedDirect {
    fn encode(&self, out: &mut Vec<u8>) {
        // Decoding is canonical, so the received bytes are the encoding.
        out.extend_from_slice(&self.raw);
    }
}

impl Decode for UnverifiedDirect {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let start = r.position();
        r.version("direct message")?;
        if r.u8("direct kind")? != KIND_DIRECT {
            return Err(DecodeError::InvalidValue("direct kind"));
        }
        let ids_start = r.position() - start;
        let sender = DeviceId::read(r, "direct sender")?;
        let recipient = DeviceId::read(r, "direct recipient")?;
        let t_ms = r.u64("direct timestamp")?;
        let ids_and_time = ids_start..r.position() - start;
        let salt = r.take_array::<SALT_LEN>("direct salt")?;
        let cert_len = usize::try_from(r.u32("direct certificate")?)
            .map_err(|_| DecodeError::TooLarge("direct certificate"))?;
        if cert_len > MAX_CERT_LEN {
            return Err(DecodeError::TooLarge("direct certificate"));
        }
        let cert = ImplicitCert::from_bytes(r.take(cert_len, "direct certificate")?)?;
        if cert.id() != &sender {
            return Err(DecodeError::InvalidValue("direct certificate id"));
        }
        let aad_end = r.position() - start;
        let ct_len = r.blob("direct ciphertext")?.len();
        if ct_len < TAG_LEN {
            return Err(DecodeError::InvalidValue("direct ciphertext"));
        }
        let body_end = r.position() - start;
        let ciphertext = body_end - ct_len..body_end;
        let signature = Signature::read(r)?;
        let raw = r
            .consumed()
            .get(start..)
            .ok_or(DecodeError::Truncated("direct message"))?
            .to_vec();
        let hash = sha256(&[raw
            .get(..body_end)
            .ok_or(DecodeError::Truncated("direct message"))?]);
        Ok(UnverifiedDirect {
            raw,
            sender,
            recipient,
            t_ms,
            salt,
            cert,
            ids_and_time,
            aad_end,
            ciphertext,
            body_end,
            signature,
            hash,
        })
    }
}

/// A direct message that passed every check of the recipient; its payload is released by
/// [`commit`](Self::commit) after the caller has persisted [`floor`](Self::floor).
pub struct StagedDirect {
    opened: VerifiedDirect,
    floor: DirectFloor,
}

impl StagedDirect {
    /// The sender and its new floor (this message's T_ms), to persist before acting.
    pub fn floor(&self) -> (&DeviceId, DirectFloor) {
        (&self.opened.sender, self.floor)
    }

    /// The verified message. Call it only once the new floor is durable: otherwise a reboot
    /// would accept the same message again.
    pub fn commit(self) -> VerifiedDirect {
        self.opened
    }
}

impl fmt::Debug for StagedDirect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StagedDirect")
            .field("opened", &self.opened)
            .field("floor", &self.floor)
            .finish()
    }
}

/// A verified, decrypted direct message; the only type that exposes its payload.
pub struct VerifiedDirect {
    sender: DeviceId,
    t_ms: u64,
    payload: Zeroizing<Vec<u8>>,
}

impl VerifiedDirect {
    /// The authenticated sender.
    pub fn sender(&self) -> &DeviceId {
        &self.sender
    }

    /// The sender's timestamp (now the sender's floor).
    pub fn t_ms(&self) -> u64 {
        self.t_ms
    }

    /// The decrypted payload M.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload, zeroized when dropped.
    pub fn into_payload(self) -> Zeroizing<Vec<u8>> {
        self.payload
    }
}

impl fmt::Debug for VerifiedDirect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedDirect")
            .field("sender", &self.sender)
            .field("t_ms", &self.t_ms)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// What the bridge learns from a direct message it accepted: routing facts, never the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeDirect {
    sender: DeviceId,
    recipient: DeviceId,
    t_ms: u64,
    hash: [u8; 32],
}

impl BridgeDirect {
    /// The sender (the connection's identity).
    pub fn sender(&self) -> &DeviceId {
        &self.sender
    }

    /// The addressee: the message belongs on `quva/d/<recipient>`.
    pub fn recipient(&self) -> &DeviceId {
        &self.recipient
    }

    /// The sender's timestamp.
    pub fn t_ms(&self) -> u64 {
        self.t_ms
    }

    /// SHA-256 of dbody.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }
}

/// The default bridge window for direct messages: the message window of §6.
pub const DEFAULT_DIRECT_WINDOW_MS: u64 = DEFAULT_WINDOW_MS;

#[cfg(test)]
mod tests;
