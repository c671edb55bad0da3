//! Fuzz entry points (hidden): the connection's decisions driven by arbitrary packet sequences,
//! with no sockets. Used by `fuzz/fuzz_targets/bridge_session.rs` and by the unit test below on
//! seeded random inputs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use bytes::{Bytes, BytesMut};
use quva_client::ids::{DeviceId, GroupId, Role};
use rmqtt_codec::v5;
use tokio_util::codec::Decoder as _;

use crate::dialect::Dialect;
use crate::frames::{Upstream, UpstreamCodec};
use crate::identity::{DEVICE_PREFIX, Identity};
use crate::reasons::SubscribeRefusal;
use crate::session::machine::{Action, Answer, DeviceFailure, Limits, Session, Work};
use crate::session::rules::{
    self, AckEvent, AckQueue, Aliases, FilterPlan, TOPIC_ALIAS_MAX, Target,
};
use crate::topics::{TopicKind, TopicPolicy, unshare};
use crate::verify::{Dropped, Verdict};

const MAX: u32 = 64 * 1024;

/// Decodes `data[1..]` as the packets a device sends and runs every decision a session makes on
/// them, asserting its invariants; the same bytes also go through the broker-side framing. The
/// first byte picks the protocol version (high bit set: MQTT 3.1.1, whose packets reach the
/// session through the [`crate::dialect`] adapter, as an unauthenticated client) and otherwise
/// the connection's identity.
pub fn session(data: &[u8]) {
    let Some((&who, rest)) = data.split_first() else {
        return;
    };
    let dialect = if who & 0x80 == 0 {
        Dialect::Mqtt5
    } else {
        Dialect::Mqtt311
    };
    let identity = match (dialect, who % 3) {
        (Dialect::Mqtt311, _) | (_, 0) => Identity::Anonymous,
        (_, 1) => Identity::Device(DeviceId::new("dev-1").unwrap()),
        _ => Identity::Group(GroupId::new("plant/a").unwrap(), Role::Publisher),
    };
    let policy = TopicPolicy::new(["plant/#", "hall/+/temp"]).unwrap();
    upstream_frames(dialect, rest);
    drive(dialect, &identity, &policy, rest);
    if dialect == Dialect::Mqtt311 {
        mqtt311_round_trips(rest);
    }

    let mut codec = dialect.codec(MAX);
    let mut buf = BytesMut::from(rest);
    let mut aliases = Aliases::default();
    let mut acks = AckQueue::default();
    let (mut awaited, mut released) = (0usize, 0usize);
    while let Ok(Some(packet)) = crate::dialect::decode(&mut codec, &mut buf) {
        match packet {
            v5::Packet::Connect(c) => connect(&c, &identity, &policy),
            v5::Packet::Subscribe(s) => {
                for (filter, _) in &s.topic_filters {
                    subscribe(&policy, &identity, filter);
                }
            }
            v5::Packet::Publish(mut p) => {
                let had_alias = p
                    .properties
                    .as_ref()
                    .is_some_and(|pr| pr.topic_alias.is_some());
                if aliases.resolve(&mut p).is_err() {
                    assert!(had_alias, "only an alias can be invalid");
                    continue;
                }
                assert!(
                    p.properties
                        .as_ref()
                        .is_none_or(|pr| pr.topic_alias.is_none())
                );
                let kind = policy.classify(&p.topic);
                match rules::target(&policy, &p) {
                    Target::Unprotected => assert_eq!(kind, TopicKind::Unprotected),
                    Target::Group(g, _) => {
                        assert!(!p.retain, "a retained group message is never checked");
                        assert!(
                            matches!(kind, TopicKind::Data(ref d) | TopicKind::Query(ref d) if *d == g)
                        );
                    }
                    Target::Retained => assert!(p.retain),
                    Target::Direct(d) => {
                        assert!(!p.retain, "a retained direct message is never checked");
                        assert_eq!(kind, TopicKind::Direct(d));
                    }
                    Target::Reserved => assert!(!matches!(kind, TopicKind::Unprotected)),
                    Target::Ota(t) => {
                        assert_eq!(kind, TopicKind::Ota(t.group.clone()));
                        assert_eq!(t.to_string(), p.topic.to_string(), "one spelling");
                    }
                    Target::BadOta => assert!(matches!(kind, TopicKind::Ota(_))),
                }
                if let Some(id) = p.packet_id {
                    awaited += 1;
                    released += acks.push(AckEvent::Expect(id)).len();
                }
            }
            v5::Packet::PublishAck(a) => {
                released += acks
                    .push(AckEvent::UpstreamAck(
                        a.packet_id,
                        v5::Packet::PublishAck(a),
                    ))
                    .len();
                awaited += 1;
            }
            _ => {}
        }
    }
    // The ack queue releases nothing it was not given.
    assert!(released <= awaited);
}

