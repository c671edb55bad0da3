//! The bridge server: shared state, the accept loop, CA access with timeouts, and shutdown.
//!
//! Each accepted connection gets one task (see `session`); the state they share is the topic
//! policy, the cache of CA data ([`BridgeDirectory`]), the replay caches of PROTOCOL.md §3 and §6,
//! and the metrics. A separate task follows the CA's notices (PROTOCOL.md §5, `notices`).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quva_client::curve::Point;
use quva_client::enrollment::REASON_NOT_AUTHORIZED;
use quva_client::ids::{DeviceId, GroupId};
use quva_client::replay::ReplayCache;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::ca::{CaClient, CaError};
use crate::config::Config;
use crate::directory::BridgeDirectory;
use crate::metrics::Metrics;
use crate::session::Identity;
use crate::topics::TopicPolicy;

/// The current time in Unix milliseconds (the bridge owns the clock; the protocol core does not).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A listen address could not be bound.
    #[error("cannot listen: {0}")]
    Bind(#[from] std::io::Error),
}

/// State shared by every connection.
pub(crate) struct Shared {
    pub(crate) cfg: Config,
    pub(crate) policy: TopicPolicy,
    pub(crate) metrics: Metrics,
    pub(crate) ca: Option<Arc<dyn CaClient>>,
    pub(crate) dir: BridgeDirectory,
    pub(crate) replay: Mutex<ReplayCache>,
    nonces: Mutex<ReplayCache<[u8; 16]>>,
    /// Batches of signature checks running on the blocking pool at once (one per CPU).
    pub(crate) verifiers: Semaphore,
    pub(crate) upstream_password: Option<String>,
    pub(crate) stop: CancellationToken,
    sessions: Mutex<HashMap<DeviceId, Vec<CancellationToken>>>,
    failed_fetch: Mutex<HashMap<GroupId, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a failed group fetch is not retried, so that traffic for an unknown group cannot
/// flood the CA.
const NEGATIVE_CACHE: Duration = Duration::from_secs(2);

impl Shared {
    /// Runs one CA call with the configured timeout and records its latency.
    pub(crate) async fn ca_call<T>(
        &self,
        name: &'static str,
        fut: impl Future<Output = Result<T, CaError>>,
    ) -> Result<T, CaError> {
        let started = Instant::now();
        let r = match tokio::time::timeout(self.cfg.ca_timeout(), fut).await {
            Ok(r) => r,
            Err(_) => Err(CaError::Unavailable),
        };
        self.metrics.ca_call(name, r.is_ok(), started.elapsed());
        if let Err(e) = &r {
            tracing::debug!(call = name, error = %e, "CA call failed");
        }
        r
    }

    /// Q_CA from the cache, fetched from the CA on first use.
    pub(crate) async fn ca_public(&self) -> Option<Point> {
        if let Some(q) = self.dir.ca_public() {
            return Some(q);
        }
        let ca = self.ca.as_ref()?;
        let bytes = self.ca_call("ca_info", ca.ca_public_key()).await.ok()?;
        let q = Point::from_bytes(&bytes)?;
        self.dir.set_ca_public(q);
        Some(q)
    }

    /// Makes sure the group is cached and not older than the configured TTL.
    pub(crate) async fn ensure_group(&self, group: &GroupId) -> Result<(), CaError> {
        let ttl = self.cfg.ca.group_ttl_ms;
        if self.dir.is_fresh(group, now_ms().saturating_sub(ttl)) {
            return Ok(());
        }
        if lock(&self.failed_fetch)
            .get(group)
            .is_some_and(|t| t.elapsed() < NEGATIVE_CACHE)
        {
            return if self.dir.current_epoch(group).is_some() {
                Ok(())
            } else {
                Err(CaError::NotFound)
            };
        }
        let r = self.refresh_group(group).await;
        if r.is_err() {
            lock(&self.failed_fetch).insert(group.clone(), Instant::now());
            if self.dir.current_epoch(group).is_some() {
                // Stale data is better than none while the CA is away.
                return Ok(());
            }
        } else {
            lock(&self.failed_fetch).remove(group);
        }
        r
    }

    /// Fetches the group from the CA and applies it.
    pub(crate) async fn refresh_group(&self, group: &GroupId) -> Result<(), CaError> {
        let ca = self.ca.as_ref().ok_or(CaError::Unavailable)?;
        if self.ca_public().await.is_none() {
            return Err(CaError::Unavailable);
        }
        let snap = self
            .ca_call("get_group", ca.get_group(group.clone()))
            .await?;
        self.dir.apply_snapshot(&snap, now_ms()).map_err(|e| {
            tracing::warn!(group = %group, error = %e, "group data from the CA rejected");
            CaError::InvalidResponse
        })
    }

