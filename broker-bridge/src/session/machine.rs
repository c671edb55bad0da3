//! The sans-IO core of one device connection once it is accepted: a state machine that takes
//! events (a packet from the device or the broker, the answer to work it asked for, a tick, a
//! kick) and returns actions (a packet to the device or upstream, work for the CA or the publish
//! checker, a metric, the end of the connection). It never touches a socket, a clock or a lock;
//! the driver in [`crate::session`] moves the bytes and runs the work.
//!
//! It decides in MQTT 5 packets. An MQTT 3.1.1 connection uses the same machine: its packets are
//! translated to and from MQTT 5 ([`crate::dialect`]), and where MQTT 3.1.1 cannot say what MQTT 5
//! says, the machine follows the [`Dialect`]: a PUBLISH the bridge refuses ends the connection
//! (MQTT 3.1.1 has no negative PUBACK, §3.3.5), and a SUBSCRIBE with a misplaced wildcard gets the
//! failure 0x80 for that filter instead of ending the connection.
//!
//! Ordering rules it keeps:
//! - PUBLISHes are checked in batches (whatever the device sent at once, up to `max_batch`), and
//!   relayed or dropped in the order they came; a packet after a batch waits for its verdicts.
//! - The bridge's own PUBACK/PUBREC for a dropped PUBLISH waits behind the acknowledgements still
//!   pending upstream ([`AckQueue`]), so the device sees its acknowledgements in order (MQTT 5
//!   §4.6).
//! - While work is outstanding the device is not read (the driver asks
//!   [`Session::wants_device_input`]); the broker always is.
//! - An end the bridge decides is an abnormal end upstream (DISCONNECT 0x04), so the broker
//!   publishes the client's Will as it would without the bridge; a device's own DISCONNECT is
//!   relayed as it is.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU16;

use bytes::Bytes;
use bytestring::ByteString;
use quva_client::group::{GK_PROPERTY, GroupKeyRequest};
use quva_client::ids::{GroupId, Role};
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v5::{self, DisconnectReasonCode, PublishAck};

use super::rules::{self, AckEvent, AckQueue, Aliases, FilterPlan, PendingSub, Target};
use crate::dialect::Dialect;
use crate::frames::Upstream;
use crate::identity::Identity;
use crate::reasons::SubscribeRefusal;
use crate::topics::TopicPolicy;
use crate::verify::{Addressed, Dropped, Protected, Verdict};

/// The limits a session applies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// PUBLISHes checked together at most.
    pub(crate) max_batch: usize,
    /// Silence from the device after which the connection ends (1.5 × keep-alive, or the idle
    /// timeout); `None` for never.
    pub(crate) idle_ms: Option<u64>,
}

/// Something for the driver to do.
#[derive(Debug)]
pub(crate) enum Action {
    /// Write to the device.
    Device(Out),
    /// Write to the broker.
    Upstream(v5::Packet),
    /// Run this work and hand its answer to [`Session::answered`].
    Work(Work),
    /// Count (and, for drops and refusals, log) this.
    Note(Note),
    /// End the connection: tell each side what the [`Ending`] says, then close both.
    Close(Ending),
}

/// Bytes for the device.
#[derive(Debug)]
pub(crate) enum Out {
    /// A packet to encode.
    Packet(v5::Packet),
    /// A delivery from the broker, as the broker's bytes ([`crate::frames`]).
    Raw(Bytes),
}

/// Work the session waits for; one at a time.
#[derive(Debug)]
pub(crate) enum Work {
    /// Check these protected PUBLISHes (PROTOCOL.md §6), fetching their groups first; answer
    /// [`Answer::Checked`] with one verdict per item, in order.
    Check(Vec<Protected>),
    /// Decide these subscription filters with the CA; answer [`Answer::Authorized`], one result
    /// per ask, in order.
    Authorize(Vec<Ask>),
}

/// One subscription decision that needs the CA.
#[derive(Debug)]
pub(crate) enum Ask {
    /// Is the connection a current member of the group in the role (resumption, §4)? Fetch the
    /// group first.
    Member(GroupId, Role),
    /// Run the `quva-gk` join (§4); the request is the connection's own, for this group and
    /// role.
    Join(GroupKeyRequest),
}

