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
//!
//! [ota]                          # group OTA, PROTOCOL.md §7.2 (off without groups)
//! groups = ["fw/sensor-v2"]      # OTA groups this device follows as a subscriber
//! signers = ["release-1"]        # pinned release signers: no other device's release is accepted
//! download_dir = "/var/lib/quva-node/ota"   # default: <store>/ota
//! apply_command = ["/usr/lib/quva-node/quva-node-apply-binary"]  # + the image path
//! max_image_bytes = 67108864     # 64 MiB
//! apply_timeout_secs = 600       # the apply command is killed (and the release failed) after this
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

use quva_daemon::config::ConfigSource;
use serde::Deserialize;

use quva_client::ids::{DeviceId, GroupId};
use quva_client::topics::OTA_LEVEL;

use crate::store::DEFAULT_STORE_DIR;
use quva_client::device::DeviceConfig;

/// The default configuration file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/quva/node.toml";

/// Why the configuration could not be loaded: quva-daemon's error, which names the file and
/// the key.
pub use quva_daemon::config::ConfigError;

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
    /// Group OTA (PROTOCOL.md §7.2): the `[ota]` table.
    #[serde(default)]
    pub ota: OtaConfig,
}

/// The default largest OTA image a device accepts: 64 MiB.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 64 * 1024 * 1024;

/// The `[ota]` table: which releases this device follows and how it applies them.
///
/// With no `groups` the device takes no part in group OTA. With groups, `signers` and
/// `apply_command` are required: a release is accepted only from a pinned signer, and a verified
/// image is useless without a command that applies it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtaConfig {
    /// The OTA groups this device follows as a subscriber (group IDs, e.g. `fw/sensor-v2`).
    #[serde(default)]
    pub groups: Vec<String>,
    /// The pinned release signers (device IDs): releases signed by anyone else are refused.
    #[serde(default)]
    pub signers: Vec<String>,
    /// Where downloads are staged and progress is kept (default `<store>/ota`).
    #[serde(default)]
    pub download_dir: Option<PathBuf>,
    /// The command that applies a verified image, as an argument list: it runs with the image
    /// path appended and `QUVA_OTA_GROUP`, `QUVA_OTA_VERSION` and `QUVA_OTA_NAME` in its
    /// environment; exit status 0 means applied.
    #[serde(default)]
    pub apply_command: Vec<String>,
    /// The largest image accepted, in bytes (default 64 MiB).
    #[serde(default = "default_max_image_bytes")]
    pub max_image_bytes: u64,
    /// How long the apply command may run, in seconds (default 600): then it is killed and the
    /// release reported `failed`.
    #[serde(default = "default_apply_timeout_secs")]
    pub apply_timeout_secs: u64,
}

/// The default time an apply command may run: 10 minutes.
pub const DEFAULT_APPLY_TIMEOUT_SECS: u64 = 600;

fn default_max_image_bytes() -> u64 {
    DEFAULT_MAX_IMAGE_BYTES
}

fn default_apply_timeout_secs() -> u64 {
    DEFAULT_APPLY_TIMEOUT_SECS
}

impl Default for OtaConfig {
    fn default() -> Self {
        OtaConfig {
            groups: Vec::new(),
            signers: Vec::new(),
            download_dir: None,
            apply_command: Vec::new(),
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            apply_timeout_secs: DEFAULT_APPLY_TIMEOUT_SECS,
        }
    }
}

/// The `[ota]` table checked and typed, with the download directory resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtaSettings {
    /// The OTA groups followed.
    pub groups: Vec<GroupId>,
    /// The pinned signers.
    pub signers: Vec<DeviceId>,
    /// The download directory.
    pub download_dir: PathBuf,
    /// The apply command (program first); the image path is appended.
    pub apply_command: Vec<String>,
    /// The largest image accepted, in bytes.
    pub max_image_bytes: u64,
    /// How long the apply command may run before it is killed.
    pub apply_timeout: Duration,
}

impl OtaConfig {
    /// Whether OTA is configured (at least one group).
    pub fn is_enabled(&self) -> bool {
        !self.groups.is_empty()
    }

