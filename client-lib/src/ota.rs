//! Group OTA: a release encrypted once for a whole group, deposited as retained messages, the
//! signer offline while devices update.
//!
//! Implements PROTOCOL.md §7.2 (after Chien et al.'s group-key OTA). A release v of an image:
//!
//! ```text
//! K_c   random, 32 bytes; n_chunks = ceil(size / chunk_size), chunk_size ≥ 1, size ≥ 1
//! K_j   = KDF("", K_c, "quva/v1/ota-chunk" || str(group) || u64 v || u32 j)
//! ct_j  = AEAD_Kj(m_j, u64 v || u32 j)                       on <group>/_ota/<signer>/<v>/c/<j>
//! h_j   = H(ct_j)
//! man   = u8 1 || str(group) || str(signer) || blob(cert_signer) || u64 v || u64 size ||
//!         u32 chunk_size || u32 n_chunks || n_chunks × h_j || u64 T_ms
//! manifest message = man || sign(d_signer, "quva/v1/ota-manifest", man)  on …/<v>/m
//! M     = u8 1 || u64 v || H(man) || K_c || H(image) || str(name)
//!         sent as an option-2 forward message of the group (§6)           on …/<v>/k
//! ```
//!
//! Status reports go the other way, as option-2 queries to the publishers:
//! `M = u8 2 || u64 v || u8 state || str(detail)` ([`StatusReport`]).
//!
//! - Signer: [`ReleaseSigner::release`] cuts, encrypts and signs a [`Release`]; its
//!   [`KeyMessage`] is sealed with the group's [`Sealer`](crate::message::Sealer) at each epoch.
//!   [`StatusBook`] keeps the latest report per (device, v).
//! - Device: [`UnverifiedManifest::decode`] then [`UnverifiedManifest::verify`] (pinned signer,
//!   no rollback, size limit, certificate under Q_CA and current in the group's member list,
//!   signature) gives a [`VerifiedManifest`]; [`VerifiedManifest::accept_key_message`] (or
//!   [`VerifiedManifest::accept_direct_key`] for a key sent as a §7.1 direct message) gives the
//!   [`AcceptedKey`]; a [`Download`] checks each chunk's hash before decrypting it, records what
//!   is stored (resumable from [`Download::progress`]) and finally checks H(image).
//! - Bridge: [`UnverifiedManifest::verify_at_bridge`] and [`VerifiedManifest::check_chunk`].
//!
//! Retained OTA messages are read long after publication: receivers skip the time window and the
//! replay cache for them (the version orders releases), so key messages and status reports are
//! verified with [`UnverifiedMessage::verify_without_window`](crate::message::UnverifiedMessage::verify_without_window).
//!
//! # Usage
//! ```
//! use quva_client::ota::{OtaPolicy, ReleaseSigner, DEFAULT_CHUNK_SIZE};
//! # use quva_client::curve::KeyPair;
//! # use quva_client::enrollment::{EnrollmentSecret, PendingEnrollment};
//! # use quva_client::ids::{DeviceId, GroupId};
//! # use rand_core::OsRng;
//! # let mut rng = OsRng;
//! # let now = 1_700_000_000_000u64;
//! # let ca = KeyPair::random(&mut rng);
//! # let secret = EnrollmentSecret::random(&mut rng);
//! # let p = PendingEnrollment::new(DeviceId::new("release-1").unwrap(), now, &mut rng);
//! # let resp = p.enroll_request(&secret).verify(&secret, now, 60_000).unwrap()
//! #     .issue(&ca, 1, now, now + 86_400_000, &mut rng).unwrap();
//! # let signer = p.accept(&resp, ca.public()).unwrap();
//! let group = GroupId::new("fw/sensor-v2").unwrap();
//! let image = vec![0xa5u8; 150_000];
//! let release = ReleaseSigner { group: &group, key: signer.key(), cert: signer.cert() }
//!     .release(7, "sensor-fw-7.bin", &image, DEFAULT_CHUNK_SIZE, now, &mut rng)
//!     .unwrap();
//! assert_eq!(release.chunks().len(), 3);
//! assert_eq!(release.manifest().version, 7);
//! // Publish release.manifest_message() on …/7/m, chunk j on …/7/c/<j>, and the key message
//! // sealed with the group's option-2 Sealer on …/7/k; devices verify with
//! // UnverifiedManifest::verify, accept the key, and run a Download.
//! ```

use crate::codec::DecodeError;
use crate::curve::CurveError;
use crate::message::{DEFAULT_MAX_PAYLOAD, SealError};
use crate::symmetric::TAG_LEN;

