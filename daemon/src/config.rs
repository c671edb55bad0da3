//! One configuration loader for the daemons: a TOML file, then flag overrides (clap also reads
//! each flag's environment variable), deserialized in one pass whose errors name where the value
//! came from and its key: `quva-bridge.toml: limits.ota_max_image_bytes: invalid type: ...`, or
//! `--listen: listen: invalid socket address syntax` when a flag set it.
//!
//! Overrides are written into the TOML table before it is deserialized, so a flag goes through
//! the same parsing and defaults as the file's key it replaces.
//!
//! # Usage
//! ```
//! #[derive(Debug, serde::Deserialize)]
//! #[serde(deny_unknown_fields, default)]
//! struct Config { listen: String, window_ms: u64 }
//! impl Default for Config {
//!     fn default() -> Self { Config { listen: "127.0.0.1:1884".into(), window_ms: 60_000 } }
//! }
//! use quva_daemon::config::ConfigSource;
//! let mut src = ConfigSource::from_text("demo.toml", "window_ms = 5000").unwrap();
//! src.set("listen", "0.0.0.0:1884", "--listen");
//! let cfg: Config = src.parse().unwrap();
//! assert_eq!((cfg.listen.as_str(), cfg.window_ms), ("0.0.0.0:1884", 5000));
//!
//! let err = ConfigSource::from_text("demo.toml", "window_ms = \"soon\"").unwrap()
//!     .parse::<Config>().unwrap_err();
//! assert!(err.to_string().starts_with("demo.toml: window_ms: invalid type"), "{err}");
//! ```

use std::fmt::Display;
use std::path::Path;

use serde::de::DeserializeOwned;

/// Why a configuration could not be loaded; every variant names the file or flag.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// A key has a value that is not acceptable (wrong type, out of range, unknown key).
    #[error("{origin}: {key}: {message}")]
    Value {
        /// The file, or the flag that set the key.
        origin: String,
        /// The dotted key, e.g. `limits.ota_max_image_bytes`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The settings break a rule that spans keys, or one without a single key.
    #[error("{origin}: {message}")]
    Invalid {
        /// The file (or flag).
        origin: String,
        /// What is wrong, naming the keys.
        message: String,
    },
}

impl ConfigError {
    /// The dotted key at fault, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Value { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// A TOML table on its way to a configuration struct, remembering which keys flags set.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    file: String,
    table: toml::Table,
    /// Keys set by [`ConfigSource::set`], with the flag that set each.
    overrides: Vec<(String, String)>,
}

impl ConfigSource {
    /// No file: only defaults and overrides; errors name `name`.
    pub fn empty(name: impl Into<String>) -> ConfigSource {
        ConfigSource {
            file: name.into(),
            table: toml::Table::new(),
            overrides: Vec::new(),
        }
    }

    /// Parses TOML `text`; errors name `name`.
    ///
    /// # Errors
    /// [`ConfigError::Syntax`] with the line and column.
    pub fn from_text(name: impl Into<String>, text: &str) -> Result<ConfigSource, ConfigError> {
        let file = name.into();
        match text.parse::<toml::Table>() {
            Ok(table) => Ok(ConfigSource {
                file,
                table,
                overrides: Vec::new(),
            }),
            Err(e) => {
                let at = e.span().map_or(0, |s| s.start).min(text.len());
                let before = text.get(..at).unwrap_or_default();
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                Err(ConfigError::Syntax {
                    file,
                    line,
                    column,
                    message: e.message().trim().to_owned(),
                })
            }
        }
    }

