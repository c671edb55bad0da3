//! The sans-IO CA core: every decision of the engine, driven by commands, a passed-in time and
//! RNG, with its writes staged for the caller to sync.

use std::collections::HashSet;
use std::sync::Arc;

use quva_client::curve::KeyPair;
use quva_proto::v1::{AuditEntry, Notice};
use rand_core::CryptoRngCore;

use crate::audit_kind::AuditKind;
use crate::engine::audit::{Actor, entry};
use crate::engine::command::{Command, Outcome};
use crate::engine::config::EngineConfig;
use crate::engine::issuer::{self, Issuer, Serials};
use crate::engine::load::{Groups, load};
use crate::engine::retention::{Compacted, Compactor};
use crate::engine::state::Tx;
use crate::engine::stats::{Stats, bump};
use crate::error::CaError;
use crate::refusals::{Decision, RefusalBudget, RefusalKey};
use crate::store::{CaStore, MetaRecord, NonceScope, Staged};

/// What one command did: the answers to send once the staged writes are durable, and what those
/// writes contain.
#[derive(Debug)]
pub struct Effects<T> {
    /// Answers by ticket, to send after the sync (a failed sync turns successes into its error).
    pub replies: Vec<(T, Outcome)>,
    /// Notices staged, with their sequence numbers.
    pub notices: Vec<Notice>,
    /// Audit entries staged, with their sequence numbers.
    pub audits: Vec<AuditEntry>,
    /// Store operations staged in [`CaCore::store`], to be synced in one batch.
    pub writes: usize,
    /// When the earliest open batching window closes, ms of the core's clock.
    pub next_deadline_ms: Option<u64>,
    /// Rows of the notice and audit logs whose deletion was staged (retention).
    pub compacted: Compacted,
}

impl<T> Default for Effects<T> {
    fn default() -> Effects<T> {
        Effects {
            replies: Vec::new(),
            notices: Vec::new(),
            audits: Vec::new(),
            writes: 0,
            next_deadline_ms: None,
            compacted: Compacted::default(),
        }
    }
}

/// The CA's state machine (PROTOCOL.md §3–§5). Feed it [`Command`]s with
/// [`CaCore::handle`]; it stages writes in its [`Staged`] store view, which the caller syncs
/// before sending the replies of the returned [`Effects`].
pub struct CaCore<T> {
    pub(crate) store: Arc<Staged>,
    pub(crate) ca: Arc<KeyPair>,
    /// Prepares certificates; its clones do the same off the writer.
    pub(crate) issuer: Issuer,
    pub(crate) cfg: EngineConfig,
    pub(crate) meta: MetaRecord,
    pub(crate) groups: Groups<T>,
    /// Nonces of group-key requests waiting in open windows (not yet in the store).
    pub(crate) pending_nonces: HashSet<[u8; 16]>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) sweeps: u64,
    /// How many refusals per device are written to the audit log.
    pub(crate) refusal_budget: RefusalBudget,
    /// Retention: where compaction of the notice log stands.
    pub(crate) compactor: Compactor,
    /// The effects of the command being handled.
    pub(crate) out: Effects<T>,
}

impl<T> CaCore<T> {
    /// Loads the state from `store` (dating a fresh store `now`).
    ///
    /// # Errors
    /// [`CaError::Store`] if the store cannot be read; [`CaError::Crypto`] if a stored group
    /// state does not verify under this CA key (wrong key or corrupt data).
    pub fn new(
        store: Arc<dyn CaStore>,
        ca: KeyPair,
        cfg: EngineConfig,
        stats: Arc<Stats>,
        now: u64,
    ) -> Result<CaCore<T>, CaError> {
        let (meta, groups) = load(store.as_ref(), &ca, now)?;
        let ca = Arc::new(ca);
        let serials = Arc::new(Serials::new(meta.next_serial));
        Ok(CaCore {
            store: Arc::new(Staged::new(store)),
            issuer: Issuer::new(ca.clone(), cfg, serials),
            ca,
            cfg,
            meta,
            groups,
            pending_nonces: HashSet::new(),
            stats,
            sweeps: 0,
            refusal_budget: RefusalBudget::default(),
            compactor: Compactor::new(),
            out: Effects::default(),
        })
    }