/// The answer to a [`Work`].
#[derive(Debug)]
pub(crate) enum Answer {
    /// One verdict per [`Work::Check`] item.
    Checked(Vec<Verdict>),
    /// Per [`Ask`]: `Ok(None)` granted, `Ok(Some(v))` granted with the `quva-gk` value `v` for
    /// the SUBACK, `Err(reason)` refused with this SUBACK reason.
    Authorized(Vec<Result<Option<String>, SubscribeRefusal>>),
}

/// What happened, for metrics and logs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Note {
    /// A protected PUBLISH passed every check.
    Accepted,
    /// A PUBLISH was dropped.
    Dropped { topic: ByteString, drop: Dropped },
    /// A subscription filter was refused with this SUBACK reason.
    FilterRefused {
        filter: ByteString,
        reason: SubscribeRefusal,
    },
    /// The connection is ended for this reason (metric label).
    Refused(&'static str),
}

/// How a connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ending {
    /// The DISCONNECT reason for the device, if it is still there to hear it.
    pub(crate) device: Option<DisconnectReasonCode>,
    /// The DISCONNECT reason for the broker, if one is sent (the device's own DISCONNECT has
    /// already been relayed as an [`Action::Upstream`]).
    pub(crate) upstream: Option<DisconnectReasonCode>,
}

impl Ending {
    /// Both sockets just close: the device went away (to the broker that is an abnormal end, so
    /// a Will is published), or the device's DISCONNECT was relayed.
    const QUIET: Ending = Ending {
        device: None,
        upstream: None,
    };

    /// The bridge ends the connection: the device hears why; the broker sees an abnormal end.
    const fn bridge(reason: DisconnectReasonCode) -> Ending {
        Ending {
            device: Some(reason),
            upstream: Some(DisconnectReasonCode::DisconnectWithWillMessage),
        }
    }
}

/// Why reading from the device failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeviceFailure {
    /// The socket failed or closed.
    Gone,
    /// A packet over the maximum packet size.
    Oversize,
    /// Bytes that are not MQTT 5 (or a packet a client may not send).
    Malformed,
}

/// Why reading from the broker stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UpstreamFailure {
    /// The broker closed the connection.
    Closed,
    /// The broker sent bytes the bridge cannot decode.
    Malformed,
}

/// A PUBLISH waiting in a batch.
#[derive(Debug)]
struct Candidate {
    publish: Box<Publish>,
    target: Target,
}

/// What the outstanding work is for.
#[derive(Debug)]
enum Waiting {
    /// The verdicts of a batch: the batch, with the verdicts known without the checker.
    Check(Vec<Candidate>, Vec<Option<Verdict>>),
    /// The decisions of a SUBSCRIBE's filters that need the CA.
    Subscribe(SubscribeInProgress),
}

/// A SUBSCRIBE whose filters are being decided.
#[derive(Debug)]
struct SubscribeInProgress {
    subscribe: v5::Subscribe,
    /// Per filter: decided (`Some`) or waiting for the next answer (`None`).
    decided: Vec<Option<Result<Option<String>, SubscribeRefusal>>>,
}

/// One connection's relay state (module docs).
#[derive(Debug)]
pub(crate) struct Session<'p> {
    policy: &'p TopicPolicy,
    identity: Identity,
    dialect: Dialect,
    limits: Limits,
    aliases: Aliases,
    acks: AckQueue,
    subs: HashMap<NonZeroU16, PendingSub>,
    batch: Vec<Candidate>,
    waiting: Option<Waiting>,
    /// A device packet that came after a batch and waits for its verdicts.
    stash: Option<v5::Packet>,
    /// An end decided by device input while a batch was still to be checked.
    deferred: Option<Ending>,
    last_input_ms: u64,
    actions: VecDeque<Action>,
    ended: bool,
}

impl<'p> Session<'p> {
    /// A session for an accepted connection of `identity` speaking `dialect`, at `now_ms`.
    pub(crate) fn new(
        policy: &'p TopicPolicy,
        identity: Identity,
        dialect: Dialect,
        limits: Limits,
        now_ms: u64,
    ) -> Self {
        Session {
            policy,
            identity,
            dialect,
            limits,
            aliases: Aliases::default(),
            acks: AckQueue::default(),
            subs: HashMap::new(),
            batch: Vec::new(),
            waiting: None,
            stash: None,
            deferred: None,
            last_input_ms: now_ms,
            actions: VecDeque::new(),
            ended: false,
        }
    }

