//! The bridge's gateway to the CA: every call bounded by a timeout and timed, and a bounded
//! negative cache so that traffic for groups the CA does not know cannot flood it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quva_client::ids::GroupId;

use crate::ca::{CaClient, CaError};
use crate::metrics::Metrics;
use crate::sync::lock;

/// How long a failed group fetch is not retried.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
/// Groups remembered as failed at most (the oldest is forgotten first).
const NEGATIVE_CAPACITY: usize = 4096;

/// The CA client with timeouts, metrics and the negative cache.
pub(crate) struct CaGateway {
    ca: Option<Arc<dyn CaClient>>,
    timeout: Duration,
    metrics: Metrics,
    negative: Mutex<NegativeCache>,
}

impl CaGateway {
    pub(crate) fn new(ca: Option<Arc<dyn CaClient>>, timeout: Duration, metrics: Metrics) -> Self {
        CaGateway {
            ca,
            timeout,
            metrics,
            negative: Mutex::new(NegativeCache::new(NEGATIVE_CAPACITY, NEGATIVE_TTL)),
        }
    }

    /// The CA client, if the bridge has one.
    pub(crate) fn client(&self) -> Option<&Arc<dyn CaClient>> {
        self.ca.as_ref()
    }

    /// Runs one CA call with the configured timeout and records its latency.
    pub(crate) async fn call<T>(
        &self,
        name: &'static str,
        fut: impl Future<Output = Result<T, CaError>>,
    ) -> Result<T, CaError> {
        let started = Instant::now();
        let r = match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CaError::Unavailable),
        };
        self.metrics.ca_call(name, r.is_ok(), started.elapsed());
        if let Err(e) = &r {
            tracing::debug!(call = name, error = %e, "CA call failed");
        }
        r
    }

    /// Whether a fetch of `group` failed less than the negative TTL ago.
    pub(crate) fn recently_failed(&self, group: &GroupId) -> bool {
        lock(&self.negative).contains(group, Instant::now())
    }

    /// Remembers the outcome of a group fetch.
    pub(crate) fn fetched(&self, group: &GroupId, ok: bool) {
        let mut n = lock(&self.negative);
        if ok {
            n.remove(group);
        } else {
            n.insert(group.clone(), Instant::now());
        }
    }
}

/// Failed lookups, each remembered for `ttl`, at most `capacity` of them.
#[derive(Debug)]
struct NegativeCache {
    capacity: usize,
    ttl: Duration,
    entries: HashMap<GroupId, Instant>,
}

impl NegativeCache {
    fn new(capacity: usize, ttl: Duration) -> Self {
        NegativeCache {
            capacity: capacity.max(1),
            ttl,
            entries: HashMap::new(),
        }
    }

    fn contains(&self, group: &GroupId, now: Instant) -> bool {
        self.entries
            .get(group)
            .is_some_and(|t| now.duration_since(*t) < self.ttl)
    }

    fn insert(&mut self, group: GroupId, now: Instant) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&group) {
            let ttl = self.ttl;
            self.entries.retain(|_, t| now.duration_since(*t) < ttl);
            if self.entries.len() >= self.capacity
                && let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(g, _)| g.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(group, now);
    }

    fn remove(&mut self, group: &GroupId) {
        self.entries.remove(group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_negative_cache_is_bounded_and_forgets() {
        let mut n = NegativeCache::new(3, Duration::from_secs(2));
        let t0 = Instant::now();
        let g = |i: u32| GroupId::new(&format!("g/{i}")).unwrap();
        for i in 0..100 {
            n.insert(g(i), t0 + Duration::from_millis(u64::from(i)));
            assert!(n.entries.len() <= 3);
        }
        // The newest are kept, the oldest forgotten.
        let now = t0 + Duration::from_millis(100);
        assert!(n.contains(&g(99), now) && !n.contains(&g(0), now));
        // An entry expires after the TTL.
        assert!(!n.contains(&g(99), t0 + Duration::from_secs(3)));
        n.remove(&g(99));
        assert!(!n.contains(&g(99), now));
    }
}
