//! Enrollment, renewal and the first use of a certificate (PROTOCOL.md §3 v1.1): stage a
//! certificate the [`Issuer`](super::Issuer) prepared, supersede or revoke the other
//! certificate, spend the secret.
//!
//! The rules of a device's certificates are in [`crate::enrollment`]; this module applies them
//! to the stored rows and stages the writes.

use quva_client::codec::{Decode, Encode};
use quva_client::enrollment::CertConnectProof;
use quva_proto::v1::{Notice, NoticeKind};
use rand_core::CryptoRngCore;

use crate::audit_kind::AuditKind;
use crate::engine::audit::{Actor, entry};
use crate::engine::command::CertificateUse;
use crate::engine::config::MAX_CERT_PROOF_LEN;
use crate::engine::core::CaCore;
use crate::engine::errors::{decode_err, enroll_err, is_internal};
use crate::engine::issuer::{self, CertAsk, Prepared};
use crate::engine::state::Tx;
use crate::engine::stats::bump;
use crate::enrollment::{self, CertUse};
use crate::error::CaError;
use crate::store::{DeviceRecord, DeviceState, NonceScope, Tables};

impl<T> CaCore<T> {
    /// Enrollment or renewal prepared by the writer itself: a request the caller's precheck
    /// refused (checked again here, and the refusal recorded), or one from a caller that does no
    /// precheck.
    pub(crate) fn enroll(
        &mut self,
        data: &[u8],
        renew: bool,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<u8>, CaError> {
        let kind = CertAsk::kind(renew);
        let ask = match CertAsk::decode(data, renew) {
            Ok(ask) => ask,
            Err(e) => return self.refuse(kind, "", "", e, now),
        };
        let id = ask.id().clone();
        let issuer = self.issuer.clone();
        let staged = issuer
            .prepare(self.store.as_ref(), ask, now, rng)
            .and_then(|p| self.issue_checked(p, now));
        match staged {
            Err(e) if !is_internal(&e) => self.refuse(kind, id.as_str(), "", e, now),
            r => r,
        }
    }

    /// Enrollment or renewal prepared off the writer by [`Issuer::prepare`](super::Issuer).
    pub(crate) fn issue(&mut self, prepared: Prepared, now: u64) -> Result<Vec<u8>, CaError> {
        let kind = CertAsk::kind(prepared.ask.is_renewal());
        let id = prepared.record.device_id.clone();
        match self.issue_checked(prepared, now) {
            Err(e) if !is_internal(&e) => self.refuse(kind, &id, "", e, now),
            r => r,
        }
    }

    /// Re-checks what may have changed since `p` was prepared, then stages the certificate: the
    /// device row, a superseded certificate's revocation, the nonce, the audit entry.
    fn issue_checked(&mut self, p: Prepared, now: u64) -> Result<Vec<u8>, CaError> {
        let mut dev = issuer::registered(self.store.as_ref(), p.ask.id())?;
        let first_use = match (&p.ask, p.signer) {
            (CertAsk::Enroll(enroll), _) => {
                // The secret may have been re-issued or spent since: check the HMAC again.
                let secret = enrollment::usable_secret(&dev, now, self.cfg.secret_validity_ms)
                    .map_err(|e| CaError::NotAuthorized(e.reason()))?;
                enroll
                    .verify(&secret, now, self.cfg.time_window_ms)
                    .map_err(enroll_err)?;
                None
            }
            (CertAsk::Renew(_), Some(signer)) => {
                // The signature was checked when prepared; its certificate must still be live.
                let live = enrollment::live_serials(&dev).any(|s| s == signer)
                    && issuer::unrevoked_cert(self.store.as_ref(), signer)?.is_some();
                if !live {
                    return Err(CaError::NotAuthorized("no valid certificate"));
                }
                (enrollment::classify_use(&dev, signer) == Some(CertUse::First)).then_some(signer)
            }
            (CertAsk::Renew(_), None) => return Err(CaError::Crypto("renewal without signer")),
        };
        let nonce = p.verified.request().nonce;
        if self.nonce_seen(NonceScope::Certificate, &nonce, now)? {
            return Err(CaError::NotAuthorized("replayed nonce"));
        }
        let serial = p.record.serial;
        if self.store.cert(serial)?.is_some() {
            tracing::error!(serial, "a prepared certificate's serial is taken");
            return Err(CaError::Crypto("certificate serial taken"));
        }
        let renew = p.ask.is_renewal();
        let mut tx = self.begin(now);
        tx.meta.next_serial = tx.meta.next_serial.max(serial + 1);
        if let Some(used) = first_use {
            self.record_use(&mut tx, &mut dev, used, "renewal")?;
        }
        let mut detail = format!("serial {serial}");
        // The secret (and the certificate in use) stay until the new certificate's first use.
        if let Some(unused) = enrollment::record_issue(&mut dev, serial) {
            self.revoke_superseded(&mut tx, &dev.id, unused, serial)?;
            detail.push_str(&format!(", supersedes unused serial {unused}"));
        }
        dev.set_device_state(DeviceState::Enrolled);
        tx.batch.put_device(&dev)?;
        tx.batch.put_cert(&p.record);
        tx.batch
            .put_nonce(NonceScope::Certificate, &nonce, self.cfg.nonce_expiry(now));
        tx.audit(entry(
            CertAsk::kind(renew),
            Actor::Bridge,
            &dev.id,
            "",
            "ok",
            detail,
        ));
        self.commit(tx)?;
        bump(if renew {
            &self.stats.renewals
        } else {
            &self.stats.enrollments
        });
        tracing::info!(device = %dev.id, serial, renew, "certificate issued");
        Ok(p.response.to_bytes())
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
        let mut dev = issuer::registered(self.store.as_ref(), proof.cert.id())?;
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
    fn a_certificate_prepared_off_the_writer_is_staged_under_its_serial() {
        let mut k = Kit::new();
        let secret = k.register("d1");
        let (pending, data) = k.enroll_request("d1", &secret);
        let prepared = k.prepare(&data, false).unwrap();
        assert_eq!(prepared.serial(), 1);
        assert_eq!(k.core.issuer().serials().peek(), 2);
        assert!(k.store.cert(1).unwrap().is_none(), "nothing is written yet");
        let (bytes, e) = k.issue(prepared);
        let creds = k.accept_cert(&pending, &bytes.unwrap());
        assert_eq!(creds.cert().serial(), 1);
        assert_eq!(kinds(&e), [AuditKind::DeviceEnroll]);
        let stored = k.store.cert(1).unwrap().unwrap();
        assert_eq!(
            stored.cert,
            quva_client::codec::Encode::to_bytes(creds.cert())
        );
        assert_eq!(stored.public_key, creds.key().public().to_bytes());
        assert_eq!(k.device("d1").pending_serial, 1);
        assert_eq!(k.core.meta().next_serial, 2);
    }

    #[test]
    fn the_writer_refuses_a_prepared_enrollment_whose_secret_was_reissued() {
        let mut k = Kit::new();
        let secret = k.register("d1");
        let (_, data) = k.enroll_request("d1", &secret);
        let prepared = k.prepare(&data, false).unwrap();
        // The owner re-issues the secret while the certificate waits for the writer.
        let t = k.ticket();
        k.run(crate::engine::Command::Register {
            id: quva_client::ids::DeviceId::new("d1").unwrap(),
            note: String::new(),
            reissue: true,
            secret_validity_ms: 0,
            ticket: t,
        });
        let (r, e) = k.issue(prepared);
        assert_eq!(
            r.unwrap_err(),
            CaError::NotAuthorized("bad proof of identity")
        );
        assert_eq!(
            audit(&e, AuditKind::DeviceEnroll).outcome,
            "bad proof of identity"
        );
        assert!(k.store.cert(1).unwrap().is_none());
        assert_eq!(k.device("d1").pending_serial, 0);
    }

    #[test]
    fn the_writer_refuses_a_prepared_certificate_of_a_device_revoked_meanwhile() {
        let mut k = Kit::new();
        let secret = k.register("d1");
        let (_, data) = k.enroll_request("d1", &secret);
        let prepared = k.prepare(&data, false).unwrap();
        let t = k.ticket();
        k.run(crate::engine::Command::Revoke {
            id: quva_client::ids::DeviceId::new("d1").unwrap(),
            reason: "stolen".into(),
            ticket: t,
        });
        let (r, _) = k.issue(prepared);
        assert_eq!(r.unwrap_err(), CaError::NotAuthorized("revoked device"));
        assert!(k.store.cert(1).unwrap().is_none());
    }

    #[test]
    fn one_request_prepared_twice_is_issued_once_and_leaves_a_serial_gap() {
        let mut k = Kit::new();
        let secret = k.register("d1");
        let (_, data) = k.enroll_request("d1", &secret);
        // Both prechecks pass: neither has written the nonce yet.
        let first = k.prepare(&data, false).unwrap();
        let replay = k.prepare(&data, false).unwrap();
        assert_eq!((first.serial(), replay.serial()), (1, 2));
        assert!(k.issue(first).0.is_ok());
        let (r, e) = k.issue(replay);
        assert_eq!(r.unwrap_err(), CaError::NotAuthorized("replayed nonce"));
        assert_eq!(audit(&e, AuditKind::DeviceEnroll).outcome, "replayed nonce");
        assert!(k.store.cert(2).unwrap().is_none());
        // The next certificate takes serial 3: 2 is a gap, never issued.
        let (next, _) = k.enroll("d1", &secret);
        assert_eq!(next.unwrap().cert().serial(), 3);
        assert_eq!(k.core.meta().next_serial, 4);
    }

    #[test]
    fn the_writer_refuses_a_prepared_renewal_whose_signing_certificate_was_revoked() {
        let mut k = Kit::new();
        let first = k.enrolled("d1");
        assert!(k.connect(&first).0.unwrap().first);
        let (_, data) = quva_client::testkit::steps::renew_request(&first, k.now, &mut k.rng);
        let prepared = k.prepare(&data, true).unwrap();
        // Meanwhile another renewal is issued and used, which revokes the signing certificate.
        let (renewed, _) = k.renew(&first);
        assert!(k.connect(&renewed.unwrap()).0.unwrap().first);
        assert!(k.cert_revoked(1));
        let (r, e) = k.issue(prepared);
        assert_eq!(
            r.unwrap_err(),
            CaError::NotAuthorized("no valid certificate")
        );
        assert_eq!(
            audit(&e, AuditKind::DeviceRenew).outcome,
            "no valid certificate"
        );
    }

    #[test]
    fn a_prepared_certificate_whose_serial_is_taken_is_not_written() {
        let mut k = Kit::new();
        let secret = k.register("d1");
        let (_, data) = k.enroll_request("d1", &secret);
        let prepared = k.prepare(&data, false).unwrap();
        // A store changed behind the CA's back (a restored backup) already holds the serial.
        let mut b = crate::store::Batch::new();
        b.put_cert(&crate::store::CertRecord {
            serial: prepared.serial(),
            device_id: "other".into(),
            ..Default::default()
        });
        crate::store::CaStore::commit(k.store.as_ref(), b).unwrap();
        let (r, _) = k.issue(prepared);
        assert_eq!(r.unwrap_err(), CaError::Crypto("certificate serial taken"));
        assert_eq!(k.store.cert(1).unwrap().unwrap().device_id, "other");
        assert_eq!(k.device("d1").pending_serial, 0);
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
