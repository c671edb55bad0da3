//! Logging for the daemons: `tracing` events on stderr (stdout is for command results), filtered
//! by `RUST_LOG` or a per-daemon default, as text or as one JSON object per line.
//!
//! Every daemon takes `--log-format text|json` (or `QUVA_LOG_FORMAT`) through [`LogArgs`].
//! Logs never carry secrets: that is up to the call sites, which log identifiers, never keys,
//! tokens or payloads.
//!
//! # Usage
//! ```no_run
//! use quva_daemon::logging::{self, LogFormat};
//! logging::init("info", LogFormat::Text).unwrap();
//! tracing::info!("started");
//! ```

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, colored only on a terminal.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`), for log collectors.
    Json,
}

/// The logging flags every daemon flattens into its command line.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct LogArgs {
    /// Log format on stderr: `text` or `json` (one object per line). The level comes from
    /// RUST_LOG.
    #[arg(
        long,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "QUVA_LOG_FORMAT",
        global = true,
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoggingError {
    /// A global subscriber was already installed.
    #[error("logging is already set up: {0}")]
    AlreadySet(String),
}

/// The filter: `RUST_LOG` when it is set and valid, else `default` (e.g. `info`, or
/// `warn,quva_node=debug`).
pub fn filter(default: &str, rust_log: Option<&str>) -> EnvFilter {
    rust_log
        .filter(|s| !s.trim().is_empty())
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(default))
}

/// Installs the global subscriber: stderr, `RUST_LOG` or `default_filter`, in `format`.
///
/// # Errors
/// [`LoggingError::AlreadySet`] if a subscriber is already installed.
pub fn init(default_filter: &str, format: LogFormat) -> Result<(), LoggingError> {
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let ansi = std::io::stderr().is_terminal();
    subscriber(
        filter(default_filter, rust_log.as_deref()),
        format,
        std::io::stderr,
        ansi,
    )
    .try_init()
    .map_err(|e| LoggingError::AlreadySet(e.to_string()))
}

/// The subscriber [`init`] installs, writing to `writer` (tests pass a buffer).
pub fn subscriber<W>(
    filter: EnvFilter,
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        // Colors only on a terminal: journald and log files get plain text.
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(builder.json().with_ansi(false).finish()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn log_with(filter: EnvFilter, format: LogFormat) -> String {
        let buf = Buffer::default();
        let sub = subscriber(filter, format, buf.clone(), false);
        tracing::subscriber::with_default(sub, || {
            tracing::debug!(target: "quva_test", "hidden detail");
            tracing::info!(target: "quva_test", group = "plant/a", "joined");
        });
        buf.text()
    }

    #[test]
    fn default_filter_applies_without_rust_log() {
        let out = log_with(filter("info", None), LogFormat::Text);
        assert!(out.contains("joined"), "{out}");
        assert!(out.contains("group=\"plant/a\""), "{out}");
        assert!(!out.contains("hidden detail"), "{out}");
        assert!(!out.contains('\u{1b}'), "no colors off a terminal: {out:?}");
    }

    #[test]
    fn rust_log_overrides_the_default_and_bad_values_fall_back() {
        let out = log_with(filter("info", Some("quva_test=debug")), LogFormat::Text);
        assert!(out.contains("hidden detail"), "{out}");
        let out = log_with(filter("warn", Some("")), LogFormat::Text);
        assert!(!out.contains("joined"), "{out}");
        let out = log_with(filter("info", Some("=bad=[")), LogFormat::Text);
        assert!(out.contains("joined") && !out.contains("hidden"), "{out}");
    }

    #[test]
    fn json_lines_parse() {
        let out = log_with(filter("info", None), LogFormat::Json);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["fields"]["message"], "joined");
        assert_eq!(v["fields"]["group"], "plant/a");
        assert_eq!(v["target"], "quva_test");
    }

    #[test]
    fn log_format_flag() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            log: LogArgs,
        }
        let cli = Cli::try_parse_from(["x", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log.log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["x", "--log-format", "xml"]).is_err());
    }
}
