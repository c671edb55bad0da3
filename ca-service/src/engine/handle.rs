//! The async front of the engine task: each call sends a command with a oneshot reply over
//! the task's mpsc queue and waits for the answer, which comes once its writes are durable.

use std::sync::Arc;

use quva_client::group::Privacy;
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_proto::v1::AuditEntry;
use rand_core::OsRng;
use tokio::sync::{mpsc, oneshot, watch};

use crate::audit_kind::AuditKind;
use crate::auth::AuditSink;
use crate::clock::Clock;
use crate::engine::command::{CertificateUse, Command, JoinReply, Outcome, Registered};
use crate::engine::issuer::{CertAsk, Issuer};
use crate::engine::stats::{Stats, bump};
use crate::error::CaError;
use crate::store::{CaStore, DeviceRecord, GroupRecord};

type Reply<T> = oneshot::Sender<Result<T, CaError>>;

/// What the task receives.
pub(crate) enum Request {
    /// A command for the core, its ticket the caller's oneshot.
    Command(Command<ReplyTo>),
    /// Flush every window, sync, confirm, stop.
    Shutdown(oneshot::Sender<()>),
}

/// The caller waiting for an answer: the core's ticket in the task.
#[derive(Debug)]
pub(crate) enum ReplyTo {
    Cert(Reply<Vec<u8>>),
    Use(Reply<CertificateUse>),
    Join(Reply<JoinReply>),
    Registered(Reply<Registered>),
    Device(Reply<DeviceRecord>),
    Group(Reply<GroupRecord>),
    Epoch(Reply<u32>),
}

impl ReplyTo {
    /// Sends `outcome`, or the sync error `failed` instead of a success.
    pub(crate) fn send(self, outcome: Outcome, failed: Option<&CaError>) {
        fn deliver<T>(to: Reply<T>, r: Result<T, CaError>, failed: Option<&CaError>) {
            let r = match (failed, r) {
                (Some(e), Ok(_)) => Err(e.clone()),
                (_, r) => r,
            };
            let _ = to.send(r);
        }
        match (self, outcome) {
            (ReplyTo::Cert(to), Outcome::Cert(r)) => deliver(to, r, failed),
            (ReplyTo::Use(to), Outcome::Use(r)) => deliver(to, r, failed),
            (ReplyTo::Join(to), Outcome::Join(r)) => deliver(to, r, failed),
            (ReplyTo::Registered(to), Outcome::Registered(r)) => deliver(to, r, failed),
            (ReplyTo::Device(to), Outcome::Device(r)) => deliver(to, r, failed),
            (ReplyTo::Group(to), Outcome::Group(r)) => deliver(to, r, failed),
            (ReplyTo::Epoch(to), Outcome::Epoch(r)) => deliver(to, r, failed),
            // The core answers each command with the outcome of its kind; dropping the sender
            // tells the caller the engine is unavailable rather than answering wrongly.
            (to, outcome) => {
                tracing::error!(?to, error = ?outcome.error(), "answer of another kind dropped");
            }
        }
    }
}

/// The handle to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Request>,
    notices: watch::Receiver<u64>,
    stats: Arc<Stats>,
    /// Enrollments and renewals are prepared on the caller's task, in parallel.
    issuer: Issuer,
    /// The durable store, for the issuer's prechecks (the writer checks again).
    reads: Arc<dyn CaStore>,
    clock: Arc<dyn Clock>,
}

