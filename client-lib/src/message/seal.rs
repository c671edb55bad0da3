//! Sealing: how publishers (forward) and subscribers (queries) build option-1/2/3 messages.
//!
//! PROTOCOL.md §6. Each option has a random entry point and a `_with` entry point that takes the
//! random values explicitly, for the §10 test vectors.

use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use super::{
    AnonymousInner, Direction, Header, Protection, SALT_LEN, TAG_MSG1, TAG_MSG2, TAG_MSG3,
    TAG_MSG3_INNER, TAG_MSG3_OUTER,
};
use crate::codec::{Encode, put_blob, put_point};
use crate::curve::{CurveError, KeyPair, Point, SecretScalar, xdh};
use crate::ids::{DeviceId, Epoch, GroupId};
use crate::symmetric::{aead_seal, kdf};

/// Largest payload a [`Sealer`] accepts, so that every `blob` length fits its u32 prefix with the
/// option-3 framing around it. Receivers enforce the much smaller configured limit.
pub const MAX_SEAL_PAYLOAD: usize = u32::MAX as usize - 1024;

/// Why a message could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The payload is larger than [`MAX_SEAL_PAYLOAD`].
    #[error("payload too large")]
    TooLarge,
    /// A curve operation produced a forbidden value (probability 2⁻²⁵⁶).
    #[error(transparent)]
    Curve(#[from] CurveError),
}

/// A sender's view of one group at one epoch: who signs, and which way the message goes.
///
/// `key` is the sender's own d_i. For [`Direction::Forward`] the sender must be a publisher and
/// passes Q_P as `q_target` and its held d_S as option 3's `d_grp`; for [`Direction::Query`] a
/// subscriber passes Q_S and d_P ([`GroupPublicKeys::target`](super::GroupPublicKeys::target)).
#[derive(Clone, Copy, Debug)]
pub struct Sealer<'a> {
    /// The group (data topic).
    pub group: &'a GroupId,
    /// The epoch whose keys are used.
    pub epoch: Epoch,
    /// Forward (publisher → subscribers) or query (subscriber → publishers).
    pub direction: Direction,
    /// The sender's device ID.
    pub sender: &'a DeviceId,
    /// The sender's key pair (d_i, Q_i).
    pub key: &'a KeyPair,
}

