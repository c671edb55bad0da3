//! The parts every connection uses, each with one job: the configuration and topic policy, the
//! CA gateway ([`CaGateway`]: timeouts, negative cache), the cache of CA data
//! ([`BridgeDirectory`], with Q_CA pinned from the configuration), the replay caches of
//! PROTOCOL.md §3 and §6 partitioned per group and sender (§8), the accepted OTA releases
//! (§7.2), the session registry and the
//! metrics, and the few operations that combine them.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use quva_client::curve::Point;
use quva_client::direct::DirectReplay;
use quva_client::ids::{DeviceId, GroupId};
use quva_client::message::BridgeReplay;
use quva_client::replay::PartitionedReplay;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::ca::{CaClient, CaError};
use crate::config::Config;
use crate::directory::BridgeDirectory;
use crate::gateway::CaGateway;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::ota::Releases;
use crate::reasons::ConnectRefusal;
use crate::registry::Registry;
use crate::sync::lock;
use crate::topics::TopicPolicy;

pub use quva_daemon::now_ms;

/// The parts every connection uses.
pub(crate) struct Shared {
    pub(crate) cfg: Config,
    pub(crate) policy: TopicPolicy,
    pub(crate) metrics: Metrics,
    pub(crate) ca: CaGateway,
    pub(crate) dir: BridgeDirectory,
    /// Accepted messages, per group and sender (PROTOCOL.md §6, §8).
    pub(crate) replay: Mutex<BridgeReplay>,
    /// Direct messages (PROTOCOL.md §7.1), one partition per sender.
    pub(crate) direct_replay: Mutex<DirectReplay>,
    /// The OTA releases whose manifests were accepted, for the chunk checks (PROTOCOL.md §7.2).
    pub(crate) releases: Mutex<Releases>,
    /// Connect-proof nonces, per identity (PROTOCOL.md §3, §8).
    nonces: Mutex<PartitionedReplay<Identity, [u8; 16]>>,
    /// Batches of signature checks running on the blocking pool at once (one per CPU).
    pub(crate) verifiers: Semaphore,
    pub(crate) upstream_password: Option<String>,
    pub(crate) stop: CancellationToken,
    pub(crate) sessions: Registry,
    /// Whether the notice follower has read the CA's log to its end, so that the directory's
    /// revocations are current; until then certificate connections ask the CA.
    pub(crate) revocations_current: AtomicBool,
    /// Certificates whose use the CA has confirmed to this bridge (PROTOCOL.md §3).
    confirmed: Mutex<HashSet<u64>>,
}

/// Most confirmed certificates remembered; the set starts again when full (each forgotten one
/// costs one more confirmation).
const MAX_CONFIRMED: usize = 1 << 20;

impl Shared {
    /// Runs one CA call with the configured timeout and records its latency.
    pub(crate) async fn ca_call<T>(
        &self,
        name: &'static str,
        fut: impl Future<Output = Result<T, CaError>>,
    ) -> Result<T, CaError> {
        self.ca.call(name, fut).await
    }

    /// The CA client, if the bridge has one.
    pub(crate) fn ca_client(&self) -> Option<&Arc<dyn CaClient>> {
        self.ca.client()
    }

    /// Q_CA, pinned from the configuration (PROTOCOL.md §8): never taken from the CA link.
    pub(crate) fn ca_public(&self) -> Option<Point> {
        self.dir.ca_public()
    }

    /// Makes sure the group is cached and not older than the configured TTL.
    pub(crate) async fn ensure_group(&self, group: &GroupId) -> Result<(), CaError> {
        let ttl = self.cfg.ca.group_ttl_ms;
        if self.dir.is_fresh(group, now_ms().saturating_sub(ttl)) {
            return Ok(());
        }
        let known = |dir: &BridgeDirectory| dir.current_epoch(group).is_some();
        if self.ca.recently_failed(group) {
            return if known(&self.dir) {
                Ok(())
            } else {
                Err(CaError::NotFound)
            };
        }
        let r = self.refresh_group(group).await;
        self.ca.fetched(group, r.is_ok());
        if r.is_err() && known(&self.dir) {
            // Stale data is better than none while the CA is away.
            return Ok(());
        }
        r
    }

    /// Fetches the group from the CA and applies it; ends the sessions of departed members.
    pub(crate) async fn refresh_group(&self, group: &GroupId) -> Result<(), CaError> {
        let ca = self.ca_client().ok_or(CaError::Unavailable)?;
        if self.ca_public().is_none() {
            return Err(CaError::Unavailable);
        }
        let snap = self
            .ca_call("get_group", ca.get_group(group.clone()))
            .await?;
        let departed = self.dir.apply_snapshot(&snap, now_ms()).map_err(|e| {
            tracing::warn!(group = %group, error = %e, "group data from the CA rejected");
            CaError::InvalidResponse
        })?;
        self.end_departed(group, &departed);
        Ok(())
    }