    /// Records a CONNECT proof's nonce; `Err` (0x87) if it was seen inside the window.
    pub(crate) fn check_nonce(&self, nonce: [u8; 16], t_ms: u64, now: u64) -> Result<(), u8> {
        lock(&self.nonces)
            .check_and_insert(nonce, t_ms, now)
            .map_err(|_| REASON_NOT_AUTHORIZED)
    }

    /// Registers a device session so that a revocation can end it; returns its kick token.
    pub(crate) fn register(
        &self,
        identity: &Identity,
        end: &CancellationToken,
    ) -> CancellationToken {
        let kick = end.child_token();
        if let Identity::Device(id) = identity {
            lock(&self.sessions)
                .entry(id.clone())
                .or_default()
                .push(kick.clone());
        }
        kick
    }

    /// Forgets a session.
    pub(crate) fn unregister(&self, identity: &Identity, _end: &CancellationToken) {
        if let Identity::Device(id) = identity {
            let mut s = lock(&self.sessions);
            if let Some(v) = s.get_mut(id) {
                v.retain(|t| !t.is_cancelled());
                if v.is_empty() {
                    s.remove(id);
                }
            }
        }
    }

    /// Ends every session of a device (after a revocation).
    pub(crate) fn kick(&self, id: &DeviceId) {
        if let Some(tokens) = lock(&self.sessions).remove(id) {
            for t in tokens {
                t.cancel();
            }
        }
    }
}

/// A running bridge.
pub struct Bridge {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Bridge {
    /// Binds the listeners and starts serving: devices on `cfg.listen`, metrics on
    /// `cfg.metrics_listen`, notices from the CA if one is given.
    ///
    /// # Errors
    /// [`StartError`] if the configuration is invalid or an address cannot be bound.
    pub async fn start(cfg: Config, ca: Option<Arc<dyn CaClient>>) -> Result<Self, StartError> {
        cfg.validate()?;
        let policy = TopicPolicy::new(&cfg.topics.protected)
            .map_err(|_| crate::config::ConfigError::Invalid("topics.protected"))?;
        let upstream_password = cfg.upstream_password()?;
        let listener = TcpListener::bind(&cfg.listen).await?;
        let local_addr = listener.local_addr()?;
        let metrics_listener = if cfg.metrics_listen.is_empty() {
            None
        } else {
            Some(TcpListener::bind(&cfg.metrics_listen).await?)
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let window = cfg.windows.timestamp_ms;
        let shared = Arc::new(Shared {
            dir: BridgeDirectory::new(cfg.windows.epoch_grace_ms),
            replay: Mutex::new(ReplayCache::new(window, cfg.windows.replay_capacity)),
            nonces: Mutex::new(ReplayCache::new(window, cfg.windows.replay_capacity)),
            verifiers: Semaphore::new(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            ),
            policy,
            metrics: Metrics::new(),
            ca,
            upstream_password,
            stop: CancellationToken::new(),
            sessions: Mutex::default(),
            failed_fetch: Mutex::default(),
            cfg,
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(listener, shared.clone()));
        if let Some(l) = metrics_listener {
            tasks.spawn(shared.metrics.clone().serve(l, shared.stop.clone()));
        }
        if shared.ca.is_some() {
            tasks.spawn(crate::notices::run(shared.clone()));
        }
        tracing::info!(listen = %local_addr, upstream = %shared.cfg.upstream.address, "bridge started");
        Ok(Bridge {
            local_addr,
            metrics_addr,
            shared,
            tasks,
        })
    }

    /// The address devices connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The metrics exporter's address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// A token that stops the bridge when cancelled.
    pub fn stop_token(&self) -> CancellationToken {
        self.shared.stop.clone()
    }

    /// Stops accepting, tells every device the server is shutting down (DISCONNECT 0x8B), and
    /// waits up to the configured grace time for the connections to close.
    pub async fn shutdown(mut self) {
        self.shared.stop.cancel();
        let grace = Duration::from_millis(self.shared.cfg.limits.shutdown_grace_ms);
        let _ = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }

    /// Runs until the stop token is cancelled, then shuts down.
    pub async fn wait(self) {
        self.shared.stop.cancelled().await;
        self.shutdown().await;
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let limit = Arc::new(Semaphore::new(shared.cfg.limits.max_connections));
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shared.stop.cancelled() => break,
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shared.metrics.refused("connection_limit");
            tracing::info!(peer = %peer, "connection limit reached");
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        conns.spawn(async move {
            shared.metrics.connection_opened();
            crate::session::serve(stream, shared.clone()).await;
            shared.metrics.connection_closed();
            drop(permit);
        });
    }
    drop(listener);
    // Sessions see the stop token themselves; wait for them to say goodbye.
    while conns.join_next().await.is_some() {}
}
