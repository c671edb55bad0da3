//! The rekey engine: one writer task that owns every state change of the CA.
//!
//! Implements the CA side of PROTOCOL.md §3 (enrollment and renewal), §4 (group-key requests)
//! and §5 (rekeying). Commands arrive over an mpsc channel with a oneshot reply each. Membership
//! changes of a group (joins, denials, revocations, certificate expiry, the periodic timer, a
//! forced rekey) open a batching window (default 200 ms); when it closes, quva-client's
//! [`GroupState::stage`] plans one epoch with its notices, and the change, the new group state,
//! the epoch record, the notices, the audit entries and the counters are written in one synced
//! batch before any waiting caller gets its reply. Only then is the staged state committed in
//! memory. A crash before the write loses only unacknowledged requests.
//!
//! Reads (listings, group info, certificates, the notice log) go straight to the store.
//!
//! # Usage
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::Arc;
//! use quva_ca::clock::SystemClock;
//! use quva_ca::engine::{Engine, EngineConfig};
//! use quva_ca::store::MemoryStore;
//! use quva_client::curve::KeyPair;
//! use quva_client::group::Privacy;
//! use quva_client::ids::GroupId;
//!
//! let ca = KeyPair::random(&mut quva_client::rng::SystemRng::new());
//! let (engine, task) = Engine::spawn(Arc::new(MemoryStore::new()), ca,
//!     EngineConfig::default(), Arc::new(SystemClock)).unwrap();
//! let g = engine.create_group(GroupId::new("plant/temp").unwrap(), Privacy::Standard, 0)
//!     .await.unwrap();
//! assert_eq!(g.epoch, 0);
//! engine.shutdown().await;
//! task.await.unwrap();
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quva_client::codec::{Decode, DecodeError, Encode};
use quva_client::curve::{KeyPair, Point, SecretScalar};
use quva_client::enrollment::{
    CertConnectProof, EnrollError, EnrollRequest, EnrollmentSecret, ImplicitCert,
    REASON_PACKET_TOO_LARGE, REASON_PAYLOAD_FORMAT_INVALID, RenewRequest, VerifiedRequest,
};
use quva_client::group::{
    GroupError, GroupKeyRequest, JoinedMember, MAX_PROPERTY_LEN, Member, Privacy,
};
use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
use quva_client::rekey::{Change, GroupState, Plan, RekeyError};
use quva_client::rng::SystemRng;
use quva_proto::v1::{AuditEntry, Notice, NoticeKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::auth::AuditSink;
use crate::clock::Clock;
use crate::enrollment::{self, CertUse, DEFAULT_SECRET_VALIDITY_MS};
use crate::error::CaError;
use crate::refusals::{Decision, RefusalBudget, RefusalKey};
use crate::store::records::EpochMember;
use crate::store::records::device_state;
use crate::store::{
    Batch, CaStore, CertRecord, DeviceRecord, EpochRecord, GroupRecord, Key, MemberRecord,
    MetaRecord, NonceScope, Staged, Tables, member_ids,
};

/// Largest accepted enrollment or renewal request (`req || proof`), bytes.
pub const MAX_CERT_REQUEST_LEN: usize = 512;

/// Largest accepted `quva-cert-v1` proof (a certificate, a client identifier of up to 65535
/// bytes and a signature), bytes.
pub const MAX_CERT_PROOF_LEN: usize = 512 + u16::MAX as usize;

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Changes inside this window coalesce into one epoch.
    pub batch_window: Duration,
    /// Allowed |T − now| of requests, ms.
    pub time_window_ms: u64,
    /// Lifetime of issued certificates, ms.
    pub cert_validity_ms: u64,
    /// Period of the expiry, revocation and periodic-rekey sweep.
    pub sweep_interval: Duration,
    /// Most commands whose writes share one synced batch (group commit); 1 syncs each alone.
    pub max_group_commit: usize,
    /// Default lifetime of an enrollment secret, ms (PROTOCOL.md §3: 7 days).
    pub secret_validity_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            batch_window: Duration::from_millis(200),
            time_window_ms: 60_000,
            cert_validity_ms: 30 * 24 * 3600 * 1000,
            sweep_interval: Duration::from_secs(1),
            max_group_commit: DEFAULT_MAX_GROUP_COMMIT,
            secret_validity_ms: DEFAULT_SECRET_VALIDITY_MS,
        }
    }
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Certificates issued by enrollment.
    pub enrollments: AtomicU64,
    /// Certificates issued by renewal.
    pub renewals: AtomicU64,
    /// Group-key requests answered.
    pub joins: AtomicU64,
    /// Device-path requests refused.
    pub refusals: AtomicU64,
    /// Refusals over their device's budget, answered but not written to the audit log.
    pub refusals_unrecorded: AtomicU64,
    /// First uses of certificates (each spends a secret or revokes a previous certificate).
    pub first_uses: AtomicU64,
    /// Requests refused by the token check.
    pub auth_denied: AtomicU64,
    /// Epochs committed since start.
    pub rekeys: AtomicU64,
    /// Notices written since start.
    pub notices: AtomicU64,
    /// Changes waiting in open batching windows.
    pub pending_changes: AtomicU64,
    /// Synced commits since start.
    pub commits: AtomicU64,
    /// Failed commits since start.
    pub commit_failures: AtomicU64,
    /// Audit entries dropped because the engine queue was full.
    pub audit_dropped: AtomicU64,
    /// Writer time spent staging and writing epoch changes (not the disk sync), microseconds.
    pub rekey_micros: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The answer to a group-key request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinReply {
    /// `ginfo || sig || ecies(...)`, the SUBACK `quva-gk` bytes.
    pub response: Vec<u8>,
    /// The epoch of the delivered key.
    pub epoch: u32,
}

/// The answer to a reported certificate use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertificateUse {
    /// The certificate's serial.
    pub serial: u64,
    /// Whether this was its first use.
    pub first: bool,
}

/// A registered device with its one-time secret.
pub struct Registered {
    /// The device row.
    pub device: DeviceRecord,
    /// The enrollment secret, hex.
    pub secret: Zeroizing<String>,
}

type Reply<T> = oneshot::Sender<Result<T, CaError>>;

enum Cmd {
    Enroll(Vec<u8>, Reply<Vec<u8>>),
    Renew(Vec<u8>, Reply<Vec<u8>>),
    ConfirmUse(Vec<u8>, Reply<CertificateUse>),
    Join(Vec<u8>, Reply<JoinReply>),
    Register {
        id: DeviceId,
        note: String,
        reissue: bool,
        secret_validity_ms: u64,
        reply: Reply<Registered>,
    },
    Revoke {
        id: DeviceId,
        reason: String,
        reply: Reply<DeviceRecord>,
    },
    CreateGroup {
        id: GroupId,
        privacy: Privacy,
        interval_secs: u64,
        reply: Reply<GroupRecord>,
    },
    SetPermission {
        group: GroupId,
        device: DeviceId,
        role: Role,
        allow: bool,
        reply: Reply<u32>,
    },
    Rekey(GroupId, Reply<u32>),
    Audit(AuditEntry),
    Shutdown(oneshot::Sender<()>),
}

/// The handle to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Cmd>,
    notices: watch::Receiver<u64>,
    stats: Arc<Stats>,
}

