//! The sweep: certificate expiry, revocations and denials left over from a crash, periodic
//! rekeys, pruning of the replay cache, and a bounded step of log compaction (`compaction`).

use std::collections::BTreeSet;

use quva_client::rekey::Change;

use crate::engine::audit::RekeyReason;
use crate::engine::core::CaCore;
use crate::error::CaError;
use crate::store::{Batch, CaStore, Key, MemberRecord, Tables};
use quva_client::ids::GroupId;

impl<T> CaCore<T> {
    /// Runs the sweep at `now`; a failure is logged (the next sweep tries again).
    pub(crate) fn sweep(&mut self, now: u64) {
        if let Err(e) = self.sweep_checked(now) {
            tracing::error!(error = %e, "sweep failed");
        }
    }

    fn sweep_checked(&mut self, now: u64) -> Result<(), CaError> {
        let gids: Vec<GroupId> = self.groups.keys().cloned().collect();
        for gid in gids {
            let Some(live) = self.groups.get(&gid) else {
                continue;
            };
            if live.pending.is_some() {
                continue;
            }
            let mut leaves = Vec::new();
            let mut reasons = BTreeSet::new();
            let full = !live.checked;
            if full {
                // After a start: denials and revocations committed before a crash whose rekey
                // was not yet written. Later they stage their leaves themselves.
                for m in live.state.members() {
                    let pm = m.member();
                    let row = self.store.member(&gid, pm.role, &pm.id)?;
                    let cert = match &row {
                        Some(r) => self.store.cert(r.serial)?,
                        None => None,
                    };
                    let reason = match (&row, &cert) {
                        (None, _) => Some(RekeyReason::Deny),
                        (_, None) => Some(RekeyReason::Revoke),
                        (_, Some(c)) if c.revoked_ms != 0 => Some(RekeyReason::Revoke),
                        (_, Some(c)) if c.not_after_ms < now => Some(RekeyReason::Expiry),
                        _ => None,
                    };
                    if let Some(reason) = reason {
                        leaves.push((pm.role, pm.id.clone(), row));
                        reasons.insert(reason);
                    }
                }
            } else {
                for ((role, id), cert) in &live.joined {
                    if cert.not_after_ms < now {
                        let row = self.store.member(&gid, *role, id)?;
                        leaves.push((*role, id.clone(), row));
                        reasons.insert(RekeyReason::Expiry);
                    }
                }
            }
            let interval = live.settings.rekey_interval_secs.saturating_mul(1000);
            let periodic =
                interval > 0 && now >= live.state.rekeyed_at_ms().saturating_add(interval);
            if full {
                if let Some(l) = self.groups.get_mut(&gid) {
                    l.checked = true;
                }
            }
            if leaves.is_empty() && !periodic {
                continue;
            }
            if periodic {
                reasons.insert(RekeyReason::Periodic);
            }
            if let Some(p) = self.open_window(&gid, now) {
                for (role, id, row) in leaves {
                    p.changes.push(Change::Leave {
                        id: id.clone(),
                        role,
                    });
                    // Keep the permission, forget the expired share.
                    p.rows
                        .insert((role, id), row.as_ref().map(MemberRecord::left));
                }
                if periodic {
                    p.changes.push(Change::Periodic);
                }
                p.reasons.extend(reasons);
            }
        }
        self.sweeps += 1;
        if self.sweeps % 60 == 1 {
            self.prune_nonces(now)?;
        }
        self.compact(now)?;
        Ok(())
    }

