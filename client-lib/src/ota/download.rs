//! A device's download of one release (PROTOCOL.md §7.2): chunks in any order, each hash checked
//! before decryption, progress that survives a restart, and the final H(image) check.
//!
//! The daemon's loop: [`Download::open_chunk`] → write the plaintext at
//! [`OpenedChunk::offset`] in the staging file and fsync → [`Download::mark_stored`] → persist
//! [`Download::progress`]. After a restart, [`Download::resume`] from the stored progress (with
//! the manifest verified again and the key restored) fetches only [`Download::missing`] chunks.
//! When [`Download::is_complete`], hash the staging file with [`ImageDigest`] and call
//! [`Download::finish`]; apply the image, and record the version only when that succeeds.

use core::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::OtaError;
use super::key::AcceptedKey;
use super::manifest::VerifiedManifest;
use super::release::chunk_aad;
use crate::codec::{DecodeError, Reader, put_u8, put_u32};
use crate::ids::{DeviceId, GroupId};
use crate::symmetric::aead_open;

/// The progress record's format version.
const PROGRESS_VERSION: u8 = 1;

/// One decrypted chunk, to be written at `offset` of the staging file.
pub struct OpenedChunk {
    index: u32,
    offset: u64,
    plaintext: Zeroizing<Vec<u8>>,
}

impl OpenedChunk {
    /// The chunk index j.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Where the chunk goes in the image: j · chunk_size.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The plaintext m_j.
    pub fn plaintext(&self) -> &[u8] {
        &self.plaintext
    }

    /// The plaintext m_j, moved out (no copy; zeroized when the buffer is dropped).
    pub fn into_plaintext(self) -> Zeroizing<Vec<u8>> {
        self.plaintext
    }
}

impl fmt::Debug for OpenedChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenedChunk")
            .field("index", &self.index)
            .field("offset", &self.offset)
            .field("len", &self.plaintext.len())
            .finish()
    }
}

/// An incremental SHA-256 of the assembled image, fed from the staging file.
#[derive(Clone, Debug, Default)]
pub struct ImageDigest(Sha256);

impl ImageDigest {
    /// An empty digest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the image.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// H(image).
    pub fn finalize(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

/// What the apply step needs once the image is verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyImage {
    /// The OTA group.
    pub group: GroupId,
    /// The release signer.
    pub signer: DeviceId,
    /// The version to record as installed once the apply command succeeds.
    pub version: u64,
    /// The image name from the key message.
    pub name: String,
    /// The image size.
    pub size: u64,
}

/// The download of one release by one device.
pub struct Download {
    manifest: VerifiedManifest,
    key: AcceptedKey,
    stored: Vec<u8>,
    missing: u32,
}

impl Download {
    /// Starts a download with nothing stored. `key` must be the one accepted for `manifest`.
    ///
    /// # Errors
    /// [`OtaError::KeyManifestMismatch`] if the key belongs to another manifest.
    pub fn new(manifest: VerifiedManifest, key: AcceptedKey) -> Result<Self, OtaError> {
        let n = manifest.manifest().n_chunks();
        if !bool::from(key.key_message().manifest_hash.ct_eq(manifest.hash())) {
            return Err(OtaError::KeyManifestMismatch);
        }
        Ok(Download {
            stored: vec![0u8; (n as usize).div_ceil(8)],
            missing: n,
            manifest,
            key,
        })
    }

    /// Resumes a download from a progress record ([`progress`](Self::progress)) stored by this
    /// device: the record must be of this manifest (H(man) and n_chunks).
    ///
    /// # Errors
    /// [`OtaError::KeyManifestMismatch`], [`OtaError::Malformed`] or
    /// [`OtaError::ProgressMismatch`].
    pub fn resume(
        manifest: VerifiedManifest,
        key: AcceptedKey,
        progress: &[u8],
    ) -> Result<Self, OtaError> {
        let mut d = Self::new(manifest, key)?;
        let mut r = Reader::new(progress);
        if r.u8("ota progress version")? != PROGRESS_VERSION {
            return Err(OtaError::Malformed(DecodeError::UnknownVersion(
                "ota progress",
            )));
        }
        let hash: [u8; 32] = r.take_array("ota progress manifest hash")?;
        let n = r.u32("ota progress chunk count")?;
        if hash != *d.manifest.hash() || n != d.manifest.manifest().n_chunks() {
            return Err(OtaError::ProgressMismatch);
        }
        let bits = r.take(d.stored.len(), "ota progress bitmap")?;
        r.finish("ota progress")?;
        // Bits past n_chunks must be clear, so that the record has one encoding.
        let spare = d.stored.len() * 8 - n as usize;
        if spare > 0 && bits.last().is_some_and(|b| b & ((1u8 << spare) - 1) != 0) {
            return Err(OtaError::Malformed(DecodeError::InvalidValue(
                "ota progress bitmap",
            )));
        }
        d.stored.copy_from_slice(bits);
        d.missing = n - d.stored.iter().map(|b| b.count_ones()).sum::<u32>();
        Ok(d)
    }

