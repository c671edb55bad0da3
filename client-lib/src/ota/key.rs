//! The key message's payload M and the content key K_c (PROTOCOL.md §7.2):
//! `M = u8 1 (ota-key) || u64 v || H(man) || K_c || 32-byte H(image) || str(name)`.

use core::fmt;

use rand_core::CryptoRngCore;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::{CONTENT_KEY_LEN, MAX_NAME_LEN, OtaError, TAG_OTA_CHUNK, TYPE_OTA_KEY};
use crate::codec::{Decode, DecodeError, Reader, put_str, put_u8, put_u32, put_u64};
use crate::curve::Point;
use crate::ids::GroupId;
use crate::message::Sealer;
use crate::symmetric::kdf;

/// The content key K_c of one release: zeroized, redacted, compared in constant time.
#[derive(Clone)]
pub struct ContentKey(Zeroizing<[u8; CONTENT_KEY_LEN]>);

impl ContentKey {
    /// Wraps 32 key bytes.
    pub fn from_bytes(bytes: &[u8; CONTENT_KEY_LEN]) -> Self {
        ContentKey(Zeroizing::new(*bytes))
    }

    /// A fresh random key.
    pub fn random(rng: &mut impl CryptoRngCore) -> Self {
        let mut k = Zeroizing::new([0u8; CONTENT_KEY_LEN]);
        rng.fill_bytes(&mut k[..]);
        ContentKey(k)
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8; CONTENT_KEY_LEN] {
        &self.0
    }

    /// K_j = KDF("", K_c, "quva/v1/ota-chunk" || str(group) || u64 v || u32 j).
    pub fn chunk_key(&self, group: &GroupId, version: u64, j: u32) -> Zeroizing<[u8; 32]> {
        let mut info = Vec::with_capacity(2 + group.as_str().len() + 12);
        group.encode(&mut info);
        put_u64(&mut info, version);
        put_u32(&mut info, j);
        kdf(b"", &self.0[..], &[TAG_OTA_CHUNK.as_bytes(), &info])
    }
}

impl fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ContentKey(<redacted>)")
    }
}

impl PartialEq for ContentKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&*other.0).into()
    }
}

impl Eq for ContentKey {}

/// The plaintext M of a key message.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyMessage {
    /// The release version v.
    pub version: u64,
    /// H(man) of the manifest this key belongs to.
    pub manifest_hash: [u8; 32],
    /// K_c.
    pub content_key: ContentKey,
    /// H(image), checked after the last chunk.
    pub image_hash: [u8; 32],
    /// The image name (at most [`MAX_NAME_LEN`] bytes).
    pub name: String,
}

impl KeyMessage {
    /// The encoded M, zeroized when dropped.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(107 + self.name.len()));
        put_u8(&mut out, TYPE_OTA_KEY);
        put_u64(&mut out, self.version);
        out.extend_from_slice(&self.manifest_hash);
        out.extend_from_slice(&self.content_key.0[..]);
        out.extend_from_slice(&self.image_hash);
        put_str(&mut out, &self.name);
        out
    }

    /// Decodes M.
    ///
    /// # Errors
    /// [`DecodeError`] for another type byte, a name over [`MAX_NAME_LEN`], truncation or
    /// trailing bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let m = Self::read(&mut r)?;
        r.finish("ota key message")?;
        Ok(m)
    }

    /// Seals M as the option-2 forward message of the group (PROTOCOL.md §7.2), to the group's
    /// current Q_P, with `sealer` the signer's [`Sealer`] for the current epoch.
    ///
    /// # Errors
    /// [`OtaError::NotOtaMessage`] if `sealer` is not forward, or a sealing error.
    pub fn seal(
        &self,
        sealer: &Sealer<'_>,
        q_p: &Point,
        t_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<u8>, OtaError> {
        if sealer.direction.is_query() {
            return Err(OtaError::NotOtaMessage);
        }
        Ok(sealer.option2(t_ms, q_p, &self.to_bytes(), rng)?)
    }
}

impl Decode for KeyMessage {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        if r.u8("ota message type")? != TYPE_OTA_KEY {
            return Err(DecodeError::InvalidValue("ota message type"));
        }
        let version = r.u64("ota key version")?;
        let manifest_hash = r.take_array("ota key manifest hash")?;
        let content_key = ContentKey(Zeroizing::new(r.take_array("ota key K_c")?));
        let image_hash = r.take_array("ota key image hash")?;
        let name = r.str("ota key name")?;
        if name.len() > MAX_NAME_LEN {
            return Err(DecodeError::TooLarge("ota key name"));
        }
        Ok(KeyMessage {
            version,
            manifest_hash,
            content_key,
            image_hash,
            name: name.to_owned(),
        })
    }
}

impl fmt::Debug for KeyMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyMessage")
            .field("version", &self.version)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A key message a device accepted for a verified manifest: only
/// [`VerifiedManifest`](super::VerifiedManifest)'s `accept_*` and `restore_key` make one.
#[derive(Clone, PartialEq, Eq)]
pub struct AcceptedKey(KeyMessage);

impl AcceptedKey {
    pub(super) fn new(key: KeyMessage) -> Self {
        AcceptedKey(key)
    }

    /// The accepted M.
    pub fn key_message(&self) -> &KeyMessage {
        &self.0
    }

    /// M, to store as a secret (the device keeps K_c as soon as it has opened it) and restore
    /// with [`VerifiedManifest::restore_key`](super::VerifiedManifest::restore_key).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        self.0.to_bytes()
    }
}

impl fmt::Debug for AcceptedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AcceptedKey").field(&self.0).finish()
    }
}