    /// The store view holding the staged writes; [`Staged::sync`] makes them durable.
    pub fn store(&self) -> &Arc<Staged> {
        &self.store
    }

    /// Prepares issuances with the core's key, settings and serials, off the writer.
    pub fn issuer(&self) -> &Issuer {
        &self.issuer
    }

    /// The counters as staged.
    pub fn meta(&self) -> &MetaRecord {
        &self.meta
    }

    /// The sequence number of the last staged notice (0 if none).
    pub fn last_notice_seq(&self) -> u64 {
        self.meta.next_notice_seq - 1
    }

    /// The committed epoch of `group`, if the core knows it.
    pub fn epoch(&self, group: &quva_client::ids::GroupId) -> Option<u32> {
        self.groups.get(group).map(|l| l.state.epoch().0)
    }

    /// When the earliest open batching window closes, ms of the core's clock.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.groups
            .values()
            .filter_map(|l| l.pending.as_ref().map(|p| p.deadline_ms))
            .min()
    }

    /// Number of changes waiting in open windows.
    pub fn pending_changes(&self) -> usize {
        self.groups
            .values()
            .filter_map(|l| l.pending.as_ref().map(|p| p.changes.len()))
            .sum()
    }

    /// Drops the staged writes' view of the state and reloads counters and group states from
    /// the underlying store, keeping open windows: after a failed sync nothing of the batch was
    /// written.
    ///
    /// # Errors
    /// As [`CaCore::new`].
    pub fn reload(&mut self, now: u64) -> Result<(), CaError> {
        let (meta, mut groups) = load(self.store.inner().as_ref(), &self.ca, now)?;
        for (gid, live) in &mut groups {
            if let Some(old) = self.groups.get_mut(gid) {
                live.pending = old.pending.take();
            }
        }
        // Serials taken before the failed sync stay taken: a caller may still hold one.
        self.issuer.serials().raise_to(meta.next_serial);
        self.meta = meta;
        self.groups = groups;
        // The topic index may name notices that were never written: read the log again.
        self.compactor = Compactor::new();
        Ok(())
    }

    /// Handles one command at `now` (Unix ms) with randomness from `rng`; returns its effects.
    pub fn handle(
        &mut self,
        cmd: Command<T>,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Effects<T> {
        match cmd {
            Command::Enroll(data, ticket) => {
                let r = self.enroll(&data, false, now, rng);
                self.reply(ticket, Outcome::Cert(r));
            }
            Command::Renew(data, ticket) => {
                let r = self.enroll(&data, true, now, rng);
                self.reply(ticket, Outcome::Cert(r));
            }
            Command::Issue(prepared, ticket) => {
                let r = self.issue(*prepared, now);
                self.reply(ticket, Outcome::Cert(r));
            }
            Command::ConfirmUse(data, ticket) => {
                let r = self.confirm_use(&data, now);
                self.reply(ticket, Outcome::Use(r));
            }
            Command::Join(data, ticket) => self.join(&data, ticket, now, rng),
            Command::Register {
                id,
                note,
                reissue,
                secret_validity_ms,
                ticket,
            } => {
                let r = self.register(&id, note, reissue, secret_validity_ms, now, rng);
                self.reply(ticket, Outcome::Registered(r));
            }
            Command::Revoke { id, reason, ticket } => {
                let r = self.revoke(&id, reason, now);
                self.reply(ticket, Outcome::Device(r));
            }
            Command::CreateGroup {
                id,
                privacy,
                interval_secs,
                ticket,
            } => {
                let r = self.create_group(&id, privacy, interval_secs, now, rng);
                self.reply(ticket, Outcome::Group(r));
            }
            Command::SetPermission {
                group,
                device,
                role,
                allow,
                ticket,
            } => self.set_permission(&group, &device, role, allow, ticket, now),
            Command::Rekey(group, ticket) => self.force_rekey(&group, ticket, now),
            Command::Audit(e) => {
                let mut tx = self.begin(now);
                tx.audit(e);
                if let Err(e) = self.commit(tx) {
                    tracing::error!(error = %e, "cannot write audit entry");
                }
            }
            Command::Sweep => self.sweep(now),
            Command::CloseWindows { until_ms } => self.close_due(until_ms.max(now), now, rng),
            Command::CloseAll => self.close_all(now, rng),
        }
        let mut out = std::mem::take(&mut self.out);
        out.next_deadline_ms = self.next_deadline_ms();
        out
    }

    /// Queues an answer.
    pub(crate) fn reply(&mut self, ticket: T, outcome: Outcome) {
        self.out.replies.push((ticket, outcome));
    }

    /// Starts a write at `now` over the current counters.
    pub(crate) fn begin(&self, now: u64) -> Tx {
        Tx::new(self.meta.clone(), now)
    }

    /// Stages `tx` for the next sync; later reads of the core see it at once.
    pub(crate) fn commit(&mut self, mut tx: Tx) -> Result<(), CaError> {
        tx.batch.put_meta(&tx.meta);
        let writes = tx.batch.len();
        self.store.commit(tx.batch)?;
        self.out.writes += writes;
        self.compactor.staged(&tx.notices);
        self.out.notices.append(&mut tx.notices);
        self.out.audits.append(&mut tx.audits);
        self.meta = tx.meta;
        Ok(())
    }

    /// Records a refused device-path request (best effort, within the device's budget of
    /// [`RefusalBudget`]) and returns the error.
    pub(crate) fn refuse<V>(
        &mut self,
        kind: AuditKind,
        device: &str,
        group: &str,
        e: CaError,
        now: u64,
    ) -> Result<V, CaError> {
        bump(&self.stats.refusals);
        let key = if device.is_empty() || e == CaError::NotAuthorized("unknown device") {
            RefusalKey::Unregistered
        } else {
            RefusalKey::Device(device)
        };
        let left_out = match self.refusal_budget.check(key, now) {
            Decision::Record { left_out } => left_out,
            Decision::LeaveOut => {
                bump(&self.stats.refusals_unrecorded);
                return Err(e);
            }
        };
        tracing::info!(
            kind = kind.as_str(),
            device,
            group,
            outcome = e.outcome(),
            left_out,
            "request refused"
        );
        let detail = if left_out > 0 {
            format!("{left_out} earlier refusals of this device not recorded")
        } else {
            String::new()
        };
        let mut tx = self.begin(now);
        tx.audit(entry(
            kind,
            Actor::Bridge,
            device,
            group,
            e.outcome(),
            detail,
        ));
        if let Err(ce) = self.commit(tx) {
            tracing::error!(error = %ce, "cannot write audit entry");
        }
        Err(e)
    }

    /// Whether `nonce` was seen within its lifetime (or waits in an open window).
    pub(crate) fn nonce_seen(
        &self,
        scope: NonceScope,
        nonce: &[u8; 16],
        now: u64,
    ) -> Result<bool, CaError> {
        if scope == NonceScope::GroupKey && self.pending_nonces.contains(nonce) {
            return Ok(true);
        }
        issuer::nonce_stored(self.store.as_ref(), scope, nonce, now)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use quva_client::ids::DeviceId;

    use crate::audit_kind::AuditKind;
    use crate::engine::command::Command;
    use crate::engine::testkit::{Kit, audit, cert_of, kinds};
    use crate::error::CaError;
    use crate::refusals::{DEFAULT_BURST, DEFAULT_REFILL_MS};
    use crate::store::Tables;

    #[test]
    fn refused_enrollments_are_recorded_at_a_bounded_rate_and_still_answered() {
        let mut k = Kit::new();
        let secret = k.register("d1");
        let wrong = quva_client::enrollment::EnrollmentSecret::from_bytes(&[9; 32]);
        let refuse = |k: &mut Kit| {
            let (r, e) = k.enroll("d1", &wrong);
            assert_eq!(
                r.unwrap_err(),
                CaError::NotAuthorized("bad proof of identity")
            );
            e
        };
        for _ in 0..DEFAULT_BURST {
            let e = refuse(&mut k);
            assert_eq!(kinds(&e), [AuditKind::DeviceEnroll]);
            assert_eq!(
                audit(&e, AuditKind::DeviceEnroll).outcome,
                "bad proof of identity"
            );
        }
        for _ in 0..3 {
            let e = refuse(&mut k);
            assert!(
                e.audits.is_empty(),
                "over the budget: answered, not recorded"
            );
            assert_eq!(e.writes, 0);
        }
        assert_eq!(
            k.stats.refusals.load(Ordering::Relaxed),
            u64::from(DEFAULT_BURST) + 3
        );
        assert_eq!(k.stats.refusals_unrecorded.load(Ordering::Relaxed), 3);
        k.now += DEFAULT_REFILL_MS;
        let e = refuse(&mut k);
        assert_eq!(
            audit(&e, AuditKind::DeviceEnroll).detail,
            "3 earlier refusals of this device not recorded"
        );
        // The real device is not locked out by the flood.
        let (creds, _) = k.enroll("d1", &secret);
        assert!(creds.is_ok());
    }

    #[test]
    fn malformed_and_unknown_requests_share_one_budget() {
        let mut k = Kit::new();
        let mut recorded = 0;
        for i in 0..(DEFAULT_BURST + 2) {
            let t = k.ticket();
            let e = if i % 2 == 0 {
                k.run(Command::Enroll(vec![1, 2, 3], t))
            } else {
                let secret = quva_client::enrollment::EnrollmentSecret::from_bytes(&[1; 32]);
                let (_, data) = k.enroll_request(&format!("ghost-{i}"), &secret);
                k.run(Command::Enroll(data, t))
            };
            assert!(cert_of(&e, t).is_err());
            recorded += e.audits.len();
        }
        assert_eq!(recorded, DEFAULT_BURST as usize);
        assert!(
            k.store
                .device(&DeviceId::new("ghost-1").unwrap())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_reload_after_a_failed_sync_drops_the_staged_state_and_keeps_open_windows() {
        use quva_client::ids::{GroupId, Role};

        let mut k = Kit::new();
        k.create_group("plant/temp", 0);
        let d1 = k.enrolled("d1");
        k.permit("plant/temp", "d1", Role::Subscriber, true);
        let serial = k.core.meta().next_serial;
        // A join opens a window; an enrollment is staged and then lost with its batch.
        let (_, waiting) = k.join(&d1, "plant/temp", Role::Subscriber);
        let secret = k.register("d2");
        let (_, data) = k.enroll_request("d2", &secret);
        let t = k.ticket();
        let e = k.core.handle(Command::Enroll(data, t), k.now, &mut k.rng);
        assert!(cert_of(&e, t).is_ok());
        assert_eq!(k.core.meta().next_serial, serial + 1);
        k.flaky.fail.store(true, Ordering::Relaxed);
        assert!(k.core.store().sync().is_err());
        k.flaky.fail.store(false, Ordering::Relaxed);
        k.core.reload(k.now).unwrap();
        assert_eq!(k.core.meta().next_serial, serial);
        assert!(k.store.cert(serial).unwrap().is_none());
        // The lost serial is a gap: a caller may still hold a serial taken before the failure.
        assert_eq!(k.core.issuer().serials().peek(), serial + 1);
        // The open window survives the reload and still answers its caller.
        let e = k.close_next();
        assert_eq!(
            crate::engine::testkit::join_of(&e, waiting).unwrap().epoch,
            1
        );
        assert_eq!(k.core.epoch(&GroupId::new("plant/temp").unwrap()), Some(1));
    }
}
