//! `quva-ca`: parse the command line, set up logging, run.

use anyhow::Context;
use clap::Parser;
use quva_ca::cli::{Cli, Command};
use quva_ca::datadir::DataDir;
use quva_ca::server::Server;
use quva_daemon::shutdown_signal;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = quva_daemon::logging::init("info", cli.log.log_format) {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
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
                .init(&mut rand_core::OsRng)
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
