//! Membership (PROTOCOL.md §4, §5): group-key requests, the owner's permissions, device
//! revocation and forced rekeys. Each change that needs a new epoch goes into the group's
//! batching window.

use quva_client::codec::{Decode, Encode};
use quva_client::curve::Point;
use quva_client::group::{GroupKeyRequest, JoinedMember, MAX_PROPERTY_LEN, Member};
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_client::rekey::Change;
use quva_proto::v1::{AuditEntry, Notice, NoticeKind};
use rand_core::CryptoRngCore;

use crate::audit_kind::AuditKind;
use crate::engine::audit::{Actor, RekeyReason, entry};
use crate::engine::command::{JoinReply, Outcome};
use crate::engine::core::CaCore;
use crate::engine::errors::{decode_err, group_err, is_internal, rekey_err};
use crate::engine::state::Waiter;
use crate::engine::stats::bump;
use crate::enrollment::{self, CertUse};
use crate::error::CaError;
use crate::store::{DeviceRecord, DeviceState, MemberRecord, NonceScope, Tables};

impl<T> CaCore<T> {
    /// The member row of `device` in `role`, as the open window will leave it.
    pub(crate) fn member_row(
        &self,
        group: &GroupId,
        role: Role,
        device: &DeviceId,
    ) -> Result<Option<MemberRecord>, CaError> {
        if let Some(p) = self.groups.get(group).and_then(|l| l.pending.as_ref()) {
            if let Some(row) = p.rows.get(&(role, device.clone())) {
                return Ok(row.clone());
            }
        }
        Ok(self.store.member(group, role, device)?)
    }

    pub(crate) fn join(&mut self, data: &[u8], ticket: T, now: u64, rng: &mut impl CryptoRngCore) {
        const KIND: AuditKind = AuditKind::GroupJoin;
        if data.len() > MAX_PROPERTY_LEN {
            let r = self.refuse(KIND, "", "", CaError::TooLarge("request"), now);
            self.reply(ticket, Outcome::Join(r));
            return;
        }
        let req = match GroupKeyRequest::from_bytes(data) {
            Ok(r) => r,
            Err(e) => {
                let r = self.refuse(KIND, "", "", decode_err(e), now);
                self.reply(ticket, Outcome::Join(r));
                return;
            }
        };
        let (id, gid, role) = (req.id().clone(), req.group().clone(), req.role());
        match self.join_checked(&req, now, rng) {
            Ok(JoinStep::Ready(r)) => {
                bump(&self.stats.joins);
                self.reply(ticket, Outcome::Join(Ok(r)));
            }
            Ok(JoinStep::Stage {
                member,
                change,
                row,
                audit,
            }) => {
                let nonce = *req.nonce();
                self.pending_nonces.insert(nonce);
                let p = self.open_window(&gid, now);
                if let Some(p) = p {
                    p.changes.push(change);
                    p.rows.insert((role, id), Some(row));
                    p.nonces.push(nonce);
                    p.audits.push(audit);
                    p.reasons.insert(RekeyReason::Join);
                    p.waiters.push(Waiter::Join { member, ticket });
                }
            }
            Err(e) if is_internal(&e) => self.reply(ticket, Outcome::Join(Err(e))),
            Err(e) => {
                let r = self.refuse(KIND, id.as_str(), gid.as_str(), e, now);
                self.reply(ticket, Outcome::Join(r));
            }
        }
    }

