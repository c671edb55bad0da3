//! The session core's decisions, with no socket: each test feeds events and reads the actions.

use std::num::NonZeroU16;

use bytes::Bytes;
use quva_client::curve::{KeyPair, SecretScalar};
use quva_client::ids::DeviceId;
use quva_client::message::Direction;
use rand_core::OsRng;
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v5::{self, DisconnectReasonCode, PublishAck, PublishAckReason};

use super::*;

fn policy() -> TopicPolicy {
    TopicPolicy::new(["plant/#"]).unwrap()
}

fn device(id: &str) -> Identity {
    Identity::Device(DeviceId::new(id).unwrap())
}

const LIMITS: Limits = Limits {
    max_batch: 4,
    idle_ms: Some(1_500),
};

fn publish(topic: &str, id: u16) -> v5::Packet {
    v5::Packet::Publish(Box::new(Publish {
        dup: false,
        retain: false,
        qos: if id == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        },
        topic: topic.into(),
        packet_id: NonZeroU16::new(id),
        payload: Bytes::from_static(b"m"),
        properties: Some(v5::PublishProperties::default()),
    }))
}

fn puback(id: u16, reason: PublishAckReason) -> v5::Packet {
    v5::Packet::PublishAck(PublishAck {
        packet_id: NonZeroU16::new(id).unwrap(),
        reason_code: reason,
        properties: Vec::new(),
        reason_string: None,
    })
}

fn subscribe(id: u16, filters: &[&str], gk: Option<String>) -> v5::Packet {
    v5::Packet::Subscribe(v5::Subscribe {
        packet_id: NonZeroU16::new(id).unwrap(),
        id: None,
        user_properties: gk
            .map(|v| vec![(GK_PROPERTY.into(), v.into())])
            .unwrap_or_default(),
        topic_filters: filters
            .iter()
            .map(|f| ((*f).into(), v5::SubscriptionOptions::default()))
            .collect(),
    })
}

fn suback(id: u16, status: &[v5::SubscribeAckReason]) -> Upstream {
    Upstream::Packet(v5::Packet::SubscribeAck(v5::SubscribeAck {
        packet_id: NonZeroU16::new(id).unwrap(),
        properties: Vec::new(),
        reason_string: None,
        status: status.to_vec(),
    }))
}

fn disconnect(reason: DisconnectReasonCode) -> v5::Packet {
    v5::Packet::Disconnect(v5::Disconnect {
        reason_code: reason,
        session_expiry_interval_secs: None,
        server_reference: None,
        reason_string: None,
        user_properties: Vec::new(),
    })
}

fn drain(s: &mut Session<'_>) -> Vec<Action> {
    std::iter::from_fn(|| s.next_action()).collect()
}

/// The actions in a short form that tests compare.
fn shape(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            Action::Device(Out::Packet(p)) => format!("device {}", packet(p)),
            Action::Device(Out::Raw(b)) => format!("device raw {}", b.len()),
            Action::Upstream(p) => format!("upstream {}", packet(p)),
            Action::Work(Work::Check(items)) => format!("check {}", items.len()),
            Action::Work(Work::Authorize(asks)) => format!("authorize {}", asks.len()),
            Action::Note(Note::Accepted) => "accepted".into(),
            Action::Note(Note::Dropped { drop, .. }) => format!("dropped {}", drop.label),
            Action::Note(Note::FilterRefused { reason, .. }) => {
                format!("refused filter {:#x}", reason.code())
            }
            Action::Note(Note::Refused(l)) => format!("refused {l}"),
            Action::Close(e) => format!(
                "close device={:?} upstream={:?}",
                e.device.map(u8::from),
                e.upstream.map(u8::from)
            ),
        })
        .collect()
}

