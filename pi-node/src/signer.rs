//! The release signer of group OTA (PROTOCOL.md §7.2), without I/O.
//!
//! - [`cut_release`] cuts, encrypts and signs an image once ([`ReleaseSigner`]) and lists what to
//!   deposit, retained with QoS 1: the manifest, every chunk and the key message sealed with the
//!   group's current option-2 keys.
//! - [`Releases`] is what the key store keeps of every release: the manifest message and the key
//!   message's M (with K_c, zeroized when dropped), and the epoch of the key message last
//!   deposited. At each new epoch of the group, [`Releases::key_messages_for`] seals the key
//!   messages again for the new epoch.
//! - [`StatusLedger`] collects status reports (option-2 queries on `<group>/_q`, verified without
//!   the window: they come late from a persistent session), keeps the highest T_ms per (device,
//!   v) in a [`StatusBook`], and answers a `need-key` report with a direct message carrying M
//!   after checking that the device is still a subscriber of the group.
//! - [`KeyArchive`] keeps the signer's d_S of past epochs for [`REPORT_KEY_RETENTION_MS`] (7
//!   days), for opening status reports only (PROTOCOL.md §7.2): a report sealed in an epoch past
//!   the grace period opens with the archived key if its sender is a subscriber in the newest
//!   member list.

use std::collections::BTreeMap;

use quva_client::codec::{
    Decode, DecodeError, Encode, Reader, put_blob, put_str, put_u8, put_u32, put_u64,
};
use quva_client::curve::{KeyPair, Point};
use quva_client::group::SignedGroupInfo;
use quva_client::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use quva_client::message::{
    Direction, Directory, GroupLookupError, GroupPublicKeys, HeldKeys, Protection, Rejection,
    UnverifiedMessage,
};
use quva_client::ota::{
    KeyMessage, OtaError, OtaState, ReceivedStatus, Release, ReleaseSigner, StatusBook,
    StatusReport, UnverifiedManifest,
};
use quva_client::schnorr::VerifyingKey;
use quva_client::topics::{OtaItem, OtaTopic};
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::direct::{DirectBook, DirectSendError, seal_direct};
use crate::store::{KeyStore, StoreError};
use quva_client::device::{Device, DeviceView, SendError};

/// The key-store record of the releases.
const RELEASES_FILE: &str = "ota-releases";
/// Its record kind.
const KIND_RELEASES: u8 = 0x21;
/// The key-store record of the status reports.
const STATUS_FILE: &str = "ota-status";
/// Its record kind.
const KIND_STATUS: u8 = 0x22;
/// The key-store record of the archived publisher keys.
const ARCHIVE_FILE: &str = "ota-report-keys";
/// Its record kind.
const KIND_ARCHIVE: u8 = 0x23;
/// How long d_S of a past epoch is kept to open late status reports: 7 days.
pub const REPORT_KEY_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
/// The shortest time between two direct answers to one device's `need-key` for one release.
pub const NEED_KEY_INTERVAL_MS: u64 = 60_000;

/// One item to deposit: topic and payload, published retained with QoS 1.
#[derive(Clone, PartialEq, Eq)]
pub struct Deposit {
    /// The OTA topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// What it is.
    pub item: OtaItem,
}

impl core::fmt::Debug for Deposit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Deposit")
            .field("topic", &self.topic)
            .field("len", &self.payload.len())
            .finish()
    }
}

