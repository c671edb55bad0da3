//! The bridge server: start-up, the accept loop and shutdown.
//!
//! Each accepted connection gets one task (see `session`); what they share is
//! [`Shared`](crate::shared::Shared). A separate task follows the CA's notices (PROTOCOL.md §5,
//! `notices`), another one forgets expired replay entries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::ca::CaClient;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::shared::{Shared, now_ms};
use crate::topics::TopicPolicy;

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
        let shared = Arc::new(Shared::new(cfg, policy, ca, pinned, upstream_password));
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
