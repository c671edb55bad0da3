//! Batching windows (PROTOCOL.md §5): the changes of a group wait in its window until the
//! deadline, then one epoch is staged for all of them and written with its notices, member rows,
//! tree nodes, epoch record and audit entries; the waiting callers get their answers.
//!
//! Deadlines are in ms of the core's clock; the caller decides when to close windows.

use std::sync::atomic::Ordering;

use quva_client::codec::Encode;
use quva_client::group::Member;
use quva_client::ids::{GroupId, Role};
use quva_client::rekey::{Plan, RekeyError};
use quva_proto::v1::{Notice, NoticeKind};
use rand_core::CryptoRngCore;

use crate::audit_kind::AuditKind;
use crate::engine::audit::{Actor, entry, reasons_text};
use crate::engine::command::{JoinReply, Outcome};
use crate::engine::core::CaCore;
use crate::engine::errors::rekey_err;
use crate::engine::state::{JoinedCert, Live, Pending, Waiter};
use crate::engine::stats::bump;
use crate::error::CaError;
use crate::store::records::EpochMember;
use crate::store::{EpochRecord, NonceScope};

impl<T> CaCore<T> {
    /// The open window of `group`, opening one if needed.
    pub(crate) fn open_window(&mut self, group: &GroupId, now: u64) -> Option<&mut Pending<T>> {
        let deadline = now.saturating_add(self.cfg.batch_window_ms());
        let live = self.groups.get_mut(group)?;
        Some(live.pending.get_or_insert_with(|| Pending::new(deadline)))
    }