/// Why a release could not be made or served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignerError {
    /// Cutting or signing failed (empty image, bad chunk size, name too long…).
    #[error("{0}")]
    Ota(#[from] OtaError),
    /// The key message could not be sealed (no publisher key of the group).
    #[error(transparent)]
    Send(#[from] SendError),
    /// The version was already released by this signer.
    #[error("version {version} of {group} was already released: release a higher version")]
    AlreadyReleased {
        /// The group.
        group: GroupId,
        /// The version.
        version: u64,
    },
    /// A direct answer could not be sealed.
    #[error(transparent)]
    Direct(#[from] DirectSendError),
}

/// A release as the key store keeps it.
#[derive(Clone)]
pub struct StoredRelease {
    /// The OTA group.
    pub group: GroupId,
    /// The version.
    pub version: u64,
    /// The signed manifest message.
    pub manifest_message: Vec<u8>,
    /// The key message's M (K_c zeroized when dropped).
    pub key: KeyMessage,
    /// The epoch whose keys sealed the key message last deposited.
    pub key_epoch: Option<Epoch>,
}

impl core::fmt::Debug for StoredRelease {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StoredRelease")
            .field("group", &self.group)
            .field("version", &self.version)
            .field("key_epoch", &self.key_epoch)
            .finish_non_exhaustive()
    }
}

impl StoredRelease {
    /// The image size and chunk count, from the stored manifest.
    pub fn sizes(&self) -> Option<(u64, u32)> {
        let m = UnverifiedManifest::decode(&self.manifest_message).ok()?;
        Some((m.manifest().size, m.manifest().n_chunks()))
    }
}

/// Seals `key` as the option-2 forward message of `group` with the device's current publisher
/// keys; returns the deposit for `<group>/_ota/<signer>/<v>/k` and the epoch.
///
/// # Errors
/// [`SendError`] without a publisher key of the group.
pub fn seal_key_message(
    device: &Device,
    group: &GroupId,
    key: &KeyMessage,
    now_ms: u64,
    rng: &mut impl CryptoRngCore,
) -> Result<(Deposit, Epoch), SendError> {
    let epoch = device
        .keyring(group, Role::Publisher)
        .map(|k| k.epoch())
        .ok_or_else(|| SendError::NotJoined {
            group: group.clone(),
            role: Role::Publisher,
        })?;
    let m: Zeroizing<Vec<u8>> = key.to_bytes();
    let (_, payload) = device.seal(
        group,
        Protection::Confidential,
        Direction::Forward,
        &m,
        now_ms,
        rng,
    )?;
    let topic = OtaTopic {
        group: group.clone(),
        signer: device.id().clone(),
        version: key.version,
        item: OtaItem::Key,
    }
    .to_string();
    Ok((
        Deposit {
            topic,
            payload,
            item: OtaItem::Key,
        },
        epoch,
    ))
}

/// Cuts, encrypts and signs `image` as version `version` of `group`, and lists the deposits in
/// order: manifest, chunks, key message (sealed for the current epoch). Returns the release to
/// store once every deposit is acknowledged.
///
/// # Errors
/// [`SignerError`].
#[allow(clippy::too_many_arguments)]
pub fn cut_release(
    device: &Device,
    releases: &Releases,
    group: &GroupId,
    version: u64,
    name: &str,
    image: &[u8],
    chunk_size: u32,
    now_ms: u64,
    rng: &mut impl CryptoRngCore,
) -> Result<(Vec<Deposit>, StoredRelease), SignerError> {
    if releases.get(group, version).is_some() {
        return Err(SignerError::AlreadyReleased {
            group: group.clone(),
            version,
        });
    }
    let creds = device.credentials();
    let release: Release = ReleaseSigner {
        group,
        key: creds.key(),
        cert: creds.cert(),
    }
    .release(version, name, image, chunk_size, now_ms, rng)?;
    let manifest = release.manifest();
    let mut deposits = Vec::with_capacity(release.chunks().len() + 2);
    deposits.push(Deposit {
        topic: manifest.topic(OtaItem::Manifest).to_string(),
        payload: release.manifest_message().to_vec(),
        item: OtaItem::Manifest,
    });
    for (j, ct) in (0u32..).zip(release.chunks()) {
        deposits.push(Deposit {
            topic: manifest.topic(OtaItem::Chunk(j)).to_string(),
            payload: ct.clone(),
            item: OtaItem::Chunk(j),
        });
    }
    let (key_deposit, epoch) = seal_key_message(device, group, release.key_message(), now_ms, rng)?;
    deposits.push(key_deposit);
    let stored = StoredRelease {
        group: group.clone(),
        version,
        manifest_message: release.manifest_message().to_vec(),
        key: release.key_message().clone(),
        key_epoch: Some(epoch),
    };
    Ok((deposits, stored))
}

/// Every release this signer made, as kept in the key store.
#[derive(Clone, Debug, Default)]
pub struct Releases {
    list: Vec<StoredRelease>,
}

impl Releases {
    /// The release `version` of `group`.
    pub fn get(&self, group: &GroupId, version: u64) -> Option<&StoredRelease> {
        self.list
            .iter()
            .find(|r| &r.group == group && r.version == version)
    }

    /// Every release, in the order made.
    pub fn iter(&self) -> impl Iterator<Item = &StoredRelease> {
        self.list.iter()
    }

    /// Whether `group` has releases.
    pub fn has_group(&self, group: &GroupId) -> bool {
        self.list.iter().any(|r| &r.group == group)
    }

    /// The groups with releases.
    pub fn groups(&self) -> Vec<GroupId> {
        let mut g: Vec<GroupId> = self.list.iter().map(|r| r.group.clone()).collect();
        g.sort();
        g.dedup();
        g
    }

    /// Adds (or replaces) a release.
    pub fn insert(&mut self, release: StoredRelease) {
        self.list
            .retain(|r| !(r.group == release.group && r.version == release.version));
        self.list.push(release);
    }

    /// The key messages of `group` sealed again for the device's current epoch, for every
    /// release whose key message was sealed for another epoch; records the new epoch (save
    /// after the deposits are acknowledged).
    ///
    /// # Errors
    /// [`SendError`] without a publisher key of the group.
    pub fn key_messages_for(
        &mut self,
        device: &Device,
        group: &GroupId,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<Deposit>, SendError> {
        let mut out = Vec::new();
        for r in self.list.iter_mut().filter(|r| &r.group == group) {
            let current = device.keyring(group, Role::Publisher).map(|k| k.epoch());
            if current.is_none() || r.key_epoch == current {
                continue;
            }
            let (d, epoch) = seal_key_message(device, group, &r.key, now_ms, rng)?;
            r.key_epoch = Some(epoch);
            out.push(d);
        }
        Ok(out)
    }

    /// After the signer renewed its certificate (PROTOCOL.md §7.2): signs the manifest of every
    /// release whose manifest carries another certificate again, over the same chunk hashes with
    /// the new key, certificate and a new T_ms, updates H(man) in its M and marks its key message
    /// as not deposited (the next [`key_messages_for`](Self::key_messages_for) seals it again).
    /// Returns the manifest deposits, to publish before the key messages.
    ///
    /// # Errors
    /// [`SignerError::Ota`] if a stored manifest does not decode or cannot be signed.
    pub fn resign_after_renewal(
        &mut self,
        device: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<Deposit>, SignerError> {
        let creds = device.credentials();
        let mut out = Vec::new();
        for r in &mut self.list {
            let old = UnverifiedManifest::decode(&r.manifest_message)?;
            let m = old.manifest();
            if &m.cert == creds.cert() {
                continue;
            }
            let mut rand = Zeroizing::new([0u8; 32]);
            rng.fill_bytes(&mut rand[..]);
            let (manifest, message) = ReleaseSigner {
                group: &r.group,
                key: creds.key(),
                cert: creds.cert(),
            }
            .sign_manifest(
                m.version,
                m.size,
                m.chunk_size,
                m.chunk_hashes.clone(),
                now_ms,
                &rand,
            )?;
            r.key.manifest_hash = manifest.hash();
            r.manifest_message = message.clone();
            r.key_epoch = None;
            out.push(Deposit {
                topic: manifest.topic(OtaItem::Manifest).to_string(),
                payload: message,
                item: OtaItem::Manifest,
            });
        }
        Ok(out)
    }

    /// `u32 n || n × (str(group) || u64 v || blob(manifest message) || blob(M) || u64 key epoch
    /// + 1, 0 for none)`, zeroized when dropped.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::new());
        put_u32(&mut out, u32::try_from(self.list.len()).unwrap_or(u32::MAX));
        for r in &self.list {
            r.group.encode(&mut out);
            put_u64(&mut out, r.version);
            put_blob(&mut out, &r.manifest_message);
            put_blob(&mut out, &r.key.to_bytes());
            put_u64(&mut out, r.key_epoch.map_or(0, |e| u64::from(e.0) + 1));
        }
        out
    }

    /// Parses [`to_bytes`](Self::to_bytes).
    ///
    /// # Errors
    /// [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let n = r.u32("release count")?;
        let mut list = Vec::new();
        for _ in 0..n {
            let group = GroupId::read(&mut r, "release group")?;
            let version = r.u64("release version")?;
            let manifest_message = r.blob("release manifest")?.to_vec();
            let key = KeyMessage::from_bytes(r.blob("release key message")?)?;
            let e = r.u64("release key epoch")?;
            list.push(StoredRelease {
                group,
                version,
                manifest_message,
                key,
                key_epoch: e
                    .checked_sub(1)
                    .and_then(|e| u32::try_from(e).ok())
                    .map(Epoch),
            });
        }
        r.finish("releases")?;
        Ok(Releases { list })
    }

    /// Loads the releases from the key store (none if never saved).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn load(store: &KeyStore) -> Result<Self, StoreError> {
        match store.load_named(RELEASES_FILE, KIND_RELEASES)? {
            None => Ok(Releases::default()),
            Some(b) => Self::from_bytes(&b).map_err(|_| StoreError::Corrupt {
                path: store.path().join(RELEASES_FILE),
                what: "malformed release list",
            }),
        }
    }

    /// Saves the releases in the key store.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn save(&self, store: &KeyStore) -> Result<(), StoreError> {
        store.save_named(RELEASES_FILE, KIND_RELEASES, &self.to_bytes())
    }
}

