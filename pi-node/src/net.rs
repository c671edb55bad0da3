//! The MQTT 5 connection to the bridge: drives a [`Device`] over rumqttc and reconnects.
//!
//! Implements the transport side of PROTOCOL.md §3 (CONNECT with `quva-enroll-v1`,
//! `quva-renew-v1` or `quva-cert-v1` and the CONNACK's Authentication Data), §4 (SUBSCRIBE with the
//! `quva-gk` user property, SUBACK user property) and §5–§6 (QoS 1 PUBLISH, retained notices).
//!
//! rumqttc re-sends the CONNECT it was built with when it reconnects, and a certificate proof is
//! timestamped and single-use, so every connection gets new options with a fresh proof and a new
//! event loop. The event loop runs in its own task and hands its events over a channel.
//! Messages are kept, in clear, until their PUBACK; after a reconnection they are sealed again
//! with the then-current keys.
//!
//! # Usage
//! ```
//! use quva_node::parse_address;
//! assert_eq!(parse_address("127.0.0.1:1883").unwrap(), ("127.0.0.1".to_owned(), 1883));
//! assert_eq!(parse_address("[::1]:8883").unwrap(), ("::1".to_owned(), 8883));
//! assert!(parse_address("pi.local").is_err());
//! ```

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use quva_client::device::{
    ConnectAuth, Device, DropReason, KeySource, Output, Purpose, ResumeFailure, Subscription,
    cert_connect_auth,
};
use quva_client::enrollment::Credentials;
use quva_client::group::GK_PROPERTY;
use quva_client::ids::{Epoch, GroupId, Role};
use quva_client::message::{Direction, Protection, Rejection, VerifiedMessage};
use quva_client::reasons;
use quva_daemon::now_ms;
use rand_core::{OsRng, RngCore};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, ConnectReturnCode, Filter, Packet, PubAckReason, SubscribeProperties,
    SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::error::{CLOCK_FLOOR_MS, NodeError, rfc3339};
use crate::store::KeyStore;

/// Largest packet accepted from the bridge: a message of the default 256 KiB limit with room for
/// MQTT framing (rumqttc's default of 10 KiB is far too small).
pub const MAX_INCOMING_PACKET: u32 = 300 * 1024;

/// Splits `host:port` (IPv6 hosts in brackets).
///
/// # Errors
/// [`NodeError::BadBroker`].
pub fn parse_address(address: &str) -> Result<(String, u16), NodeError> {
    let bad = || NodeError::BadBroker(address.to_owned());
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// Refuses to connect with a clock that cannot be right or a certificate outside its validity
/// (the bridge would answer 0x87 without saying why).
///
/// # Errors
/// [`NodeError::ClockNotSet`], [`NodeError::ClockBehind`] or [`NodeError::CertificateExpired`].
pub fn check_clock(creds: &Credentials, now_ms: u64) -> Result<(), NodeError> {
    if now_ms < CLOCK_FLOOR_MS {
        return Err(NodeError::ClockNotSet {
            now: rfc3339(now_ms),
        });
    }
    let cert = creds.cert();
    if now_ms < cert.not_before() {
        return Err(NodeError::ClockBehind {
            now: rfc3339(now_ms),
            not_before: rfc3339(cert.not_before()),
        });
    }
    if now_ms > cert.not_after() {
        return Err(NodeError::CertificateExpired {
            not_after: rfc3339(cert.not_after()),
        });
    }
    Ok(())
}

/// Connection settings.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The bridge `host:port`.
    pub address: String,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Time allowed for TCP and CONNACK.
    pub connect_timeout: Duration,
    /// Longest back-off between reconnections.
    pub reconnect_max: Duration,
    /// Retry an unreachable bridge or CA even before the first connection (daemons); one-shot
    /// commands fail fast instead.
    pub persistent: bool,
}

fn connack_code(c: ConnectReturnCode) -> u8 {
    use ConnectReturnCode as C;
    match c {
        C::Success => 0x00,
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => 0x84,
        C::BadClientId | C::ClientIdentifierNotValid => 0x85,
        C::ServiceUnavailable | C::ServerUnavailable => 0x88,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::BadAuthenticationMethod => 0x8C,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::ConnectionRateExceeded => 0x9F,
    }
}

