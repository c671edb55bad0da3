//! Daemon configuration: a TOML file (`<data>/ca.toml` or `--config`) overridden by flags, loaded
//! with quva-daemon's [`ConfigSource`] (errors name the file or flag and the key).
//!
//! # Usage
//! ```
//! let cfg: quva_ca::config::Config = toml::from_str("batch_window_ms = 50").unwrap();
//! assert_eq!(cfg.batch_window_ms, 50);
//! assert_eq!(cfg.time_window_ms, 60_000);
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{EngineConfig, Retention};

/// Default gRPC listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

/// Settings of `quva-ca serve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Optional Prometheus text endpoint (`GET /metrics`), off when absent.
    pub metrics_listen: Option<SocketAddr>,
    /// Changes inside this window coalesce into one epoch (PROTOCOL.md §5).
    pub batch_window_ms: u64,
    /// Allowed |T − now| of enrollment and group-key requests.
    pub time_window_ms: u64,
    /// Lifetime of issued certificates.
    pub cert_validity_secs: u64,
    /// Default lifetime of an enrollment secret (PROTOCOL.md §3: 7 days); `RegisterDevice` may
    /// set another per device.
    pub enroll_secret_validity_secs: u64,
    /// How often expiry, revocation and periodic rekeys are checked.
    pub sweep_interval_ms: u64,
    /// Most waiting commands written in one synced batch (group commit); 1 syncs each alone.
    pub max_group_commit: usize,
    /// TLS on the gRPC listener (`[tls]`); plain HTTP/2 when absent.
    pub tls: Option<TlsConfig>,
    /// How long notices and audit entries are kept (`[retention]`).
    pub retention: RetentionConfig,
}

/// `[retention]`: compaction of the notice log and the audit log in the sweep
/// (docs/operations.md, "Retention").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// REKEY and GROUP_UPDATED notices of epochs older than a group's current epoch minus this
    /// many are compacted away (never the latest REKEY notice of a topic); REVOKED notices stay
    /// until their certificate has expired. 0 keeps every notice.
    pub notice_epochs: u32,
    /// Audit entries older than this many days are deleted; 0 keeps them forever.
    pub audit_days: u32,
    /// Most notices, and most audit entries, one sweep reads and deletes.
    pub max_per_sweep: usize,
}

impl Default for RetentionConfig {
    fn default() -> RetentionConfig {
        let r = Retention::default();
        RetentionConfig {
            notice_epochs: r.notice_epochs,
            audit_days: r.audit_days,
            max_per_sweep: r.max_per_sweep,
        }
    }
}

/// `[tls]`: the server's certificate and, optionally, the CA that signs bridges' client
/// certificates (mutual TLS on the device path).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server certificate chain, PEM.
    pub cert: PathBuf,
    /// The server's private key, PEM; must not be readable by group or others.
    pub key: PathBuf,
    /// Root certificate(s) of bridge client certificates, PEM. When set, a device-path call over
    /// a connection with a client certificate that chains to it needs no bridge token.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Refuse device-path calls without such a client certificate, even with the bridge token.
    #[serde(default)]
    pub require_bridge_cert: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            metrics_listen: None,
            batch_window_ms: 200,
            time_window_ms: 60_000,
            cert_validity_secs: 30 * 24 * 3600,
            enroll_secret_validity_secs: 7 * 24 * 3600,
            sweep_interval_ms: 1_000,
            max_group_commit: crate::engine::DEFAULT_MAX_GROUP_COMMIT,
            tls: None,
            retention: RetentionConfig::default(),
        }
    }
}

pub use quva_daemon::config::{ConfigError, ConfigSource};

impl Config {
    /// Loads `path`, or the defaults if `path` does not exist and `required` is false.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and the key if the file cannot be read or parsed.
    pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        ConfigSource::from_file(path, required)?.parse()
    }
}

/// The engine's settings from the configuration file.
impl From<&Config> for EngineConfig {
    fn from(c: &Config) -> EngineConfig {
        EngineConfig {
            batch_window: Duration::from_millis(c.batch_window_ms),
            time_window_ms: c.time_window_ms,
            cert_validity_ms: c.cert_validity_secs.saturating_mul(1000),
            sweep_interval: Duration::from_millis(c.sweep_interval_ms.max(10)),
            max_group_commit: c.max_group_commit.max(1),
            secret_validity_ms: c.enroll_secret_validity_secs.saturating_mul(1000),
            retention: Retention {
                notice_epochs: c.retention.notice_epochs,
                audit_days: c.retention.audit_days,
                max_per_sweep: c.retention.max_per_sweep.max(1),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_keys() {
        let cfg: Config = toml::from_str("").unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.listen.to_string(), DEFAULT_LISTEN);
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
        let cfg: Config =
            toml::from_str("listen = \"0.0.0.0:9000\"\nsweep_interval_ms = 5").unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.sweep_interval_ms, 5);
    }

    #[test]
    fn retention_section() {
        let cfg: Config = toml::from_str("").unwrap();
        let engine = EngineConfig::from(&cfg);
        assert_eq!(engine.retention.notice_epochs, 16);
        assert_eq!(engine.retention.audit_days, 365);
        let cfg: Config =
            toml::from_str("[retention]\nnotice_epochs = 0\naudit_days = 30\n").unwrap();
        let engine = EngineConfig::from(&cfg);
        assert_eq!(engine.retention.notice_epochs, 0);
        assert_eq!(engine.retention.audit_days, 30);
        assert_eq!(engine.retention.max_per_sweep, 1024);
        assert!(toml::from_str::<Config>("[retention]\nnotice_days = 3").is_err());
    }

    #[test]
    fn tls_section() {
        let cfg: Config = toml::from_str(
            "[tls]\ncert = \"/etc/quva-ca/server.crt\"\nkey = \"/etc/quva-ca/server.key\"\n",
        )
        .unwrap();
        let tls = cfg.tls.unwrap();
        assert_eq!(tls.key, PathBuf::from("/etc/quva-ca/server.key"));
        assert_eq!(tls.client_ca, None);
        assert!(!tls.require_bridge_cert);
        assert!(toml::from_str::<Config>("[tls]\ncert = \"a\"\n").is_err());
        assert!(toml::from_str::<Config>("[tls]\ncert = \"a\"\nkey = \"b\"\nextra = 1").is_err());
    }

    #[test]
    fn missing_file_is_default_unless_required() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none.toml");
        assert_eq!(Config::load(&p, false).unwrap(), Config::default());
        assert!(Config::load(&p, true).is_err());
        std::fs::write(&p, "[tls]\ncert = \"a\"\nkey = 7\n").unwrap();
        let err = Config::load(&p, true).unwrap_err().to_string();
        assert!(err.contains("none.toml: tls.key: "), "{err}");
    }
}