    fn prune_nonces(&mut self, now: u64) -> Result<(), CaError> {
        let expired: Vec<Key> = self
            .store
            .nonces()?
            .into_iter()
            .filter(|(_, n)| n.expires_ms < now)
            .map(|(k, _)| k)
            .collect();
        if expired.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::new();
        for k in expired {
            batch.delete(k);
        }
        self.out.writes += batch.len();
        self.store.commit(batch)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use quva_client::ids::{DeviceId, GroupId, Role};

    use crate::audit_kind::AuditKind;
    use crate::engine::command::Command;
    use crate::engine::config::EngineConfig;
    use crate::engine::testkit::{Kit, WINDOW_MS, join_of, kinds};
    use crate::error::CaError;
    use crate::store::Tables;

    const G: &str = "plant/temp";
    const HOUR_MS: u64 = 3600 * 1000;

    #[test]
    fn an_expired_certificate_leaves_its_groups_in_the_sweep() {
        let mut k = Kit::with(EngineConfig {
            batch_window: std::time::Duration::from_millis(WINDOW_MS),
            cert_validity_ms: HOUR_MS,
            ..EngineConfig::default()
        });
        k.create_group(G, 0);
        let d1 = k.enrolled("d1");
        let d2 = k.enrolled("d2");
        k.joined(&d1, G, Role::Subscriber);
        k.joined(&d2, G, Role::Subscriber);
        // The first sweep after a start compares every member with the store: nothing to do.
        let e = k.run(Command::Sweep);
        assert_eq!(e.next_deadline_ms, None);
        // Renew d2 so that only d1 expires.
        k.now += HOUR_MS / 2;
        let (renewed, _) = k.renew(&d2);
        let renewed = renewed.unwrap();
        k.joined(&renewed, G, Role::Subscriber);
        let before = k.epoch(G);
        k.now = k
            .store
            .cert(d1.cert().serial())
            .unwrap()
            .unwrap()
            .not_after_ms;
        assert_eq!(
            k.run(Command::Sweep).next_deadline_ms,
            None,
            "expires after not_after"
        );
        k.now += 1;
        let e = k.run(Command::Sweep);
        assert_eq!(e.next_deadline_ms, Some(k.now + WINDOW_MS));
        let e = k.close_next();
        assert_eq!(kinds(&e), [AuditKind::GroupRekey]);
        assert_eq!(k.epoch(G), before + 1);
        let rec = k.epoch_record(G, before + 1);
        assert_eq!(rec.reason, "expiry");
        assert_eq!(rec.departed.len(), 1);
        assert_eq!(rec.departed[0].device, "d1");
        // The permission stays, the share is gone.
        let row = k
            .store
            .member(
                &GroupId::new(G).unwrap(),
                Role::Subscriber,
                &DeviceId::new("d1").unwrap(),
            )
            .unwrap()
            .unwrap();
        assert!(!row.joined());
        let (e, ticket) = k.join(&d1, G, Role::Subscriber);
        assert_eq!(
            join_of(&e, ticket).unwrap_err(),
            CaError::NotAuthorized("certificate not valid")
        );
        // Nothing more to expire.
        assert_eq!(k.run(Command::Sweep).next_deadline_ms, None);
    }

    #[test]
    fn the_sweep_rekeys_a_group_when_its_interval_has_passed() {
        let mut k = Kit::new();
        k.create_group(G, 60);
        let d1 = k.enrolled("d1");
        k.joined(&d1, G, Role::Subscriber);
        let joined_at = k.now;
        k.now = joined_at + 59_999;
        assert_eq!(k.run(Command::Sweep).next_deadline_ms, None);
        k.now = joined_at + 60_000;
        let e = k.run(Command::Sweep);
        assert!(e.next_deadline_ms.is_some());
        let e = k.close_next();
        assert_eq!(kinds(&e), [AuditKind::GroupRekey]);
        assert_eq!(k.epoch(G), 2);
        assert_eq!(k.epoch_record(G, 2).reason, "periodic");
        // The interval counts from the new epoch.
        k.now += 1000;
        assert_eq!(k.run(Command::Sweep).next_deadline_ms, None);
    }

    #[test]
    fn a_group_without_interval_is_not_rekeyed_by_the_sweep() {
        let mut k = Kit::new();
        k.create_group(G, 0);
        k.now += 10 * HOUR_MS;
        let e = k.run(Command::Sweep);
        assert_eq!(e.next_deadline_ms, None);
        assert_eq!(k.epoch(G), 0);
    }
}