    fn join_checked(
        &mut self,
        req: &GroupKeyRequest,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<JoinStep, CaError> {
        let (id, gid, role) = (req.id(), req.group(), req.role());
        let dev = self
            .store
            .device(id)?
            .ok_or(CaError::NotAuthorized("unknown device"))?;
        match dev.device_state() {
            Some(DeviceState::Enrolled) => {}
            Some(DeviceState::Revoked) => return Err(CaError::NotAuthorized("revoked device")),
            _ => return Err(CaError::NotAuthorized("not enrolled")),
        }
        if !self.groups.contains_key(gid) {
            return Err(CaError::NotAuthorized("unknown group"));
        }
        let row = self
            .member_row(gid, role, id)?
            .ok_or(CaError::NotAuthorized("role not allowed"))?;
        if self.nonce_seen(NonceScope::GroupKey, req.nonce(), now)? {
            return Err(CaError::NotAuthorized("replayed nonce"));
        }
        let (serial, member, joined) = self.open_join(&dev, req, now)?;
        if enrollment::classify_use(&dev, serial) == Some(CertUse::First) {
            let mut dev = dev.clone();
            let mut tx = self.begin(now);
            self.record_use(&mut tx, &mut dev, serial, "group-key request")?;
            tx.batch.put_device(&dev)?;
            self.commit(tx)?;
        }
        let audit = entry(
            AuditKind::GroupJoin,
            Actor::Bridge,
            id.as_str(),
            gid.as_str(),
            "ok",
            format!("{} serial {serial}", role.topic_segment()),
        );
        let Some(live) = self.groups.get(gid) else {
            return Err(CaError::NotAuthorized("unknown group"));
        };
        if live.pending.is_none() && live.state.member(id, role) == Some(&joined) {
            // Same share, nothing pending: the current keys, no rekey.
            let delivery = live.state.delivery(&member, rng).map_err(rekey_err)?;
            let epoch = live.state.epoch().0;
            let mut tx = self.begin(now);
            tx.batch.put_nonce(
                NonceScope::GroupKey,
                req.nonce(),
                self.cfg.nonce_expiry(now),
            );
            let mut audit = audit;
            audit.detail = format!("{}; already joined, epoch {epoch}", audit.detail);
            tx.audit(audit);
            self.commit(tx)?;
            return Ok(JoinStep::Ready(JoinReply {
                response: delivery.to_bytes(),
                epoch,
            }));
        }
        let mut row = row;
        row.serial = serial;
        row.joined_ms = now;
        row.share = joined.share().to_bytes().to_vec();
        Ok(JoinStep::Stage {
            member,
            change: Change::Join(joined),
            row,
            audit,
        })
    }

    /// Opens a group-key request with the device's live certificates, the unused one first;
    /// returns the serial whose key made it, the member and its share.
    fn open_join(
        &self,
        dev: &DeviceRecord,
        req: &GroupKeyRequest,
        now: u64,
    ) -> Result<(u64, Member, JoinedMember), CaError> {
        let mut refusal = CaError::NotAuthorized("not enrolled");
        for serial in enrollment::live_serials(dev) {
            let Some(cert) = self.store.cert(serial)? else {
                continue;
            };
            if cert.revoked_ms != 0 || cert.not_after_ms < now || cert.not_before_ms > now {
                refusal = CaError::NotAuthorized("certificate not valid");
                continue;
            }
            let member = Member {
                id: req.id().clone(),
                role: req.role(),
                q: Point::from_bytes(&cert.public_key).ok_or(CaError::Crypto("stored Q_i"))?,
                g: Point::from_bytes(&cert.share_point).ok_or(CaError::Crypto("stored G_i"))?,
            };
            match req.open(&self.ca, &member, now, self.cfg.time_window_ms) {
                Ok(joined) => return Ok((serial, member, joined)),
                Err(e) => refusal = group_err(e),
            }
        }
        Err(refusal)
    }

    pub(crate) fn revoke(
        &mut self,
        id: &DeviceId,
        reason: String,
        now: u64,
    ) -> Result<DeviceRecord, CaError> {
        let mut dev = self.store.device(id)?.ok_or(CaError::NotFound("device"))?;
        if dev.is_revoked() {
            return Err(CaError::FailedPrecondition("device is already revoked"));
        }
        dev.set_device_state(DeviceState::Revoked);
        dev.revoked_ms = now;
        dev.revoke_reason = reason.clone();
        zeroize::Zeroize::zeroize(&mut dev.enroll_secret);
        dev.enroll_secret = Vec::new();
        dev.secret_expires_ms = 0;
        dev.pending_serial = 0;
        let mut tx = self.begin(now);
        tx.batch.put_device(&dev)?;
        for mut cert in self.store.certs()? {
            if cert.device_id == dev.id && cert.revoked_ms == 0 {
                cert.revoked_ms = now;
                tx.batch.put_cert(&cert);
                tx.notice(Notice {
                    kind: NoticeKind::Revoked as i32,
                    serial: cert.serial,
                    device_id: dev.id.clone(),
                    ..Default::default()
                });
            }
        }
        tx.audit(entry(
            AuditKind::DeviceRevoke,
            Actor::Admin,
            id.as_str(),
            "",
            "ok",
            reason,
        ));
        self.commit(tx)?;
        tracing::info!(device = %id, "device revoked");
        // Leave every group in the next window; the sweep repeats this after a crash.
        let gids: Vec<GroupId> = self.groups.keys().cloned().collect();
        for gid in gids {
            let rows: Vec<MemberRecord> = self
                .store
                .members(&gid)?
                .into_iter()
                .filter(|m| m.device == dev.id)
                .collect();
            let in_state = self
                .groups
                .get(&gid)
                .is_some_and(|l| l.state.members().any(|m| &m.member().id == id));
            if rows.is_empty() && !in_state {
                continue;
            }
            if let Some(p) = self.open_window(&gid, now) {
                p.changes.push(Change::Remove(id.clone()));
                p.reasons.insert(RekeyReason::Revoke);
                for r in rows {
                    if let Some(role) = role_of(r.role) {
                        p.rows.insert((role, id.clone()), None);
                    }
                }
            }
        }
        Ok(dev)
    }

    pub(crate) fn set_permission(
        &mut self,
        gid: &GroupId,
        device: &DeviceId,
        role: Role,
        allow: bool,
        ticket: T,
        now: u64,
    ) {
        let r = self.set_permission_checked(gid, device, role, allow, now);
        match r {
            Ok(Some(epoch)) => self.reply(ticket, Outcome::Epoch(Ok(epoch))),
            Ok(None) => {
                let audit = entry(
                    AuditKind::GroupDeny,
                    Actor::Admin,
                    device.as_str(),
                    gid.as_str(),
                    "ok",
                    role.topic_segment().to_owned(),
                );
                if let Some(p) = self.open_window(gid, now) {
                    p.changes.push(Change::Leave {
                        id: device.clone(),
                        role,
                    });
                    p.rows.insert((role, device.clone()), None);
                    p.reasons.insert(RekeyReason::Deny);
                    p.audits.push(audit);
                    p.waiters.push(Waiter::Epoch(ticket));
                }
            }
            Err(e) => self.reply(ticket, Outcome::Epoch(Err(e))),
        }
    }

    /// `Some(epoch)` when done now, `None` when a leave must be staged.
    fn set_permission_checked(
        &mut self,
        gid: &GroupId,
        device: &DeviceId,
        role: Role,
        allow: bool,
        now: u64,
    ) -> Result<Option<u32>, CaError> {
        let Some(live) = self.groups.get(gid) else {
            return Err(CaError::NotFound("group"));
        };
        let epoch = live.state.epoch().0;
        let dev = self
            .store
            .device(device)?
            .ok_or(CaError::NotFound("device"))?;
        let row = self.member_row(gid, role, device)?;
        let staged_member = self
            .groups
            .get(gid)
            .is_some_and(|l| l.state.member(device, role).is_some() || l.pending.is_some());
        if allow {
            if dev.is_revoked() {
                return Err(CaError::FailedPrecondition("device is revoked"));
            }
            if row.is_some() {
                return Ok(Some(epoch));
            }
            let rec = MemberRecord::allowed(device.as_str(), u32::from(role.to_u8()), now);
            if staged_member {
                // A window is open: keep the rows in order with it.
                if let Some(p) = self.open_window(gid, now) {
                    p.rows.insert((role, device.clone()), Some(rec.clone()));
                }
            }
            let mut tx = self.begin(now);
            tx.batch.put_member(gid, &rec)?;
            tx.audit(entry(
                AuditKind::GroupAllow,
                Actor::Admin,
                device.as_str(),
                gid.as_str(),
                "ok",
                role.topic_segment().to_owned(),
            ));
            self.commit(tx)?;
            return Ok(Some(epoch));
        }
        if staged_member {
            return Ok(None);
        }
        let mut tx = self.begin(now);
        if row.is_some() {
            tx.batch.delete_member(gid, role, device);
        }
        tx.audit(entry(
            AuditKind::GroupDeny,
            Actor::Admin,
            device.as_str(),
            gid.as_str(),
            "ok",
            role.topic_segment().to_owned(),
        ));
        self.commit(tx)?;
        Ok(Some(epoch))
    }

    pub(crate) fn force_rekey(&mut self, gid: &GroupId, ticket: T, now: u64) {
        let audit = entry(
            AuditKind::GroupRekeyRequest,
            Actor::Admin,
            "",
            gid.as_str(),
            "ok",
            String::new(),
        );
        match self.open_window(gid, now) {
            Some(p) => {
                p.changes.push(Change::Periodic);
                p.reasons.insert(RekeyReason::Forced);
                p.audits.push(audit);
                p.waiters.push(Waiter::Epoch(ticket));
            }
            None => self.reply(ticket, Outcome::Epoch(Err(CaError::NotFound("group")))),
        }
    }
}

/// The role of a stored member row.
fn role_of(v: u32) -> Option<Role> {
    u8::try_from(v).ok().and_then(Role::from_u8)
}

/// The result of checking a group-key request.
// Lives for one request only.
#[allow(clippy::large_enum_variant)]
enum JoinStep {
    /// Answered now with the current keys.
    Ready(JoinReply),
    /// A join to stage in the group's window.
    Stage {
        member: Member,
        change: Change,
        row: MemberRecord,
        audit: AuditEntry,
    },
}

#[cfg(test)]
mod tests {
    use quva_client::ids::{DeviceId, GroupId, Role};
    use quva_proto::v1::NoticeKind;

