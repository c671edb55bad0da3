//! Standard output and signals for the commands: one result per line, flushed at once, and the
//! shutdown signals a command stops on.

use std::io::Write as _;

use crate::error::NodeError;
use crate::net::LinkEvent;

/// Writes one line to standard output and flushes it (a pipe sees each result at once).
///
/// # Errors
/// [`NodeError::Input`] if standard output is closed.
pub(crate) fn print_line(line: &str) -> Result<(), NodeError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| NodeError::Input(format!("cannot write to stdout: {e}")))
}

/// Logs link events the commands do not act on.
pub(crate) fn log_event(ev: &LinkEvent) {
    match ev {
        LinkEvent::Ready { group, role, epoch } => {
            tracing::info!(group = %group, ?role, epoch = epoch.0, "joined");
        }
        LinkEvent::Rekeyed { group, role, epoch } => {
            tracing::info!(group = %group, ?role, epoch = epoch.0, "rekeyed");
        }
        LinkEvent::Disconnected { error, retry_in } => {
            tracing::warn!(error = %error, retry_in_ms = retry_in.as_millis() as u64, "disconnected; reconnecting");
        }
        _ => {}
    }
}
