//! Implicit certificates (PROTOCOL.md §3): the CA key id and the `cert` structure.

use super::*;
use crate::msm::mul_add_generator_vartime;

/// A CA key identifier: the first 8 bytes of H(pt(Q_CA)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CaKid(pub [u8; CA_KID_LEN]);

impl CaKid {
    /// The identifier of the CA whose public key is `ca_public`.
    pub fn of(ca_public: &Point) -> Self {
        let h = sha256(&[&ca_public.to_bytes()]);
        let mut kid = [0u8; CA_KID_LEN];
        kid.copy_from_slice(&h[..CA_KID_LEN]);
        CaKid(kid)
    }
}

/// An implicit certificate:
/// `u8 1 || u64 serial || str(id) || pt(C) || pt(G_i) || u64 not_before || u64 not_after ||
/// 8-byte ca_kid`. Built only by the CA's [`VerifiedRequest::issue`] or by decoding, so
/// not_before ≤ not_after always holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImplicitCert {
    pub(super) serial: u64,
    pub(super) id: DeviceId,
    pub(super) public_data: Point,
    pub(super) group_base: Point,
    pub(super) not_before: u64,
    pub(super) not_after: u64,
    pub(super) ca_kid: CaKid,
}

impl ImplicitCert {
    /// The CA-assigned serial number.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The certified device.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    /// C, the ECQV public reconstruction data.
    pub fn public_data(&self) -> &Point {
        &self.public_data
    }

    /// G_i = g_i·G, the device's group base point.
    pub fn group_base(&self) -> &Point {
        &self.group_base
    }

    /// Start of validity, Unix ms (inclusive).
    pub fn not_before(&self) -> u64 {
        self.not_before
    }

    /// End of validity, Unix ms (inclusive).
    pub fn not_after(&self) -> u64 {
        self.not_after
    }

    /// The issuing CA's key identifier.
    pub fn ca_kid(&self) -> CaKid {
        self.ca_kid
    }

    /// e = Hs("quva/v1/cert", cert).
    ///
    /// # Errors
    /// [`EcqvError::ZeroHash`] with probability 2⁻²⁵⁶.
    pub fn hash(&self) -> Result<Scalar, EcqvError> {
        ecqv::cert_hash(&self.to_bytes())
    }

    /// Opens the certificate into the device's public key Q_i = e·C + Q_CA.
    ///
    /// Every input is public (the certificate and the CA's public key), so this computes
    /// [`ecqv::open`]'s result in variable time, about twice as fast.
    ///
    /// # Errors
    /// [`EnrollError::WrongCa`] if the certificate names another CA, or an [`EnrollError::Ecqv`].
    pub fn open(&self, ca_public: &Point) -> Result<VerifyingKey, EnrollError> {
        if self.ca_kid != CaKid::of(ca_public) {
            return Err(EnrollError::WrongCa);
        }
        let e = self.hash()?;
        // e ≠ 0 (hash) and C ≠ identity (Point): the checks of ecqv::open that remain are Q's.
        let q = mul_add_generator_vartime(&Scalar::ZERO, &e, &self.public_data.to_projective())
            + ca_public.to_projective();
        Point::from_projective(&q)
            .map(VerifyingKey)
            .map_err(|_| EnrollError::Ecqv(EcqvError::IdentityPublicKey))
    }

    /// Whether `now_ms` lies in [not_before, not_after].
    pub fn is_valid_at(&self, now_ms: u64) -> bool {
        self.check_validity(now_ms).is_ok()
    }

    /// Checks that `now_ms` lies in [not_before, not_after].
    ///
    /// # Errors
    /// [`EnrollError::NotYetValid`] or [`EnrollError::Expired`].
    pub fn check_validity(&self, now_ms: u64) -> Result<(), EnrollError> {
        if now_ms < self.not_before {
            Err(EnrollError::NotYetValid)
        } else if now_ms > self.not_after {
            Err(EnrollError::Expired)
        } else {
            Ok(())
        }
    }
}

impl Encode for ImplicitCert {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u8(out, 1);
        put_u64(out, self.serial);
        self.id.encode(out);
        put_point(out, &self.public_data);
        put_point(out, &self.group_base);
        put_u64(out, self.not_before);
        put_u64(out, self.not_after);
        out.extend_from_slice(&self.ca_kid.0);
    }
}

impl Decode for ImplicitCert {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version("cert")?;
        let cert = ImplicitCert {
            serial: r.u64("cert serial")?,
            id: DeviceId::read(r, "cert id")?,
            public_data: r.point("cert C")?,
            group_base: r.point("cert G_i")?,
            not_before: r.u64("cert not_before")?,
            not_after: r.u64("cert not_after")?,
            ca_kid: CaKid(r.take_array("cert ca_kid")?),
        };
        if cert.not_before > cert.not_after {
            return Err(DecodeError::InvalidValue("cert validity"));
        }
        Ok(cert)
    }
}
