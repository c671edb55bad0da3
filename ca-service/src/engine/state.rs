//! The core's in-memory state of each group, its open batching window, and the write being
//! assembled for one change.

use std::collections::{BTreeMap, BTreeSet};

use quva_client::group::Member;
use quva_client::ids::{DeviceId, Role};
use quva_client::rekey::{Change, GroupState};
use quva_proto::v1::{AuditEntry, Notice};

use crate::engine::audit::RekeyReason;
use crate::error::CaError;
use crate::store::{Batch, CaStore, GroupRecord, MemberRecord, MetaRecord, Tables};

/// A loaded group: its settings, its committed state and its open window.
pub(crate) struct Live<T> {
    /// The group row without the state bytes.
    pub settings: GroupRecord,
    /// The committed group state.
    pub state: GroupState,
    /// The open batching window, if any.
    pub pending: Option<Pending<T>>,
    /// Certificate serial and expiry of every joined member, so that neither an epoch record
    /// nor the expiry sweep reads the store once per member.
    pub joined: BTreeMap<(Role, DeviceId), JoinedCert>,
    /// Whether the sweep has compared every member with the store since the state was loaded.
    pub checked: bool,
}

/// The certificate a joined member's share belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct JoinedCert {
    pub serial: u64,
    pub not_after_ms: u64,
}

impl JoinedCert {
    /// The certificate `serial` as stored (expiry 0 if it is missing).
    pub fn of_serial(store: &dyn CaStore, serial: u64) -> Result<JoinedCert, CaError> {
        let not_after_ms = store.cert(serial)?.map_or(0, |c| c.not_after_ms);
        Ok(JoinedCert {
            serial,
            not_after_ms,
        })
    }
}

/// A waiting caller of an open window, by its ticket.
// A window holds a few waiters for a few hundred milliseconds; boxing the member would only add
// an allocation per join.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Waiter<T> {
    /// A group-key request: gets the member's delivery of the new epoch.
    Join { member: Member, ticket: T },
    /// A permission change or forced rekey: gets the new epoch.
    Epoch(T),
}

/// The changes of one group's open batching window.
pub(crate) struct Pending<T> {
    /// When the window closes, ms of the core's clock.
    pub deadline_ms: u64,
    pub changes: Vec<Change>,
    pub reasons: BTreeSet<RekeyReason>,
    /// Member rows to write with the epoch (`None`: delete), by role and device.
    pub rows: BTreeMap<(Role, DeviceId), Option<MemberRecord>>,
    /// Group-key request nonces to remember with the epoch.
    pub nonces: Vec<[u8; 16]>,
    pub audits: Vec<AuditEntry>,
    pub waiters: Vec<Waiter<T>>,
}

impl<T> Pending<T> {
    pub fn new(deadline_ms: u64) -> Pending<T> {
        Pending {
            deadline_ms,
            changes: Vec::new(),
            reasons: BTreeSet::new(),
            rows: BTreeMap::new(),
            nonces: Vec::new(),
            audits: Vec::new(),
            waiters: Vec::new(),
        }
    }
}

/// One atomic write being assembled, with the counters it advances.
pub(crate) struct Tx {
    pub batch: Batch,
    pub meta: MetaRecord,
    pub now: u64,
    pub notices: Vec<Notice>,
    pub audits: Vec<AuditEntry>,
}

impl Tx {
    pub fn new(meta: MetaRecord, now: u64) -> Tx {
        Tx {
            batch: Batch::new(),
            meta,
            now,
            notices: Vec::new(),
            audits: Vec::new(),
        }
    }

    /// Adds an audit entry with the next sequence number and this write's time.
    pub fn audit(&mut self, mut e: AuditEntry) {
        e.seq = self.meta.next_audit_seq;
        self.meta.next_audit_seq += 1;
        e.time_ms = self.now;
        self.batch.put_audit(&e);
        self.audits.push(e);
    }

    /// Adds a notice with the next sequence number; returns the number.
    pub fn notice(&mut self, mut n: Notice) -> u64 {
        n.seq = self.meta.next_notice_seq;
        self.meta.next_notice_seq += 1;
        n.created_ms = self.now;
        self.batch.put_notice(&n);
        let seq = n.seq;
        self.notices.push(n);
        seq
    }
}
