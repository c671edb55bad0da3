//! Rekey notices: follows the CA's notice log and publishes it on the broker.
//!
//! Implements the bridge's part of PROTOCOL.md §5 and §8: each rekey notice is published
//! retained, QoS 1, on its key topic; at every epoch the group's member certificate list is
//! published retained on `quva/c/<group>`; a revocation ends the device's sessions. After any
//! disconnect (CA or broker) the bridge resumes from the sequence number after the last notice it
//! finished, and after a broker reconnect it first publishes again the latest retained message of
//! every topic it published (a broker without persistence forgets them).
//!
//! With `notices.state_file` set, the position and what was built from the log (the retained
//! set, the revocations) are kept in that file ([`state`]), written every few seconds while
//! notices arrive and whenever the log is caught up; a restarted bridge resumes after the saved
//! position. The CA compacts its log (sequence numbers then have gaps), and what it keeps is
//! enough for a bridge that reads it from any position it had reached.

mod state;

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use futures_util::{SinkExt as _, StreamExt as _};
use quva_client::enrollment::CaKid;
use quva_client::ids::{DeviceId, GroupId};
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v5;
use rmqtt_codec::{MqttCodec, MqttPacket};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::ca::{Notice, NoticeAction};
use crate::shared::Shared;

use self::state::{FollowerState, StateError, write_atomically};

/// The bridge's own MQTT 5 connection to the broker, used to publish retained notices.
pub(crate) struct Publisher {
    reader: FramedRead<OwnedReadHalf, MqttCodec>,
    writer: FramedWrite<OwnedWriteHalf, MqttCodec>,
    next_id: u16,
}

/// Why publishing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PublishError {
    /// The broker is unreachable or closed the connection.
    #[error("broker connection lost")]
    Connection,
    /// The broker refused the PUBLISH or the connection.
    #[error("broker refused (reason {0})")]
    Refused(u8),
}

impl Publisher {
    /// Connects with the bridge's own client identifier and credentials.
    pub(crate) async fn connect(shared: &Shared) -> Result<Self, PublishError> {
        let t = Duration::from_millis(shared.cfg.upstream.connect_timeout_ms);
        let stream = tokio::time::timeout(t, TcpStream::connect(&shared.cfg.upstream.address))
            .await
            .map_err(|_| PublishError::Connection)?
            .map_err(|_| PublishError::Connection)?;
        let (rd, wr) = stream.into_split();
        let mut reader = FramedRead::new(rd, MqttCodec::V5(v5::Codec::new(1024 * 1024, 0)));
        let mut writer = FramedWrite::new(wr, MqttCodec::V5(v5::Codec::new(0, 0)));
        let connect = v5::Connect {
            clean_start: true,
            keep_alive: 0,
            client_id: ByteString::from(shared.cfg.upstream.client_id.clone()),
            username: shared.cfg.upstream.username.clone().map(ByteString::from),
            password: shared.upstream_password.clone().map(Bytes::from),
            ..Default::default()
        };
        writer
            .send(MqttPacket::V5(v5::Packet::Connect(Box::new(connect))))
            .await
            .map_err(|_| PublishError::Connection)?;
        match tokio::time::timeout(t, reader.next()).await {
            Ok(Some(Ok((MqttPacket::V5(v5::Packet::ConnectAck(ack)), _)))) => {
                if ack.reason_code == v5::ConnectAckReason::Success {
                    Ok(Publisher {
                        reader,
                        writer,
                        next_id: 1,
                    })
                } else {
                    Err(PublishError::Refused(ack.reason_code.into()))
                }
            }
            _ => Err(PublishError::Connection),
        }
    }