    /// Ends the sessions of members that left a group (deny, removal, revocation), and the
    /// group-level connections of the group, which hold its former keys (PROTOCOL.md §8).
    fn end_departed(&self, group: &GroupId, departed: &[DeviceId]) {
        if departed.is_empty() {
            return;
        }
        for id in departed {
            let n = self.sessions.end_device(id);
            tracing::info!(group = %group, device = %id, sessions = n, "member left the group; sessions ended");
        }
        let n = self.sessions.end_group(group);
        if n > 0 {
            tracing::info!(group = %group, sessions = n, "group connections ended after a departure");
        }
    }

    /// Whether a certificate whose `quva-cert-v1` proof (`auth_data`) passed may connect
    /// (PROTOCOL.md §3): it is neither revoked nor superseded, and the CA knows it is used. A
    /// certificate this bridge has not seen confirmed is reported to the CA with its proof
    /// (`ConfirmCertificateUse`: its first use spends the enrollment secret and revokes the
    /// device's previous certificate); later connections are answered from the notices once
    /// they are current. If the CA cannot answer, the notices decide once they are current (the
    /// use is reported at the next connection); before that the answer is `Err` (server
    /// unavailable).
    pub(crate) async fn certificate_usable(
        &self,
        serial: u64,
        auth_data: &[u8],
    ) -> Result<bool, ConnectRefusal> {
        if self.dir.is_revoked(serial) {
            return Ok(false);
        }
        let current = self.revocations_current.load(Ordering::Acquire);
        if current && lock(&self.confirmed).contains(&serial) {
            return Ok(true);
        }
        let Some(ca) = self.ca_client() else {
            return if current {
                Ok(true)
            } else {
                Err(ConnectRefusal::ServerUnavailable)
            };
        };
        match self
            .ca_call("confirm_use", ca.confirm_use(serial, auth_data.to_vec()))
            .await
        {
            Ok(()) => {
                let mut confirmed = lock(&self.confirmed);
                if confirmed.len() >= MAX_CONFIRMED {
                    confirmed.clear();
                }
                confirmed.insert(serial);
                Ok(true)
            }
            Err(CaError::Refused | CaError::NotFound | CaError::Malformed) => Ok(false),
            Err(_) if current => {
                tracing::warn!(
                    serial,
                    "CA unavailable: certificate use not reported, notices decide"
                );
                Ok(true)
            }
            Err(_) => Err(ConnectRefusal::ServerUnavailable),
        }
    }

    /// Records a CONNECT proof's nonce in the identity's partition; `Err` (not authorized) if it was seen
    /// inside the window.
    pub(crate) fn check_nonce(
        &self,
        identity: &Identity,
        nonce: [u8; 16],
        t_ms: u64,
        now: u64,
    ) -> Result<(), ConnectRefusal> {
        lock(&self.nonces)
            .check_and_insert(identity.clone(), nonce, t_ms, now)
            .map_err(|_| ConnectRefusal::NotAuthorized)
    }

    /// Forgets expired replay entries and idle partitions.
    pub(crate) fn prune(&self, now: u64) {
        lock(&self.replay).prune(now);
        lock(&self.direct_replay).prune(now);
        lock(&self.nonces).prune(now);
    }
}

impl Shared {
    /// Builds the parts from a validated configuration; `pinned` is Q_CA.
    pub(crate) fn new(
        cfg: Config,
        policy: TopicPolicy,
        ca: Option<Arc<dyn CaClient>>,
        pinned: Option<Point>,
        upstream_password: Option<String>,
    ) -> Self {
        let dir = BridgeDirectory::new(cfg.windows.epoch_grace_ms);
        if let Some(q) = pinned {
            dir.set_ca_public(q);
        }
        let window = cfg.windows.timestamp_ms;
        let metrics = Metrics::new();
        Shared {
            dir,
            replay: Mutex::new(BridgeReplay::new(window, cfg.windows.replay_capacity)),
            direct_replay: Mutex::new(DirectReplay::new(window, cfg.windows.replay_capacity)),
            releases: Mutex::new(Releases::new(
                cfg.limits.ota_releases_per_group,
                cfg.limits.ota_max_releases,
            )),
            nonces: Mutex::new(PartitionedReplay::new(window, cfg.windows.replay_capacity)),
            verifiers: Semaphore::new(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            ),
            policy,
            ca: CaGateway::new(ca, cfg.ca_timeout(), metrics.clone()),
            metrics,
            upstream_password,
            stop: CancellationToken::new(),
            sessions: Registry::default(),
            revocations_current: AtomicBool::new(false),
            confirmed: Mutex::new(HashSet::new()),
            cfg,
        }
    }
}