    /// Closes every window whose deadline is at or before `until`.
    pub(crate) fn close_due(&mut self, until: u64, now: u64, rng: &mut impl CryptoRngCore) {
        let due: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, l)| l.pending.as_ref().is_some_and(|p| p.deadline_ms <= until))
            .map(|(g, _)| g.clone())
            .collect();
        for g in due {
            self.flush(&g, now, rng);
        }
    }

    /// Closes every open window.
    pub(crate) fn close_all(&mut self, now: u64, rng: &mut impl CryptoRngCore) {
        let all: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, l)| l.pending.is_some())
            .map(|(g, _)| g.clone())
            .collect();
        for g in all {
            self.flush(&g, now, rng);
        }
    }

    /// Closes a group's window: stage, write, commit, answer.
    fn flush(&mut self, gid: &GroupId, now: u64, rng: &mut impl CryptoRngCore) {
        let Some(mut live) = self.groups.remove(gid) else {
            return;
        };
        let Some(p) = live.pending.take() else {
            self.groups.insert(gid.clone(), live);
            return;
        };
        for n in &p.nonces {
            self.pending_nonces.remove(n);
        }
        let result = self.apply(gid, &mut live, &p, now, rng);
        match result {
            Ok(epoch) => {
                for w in p.waiters {
                    match w {
                        Waiter::Join { member, ticket } => {
                            let r = live
                                .state
                                .delivery(&member, rng)
                                .map(|d| JoinReply {
                                    response: d.to_bytes(),
                                    epoch,
                                })
                                .map_err(|e| match e {
                                    // Joined and removed inside one window.
                                    RekeyError::NotAMember => {
                                        CaError::NotAuthorized("removed before the key was issued")
                                    }
                                    e => rekey_err(e),
                                });
                            if r.is_ok() {
                                bump(&self.stats.joins);
                            }
                            self.reply(ticket, Outcome::Join(r));
                        }
                        Waiter::Epoch(ticket) => self.reply(ticket, Outcome::Epoch(Ok(epoch))),
                    }
                }
            }
            Err(e) => {
                tracing::error!(group = %gid, error = %e, "rekey failed; changes dropped");
                for w in p.waiters {
                    match w {
                        Waiter::Join { ticket, .. } => {
                            self.reply(ticket, Outcome::Join(Err(e.clone())));
                        }
                        Waiter::Epoch(ticket) => self.reply(ticket, Outcome::Epoch(Err(e.clone()))),
                    }
                }
            }
        }
        self.groups.insert(gid.clone(), live);
    }

    fn apply(
        &mut self,
        gid: &GroupId,
        live: &mut Live<T>,
        p: &Pending<T>,
        now: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<u32, CaError> {
        // Writer time for the metrics only; no decision depends on it.
        let started = std::time::Instant::now();
        let mut tx = self.begin(now);
        let plan = live
            .state
            .stage(&self.ca, p.changes.iter().cloned(), now, rng)
            .map_err(rekey_err)?;
        let staged = match &plan {
            Plan::Rekey(staged) => Some(staged.as_ref()),
            Plan::Unchanged => None,
        };
        for ((role, id), row) in &p.rows {
            match row {
                Some(r) if r.joined() => {
                    // A joiner's new leaf, or the leaf it keeps (the same share again).
                    let leaf = staged
                        .and_then(|s| s.joined_leaf(*role, id))
                        .or_else(|| live.state.tree(*role).leaf_of(id))
                        .ok_or(CaError::Crypto("joined member without a leaf"))?;
                    let mut r = r.clone();
                    r.leaf = leaf;
                    tx.batch.put_member(gid, &r)?;
                }
                Some(r) => tx.batch.put_member(gid, r)?,
                None => tx.batch.delete_member(gid, *role, id),
            }
        }
        if let Some(staged) = staged {
            for role in [Role::Publisher, Role::Subscriber] {
                for (node, key) in staged.tree(role).node_changes() {
                    match key {
                        Some(k) => tx.batch.put_tree_node(gid, role, *node, k),
                        None => tx.batch.delete_tree_node(gid, role, *node),
                    }
                }
            }
        }
        let expiry = self.cfg.nonce_expiry(now);
        for n in &p.nonces {
            tx.batch.put_nonce(NonceScope::GroupKey, n, expiry);
        }
        for a in &p.audits {
            tx.audit(a.clone());
        }
        let Plan::Rekey(staged) = plan else {
            self.commit(tx)?;
            return Ok(live.state.epoch().0);
        };
        let epoch = staged.epoch().0;
        let reasons = reasons_text(&p.reasons);
        let mut rec = live.settings.clone();
        rec.epoch = epoch;
        rec.epoch_started_ms = now;
        rec.state = staged.state_record();
        tx.batch.put_group(&rec)?;
        for n in staged.notices() {
            tx.notice(Notice {
                kind: NoticeKind::Rekey as i32,
                group: gid.as_str().to_owned(),
                epoch,
                topic: n.topic.clone(),
                payload: n.payload(),
                ..Default::default()
            });
        }
        let last_seq = tx.notice(Notice {
            kind: NoticeKind::GroupUpdated as i32,
            group: gid.as_str().to_owned(),
            epoch,
            ..Default::default()
        });
        let listed = |m: &Member, serial: u64| EpochMember {
            device: m.id.as_str().to_owned(),
            role: u32::from(m.role.to_u8()),
            serial,
        };
        let joined_serial = |m: &Member| match p.rows.get(&(m.role, m.id.clone())) {
            Some(Some(r)) => r.serial,
            _ => 0,
        };
        let departed_serial = |m: &Member| {
            live.joined
                .get(&(m.role, m.id.clone()))
                .map_or(0, |c| c.serial)
        };
        tx.batch.put_epoch(
            gid,
            &EpochRecord {
                epoch,
                started_ms: now,
                signed_ginfo: staged.signed_info().to_bytes(),
                joined: staged
                    .joined()
                    .iter()
                    .map(|m| listed(m, joined_serial(m)))
                    .collect(),
                departed: staged
                    .departed()
                    .iter()
                    .map(|m| listed(m, departed_serial(m)))
                    .collect(),
                reason: reasons.clone(),
                last_notice_seq: last_seq,
            },
        );
        tx.audit(entry(
            AuditKind::GroupRekey,
            Actor::Ca,
            "",
            gid.as_str(),
            "ok",
            format!(
                "epoch {epoch} ({reasons}): {} joined, {} departed, {} notices",
                staged.joined().len(),
                staged.departed().len(),
                staged.notices().len()
            ),
        ));
        tx.meta.rekeys += 1;
        let mut joined_certs = Vec::new();
        for m in staged.joined() {
            joined_certs.push((
                (m.role, m.id.clone()),
                JoinedCert::of_serial(self.store.as_ref(), joined_serial(m))?,
            ));
        }
        self.commit(tx)?;
        for m in staged.departed() {
            live.joined.remove(&(m.role, m.id.clone()));
        }
        live.joined.extend(joined_certs);
        live.state.commit(*staged).map_err(rekey_err)?;
        live.settings.epoch = epoch;
        live.settings.epoch_started_ms = now;
        bump(&self.stats.rekeys);
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats.rekey_micros.fetch_add(micros, Ordering::Relaxed);
        tracing::info!(group = %gid, epoch, reasons = %reasons, "rekeyed");
        Ok(epoch)
    }
}

#[cfg(test)]
mod tests {
    use quva_client::ids::{GroupId, Role};
    use quva_proto::v1::NoticeKind;

    use crate::audit_kind::AuditKind;
    use crate::engine::command::Command;
    use crate::engine::testkit::{
        Kit, WINDOW_MS, answered, audit, epoch_of, join_of, kinds, notices,
    };
    use crate::error::CaError;

    const G: &str = "plant/temp";