    /// Reads `path`; a missing file is an empty one unless `required`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Syntax`].
    pub fn from_file(path: &Path, required: bool) -> Result<ConfigSource, ConfigError> {
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => ConfigSource::from_text(file, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(ConfigSource::empty(file))
            }
            Err(source) => Err(ConfigError::Read { file, source }),
        }
    }

    /// The file name errors use.
    pub fn name(&self) -> &str {
        &self.file
    }

    /// Whether the dotted `key` is present (in the file or set by a flag).
    pub fn contains(&self, key: &str) -> bool {
        let mut parts = key.split('.');
        let Some(first) = parts.next() else {
            return false;
        };
        let mut value = self.table.get(first);
        for part in parts {
            value = value.and_then(|v| v.get(part));
        }
        value.is_some()
    }

    /// Sets the dotted `key` (creating tables on the way) to `value`, as the flag `origin` says.
    /// A key below a non-table value replaces that value with a table.
    pub fn set(&mut self, key: &str, value: impl Into<toml::Value>, origin: &str) {
        let mut parts: Vec<&str> = key.split('.').collect();
        let Some(last) = parts.pop() else {
            return;
        };
        let mut table = &mut self.table;
        for part in parts {
            let entry = table
                .entry(part.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            let toml::Value::Table(t) = entry else {
                return;
            };
            table = t;
        }
        table.insert(last.to_owned(), value.into());
        self.overrides.retain(|(k, _)| k != key);
        self.overrides.push((key.to_owned(), origin.to_owned()));
    }

    /// [`ConfigSource::set`] when `value` is `Some`.
    pub fn set_some<V: Into<toml::Value>>(&mut self, key: &str, value: Option<V>, origin: &str) {
        if let Some(v) = value {
            self.set(key, v, origin);
        }
    }

    /// [`ConfigSource::set`] of an unsigned integer when `Some` (TOML integers are `i64`).
    ///
    /// # Errors
    /// [`ConfigError::Value`] naming the flag for a value above `i64::MAX`.
    pub fn set_uint(
        &mut self,
        key: &str,
        value: Option<u64>,
        origin: &str,
    ) -> Result<(), ConfigError> {
        if let Some(v) = value {
            let v = i64::try_from(v).map_err(|_| ConfigError::Value {
                origin: origin.to_owned(),
                key: key.to_owned(),
                message: format!("{v} is too large (at most {})", i64::MAX),
            })?;
            self.set(key, v, origin);
        }
        Ok(())
    }

    /// Deserializes the table into `T`.
    ///
    /// # Errors
    /// [`ConfigError::Value`] naming the key and the file or flag it came from.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let value = toml::Value::Table(self.table.clone());
        serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            let message = e.inner().message().trim().to_owned();
            if key.is_empty() || key == "." {
                ConfigError::Invalid {
                    origin: self.file.clone(),
                    message,
                }
            } else {
                self.invalid(&key, message)
            }
        })
    }

    /// A [`ConfigError::Value`] for `key`, naming the flag that set it or else the file (for
    /// checks after [`ConfigSource::parse`]).
    pub fn invalid(&self, key: &str, message: impl Display) -> ConfigError {
        ConfigError::Value {
            origin: self.origin_of(key).to_owned(),
            key: key.to_owned(),
            message: message.to_string(),
        }
    }

    /// A [`ConfigError::Invalid`] of this file, for a rule that spans keys.
    pub fn rule(&self, message: impl Display) -> ConfigError {
        ConfigError::Invalid {
            origin: self.file.clone(),
            message: message.to_string(),
        }
    }

    /// A [`ConfigError::Invalid`] about `key` (a rule whose `message` names the keys), naming
    /// the flag that set `key` or else the file.
    pub fn rule_for(&self, key: &str, message: impl Display) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin_of(key).to_owned(),
            message: message.to_string(),
        }
    }

    /// The flag that set `key` or a table above it, else the file.
    fn origin_of(&self, key: &str) -> &str {
        self.overrides
            .iter()
            .filter(|(k, _)| {
                key == k
                    || key
                        .strip_prefix(k.as_str())
                        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
            })
            .max_by_key(|(k, _)| k.len())
            .map_or(self.file.as_str(), |(_, origin)| origin.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        listen: SocketAddr,
        limits: Limits,
        protected: Vec<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Limits {
        max_image_bytes: u64,
        max_batch: usize,
    }

    impl Default for Cfg {
        fn default() -> Self {
            Cfg {
                listen: "127.0.0.1:1884".parse().unwrap(),
                limits: Limits::default(),
                protected: Vec::new(),
            }
        }
    }

    impl Default for Limits {
        fn default() -> Self {
            Limits {
                max_image_bytes: 1 << 20,
                max_batch: 64,
            }
        }
    }

    #[test]
    fn defaults_file_values_and_overrides() {
        let src = ConfigSource::from_text("b.toml", "").unwrap();
        assert_eq!(src.parse::<Cfg>().unwrap(), Cfg::default());
        let mut src = ConfigSource::from_text("b.toml", "[limits]\nmax_batch = 8\n").unwrap();
        let cfg: Cfg = src.parse().unwrap();
        assert_eq!(cfg.limits.max_batch, 8);
        assert_eq!(cfg.limits.max_image_bytes, 1 << 20);
        src.set_uint("limits.max_batch", Some(16), "--max-batch")
            .unwrap();
        src.set("listen", "0.0.0.0:9", "--listen");
        src.set(
            "protected",
            vec!["plant/#".to_owned(), "fw/#".to_owned()],
            "--protect",
        );
        src.set_some::<String>("listen", None, "--never");
        assert!(src.contains("limits.max_batch") && src.contains("listen"));
        assert!(!src.contains("limits.max_image_bytes") && !src.contains("tls.cert"));
        let cfg: Cfg = src.parse().unwrap();
        assert_eq!(cfg.limits.max_batch, 16);
        assert_eq!(cfg.listen.port(), 9);
        assert_eq!(cfg.protected, ["plant/#", "fw/#"]);
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let src =
            ConfigSource::from_text("quva-bridge.toml", "[limits]\nmax_image_bytes = \"big\"\n")
                .unwrap();
        let err = src.parse::<Cfg>().unwrap_err();
        assert_eq!(err.key(), Some("limits.max_image_bytes"));
        let text = err.to_string();
        assert!(
            text.starts_with("quva-bridge.toml: limits.max_image_bytes: invalid type"),
            "{text}"
        );
        let err = ConfigSource::from_text("b.toml", "[limits]\nmax_bach = 1\n")
            .unwrap()
            .parse::<Cfg>()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("b.toml: limits"), "{err}");
        assert!(err.contains("unknown field `max_bach`"), "{err}");
        let err = ConfigSource::from_text("b.toml", "listen = \"nowhere\"")
            .unwrap()
            .parse::<Cfg>()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("b.toml: listen: "), "{err}");
    }

    #[test]
    fn errors_in_overridden_keys_name_the_flag() {
        let mut src = ConfigSource::from_text("b.toml", "listen = \"127.0.0.1:1\"").unwrap();
        src.set("listen", "nowhere", "--listen");
        let err = src.parse::<Cfg>().unwrap_err().to_string();
        assert!(err.starts_with("--listen: listen: "), "{err}");
        assert!(
            src.set_uint("limits.max_image_bytes", Some(u64::MAX), "--max")
                .unwrap_err()
                .to_string()
                .starts_with("--max: limits.max_image_bytes: ")
        );
        assert_eq!(
            src.invalid("limits.max_batch", "zero").to_string(),
            "b.toml: limits.max_batch: zero"
        );
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let err = ConfigSource::from_text("n.toml", "a = 1\nb = = 2\n").unwrap_err();
        match &err {
            ConfigError::Syntax { file, line, .. } => {
                assert_eq!(file, "n.toml");
                assert_eq!(*line, 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().starts_with("n.toml:2:"), "{err}");
    }

    #[test]
    fn files_missing_required_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none.toml");
        let src = ConfigSource::from_file(&p, false).unwrap();
        assert_eq!(src.parse::<Cfg>().unwrap(), Cfg::default());
        let err = ConfigSource::from_file(&p, true).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("none.toml"), "{err}");
        std::fs::write(&p, "listen = \"10.0.0.1:1\"\n").unwrap();
        let cfg: Cfg = ConfigSource::from_file(&p, true).unwrap().parse().unwrap();
        assert_eq!(cfg.listen.port(), 1);
    }
}
