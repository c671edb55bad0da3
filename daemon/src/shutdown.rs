//! The shutdown signal every daemon stops on: SIGINT (Ctrl-C) or SIGTERM (systemd, `kill`).
//!
//! # Usage
//! ```no_run
//! # async fn run() {
//! tokio::select! {
//!     () = quva_daemon::shutdown_signal() => println!("stopping"),
//!     () = std::future::pending::<()>() => {}
//! }
//! # }
//! ```

/// Completes on the first SIGINT or SIGTERM received after its first poll.
///
/// If the SIGTERM handler cannot be installed (no signal driver, a non-Unix system), it waits
/// for Ctrl-C alone; if that cannot be installed either, it never completes rather than stopping
/// the daemon at once.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    r = tokio::signal::ctrl_c() => {
                        if r.is_err() {
                            // No Ctrl-C handler: SIGTERM alone still stops the daemon.
                            term.recv().await;
                        }
                    }
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only"),
        }
    }
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Sends `sig` to this test process with kill(1).
    fn raise(sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(std::process::id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    // One test for both signals: tokio's handlers are process-wide, and tests run in threads of
    // one process.
    #[tokio::test]
    async fn completes_on_sigterm_and_on_sigint_only_then() {
        for sig in ["TERM", "INT"] {
            let signal = shutdown_signal();
            tokio::pin!(signal);
            // Not before a signal (the first poll also installs the handlers).
            assert!(
                tokio::time::timeout(Duration::from_millis(100), &mut signal)
                    .await
                    .is_err(),
                "completed without SIG{sig}"
            );
            raise(sig);
            tokio::time::timeout(Duration::from_secs(5), &mut signal)
                .await
                .unwrap_or_else(|_| panic!("SIG{sig} did not complete it"));
        }
    }
}
