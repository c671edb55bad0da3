//! `quva-node run`: the long-running device daemon (the packaged unit's command).
//!
//! It takes part in every group whose key the store holds (resumed without a group-key request),
//! keeps a persistent MQTT session so that direct messages wait at the broker while it is away,
//! and shows every verified direct message addressed to it (PROTOCOL.md §7.1). The checks are
//! [`receive_direct`]'s; the sender's new floor is saved in the key store *before* the message
//! is shown, and a message whose floor cannot be saved is not shown. Refusals are logged with
//! the claimed sender and the reason, never the content.
//!
//! Direct messages queued in the session arrive right after the CONNACK, before the member lists
//! that vouch for their senders: they are held (at most [`MAX_HELD`]) until every group is ready
//! or [`HOLD_MS`] has passed.
//!
//! As a release signer (the store holds releases made with `quva-node ota release`), it also
//! serves them (PROTOCOL.md §7.2, [`crate::signer`]): at every new epoch of a release's group it
//! deposits the key message sealed with the new epoch's keys, retained; it collects the status
//! reports sent on `<group>/_q` (kept in the store, highest T_ms per device and version), and
//! answers a `need-key` report with a direct message carrying the key message's M, after checking
//! that the device is still a subscriber of the group.
//!
//! As a device following OTA groups (the `[ota]` table), it takes part in each as a subscriber
//! and runs the OTA agent ([`crate::ota_device`]): releases of the pinned signers are fetched,
//! verified, applied by the configured command and reported; a progress line and each state are
//! printed.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use quva_client::direct::VerifiedDirect;
use quva_client::ids::{GroupId, Role};
use quva_client::ota::KeyMessage;
use quva_client::topics::{self, OtaItem, OtaTopic};
use quva_daemon::{now_ms, shutdown_signal};
use rand_core::OsRng;
use serde_json::json;

use crate::direct::{DirectBook, DirectOutcome, accept_direct};
use crate::error::NodeError;
use crate::net::{Link, LinkEvent};
use crate::ota_device::{OtaService, next_applied};
use crate::signer::{KeyArchive, Releases, StatusLedger, signer_is_listed, state_name};
use crate::store::KeyStore;
use crate::terminal::{log_event, print_line};

/// The session name of the daemon: its client identifier is `<device>-run`.
pub(crate) const SESSION_NAME: &str = "run";
/// How long the broker keeps the daemon's session while it is away: 7 days.
pub(crate) const SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;
/// Direct messages held while the member lists arrive.
pub(crate) const MAX_HELD: usize = 256;
/// The longest a direct message is held for the member lists after connecting.
pub(crate) const HOLD_MS: u64 = 15_000;
/// How long a refused re-signed manifest waits before it is offered again.
pub(crate) const MANIFEST_RETRY_MS: u64 = 30_000;

/// One received direct message as a line of text or JSON (the payload is the command's
/// result), and whether it is an OTA key message: that one's payload (K_c) is never shown, only
/// its sender and version.
fn describe(m: &VerifiedDirect, json_out: bool) -> (String, bool) {
    if let Ok(key) = KeyMessage::from_bytes(m.payload()) {
        let line = if json_out {
            json!({
                "direct": true,
                "sender": m.sender().as_str(),
                "t_ms": m.t_ms(),
                "ota_key_version": key.version,
            })
            .to_string()
        } else {
            format!(
                "[direct] from {}: OTA key of version {} (not shown)",
                m.sender(),
                key.version
            )
        };
        return (line, true);
    }
    let text = std::str::from_utf8(m.payload()).ok();
    let line = if json_out {
        let mut v = json!({
            "direct": true,
            "sender": m.sender().as_str(),
            "t_ms": m.t_ms(),
        });
        match text {
            Some(t) => v["payload"] = json!(t),
            None => v["payload_hex"] = json!(hex::encode(m.payload())),
        }
        v.to_string()
    } else {
        let payload = match text {
            Some(t) => t.to_owned(),
            None => format!("hex:{}", hex::encode(m.payload())),
        };
        format!("[direct] from {}: {payload}", m.sender())
    };
    (line, false)
}

