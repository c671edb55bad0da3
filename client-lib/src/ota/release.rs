//! The release signer's side (PROTOCOL.md §7.2): chunk, encrypt once, sign the manifest.

use core::fmt;

use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use super::key::{ContentKey, KeyMessage};
use super::manifest::{Manifest, chunk_count};
use super::{MAX_NAME_LEN, OtaError, TAG_OTA_MANIFEST};
use crate::codec::{Encode, put_u32, put_u64};
use crate::curve::{KeyPair, sha256};
use crate::enrollment::ImplicitCert;
use crate::ids::GroupId;
use crate::symmetric::aead_seal;

/// `ct_j = AEAD_Kj(m_j, u64 v || u32 j)` with K_j derived from `k_c` ([`ContentKey::chunk_key`]).
pub fn seal_chunk(k_c: &ContentKey, group: &GroupId, version: u64, j: u32, m_j: &[u8]) -> Vec<u8> {
    let key = k_c.chunk_key(group, version, j);
    aead_seal(&key, &chunk_aad(version, j), m_j)
}

/// The chunk AEAD's associated data `u64 v || u32 j`.
pub(super) fn chunk_aad(version: u64, j: u32) -> [u8; 12] {
    let mut aad = Vec::with_capacity(12);
    put_u64(&mut aad, version);
    put_u32(&mut aad, j);
    let mut out = [0u8; 12];
    out.copy_from_slice(&aad);
    out
}

/// A release signer of one OTA group: an enrolled publisher of the group, with its key and
/// current certificate.
#[derive(Clone, Copy, Debug)]
pub struct ReleaseSigner<'a> {
    /// The OTA group.
    pub group: &'a GroupId,
    /// The signer's key pair (d_signer, Q_signer).
    pub key: &'a KeyPair,
    /// The signer's current certificate (its ID is the signer).
    pub cert: &'a ImplicitCert,
}