impl EngineHandle {
    pub(crate) fn new(
        tx: mpsc::Sender<Request>,
        notices: watch::Receiver<u64>,
        stats: Arc<Stats>,
        issuer: Issuer,
        reads: Arc<dyn CaStore>,
        clock: Arc<dyn Clock>,
    ) -> EngineHandle {
        EngineHandle {
            tx,
            notices,
            stats,
            issuer,
            reads,
            clock,
        }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command<ReplyTo>) -> Result<T, CaError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Command(make(reply)))
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
        self.certificate(data, false).await
    }

    /// Renewal (§3): `req || sig` in, `cert || sc(a_i)` out.
    ///
    /// # Errors
    /// As [`EngineHandle::enroll`].
    pub async fn renew(&self, data: Vec<u8>) -> Result<Vec<u8>, CaError> {
        self.certificate(data, true).await
    }

    /// Prepares the certificate on this task (the curve work, about 80 µs, stays off the single
    /// writer); a request the precheck refuses goes to the writer as it came, which checks it
    /// again and records the refusal.
    async fn certificate(&self, data: Vec<u8>, renew: bool) -> Result<Vec<u8>, CaError> {
        let prepared = CertAsk::decode(&data, renew).and_then(|ask| {
            self.issuer
                .prepare(self.reads.as_ref(), ask, self.clock.now_ms(), &mut OsRng)
        });
        match prepared {
            Ok(p) => {
                bump(&self.stats.prepared_off_writer);
                self.call(|r| Command::Issue(Box::new(p), ReplyTo::Cert(r)))
                    .await
            }
            Err(_) if renew => self.call(|r| Command::Renew(data, ReplyTo::Cert(r))).await,
            Err(_) => self.call(|r| Command::Enroll(data, ReplyTo::Cert(r))).await,
        }
    }

    /// A `quva-cert-v1` proof accepted by a bridge (§3): `cert || T || nonce || str(client_id) ||
    /// sig` in. The first use of a certificate spends the secret and revokes the previous one.
    ///
    /// # Errors
    /// [`CaError::NotAuthorized`] for a bad proof or a superseded, revoked or unknown
    /// certificate; [`CaError::Malformed`], [`CaError::TooLarge`], storage.
    pub async fn confirm_use(&self, data: Vec<u8>) -> Result<CertificateUse, CaError> {
        self.call(|r| Command::ConfirmUse(data, ReplyTo::Use(r)))
            .await
    }

    /// A group-key request (§4); answers once the member's epoch is durable.
    ///
    /// # Errors
    /// As [`EngineHandle::enroll`].
    pub async fn join(&self, data: Vec<u8>) -> Result<JoinReply, CaError> {
        self.call(|r| Command::Join(data, ReplyTo::Join(r))).await
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
        self.call(|r| Command::Register {
            id,
            note,
            reissue,
            secret_validity_ms,
            ticket: ReplyTo::Registered(r),
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
        self.call(|r| Command::Revoke {
            id,
            reason,
            ticket: ReplyTo::Device(r),
        })
        .await
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
        self.call(|r| Command::CreateGroup {
            id,
            privacy,
            interval_secs,
            ticket: ReplyTo::Group(r),
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
        self.call(|r| Command::SetPermission {
            group,
            device,
            role,
            allow,
            ticket: ReplyTo::Epoch(r),
        })
        .await
    }

    /// Forces a new epoch; returns it once durable.
    ///
    /// # Errors
    /// [`CaError::NotFound`], storage.
    pub async fn rekey(&self, group: GroupId) -> Result<u32, CaError> {
        self.call(|r| Command::Rekey(group, ReplyTo::Epoch(r)))
            .await
    }

    /// Flushes every open window and stops the task.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request::Shutdown(tx)).await.is_ok() {
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
        if AuditKind::parse(&entry.kind) == Some(AuditKind::AuthDenied) {
            bump(&self.stats.auth_denied);
        }
        if self
            .tx
            .try_send(Request::Command(Command::Audit(entry)))
            .is_err()
        {
            bump(&self.stats.audit_dropped);
            tracing::warn!("audit entry dropped: engine queue full");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn a_failed_sync_turns_successes_into_its_error_and_keeps_refusals() {
        let failed = CaError::from(StoreError::Backend("disk full"));
        let (to, mut rx) = oneshot::channel();
        ReplyTo::Epoch(to).send(Outcome::Epoch(Ok(3)), Some(&failed));
        assert_eq!(rx.try_recv().unwrap(), Err(failed.clone()));
        let (to, mut rx) = oneshot::channel();
        let refused = CaError::NotAuthorized("replayed nonce");
        ReplyTo::Cert(to).send(Outcome::Cert(Err(refused.clone())), Some(&failed));
        assert_eq!(rx.try_recv().unwrap(), Err(refused));
        let (to, mut rx) = oneshot::channel();
        ReplyTo::Epoch(to).send(Outcome::Epoch(Ok(3)), None);
        assert_eq!(rx.try_recv().unwrap(), Ok(3));
        // An answer of another kind is dropped: the caller sees the engine as unavailable.
        let (to, mut rx) = oneshot::channel::<Result<u32, CaError>>();
        ReplyTo::Epoch(to).send(Outcome::Cert(Ok(vec![1])), None);
        assert!(rx.try_recv().is_err());
    }
}
