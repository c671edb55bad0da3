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
//! The decisions are [`notice_redundant`] and [`audit_expired`]; `compaction` applies them to a
//! bounded page of rows per sweep and stages the deletions, which the engine task syncs.

use std::collections::HashMap;

use quva_proto::v1::{AuditEntry, Notice, NoticeKind};

use crate::engine::config::Retention;

/// How long after its certificate's `not_after` a REVOKED notice is kept: one day, for bridges
/// whose clock lags the CA's.
pub const REVOKED_EXPIRY_MARGIN_MS: u64 = 24 * 3600 * 1000;

pub(crate) const DAY_MS: u64 = 24 * 3600 * 1000;

/// Sweeps between two passes over the notice log once a pass found it compact.
pub(crate) const PASS_EVERY_SWEEPS: u64 = 60;

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
    pub(crate) latest_rekey: HashMap<String, u64>,
    /// Where building `latest_rekey` continues; `None` once the whole log was read.
    pub(crate) building_from: Option<u64>,
    /// Where the current pass over the notice log continues; `None` between passes.
    pub(crate) pass_from: Option<u64>,
    /// Below this sequence number every notice was deleted: passes start here rather than
    /// stepping over the deleted rows again.
    pub(crate) notices_start: u64,
    /// Likewise for the audit log.
    pub(crate) audit_start: u64,
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

    /// Records one notice in the topic index.
    pub(crate) fn index(&mut self, n: &Notice) {
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

#[cfg(test)]
mod tests {
    use super::*;

    const G: &str = "plant/temp";

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