    #[test]
    fn changes_inside_one_window_make_one_epoch() {
        let mut k = Kit::new();
        k.create_group(G, 0);
        let d1 = k.enrolled("d1");
        let d2 = k.enrolled("d2");
        k.permit(G, "d1", Role::Subscriber, true);
        k.permit(G, "d2", Role::Publisher, true);
        let opened = k.now;
        let (e, j1) = k.join(&d1, G, Role::Subscriber);
        assert_eq!(e.next_deadline_ms, Some(opened + WINDOW_MS));
        k.now += 50;
        let (e, j2) = k.join(&d2, G, Role::Publisher);
        // A later change does not move the deadline.
        assert_eq!(e.next_deadline_ms, Some(opened + WINDOW_MS));
        k.now += 50;
        let forced = k.ticket();
        k.run(Command::Rekey(GroupId::new(G).unwrap(), forced));
        assert_eq!(k.core.pending_changes(), 3);
        // Not due yet: nothing happens.
        k.now = opened + WINDOW_MS - 1;
        let e = k.close_due();
        assert!(e.replies.is_empty() && e.notices.is_empty() && e.audits.is_empty());
        assert_eq!(e.next_deadline_ms, Some(opened + WINDOW_MS));
        // Due: one epoch for all three changes.
        k.now = opened + WINDOW_MS;
        let e = k.close_due();
        assert_eq!(join_of(&e, j1).unwrap().epoch, 1);
        assert_eq!(join_of(&e, j2).unwrap().epoch, 1);
        assert_eq!(epoch_of(&e, forced), Ok(1));
        assert_eq!(k.epoch(G), 1);
        assert_eq!(notices(&e, NoticeKind::GroupUpdated), 1);
        assert_eq!(
            kinds(&e),
            [
                AuditKind::GroupJoin,
                AuditKind::GroupJoin,
                AuditKind::GroupRekeyRequest,
                AuditKind::GroupRekey
            ]
        );
        let rec = k.epoch_record(G, 1);
        assert_eq!(rec.reason, "forced,join");
        assert_eq!(rec.joined.len(), 2);
        assert_eq!(rec.started_ms, opened + WINDOW_MS);
        assert!(
            audit(&e, AuditKind::GroupRekey)
                .detail
                .starts_with("epoch 1 (forced,join): 2 joined, 0 departed")
        );
        assert_eq!(e.next_deadline_ms, None);
        assert_eq!(k.core.pending_changes(), 0);
    }

    #[test]
    fn a_deadline_passed_by_the_clock_closes_the_window_and_others_wait() {
        let mut k = Kit::new();
        k.create_group(G, 0);
        k.create_group("plant/other", 0);
        let a = k.ticket();
        k.run(Command::Rekey(GroupId::new(G).unwrap(), a));
        k.now += 150;
        let b = k.ticket();
        let e = k.run(Command::Rekey(GroupId::new("plant/other").unwrap(), b));
        assert_eq!(e.next_deadline_ms, Some(k.now - 150 + WINDOW_MS));
        // The task woke late, for the first deadline only.
        k.now += 100;
        let e = k.run(Command::CloseWindows { until_ms: 0 });
        assert_eq!(epoch_of(&e, a), Ok(1));
        assert!(!answered(&e, b));
        assert_eq!(e.next_deadline_ms, Some(k.now - 250 + 150 + WINDOW_MS));
        // A wake-up for a deadline the clock has not reached closes it too.
        let until = e.next_deadline_ms.unwrap();
        let e = k.run(Command::CloseWindows { until_ms: until });
        assert_eq!(epoch_of(&e, b), Ok(1));
        assert_eq!(e.next_deadline_ms, None);
    }

    #[test]
    fn a_forced_rekey_makes_a_new_epoch_and_an_unknown_group_is_refused() {
        let mut k = Kit::new();
        k.create_group(G, 0);
        let ticket = k.ticket();
        let e = k.run(Command::Rekey(GroupId::new(G).unwrap(), ticket));
        assert!(!answered(&e, ticket));
        let e = k.close_next();
        assert_eq!(epoch_of(&e, ticket), Ok(1));
        assert_eq!(
            kinds(&e),
            [AuditKind::GroupRekeyRequest, AuditKind::GroupRekey]
        );
        assert_eq!(k.epoch_record(G, 1).reason, "forced");
        assert_eq!(notices(&e, NoticeKind::GroupUpdated), 1);
        let ticket = k.ticket();
        let e = k.run(Command::Rekey(GroupId::new("plant/none").unwrap(), ticket));
        assert_eq!(epoch_of(&e, ticket), Err(CaError::NotFound("group")));
    }

    #[test]
    fn close_all_answers_every_waiter() {
        let mut k = Kit::new();
        k.create_group(G, 0);
        let ticket = k.ticket();
        k.run(Command::Rekey(GroupId::new(G).unwrap(), ticket));
        let e = k.run(Command::CloseAll);
        assert_eq!(epoch_of(&e, ticket), Ok(1));
    }
}