fn connect(c: &v5::Connect, identity: &Identity, policy: &TopicPolicy) {
    let up = rules::Upstream {
        username: Some("bridge".into()),
        password: None,
        max_packet_size: MAX,
    };
    let u = rules::upstream_connect(c, identity, &c.client_id, &up);
    assert!(u.auth_method.is_none() && u.auth_data.is_none());
    assert!(u.client_id.starts_with(DEVICE_PREFIX) && u.client_id.len() == 25);
    assert_eq!(u.username.as_deref(), Some("bridge"));
    assert_eq!(u.topic_alias_max, 0);
    assert!(u.max_packet_size.is_some_and(|m| m.get() <= MAX));
    let k = rules::keep_alive_for(identity, c.keep_alive, 300_000);
    if identity.is_authenticated() {
        assert_eq!(k, c.keep_alive);
    } else {
        assert!((1..=300).contains(&k));
    }
    if let Some(w) = &c.last_will {
        assert_eq!(
            policy.will_allowed(&w.topic),
            policy.classify(&w.topic) == TopicKind::Unprotected
        );
    }
    let ack = rules::device_connack(v5::ConnectAck::default(), rules::Grant::default(), MAX);
    assert_eq!(ack.topic_alias_max, TOPIC_ALIAS_MAX);
}

fn subscribe(policy: &TopicPolicy, identity: &Identity, filter: &str) {
    let plan = rules::plan_filter(policy, identity, filter, true);
    let inner = unshare(filter);
    match &plan {
        FilterPlan::Relay if inner.contains(['+', '#']) => {
            assert!(!policy.filter_touches_protected(inner), "{filter}");
        }
        FilterPlan::Relay => assert!(
            matches!(
                policy.classify(inner),
                TopicKind::Unprotected | TopicKind::Certificates(_)
            ) || identity.device().is_some(),
            "{filter}"
        ),
        FilterPlan::IfMember(..) | FilterPlan::Join(..) => assert!(identity.is_authenticated()),
        FilterPlan::Refuse(reason) => assert!(reason.code() >= 0x80),
    }
    if !identity.is_authenticated() && plan == FilterPlan::Relay && !inner.contains(['+', '#']) {
        assert_eq!(policy.classify(inner), TopicKind::Unprotected, "{filter}");
    }
}

/// Every MQTT 3.1.1 packet a client sends but CONNECT (which the handshake reads, not the
/// session) comes out of the adapter as it went in.
fn mqtt311_round_trips(data: &[u8]) {
    use rmqtt_codec::v3;
    let mut codec = v3::Codec::new(MAX);
    let mut buf = BytesMut::from(data);
    while let Ok(Some((packet, _))) = codec.decode(&mut buf) {
        if !matches!(packet, v3::Packet::Connect(_)) {
            let back = crate::dialect::to_v3(crate::dialect::to_v5(packet.clone()));
            assert_eq!(back, Some(packet));
        }
    }
}

