//! The decisions of one device connection, without I/O: what goes upstream in the CONNECT, what
//! the device's CONNACK says, what each subscription filter needs, what a PUBLISH is, how topic
//! aliases resolve, and in which order acknowledgements reach the device.
//!
//! Implements the connection rules of PROTOCOL.md §4, §6 and §8 as plain functions over packets,
//! the identity and the policy; `session` only moves bytes, asks the CA and waits. Every rule here
//! is unit-tested below without sockets.

use std::collections::{HashMap, VecDeque};
use std::num::{NonZeroU16, NonZeroU32};

use bytes::Bytes;
use bytestring::ByteString;
use quva_client::group::GK_PROPERTY;
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_client::message::Direction;
use quva_client::topics::OtaTopic;
use rmqtt_codec::types::Publish;
use rmqtt_codec::v3;
use rmqtt_codec::v5::{self, DisconnectReasonCode, SubscribeAckReason};

use crate::identity::Identity;
use crate::reasons::SubscribeRefusal;
use crate::topics::{TopicKind, TopicPolicy, unshare, valid_filter};

/// Topic aliases a device may use towards the bridge (MQTT 5 §3.3.2.3.4).
pub(crate) const TOPIC_ALIAS_MAX: u16 = 32;

/// The broker credentials and limits the bridge applies to every upstream connection.
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    pub(crate) username: Option<ByteString>,
    pub(crate) password: Option<Bytes>,
    /// The bridge's own Maximum Packet Size.
    pub(crate) max_packet_size: u32,
}

/// The upstream CONNECT for a device's CONNECT: no authentication, the bridge's broker
/// credentials, the client identifier namespaced by the identity (PROTOCOL.md §8), the smaller of
/// the two Maximum Packet Sizes, and no topic aliases from the broker (so deliveries can be relayed
/// as they are).
pub(crate) fn upstream_connect(
    connect: &v5::Connect,
    identity: &Identity,
    client_id: &str,
    up: &Upstream,
) -> v5::Connect {
    let mut c = connect.clone();
    c.auth_method = None;
    c.auth_data = None;
    c.username.clone_from(&up.username);
    c.password.clone_from(&up.password);
    c.topic_alias_max = 0;
    c.client_id = ByteString::from(identity.upstream_client_id(client_id));
    let max = connect
        .max_packet_size
        .map_or(up.max_packet_size, |m| m.get().min(up.max_packet_size));
    c.max_packet_size = Some(NonZeroU32::new(max).unwrap_or(NonZeroU32::MIN));
    c
}

/// The upstream CONNECT for an MQTT 3.1.1 client's CONNECT: the bridge's broker credentials in
/// place of the client's, the client identifier namespaced as an unauthenticated one's
/// (PROTOCOL.md §8); the rest (Will, keep-alive, clean session) as the client sent it.
pub(crate) fn upstream_connect_v3(
    connect: &v3::Connect,
    client_id: &str,
    up: &Upstream,
) -> v3::Connect {
    let mut c = connect.clone();
    c.username.clone_from(&up.username);
    c.password.clone_from(&up.password);
    c.client_id = ByteString::from(Identity::Anonymous.upstream_client_id(client_id));
    c
}

/// The keep-alive a connection gets: its own, except that an unauthenticated one may not stay
/// idle longer than `idle_timeout_ms` (0 or a longer keep-alive is capped to it).
pub(crate) fn keep_alive_for(identity: &Identity, asked: u16, idle_timeout_ms: u64) -> u16 {
    let cap = idle_timeout_ms / 1000;
    if identity.is_authenticated() || cap == 0 {
        return asked;
    }
    let cap = u16::try_from(cap).unwrap_or(u16::MAX).max(1);
    if asked == 0 { cap } else { asked.min(cap) }
}

/// What the bridge adds to the broker's CONNACK.
#[derive(Clone, Debug, Default)]
pub(crate) struct Grant {
    /// The Authentication Method and Data to echo (enrollment: the certificate).
    pub(crate) method: Option<ByteString>,
    pub(crate) data: Option<Bytes>,
    /// The client identifier the bridge assigned to a client that sent an empty one.
    pub(crate) assigned: Option<ByteString>,
    /// The keep-alive the client asked for and the one it gets.
    pub(crate) asked_keep_alive: u16,
    pub(crate) keep_alive: u16,
}