fn suback_code(c: &SubscribeReasonCode) -> u8 {
    use SubscribeReasonCode as S;
    match c {
        S::Success(qos) => *qos as u8,
        S::Failure | S::Unspecified => 0x80,
        S::ImplementationSpecific => 0x83,
        S::NotAuthorized => 0x87,
        S::TopicFilterInvalid => 0x8F,
        S::PkidInUse => 0x91,
        S::QuotaExceeded => 0x97,
        S::SharedSubscriptionsNotSupported => 0x9E,
        S::SubscriptionIdNotSupported => 0xA1,
        S::WildcardSubscriptionsNotSupported => 0xA2,
    }
}

fn puback_code(r: &PubAckReason) -> u8 {
    use PubAckReason as P;
    match r {
        P::Success => 0x00,
        P::NoMatchingSubscribers => 0x10,
        P::UnspecifiedError => 0x80,
        P::ImplementationSpecificError => 0x83,
        P::NotAuthorized => 0x87,
        P::TopicNameInvalid => 0x90,
        P::PacketIdentifierInUse => 0x91,
        P::QuotaExceeded => 0x97,
        P::PayloadFormatInvalid => 0x99,
    }
}

/// Translates a connection failure into an operator-facing error.
fn connection_error(address: &str, e: &ConnectionError) -> NodeError {
    match e {
        ConnectionError::ConnectionRefused(code) => NodeError::Refused {
            code: connack_code(*code),
        },
        ConnectionError::MqttState(StateError::ConnFail { reason }) => NodeError::Refused {
            code: connack_code(*reason),
        },
        ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, .. }) => {
            let code = *reason_code as u8;
            NodeError::Lost(format!(
                "the bridge ended the session (reason 0x{code:02x}: {})",
                reasons::disconnect_meaning(code)
            ))
        }
        ConnectionError::MqttState(StateError::IncomingPacketTooLarge { pkt_size, max }) => {
            NodeError::Lost(format!(
                "a packet of {pkt_size} bytes exceeds the limit of {max}"
            ))
        }
        ConnectionError::Io(io) => NodeError::Unreachable {
            address: address.to_owned(),
            message: io.to_string(),
        },
        ConnectionError::Timeout(_) => NodeError::Unreachable {
            address: address.to_owned(),
            message: "no CONNACK in time".to_owned(),
        },
        other => NodeError::Lost(other.to_string()),
    }
}

fn options(
    cfg: &LinkConfig,
    client_id: &str,
    auth: ConnectAuth,
    session_expiry_secs: Option<u32>,
) -> Result<MqttOptions, NodeError> {
    let (host, port) = parse_address(&cfg.address)?;
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(cfg.keep_alive);
    o.set_clean_start(session_expiry_secs.is_none());
    o.set_connection_timeout(cfg.connect_timeout.as_secs().max(1));
    o.set_request_channel_capacity(256);
    let mut props = ConnectProperties::new();
    props.max_packet_size = Some(MAX_INCOMING_PACKET);
    props.authentication_method = Some(auth.method.to_owned());
    props.authentication_data = Some(Bytes::from(auth.data));
    props.session_expiry_interval = session_expiry_secs;
    o.set_connect_properties(props);
    Ok(o)
}

/// Runs the event loop, forwarding its events until the first error.
fn spawn_poll(
    mut eventloop: EventLoop,
) -> (
    mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
    JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let ev = eventloop.poll().await;
            let stop = ev.is_err();
            if tx.send(ev).is_err() || stop {
                return;
            }
        }
    });
    (rx, task)
}

