//! The device side of group OTA, without I/O: which releases to take, when to fetch, check,
//! apply and report.
//!
//! Implements the device of PROTOCOL.md §7.2. The driver feeds events — OTA PUBLISHes
//! ([`OtaAgent::on_publish`]), a key sent as a direct message ([`OtaAgent::on_direct`]), the
//! results of the file steps and of the apply command, and the passing of time
//! ([`OtaAgent::tick`]) — with the [`Device`] (group keys and member lists), `now_ms` and an
//! RNG, and gets [`OtaAction`]s back. [`perform`] does the file actions against [`OtaFiles`]
//! and returns the rest (subscriptions, status reports, the apply step, log lines).
//!
//! Rules, each with a test in `ota_device/tests.rs`:
//! - A manifest is accepted only for a followed group, on its own topic, from a pinned signer,
//!   with v above the installed version (no rollback), within the size limit, with the signer's
//!   current certificate in the group's member list and a valid signature
//!   ([`UnverifiedManifest::verify`]). Of several releases the highest verified one is fetched.
//! - The key message must be an option-2 message of the group from the manifest's signer for
//!   this v and H(man); it is opened with this device's keys of the group, without the time
//!   window (retained). If the device's key is current and still cannot open it, it reports
//!   `need-key` once per epoch and accepts K_c from the signer as a direct message (one that
//!   arrives before its manifest, as after a reconnection, waits for it in memory).
//! - Chunks are fetched by subscribing to each missing chunk's topic, a few at a time
//!   ([`FETCH_WINDOW`]); each is checked against h_j before decryption and written to the
//!   staging file; every [`CHECKPOINT_CHUNKS`] chunks (and at the last) the staging file is
//!   synced and only then the progress record replaced, so it never claims an unsynced chunk. Then H(image) is checked, the apply
//!   command runs, and the version is recorded only when it succeeds.
//! - After a restart the saved manifest is verified again, K_c restored, and every chunk the
//!   progress record claims is re-checked on disk (re-encrypted under K_j and hashed against
//!   h_j): intact chunks are not fetched again, damaged ones are.
//! - Every state is reported to the signer (`available`, `downloading`, `verified`, `applied`,
//!   `failed` with a detail, `need-key`) as an option-2 query of the group.
//!
//! # Usage
//! ```no_run
//! # fn demo(settings: quva_node::OtaSettings, device: &quva_client::device::Device) -> Result<(), Box<dyn std::error::Error>> {
//! use quva_node::{OtaAgent, OtaFiles, perform};
//! let mut rng = rand_core::OsRng;
//! let files = OtaFiles::open(&settings.download_dir)?;
//! let mut agent = OtaAgent::new(&settings, files.load(&settings.groups)?);
//! let now = quva_node::now_ms();
//! // Subscribe to what `start` asks for; then feed every OTA PUBLISH:
//! let first = agent.start();
//! # let (topic, payload) = ("fw/a/_ota/rel/1/m", &[][..]);
//! let actions = agent.on_publish(topic, payload, device, now, &mut rng);
//! for action in perform(&mut agent, &files, device, now, &mut rng, actions) {
//!     // Subscribe, Unsubscribe, Publish, Apply, Progress, Log: the network and the command.
//! }
//! # let _ = first; Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};

use quva_client::curve::sha256;
use quva_client::direct::VerifiedDirect;
use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
use quva_client::message::{Direction, Protection, Rejection, UnverifiedMessage};
use quva_client::ota::{
    AcceptedKey, Download, OtaError, OtaPolicy, OtaState, StatusReport, UnverifiedManifest,
    VerifiedManifest, seal_chunk,
};
use quva_client::topics::{OTA_LEVEL, OtaItem, OtaTopic};
use rand_core::CryptoRngCore;

use crate::config::OtaSettings;
use crate::signer::state_name;
use quva_client::device::Device;

mod action;
mod apply;
mod files;
mod perform;
mod service;

#[cfg(test)]
mod tests;

pub use action::{ChunkSpan, LogLevel, OtaAction};
pub use apply::{ApplyCommand, outcome as apply_outcome};
pub use files::{OtaFiles, RestoredGroup, SavedRelease};
pub use perform::perform;
pub(crate) use service::{OtaService, next_applied};

/// Chunks requested at once: each stored chunk's topic is unsubscribed and the next missing one
/// subscribed, so at most this many chunk ciphertexts are in flight.
pub const FETCH_WINDOW: usize = 8;

/// Chunks stored between two checkpoints (the staging file synced, then the progress record
/// saved): a restart fetches again at most this many less one. One fsync of the staging file and
/// one record replacement per chunk made a download on a real disk wait on three fsyncs per chunk.
pub const CHECKPOINT_CHUNKS: u32 = 8;

/// Releases (manifests or key messages) kept per group while they wait for a member list, a
/// key or their manifest; the highest versions are kept.
const MAX_PENDING: usize = 8;

/// What the device knew when it last retried waiting releases: the member list's epoch, the
/// subscriber key's epoch, and whether that key is confirmed current.
type Seen = (Option<Epoch>, Option<Epoch>, bool);

