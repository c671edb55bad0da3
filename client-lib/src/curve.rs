//! secp256k1 values with the checks of PROTOCOL.md §2: points that are never the identity, secret
//! scalars that are non-zero and zeroized, `Hs(tag, data)` and `xdh(k, P)`.
//!
//! # Usage
//! ```
//! use quva_client::curve::{hash_to_scalar, KeyPair};
//! use rand_core::OsRng;
//! let kp = KeyPair::random(&mut OsRng);
//! let pt = kp.public().to_bytes();
//! assert_eq!(pt.len(), 33);
//! assert!(hash_to_scalar("quva/v1/example", &[b"data"]).is_ok());
//! ```

use core::fmt;

use k256::elliptic_curve::ops::{MulByGenerator, Reduce};
use k256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use k256::elliptic_curve::{Field, PrimeField};
use k256::{AffinePoint, EncodedPoint, FieldBytes, ProjectivePoint, Scalar, U256};
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

/// Length of `pt(P)`.
pub const POINT_LEN: usize = 33;
/// Length of `sc(k)`.
pub const SCALAR_LEN: usize = 32;

/// An error of the curve layer: a value that the protocol forbids came out of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CurveError {
    /// A hash-to-scalar result, key or secret was zero (probability 2⁻²⁵⁶ for honest input).
    #[error("zero scalar")]
    ZeroScalar,
    /// A point operation produced the identity.
    #[error("identity point")]
    Identity,
}

/// Why 32 bytes are not a secret scalar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScalarError {
    /// The value is ≥ n.
    #[error("scalar not below the group order")]
    OutOfRange,
    /// The value is zero.
    #[error("zero scalar")]
    Zero,
}

/// Decodes `sc(k)`: `None` if the value is ≥ n (PROTOCOL.md §2: reject, never reduce).
pub fn scalar_from_bytes(bytes: &[u8; 32]) -> Option<Scalar> {
    Option::from(Scalar::from_repr(FieldBytes::from(*bytes)))
}

/// A curve point that is never the identity; encodes as 33 compressed bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Point(AffinePoint);

impl Point {
    /// The generator G.
    pub const GENERATOR: Point = Point(AffinePoint::GENERATOR);

    /// Wraps a projective point.
    ///
    /// # Errors
    /// [`CurveError::Identity`] for the identity.
    pub fn from_projective(p: &ProjectivePoint) -> Result<Self, CurveError> {
        Point::from_affine(p.to_affine())
    }

    /// Wraps an affine point (no inversion, unlike going through projective coordinates).
    ///
    /// # Errors
    /// [`CurveError::Identity`] for the identity.
    pub fn from_affine(a: AffinePoint) -> Result<Self, CurveError> {
        if bool::from(a.ct_eq(&AffinePoint::IDENTITY)) {
            Err(CurveError::Identity)
        } else {
            Ok(Point(a))
        }
    }

    /// `k·G` for a non-zero secret, which is never the identity.
    pub fn mul_base(k: &SecretScalar) -> Self {
        // INVARIANT: k ≠ 0 and the group has prime order, so k·G ≠ identity.
        Point(ProjectivePoint::mul_by_generator(k.as_scalar()).to_affine())
    }

    /// Decodes `pt(P)`: exactly 33 bytes, tag 02 or 03, x < p, on the curve.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != POINT_LEN || !matches!(bytes.first(), Some(0x02 | 0x03)) {
            return None;
        }
        let ep = EncodedPoint::from_bytes(bytes).ok()?;
        let a: Option<AffinePoint> = AffinePoint::from_encoded_point(&ep).into();
        a.filter(|a| !bool::from(a.ct_eq(&AffinePoint::IDENTITY)))
            .map(Point)
    }

    /// `pt(P)`.
    pub fn to_bytes(&self) -> [u8; POINT_LEN] {
        let ep = self.0.to_encoded_point(true);
        let mut out = [0u8; POINT_LEN];
        out.copy_from_slice(ep.as_bytes());
        out
    }

    /// The point in projective coordinates, for arithmetic.
    pub fn to_projective(&self) -> ProjectivePoint {
        ProjectivePoint::from(self.0)
    }

    /// The affine point.
    pub fn as_affine(&self) -> &AffinePoint {
        &self.0
    }
}

impl fmt::Debug for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Point(")?;
        for b in self.to_bytes() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// A non-zero secret scalar: zeroized on drop, redacted in `Debug`, compared in constant time.
pub struct SecretScalar(Scalar);

impl SecretScalar {
    /// Wraps a scalar.
    ///
    /// # Errors
    /// [`CurveError::ZeroScalar`] for zero.
    pub fn new(k: Scalar) -> Result<Self, CurveError> {
        if bool::from(k.is_zero()) {
            Err(CurveError::ZeroScalar)
        } else {
            Ok(SecretScalar(k))
        }
    }

    /// A uniformly random non-zero scalar.
    pub fn random(rng: &mut impl CryptoRngCore) -> Self {
        loop {
            let k = Scalar::random(&mut *rng);
            if !bool::from(k.is_zero()) {
                return SecretScalar(k);
            }
        }
    }

    /// Decodes `sc(k)` as a secret.
    ///
    /// # Errors
    /// [`ScalarError`] if ≥ n or zero.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, ScalarError> {
        let k = scalar_from_bytes(bytes).ok_or(ScalarError::OutOfRange)?;
        Self::new(k).map_err(|_| ScalarError::Zero)
    }

    /// `sc(k)`, zeroized when dropped.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes().into())
    }

    /// The scalar, for arithmetic.
    pub fn as_scalar(&self) -> &Scalar {
        &self.0
    }
}

