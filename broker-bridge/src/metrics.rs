//! Prometheus metrics of the bridge, served on `GET /metrics` by quva-daemon's endpoint.
//!
//! Counts connections, CA call latency, protected publishes accepted and dropped by reason
//! (PROTOCOL.md §6 rejection reasons) and signature verification time.
//!
//! # Usage
//! ```
//! use quva_bridge::metrics::Metrics;
//! let m = Metrics::new();
//! m.dropped("bad_signature");
//! assert!(m.render().contains("quva_bridge_publishes_dropped_total{reason=\"bad_signature\"} 1"));
//! ```

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A reason label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// A CA call label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Call {
    call: &'static str,
    outcome: &'static str,
}

/// Drop reasons of the bridge's own, besides every [`quva_client::message::Rejection`] label.
pub const EXTRA_DROP_REASONS: [&str; 9] = [
    "reserved_topic",
    "unauthenticated",
    "not_authorized",
    "topic_mismatch",
    "retained",
    "ota_topic",
    "ota_not_signer",
    "ota_not_key_message",
    "ota_unknown_release",
];

/// The bridge's metrics. Cheap to clone (shared counters).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    connections_active: Gauge,
    connections_total: Counter,
    connections_refused: Family<Reason, Counter>,
    publishes_accepted: Counter,
    publishes_dropped: Family<Reason, Counter>,
    verify_seconds: Histogram,
    ca_seconds: Family<Call, Histogram>,
    notices_published: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Registers every metric, with each drop reason pre-created at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("quva_bridge");
        let connections_active = Gauge::default();
        let connections_total = Counter::default();
        let connections_refused = Family::<Reason, Counter>::default();
        let publishes_accepted = Counter::default();
        let publishes_dropped = Family::<Reason, Counter>::default();
        let verify_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        let ca_seconds = Family::<Call, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_5, 2.0, 14))
        });
        let notices_published = Counter::default();
        registry.register(
            "connections_active",
            "Device connections currently open",
            connections_active.clone(),
        );
        registry.register(
            "connections",
            "Device connections accepted",
            connections_total.clone(),
        );
        registry.register(
            "connections_refused",
            "Device connections refused or closed by the bridge, by reason",
            connections_refused.clone(),
        );
        registry.register(
            "publishes_accepted",
            "Protected PUBLISHes verified and relayed",
            publishes_accepted.clone(),
        );
        registry.register(
            "publishes_dropped",
            "Protected PUBLISHes dropped, by reason",
            publishes_dropped.clone(),
        );
        registry.register(
            "verify_seconds",
            "Time to verify one batch of protected PUBLISHes",
            verify_seconds.clone(),
        );
        registry.register(
            "ca_call_seconds",
            "Latency of CA calls, by call and outcome",
            ca_seconds.clone(),
        );
        registry.register(
            "notices_published",
            "Rekey notices and certificate lists published",
            notices_published.clone(),
        );
        for reason in quva_client::message::Rejection::LABELS
            .iter()
            .copied()
            .chain(EXTRA_DROP_REASONS.iter().copied())
        {
            publishes_dropped.get_or_create(&Reason { reason }).get();
        }
        Metrics {
            registry: Arc::new(registry),
            connections_active,
            connections_total,
            connections_refused,
            publishes_accepted,
            publishes_dropped,
            verify_seconds,
            ca_seconds,
            notices_published,
        }
    }

    /// A device connection opened.
    pub fn connection_opened(&self) {
        self.connections_total.inc();
        self.connections_active.inc();
    }

    /// A device connection closed.
    pub fn connection_closed(&self) {
        self.connections_active.dec();
    }

    /// A connection was refused or cut for `reason`.
    pub fn refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// A protected PUBLISH was accepted.
    pub fn accepted(&self) {
        self.publishes_accepted.inc();
    }

    /// A protected PUBLISH was dropped for `reason`.
    pub fn dropped(&self, reason: &'static str) {
        self.publishes_dropped
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// How many PUBLISHes were dropped for `reason` so far.
    pub fn dropped_count(&self, reason: &'static str) -> u64 {
        self.publishes_dropped
            .get_or_create(&Reason { reason })
            .get()
    }

    /// How many protected PUBLISHes were accepted so far.
    pub fn accepted_count(&self) -> u64 {
        self.publishes_accepted.get()
    }

    /// A verification batch took `d`.
    pub fn verify_time(&self, d: Duration) {
        self.verify_seconds.observe(d.as_secs_f64());
    }

    /// A CA call `call` took `d` and ended with `ok`.
    pub fn ca_call(&self, call: &'static str, ok: bool, d: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.ca_seconds
            .get_or_create(&Call { call, outcome })
            .observe(d.as_secs_f64());
    }

    /// A notice or certificate list was published.
    pub fn notice_published(&self) {
        self.notices_published.inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        quva_daemon::metrics::render(&self.registry)
    }

    /// Serves `GET /metrics` on `listener` until `stop` is cancelled (quva-daemon's endpoint).
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        quva_daemon::metrics::serve(listener, self.registry, async move {
            stop.cancelled().await;
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn every_rejection_reason_is_exported_at_zero() {
        let m = Metrics::new();
        let text = m.render();
        for r in quva_client::message::Rejection::LABELS {
            assert!(
                text.contains(&format!("publishes_dropped_total{{reason=\"{r}\"}} 0")),
                "{r}"
            );
        }
        m.accepted();
        assert_eq!(m.accepted_count(), 1);
    }

    #[tokio::test]
    async fn exporter_answers_over_http() {
        let m = Metrics::new();
        m.connection_opened();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(m.clone().serve(listener, stop.clone()));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"));
        assert!(out.contains("quva_bridge_connections_active 1"));
        stop.cancel();
        task.await.unwrap();
    }
}