/// The release being fetched in one group.
struct Active {
    manifest: VerifiedManifest,
    stage: Stage,
    /// The key epoch at which `need-key` was last reported (once per epoch).
    need_key_epoch: Option<Epoch>,
}

impl Active {
    fn id(&self) -> (u64, DeviceId) {
        let m = self.manifest.manifest();
        (m.version, m.signer.clone())
    }

    fn version(&self) -> u64 {
        self.manifest.manifest().version
    }
}

enum Stage {
    /// Verified manifest, no key yet.
    WaitingKey,
    /// After a restart: the claimed chunks are being re-checked on disk.
    Checking { download: Download, claimed: u32 },
    /// Fetching chunks; `in_flight` are subscribed.
    Downloading {
        download: Download,
        in_flight: BTreeSet<u32>,
    },
    /// Every chunk stored; waiting for the staging file's digest.
    Hashing(Download),
    /// The apply command runs.
    Applying,
}

#[derive(Default)]
struct GroupOta {
    installed: Option<u64>,
    manifests: BTreeMap<(u64, DeviceId), Vec<u8>>,
    keys: BTreeMap<(u64, DeviceId), Vec<u8>>,
    saved: Option<SavedRelease>,
    active: Option<Active>,
    failed: BTreeSet<(u64, DeviceId)>,
    seen: Option<Seen>,
}

/// How a key message turned out.
enum KeyOutcome {
    Accepted(AcceptedKey),
    /// Not openable yet: the device's key or member list is behind.
    Wait,
    /// The device's current key cannot open it.
    NeedKey {
        message: Epoch,
        held: Epoch,
    },
    Refused(String),
}

/// The OTA agent of one device: every followed group's installed version and current release.
pub struct OtaAgent {
    signers: Vec<DeviceId>,
    policy: OtaPolicy,
    groups: BTreeMap<GroupId, GroupOta>,
    /// Keys sent as direct messages (sender, M) before the manifest they belong to was
    /// verified, newest last, at most [`MAX_PENDING`]: a signer's answer to `need-key` waits at
    /// the broker while the device is away and arrives before the retained manifest.
    direct_keys: Vec<(DeviceId, zeroize::Zeroizing<Vec<u8>>)>,
    /// The T_ms of the last status report sent: each report gets a later one, so that the
    /// signer, which keeps the state with the highest T_ms per device and version, never keeps
    /// `available` over a `need-key` sealed in the same millisecond.
    report_clock: u64,
}

impl core::fmt::Debug for OtaAgent {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OtaAgent")
            .field("groups", &self.groups.keys().collect::<Vec<_>>())
            .field("signers", &self.signers)
            .finish_non_exhaustive()
    }
}

impl OtaAgent {
    /// An agent for `settings`, resuming from what [`OtaFiles::load`] found.
    pub fn new(settings: &OtaSettings, mut restored: BTreeMap<GroupId, RestoredGroup>) -> Self {
        let policy = OtaPolicy {
            max_image_size: settings.max_image_bytes,
            ..OtaPolicy::default()
        };
        let groups = settings
            .groups
            .iter()
            .map(|g| {
                let r = restored.remove(g).unwrap_or_default();
                let mut state = GroupOta {
                    installed: r.installed,
                    ..GroupOta::default()
                };
                // The saved manifest is verified again like one from the broker, once the
                // member list is known; its key and progress are used when it matches.
                if let Some(saved) = r.release {
                    if let Ok(um) = UnverifiedManifest::decode(&saved.manifest) {
                        let m = um.manifest();
                        state
                            .manifests
                            .insert((m.version, m.signer.clone()), saved.manifest.clone());
                    }
                    state.saved = Some(saved);
                }
                (g.clone(), state)
            })
            .collect();
        OtaAgent {
            signers: settings.signers.clone(),
            policy,
            groups,
            direct_keys: Vec::new(),
            report_clock: 0,
        }
    }

    /// The installed version of `group`, if any.
    pub fn installed(&self, group: &GroupId) -> Option<u64> {
        self.groups.get(group)?.installed
    }

    /// The followed groups.
    pub fn groups(&self) -> impl Iterator<Item = &GroupId> {
        self.groups.keys()
    }

    /// Whether `topic` is an OTA topic of a followed group.
    pub fn handles(&self, topic: &str) -> bool {
        OtaTopic::parse(topic).is_some_and(|t| self.groups.contains_key(&t.group))
    }

    /// The subscriptions to make on every (re)connection: each pinned signer's manifests and key
    /// messages in each group (`<group>/_ota/<signer>/+/m` and `…/+/k`: wildcards inside one
    /// group's `_ota/` level, which the bridge grants to the group's subscribers), and the
    /// chunks being fetched.
    pub fn start(&self) -> Vec<OtaAction> {
        let filters = self
            .groups
            .keys()
            .flat_map(|g| self.group_filters(g))
            .collect();
        vec![OtaAction::Subscribe(filters)]
    }

