//! A CA core over a [`MemoryStore`] with a seeded RNG and a manual clock, for the engine's unit
//! tests. The devices' messages and their acceptance are the device-side steps of quva-client's
//! test kit (`testkit::steps`); the engine's own fixtures stay here: the core's commands and
//! effects, and a [`FlakyStore`] that fails commits like a full disk.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use quva_client::codec::{Decode, Encode};
use quva_client::curve::{KeyPair, Point};
use quva_client::enrollment::{Credentials, EnrollmentSecret, PendingEnrollment};
use quva_client::group::{AcceptedGroupKey, Privacy};
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_client::rekey::GroupKeyDelivery;
use quva_client::testkit::steps;
use quva_proto::v1::{AuditEntry, NoticeKind};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::audit_kind::AuditKind;
use crate::engine::command::{CertificateUse, Command, JoinReply, Outcome};
use crate::engine::config::EngineConfig;
use crate::engine::core::{CaCore, Effects};
use crate::engine::issuer::{CertAsk, Prepared};
use crate::engine::stats::Stats;
use crate::error::CaError;
use crate::store::{
    Batch, CaStore, DeviceRecord, EpochRecord, Key, MemoryStore, Row, StoreError, Tables,
};

/// A [`MemoryStore`] whose commits fail while `fail` is set, like a full disk.
pub struct FlakyStore {
    pub inner: Arc<MemoryStore>,
    pub fail: AtomicBool,
}

impl CaStore for FlakyStore {
    fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }

    fn scan(
        &self,
        prefix: &Key,
        start: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        self.inner.scan(prefix, start, limit)
    }

    fn last(&self, prefix: &Key) -> Result<Option<Row>, StoreError> {
        self.inner.last(prefix)
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(StoreError::Backend("disk full"));
        }
        self.inner.commit(batch)
    }
}

/// The start of the manual clock, a plausible Unix time.
pub const T0: u64 = 1_760_000_000_000;
/// The batching window of [`Kit::new`], ms.
pub const WINDOW_MS: u64 = 200;

/// Tickets are numbers; each command gets a fresh one.
pub type Ticket = u32;

pub struct Kit {
    pub core: CaCore<Ticket>,
    pub store: Arc<MemoryStore>,
    pub flaky: Arc<FlakyStore>,
    pub stats: Arc<Stats>,
    pub ca: Point,
    pub rng: ChaCha20Rng,
    pub now: u64,
    next: Ticket,
}

impl Default for Kit {
    fn default() -> Kit {
        Kit::new()
    }
}

impl Kit {
    pub fn new() -> Kit {
        Kit::with(EngineConfig {
            batch_window: std::time::Duration::from_millis(WINDOW_MS),
            ..EngineConfig::default()
        })
    }

    pub fn with(cfg: EngineConfig) -> Kit {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let ca = KeyPair::random(&mut rng);
        let ca_public = *ca.public();
        let store = Arc::new(MemoryStore::new());
        let stats = Arc::new(Stats::default());
        let flaky = Arc::new(FlakyStore {
            inner: store.clone(),
            fail: AtomicBool::new(false),
        });
        let core = CaCore::new(flaky.clone(), ca, cfg, stats.clone(), T0).unwrap();
        Kit {
            core,
            store,
            flaky,
            stats,
            ca: ca_public,
            rng,
            now: T0,
            next: 0,
        }
    }

    pub fn ticket(&mut self) -> Ticket {
        self.next += 1;
        self.next
    }

    /// Handles `cmd` at the kit's time and syncs its writes, as the engine task does.
    pub fn run(&mut self, cmd: Command<Ticket>) -> Effects<Ticket> {
        let effects = self.core.handle(cmd, self.now, &mut self.rng);
        self.core.store().sync().unwrap();
        effects
    }

    /// Closes the windows due at the kit's time.
    pub fn close_due(&mut self) -> Effects<Ticket> {
        self.run(Command::CloseWindows { until_ms: self.now })
    }

    /// Moves the clock to the next deadline and closes the windows due then.
    pub fn close_next(&mut self) -> Effects<Ticket> {
        let deadline = self.core.next_deadline_ms().expect("an open window");
        self.now = self.now.max(deadline);
        self.close_due()
    }

