//! The data directory: the CA key, the two tokens, the optional config and the database.
//!
//! Layout (files 0600, directory 0700):
//! - `ca.key`: hex sc(d_CA); `ca.pub`: hex pt(Q_CA) (0644, public);
//! - `admin.token`, `bridge.token`: the bearer tokens;
//! - `ca.toml`: optional configuration ([`crate::config::Config`]);
//! - `db/`: the RocksDB database.
//!
//! # Usage
//! ```
//! use quva_ca::datadir::DataDir;
//! let dir = tempfile::tempdir().unwrap();
//! let data = DataDir::new(dir.path().join("ca"));
//! let init = data.init(&mut rand_core::OsRng).unwrap();
//! assert_eq!(data.ca_key().unwrap().public(), &init.ca_public);
//! assert!(data.init(&mut rand_core::OsRng).is_err());
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use quva_client::curve::{KeyPair, Point, SecretScalar};
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// `init` on a directory that already holds a CA key.
    #[error("{0} already holds a CA key; refusing to overwrite it")]
    AlreadyInitialized(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("{0} is malformed")]
    Malformed(String),
}

/// What `init` created.
pub struct InitOutput {
    /// Q_CA, to pre-load on devices and bridges.
    pub ca_public: Point,
    /// The admin token (also written to `admin.token`).
    pub admin_token: Zeroizing<String>,
    /// The bridge token (also written to `bridge.token`).
    pub bridge_token: Zeroizing<String>,
}

/// A data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), DataDirError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(text.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// 32 random bytes as 64 hex digits.
pub fn random_token(rng: &mut impl CryptoRngCore) -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(&mut bytes[..]);
    Zeroizing::new(hex::encode(&bytes[..]))
}

impl DataDir {
    /// The directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `ca.key`.
    pub fn ca_key_path(&self) -> PathBuf {
        self.root.join("ca.key")
    }

    /// `ca.pub`.
    pub fn ca_pub_path(&self) -> PathBuf {
        self.root.join("ca.pub")
    }

    /// `admin.token`.
    pub fn admin_token_path(&self) -> PathBuf {
        self.root.join("admin.token")
    }

    /// `bridge.token`.
    pub fn bridge_token_path(&self) -> PathBuf {
        self.root.join("bridge.token")
    }

    /// `ca.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("ca.toml")
    }

    /// `db/`.
    pub fn db_path(&self) -> PathBuf {
        self.root.join("db")
    }

    /// Creates the directory, a fresh CA key and both tokens.
    ///
    /// # Errors
    /// [`DataDirError::AlreadyInitialized`] if `ca.key` exists; [`DataDirError::Io`].
    pub fn init(&self, rng: &mut impl CryptoRngCore) -> Result<InitOutput, DataDirError> {
        if self.ca_key_path().exists() {
            return Err(DataDirError::AlreadyInitialized(
                self.root.display().to_string(),
            ));
        }
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
                .map_err(io_err(&self.root))?;
        }
        let ca = KeyPair::random(rng);
        let admin_token = random_token(rng);
        let bridge_token = random_token(rng);
        let key_hex = Zeroizing::new(hex::encode(&ca.secret().to_bytes()[..]));
        write_private(&self.ca_key_path(), &format!("{}\n", &*key_hex))?;
        write_private(&self.admin_token_path(), &format!("{}\n", &*admin_token))?;
        write_private(&self.bridge_token_path(), &format!("{}\n", &*bridge_token))?;
        let pub_path = self.ca_pub_path();
        fs::write(
            &pub_path,
            format!("{}\n", hex::encode(ca.public().to_bytes())),
        )
        .map_err(io_err(&pub_path))?;
        Ok(InitOutput {
            ca_public: *ca.public(),
            admin_token,
            bridge_token,
        })
    }

    fn read_secret(path: &Path) -> Result<Zeroizing<String>, DataDirError> {
        let text = Zeroizing::new(fs::read_to_string(path).map_err(io_err(path))?);
        Ok(Zeroizing::new(text.trim().to_owned()))
    }

    /// Loads the CA key pair.
    ///
    /// # Errors
    /// [`DataDirError::Io`] or [`DataDirError::Malformed`].
    pub fn ca_key(&self) -> Result<KeyPair, DataDirError> {
        let path = self.ca_key_path();
        let text = Self::read_secret(&path)?;
        let malformed = || DataDirError::Malformed(path.display().to_string());
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.as_bytes(), &mut bytes[..]).map_err(|_| malformed())?;
        let secret = SecretScalar::from_bytes(&bytes).map_err(|_| malformed())?;
        Ok(KeyPair::from_secret(secret))
    }

    /// Reads the admin token.
    ///
    /// # Errors
    /// [`DataDirError::Io`].
    pub fn admin_token(&self) -> Result<Zeroizing<String>, DataDirError> {
        Self::read_secret(&self.admin_token_path())
    }

    /// Reads the bridge token.
    ///
    /// # Errors
    /// [`DataDirError::Io`].
    pub fn bridge_token(&self) -> Result<Zeroizing<String>, DataDirError> {
        Self::read_secret(&self.bridge_token_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn init_writes_private_files_once() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path().join("d"));
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let out = data.init(&mut rng).unwrap();
        assert_eq!(data.ca_key().unwrap().public(), &out.ca_public);
        assert_eq!(&*data.admin_token().unwrap(), &*out.admin_token);
        assert_eq!(&*data.bridge_token().unwrap(), &*out.bridge_token);
        assert_ne!(&*out.admin_token, &*out.bridge_token);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for p in [
                data.ca_key_path(),
                data.admin_token_path(),
                data.bridge_token_path(),
            ] {
                let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", p.display());
            }
        }
        assert!(matches!(
            data.init(&mut rng),
            Err(DataDirError::AlreadyInitialized(_))
        ));
    }
}
