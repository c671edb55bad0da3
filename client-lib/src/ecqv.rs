//! ECQV implicit certificates (SEC 4), generic over RustCrypto curves, and Quva's certificate hash.
//!
//! Implements the algebra of PROTOCOL.md §3 (SEC 4 v1.0 §3.4–3.5 with the paper's G_i carried in
//! the certificate, not in the algebra). The verbs follow schnorrkel's `cert.rs`: the CA
//! [`issue`]s, the device [`accept`]s, anyone [`open`]s.
//!
//! - CA: C = R + k·G, e = hash(C), a = e·k + d_CA.
//! - Device: d = e·r + a, accepted only if d ≠ 0 and d·G == e·C + Q_CA.
//! - Anyone: Q = e·C + Q_CA.
//!
//! The certificate hash e is computed by the caller from the certificate bytes (which contain C),
//! so one implementation fits several conventions: Quva's e = Hs("quva/v1/cert", cert)
//! ([`cert_hash`]), CAMP/SCMS's SHA-256(CertU) >> 1 and KISA's SHA-256(CertU) mod n on P-256 (both
//! checked against published vectors in `tests/ecqv_p256.rs`). The wire format and the protocol
//! checks around this algebra live in the `enrollment` module, which builds on this one.
//!
//! # Usage
//! ```
//! use k256::elliptic_curve::{group::Curve, ops::MulByGenerator, Field};
//! use k256::{ProjectivePoint, Scalar, Secp256k1};
//! use quva_client::ecqv;
//! use rand_core::OsRng;
//!
//! let mut rng = OsRng;
//! let d_ca = Scalar::random(&mut rng);
//! let q_ca = ProjectivePoint::mul_by_generator(&d_ca).to_affine();
//! // Device: request point R = r·G.
//! let r = Scalar::random(&mut rng);
//! let big_r = ProjectivePoint::mul_by_generator(&r).to_affine();
//! // CA: the closure turns C into e (here a toy certificate holding only C).
//! let hash = |c: &k256::AffinePoint| {
//!     use k256::elliptic_curve::sec1::ToEncodedPoint;
//!     ecqv::cert_hash(c.to_encoded_point(true).as_bytes()).ok()
//! };
//! let k = Scalar::random(&mut rng);
//! let issued = ecqv::issue::<Secp256k1>(&big_r, &d_ca, &k, hash).unwrap();
//! // Device reconstructs its key; a verifier opens the same public key.
//! let d = ecqv::accept::<Secp256k1>(&r, &issued.public_data, &issued.hash,
//!                                    &issued.reconstruction, &q_ca).unwrap();
//! let q = ecqv::open::<Secp256k1>(&issued.public_data, &issued.hash, &q_ca).unwrap();
//! assert_eq!(ProjectivePoint::mul_by_generator(&*d).to_affine(), q);
//! ```

use elliptic_curve::group::{Curve as _, Group as _};
use elliptic_curve::ops::MulByGenerator;
use elliptic_curve::{CurveArithmetic, Field};
use zeroize::Zeroizing;

use crate::curve::hash_to_scalar;

/// The domain tag of Quva's certificate hash e = Hs("quva/v1/cert", cert).
pub const CERT_HASH_TAG: &str = "quva/v1/cert";

/// Why an ECQV step refused its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EcqvError {
    /// The certificate request point R is the identity.
    #[error("certificate request point is the identity")]
    IdentityRequest,
    /// The CA's random k is zero (it would publish d_CA as the reconstruction value).
    #[error("zero CA nonce k")]
    ZeroNonce,
    /// The public reconstruction data C is the identity.
    #[error("certificate public data is the identity")]
    IdentityPublicData,
    /// The certificate hash e is zero.
    #[error("certificate hash is zero")]
    ZeroHash,
    /// The reconstructed private key d is zero.
    #[error("reconstructed private key is zero")]
    ZeroPrivateKey,
    /// The reconstructed public key e·C + Q_CA is the identity.
    #[error("reconstructed public key is the identity")]
    IdentityPublicKey,
    /// d·G differs from e·C + Q_CA: the response does not belong to this request and CA.
    #[error("reconstructed private key does not match the certificate")]
    KeyMismatch,
}