mod download;
mod key;
mod manifest;
mod release;
mod status;

#[cfg(test)]
mod tests;

pub use download::{Download, ImageDigest, OpenedChunk, ReadyImage};
pub use key::{AcceptedKey, ContentKey, KeyMessage};
pub use manifest::{
    Manifest, MembershipLists, SignerListing, UnverifiedManifest, VerifiedManifest,
};
pub use release::{Release, ReleaseSigner, seal_chunk};
pub use status::{OtaState, ReceivedStatus, StatusBook, StatusEntry, StatusReport};

/// Signature tag of the manifest.
pub const TAG_OTA_MANIFEST: &str = "quva/v1/ota-manifest";
/// KDF info prefix of the per-chunk keys.
pub const TAG_OTA_CHUNK: &str = "quva/v1/ota-chunk";
/// Default chunk size: 64 KiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Default largest image a device accepts: 256 MiB.
pub const DEFAULT_MAX_IMAGE_SIZE: u64 = 256 * 1024 * 1024;
/// Largest chunk whose ciphertext fits the default PUBLISH limit.
pub const DEFAULT_MAX_CHUNK_SIZE: u32 = (DEFAULT_MAX_PAYLOAD - TAG_LEN) as u32;
/// Largest image name in a key message, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Largest detail text in a status report, in bytes.
pub const MAX_DETAIL_LEN: usize = 1024;
/// Length of the content key K_c.
pub const CONTENT_KEY_LEN: usize = 32;
/// The type byte of a key message's M.
pub const TYPE_OTA_KEY: u8 = 1;
/// The type byte of a status report's M.
pub const TYPE_OTA_STATUS: u8 = 2;

/// Limits a device (or the bridge) applies to releases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OtaPolicy {
    /// Largest accepted image size in bytes (default 256 MiB).
    pub max_image_size: u64,
    /// Largest accepted chunk size (default: the PUBLISH limit less the AEAD tag).
    pub max_chunk_size: u32,
    /// Largest accepted manifest message in bytes (default: the PUBLISH limit, 256 KiB).
    pub max_manifest_len: usize,
}

