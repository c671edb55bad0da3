//! `quva-bridge`: runs the Quva MQTT bridge from a configuration file and flags.

use std::path::PathBuf;

use clap::Parser;
use quva_bridge::{Bridge, Config};
use quva_daemon::config::ConfigSource;

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
    /// Logging.
    #[command(flatten)]
    log: quva_daemon::LogArgs,
}

impl Args {
    /// The configuration file (if any), then the flags.
    fn config(&self) -> Result<Config, quva_bridge::config::ConfigError> {
        let mut src = match &self.config {
            Some(path) => ConfigSource::from_file(path, true)?,
            None => ConfigSource::empty("defaults"),
        };
        src.set_some("listen", self.listen.clone(), "--listen");
        src.set_some("upstream.address", self.upstream.clone(), "--upstream");
        src.set_some("ca.endpoint", self.ca.clone(), "--ca");
        src.set_some(
            "metrics_listen",
            self.metrics_listen.clone(),
            "--metrics-listen",
        );
        if !self.protect.is_empty() {
            src.set("topics.protected", self.protect.clone(), "--protect");
        }
        Config::from_source(&src)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    quva_daemon::logging::init("info", args.log.log_format)?;
    let cfg = args.config()?;
    let ca = quva_bridge::grpc_ca(&cfg)?;
    let bridge = Bridge::start(cfg, ca).await?;
    let stop = bridge.stop_token();
    tokio::spawn(async move {
        quva_daemon::shutdown_signal().await;
        stop.cancel();
    });
    bridge.wait().await;
    Ok(())
}