fn packet(p: &v5::Packet) -> String {
    match p {
        v5::Packet::Publish(p) => format!("publish {} {:?}", p.topic, p.packet_id.map(|i| i.get())),
        v5::Packet::PublishAck(a) => {
            format!("puback {} {:#x}", a.packet_id, u8::from(a.reason_code))
        }
        v5::Packet::PublishReceived(a) => format!("pubrec {}", a.packet_id),
        v5::Packet::Subscribe(s) => format!(
            "subscribe {}",
            s.topic_filters
                .iter()
                .map(|(f, _)| f.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
        v5::Packet::SubscribeAck(a) => format!(
            "suback {:?} gk={}",
            a.status.iter().map(|s| u8::from(*s)).collect::<Vec<_>>(),
            a.properties.iter().any(|(k, _)| k == GK_PROPERTY)
        ),
        v5::Packet::Disconnect(d) => format!("disconnect {:#x}", u8::from(d.reason_code)),
        v5::Packet::PingRequest => "pingreq".into(),
        v5::Packet::PingResponse => "pingresp".into(),
        other => format!("{other:?}"),
    }
}

#[test]
fn unprotected_publishes_pass_in_order_without_work() {
    let p = policy();
    let mut s = Session::new(&p, Identity::Anonymous, Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(publish("weather", 1), 1);
    s.device_packet(publish("weather", 0), 1);
    assert!(
        drain(&mut s).is_empty(),
        "gathered until the input is drained"
    );
    s.input_drained();
    assert_eq!(
        shape(&drain(&mut s)),
        [
            "upstream publish weather Some(1)",
            "upstream publish weather None"
        ]
    );
    s.upstream(Upstream::Packet(puback(1, PublishAckReason::Success)));
    assert_eq!(shape(&drain(&mut s)), ["device puback 1 0x0"]);
}

#[test]
fn an_unauthenticated_protected_publish_is_dropped_with_no_check_and_no_ca_lookup() {
    let p = policy();
    let mut s = Session::new(&p, Identity::Anonymous, Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(publish("plant/a", 7), 1);
    s.device_packet(publish("quva/k/plant/a/sub", 8), 1);
    s.input_drained();
    assert_eq!(
        shape(&drain(&mut s)),
        [
            "dropped unauthenticated",
            "device puback 7 0x87",
            "dropped reserved_topic",
            "device puback 8 0x87"
        ]
    );
}

#[test]
fn a_drop_waits_behind_the_acknowledgements_pending_upstream() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(publish("weather", 1), 1);
    s.device_packet(publish("plant/a", 2), 1);
    s.input_drained();
    assert_eq!(shape(&drain(&mut s)), ["check 1"]);
    assert!(!s.wants_device_input(), "the device waits for the verdicts");
    s.answered(
        Answer::Checked(vec![Verdict::Drop(Dropped::not_authorized("replay"))]),
        2,
    );
    assert_eq!(
        shape(&drain(&mut s)),
        ["upstream publish weather Some(1)", "dropped replay"]
    );
    // The own PUBACK for 2 goes out only after the broker's PUBACK for 1.
    s.upstream(Upstream::Packet(puback(1, PublishAckReason::Success)));
    assert_eq!(
        shape(&drain(&mut s)),
        ["device puback 1 0x0", "device puback 2 0x87"]
    );
    assert!(s.wants_device_input());
}

#[test]
fn a_batch_is_checked_as_one_piece_of_work_and_relayed_in_order() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(publish("plant/a", 1), 1);
    s.device_packet(publish("weather", 2), 1);
    s.device_packet(publish("plant/a/_q", 3), 1);
    s.input_drained();
    let actions = drain(&mut s);
    let Some(Action::Work(Work::Check(items))) = actions.first() else {
        panic!("a check first: {:?}", shape(&actions));
    };
    assert_eq!(
        items
            .iter()
            .map(|i| (i.index, i.to.clone()))
            .collect::<Vec<_>>(),
        [
            (
                0,
                Addressed::Group(GroupId::new("plant/a").unwrap(), Direction::Forward)
            ),
            (
                2,
                Addressed::Group(GroupId::new("plant/a").unwrap(), Direction::Query)
            )
        ]
    );
    s.answered(Answer::Checked(vec![Verdict::Accept, Verdict::Accept]), 2);
    assert_eq!(
        shape(&drain(&mut s)),
        [
            "accepted",
            "upstream publish plant/a Some(1)",
            "upstream publish weather Some(2)",
            "accepted",
            "upstream publish plant/a/_q Some(3)"
        ]
    );
}

#[test]
fn a_full_batch_is_submitted_at_once() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    for id in 1..=4 {
        s.device_packet(publish("plant/a", id), 1);
    }
    assert!(s.batch_full() || !s.wants_device_input());
    assert_eq!(shape(&drain(&mut s)), ["check 4"]);
}

#[test]
fn a_missing_verdict_is_a_drop_never_a_relay() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(publish("plant/a", 1), 1);
    s.input_drained();
    drain(&mut s);
    s.answered(Answer::Checked(Vec::new()), 2);
    assert_eq!(
        shape(&drain(&mut s)),
        ["dropped not_authorized", "device puback 1 0x87"]
    );
}

