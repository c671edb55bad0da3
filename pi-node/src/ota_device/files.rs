//! The OTA agent's files: installed versions, the release being fetched, its progress record
//! and its staging file, in the download directory (mode 0700, files 0600).
//!
//! Per OTA group `G`, with `b = base64url(G)`:
//! - `b.installed`: record `str(G) || u64 v || str(signer)`, the highest version applied and
//!   who signed it (a record written before the signer was kept ends after v);
//! - `b.release`: record `str(G) || blob(manifest message) || blob(M)`, the verified manifest and
//!   the accepted key message's plaintext (K_c: a secret, read into zeroizing buffers);
//! - `b.progress`: record `str(G) || blob(progress)` ([`Download::progress`]);
//! - `b.staging`: the image being assembled, plaintext at each chunk's offset.
//!
//! Records use the key store's format (checksum, atomic replace: temporary file, fsync, rename,
//! fsync of the directory). Chunks are written into the staging file and, at each checkpoint, the
//! file is fsynced *before* the progress record that claims them is replaced, so after a SIGKILL
//! or a power cut the record never claims a chunk that is not on disk. A restart still does not trust it blindly: the agent re-checks every
//! claimed chunk against the manifest's h_j ([`OtaAction::CheckStaged`](super::OtaAction)).
//!
//! [`Download::progress`]: quva_client::ota::Download::progress

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use quva_client::codec::{Reader, put_blob, put_str, put_u64};
use quva_client::ids::{DeviceId, GroupId};
use quva_client::ota::ImageDigest;
use zeroize::Zeroizing;

use crate::store::{KeyStore, StoreError};

const KIND_OTA_INSTALLED: u8 = 0x10;
const KIND_OTA_RELEASE: u8 = 0x11;
const KIND_OTA_PROGRESS: u8 = 0x12;

/// What a restarted device finds on disk for one OTA group.
#[derive(Default)]
pub struct RestoredGroup {
    /// The installed version, if any was recorded.
    pub installed: Option<u64>,
    /// The release being fetched, if any.
    pub release: Option<SavedRelease>,
}

/// A release the device had accepted the key of.
pub struct SavedRelease {
    /// The signed manifest message (verified again before use).
    pub manifest: Vec<u8>,
    /// The accepted key message's M.
    pub key: Zeroizing<Vec<u8>>,
    /// The progress record, if one was saved.
    pub progress: Option<Vec<u8>>,
}

/// The download directory.
#[derive(Clone, Debug)]
pub struct OtaFiles {
    dir: KeyStore,
}

