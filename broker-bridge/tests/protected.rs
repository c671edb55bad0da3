//! Protected traffic through the bridge: enrollment, group keys, PUBLISH checks and notices, with
//! an in-memory CA, a real Mosquitto and rumqttc/raw MQTT 5 devices.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/broker.rs"]
mod broker;
#[path = "support/devices.rs"]
mod devices;
#[path = "support/test_ca.rs"]
mod test_ca;

use std::sync::Arc;
use std::time::Duration;

use broker::{Mosquitto, Raw, config, pinned, start_bridge};
use devices::{cert_proof, connect, enroll, puback, sealer};
use quva_bridge::now_ms;
use quva_client::enrollment::{Credentials, METHOD_CERT};
use quva_client::group::{AcceptedGroupKey, Privacy};
use quva_client::ids::{Epoch, GroupId, Role};
use rand_core::OsRng;
use rmqtt_codec::v5;
use test_ca::TestCa;

const GROUP: &str = "plant/a";

struct World {
    broker: Mosquitto,
    bridge: quva_bridge::Bridge,
    ca: Arc<TestCa>,
    publisher: Credentials,
    subscriber: Credentials,
    outsider: Credentials,
    pub_raw: Raw,
    sub_raw: Raw,
    observer: Raw,
    d_s: AcceptedGroupKey,
    d_p: AcceptedGroupKey,
}

