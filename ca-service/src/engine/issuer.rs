//! Issuance off the writer (PROTOCOL.md §3 v1.1): the curve work of a certificate is done by the
//! caller's task, in parallel with other callers, before the single writer sees the request.
//!
//! [`Issuer::prepare`] checks a request against the registration as stored (the secret or the
//! signing certificate, the window, an unseen nonce), takes the next serial from the shared
//! [`Serials`] and computes the certificate, the response and the device's public key. The writer
//! then re-checks only what can have changed since (the device row, the secret or the signing
//! certificate's state, the nonce, the serial) and stages the write; see
//! [`CaCore::issue`](crate::engine::CaCore). A request the precheck refuses goes to the writer as
//! it came: the writer prepares it itself and records the refusal.
//!
//! Serials are taken before the write, so a request the writer refuses, or one lost with a failed
//! sync, leaves a gap in the serial numbers. No serial is ever issued twice: [`Serials`] only
//! moves forward, and the writer refuses a serial the store already holds.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quva_client::codec::{Decode, Encode};
use quva_client::curve::KeyPair;
use quva_client::enrollment::{
    EnrollRequest, EnrollResponse, ImplicitCert, RenewRequest, VerifiedRequest,
};
use quva_client::ids::DeviceId;
use rand_core::CryptoRngCore;

use crate::audit_kind::AuditKind;
use crate::engine::config::{EngineConfig, MAX_CERT_REQUEST_LEN};
use crate::engine::errors::{decode_err, enroll_err};
use crate::enrollment;
use crate::error::CaError;
use crate::store::{CaStore, CertRecord, DeviceRecord, NonceScope, Tables};

/// The next certificate serial, shared by the writer and every caller that prepares an
/// issuance. It only moves forward.
#[derive(Debug)]
pub(crate) struct Serials(AtomicU64);

impl Serials {
    pub(crate) fn new(next: u64) -> Serials {
        Serials(AtomicU64::new(next))
    }

