//! The release manifest (PROTOCOL.md §7.2): its codec and its checks at a device and at the
//! bridge.

use core::fmt;

use subtle::ConstantTimeEq;

use super::key::{AcceptedKey, KeyMessage};
use super::{OtaError, OtaPolicy, TAG_OTA_MANIFEST};
use crate::codec::{Decode, DecodeError, Encode, Reader, put_blob, put_u8, put_u32, put_u64};
use crate::curve::{Point, sha256};
use crate::direct::{MAX_CERT_LEN, VerifiedDirect};
use crate::enrollment::{EnrollError, ImplicitCert};
use crate::ids::{DeviceId, GroupId, Role};
use crate::members::MemberList;
use crate::message::{Direction, Protection, VerifiedMessage};
use crate::schnorr::{Signature, VerifyingKey};
use crate::topics::{OtaItem, OtaTopic};

/// The unsigned manifest `man`:
/// `u8 1 || str(group) || str(signer) || blob(cert_signer) || u64 v || u64 size ||
/// u32 chunk_size || u32 n_chunks || n_chunks × 32-byte h_j || u64 T_ms`.
///
/// Decoding enforces size ≥ 1, chunk_size ≥ 1, n_chunks = ceil(size / chunk_size) and that the
/// certificate is the signer's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The OTA group.
    pub group: GroupId,
    /// The release signer.
    pub signer: DeviceId,
    /// The signer's certificate.
    pub cert: ImplicitCert,
    /// The release version v.
    pub version: u64,
    /// The image size in bytes.
    pub size: u64,
    /// The chunk size (the last chunk may be shorter).
    pub chunk_size: u32,
    /// h_j = H(ct_j) for every chunk, in order.
    pub chunk_hashes: Vec<[u8; 32]>,
    /// The signer's timestamp.
    pub t_ms: u64,
}

/// n_chunks = ceil(size / chunk_size), if size ≥ 1, chunk_size ≥ 1 and it fits a u32.
pub(super) fn chunk_count(size: u64, chunk_size: u32) -> Result<u32, OtaError> {
    if size == 0 {
        return Err(OtaError::EmptyImage);
    }
    if chunk_size == 0 {
        return Err(OtaError::InvalidChunkSize);
    }
    u32::try_from(size.div_ceil(u64::from(chunk_size))).map_err(|_| OtaError::TooManyChunks)
}

impl Manifest {
    /// The number of chunks.
    pub fn n_chunks(&self) -> u32 {
        // INVARIANT: built by decoding or by a release, both of which bound the count to u32.
        u32::try_from(self.chunk_hashes.len()).unwrap_or(u32::MAX)
    }

    /// The plaintext length of chunk `j`: chunk_size, or what is left for the last chunk.
    pub fn chunk_len(&self, j: u32) -> Option<u64> {
        let start = u64::from(j).checked_mul(u64::from(self.chunk_size))?;
        if j >= self.n_chunks() || start >= self.size {
            return None;
        }
        Some((self.size - start).min(u64::from(self.chunk_size)))
    }

    /// The byte offset of chunk `j` in the image.
    pub fn chunk_offset(&self, j: u32) -> u64 {
        u64::from(j).saturating_mul(u64::from(self.chunk_size))
    }

    /// H(man): SHA-256 of the unsigned manifest.
    pub fn hash(&self) -> [u8; 32] {
        sha256(&[&self.to_bytes()])
    }

    /// The topic of one item of this release.
    pub fn topic(&self, item: OtaItem) -> OtaTopic {
        OtaTopic {
            group: self.group.clone(),
            signer: self.signer.clone(),
            version: self.version,
            item,
        }
    }
}

impl Encode for Manifest {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u8(out, 1);
        self.group.encode(out);
        self.signer.encode(out);
        put_blob(out, &self.cert.to_bytes());
        put_u64(out, self.version);
        put_u64(out, self.size);
        put_u32(out, self.chunk_size);
        put_u32(out, self.n_chunks());
        for h in &self.chunk_hashes {
            out.extend_from_slice(h);
        }
        put_u64(out, self.t_ms);
    }
}

