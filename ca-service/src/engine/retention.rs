//! Retention: the sweep compacts the notice log to a sufficient summary and deletes old audit
//! entries (docs/operations.md, "Retention"; docs/protocol.md, the notice stream).
//!
//! The notice log is what a bridge replays from its start to rebuild the broker's retained
//! messages, its group data and its revocations. A notice is dropped only when a later kept
//! notice makes it redundant for such a replay:
//! - a REKEY or GROUP_UPDATED notice of an epoch older than the group's current epoch minus
//!   [`Retention::notice_epochs`](crate::engine::Retention::notice_epochs), except the latest
//!   REKEY notice of its topic (the broker holds that one retained, and a device that missed
//!   every later epoch of its subtree still needs it);
//! - a REVOKED notice once its certificate has expired, with a margin of
//!   [`REVOKED_EXPIRY_MARGIN_MS`] for bridges whose clock is behind the CA's: after that every
//!   bridge refuses the certificate on its own (`not_after`).
//!
//! Anything else (an unknown group, an unknown kind, a REVOKED notice whose certificate is not
//! found) is kept. Sequence numbers are never reused; compaction leaves gaps.
//!
//! The decisions are [`notice_redundant`] and [`audit_expired`]; the core applies them to a
//! bounded page of rows per sweep and stages the deletions, which the engine task syncs.

use std::collections::HashMap;

use quva_client::ids::GroupId;
use quva_proto::v1::{AuditEntry, Notice, NoticeKind};

use crate::engine::config::Retention;
use crate::engine::core::CaCore;
use crate::error::CaError;
use crate::store::{Batch, CaStore, Key, Tables};

/// How long after its certificate's `not_after` a REVOKED notice is kept: one day, for bridges
/// whose clock lags the CA's.
pub const REVOKED_EXPIRY_MARGIN_MS: u64 = 24 * 3600 * 1000;

const DAY_MS: u64 = 24 * 3600 * 1000;

/// Sweeps between two passes over the notice log once a pass found it compact.
const PASS_EVERY_SWEEPS: u64 = 60;

/// What the decision about one notice needs to know besides the notice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct NoticeFacts {
    /// The current epoch of the notice's group, if the group exists.
    pub current_epoch: Option<u32>,
    /// The sequence number of the latest REKEY notice on the notice's topic.
    pub latest_on_topic: Option<u64>,
    /// The `not_after_ms` of a REVOKED notice's certificate, if the certificate is stored.
    pub cert_not_after_ms: Option<u64>,
}

/// Whether a bridge replaying the kept log from its start no longer needs `n` at `now`.
pub(crate) fn notice_redundant(
    n: &Notice,
    facts: NoticeFacts,
    retention: &Retention,
    now: u64,
) -> bool {
    let old_epoch = || {
        retention.notice_epochs > 0
            && facts.current_epoch.is_some_and(|current| {
                u64::from(n.epoch) + u64::from(retention.notice_epochs) < u64::from(current)
            })
    };
    match NoticeKind::try_from(n.kind) {
        Ok(NoticeKind::GroupUpdated) => old_epoch(),
        Ok(NoticeKind::Rekey) => {
            old_epoch() && facts.latest_on_topic.is_some_and(|latest| latest > n.seq)
        }
        Ok(NoticeKind::Revoked) => {
            retention.notice_epochs > 0
                && facts
                    .cert_not_after_ms
                    .is_some_and(|t| t.saturating_add(REVOKED_EXPIRY_MARGIN_MS) < now)
        }
        _ => false,
    }
}

/// Whether audit entry `a` is older than the retention at `now`.
pub(crate) fn audit_expired(a: &AuditEntry, retention: &Retention, now: u64) -> bool {
    retention.audit_days > 0
        && a.time_ms < now.saturating_sub(u64::from(retention.audit_days).saturating_mul(DAY_MS))
}

