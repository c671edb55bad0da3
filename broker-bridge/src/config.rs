//! The bridge's configuration: a TOML file, every field with a default.
//!
//! Covers the listen address, the upstream broker and its credentials, the CA address and bearer
//! token, the protected topic policy (PROTOCOL.md §8), the windows of PROTOCOL.md §3, §5 and §6,
//! and the connection limits.
//!
//! # Usage
//! ```
//! use quva_bridge::config::Config;
//! let cfg = Config::from_toml(r#"
//!     listen = "127.0.0.1:1884"
//!     [upstream]
//!     address = "127.0.0.1:1883"
//!     [topics]
//!     protected = ["plant/#"]
//! "#).unwrap();
//! assert_eq!(cfg.upstream.address, "127.0.0.1:1883");
//! assert_eq!(cfg.windows.timestamp_ms, 60_000);
//! ```

use std::time::Duration;

use quva_daemon::config::ConfigSource;
use serde::Deserialize;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A secret file (`password_file`, `token_file`, `public_key_file`) could not be read.
    #[error("cannot read a file named in the configuration: {0}")]
    Read(#[from] std::io::Error),
    /// The configuration file, or a flag, is not valid: the error names the file or flag and
    /// the key.
    #[error(transparent)]
    Load(#[from] quva_daemon::config::ConfigError),
    /// A value is out of range.
    #[error("invalid configuration value: {0}")]
    Invalid(&'static str),
    /// The CA's TLS files are unusable.
    #[error("CA TLS: {0}")]
    Tls(#[from] quva_proto::tls::TlsError),
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where devices connect (MQTT over TCP).
    pub listen: String,
    /// Where the Prometheus exporter listens (`GET /metrics`); none if empty.
    pub metrics_listen: String,
    /// The real MQTT 5 broker.
    pub upstream: Upstream,
    /// The CA.
    pub ca: Ca,
    /// Protected topics.
    pub topics: Topics,
    /// Time windows.
    pub windows: Windows,
    /// Resource limits.
    pub limits: Limits,
    /// Following the CA's notice log.
    pub notices: Notices,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:1884".into(),
            metrics_listen: String::new(),
            upstream: Upstream::default(),
            ca: Ca::default(),
            topics: Topics::default(),
            windows: Windows::default(),
            limits: Limits::default(),
            notices: Notices::default(),
        }
    }
}

/// The upstream broker and the bridge's credentials there.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// `host:port` of the broker.
    pub address: String,
    /// MQTT user name of the bridge (every upstream connection uses it).
    pub username: Option<String>,
    /// Its password.
    pub password: Option<String>,
    /// A file holding the password (first line), instead of `password`.
    pub password_file: Option<String>,
    /// Client identifier of the bridge's own connection (notices, certificate lists); must
    /// start with `qb-`, a prefix no device connection can reach (PROTOCOL.md §8).
    pub client_id: String,
    /// Connect timeout in milliseconds.
    pub connect_timeout_ms: u64,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            address: "127.0.0.1:1883".into(),
            username: None,
            password: None,
            password_file: None,
            client_id: "qb-notices".into(),
            connect_timeout_ms: 5_000,
        }
    }
}

/// The CA endpoint and how the bridge authenticates: a bearer token, or a client certificate
/// over mutual TLS.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ca {
    /// gRPC endpoint, e.g. `http://127.0.0.1:50051`; empty for none (only unprotected relaying).
    pub endpoint: String,
    /// Bearer token of the `bridge` role.
    pub token: Option<String>,
    /// A file holding the token (first line), instead of `token`.
    pub token_file: Option<String>,
    /// Root certificate (PEM) of the CA's TLS server; enables TLS (use an `https://` endpoint).
    pub ca_cert: Option<String>,
    /// The bridge's client certificate chain (PEM) for mutual TLS; the token may then be omitted.
    pub cert: Option<String>,
    /// The client certificate's private key (PEM).
    pub key: Option<String>,
    /// The name in the CA's server certificate, if not the endpoint's host.
    pub tls_domain: Option<String>,
    /// Timeout of one CA call in milliseconds.
    pub timeout_ms: u64,
    /// How long a group's data stays cached without a notice, in milliseconds.
    pub group_ttl_ms: u64,
    /// The CA's public key pt(Q_CA) in hex, pinned: the bridge never trusts the CA link's answer
    /// (PROTOCOL.md §8). Required with an endpoint.
    pub public_key: Option<String>,
    /// A file holding `public_key` (the CA's `ca.pub`), instead of `public_key`.
    pub public_key_file: Option<String>,
    /// Interval of HTTP/2 keepalive pings on the CA link, ms; a link that does not answer one
    /// within the same time is closed and reconnected (0: no pings).
    pub keepalive_ms: u64,
}