impl Decode for Manifest {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version("manifest")?;
        let group = GroupId::read(r, "manifest group")?;
        let signer = DeviceId::read(r, "manifest signer")?;
        let cert_len = usize::try_from(r.u32("manifest certificate")?)
            .map_err(|_| DecodeError::TooLarge("manifest certificate"))?;
        if cert_len > MAX_CERT_LEN {
            return Err(DecodeError::TooLarge("manifest certificate"));
        }
        let cert = ImplicitCert::from_bytes(r.take(cert_len, "manifest certificate")?)?;
        if cert.id() != &signer {
            return Err(DecodeError::InvalidValue("manifest certificate id"));
        }
        let version = r.u64("manifest version")?;
        let size = r.u64("manifest size")?;
        let chunk_size = r.u32("manifest chunk size")?;
        let n_chunks = r.u32("manifest chunk count")?;
        match chunk_count(size, chunk_size) {
            Ok(n) if n == n_chunks => {}
            _ => return Err(DecodeError::InvalidValue("manifest chunk count")),
        }
        // The hashes must all be present before anything is allocated for them.
        let len = usize::try_from(n_chunks)
            .ok()
            .and_then(|n| n.checked_mul(32))
            .ok_or(DecodeError::TooLarge("manifest chunk hashes"))?;
        let hashes = r.take(len, "manifest chunk hashes")?;
        let chunk_hashes = hashes
            .chunks_exact(32)
            .map(|h| {
                let mut a = [0u8; 32];
                a.copy_from_slice(h);
                a
            })
            .collect();
        Ok(Manifest {
            group,
            signer,
            cert,
            version,
            size,
            chunk_size,
            chunk_hashes,
            t_ms: r.u64("manifest timestamp")?,
        })
    }
}

/// Where a device or the bridge learns whether a signer's certificate is current: the group's
/// current member list must hold exactly `cert` (opening to `q`) for a publisher of `group`.
/// Implemented for a [`MemberList`] (the group's), for a slice of them ([`MembershipLists`]),
/// and by the daemons over what they hold.
pub trait SignerListing {
    /// Whether `cert` (opening to `q`) is a current publisher certificate of `group`.
    fn lists_publisher(&self, group: &GroupId, cert: &ImplicitCert, q: &VerifyingKey) -> bool;
}

impl SignerListing for MemberList {
    fn lists_publisher(&self, group: &GroupId, cert: &ImplicitCert, q: &VerifyingKey) -> bool {
        self.group() == group && self.lists_certificate(cert, q, Role::Publisher)
    }
}

/// The current member lists of several groups, as one [`SignerListing`].
#[derive(Clone, Copy, Debug)]
pub struct MembershipLists<'a>(pub &'a [MemberList]);

impl SignerListing for MembershipLists<'_> {
    fn lists_publisher(&self, group: &GroupId, cert: &ImplicitCert, q: &VerifyingKey) -> bool {
        self.0.iter().any(|l| l.lists_publisher(group, cert, q))
    }
}

/// A manifest message that decoded but is not verified.
#[derive(Clone, PartialEq, Eq)]
pub struct UnverifiedManifest {
    manifest: Manifest,
    raw: Vec<u8>,
    man_end: usize,
    signature: Signature,
}

impl UnverifiedManifest {
    /// Decodes a manifest message under the default limit ([`OtaPolicy::default`]).
    ///
    /// # Errors
    /// [`OtaError::TooLarge`] (checked first) or [`OtaError::Malformed`].
    pub fn decode(bytes: &[u8]) -> Result<Self, OtaError> {
        Self::decode_with_limit(bytes, OtaPolicy::default().max_manifest_len)
    }

    /// Decodes a manifest message of at most `max_len` bytes, checked before any parsing.
    ///
    /// # Errors
    /// [`OtaError::TooLarge`] (checked first) or [`OtaError::Malformed`].
    pub fn decode_with_limit(bytes: &[u8], max_len: usize) -> Result<Self, OtaError> {
        if bytes.len() > max_len {
            return Err(OtaError::TooLarge);
        }
        let mut r = Reader::new(bytes);
        let manifest = Manifest::read(&mut r)?;
        let man_end = r.position();
        let signature = Signature::read(&mut r)?;
        r.finish("manifest message")?;
        Ok(UnverifiedManifest {
            manifest,
            raw: bytes.to_vec(),
            man_end,
            signature,
        })
    }