/// What the CA computes for one request: the certificate's public data and the reconstruction
/// value sent back with it.
#[derive(Clone, Copy, Debug)]
pub struct Issued<C: CurveArithmetic> {
    /// C (SEC 4's P_U) = R + k·G, the point written into the certificate.
    pub public_data: C::AffinePoint,
    /// e, the certificate hash the caller computed from the certificate holding C.
    pub hash: C::Scalar,
    /// a (SEC 4's r) = e·k + d_CA, the private-key reconstruction value.
    pub reconstruction: C::Scalar,
}

fn is_identity<C: CurveArithmetic>(p: &C::ProjectivePoint) -> bool {
    bool::from(p.is_identity())
}

/// CA: issues a certificate for the request point `request` (R) with the CA secret `ca_secret`
/// (d_CA) and the fresh random `k`. `hash` builds the certificate around C and returns its hash e
/// (`None` if it cannot).
///
/// # Errors
/// [`EcqvError::IdentityRequest`], [`EcqvError::ZeroNonce`], [`EcqvError::IdentityPublicData`]
/// (R = −k·G), or [`EcqvError::ZeroHash`] if `hash` returns `None` or zero.
pub fn issue<C: CurveArithmetic>(
    request: &C::AffinePoint,
    ca_secret: &C::Scalar,
    k: &C::Scalar,
    hash: impl FnOnce(&C::AffinePoint) -> Option<C::Scalar>,
) -> Result<Issued<C>, EcqvError> {
    let request = C::ProjectivePoint::from(*request);
    if is_identity::<C>(&request) {
        return Err(EcqvError::IdentityRequest);
    }
    if bool::from(k.is_zero()) {
        return Err(EcqvError::ZeroNonce);
    }
    let public_data = request + C::ProjectivePoint::mul_by_generator(k);
    if is_identity::<C>(&public_data) {
        return Err(EcqvError::IdentityPublicData);
    }
    let public_data = public_data.to_affine();
    let e = hash(&public_data)
        .filter(|e| !bool::from(e.is_zero()))
        .ok_or(EcqvError::ZeroHash)?;
    let reconstruction = e * k + ca_secret;
    Ok(Issued {
        public_data,
        hash: e,
        reconstruction,
    })
}

/// Anyone: the certificate's public key Q = e·C + Q_CA.
///
/// # Errors
/// [`EcqvError::ZeroHash`], [`EcqvError::IdentityPublicData`] or [`EcqvError::IdentityPublicKey`].
pub fn open<C: CurveArithmetic>(
    public_data: &C::AffinePoint,
    hash: &C::Scalar,
    ca_public: &C::AffinePoint,
) -> Result<C::AffinePoint, EcqvError> {
    Ok(open_projective::<C>(public_data, hash, ca_public)?.to_affine())
}

fn open_projective<C: CurveArithmetic>(
    public_data: &C::AffinePoint,
    hash: &C::Scalar,
    ca_public: &C::AffinePoint,
) -> Result<C::ProjectivePoint, EcqvError> {
    if bool::from(hash.is_zero()) {
        return Err(EcqvError::ZeroHash);
    }
    let c = C::ProjectivePoint::from(*public_data);
    if is_identity::<C>(&c) {
        return Err(EcqvError::IdentityPublicData);
    }
    let q = c * hash + C::ProjectivePoint::from(*ca_public);
    if is_identity::<C>(&q) {
        return Err(EcqvError::IdentityPublicKey);
    }
    Ok(q)
}

