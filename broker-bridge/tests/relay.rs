//! The relay over real sockets: a Mosquitto started by the test, the bridge in front of it,
//! rumqttc and raw MQTT clients as devices.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/broker.rs"]
mod broker;
#[path = "support/test_ca.rs"]
mod test_ca;

use std::sync::Arc;
use std::time::Duration;

use broker::{Mosquitto, Raw, config, pinned, start_bridge};
use rmqtt_codec::v5;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

async fn rumqttc_v5(addr: std::net::SocketAddr, id: &str) -> (AsyncClient, rumqttc::v5::EventLoop) {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(10));
    AsyncClient::new(opts, 16)
}

/// Polls until a PUBLISH arrives (or the deadline passes).
async fn next_publish(ev: &mut rumqttc::v5::EventLoop) -> Option<(String, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                return Some((String::from_utf8_lossy(&p.topic).into(), p.payload.to_vec()));
            }
            Ok(Ok(_)) => {}
            _ => return None,
        }
    }
}

async fn until_suback(ev: &mut rumqttc::v5::EventLoop) {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => return,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprotected_traffic_passes_through_for_mqtt5_clients() {
    let broker = Mosquitto::start().await;
    let bridge = start_bridge(config(broker.addr), None).await;
    let (sub, mut sub_ev) = rumqttc_v5(bridge.local_addr(), "sub-1").await;
    sub.subscribe("weather/today", QoS::AtLeastOnce)
        .await
        .unwrap();
    until_suback(&mut sub_ev).await;
    let (publ, mut pub_ev) = rumqttc_v5(bridge.local_addr(), "pub-1").await;
    publ.publish("weather/today", QoS::AtLeastOnce, false, "sunny")
        .await
        .unwrap();
    tokio::spawn(async move { while pub_ev.poll().await.is_ok() {} });
    let got = next_publish(&mut sub_ev).await;
    assert_eq!(got, Some(("weather/today".into(), b"sunny".to_vec())));
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_clients_relay_unprotected_topics_only() {
    let broker = Mosquitto::start().await;
    let bridge = start_bridge(config(broker.addr), None).await;
    let addr = bridge.local_addr();
    let mut opts = rumqttc::MqttOptions::new("v3-sub", addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(10));
    let (sub, mut ev) = rumqttc::AsyncClient::new(opts, 16);
    sub.subscribe("weather/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    sub.subscribe("plant/a", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut codes = Vec::new();
    while codes.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), ev.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)))) => {
                codes.push(a.return_codes[0]);
            }
            Ok(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        codes,
        vec![
            rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
            rumqttc::SubscribeReasonCode::Failure
        ]
    );
    let (mut raw, ack) = Raw::connect(addr, "v5-pub", None).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    raw.publish("weather/x", b"cloudy".to_vec(), None).await;
    let got = loop {
        match tokio::time::timeout(Duration::from_secs(5), ev.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => break p,
            Ok(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(&got.payload[..], b"cloudy");
    // A protected PUBLISH cannot be refused in MQTT 3.1.1: the bridge closes that connection.
    sub.publish("plant/a", rumqttc::QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    let mut closed = false;
    for _ in 0..20 {
        match tokio::time::timeout(Duration::from_secs(5), ev.poll()).await {
            Ok(Ok(_)) => {}
            _ => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed);
    assert_eq!(bridge.metrics().dropped_count("unauthenticated"), 1);
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_are_cut_off_alone() {
    let broker = Mosquitto::start().await;
    let bridge = start_bridge(config(broker.addr), None).await;
    let addr = bridge.local_addr();
    // A healthy subscriber that must keep working throughout.
    let (mut good, _) = Raw::connect(addr, "good", None).await;
    let ack = good.subscribe(1, "weather/#", vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::GrantedQos1]);

    // Oversize: a PUBLISH larger than the limit gets DISCONNECT 0x95.
    let (mut big, ack) = Raw::connect(addr, "big", None).await;
    assert_eq!(ack.max_packet_size, Some(64 * 1024));
    big.publish("weather/x", vec![0u8; 80 * 1024], None).await;
    match big.recv().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::PacketTooLarge);
        }
        other => panic!("{other:?}"),
    }
    assert!(big.closed().await);

    // Malformed: a SUBSCRIBE with reserved flags and garbage.
    let (mut bad, _) = Raw::connect(addr, "bad", None).await;
    bad.send_bytes(&[0x82, 0x03, 0x00, 0x00, 0xff]).await;
    match bad.recv().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::MalformedPacket);
        }
        other => panic!("{other:?}"),
    }
    assert!(bad.closed().await);

    // Not MQTT at all, and a half-open connection that never sends CONNECT.
    let mut junk = Raw::tcp(addr).await;
    junk.send_bytes(b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(junk.closed().await);
    let mut silent = Raw::tcp(addr).await;
    assert!(silent.closed().await, "half-open connection not closed");

    // Topic aliases from a device resolve in the bridge (it must see the topic to classify a
    // PUBLISH); an alias that was never set is a protocol error (MQTT 5 §3.3.4).
    let (mut alias, ack) = Raw::connect(addr, "alias", None).await;
    assert_eq!(ack.topic_alias_max, 32);
    let aliased = |topic: &str, alias: u16, body: &'static [u8]| rmqtt_codec::types::Publish {
        dup: false,
        retain: false,
        qos: rmqtt_codec::types::QoS::AtMostOnce,
        topic: topic.into(),
        packet_id: None,
        payload: bytes::Bytes::from_static(body),
        properties: Some(v5::PublishProperties {
            topic_alias: std::num::NonZeroU16::new(alias),
            ..Default::default()
        }),
    };
    alias
        .send(v5::Packet::Publish(Box::new(aliased(
            "weather/x",
            1,
            b"set",
        ))))
        .await;
    alias
        .send(v5::Packet::Publish(Box::new(aliased("", 1, b"used"))))
        .await;
    alias
        .send(v5::Packet::Publish(Box::new(aliased("", 2, b"unset"))))
        .await;
    match alias.recv().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::ProtocolError);
        }
        other => panic!("{other:?}"),
    }

    // The good client still works.
    let (mut p, _) = Raw::connect(addr, "pub", None).await;
    p.publish("weather/ok", b"fine".to_vec(), Some(7)).await;
    match p.recv().await {
        Some(v5::Packet::PublishAck(a)) => assert_eq!(a.packet_id.get(), 7),
        other => panic!("{other:?}"),
    }
    let got = good.drain_publishes(Duration::from_millis(500)).await;
    assert_eq!(
        got,
        vec![
            ("weather/x".to_string(), b"set".to_vec()),
            ("weather/x".to_string(), b"used".to_vec()),
            ("weather/ok".to_string(), b"fine".to_vec())
        ]
    );
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_methods_and_ca_failures_map_to_connack_codes() {
    let broker = Mosquitto::start().await;
    let ca = test_ca::TestCa::new();
    let bridge = start_bridge(
        pinned(config(broker.addr), ca.key.public()),
        Some(Arc::new(test_ca::Client(ca.clone()))),
    )
    .await;
    let addr = bridge.local_addr();
    let (_c, ack) = Raw::connect(addr, "x1", Some(("something-else", vec![1]))).await;
    assert_eq!(u8::from(ack.reason_code), 0x8C);
    let (_c, ack) = Raw::connect(addr, "x2", Some(("quva-enroll-v1", vec![1, 2, 3]))).await;
    assert_eq!(u8::from(ack.reason_code), 0x99);
    let (_c, ack) = Raw::connect(addr, "x3", Some(("quva-cert-v1", vec![1, 2, 3]))).await;
    assert_eq!(u8::from(ack.reason_code), 0x99);
    // CA down: 0x88, also when it hangs (the call times out).
    ca.up.store(false, std::sync::atomic::Ordering::SeqCst);
    let (_c, ack) = Raw::connect(addr, "x4", Some(("quva-enroll-v1", vec![1, 2, 3]))).await;
    assert_eq!(u8::from(ack.reason_code), 0x88);
    ca.up.store(true, std::sync::atomic::Ordering::SeqCst);
    ca.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    // A hanging CA must not hang the device: the bridge's CA timeout answers 0x88. The outer
    // timeout only keeps a regression from stalling the test run.
    let (_c, ack) = tokio::time::timeout(
        Duration::from_secs(60),
        Raw::connect(addr, "x5", Some(("quva-enroll-v1", vec![1, 2, 3]))),
    )
    .await
    .expect("the bridge answers while the CA hangs");
    assert_eq!(u8::from(ack.reason_code), 0x88);
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_is_server_unavailable_and_shutdown_says_goodbye() {
    let broker = Mosquitto::start().await;
    let mut cfg = config(broker.addr);
    cfg.metrics_listen = "127.0.0.1:0".into();
    let bridge = start_bridge(cfg, None).await;
    let (mut raw, ack) = Raw::connect(bridge.local_addr(), "stay", None).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    let stop = tokio::spawn(bridge.shutdown());
    match raw.recv().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::ServerShuttingDown);
        }
        other => panic!("{other:?}"),
    }
    stop.await.unwrap();

    drop(broker);
    let gone = Mosquitto::start().await;
    let addr = gone.addr;
    drop(gone);
    let bridge = start_bridge(config(addr), None).await;
    let (_raw, ack) = Raw::connect(bridge.local_addr(), "lonely", None).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::ServerUnavailable);
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_why_and_empty_client_ids_get_one_assigned_as_at_the_broker() {
    let broker = Mosquitto::start().await;
    let bridge = start_bridge(config(broker.addr), None).await;
    let addr = bridge.local_addr();
    // A broad wildcard that could match protected topics is refused with a reason, and the
    // unprotected filters of the same SUBSCRIBE are granted.
    let (mut c, _) = Raw::connect(addr, "broad", None).await;
    let s = v5::Subscribe {
        packet_id: std::num::NonZeroU16::new(3).unwrap(),
        id: None,
        user_properties: Vec::new(),
        topic_filters: ["weather/#", "+/+"]
            .into_iter()
            .map(|f| {
                (
                    bytestring::ByteString::from(f),
                    v5::SubscriptionOptions {
                        qos: rmqtt_codec::types::QoS::AtLeastOnce,
                        no_local: false,
                        retain_as_published: false,
                        retain_handling: v5::RetainHandling::AtSubscribe,
                    },
                )
            })
            .collect(),
    };
    c.send(v5::Packet::Subscribe(s)).await;
    let ack = loop {
        match c.recv().await {
            Some(v5::Packet::SubscribeAck(a)) => break a,
            Some(_) => {}
            None => panic!("no SUBACK"),
        }
    };
    assert_eq!(
        ack.status,
        vec![
            v5::SubscribeAckReason::GrantedQos1,
            v5::SubscribeAckReason::NotAuthorized
        ]
    );
    let why = ack.reason_string.expect("a reason string");
    assert!(why.contains("protected"), "{why}");
    // Alone, the refused filter gets the same reason.
    let ack = c.subscribe(4, "#", vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::NotAuthorized]);
    assert!(ack.reason_string.is_some());

    // An empty client identifier with Clean Start 1 gets one assigned…
    let mut raw = Raw::tcp(addr).await;
    let connect = |clean_start| v5::Connect {
        clean_start,
        keep_alive: 30,
        client_id: "".into(),
        ..Default::default()
    };
    raw.send(v5::Packet::Connect(Box::new(connect(true)))).await;
    match raw.recv().await {
        Some(v5::Packet::ConnectAck(a)) => {
            assert_eq!(a.reason_code, v5::ConnectAckReason::Success);
            assert!(a.assigned_client_id.is_some_and(|id| id.starts_with("qa-")));
        }
        other => panic!("{other:?}"),
    }
    // …and with Clean Start 0 too, as Mosquitto does.
    let mut answers = Vec::new();
    for at in [broker.addr, addr] {
        let mut raw = Raw::tcp(at).await;
        raw.send(v5::Packet::Connect(Box::new(connect(false))))
            .await;
        match raw.recv().await {
            Some(v5::Packet::ConnectAck(a)) => {
                assert!(a.assigned_client_id.is_some());
                answers.push((a.reason_code, a.session_present));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[1], (v5::ConnectAckReason::Success, false));
    bridge.shutdown().await;
}