/// One CONNECT/CONNACK exchange for enrollment or renewal: returns the CONNACK's Authentication
/// Data and disconnects.
///
/// # Errors
/// [`NodeError::Refused`] with the CONNACK reason, [`NodeError::Unreachable`], or
/// [`NodeError::Lost`].
pub async fn exchange(
    cfg: &LinkConfig,
    client_id: &str,
    auth: ConnectAuth,
) -> Result<Option<Vec<u8>>, NodeError> {
    let (client, eventloop) = AsyncClient::new(options(cfg, client_id, auth, None)?, 16);
    let (mut rx, task) = spawn_poll(eventloop);
    let wait = cfg.connect_timeout + Duration::from_secs(1);
    let result = match tokio::time::timeout(wait, rx.recv()).await {
        Ok(Some(Ok(Event::Incoming(Packet::ConnAck(ack))))) => Ok(ack
            .properties
            .and_then(|p| p.authentication_data)
            .map(|d| d.to_vec())),
        Ok(Some(Ok(other))) => Err(NodeError::Lost(format!("unexpected {other:?}"))),
        Ok(Some(Err(e))) => Err(connection_error(&cfg.address, &e)),
        Ok(None) => Err(NodeError::Lost("event loop ended".to_owned())),
        Err(_) => Err(NodeError::Unreachable {
            address: cfg.address.clone(),
            message: "no CONNACK in time".to_owned(),
        }),
    };
    let _ = client.try_disconnect();
    // Give the DISCONNECT a moment to leave, then stop the loop.
    let _ = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
    task.abort();
    result
}

/// What a queued PUBLISH carries.
enum Queued {
    /// A group message, sealed when sent (again after a reconnection, with the then-current keys).
    Group {
        group: GroupId,
        protection: Protection,
        direction: Direction,
        payload: Zeroizing<Vec<u8>>,
    },
    /// Bytes already sealed by the application, sent as they are on `topic`.
    Raw {
        topic: String,
        payload: Bytes,
        retain: bool,
    },
}

/// A message waiting for its PUBACK.
struct Pending {
    id: u64,
    what: Queued,
    sent: bool,
}

/// A SUBSCRIBE waiting for its SUBACK: the device's, or the application's extra filters.
enum PendingSub {
    Device(Subscription),
    Extra(Vec<String>),
}

