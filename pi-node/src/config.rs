//! The device's configuration: `/etc/quva/node.toml`, then command-line flags.
//!
//! Every key is optional; a missing default file is not an error, a missing file named with
//! `--config` is. Unknown keys are refused so that a misspelt setting does not pass silently.
//!
//! ```toml
//! broker = "192.168.1.10:1883"   # the Quva bridge, host:port
//! store = "/var/lib/quva-node"   # key store directory
//! keep_alive_secs = 30
//! connect_timeout_secs = 10
//! reconnect_max_secs = 30
//! grace_ms = 30000               # PROTOCOL.md §5
//! window_ms = 60000              # PROTOCOL.md §6
//! max_payload = 262144
//! ```
//!
//! # Usage
//! ```
//! use quva_node::Config;
//! let cfg = Config::from_toml("broker = \"10.0.0.2:1883\"\nwindow_ms = 30000").unwrap();
//! assert_eq!(cfg.broker.as_deref(), Some("10.0.0.2:1883"));
//! assert_eq!(cfg.device_config().policy.window_ms, 30_000);
//! assert!(Config::from_toml("brokr = \"x\"").is_err());
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::device::DeviceConfig;
use crate::store::DEFAULT_STORE_DIR;

/// The default configuration file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/quva/node.toml";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("invalid configuration {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

/// The configuration as read from the file; flags override fields.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The bridge address `host:port`.
    pub broker: Option<String>,
    /// The key store directory.
    #[serde(default = "default_store")]
    pub store: PathBuf,
    /// MQTT keep-alive interval.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// Time allowed for the TCP connection and CONNACK.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Longest wait between reconnection attempts.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_secs: u64,
    /// How long the previous epoch's key stays usable after a rekey.
    #[serde(default = "default_grace")]
    pub grace_ms: u64,
    /// Accepted |T − now| of messages.
    #[serde(default = "default_window")]
    pub window_ms: u64,
    /// Largest accepted message.
    #[serde(default = "default_max_payload")]
    pub max_payload: usize,
}

fn default_store() -> PathBuf {
    PathBuf::from(DEFAULT_STORE_DIR)
}
fn default_keep_alive() -> u64 {
    30
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_reconnect_max() -> u64 {
    30
}
fn default_grace() -> u64 {
    DeviceConfig::default().grace_ms
}
fn default_window() -> u64 {
    DeviceConfig::default().policy.window_ms
}
fn default_max_payload() -> usize {
    DeviceConfig::default().policy.max_payload
}

impl Default for Config {
    fn default() -> Self {
        Config {
            broker: None,
            store: default_store(),
            keep_alive_secs: default_keep_alive(),
            connect_timeout_secs: default_connect_timeout(),
            reconnect_max_secs: default_reconnect_max(),
            grace_ms: default_grace(),
            window_ms: default_window(),
            max_payload: default_max_payload(),
        }
    }
}

impl Config {
    /// Parses TOML text.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] for invalid TOML or unknown keys.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.message().to_owned(),
        })
    }

    /// Loads `path`; with `required` false a missing file gives the defaults.
    ///
    /// # Errors
    /// [`ConfigError`] for an unreadable or invalid file.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// The device core's settings.
    pub fn device_config(&self) -> DeviceConfig {
        let mut d = DeviceConfig {
            grace_ms: self.grace_ms,
            ..DeviceConfig::default()
        };
        d.policy.window_ms = self.window_ms;
        d.policy.max_payload = self.max_payload;
        d
    }

    /// The keep-alive interval.
    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.keep_alive_secs.max(5))
    }

    /// The connection timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs.max(1))
    }

    /// The longest reconnection back-off.
    pub fn reconnect_max(&self) -> Duration {
        Duration::from_secs(self.reconnect_max_secs.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_files_and_errors() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.store, PathBuf::from("/var/lib/quva-node"));
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("node.toml");
        assert_eq!(Config::load(&missing, false).unwrap(), Config::default());
        assert!(matches!(
            Config::load(&missing, true),
            Err(ConfigError::Read { .. })
        ));
        std::fs::write(
            &missing,
            "store = \"/tmp/x\"\ngrace_ms = 5\nmax_payload = 1024\n",
        )
        .unwrap();
        let cfg = Config::load(&missing, true).unwrap();
        assert_eq!(cfg.store, PathBuf::from("/tmp/x"));
        assert_eq!(cfg.device_config().grace_ms, 5);
        assert_eq!(cfg.device_config().policy.max_payload, 1024);
        std::fs::write(&missing, "grace_ms = \"soon\"\n").unwrap();
        let err = Config::load(&missing, true).unwrap_err();
        assert!(err.to_string().contains("node.toml"), "{err}");
    }
}