    use crate::audit_kind::AuditKind;
    use crate::engine::command::{Command, Outcome};
    use crate::engine::testkit::{
        Kit, WINDOW_MS, answered, audit, epoch_of, join_of, kinds, notices, reply,
    };
    use crate::error::CaError;
    use crate::store::{DeviceState, Tables};

    const G: &str = "plant/temp";

    fn gid() -> GroupId {
        GroupId::new(G).unwrap()
    }

    #[test]
    fn a_join_is_answered_when_its_epoch_is_staged() {
        let mut k = Kit::new();
        k.create_group(G, 0);
        let creds = k.enrolled("d1");
        k.permit(G, "d1", Role::Subscriber, true);
        let (e, ticket) = k.join(&creds, G, Role::Subscriber);
        assert!(!answered(&e, ticket), "held until the window closes");
        assert_eq!(e.next_deadline_ms, Some(k.now + WINDOW_MS));
        // The request is the certificate's first use.
        assert_eq!(kinds(&e), [AuditKind::DeviceFirstUse]);
        let e = k.close_next();
        let r = join_of(&e, ticket).unwrap();
        assert_eq!(r.epoch, 1);
        let key = k.accept_key(&creds, G, Role::Subscriber, &r);
        assert_eq!(key.epoch().0, 1);
        assert_eq!(kinds(&e), [AuditKind::GroupJoin, AuditKind::GroupRekey]);
        assert_eq!(notices(&e, NoticeKind::GroupUpdated), 1);
        assert!(notices(&e, NoticeKind::Rekey) >= 1);
        assert_eq!(e.next_deadline_ms, None);
        let rec = k.epoch_record(G, 1);
        assert_eq!(rec.reason, "join");
        assert_eq!(rec.joined.len(), 1);
        assert_eq!(
            (rec.joined[0].device.as_str(), rec.joined[0].serial),
            ("d1", 1)
        );
        let row = k
            .store
            .member(&gid(), Role::Subscriber, &DeviceId::new("d1").unwrap())
            .unwrap()
            .unwrap();
        assert!(row.joined());
        assert_eq!(row.serial, 1);
        // The same share again: the current keys, no new epoch.
        let (e, ticket) = k.join(&creds, G, Role::Subscriber);
        assert_eq!(join_of(&e, ticket).unwrap().epoch, 1);
        assert!(
            audit(&e, AuditKind::GroupJoin)
                .detail
                .contains("already joined")
        );
        assert_eq!(e.next_deadline_ms, None);
    }