    /// The claimed manifest (routing facts only until verified).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The message as received.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn man(&self) -> &[u8] {
        self.raw.get(..self.man_end).unwrap_or_default()
    }

    /// Size limits, certificate (under Q_CA, valid at `now_ms`, current publisher of the group),
    /// signature: the checks the device and the bridge share, after their own cheap ones.
    fn check_signed(
        &self,
        q_ca: &Point,
        signers: &(impl SignerListing + ?Sized),
        policy: &OtaPolicy,
        now_ms: u64,
    ) -> Result<VerifiedManifest, OtaError> {
        let m = &self.manifest;
        if self.raw.len() > policy.max_manifest_len {
            return Err(OtaError::TooLarge);
        }
        if m.size > policy.max_image_size {
            return Err(OtaError::ImageTooLarge);
        }
        if m.chunk_size > policy.max_chunk_size {
            return Err(OtaError::ChunkSizeTooLarge);
        }
        let q = m.cert.open(q_ca).map_err(|_| OtaError::BadCertificate)?;
        m.cert.check_validity(now_ms).map_err(|e| match e {
            EnrollError::NotYetValid => OtaError::CertificateNotYetValid,
            _ => OtaError::CertificateExpired,
        })?;
        if !signers.lists_publisher(&m.group, &m.cert, &q) {
            return Err(OtaError::SignerNotListed);
        }
        q.verify(TAG_OTA_MANIFEST, self.man(), &self.signature)
            .map_err(|_| OtaError::BadSignature)?;
        Ok(VerifiedManifest {
            hash: sha256(&[self.man()]),
            manifest: self.manifest.clone(),
            raw: self.raw.clone(),
        })
    }

    /// A device's check of a manifest for the OTA group `group` (PROTOCOL.md §7.2), cheapest
    /// first: the group; the signer is in `pinned`; v > `installed` (no rollback); size and chunk
    /// size within `policy`; the certificate opens under `q_ca` and is valid at `now_ms`;
    /// `signers` lists it as the signer's current publisher certificate in the group (so a
    /// revoked or superseded key is refused whatever T_ms says); the signature.
    ///
    /// # Errors
    /// The first failing check's [`OtaError`].
    #[allow(clippy::too_many_arguments)]
    pub fn verify(
        &self,
        group: &GroupId,
        pinned: &[DeviceId],
        installed: Option<u64>,
        q_ca: &Point,
        signers: &(impl SignerListing + ?Sized),
        policy: &OtaPolicy,
        now_ms: u64,
    ) -> Result<VerifiedManifest, OtaError> {
        let m = &self.manifest;
        if &m.group != group {
            return Err(OtaError::WrongGroup);
        }
        if !pinned.contains(&m.signer) {
            return Err(OtaError::SignerNotPinned);
        }
        if installed.is_some_and(|i| m.version <= i) {
            return Err(OtaError::Rollback);
        }
        self.check_signed(q_ca, signers, policy, now_ms)
    }

    /// The bridge's check of a manifest published on `topic` by the connection `connection`:
    /// the topic names this manifest (group, signer, version, `m`); the signer is the
    /// connection's identity; sizes within `policy`; the certificate opens under `q_ca`, is valid
    /// at `now_ms` and is the signer's current publisher certificate in the group; the signature.
    ///
    /// # Errors
    /// The first failing check's [`OtaError`].
    pub fn verify_at_bridge(
        &self,
        topic: &OtaTopic,
        connection: &DeviceId,
        q_ca: &Point,
        signers: &(impl SignerListing + ?Sized),
        policy: &OtaPolicy,
        now_ms: u64,
    ) -> Result<VerifiedManifest, OtaError> {
        if *topic != self.manifest.topic(OtaItem::Manifest) {
            return Err(OtaError::TopicMismatch);
        }
        if &self.manifest.signer != connection {
            return Err(OtaError::SignerMismatch);
        }
        self.check_signed(q_ca, signers, policy, now_ms)
    }
}