impl EngineHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, CaError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| CaError::Unavailable)?;
        rx.await.map_err(|_| CaError::Unavailable)?
    }

    /// Enrollment (§3): `req || HMAC` in, `cert || sc(a_i)` out. The certificate supersedes the
    /// device's unused one; the secret stays until a certificate's first use.
    ///
    /// # Errors
    /// [`CaError::NotAuthorized`], [`CaError::Malformed`], [`CaError::TooLarge`], storage.
    pub async fn enroll(&self, data: Vec<u8>) -> Result<Vec<u8>, CaError> {
        self.call(|r| Cmd::Enroll(data, r)).await
    }

    /// Renewal (§3): `req || sig` in, `cert || sc(a_i)` out.
    ///
    /// # Errors
    /// As [`EngineHandle::enroll`].
    pub async fn renew(&self, data: Vec<u8>) -> Result<Vec<u8>, CaError> {
        self.call(|r| Cmd::Renew(data, r)).await
    }

    /// A `quva-cert-v1` proof accepted by a bridge (§3): `cert || T || nonce || str(client_id) ||
    /// sig` in. The first use of a certificate spends the secret and revokes the previous one.
    ///
    /// # Errors
    /// [`CaError::NotAuthorized`] for a bad proof or a superseded, revoked or unknown
    /// certificate; [`CaError::Malformed`], [`CaError::TooLarge`], storage.
    pub async fn confirm_use(&self, data: Vec<u8>) -> Result<CertificateUse, CaError> {
        self.call(|r| Cmd::ConfirmUse(data, r)).await
    }

    /// A group-key request (§4); answers once the member's epoch is durable.
    ///
    /// # Errors
    /// As [`EngineHandle::enroll`].
    pub async fn join(&self, data: Vec<u8>) -> Result<JoinReply, CaError> {
        self.call(|r| Cmd::Join(data, r)).await
    }

    /// Registers a device (or re-issues its secret) and returns the one-time secret, which
    /// expires after `secret_validity_ms` (0 for the configured default).
    ///
    /// # Errors
    /// [`CaError::AlreadyExists`], [`CaError::NotFound`] (re-issue of an unknown device),
    /// [`CaError::FailedPrecondition`] (revoked), storage.
    pub async fn register_device(
        &self,
        id: DeviceId,
        note: String,
        reissue: bool,
        secret_validity_ms: u64,
    ) -> Result<Registered, CaError> {
        self.call(|reply| Cmd::Register {
            id,
            note,
            reissue,
            secret_validity_ms,
            reply,
        })
        .await
    }

    /// Revokes a device: its certificates and secret, and its memberships (rekeyed in the next
    /// window).
    ///
    /// # Errors
    /// [`CaError::NotFound`], [`CaError::FailedPrecondition`] if already revoked, storage.
    pub async fn revoke_device(
        &self,
        id: DeviceId,
        reason: String,
    ) -> Result<DeviceRecord, CaError> {
        self.call(|reply| Cmd::Revoke { id, reason, reply }).await
    }

    /// Creates a group at epoch 0 without members.
    ///
    /// # Errors
    /// [`CaError::AlreadyExists`], storage.
    pub async fn create_group(
        &self,
        id: GroupId,
        privacy: Privacy,
        interval_secs: u64,
    ) -> Result<GroupRecord, CaError> {
        self.call(|reply| Cmd::CreateGroup {
            id,
            privacy,
            interval_secs,
            reply,
        })
        .await
    }

    /// Allows or denies a device in a role; returns the group's epoch once the change (and any
    /// rekey it causes) is durable.
    ///
    /// # Errors
    /// [`CaError::NotFound`] for an unknown group or device, storage.
    pub async fn set_permission(
        &self,
        group: GroupId,
        device: DeviceId,
        role: Role,
        allow: bool,
    ) -> Result<u32, CaError> {
        self.call(|reply| Cmd::SetPermission {
            group,
            device,
            role,
            allow,
            reply,
        })
        .await
    }

    /// Forces a new epoch; returns it once durable.
    ///
    /// # Errors
    /// [`CaError::NotFound`], storage.
    pub async fn rekey(&self, group: GroupId) -> Result<u32, CaError> {
        self.call(|r| Cmd::Rekey(group, r)).await
    }

    /// Flushes every open window and stops the task.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The sequence number of the last committed notice, updated after every commit.
    pub fn notices(&self) -> watch::Receiver<u64> {
        self.notices.clone()
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
}

impl AuditSink for EngineHandle {
    fn record(&self, entry: AuditEntry) {
        if entry.kind == "auth.denied" {
            bump(&self.stats.auth_denied);
        }
        if self.tx.try_send(Cmd::Audit(entry)).is_err() {
            bump(&self.stats.audit_dropped);
            tracing::warn!("audit entry dropped: engine queue full");
        }
    }
}

/// A waiting caller of an open window.
// A window holds a few waiters for a few hundred milliseconds; boxing the member would only add
// an allocation per join.
#[allow(clippy::large_enum_variant)]
enum Waiter {
    Join {
        member: Member,
        reply: Reply<JoinReply>,
    },
    Epoch(Reply<u32>),
}

/// The changes of one group's open batching window.
struct Pending {
    deadline: Instant,
    changes: Vec<Change>,
    reasons: BTreeSet<&'static str>,
    rows: BTreeMap<(Role, DeviceId), Option<MemberRecord>>,
    nonces: Vec<[u8; 16]>,
    audits: Vec<AuditEntry>,
    waiters: Vec<Waiter>,
}

impl Pending {
    fn new(deadline: Instant) -> Pending {
        Pending {
            deadline,
            changes: Vec::new(),
            reasons: BTreeSet::new(),
            rows: BTreeMap::new(),
            nonces: Vec::new(),
            audits: Vec::new(),
            waiters: Vec::new(),
        }
    }
}

struct Live {
    settings: GroupRecord,
    state: GroupState,
    pending: Option<Pending>,
    /// Certificate serial and expiry of every joined member, so that neither an epoch record
    /// nor the expiry sweep reads the store once per member.
    joined: BTreeMap<(Role, DeviceId), JoinedCert>,
    /// Whether the sweep has compared every member with the store since the state was loaded.
    checked: bool,
}

/// The certificate a joined member's share belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct JoinedCert {
    serial: u64,
    not_after_ms: u64,
}

impl JoinedCert {
    fn of_serial(store: &dyn CaStore, serial: u64) -> Result<JoinedCert, CaError> {
        let not_after_ms = store.cert(serial)?.map_or(0, |c| c.not_after_ms);
        Ok(JoinedCert {
            serial,
            not_after_ms,
        })
    }
}

/// One atomic write being assembled, with the counters it advances.
struct Tx {
    batch: Batch,
    meta: MetaRecord,
    now: u64,
    notices: u64,
}

impl Tx {
    fn audit(&mut self, mut e: AuditEntry) {
        e.seq = self.meta.next_audit_seq;
        self.meta.next_audit_seq += 1;
        e.time_ms = self.now;
        self.batch.put_audit(&e);
    }

    fn notice(&mut self, mut n: Notice) -> u64 {
        n.seq = self.meta.next_notice_seq;
        self.meta.next_notice_seq += 1;
        n.created_ms = self.now;
        self.batch.put_notice(&n);
        self.notices += 1;
        n.seq
    }

    fn serial(&mut self) -> u64 {
        let s = self.meta.next_serial;
        self.meta.next_serial += 1;
        s
    }
}

fn entry(
    kind: &str,
    actor: &str,
    device: &str,
    group: &str,
    outcome: &str,
    detail: String,
) -> AuditEntry {
    AuditEntry {
        kind: kind.into(),
        actor: actor.into(),
        device: device.into(),
        group: group.into(),
        outcome: outcome.into(),
        detail,
        ..Default::default()
    }
}

fn decode_err(e: DecodeError) -> CaError {
    match e {
        DecodeError::TooLarge(what) => CaError::TooLarge(what),
        _ => CaError::Malformed("request"),
    }
}

fn enroll_err(e: EnrollError) -> CaError {
    match e.connack_reason() {
        REASON_PACKET_TOO_LARGE => CaError::TooLarge("request"),
        REASON_PAYLOAD_FORMAT_INVALID => CaError::Malformed("request"),
        _ => CaError::NotAuthorized(match e {
            EnrollError::BadProof => "bad proof of identity",
            EnrollError::OutsideWindow => "timestamp outside window",
            EnrollError::Expired => "certificate expired",
            EnrollError::NotYetValid => "certificate not yet valid",
            EnrollError::WrongCa => "certificate from another CA",
            EnrollError::IdentityMismatch => "identity mismatch",
            _ => "refused",
        }),
    }
}

fn group_err(e: GroupError) -> CaError {
    match e {
        GroupError::Decode(d) => decode_err(d),
        GroupError::StaleTimestamp => CaError::NotAuthorized("timestamp outside window"),
        GroupError::Verify(_) => CaError::NotAuthorized("bad proof of possession"),
        _ => CaError::NotAuthorized("refused"),
    }
}