    /// The progress record to persist: `u8 1 || H(man) || u32 n_chunks || bitmap` (bit j, most
    /// significant first, set when chunk j is stored).
    pub fn progress(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(37 + self.stored.len());
        put_u8(&mut out, PROGRESS_VERSION);
        out.extend_from_slice(self.manifest.hash());
        put_u32(&mut out, self.manifest.manifest().n_chunks());
        out.extend_from_slice(&self.stored);
        out
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &VerifiedManifest {
        &self.manifest
    }

    /// The accepted key.
    pub fn key(&self) -> &AcceptedKey {
        &self.key
    }

    /// Checks chunk `j`'s hash against the manifest, then decrypts it. Nothing is recorded:
    /// call [`mark_stored`](Self::mark_stored) once the plaintext is durably written.
    ///
    /// # Errors
    /// A [`VerifiedManifest::check_chunk`] error, or [`OtaError::DecryptionFailed`].
    pub fn open_chunk(&self, j: u32, ct: &[u8]) -> Result<OpenedChunk, OtaError> {
        self.manifest.check_chunk(j, ct)?;
        let m = self.manifest.manifest();
        let key = self
            .key
            .key_message()
            .content_key
            .chunk_key(&m.group, m.version, j);
        let plaintext = aead_open(&key, &chunk_aad(m.version, j), ct)
            .map_err(|_| OtaError::DecryptionFailed)?;
        Ok(OpenedChunk {
            index: j,
            offset: m.chunk_offset(j),
            plaintext,
        })
    }

    /// Records that chunk `j` is durably stored.
    ///
    /// # Errors
    /// [`OtaError::ChunkOutOfRange`].
    pub fn mark_stored(&mut self, j: u32) -> Result<(), OtaError> {
        if j >= self.manifest.manifest().n_chunks() {
            return Err(OtaError::ChunkOutOfRange);
        }
        let (byte, bit) = ((j / 8) as usize, 0x80u8 >> (j % 8));
        let slot = self.stored.get_mut(byte).ok_or(OtaError::ChunkOutOfRange)?;
        if *slot & bit == 0 {
            *slot |= bit;
            self.missing -= 1;
        }
        Ok(())
    }

    /// Whether chunk `j` is stored.
    pub fn is_stored(&self, j: u32) -> bool {
        self.stored
            .get((j / 8) as usize)
            .is_some_and(|b| b & (0x80u8 >> (j % 8)) != 0)
            && j < self.manifest.manifest().n_chunks()
    }

    /// The chunks still to fetch, in order.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.manifest.manifest().n_chunks()).filter(|&j| !self.is_stored(j))
    }

    /// How many chunks are still missing.
    pub fn missing_count(&self) -> u32 {
        self.missing
    }

    /// Whether every chunk is stored.
    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// The final check: every chunk stored and `image_hash` (the staging file's SHA-256, see
    /// [`ImageDigest`]) equal to the key message's H(image).
    ///
    /// # Errors
    /// [`OtaError::Incomplete`] or [`OtaError::ImageHashMismatch`].
    pub fn finish(&self, image_hash: &[u8; 32]) -> Result<ReadyImage, OtaError> {
        if !self.is_complete() {
            return Err(OtaError::Incomplete);
        }
        let key = self.key.key_message();
        if !bool::from(key.image_hash.ct_eq(image_hash)) {
            return Err(OtaError::ImageHashMismatch);
        }
        let m = self.manifest.manifest();
        Ok(ReadyImage {
            group: m.group.clone(),
            signer: m.signer.clone(),
            version: m.version,
            name: key.name.clone(),
            size: m.size,
        })
    }
}

impl fmt::Debug for Download {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.manifest.manifest();
        f.debug_struct("Download")
            .field("group", &m.group)
            .field("version", &m.version)
            .field("missing", &self.missing)
            .finish_non_exhaustive()
    }
}
