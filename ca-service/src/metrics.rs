//! The CA's Prometheus metrics: the engine's [`Stats`] counters and the store's sequence numbers,
//! read at each scrape and encoded by prometheus-client (docs/operations.md lists each).
//!
//! The counters live in the engine as atomics; [`CaCollector`] reads them when `/metrics` is
//! scraped, so the engine knows nothing of Prometheus. Counter samples carry the `_total`
//! suffix (`quva_ca_rekeys_total`).
//!
//! # Usage
//! ```
//! use std::sync::Arc;
//! use quva_ca::engine::Stats;
//! use quva_ca::store::{CaStore, MemoryStore};
//! let stats = Arc::new(Stats::default());
//! let store: Arc<dyn CaStore> = Arc::new(MemoryStore::new());
//! let text = quva_daemon::metrics::render(&quva_ca::metrics::registry(stats, store));
//! assert!(text.contains("\nquva_ca_rekeys_total 0\n"));
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::engine::Stats;
use crate::store::{CaStore, Tables};

/// A registry holding the CA's metrics.
pub fn registry(stats: Arc<Stats>, store: Arc<dyn CaStore>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(CaCollector { stats, store }));
    registry
}

/// Reads the engine's counters and the store's metadata at each scrape.
pub struct CaCollector {
    stats: Arc<Stats>,
    store: Arc<dyn CaStore>,
}

impl std::fmt::Debug for CaCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaCollector")
    }
}

/// A counter (its sample gets `_total`) or a gauge.
enum Kind {
    Counter,
    Gauge,
}

impl Collector for CaCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        // A store that cannot be read reports zeros rather than failing the whole scrape.
        let meta = self.store.meta().unwrap_or_default();
        let rows: [(&str, Kind, &str, u64); 21] = [
            (
                "quva_ca_enrollments",
                Kind::Counter,
                "Certificates issued by enrollment since start.",
                g(&s.enrollments),
            ),
            (
                "quva_ca_renewals",
                Kind::Counter,
                "Certificates issued by renewal since start.",
                g(&s.renewals),
            ),
            (
                "quva_ca_certificates_prepared",
                Kind::Counter,
                "Enrollments and renewals whose certificate was computed off the writer since start.",
                g(&s.prepared_off_writer),
            ),
            (
                "quva_ca_group_key_deliveries",
                Kind::Counter,
                "Group-key requests answered with a key since start.",
                g(&s.joins),
            ),
            (
                "quva_ca_refusals",
                Kind::Counter,
                "Device-path requests refused since start.",
                g(&s.refusals),
            ),
            (
                "quva_ca_refusals_unrecorded",
                Kind::Counter,
                "Refusals over their device's audit budget, answered but not written to the audit log.",
                g(&s.refusals_unrecorded),
            ),
            (
                "quva_ca_first_uses",
                Kind::Counter,
                "First uses of certificates since start.",
                g(&s.first_uses),
            ),
            (
                "quva_ca_auth_denied",
                Kind::Counter,
                "Requests refused by the token check since start.",
                g(&s.auth_denied),
            ),
            (
                "quva_ca_rekeys",
                Kind::Counter,
                "Epochs committed since start.",
                g(&s.rekeys),
            ),
            (
                "quva_ca_notices",
                Kind::Counter,
                "Notices written since start.",
                g(&s.notices),
            ),
            (
                "quva_ca_compacted_notices",
                Kind::Counter,
                "Notices deleted by retention since start.",
                g(&s.compacted_notices),
            ),
            (
                "quva_ca_compacted_audit_entries",
                Kind::Counter,
                "Audit entries deleted by retention since start.",
                g(&s.compacted_audits),
            ),
            (
                "quva_ca_commits",
                Kind::Counter,
                "Synced storage commits since start.",
                g(&s.commits),
            ),
            (
                "quva_ca_commit_failures",
                Kind::Counter,
                "Failed storage commits since start.",
                g(&s.commit_failures),
            ),
            (
                "quva_ca_audit_dropped",
                Kind::Counter,
                "Audit entries dropped on a full engine queue.",
                g(&s.audit_dropped),
            ),
            (
                "quva_ca_pending_changes",
                Kind::Gauge,
                "Changes waiting in open batching windows.",
                g(&s.pending_changes),
            ),
            (
                "quva_ca_last_notice_seq",
                Kind::Gauge,
                "Sequence number of the last stored notice.",
                meta.next_notice_seq.saturating_sub(1),
            ),
            (
                "quva_ca_last_audit_seq",
                Kind::Gauge,
                "Sequence number of the last audit entry.",
                meta.next_audit_seq.saturating_sub(1),
            ),
            (
                "quva_ca_next_serial",
                Kind::Gauge,
                "Serial the next certificate will get.",
                meta.next_serial.max(1),
            ),
            (
                "quva_ca_epochs",
                Kind::Counter,
                "Epochs committed over the store's lifetime.",
                meta.rekeys,
            ),
            (
                "quva_ca_rekey_writer_microseconds",
                Kind::Counter,
                "Writer time spent staging and writing epochs since start, without the disk sync.",
                g(&s.rekey_micros),
            ),
        ];
        for (name, kind, help, value) in rows {
            match kind {
                Kind::Counter => {
                    let m = ConstCounter::new(value);
                    m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)?;
                }
                Kind::Gauge => {
                    let m = ConstGauge::new(value);
                    m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    /// The sample lines `name value`, by name.
    fn samples(text: &str) -> std::collections::BTreeMap<String, String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(' '))
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect()
    }

    #[test]
    fn names_and_values_are_those_operators_scrape() {
        let stats = Arc::new(Stats::default());
        stats.rekeys.store(3, Ordering::Relaxed);
        stats.pending_changes.store(2, Ordering::Relaxed);
        stats.rekey_micros.store(1234, Ordering::Relaxed);
        let store: Arc<dyn CaStore> = Arc::new(MemoryStore::new());
        let text = quva_daemon::metrics::render(&registry(stats, store));
        let s = samples(&text);
        // docs/operations.md's table, in order.
        let expected = [
            ("quva_ca_enrollments_total", "0"),
            ("quva_ca_renewals_total", "0"),
            ("quva_ca_certificates_prepared_total", "0"),
            ("quva_ca_group_key_deliveries_total", "0"),
            ("quva_ca_refusals_total", "0"),
            ("quva_ca_refusals_unrecorded_total", "0"),
            ("quva_ca_first_uses_total", "0"),
            ("quva_ca_auth_denied_total", "0"),
            ("quva_ca_rekeys_total", "3"),
            ("quva_ca_notices_total", "0"),
            ("quva_ca_compacted_notices_total", "0"),
            ("quva_ca_compacted_audit_entries_total", "0"),
            ("quva_ca_commits_total", "0"),
            ("quva_ca_commit_failures_total", "0"),
            ("quva_ca_audit_dropped_total", "0"),
            ("quva_ca_pending_changes", "2"),
            ("quva_ca_last_notice_seq", "0"),
            ("quva_ca_last_audit_seq", "0"),
            ("quva_ca_next_serial", "1"),
            ("quva_ca_epochs_total", "0"),
            ("quva_ca_rekey_writer_microseconds_total", "1234"),
        ];
        for (name, value) in expected {
            assert_eq!(
                s.get(name).map(String::as_str),
                Some(value),
                "{name} in {text}"
            );
        }
        assert_eq!(s.len(), expected.len(), "{text}");
        assert!(text.contains("# TYPE quva_ca_rekeys counter\n"), "{text}");
        assert!(
            text.contains("# TYPE quva_ca_pending_changes gauge\n"),
            "{text}"
        );
    }
}
