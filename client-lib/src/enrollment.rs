//! Enrollment, renewal and certificate-based CONNECT proofs on secp256k1.
//!
//! Implements PROTOCOL.md §3 (modified ECQV with the paper's G_i, carried in CONNECT/CONNACK) and
//! the `quva-group-v1` group-level CONNECT proof of §6, with the proof of identity of §9.6.
//!
//! One enrollment is one CONNECT/CONNACK exchange:
//! 1. Device: [`PendingEnrollment::new`] picks r_i, g_i and a nonce, and
//!    [`PendingEnrollment::enroll_request`] MACs the request with the owner-issued
//!    [`EnrollmentSecret`]: method [`METHOD_ENROLL`], data `req || HMAC`.
//! 2. CA: [`EnrollRequest::from_bytes`]; look up the registration of `request.id` and its secret;
//!    [`EnrollRequest::verify`] gives a [`VerifiedRequest`]; check that its nonce is unseen (the
//!    daemon's state); [`VerifiedRequest::issue`] gives the CONNACK data [`EnrollResponse`]
//!    (`cert || sc(a_i)`).
//! 3. Device: [`PendingEnrollment::accept`] gives its [`Credentials`] (d_i, g_i, cert).
//!
//! Later a device renews with [`RenewRequest`] ([`METHOD_RENEW`]) and reconnects with a
//! [`CertConnectProof`] ([`METHOD_CERT`]) or, in an anonymous group, a [`GroupConnectProof`]
//! ([`METHOD_GROUP`]). Replay caches for nonces, registration and revocation are the caller's.
//!
//! # Refusals and CONNACK reason codes
//! Every refusal is an [`EnrollError`]; [`EnrollError::connack_reason`] maps it to the reason code
//! the bridge sends, so that nothing else leaks why:
//!
//! - 0x95 packet too large: `Malformed(DecodeError::TooLarge(_))`;
//! - 0x99 payload format invalid: any other `Malformed(_)`, `RequestEqualsGroupBase`,
//!   `ClientIdTooLong`;
//! - 0x87 not authorized: every other variant (`BadProof`, `OutsideWindow`, `WrongCa`, `Expired`,
//!   `NotYetValid`, `ClientIdMismatch`, `IdentityMismatch`, …).
//!
//! An unknown authentication method is 0x8C ([`AuthMethod::from_name`] returns `None`); an unknown
//! or revoked device, or a nonce already seen, is 0x87 ([`REASON_NOT_AUTHORIZED`]).
//!
//! # Usage
//! ```
//! use quva_client::curve::KeyPair;
//! use quva_client::enrollment::{
//!     CertConnectProof, EnrollRequest, EnrollResponse, EnrollmentSecret, PendingEnrollment,
//! };
//! use quva_client::codec::{Decode, Encode};
//! use quva_client::ids::DeviceId;
//! use rand_core::OsRng;
//!
//! let mut rng = OsRng;
//! let now = 1_700_000_000_000u64;
//! let ca = KeyPair::random(&mut rng);
//! let secret = EnrollmentSecret::random(&mut rng); // from the owner's RegisterDevice
//!
//! // Device: CONNECT with method quva-enroll-v1.
//! let pending = PendingEnrollment::new(DeviceId::new("sensor-01").unwrap(), now, &mut rng);
//! let connect_data = pending.enroll_request(&secret).to_bytes();
//!
//! // CA: parse, look up the secret of request.id, verify, check the nonce, issue.
//! let req = EnrollRequest::from_bytes(&connect_data).unwrap();
//! let verified = req.verify(&secret, now, 60_000).unwrap();
//! let connack_data = verified.issue(&ca, 1, now, now + 86_400_000, &mut rng).unwrap().to_bytes();
//!
//! // Device: reconstruct d_i; later reconnect with a certificate proof.
//! let response = EnrollResponse::from_bytes(&connack_data).unwrap();
//! let creds = pending.accept(&response, ca.public()).unwrap();
//! let proof = CertConnectProof::new(&creds, now, "client-7", &mut rng).unwrap();
//! let key = proof.verify(ca.public(), "client-7", now, 60_000).unwrap();
//! assert_eq!(key, creds.key().verifying_key());
//! ```

use core::fmt;

use k256::{AffinePoint, Scalar, Secp256k1};
use rand_core::CryptoRngCore;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::codec::{
    Decode, DecodeError, Encode, Reader, put_point, put_scalar, put_str, put_u8, put_u64,
};
use crate::curve::{CurveError, KeyPair, Point, SecretScalar, sha256};
use crate::ecqv::{self, EcqvError};
use crate::ids::{DeviceId, GroupId, GroupKeyKind, Role};
use crate::reasons;
use crate::schnorr::{Signature, VerifyingKey};
use crate::symmetric::{hmac_sha256, hmac_sha256_verify};

mod cert;
mod device;
mod proof;
mod request;

pub use cert::{CaKid, ImplicitCert};
pub use device::{Credentials, PendingEnrollment};
pub use proof::{CertConnectProof, GroupConnectProof};
pub use request::{
    CertRequest, EnrollRequest, EnrollResponse, EnrollmentSecret, RenewRequest, VerifiedRequest,
};