#[test]
fn a_packet_after_a_batch_waits_for_its_verdicts() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(publish("plant/a", 1), 1);
    s.device_packet(v5::Packet::PingRequest, 1);
    assert_eq!(shape(&drain(&mut s)), ["check 1"]);
    s.answered(Answer::Checked(vec![Verdict::Accept]), 2);
    assert_eq!(
        shape(&drain(&mut s)),
        [
            "accepted",
            "upstream publish plant/a Some(1)",
            "upstream pingreq"
        ]
    );
}

#[test]
fn a_wrong_answer_ends_the_connection_instead_of_relaying() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.answered(Answer::Checked(vec![Verdict::Accept]), 1);
    assert_eq!(
        shape(&drain(&mut s)),
        ["close device=Some(131) upstream=Some(4)"]
    );
    assert!(s.is_ended());
}

#[test]
fn subscriptions_ask_the_ca_only_for_group_filters_and_merge_the_suback() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(
        subscribe(5, &["weather/#", "plant/a", "quva/c/plant/a", "+/+"], None),
        1,
    );
    let actions = drain(&mut s);
    assert_eq!(
        shape(&actions),
        ["authorize 1"],
        "only plant/a needs the CA (membership)"
    );
    s.answered(
        Answer::Authorized(vec![Err(SubscribeRefusal::NotAuthorized)]),
        2,
    );
    assert_eq!(
        shape(&drain(&mut s)),
        [
            "refused filter 0x87",
            "refused filter 0x87",
            "upstream subscribe weather/#,quva/c/plant/a"
        ]
    );
    s.upstream(suback(
        5,
        &[
            v5::SubscribeAckReason::GrantedQos0,
            v5::SubscribeAckReason::GrantedQos0,
        ],
    ));
    assert_eq!(
        shape(&drain(&mut s)),
        ["device suback [0, 135, 0, 135] gk=false"]
    );
}

#[test]
fn an_unauthenticated_subscribe_to_protected_topics_needs_no_ca() {
    let p = policy();
    let mut s = Session::new(&p, Identity::Anonymous, Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(subscribe(6, &["plant/a", "quva/k/plant/a/sub"], None), 1);
    assert_eq!(
        shape(&drain(&mut s)),
        [
            "refused filter 0x87",
            "refused filter 0x87",
            "device suback [135, 135] gk=false"
        ]
    );
}

fn gk_request(id: &str, group: &str, role: Role) -> GroupKeyRequest {
    let ca = KeyPair::random(&mut OsRng);
    let key = KeyPair::random(&mut OsRng);
    let g = SecretScalar::random(&mut OsRng);
    GroupKeyRequest::new(
        &DeviceId::new(id).unwrap(),
        &GroupId::new(group).unwrap(),
        role,
        1,
        &key,
        &g,
        ca.public(),
        &mut OsRng,
    )
    .unwrap()
}

#[test]
fn a_join_runs_only_for_the_connections_own_request() {
    let p = policy();
    let own = gk_request("dev-1", "plant/a", Role::Subscriber).to_property();
    let someone_elses = gk_request("dev-2", "plant/a", Role::Subscriber).to_property();
    let other_role = gk_request("dev-1", "plant/a", Role::Publisher).to_property();
    for (text, asks) in [(own, 1), (someone_elses, 0), (other_role, 0)] {
        let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
        s.device_packet(subscribe(9, &["quva/k/plant/a/sub"], Some(text)), 1);
        let actions = drain(&mut s);
        if asks == 1 {
            assert_eq!(shape(&actions), ["authorize 1"]);
            let Some(Action::Work(Work::Authorize(a))) = actions.first() else {
                unreachable!()
            };
            assert!(matches!(a.first(), Some(Ask::Join(r)) if r.id().as_str() == "dev-1"));
            s.answered(Answer::Authorized(vec![Ok(Some("delivery".into()))]), 2);
            assert_eq!(
                shape(&drain(&mut s)),
                ["upstream subscribe quva/k/plant/a/sub"]
            );
            s.upstream(suback(9, &[v5::SubscribeAckReason::GrantedQos1]));
            assert_eq!(shape(&drain(&mut s)), ["device suback [1] gk=true"]);
        } else {
            assert_eq!(
                shape(&actions),
                ["refused filter 0x87", "device suback [135] gk=false"]
            );
        }
    }
}

#[test]
fn a_misplaced_wildcard_is_a_malformed_packet() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(subscribe(4, &["weather", "app/a#"], None), 1);
    assert_eq!(
        shape(&drain(&mut s)),
        [
            "refused malformed",
            "close device=Some(129) upstream=Some(4)"
        ]
    );
}