impl Default for Ca {
    fn default() -> Self {
        Ca {
            endpoint: String::new(),
            token: None,
            token_file: None,
            ca_cert: None,
            cert: None,
            key: None,
            tls_domain: None,
            timeout_ms: 3_000,
            group_ttl_ms: 60_000,
            public_key: None,
            public_key_file: None,
            keepalive_ms: 10_000,
        }
    }
}

/// Protected topics.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topics {
    /// MQTT topic filters whose topics are Quva groups.
    pub protected: Vec<String>,
    /// Whether connections without a Quva method (and MQTT 3.1.1 clients) are accepted for
    /// unprotected topics.
    pub allow_unauthenticated: Option<bool>,
}

impl Topics {
    /// Whether unauthenticated connections are accepted (default yes).
    pub fn unauthenticated_allowed(&self) -> bool {
        self.allow_unauthenticated.unwrap_or(true)
    }
}

/// Following the CA's notice log (docs/operations-bridge.md, "Notice state file").
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Notices {
    /// Where the bridge keeps its position in the notice log and what it built from the log
    /// (the retained set, the revocations), so that a restart resumes there instead of reading
    /// the log from its start. None: every start reads the whole log.
    pub state_file: Option<String>,
}

/// Time windows of PROTOCOL.md §3, §5 and §6.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Windows {
    /// Accepted |T − now| of messages and connect proofs, ms (default 60 s).
    pub timestamp_ms: u64,
    /// How long the previous epoch stays valid after a rekey, ms (default 30 s).
    pub epoch_grace_ms: u64,
    /// Capacity of each partition of the replay caches (entries): per group and sender for
    /// messages, per identity for connect proofs (PROTOCOL.md §8). A sender that fills its
    /// partition raises only its own floor.
    pub replay_capacity: usize,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            timestamp_ms: 60_000,
            epoch_grace_ms: 30_000,
            replay_capacity: 65_536,
        }
    }
}

/// Resource limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest MQTT packet accepted from a device or the broker, bytes.
    pub max_packet_size: u32,
    /// Largest protected PUBLISH payload, bytes (default 256 KiB).
    pub max_payload: usize,
    /// Simultaneous device connections.
    pub max_connections: usize,
    /// Time a new connection has to send its CONNECT, ms.
    pub handshake_timeout_ms: u64,
    /// Idle time after which a connection without keep-alive is closed, ms (0: never). It also
    /// caps the keep-alive of unauthenticated connections, through the CONNACK's Server Keep
    /// Alive (default 300 s).
    pub idle_timeout_ms: u64,
    /// Most protected PUBLISHes verified in one batch.
    pub max_batch: usize,
    /// How long shutdown waits for connections to close, ms.
    pub shutdown_grace_ms: u64,
    /// Largest OTA image a manifest may announce, bytes (default 256 MiB, PROTOCOL.md §7.2).
    pub ota_max_image_bytes: u64,
    /// Accepted OTA releases remembered per group (default 4): the oldest is forgotten first,
    /// and its signer republishes its manifest before publishing more of its chunks.
    pub ota_releases_per_group: usize,
    /// Accepted OTA releases remembered in all (default 256). Each costs at most about twice
    /// `max_payload` (the signed manifest and its decoded chunk hashes).
    pub ota_max_releases: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_size: 300 * 1024,
            max_payload: 256 * 1024,
            max_connections: 10_000,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            max_batch: 64,
            shutdown_grace_ms: 5_000,
            ota_max_image_bytes: quva_client::ota::DEFAULT_MAX_IMAGE_SIZE,
            ota_releases_per_group: 4,
            ota_max_releases: 256,
        }
    }
}

