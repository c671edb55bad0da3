//! Schnorr signatures of PROTOCOL.md §2 (the paper's §3.3 with the challenge bound to the
//! commitment, §9.1): hedged nonces, single and batch verification.
//!
//! sign(d, tag, body): v = Hs("quva/v1/nonce", sc(d) || rand || H(body)); V = v·G;
//! h = Hs(tag, pt(V) || pt(Q) || body); s = v − h·d; signature pt(V) || sc(s).
//! Verify: V == s·G + h·Q.
//!
//! # Usage
//! ```
//! use quva_client::curve::KeyPair;
//! use rand_core::OsRng;
//! let mut rng = OsRng;
//! let key = KeyPair::random(&mut rng);
//! let sig = key.sign("quva/v1/example", b"body", &mut rng).unwrap();
//! assert!(key.verifying_key().verify("quva/v1/example", b"body", &sig).is_ok());
//! ```

use std::collections::HashMap;

use k256::elliptic_curve::ops::MulByGenerator;
use k256::{ProjectivePoint, Scalar};
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::codec::{Decode, DecodeError, Encode, Reader, put_point, put_scalar};
use crate::curve::{CurveError, KeyPair, Point, hash_to_scalar, sha256};
use crate::msm::{msm_vartime, mul_add_generator_vartime};
use crate::symmetric::VerifyError;

/// Length of an encoded signature: pt(V) || sc(s).
pub const SIGNATURE_LEN: usize = 65;

/// A Schnorr signature (V, s), kept as a point so that the bridge can batch-verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signature {
    /// The commitment V = v·G.
    pub commitment: Point,
    /// The response s = v − h·d.
    pub response: Scalar,
}

impl Encode for Signature {
    fn encode(&self, out: &mut Vec<u8>) {
        put_point(out, &self.commitment);
        put_scalar(out, &self.response);
    }
}

impl Decode for Signature {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Signature {
            commitment: r.point("signature V")?,
            response: r.scalar("signature s")?,
        })
    }
}

/// A public key that verifies signatures: a device's Q_i, a group key or Q_CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyingKey(pub Point);

impl VerifyingKey {
    /// The challenge h = Hs(tag, pt(V) || pt(Q) || body).
    fn challenge(&self, tag: &str, commitment: &Point, body: &[u8]) -> Result<Scalar, CurveError> {
        hash_to_scalar(tag, &[&commitment.to_bytes(), &self.0.to_bytes(), body])
    }

    /// Verifies `sig` over `body` under the domain tag `tag`.
    ///
    /// # Errors
    /// [`VerifyError`] if the signature is not valid.
    pub fn verify(&self, tag: &str, body: &[u8], sig: &Signature) -> Result<(), VerifyError> {
        let h = self
            .challenge(tag, &sig.commitment, body)
            .map_err(|_| VerifyError)?;
        // Public data only, so variable time is fine.
        let rhs = mul_add_generator_vartime(&sig.response, &h, &self.0.to_projective());
        if rhs == sig.commitment.to_projective() {
            Ok(())
        } else {
            Err(VerifyError)
        }
    }
}

impl KeyPair {
    /// The verifying half of this key pair.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey(*self.public())
    }

    /// Signs `body` under the domain tag `tag` with 32 fresh random bytes from `rng`.
    ///
    /// # Errors
    /// [`CurveError::ZeroScalar`] with probability 2⁻²⁵⁶.
    pub fn sign(
        &self,
        tag: &str,
        body: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Signature, CurveError> {
        let mut entropy = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut entropy[..]);
        self.sign_with_entropy(tag, body, &entropy)
    }

    /// Signs with the given 32 "fresh random" bytes. The nonce is hedged (it also hashes d and the
    /// body), so weak entropy does not leak d; this entry point exists for test vectors.
    ///
    /// # Errors
    /// [`CurveError::ZeroScalar`] with probability 2⁻²⁵⁶.
    pub fn sign_with_entropy(
        &self,
        tag: &str,
        body: &[u8],
        entropy: &[u8; 32],
    ) -> Result<Signature, CurveError> {
        let d = self.secret().to_bytes();
        let v = Zeroizing::new(hash_to_scalar(
            "quva/v1/nonce",
            &[&d[..], entropy, &sha256(&[body])],
        )?);
        let commitment = Point::from_projective(&ProjectivePoint::mul_by_generator(&*v))?;
        let h = self.verifying_key().challenge(tag, &commitment, body)?;
        let response = *v - h * self.secret().as_scalar();
        Ok(Signature {
            commitment,
            response,
        })
    }
}