    /// Checks the table and types it; `store` is the key store, under which the download
    /// directory defaults to `ota`.
    ///
    /// # Errors
    /// A message naming the bad value: an invalid or reserved group ID (a level starting with
    /// `_`), an invalid signer ID, groups without signers or without an apply command, a
    /// relative apply program, a zero size limit or a zero apply timeout.
    pub fn settings(&self, store: &Path) -> Result<OtaSettings, String> {
        let mut groups = Vec::new();
        for g in &self.groups {
            let id = GroupId::new(g).map_err(|e| format!("ota.groups: {g:?}: {e}"))?;
            if g.split('/').any(|level| level.starts_with('_')) {
                return Err(format!(
                    "ota.groups: {g:?}: a level starting with '_' is reserved ({OTA_LEVEL}, _q)"
                ));
            }
            if !groups.contains(&id) {
                groups.push(id);
            }
        }
        let mut signers = Vec::new();
        for s in &self.signers {
            let id = DeviceId::new(s).map_err(|e| format!("ota.signers: {s:?}: {e}"))?;
            if !signers.contains(&id) {
                signers.push(id);
            }
        }
        if !groups.is_empty() {
            if signers.is_empty() {
                return Err(
                    "ota.signers: at least one pinned signer is needed with ota.groups".to_owned(),
                );
            }
            match self.apply_command.first() {
                None => {
                    return Err("ota.apply_command: a command is needed with ota.groups".to_owned());
                }
                Some(p) if !Path::new(p).is_absolute() => {
                    return Err(format!(
                        "ota.apply_command: {p:?} must be an absolute path (no PATH lookup)"
                    ));
                }
                Some(_) => {}
            }
        }
        if self.max_image_bytes == 0 {
            return Err("ota.max_image_bytes: must be at least 1".to_owned());
        }
        if self.apply_timeout_secs == 0 {
            return Err("ota.apply_timeout_secs: must be at least 1".to_owned());
        }
        Ok(OtaSettings {
            groups,
            signers,
            download_dir: self
                .download_dir
                .clone()
                .unwrap_or_else(|| store.join("ota")),
            apply_command: self.apply_command.clone(),
            max_image_bytes: self.max_image_bytes,
            apply_timeout: Duration::from_secs(self.apply_timeout_secs),
        })
    }
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
            ota: OtaConfig::default(),
        }
    }
}

impl Config {
    /// Parses TOML text.
    ///
    /// # Errors
    /// [`ConfigError::Value`] for invalid TOML values or unknown keys, [`ConfigError::Invalid`]
    /// for an `[ota]` table that does not pass [`OtaConfig::settings`].
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_source(&ConfigSource::from_text("configuration", text)?)
    }

    /// The `[ota]` settings, with the download directory under this configuration's store.
    ///
    /// # Errors
    /// As [`OtaConfig::settings`].
    pub fn ota_settings(&self) -> Result<OtaSettings, String> {
        self.ota.settings(&self.store)
    }

    /// Loads `path`; with `required` false a missing file gives the defaults.
    ///
    /// # Errors
    /// [`ConfigError`] for an unreadable or invalid file, naming it.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        Self::from_source(&ConfigSource::from_file(path, required)?)
    }

    /// Parses and checks a loaded file.
    fn from_source(src: &ConfigSource) -> Result<Self, ConfigError> {
        let cfg: Config = src.parse()?;
        cfg.ota_settings().map_err(|message| src.rule(message))?;
        Ok(cfg)
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

    #[test]
    fn ota_defaults_and_settings() {
        let cfg = Config::from_toml("store = \"/srv/q\"").unwrap();
        assert!(!cfg.ota.is_enabled());
        let s = cfg.ota_settings().unwrap();
        assert!(s.groups.is_empty());
        assert_eq!(s.download_dir, PathBuf::from("/srv/q/ota"));
        assert_eq!(s.max_image_bytes, 64 * 1024 * 1024);
        assert_eq!(s.apply_timeout, Duration::from_secs(600));
        let cfg = Config::from_toml(
            "[ota]\ngroups = [\"fw/sensor-v2\"]\nsigners = [\"release-1\"]\n\
             apply_command = [\"/usr/bin/apply\", \"--now\"]\nmax_image_bytes = 1000\n\
             download_dir = \"/tmp/ota\"\napply_timeout_secs = 90\n",
        )
        .unwrap();
        let s = cfg.ota_settings().unwrap();
        assert!(cfg.ota.is_enabled());
        assert_eq!(s.groups, vec![GroupId::new("fw/sensor-v2").unwrap()]);
        assert_eq!(s.signers, vec![DeviceId::new("release-1").unwrap()]);
        assert_eq!(s.apply_command, vec!["/usr/bin/apply", "--now"]);
        assert_eq!(s.max_image_bytes, 1000);
        assert_eq!(s.download_dir, PathBuf::from("/tmp/ota"));
        assert_eq!(s.apply_timeout, Duration::from_secs(90));
    }

    #[test]
    fn ota_refuses_what_would_weaken_it() {
        let ok = "signers = [\"r\"]\napply_command = [\"/bin/true\"]\n";
        for (bad, needle) in [
            (
                "[ota]\ngroups = [\"fw\"]\napply_command = [\"/bin/true\"]",
                "signers",
            ),
            (
                "[ota]\ngroups = [\"fw\"]\nsigners = [\"r\"]",
                "apply_command",
            ),
            (
                "[ota]\ngroups = [\"fw\"]\nsigners = [\"r\"]\napply_command = [\"apply\"]",
                "absolute",
            ),
            (&format!("[ota]\ngroups = [\"fw/_ota\"]\n{ok}"), "reserved"),
            (&format!("[ota]\ngroups = [\"fw/+\"]\n{ok}"), "ota.groups"),
            ("[ota]\nsigners = [\"bad id\"]", "ota.signers"),
            ("[ota]\nmax_image_bytes = 0", "max_image_bytes"),
            ("[ota]\napply_timeout_secs = 0", "apply_timeout_secs"),
            ("[ota]\ngroup = [\"fw\"]", "unknown field"),
        ] {
            let err = Config::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "[ota]\nmax_image_bytes = 0\n").unwrap();
        let err = Config::load(&path, true).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("node.toml"), "{err}");
    }
}