    #[test]
    fn a_join_without_permission_is_refused_and_recorded() {
        let mut k = Kit::new();
        k.create_group(G, 0);
        let creds = k.enrolled("d1");
        let (e, ticket) = k.join(&creds, G, Role::Publisher);
        assert_eq!(
            join_of(&e, ticket).unwrap_err(),
            CaError::NotAuthorized("role not allowed")
        );
        assert_eq!(audit(&e, AuditKind::GroupJoin).outcome, "role not allowed");
        assert_eq!(e.next_deadline_ms, None);
        assert_eq!(k.epoch(G), 0);
    }

    #[test]
    fn a_denial_of_a_member_removes_it_in_a_new_epoch() {
        let mut k = Kit::new();
        k.create_group(G, 0);
        let d1 = k.enrolled("d1");
        let d2 = k.enrolled("d2");
        assert_eq!(k.joined(&d1, G, Role::Subscriber), 1);
        assert_eq!(k.joined(&d2, G, Role::Subscriber), 2);
        let (e, ticket) = k.permit(G, "d1", Role::Subscriber, false);
        assert!(!answered(&e, ticket), "answered once the leave is staged");
        let e = k.close_next();
        assert_eq!(epoch_of(&e, ticket), Ok(3));
        assert_eq!(kinds(&e), [AuditKind::GroupDeny, AuditKind::GroupRekey]);
        let rec = k.epoch_record(G, 3);
        assert_eq!(rec.reason, "deny");
        assert_eq!(rec.departed.len(), 1);
        assert_eq!(
            (rec.departed[0].device.as_str(), rec.departed[0].serial),
            ("d1", 1)
        );
        assert!(
            k.store
                .member(&gid(), Role::Subscriber, &DeviceId::new("d1").unwrap())
                .unwrap()
                .is_none()
        );
        // The denied device is refused; the other keeps getting keys of the new epoch.
        let (e, ticket) = k.join(&d1, G, Role::Subscriber);
        assert_eq!(
            join_of(&e, ticket).unwrap_err(),
            CaError::NotAuthorized("role not allowed")
        );
        let (e, ticket) = k.join(&d2, G, Role::Subscriber);
        assert_eq!(join_of(&e, ticket).unwrap().epoch, 3);
    }

