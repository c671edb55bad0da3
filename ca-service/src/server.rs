//! Running the daemon: open the data directory, start the engine, serve gRPC (with health and
//! reflection) and the optional metrics endpoint (quva-daemon's, with [`crate::metrics`]) until
//! shutdown, then flush and stop.
//!
//! # Usage
//! ```no_run
//! # async fn run() -> Result<(), quva_ca::server::ServeError> {
//! use quva_ca::{config::Config, datadir::DataDir, server::Server};
//! let running = Server::start(&DataDir::new("/var/lib/quva-ca"), &Config::default()).await?;
//! println!("listening on {}", running.addr());
//! running.stop().await?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use quva_proto::v1::admin_service_server::AdminServiceServer;
use quva_proto::v1::device_service_server::DeviceServiceServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::auth::{AuditSink, BridgeCerts, Guard, Principal, Tokens};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::datadir::{DataDir, DataDirError};
use crate::engine::{Engine, EngineConfig, EngineHandle};
use crate::error::CaError;
use crate::service::{AdminApi, DeviceApi};
use crate::store::{CaStore, RocksStore, StoreError};

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The data directory is unusable.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The database could not be opened.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// The engine could not load the state.
    #[error("engine: {0}")]
    Engine(#[from] CaError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not be set up.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A task panicked.
    #[error("task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// A TLS file is missing, unreadable or too widely readable.
    #[error("TLS: {0}")]
    Tls(String),
}

/// The listener's TLS settings and what a client certificate means on the device path.
fn tls_setup(
    cfg: Option<&crate::config::TlsConfig>,
) -> Result<(Option<tonic::transport::ServerTlsConfig>, BridgeCerts), ServeError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let Some(cfg) = cfg else {
        return Ok((None, BridgeCerts::Ignored));
    };
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| ServeError::Tls(format!("cannot read {}: {e}", p.display())))
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&cfg.key)
            .map_err(|e| ServeError::Tls(format!("cannot read {}: {e}", cfg.key.display())))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(ServeError::Tls(format!(
                "{} is readable by group or others (mode {:o}); chmod 600 it",
                cfg.key.display(),
                mode & 0o777
            )));
        }
    }
    let key = zeroize::Zeroizing::new(read(&cfg.key)?);
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(&cfg.cert)?, &*key));
    let certs = match (&cfg.client_ca, cfg.require_bridge_cert) {
        (Some(ca), required) => {
            tls = tls
                .client_ca_root(Certificate::from_pem(read(ca)?))
                .client_auth_optional(true);
            if required {
                BridgeCerts::Required
            } else {
                BridgeCerts::Accepted
            }
        }
        (None, true) => {
            return Err(ServeError::Tls(
                "require_bridge_cert needs client_ca".to_owned(),
            ));
        }
        (None, false) => BridgeCerts::Ignored,
    };
    Ok((Some(tls), certs))
}

/// A started daemon.
pub struct RunningServer {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// The bound gRPC address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound metrics address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops accepting, finishes in-flight calls, flushes open batching windows and stops.
    ///
    /// # Errors
    /// [`ServeError`] if the server failed.
    pub async fn stop(self) -> Result<(), ServeError> {
        let _ = self.stop.send(());
        self.task.await?
    }

    /// Waits until the server stops by itself (it does not, unless it fails) or `signal`
    /// resolves, then stops it.
    ///
    /// # Errors
    /// [`ServeError`] if the server failed.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServeError> {
        tokio::select! {
            r = &mut self.task => r?,
            () = signal => self.stop().await,
        }
    }
}

/// The daemon.
pub struct Server;

impl Server {
    /// Opens `data`, starts the engine and serves on `cfg.listen` in a background task.
    ///
    /// # Errors
    /// [`ServeError`] if anything cannot be opened or bound.
    pub async fn start(data: &DataDir, cfg: &Config) -> Result<RunningServer, ServeError> {
        Self::start_with_clock(data, cfg, Arc::new(SystemClock)).await
    }