impl OtaFiles {
    /// Opens the download directory, creating it (mode 0700) if missing.
    ///
    /// # Errors
    /// [`StoreError::Io`] or [`StoreError::Permissions`] (a directory others can access).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Ok(OtaFiles {
            dir: KeyStore::create(dir)?,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, group: &GroupId, ext: &str) -> PathBuf {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(group.as_str());
        self.dir.path().join(format!("{b}.{ext}"))
    }

    /// The staging file of `group` (the apply command gets this path).
    pub fn staging_path(&self, group: &GroupId) -> PathBuf {
        self.file(group, "staging")
    }

    /// What is on disk for each of `groups`.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] for a damaged installed-version record (a release or progress
    /// record that is damaged is ignored: the release is fetched again),
    /// [`StoreError::Permissions`] or [`StoreError::Io`].
    pub fn load(&self, groups: &[GroupId]) -> Result<BTreeMap<GroupId, RestoredGroup>, StoreError> {
        let mut out = BTreeMap::new();
        for g in groups {
            let installed = self.installed(g)?;
            let release = self.saved_release(g).ok().flatten();
            out.insert(g.clone(), RestoredGroup { installed, release });
        }
        Ok(out)
    }

    /// The installed version of `group`.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`], [`StoreError::Permissions`] or [`StoreError::Io`].
    pub fn installed(&self, group: &GroupId) -> Result<Option<u64>, StoreError> {
        Ok(self.installed_release(group)?.map(|(v, _)| v))
    }

    /// The installed version of `group` and the signer of that release (`None` in a record
    /// written before the signer was kept).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`], [`StoreError::Permissions`] or [`StoreError::Io`].
    pub fn installed_release(
        &self,
        group: &GroupId,
    ) -> Result<Option<(u64, Option<DeviceId>)>, StoreError> {
        let path = self.file(group, "installed");
        if !path.exists() {
            return Ok(None);
        }
        let body = self.dir.read_record(&path, KIND_OTA_INSTALLED)?;
        let mut r = Reader::new(&body);
        let parsed = (|| {
            let g = GroupId::read(&mut r, "ota group")?;
            let v = r.u64("ota installed version")?;
            let signer = if r.remaining() == 0 {
                None
            } else {
                Some(DeviceId::read(&mut r, "ota installed signer")?)
            };
            r.finish("ota installed")?;
            Ok::<_, quva_client::codec::DecodeError>((g, v, signer))
        })();
        match parsed {
            Ok((g, v, signer)) if &g == group => Ok(Some((v, signer))),
            _ => Err(StoreError::Corrupt {
                path,
                what: "installed version",
            }),
        }
    }

    /// Records `version`, signed by `signer`, as installed for `group`.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn record_installed(
        &self,
        group: &GroupId,
        version: u64,
        signer: &DeviceId,
    ) -> Result<(), StoreError> {
        let mut body = Vec::new();
        put_str(&mut body, group.as_str());
        put_u64(&mut body, version);
        put_str(&mut body, signer.as_str());
        self.dir
            .write_record(&self.file(group, "installed"), KIND_OTA_INSTALLED, &body)
    }

    fn saved_release(&self, group: &GroupId) -> Result<Option<SavedRelease>, StoreError> {
        let path = self.file(group, "release");
        if !path.exists() {
            return Ok(None);
        }
        let body = self.dir.read_record(&path, KIND_OTA_RELEASE)?;
        let corrupt = |_| StoreError::Corrupt {
            path: path.clone(),
            what: "ota release",
        };
        let mut r = Reader::new(&body);
        let g = GroupId::read(&mut r, "ota group").map_err(corrupt)?;
        let manifest = r.blob("ota manifest").map_err(corrupt)?.to_vec();
        let key = Zeroizing::new(r.blob("ota key").map_err(corrupt)?.to_vec());
        r.finish("ota release").map_err(corrupt)?;
        if &g != group {
            return Err(corrupt(quva_client::codec::DecodeError::InvalidValue(
                "ota group",
            )));
        }
        let progress = self.progress(group).ok().flatten();
        Ok(Some(SavedRelease {
            manifest,
            key,
            progress,
        }))
    }

    fn progress(&self, group: &GroupId) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.file(group, "progress");
        if !path.exists() {
            return Ok(None);
        }
        let body = self.dir.read_record(&path, KIND_OTA_PROGRESS)?;
        let mut r = Reader::new(&body);
        let g = GroupId::read(&mut r, "ota group").ok();
        let p = r.blob("ota progress").ok().map(<[u8]>::to_vec);
        match (g, p, r.finish("ota progress")) {
            (Some(g), Some(p), Ok(())) if &g == group => Ok(Some(p)),
            _ => Err(StoreError::Corrupt {
                path,
                what: "ota progress",
            }),
        }
    }

    /// Keeps the verified manifest and the accepted M of `group`'s release.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn save_release(
        &self,
        group: &GroupId,
        manifest: &[u8],
        key: &[u8],
    ) -> Result<(), StoreError> {
        let mut body = Zeroizing::new(Vec::new());
        put_str(&mut body, group.as_str());
        put_blob(&mut body, manifest);
        put_blob(&mut body, key);
        self.dir
            .write_record(&self.file(group, "release"), KIND_OTA_RELEASE, &body)
    }

    /// Replaces the progress record of `group`.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn save_progress(&self, group: &GroupId, progress: &[u8]) -> Result<(), StoreError> {
        let mut body = Vec::new();
        put_str(&mut body, group.as_str());
        put_blob(&mut body, progress);
        self.dir
            .write_record(&self.file(group, "progress"), KIND_OTA_PROGRESS, &body)
    }

    /// Creates the staging file of `size` bytes (sparse), after removing any earlier progress.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn prepare_staging(&self, group: &GroupId, size: u64) -> Result<(), StoreError> {
        remove(&self.file(group, "progress"))?;
        let path = self.staging_path(group);
        let f = private_file(&path, true)?;
        f.set_len(size).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))?;
        sync_dir(self.dir.path())
    }

    /// Writes `data` at `offset` of the staging file (not synced: see
    /// [`sync_staging`](Self::sync_staging)).
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn write_chunk(&self, group: &GroupId, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let path = self.staging_path(group);
        let f = private_file(&path, false)?;
        f.write_all_at(data, offset).map_err(io(&path))
    }

    /// fsyncs (the data of) the staging file: every chunk written before is on disk.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn sync_staging(&self, group: &GroupId) -> Result<(), StoreError> {
        let path = self.staging_path(group);
        private_file(&path, false)?.sync_data().map_err(io(&path))
    }

    /// Reads `len` bytes at `offset` of the staging file.
    ///
    /// # Errors
    /// [`StoreError::Io`] (also for a file shorter than asked).
    pub fn read_chunk(
        &self,
        group: &GroupId,
        offset: u64,
        len: u64,
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        use std::os::unix::fs::FileExt;
        let path = self.staging_path(group);
        let f = fs::File::open(&path).map_err(io(&path))?;
        let len = usize::try_from(len)
            .map_err(|_| io(&path)(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let mut buf = Zeroizing::new(vec![0u8; len]);
        f.read_exact_at(&mut buf, offset).map_err(io(&path))?;
        Ok(buf)
    }

    /// fsyncs the staging file and returns its SHA-256.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn hash_staging(&self, group: &GroupId) -> Result<[u8; 32], StoreError> {
        let path = self.staging_path(group);
        let mut f = fs::File::open(&path).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))?;
        let mut digest = ImageDigest::new();
        let mut buf = Zeroizing::new(vec![0u8; 64 * 1024]);
        loop {
            let n = f.read(&mut buf).map_err(io(&path))?;
            if n == 0 {
                break;
            }
            digest.update(buf.get(..n).unwrap_or_default());
        }
        Ok(digest.finalize())
    }

    /// Deletes the staging file, progress record and saved release of `group`.
    ///
    /// # Errors
    /// [`StoreError::Io`] except for files that were not there.
    pub fn discard(&self, group: &GroupId) -> Result<(), StoreError> {
        for ext in ["release", "progress", "staging"] {
            remove(&self.file(group, ext))?;
        }
        sync_dir(self.dir.path())
    }
}

fn io(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn remove(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Opens (`truncate`: creates or empties) a file of mode 0600 for writing.
fn private_file(path: &Path, truncate: bool) -> Result<fs::File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = fs::OpenOptions::new();
    opts.write(true).mode(0o600);
    if truncate {
        opts.create(true).truncate(true);
    }
    opts.open(path).map_err(io(path))
}