    pub fn register(&mut self, id: &str) -> EnrollmentSecret {
        let ticket = self.ticket();
        let mut e = self.run(Command::Register {
            id: DeviceId::new(id).unwrap(),
            note: String::new(),
            reissue: false,
            secret_validity_ms: 0,
            ticket,
        });
        let Some((_, Outcome::Registered(Ok(r)))) = e.replies.pop() else {
            panic!("registration of {id} failed");
        };
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(r.secret.as_str(), &mut bytes).unwrap();
        EnrollmentSecret::from_bytes(&bytes)
    }

    /// An enrollment request of `id` under `secret` with a fresh nonce.
    pub fn enroll_request(
        &mut self,
        id: &str,
        secret: &EnrollmentSecret,
    ) -> (PendingEnrollment, Vec<u8>) {
        steps::enroll_request(id, secret, self.now, &mut self.rng)
    }

    /// Sends an enrollment; returns the credentials or the refusal, and the effects.
    pub fn enroll(
        &mut self,
        id: &str,
        secret: &EnrollmentSecret,
    ) -> (Result<Credentials, CaError>, Effects<Ticket>) {
        let (pending, data) = self.enroll_request(id, secret);
        let ticket = self.ticket();
        let e = self.run(Command::Enroll(data, ticket));
        let r = cert_of(&e, ticket).map(|bytes| self.accept_cert(&pending, &bytes));
        (r, e)
    }

    /// Prepares the certificate for `data` as the engine's handle does, off the writer and
    /// reading the durable store.
    pub fn prepare(&mut self, data: &[u8], renew: bool) -> Result<Prepared, CaError> {
        let ask = CertAsk::decode(data, renew)?;
        let issuer = self.core.issuer().clone();
        issuer.prepare(self.store.as_ref(), ask, self.now, &mut self.rng)
    }

    /// Hands a prepared certificate to the writer.
    pub fn issue(&mut self, prepared: Prepared) -> (Result<Vec<u8>, CaError>, Effects<Ticket>) {
        let ticket = self.ticket();
        let e = self.run(Command::Issue(Box::new(prepared), ticket));
        (cert_of(&e, ticket), e)
    }

    pub fn enrolled(&mut self, id: &str) -> Credentials {
        let secret = self.register(id);
        self.enroll(id, &secret).0.unwrap()
    }

    pub fn accept_cert(&self, pending: &PendingEnrollment, bytes: &[u8]) -> Credentials {
        steps::accept_enrollment(pending, bytes, &self.ca)
    }

    pub fn renew(
        &mut self,
        current: &Credentials,
    ) -> (Result<Credentials, CaError>, Effects<Ticket>) {
        let (pending, data) = steps::renew_request(current, self.now, &mut self.rng);
        let ticket = self.ticket();
        let e = self.run(Command::Renew(data, ticket));
        let r = cert_of(&e, ticket).map(|bytes| self.accept_cert(&pending, &bytes));
        (r, e)
    }

    /// A bridge reports a `quva-cert-v1` connection of `creds`.
    pub fn connect(
        &mut self,
        creds: &Credentials,
    ) -> (Result<CertificateUse, CaError>, Effects<Ticket>) {
        let proof = steps::cert_proof(creds, self.now, "client-1", &mut self.rng);
        let ticket = self.ticket();
        let e = self.run(Command::ConfirmUse(proof, ticket));
        let r = match reply(&e, ticket) {
            Outcome::Use(r) => r.clone(),
            o => panic!("not a use answer: {o:?}"),
        };
        (r, e)
    }

    pub fn create_group(&mut self, g: &str, interval_secs: u64) {
        let ticket = self.ticket();
        let e = self.run(Command::CreateGroup {
            id: GroupId::new(g).unwrap(),
            privacy: Privacy::Standard,
            interval_secs,
            ticket,
        });
        assert!(matches!(reply(&e, ticket), Outcome::Group(Ok(_))));
    }

    /// Sets a permission; returns the effects and the ticket of the answer.
    pub fn permit(
        &mut self,
        g: &str,
        id: &str,
        role: Role,
        allow: bool,
    ) -> (Effects<Ticket>, Ticket) {
        let ticket = self.ticket();
        let e = self.run(Command::SetPermission {
            group: GroupId::new(g).unwrap(),
            device: DeviceId::new(id).unwrap(),
            role,
            allow,
            ticket,
        });
        (e, ticket)
    }

    pub fn join_request(&mut self, creds: &Credentials, g: &str, role: Role) -> Vec<u8> {
        let group = GroupId::new(g).unwrap();
        steps::join_request(creds, &group, role, self.now, &self.ca, &mut self.rng).to_bytes()
    }

