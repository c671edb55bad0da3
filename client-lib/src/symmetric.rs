//! Symmetric primitives of PROTOCOL.md §2: `KDF` (HKDF-SHA256, 32 bytes), `AEAD_K`
//! (ChaCha20-Poly1305 with the zero nonce, every key single-use) and HMAC-SHA256.
//!
//! # Usage
//! ```
//! use quva_client::symmetric::{aead_open, aead_seal, kdf};
//! let key = kdf(b"salt", b"input key material", &[b"quva/v1/example"]);
//! let ct = aead_seal(&key, b"aad", b"hello");
//! assert_eq!(&*aead_open(&key, b"aad", &ct).unwrap(), b"hello");
//! ```

use hmac::{Mac, SimpleHmac};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

/// Length of the Poly1305 tag appended to every ciphertext.
pub const TAG_LEN: usize = 16;

/// A signature, MAC or AEAD check failed. Deliberately opaque: it says nothing about why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("verification failed")]
pub struct VerifyError;

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// `KDF(salt, ikm, info)`: HKDF-SHA256 with a 32-byte output; `info` is given in parts.
pub fn kdf(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    // INVARIANT: HKDF-SHA256 can expand up to 255·32 bytes; we ask for 32.
    #[allow(clippy::expect_used)]
    prk.expand(info, Len32)
        .and_then(|okm| okm.fill(&mut out[..]))
        .expect("HKDF-SHA256 expands 32 bytes");
    out
}

fn key(k: &[u8; 32]) -> LessSafeKey {
    // INVARIANT: ChaCha20-Poly1305 keys are exactly 32 bytes.
    #[allow(clippy::expect_used)]
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, k).expect("32-byte ChaCha20 key"))
}

/// `AEAD_K(m, aad)` = ciphertext || 16-byte tag under the zero nonce. `k` must be single-use.
pub fn aead_seal(k: &[u8; 32], aad: &[u8], m: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(m.len() + TAG_LEN);
    buf.extend_from_slice(m);
    // INVARIANT: sealing fails only for inputs over 2^38 bytes, far above any Quva limit.
    #[allow(clippy::expect_used)]
    key(k)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key([0u8; 12]),
            Aad::from(aad),
            &mut buf,
        )
        .expect("plaintext below ChaCha20-Poly1305's limit");
    buf
}

/// Opens `AEAD_K(m, aad)`.
///
/// # Errors
/// [`VerifyError`] if the tag does not authenticate `ct` and `aad` under `k`.
pub fn aead_open(k: &[u8; 32], aad: &[u8], ct: &[u8]) -> Result<Zeroizing<Vec<u8>>, VerifyError> {
    let mut buf = Zeroizing::new(ct.to_vec());
    let len = key(k)
        .open_in_place(
            Nonce::assume_unique_for_key([0u8; 12]),
            Aad::from(aad),
            &mut buf,
        )
        .map_err(|_| VerifyError)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

/// HMAC-SHA256 over the parts.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = hmac_new(key);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Checks an HMAC-SHA256 tag in constant time.
///
/// # Errors
/// [`VerifyError`] if the tag does not match.
pub fn hmac_sha256_verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> Result<(), VerifyError> {
    let mut mac = hmac_new(key);
    for p in parts {
        mac.update(p);
    }
    mac.verify_slice(tag).map_err(|_| VerifyError)
}

/// HMAC-SHA256 fed in pieces, for inputs too large to gather first.
pub(crate) struct HmacSha256(SimpleHmac<Sha256>);

impl HmacSha256 {
    /// A MAC under `key`.
    pub(crate) fn new(key: &[u8]) -> Self {
        HmacSha256(hmac_new(key))
    }

    /// Feeds `data`.
    pub(crate) fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The tag.
    pub(crate) fn finalize(self) -> [u8; 32] {
        self.0.finalize().into_bytes().into()
    }
}

fn hmac_new(key: &[u8]) -> SimpleHmac<Sha256> {
    // INVARIANT: HMAC accepts keys of any length.
    #[allow(clippy::expect_used)]
    <SimpleHmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hkdf_matches_rfc5869_case_1_prefix() {
        // RFC 5869 A.1: the first 32 bytes of OKM.
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0u8..=0x0c).collect();
        let info: Vec<u8> = (0xf0u8..=0xf9).collect();
        let okm = kdf(&salt, &ikm, &[&info]);
        assert_eq!(
            hex(&okm[..]),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        );
    }

    #[test]
    fn aead_rejects_any_change() {
        let k = [7u8; 32];
        let ct = aead_seal(&k, b"aad", b"message");
        assert_eq!(ct.len(), 7 + TAG_LEN);
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 1;
            assert_eq!(aead_open(&k, b"aad", &bad), Err(VerifyError));
        }
        assert_eq!(aead_open(&k, b"aaD", &ct), Err(VerifyError));
        assert_eq!(aead_open(&[8u8; 32], b"aad", &ct), Err(VerifyError));
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let tag = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex(&tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(hmac_sha256_verify(b"Jefe", &[b"what do ya want for nothing?"], &tag).is_ok());
        assert!(hmac_sha256_verify(b"Jefe", &[b"what do ya want for nothing!"], &tag).is_err());
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