/// CONNECT authentication method of a first enrollment (request MACed with the enrollment secret).
pub const METHOD_ENROLL: &str = "quva-enroll-v1";
/// CONNECT authentication method of a renewal (request signed with the current d_i).
pub const METHOD_RENEW: &str = "quva-renew-v1";
/// CONNECT authentication method of a reconnection with a certificate.
pub const METHOD_CERT: &str = "quva-cert-v1";
/// CONNECT authentication method of a group-level reconnection (anonymous groups, §6).
pub const METHOD_GROUP: &str = "quva-group-v1";

/// Prefix of the enrollment HMAC input: HMAC-SHA256(secret, "quva/v1/enroll" || req).
pub const ENROLL_MAC_PREFIX: &[u8] = b"quva/v1/enroll";
/// Signature tag of a renewal request.
pub const RENEW_TAG: &str = "quva/v1/renew";
/// Signature tag of a `quva-cert-v1` proof.
pub const CONNECT_TAG: &str = "quva/v1/connect";
/// Signature tag of a `quva-group-v1` proof.
pub const GROUP_CONNECT_TAG: &str = "quva/v1/group-connect";

/// Length of the request and proof nonces.
pub const NONCE_LEN: usize = 16;
/// Length of the enrollment HMAC.
pub const MAC_LEN: usize = 32;
/// Length of an [`EnrollmentSecret`].
pub const ENROLLMENT_SECRET_LEN: usize = 32;
/// Length of a [`CaKid`].
pub const CA_KID_LEN: usize = 8;

/// CONNACK reason 0x87, not authorized: unknown, revoked or unproven devices, stale or replayed
/// proofs.
pub const REASON_NOT_AUTHORIZED: u8 = reasons::NOT_AUTHORIZED;
/// CONNACK reason 0x8C, bad authentication method.
pub const REASON_BAD_AUTHENTICATION_METHOD: u8 = reasons::BAD_AUTHENTICATION_METHOD;
/// CONNACK reason 0x95, packet too large.
pub const REASON_PACKET_TOO_LARGE: u8 = reasons::PACKET_TOO_LARGE;
/// CONNACK reason 0x99, payload format invalid: malformed authentication data.
pub const REASON_PAYLOAD_FORMAT_INVALID: u8 = reasons::PAYLOAD_FORMAT_INVALID;

/// The CONNECT authentication methods of Quva v1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// `quva-enroll-v1`.
    Enroll,
    /// `quva-renew-v1`.
    Renew,
    /// `quva-cert-v1`.
    Cert,
    /// `quva-group-v1`.
    Group,
}

impl AuthMethod {
    /// The method name carried in CONNECT's Authentication Method.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Enroll => METHOD_ENROLL,
            AuthMethod::Renew => METHOD_RENEW,
            AuthMethod::Cert => METHOD_CERT,
            AuthMethod::Group => METHOD_GROUP,
        }
    }

    /// Parses a method name; `None` (CONNACK 0x8C) for any other.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Enroll, Self::Renew, Self::Cert, Self::Group]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