    /// Takes the next serial.
    pub(crate) fn take(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes sure no serial below `next` is taken again (after a reload from the store).
    pub(crate) fn raise_to(&self, next: u64) {
        self.0.fetch_max(next, Ordering::Relaxed);
    }

    /// The serial [`Serials::take`] returns next.
    #[cfg(test)]
    pub(crate) fn peek(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A decoded request for a certificate.
#[derive(Debug, Clone)]
pub(crate) enum CertAsk {
    /// Enrollment: `req || HMAC`.
    Enroll(EnrollRequest),
    /// Renewal: `req || sig`.
    Renew(RenewRequest),
}

impl CertAsk {
    /// Decodes `data` (at most [`MAX_CERT_REQUEST_LEN`] bytes) as an enrollment or a renewal.
    ///
    /// # Errors
    /// [`CaError::TooLarge`] or [`CaError::Malformed`].
    pub(crate) fn decode(data: &[u8], renew: bool) -> Result<CertAsk, CaError> {
        if data.len() > MAX_CERT_REQUEST_LEN {
            return Err(CaError::TooLarge("request"));
        }
        let ask = if renew {
            RenewRequest::from_bytes(data).map(CertAsk::Renew)
        } else {
            EnrollRequest::from_bytes(data).map(CertAsk::Enroll)
        };
        ask.map_err(decode_err)
    }

    /// The device asking.
    pub(crate) fn id(&self) -> &DeviceId {
        match self {
            CertAsk::Enroll(r) => &r.request.id,
            CertAsk::Renew(r) => &r.request.id,
        }
    }

    /// The audit kind of this request, or of `renew` when it did not decode.
    pub(crate) fn kind(renew: bool) -> AuditKind {
        if renew {
            AuditKind::DeviceRenew
        } else {
            AuditKind::DeviceEnroll
        }
    }

    pub(crate) fn is_renewal(&self) -> bool {
        matches!(self, CertAsk::Renew(_))
    }
}

/// A certificate computed for a checked request, waiting for the writer. Its reconstruction
/// value stays out of `Debug`.
pub struct Prepared {
    pub(crate) ask: CertAsk,
    pub(crate) verified: VerifiedRequest,
    /// Renewal: the serial of the certificate whose key signed the request.
    pub(crate) signer: Option<u64>,
    pub(crate) response: EnrollResponse,
    pub(crate) record: CertRecord,
}

impl Prepared {
    /// The serial the certificate carries.
    pub fn serial(&self) -> u64 {
        self.record.serial
    }
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("device", &self.record.device_id)
            .field("serial", &self.record.serial)
            .field("renewal", &self.ask.is_renewal())
            .finish_non_exhaustive()
    }
}

/// Prepares issuances: checks and curve work without a write. Cheap to clone.
#[derive(Clone)]
pub struct Issuer {
    ca: Arc<KeyPair>,
    cfg: EngineConfig,
    serials: Arc<Serials>,
}

impl Issuer {
    pub(crate) fn new(ca: Arc<KeyPair>, cfg: EngineConfig, serials: Arc<Serials>) -> Issuer {
        Issuer { ca, cfg, serials }
    }

    pub(crate) fn serials(&self) -> &Serials {
        &self.serials
    }

    /// Checks `ask` against `store` at `now`, takes a serial and computes the certificate valid
    /// from `now` with randomness from `rng`.
    ///
    /// # Errors
    /// [`CaError::NotAuthorized`] for an unknown or revoked device, a missing or expired
    /// secret, a bad proof, a stale timestamp or a nonce already seen; storage;
    /// [`CaError::Crypto`] (negligible).
    pub(crate) fn prepare(
        &self,
        store: &dyn CaStore,
        ask: CertAsk,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Prepared, CaError> {
        let dev = registered(store, ask.id())?;
        let window = self.cfg.time_window_ms;
        let (verified, signer) = match &ask {
            CertAsk::Enroll(enroll) => {
                let secret = enrollment::usable_secret(&dev, now, self.cfg.secret_validity_ms)
                    .map_err(|e| CaError::NotAuthorized(e.reason()))?;
                (
                    enroll.verify(&secret, now, window).map_err(enroll_err)?,
                    None,
                )
            }
            CertAsk::Renew(renew) => {
                let (serial, verified) = self.verify_renewal(store, &dev, renew, now)?;
                (verified, Some(serial))
            }
        };
        if nonce_stored(
            store,
            NonceScope::Certificate,
            &verified.request().nonce,
            now,
        )? {
            return Err(CaError::NotAuthorized("replayed nonce"));
        }
        let serial = self.serials.take();
        let not_after = now.saturating_add(self.cfg.cert_validity_ms);
        let response = verified
            .issue(&self.ca, serial, now, not_after, rng)
            .map_err(|_| CaError::Crypto("certificate issue"))?;
        let q = response
            .cert
            .open(self.ca.public())
            .map_err(|_| CaError::Crypto("certificate open"))?;
        let record = CertRecord {
            serial,
            device_id: dev.id.clone(),
            cert: response.cert.to_bytes(),
            public_key: q.0.to_bytes().to_vec(),
            share_point: response.cert.group_base().to_bytes().to_vec(),
            not_before_ms: now,
            not_after_ms: not_after,
            revoked_ms: 0,
        };
        Ok(Prepared {
            ask,
            verified,
            signer,
            response,
            record,
        })
    }

    /// Checks a renewal against the device's live certificates, the unused one first (PROTOCOL.md
    /// §3: either key may sign a repeated renewal); returns the serial whose key signed it.
    fn verify_renewal(
        &self,
        store: &dyn CaStore,
        dev: &DeviceRecord,
        renew: &RenewRequest,
        now: u64,
    ) -> Result<(u64, VerifiedRequest), CaError> {
        let mut refusal = CaError::NotAuthorized("no valid certificate");
        for serial in enrollment::live_serials(dev) {
            let Some(current) = unrevoked_cert(store, serial)? else {
                continue;
            };
            let cert = ImplicitCert::from_bytes(&current.cert)
                .map_err(|_| CaError::Crypto("stored certificate"))?;
            match renew.verify(&cert, self.ca.public(), now, self.cfg.time_window_ms) {
                Ok(v) => return Ok((serial, v)),
                Err(e) => refusal = enroll_err(e),
            }
        }
        Err(refusal)
    }
}

/// The registration of `id`, which must exist and not be revoked.
///
/// # Errors
/// [`CaError::NotAuthorized`] for an unknown or revoked device; storage.
pub(crate) fn registered(store: &dyn CaStore, id: &DeviceId) -> Result<DeviceRecord, CaError> {
    let dev = store
        .device(id)?
        .ok_or(CaError::NotAuthorized("unknown device"))?;
    if dev.is_revoked() {
        return Err(CaError::NotAuthorized("revoked device"));
    }
    Ok(dev)
}

/// Certificate `serial` if it is stored and not revoked.
pub(crate) fn unrevoked_cert(
    store: &dyn CaStore,
    serial: u64,
) -> Result<Option<CertRecord>, CaError> {
    Ok(store.cert(serial)?.filter(|c| c.revoked_ms == 0))
}

/// Whether `store` remembers `nonce` in `scope`, not expired at `now`.
pub(crate) fn nonce_stored(
    store: &dyn CaStore,
    scope: NonceScope,
    nonce: &[u8; 16],
    now: u64,
) -> Result<bool, CaError> {
    Ok(store
        .nonce(scope, nonce)?
        .is_some_and(|n| n.expires_ms >= now))
}