    /// Sends a group-key request; returns the effects and the ticket of the answer.
    pub fn join(&mut self, creds: &Credentials, g: &str, role: Role) -> (Effects<Ticket>, Ticket) {
        let data = self.join_request(creds, g, role);
        let ticket = self.ticket();
        (self.run(Command::Join(data, ticket)), ticket)
    }

    /// Allows, joins and closes the window; returns the delivered epoch.
    pub fn joined(&mut self, creds: &Credentials, g: &str, role: Role) -> u32 {
        let id = creds.id().as_str().to_owned();
        self.permit(g, &id, role, true);
        let (_, ticket) = self.join(creds, g, role);
        let e = self.close_next();
        let r = join_of(&e, ticket).unwrap();
        self.accept_key(creds, g, role, &r);
        r.epoch
    }

    /// The device accepts a delivered group key.
    pub fn accept_key(
        &self,
        creds: &Credentials,
        g: &str,
        role: Role,
        r: &JoinReply,
    ) -> AcceptedGroupKey {
        let delivery = GroupKeyDelivery::from_bytes(&r.response).unwrap();
        steps::accept_delivery(&delivery, &self.ca, creds, &GroupId::new(g).unwrap(), role)
    }

    pub fn device(&self, id: &str) -> DeviceRecord {
        self.store
            .device(&DeviceId::new(id).unwrap())
            .unwrap()
            .unwrap()
    }

    pub fn epoch_record(&self, g: &str, epoch: u32) -> EpochRecord {
        self.store
            .epoch(&GroupId::new(g).unwrap(), epoch)
            .unwrap()
            .unwrap_or_else(|| panic!("no epoch {epoch} of {g}"))
    }

    pub fn cert_revoked(&self, serial: u64) -> bool {
        self.store.cert(serial).unwrap().unwrap().revoked_ms != 0
    }

    pub fn epoch(&self, g: &str) -> u32 {
        self.core.epoch(&GroupId::new(g).unwrap()).unwrap()
    }
}

/// The answer with `ticket`.
pub fn reply(e: &Effects<Ticket>, ticket: Ticket) -> &Outcome {
    let mut found = e.replies.iter().filter(|(t, _)| *t == ticket);
    let (_, o) = found.next().unwrap_or_else(|| panic!("no answer {ticket}"));
    assert!(found.next().is_none(), "answer {ticket} twice");
    o
}

/// Whether the effects answer `ticket`.
pub fn answered(e: &Effects<Ticket>, ticket: Ticket) -> bool {
    e.replies.iter().any(|(t, _)| *t == ticket)
}

pub fn cert_of(e: &Effects<Ticket>, ticket: Ticket) -> Result<Vec<u8>, CaError> {
    match reply(e, ticket) {
        Outcome::Cert(r) => r.clone(),
        o => panic!("not a certificate answer: {o:?}"),
    }
}

pub fn join_of(e: &Effects<Ticket>, ticket: Ticket) -> Result<JoinReply, CaError> {
    match reply(e, ticket) {
        Outcome::Join(r) => r.clone(),
        o => panic!("not a join answer: {o:?}"),
    }
}

pub fn epoch_of(e: &Effects<Ticket>, ticket: Ticket) -> Result<u32, CaError> {
    match reply(e, ticket) {
        Outcome::Epoch(r) => r.clone(),
        o => panic!("not an epoch answer: {o:?}"),
    }
}

/// The kinds of the audit entries staged, in order.
pub fn kinds(e: &Effects<Ticket>) -> Vec<AuditKind> {
    e.audits
        .iter()
        .map(|a| AuditKind::parse(&a.kind).unwrap())
        .collect()
}

/// The staged audit entry of `kind` (exactly one).
pub fn audit(e: &Effects<Ticket>, kind: AuditKind) -> &AuditEntry {
    let mut found = e.audits.iter().filter(|a| a.kind == kind.as_str());
    let a = found.next().unwrap_or_else(|| panic!("no {kind:?} entry"));
    assert!(found.next().is_none(), "{kind:?} twice");
    a
}

/// How many notices of `kind` were staged.
pub fn notices(e: &Effects<Ticket>, kind: NoticeKind) -> usize {
    e.notices.iter().filter(|n| n.kind == kind as i32).count()
}