/// Why a status report was not recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReportRejection {
    /// The query did not verify.
    #[error("{0}")]
    Message(Rejection),
    /// It verified but is not a status report.
    #[error("{0}")]
    NotReport(OtaError),
}

/// The signer's status reports and its answers to `need-key`.
#[derive(Clone, Debug, Default)]
pub struct StatusLedger {
    book: StatusBook,
    answered: BTreeMap<(GroupId, DeviceId, u64), u64>,
}

impl StatusLedger {
    /// The reports held.
    pub fn book(&self) -> &StatusBook {
        &self.book
    }

    /// Verifies a query received on `<group>/_q` without the time window and the replay cache
    /// (PROTOCOL.md §7.2: reports come late from a persistent session; the book orders them by
    /// T_ms, so a replay changes nothing), with the device's keys or, for an epoch past the
    /// grace period, the archived ones, and records it. Returns the report and whether the
    /// book changed (save it then).
    ///
    /// # Errors
    /// [`ReportRejection`].
    pub fn on_query(
        &mut self,
        device: &Device,
        archive: &KeyArchive,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<(ReceivedStatus, bool), ReportRejection> {
        let policy = device.config().policy;
        let msg = UnverifiedMessage::decode_with_limit(payload, policy.max_payload)
            .map_err(ReportRejection::Message)?;
        let view = ReportView {
            device,
            view: device.view(now_ms),
            archive,
            now_ms,
        };
        let verified = msg
            .verify_without_window(&view, &view, &policy, now_ms)
            .map_err(ReportRejection::Message)?;
        let status = ReceivedStatus::from_message(&verified).map_err(ReportRejection::NotReport)?;
        let changed = self.book.record(status.clone());
        Ok((status, changed))
    }

    /// The answer to a `need-key` report: a direct message carrying the release's M to the
    /// device, if the report is the device's latest state for that release, the device is
    /// still a subscriber of the group in the newest member list, and no answer went to it
    /// for this release within [`NEED_KEY_INTERVAL_MS`]. Save `direct` before publishing.
    ///
    /// # Errors
    /// [`SignerError::Direct`] if the message cannot be sealed.
    pub fn answer_need_key(
        &mut self,
        device: &Device,
        releases: &Releases,
        direct: &mut DirectBook,
        status: &ReceivedStatus,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Option<(String, Vec<u8>)>, SignerError> {
        let v = status.report.version;
        let latest = self.book.get(&status.group, &status.device, v);
        if status.report.state != OtaState::NeedKey
            || latest.is_none_or(|e| e.t_ms != status.t_ms || e.state != OtaState::NeedKey)
        {
            return Ok(None);
        }
        let Some(release) = releases.get(&status.group, v) else {
            return Ok(None);
        };
        if !device.lists_member(&status.group, &status.device, Role::Subscriber) {
            tracing::warn!(device = %status.device, group = %status.group, version = v,
                "need-key from a device that is no longer a subscriber: not answered");
            return Ok(None);
        }
        let key = (status.group.clone(), status.device.clone(), v);
        if self
            .answered
            .get(&key)
            .is_some_and(|t| now_ms.saturating_sub(*t) < NEED_KEY_INTERVAL_MS)
        {
            return Ok(None);
        }
        let m = release.key.to_bytes();
        let (topic, bytes, _) = seal_direct(
            device,
            direct,
            &status.group,
            &status.device,
            &m,
            now_ms,
            rng,
        )?;
        self.answered.insert(key, now_ms);
        Ok(Some((topic, bytes)))
    }

    /// `u32 n || n × (str(group) || str(device) || u64 v || u64 T_ms || u8 state ||
    /// str(detail))`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let entries: Vec<_> = self.book.iter().collect();
        put_u32(&mut out, u32::try_from(entries.len()).unwrap_or(u32::MAX));
        for ((g, d, v), e) in entries {
            g.encode(&mut out);
            d.encode(&mut out);
            put_u64(&mut out, *v);
            put_u64(&mut out, e.t_ms);
            put_u8(&mut out, e.state.to_u8());
            put_str(&mut out, &e.detail);
        }
        out
    }

    /// Parses [`to_bytes`](Self::to_bytes).
    ///
    /// # Errors
    /// [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let n = r.u32("status count")?;
        let mut book = StatusBook::new();
        for _ in 0..n {
            let group = GroupId::read(&mut r, "status group")?;
            let device = DeviceId::read(&mut r, "status device")?;
            let version = r.u64("status version")?;
            let t_ms = r.u64("status time")?;
            let state = OtaState::from_u8(r.u8("status state")?)
                .ok_or(DecodeError::InvalidValue("status state"))?;
            let detail = r.str("status detail")?.to_owned();
            book.record(ReceivedStatus {
                group,
                device,
                t_ms,
                report: StatusReport {
                    version,
                    state,
                    detail,
                },
            });
        }
        r.finish("status book")?;
        Ok(StatusLedger {
            book,
            answered: BTreeMap::new(),
        })
    }