/// Accepts a direct message ([`accept_direct`]: the floor is saved first) and prints it; logs a
/// refusal with the claimed sender and the reason, never the content. A floor that cannot be
/// saved is logged and the message not shown.
///
/// A message whose payload is an OTA key message (PROTOCOL.md §7.2: a signer's answer to
/// `need-key`, carrying K_c) is never printed: it is returned for the OTA agent, and only its
/// sender and version are shown.
///
/// # Errors
/// Standard output closed.
pub(crate) fn show_direct(
    device: &quva_client::device::Device,
    book: &mut DirectBook,
    store: &KeyStore,
    topic: &str,
    payload: &[u8],
    json_out: bool,
) -> Result<Option<VerifiedDirect>, NodeError> {
    match accept_direct(device, book, store, topic, payload, now_ms()) {
        Ok(DirectOutcome::Accepted(msg)) => {
            tracing::info!(sender = %msg.sender(), t_ms = msg.t_ms(), "direct message");
            let (line, is_key) = describe(&msg, json_out);
            print_line(&line)?;
            Ok(is_key.then_some(msg))
        }
        Ok(DirectOutcome::Refused {
            claimed_sender,
            reason,
        }) => {
            let claimed = claimed_sender.map_or_else(|| "?".to_owned(), |s| s.to_string());
            tracing::warn!(claimed_sender = %claimed, reason = %reason, label = reason.label(), "direct message refused");
            Ok(None)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot save the direct-message floor; the message is not shown");
            Ok(None)
        }
    }
}

/// The daemon's state between events.
struct Daemon {
    link: Link,
    store: KeyStore,
    roles: Vec<(GroupId, Role)>,
    book: DirectBook,
    json: bool,
    held: VecDeque<(String, Bytes)>,
    connected_at: Option<u64>,
    releases: Releases,
    ledger: StatusLedger,
    archive: KeyArchive,
    /// Status reports waiting for their group's publisher key.
    reports: VecDeque<(GroupId, Bytes)>,
    /// Release deposits (manifest or key message) waiting for their PUBACK.
    deposits: HashMap<u64, (GroupId, u64, OtaItem)>,
    /// Manifests signed again after a renewal and not yet accepted by the bridge.
    unsent_manifests: BTreeSet<(GroupId, u64)>,
    /// When the manifests were last offered (a refused one is offered again after
    /// [`MANIFEST_RETRY_MS`], or at the next epoch).
    manifests_offered_ms: Option<u64>,
    rng: OsRng,
    /// The device side of group OTA, with an `[ota]` table that names groups.
    ota: Option<OtaService>,
}

impl Daemon {
    /// Whether every group's key is current (and with it its member list).
    fn lists_ready(&self) -> bool {
        self.roles.iter().all(|(g, r)| self.link.is_ready(g, *r))
    }

    fn holding(&self) -> bool {
        !self.lists_ready()
            && self
                .connected_at
                .is_some_and(|t| now_ms().saturating_sub(t) < HOLD_MS)
    }

    fn on_direct(&mut self, topic: String, payload: Bytes) -> Result<(), NodeError> {
        if self.holding() {
            if self.held.len() >= MAX_HELD {
                self.held.pop_front();
                tracing::warn!(
                    "too many direct messages waiting for the member lists; dropped the oldest"
                );
            }
            self.held.push_back((topic, payload));
            return Ok(());
        }
        self.open_direct(&topic, &payload)
    }

    fn release_held(&mut self) -> Result<(), NodeError> {
        while !self.holding()
            && let Some((topic, payload)) = self.held.pop_front()
        {
            self.open_direct(&topic, &payload)?;
        }
        Ok(())
    }

    fn open_direct(&mut self, topic: &str, payload: &[u8]) -> Result<(), NodeError> {
        let key = show_direct(
            self.link.device(),
            &mut self.book,
            &self.store,
            topic,
            payload,
            self.json,
        )?;
        if let Some(msg) = key {
            tracing::info!(sender = %msg.sender(), "OTA key received by direct message");
            match self.ota.as_mut() {
                Some(ota) => ota.on_direct(&mut self.link, &msg),
                None => tracing::info!("no [ota] groups: the key is ignored"),
            }
        }
        Ok(())
    }

