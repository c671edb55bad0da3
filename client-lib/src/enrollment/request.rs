//! Enrollment and renewal requests and the CA's response (PROTOCOL.md §3).

use super::*;

/// The one-time secret the owner's RegisterDevice issues, proving a first enrollment request.
/// Zeroized on drop, redacted in `Debug`, compared in constant time.
#[derive(Clone)]
pub struct EnrollmentSecret(Zeroizing<[u8; ENROLLMENT_SECRET_LEN]>);

impl EnrollmentSecret {
    /// A fresh random secret.
    pub fn random(rng: &mut impl CryptoRngCore) -> Self {
        let mut s = Zeroizing::new([0u8; ENROLLMENT_SECRET_LEN]);
        rng.fill_bytes(&mut s[..]);
        EnrollmentSecret(s)
    }

    /// Wraps stored secret bytes.
    pub fn from_bytes(bytes: &[u8; ENROLLMENT_SECRET_LEN]) -> Self {
        EnrollmentSecret(Zeroizing::new(*bytes))
    }

    /// The secret bytes, for storage or delivery to the device. Never log them.
    pub fn as_bytes(&self) -> &[u8; ENROLLMENT_SECRET_LEN] {
        &self.0
    }

    /// HMAC-SHA256(secret, "quva/v1/enroll" || req).
    fn mac(&self, req: &[u8]) -> [u8; MAC_LEN] {
        hmac_sha256(&self.0[..], &[ENROLL_MAC_PREFIX, req])
    }
}

impl fmt::Debug for EnrollmentSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnrollmentSecret(<redacted>)")
    }
}

impl ConstantTimeEq for EnrollmentSecret {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0[..].ct_eq(&other.0[..])
    }
}

impl PartialEq for EnrollmentSecret {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for EnrollmentSecret {}

/// A certificate request: `u8 1 || str(id) || pt(R_i) || pt(G_i) || u64 T_ms || 16-byte nonce`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertRequest {
    /// The device asking for a certificate.
    pub id: DeviceId,
    /// R_i = r_i·G.
    pub request_point: Point,
    /// G_i = g_i·G.
    pub group_base: Point,
    /// The device's clock at request time, Unix ms.
    pub t_ms: u64,
    /// A fresh random nonce; the CA refuses one it has seen.
    pub nonce: [u8; NONCE_LEN],
}

impl CertRequest {
    /// The CA's checks on the request's own fields: |T − now| within the window and R_i ≠ G_i
    /// (the points are valid by decoding).
    pub(super) fn check_fields(&self, now_ms: u64, window_ms: u64) -> Result<(), EnrollError> {
        check_window(self.t_ms, now_ms, window_ms)?;
        if self.request_point == self.group_base {
            return Err(EnrollError::RequestEqualsGroupBase);
        }
        Ok(())
    }
}

impl Encode for CertRequest {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u8(out, 1);
        self.id.encode(out);
        put_point(out, &self.request_point);
        put_point(out, &self.group_base);
        put_u64(out, self.t_ms);
        out.extend_from_slice(&self.nonce);
    }
}

impl Decode for CertRequest {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version("cert request")?;
        Ok(CertRequest {
            id: DeviceId::read(r, "request id")?,
            request_point: r.point("request R_i")?,
            group_base: r.point("request G_i")?,
            t_ms: r.u64("request T")?,
            nonce: r.take_array("request nonce")?,
        })
    }
}

/// `quva-enroll-v1` CONNECT data: `req || HMAC-SHA256(enroll_secret, "quva/v1/enroll" || req)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollRequest {
    /// The request; `request.id` names the registration whose secret verifies `mac`.
    pub request: CertRequest,
    /// The proof of identity.
    pub mac: [u8; MAC_LEN],
}

impl EnrollRequest {
    /// MACs `request` with the enrollment secret.
    pub fn new(request: CertRequest, secret: &EnrollmentSecret) -> Self {
        let mac = secret.mac(&request.to_bytes());
        EnrollRequest { request, mac }
    }

    /// CA: checks the HMAC under the registration's secret (constant time), the window and
    /// R_i ≠ G_i. The caller has checked that `request.id` is registered and must still check
    /// that the nonce is unseen.
    ///
    /// # Errors
    /// [`EnrollError::BadProof`], [`EnrollError::OutsideWindow`] or
    /// [`EnrollError::RequestEqualsGroupBase`].
    pub fn verify(
        &self,
        secret: &EnrollmentSecret,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<VerifiedRequest, EnrollError> {
        hmac_sha256_verify(
            &secret.as_bytes()[..],
            &[ENROLL_MAC_PREFIX, &self.request.to_bytes()],
            &self.mac,
        )
        .map_err(|_| EnrollError::BadProof)?;
        self.request.check_fields(now_ms, window_ms)?;
        Ok(VerifiedRequest {
            request: self.request.clone(),
        })
    }
}

impl Encode for EnrollRequest {
    fn encode(&self, out: &mut Vec<u8>) {
        self.request.encode(out);
        out.extend_from_slice(&self.mac);
    }
}

impl Decode for EnrollRequest {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(EnrollRequest {
            request: CertRequest::read(r)?,
            mac: r.take_array("enroll HMAC")?,
        })
    }
}

/// `quva-renew-v1` CONNECT data: `req || sign(d_i, "quva/v1/renew", req)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenewRequest {
    /// The request; `request.id` names the device whose current certificate verifies the signature.
    pub request: CertRequest,
    /// The signature under the current d_i.
    pub signature: Signature,
}

