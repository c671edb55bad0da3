//! Counters for status and metrics, shared by the core, the task and the handle.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Certificates issued by enrollment.
    pub enrollments: AtomicU64,
    /// Certificates issued by renewal.
    pub renewals: AtomicU64,
    /// Enrollments and renewals whose certificate was computed off the writer.
    pub prepared_off_writer: AtomicU64,
    /// Group-key requests answered.
    pub joins: AtomicU64,
    /// Device-path requests refused.
    pub refusals: AtomicU64,
    /// Refusals over their device's budget, answered but not written to the audit log.
    pub refusals_unrecorded: AtomicU64,
    /// First uses of certificates (each spends a secret or revokes a previous certificate).
    pub first_uses: AtomicU64,
    /// Requests refused by the token check.
    pub auth_denied: AtomicU64,
    /// Epochs committed since start.
    pub rekeys: AtomicU64,
    /// Notices written since start.
    pub notices: AtomicU64,
    /// Notices deleted by retention since start.
    pub compacted_notices: AtomicU64,
    /// Audit entries deleted by retention since start.
    pub compacted_audits: AtomicU64,
    /// Changes waiting in open batching windows.
    pub pending_changes: AtomicU64,
    /// Synced commits since start.
    pub commits: AtomicU64,
    /// Failed commits since start.
    pub commit_failures: AtomicU64,
    /// Audit entries dropped because the engine queue was full.
    pub audit_dropped: AtomicU64,
    /// Writer time spent staging and writing epoch changes (not the disk sync), microseconds.
    pub rekey_micros: AtomicU64,
}

/// Adds one to a counter.
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
