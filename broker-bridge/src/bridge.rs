//! The bridge server: the parts every connection uses, the accept loop and shutdown.
//!
//! Each accepted connection gets one task (see `session`). What they share is split by job: the
//! topic policy, the CA gateway ([`CaGateway`]: timeouts, negative cache), the cache of CA data
//! ([`BridgeDirectory`], with Q_CA pinned from the configuration), the replay caches of
//! PROTOCOL.md §3 and §6 partitioned per group and sender (§8), the session registry and the
//! metrics. A separate task follows the CA's notices (PROTOCOL.md §5, `notices`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use quva_client::curve::Point;
use quva_client::enrollment::REASON_NOT_AUTHORIZED;
use quva_client::ids::{DeviceId, GroupId};
use quva_client::message::BridgeReplay;
use quva_client::replay::PartitionedReplay;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::ca::{CaClient, CaError};
use crate::config::Config;
use crate::directory::BridgeDirectory;
use crate::gateway::CaGateway;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::registry::Registry;
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

/// The parts every connection uses.
pub(crate) struct Shared {
    pub(crate) cfg: Config,
    pub(crate) policy: TopicPolicy,
    pub(crate) metrics: Metrics,
    pub(crate) ca: CaGateway,
    pub(crate) dir: BridgeDirectory,
    /// Accepted messages, per group and sender (PROTOCOL.md §6, §8).
    pub(crate) replay: Mutex<BridgeReplay>,
    /// Connect-proof nonces, per identity (PROTOCOL.md §3, §8).
    nonces: Mutex<PartitionedReplay<Identity, [u8; 16]>>,
    /// Batches of signature checks running on the blocking pool at once (one per CPU).
    pub(crate) verifiers: Semaphore,
    pub(crate) upstream_password: Option<String>,
    pub(crate) stop: CancellationToken,
    pub(crate) sessions: Registry,
    /// Whether the notice follower has read the CA's log to its end, so that the directory's
    /// revocations are current; until then certificate connections ask the CA.
    pub(crate) revocations_current: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Runs one CA call with the configured timeout and records its latency.
    pub(crate) async fn ca_call<T>(
        &self,
        name: &'static str,
        fut: impl Future<Output = Result<T, CaError>>,
    ) -> Result<T, CaError> {
        self.ca.call(name, fut).await
    }

    /// The CA client, if the bridge has one.
    pub(crate) fn ca_client(&self) -> Option<&Arc<dyn CaClient>> {
        self.ca.client()
    }

    /// Q_CA, pinned from the configuration (PROTOCOL.md §8): never taken from the CA link.
    pub(crate) fn ca_public(&self) -> Option<Point> {
        self.dir.ca_public()
    }

    /// Makes sure the group is cached and not older than the configured TTL.
    pub(crate) async fn ensure_group(&self, group: &GroupId) -> Result<(), CaError> {
        let ttl = self.cfg.ca.group_ttl_ms;
        if self.dir.is_fresh(group, now_ms().saturating_sub(ttl)) {
            return Ok(());
        }
        let known = |dir: &BridgeDirectory| dir.current_epoch(group).is_some();
        if self.ca.recently_failed(group) {
            return if known(&self.dir) {
                Ok(())
            } else {
                Err(CaError::NotFound)
            };
        }
        let r = self.refresh_group(group).await;
        self.ca.fetched(group, r.is_ok());
        if r.is_err() && known(&self.dir) {
            // Stale data is better than none while the CA is away.
            return Ok(());
        }
        r
    }

    /// Fetches the group from the CA and applies it; ends the sessions of departed members.
    pub(crate) async fn refresh_group(&self, group: &GroupId) -> Result<(), CaError> {
        let ca = self.ca_client().ok_or(CaError::Unavailable)?;
        if self.ca_public().is_none() {
            return Err(CaError::Unavailable);
        }
        let snap = self.ca_call("get_group", ca.get_group(group.clone())).await?;
        let departed = self.dir.apply_snapshot(&snap, now_ms()).map_err(|e| {
            tracing::warn!(group = %group, error = %e, "group data from the CA rejected");
            CaError::InvalidResponse
        })?;
        self.end_departed(group, &departed);
        Ok(())
    }

    /// Ends the sessions of members that left a group (deny, removal, revocation), and the
    /// group-level connections of the group, which hold its former keys (PROTOCOL.md §8).
    fn end_departed(&self, group: &GroupId, departed: &[DeviceId]) {
        if departed.is_empty() {
            return;
        }
        for id in departed {
            let n = self.sessions.end_device(id);
            tracing::info!(group = %group, device = %id, sessions = n, "member left the group; sessions ended");
        }
        let n = self.sessions.end_group(group);
        if n > 0 {
            tracing::info!(group = %group, sessions = n, "group connections ended after a departure");
        }
    }

    /// Whether a certificate is revoked: from the notices once they are current, else from the
    /// CA. `Err` (0x88) if the CA must be asked and cannot answer.
    pub(crate) async fn is_revoked(&self, serial: u64) -> Result<bool, u8> {
        if self.dir.is_revoked(serial) {
            return Ok(true);
        }
        if self.revocations_current.load(Ordering::Acquire) {
            return Ok(false);
        }
        let ca = self.ca_client().ok_or(0x88_u8)?;
        self.ca_call("is_revoked", ca.is_revoked(serial))
            .await
            .map_err(|_| 0x88_u8)
    }

    /// Records a CONNECT proof's nonce in the identity's partition; `Err` (0x87) if it was seen
    /// inside the window.
    pub(crate) fn check_nonce(
        &self,
        identity: &Identity,
        nonce: [u8; 16],
        t_ms: u64,
        now: u64,
    ) -> Result<(), u8> {
        lock(&self.nonces)
            .check_and_insert(identity.clone(), nonce, t_ms, now)
            .map_err(|_| REASON_NOT_AUTHORIZED)
    }

    /// Forgets expired replay entries and idle partitions.
    fn prune(&self, now: u64) {
        lock(&self.replay).prune(now);
        lock(&self.nonces).prune(now);
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
        let pinned = cfg.ca_public_key()?;
        if ca.is_some() && pinned.is_none() {
            return Err(crate::config::ConfigError::Invalid(
                "ca.public_key: pin the CA's public key (quva-ca status prints it)",
            )
            .into());
        }
        let dir = BridgeDirectory::new(cfg.windows.epoch_grace_ms);
        if let Some(q) = pinned {
            dir.set_ca_public(q);
        }
        let window = cfg.windows.timestamp_ms;
        let metrics = Metrics::new();
        let shared = Arc::new(Shared {
            dir,
            replay: Mutex::new(BridgeReplay::new(window, cfg.windows.replay_capacity)),
            nonces: Mutex::new(PartitionedReplay::new(window, cfg.windows.replay_capacity)),
            verifiers: Semaphore::new(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            ),
            policy,
            ca: CaGateway::new(ca, cfg.ca_timeout(), metrics.clone()),
            metrics,
            upstream_password,
            stop: CancellationToken::new(),
            sessions: Registry::default(),
            revocations_current: AtomicBool::new(false),
            cfg,
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(listener, shared.clone()));
        if let Some(l) = metrics_listener {
            tasks.spawn(shared.metrics.clone().serve(l, shared.stop.clone()));
        }
        if shared.ca_client().is_some() {
            tasks.spawn(crate::notices::run(shared.clone()));
        }
        tasks.spawn(prune_loop(shared.clone()));
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

/// Forgets expired replay entries every few seconds, so that idle partitions do not stay.
async fn prune_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = shared.stop.cancelled() => return,
            _ = tick.tick() => shared.prune(now_ms()),
        }
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
