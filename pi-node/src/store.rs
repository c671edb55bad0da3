//! The device's key store: credentials and group keys on disk.
//!
//! A directory (default `/var/lib/quva-node`, mode 0700) of files (mode 0600), each written
//! atomically: a temporary file in the same directory, `fsync`, `rename` over the old file, then
//! `fsync` of the directory, so a crash leaves either the old or the new file. Every file is one
//! record `"QVN1" || u8 kind || blob(body) || SHA-256(all before)`, so that truncation or a flipped
//! bit is detected as corruption rather than read as a different key. Secrets are read into
//! zeroizing buffers.
//!
//! Files:
//! - `credentials`: `sc(d_i) || sc(g_i) || pt(Q_CA) || blob(cert)`; loading checks that the
//!   certificate opens to d_i·G under Q_CA and that g_i·G is its G_i (PROTOCOL.md §3).
//! - `settings`: `str(broker address)`, remembered from enrollment.
//! - `groups/<base64url(group)>.<pub|sub>` (record kind 4): `str(group) || u8 role ||
//!   blob(ginfo || sig) || blob(key set) || u64 saved_ms`, the key set of PROTOCOL.md §5.1:
//!   `sc(X) || u32 W || u32 leaf || u8 count || count × (u32 node || 32-byte key)`, the held key
//!   with its key-tree path, so that a restarted device follows the next tree notice. Loading
//!   checks the path's shape; restoring ([`Device::restore`](quva_client::device::Device::restore)) checks the CA's signature
//!   and X·G. A file of the format before key trees (record kind 2: `sc(held key)` in place of
//!   the key set) is loaded as [`StoredGroup::Outdated`]: its key is never used, the device joins
//!   that role again with a group-key request, and the next save replaces the file.
//!
//! The store refuses a directory or file that other users can read or write.
//!
//! # Usage
//! ```
//! use quva_node::KeyStore;
//! let dir = tempfile::tempdir().unwrap();
//! let store = KeyStore::create(dir.path().join("node")).unwrap();
//! assert!(!store.is_enrolled());
//! store.save_broker("127.0.0.1:1883").unwrap();
//! assert_eq!(store.broker().unwrap().as_deref(), Some("127.0.0.1:1883"));
//! ```

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use quva_client::codec::{
    Decode, DecodeError, Encode, Reader, put_blob, put_point, put_str, put_u8, put_u64,
};
use quva_client::curve::{KeyPair, Point, sha256};
use quva_client::enrollment::{Credentials, EnrollError, ImplicitCert};
use quva_client::group::SignedGroupInfo;
use quva_client::ids::{GroupId, Role};
use quva_client::rekey::tree::TreeKeySet;
use zeroize::Zeroizing;

use quva_client::device::StoredGroupKey;

/// The default key store directory.
pub const DEFAULT_STORE_DIR: &str = "/var/lib/quva-node";

const MAGIC: &[u8; 4] = b"QVN1";
const KIND_CREDENTIALS: u8 = 1;
/// A group key without its key-tree path (before PROTOCOL.md v1.1): read, never written.
const KIND_GROUP_KEY_V1: u8 = 2;
const KIND_SETTINGS: u8 = 3;
/// A group key with its key-tree path (PROTOCOL.md §5.1).
const KIND_GROUP_KEY_SET: u8 = 4;
const CREDENTIALS_FILE: &str = "credentials";
const SETTINGS_FILE: &str = "settings";
const GROUPS_DIR: &str = "groups";

/// Why the key store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The device has not been enrolled yet.
    #[error("no credentials in {0}: run `quva-node enroll` first")]
    NotEnrolled(PathBuf),
    /// Other users may read or write a key store path.
    #[error(
        "{path} has mode {mode:o}; the key store must not be accessible to other users \
         (chmod {want:o} {path})"
    )]
    Permissions {
        /// The path.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
        /// The mode it should have.
        want: u32,
    },
    /// A file's checksum, framing or contents are wrong.
    #[error("{path} is corrupt ({what}); restore it from a backup or enroll again")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
    /// The credentials do not belong together.
    #[error("{path}: the stored key does not match its certificate: {error}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: EnrollError,
    },
}

