//! Enrollment, renewal and the first use of a certificate (PROTOCOL.md §3 v1.1): verify the
//! request, issue with ECQV, supersede or revoke the other certificate, spend the secret.
//!
//! The rules of a device's certificates are in [`crate::enrollment`]; this module applies them
//! to the stored rows and stages the writes.

use quva_client::codec::{Decode, Encode};
use quva_client::enrollment::{
    CertConnectProof, EnrollRequest, ImplicitCert, RenewRequest, VerifiedRequest,
};
use quva_proto::v1::{Notice, NoticeKind};
use rand_core::CryptoRngCore;

use crate::audit_kind::AuditKind;
use crate::engine::audit::{Actor, entry};
use crate::engine::command::CertificateUse;
use crate::engine::config::{MAX_CERT_PROOF_LEN, MAX_CERT_REQUEST_LEN};
use crate::engine::core::CaCore;
use crate::engine::errors::{decode_err, enroll_err, is_internal};
use crate::engine::state::Tx;
use crate::engine::stats::bump;
use crate::enrollment::{self, CertUse};
use crate::error::CaError;
use crate::store::{CertRecord, DeviceRecord, DeviceState, NonceScope, Tables};
use quva_client::ids::DeviceId;

impl<T> CaCore<T> {
    pub(crate) fn enroll(
        &mut self,
        data: &[u8],
        renew: bool,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<u8>, CaError> {
        let kind = if renew {
            AuditKind::DeviceRenew
        } else {
            AuditKind::DeviceEnroll
        };
        if data.len() > MAX_CERT_REQUEST_LEN {
            return self.refuse(kind, "", "", CaError::TooLarge("request"), now);
        }
        let parsed = if renew {
            RenewRequest::from_bytes(data).map(|r| (r.request.id.clone(), Err(r)))
        } else {
            EnrollRequest::from_bytes(data).map(|r| (r.request.id.clone(), Ok(r)))
        };
        let (id, req) = match parsed {
            Ok(p) => p,
            Err(e) => return self.refuse(kind, "", "", decode_err(e), now),
        };
        match self.enroll_checked(&id, req, now, rng) {
            Err(e) if !is_internal(&e) => self.refuse(kind, id.as_str(), "", e, now),
            r => r,
        }
    }

    fn enroll_checked(
        &mut self,
        id: &DeviceId,
        req: Result<EnrollRequest, RenewRequest>,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<u8>, CaError> {
        let window = self.cfg.time_window_ms;
        let dev = self
            .store
            .device(id)?
            .ok_or(CaError::NotAuthorized("unknown device"))?;
        if dev.is_revoked() {
            return Err(CaError::NotAuthorized("revoked device"));
        }
        let mut first_use = None;
        let verified = match &req {
            Ok(enroll) => {
                let secret = enrollment::usable_secret(&dev, now, self.cfg.secret_validity_ms)
                    .map_err(|e| CaError::NotAuthorized(e.reason()))?;
                enroll.verify(&secret, now, window).map_err(enroll_err)?
            }
            Err(renew) => {
                let (serial, verified) = self.verify_renewal(&dev, renew, now)?;
                if enrollment::classify_use(&dev, serial) == Some(CertUse::First) {
                    first_use = Some(serial);
                }
                verified
            }
        };
        let nonce = verified.request().nonce;
        if self.nonce_seen(NonceScope::Certificate, &nonce, now)? {
            return Err(CaError::NotAuthorized("replayed nonce"));
        }
        self.issue(dev, &verified, req.is_err(), first_use, now, rng)
    }

    /// Checks a renewal against the device's live certificates, the unused one first (PROTOCOL.md
    /// §3: either key may sign a repeated renewal); returns the serial whose key signed it.
    fn verify_renewal(
        &self,
        dev: &DeviceRecord,
        renew: &RenewRequest,
        now: u64,
    ) -> Result<(u64, VerifiedRequest), CaError> {
        let mut refusal = CaError::NotAuthorized("no valid certificate");
        for serial in enrollment::live_serials(dev) {
            let Some(current) = self.store.cert(serial)?.filter(|c| c.revoked_ms == 0) else {
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

    fn issue(
        &mut self,
        mut dev: DeviceRecord,
        verified: &VerifiedRequest,
        renew: bool,
        first_use: Option<u64>,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<u8>, CaError> {
        let mut tx = self.begin(now);
        if let Some(used) = first_use {
            self.record_use(&mut tx, &mut dev, used, "renewal")?;
        }
        let serial = tx.serial();
        let not_after = now.saturating_add(self.cfg.cert_validity_ms);
        let resp = verified
            .issue(&self.ca, serial, now, not_after, rng)
            .map_err(|_| CaError::Crypto("certificate issue"))?;
        let q = resp
            .cert
            .open(self.ca.public())
            .map_err(|_| CaError::Crypto("certificate open"))?;
        let cert = CertRecord {
            serial,
            device_id: dev.id.clone(),
            cert: resp.cert.to_bytes(),
            public_key: q.0.to_bytes().to_vec(),
            share_point: resp.cert.group_base().to_bytes().to_vec(),
            not_before_ms: now,
            not_after_ms: not_after,
            revoked_ms: 0,
        };
        let mut detail = format!("serial {serial}");
        // The secret (and the certificate in use) stay until the new certificate's first use.
        if let Some(unused) = enrollment::record_issue(&mut dev, serial) {
            self.revoke_superseded(&mut tx, &dev.id, unused, serial)?;
            detail.push_str(&format!(", supersedes unused serial {unused}"));
        }
        dev.set_device_state(DeviceState::Enrolled);
        tx.batch.put_device(&dev)?;
        tx.batch.put_cert(&cert);
        tx.batch.put_nonce(
            NonceScope::Certificate,
            &verified.request().nonce,
            self.cfg.nonce_expiry(now),
        );
        let kind = if renew {
            AuditKind::DeviceRenew
        } else {
            AuditKind::DeviceEnroll
        };
        tx.audit(entry(kind, Actor::Bridge, &dev.id, "", "ok", detail));
        self.commit(tx)?;
        bump(if renew {
            &self.stats.renewals
        } else {
            &self.stats.enrollments
        });
        tracing::info!(device = %dev.id, serial, renew, "certificate issued");
        Ok(resp.to_bytes())
    }

    /// Records the first use of `dev`'s pending certificate `serial` in `tx`: it becomes the
    /// certificate in use, the previous one is revoked and the secret is spent (PROTOCOL.md §3).
    /// The caller writes `dev`.
    pub(crate) fn record_use(
        &self,
        tx: &mut Tx,
        dev: &mut DeviceRecord,
        serial: u64,
        via: &str,
    ) -> Result<(), CaError> {
        let used = enrollment::record_first_use(dev, serial);
        let mut detail = format!("serial {serial} by {via}");
        if let Some(previous) = used.revoked {
            self.revoke_superseded(tx, &dev.id, previous, serial)?;
            detail.push_str(&format!("; serial {previous} revoked"));
        }
        if used.secret_spent {
            detail.push_str("; enrollment secret spent");
        }
        tx.audit(entry(
            AuditKind::DeviceFirstUse,
            Actor::Bridge,
            &dev.id,
            "",
            "ok",
            detail,
        ));
        bump(&self.stats.first_uses);
        tracing::info!(device = %dev.id, serial, via, "certificate first used");
        Ok(())
    }

    /// Revokes certificate `serial` of `device`, superseded by `successor`, with a notice that
    /// tells bridges to refuse it (the device stays enrolled).
    fn revoke_superseded(
        &self,
        tx: &mut Tx,
        device: &str,
        serial: u64,
        successor: u64,
    ) -> Result<(), CaError> {
        let Some(mut cert) = self.store.cert(serial)? else {
            return Ok(());
        };
        if cert.revoked_ms != 0 {
            return Ok(());
        }
        cert.revoked_ms = tx.now;
        tx.batch.put_cert(&cert);
        tx.notice(Notice {
            kind: NoticeKind::Revoked as i32,
            serial,
            device_id: device.to_owned(),
            superseded_by: successor,
            ..Default::default()
        });
        Ok(())
    }

    pub(crate) fn confirm_use(&mut self, data: &[u8], now: u64) -> Result<CertificateUse, CaError> {
        const KIND: AuditKind = AuditKind::DeviceUse;
        if data.len() > MAX_CERT_PROOF_LEN {
            return self.refuse(KIND, "", "", CaError::TooLarge("proof"), now);
        }
        let proof = match CertConnectProof::from_bytes(data) {
            Ok(p) => p,
            Err(e) => return self.refuse(KIND, "", "", decode_err(e), now),
        };
        match self.confirm_checked(&proof, now) {
            Err(e) if !is_internal(&e) => self.refuse(KIND, proof.cert.id().as_str(), "", e, now),
            r => r,
        }
    }

    fn confirm_checked(
        &mut self,
        proof: &CertConnectProof,
        now: u64,
    ) -> Result<CertificateUse, CaError> {
        // The registration first, so that refusals under made-up IDs share one budget.
        let mut dev = self
            .store
            .device(proof.cert.id())?
            .ok_or(CaError::NotAuthorized("unknown device"))?;
        if dev.is_revoked() {
            return Err(CaError::NotAuthorized("revoked device"));
        }
        proof
            .verify(
                self.ca.public(),
                &proof.client_id,
                now,
                self.cfg.time_window_ms,
            )
            .map_err(enroll_err)?;
        let serial = proof.cert.serial();
        let issued = self
            .store
            .cert(serial)?
            .filter(|c| c.device_id == dev.id && c.cert == proof.cert.to_bytes())
            .ok_or(CaError::NotAuthorized("unknown certificate"))?;
        if issued.revoked_ms != 0 {
            return Err(CaError::NotAuthorized("revoked certificate"));
        }
        match enrollment::classify_use(&dev, serial) {
            None => Err(CaError::NotAuthorized("superseded certificate")),
            Some(CertUse::InUse) => Ok(CertificateUse {
                serial,
                first: false,
            }),
            Some(CertUse::First) => {
                let mut tx = self.begin(now);
                self.record_use(&mut tx, &mut dev, serial, "connection")?;
                tx.batch.put_device(&dev)?;
                self.commit(tx)?;
                Ok(CertificateUse {
                    serial,
                    first: true,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use quva_proto::v1::NoticeKind;

    use crate::audit_kind::AuditKind;
    use crate::engine::testkit::{Kit, audit, kinds, notices};
    use crate::error::CaError;
    use crate::store::{DeviceState, Tables};

    #[test]
    fn enrollment_issues_a_pending_certificate_and_keeps_the_secret() {
        let mut k = Kit::new();
        let secret = k.register("d1");
        let (creds, e) = k.enroll("d1", &secret);
        let creds = creds.unwrap();
        assert_eq!(creds.cert().serial(), 1);
        assert_eq!(kinds(&e), [AuditKind::DeviceEnroll]);
        assert_eq!(audit(&e, AuditKind::DeviceEnroll).detail, "serial 1");
        assert!(e.notices.is_empty());
        let dev = k.device("d1");
        assert_eq!(dev.device_state(), Some(DeviceState::Enrolled));
        assert_eq!((dev.pending_serial, dev.serial), (1, 0));
        assert!(!dev.enroll_secret.is_empty(), "spent only by a first use");
        let cert = k.store.cert(1).unwrap().unwrap();
        assert_eq!(cert.device_id, "d1");
        assert_eq!(cert.not_after_ms, k.now + k.core.cfg.cert_validity_ms);
        assert_eq!(k.core.meta().next_serial, 2);
        assert_eq!(
            k.stats
                .enrollments
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_retry_after_a_lost_reply_supersedes_the_unused_certificate() {
        let mut k = Kit::new();
        let secret = k.register("d1");
        // The reply of the first enrollment never reaches the device.
        let (_lost, _) = k.enroll("d1", &secret);
        let (second, e) = k.enroll("d1", &secret);
        let second = second.expect("the same secret works until a certificate is used");
        assert_eq!(second.cert().serial(), 2);
        assert!(k.cert_revoked(1));
        assert!(!k.cert_revoked(2));
        assert_eq!(notices(&e, NoticeKind::Revoked), 1);
        assert_eq!(e.notices[0].serial, 1);
        assert_eq!(e.notices[0].superseded_by, 2);
        assert_eq!(
            audit(&e, AuditKind::DeviceEnroll).detail,
            "serial 2, supersedes unused serial 1"
        );
        // The first use spends the secret: a third enrollment is refused.
        let (used, e) = k.connect(&second);
        assert!(used.unwrap().first);
        assert_eq!(kinds(&e), [AuditKind::DeviceFirstUse]);
        assert!(
            audit(&e, AuditKind::DeviceFirstUse)
                .detail
                .contains("enrollment secret spent")
        );
        assert!(k.device("d1").enroll_secret.is_empty());
        let (third, e) = k.enroll("d1", &secret);
        assert_eq!(
            third.unwrap_err(),
            CaError::NotAuthorized("no enrollment secret")
        );
        assert_eq!(
            audit(&e, AuditKind::DeviceEnroll).outcome,
            "no enrollment secret"
        );
        assert!(!k.cert_revoked(2));
    }

    #[test]
    fn a_replayed_enrollment_is_refused() {
        let mut k = Kit::new();
        let secret = k.register("d1");
        let (_, data) = k.enroll_request("d1", &secret);
        let t1 = k.ticket();
        let e = k.run(crate::engine::Command::Enroll(data.clone(), t1));
        assert!(crate::engine::testkit::cert_of(&e, t1).is_ok());
        let t2 = k.ticket();
        let e = k.run(crate::engine::Command::Enroll(data, t2));
        assert_eq!(
            crate::engine::testkit::cert_of(&e, t2).unwrap_err(),
            CaError::NotAuthorized("replayed nonce")
        );
        assert_eq!(k.core.meta().next_serial, 2);
    }

    #[test]
    fn the_first_use_of_a_renewed_certificate_revokes_the_previous_one() {
        let mut k = Kit::new();
        let first = k.enrolled("d1");
        assert!(k.connect(&first).0.unwrap().first);
        let (renewed, e) = k.renew(&first);
        let renewed = renewed.unwrap();
        assert_eq!(kinds(&e), [AuditKind::DeviceRenew]);
        assert_eq!(renewed.cert().serial(), 2);
        assert!(
            !k.cert_revoked(1),
            "the previous certificate works until the new one is used"
        );
        let dev = k.device("d1");
        assert_eq!((dev.serial, dev.pending_serial), (1, 2));
        let (used, e) = k.connect(&renewed);
        assert_eq!(
            used.unwrap(),
            crate::engine::CertificateUse {
                serial: 2,
                first: true
            }
        );
        assert_eq!(kinds(&e), [AuditKind::DeviceFirstUse]);
        assert_eq!(notices(&e, NoticeKind::Revoked), 1);
        assert_eq!(e.notices[0].serial, 1);
        assert!(k.cert_revoked(1));
        let (again, e) = k.connect(&first);
        assert_eq!(
            again.unwrap_err(),
            CaError::NotAuthorized("revoked certificate")
        );
        assert_eq!(
            audit(&e, AuditKind::DeviceUse).outcome,
            "revoked certificate"
        );
        assert!(!k.connect(&renewed).0.unwrap().first);
    }
}
