//! The device side of enrollment: the pending request and the accepted credentials (PROTOCOL.md §3).

use super::*;

/// Device: a request in flight with its secrets r_i and g_i. Redacted in `Debug`.
pub struct PendingEnrollment {
    pub(super) request: CertRequest,
    pub(super) request_secret: SecretScalar,
    pub(super) group_secret: SecretScalar,
}

impl PendingEnrollment {
    /// Starts a request at `t_ms` with random r_i ≠ g_i and a random nonce.
    pub fn new(id: DeviceId, t_ms: u64, rng: &mut impl CryptoRngCore) -> Self {
        loop {
            let r = SecretScalar::random(rng);
            let g = SecretScalar::random(rng);
            let nonce = random_nonce(rng);
            if let Ok(p) = Self::new_with(id.clone(), r, g, t_ms, nonce) {
                return p;
            }
        }
    }

    /// Starts a request with the given r_i, g_i and nonce (for test vectors, or to keep g_i).
    ///
    /// # Errors
    /// [`EnrollError::RequestEqualsGroupBase`] if r_i = g_i.
    pub fn new_with(
        id: DeviceId,
        request_secret: SecretScalar,
        group_secret: SecretScalar,
        t_ms: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Self, EnrollError> {
        if request_secret == group_secret {
            return Err(EnrollError::RequestEqualsGroupBase);
        }
        let request = CertRequest {
            id,
            request_point: Point::mul_base(&request_secret),
            group_base: Point::mul_base(&group_secret),
            t_ms,
            nonce,
        };
        Ok(PendingEnrollment {
            request,
            request_secret,
            group_secret,
        })
    }

    /// The request being made.
    pub fn request(&self) -> &CertRequest {
        &self.request
    }

    /// The `quva-enroll-v1` CONNECT data, proved with the enrollment secret.
    pub fn enroll_request(&self, secret: &EnrollmentSecret) -> EnrollRequest {
        EnrollRequest::new(self.request.clone(), secret)
    }

    /// The `quva-renew-v1` CONNECT data, signed with the current key d_i.
    ///
    /// # Errors
    /// [`EnrollError::Curve`] with probability 2⁻²⁵⁶.
    pub fn renew_request(
        &self,
        current: &KeyPair,
        rng: &mut impl CryptoRngCore,
    ) -> Result<RenewRequest, EnrollError> {
        RenewRequest::new(self.request.clone(), current, rng)
    }

    /// [`PendingEnrollment::renew_request`] with the signature's random bytes given.
    ///
    /// # Errors
    /// [`EnrollError::Curve`] with probability 2⁻²⁵⁶.
    pub fn renew_request_with_entropy(
        &self,
        current: &KeyPair,
        entropy: &[u8; 32],
    ) -> Result<RenewRequest, EnrollError> {
        RenewRequest::new_with_entropy(self.request.clone(), current, entropy)
    }

    /// Accepts the CA's response: the certificate must carry this request's ID and G_i and name
    /// the CA `ca_public`; then d_i = e·r_i + a_i, accepted only if d_i ≠ 0 and
    /// d_i·G == e·C + Q_CA.
    ///
    /// # Errors
    /// [`EnrollError::IdentityMismatch`], [`EnrollError::ResponseMismatch`],
    /// [`EnrollError::WrongCa`], or [`EnrollError::Ecqv`] (zero or mismatching key).
    pub fn accept(
        &self,
        response: &EnrollResponse,
        ca_public: &Point,
    ) -> Result<Credentials, EnrollError> {
        let cert = &response.cert;
        if cert.id != self.request.id {
            return Err(EnrollError::IdentityMismatch);
        }
        if cert.group_base != self.request.group_base {
            return Err(EnrollError::ResponseMismatch);
        }
        if cert.ca_kid != CaKid::of(ca_public) {
            return Err(EnrollError::WrongCa);
        }
        let e = cert.hash()?;
        let d = ecqv::accept::<Secp256k1>(
            self.request_secret.as_scalar(),
            cert.public_data.as_affine(),
            &e,
            &response.reconstruction,
            ca_public.as_affine(),
        )?;
        let d = SecretScalar::new(*d).map_err(|_| EcqvError::ZeroPrivateKey)?;
        Ok(Credentials {
            key: KeyPair::from_secret(d),
            group_secret: self.group_secret.clone(),
            cert: cert.clone(),
        })
    }
}

impl fmt::Debug for PendingEnrollment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingEnrollment")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

/// A device's enrolled credentials: its key pair (d_i, Q_i), g_i and its certificate. Redacted in
/// `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub(super) key: KeyPair,
    pub(super) group_secret: SecretScalar,
    pub(super) cert: ImplicitCert,
}

impl Credentials {
    /// Reassembles stored credentials, checking that they belong together: the certificate opens
    /// to `key`'s public key under `ca_public`, and g_i·G is the certificate's G_i.
    ///
    /// # Errors
    /// [`EnrollError::WrongCa`], [`EnrollError::Ecqv`] (key mismatch) or
    /// [`EnrollError::ResponseMismatch`] (g_i mismatch).
    pub fn from_parts(
        key: KeyPair,
        group_secret: SecretScalar,
        cert: ImplicitCert,
        ca_public: &Point,
    ) -> Result<Self, EnrollError> {
        if cert.open(ca_public)? != key.verifying_key() {
            return Err(EnrollError::Ecqv(EcqvError::KeyMismatch));
        }
        if Point::mul_base(&group_secret) != cert.group_base {
            return Err(EnrollError::ResponseMismatch);
        }
        Ok(Credentials {
            key,
            group_secret,
            cert,
        })
    }

    /// The device's key pair (d_i, Q_i).
    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    /// g_i, the secret behind the certificate's G_i.
    pub fn group_secret(&self) -> &SecretScalar {
        &self.group_secret
    }

    /// The device's certificate.
    pub fn cert(&self) -> &ImplicitCert {
        &self.cert
    }

    /// The device ID.
    pub fn id(&self) -> &DeviceId {
        &self.cert.id
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("public", self.key.public())
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}