#[test]
fn the_gk_property_never_reaches_the_broker() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(subscribe(3, &["weather"], Some("whatever".into())), 1);
    let actions = drain(&mut s);
    let Some(Action::Upstream(v5::Packet::Subscribe(sub))) = actions.first() else {
        panic!("{:?}", shape(&actions));
    };
    assert!(sub.user_properties.is_empty());
}

#[test]
fn silence_beyond_the_limit_ends_the_connection_as_abnormal_upstream() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    assert_eq!(s.deadline_ms(), Some(1_500));
    s.device_packet(v5::Packet::PingRequest, 1_000);
    assert_eq!(s.deadline_ms(), Some(2_500));
    s.tick(2_499);
    assert_eq!(shape(&drain(&mut s)), ["upstream pingreq"]);
    s.tick(2_500);
    assert_eq!(
        shape(&drain(&mut s)),
        [
            "refused keep_alive",
            "close device=Some(141) upstream=Some(4)"
        ]
    );
    assert_eq!(s.deadline_ms(), None);
}

#[test]
fn waiting_for_work_is_not_idleness() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(publish("plant/a", 1), 0);
    s.input_drained();
    drain(&mut s);
    s.tick(10_000);
    assert!(!s.is_ended());
    s.answered(Answer::Checked(vec![Verdict::Accept]), 10_000);
    s.tick(10_001);
    assert!(!s.is_ended());
}

#[test]
fn a_normal_disconnect_is_relayed_and_nothing_else_is_sent_upstream() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(disconnect(DisconnectReasonCode::NormalDisconnection), 1);
    assert_eq!(
        shape(&drain(&mut s)),
        ["upstream disconnect 0x0", "close device=None upstream=None"]
    );
    s.device_packet(publish("weather", 1), 2);
    assert!(drain(&mut s).is_empty(), "nothing after the end");
}

#[test]
fn ends_the_bridge_decides_are_abnormal_upstream_so_wills_are_published() {
    let p = policy();
    type Event = fn(&mut Session<'_>);
    let cases: [(&str, Event, u8); 5] = [
        ("kick", |s| s.kick(), 0x87),
        ("shutdown", |s| s.shutdown(), 0x8B),
        (
            "oversize",
            |s| s.device_failed(DeviceFailure::Oversize),
            0x95,
        ),
        (
            "malformed",
            |s| s.device_failed(DeviceFailure::Malformed),
            0x81,
        ),
        (
            "auth",
            |s| s.device_packet(v5::Packet::PingResponse, 1),
            0x82,
        ),
    ];
    for (name, event, code) in cases {
        let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
        event(&mut s);
        let actions = drain(&mut s);
        let Some(Action::Close(e)) = actions.last() else {
            panic!("{name}: {:?}", shape(&actions));
        };
        assert_eq!(e.device.map(u8::from), Some(code), "{name}");
        assert_eq!(e.upstream.map(u8::from), Some(0x04), "{name}");
    }
    // The device going away is abnormal by itself: nothing to say to anyone.
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_failed(DeviceFailure::Gone);
    assert_eq!(shape(&drain(&mut s)), ["close device=None upstream=None"]);
}

#[test]
fn what_the_device_sent_before_an_error_is_still_checked_and_relayed() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(publish("plant/a", 1), 1);
    s.device_failed(DeviceFailure::Malformed);
    assert_eq!(shape(&drain(&mut s)), ["refused malformed", "check 1"]);
    s.answered(Answer::Checked(vec![Verdict::Accept]), 2);
    assert_eq!(
        shape(&drain(&mut s)),
        [
            "accepted",
            "upstream publish plant/a Some(1)",
            "close device=Some(129) upstream=Some(4)"
        ]
    );
}

