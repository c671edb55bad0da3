//! `quva-bridge`: runs the Quva MQTT bridge from a configuration file and flags.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use quva_bridge::{Bridge, Config};

/// Quva MQTT 5 bridge: relays devices to a stock broker and enforces Quva's checks.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(short, long, env = "QUVA_BRIDGE_CONFIG")]
    config: Option<PathBuf>,
    /// Address devices connect to (overrides `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Upstream broker `host:port` (overrides `upstream.address`).
    #[arg(long)]
    upstream: Option<String>,
    /// CA gRPC endpoint (overrides `ca.endpoint`).
    #[arg(long)]
    ca: Option<String>,
    /// Prometheus exporter address (overrides `metrics_listen`).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// A protected topic filter (repeatable; replaces `topics.protected`).
    #[arg(long = "protect")]
    protect: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut cfg = match &args.config {
        Some(path) => Config::load(path).with_context(|| format!("loading {}", path.display()))?,
        None => Config::default(),
    };
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = args.upstream {
        cfg.upstream.address = v;
    }
    if let Some(v) = args.ca {
        cfg.ca.endpoint = v;
    }
    if let Some(v) = args.metrics_listen {
        cfg.metrics_listen = v;
    }
    if !args.protect.is_empty() {
        cfg.topics.protected = args.protect;
    }
    cfg.validate()?;
    let ca = quva_bridge::grpc_ca(&cfg)?;
    let bridge = Bridge::start(cfg, ca).await?;
    let stop = bridge.stop_token();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    #[cfg(unix)]
    {
        let stop = bridge.stop_token();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            term.recv().await;
            stop.cancel();
        });
    }
    bridge.wait().await;
    Ok(())
}
