//! Enrollment and reconnection as CONNECT authentication, without I/O.
//!
//! PROTOCOL.md §3: a first enrollment sends method `quva-enroll-v1` with the request MACed by the
//! owner's one-time enrollment secret and reads `cert || sc(a_i)` from the CONNACK's
//! Authentication Data; a renewal sends `quva-renew-v1` signed with the current key; every later
//! connection proves the certificate with `quva-cert-v1`. The proof carries a timestamp and a
//! nonce, so a new one is made for every connection attempt.
//!
//! # Usage
//! ```
//! use quva_client::codec::{Decode, Encode};
//! use quva_client::curve::KeyPair;
//! use quva_client::enrollment::{EnrollRequest, EnrollmentSecret};
//! use quva_client::ids::DeviceId;
//! use rand_core::OsRng;
//! use quva_client::device::{Enrollment, cert_connect_auth};
//!
//! let mut rng = OsRng;
//! let now = 1_700_000_000_000;
//! let ca = KeyPair::random(&mut rng);
//! let secret = EnrollmentSecret::random(&mut rng);
//! let id = DeviceId::new("sensor-01").unwrap();
//! let (enrollment, auth) = Enrollment::start(id, &secret, *ca.public(), now, &mut rng);
//! assert_eq!(auth.method, "quva-enroll-v1");
//!
//! // The CA's side, as the bridge relays it.
//! let req = EnrollRequest::from_bytes(&auth.data).unwrap();
//! let issued = req.verify(&secret, now, 60_000).unwrap()
//!     .issue(&ca, 1, now, now + 86_400_000, &mut rng).unwrap();
//!
//! let creds = enrollment.finish(Some(&issued.to_bytes())).unwrap();
//! let auth = cert_connect_auth(&creds, "sensor-01-1", now, &mut rng).unwrap();
//! assert_eq!(auth.method, "quva-cert-v1");
//! ```

use core::fmt;

use crate::codec::{Decode, Encode};
use crate::curve::Point;
use crate::enrollment::{
    CertConnectProof, Credentials, EnrollError, EnrollResponse, EnrollmentSecret, METHOD_CERT,
    METHOD_ENROLL, METHOD_RENEW, PendingEnrollment,
};
use crate::ids::DeviceId;
use rand_core::CryptoRngCore;

/// The Authentication Method and Data of one CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectAuth {
    /// The method name.
    pub method: &'static str,
    /// The data (public: a MACed or signed request, or a certificate proof).
    pub data: Vec<u8>,
}

impl fmt::Debug for ConnectAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectAuth")
            .field("method", &self.method)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// Why an enrollment answer was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollFailure {
    /// The CONNACK carried no Authentication Data.
    #[error("the CONNACK carried no certificate (is the address a Quva bridge?)")]
    NoResponse,
    /// The answer does not decode.
    #[error("malformed enrollment answer: {0}")]
    Malformed(crate::codec::DecodeError),
    /// The certificate does not belong to this request or this CA.
    #[error("the certificate does not match this request or the configured CA key: {0}")]
    Rejected(EnrollError),
}

/// A first enrollment or a renewal in flight: the request's secrets r_i and g_i.
pub struct Enrollment {
    pending: PendingEnrollment,
    ca_public: Point,
}

