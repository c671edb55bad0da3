//! ECIES of PROTOCOL.md §4: r random, R = r·G, K = KDF(pt(R) || pt(Q), xdh(r, Q), ctx),
//! output pt(R) || AEAD_K(m, ctx). Used for group-key delivery and individual rekey notices.
//!
//! # Usage
//! ```
//! use quva_client::curve::KeyPair;
//! use quva_client::ecies;
//! use rand_core::OsRng;
//! let mut rng = OsRng;
//! let bob = KeyPair::random(&mut rng);
//! let ct = ecies::seal(bob.public(), b"ctx", b"secret", &mut rng);
//! assert_eq!(&*ecies::open(&bob, b"ctx", &ct).unwrap(), b"secret");
//! ```

use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::codec::Reader;
use crate::curve::{KeyPair, Point, SecretScalar};
use crate::symmetric::{TAG_LEN, VerifyError, aead_open, aead_seal, kdf};

/// Bytes ECIES adds to a message: the ephemeral point and the tag.
pub const OVERHEAD: usize = 33 + TAG_LEN;

/// Encrypts `m` to `q` under the context `ctx` with a fresh ephemeral key.
pub fn seal(q: &Point, ctx: &[u8], m: &[u8], rng: &mut impl CryptoRngCore) -> Vec<u8> {
    seal_with_ephemeral(&KeyPair::random(rng), q, ctx, m)
}

/// Encrypts with the given ephemeral key pair (r, R), which must be fresh: reusing r for two
/// messages reveals the key of both. For test vectors only.
#[cfg(feature = "hazmat")]
pub fn dangerous_seal_with_ephemeral(eph: &KeyPair, q: &Point, ctx: &[u8], m: &[u8]) -> Vec<u8> {
    seal_with_ephemeral(eph, q, ctx, m)
}

/// Encrypts with the given ephemeral key pair (r, R), which must be fresh.
pub(crate) fn seal_with_ephemeral(eph: &KeyPair, q: &Point, ctx: &[u8], m: &[u8]) -> Vec<u8> {
    let r_bytes = eph.public().to_bytes();
    // INVARIANT: r ≠ 0 and Q is a valid non-identity point of prime order, so r·Q ≠ identity.
    let shared = eph.xdh(q).unwrap_or_else(|_| Zeroizing::new([0u8; 32]));
    let key = kdf(
        &[&r_bytes[..], &q.to_bytes()[..]].concat(),
        &shared[..],
        &[ctx],
    );
    let mut out = Vec::with_capacity(OVERHEAD + m.len());
    out.extend_from_slice(&r_bytes);
    out.extend_from_slice(&aead_seal(&key, ctx, m));
    out
}

/// Decrypts what [`seal`] produced for `recipient`.
///
/// # Errors
/// [`VerifyError`] for a malformed ephemeral point, a wrong key, context or any altered byte.
pub fn open(
    recipient: &KeyPair,
    ctx: &[u8],
    data: &[u8],
) -> Result<Zeroizing<Vec<u8>>, VerifyError> {
    let mut r = Reader::new(data);
    let eph = r.point("ecies R").map_err(|_| VerifyError)?;
    let shared = recipient.xdh(&eph).map_err(|_| VerifyError)?;
    let key = kdf(
        &[&eph.to_bytes()[..], &recipient.public().to_bytes()[..]].concat(),
        &shared[..],
        &[ctx],
    );
    aead_open(&key, ctx, r.rest())
}

/// Decrypts an ECIES-wrapped secret scalar (`sc(d)`).
///
/// # Errors
/// [`VerifyError`] if decryption fails or the plaintext is not a non-zero scalar below n.
pub fn open_scalar(
    recipient: &KeyPair,
    ctx: &[u8],
    data: &[u8],
) -> Result<SecretScalar, VerifyError> {
    let m = open(recipient, ctx, data)?;
    let bytes: &[u8; 32] = m.as_slice().try_into().map_err(|_| VerifyError)?;
    SecretScalar::from_bytes(bytes).map_err(|_| VerifyError)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn round_trip_and_tamper() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let bob = KeyPair::random(&mut rng);
        let eve = KeyPair::random(&mut rng);
        let ct = seal(bob.public(), b"ctx", b"m", &mut rng);
        assert_eq!(ct.len(), OVERHEAD + 1);
        assert_eq!(&*open(&bob, b"ctx", &ct).unwrap(), b"m");
        assert!(open(&eve, b"ctx", &ct).is_err());
        assert!(open(&bob, b"ctX", &ct).is_err());
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 0x80;
            assert!(open(&bob, b"ctx", &bad).is_err(), "byte {i}");
        }
        assert!(open(&bob, b"ctx", &ct[..ct.len() - 1]).is_err());
        assert!(open(&bob, b"ctx", &[]).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        #[test]
        fn decrypt_of_encrypt_is_identity(
            seed: u64,
            m in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            ctx in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let bob = KeyPair::random(&mut rng);
            let ct = seal(bob.public(), &ctx, &m, &mut rng);
            proptest::prop_assert_eq!(ct.len(), OVERHEAD + m.len());
            proptest::prop_assert_eq!(&*open(&bob, &ctx, &ct).unwrap(), &m);
        }
    }
}