/// One file of the key store's groups directory.
#[derive(Clone, Debug)]
pub enum StoredGroup {
    /// A group key with its key-tree path, and the time it was saved.
    Key(Box<StoredGroupKey>, u64),
    /// A key file of the format before key trees: the held key without its key-tree path. It
    /// cannot follow tree notices (PROTOCOL.md §5.1), so its key is not used: the device joins
    /// the role again with a group-key request, and the next save replaces the file.
    Outdated {
        /// The group.
        group: GroupId,
        /// The role.
        role: Role,
    },
}

impl StoredGroup {
    /// The group and role of the file.
    pub fn role(&self) -> (&GroupId, Role) {
        match self {
            StoredGroup::Key(k, _) => (&k.group, k.role),
            StoredGroup::Outdated { group, role } => (group, *role),
        }
    }
}

/// The device's key store directory.
#[derive(Clone, Debug)]
pub struct KeyStore {
    root: PathBuf,
}

/// Loaded credentials and the CA public key they were issued under.
#[derive(Clone, Debug)]
pub struct StoredCredentials {
    /// d_i, g_i and the certificate.
    pub credentials: Credentials,
    /// Q_CA.
    pub ca_public: Point,
}

impl KeyStore {
    /// Opens an existing store, checking the directory's permissions.
    ///
    /// # Errors
    /// [`StoreError::NotEnrolled`] if the directory is missing, [`StoreError::Permissions`] if it
    /// is accessible to other users, [`StoreError::Io`] if it cannot be examined.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        if !root.exists() {
            return Err(StoreError::NotEnrolled(root));
        }
        check_mode(&root, 0o700)?;
        Ok(KeyStore { root })
    }

    /// Opens the store, creating the directory (mode 0700) if it does not exist.
    ///
    /// # Errors
    /// As [`KeyStore::open`], or [`StoreError::Io`] if the directory cannot be created.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        if !root.exists() {
            create_private_dir(&root)?;
        }
        Self::open(root)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Saves `body` as the record `name` (a file name, or `dir/file` under the store) of
    /// `kind`, atomically, for the daemon's other state (direct-message floors, releases,
    /// status reports).
    pub(crate) fn save_named(&self, name: &str, kind: u8, body: &[u8]) -> Result<(), StoreError> {
        let path = self.file(name);
        if let Some(parent) = path.parent()
            && parent != self.root
            && !parent.exists()
        {
            create_private_dir(parent)?;
        }
        self.write_record(&path, kind, body)
    }

    /// The record `name` of `kind`, if it exists.
    pub(crate) fn load_named(
        &self,
        name: &str,
        kind: u8,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let path = self.file(name);
        if !path.exists() {
            return Ok(None);
        }
        self.read_record(&path, kind).map(Some)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Whether credentials are stored.
    pub fn is_enrolled(&self) -> bool {
        self.file(CREDENTIALS_FILE).exists()
    }

    /// Stores the credentials and Q_CA, replacing any earlier ones.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn save_credentials(
        &self,
        creds: &Credentials,
        ca_public: &Point,
    ) -> Result<(), StoreError> {
        let mut body = Zeroizing::new(Vec::new());
        body.extend_from_slice(&creds.key().secret().to_bytes()[..]);
        body.extend_from_slice(&creds.group_secret().to_bytes()[..]);
        put_point(&mut body, ca_public);
        put_blob(&mut body, &creds.cert().to_bytes());
        self.write_record(&self.file(CREDENTIALS_FILE), KIND_CREDENTIALS, &body)
    }

    /// Loads and checks the credentials.
    ///
    /// # Errors
    /// [`StoreError::NotEnrolled`], [`StoreError::Corrupt`], [`StoreError::Mismatch`],
    /// [`StoreError::Permissions`] or [`StoreError::Io`].
    pub fn load_credentials(&self) -> Result<StoredCredentials, StoreError> {
        let path = self.file(CREDENTIALS_FILE);
        if !path.exists() {
            return Err(StoreError::NotEnrolled(self.root.clone()));
        }
        let body = self.read_record(&path, KIND_CREDENTIALS)?;
        let corrupt = |_: DecodeError| StoreError::Corrupt {
            path: path.clone(),
            what: "credentials",
        };
        let mut r = Reader::new(&body);
        let d = r.secret_scalar("d_i").map_err(corrupt)?;
        let g = r.secret_scalar("g_i").map_err(corrupt)?;
        let ca_public = r.point("Q_CA").map_err(corrupt)?;
        let cert = ImplicitCert::from_bytes(r.blob("cert").map_err(corrupt)?).map_err(corrupt)?;
        r.finish("credentials").map_err(corrupt)?;
        let credentials = Credentials::from_parts(KeyPair::from_secret(d), g, cert, &ca_public)
            .map_err(|error| StoreError::Mismatch {
                path: path.clone(),
                error,
            })?;
        Ok(StoredCredentials {
            credentials,
            ca_public,
        })
    }

    /// Remembers the broker (bridge) address.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn save_broker(&self, address: &str) -> Result<(), StoreError> {
        let mut body = Vec::new();
        put_str(&mut body, address);
        self.write_record(&self.file(SETTINGS_FILE), KIND_SETTINGS, &body)
    }

    /// The remembered broker address, if any.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`], [`StoreError::Permissions`] or [`StoreError::Io`].
    pub fn broker(&self) -> Result<Option<String>, StoreError> {
        let path = self.file(SETTINGS_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let body = self.read_record(&path, KIND_SETTINGS)?;
        let mut r = Reader::new(&body);
        let corrupt = |_| StoreError::Corrupt {
            path: path.clone(),
            what: "settings",
        };
        let address = r.str("broker").map_err(corrupt)?.to_owned();
        r.finish("settings").map_err(corrupt)?;
        Ok(Some(address))
    }

    fn group_file(&self, group: &GroupId, role: Role) -> PathBuf {
        let name = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(group.as_str());
        self.root
            .join(GROUPS_DIR)
            .join(format!("{name}.{}", role.topic_segment()))
    }

    /// Stores a group key with its key-tree path, replacing the group and role's earlier one
    /// (also one of the outdated format).
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn save_group_key(&self, key: &StoredGroupKey, now_ms: u64) -> Result<(), StoreError> {
        let dir = self.root.join(GROUPS_DIR);
        if !dir.exists() {
            create_private_dir(&dir)?;
        }
        let mut body = Zeroizing::new(Vec::new());
        put_str(&mut body, key.group.as_str());
        put_u8(&mut body, key.role.to_u8());
        put_blob(&mut body, &key.signed_info.to_bytes());
        put_blob(&mut body, &key.key_set.to_bytes());
        put_u64(&mut body, now_ms);
        self.write_record(
            &self.group_file(&key.group, key.role),
            KIND_GROUP_KEY_SET,
            &body,
        )
    }

    /// Loads every usable stored group key with the time it was saved (files of the outdated
    /// format are left out: see [`KeyStore::load_groups`]).
    ///
    /// # Errors
    /// As [`KeyStore::load_groups`].
    pub fn load_group_keys(&self) -> Result<Vec<(StoredGroupKey, u64)>, StoreError> {
        Ok(self
            .load_groups()?
            .into_iter()
            .filter_map(|g| match g {
                StoredGroup::Key(k, saved) => Some((*k, saved)),
                StoredGroup::Outdated { .. } => None,
            })
            .collect())
    }

    /// Loads every file of the groups directory: keys with their paths, and the group and role
    /// of each outdated file (to join again).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming the bad file, [`StoreError::Permissions`] or
    /// [`StoreError::Io`].
    pub fn load_groups(&self) -> Result<Vec<StoredGroup>, StoreError> {
        let dir = self.root.join(GROUPS_DIR);
        if !dir.exists() {
            return Ok(Vec::new());
        }
        check_mode(&dir, 0o700)?;
        let entries = fs::read_dir(&dir).map_err(io_err(&dir))?;
        let mut out = Vec::new();
        let mut paths = Vec::new();
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".pub") || name.ends_with(".sub") {
                paths.push(path);
            }
        }
        paths.sort();
        for path in paths {
            out.push(self.load_group_file(&path)?);
        }
        Ok(out)
    }

    fn load_group_file(&self, path: &Path) -> Result<StoredGroup, StoreError> {
        let (kind, body) = self.read_any_record(path)?;
        let corrupt = |_| StoreError::Corrupt {
            path: path.to_path_buf(),
            what: "group key",
        };
        let wrong_file = || StoreError::Corrupt {
            path: path.to_path_buf(),
            what: "group key in the wrong file",
        };
        let mut r = Reader::new(&body);
        let group = GroupId::read(&mut r, "group").map_err(corrupt)?;
        let role = Role::read(&mut r, "role").map_err(corrupt)?;
        if self.group_file(&group, role) != path {
            return Err(wrong_file());
        }
        match kind {
            // Only the group and role are read: the key without its path is not used.
            KIND_GROUP_KEY_V1 => return Ok(StoredGroup::Outdated { group, role }),
            KIND_GROUP_KEY_SET => {}
            _ => {
                return Err(StoreError::Corrupt {
                    path: path.to_path_buf(),
                    what: "wrong record kind",
                });
            }
        }
        let signed_info =
            SignedGroupInfo::from_bytes(r.blob("ginfo").map_err(corrupt)?).map_err(corrupt)?;
        let key_set =
            TreeKeySet::from_bytes(r.blob("key set").map_err(corrupt)?).map_err(corrupt)?;
        let saved_ms = r.u64("saved").map_err(corrupt)?;
        r.finish("group key").map_err(corrupt)?;
        if signed_info.info_unverified().group != group {
            return Err(wrong_file());
        }
        Ok(StoredGroup::Key(
            Box::new(StoredGroupKey {
                group,
                role,
                signed_info,
                key_set,
            }),
            saved_ms,
        ))
    }

    /// Forgets a stored group key.
    ///
    /// # Errors
    /// [`StoreError::Io`] except for a key that was not stored.
    pub fn remove_group_key(&self, group: &GroupId, role: Role) -> Result<(), StoreError> {
        let path = self.group_file(group, role);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    /// Writes `path` as one checksummed record of `kind`, atomically (also the OTA files').
    pub(crate) fn write_record(
        &self,
        path: &Path,
        kind: u8,
        body: &[u8],
    ) -> Result<(), StoreError> {
        let mut bytes = Zeroizing::new(Vec::with_capacity(body.len() + 41));
        bytes.extend_from_slice(MAGIC);
        put_u8(&mut bytes, kind);
        put_blob(&mut bytes, body);
        let sum = sha256(&[&bytes]);
        bytes.extend_from_slice(&sum);
        write_atomic(path, &bytes)
    }

    /// Reads and checks a record of `kind` written by [`write_record`](Self::write_record).
    pub(crate) fn read_record(
        &self,
        path: &Path,
        kind: u8,
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let (found, body) = self.read_any_record(path)?;
        if found != kind {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                what: "wrong record kind",
            });
        }
        Ok(body)
    }

    /// Reads and checks a record of any kind: the kind and the body.
    fn read_any_record(&self, path: &Path) -> Result<(u8, Zeroizing<Vec<u8>>), StoreError> {
        check_mode(path, 0o600)?;
        let bytes = Zeroizing::new(fs::read(path).map_err(io_err(path))?);
        let corrupt = |what| StoreError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        let split = bytes.len().checked_sub(32).ok_or(corrupt("truncated"))?;
        let (content, sum) = bytes.split_at(split);
        if sha256(&[content]) != sum {
            return Err(corrupt("checksum mismatch"));
        }
        let mut r = Reader::new(content);
        if r.take(4, "magic").ok() != Some(&MAGIC[..]) {
            return Err(corrupt("not a quva-node record"));
        }
        let kind = r.u8("kind").map_err(|_| corrupt("bad framing"))?;
        let body = r.blob("body").map_err(|_| corrupt("bad framing"))?;
        r.finish("record").map_err(|_| corrupt("bad framing"))?;
        Ok((kind, Zeroizing::new(body.to_vec())))
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(path).map_err(io_err(path))?;
    // The process umask may have narrowed the mode further, never widened it; set it exactly.
    set_mode(path, 0o700)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> Result<(), StoreError> {
    Ok(())
}

/// Refuses a path that group or others may access (`want` is the mode it is created with).
#[cfg(unix)]
fn check_mode(path: &Path, want: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::Permissions {
            path: path.to_path_buf(),
            mode,
            want,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(path: &Path, _want: u32) -> Result<(), StoreError> {
    fs::metadata(path).map(|_| ()).map_err(io_err(path))
}

/// Writes `bytes` to `path` atomically: temporary file (0600) in the same directory, fsync,
/// rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("record");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
        set_mode(&tmp, 0o600)?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io_err(path))?;
        // The rename is durable once the directory entry is.
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests;