    /// Resolves when the broker closes the connection (or sends something that ends it). Only
    /// called while no PUBLISH is in flight.
    pub(crate) async fn closed(&mut self) {
        loop {
            match self.reader.next().await {
                Some(Ok((MqttPacket::V5(v5::Packet::Disconnect(_)), _))) | Some(Err(_)) | None => {
                    return;
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Publishes retained at QoS 1 and waits for the broker's PUBACK.
    pub(crate) async fn publish_retained(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<(), PublishError> {
        let id = NonZeroU16::new(self.next_id).unwrap_or(NonZeroU16::MIN);
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        let publish = Publish {
            dup: false,
            retain: true,
            qos: QoS::AtLeastOnce,
            topic: ByteString::from(topic),
            packet_id: Some(id),
            payload: Bytes::from(payload),
            properties: Some(v5::PublishProperties::default()),
        };
        self.writer
            .send(MqttPacket::V5(v5::Packet::Publish(Box::new(publish))))
            .await
            .map_err(|_| PublishError::Connection)?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.reader.next()).await {
                Ok(Some(Ok((MqttPacket::V5(v5::Packet::PublishAck(a)), _))))
                    if a.packet_id == id =>
                {
                    let code: u8 = a.reason_code.into();
                    return if code < 0x80 {
                        Ok(())
                    } else {
                        Err(PublishError::Refused(code))
                    };
                }
                Ok(Some(Ok(_))) => {}
                _ => return Err(PublishError::Connection),
            }
        }
    }
}

/// What the broker should hold retained: the latest payload the bridge published on each
/// `quva/` topic (rekey notices and certificate lists), and the epoch of each group's published
/// certificate list.
///
/// A broker without persistence forgets retained messages when it restarts; the bridge publishes
/// this set again on every new broker connection, so nothing it published is lost. The set holds
/// one entry per topic.
#[derive(Debug, Default)]
pub(crate) struct Retained {
    topics: BTreeMap<String, Vec<u8>>,
    lists: HashMap<GroupId, u32>,
}

impl Retained {
    /// Publishes everything again (after a broker reconnect).
    async fn republish(&self, publisher: &mut Publisher) -> Result<(), PublishError> {
        for (topic, payload) in &self.topics {
            publisher.publish_retained(topic, payload.clone()).await?;
        }
        Ok(())
    }

    /// Publishes on `topic` and remembers it.
    async fn publish(
        &mut self,
        publisher: &mut Publisher,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<(), PublishError> {
        publisher.publish_retained(topic, payload.clone()).await?;
        self.topics.insert(topic.to_owned(), payload);
        Ok(())
    }
}

/// The position in the CA's notice log, what was published from it, and the broker connection.
struct Follower {
    /// The sequence number of the next notice to apply.
    next_seq: u64,
    retained: Retained,
    /// Every revocation applied (serial, and the revoked device or empty for a superseded
    /// certificate), for the state file: the directory gets them again after a restart.
    revoked: BTreeMap<u64, String>,
    /// Kept across CA interruptions; replaced (and the retained set published again) only when
    /// the broker side failed.
    publisher: Option<Publisher>,
    /// The state file, if configured, and whether the state changed since it was written.
    saver: Option<Saver>,
}

/// Writes the follower's state file: at most every [`SAVE_EVERY`] while notices arrive, and when
/// the log is caught up.
struct Saver {
    path: PathBuf,
    kid: CaKid,
    dirty: bool,
    saved_at: Instant,
}

/// Least time between two writes of the state file while notices keep arriving.
const SAVE_EVERY: Duration = Duration::from_secs(3);

impl Follower {
    /// A follower at the start of the log, or where the state file says if there is a valid one
    /// for this CA; the file's revocations are applied to the directory.
    fn start(shared: &Shared) -> Follower {
        let mut follower = Follower {
            next_seq: 1,
            retained: Retained::default(),
            revoked: BTreeMap::new(),
            publisher: None,
            saver: None,
        };
        let (Some(path), Some(ca)) = (&shared.cfg.notices.state_file, shared.ca_public()) else {
            return follower;
        };
        let path = PathBuf::from(path);
        let kid = CaKid::of(&ca);
        match FollowerState::load(&path, &kid).and_then(Restored::check) {
            Ok(Some(restored)) => {
                for (serial, device) in &restored.revoked {
                    shared.dir.revoke(*serial, device.as_ref());
                }
                follower.next_seq = restored.state.next_seq;
                follower.retained.topics = restored.state.topics;
                follower.retained.lists = restored.lists;
                follower.revoked = restored.state.revoked;
                tracing::info!(
                    next_seq = follower.next_seq,
                    topics = follower.retained.topics.len(),
                    revoked = follower.revoked.len(),
                    "notice state loaded; resuming the notice log"
                );
            }
            Ok(None) => tracing::info!(
                path = %path.display(),
                "no notice state file yet; reading the notice log from its start"
            ),
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "notice state file not used; reading the notice log from its start"
            ),
        }
        follower.saver = Some(Saver {
            path,
            kid,
            dirty: false,
            saved_at: Instant::now(),
        });
        follower
    }

    /// Notes that a notice was applied.
    fn changed(&mut self) {
        if let Some(s) = &mut self.saver {
            s.dirty = true;
        }
    }

    /// Writes the state file if it changed (and, unless `now`, if the last write is old enough).
    async fn save(&mut self, now: bool) {
        let Some(saver) = &mut self.saver else {
            return;
        };
        if !saver.dirty || (!now && saver.saved_at.elapsed() < SAVE_EVERY) {
            return;
        }
        let state = FollowerState {
            next_seq: self.next_seq,
            topics: self.retained.topics.clone(),
            lists: self
                .retained
                .lists
                .iter()
                .map(|(g, e)| (g.as_str().to_owned(), *e))
                .collect(),
            revoked: self.revoked.clone(),
        };
        let bytes = state.encode(&saver.kid);
        let path = saver.path.clone();
        let written = tokio::task::spawn_blocking(move || write_atomically(&path, &bytes)).await;
        saver.saved_at = Instant::now();
        match written {
            Ok(Ok(())) => {
                saver.dirty = false;
                tracing::debug!(next_seq = self.next_seq, "notice state saved");
            }
            Ok(Err(e)) => {
                tracing::warn!(path = %saver.path.display(), error = %e, "cannot write the notice state file");
            }
            Err(_) => tracing::warn!("writing the notice state file was cancelled"),
        }
    }
}

/// A state file's contents checked as a whole: every group and device identifier valid.
struct Restored {
    state: FollowerState,
    lists: HashMap<GroupId, u32>,
    revoked: Vec<(u64, Option<DeviceId>)>,
}

impl Restored {
    fn check(state: Option<FollowerState>) -> Result<Option<Restored>, StateError> {
        let Some(state) = state else {
            return Ok(None);
        };
        let mut lists = HashMap::new();
        for (g, e) in &state.lists {
            let g = GroupId::new(g).map_err(|_| StateError::Corrupt("group id"))?;
            lists.insert(g, *e);
        }
        let mut revoked = Vec::with_capacity(state.revoked.len());
        for (serial, device) in &state.revoked {
            let device = if device.is_empty() {
                None
            } else {
                Some(DeviceId::new(device).map_err(|_| StateError::Corrupt("device id"))?)
            };
            revoked.push((*serial, device));
        }
        Ok(Some(Restored {
            state,
            lists,
            revoked,
        }))
    }
}

/// Which side interrupted the notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interrupted {
    /// The CA (stream, call or timeout).
    Ca(&'static str),
    /// The broker connection.
    Broker(&'static str),
}

impl Interrupted {
    fn reason(self) -> &'static str {
        match self {
            Interrupted::Ca(r) | Interrupted::Broker(r) => r,
        }
    }
}

/// Follows the CA's notices until the bridge stops.
///
/// Without a state file the position is kept in memory only: a restarted bridge reads the log
/// from its start (every notice is idempotent: retained publishes end at the latest per topic,
/// group refreshes fetch the current data, revocations are sets), which also rebuilds its
/// revocation set. With one, it resumes where the file says (see [`state`]).
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut follower = Follower::start(&shared);
    let mut backoff = MIN_BACKOFF;
    loop {
        if shared.stop.is_cancelled() {
            follower.save(true).await;
            return;
        }
        let mut connected = false;
        let outcome = tokio::select! {
            () = shared.stop.cancelled() => None,
            r = follow(&shared, &mut follower, &mut connected) => Some(r),
        };
        let Some(outcome) = outcome else {
            follower.save(true).await;
            return;
        };
        follower.save(true).await;
        if let Err(e) = outcome {
            if matches!(e, Interrupted::Broker(_)) {
                follower.publisher = None;
            }
            tracing::warn!(
                error = e.reason(),
                next_seq = follower.next_seq,
                "notice stream interrupted; resuming"
            );
        }
        if connected {
            backoff = MIN_BACKOFF;
        }
        tokio::select! {
            () = shared.stop.cancelled() => {
                follower.save(true).await;
                return;
            }
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// A notice stream quiet this long after it opened has delivered the log's backlog.
const CAUGHT_UP: Duration = Duration::from_millis(300);

/// Compares the CA link's Q_CA with the pinned one; a different key stops the notices (and says
/// why) instead of being trusted (PROTOCOL.md §8).
async fn check_pinned_key(
    shared: &Shared,
    ca: &dyn crate::ca::CaClient,
) -> Result<(), Interrupted> {
    let pinned = shared
        .ca_public()
        .ok_or(Interrupted::Ca("no pinned CA public key"))?;
    let answer = shared
        .ca_call("ca_info", ca.ca_public_key())
        .await
        .map_err(|_| Interrupted::Ca("CA unavailable"))?;
    if answer != pinned.to_bytes() {
        tracing::error!(
            "the CA link answers with another public key than ca.public_key; not following its notices"
        );
        return Err(Interrupted::Ca("CA public key differs from the pinned one"));
    }
    Ok(())
}
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One session of following: connect to the broker if needed (publishing the retained set again
/// on a new connection), open the CA's stream after the last applied notice, then apply notices
/// in order until either side fails. `connected` is set once both sides answered.
async fn follow(
    shared: &Shared,
    follower: &mut Follower,
    connected: &mut bool,
) -> Result<(), Interrupted> {
    let ca = shared.ca_client().ok_or(Interrupted::Ca("no CA"))?;
    check_pinned_key(shared, ca.as_ref()).await?;
    if follower.publisher.is_none() {
        let mut p = Publisher::connect(shared)
            .await
            .map_err(|_| Interrupted::Broker("broker unavailable"))?;
        follower
            .retained
            .republish(&mut p)
            .await
            .map_err(|_| Interrupted::Broker("publishing the retained set failed"))?;
        follower.publisher = Some(p);
    }
    let mut stream = shared
        .ca_call("watch_notices", ca.watch_notices(follower.next_seq))
        .await
        .map_err(|_| Interrupted::Ca("CA unavailable"))?;
    *connected = true;
    tracing::info!(from_seq = follower.next_seq, "following the notice log");
    loop {
        let Some(publisher) = follower.publisher.as_mut() else {
            return Err(Interrupted::Broker("broker connection lost"));
        };
        let current = shared.revocations_current.load(Ordering::Acquire);
        let dirty = follower.saver.as_ref().is_some_and(|s| s.dirty);
        let item = tokio::select! {
            item = stream.next() => item,
            () = publisher.closed() => return Err(Interrupted::Broker("broker connection lost")),
            () = tokio::time::sleep(CAUGHT_UP), if !current || dirty => {
                // The log was read to its end: the directory's revocations are current, and
                // the state file is written.
                follower.save(true).await;
                if !current {
                    shared.revocations_current.store(true, Ordering::Release);
                    tracing::info!(next_seq = follower.next_seq, "notices caught up");
                }
                continue;
            }
        };
        let Some(item) = item else {
            return Err(Interrupted::Ca("CA stream ended"));
        };
        let notice = item.map_err(|_| Interrupted::Ca("CA stream failed"))?;
        if notice.seq < follower.next_seq {
            continue;
        }
        apply(shared, publisher, &mut follower.retained, &notice).await?;
        match &notice.action {
            NoticeAction::Revoked { serial, device } => {
                // As `apply` reads it: a device the identifier rules refuse is not named.
                let device = DeviceId::new(device).map(|d| d.as_str().to_owned());
                follower.revoked.insert(*serial, device.unwrap_or_default());
            }
            NoticeAction::Superseded { serial, .. } => {
                follower.revoked.entry(*serial).or_default();
            }
            _ => {}
        }
        follower.next_seq = notice.seq + 1;
        follower.changed();
        follower.save(false).await;
    }
}

async fn apply(
    shared: &Shared,
    publisher: &mut Publisher,
    retained: &mut Retained,
    notice: &Notice,
) -> Result<(), Interrupted> {
    match &notice.action {
        NoticeAction::Rekey { topic, payload } => {
            if !topic.starts_with(crate::topics::RESERVED_PREFIX) {
                tracing::warn!(seq = notice.seq, "rekey notice for a non-key topic skipped");
                return Ok(());
            }
            retained
                .publish(publisher, topic, payload.clone())
                .await
                .map_err(|_| Interrupted::Broker("publishing a notice failed"))?;
            shared.metrics.notice_published();
            tracing::debug!(seq = notice.seq, topic = %topic, "rekey notice published");
        }
        NoticeAction::GroupUpdated => {
            let Ok(group) = GroupId::new(&notice.group) else {
                return Ok(());
            };
            if retained
                .lists
                .get(&group)
                .is_some_and(|e| *e >= notice.epoch)
            {
                // Already published at this epoch or later (a replay of the log).
                return Ok(());
            }
            match shared.refresh_group(&group).await {
                Ok(()) => {}
                Err(crate::ca::CaError::Unavailable) => {
                    return Err(Interrupted::Ca("CA unavailable"));
                }
                Err(_) => return Ok(()),
            }
            if let Some((epoch, list)) = shared.dir.certificate_list(&group) {
                retained
                    .publish(publisher, &quva_client::members::topic(&group), list)
                    .await
                    .map_err(|_| Interrupted::Broker("publishing a certificate list failed"))?;
                retained.lists.insert(group.clone(), epoch.0);
                shared.metrics.notice_published();
                tracing::debug!(group = %group, epoch = epoch.0, "certificate list published");
            }
        }
        NoticeAction::Revoked { serial, device } => {
            let id = DeviceId::new(device).ok();
            shared.dir.revoke(*serial, id.as_ref());
            if let Some(id) = id {
                let n = shared.sessions.end_device(&id);
                tracing::info!(device = %id, serial, sessions = n, "certificate revoked; sessions closed");
            }
        }
        NoticeAction::Superseded { serial, device, .. } => {
            // Refused from now on; the device's sessions stay (one of them may be the first
            // use of the newer certificate that superseded this one).
            shared.dir.revoke(*serial, None);
            tracing::info!(device = %device, serial, "certificate superseded");
        }
        NoticeAction::Unknown => {}
    }
    Ok(())
}
