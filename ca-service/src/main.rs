//! `quva-ca`: parse the command line, set up logging, run.

use anyhow::Context;
use clap::Parser;
use quva_ca::cli::{Cli, Command};
use quva_ca::datadir::DataDir;
use quva_ca::server::Server;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { data } => {
            let dir = DataDir::new(&data);
            let out = dir
                .init(&mut quva_client::rng::SystemRng::new())
                .with_context(|| format!("initializing {}", data.display()))?;
            println!("initialized {}", data.display());
            println!("CA public key: {}", hex::encode(out.ca_public.to_bytes()));
            println!("admin token:   {}", dir.admin_token_path().display());
            println!("bridge token:  {}", dir.bridge_token_path().display());
            Ok(())
        }
        Command::Serve(args) => {
            let cfg = args.config()?;
            let data = DataDir::new(&args.data);
            let running = Server::start(&data, &cfg).await?;
            println!("listening on {}", running.addr());
            running.run_until(shutdown_signal()).await?;
            Ok(())
        }
        cmd => {
            let out = quva_ca::cli::run_admin(cmd).await?;
            if !out.is_empty() {
                println!("{out}");
            }
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