#[test]
fn an_unknown_topic_alias_ends_the_connection() {
    let p = policy();
    let mut s = Session::new(&p, Identity::Anonymous, Dialect::Mqtt5, LIMITS, 0);
    let v5::Packet::Publish(mut pkt) = publish("", 1) else {
        unreachable!()
    };
    if let Some(props) = pkt.properties.as_mut() {
        props.topic_alias = NonZeroU16::new(3);
    }
    s.device_packet(v5::Packet::Publish(pkt), 1);
    assert_eq!(
        shape(&drain(&mut s)),
        ["close device=Some(130) upstream=Some(4)"]
    );
}

#[test]
fn the_brokers_traffic_reaches_the_device_and_its_disconnect_ends_quietly() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.upstream(Upstream::Publish(Bytes::from_static(b"\x30\x03\x00\x01a")));
    s.upstream(Upstream::Packet(v5::Packet::PingResponse));
    s.upstream(Upstream::Packet(disconnect(
        DisconnectReasonCode::SessionTakenOver,
    )));
    assert_eq!(
        shape(&drain(&mut s)),
        [
            "device raw 5",
            "device pingresp",
            "device disconnect 0x8e",
            "close device=None upstream=None"
        ]
    );
}

#[test]
fn a_broker_that_goes_away_or_speaks_nonsense_ends_the_connection() {
    let p = policy();
    for (failure, code) in [
        (UpstreamFailure::Closed, None),
        (UpstreamFailure::Malformed, Some(0x80)),
    ] {
        let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
        s.upstream_failed(failure);
        let actions = drain(&mut s);
        assert!(matches!(actions.as_slice(), [Action::Close(e)] if e.device.map(u8::from) == code));
    }
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.upstream(Upstream::Packet(v5::Packet::ConnectAck(Box::default())));
    assert!(s.is_ended());
}

#[test]
fn a_kick_while_work_is_outstanding_ends_at_once() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(publish("plant/a", 1), 1);
    s.input_drained();
    drain(&mut s);
    s.kick();
    assert_eq!(
        shape(&drain(&mut s)),
        ["close device=Some(135) upstream=Some(4)"]
    );
    s.answered(Answer::Checked(vec![Verdict::Accept]), 2);
    assert!(drain(&mut s).is_empty(), "the late verdict relays nothing");
}

#[test]
fn direct_messages_are_checked_for_devices_and_dropped_for_anyone_else() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(publish("quva/d/dev-2", 1), 1);
    s.input_drained();
    let actions = drain(&mut s);
    let Some(Action::Work(Work::Check(items))) = actions.first() else {
        panic!("{:?}", shape(&actions));
    };
    assert_eq!(
        items.first().map(|i| i.to.clone()),
        Some(Addressed::Direct(DeviceId::new("dev-2").unwrap()))
    );
    for identity in [
        Identity::Anonymous,
        Identity::Group(GroupId::new("plant/a").unwrap(), Role::Publisher),
    ] {
        let mut s = Session::new(&p, identity, Dialect::Mqtt5, LIMITS, 0);
        s.device_packet(publish("quva/d/dev-2", 1), 1);
        s.input_drained();
        let actions = shape(&drain(&mut s));
        assert_eq!(
            actions.last().map(String::as_str),
            Some("device puback 1 0x87")
        );
        assert!(!actions.iter().any(|a| a.starts_with("check")));
    }
}

fn retained(topic: &str, id: u16) -> v5::Packet {
    let v5::Packet::Publish(mut p) = publish(topic, id) else {
        unreachable!()
    };
    p.retain = true;
    v5::Packet::Publish(p)
}

