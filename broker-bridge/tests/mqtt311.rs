//! MQTT 3.1.1 connections over real sockets: a Mosquitto started by the test, the bridge in
//! front of it, raw MQTT 3.1.1 clients built on the bridge's own codec. Each rule the bridge
//! applies to an MQTT 3.1.1 client (unprotected topics only) is shown here from the wire.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/broker.rs"]
mod broker;

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use broker::{Mosquitto, Raw, STEP, config, start_bridge};
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::{SinkExt, StreamExt};
use rmqtt_codec::types::{Protocol, Publish, QoS};
use rmqtt_codec::v3::{self, ConnectAckReason, SubscribeReturnCode};
use rmqtt_codec::{MqttCodec, MqttPacket};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// A raw MQTT 3.1.1 connection.
struct Raw3 {
    framed: Framed<TcpStream, MqttCodec>,
}

fn connect_packet(client_id: &str, keep_alive: u16, will: Option<&str>) -> v3::Connect {
    v3::Connect {
        protocol: Protocol::default(),
        clean_session: true,
        keep_alive,
        last_will: will.map(|t| v3::LastWill {
            qos: QoS::AtMostOnce,
            retain: false,
            topic: ByteString::from(t),
            message: Bytes::from_static(b"gone"),
        }),
        client_id: ByteString::from(client_id),
        username: Some(ByteString::from("device-user")),
        password: Some(Bytes::from_static(b"device-password")),
        cert: None,
    }
}

impl Raw3 {
    async fn open(addr: SocketAddr, connect: v3::Connect) -> (Self, Option<v3::ConnectAck>) {
        let s = TcpStream::connect(addr).await.unwrap();
        let mut raw = Raw3 {
            framed: Framed::new(s, MqttCodec::V3(v3::Codec::new(0))),
        };
        raw.send(v3::Packet::Connect(Box::new(connect))).await;
        let ack = match raw.recv().await {
            Some(v3::Packet::ConnectAck(a)) => Some(a),
            _ => None,
        };
        (raw, ack)
    }

    /// Connects and expects the CONNACK to accept.
    async fn connect(addr: SocketAddr, client_id: &str) -> Self {
        let (raw, ack) = Self::open(addr, connect_packet(client_id, 30, None)).await;
        assert_eq!(
            ack.unwrap().return_code,
            ConnectAckReason::ConnectionAccepted
        );
        raw
    }

    async fn send(&mut self, p: v3::Packet) {
        self.framed.send(MqttPacket::V3(p)).await.unwrap();
    }

    async fn recv(&mut self) -> Option<v3::Packet> {
        match tokio::time::timeout(STEP, self.framed.next()).await {
            Ok(Some(Ok((MqttPacket::V3(p), _)))) => Some(p),
            _ => None,
        }
    }