    /// The subscriptions of one group's releases, for when the device has joined it (the bridge
    /// lets only the group's subscribers read its OTA topics).
    pub fn start_group(&self, group: &GroupId) -> Vec<OtaAction> {
        let filters = self.group_filters(group);
        if filters.is_empty() {
            return Vec::new();
        }
        vec![OtaAction::Subscribe(filters)]
    }

    fn group_filters(&self, group: &GroupId) -> Vec<String> {
        let mut filters = Vec::new();
        if let Some((g, state)) = self.groups.get_key_value(group) {
            for s in &self.signers {
                filters.extend(wildcard_filters(g, s));
            }
            if let Some(a) = &state.active
                && let Stage::Downloading { in_flight, .. } = &a.stage
            {
                filters.extend(
                    in_flight
                        .iter()
                        .map(|j| a.manifest.manifest().topic(OtaItem::Chunk(*j)).to_string()),
                );
            }
        }
        filters
    }

    /// Whether `filter` is one of the release filters this agent subscribes to (for a clear
    /// log line when the bridge refuses one: that group's releases are then not seen).
    pub fn is_release_filter(&self, filter: &str) -> bool {
        self.groups.keys().any(|g| {
            self.signers
                .iter()
                .any(|s| wildcard_filters(g, s).iter().any(|f| f == filter))
        })
    }