/// The device's CONNACK from the broker's: authentication only on success, the bridge's topic
/// alias and packet size limits, the assigned client identifier and the capped keep-alive.
pub(crate) fn device_connack(
    mut ack: v5::ConnectAck,
    grant: Grant,
    our_max: u32,
) -> v5::ConnectAck {
    if ack.reason_code == v5::ConnectAckReason::Success {
        ack.auth_method = grant.method;
        ack.auth_data = grant.data;
    } else {
        ack.auth_method = None;
        ack.auth_data = None;
    }
    ack.topic_alias_max = TOPIC_ALIAS_MAX;
    ack.max_packet_size = Some(ack.max_packet_size.map_or(our_max, |m| m.min(our_max)));
    ack.assigned_client_id = grant.assigned;
    if grant.keep_alive != grant.asked_keep_alive {
        ack.server_keepalive_sec = Some(
            ack.server_keepalive_sec
                .map_or(grant.keep_alive, |k| k.min(grant.keep_alive)),
        );
    }
    ack
}

/// The offset of the Connect Flags byte of the MQTT 5 CONNECT at the start of `buf` if its client
/// identifier is empty and its Clean Start is 0, and the whole packet is in `buf`.
///
/// MQTT 5 lets a server assign an identifier to such a client (§3.1.3.1), and Mosquitto does;
/// rmqtt-codec refuses to decode it. For a freshly assigned identifier there is no session to
/// resume, so setting Clean Start changes nothing but lets the packet decode.
pub(crate) fn empty_id_without_clean_start(buf: &[u8]) -> Option<usize> {
    fn varint(buf: &[u8], at: usize) -> Option<(usize, usize)> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = *buf.get(at + i)?;
            value |= usize::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Some((value, i + 1));
            }
        }
        None
    }
    fn u16_at(buf: &[u8], at: usize) -> Option<usize> {
        Some(usize::from(u16::from_be_bytes([
            *buf.get(at)?,
            *buf.get(at + 1)?,
        ])))
    }
    if buf.first() != Some(&0x10) {
        return None;
    }
    let (remaining, n) = varint(buf, 1)?;
    if buf.len() < 1 + n + remaining {
        return None;
    }
    let name = u16_at(buf, 1 + n)?;
    let flags_at = 1 + n + 2 + name + 1;
    let flags = *buf.get(flags_at)?;
    let (props, m) = varint(buf, flags_at + 3)?;
    let id_len = u16_at(buf, flags_at + 3 + m + props)?;
    (id_len == 0 && flags & 0x02 == 0).then_some(flags_at)
}

/// What one subscription filter needs before its fate is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FilterPlan {
    /// Relay to the broker.
    Relay,
    /// Refuse with this SUBACK reason.
    Refuse(SubscribeRefusal),
    /// Relay if the connection is a current member of the group in the role (resumption,
    /// PROTOCOL.md §4), else refuse as not authorized.
    IfMember(GroupId, Role),
    /// Run the `quva-gk` join with the CA; relay with the delivery on the SUBACK.
    Join(GroupId, Role),
}

const NOT_AUTHORIZED: SubscribeRefusal = SubscribeRefusal::NotAuthorized;