struct Conn {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
    task: JoinHandle<()>,
    connected: bool,
    /// SUBSCRIBEs handed to the client, waiting for their packet identifier.
    subs_unnumbered: VecDeque<PendingSub>,
    subs: HashMap<u16, PendingSub>,
    /// PUBLISHes handed to the client, waiting for their packet identifier.
    pubs_unnumbered: VecDeque<u64>,
    pubs: HashMap<u16, u64>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the application sees.
#[derive(Debug)]
#[non_exhaustive]
pub enum LinkEvent {
    /// Connected (again) with a certificate proof.
    Connected,
    /// A group role is usable: the key is held and, if asked, its traffic subscribed.
    Ready {
        /// The group.
        group: GroupId,
        /// The role.
        role: Role,
        /// The epoch.
        epoch: Epoch,
    },
    /// A rekey was applied.
    Rekeyed {
        /// The group.
        group: GroupId,
        /// The role.
        role: Role,
        /// The new epoch.
        epoch: Epoch,
    },
    /// A verified message.
    Message(VerifiedMessage),
    /// A PUBLISH on a topic of an extra filter ([`Link::watch`]), as received: the application
    /// verifies it (direct messages, OTA items).
    Publish {
        /// The topic it came on.
        topic: String,
        /// The payload, unverified.
        payload: Bytes,
        /// Whether the broker delivered it as a retained message.
        retained: bool,
    },
    /// The answer to the SUBSCRIBE of an extra filter, at every (re)connection.
    Watching {
        /// The filter.
        filter: String,
        /// The SUBACK reason code (below 0x80: granted).
        code: u8,
    },
    /// A PUBACK with success for the message `id`.
    Delivered {
        /// The id [`Link::publish`] returned.
        id: u64,
    },
    /// The bridge dropped the message `id`.
    Refused {
        /// The id [`Link::publish`] returned.
        id: u64,
        /// The PUBACK reason code.
        code: u8,
    },
    /// A newer member list no longer names this device in `role` (denied, revoked or expired).
    Removed {
        /// The group.
        group: GroupId,
        /// The role it lost.
        role: Role,
        /// The first epoch without it.
        epoch: Epoch,
    },
    /// The connection was lost; the link reconnects after `retry_in`.
    Disconnected {
        /// Why.
        error: NodeError,
        /// The back-off before the next attempt.
        retry_in: Duration,
    },
}

/// A device's connection to the bridge, reconnecting with fresh certificate proofs.
pub struct Link {
    device: Device,
    store: Option<KeyStore>,
    cfg: LinkConfig,
    client_id: String,
    rng: OsRng,
    conn: Option<Conn>,
    wanted: Vec<(GroupId, Role, bool)>,
    /// Extra topic filters whose PUBLISHes go to the application as they are.
    extra: Vec<String>,
    /// The session expiry interval of a persistent session; `None`: clean start.
    session_expiry_secs: Option<u32>,
    ready: BTreeSet<(GroupId, Role)>,
    /// Roles whose traffic subscription was granted on this connection.
    listened: BTreeSet<(GroupId, Role)>,
    outbox: VecDeque<Pending>,
    next_id: u64,
    events: VecDeque<LinkEvent>,
    backoff: Duration,
    reconnect_at: Option<tokio::time::Instant>,
    ever_connected: bool,
    tick: tokio::time::Interval,
}

impl core::fmt::Debug for Link {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Link")
            .field("device", &self.device)
            .field("address", &self.cfg.address)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link for `device`; group keys it adopts are saved to `store` if given.
    pub fn new(device: Device, store: Option<KeyStore>, cfg: LinkConfig) -> Self {
        let mut rng = OsRng;
        let client_id = format!("{}-{:08x}", device.id(), rng.next_u32());
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Link {
            device,
            store,
            cfg,
            client_id,
            rng,
            conn: None,
            wanted: Vec::new(),
            extra: Vec::new(),
            session_expiry_secs: None,
            ready: BTreeSet::new(),
            listened: BTreeSet::new(),
            outbox: VecDeque::new(),
            next_id: 1,
            events: VecDeque::new(),
            backoff: Duration::from_millis(500),
            reconnect_at: None,
            ever_connected: false,
            tick,
        }
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Asks to take part in `group` as `role`, receiving its traffic if `receive`; done at every
    /// (re)connection.
    pub fn want(&mut self, group: GroupId, role: Role, receive: bool) {
        self.wanted.push((group, role, receive));
    }

    /// Also subscribes to `filter` (QoS 1) at every (re)connection; PUBLISHes on topics it
    /// matches come as [`LinkEvent::Publish`], unverified, instead of going to the device, and
    /// the SUBACK as [`LinkEvent::Watching`]. Takes effect at the next connection if already
    /// connected.
    pub fn watch(&mut self, filter: impl Into<String>) {
        let filter = filter.into();
        if !self.extra.contains(&filter) {
            self.extra.push(filter.clone());
            self.subscribe_extra(vec![filter]);
        }
    }

    /// Stops watching `filter` ([`watch`](Self::watch)): UNSUBSCRIBE now if connected, and not
    /// subscribed again at the next connection.
    pub fn unwatch(&mut self, filter: &str) {
        let before = self.extra.len();
        self.extra.retain(|f| f != filter);
        if self.extra.len() == before {
            return;
        }
        if let Some(conn) = self.conn.as_mut().filter(|c| c.connected)
            && let Err(e) = conn.client.try_unsubscribe(filter.to_owned())
        {
            tracing::warn!(error = %e, filter, "unsubscribe not queued");
        }
    }

    /// Uses a persistent session: the client identifier `<device>-<name>` at every connection
    /// (the same across runs), clean start off and this session expiry interval, so that the
    /// broker keeps the subscriptions and queues QoS 1 messages while the device is away. Set it
    /// before the first [`next`](Self::next).
    pub fn persistent_session(&mut self, name: &str, expiry_secs: u32) {
        self.client_id = format!("{}-{name}", self.device.id());
        self.session_expiry_secs = Some(expiry_secs.max(1));
    }

    /// The client identifier of the connections.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Whether `group` is usable in `role`.
    pub fn is_ready(&self, group: &GroupId, role: Role) -> bool {
        self.ready.contains(&(group.clone(), role))
    }

    /// Queues a message; it is sealed and sent once the sending role's key is held, and sent
    /// again (sealed anew) after a reconnection until a PUBACK arrives. Returns its id.
    pub fn publish(
        &mut self,
        group: GroupId,
        protection: Protection,
        direction: Direction,
        payload: Zeroizing<Vec<u8>>,
    ) -> u64 {
        self.enqueue(Queued::Group {
            group,
            protection,
            direction,
            payload,
        })
    }

    /// Queues bytes the application sealed (a direct message, an OTA item) for `topic`, QoS 1,
    /// retained if `retain`; sent as soon as connected, again unchanged after a reconnection
    /// until a PUBACK arrives ([`LinkEvent::Delivered`] or [`LinkEvent::Refused`]). Returns its
    /// id.
    pub fn publish_raw(&mut self, topic: String, payload: impl Into<Bytes>, retain: bool) -> u64 {
        self.enqueue(Queued::Raw {
            topic,
            payload: payload.into(),
            retain,
        })
    }

    /// Whether the link is connected now.
    pub fn is_connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.connected)
    }