impl ReleaseSigner<'_> {
    /// Releases version `version` of `image` (at least 1 byte) named `name`, cut into chunks of
    /// `chunk_size` bytes (≥ 1; [`DEFAULT_CHUNK_SIZE`](super::DEFAULT_CHUNK_SIZE) by default),
    /// with a fresh random K_c and signature randomness.
    ///
    /// # Errors
    /// [`OtaError::EmptyImage`], [`OtaError::InvalidChunkSize`], [`OtaError::TooManyChunks`],
    /// [`OtaError::NameTooLong`], [`OtaError::CertificateMismatch`] or a curve error.
    pub fn release(
        &self,
        version: u64,
        name: &str,
        image: &[u8],
        chunk_size: u32,
        t_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Release, OtaError> {
        let k_c = ContentKey::random(rng);
        let mut rand = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut rand[..]);
        self.release_with(version, name, image, chunk_size, t_ms, &k_c, &rand)
    }

    /// [`release`](Self::release) with K_c and the signature's random bytes given (test
    /// vectors). K_c must be fresh for every release.
    ///
    /// # Errors
    /// As [`release`](Self::release).
    #[allow(clippy::too_many_arguments)]
    pub fn release_with(
        &self,
        version: u64,
        name: &str,
        image: &[u8],
        chunk_size: u32,
        t_ms: u64,
        k_c: &ContentKey,
        rand: &[u8; 32],
    ) -> Result<Release, OtaError> {
        if name.len() > MAX_NAME_LEN {
            return Err(OtaError::NameTooLong);
        }
        let size = image.len() as u64;
        chunk_count(size, chunk_size)?;
        let chunks: Vec<Vec<u8>> = image
            .chunks(chunk_size as usize)
            .zip(0u32..)
            .map(|(m_j, j)| seal_chunk(k_c, self.group, version, j, m_j))
            .collect();
        let hashes = chunks.iter().map(|c| sha256(&[c])).collect();
        let (manifest, manifest_message) =
            self.sign_manifest(version, size, chunk_size, hashes, t_ms, rand)?;
        let key = KeyMessage {
            version,
            manifest_hash: manifest.hash(),
            content_key: k_c.clone(),
            image_hash: sha256(&[image]),
            name: name.to_owned(),
        };
        Ok(Release {
            manifest,
            manifest_message,
            chunks,
            key,
        })
    }

    /// Signs a manifest over chunk hashes already computed: a release's first signature, or the
    /// new signature after the signer renewed its certificate (PROTOCOL.md §7.2: the daemon
    /// republishes its active releases' manifests signed with the new key, and then the key
    /// message with the new H(man)). Returns the manifest and the message `man || sig`.
    ///
    /// # Errors
    /// [`OtaError::EmptyImage`], [`OtaError::InvalidChunkSize`], [`OtaError::TooManyChunks`],
    /// [`OtaError::Malformed`] (hash count differs from the chunk count),
    /// [`OtaError::CertificateMismatch`] or a curve error.
    pub fn sign_manifest(
        &self,
        version: u64,
        size: u64,
        chunk_size: u32,
        chunk_hashes: Vec<[u8; 32]>,
        t_ms: u64,
        rand: &[u8; 32],
    ) -> Result<(Manifest, Vec<u8>), OtaError> {
        let n = chunk_count(size, chunk_size)?;
        if chunk_hashes.len() != n as usize {
            return Err(OtaError::Malformed(
                crate::codec::DecodeError::InvalidValue("manifest chunk count"),
            ));
        }
        if !self.cert_matches_key() {
            return Err(OtaError::CertificateMismatch);
        }
        let manifest = Manifest {
            group: self.group.clone(),
            signer: self.cert.id().clone(),
            cert: self.cert.clone(),
            version,
            size,
            chunk_size,
            chunk_hashes,
            t_ms,
        };
        let mut message = manifest.to_bytes();
        let sig = self
            .key
            .sign_with_entropy(TAG_OTA_MANIFEST, &message, rand)?;
        sig.encode(&mut message);
        Ok((manifest, message))
    }

    /// Whether the certificate opens to this key under the CA it names. Without Q_CA the signer
    /// checks what it can: e·C + Q_CA = Q means Q_CA = Q − e·C, whose key id must be the
    /// certificate's.
    fn cert_matches_key(&self) -> bool {
        let Ok(e) = self.cert.hash() else {
            return false;
        };
        let q_ca = self.key.public().to_projective() - self.cert.public_data().to_projective() * e;
        crate::curve::Point::from_projective(&q_ca)
            .is_ok_and(|q_ca| crate::enrollment::CaKid::of(&q_ca) == self.cert.ca_kid())
    }
}

/// One release: the signed manifest, the encrypted chunks and the key message's M.
#[derive(Clone)]
pub struct Release {
    manifest: Manifest,
    manifest_message: Vec<u8>,
    chunks: Vec<Vec<u8>>,
    key: KeyMessage,
}

impl Release {
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// `man || sig`, published retained on `<group>/_ota/<signer>/<v>/m`.
    pub fn manifest_message(&self) -> &[u8] {
        &self.manifest_message
    }

    /// The chunk ciphertexts ct_j, each published retained on `…/<v>/c/<j>`.
    pub fn chunks(&self) -> &[Vec<u8>] {
        &self.chunks
    }

    /// The key message's M (K_c inside): seal it with [`KeyMessage::seal`] at each epoch and
    /// publish it retained on `…/<v>/k`; store it as a secret to republish and to answer
    /// devices that ask for it by a direct message.
    pub fn key_message(&self) -> &KeyMessage {
        &self.key
    }

    /// Bytes this release puts on the broker besides the key message: the manifest message and
    /// every chunk.
    pub fn deposited_len(&self) -> usize {
        self.manifest_message.len() + self.chunks.iter().map(Vec::len).sum::<usize>()
    }
}

impl fmt::Debug for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Release")
            .field("group", &self.manifest.group)
            .field("signer", &self.manifest.signer)
            .field("version", &self.manifest.version)
            .field("size", &self.manifest.size)
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
    }
}