/// Why an enrollment, renewal or CONNECT proof was refused (or, device side, a response).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The authentication data does not decode.
    #[error("malformed authentication data: {0}")]
    Malformed(#[from] DecodeError),
    /// The HMAC or signature proving the requester's identity is wrong.
    #[error("proof of identity failed")]
    BadProof,
    /// |T − now| exceeds the window.
    #[error("timestamp outside the window")]
    OutsideWindow,
    /// The certificate names another CA (its ca_kid is not this CA's).
    #[error("certificate from another CA")]
    WrongCa,
    /// The certificate's not_after has passed.
    #[error("certificate expired")]
    Expired,
    /// The certificate's not_before has not come yet.
    #[error("certificate not yet valid")]
    NotYetValid,
    /// The proof names a client identifier other than the CONNECT packet's.
    #[error("client identifier mismatch")]
    ClientIdMismatch,
    /// The device ID differs between request and certificate.
    #[error("device identity mismatch")]
    IdentityMismatch,
    /// R_i equals G_i (r_i = g_i would let anyone derive v_i from d_i).
    #[error("request point equals the group base point")]
    RequestEqualsGroupBase,
    /// A response whose certificate does not carry the request's G_i, or stored credentials whose
    /// g_i does not match their certificate.
    #[error("response does not match the request")]
    ResponseMismatch,
    /// A not_before later than not_after.
    #[error("invalid validity period")]
    InvalidValidity,
    /// A client identifier longer than 65535 bytes.
    #[error("client identifier too long")]
    ClientIdTooLong,
    /// The ECQV algebra refused (zero or mismatching reconstructed key, zero hash…).
    #[error("ECQV: {0}")]
    Ecqv(#[from] EcqvError),
    /// A signature nonce was zero (probability 2⁻²⁵⁶).
    #[error("curve: {0}")]
    Curve(#[from] CurveError),
}

impl EnrollError {
    /// The CONNACK reason code for this refusal (table in the module docs): 0x95 for oversized
    /// data, 0x99 for malformed data, 0x87 for everything else.
    pub fn connack_reason(&self) -> u8 {
        match self {
            EnrollError::Malformed(DecodeError::TooLarge(_)) => REASON_PACKET_TOO_LARGE,
            EnrollError::Malformed(_)
            | EnrollError::RequestEqualsGroupBase
            | EnrollError::ClientIdTooLong => REASON_PAYLOAD_FORMAT_INVALID,
            _ => REASON_NOT_AUTHORIZED,
        }
    }
}

/// Checks |T − now| ≤ window.
fn check_window(t_ms: u64, now_ms: u64, window_ms: u64) -> Result<(), EnrollError> {
    if t_ms.abs_diff(now_ms) <= window_ms {
        Ok(())
    } else {
        Err(EnrollError::OutsideWindow)
    }
}

fn check_client_id(client_id: &str) -> Result<(), EnrollError> {
    if client_id.len() <= usize::from(u16::MAX) {
        Ok(())
    } else {
        Err(EnrollError::ClientIdTooLong)
    }
}

fn to_point(a: &AffinePoint) -> Result<Point, EcqvError> {
    Point::from_affine(*a).map_err(|_| EcqvError::IdentityPublicKey)
}

fn random_nonce(rng: &mut impl CryptoRngCore) -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::elliptic_curve::Field;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng as TestRng;
    use rand_core::SeedableRng;

    const T: u64 = 1_700_000_000_000;
    const WINDOW: u64 = 60_000;
    const DAY: u64 = 86_400_000;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    fn scalar(v: u64) -> SecretScalar {
        SecretScalar::new(Scalar::from(v)).unwrap()
    }

    /// A CA, a registered device's secret and a pending enrollment of "sensor-7".
    struct Fixture {
        rng: TestRng,
        ca: KeyPair,
        secret: EnrollmentSecret,
        pending: PendingEnrollment,
    }

    fn fixture(seed: u64) -> Fixture {
        let mut rng = TestRng::seed_from_u64(seed);
        let ca = KeyPair::random(&mut rng);
        let secret = EnrollmentSecret::random(&mut rng);
        let pending = PendingEnrollment::new(id("sensor-7"), T, &mut rng);
        Fixture {
            rng,
            ca,
            secret,
            pending,
        }
    }

    impl Fixture {
        fn response(&mut self) -> EnrollResponse {
            self.pending
                .enroll_request(&self.secret)
                .verify(&self.secret, T, WINDOW)
                .unwrap()
                .issue(&self.ca, 42, T - DAY, T + DAY, &mut self.rng)
                .unwrap()
        }

        fn enrolled(&mut self) -> Credentials {
            let resp = self.response();
            self.pending.accept(&resp, self.ca.public()).unwrap()
        }
    }

    /// Flips every byte of `bytes` (two masks each) and asserts `accepts` refuses every variant.
    fn assert_every_flip_refused(bytes: &[u8], accepts: impl Fn(&[u8]) -> bool) {
        assert!(accepts(bytes), "the unaltered bytes must be accepted");
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x80] {
                let mut bad = bytes.to_vec();
                bad[i] ^= mask;
                assert!(!accepts(&bad), "byte {i} ^ {mask:#04x} was accepted");
            }
        }
    }

    #[test]
    fn open_in_variable_time_equals_the_constant_time_ecqv_open() {
        for seed in 0..16 {
            let mut f = fixture(seed);
            let cert = f.response().cert;
            let e = cert.hash().unwrap();
            let reference = ecqv::open::<Secp256k1>(
                cert.public_data().as_affine(),
                &e,
                f.ca.public().as_affine(),
            )
            .unwrap();
            assert_eq!(
                cert.open(f.ca.public()).unwrap().0.as_affine(),
                &reference,
                "seed {seed}"
            );
        }
    }

    #[test]
    fn enrollment_flow_deterministic() {
        // Every §10 `ecqv` input is explicit here.
        let ca = KeyPair::from_secret(scalar(1000));
        let secret = EnrollmentSecret::from_bytes(&[9u8; 32]);
        let pending =
            PendingEnrollment::new_with(id("dev-1"), scalar(5), scalar(6), T, [7u8; 16]).unwrap();
        let request = pending.enroll_request(&secret).to_bytes();
        let verified = EnrollRequest::from_bytes(&request)
            .unwrap()
            .verify(&secret, T, WINDOW)
            .unwrap();
        let resp = verified
            .issue_with(&ca, 3, T, T + DAY, &scalar(11))
            .unwrap();
        // C = R + k·G = 16·G; a = e·11 + 1000; d = e·5 + a = e·16 + 1000.
        assert_eq!(resp.cert.public_data(), &Point::mul_base(&scalar(16)));
        let e = resp.cert.hash().unwrap();
        assert_eq!(
            resp.reconstruction,
            e * Scalar::from(11u64) + Scalar::from(1000u64)
        );
        let creds = pending.accept(&resp, ca.public()).unwrap();
        assert_eq!(
            *creds.key().secret().as_scalar(),
            e * Scalar::from(16u64) + Scalar::from(1000u64)
        );
        assert_eq!(
            creds.cert().open(ca.public()).unwrap(),
            creds.key().verifying_key()
        );
        assert_eq!(creds.group_secret(), &scalar(6));
        assert_eq!(creds.id(), &id("dev-1"));
        // Same inputs, same bytes.
        let again = verified
            .issue_with(&ca, 3, T, T + DAY, &scalar(11))
            .unwrap();
        assert_eq!(again.to_bytes(), resp.to_bytes());
        // The certificate layout of §3.
        let cert = resp.cert.to_bytes();
        assert_eq!(cert.len(), 1 + 8 + 2 + 5 + 33 + 33 + 8 + 8 + 8);
        assert_eq!(cert[0], 1);
        assert_eq!(&cert[1..9], &3u64.to_be_bytes());
        assert_eq!(&cert[9..16], b"\x00\x05dev-1");
        assert_eq!(
            &cert[cert.len() - 8..],
            &sha256(&[&ca.public().to_bytes()])[..8]
        );
        // The request layout, and its HMAC over "quva/v1/enroll" || req.
        assert_eq!(request.len(), 1 + 7 + 33 + 33 + 8 + 16 + 32);
        let (req, mac) = request.split_at(request.len() - 32);
        assert_eq!(mac, hmac_sha256(&[9u8; 32], &[b"quva/v1/enroll", req]));
    }

    #[test]
    fn renewal_flow() {
        let mut f = fixture(1);
        let old = f.enrolled();
        let next = PendingEnrollment::new(id("sensor-7"), T + 10, &mut f.rng);
        let data = next
            .renew_request(old.key(), &mut f.rng)
            .unwrap()
            .to_bytes();
        let req = RenewRequest::from_bytes(&data).unwrap();
        let verified = req.verify(old.cert(), f.ca.public(), T, WINDOW).unwrap();
        assert_eq!(verified.request(), next.request());
        let resp = verified
            .issue(&f.ca, 43, T, T + 2 * DAY, &mut f.rng)
            .unwrap();
        let new = next.accept(&resp, f.ca.public()).unwrap();
        assert_ne!(new.key().public(), old.key().public());
        assert_eq!(new.cert().serial(), 43);
        // Signed by a key that is not the certificate's.
        let stranger = KeyPair::random(&mut f.rng);
        let forged = next.renew_request(&stranger, &mut f.rng).unwrap();
        assert_eq!(
            forged.verify(old.cert(), f.ca.public(), T, WINDOW).err(),
            Some(EnrollError::BadProof)
        );
        // Another device's certificate.
        let other_dev = PendingEnrollment::new(id("other"), T, &mut f.rng);
        let req = other_dev.renew_request(old.key(), &mut f.rng).unwrap();
        assert_eq!(
            req.verify(old.cert(), f.ca.public(), T, WINDOW).err(),
            Some(EnrollError::IdentityMismatch)
        );
        // An expired current certificate cannot renew.
        let req = next.renew_request(old.key(), &mut f.rng).unwrap();
        assert_eq!(
            req.verify(old.cert(), f.ca.public(), T + DAY + 1, u64::MAX)
                .err(),
            Some(EnrollError::Expired)
        );
        // Nor one from another CA.
        let other_ca = KeyPair::random(&mut f.rng);
        assert_eq!(
            req.verify(old.cert(), other_ca.public(), T, WINDOW).err(),
            Some(EnrollError::WrongCa)
        );
    }

    #[test]
    fn renewal_request_tamper() {
        let mut f = fixture(2);
        let old = f.enrolled();
        let next = PendingEnrollment::new(id("sensor-7"), T, &mut f.rng);
        let data = next
            .renew_request(old.key(), &mut f.rng)
            .unwrap()
            .to_bytes();
        assert_every_flip_refused(&data, |b| {
            RenewRequest::from_bytes(b)
                .is_ok_and(|r| r.verify(old.cert(), f.ca.public(), T, WINDOW).is_ok())
        });
    }

    #[test]
    fn enroll_request_tamper() {
        let f = fixture(3);
        let data = f.pending.enroll_request(&f.secret).to_bytes();
        assert_every_flip_refused(&data, |b| {
            EnrollRequest::from_bytes(b).is_ok_and(|r| r.verify(&f.secret, T, WINDOW).is_ok())
        });
    }

    #[test]
    fn response_and_cert_tamper() {
        let mut f = fixture(4);
        let resp = f.response().to_bytes();
        assert_every_flip_refused(&resp, |b| {
            EnrollResponse::from_bytes(b).is_ok_and(|r| f.pending.accept(&r, f.ca.public()).is_ok())
        });
    }

    #[test]
    fn cert_connect_proof_flow_and_tamper() {
        let mut f = fixture(5);
        let creds = f.enrolled();
        let proof = CertConnectProof::new(&creds, T, "client-α", &mut f.rng).unwrap();
        let data = proof.to_bytes();
        let parsed = CertConnectProof::from_bytes(&data).unwrap();
        assert_eq!(
            parsed.verify(f.ca.public(), "client-α", T, WINDOW).unwrap(),
            creds.key().verifying_key()
        );
        assert_every_flip_refused(&data, |b| {
            CertConnectProof::from_bytes(b)
                .is_ok_and(|p| p.verify(f.ca.public(), "client-α", T, WINDOW).is_ok())
        });
    }

    #[test]
    fn cert_connect_proof_rejections() {
        let mut f = fixture(6);
        let creds = f.enrolled();
        let proof = CertConnectProof::new(&creds, T, "c1", &mut f.rng).unwrap();
        let ca = *f.ca.public();
        assert_eq!(
            proof.verify(&ca, "c2", T, WINDOW).err(),
            Some(EnrollError::ClientIdMismatch)
        );
        assert_eq!(
            proof.verify(&ca, "c1", T + WINDOW + 1, WINDOW).err(),
            Some(EnrollError::OutsideWindow)
        );
        assert_eq!(
            proof.verify(&ca, "c1", T - WINDOW - 1, WINDOW).err(),
            Some(EnrollError::OutsideWindow)
        );
        assert!(proof.verify(&ca, "c1", T + WINDOW, WINDOW).is_ok());
        assert!(proof.verify(&ca, "c1", T - WINDOW, WINDOW).is_ok());
        // Certificate validity is checked at the verifier's now.
        assert_eq!(
            proof.verify(&ca, "c1", T + DAY + 1, u64::MAX).err(),
            Some(EnrollError::Expired)
        );
        assert_eq!(
            proof.verify(&ca, "c1", T - DAY - 1, u64::MAX).err(),
            Some(EnrollError::NotYetValid)
        );
        let other_ca = KeyPair::random(&mut f.rng);
        assert_eq!(
            proof.verify(other_ca.public(), "c1", T, WINDOW).err(),
            Some(EnrollError::WrongCa)
        );
        // A proof signed by a key other than the certificate's.
        let thief = Credentials {
            key: KeyPair::random(&mut f.rng),
            group_secret: creds.group_secret().clone(),
            cert: creds.cert().clone(),
        };
        let stolen = CertConnectProof::new(&thief, T, "c1", &mut f.rng).unwrap();
        assert_eq!(
            stolen.verify(&ca, "c1", T, WINDOW).err(),
            Some(EnrollError::BadProof)
        );
        let long = "x".repeat(65_536);
        assert_eq!(
            CertConnectProof::new(&creds, T, &long, &mut f.rng).err(),
            Some(EnrollError::ClientIdTooLong)
        );
    }

    #[test]
    fn group_connect_proof_uses_the_roles_held_key() {
        let mut rng = TestRng::seed_from_u64(7);
        let d_p = KeyPair::random(&mut rng);
        let d_s = KeyPair::random(&mut rng);
        let (q_p, q_s) = (d_p.verifying_key(), d_s.verifying_key());
        let group = GroupId::new("plant/line-3/temp").unwrap();
        // A publisher holds d_S, a subscriber d_P.
        for (role, held, other) in [
            (Role::Publisher, &d_s, &d_p),
            (Role::Subscriber, &d_p, &d_s),
        ] {
            let proof =
                GroupConnectProof::new(held, group.clone(), role, T, "rnd-1", &mut rng).unwrap();
            let data = proof.to_bytes();
            let parsed = GroupConnectProof::from_bytes(&data).unwrap();
            assert!(parsed.verify(&q_p, &q_s, "rnd-1", T, WINDOW).is_ok());
            assert_every_flip_refused(&data, |b| {
                GroupConnectProof::from_bytes(b)
                    .is_ok_and(|p| p.verify(&q_p, &q_s, "rnd-1", T, WINDOW).is_ok())
            });
            // Signed with the other role's key: refused.
            let wrong =
                GroupConnectProof::new(other, group.clone(), role, T, "rnd-1", &mut rng).unwrap();
            assert_eq!(
                wrong.verify(&q_p, &q_s, "rnd-1", T, WINDOW).err(),
                Some(EnrollError::BadProof)
            );
            assert_eq!(
                parsed.verify(&q_p, &q_s, "rnd-2", T, WINDOW).err(),
                Some(EnrollError::ClientIdMismatch)
            );
            assert_eq!(
                parsed
                    .verify(&q_p, &q_s, "rnd-1", T + WINDOW + 1, WINDOW)
                    .err(),
                Some(EnrollError::OutsideWindow)
            );
        }
    }

    #[test]
    fn request_with_identity_or_off_curve_point_is_malformed() {
        let f = fixture(8);
        let data = f.pending.enroll_request(&f.secret).to_bytes();
        let r_at = 1 + 2 + "sensor-7".len();
        let mut off_curve = [0u8; 33];
        off_curve[0] = 0x02;
        off_curve[32] = 5; // x = 5: x³ + 7 is not a square mod p.
        for (at, what) in [(r_at, "request R_i"), (r_at + 33, "request G_i")] {
            for bad_point in [[0u8; 33], off_curve] {
                let mut bad = data.clone();
                bad[at..at + 33].copy_from_slice(&bad_point);
                let err = EnrollRequest::from_bytes(&bad).unwrap_err();
                assert_eq!(err, DecodeError::InvalidPoint(what));
                assert_eq!(
                    EnrollError::from(err).connack_reason(),
                    REASON_PAYLOAD_FORMAT_INVALID
                );
            }
        }
    }

    #[test]
    fn response_scalar_at_or_above_n_is_malformed() {
        let mut f = fixture(9);
        let mut resp = f.response().to_bytes();
        let len = resp.len();
        let n = hex::decode("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141")
            .unwrap();
        resp[len - 32..].copy_from_slice(&n);
        assert_eq!(
            EnrollResponse::from_bytes(&resp).err(),
            Some(DecodeError::InvalidScalar("response a_i"))
        );
        resp[len - 32..].copy_from_slice(&[0xff; 32]);
        assert!(EnrollResponse::from_bytes(&resp).is_err());
    }

    #[test]
    fn zero_private_key_is_refused() {
        let mut f = fixture(10);
        let mut resp = f.response();
        // a = −e·r makes d = e·r + a = 0.
        let e = resp.cert.hash().unwrap();
        resp.reconstruction = -(e * f.pending.request_secret.as_scalar());
        assert_eq!(
            f.pending.accept(&resp, f.ca.public()).err(),
            Some(EnrollError::Ecqv(EcqvError::ZeroPrivateKey))
        );
    }

    #[test]
    fn request_point_equal_to_group_base_is_refused() {
        let mut f = fixture(11);
        assert_eq!(
            PendingEnrollment::new_with(id("sensor-7"), scalar(5), scalar(5), T, [0; 16]).err(),
            Some(EnrollError::RequestEqualsGroupBase)
        );
        // A well-MACed request with R_i = G_i is still refused by the CA.
        let p = Point::mul_base(&SecretScalar::random(&mut f.rng));
        let request = CertRequest {
            id: id("sensor-7"),
            request_point: p,
            group_base: p,
            t_ms: T,
            nonce: [1; 16],
        };
        let err = EnrollRequest::new(request, &f.secret)
            .verify(&f.secret, T, WINDOW)
            .unwrap_err();
        assert_eq!(err, EnrollError::RequestEqualsGroupBase);
        assert_eq!(err.connack_reason(), REASON_PAYLOAD_FORMAT_INVALID);
    }

    #[test]
    fn stale_enrollment_request_is_refused() {
        let f = fixture(12);
        let req = f.pending.enroll_request(&f.secret);
        for now in [T + WINDOW + 1, T - WINDOW - 1, 0, u64::MAX] {
            assert_eq!(
                req.verify(&f.secret, now, WINDOW).err(),
                Some(EnrollError::OutsideWindow),
                "now = {now}"
            );
        }
        assert!(req.verify(&f.secret, T + WINDOW, WINDOW).is_ok());
        assert!(req.verify(&f.secret, T - WINDOW, WINDOW).is_ok());
    }

    #[test]
    fn response_checks_on_the_device() {
        let mut f = fixture(13);
        let resp = f.response();
        // From another CA: refused before any arithmetic.
        let other_ca = KeyPair::random(&mut f.rng);
        assert_eq!(
            f.pending.accept(&resp, other_ca.public()).err(),
            Some(EnrollError::WrongCa)
        );
        assert_eq!(
            resp.cert.open(other_ca.public()).err(),
            Some(EnrollError::WrongCa)
        );
        // A response to another request (other device, or same ID with other G_i).
        let other = PendingEnrollment::new(id("other"), T, &mut f.rng);
        assert_eq!(
            other.accept(&resp, f.ca.public()).err(),
            Some(EnrollError::IdentityMismatch)
        );
        let same_id = PendingEnrollment::new(id("sensor-7"), T, &mut f.rng);
        assert_eq!(
            same_id.accept(&resp, f.ca.public()).err(),
            Some(EnrollError::ResponseMismatch)
        );
        // Same ID and G_i but another r_i: the key check fails.
        let same_g = PendingEnrollment::new_with(
            id("sensor-7"),
            SecretScalar::random(&mut f.rng),
            f.pending.group_secret.clone(),
            T,
            [0; 16],
        )
        .unwrap();
        assert_eq!(
            same_g.accept(&resp, f.ca.public()).err(),
            Some(EnrollError::Ecqv(EcqvError::KeyMismatch))
        );
    }

    #[test]
    fn issue_refuses_inverted_validity() {
        let f = fixture(14);
        let v = f
            .pending
            .enroll_request(&f.secret)
            .verify(&f.secret, T, WINDOW)
            .unwrap();
        assert_eq!(
            v.issue_with(&f.ca, 1, T + 1, T, &scalar(3)).err(),
            Some(EnrollError::InvalidValidity)
        );
        // Equal bounds are a valid (one-instant) certificate.
        let resp = v.issue_with(&f.ca, 1, T, T, &scalar(3)).unwrap();
        assert!(resp.cert.is_valid_at(T));
        assert!(!resp.cert.is_valid_at(T + 1));
    }

    #[test]
    fn cert_decoding_rejects_bad_version_validity_and_trailing_bytes() {
        let mut f = fixture(15);
        let cert = f.response().cert.to_bytes();
        assert!(ImplicitCert::from_bytes(&cert).is_ok());
        let mut v2 = cert.clone();
        v2[0] = 2;
        assert_eq!(
            ImplicitCert::from_bytes(&v2).err(),
            Some(DecodeError::UnknownVersion("cert"))
        );
        let mut trailing = cert.clone();
        trailing.push(0);
        assert!(matches!(
            ImplicitCert::from_bytes(&trailing),
            Err(DecodeError::TrailingBytes(_))
        ));
        // Swap not_before and not_after: not_before > not_after.
        let nb_at = cert.len() - 8 - 16;
        let mut swapped = cert.clone();
        swapped[nb_at..nb_at + 8].copy_from_slice(&cert[nb_at + 8..nb_at + 16]);
        swapped[nb_at + 8..nb_at + 16].copy_from_slice(&cert[nb_at..nb_at + 8]);
        assert_eq!(
            ImplicitCert::from_bytes(&swapped).err(),
            Some(DecodeError::InvalidValue("cert validity"))
        );
        for cut in 0..cert.len() {
            assert!(ImplicitCert::from_bytes(&cert[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn credentials_from_parts_checks_consistency() {
        let mut f = fixture(16);
        let creds = f.enrolled();
        let ca = *f.ca.public();
        let again = Credentials::from_parts(
            creds.key().clone(),
            creds.group_secret().clone(),
            creds.cert().clone(),
            &ca,
        )
        .unwrap();
        assert!(again == creds);
        assert_eq!(
            Credentials::from_parts(
                KeyPair::random(&mut f.rng),
                creds.group_secret().clone(),
                creds.cert().clone(),
                &ca
            )
            .err(),
            Some(EnrollError::Ecqv(EcqvError::KeyMismatch))
        );
        assert_eq!(
            Credentials::from_parts(
                creds.key().clone(),
                SecretScalar::random(&mut f.rng),
                creds.cert().clone(),
                &ca
            )
            .err(),
            Some(EnrollError::ResponseMismatch)
        );
    }

    // §9.6: an enrollment request must carry proof of identity.

    #[test]
    fn enrollment_without_valid_proof_of_identity_is_refused() {
        let mut f = fixture(17);
        let good = f.pending.enroll_request(&f.secret);
        // Wrong secret.
        let wrong = EnrollmentSecret::random(&mut f.rng);
        let err = f
            .pending
            .enroll_request(&wrong)
            .verify(&f.secret, T, WINDOW)
            .unwrap_err();
        assert_eq!(err, EnrollError::BadProof);
        assert_eq!(err.connack_reason(), REASON_NOT_AUTHORIZED);
        // Missing HMAC: the bare ECQV request of the paper does not even decode.
        let bare = good.request.to_bytes();
        let err = EnrollError::from(EnrollRequest::from_bytes(&bare).unwrap_err());
        assert_eq!(
            err,
            EnrollError::Malformed(DecodeError::Truncated("enroll HMAC"))
        );
        assert_eq!(err.connack_reason(), REASON_PAYLOAD_FORMAT_INVALID);
        // An HMAC over a different request (an eavesdropped one) on a new request.
        let attacker = PendingEnrollment::new(id("sensor-7"), T, &mut f.rng);
        let spliced = EnrollRequest {
            request: attacker.request().clone(),
            mac: good.mac,
        };
        assert_eq!(
            spliced.verify(&f.secret, T, WINDOW).err(),
            Some(EnrollError::BadProof)
        );
        // An HMAC without the domain prefix.
        let unprefixed = EnrollRequest {
            request: good.request.clone(),
            mac: hmac_sha256(f.secret.as_bytes(), &[&good.request.to_bytes()]),
        };
        assert_eq!(
            unprefixed.verify(&f.secret, T, WINDOW).err(),
            Some(EnrollError::BadProof)
        );
        // The genuine request passes.
        assert!(good.verify(&f.secret, T, WINDOW).is_ok());
    }

    #[test]
    fn paper_flow_without_proof_lets_anyone_enroll_a_registered_id() {
        let mut f = fixture(18);
        // The attacker knows the victim's ID and the CA's public key, but not the secret.
        let attacker = PendingEnrollment::new(id("sensor-7"), T, &mut f.rng);
        let mut mac = [0u8; MAC_LEN];
        rand_core::RngCore::fill_bytes(&mut f.rng, &mut mac);
        let data = EnrollRequest {
            request: attacker.request().clone(),
            mac,
        }
        .to_bytes();
        let parsed = EnrollRequest::from_bytes(&data).unwrap();
        // Every check but the HMAC passes: well-formed, valid points, in the window, R_i ≠ G_i.
        assert!(parsed.request.check_fields(T, WINDOW).is_ok());
        // v1 refuses it.
        assert_eq!(
            parsed.verify(&f.secret, T, WINDOW).err(),
            Some(EnrollError::BadProof)
        );
        // A CA following the paper (no proof of identity) would issue, and the attacker would hold
        // working credentials for the victim's ID.
        let paper_ca = VerifiedRequest {
            request: parsed.request.clone(),
        };
        let resp = paper_ca.issue(&f.ca, 1, T, T + DAY, &mut f.rng).unwrap();
        let stolen = attacker.accept(&resp, f.ca.public()).unwrap();
        assert_eq!(stolen.id(), &id("sensor-7"));
        let proof = CertConnectProof::new(&stolen, T, "c", &mut f.rng).unwrap();
        assert!(proof.verify(f.ca.public(), "c", T, WINDOW).is_ok());
    }

    #[test]
    fn reason_codes_and_methods() {
        assert_eq!(
            EnrollError::Malformed(DecodeError::TooLarge("x")).connack_reason(),
            REASON_PACKET_TOO_LARGE
        );
        for e in [
            EnrollError::BadProof,
            EnrollError::OutsideWindow,
            EnrollError::WrongCa,
            EnrollError::Expired,
            EnrollError::NotYetValid,
            EnrollError::ClientIdMismatch,
            EnrollError::IdentityMismatch,
        ] {
            assert_eq!(e.connack_reason(), REASON_NOT_AUTHORIZED, "{e:?}");
        }
        for m in [
            AuthMethod::Enroll,
            AuthMethod::Renew,
            AuthMethod::Cert,
            AuthMethod::Group,
        ] {
            assert_eq!(AuthMethod::from_name(m.as_str()), Some(m));
        }
        assert_eq!(AuthMethod::from_name("quva-enroll-v2"), None);
        assert_eq!(METHOD_ENROLL, "quva-enroll-v1");
        assert_eq!(METHOD_RENEW, "quva-renew-v1");
        assert_eq!(METHOD_CERT, "quva-cert-v1");
        assert_eq!(METHOD_GROUP, "quva-group-v1");
    }

    #[test]
    fn secrets_are_redacted() {
        let mut f = fixture(19);
        let secret_hex = hex::encode(f.secret.as_bytes());
        assert_eq!(format!("{:?}", f.secret), "EnrollmentSecret(<redacted>)");
        let creds = f.enrolled();
        let d_hex = hex::encode(creds.key().secret().to_bytes());
        let g_hex = hex::encode(creds.group_secret().to_bytes());
        let r_hex = hex::encode(f.pending.request_secret.to_bytes());
        let dbg = format!("{creds:?} {:?}", f.pending);
        for s in [secret_hex, d_hex, g_hex, r_hex] {
            assert!(!dbg.contains(&s));
        }
        assert_eq!(f.secret, EnrollmentSecret::from_bytes(f.secret.as_bytes()));
        assert_ne!(f.secret, EnrollmentSecret::from_bytes(&[0; 32]));
    }

    // Property tests.

    fn arb_device_id() -> impl Strategy<Value = DeviceId> {
        "[A-Za-z0-9._-]{1,64}".prop_map(|s| DeviceId::new(&s).unwrap())
    }

    fn arb_group_id() -> impl Strategy<Value = GroupId> {
        "[a-z0-9]{1,20}(/[a-z0-9_-]{1,20}){0,3}".prop_map(|s| GroupId::new(&s).unwrap())
    }

    fn point(rng: &mut TestRng) -> Point {
        Point::mul_base(&SecretScalar::random(rng))
    }

    fn signature(rng: &mut TestRng) -> Signature {
        Signature {
            commitment: point(rng),
            response: Scalar::random(&mut *rng),
        }
    }

    fn cert(rng: &mut TestRng, id: DeviceId, serial: u64, a: u64, b: u64) -> ImplicitCert {
        ImplicitCert {
            serial,
            id,
            public_data: point(rng),
            group_base: point(rng),
            not_before: a.min(b),
            not_after: a.max(b),
            ca_kid: CaKid::of(&point(rng)),
        }
    }

    fn round_trip<T: Encode + Decode + PartialEq + fmt::Debug>(v: &T) -> Result<(), TestCaseError> {
        let bytes = v.to_bytes();
        prop_assert_eq!(&T::from_bytes(&bytes).unwrap(), v);
        let mut longer = bytes.clone();
        longer.push(0);
        prop_assert!(T::from_bytes(&longer).is_err());
        prop_assert!(T::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn codec_round_trips(
            seed in any::<u64>(),
            id in arb_device_id(),
            group in arb_group_id(),
            serial in any::<u64>(),
            (a, b, t) in (any::<u64>(), any::<u64>(), any::<u64>()),
            nonce in any::<[u8; 16]>(),
            mac in any::<[u8; 32]>(),
            client_id in ".{0,40}",
            publisher in any::<bool>(),
        ) {
            let mut rng = TestRng::seed_from_u64(seed);
            let request = CertRequest {
                id: id.clone(),
                request_point: point(&mut rng),
                group_base: point(&mut rng),
                t_ms: t,
                nonce,
            };
            round_trip(&request)?;
            round_trip(&EnrollRequest { request: request.clone(), mac })?;
            round_trip(&RenewRequest { request, signature: signature(&mut rng) })?;
            let cert = cert(&mut rng, id, serial, a, b);
            round_trip(&cert)?;
            round_trip(&EnrollResponse {
                cert: cert.clone(),
                reconstruction: Scalar::random(&mut rng),
            })?;
            round_trip(&CertConnectProof {
                cert,
                t_ms: t,
                nonce,
                client_id: client_id.clone(),
                signature: signature(&mut rng),
            })?;
            round_trip(&GroupConnectProof {
                group,
                role: if publisher { Role::Publisher } else { Role::Subscriber },
                t_ms: t,
                nonce,
                client_id,
                signature: signature(&mut rng),
            })?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn accepted_key_equals_opened_key(
            seed in any::<u64>(),
            id in arb_device_id(),
            serial in any::<u64>(),
            t in 0u64..u64::MAX / 2,
        ) {
            let mut rng = TestRng::seed_from_u64(seed);
            let ca = KeyPair::random(&mut rng);
            let secret = EnrollmentSecret::random(&mut rng);
            let pending = PendingEnrollment::new(id, t, &mut rng);
            let resp = pending
                .enroll_request(&secret)
                .verify(&secret, t, 0)
                .unwrap()
                .issue(&ca, serial, t, t + DAY, &mut rng)
                .unwrap();
            let resp = EnrollResponse::from_bytes(&resp.to_bytes()).unwrap();
            let creds = pending.accept(&resp, ca.public()).unwrap();
            prop_assert_eq!(resp.cert.open(ca.public()).unwrap(), creds.key().verifying_key());
            prop_assert_eq!(creds.cert().serial(), serial);
            prop_assert_eq!(creds.cert().group_base(), &pending.request().group_base);
        }
    }
}