/// One signature to check in a batch.
#[derive(Clone, Copy, Debug)]
pub struct BatchItem<'a> {
    /// The signer's public key.
    pub key: &'a VerifyingKey,
    /// The domain tag.
    pub tag: &'a str,
    /// The signed body.
    pub body: &'a [u8],
    /// The signature.
    pub signature: &'a Signature,
}

/// Verifies many signatures at once with a random linear combination:
/// Σ aⱼ·Vⱼ == (Σ aⱼ·sⱼ)·G + Σ (aⱼ·hⱼ)·Qⱼ with a₀ = 1 and random 128-bit aⱼ. If the combined check
/// fails, halves are checked recursively to find the bad signatures.
///
/// Returns one verdict per item, in order. Variable time: use only on public data (it is).
pub fn verify_batch(items: &[BatchItem<'_>], rng: &mut impl CryptoRngCore) -> Vec<bool> {
    let challenges: Vec<Option<Scalar>> = items
        .iter()
        .map(|it| {
            it.key
                .challenge(it.tag, &it.signature.commitment, it.body)
                .ok()
        })
        .collect();
    let mut verdicts = vec![false; items.len()];
    let idx: Vec<usize> = (0..items.len())
        .filter(|&i| challenges.get(i).is_some_and(|c| c.is_some()))
        .collect();
    settle(items, &challenges, &idx, &mut verdicts, rng);
    verdicts
}

fn settle(
    items: &[BatchItem<'_>],
    challenges: &[Option<Scalar>],
    idx: &[usize],
    verdicts: &mut [bool],
    rng: &mut impl CryptoRngCore,
) {
    if idx.is_empty() {
        return;
    }
    if combined_check(items, challenges, idx, rng) {
        for &i in idx {
            if let Some(v) = verdicts.get_mut(i) {
                *v = true;
            }
        }
        return;
    }
    if idx.len() == 1 {
        return;
    }
    let (left, right) = idx.split_at(idx.len() / 2);
    settle(items, challenges, left, verdicts, rng);
    settle(items, challenges, right, verdicts, rng);
}

fn combined_check(
    items: &[BatchItem<'_>],
    challenges: &[Option<Scalar>],
    idx: &[usize],
    rng: &mut impl CryptoRngCore,
) -> bool {
    let mut commitments = Vec::with_capacity(idx.len());
    // Signatures under the same key (a publisher's burst, or option 3 under one group key) share
    // one term: Σ aⱼ·hⱼ·Q is computed once per distinct Q.
    let mut keys: Vec<(ProjectivePoint, Scalar)> = Vec::new();
    let mut key_index: HashMap<[u8; 33], usize> = HashMap::new();
    let mut s_sum = Scalar::ZERO;
    for (n, &i) in idx.iter().enumerate() {
        let (Some(it), Some(Some(h))) = (items.get(i), challenges.get(i)) else {
            return false;
        };
        let a = if n == 0 { Scalar::ONE } else { random_128(rng) };
        s_sum += a * it.signature.response;
        commitments.push((it.signature.commitment.to_projective(), -a));
        let slot = *key_index.entry(it.key.0.to_bytes()).or_insert_with(|| {
            keys.push((it.key.0.to_projective(), Scalar::ZERO));
            keys.len() - 1
        });
        if let Some((_, coefficient)) = keys.get_mut(slot) {
            *coefficient += a * h;
        }
    }
    commitments.extend(keys);
    let lhs = msm_vartime(&commitments) + ProjectivePoint::mul_by_generator(&s_sum);
    lhs == ProjectivePoint::IDENTITY
}

fn random_128(rng: &mut impl CryptoRngCore) -> Scalar {
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b[16..]);
    // INVARIANT: a 128-bit value is always below n.
    crate::curve::scalar_from_bytes(&b).unwrap_or(Scalar::ONE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curve::SecretScalar;
    use rand_chacha::ChaCha20Rng as TestRng;
    use rand_core::{RngCore, SeedableRng};

    fn keys(n: usize, rng: &mut TestRng) -> Vec<KeyPair> {
        (0..n).map(|_| KeyPair::random(rng)).collect()
    }

    #[test]
    fn sign_verify_and_reject_other_tag_body_key() {
        let mut rng = TestRng::seed_from_u64(1);
        let k = KeyPair::random(&mut rng);
        let other = KeyPair::random(&mut rng);
        let sig = k.sign("t", b"body", &mut rng).unwrap();
        assert!(k.verifying_key().verify("t", b"body", &sig).is_ok());
        assert!(k.verifying_key().verify("u", b"body", &sig).is_err());
        assert!(k.verifying_key().verify("t", b"bodY", &sig).is_err());
        assert!(other.verifying_key().verify("t", b"body", &sig).is_err());
        let bytes = sig.to_bytes();
        assert_eq!(bytes.len(), SIGNATURE_LEN);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            let ok = Signature::from_bytes(&bad)
                .is_ok_and(|s| k.verifying_key().verify("t", b"body", &s).is_ok());
            assert!(!ok, "flipped byte {i} still verifies");
        }
    }

    #[test]
    fn nonce_is_hedged_by_body_and_entropy() {
        let k = KeyPair::from_secret(SecretScalar::new(Scalar::from(5u64)).unwrap());
        let a = k.sign_with_entropy("t", b"one", &[0; 32]).unwrap();
        let b = k.sign_with_entropy("t", b"two", &[0; 32]).unwrap();
        let c = k.sign_with_entropy("t", b"one", &[1; 32]).unwrap();
        assert_ne!(a.commitment, b.commitment);
        assert_ne!(a.commitment, c.commitment);
        assert_eq!(a, k.sign_with_entropy("t", b"one", &[0; 32]).unwrap());
    }

    #[test]
    fn batch_accepts_good_and_pinpoints_bad() {
        let mut rng = TestRng::seed_from_u64(2);
        for n in [1usize, 2, 7, 33] {
            let ks = keys(n, &mut rng);
            let bodies: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; i]).collect();
            let mut sigs: Vec<Signature> = ks
                .iter()
                .zip(&bodies)
                .map(|(k, b)| k.sign("t", b, &mut rng).unwrap())
                .collect();
            let vks: Vec<VerifyingKey> = ks.iter().map(KeyPair::verifying_key).collect();
            let bad: Vec<usize> = (0..n).filter(|_| rng.next_u32() % 4 == 0).collect();
            for &i in &bad {
                sigs[i].response += Scalar::ONE;
            }
            let items: Vec<BatchItem<'_>> = (0..n)
                .map(|i| BatchItem {
                    key: &vks[i],
                    tag: "t",
                    body: &bodies[i],
                    signature: &sigs[i],
                })
                .collect();
            let verdicts = verify_batch(&items, &mut rng);
            for i in 0..n {
                assert_eq!(verdicts[i], !bad.contains(&i), "n={n} item {i}");
                assert_eq!(
                    vks[i].verify("t", &bodies[i], &sigs[i]).is_ok(),
                    verdicts[i]
                );
            }
        }
    }

    #[test]
    fn batch_under_one_key_pinpoints_bad() {
        let mut rng = TestRng::seed_from_u64(5);
        let k = KeyPair::random(&mut rng);
        let vk = k.verifying_key();
        let bodies: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 3]).collect();
        let mut sigs: Vec<Signature> = bodies
            .iter()
            .map(|b| k.sign("t", b, &mut rng).unwrap())
            .collect();
        sigs[4].response += Scalar::ONE;
        sigs[17].response += Scalar::ONE;
        let items: Vec<BatchItem<'_>> = (0..20)
            .map(|i| BatchItem {
                key: &vk,
                tag: "t",
                body: &bodies[i],
                signature: &sigs[i],
            })
            .collect();
        let verdicts = verify_batch(&items, &mut rng);
        for (i, ok) in verdicts.iter().enumerate() {
            assert_eq!(*ok, i != 4 && i != 17, "item {i}");
        }
    }

    #[test]
    fn batch_rejects_cancelling_forgeries() {
        // Two invalid signatures whose errors cancel in an unweighted sum must still fail.
        let mut rng = TestRng::seed_from_u64(3);
        let ks = keys(2, &mut rng);
        let vks: Vec<VerifyingKey> = ks.iter().map(KeyPair::verifying_key).collect();
        let mut s0 = ks[0].sign("t", b"a", &mut rng).unwrap();
        let mut s1 = ks[1].sign("t", b"b", &mut rng).unwrap();
        s0.response += Scalar::ONE;
        s1.response -= Scalar::ONE;
        let items = [
            BatchItem {
                key: &vks[0],
                tag: "t",
                body: b"a",
                signature: &s0,
            },
            BatchItem {
                key: &vks[1],
                tag: "t",
                body: b"b",
                signature: &s1,
            },
        ];
        assert_eq!(verify_batch(&items, &mut rng), vec![false, false]);
    }
}