    /// The next action to carry out, in order.
    pub(crate) fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether the driver should read the next device packet now.
    pub(crate) fn wants_device_input(&self) -> bool {
        !self.ended && self.waiting.is_none() && self.stash.is_none() && self.deferred.is_none()
    }

    /// Whether the connection has ended (after [`Action::Close`]).
    pub(crate) fn is_ended(&self) -> bool {
        self.ended
    }

    /// When [`Session::tick`] should next run, if ever.
    pub(crate) fn deadline_ms(&self) -> Option<u64> {
        let idle = self.limits.idle_ms?;
        (!self.ended).then(|| self.last_input_ms.saturating_add(idle))
    }

    // ---------------------------------------------------------------------------------------
    // Events from the device.
    // ---------------------------------------------------------------------------------------

    /// A packet from the device. Call [`Session::input_drained`] when no more device input is
    /// ready at once, so that the batch gathered so far is checked.
    pub(crate) fn device_packet(&mut self, packet: v5::Packet, now_ms: u64) {
        if self.ended {
            return;
        }
        self.last_input_ms = now_ms;
        if let v5::Packet::Publish(p) = packet {
            self.gather(p);
        } else if !self.batch.is_empty() {
            self.stash = Some(packet);
            self.submit_batch();
        } else {
            self.handle(packet);
        }
    }

    /// The device's input failed or ended.
    pub(crate) fn device_failed(&mut self, failure: DeviceFailure) {
        let ending = match failure {
            DeviceFailure::Gone => Ending::QUIET,
            DeviceFailure::Oversize => {
                self.note(Note::Refused("oversize"));
                Ending::bridge(DisconnectReasonCode::PacketTooLarge)
            }
            DeviceFailure::Malformed => {
                self.note(Note::Refused("malformed"));
                Ending::bridge(DisconnectReasonCode::MalformedPacket)
            }
        };
        self.end_after_batch(ending);
    }

    /// No more device input is ready at once: check what was gathered.
    pub(crate) fn input_drained(&mut self) {
        self.submit_batch();
    }

    /// Whether the batch being gathered is full (the driver stops draining input).
    pub(crate) fn batch_full(&self) -> bool {
        self.batch.len() >= self.limits.max_batch
    }

    fn gather(&mut self, mut p: Box<Publish>) {
        if let Err(code) = self.aliases.resolve(&mut p) {
            self.end_after_batch(Ending::bridge(code));
            return;
        }
        let target = rules::target(self.policy, &p);
        self.batch.push(Candidate { publish: p, target });
        if self.batch_full() {
            self.submit_batch();
        }
    }

