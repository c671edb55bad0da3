//! Engine settings and the request size limits.

use std::time::Duration;

use crate::enrollment::DEFAULT_SECRET_VALIDITY_MS;

/// Largest accepted enrollment or renewal request (`req || proof`), bytes.
pub const MAX_CERT_REQUEST_LEN: usize = 512;

/// Largest accepted `quva-cert-v1` proof (a certificate, a client identifier of up to 65535
/// bytes and a signature), bytes.
pub const MAX_CERT_PROOF_LEN: usize = 512 + u16::MAX as usize;

/// Default of [`EngineConfig::max_group_commit`].
pub const DEFAULT_MAX_GROUP_COMMIT: usize = 1024;

/// Default of [`Retention::notice_epochs`].
pub const DEFAULT_NOTICE_EPOCHS: u32 = 16;

/// Default of [`Retention::audit_days`].
pub const DEFAULT_AUDIT_DAYS: u32 = 365;

/// Default of [`Retention::max_per_sweep`].
pub const DEFAULT_COMPACTION_PER_SWEEP: usize = 1024;

/// How long the notice log and the audit log keep what they no longer need
/// (docs/operations.md, "Retention").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// REKEY and GROUP_UPDATED notices of epochs older than the group's current epoch minus
    /// this many are compacted away, except the latest REKEY notice of each topic; 0 keeps
    /// every notice.
    pub notice_epochs: u32,
    /// Audit entries older than this many days are deleted; 0 keeps them forever.
    pub audit_days: u32,
    /// Most notices (and, separately, audit entries) one sweep reads for compaction, which also
    /// bounds its deletions, so that a large backlog does not stall the single writer.
    pub max_per_sweep: usize,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            notice_epochs: DEFAULT_NOTICE_EPOCHS,
            audit_days: DEFAULT_AUDIT_DAYS,
            max_per_sweep: DEFAULT_COMPACTION_PER_SWEEP,
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Changes inside this window coalesce into one epoch.
    pub batch_window: Duration,
    /// Allowed |T − now| of requests, ms.
    pub time_window_ms: u64,
    /// Lifetime of issued certificates, ms.
    pub cert_validity_ms: u64,
    /// Period of the expiry, revocation and periodic-rekey sweep.
    pub sweep_interval: Duration,
    /// Most commands whose writes share one synced batch (group commit); 1 syncs each alone.
    pub max_group_commit: usize,
    /// Default lifetime of an enrollment secret, ms (PROTOCOL.md §3: 7 days).
    pub secret_validity_ms: u64,
    /// Compaction of the notice and audit logs.
    pub retention: Retention,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            batch_window: Duration::from_millis(200),
            time_window_ms: 60_000,
            cert_validity_ms: 30 * 24 * 3600 * 1000,
            sweep_interval: Duration::from_secs(1),
            max_group_commit: DEFAULT_MAX_GROUP_COMMIT,
            secret_validity_ms: DEFAULT_SECRET_VALIDITY_MS,
            retention: Retention::default(),
        }
    }
}

impl EngineConfig {
    /// The batching window in ms of the core's clock.
    pub(crate) fn batch_window_ms(&self) -> u64 {
        u64::try_from(self.batch_window.as_millis()).unwrap_or(u64::MAX)
    }

    /// How long a used nonce is remembered after `now`: twice the time window, so that any
    /// request still inside its window is caught as a replay.
    pub(crate) fn nonce_expiry(&self, now: u64) -> u64 {
        now.saturating_add(self.time_window_ms.saturating_mul(2))
    }
}