    /// Loads the reports from the key store (none if never saved).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn load(store: &KeyStore) -> Result<Self, StoreError> {
        match store.load_named(STATUS_FILE, KIND_STATUS)? {
            None => Ok(StatusLedger::default()),
            Some(b) => Self::from_bytes(&b).map_err(|_| StoreError::Corrupt {
                path: store.path().join(STATUS_FILE),
                what: "malformed status book",
            }),
        }
    }

    /// Saves the reports in the key store.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn save(&self, store: &KeyStore) -> Result<(), StoreError> {
        store.save_named(STATUS_FILE, KIND_STATUS, &self.to_bytes())
    }
}

/// One archived publisher key: the CA-signed group info of its epoch and d_S.
struct ArchivedKey {
    signed: SignedGroupInfo,
    key: KeyPair,
    saved_ms: u64,
}

/// The signer's publisher keys (d_S) of past epochs, kept [`REPORT_KEY_RETENTION_MS`] to open
/// late status reports, and for nothing else.
#[derive(Default)]
pub struct KeyArchive {
    keys: BTreeMap<(GroupId, Epoch), ArchivedKey>,
}

impl core::fmt::Debug for KeyArchive {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KeyArchive")
            .field("epochs", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KeyArchive {
    /// Archives the device's current publisher key of `group` if its epoch is not archived yet,
    /// and forgets keys older than the retention. Returns whether the archive changed (save it).
    pub fn remember(&mut self, device: &Device, group: &GroupId, now_ms: u64) -> bool {
        let before = self.keys.len();
        self.keys
            .retain(|_, k| now_ms.saturating_sub(k.saved_ms) <= REPORT_KEY_RETENTION_MS);
        let mut changed = self.keys.len() != before;
        if let Some(ring) = device.keyring(group, Role::Publisher) {
            if let std::collections::btree_map::Entry::Vacant(e) =
                self.keys.entry((group.clone(), ring.epoch()))
            {
                e.insert(ArchivedKey {
                    signed: ring.signed_group_info().clone(),
                    key: ring.current_key().clone(),
                    saved_ms: now_ms,
                });
                changed = true;
            }
        }
        changed
    }

    /// The archived key of `group` at `epoch`, if kept and not older than the retention.
    fn get(&self, group: &GroupId, epoch: Epoch, now_ms: u64) -> Option<&ArchivedKey> {
        self.keys
            .get(&(group.clone(), epoch))
            .filter(|k| now_ms.saturating_sub(k.saved_ms) <= REPORT_KEY_RETENTION_MS)
    }

    /// `u32 n || n × (blob(signed group info) || sc(d_S) || u64 saved_ms)`, zeroized when
    /// dropped.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::new());
        put_u32(&mut out, u32::try_from(self.keys.len()).unwrap_or(u32::MAX));
        for k in self.keys.values() {
            put_blob(&mut out, &k.signed.to_bytes());
            out.extend_from_slice(&k.key.secret().to_bytes()[..]);
            put_u64(&mut out, k.saved_ms);
        }
        out
    }

    /// Parses [`to_bytes`](Self::to_bytes), checking each entry again: the group info verifies
    /// under Q_CA and d_S·G is its Q_S.
    ///
    /// # Errors
    /// [`DecodeError`] for malformed bytes or an entry that does not verify.
    pub fn from_bytes(bytes: &[u8], q_ca: &Point) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let n = r.u32("archive count")?;
        let mut keys = BTreeMap::new();
        for _ in 0..n {
            let signed = SignedGroupInfo::from_bytes(r.blob("archive group info")?)?;
            let key = KeyPair::from_secret(r.secret_scalar("archive key")?);
            let saved_ms = r.u64("archive saved")?;
            let info = signed
                .verify(&VerifyingKey(*q_ca))
                .map_err(|_| DecodeError::InvalidValue("archive group info"))?;
            if key.public() != &info.q_s {
                return Err(DecodeError::InvalidValue("archive key"));
            }
            let id = (info.group.clone(), info.epoch);
            keys.insert(
                id,
                ArchivedKey {
                    signed,
                    key,
                    saved_ms,
                },
            );
        }
        r.finish("archive")?;
        Ok(KeyArchive { keys })
    }