fn rekey_err(e: RekeyError) -> CaError {
    match e {
        RekeyError::EpochExhausted => CaError::FailedPrecondition("epoch counter exhausted"),
        _ => {
            tracing::error!(error = %e, "group state error");
            CaError::Crypto("group state")
        }
    }
}

fn role_of(v: u32) -> Option<Role> {
    u8::try_from(v).ok().and_then(Role::from_u8)
}

/// The writer task's state. Create it with [`Engine::spawn`].
pub struct Engine {
    store: Arc<Staged>,
    ca: KeyPair,
    cfg: EngineConfig,
    clock: Arc<dyn Clock>,
    rng: SystemRng,
    meta: MetaRecord,
    groups: BTreeMap<GroupId, Live>,
    pending_nonces: HashSet<[u8; 16]>,
    notice_tx: watch::Sender<u64>,
    stats: Arc<Stats>,
    sweeps: u64,
    /// Replies held back until the staged writes are synced.
    answers: Vec<Answer>,
    /// Notices staged since the last sync.
    staged_notices: u64,
    /// Set by a shutdown command: flush, sync, confirm, stop.
    stopping: Option<oneshot::Sender<()>>,
    /// How many refusals per device are written to the audit log.
    refusal_budget: RefusalBudget,
}

/// A held-back reply: sends its result, or the sync error instead of a success.
type Answer = Box<dyn FnOnce(Option<&CaError>) + Send>;

/// Default of [`EngineConfig::max_group_commit`].
pub const DEFAULT_MAX_GROUP_COMMIT: usize = 1024;