impl Sealer<'_> {
    fn header(&self, protection: Protection, t_ms: u64) -> Vec<u8> {
        Header {
            protection,
            direction: self.direction,
            group: self.group.clone(),
            epoch: self.epoch,
            t_ms,
        }
        .to_bytes()
    }

    /// Option 1: `hdr || str(sender) || blob(M) || sign(d_i, "quva/v1/msg1", body)`.
    ///
    /// # Errors
    /// [`SealError`].
    pub fn option1(
        &self,
        t_ms: u64,
        m: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<u8>, SealError> {
        self.option1_with(t_ms, m, &random32(rng))
    }

    /// Option 1 with the signature's 32 random bytes given.
    ///
    /// # Errors
    /// [`SealError`].
    pub fn option1_with(&self, t_ms: u64, m: &[u8], rand: &[u8; 32]) -> Result<Vec<u8>, SealError> {
        check_len(m)?;
        let mut body = self.header(Protection::Authenticated, t_ms);
        self.sender.encode(&mut body);
        put_blob(&mut body, m);
        let sig = self.key.sign_with_entropy(TAG_MSG1, &body, rand)?;
        sig.encode(&mut body);
        Ok(body)
    }

    /// Option 2 to `q_target` with a fresh salt.
    ///
    /// # Errors
    /// [`SealError`].
    pub fn option2(
        &self,
        t_ms: u64,
        q_target: &Point,
        m: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<u8>, SealError> {
        let mut salt = [0u8; SALT_LEN];
        rng.fill_bytes(&mut salt);
        self.option2_with(t_ms, q_target, m, &salt, &random32(rng))
    }

    /// Option 2 with the salt and the signature's random bytes given. The salt must be fresh: it
    /// makes the static-DH key single-use.
    ///
    /// K = KDF(salt, xdh(d_i, Q_target), "quva/v1/msg2" || hdr || str(sender)),
    /// ct = AEAD_K(M, hdr || str(sender) || salt).
    ///
    /// # Errors
    /// [`SealError`].
    pub fn option2_with(
        &self,
        t_ms: u64,
        q_target: &Point,
        m: &[u8],
        salt: &[u8; SALT_LEN],
        rand: &[u8; 32],
    ) -> Result<Vec<u8>, SealError> {
        check_len(m)?;
        let mut body = self.header(Protection::Confidential, t_ms);
        self.sender.encode(&mut body);
        let shared = self.key.xdh(q_target)?;
        let key = kdf(salt, &shared[..], &[TAG_MSG2.as_bytes(), &body]);
        body.extend_from_slice(salt);
        let ct = aead_seal(&key, &body, m);
        put_blob(&mut body, &ct);
        let sig = self.key.sign_with_entropy(TAG_MSG2, &body, rand)?;
        sig.encode(&mut body);
        Ok(body)
    }

    /// Option 3 to `q_target`, the outer signature by the held group key `d_grp`, with
    /// independent fresh z and signature randomness.
    ///
    /// # Errors
    /// [`SealError`].
    pub fn option3(
        &self,
        t_ms: u64,
        d_grp: &KeyPair,
        q_target: &Point,
        m: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<u8>, SealError> {
        let z = SecretScalar::random(rng);
        let rand_inner = random32(rng);
        let rand_outer = random32(rng);
        self.option3_with(t_ms, d_grp, q_target, m, &z, &rand_inner, &rand_outer)
    }

    /// Option 3 with z and both signatures' random bytes given. z must be fresh and independent
    /// of the signatures' nonces (PROTOCOL.md §9.2).
    ///
    /// Z = z·G, K = KDF(pt(Z), xdh(z, Q_target), "quva/v1/msg3" || hdr);
    /// inner = str(sender) || sign(d_i, "quva/v1/msg3-inner", hdr || pt(Z) || str(sender) ||
    /// blob(M)) || blob(M); body = hdr || pt(Z) || blob(AEAD_K(inner, hdr || pt(Z))); message =
    /// body || sign(d_grp, "quva/v1/msg3-outer", body).
    ///
    /// # Errors
    /// [`SealError`].
    #[allow(clippy::too_many_arguments)]
    pub fn option3_with(
        &self,
        t_ms: u64,
        d_grp: &KeyPair,
        q_target: &Point,
        m: &[u8],
        z: &SecretScalar,
        rand_inner: &[u8; 32],
        rand_outer: &[u8; 32],
    ) -> Result<Vec<u8>, SealError> {
        check_len(m)?;
        let hdr = self.header(Protection::Anonymous, t_ms);
        let z_point = Point::mul_base(z);
        let mut body = hdr.clone();
        put_point(&mut body, &z_point);

        let mut signed = Zeroizing::new(body.clone());
        self.sender.encode(&mut signed);
        put_blob(&mut signed, m);
        let inner_sig = self
            .key
            .sign_with_entropy(TAG_MSG3_INNER, &signed, rand_inner)?;
        let inner = AnonymousInner {
            sender: self.sender.clone(),
            signature: inner_sig,
            payload: Zeroizing::new(m.to_vec()),
        };
        let inner_bytes = Zeroizing::new(inner.to_bytes());

        let shared = xdh(z, q_target)?;
        let key = kdf(
            &z_point.to_bytes(),
            &shared[..],
            &[TAG_MSG3.as_bytes(), &hdr],
        );
        let ct = aead_seal(&key, &body, &inner_bytes);
        put_blob(&mut body, &ct);
        let sig = d_grp.sign_with_entropy(TAG_MSG3_OUTER, &body, rand_outer)?;
        sig.encode(&mut body);
        Ok(body)
    }
}

fn check_len(m: &[u8]) -> Result<(), SealError> {
    if m.len() > MAX_SEAL_PAYLOAD {
        Err(SealError::TooLarge)
    } else {
        Ok(())
    }
}

fn random32(rng: &mut impl CryptoRngCore) -> Zeroizing<[u8; 32]> {
    let mut b = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(&mut b[..]);
    b
}

#[cfg(test)]
mod tests {
    use super::super::testkit::World;
    use super::super::{Content, UnverifiedMessage};
    use super::*;
    use crate::codec::Decode;
    use crate::schnorr::SIGNATURE_LEN;
    use crate::symmetric::TAG_LEN;

    #[test]
    fn deterministic_entry_points_are_deterministic() {
        let w = World::new(10);
        let s = w.sealer(Direction::Forward);
        let z = SecretScalar::new(k256::Scalar::from(42u64)).unwrap();
        let a = s.option1_with(5, b"m", &[1; 32]).unwrap();
        assert_eq!(a, s.option1_with(5, b"m", &[1; 32]).unwrap());
        assert_ne!(a, s.option1_with(5, b"m", &[2; 32]).unwrap());
        let q = w.d_p.public();
        let b = s.option2_with(5, q, b"m", &[3; 16], &[1; 32]).unwrap();
        assert_eq!(b, s.option2_with(5, q, b"m", &[3; 16], &[1; 32]).unwrap());
        assert_ne!(b, s.option2_with(5, q, b"m", &[4; 16], &[1; 32]).unwrap());
        let c = s
            .option3_with(5, &w.d_s, q, b"m", &z, &[1; 32], &[2; 32])
            .unwrap();
        let c2 = s
            .option3_with(5, &w.d_s, q, b"m", &z, &[1; 32], &[2; 32])
            .unwrap();
        assert_eq!(c, c2);
    }

    #[test]
    fn layouts_match_the_spec() {
        let w = World::new(11);
        let s = w.sealer(Direction::Query);
        let hdr_len = 1 + 1 + 2 + w.group.as_str().len() + 4 + 8;
        let sender_len = 2 + w.publisher.as_str().len();
        let m = b"hello";

        let one = s.option1_with(9, m, &[0; 32]).unwrap();
        assert_eq!(one[1], 0x81);
        assert_eq!(
            one.len(),
            hdr_len + sender_len + 4 + m.len() + SIGNATURE_LEN
        );
        assert_eq!(&one[hdr_len + sender_len + 4..][..m.len()], m);

        let two = s
            .option2_with(9, w.d_s.public(), m, &[7; 16], &[0; 32])
            .unwrap();
        assert_eq!(two[1], 0x82);
        assert_eq!(&two[hdr_len + sender_len..][..16], &[7; 16]);
        assert_eq!(
            two.len(),
            hdr_len + sender_len + 16 + 4 + m.len() + TAG_LEN + SIGNATURE_LEN
        );

        let z = SecretScalar::new(k256::Scalar::from(99u64)).unwrap();
        let three = s
            .option3_with(9, &w.d_p, w.d_s.public(), m, &z, &[0; 32], &[1; 32])
            .unwrap();
        assert_eq!(three[1], 0x83);
        assert_eq!(&three[hdr_len..][..33], &Point::mul_base(&z).to_bytes());
        let inner_len = sender_len + SIGNATURE_LEN + 4 + m.len();
        assert_eq!(
            three.len(),
            hdr_len + 33 + 4 + inner_len + TAG_LEN + SIGNATURE_LEN
        );
        let msg = UnverifiedMessage::from_bytes(&three).unwrap();
        assert!(matches!(msg.content, Content::Anonymous { .. }));
        // Neither the payload nor the sender appears in clear.
        for needle in [&m[..], w.publisher.as_str().as_bytes()] {
            assert!(!three.windows(needle.len()).any(|win| win == needle));
        }
    }
}
