//! `quva-node`: the Quva device command line. Parses the arguments, sets up logging on stderr
//! and runs the command on a single-threaded runtime.

use std::process::ExitCode;

use clap::Parser;
use quva_node::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let default_filter = format!("warn,rumqttc=error,quva_node={level}");
    if let Err(e) = quva_daemon::logging::init(&default_filter, cli.log.log_format) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(quva_node::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            // 75 (EX_TEMPFAIL) tells a supervisor that retrying later may help.
            if e.is_transient() {
                ExitCode::from(75)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