/// The compaction's state between sweeps.
#[derive(Debug, Default)]
pub(crate) struct Compactor {
    /// The sequence number of the latest REKEY notice of each topic: built by reading the log
    /// once (in pages, after a start or a reload), then kept up to date as notices are staged.
    latest_rekey: HashMap<String, u64>,
    /// Where building `latest_rekey` continues; `None` once the whole log was read.
    building_from: Option<u64>,
    /// Where the current pass over the notice log continues; `None` between passes.
    pass_from: Option<u64>,
    /// Below this sequence number every notice was deleted: passes start here rather than
    /// stepping over the deleted rows again.
    notices_start: u64,
    /// Likewise for the audit log.
    audit_start: u64,
}

impl Compactor {
    /// A compactor that first reads the whole log.
    pub(crate) fn new() -> Compactor {
        Compactor {
            latest_rekey: HashMap::new(),
            building_from: Some(0),
            pass_from: None,
            notices_start: 0,
            audit_start: 0,
        }
    }

    /// Records staged notices in the topic index.
    pub(crate) fn staged(&mut self, notices: &[Notice]) {
        for n in notices {
            self.index(n);
        }
    }

    fn index(&mut self, n: &Notice) {
        if n.kind == NoticeKind::Rekey as i32 {
            let latest = self.latest_rekey.entry(n.topic.clone()).or_insert(n.seq);
            *latest = (*latest).max(n.seq);
        }
    }
}

/// What one sweep compacted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Notices deleted.
    pub notices: usize,
    /// Audit entries deleted.
    pub audits: usize,
}