impl RenewRequest {
    /// Signs `request` with the current key d_i.
    ///
    /// # Errors
    /// [`EnrollError::Curve`] with probability 2⁻²⁵⁶.
    pub fn new(
        request: CertRequest,
        current: &KeyPair,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, EnrollError> {
        let signature = current.sign(RENEW_TAG, &request.to_bytes(), rng)?;
        Ok(RenewRequest { request, signature })
    }

    /// [`RenewRequest::new`] with the signature's 32 random bytes given, for test vectors.
    ///
    /// # Errors
    /// [`EnrollError::Curve`] with probability 2⁻²⁵⁶.
    pub fn new_with_entropy(
        request: CertRequest,
        current: &KeyPair,
        entropy: &[u8; 32],
    ) -> Result<Self, EnrollError> {
        let signature = current.sign_with_entropy(RENEW_TAG, &request.to_bytes(), entropy)?;
        Ok(RenewRequest { request, signature })
    }

    /// CA: checks the request against the device's current certificate: same device, issued by
    /// this CA, valid now, signature under its Q_i, then the window and R_i ≠ G_i. The caller has
    /// looked `current_cert` up by `request.id`, checked it is not revoked, and must still check
    /// that the nonce is unseen.
    ///
    /// # Errors
    /// [`EnrollError::IdentityMismatch`], [`EnrollError::WrongCa`], [`EnrollError::Expired`],
    /// [`EnrollError::NotYetValid`], [`EnrollError::BadProof`], [`EnrollError::OutsideWindow`] or
    /// [`EnrollError::RequestEqualsGroupBase`].
    pub fn verify(
        &self,
        current_cert: &ImplicitCert,
        ca_public: &Point,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<VerifiedRequest, EnrollError> {
        if current_cert.id() != &self.request.id {
            return Err(EnrollError::IdentityMismatch);
        }
        let q = current_cert.open(ca_public)?;
        current_cert.check_validity(now_ms)?;
        q.verify(RENEW_TAG, &self.request.to_bytes(), &self.signature)
            .map_err(|_| EnrollError::BadProof)?;
        self.request.check_fields(now_ms, window_ms)?;
        Ok(VerifiedRequest {
            request: self.request.clone(),
        })
    }
}

impl Encode for RenewRequest {
    fn encode(&self, out: &mut Vec<u8>) {
        self.request.encode(out);
        self.signature.encode(out);
    }
}

impl Decode for RenewRequest {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(RenewRequest {
            request: CertRequest::read(r)?,
            signature: Signature::read(r)?,
        })
    }
}

/// A request whose proof of identity, window and points the CA has checked: the only input its
/// [`issue`](VerifiedRequest::issue) accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedRequest {
    pub(super) request: CertRequest,
}

impl VerifiedRequest {
    /// The verified request (its nonce is for the caller's replay check).
    pub fn request(&self) -> &CertRequest {
        &self.request
    }

    /// CA: issues the certificate with a fresh random k: C = R_i + k·G, cert around C,
    /// e = Hs("quva/v1/cert", cert), a_i = e·k + d_CA.
    ///
    /// # Errors
    /// [`EnrollError::InvalidValidity`] if `not_before > not_after`; [`EnrollError::Ecqv`] if
    /// C is the identity or e is zero (negligible).
    pub fn issue(
        &self,
        ca: &KeyPair,
        serial: u64,
        not_before: u64,
        not_after: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<EnrollResponse, EnrollError> {
        let k = SecretScalar::random(rng);
        self.issue_with(ca, serial, not_before, not_after, &k)
    }

    /// CA: issues the certificate with the given k, for test vectors only. k must be fresh and
    /// secret: two certificates issued with one k reveal d_CA.
    ///
    /// # Errors
    /// As [`VerifiedRequest::issue`].
    #[cfg(feature = "hazmat")]
    pub fn dangerous_issue_with(
        &self,
        ca: &KeyPair,
        serial: u64,
        not_before: u64,
        not_after: u64,
        k: &SecretScalar,
    ) -> Result<EnrollResponse, EnrollError> {
        self.issue_with(ca, serial, not_before, not_after, k)
    }

    /// [`VerifiedRequest::issue`] with the given k, which must be fresh and secret.
    pub(crate) fn issue_with(
        &self,
        ca: &KeyPair,
        serial: u64,
        not_before: u64,
        not_after: u64,
        k: &SecretScalar,
    ) -> Result<EnrollResponse, EnrollError> {
        if not_before > not_after {
            return Err(EnrollError::InvalidValidity);
        }
        let ca_kid = CaKid::of(ca.public());
        let mut cert = None;
        let issued = ecqv::issue::<Secp256k1>(
            self.request.request_point.as_affine(),
            ca.secret().as_scalar(),
            k.as_scalar(),
            |c| {
                let built = ImplicitCert {
                    serial,
                    id: self.request.id.clone(),
                    public_data: to_point(c).ok()?,
                    group_base: self.request.group_base,
                    not_before,
                    not_after,
                    ca_kid,
                };
                let e = built.hash().ok();
                cert = Some(built);
                e
            },
        )?;
        // INVARIANT: ecqv::issue returned Ok, so the closure ran and stored the certificate.
        let cert = cert.ok_or(EnrollError::Ecqv(EcqvError::ZeroHash))?;
        Ok(EnrollResponse {
            cert,
            reconstruction: issued.reconstruction,
        })
    }
}

/// CONNACK data of an enrollment or renewal: `cert || sc(a_i)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollResponse {
    /// The new certificate.
    pub cert: ImplicitCert,
    /// a_i = e·k + d_CA, the private-key reconstruction value.
    pub reconstruction: Scalar,
}

impl Encode for EnrollResponse {
    fn encode(&self, out: &mut Vec<u8>) {
        self.cert.encode(out);
        put_scalar(out, &self.reconstruction);
    }
}

impl Decode for EnrollResponse {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(EnrollResponse {
            cert: ImplicitCert::read(r)?,
            reconstruction: r.scalar("response a_i")?,
        })
    }
}