/// Drives a [`Session`] with the decoded packets as the device's input, interleaving broker
/// events, work answers, ticks and kicks chosen by the input bytes, and checks its invariants:
/// nothing after the end; one piece of work at a time; no work at all for an unauthenticated
/// connection; no protected PUBLISH relayed without an `Accept` verdict; no `quva-gk` property
/// and (unauthenticated) no protected filter upstream. Over MQTT 3.1.1 also: no refusal reaches
/// the client as an acknowledgement (a refused PUBLISH ends the connection) and the end sends no
/// DISCONNECT to either side.
fn drive(dialect: Dialect, identity: &Identity, policy: &TopicPolicy, data: &[u8]) {
    let limits = Limits {
        max_batch: 3,
        idle_ms: Some(1_000),
    };
    let mut s = Session::new(policy, identity.clone(), dialect, limits, 0);
    let mut codec = dialect.codec(MAX);
    let mut buf = BytesMut::from(data);
    let mut choices = data.iter().rev().copied().cycle();
    let mut pick = move || choices.next().unwrap_or(0);
    let (mut now, mut accepts, mut relayed) = (0u64, 0usize, 0usize);
    let mut outstanding: Option<(bool, usize)> = None;
    let mut input_done = false;
    for _ in 0..10_000 {
        let mut ended = false;
        while let Some(action) = s.next_action() {
            assert!(!ended, "an action after the end");
            match action {
                Action::Work(w) => {
                    assert!(outstanding.is_none(), "two pieces of work at once");
                    assert!(
                        identity.is_authenticated(),
                        "work for an unauthenticated client"
                    );
                    outstanding = Some(match &w {
                        Work::Check(items) => (true, items.len()),
                        Work::Authorize(asks) => (false, asks.len()),
                    });
                }
                Action::Upstream(v5::Packet::Publish(p))
                    if policy.classify(&p.topic) != TopicKind::Unprotected =>
                {
                    relayed += 1;
                    assert!(relayed <= accepts, "a protected PUBLISH relayed unchecked");
                }
                Action::Upstream(v5::Packet::Subscribe(sub)) => {
                    assert!(
                        sub.user_properties
                            .iter()
                            .all(|(k, _)| k != quva_client::group::GK_PROPERTY)
                    );
                    if !identity.is_authenticated() {
                        for (f, _) in &sub.topic_filters {
                            let inner = unshare(f);
                            assert!(
                                !policy.filter_touches_protected(inner)
                                    && policy.classify(inner) == TopicKind::Unprotected,
                                "{f}"
                            );
                        }
                    }
                }
                Action::Device(crate::session::machine::Out::Packet(
                    v5::Packet::PublishAck(a) | v5::Packet::PublishReceived(a),
                )) if dialect == Dialect::Mqtt311 => {
                    assert!(
                        u8::from(a.reason_code) < 0x80,
                        "a refusal acknowledged to an MQTT 3.1.1 client"
                    );
                }
                Action::Close(e) if dialect == Dialect::Mqtt311 => {
                    let said = |c: Option<v5::DisconnectReasonCode>| {
                        c.and_then(|c| {
                            dialect.wire(v5::Packet::Disconnect(v5::Disconnect {
                                reason_code: c,
                                session_expiry_interval_secs: None,
                                server_reference: None,
                                reason_string: None,
                                user_properties: Vec::new(),
                            }))
                        })
                        .is_some()
                    };
                    assert!(!said(e.device) && !said(e.upstream), "last words in 3.1.1");
                    ended = true;
                }
                Action::Close(_) => ended = true,
                _ => {}
            }
        }
        if ended {
            assert!(s.is_ended());
            return;
        }
        let c = pick();
        match c % 8 {
            0 | 1 if outstanding.is_some() => {
                let (check, n) = outstanding.take().unwrap_or((true, 0));
                // Sometimes too few or too many answers, rarely the wrong kind.
                let n = match pick() % 8 {
                    0 => n.saturating_sub(1),
                    1 => n + 1,
                    _ => n,
                };
                let answer = if check == (pick() % 32 != 0) {
                    Answer::Checked(
                        (0..n)
                            .map(|_| {
                                if pick() % 2 == 0 {
                                    accepts += 1;
                                    Verdict::Accept
                                } else {
                                    Verdict::Drop(Dropped::not_authorized("fuzz"))
                                }
                            })
                            .collect(),
                    )
                } else {
                    Answer::Authorized(
                        (0..n)
                            .map(|_| match pick() % 3 {
                                0 => Ok(None),
                                1 => Ok(Some("delivery".to_owned())),
                                _ => Err(SubscribeRefusal::NotAuthorized),
                            })
                            .collect(),
                    )
                };
                s.answered(answer, now);
            }
            2 => {
                let id = std::num::NonZeroU16::new(u16::from(pick()) + 1)
                    .unwrap_or(std::num::NonZeroU16::MIN);
                s.upstream(Upstream::Packet(v5::Packet::PublishAck(v5::PublishAck {
                    packet_id: id,
                    reason_code: v5::PublishAckReason::Success,
                    properties: Vec::new(),
                    reason_string: None,
                })));
            }
            3 => s.upstream(Upstream::Publish(Bytes::from_static(b"\x30\x03\x00\x01a"))),
            4 => {
                now += u64::from(pick()) * 10;
                s.tick(now);
            }
            5 if pick() == 0 => s.kick(),
            _ if s.wants_device_input() && !input_done => {
                match crate::dialect::decode(&mut codec, &mut buf) {
                    // The CONNECT was the handshake's, before the session.
                    Ok(Some(v5::Packet::Connect(_))) => {}
                    Ok(Some(packet)) => {
                        s.device_packet(packet, now);
                        if pick() % 2 == 0 {
                            s.input_drained();
                        }
                    }
                    Ok(None) => {
                        input_done = true;
                        s.device_failed(DeviceFailure::Gone);
                    }
                    Err(_) => {
                        input_done = true;
                        s.device_failed(DeviceFailure::Malformed);
                    }
                }
            }
            _ => s.input_drained(),
        }
    }
}