/// Plans one subscription filter (PROTOCOL.md §4, §8). `gk_request` says whether the SUBSCRIBE
/// still carries an unused `quva-gk` request (one per SUBSCRIBE, for its first key topic).
pub(crate) fn plan_filter(
    policy: &TopicPolicy,
    identity: &Identity,
    filter: &str,
    gk_request: bool,
) -> FilterPlan {
    let inner = unshare(filter);
    if !valid_filter(inner) {
        return FilterPlan::Refuse(SubscribeRefusal::TopicFilterInvalid);
    }
    if inner.contains(['+', '#']) {
        // A wildcard inside one group's OTA topics (`<group>/_ota/#`): granted as the group's
        // exact OTA topics are, to its current subscribers (PROTOCOL.md §7.2).
        if let Some(g) = policy.ota_filter_group(inner) {
            return if identity.is_authenticated() {
                FilterPlan::IfMember(g, Role::Subscriber)
            } else {
                FilterPlan::Refuse(NOT_AUTHORIZED)
            };
        }
        return if policy.filter_touches_protected(inner) {
            FilterPlan::Refuse(NOT_AUTHORIZED)
        } else {
            FilterPlan::Relay
        };
    }
    match policy.classify(inner) {
        TopicKind::Unprotected => FilterPlan::Relay,
        TopicKind::Reserved => FilterPlan::Refuse(NOT_AUTHORIZED),
        // Nothing protected is looked up or granted for an unauthenticated connection.
        _ if !identity.is_authenticated() => FilterPlan::Refuse(NOT_AUTHORIZED),
        TopicKind::Data(g) | TopicKind::Ota(g) => FilterPlan::IfMember(g, Role::Subscriber),
        TopicKind::Query(g) => FilterPlan::IfMember(g, Role::Publisher),
        TopicKind::Certificates(_) => FilterPlan::Relay,
        TopicKind::Individual(_, _, device) | TopicKind::Direct(device) => {
            if identity.device() == Some(&device) {
                FilterPlan::Relay
            } else {
                FilterPlan::Refuse(NOT_AUTHORIZED)
            }
        }
        TopicKind::Key(g, role) if gk_request => FilterPlan::Join(g, role),
        TopicKind::Key(g, role) => FilterPlan::IfMember(g, role),
    }
}

/// Whether a SUBSCRIBE names a filter that is not a valid MQTT topic filter (a wildcard in the
/// wrong place, MQTT 5 §4.7.1). Such a packet is malformed (§4.13): the connection ends with
/// DISCONNECT 0x81, as at Mosquitto, instead of a SUBACK for the other filters.
pub(crate) fn has_malformed_filter(s: &v5::Subscribe) -> bool {
    s.topic_filters
        .iter()
        .any(|(f, _)| !valid_filter(unshare(f)))
}

/// What a device PUBLISH is to the bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// Not protected: relayed unchanged.
    Unprotected,
    /// A reserved topic (`quva/…`, `$…`, a retained direct message): no device may publish
    /// there.
    Reserved,
    /// Under a group's `_ota/` level but not one of its OTA topics (an unknown item, a version or
    /// chunk index that is not a canonical decimal): no device may publish there.
    BadOta,
    /// A group's OTA manifest, key message or chunk (PROTOCOL.md §7.2); retained allowed.
    Ota(OtaTopic),
    /// A retained PUBLISH on a group's data or query topic: it would outlive every check
    /// (PROTOCOL.md §8).
    Retained,
    /// A protected group's data (forward) or query topic.
    Group(GroupId, Direction),
    /// A direct message to this device (`quva/d/<device>`, PROTOCOL.md §7.1), not retained.
    Direct(DeviceId),
}

/// Classifies a device PUBLISH (after [`Aliases::resolve`]).
pub(crate) fn target(policy: &TopicPolicy, p: &Publish) -> Target {
    match policy.classify(&p.topic) {
        TopicKind::Unprotected => Target::Unprotected,
        TopicKind::Data(_) | TopicKind::Query(_) if p.retain => Target::Retained,
        TopicKind::Data(g) => Target::Group(g, Direction::Forward),
        TopicKind::Query(g) => Target::Group(g, Direction::Query),
        TopicKind::Direct(d) if !p.retain => Target::Direct(d),
        TopicKind::Ota(g) => match OtaTopic::parse(&p.topic) {
            Some(t) if t.group == g => Target::Ota(t),
            _ => Target::BadOta,
        },
        _ => Target::Reserved,
    }
}

/// The topic aliases a device set on this connection (MQTT 5 §3.3.2.3.4). The bridge resolves
/// them (it must see the real topic to classify a PUBLISH) and forwards the full topic upstream.
#[derive(Debug, Default)]
pub(crate) struct Aliases {
    topics: HashMap<u16, ByteString>,
}