    fn enqueue(&mut self, what: Queued) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.outbox.push_back(Pending {
            id,
            what,
            sent: false,
        });
        self.flush_outbox();
        id
    }

    /// Messages not yet acknowledged.
    pub fn unacknowledged(&self) -> usize {
        self.outbox.len()
    }

    /// Sends a DISCONNECT and stops.
    pub async fn disconnect(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            let _ = conn.client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(300), conn.events.recv()).await;
        }
        self.conn = None;
    }

    /// The next event. Reconnects after transient failures (reporting them as
    /// [`LinkEvent::Disconnected`]).
    ///
    /// # Errors
    /// Failures that need an operator: a refused CONNACK other than "CA unavailable", a refused
    /// group join, a clock or certificate problem. The first connection also fails on an
    /// unreachable bridge.
    pub async fn next(&mut self) -> Result<LinkEvent, NodeError> {
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Ok(ev);
            }
            if self.conn.is_none() {
                // Cancel-safe: an interrupted wait resumes towards the same instant.
                if let Some(at) = self.reconnect_at {
                    tokio::time::sleep_until(at).await;
                    self.reconnect_at = None;
                }
                self.start_connection()?;
            }
            let Some(conn) = self.conn.as_mut() else {
                continue;
            };
            let received = tokio::select! {
                ev = conn.events.recv() => Some(ev),
                _ = self.tick.tick() => None,
            };
            match received {
                None => {
                    let outs = self.device.tick(now_ms(), &mut self.rng);
                    self.handle_outputs(outs)?;
                    self.flush_outbox();
                }
                Some(Some(Ok(ev))) => self.handle_event(ev)?,
                Some(Some(Err(e))) => {
                    self.connection_lost(connection_error(&self.cfg.address, &e))?;
                }
                Some(None) => {
                    self.connection_lost(NodeError::Lost("event loop ended".to_owned()))?;
                }
            }
        }
    }

    fn start_connection(&mut self) -> Result<(), NodeError> {
        let now = now_ms();
        check_clock(self.device.credentials(), now)?;
        let auth = cert_connect_auth(
            self.device.credentials(),
            &self.client_id,
            now,
            &mut self.rng,
        )
        .map_err(|e| NodeError::Protocol(e.to_string()))?;
        let (client, eventloop) = AsyncClient::new(
            options(&self.cfg, &self.client_id, auth, self.session_expiry_secs)?,
            256,
        );
        let (events, task) = spawn_poll(eventloop);
        tracing::debug!(address = %self.cfg.address, client_id = %self.client_id, "connecting");
        self.conn = Some(Conn {
            client,
            events,
            task,
            connected: false,
            subs_unnumbered: VecDeque::new(),
            subs: HashMap::new(),
            pubs_unnumbered: VecDeque::new(),
            pubs: HashMap::new(),
        });
        Ok(())
    }

    fn connection_lost(&mut self, error: NodeError) -> Result<(), NodeError> {
        let was_connected = self.conn.as_ref().is_some_and(|c| c.connected);
        self.conn = None;
        self.ready.clear();
        self.listened.clear();
        for p in &mut self.outbox {
            p.sent = false;
        }
        if !error.is_transient() || !(self.ever_connected || self.cfg.persistent) {
            return Err(error);
        }
        if was_connected {
            self.backoff = Duration::from_millis(500);
        }
        let jitter = Duration::from_millis(u64::from(self.rng.next_u32() % 250));
        let retry_in = self.backoff + jitter;
        self.backoff = (self.backoff * 2).min(self.cfg.reconnect_max);
        tracing::debug!(error = %error, "connection lost");
        self.events
            .push_back(LinkEvent::Disconnected { error, retry_in });
        self.reconnect_at = Some(tokio::time::Instant::now() + retry_in);
        Ok(())
    }

    fn handle_event(&mut self, ev: Event) -> Result<(), NodeError> {
        match ev {
            Event::Incoming(Packet::ConnAck(_)) => {
                if let Some(conn) = self.conn.as_mut() {
                    conn.connected = true;
                }
                self.ever_connected = true;
                tracing::info!(address = %self.cfg.address, "connected");
                self.events.push_back(LinkEvent::Connected);
                self.join_all()?;
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                let Some(pending) = self.conn.as_mut().and_then(|c| c.subs.remove(&ack.pkid))
                else {
                    return Ok(());
                };
                let codes: Vec<u8> = ack.return_codes.iter().map(suback_code).collect();
                let sub = match pending {
                    PendingSub::Device(sub) => sub,
                    PendingSub::Extra(filters) => {
                        for (filter, code) in filters.into_iter().zip(codes) {
                            if code >= 0x80 {
                                tracing::warn!(filter = %filter, code, "subscription refused");
                            } else {
                                tracing::debug!(filter = %filter, code, "subscribed");
                            }
                            self.events.push_back(LinkEvent::Watching { filter, code });
                        }
                        return Ok(());
                    }
                };
                let gk = ack.properties.as_ref().and_then(|p| {
                    p.user_properties
                        .iter()
                        .find(|(k, _)| k == GK_PROPERTY)
                        .map(|(_, v)| v.clone())
                });
                let outs = self.device.on_suback(
                    &sub.purpose,
                    &codes,
                    gk.as_deref(),
                    now_ms(),
                    &mut self.rng,
                )?;
                self.after_suback(&sub.purpose, &codes);
                self.handle_outputs(outs)?;
            }
            Event::Incoming(Packet::Publish(p)) => {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                if self.extra.iter().any(|f| filter_matches(f, &topic)) {
                    self.events.push_back(LinkEvent::Publish {
                        topic,
                        payload: p.payload,
                        retained: p.retain,
                    });
                    return Ok(());
                }
                let outs = self
                    .device
                    .on_publish(&topic, &p.payload, now_ms(), &mut self.rng);
                self.handle_outputs(outs)?;
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let Some(id) = self.conn.as_mut().and_then(|c| c.pubs.remove(&ack.pkid)) else {
                    return Ok(());
                };
                self.outbox.retain(|p| p.id != id);
                self.flush_outbox();
                let code = puback_code(&ack.reason);
                if code < 0x80 {
                    self.events.push_back(LinkEvent::Delivered { id });
                } else {
                    tracing::warn!(id, code, "the bridge dropped a message");
                    self.events.push_back(LinkEvent::Refused { id, code });
                }
            }
            Event::Outgoing(Outgoing::Subscribe(pkid)) => {
                if let Some(conn) = self.conn.as_mut()
                    && let Some(sub) = conn.subs_unnumbered.pop_front()
                {
                    conn.subs.insert(pkid, sub);
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(conn) = self.conn.as_mut()
                    && let Some(id) = conn.pubs_unnumbered.pop_front()
                {
                    conn.pubs.insert(pkid, id);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// After a SUBACK: records a granted traffic subscription, then updates readiness.
    fn after_suback(&mut self, purpose: &Purpose, codes: &[u8]) {
        if let Purpose::Listen { group, role } = purpose
            && codes.first().is_some_and(|c| *c < 0x80)
        {
            self.listened.insert((group.clone(), *role));
        }
        self.update_ready();
    }

    /// A role is ready once its key is held and current (after a resumption: confirmed by the
    /// member list or renewed from a notice) and, if it receives, its traffic is subscribed.
    fn update_ready(&mut self) {
        // Readiness is per connection: a key held from before is resumed first.
        if !self.conn.as_ref().is_some_and(|c| c.connected) {
            return;
        }
        for (group, role, receive) in &self.wanted {
            let key = (group.clone(), *role);
            if self.ready.contains(&key)
                || !self.device.is_current(group, *role)
                || (*receive && !self.listened.contains(&key))
            {
                continue;
            }
            let Some(ring) = self.device.keyring(group, *role) else {
                continue;
            };
            let epoch = ring.epoch();
            self.ready.insert(key);
            self.events.push_back(LinkEvent::Ready {
                group: group.clone(),
                role: *role,
                epoch,
            });
        }
        self.flush_outbox();
    }

    /// Takes part in every wanted role: resumed without a group-key request where a key is held
    /// (PROTOCOL.md §4 "Resumption"), joined otherwise.
    fn join_all(&mut self) -> Result<(), NodeError> {
        let now = now_ms();
        let mut subs = Vec::new();
        for (g, r, receive) in self.wanted.clone() {
            subs.push(self.device.resume(&g, r, receive, now, &mut self.rng)?);
        }
        for s in subs {
            self.subscribe(s);
        }
        self.subscribe_extra(self.extra.clone());
        Ok(())
    }

    /// One SUBSCRIBE for extra filters, if connected.
    fn subscribe_extra(&mut self, filters: Vec<String>) {
        let Some(conn) = self.conn.as_mut().filter(|c| c.connected) else {
            return;
        };
        if filters.is_empty() {
            return;
        }
        let list: Vec<Filter> = filters
            .iter()
            .map(|f| Filter::new(f.clone(), QoS::AtLeastOnce))
            .collect();
        tracing::debug!(filters = ?filters, "subscribing");
        match conn.client.try_subscribe_many(list) {
            Ok(()) => conn.subs_unnumbered.push_back(PendingSub::Extra(filters)),
            Err(e) => tracing::warn!(error = %e, "subscription not queued"),
        }
    }

    fn subscribe(&mut self, sub: Subscription) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let filters: Vec<Filter> = sub
            .filters
            .iter()
            .map(|f| Filter::new(f.clone(), QoS::AtLeastOnce))
            .collect();
        let props = SubscribeProperties {
            id: None,
            user_properties: sub
                .group_key_request
                .iter()
                .map(|v| (GK_PROPERTY.to_owned(), v.clone()))
                .collect(),
        };
        tracing::debug!(filters = ?sub.filters, "subscribing");
        match conn
            .client
            .try_subscribe_many_with_properties(filters, props)
        {
            Ok(()) => conn.subs_unnumbered.push_back(PendingSub::Device(sub)),
            Err(e) => tracing::warn!(error = %e, "subscription not queued"),
        }
    }

    fn handle_outputs(&mut self, outs: Vec<Output>) -> Result<(), NodeError> {
        for o in outs {
            match o {
                Output::Subscribe(s) => self.subscribe(s),
                Output::Message(m) => self.events.push_back(LinkEvent::Message(m)),
                Output::KeyAdopted {
                    group,
                    role,
                    epoch,
                    source,
                } => {
                    tracing::info!(group = %group, ?role, epoch = epoch.0, ?source, "group key adopted");
                    self.save_key(&group, role);
                    if source == KeySource::Notice {
                        self.events
                            .push_back(LinkEvent::Rekeyed { group, role, epoch });
                    }
                    self.flush_outbox();
                }
                Output::MembersUpdated {
                    group,
                    epoch,
                    members,
                } => {
                    tracing::debug!(group = %group, epoch = epoch.0, members, "member list");
                }
                Output::Removed { group, role, epoch } => {
                    tracing::warn!(group = %group, ?role, epoch = epoch.0, "removed from the group");
                    self.events
                        .push_back(LinkEvent::Removed { group, role, epoch });
                }
                Output::KeyRequestDeferred { group, role, code } => {
                    tracing::warn!(group = %group, ?role, code, "the CA is unavailable; using the stored key");
                }
                Output::Resumed { group, role, epoch } => {
                    tracing::info!(group = %group, ?role, epoch = epoch.0, "resumed with the held key, without a group-key request");
                }
                Output::MissedEpoch(missed) => {
                    tracing::warn!(group = %missed.group, role = ?missed.role, "{missed}");
                    // Nothing is sealed with the old key until the new join is answered.
                    self.ready.remove(&(missed.group.clone(), missed.role));
                }
                Output::ResumeFailed {
                    group,
                    role,
                    reason,
                } => match reason {
                    ResumeFailure::Refused { .. } => {
                        tracing::warn!(group = %group, ?role, "{reason}");
                    }
                    _ => tracing::info!(group = %group, ?role, "{reason}"),
                },
                Output::SubscriptionRefused { filter, code } => {
                    tracing::warn!(filter = %filter, code, "subscription refused");
                }
                // A QoS 1 redelivery is a replay by design: not worth a warning.
                Output::Dropped {
                    topic,
                    reason: reason @ DropReason::Message(Rejection::Replayed),
                } => {
                    tracing::debug!(topic = %topic, reason = %reason, "dropped");
                }
                Output::Dropped { topic, reason } => {
                    tracing::warn!(topic = %topic, reason = %reason, "dropped");
                }
            }
        }
        self.update_ready();
        Ok(())
    }

    fn save_key(&self, group: &GroupId, role: Role) {
        let Some(store) = &self.store else {
            return;
        };
        if let Some(k) = self
            .device
            .stored_keys()
            .into_iter()
            .find(|k| &k.group == group && k.role == role)
            && let Err(e) = store.save_group_key(&k, now_ms())
        {
            tracing::warn!(error = %e, "cannot save the group key");
        }
    }

    /// Seals and hands to the client every unsent message whose group is ready.
    fn flush_outbox(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if !conn.connected {
            return;
        }
        let now = now_ms();
        for p in self.outbox.iter_mut().filter(|p| !p.sent) {
            let (topic, bytes, retain) = match &p.what {
                Queued::Raw {
                    topic,
                    payload,
                    retain,
                } => (topic.clone(), payload.clone(), *retain),
                Queued::Group {
                    group,
                    protection,
                    direction,
                    payload,
                } => {
                    if !self
                        .ready
                        .contains(&(group.clone(), direction.sender_role()))
                    {
                        continue;
                    }
                    match self.device.seal(
                        group,
                        *protection,
                        *direction,
                        payload,
                        now,
                        &mut self.rng,
                    ) {
                        Ok((topic, bytes)) => (topic, Bytes::from(bytes), false),
                        Err(e) => {
                            tracing::warn!(error = %e, id = p.id, "cannot seal");
                            continue;
                        }
                    }
                }
            };
            match conn
                .client
                .try_publish(topic, QoS::AtLeastOnce, retain, bytes)
            {
                Ok(()) => {
                    p.sent = true;
                    conn.pubs_unnumbered.push_back(p.id);
                }
                // The request channel is full: try again on the next event.
                Err(_) => break,
            }
        }
    }
}

/// Whether the MQTT topic filter `filter` matches the topic name `topic` (MQTT 5 §4.7); topics
/// starting with `$` match no filter starting with a wildcard.
fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(parse_address(":1883").is_err());
        assert!(parse_address("host:0").is_err());
        assert!(parse_address("host:x").is_err());
        assert_eq!(parse_address("pi.local:1884").unwrap().1, 1884);
    }

    #[test]
    fn extra_filters_match_like_mqtt() {
        assert!(filter_matches("quva/d/dev-1", "quva/d/dev-1"));
        assert!(!filter_matches("quva/d/dev-1", "quva/d/dev-10"));
        assert!(!filter_matches("quva/d/dev-1", "quva/d/dev-1/x"));
        let ota = "fw/a/_ota/rel-1/#";
        assert!(filter_matches(ota, "fw/a/_ota/rel-1/7/m"));
        assert!(filter_matches(ota, "fw/a/_ota/rel-1/7/c/12"));
        assert!(filter_matches(ota, "fw/a/_ota/rel-1"));
        assert!(!filter_matches(ota, "fw/a/_ota/rel-2/7/m"));
        assert!(!filter_matches(ota, "fw/a"));
        assert!(filter_matches("fw/+/_q", "fw/a/_q"));
        assert!(!filter_matches("+/x", "$SYS/x"));
    }

    #[test]
    fn reason_codes() {
        assert_eq!(connack_code(ConnectReturnCode::NotAuthorized), 0x87);
        assert_eq!(connack_code(ConnectReturnCode::ServerUnavailable), 0x88);
        assert_eq!(
            connack_code(ConnectReturnCode::BadAuthenticationMethod),
            0x8C
        );
        assert_eq!(
            suback_code(&SubscribeReasonCode::Success(QoS::AtLeastOnce)),
            1
        );
        assert_eq!(suback_code(&SubscribeReasonCode::NotAuthorized), 0x87);
        assert_eq!(puback_code(&PubAckReason::PayloadFormatInvalid), 0x99);
    }
}