/// Device: reconstructs its private key d = e·r + a from its request secret `request_secret` (r)
/// and the CA's response, and checks it against the certificate: d ≠ 0 and d·G == e·C + Q_CA.
///
/// # Errors
/// [`EcqvError::ZeroPrivateKey`], [`EcqvError::KeyMismatch`], or an [`open`] error.
pub fn accept<C: CurveArithmetic>(
    request_secret: &C::Scalar,
    public_data: &C::AffinePoint,
    hash: &C::Scalar,
    reconstruction: &C::Scalar,
    ca_public: &C::AffinePoint,
) -> Result<Zeroizing<C::Scalar>, EcqvError> {
    let expected = open_projective::<C>(public_data, hash, ca_public)?;
    let d = Zeroizing::new(*hash * request_secret + reconstruction);
    if bool::from(d.is_zero()) {
        return Err(EcqvError::ZeroPrivateKey);
    }
    if C::ProjectivePoint::mul_by_generator(&*d) != expected {
        return Err(EcqvError::KeyMismatch);
    }
    Ok(d)
}

/// Quva's certificate hash e = Hs("quva/v1/cert", cert) over the encoded certificate.
///
/// # Errors
/// [`EcqvError::ZeroHash`] if the hash reduces to zero (probability 2⁻²⁵⁶).
pub fn cert_hash(cert: &[u8]) -> Result<k256::Scalar, EcqvError> {
    hash_to_scalar(CERT_HASH_TAG, &[cert]).map_err(|_| EcqvError::ZeroHash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::{AffinePoint, ProjectivePoint, Scalar, Secp256k1};
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng as TestRng;
    use rand_core::SeedableRng;

    fn base(k: &Scalar) -> AffinePoint {
        ProjectivePoint::mul_by_generator(k).to_affine()
    }

    fn fixed_hash(e: u64) -> impl FnOnce(&AffinePoint) -> Option<Scalar> {
        move |_| Some(Scalar::from(e))
    }

    #[test]
    fn issue_accept_open_agree_on_small_values() {
        // d_CA = 3, r = 5, k = 7, e = 11: C = 12·G, a = 80, d = 135 = 11·12 + 3.
        let q_ca = base(&Scalar::from(3u64));
        let iss = issue::<Secp256k1>(
            &base(&Scalar::from(5u64)),
            &Scalar::from(3u64),
            &Scalar::from(7u64),
            fixed_hash(11),
        )
        .unwrap();
        assert_eq!(iss.public_data, base(&Scalar::from(12u64)));
        assert_eq!(iss.reconstruction, Scalar::from(80u64));
        let d = accept::<Secp256k1>(
            &Scalar::from(5u64),
            &iss.public_data,
            &iss.hash,
            &iss.reconstruction,
            &q_ca,
        )
        .unwrap();
        assert_eq!(*d, Scalar::from(135u64));
        assert_eq!(
            open::<Secp256k1>(&iss.public_data, &iss.hash, &q_ca).unwrap(),
            base(&Scalar::from(135u64))
        );
    }

    #[test]
    fn issue_refuses_identity_zero_k_and_zero_hash() {
        let d_ca = Scalar::from(3u64);
        let r = base(&Scalar::from(5u64));
        assert_eq!(
            issue::<Secp256k1>(&AffinePoint::IDENTITY, &d_ca, &Scalar::ONE, fixed_hash(1)).err(),
            Some(EcqvError::IdentityRequest)
        );
        assert_eq!(
            issue::<Secp256k1>(&r, &d_ca, &Scalar::ZERO, fixed_hash(1)).err(),
            Some(EcqvError::ZeroNonce)
        );
        // R = −k·G makes C the identity.
        assert_eq!(
            issue::<Secp256k1>(&r, &d_ca, &-Scalar::from(5u64), fixed_hash(1)).err(),
            Some(EcqvError::IdentityPublicData)
        );
        assert_eq!(
            issue::<Secp256k1>(&r, &d_ca, &Scalar::ONE, fixed_hash(0)).err(),
            Some(EcqvError::ZeroHash)
        );
        assert_eq!(
            issue::<Secp256k1>(&r, &d_ca, &Scalar::ONE, |_| None).err(),
            Some(EcqvError::ZeroHash)
        );
    }

    #[test]
    fn accept_refuses_zero_key_and_mismatch() {
        let d_ca = Scalar::from(3u64);
        let q_ca = base(&d_ca);
        let r = Scalar::from(5u64);
        let iss =
            issue::<Secp256k1>(&base(&r), &d_ca, &Scalar::from(7u64), fixed_hash(11)).unwrap();
        // a = −e·r forces d = 0.
        let zeroing = -(iss.hash * r);
        assert_eq!(
            accept::<Secp256k1>(&r, &iss.public_data, &iss.hash, &zeroing, &q_ca).err(),
            Some(EcqvError::ZeroPrivateKey)
        );
        let off_by_one = iss.reconstruction + Scalar::ONE;
        assert_eq!(
            accept::<Secp256k1>(&r, &iss.public_data, &iss.hash, &off_by_one, &q_ca).err(),
            Some(EcqvError::KeyMismatch)
        );
        // Another CA's public key, or another hash.
        let other_ca = base(&Scalar::from(4u64));
        assert_eq!(
            accept::<Secp256k1>(
                &r,
                &iss.public_data,
                &iss.hash,
                &iss.reconstruction,
                &other_ca
            )
            .err(),
            Some(EcqvError::KeyMismatch)
        );
        assert_eq!(
            accept::<Secp256k1>(
                &r,
                &iss.public_data,
                &Scalar::from(12u64),
                &iss.reconstruction,
                &q_ca
            )
            .err(),
            Some(EcqvError::KeyMismatch)
        );
        assert_eq!(
            accept::<Secp256k1>(
                &r,
                &iss.public_data,
                &Scalar::ZERO,
                &iss.reconstruction,
                &q_ca
            )
            .err(),
            Some(EcqvError::ZeroHash)
        );
    }

    #[test]
    fn open_refuses_identity_key() {
        // C = G, e = 1, Q_CA = −G gives Q = identity.
        let g = AffinePoint::GENERATOR;
        let minus_g = base(&-Scalar::ONE);
        assert_eq!(
            open::<Secp256k1>(&g, &Scalar::ONE, &minus_g).err(),
            Some(EcqvError::IdentityPublicKey)
        );
        assert_eq!(
            open::<Secp256k1>(&AffinePoint::IDENTITY, &Scalar::ONE, &g).err(),
            Some(EcqvError::IdentityPublicData)
        );
    }

    #[test]
    fn cert_hash_is_hs_with_the_cert_tag() {
        assert_eq!(
            cert_hash(b"abc").unwrap(),
            hash_to_scalar("quva/v1/cert", &[b"abc"]).unwrap()
        );
        assert_ne!(cert_hash(b"abc").unwrap(), cert_hash(b"abd").unwrap());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn accepted_key_equals_opened_key(seed in any::<u64>(), cert in any::<Vec<u8>>()) {
            let mut rng = TestRng::seed_from_u64(seed);
            let d_ca = Scalar::random(&mut rng);
            let r = Scalar::random(&mut rng);
            let k = Scalar::random(&mut rng);
            let iss = issue::<Secp256k1>(&base(&r), &d_ca, &k, |_| cert_hash(&cert).ok()).unwrap();
            let q_ca = base(&d_ca);
            let d = accept::<Secp256k1>(&r, &iss.public_data, &iss.hash, &iss.reconstruction, &q_ca)
                .unwrap();
            let q = open::<Secp256k1>(&iss.public_data, &iss.hash, &q_ca).unwrap();
            prop_assert_eq!(base(&d), q);
            prop_assert_eq!(*d, iss.hash * (r + k) + d_ca);
        }
    }
}