impl fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enrollment")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl Enrollment {
    /// Starts a first enrollment of `id` at `now_ms`: the `quva-enroll-v1` CONNECT data.
    pub fn start(
        id: DeviceId,
        secret: &EnrollmentSecret,
        ca_public: Point,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> (Self, ConnectAuth) {
        let pending = PendingEnrollment::new(id, now_ms, rng);
        let auth = ConnectAuth {
            method: METHOD_ENROLL,
            data: pending.enroll_request(secret).to_bytes(),
        };
        (Enrollment { pending, ca_public }, auth)
    }

    /// Starts a renewal of `current` at `now_ms`: the `quva-renew-v1` CONNECT data, signed with
    /// the current key. The new certificate gets new d_i and g_i.
    ///
    /// # Errors
    /// [`EnrollError::Curve`] with probability 2⁻²⁵⁶.
    pub fn renew(
        current: &Credentials,
        ca_public: Point,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(Self, ConnectAuth), EnrollError> {
        let pending = PendingEnrollment::new(current.id().clone(), now_ms, rng);
        let data = pending.renew_request(current.key(), rng)?.to_bytes();
        Ok((
            Enrollment { pending, ca_public },
            ConnectAuth {
                method: METHOD_RENEW,
                data,
            },
        ))
    }

    /// Accepts the CONNACK's Authentication Data `cert || sc(a_i)`.
    ///
    /// # Errors
    /// [`EnrollFailure`] if the data is missing, malformed, or not a certificate for this
    /// request under the configured CA key.
    pub fn finish(self, connack_data: Option<&[u8]>) -> Result<Credentials, EnrollFailure> {
        let data = connack_data.ok_or(EnrollFailure::NoResponse)?;
        let response = EnrollResponse::from_bytes(data).map_err(EnrollFailure::Malformed)?;
        self.pending
            .accept(&response, &self.ca_public)
            .map_err(EnrollFailure::Rejected)
    }
}

/// The `quva-cert-v1` CONNECT authentication for the connection `client_id` at `now_ms`.
///
/// # Errors
/// [`EnrollError::ClientIdTooLong`], or [`EnrollError::Curve`] with probability 2⁻²⁵⁶.
pub fn cert_connect_auth(
    creds: &Credentials,
    client_id: &str,
    now_ms: u64,
    rng: &mut impl CryptoRngCore,
) -> Result<ConnectAuth, EnrollError> {
    let proof = CertConnectProof::new(creds, now_ms, client_id, rng)?;
    Ok(ConnectAuth {
        method: METHOD_CERT,
        data: proof.to_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curve::KeyPair;
    use crate::enrollment::{EnrollRequest, RenewRequest};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn enroll_renew_and_prove() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let ca = KeyPair::random(&mut rng);
        let secret = EnrollmentSecret::random(&mut rng);
        let id = DeviceId::new("dev-1").unwrap();
        let (e, auth) = Enrollment::start(id.clone(), &secret, *ca.public(), NOW, &mut rng);
        let issued = EnrollRequest::from_bytes(&auth.data)
            .unwrap()
            .verify(&secret, NOW, 60_000)
            .unwrap()
            .issue(&ca, 1, NOW, NOW + 1000, &mut rng)
            .unwrap();
        let creds = e.finish(Some(&issued.to_bytes())).unwrap();
        assert_eq!(creds.id(), &id);

        let (r, auth) = Enrollment::renew(&creds, *ca.public(), NOW, &mut rng).unwrap();
        assert_eq!(auth.method, METHOD_RENEW);
        let issued = RenewRequest::from_bytes(&auth.data)
            .unwrap()
            .verify(creds.cert(), ca.public(), NOW, 60_000)
            .unwrap()
            .issue(&ca, 2, NOW, NOW + 1000, &mut rng)
            .unwrap();
        let renewed = r.finish(Some(&issued.to_bytes())).unwrap();
        assert_eq!(renewed.cert().serial(), 2);
        assert_ne!(renewed.key().public(), creds.key().public());

        let auth = cert_connect_auth(&renewed, "dev-1-x", NOW, &mut rng).unwrap();
        let proof = CertConnectProof::from_bytes(&auth.data).unwrap();
        assert!(proof.verify(ca.public(), "dev-1-x", NOW, 60_000).is_ok());
        assert!(!format!("{auth:?}").contains(&hex::encode(&auth.data)));
    }

    #[test]
    fn refuses_missing_malformed_and_foreign_answers() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let ca = KeyPair::random(&mut rng);
        let other_ca = KeyPair::random(&mut rng);
        let secret = EnrollmentSecret::random(&mut rng);
        let id = DeviceId::new("dev-1").unwrap();
        let start =
            |rng: &mut ChaCha20Rng| Enrollment::start(id.clone(), &secret, *ca.public(), NOW, rng);
        let (e, _) = start(&mut rng);
        assert_eq!(e.finish(None).unwrap_err(), EnrollFailure::NoResponse);
        let (e, _) = start(&mut rng);
        assert!(matches!(
            e.finish(Some(b"junk")),
            Err(EnrollFailure::Malformed(_))
        ));
        let (e, auth) = start(&mut rng);
        let issued = EnrollRequest::from_bytes(&auth.data)
            .unwrap()
            .verify(&secret, NOW, 60_000)
            .unwrap()
            .issue(&other_ca, 1, NOW, NOW + 1000, &mut rng)
            .unwrap();
        assert!(matches!(
            e.finish(Some(&issued.to_bytes())),
            Err(EnrollFailure::Rejected(_))
        ));
    }
}