#[test]
fn ota_items_go_to_the_checks_only_from_the_signers_device_connection() {
    let p = policy();
    let m = "plant/a/_ota/rel-1/7/m";
    let k = "plant/a/_ota/rel-1/7/k";
    let c = "plant/a/_ota/rel-1/7/c/0";
    // The signer, retained (as OTA items are published): all three are checked.
    let mut s = Session::new(&p, device("rel-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(retained(m, 1), 1);
    s.device_packet(retained(k, 2), 1);
    s.device_packet(retained(c, 3), 1);
    s.input_drained();
    let actions = drain(&mut s);
    let Some(Action::Work(Work::Check(items))) = actions.first() else {
        panic!("{:?}", shape(&actions));
    };
    let to: Vec<Addressed> = items.iter().map(|i| i.to.clone()).collect();
    let ota = |t: &str| Addressed::Ota(quva_client::topics::OtaTopic::parse(t).unwrap());
    assert_eq!(to, vec![ota(m), ota(k), ota(c)]);
    // Every item is fetched as its group's (the checks need the group's members).
    assert!(
        items
            .iter()
            .all(|i| i.group() == Some(&GroupId::new("plant/a").unwrap()))
    );
    s.answered(
        Answer::Checked(vec![
            Verdict::Accept,
            Verdict::Accept,
            Verdict::Drop(Dropped::not_authorized("ota_unknown_release")),
        ]),
        2,
    );
    assert_eq!(
        shape(&drain(&mut s)),
        [
            "accepted",
            "upstream publish plant/a/_ota/rel-1/7/m Some(1)",
            "accepted",
            "upstream publish plant/a/_ota/rel-1/7/k Some(2)",
            "dropped ota_unknown_release",
        ]
    );

    // Anyone else under rel-1's topics: refused at once, no check, no CA lookup.
    for (identity, label) in [
        (device("rel-2"), "ota_not_signer"),
        (
            Identity::Group(GroupId::new("plant/a").unwrap(), Role::Publisher),
            "ota_not_signer",
        ),
        (Identity::Anonymous, "unauthenticated"),
    ] {
        for t in [m, k, c] {
            let mut s = Session::new(&p, identity.clone(), Dialect::Mqtt5, LIMITS, 0);
            s.device_packet(retained(t, 9), 1);
            s.input_drained();
            assert_eq!(
                shape(&drain(&mut s)),
                [
                    format!("dropped {label}"),
                    "device puback 9 0x87".to_owned()
                ],
                "{identity:?} on {t}"
            );
        }
    }
}

#[test]
fn anything_else_under_ota_and_retained_group_messages_are_refused() {
    let p = policy();
    let mut s = Session::new(&p, device("rel-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(publish("plant/a/_ota/rel-1/7/x", 1), 1);
    s.device_packet(publish("plant/a/_ota/rel-1/07/m", 2), 1);
    s.device_packet(publish("plant/a/_ota/rel-1/7/c/x", 3), 1);
    s.device_packet(retained("plant/a", 4), 1);
    s.input_drained();
    assert_eq!(
        shape(&drain(&mut s)),
        [
            "dropped ota_topic",
            "device puback 1 0x87",
            "dropped ota_topic",
            "device puback 2 0x87",
            "dropped ota_topic",
            "device puback 3 0x87",
            "dropped retained",
            "device puback 4 0x87",
        ]
    );
}

#[test]
fn ota_subscriptions_are_for_the_groups_subscribers() {
    let p = policy();
    let mut s = Session::new(&p, device("dev-1"), Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(
        subscribe(
            5,
            &["plant/a/_ota/#", "plant/a/_ota/rel-1/7/m", "plant/+/_ota/#"],
            None,
        ),
        1,
    );
    let actions = drain(&mut s);
    let Some(Action::Work(Work::Authorize(asks))) = actions.first() else {
        panic!("{:?}", shape(&actions));
    };
    let g = GroupId::new("plant/a").unwrap();
    assert!(
        matches!(&asks[..], [Ask::Member(a, Role::Subscriber), Ask::Member(b, Role::Subscriber)] if *a == g && *b == g)
    );
    // A non-member is refused both; the cross-group wildcard was refused without asking.
    s.answered(
        Answer::Authorized(vec![
            Err(SubscribeRefusal::NotAuthorized),
            Err(SubscribeRefusal::NotAuthorized),
        ]),
        2,
    );
    assert_eq!(
        shape(&drain(&mut s)),
        [
            "refused filter 0x87",
            "refused filter 0x87",
            "refused filter 0x87",
            "device suback [135, 135, 135] gk=false"
        ]
    );
}

// -------------------------------------------------------------------------------------------
// MQTT 3.1.1: the same machine, packets through the dialect adapter.
// -------------------------------------------------------------------------------------------

fn v3_in(s: &mut Session<'_>, p: rmqtt_codec::v3::Packet, now: u64) {
    s.device_packet(crate::dialect::to_v5(p), now);
}

/// What an MQTT 3.1.1 device and its broker connection would see of the actions.
fn v3_shape(actions: Vec<Action>) -> Vec<String> {
    actions
        .into_iter()
        .map(|a| match a {
            Action::Device(Out::Packet(p)) => match crate::dialect::to_v3(p) {
                Some(p) => format!("device {p:?}"),
                None => "device nothing".into(),
            },
            Action::Upstream(p) => match crate::dialect::to_v3(p) {
                Some(p) => format!("upstream {p:?}"),
                None => "upstream nothing".into(),
            },
            Action::Close(e) => format!(
                "close device={} upstream={}",
                e.device
                    .and_then(|c| crate::dialect::to_v3(disconnect(c)))
                    .is_some(),
                e.upstream
                    .and_then(|c| crate::dialect::to_v3(disconnect(c)))
                    .is_some()
            ),
            other => shape(&[other]).concat(),
        })
        .collect()
}

fn v3_publish(topic: &str, id: u16) -> rmqtt_codec::v3::Packet {
    rmqtt_codec::v3::Packet::Publish(Box::new(Publish {
        dup: false,
        retain: false,
        qos: if id == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        },
        topic: topic.into(),
        packet_id: NonZeroU16::new(id),
        payload: Bytes::from_static(b"m"),
        properties: None,
    }))
}

#[test]
fn mqtt311_a_refused_publish_ends_the_connection_unacknowledged_after_what_came_before() {
    let p = policy();
    for topic in [
        "plant/a",
        "quva/k/plant/a/sub",
        "quva/d/dev-1",
        "plant/a/_ota/s/1/m",
    ] {
        let mut s = Session::new(&p, Identity::Anonymous, Dialect::Mqtt311, LIMITS, 0);
        v3_in(&mut s, v3_publish("weather", 1), 1);
        v3_in(&mut s, v3_publish(topic, 2), 1);
        v3_in(&mut s, v3_publish("weather", 3), 1);
        s.input_drained();
        let out = v3_shape(drain(&mut s));
        assert_eq!(out.len(), 3, "{topic}: {out:?}");
        assert!(out[0].starts_with("upstream Publish"), "{out:?}");
        assert!(out[1].starts_with("dropped "), "{out:?}");
        // Nothing to either side: no PUBACK, no DISCONNECT; the broker sees an abnormal end and
        // publishes the Will.
        assert_eq!(out[2], "close device=false upstream=false", "{topic}");
        assert!(s.is_ended());
    }
    // The same PUBLISH over MQTT 5 is refused with a PUBACK and the connection stays.
    let mut s = Session::new(&p, Identity::Anonymous, Dialect::Mqtt5, LIMITS, 0);
    s.device_packet(publish("plant/a", 2), 1);
    s.input_drained();
    assert_eq!(
        shape(&drain(&mut s)),
        ["dropped unauthenticated", "device puback 2 0x87"]
    );
    assert!(!s.is_ended());
}

#[test]
fn mqtt311_acknowledgements_and_subscriptions_flow_through_the_adapter() {
    use rmqtt_codec::v3::{Packet as P3, SubscribeReturnCode as C};
    let p = policy();
    let mut s = Session::new(&p, Identity::Anonymous, Dialect::Mqtt311, LIMITS, 0);
    v3_in(&mut s, v3_publish("weather", 5), 1);
    s.input_drained();
    assert_eq!(drain(&mut s).len(), 1);
    let id = |n| NonZeroU16::new(n).unwrap();
    s.upstream(Upstream::Packet(crate::dialect::to_v5(P3::PublishAck {
        packet_id: id(5),
    })));
    assert_eq!(
        v3_shape(drain(&mut s)),
        [format!("device {:?}", P3::PublishAck { packet_id: id(5) })]
    );
    // A misplaced wildcard is one refused filter, not a malformed packet: the rest go upstream
    // and the failures take their places in the broker's SUBACK.
    v3_in(
        &mut s,
        P3::Subscribe {
            packet_id: id(9),
            topic_filters: vec![
                ("a#".into(), QoS::AtLeastOnce),
                ("weather/#".into(), QoS::AtLeastOnce),
                ("plant/a".into(), QoS::AtMostOnce),
                ("+/+".into(), QoS::AtMostOnce),
            ],
        },
        2,
    );
    let out = v3_shape(drain(&mut s));
    let upstream = format!(
        "upstream {:?}",
        P3::Subscribe {
            packet_id: id(9),
            topic_filters: vec![("weather/#".into(), QoS::AtLeastOnce)],
        }
    );
    assert_eq!(
        out,
        [
            "refused filter 0x8f".to_string(),
            "refused filter 0x87".into(),
            "refused filter 0x87".into(),
            upstream
        ]
    );
    s.upstream(Upstream::Packet(crate::dialect::to_v5(P3::SubscribeAck {
        packet_id: id(9),
        status: vec![C::Success(QoS::AtLeastOnce)],
    })));
    let merged = P3::SubscribeAck {
        packet_id: id(9),
        status: vec![
            C::Failure,
            C::Success(QoS::AtLeastOnce),
            C::Failure,
            C::Failure,
        ],
    };
    assert_eq!(v3_shape(drain(&mut s)), [format!("device {merged:?}")]);
    // Every filter refused: the bridge answers alone.
    v3_in(
        &mut s,
        P3::Subscribe {
            packet_id: id(10),
            topic_filters: vec![("quva/#".into(), QoS::AtMostOnce)],
        },
        3,
    );
    let alone = P3::SubscribeAck {
        packet_id: id(10),
        status: vec![C::Failure],
    };
    assert_eq!(
        v3_shape(drain(&mut s)),
        [
            "refused filter 0x87".to_string(),
            format!("device {alone:?}")
        ]
    );
    assert!(!s.is_ended());
    // The client's DISCONNECT is relayed as one (no Will); then both sides close.
    v3_in(&mut s, P3::Disconnect, 4);
    assert_eq!(
        v3_shape(drain(&mut s)),
        [
            format!("upstream {:?}", P3::Disconnect),
            "close device=false upstream=false".into()
        ]
    );
}

#[test]
fn mqtt311_silence_server_packets_and_shutdown_end_with_no_last_words() {
    use rmqtt_codec::v3::Packet as P3;
    let p = policy();
    let mut s = Session::new(&p, Identity::Anonymous, Dialect::Mqtt311, LIMITS, 0);
    s.tick(1_499);
    assert!(drain(&mut s).is_empty());
    s.tick(1_500);
    assert_eq!(
        v3_shape(drain(&mut s)),
        ["refused keep_alive", "close device=false upstream=false"]
    );
    for server_packet in [
        P3::PingResponse,
        P3::UnsubscribeAck {
            packet_id: NonZeroU16::MIN,
        },
        P3::ConnectAck(rmqtt_codec::v3::ConnectAck {
            return_code: rmqtt_codec::v3::ConnectAckReason::ConnectionAccepted,
            session_present: false,
        }),
    ] {
        let mut s = Session::new(&p, Identity::Anonymous, Dialect::Mqtt311, LIMITS, 0);
        v3_in(&mut s, server_packet, 1);
        assert_eq!(
            v3_shape(drain(&mut s)),
            ["refused protocol", "close device=false upstream=false"]
        );
    }
    let mut s = Session::new(&p, Identity::Anonymous, Dialect::Mqtt311, LIMITS, 0);
    s.shutdown();
    assert_eq!(
        v3_shape(drain(&mut s)),
        ["close device=false upstream=false"]
    );
}
