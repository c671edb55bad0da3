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

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use quva_client::direct::{UnverifiedDirect, VerifiedDirect};
use quva_client::ids::{GroupId, Role};
use quva_client::topics;
use serde_json::json;

use crate::direct::{DirectBook, receive_direct};
use crate::error::NodeError;
use crate::net::{Link, LinkEvent, now_ms};
use crate::store::KeyStore;
use crate::terminal::{log_event, print_line, shutdown_signal};

/// The session name of the daemon: its client identifier is `<device>-run`.
pub(crate) const SESSION_NAME: &str = "run";
/// How long the broker keeps the daemon's session while it is away: 7 days.
pub(crate) const SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;
/// Direct messages held while the member lists arrive.
pub(crate) const MAX_HELD: usize = 256;
/// The longest a direct message is held for the member lists after connecting.
pub(crate) const HOLD_MS: u64 = 15_000;

/// One received direct message as a line of text or JSON (the payload is the command's result).
fn render(m: &VerifiedDirect, json_out: bool) -> String {
    let text = std::str::from_utf8(m.payload()).ok();
    if json_out {
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
        let staged = match receive_direct(self.link.device(), &self.book, topic, payload, now_ms())
        {
            Ok(s) => s,
            Err(reason) => {
                let claimed = UnverifiedDirect::decode(payload)
                    .map(|m| m.sender().to_string())
                    .unwrap_or_else(|_| "?".to_owned());
                tracing::warn!(claimed_sender = %claimed, reason = %reason, label = reason.label(), "direct message refused");
                return Ok(());
            }
        };
        let (sender, floor) = staged.floor();
        let mut next = self.book.clone();
        next.raise_floor(sender, floor);
        if let Err(e) = next.save(&self.store) {
            tracing::error!(error = %e, sender = %sender, "cannot save the direct-message floor; the message is not shown");
            return Ok(());
        }
        self.book = next;
        let msg = staged.commit();
        tracing::info!(sender = %msg.sender(), t_ms = msg.t_ms(), "direct message");
        print_line(&render(&msg, self.json))
    }

    fn on_event(&mut self, ev: LinkEvent) -> Result<(), NodeError> {
        log_event(&ev);
        match ev {
            LinkEvent::Connected => self.connected_at = Some(now_ms()),
            LinkEvent::Publish { topic, payload, .. } if topics::parse_direct(&topic).is_some() => {
                self.on_direct(topic, payload)?;
            }
            LinkEvent::Publish { topic, .. } => {
                tracing::debug!(topic = %topic, "unexpected publish");
            }
            LinkEvent::Watching { filter, code } if code >= 0x80 => {
                tracing::warn!(filter = %filter, code, "the bridge refused a subscription");
            }
            LinkEvent::Removed { group, role, epoch } => {
                tracing::warn!(group = %group, ?role, epoch = epoch.0, "this device was removed from the group");
            }
            _ => {}
        }
        self.release_held()
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
///
/// # Errors
/// The link's unrecoverable failures and the key store's.
pub(crate) async fn run(
    mut link: Link,
    store: KeyStore,
    roles: Vec<(GroupId, Role)>,
    json: bool,
) -> Result<(), NodeError> {
    let book = DirectBook::load(&store)?;
    link.persistent_session(SESSION_NAME, SESSION_EXPIRY_SECS);
    for (g, r) in &roles {
        link.want(g.clone(), *r, false);
    }
    if roles.is_empty() {
        tracing::warn!(
            "this device holds no group key: direct messages need a group both devices belong to"
        );
    }
    link.watch(topics::direct(link.device().id()));
    tracing::info!(client_id = %link.client_id(), groups = roles.len(), "running");
    let mut d = Daemon {
        link,
        store,
        roles,
        book,
        json,
        held: VecDeque::new(),
        connected_at: None,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            ev = d.link.next() => d.on_event(ev?)?,
            _ = tick.tick() => d.release_held()?,
            () = &mut shutdown => break,
        }
    }
    d.link.disconnect().await;
    Ok(())
}