impl Aliases {
    /// Replaces a PUBLISH's alias by its topic, recording a new mapping when it carries both.
    ///
    /// # Errors
    /// [`DisconnectReasonCode::TopicAliasInvalid`] for an alias above [`TOPIC_ALIAS_MAX`], and
    /// [`DisconnectReasonCode::ProtocolError`] for an alias that was never set (MQTT 5
    /// §3.3.2.3.4, §3.3.4: the receiver closes the connection), as Mosquitto answers them.
    pub(crate) fn resolve(&mut self, p: &mut Publish) -> Result<(), DisconnectReasonCode> {
        let Some(alias) = p.properties.as_mut().and_then(|pr| pr.topic_alias.take()) else {
            return Ok(());
        };
        let alias: NonZeroU16 = alias;
        if alias.get() > TOPIC_ALIAS_MAX {
            return Err(DisconnectReasonCode::TopicAliasInvalid);
        }
        if p.topic.is_empty() {
            p.topic = self
                .topics
                .get(&alias.get())
                .cloned()
                .ok_or(DisconnectReasonCode::ProtocolError)?;
        } else {
            self.topics.insert(alias.get(), p.topic.clone());
        }
        Ok(())
    }
}

/// An acknowledgement event for the device, ordered by the [`AckQueue`].
#[derive(Debug)]
pub(crate) enum AckEvent {
    /// A QoS > 0 PUBLISH with this id went upstream: its PUBACK/PUBREC is awaited.
    Expect(NonZeroU16),
    /// The broker's PUBACK/PUBREC for a device PUBLISH.
    UpstreamAck(NonZeroU16, v5::Packet),
    /// The bridge's own PUBACK/PUBREC for a dropped PUBLISH.
    OwnAck(NonZeroU16, v5::Packet),
}

/// Device-bound acknowledgements in PUBLISH order (MQTT 5 §4.6).
#[derive(Debug, Default)]
pub(crate) struct AckQueue {
    entries: VecDeque<(NonZeroU16, Option<v5::Packet>)>,
}

impl AckQueue {
    /// Handles one event; returns the packets now ready to send, in order.
    pub(crate) fn push(&mut self, ev: AckEvent) -> Vec<v5::Packet> {
        match ev {
            AckEvent::Expect(id) => self.entries.push_back((id, None)),
            AckEvent::UpstreamAck(id, p) => {
                match self
                    .entries
                    .iter_mut()
                    .find(|(i, ack)| *i == id && ack.is_none())
                {
                    Some(slot) => slot.1 = Some(p),
                    None => return vec![p],
                }
            }
            AckEvent::OwnAck(id, p) => {
                if self.entries.is_empty() {
                    return vec![p];
                }
                self.entries.push_back((id, Some(p)));
            }
        }
        let mut out = Vec::new();
        while self.entries.front().is_some_and(|(_, a)| a.is_some()) {
            if let Some((_, Some(p))) = self.entries.pop_front() {
                out.push(p);
            }
        }
        out
    }
}

/// A SUBSCRIBE whose SUBACK is awaited from the broker.
#[derive(Debug)]
pub(crate) struct PendingSub {
    /// Per filter: `Some` reason decided by the bridge, `None` forwarded upstream.
    pub(crate) slots: Vec<Option<SubscribeAckReason>>,
    /// The `quva-gk` property value for the SUBACK, and the index of its key-topic filter.
    pub(crate) gk: Option<(usize, String)>,
    /// The Reason String for the SUBACK, when the bridge refused a filter for a reason worth
    /// saying ([`refusal_reason`]).
    pub(crate) reason: Option<&'static str>,
}

/// Why a wildcard filter was refused, for the SUBACK's Reason String: a filter that could match a
/// protected or reserved topic is refused as a whole (PROTOCOL.md §8), so that the client knows
/// to subscribe to its unprotected topics with a narrower filter instead of losing them silently.
pub(crate) fn refusal_reason(policy: &TopicPolicy, filter: &str) -> Option<&'static str> {
    let inner = unshare(filter);
    (valid_filter(inner)
        && inner.contains(['+', '#'])
        && policy.filter_touches_protected(inner)
        && policy.ota_filter_group(inner).is_none())
    .then_some(WILDCARD_REFUSED)
}

/// The Reason String of [`refusal_reason`].
pub(crate) const WILDCARD_REFUSED: &str = "a wildcard filter that can match protected Quva topics \
     (groups, quva/, $) is refused; subscribe to unprotected topics with a narrower filter and to \
     each group by its exact topic";