impl Config {
    /// Parses TOML text.
    ///
    /// # Errors
    /// [`ConfigError::Load`] naming the key.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_source(&ConfigSource::from_text("configuration", text)?)
    }

    /// Reads and parses a TOML file.
    ///
    /// # Errors
    /// [`ConfigError::Load`] naming the file and the key.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        Self::from_source(&ConfigSource::from_file(path, true)?)
    }

    /// Parses a file with flag overrides and checks it; a failed check names the file, or the
    /// flag that set the key.
    ///
    /// # Errors
    /// [`ConfigError::Load`].
    pub fn from_source(src: &ConfigSource) -> Result<Self, ConfigError> {
        let cfg: Config = src.parse()?;
        match cfg.validate() {
            Ok(()) => Ok(cfg),
            Err(ConfigError::Invalid(what)) => {
                // Each message starts with the key it is about.
                let key = what.split([' ', ':']).next().unwrap_or(what);
                Err(if key == what {
                    src.invalid(key, "invalid value").into()
                } else {
                    src.rule_for(key, what).into()
                })
            }
            Err(other) => Err(other),
        }
    }

    /// Checks ranges.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if crate::topics::TopicPolicy::new(&self.topics.protected).is_err() {
            return Err(ConfigError::Invalid("topics.protected"));
        }
        if self.limits.max_packet_size < 1024 {
            return Err(ConfigError::Invalid("limits.max_packet_size"));
        }
        if self.limits.max_connections == 0 {
            return Err(ConfigError::Invalid("limits.max_connections"));
        }
        if self.limits.max_batch == 0 {
            return Err(ConfigError::Invalid("limits.max_batch"));
        }
        if !self
            .upstream
            .client_id
            .starts_with(crate::identity::BRIDGE_PREFIX)
            || self.upstream.client_id.len() > 23
        {
            return Err(ConfigError::Invalid(
                "upstream.client_id must start with qb- and have at most 23 characters",
            ));
        }
        if self.ca.public_key.is_some() && self.ca.public_key_file.is_some() {
            return Err(ConfigError::Invalid(
                "ca.public_key and ca.public_key_file: give one",
            ));
        }
        if self.limits.ota_releases_per_group == 0 {
            return Err(ConfigError::Invalid("limits.ota_releases_per_group"));
        }
        if self.limits.ota_max_releases < self.limits.ota_releases_per_group {
            return Err(ConfigError::Invalid(
                "limits.ota_max_releases must be at least limits.ota_releases_per_group",
            ));
        }
        if self.windows.replay_capacity == 0 {
            return Err(ConfigError::Invalid("windows.replay_capacity"));
        }
        Ok(())
    }

    /// The upstream password, from `password` or `password_file`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] if the file cannot be read.
    pub fn upstream_password(&self) -> Result<Option<String>, ConfigError> {
        secret(&self.upstream.password, &self.upstream.password_file)
    }

    /// The CA bearer token, from `token` or `token_file`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] if the file cannot be read.
    pub fn ca_token(&self) -> Result<Option<String>, ConfigError> {
        secret(&self.ca.token, &self.ca.token_file)
    }

    /// The TLS settings of the CA connection, when `ca.ca_cert` is set.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for a client certificate or key without a `ca_cert`.
    pub fn ca_tls(&self) -> Result<Option<quva_proto::tls::ClientTls>, ConfigError> {
        let Some(ca_cert) = &self.ca.ca_cert else {
            if self.ca.cert.is_some() || self.ca.key.is_some() {
                return Err(ConfigError::Invalid("ca.cert and ca.key need ca.ca_cert"));
            }
            return Ok(None);
        };
        Ok(Some(quva_proto::tls::ClientTls {
            ca_cert: ca_cert.into(),
            cert: self.ca.cert.as_ref().map(Into::into),
            key: self.ca.key.as_ref().map(Into::into),
            domain: self.ca.tls_domain.clone(),
        }))
    }

    /// The pinned Q_CA, from `ca.public_key` or `ca.public_key_file`.
    ///
    /// # Errors
    /// [`ConfigError`] if the file cannot be read or the key is not a valid hex point.
    pub fn ca_public_key(&self) -> Result<Option<quva_client::curve::Point>, ConfigError> {
        let Some(text) = secret(&self.ca.public_key, &self.ca.public_key_file)? else {
            return Ok(None);
        };
        let bytes = hex_decode(text.trim()).ok_or(ConfigError::Invalid("ca.public_key"))?;
        quva_client::curve::Point::from_bytes(&bytes)
            .map(Some)
            .ok_or(ConfigError::Invalid("ca.public_key"))
    }

    /// The CA call timeout.
    pub fn ca_timeout(&self) -> Duration {
        Duration::from_millis(self.ca.timeout_ms)
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn secret(value: &Option<String>, file: &Option<String>) -> Result<Option<String>, ConfigError> {
    if let Some(v) = value {
        return Ok(Some(v.clone()));
    }
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)?;
            Ok(Some(
                text.lines().next().unwrap_or_default().trim().to_owned(),
            ))
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg.limits.max_payload, 256 * 1024);
        assert_eq!(cfg.windows.epoch_grace_ms, 30_000);
        let cfg = Config::from_toml("[limits]\nmax_connections = 3\n").unwrap();
        assert_eq!(cfg.limits.max_connections, 3);
        assert_eq!(cfg.limits.ota_max_image_bytes, 256 * 1024 * 1024);
        let cfg = Config::from_toml("[limits]\nota_max_image_bytes = 1048576\n").unwrap();
        assert_eq!(cfg.limits.ota_max_image_bytes, 1 << 20);
    }

    #[test]
    fn ca_tls_settings() {
        let cfg = Config::from_toml("[ca]\nendpoint = \"http://127.0.0.1:7443\"\n").unwrap();
        assert_eq!(cfg.ca_tls().unwrap(), None);
        let cfg = Config::from_toml(
            "[ca]\nendpoint = \"https://ca:7443\"\nca_cert = \"/etc/quva/ca-root.pem\"\n\
             cert = \"/etc/quva/bridge.pem\"\nkey = \"/etc/quva/bridge.key\"\n",
        )
        .unwrap();
        let tls = cfg.ca_tls().unwrap().unwrap();
        assert_eq!(
            tls.ca_cert,
            std::path::PathBuf::from("/etc/quva/ca-root.pem")
        );
        assert_eq!(tls.key, Some("/etc/quva/bridge.key".into()));
        let cfg = Config::from_toml("[ca]\ncert = \"/etc/quva/bridge.pem\"\n").unwrap();
        assert!(cfg.ca_tls().is_err());
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        assert!(Config::from_toml("nonsense = 1").is_err());
        assert!(Config::from_toml("[topics]\nprotected = [\"quva/#\"]").is_err());
        assert!(Config::from_toml("[limits]\nmax_connections = 0").is_err());
        assert!(Config::from_toml("[limits]\nota_releases_per_group = 0").is_err());
        assert!(
            Config::from_toml("[limits]\nota_releases_per_group = 8\nota_max_releases = 4")
                .is_err()
        );
    }

    #[test]
    fn load_errors_name_the_file_flag_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quva-bridge.toml");
        std::fs::write(&path, "[limits]\nota_max_image_bytes = \"lots\"\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("quva-bridge.toml: limits.ota_max_image_bytes: invalid type"),
            "{err}"
        );
        std::fs::write(&path, "[limits]\nmax_connections = 0\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.ends_with("quva-bridge.toml: limits.max_connections: invalid value"),
            "{err}"
        );
        std::fs::write(&path, "[upstream]\nclient_id = \"bridge\"\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.ends_with("quva-bridge.toml: upstream.client_id must start with qb- and have at most 23 characters"),
            "{err}"
        );
        let mut src = ConfigSource::from_file(&path, true).unwrap();
        src.set("upstream.client_id", "qb-ok", "--x");
        src.set("topics.protected", vec!["quva/#".to_owned()], "--protect");
        let err = Config::from_source(&src).unwrap_err().to_string();
        assert!(
            err.ends_with("--protect: topics.protected: invalid value"),
            "{err}"
        );
        assert!(Config::load(&dir.path().join("missing.toml")).is_err());
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\nignored\n").unwrap();
        let text = format!(
            "[upstream]\npassword_file = {:?}\n",
            path.display().to_string()
        );
        let cfg = Config::from_toml(&text).unwrap();
        assert_eq!(cfg.upstream_password().unwrap().as_deref(), Some("s3cret"));
    }
}