async fn world() -> World {
    let broker = Mosquitto::start().await;
    let ca = TestCa::new();
    ca.create_group(GROUP, Privacy::Standard);
    ca.allow(GROUP, "pub-1", Role::Publisher);
    ca.allow(GROUP, "sub-1", Role::Subscriber);
    let bridge = start_bridge(
        pinned(config(broker.addr), ca.key.public()),
        Some(Arc::new(test_ca::Client(ca.clone()))),
    )
    .await;
    let addr = bridge.local_addr();
    let publisher = enroll(addr, &ca, "pub-1").await;
    let subscriber = enroll(addr, &ca, "sub-1").await;
    let outsider = enroll(addr, &ca, "other").await;
    let mut sub_raw = connect(addr, &subscriber, "sub-1-c").await;
    let d_p = devices::join(&mut sub_raw, &ca, &subscriber, GROUP, Role::Subscriber, 1).await;
    let mut pub_raw = connect(addr, &publisher, "pub-1-c").await;
    let d_s = devices::join(&mut pub_raw, &ca, &publisher, GROUP, Role::Publisher, 1).await;
    // The subscriber's current key after the publisher joined (epoch 2).
    let d_p = {
        let keys = ca.keys(GROUP);
        assert_eq!(keys.group_info().epoch, Epoch(2));
        let _ = d_p;
        devices::join(&mut sub_raw, &ca, &subscriber, GROUP, Role::Subscriber, 2).await
    };
    let ack = sub_raw.subscribe(3, GROUP, vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::GrantedQos1]);
    // An observer straight on the broker sees what the bridge let through.
    let (mut observer, _) = Raw::connect(broker.addr, "observer", None).await;
    let ack = observer.subscribe(1, "plant/#", vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::GrantedQos1]);
    World {
        broker,
        bridge,
        ca,
        publisher,
        subscriber,
        outsider,
        pub_raw,
        sub_raw,
        observer,
        d_s,
        d_p,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_devices_join_and_exchange_protected_messages() {
    let mut w = world().await;
    let group = GroupId::new(GROUP).unwrap();
    let epoch = w.d_p.epoch();
    assert_eq!(w.d_s.epoch(), Epoch(2));
    let sender = w.publisher.id().clone();
    let s = sealer(&group, epoch, &sender, w.publisher.key());
    let now = now_ms();
    let mut rng = OsRng;
    let q_p = w.d_p.info().q_p;
    let m1 = s.option1(now, b"one", &mut rng).unwrap();
    let m2 = s.option2(now, &q_p, b"two", &mut rng).unwrap();
    let m3 = s
        .option3(now, w.d_s.key(), &q_p, b"three", &mut rng)
        .unwrap();
    // Several QoS 1 PUBLISHes back to back: verified as one batch, acknowledged in order.
    for (i, m) in [&m1, &m2, &m3].into_iter().enumerate() {
        w.pub_raw
            .publish(GROUP, m.clone(), Some(10 + i as u16))
            .await;
    }
    for i in 0..3 {
        assert_eq!(puback(&mut w.pub_raw, 10 + i).await, 0);
    }
    let got: Vec<Vec<u8>> = w
        .sub_raw
        .drain_publishes(Duration::from_millis(500))
        .await
        .into_iter()
        .filter(|(t, _)| t == GROUP)
        .map(|(_, p)| p)
        .collect();
    assert_eq!(got, vec![m1.clone(), m2.clone(), m3.clone()]);
    let seen: Vec<Vec<u8>> = w
        .observer
        .drain_publishes(Duration::from_millis(200))
        .await
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(seen, vec![m1, m2, m3]);
    assert_eq!(w.bridge.metrics().accepted_count(), 3);
    // Access control: the subscriber may not subscribe to queries, nor anyone to wildcards
    // covering groups; an outsider may not subscribe to the data topic.
    let ack = w.sub_raw.subscribe(20, "plant/a/_q", vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::NotAuthorized]);
    let ack = w.sub_raw.subscribe(21, "plant/#", vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::NotAuthorized]);
    let mut out = connect(w.bridge.local_addr(), &w.outsider, "other-c").await;
    let ack = out.subscribe(1, GROUP, vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::NotAuthorized]);
    // The publisher may query-subscribe.
    let ack = w.pub_raw.subscribe(22, "plant/a/_q", vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::GrantedQos1]);
    // A replayed CONNECT proof is refused.
    let proof = cert_proof(&w.publisher, "pub-x");
    let (_a, ack) = Raw::connect(
        w.bridge.local_addr(),
        "pub-x",
        Some((METHOD_CERT, proof.clone())),
    )
    .await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    let (_b, ack) = Raw::connect(w.bridge.local_addr(), "pub-x", Some((METHOD_CERT, proof))).await;
    assert_eq!(u8::from(ack.reason_code), 0x87);
    drop(w.broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bridge_rejection_reason_drops_the_message() {
    let mut w = world().await;
    let group = GroupId::new(GROUP).unwrap();
    let epoch = w.d_p.epoch();
    let sender = w.publisher.id().clone();
    let s = sealer(&group, epoch, &sender, w.publisher.key());
    let now = now_ms();
    let mut rng = OsRng;
    let good = s.option1(now, b"ok", &mut rng).unwrap();
    let mut bad_sig = s.option1(now, b"x", &mut rng).unwrap();
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 1;
    let unknown = GroupId::new("plant/zzz").unwrap();
    let sub_id = w.subscriber.id().clone();
    let mut cases: Vec<(&str, Vec<u8>, u8, &str)> = vec![
        ("malformed", b"garbage".to_vec(), 0x99, GROUP),
        ("too_large", vec![1u8; 20 * 1024], 0x99, GROUP),
        (
            "wrong_epoch",
            sealer(&group, Epoch(epoch.0 + 5), &sender, w.publisher.key())
                .option1(now, b"x", &mut rng)
                .unwrap(),
            0x87,
            GROUP,
        ),
        (
            "stale_timestamp",
            s.option1(now - 120_000, b"x", &mut rng).unwrap(),
            0x87,
            GROUP,
        ),
        (
            "future_timestamp",
            s.option1(now + 120_000, b"x", &mut rng).unwrap(),
            0x87,
            GROUP,
        ),
        ("bad_signature", bad_sig, 0x87, GROUP),
        (
            "unknown_group",
            sealer(&unknown, epoch, &sender, w.publisher.key())
                .option1(now, b"x", &mut rng)
                .unwrap(),
            0x87,
            "plant/zzz",
        ),
        (
            "sender_mismatch",
            sealer(&group, epoch, &sub_id, w.publisher.key())
                .option1(now, b"x", &mut rng)
                .unwrap(),
            0x87,
            GROUP,
        ),
        ("topic_mismatch", good.clone(), 0x87, "plant/b"),
    ];
    cases.push(("replayed", good.clone(), 0x87, GROUP));
    w.pub_raw.publish(GROUP, good.clone(), Some(99)).await;
    assert_eq!(puback(&mut w.pub_raw, 99).await, 0);
    for (i, (label, payload, code, topic)) in cases.into_iter().enumerate() {
        let id = 100 + i as u16;
        w.pub_raw.publish(topic, payload, Some(id)).await;
        assert_eq!(puback(&mut w.pub_raw, id).await, code, "{label}");
        assert_eq!(w.bridge.metrics().dropped_count(label), 1, "{label}");
    }
    // not_member: the subscriber sends forward traffic as itself.
    let d_i = w.subscriber.key();
    let m = sealer(&group, epoch, &sub_id, d_i)
        .option1(now, b"x", &mut rng)
        .unwrap();
    w.sub_raw.publish(GROUP, m, Some(50)).await;
    assert_eq!(puback(&mut w.sub_raw, 50).await, 0x87);
    assert_eq!(w.bridge.metrics().dropped_count("not_member"), 1);
    // unknown_sender: an enrolled device without any membership.
    let mut out = connect(w.bridge.local_addr(), &w.outsider, "other-c").await;
    let oid = w.outsider.id().clone();
    let m = sealer(&group, epoch, &oid, w.outsider.key())
        .option1(now, b"x", &mut rng)
        .unwrap();
    out.publish(GROUP, m, Some(1)).await;
    assert_eq!(puback(&mut out, 1).await, 0x87);
    assert_eq!(w.bridge.metrics().dropped_count("unknown_sender"), 1);
    // Reserved topics and unauthenticated connections.
    w.pub_raw
        .publish("quva/k/plant/a/sub", b"x".to_vec(), Some(200))
        .await;
    assert_eq!(puback(&mut w.pub_raw, 200).await, 0x87);
    let (mut anon, _) = Raw::connect(w.bridge.local_addr(), "anon", None).await;
    anon.publish(GROUP, good.clone(), Some(1)).await;
    assert_eq!(puback(&mut anon, 1).await, 0x87);
    // The broker saw only the one valid message.
    let seen: Vec<Vec<u8>> = w
        .observer
        .drain_publishes(Duration::from_millis(300))
        .await
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(seen, vec![good]);
    let _ = &w.ca;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_and_certificate_lists_are_published_retained_and_resume() {
    let w = world().await;
    // The joins produced GroupUpdated notices: the certificate list is retained on quva/c/<group>.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut late, _) = Raw::connect(w.broker.addr, "late", None).await;
    late.subscribe(1, "quva/#", vec![]).await;
    let got = late.drain_publishes(Duration::from_millis(500)).await;
    let list = got
        .iter()
        .find(|(t, _)| t == "quva/c/plant/a")
        .expect("certificate list retained");
    assert_eq!(list.1[0], 1);
    // A rekey notice is published retained on its key topic.
    w.ca.push_notice(
        GROUP,
        3,
        quva_bridge::ca::NoticeAction::Rekey {
            topic: "quva/k/plant/a/sub".into(),
            payload: vec![1, 2, 3],
        },
    );
    let got = late.drain_publishes(Duration::from_millis(800)).await;
    assert!(got.contains(&("quva/k/plant/a/sub".to_string(), vec![1, 2, 3])));
    // The CA goes away and comes back: the bridge resumes after the last notice, once.
    w.ca.up.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    w.ca.up.store(true, std::sync::atomic::Ordering::SeqCst);
    w.ca.push_notice(
        GROUP,
        3,
        quva_bridge::ca::NoticeAction::Rekey {
            topic: "quva/k/plant/a/pub".into(),
            payload: vec![4],
        },
    );
    let got = late.drain_publishes(Duration::from_secs(3)).await;
    assert_eq!(
        got,
        vec![("quva/k/plant/a/pub".to_string(), vec![4])],
        "resumed exactly after the last notice"
    );
}