impl Clone for SecretScalar {
    fn clone(&self) -> Self {
        SecretScalar(self.0)
    }
}

impl Drop for SecretScalar {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl zeroize::ZeroizeOnDrop for SecretScalar {}

impl fmt::Debug for SecretScalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretScalar(<redacted>)")
    }
}

impl ConstantTimeEq for SecretScalar {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl PartialEq for SecretScalar {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for SecretScalar {}

/// A held private key with its public key: a device's d_i, a group key d_P/d_S or the CA's d_CA.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    secret: SecretScalar,
    public: Point,
}

impl KeyPair {
    /// Derives the public key of `secret`.
    pub fn from_secret(secret: SecretScalar) -> Self {
        let public = Point::mul_base(&secret);
        KeyPair { secret, public }
    }

    /// A fresh random key pair.
    pub fn random(rng: &mut impl CryptoRngCore) -> Self {
        Self::from_secret(SecretScalar::random(rng))
    }

    /// The secret scalar.
    pub fn secret(&self) -> &SecretScalar {
        &self.secret
    }

    /// The public key `d·G`.
    pub fn public(&self) -> &Point {
        &self.public
    }

    /// `xdh(d, P)`.
    ///
    /// # Errors
    /// [`CurveError::Identity`] never for valid points (prime order); kept for safety.
    pub fn xdh(&self, peer: &Point) -> Result<Zeroizing<[u8; 32]>, CurveError> {
        xdh(&self.secret, peer)
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// `Hs(tag, data)` = int(SHA-256(u8(len(tag)) || tag || data)) mod n, with `data` given in parts.
///
/// # Errors
/// [`CurveError::ZeroScalar`] if the result is 0.
pub fn hash_to_scalar(tag: &str, data: &[&[u8]]) -> Result<Scalar, CurveError> {
    let mut h = Sha256::new();
    let tag_len = u8::try_from(tag.len()).unwrap_or(u8::MAX);
    h.update([tag_len]);
    h.update(tag.as_bytes());
    for part in data {
        h.update(part);
    }
    let digest = h.finalize();
    let k = <Scalar as Reduce<U256>>::reduce_bytes(&digest);
    if bool::from(k.is_zero()) {
        Err(CurveError::ZeroScalar)
    } else {
        Ok(k)
    }
}

/// `H(x)` = SHA-256 over the parts.
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in parts {
        h.update(part);
    }
    h.finalize().into()
}

/// `xdh(k, P)`: the 32-byte x-coordinate of k·P.
///
/// # Errors
/// [`CurveError::Identity`] if k·P is the identity (impossible for non-zero k and valid P).
pub fn xdh(k: &SecretScalar, p: &Point) -> Result<Zeroizing<[u8; 32]>, CurveError> {
    let shared = Point::from_projective(&(p.to_projective() * k.as_scalar()))?;
    let bytes = Zeroizing::new(shared.to_bytes());
    let mut x = Zeroizing::new([0u8; 32]);
    x.copy_from_slice(&bytes[1..]);
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_decoding_rejects_forbidden_encodings() {
        let g = Point::GENERATOR.to_bytes();
        assert!(Point::from_bytes(&g).is_some());
        // Identity has no 33-byte encoding; its 1-byte SEC1 form and a zero-padded form are refused.
        assert!(Point::from_bytes(&[0u8]).is_none());
        assert!(Point::from_bytes(&[0u8; 33]).is_none());
        // Uncompressed tag, or a wrong length.
        let mut bad = g;
        bad[0] = 0x04;
        assert!(Point::from_bytes(&bad).is_none());
        assert!(Point::from_bytes(&g[..32]).is_none());
        // x ≥ p: p = 2^256 - 2^32 - 977; x = p itself and x = 2^256 - 1.
        let mut x_eq_p = [0xffu8; 33];
        x_eq_p[0] = 0x02;
        x_eq_p[29..33].copy_from_slice(&[0xff, 0xff, 0xfc, 0x2f]);
        x_eq_p[28] = 0xfe;
        assert!(Point::from_bytes(&x_eq_p).is_none());
        let mut all_ff = [0xffu8; 33];
        all_ff[0] = 0x03;
        assert!(Point::from_bytes(&all_ff).is_none());
        // Off curve: x = 5 has no square root of x^3 + 7 on secp256k1.
        let mut off = [0u8; 33];
        off[0] = 0x02;
        off[32] = 5;
        assert!(Point::from_bytes(&off).is_none());
    }

    #[test]
    fn scalar_decoding_rejects_n_and_zero() {
        let n = hex32("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141");
        assert!(scalar_from_bytes(&n).is_none());
        assert_eq!(
            SecretScalar::from_bytes(&n).err(),
            Some(ScalarError::OutOfRange)
        );
        assert_eq!(
            SecretScalar::from_bytes(&[0; 32]).err(),
            Some(ScalarError::Zero)
        );
        let mut n_minus_1 = n;
        n_minus_1[31] -= 1;
        assert!(SecretScalar::from_bytes(&n_minus_1).is_ok());
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let s = SecretScalar::new(Scalar::ONE).unwrap();
        assert_eq!(format!("{s:?}"), "SecretScalar(<redacted>)");
        let kp = KeyPair::from_secret(s);
        assert!(!format!("{kp:?}").contains("0000000000000001"));
    }

    #[test]
    fn xdh_is_symmetric() {
        let a = KeyPair::from_secret(SecretScalar::new(Scalar::from(7u64)).unwrap());
        let b = KeyPair::from_secret(SecretScalar::new(Scalar::from(11u64)).unwrap());
        assert_eq!(*a.xdh(b.public()).unwrap(), *b.xdh(a.public()).unwrap());
    }

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