    /// Loads the archive from the key store (empty if never saved).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn load(store: &KeyStore, q_ca: &Point) -> Result<Self, StoreError> {
        match store.load_named(ARCHIVE_FILE, KIND_ARCHIVE)? {
            None => Ok(KeyArchive::default()),
            Some(b) => Self::from_bytes(&b, q_ca).map_err(|_| StoreError::Corrupt {
                path: store.path().join(ARCHIVE_FILE),
                what: "malformed or unverifiable report-key archive",
            }),
        }
    }

    /// Saves the archive in the key store.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn save(&self, store: &KeyStore) -> Result<(), StoreError> {
        store.save_named(ARCHIVE_FILE, KIND_ARCHIVE, &self.to_bytes())
    }
}

/// The directory and held keys status reports are verified against: the device's, and for an
/// epoch the device no longer holds, the archive, with membership taken from the newest member
/// list (the reporter must still be listed in the role it sent as).
struct ReportView<'a> {
    device: &'a Device,
    view: DeviceView<'a>,
    archive: &'a KeyArchive,
    now_ms: u64,
}

impl Directory for ReportView<'_> {
    fn group_keys(
        &self,
        group: &GroupId,
        epoch: Epoch,
        now_ms: u64,
    ) -> Result<GroupPublicKeys, GroupLookupError> {
        self.view.group_keys(group, epoch, now_ms).or_else(|e| {
            let k = self.archive.get(group, epoch, now_ms).ok_or(e)?;
            let info = k.signed.info_unverified();
            Ok(GroupPublicKeys {
                q_p: info.q_p,
                q_s: info.q_s,
            })
        })
    }

    fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey> {
        self.view.device_key(id)
    }

    fn is_member(&self, group: &GroupId, epoch: Epoch, id: &DeviceId, role: Role) -> bool {
        self.view.is_member(group, epoch, id, role)
            || (self.archive.get(group, epoch, self.now_ms).is_some()
                && self.device.lists_member(group, id, role))
    }
}

impl HeldKeys for ReportView<'_> {
    fn group_secret(&self, group: &GroupId, epoch: Epoch, kind: GroupKeyKind) -> Option<&KeyPair> {
        self.view.group_secret(group, epoch, kind).or_else(|| {
            (kind.holder_role() == Role::Publisher)
                .then(|| self.archive.get(group, epoch, self.now_ms))
                .flatten()
                .map(|k| &k.key)
        })
    }
}

/// Whether the newest member list of `group` the device holds lists its current certificate as
/// a publisher: only then do the bridge and the devices accept a manifest it signs.
pub fn signer_is_listed(device: &Device, group: &GroupId) -> bool {
    let creds = device.credentials();
    let q = VerifyingKey(*creds.key().public());
    device
        .member_list(group)
        .is_some_and(|l| l.lists_certificate(creds.cert(), &q, Role::Publisher))
}

/// The human name of a state.
pub fn state_name(state: OtaState) -> &'static str {
    match state {
        OtaState::Available => "available",
        OtaState::Downloading => "downloading",
        OtaState::Verified => "verified",
        OtaState::Applied => "applied",
        OtaState::Failed => "failed",
        OtaState::NeedKey => "need-key",
    }
}

#[cfg(test)]
mod tests;