/// Puts the bridge's own decisions and the `quva-gk` delivery into the broker's SUBACK.
pub(crate) fn merge_suback(ack: &mut v5::SubscribeAck, pending: PendingSub) {
    let mut upstream = std::mem::take(&mut ack.status).into_iter();
    let mut status = Vec::with_capacity(pending.slots.len());
    for slot in pending.slots {
        status.push(match slot {
            Some(own) => own,
            None => upstream
                .next()
                .unwrap_or(SubscribeAckReason::UnspecifiedError),
        });
    }
    if let Some((idx, value)) = pending.gk
        && status.get(idx).is_some_and(|s| u8::from(*s) < 0x80)
    {
        ack.properties.push((GK_PROPERTY.into(), value.into()));
    }
    if let Some(reason) = pending.reason {
        ack.reason_string = Some(ByteString::from_static(reason));
    }
    ack.status = status;
}

#[cfg(test)]
mod tests {
    use super::*;
    use quva_client::ids::DeviceId;
    use rmqtt_codec::types::QoS;
    use rmqtt_codec::v5::{PublishAck, PublishAckReason};

    fn policy() -> TopicPolicy {
        TopicPolicy::new(["plant/#"]).unwrap()
    }

    fn device(id: &str) -> Identity {
        Identity::Device(DeviceId::new(id).unwrap())
    }

    fn g(s: &str) -> GroupId {
        GroupId::new(s).unwrap()
    }

    fn up() -> Upstream {
        Upstream {
            username: Some("bridge".into()),
            password: Some(Bytes::from_static(b"pw")),
            max_packet_size: 1000,
        }
    }

    #[test]
    fn the_upstream_connect_carries_nothing_of_the_devices_authentication() {
        let c = v5::Connect {
            client_id: "dev-c".into(),
            auth_method: Some("quva-cert-v1".into()),
            auth_data: Some(Bytes::from_static(b"proof")),
            username: Some("someone".into()),
            topic_alias_max: 10,
            max_packet_size: NonZeroU32::new(5000),
            ..Default::default()
        };
        let id = device("dev");
        let u = upstream_connect(&c, &id, "dev-c", &up());
        assert_eq!(u.auth_method, None);
        assert_eq!(u.auth_data, None);
        assert_eq!(u.username.as_deref(), Some("bridge"));
        assert_eq!(u.topic_alias_max, 0);
        assert_eq!(u.max_packet_size, NonZeroU32::new(1000));
        assert_eq!(u.client_id, id.upstream_client_id("dev-c"));
    }

    #[test]
    fn the_mqtt311_upstream_connect_has_the_bridge_credentials_and_a_namespaced_id() {
        let c = v3::Connect {
            client_id: "plain".into(),
            username: Some("someone".into()),
            password: Some(Bytes::from_static(b"theirs")),
            keep_alive: 17,
            ..Default::default()
        };
        let u = upstream_connect_v3(&c, "plain", &up());
        assert_eq!(u.username.as_deref(), Some("bridge"));
        assert_eq!(u.password.as_deref(), Some(&b"pw"[..]));
        assert_eq!(u.client_id, Identity::Anonymous.upstream_client_id("plain"));
        assert_ne!(u.client_id, "plain");
        assert_eq!(u.keep_alive, 17);
        let none = Upstream {
            username: None,
            password: None,
            max_packet_size: 1000,
        };
        let u = upstream_connect_v3(&c, "plain", &none);
        assert_eq!((u.username, u.password), (None, None));
    }

    #[test]
    fn an_empty_client_id_without_clean_start_is_found_in_the_connect() {
        use tokio_util::codec::Encoder as _;
        let encode = |clean_start: bool, id: &str| {
            let mut out = bytes::BytesMut::new();
            let c = v5::Connect {
                clean_start,
                client_id: id.into(),
                user_properties: vec![("k".into(), "v".into())],
                ..Default::default()
            };
            v5::Codec::new(0, 0)
                .encode(v5::Packet::Connect(Box::new(c)), &mut out)
                .unwrap();
            out
        };
        let mut resume = encode(false, "");
        let at = empty_id_without_clean_start(&resume).expect("found");
        resume[at] |= 0x02;
        assert_eq!(resume, encode(true, ""));
        assert_eq!(empty_id_without_clean_start(&encode(true, "")), None);
        assert_eq!(empty_id_without_clean_start(&encode(false, "dev")), None);
        // Not all there yet: no decision.
        assert_eq!(empty_id_without_clean_start(&encode(false, "")[..10]), None);
    }