    /// [`Server::start`] with a given clock (tests).
    ///
    /// # Errors
    /// As [`Server::start`].
    pub async fn start_with_clock(
        data: &DataDir,
        cfg: &Config,
        clock: Arc<dyn Clock>,
    ) -> Result<RunningServer, ServeError> {
        let store: Arc<dyn CaStore> = Arc::new(RocksStore::open(&data.db_path())?);
        Self::start_with_store(data, cfg, clock, store).await
    }

    /// [`Server::start`] over a store the caller opened (tests inspect it while serving).
    ///
    /// # Errors
    /// As [`Server::start`].
    pub async fn start_with_store(
        data: &DataDir,
        cfg: &Config,
        clock: Arc<dyn Clock>,
        store: Arc<dyn CaStore>,
    ) -> Result<RunningServer, ServeError> {
        let ca = data.ca_key()?;
        let ca_public = *ca.public();
        let tokens = Arc::new(Tokens::new(&data.admin_token()?, &data.bridge_token()?));
        let (tls, bridge_certs) = tls_setup(cfg.tls.as_ref())?;
        let (engine, engine_task) =
            Engine::spawn(store.clone(), ca, EngineConfig::from(cfg), clock)?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        let (metrics_addr, metrics_task) = match cfg.metrics_listen {
            Some(m) => {
                let (addr, task) =
                    spawn_metrics(m, &engine, store.clone(), stopping_tx.subscribe()).await?;
                (Some(addr), Some(task))
            }
            None => (None, None),
        };
        let sink: Arc<dyn AuditSink> = Arc::new(engine.clone());
        let device = DeviceServiceServer::with_interceptor(
            DeviceApi::new(engine.clone(), store.clone(), ca_public, stopping),
            Guard::new(
                tokens.clone(),
                Principal::Bridge,
                bridge_certs,
                sink.clone(),
            ),
        );
        let admin = AdminServiceServer::with_interceptor(
            AdminApi::new(engine.clone(), store.clone(), ca_public),
            Guard::new(tokens, Principal::Admin, bridge_certs, sink),
        );
        let (health, health_svc) = tonic_health::server::health_reporter();
        health.set_serving::<DeviceServiceServer<DeviceApi>>().await;
        health.set_serving::<AdminServiceServer<AdminApi>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(quva_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let (stop, stopped) = oneshot::channel::<()>();
        tracing::info!(
            %addr,
            tls = tls.is_some(),
            bridge_certs = ?bridge_certs,
            ca_public = %hex::encode(ca_public.to_bytes()),
            "serving"
        );
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        // Replies go out at once: without TCP_NODELAY a reply written in two parts waits for the
        // peer's delayed ACK (about 40 ms).
        let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |s| {
            if let Ok(s) = &s {
                let _ = s.set_nodelay(true);
            }
            s
        });
        let task = tokio::spawn(async move {
            let served = builder
                .add_service(health_svc)
                .add_service(reflection)
                .add_service(device)
                .add_service(admin)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.await;
                    tracing::info!("shutting down");
                    let _ = stopping_tx.send(true);
                })
                .await;
            // The metrics endpoint stops with the gRPC server: the flag is set, or its sender was
            // dropped with the shutdown future when serving failed.
            if let Some(t) = metrics_task {
                t.await?;
            }
            engine.shutdown().await;
            engine_task.await?;
            served?;
            tracing::info!("stopped");
            Ok(())
        });
        Ok(RunningServer {
            addr,
            metrics_addr,
            stop,
            task,
        })
    }
}

/// Binds the metrics endpoint and serves it until `stopping` turns true (or its sender is gone).
async fn spawn_metrics(
    addr: SocketAddr,
    engine: &EngineHandle,
    store: Arc<dyn CaStore>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let registry = Arc::new(crate::metrics::registry(engine.stats().clone(), store));
    let task = tokio::spawn(quva_daemon::metrics::serve(
        listener,
        registry,
        async move {
            let _ = stopping.wait_for(|s| *s).await;
        },
    ));
    Ok((bound, task))
}