impl Default for OtaPolicy {
    fn default() -> Self {
        OtaPolicy {
            max_image_size: DEFAULT_MAX_IMAGE_SIZE,
            max_chunk_size: DEFAULT_MAX_CHUNK_SIZE,
            max_manifest_len: DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// Why an OTA step refused its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OtaError {
    /// A manifest message over the configured limit; refused before parsing.
    #[error("manifest too large")]
    TooLarge,
    /// Bytes that are not a well-formed manifest, key message, status report or progress record.
    #[error("malformed: {0}")]
    Malformed(DecodeError),
    /// The manifest is for another group than the one it was expected for.
    #[error("manifest of another group")]
    WrongGroup,
    /// The signer is not pinned in the device's configuration.
    #[error("signer not pinned")]
    SignerNotPinned,
    /// The version is not above the installed one (no rollback).
    #[error("version not above the installed one")]
    Rollback,
    /// The image is larger than the configured limit.
    #[error("image too large")]
    ImageTooLarge,
    /// The chunk size is larger than the configured limit.
    #[error("chunk size too large")]
    ChunkSizeTooLarge,
    /// The signer's certificate names another CA or does not open into a key.
    #[error("invalid signer certificate")]
    BadCertificate,
    /// The signer's certificate has expired (by the checker's clock).
    #[error("signer certificate expired")]
    CertificateExpired,
    /// The signer's certificate is not yet valid (by the checker's clock).
    #[error("signer certificate not yet valid")]
    CertificateNotYetValid,
    /// The signer's certificate is not the one the group's current member list holds for a
    /// publisher of that ID (revoked, superseded, or not a publisher).
    #[error("signer certificate not current")]
    SignerNotListed,
    /// At the bridge: the signer is not the connection's identity.
    #[error("signer is not the connection's identity")]
    SignerMismatch,
    /// At the bridge: the topic does not name this manifest (group, signer, version, item).
    #[error("topic does not match the manifest")]
    TopicMismatch,
    /// The manifest signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// A chunk index not below n_chunks.
    #[error("chunk index out of range")]
    ChunkOutOfRange,
    /// A chunk ciphertext of the wrong length for its index.
    #[error("chunk length mismatch")]
    ChunkLengthMismatch,
    /// A chunk whose hash is not the manifest's h_j.
    #[error("chunk hash mismatch")]
    ChunkHashMismatch,
    /// A chunk (with a listed hash) that does not decrypt under the key message's K_c.
    #[error("chunk decryption failed")]
    DecryptionFailed,
    /// The image is not complete yet.
    #[error("image incomplete")]
    Incomplete,
    /// The assembled image's hash is not the key message's H(image).
    #[error("image hash mismatch")]
    ImageHashMismatch,
    /// A key message whose sender is not the manifest's signer.
    #[error("key message from another sender")]
    KeySenderMismatch,
    /// A key message for another version.
    #[error("key message for another version")]
    KeyVersionMismatch,
    /// A key message for another manifest (H(man) differs).
    #[error("key message for another manifest")]
    KeyManifestMismatch,
    /// A message of the wrong protection, direction or group for this OTA step.
    #[error("not an OTA message of this group")]
    NotOtaMessage,
    /// A progress record of another release.
    #[error("progress record of another release")]
    ProgressMismatch,
    /// A release of an empty image (size must be ≥ 1).
    #[error("empty image")]
    EmptyImage,
    /// A chunk size of 0.
    #[error("invalid chunk size")]
    InvalidChunkSize,
    /// More chunks than a u32 counts.
    #[error("too many chunks")]
    TooManyChunks,
    /// An image name longer than [`MAX_NAME_LEN`].
    #[error("image name too long")]
    NameTooLong,
    /// A status detail longer than [`MAX_DETAIL_LEN`].
    #[error("status detail too long")]
    DetailTooLong,
    /// The signer's certificate is not the signing key's, or names another ID.
    #[error("certificate does not belong to the signing key")]
    CertificateMismatch,
    /// A curve operation produced a forbidden value (probability 2⁻²⁵⁶).
    #[error(transparent)]
    Curve(#[from] CurveError),
    /// Sealing the key message or a status report failed.
    #[error(transparent)]
    Seal(#[from] SealError),
}

impl From<DecodeError> for OtaError {
    fn from(e: DecodeError) -> Self {
        OtaError::Malformed(e)
    }
}

impl OtaError {
    /// A stable snake_case name of the reason, for counters and logs.
    pub fn label(&self) -> &'static str {
        match self {
            OtaError::TooLarge => "too_large",
            OtaError::Malformed(_) => "malformed",
            OtaError::WrongGroup => "wrong_group",
            OtaError::SignerNotPinned => "signer_not_pinned",
            OtaError::Rollback => "rollback",
            OtaError::ImageTooLarge => "image_too_large",
            OtaError::ChunkSizeTooLarge => "chunk_size_too_large",
            OtaError::BadCertificate => "bad_certificate",
            OtaError::CertificateExpired => "certificate_expired",
            OtaError::CertificateNotYetValid => "certificate_not_yet_valid",
            OtaError::SignerNotListed => "signer_not_listed",
            OtaError::SignerMismatch => "signer_mismatch",
            OtaError::TopicMismatch => "topic_mismatch",
            OtaError::BadSignature => "bad_signature",
            OtaError::ChunkOutOfRange => "chunk_out_of_range",
            OtaError::ChunkLengthMismatch => "chunk_length_mismatch",
            OtaError::ChunkHashMismatch => "chunk_hash_mismatch",
            OtaError::DecryptionFailed => "decryption_failed",
            OtaError::Incomplete => "incomplete",
            OtaError::ImageHashMismatch => "image_hash_mismatch",
            OtaError::KeySenderMismatch => "key_sender_mismatch",
            OtaError::KeyVersionMismatch => "key_version_mismatch",
            OtaError::KeyManifestMismatch => "key_manifest_mismatch",
            OtaError::NotOtaMessage => "not_ota_message",
            OtaError::ProgressMismatch => "progress_mismatch",
            OtaError::EmptyImage => "empty_image",
            OtaError::InvalidChunkSize => "invalid_chunk_size",
            OtaError::TooManyChunks => "too_many_chunks",
            OtaError::NameTooLong => "name_too_long",
            OtaError::DetailTooLong => "detail_too_long",
            OtaError::CertificateMismatch => "certificate_mismatch",
            OtaError::Curve(_) => "curve",
            OtaError::Seal(_) => "seal",
        }
    }

    /// The MQTT 5 PUBACK reason code at the bridge: 0x99 for malformed or oversize payloads,
    /// 0x87 (not authorized) otherwise.
    pub fn puback_reason_code(&self) -> u8 {
        match self {
            OtaError::Malformed(_) | OtaError::TooLarge => crate::reasons::PAYLOAD_FORMAT_INVALID,
            _ => crate::reasons::NOT_AUTHORIZED,
        }
    }
}