    #[test]
    fn keep_alive_is_capped_for_unauthenticated_connections_only() {
        assert_eq!(keep_alive_for(&Identity::Anonymous, 0, 300_000), 300);
        assert_eq!(keep_alive_for(&Identity::Anonymous, 1_000, 300_000), 300);
        assert_eq!(keep_alive_for(&Identity::Anonymous, 30, 300_000), 30);
        assert_eq!(keep_alive_for(&Identity::Anonymous, 0, 0), 0);
        assert_eq!(keep_alive_for(&device("d"), 0, 300_000), 0);
    }

    #[test]
    fn the_connack_shows_authentication_only_on_success() {
        let grant = Grant {
            method: Some("quva-enroll-v1".into()),
            data: Some(Bytes::from_static(b"cert")),
            assigned: Some("qa-x".into()),
            asked_keep_alive: 0,
            keep_alive: 300,
        };
        let ok = device_connack(v5::ConnectAck::default(), grant.clone(), 1000);
        assert_eq!(ok.auth_data.as_deref(), Some(&b"cert"[..]));
        assert_eq!(ok.topic_alias_max, TOPIC_ALIAS_MAX);
        assert_eq!(ok.server_keepalive_sec, Some(300));
        assert_eq!(ok.assigned_client_id.as_deref(), Some("qa-x"));
        assert_eq!(ok.max_packet_size, Some(1000));
        let refused = v5::ConnectAck {
            reason_code: v5::ConnectAckReason::NotAuthorized,
            ..Default::default()
        };
        let no = device_connack(refused, grant, 1000);
        assert_eq!(no.auth_method, None);
        assert_eq!(no.auth_data, None);
    }

    #[test]
    fn filters_are_planned_by_topic_kind_and_identity() {
        let p = policy();
        let dev = device("dev-1");
        let anon = Identity::Anonymous;
        let cases = [
            (&dev, "weather/today", false, FilterPlan::Relay),
            (&anon, "weather/#", false, FilterPlan::Relay),
            (&dev, "+/+", false, FilterPlan::Refuse(NOT_AUTHORIZED)),
            (
                &dev,
                "a/#/b",
                false,
                FilterPlan::Refuse(SubscribeRefusal::TopicFilterInvalid),
            ),
            (&dev, "$SYS/x", false, FilterPlan::Refuse(NOT_AUTHORIZED)),
            (&anon, "plant/a", false, FilterPlan::Refuse(NOT_AUTHORIZED)),
            (
                &anon,
                "quva/c/plant/a",
                false,
                FilterPlan::Refuse(NOT_AUTHORIZED),
            ),
            (
                &dev,
                "plant/a",
                false,
                FilterPlan::IfMember(g("plant/a"), Role::Subscriber),
            ),
            (
                &dev,
                "$share/s/plant/a",
                false,
                FilterPlan::IfMember(g("plant/a"), Role::Subscriber),
            ),
            (
                &dev,
                "plant/a/_q",
                false,
                FilterPlan::IfMember(g("plant/a"), Role::Publisher),
            ),
            (&dev, "quva/c/plant/a", false, FilterPlan::Relay),
            (&dev, "quva/k/plant/a/sub/dev-1", false, FilterPlan::Relay),
            (
                &dev,
                "quva/k/plant/a/sub/dev-2",
                false,
                FilterPlan::Refuse(NOT_AUTHORIZED),
            ),
            (&dev, "quva/d/dev-1", false, FilterPlan::Relay),
            (
                &dev,
                "quva/d/dev-2",
                false,
                FilterPlan::Refuse(NOT_AUTHORIZED),
            ),
            (
                &dev,
                "quva/k/plant/a/sub",
                true,
                FilterPlan::Join(g("plant/a"), Role::Subscriber),
            ),
            (
                &dev,
                "quva/k/plant/a/pub",
                false,
                FilterPlan::IfMember(g("plant/a"), Role::Publisher),
            ),
            // OTA topics: the group's subscribers, also with a wildcard inside one group's
            // `_ota/` level; never across groups, never unauthenticated.
            (
                &dev,
                "plant/a/_ota/rel-1/7/m",
                false,
                FilterPlan::IfMember(g("plant/a"), Role::Subscriber),
            ),
            (
                &dev,
                "plant/a/_ota/#",
                false,
                FilterPlan::IfMember(g("plant/a"), Role::Subscriber),
            ),
            (
                &dev,
                "$share/s/plant/a/_ota/rel-1/#",
                false,
                FilterPlan::IfMember(g("plant/a"), Role::Subscriber),
            ),
            (
                &dev,
                "plant/+/_ota/#",
                false,
                FilterPlan::Refuse(NOT_AUTHORIZED),
            ),
            (
                &anon,
                "plant/a/_ota/#",
                false,
                FilterPlan::Refuse(NOT_AUTHORIZED),
            ),
            (
                &anon,
                "plant/a/_ota/rel-1/7/m",
                false,
                FilterPlan::Refuse(NOT_AUTHORIZED),
            ),
        ];
        for (id, filter, gk, want) in cases {
            assert_eq!(plan_filter(&p, id, filter, gk), want, "{filter}");
        }
    }