    /// Deposits what `group`'s releases need: first the manifests signed again after a renewal,
    /// once the newest member list lists the signer's current certificate (the bridge and the
    /// devices check it); then, when no manifest of the group is outstanding, the key messages
    /// sealed for the current epoch where the last one deposited was sealed for another.
    fn serve_group(&mut self, group: &GroupId, epoch_event: bool) {
        if !self.link.is_ready(group, Role::Publisher) {
            return;
        }
        let now = now_ms();
        let unsent: Vec<(GroupId, u64)> = self
            .unsent_manifests
            .iter()
            .filter(|(g, _)| g == group)
            .cloned()
            .collect();
        let due = epoch_event
            || self
                .manifests_offered_ms
                .is_none_or(|t| now.saturating_sub(t) >= MANIFEST_RETRY_MS);
        if !unsent.is_empty() && due && signer_is_listed(self.link.device(), group) {
            self.manifests_offered_ms = Some(now);
            for (g, v) in unsent {
                let Some(r) = self.releases.get(&g, v) else {
                    continue;
                };
                let topic = OtaTopic {
                    group: g.clone(),
                    signer: self.link.device().id().clone(),
                    version: v,
                    item: OtaItem::Manifest,
                }
                .to_string();
                tracing::info!(topic = %topic, "depositing the manifest signed with the renewed certificate");
                let id = self
                    .link
                    .publish_raw(topic, r.manifest_message.clone(), true);
                self.unsent_manifests.remove(&(g.clone(), v));
                self.deposits.insert(id, (g, v, OtaItem::Manifest));
            }
        }
        let outstanding = self.unsent_manifests.iter().any(|(g, _)| g == group)
            || self
                .deposits
                .values()
                .any(|(g, _, item)| g == group && *item == OtaItem::Manifest);
        if outstanding {
            return;
        }
        let deposits =
            match self
                .releases
                .key_messages_for(self.link.device(), group, now, &mut self.rng)
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(group = %group, error = %e, "cannot seal the key messages");
                    return;
                }
            };
        for d in deposits {
            let version = OtaTopic::parse(&d.topic).map_or(0, |t| t.version);
            tracing::info!(topic = %d.topic, "depositing the key message for the current epoch");
            let id = self.link.publish_raw(d.topic, d.payload, true);
            self.deposits
                .insert(id, (group.clone(), version, OtaItem::Key));
        }
    }

    /// Verifies and records the status reports whose group key is ready, and answers
    /// `need-key`.
    fn process_reports(&mut self) -> Result<(), NodeError> {
        let mut waiting = VecDeque::new();
        while let Some((group, payload)) = self.reports.pop_front() {
            if !self.link.is_ready(&group, Role::Publisher) {
                waiting.push_back((group, payload));
                continue;
            }
            let (status, changed) =
                match self
                    .ledger
                    .on_query(self.link.device(), &self.archive, &payload, now_ms())
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(group = %group, reason = %e, "status report refused");
                        continue;
                    }
                };
            tracing::info!(device = %status.device, group = %status.group,
                version = status.report.version, state = state_name(status.report.state),
                "status report");
            if changed && let Err(e) = self.ledger.save(&self.store) {
                tracing::warn!(error = %e, "cannot save the status reports");
            }
            let mut book = self.book.clone();
            match self.ledger.answer_need_key(
                self.link.device(),
                &self.releases,
                &mut book,
                &status,
                now_ms(),
                &mut self.rng,
            ) {
                Ok(Some((topic, bytes))) => {
                    // T_ms is durable before the answer leaves.
                    book.save(&self.store)?;
                    self.book = book;
                    tracing::info!(device = %status.device, version = status.report.version,
                        "answering need-key with a direct message");
                    self.link.publish_raw(topic, bytes, false);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(device = %status.device, error = %e, "cannot answer need-key")
                }
            }
        }
        self.reports = waiting;
        Ok(())
    }

    fn on_event(&mut self, ev: LinkEvent) -> Result<(), NodeError> {
        log_event(&ev);
        match ev {
            LinkEvent::Connected => self.connected_at = Some(now_ms()),
            LinkEvent::Ready {
                group,
                role: Role::Publisher,
                ..
            }
            | LinkEvent::Rekeyed {
                group,
                role: Role::Publisher,
                ..
            } if self.releases.has_group(&group) => {
                self.serve_group(&group, true);
                if self.archive.remember(self.link.device(), &group, now_ms())
                    && let Err(e) = self.archive.save(&self.store)
                {
                    tracing::warn!(error = %e, "cannot save the report keys");
                }
            }
            LinkEvent::Ready {
                group,
                role: Role::Subscriber,
                ..
            } if self.ota.is_some() => {
                if let Some(ota) = self.ota.as_mut() {
                    ota.start_group(&mut self.link, &group);
                }
            }
            LinkEvent::Publish { topic, payload, .. }
                if let Some(group) = self.report_group(&topic) =>
            {
                self.reports.push_back((group, payload));
            }
            LinkEvent::Delivered { id } => {
                if let Some((group, version, item)) = self.deposits.remove(&id) {
                    tracing::info!(group = %group, version, ?item, "release item deposited");
                    self.releases.save(&self.store)?;
                    if item == OtaItem::Manifest {
                        self.serve_group(&group, false);
                    }
                }
            }
            LinkEvent::Refused { id, code } => match self.deposits.remove(&id) {
                Some((group, version, OtaItem::Manifest)) => {
                    tracing::warn!(group = %group, version, code, "the bridge refused the re-signed manifest; offering it again later");
                    self.unsent_manifests.insert((group, version));
                }
                Some((group, version, item)) => {
                    tracing::warn!(group = %group, version, ?item, code, "the bridge refused a release item");
                }
                None => tracing::warn!(code, "the bridge refused a message"),
            },
            LinkEvent::Publish { topic, payload, .. } if topics::parse_direct(&topic).is_some() => {
                self.on_direct(topic, payload)?;
            }
            LinkEvent::Publish { topic, payload, .. }
                if self.ota.as_ref().is_some_and(|o| o.handles(&topic)) =>
            {
                if let Some(ota) = self.ota.as_mut() {
                    ota.on_publish(&mut self.link, &topic, &payload);
                }
            }
            LinkEvent::Publish { topic, .. } => {
                tracing::debug!(topic = %topic, "unexpected publish");
            }
            LinkEvent::Watching { filter, code } if code >= 0x80 => {
                tracing::warn!(filter = %filter, code, "the bridge refused a subscription");
                if let Some(ota) = self.ota.as_ref() {
                    ota.on_refused(&filter, code);
                }
            }
            LinkEvent::Removed { group, role, epoch } => {
                tracing::warn!(group = %group, ?role, epoch = epoch.0, "this device was removed from the group");
            }
            _ => {}
        }
        self.release_held()?;
        self.process_reports()
    }

    /// The release group whose query topic `topic` is.
    fn report_group(&self, topic: &str) -> Option<GroupId> {
        self.releases
            .groups()
            .into_iter()
            .find(|g| topics::query(g) == topic)
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
///
/// # Errors
/// The link's unrecoverable failures and the key store's.
pub(crate) async fn run(
    mut link: Link,
    store: KeyStore,
    mut roles: Vec<(GroupId, Role)>,
    json: bool,
    mut ota: Option<OtaService>,
) -> Result<(), NodeError> {
    let book = DirectBook::load(&store)?;
    let mut releases = Releases::load(&store)?;
    let ledger = StatusLedger::load(&store)?;
    let archive = KeyArchive::load(&store, link.device().ca_public())?;
    // After a renewal, the manifests are signed again and deposited first; the key messages
    // with the new H(man) follow when the group is ready.
    let resigned = releases
        .resign_after_renewal(link.device(), now_ms(), &mut OsRng)
        .map_err(|e| NodeError::Protocol(format!("cannot sign the manifests again: {e}")))?;
    let unsent_manifests: BTreeSet<(GroupId, u64)> = resigned
        .iter()
        .filter_map(|d| OtaTopic::parse(&d.topic).map(|t| (t.group, t.version)))
        .collect();
    link.persistent_session(SESSION_NAME, SESSION_EXPIRY_SECS);
    for g in releases.groups() {
        if !roles.contains(&(g.clone(), Role::Publisher)) {
            roles.push((g.clone(), Role::Publisher));
        }
        link.watch(topics::query(&g));
        tracing::info!(group = %g, "serving releases");
    }
    // An OTA group is followed as a subscriber: its key opens the key messages and its member
    // list vouches for the signer.
    for g in ota.as_ref().map(OtaService::groups).unwrap_or_default() {
        if !roles.contains(&(g.clone(), Role::Subscriber)) {
            roles.push((g, Role::Subscriber));
        }
    }
    for (g, r) in &roles {
        link.want(g.clone(), *r, false);
    }
    if roles.is_empty() {
        tracing::warn!(
            "this device holds no group key: direct messages need a group both devices belong to"
        );
    }
    link.watch(topics::direct(link.device().id()));
    let mut applied = ota.as_mut().and_then(OtaService::take_results);
    if let Some(o) = ota.as_ref() {
        o.announce();
    }
    tracing::info!(client_id = %link.client_id(), groups = roles.len(), "running");
    let mut d = Daemon {
        link,
        store,
        roles,
        book,
        json,
        held: VecDeque::new(),
        connected_at: None,
        releases,
        ledger,
        archive,
        reports: VecDeque::new(),
        deposits: HashMap::new(),
        unsent_manifests,
        manifests_offered_ms: None,
        rng: OsRng,
        ota,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            ev = d.link.next() => d.on_event(ev?)?,
            _ = tick.tick() => {
                d.release_held()?;
                d.process_reports()?;
                for g in d.releases.groups() {
                    d.serve_group(&g, false);
                }
                if let Some(ota) = d.ota.as_mut() {
                    ota.tick(&mut d.link);
                }
            }
            done = next_applied(&mut applied) => {
                if let (Some(done), Some(ota)) = (done, d.ota.as_mut()) {
                    ota.on_applied(&mut d.link, done);
                }
            }
            () = &mut shutdown => break,
        }
    }
    d.link.disconnect().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct::{DirectBook, receive_direct, seal_direct};
    use quva_client::ota::ContentKey;
    use quva_client::testkit::{Node, World};

    #[test]
    fn an_ota_key_by_direct_message_is_never_printed() {
        let mut w = World::new(9);
        let g = w.group("fw/a");
        w.register("rel-1", &g, Role::Publisher);
        w.register("sensor-01", &g, Role::Subscriber);
        let mut signer = Node::new(w.enroll("rel-1"));
        let mut sensor = Node::new(w.enroll("sensor-01"));
        w.join_node(&mut signer, &g, Role::Publisher, false);
        w.join_node(&mut sensor, &g, Role::Subscriber, true);
        w.flush(&mut [&mut signer, &mut sensor]);
        let k_c = ContentKey::from_bytes(&[0x5a; 32]);
        let m = KeyMessage {
            version: 4,
            manifest_hash: [1; 32],
            content_key: k_c,
            image_hash: [2; 32],
            name: "fw.bin".to_owned(),
        };
        let to = sensor.dev.id().clone();
        let open = |payload: &[u8], rng: &mut _| {
            let (topic, wire, _) = seal_direct(
                &signer.dev,
                &mut DirectBook::default(),
                &g,
                &to,
                payload,
                w.now,
                rng,
            )
            .unwrap();
            receive_direct(&sensor.dev, &DirectBook::default(), &topic, &wire, w.now)
                .unwrap()
                .commit()
        };
        let mut rng = rand_core::OsRng;
        let key_msg = open(&m.to_bytes(), &mut rng);
        let secret_hex = hex::encode([0x5a; 32]);
        for json_out in [false, true] {
            let (line, is_key) = describe(&key_msg, json_out);
            assert!(is_key);
            assert!(!line.contains(&secret_hex), "{line}");
            assert!(line.contains("rel-1") && line.contains('4'), "{line}");
        }
        let text = open(b"reboot", &mut rng);
        let (line, is_key) = describe(&text, false);
        assert!(!is_key);
        assert_eq!(line, "[direct] from rel-1: reboot");
    }
}