impl<T> CaCore<T> {
    /// One bounded step of compaction at `now`: deletions are staged for the next sync.
    pub(crate) fn compact(&mut self, now: u64) -> Result<(), CaError> {
        let retention = self.cfg.retention;
        let page = retention.max_per_sweep.max(1);
        let mut batch = Batch::new();
        let mut done = Compacted::default();
        if retention.audit_days > 0 {
            for a in self.store.audit(self.compactor.audit_start, page)? {
                if !audit_expired(&a, &retention, now) {
                    break;
                }
                batch.delete(Key::audit(a.seq));
                self.compactor.audit_start = a.seq + 1;
                done.audits += 1;
            }
        }
        if retention.notice_epochs > 0 {
            done.notices = self.compact_notices(&mut batch, page, now)?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.out.writes += batch.len();
        self.store.commit(batch)?;
        self.out.compacted.notices += done.notices;
        self.out.compacted.audits += done.audits;
        tracing::info!(
            notices = done.notices,
            audit_entries = done.audits,
            "compacted the notice and audit logs"
        );
        Ok(())
    }

    fn compact_notices(
        &mut self,
        batch: &mut Batch,
        page: usize,
        now: u64,
    ) -> Result<usize, CaError> {
        if let Some(from) = self.compactor.building_from {
            let rows = self.store.notices(from, page)?;
            for n in &rows {
                self.compactor.index(n);
            }
            self.compactor.building_from = match rows.last() {
                Some(last) if rows.len() == page => Some(last.seq + 1),
                _ => None,
            };
            if self.compactor.building_from.is_none() {
                // The index is complete: a first pass at the next sweep.
                self.compactor.pass_from = Some(0);
            }
            return Ok(0);
        }
        let start = self.compactor.notices_start;
        let from = match self.compactor.pass_from {
            Some(from) => from.max(start),
            None if self.sweeps % PASS_EVERY_SWEEPS == 1 => start,
            None => return Ok(0),
        };
        let rows = self.store.notices(from, page)?;
        self.compactor.pass_from = match rows.last() {
            Some(last) if rows.len() == page => Some(last.seq + 1),
            _ => None,
        };
        let retention = self.cfg.retention;
        let mut dropped = 0;
        let mut leading = from == start;
        for n in &rows {
            let facts = self.facts(n)?;
            if notice_redundant(n, facts, &retention, now) {
                batch.delete(Key::notice(n.seq));
                dropped += 1;
                if leading {
                    self.compactor.notices_start = n.seq + 1;
                }
            } else {
                leading = false;
            }
        }
        if dropped > 0 && self.compactor.pass_from.is_none() {
            // Something was dropped: look again at the next sweep rather than in a minute.
            self.compactor.pass_from = Some(self.compactor.notices_start);
        }
        Ok(dropped)
    }

    fn facts(&self, n: &Notice) -> Result<NoticeFacts, CaError> {
        let current_epoch = GroupId::new(&n.group)
            .ok()
            .and_then(|g| self.groups.get(&g).map(|l| l.state.epoch().0));
        let latest_on_topic = self.compactor.latest_rekey.get(&n.topic).copied();
        let cert_not_after_ms = if n.kind == NoticeKind::Revoked as i32 {
            self.store.cert(n.serial)?.map(|c| c.not_after_ms)
        } else {
            None
        };
        Ok(NoticeFacts {
            current_epoch,
            latest_on_topic,
            cert_not_after_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use quva_client::ids::Role;
    use quva_proto::v1::NoticeKind;

    use super::*;
    use crate::engine::command::Command;
    use crate::engine::config::EngineConfig;
    use crate::engine::testkit::{Kit, T0, WINDOW_MS, epoch_of};

    const G: &str = "plant/temp";
    const H: &str = "plant/door";

    fn kit(notice_epochs: u32, audit_days: u32, max_per_sweep: usize) -> Kit {
        Kit::with(EngineConfig {
            batch_window: std::time::Duration::from_millis(WINDOW_MS),
            retention: Retention {
                notice_epochs,
                audit_days,
                max_per_sweep,
            },
            ..EngineConfig::default()
        })
    }

    fn rekey(k: &mut Kit, g: &str) -> u32 {
        let t = k.ticket();
        k.run(Command::Rekey(GroupId::new(g).unwrap(), t));
        let e = k.close_next();
        epoch_of(&e, t).unwrap()
    }

    /// Sweeps until a sweep compacts nothing more; returns the totals.
    fn sweep_until_compact(k: &mut Kit) -> Compacted {
        let mut total = Compacted::default();
        // A pass starts on the first sweep after a start and every minute of sweeps after one
        // that found nothing: run a minute's worth after the last change.
        let mut quiet = 0;
        while quiet <= PASS_EVERY_SWEEPS {
            let e = k.run(Command::Sweep);
            total.notices += e.compacted.notices;
            total.audits += e.compacted.audits;
            if e.compacted == Compacted::default() {
                quiet += 1;
            } else {
                quiet = 0;
            }
        }
        total
    }

    fn log(k: &Kit) -> Vec<Notice> {
        k.store.notices(0, 0).unwrap()
    }

    /// The latest REKEY notice of each topic in `log`.
    fn latest_per_topic(log: &[Notice]) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for n in log.iter().filter(|n| n.kind == NoticeKind::Rekey as i32) {
            m.insert(n.topic.clone(), n.seq);
        }
        m
    }

    /// Two groups, two members in one, a dozen epochs of the first group; its publisher leaves
    /// early, so the last REKEY notice of the publishers' topic is of an old epoch.
    fn busy_kit(notice_epochs: u32, max_per_sweep: usize) -> Kit {
        let mut k = kit(notice_epochs, 0, max_per_sweep);
        k.create_group(G, 0);
        k.create_group(H, 0);
        let d1 = k.enrolled("d1");
        let d2 = k.enrolled("d2");
        k.joined(&d1, G, Role::Subscriber);
        k.joined(&d2, G, Role::Publisher);
        k.joined(&d1, H, Role::Subscriber);
        k.permit(G, "d2", Role::Publisher, false);
        k.close_next();
        for _ in 0..9 {
            rekey(&mut k, G);
        }
        k
    }

    #[test]
    fn old_epochs_are_compacted_and_the_latest_notice_of_each_topic_stays() {
        let mut k = busy_kit(3, 1024);
        let before = log(&k);
        let current = k.epoch(G);
        assert_eq!(current, 12);
        let done = sweep_until_compact(&mut k);
        let after = log(&k);
        assert!(done.notices > 0);
        assert_eq!(before.len() - after.len(), done.notices);
        let kept: BTreeSet<u64> = after.iter().map(|n| n.seq).collect();
        // Every notice of the last three epochs (and the current) stays.
        for n in &before {
            if n.group == G && n.epoch + 3 >= current {
                assert!(
                    kept.contains(&n.seq),
                    "seq {} of epoch {} dropped",
                    n.seq,
                    n.epoch
                );
            }
        }
        // Nothing older stays but the latest REKEY notice of a topic.
        let latest = latest_per_topic(&before);
        for n in &after {
            if n.group == G && n.epoch + 3 < current {
                assert_eq!(n.kind, NoticeKind::Rekey as i32, "seq {} kept", n.seq);
                assert_eq!(latest.get(&n.topic), Some(&n.seq), "seq {} kept", n.seq);
            }
        }
        // The latest REKEY notice of every topic ever used stays, in both groups, also when it
        // is of an old epoch (the publishers' topic after the publisher left).
        let by_seq: BTreeMap<u64, &Notice> = before.iter().map(|n| (n.seq, n)).collect();
        assert!(
            latest
                .values()
                .any(|s| by_seq[s].group == G && by_seq[s].epoch + 3 < current),
            "a topic whose last notice is old: {latest:?}"
        );
        for (topic, seq) in &latest {
            assert!(kept.contains(seq), "latest notice of {topic} dropped");
        }
        assert_eq!(latest_per_topic(&after), latest);
        // The other group, at epoch 1, keeps everything.
        let h = |l: &[Notice]| l.iter().filter(|n| n.group == H).count();
        assert_eq!(h(&after), h(&before));
        assert!(h(&before) > 0);
        // Sequence numbers go on after the gaps.
        let last = before.last().unwrap().seq;
        let epoch = rekey(&mut k, G);
        assert_eq!(epoch, 13);
        assert_eq!(
            log(&k).last().unwrap().kind,
            NoticeKind::GroupUpdated as i32
        );
        assert!(log(&k).iter().all(|n| n.seq <= last || n.epoch == 13));
        assert!(log(&k).last().unwrap().seq > last);
    }

    #[test]
    fn zero_notice_epochs_keeps_every_notice() {
        let mut k = busy_kit(0, 1024);
        let before = log(&k);
        let done = sweep_until_compact(&mut k);
        assert_eq!(done.notices, 0);
        assert_eq!(log(&k), before);
    }

    #[test]
    fn each_sweep_deletes_at_most_its_bound() {
        let mut k = busy_kit(1, 4);
        let before = log(&k).len();
        let mut total = 0;
        let mut sweeps = 0;
        while sweeps < 10 * PASS_EVERY_SWEEPS {
            let e = k.run(Command::Sweep);
            assert!(
                e.compacted.notices <= 4,
                "{} in one sweep",
                e.compacted.notices
            );
            total += e.compacted.notices;
            sweeps += 1;
        }
        assert!(total > 4, "the backlog is worked off over several sweeps");
        assert_eq!(log(&k).len(), before - total);
        // The same result as an unbounded compaction.
        let mut unbounded = busy_kit(1, 1024);
        sweep_until_compact(&mut unbounded);
        let seqs = |l: Vec<Notice>| l.into_iter().map(|n| n.seq).collect::<Vec<_>>();
        assert_eq!(seqs(log(&k)), seqs(log(&unbounded)));
    }

    #[test]
    fn a_revocation_notice_stays_until_its_certificate_has_expired() {
        let hour = 3600 * 1000;
        let mut k = Kit::with(EngineConfig {
            batch_window: std::time::Duration::from_millis(WINDOW_MS),
            cert_validity_ms: hour,
            retention: Retention {
                notice_epochs: 1,
                audit_days: 0,
                max_per_sweep: 1024,
            },
            ..EngineConfig::default()
        });
        let d1 = k.enrolled("d1");
        let old = d1.cert().serial();
        // A renewal and its first use supersede the old certificate: a REVOKED notice.
        let (renewed, _) = k.renew(&d1);
        let (used, _) = k.connect(&renewed.unwrap());
        used.unwrap();
        let revoked = |k: &Kit| {
            log(k)
                .into_iter()
                .filter(|n| n.kind == NoticeKind::Revoked as i32 && n.serial == old)
                .count()
        };
        assert_eq!(revoked(&k), 1);
        let not_after = k.store.cert(old).unwrap().unwrap().not_after_ms;
        k.now = not_after + REVOKED_EXPIRY_MARGIN_MS;
        sweep_until_compact(&mut k);
        assert_eq!(revoked(&k), 1, "kept through the margin");
        k.now += 1;
        let done = sweep_until_compact(&mut k);
        assert_eq!(revoked(&k), 0, "dropped once expired");
        assert_eq!(done.notices, 1);
    }

    #[test]
    fn a_revocation_notice_stays_while_notices_are_kept_forever() {
        let mut k = kit(0, 0, 1024);
        let d1 = k.enrolled("d1");
        let (renewed, _) = k.renew(&d1);
        k.connect(&renewed.unwrap()).0.unwrap();
        k.now += 400 * DAY_MS;
        sweep_until_compact(&mut k);
        assert!(log(&k).iter().any(|n| n.kind == NoticeKind::Revoked as i32));
    }

    #[test]
    fn audit_entries_older_than_the_retention_are_deleted() {
        let mut k = kit(0, 2, 3);
        k.register("d1");
        k.register("d2");
        let old = k.store.audit(0, 0).unwrap().len();
        k.now += DAY_MS;
        k.register("d3");
        let all = k.store.audit(0, 0).unwrap().len();
        k.now += DAY_MS;
        let done = sweep_until_compact(&mut k);
        assert_eq!(done.audits, 0, "two days are kept");
        k.now += 1;
        let done = sweep_until_compact(&mut k);
        assert_eq!(done.audits, old);
        let left = k.store.audit(0, 0).unwrap();
        assert_eq!(left.len(), all - old);
        assert!(left.iter().all(|a| a.time_ms == T0 + DAY_MS));
    }

    #[test]
    fn zero_audit_days_keeps_the_audit_log() {
        let mut k = kit(0, 0, 1024);
        k.register("d1");
        let before = k.store.audit(0, 0).unwrap();
        k.now += 4000 * DAY_MS;
        let done = sweep_until_compact(&mut k);
        assert_eq!(done.audits, 0);
        assert_eq!(k.store.audit(0, 0).unwrap(), before);
    }

    #[test]
    fn the_decision_per_notice() {
        let r = Retention {
            notice_epochs: 2,
            audit_days: 1,
            max_per_sweep: 10,
        };
        let rekey = |seq, epoch| Notice {
            seq,
            kind: NoticeKind::Rekey as i32,
            group: G.into(),
            epoch,
            topic: "quva/k/plant/temp/1".into(),
            ..Default::default()
        };
        let facts = |current, latest| NoticeFacts {
            current_epoch: current,
            latest_on_topic: latest,
            cert_not_after_ms: None,
        };
        assert!(notice_redundant(
            &rekey(5, 2),
            facts(Some(5), Some(9)),
            &r,
            0
        ));
        assert!(
            !notice_redundant(&rekey(5, 3), facts(Some(5), Some(9)), &r, 0),
            "inside"
        );
        assert!(
            !notice_redundant(&rekey(9, 2), facts(Some(5), Some(9)), &r, 0),
            "latest"
        );
        assert!(
            !notice_redundant(&rekey(5, 2), facts(None, Some(9)), &r, 0),
            "no group"
        );
        assert!(
            !notice_redundant(&rekey(5, 2), facts(Some(5), None), &r, 0),
            "no index"
        );
        let unknown = Notice {
            kind: 99,
            ..rekey(5, 0)
        };
        assert!(!notice_redundant(&unknown, facts(Some(5), Some(9)), &r, 0));
        let revoked = Notice {
            seq: 3,
            kind: NoticeKind::Revoked as i32,
            serial: 4,
            ..Default::default()
        };
        assert!(
            !notice_redundant(&revoked, NoticeFacts::default(), &r, u64::MAX),
            "no cert"
        );
        let expired = NoticeFacts {
            cert_not_after_ms: Some(10),
            ..NoticeFacts::default()
        };
        assert!(!notice_redundant(
            &revoked,
            expired,
            &r,
            10 + REVOKED_EXPIRY_MARGIN_MS
        ));
        assert!(notice_redundant(
            &revoked,
            expired,
            &r,
            11 + REVOKED_EXPIRY_MARGIN_MS
        ));
        let a = AuditEntry {
            time_ms: 1000,
            ..Default::default()
        };
        assert!(!audit_expired(&a, &r, 1000 + DAY_MS));
        assert!(audit_expired(&a, &r, 1001 + DAY_MS));
    }
}
