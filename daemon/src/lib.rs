//! The plumbing every Quva daemon (`quva-ca`, `quva-bridge`, `quva-node`) starts and stops with.
//!
//! One module per job, so that the three daemons start up one way:
//! - [`shutdown`]: the future that completes on SIGINT or SIGTERM;
//! - [`clock`]: Unix time in milliseconds behind the [`Clock`] trait, and a manual clock for tests;
//! - [`logging`]: `tracing` on stderr, filtered by `RUST_LOG`, as text or JSON lines;
//! - `metrics` (cargo feature `metrics`, off by default): the Prometheus `GET /metrics` endpoint
//!   over hyper, stopping on shutdown; the CA and the bridge enable it, the device daemon does not;
//! - [`config`]: one loader for a TOML file plus flag overrides, whose errors name the file (or
//!   flag) and the key;
//! - [`duration`]: human-readable durations (`500ms`, `5s`, `2m`) for flags.
//!
//! None of it touches the protocol: the daemons pass `now_ms` and their configuration on to the
//! sans-IO core in quva-client.
//!
//! # Usage
//! ```
//! use quva_daemon::clock::{Clock, ManualClock};
//! let clock = ManualClock::new(1_000);
//! clock.advance(500);
//! assert_eq!(clock.now_ms(), 1_500);
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

// The public interface is these modules and the re-exports below.
pub mod clock;
pub mod config;
pub mod duration;
pub mod logging;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod shutdown;

pub use clock::{Clock, ManualClock, SystemClock, now_ms};
pub use config::{ConfigError, ConfigSource};
pub use logging::{LogArgs, LogFormat};
pub use shutdown::shutdown_signal;