    fn publish(topic: &str, retain: bool, alias: Option<u16>) -> Publish {
        Publish {
            dup: false,
            retain,
            qos: QoS::AtLeastOnce,
            topic: topic.into(),
            packet_id: NonZeroU16::new(1),
            payload: Bytes::new(),
            properties: Some(v5::PublishProperties {
                topic_alias: alias.and_then(NonZeroU16::new),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn publishes_are_classified_and_retained_group_messages_refused() {
        let p = policy();
        assert_eq!(
            target(&p, &publish("weather", true, None)),
            Target::Unprotected
        );
        assert_eq!(
            target(&p, &publish("plant/a", true, None)),
            Target::Retained
        );
        assert_eq!(
            target(&p, &publish("plant/a/_q", true, None)),
            Target::Retained
        );
        assert_eq!(
            target(&p, &publish("plant/a", false, None)),
            Target::Group(g("plant/a"), Direction::Forward)
        );
        assert_eq!(
            target(&p, &publish("quva/k/plant/a/sub", false, None)),
            Target::Reserved
        );
        let ota = |t: &str| Target::Ota(OtaTopic::parse(t).unwrap());
        // OTA items pass to the checks, retained or not.
        for t in [
            "plant/a/_ota/s/1/m",
            "plant/a/_ota/s/1/k",
            "plant/a/_ota/s/1/c/0",
        ] {
            assert_eq!(target(&p, &publish(t, true, None)), ota(t), "{t}");
            assert_eq!(target(&p, &publish(t, false, None)), ota(t), "{t}");
        }
        // Anything else under `_ota/` is refused before any check.
        for t in [
            "plant/a/_ota/s/1/x",
            "plant/a/_ota/s/01/m",
            "plant/a/_ota/s/1/c/01",
            "plant/a/_ota/s/1/c",
            "plant/a/_ota/s/1/k/extra",
            "plant/a/_ota/s",
            "plant/a/_ota/bad id/1/m",
        ] {
            assert_eq!(target(&p, &publish(t, true, None)), Target::BadOta, "{t}");
        }
        assert_eq!(
            target(&p, &publish("quva/d/dev-1", false, None)),
            Target::Direct(DeviceId::new("dev-1").unwrap())
        );
        assert_eq!(
            target(&p, &publish("quva/d/dev-1", true, None)),
            Target::Reserved
        );
    }

    #[test]
    fn a_subscribe_with_a_misplaced_wildcard_is_malformed() {
        let sub = |filters: &[&str]| v5::Subscribe {
            packet_id: NonZeroU16::MIN,
            id: None,
            user_properties: Vec::new(),
            topic_filters: filters
                .iter()
                .map(|f| (ByteString::from(*f), v5::SubscriptionOptions::default()))
                .collect(),
        };
        assert!(!has_malformed_filter(&sub(&[
            "a/+/b",
            "a/#",
            "$share/g/a/#"
        ])));
        for bad in ["a#", "a/#/b", "a/b+", "$share/g/a#"] {
            assert!(has_malformed_filter(&sub(&["ok", bad])), "{bad}");
        }
    }

    #[test]
    fn topic_aliases_resolve_to_the_topic_they_were_set_for() {
        let mut a = Aliases::default();
        let mut first = publish("plant/a", false, Some(3));
        a.resolve(&mut first).unwrap();
        assert_eq!(first.topic, "plant/a");
        assert!(first.properties.unwrap().topic_alias.is_none());
        // The alias alone now means plant/a (and is classified as such).
        let mut next = publish("", false, Some(3));
        a.resolve(&mut next).unwrap();
        assert_eq!(next.topic, "plant/a");
        // Unknown or out-of-range aliases end the connection, with Mosquitto's reason codes.
        for (bad, code) in [
            (
                publish("", false, Some(4)),
                DisconnectReasonCode::ProtocolError,
            ),
            (
                publish("x", false, Some(TOPIC_ALIAS_MAX + 1)),
                DisconnectReasonCode::TopicAliasInvalid,
            ),
        ] {
            let mut bad = bad;
            assert_eq!(a.resolve(&mut bad), Err(code));
        }
    }

    fn ack(id: u16, code: PublishAckReason) -> (NonZeroU16, v5::Packet) {
        let id = NonZeroU16::new(id).unwrap();
        (
            id,
            v5::Packet::PublishAck(PublishAck {
                packet_id: id,
                reason_code: code,
                properties: Vec::new(),
                reason_string: None,
            }),
        )
    }

    fn ids(ps: &[v5::Packet]) -> Vec<u16> {
        ps.iter()
            .map(|p| match p {
                v5::Packet::PublishAck(a) => a.packet_id.get(),
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn own_acks_wait_behind_pending_upstream_acks() {
        let mut q = AckQueue::default();
        let (id1, a1) = ack(1, PublishAckReason::Success);
        let (id2, a2) = ack(2, PublishAckReason::NotAuthorized);
        let (id3, a3) = ack(3, PublishAckReason::Success);
        assert!(q.push(AckEvent::Expect(id1)).is_empty());
        assert!(q.push(AckEvent::OwnAck(id2, a2)).is_empty());
        assert!(q.push(AckEvent::Expect(id3)).is_empty());
        assert!(q.push(AckEvent::UpstreamAck(id3, a3)).is_empty());
        assert_eq!(ids(&q.push(AckEvent::UpstreamAck(id1, a1))), vec![1, 2, 3]);
        let (id4, a4) = ack(4, PublishAckReason::NotAuthorized);
        assert_eq!(ids(&q.push(AckEvent::OwnAck(id4, a4))), vec![4]);
    }

    #[test]
    fn unexpected_upstream_acks_pass_through() {
        let mut q = AckQueue::default();
        let (id, a) = ack(9, PublishAckReason::Success);
        assert_eq!(ids(&q.push(AckEvent::UpstreamAck(id, a))), vec![9]);
    }

    #[test]
    fn suback_merges_bridge_and_broker_decisions() {
        let id = NonZeroU16::new(5).unwrap();
        let mut ack = v5::SubscribeAck {
            packet_id: id,
            properties: Vec::new(),
            reason_string: None,
            status: vec![
                SubscribeAckReason::GrantedQos1,
                SubscribeAckReason::GrantedQos0,
            ],
        };
        let pending = PendingSub {
            slots: vec![None, Some(SubscribeAckReason::NotAuthorized), None],
            gk: Some((2, "abc".into())),
            reason: refusal_reason(&policy(), "+/+"),
        };
        merge_suback(&mut ack, pending);
        assert_eq!(
            ack.status,
            vec![
                SubscribeAckReason::GrantedQos1,
                SubscribeAckReason::NotAuthorized,
                SubscribeAckReason::GrantedQos0
            ]
        );
        assert_eq!(ack.properties, vec![(GK_PROPERTY.into(), "abc".into())]);
        assert_eq!(ack.reason_string.as_deref(), Some(WILDCARD_REFUSED));
        assert_eq!(refusal_reason(&policy(), "weather/#"), None);
        assert_eq!(refusal_reason(&policy(), "plant/a"), None);
        // A group's OTA wildcard is refused for membership, not for being a wildcard.
        assert_eq!(refusal_reason(&policy(), "plant/a/_ota/#"), None);
        assert_eq!(
            refusal_reason(&policy(), "plant/+/_ota/#"),
            Some(WILDCARD_REFUSED)
        );
    }
}