    #[test]
    fn denying_a_role_that_was_never_joined_needs_no_epoch() {
        let mut k = Kit::new();
        k.create_group(G, 0);
        k.register("d1");
        k.permit(G, "d1", Role::Publisher, true);
        let (e, ticket) = k.permit(G, "d1", Role::Publisher, false);
        assert_eq!(epoch_of(&e, ticket), Ok(0));
        assert_eq!(kinds(&e), [AuditKind::GroupDeny]);
        assert_eq!(e.next_deadline_ms, None);
    }

    #[test]
    fn a_revocation_revokes_the_certificates_and_rekeys_every_group_of_the_device() {
        let mut k = Kit::new();
        k.create_group(G, 0);
        k.create_group("plant/other", 0);
        let d1 = k.enrolled("d1");
        k.joined(&d1, G, Role::Subscriber);
        let ticket = k.ticket();
        let e = k.run(Command::Revoke {
            id: DeviceId::new("d1").unwrap(),
            reason: "stolen".into(),
            ticket,
        });
        let Outcome::Device(Ok(dev)) = reply(&e, ticket) else {
            panic!("revocation failed");
        };
        assert_eq!(dev.device_state(), Some(DeviceState::Revoked));
        assert!(dev.enroll_secret.is_empty());
        assert_eq!(kinds(&e), [AuditKind::DeviceRevoke]);
        assert_eq!(audit(&e, AuditKind::DeviceRevoke).detail, "stolen");
        assert_eq!(notices(&e, NoticeKind::Revoked), 1);
        assert!(k.cert_revoked(1));
        // Only the group it was a member of opens a window.
        assert_eq!(k.core.pending_changes(), 1);
        let e = k.close_next();
        assert_eq!(kinds(&e), [AuditKind::GroupRekey]);
        assert_eq!(k.epoch(G), 2);
        assert_eq!(k.epoch("plant/other"), 0);
        let rec = k.epoch_record(G, 2);
        assert_eq!(rec.reason, "revoke");
        assert_eq!(rec.departed.len(), 1);
        let (e, ticket) = k.join(&d1, G, Role::Subscriber);
        assert_eq!(
            join_of(&e, ticket).unwrap_err(),
            CaError::NotAuthorized("revoked device")
        );
        let ticket = k.ticket();
        let e = k.run(Command::Revoke {
            id: DeviceId::new("d1").unwrap(),
            reason: String::new(),
            ticket,
        });
        assert!(matches!(
            reply(&e, ticket),
            Outcome::Device(Err(CaError::FailedPrecondition(_)))
        ));
    }
}