/// The broker-side framing never loses or invents bytes: the PUBLISH frames it passes on are
/// exact slices of the input, and it stops at the first frame it cannot take.
fn upstream_frames(dialect: Dialect, data: &[u8]) {
    let mut codec = UpstreamCodec::new(dialect, MAX);
    let mut buf = BytesMut::from(data);
    let mut offset = 0;
    loop {
        let before = buf.len();
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => {
                let used = before - buf.len();
                if let Upstream::Publish(bytes) = frame {
                    assert_eq!(&bytes[..], &data[offset..offset + used]);
                }
                offset += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
}

/// Valid inputs for [`session`]: a CONNECT with a Will, a SUBSCRIBE with several filters and
/// PUBLISHes with aliases, for each identity; and an MQTT 3.1.1 client's packets.
pub fn seeds() -> Vec<Vec<u8>> {
    use bytestring::ByteString;
    use rmqtt_codec::types::{Publish, QoS};
    use tokio_util::codec::Encoder as _;
    let mut stream = BytesMut::new();
    let mut enc = v5::Codec::new(0, 0);
    let connect = v5::Connect {
        client_id: "dev-c".into(),
        keep_alive: 0,
        last_will: Some(v5::LastWill {
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: "quva/k/plant/a/sub".into(),
            message: bytes::Bytes::from_static(b"x"),
            will_delay_interval_sec: None,
            correlation_data: None,
            message_expiry_interval: None,
            content_type: None,
            user_properties: Vec::new(),
            is_utf8_payload: None,
            response_topic: None,
        }),
        ..Default::default()
    };
    enc.encode(v5::Packet::Connect(Box::new(connect)), &mut stream)
        .unwrap();
    let filters = [
        "plant/a",
        "+/+",
        "quva/k/plant/a/sub",
        "$share/g/weather/#",
        "quva/d/dev-1",
    ];
    let opts = v5::SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: v5::RetainHandling::AtSubscribe,
    };
    let sub = v5::Subscribe {
        packet_id: std::num::NonZeroU16::MIN,
        id: None,
        user_properties: Vec::new(),
        topic_filters: filters
            .iter()
            .map(|f| (ByteString::from(*f), opts))
            .collect(),
    };
    enc.encode(v5::Packet::Subscribe(sub), &mut stream).unwrap();
    for (topic, alias, retain) in [("plant/a", 1, false), ("", 1, true), ("weather", 2, false)] {
        let p = Publish {
            dup: false,
            retain,
            qos: QoS::AtLeastOnce,
            topic: topic.into(),
            packet_id: std::num::NonZeroU16::new(7),
            payload: bytes::Bytes::from_static(b"payload"),
            properties: Some(v5::PublishProperties {
                topic_alias: std::num::NonZeroU16::new(alias),
                ..Default::default()
            }),
        };
        enc.encode(v5::Packet::Publish(Box::new(p)), &mut stream)
            .unwrap();
    }
    let mut seeds: Vec<Vec<u8>> = (0..3u8)
        .map(|who| [&[who][..], &stream[..]].concat())
        .collect();
    seeds.push([&[0x80][..], &mqtt311_stream()[..]].concat());
    seeds
}

/// An MQTT 3.1.1 client's packets: a CONNECT with a Will, a SUBSCRIBE mixing allowed, refused
/// and invalid filters, PUBLISHes on a protected and an unprotected topic, an acknowledgement,
/// a ping and a DISCONNECT.
fn mqtt311_stream() -> BytesMut {
    use rmqtt_codec::types::{Publish, QoS};
    use rmqtt_codec::v3;
    use tokio_util::codec::Encoder as _;
    let mut stream = BytesMut::new();
    let mut enc = v3::Codec::new(0);
    let id = std::num::NonZeroU16::MIN;
    let connect = v3::Connect {
        client_id: "plain".into(),
        keep_alive: 30,
        clean_session: true,
        last_will: Some(v3::LastWill {
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "status/plain".into(),
            message: Bytes::from_static(b"gone"),
        }),
        ..Default::default()
    };
    let publish = |topic: &str| {
        v3::Packet::Publish(Box::new(Publish {
            dup: false,
            retain: false,
            qos: QoS::AtLeastOnce,
            topic: topic.into(),
            packet_id: Some(id),
            payload: Bytes::from_static(b"payload"),
            properties: None,
        }))
    };
    let packets = [
        v3::Packet::Connect(Box::new(connect)),
        v3::Packet::Subscribe {
            packet_id: id,
            topic_filters: ["weather/#", "plant/a", "a#", "+/+", "quva/d/dev-1"]
                .iter()
                .map(|f| ((*f).into(), QoS::AtLeastOnce))
                .collect(),
        },
        publish("plant/a"),
        publish("weather"),
        v3::Packet::PublishAck { packet_id: id },
        v3::Packet::PingRequest,
        v3::Packet::Disconnect,
    ];
    for p in packets {
        enc.encode(p, &mut stream).unwrap();
    }
    stream
}

#[cfg(test)]
mod tests {
    use rand_core::{RngCore, SeedableRng};

    /// Seeded random packet streams, and valid packets with random bytes flipped.
    #[test]
    fn session_decisions_hold_on_random_packet_streams() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let seeds = super::seeds();
        for i in 0..20_000 {
            let mut data = if i % 2 == 0 {
                let mut d = vec![0u8; 1 + (rng.next_u32() % 200) as usize];
                rng.fill_bytes(&mut d);
                d
            } else {
                let mut d = seeds[i % seeds.len()].clone();
                let n = d.len();
                for _ in 0..1 + rng.next_u32() % 3 {
                    let at = (rng.next_u32() as usize) % n;
                    d[at] ^= 1 << (rng.next_u32() % 8);
                }
                d
            };
            data.truncate(1 + (rng.next_u32() as usize) % (data.len() + 1));
            super::session(&data);
        }
        for s in &seeds {
            super::session(s);
        }
    }

    /// Inputs the fuzz target once crashed on.
    #[test]
    fn former_crashes() {
        // `quva/k/sub/weatsub`: a role and a device with no group before them.
        super::session(&[
            0, 16, 42, 0, 4, 77, 81, 84, 84, 5, 44, 0, 0, 0, 0, 5, 100, 101, 118, 45, 99, 0, 0, 18,
            113, 113, 117, 118, 97, 47, 47, 112, 108, 97, 110, 116, 47, 97, 47, 115, 48, 98, 0, 1,
            120, 130, 76, 0, 1, 0, 0, 7, 112, 108, 97, 110, 84, 47, 97, 1, 0, 3, 43, 47, 43, 1, 0,
            18, 113, 117, 118, 97, 47, 107, 47, 115, 117, 98, 47, 119, 101, 97, 116, 115, 117, 98,
            1, 0, 18, 36, 115, 104, 97, 114, 101, 47, 103, 47, 119, 101, 97, 116, 104, 101, 114,
            47, 35, 1, 0, 12, 113, 117, 118, 97, 47, 99, 47, 100, 101, 118, 45, 48, 1,
        ]);
    }
}