impl fmt::Debug for UnverifiedManifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnverifiedManifest")
            .field("group", &self.manifest.group)
            .field("signer", &self.manifest.signer)
            .field("version", &self.manifest.version)
            .field("len", &self.raw.len())
            .finish_non_exhaustive()
    }
}

/// A manifest whose signature, signer and limits were checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedManifest {
    manifest: Manifest,
    hash: [u8; 32],
    raw: Vec<u8>,
}

impl VerifiedManifest {
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// H(man), over the unsigned manifest.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// The signed manifest message, to store and verify again after a restart.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// Checks chunk `j`'s ciphertext against the manifest, before any decryption: index below
    /// n_chunks, length of that chunk plus the tag, and H(ct_j) == h_j. The bridge lets a chunk
    /// through only if this passes for an accepted manifest of that version.
    ///
    /// # Errors
    /// [`OtaError::ChunkOutOfRange`], [`OtaError::ChunkLengthMismatch`] or
    /// [`OtaError::ChunkHashMismatch`].
    pub fn check_chunk(&self, j: u32, ct: &[u8]) -> Result<(), OtaError> {
        let m = &self.manifest;
        let (Some(len), Some(h)) = (m.chunk_len(j), m.chunk_hashes.get(j as usize)) else {
            return Err(OtaError::ChunkOutOfRange);
        };
        let expected = len.checked_add(crate::symmetric::TAG_LEN as u64);
        if expected != Some(ct.len() as u64) {
            return Err(OtaError::ChunkLengthMismatch);
        }
        if sha256(&[ct]) != *h {
            return Err(OtaError::ChunkHashMismatch);
        }
        Ok(())
    }

    /// Accepts the M of a key message sent by `sender`: the sender is the manifest's signer, M is
    /// an ota-key payload, and its v and H(man) match this manifest.
    ///
    /// # Errors
    /// [`OtaError::KeySenderMismatch`], [`OtaError::Malformed`],
    /// [`OtaError::KeyVersionMismatch`] or [`OtaError::KeyManifestMismatch`].
    pub fn accept_key(&self, sender: &DeviceId, m: &[u8]) -> Result<AcceptedKey, OtaError> {
        if sender != &self.manifest.signer {
            return Err(OtaError::KeySenderMismatch);
        }
        self.restore_key(m)
    }

    /// Accepts a key message that came on `…/<v>/k`: an option-2 forward message of the
    /// manifest's group (verified with
    /// [`verify_without_window`](crate::message::UnverifiedMessage::verify_without_window)),
    /// sent by the signer, for this version and manifest.
    ///
    /// # Errors
    /// [`OtaError::NotOtaMessage`] or an [`accept_key`](Self::accept_key) error.
    pub fn accept_key_message(&self, msg: &VerifiedMessage) -> Result<AcceptedKey, OtaError> {
        if msg.protection() != Protection::Confidential
            || msg.direction() != Direction::Forward
            || msg.group() != &self.manifest.group
        {
            return Err(OtaError::NotOtaMessage);
        }
        self.accept_key(msg.sender(), msg.payload())
    }

    /// Accepts the same M received as a direct message (PROTOCOL.md §7.1) from the signer, for a
    /// device that could not open the retained key message.
    ///
    /// # Errors
    /// An [`accept_key`](Self::accept_key) error.
    pub fn accept_direct_key(&self, msg: &VerifiedDirect) -> Result<AcceptedKey, OtaError> {
        self.accept_key(msg.sender(), msg.payload())
    }

    /// Restores a key the device accepted before and stored ([`AcceptedKey::to_bytes`]): the
    /// same checks as [`accept_key`](Self::accept_key) except the sender, which was checked then.
    ///
    /// # Errors
    /// [`OtaError::Malformed`], [`OtaError::KeyVersionMismatch`] or
    /// [`OtaError::KeyManifestMismatch`].
    pub fn restore_key(&self, m: &[u8]) -> Result<AcceptedKey, OtaError> {
        let key = KeyMessage::from_bytes(m)?;
        if key.version != self.manifest.version {
            return Err(OtaError::KeyVersionMismatch);
        }
        if !bool::from(key.manifest_hash.ct_eq(&self.hash)) {
            return Err(OtaError::KeyManifestMismatch);
        }
        Ok(AcceptedKey::new(key))
    }
}