    /// Handles a PUBLISH on an OTA topic (anything else is ignored).
    pub fn on_publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let Some(t) = OtaTopic::parse(topic) else {
            return Vec::new();
        };
        let Some(state) = self.groups.get(&t.group) else {
            return Vec::new();
        };
        if !self.signers.contains(&t.signer) {
            return vec![warn(format!(
                "ota {}: release of {} v{} ignored: signer not pinned",
                t.group, t.signer, t.version
            ))];
        }
        // Old releases stay retained on the broker: below the installed version, silently.
        if state.installed.is_some_and(|i| t.version <= i) {
            return Vec::new();
        }
        match t.item {
            OtaItem::Manifest => self.on_manifest(&t, payload, dev, now_ms, rng),
            OtaItem::Key => self.on_key(&t, payload, dev, now_ms, rng),
            OtaItem::Chunk(j) => self.on_chunk(&t, j, payload, dev, now_ms, rng),
        }
    }

    fn on_manifest(
        &mut self,
        t: &OtaTopic,
        payload: &[u8],
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let Some(state) = self.groups.get_mut(&t.group) else {
            return Vec::new();
        };
        let id = (t.version, t.signer.clone());
        if state.failed.contains(&id) || state.active.as_ref().is_some_and(|a| a.id() >= id) {
            return Vec::new();
        }
        if let Ok(um) = UnverifiedManifest::decode_with_limit(payload, self.policy.max_manifest_len)
            && um.manifest().topic(OtaItem::Manifest) != *t
        {
            return vec![warn(format!(
                "ota {}: manifest on {t} refused: {}",
                t.group,
                OtaError::TopicMismatch
            ))];
        }
        insert_bounded(&mut state.manifests, id, payload.to_vec());
        self.try_manifests(&t.group, dev, now_ms, rng)
    }

    /// Verifies the waiting manifests, highest version first, and starts the first that passes.
    fn try_manifests(
        &mut self,
        group: &GroupId,
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let mut out = Vec::new();
        let Some(state) = self.groups.get_mut(group) else {
            return out;
        };
        // Without the group's member list nothing can be verified yet: wait for it.
        let Some(list) = dev.member_list(group) else {
            return out;
        };
        // A release being hashed or applied is not superseded under the apply command's feet:
        // newer manifests wait for its result.
        if state
            .active
            .as_ref()
            .is_some_and(|a| matches!(a.stage, Stage::Hashing(_) | Stage::Applying))
        {
            return out;
        }
        let ids: Vec<(u64, DeviceId)> = state.manifests.keys().rev().cloned().collect();
        let mut found = None;
        for id in ids {
            if state.active.as_ref().is_some_and(|a| a.id() >= id) {
                state.manifests.remove(&id);
                continue;
            }
            let Some(raw) = state.manifests.get(&id) else {
                continue;
            };
            let verified = UnverifiedManifest::decode_with_limit(raw, self.policy.max_manifest_len)
                .and_then(|um| {
                    um.verify(
                        group,
                        &self.signers,
                        state.installed,
                        dev.ca_public(),
                        list,
                        &self.policy,
                        now_ms,
                    )
                });
            match verified {
                Ok(vm) => {
                    state.manifests.retain(|k, _| k > &id);
                    found = Some(vm);
                    break;
                }
                // The list may not name a renewed signer certificate yet: keep it for the next.
                Err(OtaError::SignerNotListed) => {
                    tracing::debug!(group = %group, signer = %id.1, version = id.0,
                        "manifest waits: its signer certificate is not in the member list held");
                }
                Err(OtaError::Rollback) => {
                    state.manifests.remove(&id);
                }
                Err(e) => {
                    state.manifests.remove(&id);
                    out.push(warn(format!(
                        "ota {group}: manifest of {} v{} refused: {e}",
                        id.1, id.0
                    )));
                    // A signed release this device cannot take: tell the signer why.
                    if matches!(e, OtaError::ImageTooLarge | OtaError::ChunkSizeTooLarge) {
                        let detail = e.to_string();
                        out.extend(report(
                            &mut self.report_clock,
                            dev,
                            group,
                            id.0,
                            OtaState::Failed,
                            &detail,
                            now_ms,
                            rng,
                        ));
                    }
                }
            }
        }
        if let Some(vm) = found {
            out.extend(self.begin_release(group, vm, dev, now_ms, rng));
        }
        out
    }

    /// A verified manifest above any current release: it replaces the current one.
    fn begin_release(
        &mut self,
        group: &GroupId,
        vm: VerifiedManifest,
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let mut out = Vec::new();
        let Some(state) = self.groups.get_mut(group) else {
            return out;
        };
        let version = vm.manifest().version;
        if let Some(old) = state.active.take() {
            out.push(info(format!(
                "ota {group}: v{} superseded by v{version}",
                old.version()
            )));
            if let Stage::Downloading { in_flight, .. } = &old.stage {
                out.push(OtaAction::Unsubscribe(
                    in_flight
                        .iter()
                        .map(|j| {
                            old.manifest
                                .manifest()
                                .topic(OtaItem::Chunk(*j))
                                .to_string()
                        })
                        .collect(),
                ));
            }
            out.push(OtaAction::Discard {
                group: group.clone(),
            });
        }
        let m = vm.manifest();
        out.extend(report(
            &mut self.report_clock,
            dev,
            group,
            version,
            OtaState::Available,
            &format!(
                "{} bytes in {} chunks from {}",
                m.size,
                m.n_chunks(),
                m.signer
            ),
            now_ms,
            rng,
        ));
        // A release this device had accepted the key of before a restart.
        let saved = state.saved.take();
        let restored = saved
            .as_ref()
            .filter(|s| s.manifest == vm.as_bytes())
            .and_then(|s| vm.restore_key(&s.key).ok().map(|k| (k, s.progress.clone())));
        if saved.is_some() && restored.is_none() {
            out.push(OtaAction::Discard {
                group: group.clone(),
            });
        }
        state.active = Some(Active {
            manifest: vm,
            stage: Stage::WaitingKey,
            need_key_epoch: None,
        });
        match restored {
            Some((key, progress)) => {
                out.extend(self.resume(group, key, progress, dev, now_ms, rng))
            }
            None => match self.waiting_direct_key(group) {
                Some((sender, key)) => {
                    out.push(info(format!(
                        "ota {group}: key received from {sender} as a direct message"
                    )));
                    out.extend(self.accepted(group, key, dev, now_ms, rng));
                }
                None => out.extend(self.try_key(group, dev, now_ms, rng)),
            },
        }
        out
    }

    /// Resumes a release whose key was saved: re-check the chunks the progress record claims.
    fn resume(
        &mut self,
        group: &GroupId,
        key: AcceptedKey,
        progress: Option<Vec<u8>>,
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let Some(active) = self.groups.get_mut(group).and_then(|s| s.active.as_mut()) else {
            return Vec::new();
        };
        let Ok(fresh) = Download::new(active.manifest.clone(), key.clone()) else {
            return Vec::new();
        };
        let claimed = progress
            .and_then(|p| Download::resume(active.manifest.clone(), key.clone(), &p).ok())
            .map(|d| {
                let m = active.manifest.manifest();
                (0..m.n_chunks())
                    .filter(|j| d.is_stored(*j))
                    .map(|j| ChunkSpan {
                        index: j,
                        offset: m.chunk_offset(j),
                        len: m.chunk_len(j).unwrap_or(0),
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if claimed.is_empty() {
            // Nothing claimed on disk: start the staging file again.
            let size = active.manifest.manifest().size;
            let mut out = vec![OtaAction::PrepareStaging {
                group: group.clone(),
                size,
            }];
            out.extend(self.begin_download(group, fresh, "", dev, now_ms, rng));
            return out;
        }
        let version = active.version();
        active.stage = Stage::Checking {
            download: fresh,
            claimed: u32::try_from(claimed.len()).unwrap_or(u32::MAX),
        };
        vec![OtaAction::CheckStaged {
            group: group.clone(),
            version,
            chunks: claimed,
        }]
    }

    /// Checks one chunk read back from the staging file after a restart: its plaintext,
    /// encrypted again under K_j (deterministic: a fresh key per chunk, zero nonce), must hash to
    /// the manifest's h_j. Returns whether it is intact (then it is not fetched again).
    pub fn on_staged_chunk(
        &mut self,
        group: &GroupId,
        version: u64,
        j: u32,
        plaintext: &[u8],
    ) -> bool {
        let Some(active) = self.groups.get_mut(group).and_then(|s| s.active.as_mut()) else {
            return false;
        };
        if active.version() != version {
            return false;
        }
        let Stage::Checking { download, .. } = &mut active.stage else {
            return false;
        };
        let m = active.manifest.manifest();
        let (Some(len), Some(h)) = (m.chunk_len(j), m.chunk_hashes.get(j as usize)) else {
            return false;
        };
        if plaintext.len() as u64 != len {
            return false;
        }
        let k_c = &download.key().key_message().content_key;
        let ct = seal_chunk(k_c, &m.group, m.version, j, plaintext);
        let intact = sha256(&[&ct]) == *h;
        intact && download.mark_stored(j).is_ok()
    }

    /// The re-check after a restart is over: fetch what is missing.
    pub fn on_staged_checked(
        &mut self,
        group: &GroupId,
        version: u64,
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let Some(active) = self.groups.get_mut(group).and_then(|s| s.active.as_mut()) else {
            return Vec::new();
        };
        if active.version() != version {
            return Vec::new();
        }
        let Stage::Checking { download, claimed } =
            core::mem::replace(&mut active.stage, Stage::WaitingKey)
        else {
            return Vec::new();
        };
        let n = active.manifest.manifest().n_chunks();
        let intact = n - download.missing_count();
        let mut out = vec![info(format!(
            "ota {group} v{version}: resumed, {intact} of {claimed} chunks on disk intact"
        ))];
        if intact < claimed {
            out.push(OtaAction::SaveProgress {
                group: group.clone(),
                progress: download.progress(),
            });
        }
        let detail = format!("resumed with {intact} of {n} chunks");
        out.extend(self.begin_download(group, download, &detail, dev, now_ms, rng));
        out
    }

    fn on_key(
        &mut self,
        t: &OtaTopic,
        payload: &[u8],
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let Some(state) = self.groups.get_mut(&t.group) else {
            return Vec::new();
        };
        let id = (t.version, t.signer.clone());
        if state.failed.contains(&id) || state.active.as_ref().is_some_and(|a| a.id() > id) {
            return Vec::new();
        }
        // A later copy (republished at a new epoch) replaces the one held.
        insert_bounded(&mut state.keys, id, payload.to_vec());
        self.try_key(&t.group, dev, now_ms, rng)
    }

    /// Tries the waiting key message of the current release, if it waits for one.
    fn try_key(
        &mut self,
        group: &GroupId,
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let Some(state) = self.groups.get_mut(group) else {
            return Vec::new();
        };
        let Some(active) = state.active.as_mut() else {
            return Vec::new();
        };
        if !matches!(active.stage, Stage::WaitingKey) {
            return Vec::new();
        }
        let id = active.id();
        let Some(raw) = state.keys.get(&id) else {
            return Vec::new();
        };
        match open_key(group, raw, &active.manifest, dev, now_ms) {
            KeyOutcome::Accepted(key) => {
                state.keys.remove(&id);
                self.accepted(group, key, dev, now_ms, rng)
            }
            KeyOutcome::Wait => Vec::new(),
            KeyOutcome::NeedKey { message, held } => {
                if active.need_key_epoch == Some(held) {
                    return Vec::new();
                }
                active.need_key_epoch = Some(held);
                let detail = format!(
                    "the key message of epoch {} does not open with the keys of epoch {}",
                    message.0, held.0
                );
                report(
                    &mut self.report_clock,
                    dev,
                    group,
                    id.0,
                    OtaState::NeedKey,
                    &detail,
                    now_ms,
                    rng,
                )
            }
            KeyOutcome::Refused(why) => {
                state.keys.remove(&id);
                vec![warn(format!(
                    "ota {group}: key message of v{} refused: {why}",
                    id.0
                ))]
            }
        }
    }

    /// Handles a direct message (PROTOCOL.md §7.1) that may carry the key of a release waiting
    /// for one. Returns no action if it carries none.
    pub fn on_direct(
        &mut self,
        msg: &VerifiedDirect,
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let found = self.groups.iter().find_map(|(g, s)| {
            let a = s.active.as_ref()?;
            if !matches!(a.stage, Stage::WaitingKey) {
                return None;
            }
            a.manifest
                .accept_direct_key(msg)
                .ok()
                .map(|k| (g.clone(), k))
        });
        match found {
            Some((group, key)) => {
                let mut out = vec![info(format!(
                    "ota {group}: key received from {} as a direct message",
                    msg.sender()
                ))];
                out.extend(self.accepted(&group, key, dev, now_ms, rng));
                out
            }
            // No release waits for it yet: kept (in memory) for a manifest that arrives later,
            // if it comes from a pinned signer and is an OTA key message at all.
            None if self.signers.contains(msg.sender())
                && quva_client::ota::KeyMessage::from_bytes(msg.payload()).is_ok() =>
            {
                self.direct_keys.push((
                    msg.sender().clone(),
                    zeroize::Zeroizing::new(msg.payload().to_vec()),
                ));
                if self.direct_keys.len() > MAX_PENDING {
                    self.direct_keys.remove(0);
                }
                vec![info(format!(
                    "ota: key from {} kept until the manifest it belongs to is verified",
                    msg.sender()
                ))]
            }
            None => Vec::new(),
        }
    }

    /// A key sent as a direct message before `group`'s current release was verified, if one
    /// belongs to it: taken out of the waiting keys.
    fn waiting_direct_key(&mut self, group: &GroupId) -> Option<(DeviceId, AcceptedKey)> {
        let active = self.groups.get(group)?.active.as_ref()?;
        let (i, key) = self
            .direct_keys
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, (sender, m))| {
                active
                    .manifest
                    .accept_key(sender, &m[..])
                    .ok()
                    .map(|k| (i, k))
            })?;
        let (sender, _) = self.direct_keys.remove(i);
        Some((sender, key))
    }

    /// A key was accepted for the current release: keep it, create the staging file, fetch.
    fn accepted(
        &mut self,
        group: &GroupId,
        key: AcceptedKey,
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let Some(active) = self.groups.get_mut(group).and_then(|s| s.active.as_mut()) else {
            return Vec::new();
        };
        let Ok(download) = Download::new(active.manifest.clone(), key.clone()) else {
            return Vec::new();
        };
        let mut out = vec![
            OtaAction::SaveRelease {
                group: group.clone(),
                manifest: active.manifest.as_bytes().to_vec(),
                key: key.to_bytes(),
            },
            OtaAction::PrepareStaging {
                group: group.clone(),
                size: active.manifest.manifest().size,
            },
        ];
        out.extend(self.begin_download(group, download, "", dev, now_ms, rng));
        out
    }

    fn begin_download(
        &mut self,
        group: &GroupId,
        download: Download,
        detail: &str,
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let Some(active) = self.groups.get_mut(group).and_then(|s| s.active.as_mut()) else {
            return Vec::new();
        };
        let version = active.version();
        let total = active.manifest.manifest().n_chunks();
        let stored = total - download.missing_count();
        active.stage = Stage::Downloading {
            download,
            in_flight: BTreeSet::new(),
        };
        let mut out = report(
            &mut self.report_clock,
            dev,
            group,
            version,
            OtaState::Downloading,
            detail,
            now_ms,
            rng,
        );
        out.push(OtaAction::Progress {
            group: group.clone(),
            version,
            stored,
            total,
        });
        out.extend(self.next_fetches(group));
        out
    }

    /// Subscribes to missing chunks up to the window; once all are stored, asks for the digest.
    fn next_fetches(&mut self, group: &GroupId) -> Vec<OtaAction> {
        let Some(active) = self.groups.get_mut(group).and_then(|s| s.active.as_mut()) else {
            return Vec::new();
        };
        let version = active.version();
        let Stage::Downloading {
            download,
            in_flight,
        } = &mut active.stage
        else {
            return Vec::new();
        };
        if download.is_complete() {
            let Stage::Downloading { download, .. } =
                core::mem::replace(&mut active.stage, Stage::Applying)
            else {
                return Vec::new();
            };
            active.stage = Stage::Hashing(download);
            return vec![OtaAction::HashImage {
                group: group.clone(),
                version,
            }];
        }
        let room = FETCH_WINDOW.saturating_sub(in_flight.len());
        let next: Vec<u32> = download
            .missing()
            .filter(|j| !in_flight.contains(j))
            .take(room)
            .collect();
        if next.is_empty() {
            return Vec::new();
        }
        in_flight.extend(next.iter().copied());
        let m = active.manifest.manifest();
        vec![OtaAction::Subscribe(
            next.iter()
                .map(|j| m.topic(OtaItem::Chunk(*j)).to_string())
                .collect(),
        )]
    }

    fn on_chunk(
        &mut self,
        t: &OtaTopic,
        j: u32,
        payload: &[u8],
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let group = &t.group;
        let Some(active) = self.groups.get_mut(group).and_then(|s| s.active.as_mut()) else {
            return Vec::new();
        };
        if active.id() != (t.version, t.signer.clone()) {
            return Vec::new();
        }
        let version = active.version();
        let total = active.manifest.manifest().n_chunks();
        let Stage::Downloading {
            download,
            in_flight,
        } = &mut active.stage
        else {
            return Vec::new();
        };
        if download.is_stored(j) {
            return Vec::new();
        }
        let opened = match download.open_chunk(j, payload) {
            Ok(o) => o,
            Err(e) => {
                // The chunk stays subscribed: a corrected one replaces the retained message.
                let detail = format!("chunk {j} refused: {e}");
                let mut out = vec![warn(format!("ota {group} v{version}: {detail}"))];
                out.extend(report(
                    &mut self.report_clock,
                    dev,
                    group,
                    version,
                    OtaState::Failed,
                    &detail,
                    now_ms,
                    rng,
                ));
                return out;
            }
        };
        if download.mark_stored(j).is_err() {
            return Vec::new();
        }
        let stored = total - download.missing_count();
        let checkpoint = stored % CHECKPOINT_CHUNKS == 0 || download.is_complete();
        // The decrypted buffer itself goes to the write: no second copy of the chunk.
        let mut out = vec![OtaAction::StoreChunk {
            group: group.clone(),
            index: j,
            offset: opened.offset(),
            data: opened.into_plaintext(),
            progress: checkpoint.then(|| download.progress()),
        }];
        // A chunk can also arrive unasked (a subscription kept by a persistent session).
        if in_flight.remove(&j) {
            out.push(OtaAction::Unsubscribe(vec![t.to_string()]));
        }
        out.push(OtaAction::Progress {
            group: group.clone(),
            version,
            stored,
            total,
        });
        out.extend(self.next_fetches(group));
        out
    }

    /// The staging file's SHA-256 ([`OtaAction::HashImage`]): checked against H(image); then
    /// the apply command runs.
    pub fn on_image_digest(
        &mut self,
        group: &GroupId,
        version: u64,
        digest: &[u8; 32],
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let Some(active) = self.groups.get_mut(group).and_then(|s| s.active.as_mut()) else {
            return Vec::new();
        };
        if active.version() != version {
            return Vec::new();
        }
        let Stage::Hashing(download) = &active.stage else {
            return Vec::new();
        };
        match download.finish(digest) {
            Ok(ready) => {
                active.stage = Stage::Applying;
                let mut out = report(
                    &mut self.report_clock,
                    dev,
                    group,
                    version,
                    OtaState::Verified,
                    &format!("{} ({} bytes)", ready.name, ready.size),
                    now_ms,
                    rng,
                );
                out.push(OtaAction::Apply {
                    group: group.clone(),
                    version,
                    name: ready.name,
                });
                out
            }
            Err(e) => self.fail(group, &e.to_string(), dev, now_ms, rng),
        }
    }

    /// The apply command's result ([`OtaAction::Apply`]): on success the version is recorded,
    /// then `applied` reported; on failure `failed` is reported and the version not recorded.
    pub fn on_apply_result(
        &mut self,
        group: &GroupId,
        version: u64,
        result: Result<(), String>,
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let Some(state) = self.groups.get_mut(group) else {
            return Vec::new();
        };
        match &state.active {
            Some(a) if a.version() == version && matches!(a.stage, Stage::Applying) => {}
            _ => return Vec::new(),
        }
        if let Err(detail) = result {
            return self.fail(group, &detail, dev, now_ms, rng);
        }
        let Some(signer) = state.active.take().map(|a| a.id().1) else {
            return Vec::new();
        };
        state.installed = Some(version);
        state.manifests.retain(|(v, _), _| *v > version);
        state.keys.retain(|(v, _), _| *v > version);
        let mut out = vec![OtaAction::RecordInstalled {
            group: group.clone(),
            version,
            signer,
        }];
        out.extend(self.close_release(group, version, OtaState::Applied, "", dev, now_ms, rng));
        out
    }

    /// A file step failed for `group`'s release: it fails (reported, files discarded).
    pub fn on_io_error(
        &mut self,
        group: &GroupId,
        detail: &str,
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        self.fail(group, &format!("storage: {detail}"), dev, now_ms, rng)
    }

    /// Ends the current release as failed: reported, its files discarded, not retried by this
    /// process (a restart tries it once more).
    fn fail(
        &mut self,
        group: &GroupId,
        detail: &str,
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let Some(state) = self.groups.get_mut(group) else {
            return Vec::new();
        };
        let Some(active) = state.active.take() else {
            return Vec::new();
        };
        let id = active.id();
        state.failed.insert(id.clone());
        let mut out = vec![warn(format!("ota {group} v{}: failed: {detail}", id.0))];
        if let Stage::Downloading { in_flight, .. } = &active.stage
            && !in_flight.is_empty()
        {
            out.push(OtaAction::Unsubscribe(
                in_flight
                    .iter()
                    .map(|j| {
                        active
                            .manifest
                            .manifest()
                            .topic(OtaItem::Chunk(*j))
                            .to_string()
                    })
                    .collect(),
            ));
        }
        out.extend(self.close_release(group, id.0, OtaState::Failed, detail, dev, now_ms, rng));
        out
    }

    /// The end of a release, applied or failed: the final report, its files discarded, and a
    /// newer release that arrived meanwhile started.
    #[allow(clippy::too_many_arguments)]
    fn close_release(
        &mut self,
        group: &GroupId,
        version: u64,
        outcome: OtaState,
        detail: &str,
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let mut out = report(
            &mut self.report_clock,
            dev,
            group,
            version,
            outcome,
            detail,
            now_ms,
            rng,
        );
        out.push(OtaAction::Discard {
            group: group.clone(),
        });
        out.extend(self.try_manifests(group, dev, now_ms, rng));
        out
    }

    /// The passing of time: when a group's member list or key changed, waiting manifests and
    /// key messages are tried again (and `need-key` reported once for a new epoch).
    pub fn tick(
        &mut self,
        dev: &Device,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<OtaAction> {
        let mut out = Vec::new();
        let groups: Vec<GroupId> = self.groups.keys().cloned().collect();
        for g in groups {
            let seen = (
                dev.member_list(&g).map(|l| l.epoch()),
                dev.keyring(&g, Role::Subscriber).map(|k| k.epoch()),
                dev.is_current(&g, Role::Subscriber),
            );
            let Some(state) = self.groups.get_mut(&g) else {
                continue;
            };
            if state.seen == Some(seen) {
                continue;
            }
            state.seen = Some(seen);
            out.extend(self.try_manifests(&g, dev, now_ms, rng));
            out.extend(self.try_key(&g, dev, now_ms, rng));
        }
        out
    }
}

/// `<group>/_ota/<signer>/+/m` and `…/+/k`.
fn wildcard_filters(group: &GroupId, signer: &DeviceId) -> [String; 2] {
    let base = format!("{}/{OTA_LEVEL}/{}/+", group.as_str(), signer.as_str());
    [format!("{base}/m"), format!("{base}/k")]
}

/// Opens a key message with the device's keys of the group (no time window: it is retained).
fn open_key(
    group: &GroupId,
    raw: &[u8],
    manifest: &VerifiedManifest,
    dev: &Device,
    now_ms: u64,
) -> KeyOutcome {
    let policy = dev.config().policy;
    let msg = match UnverifiedMessage::decode_with_limit(raw, policy.max_payload) {
        Ok(m) => m,
        Err(e) => return KeyOutcome::Refused(e.to_string()),
    };
    let Some(held) = dev.keyring(group, Role::Subscriber).map(|k| k.epoch()) else {
        return KeyOutcome::Wait;
    };
    let epoch = msg.header().epoch;
    if &msg.header().group != group {
        return KeyOutcome::Refused(OtaError::NotOtaMessage.to_string());
    }
    // A key of a later epoch than the device holds: its own key is about to catch up.
    if epoch > held {
        return KeyOutcome::Wait;
    }
    let view = dev.view(now_ms);
    match msg.verify_without_window(&view, &view, &policy, now_ms) {
        Ok(m) => match manifest.accept_key_message(&m) {
            Ok(k) => KeyOutcome::Accepted(k),
            Err(e) => KeyOutcome::Refused(e.to_string()),
        },
        Err(Rejection::WrongEpoch | Rejection::KeyNotHeld | Rejection::UnknownGroup)
            if dev.is_current(group, Role::Subscriber) =>
        {
            KeyOutcome::NeedKey {
                message: epoch,
                held,
            }
        }
        // A key not confirmed current, or a member list of that epoch not yet here.
        Err(
            Rejection::WrongEpoch
            | Rejection::KeyNotHeld
            | Rejection::UnknownGroup
            | Rejection::UnknownSender
            | Rejection::NotMember,
        ) if !dev.is_current(group, Role::Subscriber)
            || dev.member_list(group).is_none_or(|l| l.epoch() < epoch) =>
        {
            KeyOutcome::Wait
        }
        Err(e) => KeyOutcome::Refused(e.to_string()),
    }
}

/// A status report of `state` for release `version`, sealed as an option-2 query of the group,
/// with a T_ms above `clock`'s (then the new `clock`).
#[allow(clippy::too_many_arguments)]
fn report(
    clock: &mut u64,
    dev: &Device,
    group: &GroupId,
    version: u64,
    state: OtaState,
    detail: &str,
    now_ms: u64,
    rng: &mut impl CryptoRngCore,
) -> Vec<OtaAction> {
    let mut detail = detail.to_owned();
    while detail.len() > quva_client::ota::MAX_DETAIL_LEN {
        detail.pop();
    }
    let mut out = vec![OtaAction::Status {
        group: group.clone(),
        version,
        state,
        detail: detail.clone(),
    }];
    let report = StatusReport {
        version,
        state,
        detail,
    };
    let t_ms = now_ms.max(clock.saturating_add(1));
    *clock = t_ms;
    let sealed = report.to_bytes().map_err(|e| e.to_string()).and_then(|m| {
        dev.seal(
            group,
            Protection::Confidential,
            Direction::Query,
            &m,
            t_ms,
            rng,
        )
        .map_err(|e| e.to_string())
    });
    match sealed {
        Ok((topic, payload)) => out.push(OtaAction::Publish { topic, payload }),
        Err(e) => out.push(warn(format!(
            "ota {group} v{version}: cannot send the {} report: {e}",
            state_name(state)
        ))),
    }
    out
}

fn info(message: String) -> OtaAction {
    OtaAction::Log {
        level: LogLevel::Info,
        message,
    }
}

fn warn(message: String) -> OtaAction {
    OtaAction::Log {
        level: LogLevel::Warn,
        message,
    }
}

/// Inserts, then drops the lowest versions beyond [`MAX_PENDING`].
fn insert_bounded(map: &mut BTreeMap<(u64, DeviceId), Vec<u8>>, id: (u64, DeviceId), raw: Vec<u8>) {
    map.insert(id, raw);
    while map.len() > MAX_PENDING {
        map.pop_first();
    }
}
