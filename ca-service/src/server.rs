//! Running the daemon: open the data directory, start the engine, serve gRPC (with health and
//! reflection) and the optional metrics endpoint until shutdown, then flush and stop.
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
use std::sync::atomic::Ordering;

use quva_proto::v1::admin_service_server::AdminServiceServer;
use quva_proto::v1::device_service_server::DeviceServiceServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::auth::{AuditSink, BridgeCerts, Guard, Principal, Tokens};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::datadir::{DataDir, DataDirError};
use crate::engine::{Engine, EngineConfig, EngineHandle, Stats};
use crate::error::CaError;
use crate::service::{AdminApi, DeviceApi};
use crate::store::{CaStore, RocksStore, StoreError, Tables};

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
        let metrics_addr = match cfg.metrics_listen {
            Some(m) => Some(spawn_metrics(m, engine.clone(), store.clone()).await?),
            None => None,
        };
        let sink: Arc<dyn AuditSink> = Arc::new(engine.clone());
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
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

/// The Prometheus text exposition of the counters (docs/operations.md explains each).
pub fn render_metrics(stats: &Stats, store: &dyn CaStore) -> String {
    let meta = store.meta().unwrap_or_default();
    let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let rows: [(&str, &str, &str, u64); 18] = [
        (
            "quva_ca_enrollments_total",
            "counter",
            "Certificates issued by enrollment since start.",
            g(&stats.enrollments),
        ),
        (
            "quva_ca_renewals_total",
            "counter",
            "Certificates issued by renewal since start.",
            g(&stats.renewals),
        ),
        (
            "quva_ca_group_key_deliveries_total",
            "counter",
            "Group-key requests answered with a key since start.",
            g(&stats.joins),
        ),
        (
            "quva_ca_refusals_total",
            "counter",
            "Device-path requests refused since start.",
            g(&stats.refusals),
        ),
        (
            "quva_ca_refusals_unrecorded_total",
            "counter",
            "Refusals over their device's audit budget, answered but not written to the audit log.",
            g(&stats.refusals_unrecorded),
        ),
        (
            "quva_ca_first_uses_total",
            "counter",
            "First uses of certificates since start.",
            g(&stats.first_uses),
        ),
        (
            "quva_ca_auth_denied_total",
            "counter",
            "Requests refused by the token check since start.",
            g(&stats.auth_denied),
        ),
        (
            "quva_ca_rekeys_total",
            "counter",
            "Epochs committed since start.",
            g(&stats.rekeys),
        ),
        (
            "quva_ca_notices_total",
            "counter",
            "Notices written since start.",
            g(&stats.notices),
        ),
        (
            "quva_ca_commits_total",
            "counter",
            "Synced storage commits since start.",
            g(&stats.commits),
        ),
        (
            "quva_ca_commit_failures_total",
            "counter",
            "Failed storage commits since start.",
            g(&stats.commit_failures),
        ),
        (
            "quva_ca_audit_dropped_total",
            "counter",
            "Audit entries dropped on a full engine queue.",
            g(&stats.audit_dropped),
        ),
        (
            "quva_ca_pending_changes",
            "gauge",
            "Changes waiting in open batching windows.",
            g(&stats.pending_changes),
        ),
        (
            "quva_ca_last_notice_seq",
            "gauge",
            "Sequence number of the last stored notice.",
            meta.next_notice_seq.saturating_sub(1),
        ),
        (
            "quva_ca_last_audit_seq",
            "gauge",
            "Sequence number of the last audit entry.",
            meta.next_audit_seq.saturating_sub(1),
        ),
        (
            "quva_ca_next_serial",
            "gauge",
            "Serial the next certificate will get.",
            meta.next_serial.max(1),
        ),
        (
            "quva_ca_epochs_total",
            "counter",
            "Epochs committed over the store's lifetime.",
            meta.rekeys,
        ),
        (
            "quva_ca_rekey_writer_microseconds_total",
            "counter",
            "Writer time spent staging and writing epochs since start, without the disk sync.",
            g(&stats.rekey_micros),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in rows {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    out
}

/// A minimal HTTP/1.0 endpoint answering every request with the metrics text.
async fn spawn_metrics(
    addr: SocketAddr,
    engine: EngineHandle,
    store: Arc<dyn CaStore>,
) -> Result<SocketAddr, ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let body = render_metrics(engine.stats(), store.as_ref());
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), sock.read(&mut buf))
                        .await;
                let head = format!(
                    "HTTP/1.0 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(bound)
}