impl Engine {
    /// Loads the state from `store` and starts the writer task.
    ///
    /// # Errors
    /// [`CaError::Store`] if the store cannot be read; [`CaError::Crypto`] if a stored group
    /// state does not verify under this CA key (wrong key or corrupt data).
    pub fn spawn(
        store: Arc<dyn CaStore>,
        ca: KeyPair,
        cfg: EngineConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(EngineHandle, JoinHandle<()>), CaError> {
        let (meta, groups) = load(store.as_ref(), &ca, clock.as_ref())?;
        let (notice_tx, notices) = watch::channel(meta.next_notice_seq - 1);
        let (tx, rx) = mpsc::channel(DEFAULT_MAX_GROUP_COMMIT);
        let stats = Arc::new(Stats::default());
        let engine = Engine {
            store: Arc::new(Staged::new(store)),
            ca,
            cfg,
            clock,
            rng: SystemRng::new(),
            meta,
            groups,
            pending_nonces: HashSet::new(),
            notice_tx,
            stats: stats.clone(),
            sweeps: 0,
            answers: Vec::new(),
            staged_notices: 0,
            stopping: None,
            refusal_budget: RefusalBudget::default(),
        };
        let task = tokio::spawn(engine.run(rx));
        Ok((EngineHandle { tx, notices, stats }, task))
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut sweep = tokio::time::interval(self.cfg.sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self
                .groups
                .values()
                .filter_map(|l| l.pending.as_ref().map(|p| p.deadline))
                .min();
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        self.handle(cmd);
                        // Group commit: take every command already waiting, then sync once.
                        let mut n = 1;
                        while n < self.cfg.max_group_commit && self.stopping.is_none() {
                            let Ok(cmd) = rx.try_recv() else { break };
                            self.handle(cmd);
                            n += 1;
                        }
                    }
                    None => {
                        self.flush_all();
                        let _ = self.sync();
                        break;
                    }
                },
                () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    self.flush_due();
                }
                _ = sweep.tick() => self.sweep(),
            }
            if let Some(done) = self.stopping.take() {
                self.flush_all();
                let _ = self.sync();
                let _ = done.send(());
                break;
            }
            if self.sync().is_err() {
                break;
            }
            self.update_pending_gauge();
        }
        tracing::info!("engine stopped");
    }

    /// Makes every staged write durable in one synced batch, then sends the held-back replies.
    /// On failure every success becomes the error and the in-memory state is reloaded from the
    /// store; `Err` means even that failed and the engine must stop.
    fn sync(&mut self) -> Result<(), ()> {
        let answers = std::mem::take(&mut self.answers);
        let staged = self.store.staged_ops();
        let result = if staged == 0 {
            Ok(())
        } else {
            let store = self.store.clone();
            sync_blocking(move || store.sync())
        };
        let mut fatal = false;
        let error = match result {
            Ok(()) => {
                if staged > 0 {
                    bump(&self.stats.commits);
                }
                let notices = std::mem::take(&mut self.staged_notices);
                if notices > 0 {
                    self.stats.notices.fetch_add(notices, Ordering::Relaxed);
                    self.notice_tx.send_replace(self.meta.next_notice_seq - 1);
                }
                None
            }
            Err(e) => {
                bump(&self.stats.commit_failures);
                tracing::error!(error = %e, "commit failed; nothing of the batch was written");
                self.staged_notices = 0;
                if let Err(e) = self.reload() {
                    tracing::error!(error = %e, "cannot reload the state after a failed commit");
                    fatal = true;
                }
                Some(CaError::from(e))
            }
        };
        for answer in answers {
            answer(error.as_ref());
        }
        if fatal { Err(()) } else { Ok(()) }
    }

    /// Reloads counters and group states from the store, keeping open windows.
    fn reload(&mut self) -> Result<(), CaError> {
        let (meta, mut groups) = load(self.store.inner().as_ref(), &self.ca, self.clock.as_ref())?;
        for (gid, live) in &mut groups {
            if let Some(old) = self.groups.get_mut(gid) {
                live.pending = old.pending.take();
            }
        }
        self.meta = meta;
        self.groups = groups;
        Ok(())
    }

    /// Holds back a reply until the next sync.
    fn answer<T: Send + 'static>(&mut self, reply: Reply<T>, result: Result<T, CaError>) {
        self.answers.push(Box::new(move |failed: Option<&CaError>| {
            let result = match (failed, result) {
                (Some(e), Ok(_)) => Err(e.clone()),
                (_, r) => r,
            };
            let _ = reply.send(result);
        }));
    }

    fn update_pending_gauge(&self) {
        let n: usize = self
            .groups
            .values()
            .filter_map(|l| l.pending.as_ref().map(|p| p.changes.len()))
            .sum();
        self.stats
            .pending_changes
            .store(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Enroll(data, reply) => {
                let r = self.enroll(&data, false);
                self.answer(reply, r);
            }
            Cmd::Renew(data, reply) => {
                let r = self.enroll(&data, true);
                self.answer(reply, r);
            }
            Cmd::ConfirmUse(data, reply) => {
                let r = self.confirm_use(&data);
                self.answer(reply, r);
            }
            Cmd::Join(data, reply) => self.join(&data, reply),
            Cmd::Register {
                id,
                note,
                reissue,
                secret_validity_ms,
                reply,
            } => {
                let r = self.register(&id, note, reissue, secret_validity_ms);
                self.answer(reply, r);
            }
            Cmd::Revoke { id, reason, reply } => {
                let r = self.revoke(&id, reason);
                self.answer(reply, r);
            }
            Cmd::CreateGroup {
                id,
                privacy,
                interval_secs,
                reply,
            } => {
                let r = self.create_group(&id, privacy, interval_secs);
                self.answer(reply, r);
            }
            Cmd::SetPermission {
                group,
                device,
                role,
                allow,
                reply,
            } => self.set_permission(&group, &device, role, allow, reply),
            Cmd::Rekey(group, reply) => self.force_rekey(&group, reply),
            Cmd::Audit(e) => {
                let mut tx = self.begin();
                tx.audit(e);
                if let Err(e) = self.commit(tx) {
                    tracing::error!(error = %e, "cannot write audit entry");
                }
            }
            Cmd::Shutdown(done) => self.stopping = Some(done),
        }
    }

    fn begin(&self) -> Tx {
        Tx {
            batch: Batch::new(),
            meta: self.meta.clone(),
            now: self.clock.now_ms(),
            notices: 0,
        }
    }

    /// Stages `tx` for the next sync; later reads of the task see it at once.
    fn commit(&mut self, mut tx: Tx) -> Result<(), CaError> {
        tx.batch.put_meta(&tx.meta);
        self.store.commit(tx.batch)?;
        self.staged_notices += tx.notices;
        self.meta = tx.meta;
        Ok(())
    }

    /// Records a refused device-path request (best effort, within the device's budget of
    /// [`RefusalBudget`]) and returns the error.
    fn refuse<T>(
        &mut self,
        kind: &str,
        device: &str,
        group: &str,
        e: CaError,
    ) -> Result<T, CaError> {
        bump(&self.stats.refusals);
        let key = if device.is_empty() || e == CaError::NotAuthorized("unknown device") {
            RefusalKey::Unregistered
        } else {
            RefusalKey::Device(device)
        };
        let left_out = match self.refusal_budget.check(key, self.clock.now_ms()) {
            Decision::Record { left_out } => left_out,
            Decision::LeaveOut => {
                bump(&self.stats.refusals_unrecorded);
                return Err(e);
            }
        };
        tracing::info!(
            kind,
            device,
            group,
            outcome = e.outcome(),
            left_out,
            "request refused"
        );
        let detail = if left_out > 0 {
            format!("{left_out} earlier refusals of this device not recorded")
        } else {
            String::new()
        };
        let mut tx = self.begin();
        tx.audit(entry(kind, "bridge", device, group, e.outcome(), detail));
        if let Err(ce) = self.commit(tx) {
            tracing::error!(error = %ce, "cannot write audit entry");
        }
        Err(e)
    }

    fn nonce_seen(&self, scope: NonceScope, nonce: &[u8; 16]) -> Result<bool, CaError> {
        if scope == NonceScope::GroupKey && self.pending_nonces.contains(nonce) {
            return Ok(true);
        }
        let now = self.clock.now_ms();
        Ok(self
            .store
            .nonce(scope, nonce)?
            .is_some_and(|n| n.expires_ms >= now))
    }

    fn nonce_expiry(&self, now: u64) -> u64 {
        now.saturating_add(self.cfg.time_window_ms.saturating_mul(2))
    }

    // ---- §3 enrollment and renewal -------------------------------------------------------

    fn enroll(&mut self, data: &[u8], renew: bool) -> Result<Vec<u8>, CaError> {
        let kind = if renew {
            "device.renew"
        } else {
            "device.enroll"
        };
        if data.len() > MAX_CERT_REQUEST_LEN {
            return self.refuse(kind, "", "", CaError::TooLarge("request"));
        }
        let parsed = if renew {
            RenewRequest::from_bytes(data).map(|r| (r.request.id.clone(), Err(r)))
        } else {
            EnrollRequest::from_bytes(data).map(|r| (r.request.id.clone(), Ok(r)))
        };
        let (id, req) = match parsed {
            Ok(p) => p,
            Err(e) => return self.refuse(kind, "", "", decode_err(e)),
        };
        match self.enroll_checked(&id, req) {
            Ok(v) => Ok(v),
            Err(e @ (CaError::Store(_) | CaError::Crypto(_))) => Err(e),
            Err(e) => self.refuse(kind, id.as_str(), "", e),
        }
    }

    fn enroll_checked(
        &mut self,
        id: &DeviceId,
        req: Result<EnrollRequest, RenewRequest>,
    ) -> Result<Vec<u8>, CaError> {
        let now = self.clock.now_ms();
        let window = self.cfg.time_window_ms;
        let dev = self
            .store
            .device(id)?
            .ok_or(CaError::NotAuthorized("unknown device"))?;
        if dev.state == device_state::REVOKED {
            return Err(CaError::NotAuthorized("revoked device"));
        }
        let mut first_use = None;
        let verified = match &req {
            Ok(enroll) => {
                let secret = enrollment::usable_secret(&dev, now, self.cfg.secret_validity_ms)
                    .map_err(|e| CaError::NotAuthorized(e.reason()))?;
                enroll.verify(&secret, now, window).map_err(enroll_err)?
            }
            Err(renew) => {
                let (serial, verified) = self.verify_renewal(&dev, renew, now)?;
                if enrollment::classify_use(&dev, serial) == Some(CertUse::First) {
                    first_use = Some(serial);
                }
                verified
            }
        };
        let nonce = verified.request().nonce;
        if self.nonce_seen(NonceScope::Certificate, &nonce)? {
            return Err(CaError::NotAuthorized("replayed nonce"));
        }
        self.issue(dev, &verified, req.is_err(), first_use, now)
    }

    /// Checks a renewal against the device's live certificates, the unused one first (PROTOCOL.md
    /// §3: either key may sign a repeated renewal); returns the serial whose key signed it.
    fn verify_renewal(
        &self,
        dev: &DeviceRecord,
        renew: &RenewRequest,
        now: u64,
    ) -> Result<(u64, VerifiedRequest), CaError> {
        let mut refusal = CaError::NotAuthorized("no valid certificate");
        for serial in enrollment::live_serials(dev) {
            let Some(current) = self.store.cert(serial)?.filter(|c| c.revoked_ms == 0) else {
                continue;
            };
            let cert = ImplicitCert::from_bytes(&current.cert)
                .map_err(|_| CaError::Crypto("stored certificate"))?;
            match renew.verify(&cert, self.ca.public(), now, self.cfg.time_window_ms) {
                Ok(v) => return Ok((serial, v)),
                Err(e) => refusal = enroll_err(e),
            }
        }
        Err(refusal)
    }

    fn issue(
        &mut self,
        mut dev: DeviceRecord,
        verified: &VerifiedRequest,
        renew: bool,
        first_use: Option<u64>,
        now: u64,
    ) -> Result<Vec<u8>, CaError> {
        let mut tx = self.begin();
        if let Some(used) = first_use {
            self.record_use(&mut tx, &mut dev, used, "renewal")?;
        }
        let serial = tx.serial();
        let not_after = now.saturating_add(self.cfg.cert_validity_ms);
        let resp = verified
            .issue(&self.ca, serial, now, not_after, &mut self.rng)
            .map_err(|_| CaError::Crypto("certificate issue"))?;
        let q = resp
            .cert
            .open(self.ca.public())
            .map_err(|_| CaError::Crypto("certificate open"))?;
        let cert = CertRecord {
            serial,
            device_id: dev.id.clone(),
            cert: resp.cert.to_bytes(),
            public_key: q.0.to_bytes().to_vec(),
            share_point: resp.cert.group_base().to_bytes().to_vec(),
            not_before_ms: now,
            not_after_ms: not_after,
            revoked_ms: 0,
        };
        let mut detail = format!("serial {serial}");
        // The secret (and the certificate in use) stay until the new certificate's first use.
        if let Some(unused) = enrollment::record_issue(&mut dev, serial) {
            self.revoke_superseded(&mut tx, &dev.id, unused, serial)?;
            detail.push_str(&format!(", supersedes unused serial {unused}"));
        }
        dev.state = device_state::ENROLLED;
        tx.batch.put_device(&dev)?;
        tx.batch.put_cert(&cert);
        tx.batch.put_nonce(
            NonceScope::Certificate,
            &verified.request().nonce,
            self.nonce_expiry(now),
        );
        let kind = if renew {
            "device.renew"
        } else {
            "device.enroll"
        };
        tx.audit(entry(kind, "bridge", &dev.id, "", "ok", detail));
        self.commit(tx)?;
        bump(if renew {
            &self.stats.renewals
        } else {
            &self.stats.enrollments
        });
        tracing::info!(device = %dev.id, serial, renew, "certificate issued");
        Ok(resp.to_bytes())
    }

    /// Records the first use of `dev`'s pending certificate `serial` in `tx`: it becomes the
    /// certificate in use, the previous one is revoked and the secret is spent (PROTOCOL.md §3).
    /// The caller writes `dev`.
    fn record_use(
        &self,
        tx: &mut Tx,
        dev: &mut DeviceRecord,
        serial: u64,
        via: &str,
    ) -> Result<(), CaError> {
        let used = enrollment::record_first_use(dev, serial);
        let mut detail = format!("serial {serial} by {via}");
        if let Some(previous) = used.revoked {
            self.revoke_superseded(tx, &dev.id, previous, serial)?;
            detail.push_str(&format!("; serial {previous} revoked"));
        }
        if used.secret_spent {
            detail.push_str("; enrollment secret spent");
        }
        tx.audit(entry(
            "device.first-use",
            "bridge",
            &dev.id,
            "",
            "ok",
            detail,
        ));
        bump(&self.stats.first_uses);
        tracing::info!(device = %dev.id, serial, via, "certificate first used");
        Ok(())
    }

    /// Revokes certificate `serial` of `device`, superseded by `successor`, with a notice that
    /// tells bridges to refuse it (the device stays enrolled).
    fn revoke_superseded(
        &self,
        tx: &mut Tx,
        device: &str,
        serial: u64,
        successor: u64,
    ) -> Result<(), CaError> {
        let Some(mut cert) = self.store.cert(serial)? else {
            return Ok(());
        };
        if cert.revoked_ms != 0 {
            return Ok(());
        }
        cert.revoked_ms = tx.now;
        tx.batch.put_cert(&cert);
        tx.notice(Notice {
            kind: NoticeKind::Revoked as i32,
            serial,
            device_id: device.to_owned(),
            superseded_by: successor,
            ..Default::default()
        });
        Ok(())
    }

    // ---- §3 certificate use reported by a bridge ----------------------------------------------

    fn confirm_use(&mut self, data: &[u8]) -> Result<CertificateUse, CaError> {
        const KIND: &str = "device.use";
        if data.len() > MAX_CERT_PROOF_LEN {
            return self.refuse(KIND, "", "", CaError::TooLarge("proof"));
        }
        let proof = match CertConnectProof::from_bytes(data) {
            Ok(p) => p,
            Err(e) => return self.refuse(KIND, "", "", decode_err(e)),
        };
        match self.confirm_checked(&proof) {
            Ok(v) => Ok(v),
            Err(e @ (CaError::Store(_) | CaError::Crypto(_))) => Err(e),
            Err(e) => self.refuse(KIND, proof.cert.id().as_str(), "", e),
        }
    }

    fn confirm_checked(&mut self, proof: &CertConnectProof) -> Result<CertificateUse, CaError> {
        let now = self.clock.now_ms();
        // The registration first, so that refusals under made-up IDs share one budget.
        let mut dev = self
            .store
            .device(proof.cert.id())?
            .ok_or(CaError::NotAuthorized("unknown device"))?;
        if dev.state == device_state::REVOKED {
            return Err(CaError::NotAuthorized("revoked device"));
        }
        proof
            .verify(
                self.ca.public(),
                &proof.client_id,
                now,
                self.cfg.time_window_ms,
            )
            .map_err(enroll_err)?;
        let serial = proof.cert.serial();
        let issued = self
            .store
            .cert(serial)?
            .filter(|c| c.device_id == dev.id && c.cert == proof.cert.to_bytes())
            .ok_or(CaError::NotAuthorized("unknown certificate"))?;
        if issued.revoked_ms != 0 {
            return Err(CaError::NotAuthorized("revoked certificate"));
        }
        match enrollment::classify_use(&dev, serial) {
            None => Err(CaError::NotAuthorized("superseded certificate")),
            Some(CertUse::InUse) => Ok(CertificateUse {
                serial,
                first: false,
            }),
            Some(CertUse::First) => {
                let mut tx = self.begin();
                self.record_use(&mut tx, &mut dev, serial, "connection")?;
                tx.batch.put_device(&dev)?;
                self.commit(tx)?;
                Ok(CertificateUse {
                    serial,
                    first: true,
                })
            }
        }
    }

    // ---- §4 group-key requests -----------------------------------------------------------

    fn member_row(
        &self,
        group: &GroupId,
        role: Role,
        device: &DeviceId,
    ) -> Result<Option<MemberRecord>, CaError> {
        if let Some(p) = self.groups.get(group).and_then(|l| l.pending.as_ref()) {
            if let Some(row) = p.rows.get(&(role, device.clone())) {
                return Ok(row.clone());
            }
        }
        Ok(self.store.member(group, role, device)?)
    }

    fn join(&mut self, data: &[u8], reply: Reply<JoinReply>) {
        if data.len() > MAX_PROPERTY_LEN {
            let r = self.refuse("group.join", "", "", CaError::TooLarge("request"));
            self.answer(reply, r);
            return;
        }
        let req = match GroupKeyRequest::from_bytes(data) {
            Ok(r) => r,
            Err(e) => {
                let r = self.refuse("group.join", "", "", decode_err(e));
                self.answer(reply, r);
                return;
            }
        };
        let (id, gid, role) = (req.id().clone(), req.group().clone(), req.role());
        match self.join_checked(&req) {
            Ok(JoinStep::Ready(r)) => {
                bump(&self.stats.joins);
                self.answer(reply, Ok(r));
            }
            Ok(JoinStep::Stage {
                member,
                change,
                row,
                audit,
            }) => {
                let nonce = *req.nonce();
                self.pending_nonces.insert(nonce);
                let p = self.open_window(&gid);
                if let Some(p) = p {
                    p.changes.push(change);
                    p.rows.insert((role, id), Some(row));
                    p.nonces.push(nonce);
                    p.audits.push(audit);
                    p.reasons.insert("join");
                    p.waiters.push(Waiter::Join { member, reply });
                }
            }
            Err(e @ (CaError::Store(_) | CaError::Crypto(_))) => {
                self.answer(reply, Err(e));
            }
            Err(e) => {
                let r = self.refuse("group.join", id.as_str(), gid.as_str(), e);
                self.answer(reply, r);
            }
        }
    }

    fn join_checked(&mut self, req: &GroupKeyRequest) -> Result<JoinStep, CaError> {
        let now = self.clock.now_ms();
        let (id, gid, role) = (req.id(), req.group(), req.role());
        let dev = self
            .store
            .device(id)?
            .ok_or(CaError::NotAuthorized("unknown device"))?;
        if dev.state != device_state::ENROLLED {
            return Err(CaError::NotAuthorized(
                if dev.state == device_state::REVOKED {
                    "revoked device"
                } else {
                    "not enrolled"
                },
            ));
        }
        if !self.groups.contains_key(gid) {
            return Err(CaError::NotAuthorized("unknown group"));
        }
        let row = self
            .member_row(gid, role, id)?
            .ok_or(CaError::NotAuthorized("role not allowed"))?;
        if self.nonce_seen(NonceScope::GroupKey, req.nonce())? {
            return Err(CaError::NotAuthorized("replayed nonce"));
        }
        let (serial, member, joined) = self.open_join(&dev, req, now)?;
        if enrollment::classify_use(&dev, serial) == Some(CertUse::First) {
            let mut dev = dev.clone();
            let mut tx = self.begin();
            self.record_use(&mut tx, &mut dev, serial, "group-key request")?;
            tx.batch.put_device(&dev)?;
            self.commit(tx)?;
        }
        let audit = entry(
            "group.join",
            "bridge",
            id.as_str(),
            gid.as_str(),
            "ok",
            format!("{} serial {serial}", role.topic_segment()),
        );
        let Some(live) = self.groups.get(gid) else {
            return Err(CaError::NotAuthorized("unknown group"));
        };
        if live.pending.is_none() && live.state.member(id, role) == Some(&joined) {
            // Same share, nothing pending: the current keys, no rekey.
            let delivery = live
                .state
                .delivery(&member, &mut self.rng)
                .map_err(rekey_err)?;
            let epoch = live.state.epoch().0;
            let mut tx = self.begin();
            tx.batch
                .put_nonce(NonceScope::GroupKey, req.nonce(), self.nonce_expiry(now));
            let mut audit = audit;
            audit.detail = format!("{}; already joined, epoch {epoch}", audit.detail);
            tx.audit(audit);
            self.commit(tx)?;
            return Ok(JoinStep::Ready(JoinReply {
                response: delivery.to_bytes(),
                epoch,
            }));
        }
        let mut row = row;
        row.serial = serial;
        row.joined_ms = now;
        row.share = joined.share().to_bytes().to_vec();
        Ok(JoinStep::Stage {
            member,
            change: Change::Join(joined),
            row,
            audit,
        })
    }

    /// Opens a group-key request with the device's live certificates, the unused one first;
    /// returns the serial whose key made it, the member and its share.
    fn open_join(
        &self,
        dev: &DeviceRecord,
        req: &GroupKeyRequest,
        now: u64,
    ) -> Result<(u64, Member, JoinedMember), CaError> {
        let mut refusal = CaError::NotAuthorized("not enrolled");
        for serial in enrollment::live_serials(dev) {
            let Some(cert) = self.store.cert(serial)? else {
                continue;
            };
            if cert.revoked_ms != 0 || cert.not_after_ms < now || cert.not_before_ms > now {
                refusal = CaError::NotAuthorized("certificate not valid");
                continue;
            }
            let member = Member {
                id: req.id().clone(),
                role: req.role(),
                q: Point::from_bytes(&cert.public_key).ok_or(CaError::Crypto("stored Q_i"))?,
                g: Point::from_bytes(&cert.share_point).ok_or(CaError::Crypto("stored G_i"))?,
            };
            match req.open(&self.ca, &member, now, self.cfg.time_window_ms) {
                Ok(joined) => return Ok((serial, member, joined)),
                Err(e) => refusal = group_err(e),
            }
        }
        Err(refusal)
    }

    /// The open window of `group`, opening one if needed.
    fn open_window(&mut self, group: &GroupId) -> Option<&mut Pending> {
        let deadline = Instant::now() + self.cfg.batch_window;
        let live = self.groups.get_mut(group)?;
        Some(live.pending.get_or_insert_with(|| Pending::new(deadline)))
    }

    // ---- admin -------------------------------------------------------------------------

    fn register(
        &mut self,
        id: &DeviceId,
        note: String,
        reissue: bool,
        secret_validity_ms: u64,
    ) -> Result<Registered, CaError> {
        let now = self.clock.now_ms();
        let existing = self.store.device(id)?;
        let mut dev = match (existing, reissue) {
            (Some(_), false) => return Err(CaError::AlreadyExists("device")),
            (None, true) => return Err(CaError::NotFound("device")),
            (Some(d), true) if d.state == device_state::REVOKED => {
                return Err(CaError::FailedPrecondition("device is revoked"));
            }
            (Some(d), true) => d,
            (None, false) => {
                let mut d = DeviceRecord::default();
                d.id = id.as_str().to_owned();
                d.state = device_state::REGISTERED;
                d.registered_ms = now;
                d
            }
        };
        if !note.is_empty() || !reissue {
            dev.note = note;
        }
        let secret = EnrollmentSecret::random(&mut self.rng);
        let validity = if secret_validity_ms == 0 {
            self.cfg.secret_validity_ms
        } else {
            secret_validity_ms
        };
        enrollment::record_secret(&mut dev, &secret, now, validity);
        let mut tx = self.begin();
        tx.batch.put_device(&dev)?;
        let kind = if reissue {
            "device.reissue"
        } else {
            "device.register"
        };
        tx.audit(entry(kind, "admin", id.as_str(), "", "ok", String::new()));
        self.commit(tx)?;
        tracing::info!(device = %id, reissue, "device registered");
        Ok(Registered {
            device: dev,
            secret: Zeroizing::new(hex::encode(secret.as_bytes())),
        })
    }

    fn revoke(&mut self, id: &DeviceId, reason: String) -> Result<DeviceRecord, CaError> {
        let now = self.clock.now_ms();
        let mut dev = self.store.device(id)?.ok_or(CaError::NotFound("device"))?;
        if dev.state == device_state::REVOKED {
            return Err(CaError::FailedPrecondition("device is already revoked"));
        }
        dev.state = device_state::REVOKED;
        dev.revoked_ms = now;
        dev.revoke_reason = reason.clone();
        zeroize::Zeroize::zeroize(&mut dev.enroll_secret);
        dev.enroll_secret = Vec::new();
        dev.secret_expires_ms = 0;
        dev.pending_serial = 0;
        let mut tx = self.begin();
        tx.batch.put_device(&dev)?;
        for mut cert in self.store.certs()? {
            if cert.device_id == dev.id && cert.revoked_ms == 0 {
                cert.revoked_ms = now;
                tx.batch.put_cert(&cert);
                tx.notice(Notice {
                    kind: NoticeKind::Revoked as i32,
                    serial: cert.serial,
                    device_id: dev.id.clone(),
                    ..Default::default()
                });
            }
        }
        tx.audit(entry(
            "device.revoke",
            "admin",
            id.as_str(),
            "",
            "ok",
            reason,
        ));
        self.commit(tx)?;
        tracing::info!(device = %id, "device revoked");
        // Leave every group in the next window; the sweep repeats this after a crash.
        let gids: Vec<GroupId> = self.groups.keys().cloned().collect();
        for gid in gids {
            let rows: Vec<MemberRecord> = self
                .store
                .members(&gid)?
                .into_iter()
                .filter(|m| m.device == dev.id)
                .collect();
            let in_state = self
                .groups
                .get(&gid)
                .is_some_and(|l| l.state.members().any(|m| &m.member().id == id));
            if rows.is_empty() && !in_state {
                continue;
            }
            if let Some(p) = self.open_window(&gid) {
                p.changes.push(Change::Remove(id.clone()));
                p.reasons.insert("revoke");
                for r in rows {
                    if let Some(role) = role_of(r.role) {
                        p.rows.insert((role, id.clone()), None);
                    }
                }
            }
        }
        Ok(dev)
    }

    fn create_group(
        &mut self,
        id: &GroupId,
        privacy: Privacy,
        interval_secs: u64,
    ) -> Result<GroupRecord, CaError> {
        if self.groups.contains_key(id) || self.store.group(id)?.is_some() {
            return Err(CaError::AlreadyExists("group"));
        }
        let now = self.clock.now_ms();
        let state = GroupState::create(&self.ca, id.clone(), privacy, Epoch(0), now, &mut self.rng)
            .map_err(rekey_err)?;
        let rec = GroupRecord {
            id: id.as_str().to_owned(),
            privacy: u32::from(privacy.to_u8()),
            rekey_interval_secs: interval_secs,
            created_ms: now,
            epoch: 0,
            epoch_started_ms: now,
            state: state.to_record(),
        };
        let mut tx = self.begin();
        tx.batch.put_group(&rec)?;
        let seq = tx.notice(Notice {
            kind: NoticeKind::GroupUpdated as i32,
            group: rec.id.clone(),
            epoch: 0,
            ..Default::default()
        });
        tx.batch.put_epoch(
            id,
            &EpochRecord {
                epoch: 0,
                started_ms: now,
                signed_ginfo: state.signed_info().to_bytes(),
                joined: Vec::new(),
                departed: Vec::new(),
                reason: "create".into(),
                last_notice_seq: seq,
            },
        );
        tx.audit(entry(
            "group.create",
            "admin",
            "",
            id.as_str(),
            "ok",
            format!(
                "privacy {}, rekey interval {interval_secs}s",
                privacy.to_u8()
            ),
        ));
        self.commit(tx)?;
        let mut settings = rec.clone();
        settings.state = Vec::new();
        self.groups.insert(
            id.clone(),
            Live {
                settings,
                state,
                pending: None,
                joined: BTreeMap::new(),
                checked: true,
            },
        );
        tracing::info!(group = %id, "group created");
        Ok(rec)
    }

    fn set_permission(
        &mut self,
        gid: &GroupId,
        device: &DeviceId,
        role: Role,
        allow: bool,
        reply: Reply<u32>,
    ) {
        let r = self.set_permission_checked(gid, device, role, allow);
        match r {
            Ok(Some(epoch)) => {
                self.answer(reply, Ok(epoch));
            }
            Ok(None) => {
                let audit = entry(
                    "group.deny",
                    "admin",
                    device.as_str(),
                    gid.as_str(),
                    "ok",
                    role.topic_segment().to_owned(),
                );
                if let Some(p) = self.open_window(gid) {
                    p.changes.push(Change::Leave {
                        id: device.clone(),
                        role,
                    });
                    p.rows.insert((role, device.clone()), None);
                    p.reasons.insert("deny");
                    p.audits.push(audit);
                    p.waiters.push(Waiter::Epoch(reply));
                }
            }
            Err(e) => {
                self.answer(reply, Err(e));
            }
        }
    }

    /// `Some(epoch)` when done now, `None` when a leave must be staged.
    fn set_permission_checked(
        &mut self,
        gid: &GroupId,
        device: &DeviceId,
        role: Role,
        allow: bool,
    ) -> Result<Option<u32>, CaError> {
        let Some(live) = self.groups.get(gid) else {
            return Err(CaError::NotFound("group"));
        };
        let epoch = live.state.epoch().0;
        let dev = self
            .store
            .device(device)?
            .ok_or(CaError::NotFound("device"))?;
        let row = self.member_row(gid, role, device)?;
        let staged_member = self
            .groups
            .get(gid)
            .is_some_and(|l| l.state.member(device, role).is_some() || l.pending.is_some());
        if allow {
            if dev.state == device_state::REVOKED {
                return Err(CaError::FailedPrecondition("device is revoked"));
            }
            if row.is_some() {
                return Ok(Some(epoch));
            }
            let rec = MemberRecord::allowed(
                device.as_str(),
                u32::from(role.to_u8()),
                self.clock.now_ms(),
            );
            if staged_member {
                // A window is open: keep the rows in order with it.
                if let Some(p) = self.open_window(gid) {
                    p.rows.insert((role, device.clone()), Some(rec.clone()));
                }
            }
            let mut tx = self.begin();
            tx.batch.put_member(gid, &rec)?;
            tx.audit(entry(
                "group.allow",
                "admin",
                device.as_str(),
                gid.as_str(),
                "ok",
                role.topic_segment().to_owned(),
            ));
            self.commit(tx)?;
            return Ok(Some(epoch));
        }
        if staged_member {
            return Ok(None);
        }
        let mut tx = self.begin();
        if row.is_some() {
            tx.batch.delete_member(gid, role, device);
        }
        tx.audit(entry(
            "group.deny",
            "admin",
            device.as_str(),
            gid.as_str(),
            "ok",
            role.topic_segment().to_owned(),
        ));
        self.commit(tx)?;
        Ok(Some(epoch))
    }

    fn force_rekey(&mut self, gid: &GroupId, reply: Reply<u32>) {
        let audit = entry(
            "group.rekey-request",
            "admin",
            "",
            gid.as_str(),
            "ok",
            String::new(),
        );
        match self.open_window(gid) {
            Some(p) => {
                p.changes.push(Change::Periodic);
                p.reasons.insert("forced");
                p.audits.push(audit);
                p.waiters.push(Waiter::Epoch(reply));
            }
            None => {
                self.answer(reply, Err(CaError::NotFound("group")));
            }
        }
    }

    // ---- windows -------------------------------------------------------------------------

    fn flush_due(&mut self) {
        let now = Instant::now();
        let due: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, l)| l.pending.as_ref().is_some_and(|p| p.deadline <= now))
            .map(|(g, _)| g.clone())
            .collect();
        for g in due {
            self.flush(&g);
        }
    }

    fn flush_all(&mut self) {
        let all: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, l)| l.pending.is_some())
            .map(|(g, _)| g.clone())
            .collect();
        for g in all {
            self.flush(&g);
        }
    }

    /// Closes a group's window: stage, write, commit, answer.
    fn flush(&mut self, gid: &GroupId) {
        let Some(mut live) = self.groups.remove(gid) else {
            return;
        };
        let Some(p) = live.pending.take() else {
            self.groups.insert(gid.clone(), live);
            return;
        };
        for n in &p.nonces {
            self.pending_nonces.remove(n);
        }
        let result = self.apply(gid, &mut live, &p);
        match result {
            Ok(epoch) => {
                for w in p.waiters {
                    match w {
                        Waiter::Join { member, reply } => {
                            let r = live
                                .state
                                .delivery(&member, &mut self.rng)
                                .map(|d| JoinReply {
                                    response: d.to_bytes(),
                                    epoch,
                                })
                                .map_err(|e| match e {
                                    // Joined and removed inside one window.
                                    RekeyError::NotAMember => {
                                        CaError::NotAuthorized("removed before the key was issued")
                                    }
                                    e => rekey_err(e),
                                });
                            if r.is_ok() {
                                bump(&self.stats.joins);
                            }
                            self.answer(reply, r);
                        }
                        Waiter::Epoch(reply) => {
                            self.answer(reply, Ok(epoch));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(group = %gid, error = %e, "rekey failed; changes dropped");
                for w in p.waiters {
                    match w {
                        Waiter::Join { reply, .. } => {
                            self.answer(reply, Err(e.clone()));
                        }
                        Waiter::Epoch(reply) => {
                            self.answer(reply, Err(e.clone()));
                        }
                    }
                }
            }
        }
        self.groups.insert(gid.clone(), live);
    }

    fn apply(&mut self, gid: &GroupId, live: &mut Live, p: &Pending) -> Result<u32, CaError> {
        let started = Instant::now();
        let mut tx = self.begin();
        let now = tx.now;
        let plan = live
            .state
            .stage(&self.ca, p.changes.iter().cloned(), now, &mut self.rng)
            .map_err(rekey_err)?;
        let staged = match &plan {
            Plan::Rekey(staged) => Some(staged.as_ref()),
            Plan::Unchanged => None,
        };
        for ((role, id), row) in &p.rows {
            match row {
                Some(r) if r.joined() => {
                    // A joiner's new leaf, or the leaf it keeps (the same share again).
                    let leaf = staged
                        .and_then(|s| s.joined_leaf(*role, id))
                        .or_else(|| live.state.tree(*role).leaf_of(id))
                        .ok_or(CaError::Crypto("joined member without a leaf"))?;
                    let mut r = r.clone();
                    r.leaf = leaf;
                    tx.batch.put_member(gid, &r)?;
                }
                Some(r) => tx.batch.put_member(gid, r)?,
                None => tx.batch.delete_member(gid, *role, id),
            }
        }
        if let Some(staged) = staged {
            for role in [Role::Publisher, Role::Subscriber] {
                for (node, key) in staged.tree(role).node_changes() {
                    match key {
                        Some(k) => tx.batch.put_tree_node(gid, role, *node, k),
                        None => tx.batch.delete_tree_node(gid, role, *node),
                    }
                }
            }
        }
        let expiry = self.nonce_expiry(now);
        for n in &p.nonces {
            tx.batch.put_nonce(NonceScope::GroupKey, n, expiry);
        }
        for a in &p.audits {
            tx.audit(a.clone());
        }
        let Plan::Rekey(staged) = plan else {
            self.commit(tx)?;
            return Ok(live.state.epoch().0);
        };
        let epoch = staged.epoch().0;
        let reasons: Vec<&str> = p.reasons.iter().copied().collect();
        let reasons = reasons.join(",");
        let mut rec = live.settings.clone();
        rec.epoch = epoch;
        rec.epoch_started_ms = now;
        rec.state = staged.state_record();
        tx.batch.put_group(&rec)?;
        for n in staged.notices() {
            tx.notice(Notice {
                kind: NoticeKind::Rekey as i32,
                group: gid.as_str().to_owned(),
                epoch,
                topic: n.topic.clone(),
                payload: n.payload(),
                ..Default::default()
            });
        }
        let last_seq = tx.notice(Notice {
            kind: NoticeKind::GroupUpdated as i32,
            group: gid.as_str().to_owned(),
            epoch,
            ..Default::default()
        });
        let listed = |m: &Member, serial: u64| EpochMember {
            device: m.id.as_str().to_owned(),
            role: u32::from(m.role.to_u8()),
            serial,
        };
        let joined_serial = |m: &Member| match p.rows.get(&(m.role, m.id.clone())) {
            Some(Some(r)) => r.serial,
            _ => 0,
        };
        let departed_serial = |m: &Member| {
            live.joined
                .get(&(m.role, m.id.clone()))
                .map_or(0, |c| c.serial)
        };
        tx.batch.put_epoch(
            gid,
            &EpochRecord {
                epoch,
                started_ms: now,
                signed_ginfo: staged.signed_info().to_bytes(),
                joined: staged
                    .joined()
                    .iter()
                    .map(|m| listed(m, joined_serial(m)))
                    .collect(),
                departed: staged
                    .departed()
                    .iter()
                    .map(|m| listed(m, departed_serial(m)))
                    .collect(),
                reason: reasons.clone(),
                last_notice_seq: last_seq,
            },
        );
        tx.audit(entry(
            "group.rekey",
            "ca",
            "",
            gid.as_str(),
            "ok",
            format!(
                "epoch {epoch} ({reasons}): {} joined, {} departed, {} notices",
                staged.joined().len(),
                staged.departed().len(),
                staged.notices().len()
            ),
        ));
        tx.meta.rekeys += 1;
        let mut joined_certs = Vec::new();
        for m in staged.joined() {
            joined_certs.push((
                (m.role, m.id.clone()),
                JoinedCert::of_serial(self.store.as_ref(), joined_serial(m))?,
            ));
        }
        self.commit(tx)?;
        for m in staged.departed() {
            live.joined.remove(&(m.role, m.id.clone()));
        }
        live.joined.extend(joined_certs);
        live.state.commit(*staged).map_err(rekey_err)?;
        live.settings.epoch = epoch;
        live.settings.epoch_started_ms = now;
        bump(&self.stats.rekeys);
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats.rekey_micros.fetch_add(micros, Ordering::Relaxed);
        tracing::info!(group = %gid, epoch, reasons = %reasons, "rekeyed");
        Ok(epoch)
    }

    // ---- sweep: expiry, revocation, periodic rekeys, replay-cache pruning ---------------------

    fn sweep(&mut self) {
        if let Err(e) = self.sweep_checked() {
            tracing::error!(error = %e, "sweep failed");
        }
    }

    fn sweep_checked(&mut self) -> Result<(), CaError> {
        let now = self.clock.now_ms();
        let gids: Vec<GroupId> = self.groups.keys().cloned().collect();
        for gid in gids {
            let Some(live) = self.groups.get(&gid) else {
                continue;
            };
            if live.pending.is_some() {
                continue;
            }
            let mut leaves = Vec::new();
            let mut reasons = BTreeSet::new();
            let full = !live.checked;
            if full {
                // After a start: denials and revocations committed before a crash whose rekey
                // was not yet written. Later they stage their leaves themselves.
                for m in live.state.members() {
                    let pm = m.member();
                    let row = self.store.member(&gid, pm.role, &pm.id)?;
                    let cert = match &row {
                        Some(r) => self.store.cert(r.serial)?,
                        None => None,
                    };
                    let reason = match (&row, &cert) {
                        (None, _) => Some("deny"),
                        (_, None) => Some("revoke"),
                        (_, Some(c)) if c.revoked_ms != 0 => Some("revoke"),
                        (_, Some(c)) if c.not_after_ms < now => Some("expiry"),
                        _ => None,
                    };
                    if let Some(reason) = reason {
                        leaves.push((pm.role, pm.id.clone(), row));
                        reasons.insert(reason);
                    }
                }
            } else {
                for ((role, id), cert) in &live.joined {
                    if cert.not_after_ms < now {
                        let row = self.store.member(&gid, *role, id)?;
                        leaves.push((*role, id.clone(), row));
                        reasons.insert("expiry");
                    }
                }
            }
            let interval = live.settings.rekey_interval_secs.saturating_mul(1000);
            let periodic =
                interval > 0 && now >= live.state.rekeyed_at_ms().saturating_add(interval);
            if full {
                if let Some(l) = self.groups.get_mut(&gid) {
                    l.checked = true;
                }
            }
            if leaves.is_empty() && !periodic {
                continue;
            }
            if periodic {
                reasons.insert("periodic");
            }
            if let Some(p) = self.open_window(&gid) {
                for (role, id, row) in leaves {
                    p.changes.push(Change::Leave {
                        id: id.clone(),
                        role,
                    });
                    // Keep the permission, forget the expired share.
                    p.rows
                        .insert((role, id), row.as_ref().map(MemberRecord::left));
                }
                if periodic {
                    p.changes.push(Change::Periodic);
                }
                p.reasons.extend(reasons);
            }
        }
        self.sweeps += 1;
        if self.sweeps % 60 == 1 {
            self.prune_nonces(now)?;
        }
        Ok(())
    }

    fn prune_nonces(&mut self, now: u64) -> Result<(), CaError> {
        let expired: Vec<Key> = self
            .store
            .nonces()?
            .into_iter()
            .filter(|(_, n)| n.expires_ms < now)
            .map(|(k, _)| k)
            .collect();
        if expired.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::new();
        for k in expired {
            batch.delete(k);
        }
        self.store.commit(batch)?;
        Ok(())
    }
}

/// Reads the counters and every group state.
fn load(
    store: &dyn CaStore,
    ca: &KeyPair,
    clock: &dyn Clock,
) -> Result<(MetaRecord, BTreeMap<GroupId, Live>), CaError> {
    let mut meta = store.meta()?;
    if meta.created_ms == 0 {
        meta.created_ms = clock.now_ms();
    }
    meta.next_serial = meta.next_serial.max(1);
    meta.next_notice_seq = meta.next_notice_seq.max(1);
    meta.next_audit_seq = meta.next_audit_seq.max(1);
    let mut groups = BTreeMap::new();
    for rec in store.groups()? {
        let id = GroupId::new(&rec.id).map_err(|_| CaError::Crypto("stored group id"))?;
        let mut members = Vec::new();
        let mut joined = BTreeMap::new();
        let nodes = store.tree_nodes(&id)?;
        for row in store.members(&id)? {
            if !row.joined() {
                continue;
            }
            let (device, role) = member_ids(&row)?;
            let cert = store
                .cert(row.serial)?
                .ok_or(CaError::Crypto("member certificate missing"))?;
            let member = Member {
                id: device.clone(),
                role,
                q: Point::from_bytes(&cert.public_key).ok_or(CaError::Crypto("stored Q_i"))?,
                g: Point::from_bytes(&cert.share_point).ok_or(CaError::Crypto("stored G_i"))?,
            };
            let bytes = Zeroizing::new(
                <[u8; 32]>::try_from(row.share.as_slice())
                    .map_err(|_| CaError::Crypto("stored share"))?,
            );
            let share =
                SecretScalar::from_bytes(&bytes).map_err(|_| CaError::Crypto("stored share"))?;
            let share = JoinedMember::new(member, share).map_err(|_| {
                tracing::error!(group = %id, device = %device, "stored share does not match");
                CaError::Crypto("stored share")
            })?;
            members.push((share, row.leaf));
            joined.insert(
                (role, device),
                JoinedCert {
                    serial: row.serial,
                    not_after_ms: cert.not_after_ms,
                },
            );
        }
        let state = GroupState::from_record(ca, &rec.state, members, nodes).map_err(|e| {
            tracing::error!(group = %id, error = %e, "stored group state does not verify");
            CaError::Crypto("stored group state")
        })?;
        let mut settings = rec;
        settings.state = Vec::new();
        groups.insert(
            id,
            Live {
                settings,
                state,
                pending: None,
                joined,
                checked: false,
            },
        );
    }
    Ok((meta, groups))
}

/// Runs the synced write off the async worker when the runtime has others to keep serving.
fn sync_blocking<T>(f: impl FnOnce() -> T) -> T {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

// Lives for one request only.
#[allow(clippy::large_enum_variant)]
enum JoinStep {
    Ready(JoinReply),
    Stage {
        member: Member,
        change: Change,
        row: MemberRecord,
        audit: AuditEntry,
    },
}
