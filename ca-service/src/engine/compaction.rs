//! Compaction: the sweep's bounded step that applies the retention decisions of `retention` to
//! the notice log and the audit log and stages the deletions for the engine task's next sync.

use quva_client::ids::GroupId;
use quva_proto::v1::{Notice, NoticeKind};

use crate::engine::core::CaCore;
use crate::engine::retention::{
    Compacted, NoticeFacts, PASS_EVERY_SWEEPS, audit_expired, notice_redundant,
};
use crate::error::CaError;
use crate::store::{Batch, CaStore, Key, Tables};

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

    use quva_client::ids::GroupId;
    use quva_proto::v1::Notice;

    use super::*;
    use crate::engine::command::Command;
    use crate::engine::config::EngineConfig;
    use crate::engine::config::Retention;
    use crate::engine::retention::{DAY_MS, REVOKED_EXPIRY_MARGIN_MS};
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
}