    /// Handles a device packet other than PUBLISH, with no batch pending.
    fn handle(&mut self, packet: v5::Packet) {
        match packet {
            // A misplaced wildcard is a malformed packet, as at the broker (MQTT 5 §4.7.1); an
            // MQTT 3.1.1 client gets the failure 0x80 for that filter ([`rules::plan_filter`]).
            v5::Packet::Subscribe(s)
                if self.dialect == Dialect::Mqtt5 && rules::has_malformed_filter(&s) =>
            {
                self.note(Note::Refused("malformed"));
                self.end(Ending::bridge(DisconnectReasonCode::MalformedPacket));
            }
            v5::Packet::Subscribe(s) => self.subscribe(s),
            v5::Packet::Disconnect(d) => {
                self.push(Action::Upstream(v5::Packet::Disconnect(d)));
                self.end(Ending::QUIET);
            }
            p @ (v5::Packet::PublishAck(_)
            | v5::Packet::PublishReceived(_)
            | v5::Packet::PublishRelease(_)
            | v5::Packet::PublishComplete(_)
            | v5::Packet::Unsubscribe(_)
            | v5::Packet::PingRequest) => self.push(Action::Upstream(p)),
            // AUTH (no re-authentication), a second CONNECT, or a server's packet.
            _ => {
                self.note(Note::Refused("protocol"));
                self.end(Ending::bridge(DisconnectReasonCode::ProtocolError));
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // PUBLISH batches.
    // ---------------------------------------------------------------------------------------

    /// Decides what can be decided without the checker; asks for the rest.
    fn submit_batch(&mut self) {
        if self.batch.is_empty() || self.waiting.is_some() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let authenticated = self.identity.is_authenticated();
        let mut verdicts = Vec::with_capacity(batch.len());
        let mut protected = Vec::new();
        for (index, c) in batch.iter().enumerate() {
            verdicts.push(match &c.target {
                Target::Unprotected => Some(Verdict::Relay),
                Target::Reserved => Some(Verdict::Drop(Dropped::not_authorized("reserved_topic"))),
                Target::Retained => Some(Verdict::Drop(Dropped::not_authorized("retained"))),
                Target::BadOta => Some(Verdict::Drop(Dropped::not_authorized("ota_topic"))),
                // No CA lookup and no check on behalf of an unauthenticated connection.
                Target::Group(..) | Target::Direct(_) | Target::Ota(_) if !authenticated => {
                    Some(Verdict::Drop(Dropped::not_authorized("unauthenticated")))
                }
                Target::Group(group, direction) => {
                    protected.push(Protected {
                        index,
                        payload: c.publish.payload.clone(),
                        to: Addressed::Group(group.clone(), *direction),
                    });
                    None
                }
                // Direct messages come from devices only (PROTOCOL.md §7.1).
                Target::Direct(_) if self.identity.device().is_none() => {
                    Some(Verdict::Drop(Dropped::not_authorized("not_authorized")))
                }
                Target::Direct(recipient) => {
                    protected.push(Protected {
                        index,
                        payload: c.publish.payload.clone(),
                        to: Addressed::Direct(recipient.clone()),
                    });
                    None
                }
                // Under `<group>/_ota/<S>/` only S's device connections publish (PROTOCOL.md
                // §7.2): not another device, not a group-level connection.
                Target::Ota(topic) if self.identity.device() != Some(&topic.signer) => {
                    Some(Verdict::Drop(Dropped::not_authorized("ota_not_signer")))
                }
                Target::Ota(topic) => {
                    protected.push(Protected {
                        index,
                        payload: c.publish.payload.clone(),
                        to: Addressed::Ota(topic.clone()),
                    });
                    None
                }
            });
        }
        if protected.is_empty() {
            self.apply_verdicts(batch, verdicts);
            self.after_work();
        } else {
            self.waiting = Some(Waiting::Check(batch, verdicts));
            self.push(Action::Work(Work::Check(protected)));
        }
    }

    fn apply_verdicts(&mut self, batch: Vec<Candidate>, verdicts: Vec<Option<Verdict>>) {
        for (c, verdict) in batch.into_iter().zip(verdicts) {
            match verdict.unwrap_or(Verdict::Drop(Dropped::not_authorized("not_authorized"))) {
                Verdict::Relay => self.forward_publish(c.publish),
                Verdict::Accept => {
                    self.note(Note::Accepted);
                    self.forward_publish(c.publish);
                }
                Verdict::Drop(drop) => self.drop_publish(&c.publish, drop),
            }
        }
    }

    fn forward_publish(&mut self, publish: Box<Publish>) {
        if let Some(id) = publish.packet_id {
            self.ack(AckEvent::Expect(id));
        }
        self.push(Action::Upstream(v5::Packet::Publish(publish)));
    }

    fn drop_publish(&mut self, publish: &Publish, drop: Dropped) {
        self.note(Note::Dropped {
            topic: publish.topic.clone(),
            drop,
        });
        if self.dialect == Dialect::Mqtt311 {
            // MQTT 3.1.1 cannot refuse a PUBLISH (§3.3.5): the connection ends, unacknowledged.
            self.end(Ending::bridge(DisconnectReasonCode::NotAuthorized));
            return;
        }
        let Some(id) = publish.packet_id else {
            return;
        };
        let ack = PublishAck {
            packet_id: id,
            reason_code: drop.reason.v5(),
            properties: Vec::new(),
            reason_string: None,
        };
        let p = match publish.qos {
            QoS::ExactlyOnce => v5::Packet::PublishReceived(ack),
            _ => v5::Packet::PublishAck(ack),
        };
        self.ack(AckEvent::OwnAck(id, p));
    }

    // ---------------------------------------------------------------------------------------
    // SUBSCRIBE.
    // ---------------------------------------------------------------------------------------

    fn subscribe(&mut self, mut s: v5::Subscribe) {
        let gk_request = s
            .user_properties
            .iter()
            .find(|(k, _)| k == GK_PROPERTY)
            .map(|(_, v)| v.to_string());
        s.user_properties.retain(|(k, _)| k != GK_PROPERTY);
        let mut gk_unused = gk_request.is_some();
        let mut decided = Vec::with_capacity(s.topic_filters.len());
        let mut asks = Vec::new();
        for (filter, _) in &s.topic_filters {
            match rules::plan_filter(self.policy, &self.identity, filter, gk_unused) {
                FilterPlan::Relay => decided.push(Some(Ok(None))),
                FilterPlan::Refuse(reason) => decided.push(Some(Err(reason))),
                FilterPlan::IfMember(g, role) => {
                    decided.push(None);
                    asks.push(Ask::Member(g, role));
                }
                FilterPlan::Join(g, role) => {
                    // One `quva-gk` request per SUBSCRIBE, for its first key topic.
                    gk_unused = false;
                    let text = gk_request.as_deref().unwrap_or_default();
                    match self.own_request(text, &g, role) {
                        Some(req) => {
                            decided.push(None);
                            asks.push(Ask::Join(req));
                        }
                        None => decided.push(Some(Err(SubscribeRefusal::NotAuthorized))),
                    }
                }
            }
        }
        let progress = SubscribeInProgress {
            subscribe: s,
            decided,
        };
        if asks.is_empty() {
            self.finish_subscribe(progress, Vec::new());
        } else {
            self.waiting = Some(Waiting::Subscribe(progress));
            self.push(Action::Work(Work::Authorize(asks)));
        }
    }

    /// The `quva-gk` request, if it is this device's, for this group and role.
    fn own_request(&self, text: &str, group: &GroupId, role: Role) -> Option<GroupKeyRequest> {
        let id = self.identity.device()?;
        let req = GroupKeyRequest::from_property(text).ok()?;
        (req.id() == id && req.group() == group && req.role() == role).then_some(req)
    }

    fn finish_subscribe(
        &mut self,
        progress: SubscribeInProgress,
        answers: Vec<Result<Option<String>, SubscribeRefusal>>,
    ) {
        let SubscribeInProgress {
            subscribe: mut s,
            decided,
        } = progress;
        let mut answers = answers.into_iter();
        let mut slots = Vec::with_capacity(decided.len());
        let mut forwarded = Vec::new();
        let mut gk = None;
        let mut reason = None;
        let filters = std::mem::take(&mut s.topic_filters);
        for (i, ((filter, opts), decision)) in filters.into_iter().zip(decided).enumerate() {
            let decision = decision
                .unwrap_or_else(|| answers.next().unwrap_or(Err(SubscribeRefusal::Unspecified)));
            match decision {
                Ok(delivery) => {
                    if let Some(d) = delivery {
                        gk = Some((i, d));
                    }
                    slots.push(None);
                    forwarded.push((filter, opts));
                }
                Err(refusal) => {
                    reason = reason.or_else(|| rules::refusal_reason(self.policy, &filter));
                    self.note(Note::FilterRefused {
                        filter,
                        reason: refusal,
                    });
                    slots.push(Some(refusal.v5()));
                }
            }
        }
        if forwarded.is_empty() {
            let ack = v5::SubscribeAck {
                packet_id: s.packet_id,
                properties: Vec::new(),
                reason_string: reason.map(ByteString::from_static),
                status: slots.into_iter().flatten().collect(),
            };
            self.push(Action::Device(Out::Packet(v5::Packet::SubscribeAck(ack))));
        } else {
            self.subs
                .insert(s.packet_id, PendingSub { slots, gk, reason });
            s.topic_filters = forwarded;
            self.push(Action::Upstream(v5::Packet::Subscribe(s)));
        }
    }

    // ---------------------------------------------------------------------------------------
    // Work answers, the broker, time and the outside.
    // ---------------------------------------------------------------------------------------

    /// The answer to the outstanding [`Work`], at `now_ms`. An answer that does not fit (none is
    /// outstanding, or the wrong kind) ends the connection: it is a bug in the driver, and
    /// guessing would relay unchecked traffic.
    pub(crate) fn answered(&mut self, answer: Answer, now_ms: u64) {
        if self.ended {
            return;
        }
        // The device was not read while waiting: that silence is not idleness.
        self.last_input_ms = now_ms;
        match (self.waiting.take(), answer) {
            (Some(Waiting::Check(batch, mut verdicts)), Answer::Checked(checked)) => {
                let mut checked = checked.into_iter();
                for slot in verdicts.iter_mut().filter(|v| v.is_none()) {
                    *slot = checked.next();
                }
                self.apply_verdicts(batch, verdicts);
            }
            (Some(Waiting::Subscribe(progress)), Answer::Authorized(answers)) => {
                self.finish_subscribe(progress, answers);
            }
            _ => {
                self.end(Ending::bridge(
                    DisconnectReasonCode::ImplementationSpecificError,
                ));
                return;
            }
        }
        self.after_work();
    }

    /// Carries on with what waited for the work: a stashed packet, a deferred end.
    fn after_work(&mut self) {
        if self.waiting.is_some() {
            return;
        }
        if let Some(p) = self.stash.take() {
            self.handle(p);
        }
        if self.waiting.is_none()
            && let Some(ending) = self.deferred.take()
        {
            self.end(ending);
        }
    }

    /// Something from the broker.
    pub(crate) fn upstream(&mut self, up: Upstream) {
        if self.ended {
            return;
        }
        let packet = match up {
            Upstream::Publish(frame) => {
                self.push(Action::Device(Out::Raw(frame)));
                return;
            }
            Upstream::Packet(p) => p,
        };
        match packet {
            v5::Packet::PublishAck(a) => {
                self.ack(AckEvent::UpstreamAck(
                    a.packet_id,
                    v5::Packet::PublishAck(a),
                ));
            }
            v5::Packet::PublishReceived(a) => self.ack(AckEvent::UpstreamAck(
                a.packet_id,
                v5::Packet::PublishReceived(a),
            )),
            v5::Packet::SubscribeAck(mut ack) => {
                if let Some(pending) = self.subs.remove(&ack.packet_id) {
                    rules::merge_suback(&mut ack, pending);
                }
                self.push(Action::Device(Out::Packet(v5::Packet::SubscribeAck(ack))));
            }
            v5::Packet::Disconnect(d) => {
                // The broker ended the session: the device hears the broker's reason.
                self.push(Action::Device(Out::Packet(v5::Packet::Disconnect(d))));
                self.end(Ending::QUIET);
            }
            v5::Packet::Connect(_) | v5::Packet::ConnectAck(_) | v5::Packet::Auth(_) => {
                self.end(Ending::bridge(DisconnectReasonCode::UnspecifiedError));
            }
            p => self.push(Action::Device(Out::Packet(p))),
        }
    }

    /// The broker's side failed or closed. A broker that closes a connection (a session taken
    /// over, a restart) says nothing to the client; neither does the bridge.
    pub(crate) fn upstream_failed(&mut self, failure: UpstreamFailure) {
        match failure {
            UpstreamFailure::Closed => self.end(Ending::QUIET),
            UpstreamFailure::Malformed => {
                self.end(Ending::bridge(DisconnectReasonCode::UnspecifiedError));
            }
        }
    }

    /// Time passes: a device silent for longer than its limit is disconnected (keep-alive,
    /// MQTT 5 §3.1.2.10; or the idle timeout).
    pub(crate) fn tick(&mut self, now_ms: u64) {
        if self.ended || self.waiting.is_some() {
            return;
        }
        if self.deadline_ms().is_some_and(|d| now_ms >= d) {
            self.note(Note::Refused("keep_alive"));
            self.end(Ending::bridge(DisconnectReasonCode::KeepAliveTimeout));
        }
    }

    /// The connection's identity lost its right to be connected (revocation, deny, removal).
    pub(crate) fn kick(&mut self) {
        self.end(Ending::bridge(DisconnectReasonCode::NotAuthorized));
    }

    /// The bridge shuts down.
    pub(crate) fn shutdown(&mut self) {
        self.end(Ending::bridge(DisconnectReasonCode::ServerShuttingDown));
    }

    // ---------------------------------------------------------------------------------------

    fn ack(&mut self, ev: AckEvent) {
        for p in self.acks.push(ev) {
            self.push(Action::Device(Out::Packet(p)));
        }
    }

    fn note(&mut self, note: Note) {
        self.push(Action::Note(note));
    }

    fn push(&mut self, action: Action) {
        if !self.ended {
            self.actions.push_back(action);
        }
    }

    /// Ends now, after checking and relaying the batch gathered so far (the device sent it before
    /// what ends the connection).
    fn end_after_batch(&mut self, ending: Ending) {
        self.submit_batch();
        if self.waiting.is_some() {
            self.deferred = Some(ending);
        } else {
            self.end(ending);
        }
    }

    fn end(&mut self, ending: Ending) {
        if self.ended {
            return;
        }
        self.push(Action::Close(ending));
        self.ended = true;
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