    /// Whether the peer closed the connection within [`STEP`] (after any packets).
    async fn closed(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(deadline, self.framed.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    async fn subscribe(&mut self, id: u16, filters: &[&str]) -> Vec<SubscribeReturnCode> {
        let packet_id = NonZeroU16::new(id).unwrap();
        self.send(v3::Packet::Subscribe {
            packet_id,
            topic_filters: filters
                .iter()
                .map(|f| (ByteString::from(*f), QoS::AtLeastOnce))
                .collect(),
        })
        .await;
        loop {
            match self.recv().await {
                Some(v3::Packet::SubscribeAck {
                    packet_id: p,
                    status,
                }) if p == packet_id => {
                    return status;
                }
                Some(_) => {}
                None => panic!("no SUBACK"),
            }
        }
    }

    async fn publish(&mut self, topic: &str, payload: &'static [u8], qos1_id: Option<u16>) {
        let p = Publish {
            dup: false,
            retain: false,
            qos: if qos1_id.is_some() {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            },
            topic: ByteString::from(topic),
            packet_id: qos1_id.and_then(NonZeroU16::new),
            payload: Bytes::from_static(payload),
            properties: None,
        };
        self.send(v3::Packet::Publish(Box::new(p))).await;
    }

    /// The next PUBLISH's topic and payload, skipping other packets.
    async fn next_publish(&mut self) -> Option<(String, Vec<u8>)> {
        loop {
            if let v3::Packet::Publish(p) = self.recv().await? {
                return Some((p.topic.to_string(), p.payload.to_vec()));
            }
        }
    }
}

fn refused(bridge: &quva_bridge::Bridge, reason: &str, n: u64) -> bool {
    bridge
        .metrics()
        .render()
        .contains(&format!("reason=\"{reason}\"}} {n}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_connect_refusals() {
    let broker = Mosquitto::start().await;
    let bridge = start_bridge(config(broker.addr), None).await;
    // A Will on a protected or reserved topic: CONNACK 5 (not authorized), nothing upstream.
    for topic in ["plant/a", "quva/k/plant/a/sub", "$SYS/x"] {
        let (mut raw, ack) =
            Raw3::open(bridge.local_addr(), connect_packet("w", 30, Some(topic))).await;
        assert_eq!(ack.unwrap().return_code, ConnectAckReason::NotAuthorized);
        assert!(raw.closed().await);
    }
    assert!(refused(&bridge, "will", 3));
    bridge.shutdown().await;

    // No unauthenticated clients: every MQTT 3.1.1 client is refused with 5.
    let mut cfg = config(broker.addr);
    cfg.topics.allow_unauthenticated = Some(false);
    let bridge = start_bridge(cfg, None).await;
    let (mut raw, ack) = Raw3::open(bridge.local_addr(), connect_packet("a", 30, None)).await;
    assert_eq!(ack.unwrap().return_code, ConnectAckReason::NotAuthorized);
    assert!(raw.closed().await);
    assert!(refused(&bridge, "auth", 1));
    bridge.shutdown().await;

    // The broker unreachable: CONNACK 3 (server unavailable).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let bridge = start_bridge(config(dead_addr), None).await;
    let (mut raw, ack) = Raw3::open(bridge.local_addr(), connect_packet("u", 30, None)).await;
    assert_eq!(
        ack.unwrap().return_code,
        ConnectAckReason::ServiceUnavailable
    );
    assert!(raw.closed().await);
    assert!(refused(&bridge, "upstream_unavailable", 1));
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_connect_goes_upstream_with_the_bridge_credentials_and_the_broker_answers() {
    // A broker that refuses anonymous clients and knows no password of the device: the bridge
    // replaces the device's username and password by its own (none here), so the broker's own
    // refusal reaches the device as the broker sent it.
    let broker = Mosquitto::start_with("allow_anonymous false\n").await;
    let bridge = start_bridge(config(broker.addr), None).await;
    let (mut raw, ack) = Raw3::open(bridge.local_addr(), connect_packet("c", 30, None)).await;
    assert_eq!(ack.unwrap().return_code, ConnectAckReason::NotAuthorized);
    assert!(raw.closed().await);
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_client_ids_are_namespaced_upstream() {
    // A client of the bridge cannot take over a session of the same id held at the broker by
    // someone else (the bridge's own, an authenticated connection's): its client id is
    // prefixed upstream. Two clients of the bridge using the same id take each other over as at
    // the broker.
    let broker = Mosquitto::start().await;
    let bridge = start_bridge(config(broker.addr), None).await;
    let addr = bridge.local_addr();
    let mut direct = Raw3::connect(broker.addr, "victim").await;
    let mut first = Raw3::connect(addr, "victim").await;
    // The broker-side session of the same name is untouched.
    direct.send(v3::Packet::PingRequest).await;
    assert_eq!(direct.recv().await, Some(v3::Packet::PingResponse));
    let mut second = Raw3::connect(addr, "victim").await;
    assert!(
        first.closed().await,
        "same id through the bridge takes over"
    );
    second.send(v3::Packet::PingRequest).await;
    assert_eq!(second.recv().await, Some(v3::Packet::PingResponse));
    // Empty client ids (clean session) each get their own identifier: two such clients do not
    // take each other over.
    let mut anon1 = Raw3::connect(addr, "").await;
    let mut anon2 = Raw3::connect(addr, "").await;
    for c in [&mut anon1, &mut anon2] {
        c.send(v3::Packet::PingRequest).await;
        assert_eq!(c.recv().await, Some(v3::Packet::PingResponse));
    }
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_subscriptions_are_decided_per_filter() {
    let broker = Mosquitto::start().await;
    let bridge = start_bridge(config(broker.addr), None).await;
    let addr = bridge.local_addr();
    let mut sub = Raw3::connect(addr, "s").await;
    // One SUBSCRIBE mixing granted and refused filters: the bridge's refusals (0x80) sit in
    // their places among the broker's grants. A misplaced wildcard is refused, not a reason to
    // close (MQTT 3.1.1 has no reason codes to tell it apart).
    let codes = sub
        .subscribe(
            1,
            &[
                "weather/#",
                "plant/a",
                "a#",
                "+/x",
                "quva/c/plant/a",
                "$share/g/plant/a",
                "weather/y",
            ],
        )
        .await;
    assert_eq!(
        codes,
        vec![
            SubscribeReturnCode::Success(QoS::AtLeastOnce),
            SubscribeReturnCode::Failure,
            SubscribeReturnCode::Failure,
            SubscribeReturnCode::Failure,
            SubscribeReturnCode::Failure,
            SubscribeReturnCode::Failure,
            SubscribeReturnCode::Success(QoS::AtLeastOnce),
        ]
    );
    // Every filter refused: the bridge answers alone.
    let codes = sub.subscribe(2, &["plant/#", "quva/#"]).await;
    assert_eq!(codes, vec![SubscribeReturnCode::Failure; 2]);
    // UNSUBSCRIBE and PINGREQ are relayed, their answers come back.
    let id = NonZeroU16::new(3).unwrap();
    sub.send(v3::Packet::Unsubscribe {
        packet_id: id,
        topic_filters: vec![ByteString::from("weather/#")],
    })
    .await;
    assert_eq!(
        sub.recv().await,
        Some(v3::Packet::UnsubscribeAck { packet_id: id })
    );
    sub.send(v3::Packet::PingRequest).await;
    assert_eq!(sub.recv().await, Some(v3::Packet::PingResponse));
    // Deliveries on granted filters arrive; the unsubscribed one no longer does.
    let (mut publ, _) = Raw::connect(addr, "p5", None).await;
    publ.publish("weather/z", b"no".to_vec(), None).await;
    publ.publish("weather/y", b"yes".to_vec(), None).await;
    assert_eq!(
        sub.next_publish().await,
        Some(("weather/y".into(), b"yes".to_vec()))
    );
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_publishes_relay_unprotected_and_close_on_protected() {
    let broker = Mosquitto::start().await;
    let bridge = start_bridge(config(broker.addr), None).await;
    let addr = bridge.local_addr();
    let (mut watcher, _) = Raw::connect(addr, "watch", None).await;
    watcher.subscribe(1, "status/#", vec![]).await;
    watcher.subscribe(2, "weather/#", vec![]).await;

    // QoS 1 on an unprotected topic: relayed, the broker's PUBACK comes back.
    let mut c = Raw3::connect(addr, "q1").await;
    c.publish("weather/a", b"one", Some(7)).await;
    assert_eq!(
        c.recv().await,
        Some(v3::Packet::PublishAck {
            packet_id: NonZeroU16::new(7).unwrap()
        })
    );
    assert_eq!(
        watcher.drain_publishes(Duration::from_millis(500)).await,
        vec![("weather/a".to_string(), b"one".to_vec())]
    );
    // QoS 1 on a protected, a reserved and a retained-group topic: no PUBACK (MQTT 3.1.1 has
    // no refusal), the connection closes; a Will is published as at an abnormal end.
    for (i, topic) in ["plant/a", "quva/k/plant/a/sub", "quva/d/x"]
        .into_iter()
        .enumerate()
    {
        let (mut c, ack) = Raw3::open(
            addr,
            connect_packet(&format!("bad-{i}"), 30, Some("status/bad")),
        )
        .await;
        assert_eq!(
            ack.unwrap().return_code,
            ConnectAckReason::ConnectionAccepted
        );
        c.publish("weather/before", b"before", None).await;
        c.publish(topic, b"x", Some(9)).await;
        c.publish("weather/after", b"after", None).await;
        loop {
            match c.recv().await {
                None => break,
                Some(v3::Packet::PublishAck { .. }) => panic!("refused PUBLISH acknowledged"),
                Some(_) => {}
            }
        }
        let got = watcher.drain_publishes(Duration::from_millis(1500)).await;
        assert_eq!(
            got,
            vec![
                ("weather/before".to_string(), b"before".to_vec()),
                ("status/bad".to_string(), b"gone".to_vec())
            ],
            "{topic}"
        );
    }
    // A DISCONNECT is relayed: no Will.
    let (mut c, _) = Raw3::open(addr, connect_packet("leaver", 30, Some("status/leaver"))).await;
    c.send(v3::Packet::Disconnect).await;
    assert!(c.closed().await);
    assert!(
        watcher
            .drain_publishes(Duration::from_millis(1000))
            .await
            .is_empty()
    );
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_silent_oversize_and_misbehaving_clients_are_closed() {
    let broker = Mosquitto::start().await;
    let mut cfg = config(broker.addr);
    cfg.limits.idle_timeout_ms = 1_000;
    let bridge = start_bridge(cfg, None).await;
    let addr = bridge.local_addr();
    // Keep-alive 0 from an unauthenticated client is capped to the idle timeout (1 s): silence
    // ends it.
    let (mut idle, ack) = Raw3::open(addr, connect_packet("idle", 0, None)).await;
    assert_eq!(
        ack.unwrap().return_code,
        ConnectAckReason::ConnectionAccepted
    );
    // Closed for its silence (the keep-alive refusal counter), not for anything else.
    assert!(idle.closed().await);
    assert!(refused(&bridge, "keep_alive", 1));
    // A client that keeps talking stays.
    let mut alive = Raw3::connect(addr, "alive").await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        alive.send(v3::Packet::PingRequest).await;
        assert_eq!(alive.recv().await, Some(v3::Packet::PingResponse));
    }
    // Over the maximum packet size.
    let mut big = Raw3::connect(addr, "big").await;
    let body: &'static [u8] = Box::leak(vec![0u8; 80 * 1024].into_boxed_slice());
    big.publish("weather/x", body, None).await;
    assert!(big.closed().await);
    assert!(refused(&bridge, "oversize", 1));
    // Malformed bytes.
    let mut bad = Raw3::connect(addr, "bad").await;
    bad.framed
        .get_mut()
        .try_write(&[0x82, 0x03, 0x00, 0x00, 0xff])
        .unwrap();
    assert!(bad.closed().await);
    assert!(refused(&bridge, "malformed", 1));
    // A packet only a server sends.
    let mut odd = Raw3::connect(addr, "odd").await;
    odd.send(v3::Packet::PingResponse).await;
    assert!(odd.closed().await);
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_clients_are_closed_when_the_broker_goes_or_the_bridge_stops() {
    let mut broker = Mosquitto::start().await;
    let bridge = start_bridge(config(broker.addr), None).await;
    let mut c = Raw3::connect(bridge.local_addr(), "b").await;
    broker.kill();
    assert!(c.closed().await);
    broker.restart().await;
    let mut c = Raw3::connect(bridge.local_addr(), "s").await;
    bridge.shutdown().await;
    assert!(c.closed().await);
}
