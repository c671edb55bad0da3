//! The bridge as a security boundary (PROTOCOL.md §8): each test is an attack a client could try
//! against a real Mosquitto behind the bridge, and checks that it fails while honest clients are
//! unaffected.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/broker.rs"]
mod broker;
#[path = "support/devices.rs"]
mod devices;
#[path = "support/test_ca.rs"]
mod test_ca;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use broker::{Mosquitto, Raw, config, pinned, start_bridge};
use bytes::Bytes;
use bytestring::ByteString;
use devices::{cert_proof, connect, enroll, puback, sealer};
use quva_bridge::{Bridge, Config, now_ms};
use quva_client::curve::KeyPair;
use quva_client::enrollment::{Credentials, METHOD_CERT};
use quva_client::group::Privacy;
use quva_client::ids::{Epoch, GroupId, Role};
use rand_core::OsRng;
use rmqtt_codec::types::QoS;
use rmqtt_codec::v5;
use test_ca::TestCa;

const A: &str = "plant/a";
const B: &str = "plant/b";

/// Mosquitto, a CA with groups `plant/a` (pub-1, pub-3 publish; sub-1 subscribes) and
/// `plant/b` (pub-2 publishes), and a bridge with `cfg` changed by `tune`.
async fn setup(tune: impl FnOnce(&mut Config)) -> (Mosquitto, Bridge, Arc<TestCa>) {
    let broker = Mosquitto::start().await;
    let ca = TestCa::new();
    ca.create_group(A, Privacy::Standard);
    ca.create_group(B, Privacy::Standard);
    for (g, id, role) in [
        (A, "pub-1", Role::Publisher),
        (A, "pub-3", Role::Publisher),
        (A, "sub-1", Role::Subscriber),
        (B, "pub-2", Role::Publisher),
    ] {
        ca.allow(g, id, role);
    }
    let mut cfg = pinned(config(broker.addr), ca.key.public());
    tune(&mut cfg);
    let bridge = start_bridge(cfg, Some(Arc::new(test_ca::Client(ca.clone())))).await;
    (broker, bridge, ca)
}

/// A CONNECT with the given fields over a new connection; the CONNACK.
async fn connect_with(addr: SocketAddr, c: v5::Connect) -> (Raw, Box<v5::ConnectAck>) {
    let mut raw = Raw::tcp(addr).await;
    raw.send(v5::Packet::Connect(Box::new(c))).await;
    match raw.recv().await {
        Some(v5::Packet::ConnectAck(a)) => (raw, a),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn plain(client_id: &str) -> v5::Connect {
    v5::Connect {
        clean_start: true,
        keep_alive: 30,
        client_id: ByteString::from(client_id),
        ..Default::default()
    }
}

fn with_cert(mut c: v5::Connect, creds: &Credentials) -> v5::Connect {
    c.auth_method = Some(ByteString::from(METHOD_CERT));
    c.auth_data = Some(Bytes::from(cert_proof(creds, &c.client_id)));
    c
}

fn will(topic: &str) -> v5::LastWill {
    v5::LastWill {
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: ByteString::from(topic),
        message: Bytes::from_static(b"forged"),
        will_delay_interval_sec: None,
        correlation_data: None,
        message_expiry_interval: None,
        content_type: None,
        user_properties: Vec::new(),
        is_utf8_payload: None,
        response_topic: None,
    }
}

/// An observer straight on the broker, subscribed to `filter`.
async fn observer(broker: &Mosquitto, filter: &str) -> Raw {
    let (mut raw, _) = Raw::connect(broker.addr, "observer", None).await;
    raw.subscribe(1, filter, vec![]).await;
    raw
}

/// Joins `group` as `role` over a fresh certificate connection and returns it.
async fn joined(bridge: &Bridge, ca: &TestCa, creds: &Credentials, group: &str, role: Role) -> Raw {
    let client_id = format!("{}-c", creds.id());
    let mut raw = connect(bridge.local_addr(), creds, &client_id).await;
    let _ = devices::join(&mut raw, ca, creds, group, role, 1).await;
    raw
}

/// An option-1 message of `creds` in `group` at the group's current epoch, dated `t_ms`.
fn option1(ca: &TestCa, group: &str, creds: &Credentials, t_ms: u64, m: &[u8]) -> Vec<u8> {
    let g = GroupId::new(group).unwrap();
    let epoch: Epoch = ca.keys(group).group_info().epoch;
    sealer(&g, epoch, creds.id(), creds.key())
        .option1(t_ms, m, &mut OsRng)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_on_protected_and_reserved_topics_are_refused() {
    let (broker, bridge, ca) = setup(|_| {}).await;
    let addr = bridge.local_addr();
    let sub = enroll(addr, &ca, "sub-1").await;
    let mut watch = observer(&broker, "#").await;
    for topic in [
        "quva/k/plant/a/sub",
        "quva/c/plant/a",
        "quva/d/sub-1",
        "plant/a",
        "plant/a/_q",
        "plant/a/_ota/pub-1/2/m",
        "$SYS/broker/version",
    ] {
        // Unauthenticated, and as an authenticated member: refused before anything else.
        let mut c = plain("w-anon");
        c.last_will = Some(will(topic));
        let (_, ack) = connect_with(addr, c).await;
        assert_eq!(
            ack.reason_code,
            v5::ConnectAckReason::NotAuthorized,
            "{topic}"
        );
        let mut c = plain("w-dev");
        c.last_will = Some(will(topic));
        let (_, ack) = connect_with(addr, with_cert(c, &sub)).await;
        assert_eq!(
            ack.reason_code,
            v5::ConnectAckReason::NotAuthorized,
            "{topic}"
        );
    }
    // Nothing was published anywhere.
    let seen = watch.drain_publishes(Duration::from_millis(500)).await;
    assert!(seen.iter().all(|(_, p)| p != b"forged"), "{seen:?}");
    assert!(bridge.metrics().render().contains("reason=\"will\"} 14"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_on_unprotected_topics_behave_as_at_the_broker() {
    let (broker, bridge, _ca) = setup(|_| {}).await;
    let addr = bridge.local_addr();
    let mut watch = observer(&broker, "status/#").await;
    // The socket drops: the broker publishes the Will.
    let mut c = plain("dropper");
    c.last_will = Some(will("status/dropper"));
    let (raw, ack) = connect_with(addr, c).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    drop(raw);
    let seen = watch.drain_publishes(Duration::from_secs(2)).await;
    assert_eq!(
        seen,
        vec![("status/dropper".to_owned(), b"forged".to_vec())]
    );
    // The keep-alive expires and the bridge closes the connection: to the broker that is an
    // abnormal end too, so the Will is published (a normal DISCONNECT would discard it).
    let mut c = plain("sleeper");
    c.keep_alive = 1;
    c.last_will = Some(will("status/sleeper"));
    let (mut raw, _) = connect_with(addr, c).await;
    match raw.recv().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::KeepAliveTimeout);
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    let seen = watch.drain_publishes(Duration::from_secs(2)).await;
    assert_eq!(
        seen,
        vec![("status/sleeper".to_owned(), b"forged".to_vec())]
    );
    // A normal DISCONNECT from the client stays normal: no Will.
    let mut c = plain("leaver");
    c.last_will = Some(will("status/leaver"));
    let (mut raw, _) = connect_with(addr, c).await;
    raw.send(v5::Packet::Disconnect(v5::Disconnect {
        reason_code: v5::DisconnectReasonCode::NormalDisconnection,
        session_expiry_interval_secs: None,
        server_reference: None,
        reason_string: None,
        user_properties: Vec::new(),
    }))
    .await;
    assert!(
        watch
            .drain_publishes(Duration::from_secs(1))
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_resumes_a_session_only_for_its_own_identity() {
    let (_broker, bridge, ca) = setup(|_| {}).await;
    let addr = bridge.local_addr();
    let sub = enroll(addr, &ca, "sub-1").await;
    let publisher = enroll(addr, &ca, "pub-1").await;
    drop(joined(&bridge, &ca, &sub, A, Role::Subscriber).await);
    let mut pub_raw = joined(&bridge, &ca, &publisher, A, Role::Publisher).await;
    // The subscriber keeps a persistent session with a subscription, then goes away.
    let persistent = |id: &str| {
        let mut c = plain(id);
        c.clean_start = false;
        c.session_expiry_interval_secs = 300;
        c
    };
    let (mut raw, ack) = connect_with(addr, with_cert(persistent("sub-1-home"), &sub)).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    let ack = raw.subscribe(2, A, vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::GrantedQos1]);
    drop(raw);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = option1(&ca, A, &publisher, now_ms(), b"queued for sub-1");
    pub_raw.publish(A, m.clone(), Some(7)).await;
    assert!(puback(&mut pub_raw, 7).await < 0x80);
    // Another client (unauthenticated, or another device) with the same client identifier
    // and clean start off gets a new session: nothing of sub-1's.
    let (mut thief, ack) = connect_with(addr, persistent("sub-1-home")).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    assert!(!ack.session_present);
    assert!(
        thief
            .drain_publishes(Duration::from_millis(500))
            .await
            .is_empty()
    );
    let (mut thief, ack) =
        connect_with(addr, with_cert(persistent("sub-1-home"), &publisher)).await;
    assert!(!ack.session_present);
    assert!(
        thief
            .drain_publishes(Duration::from_millis(500))
            .await
            .is_empty()
    );
    // A client named like the bridge's own connection is just another client.
    let (_spoof, ack) = connect_with(addr, plain("qb-notices")).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    // The owner resumes its session and gets what was queued.
    let (mut raw, ack) = connect_with(addr, with_cert(persistent("sub-1-home"), &sub)).await;
    assert!(ack.session_present);
    let got = raw.drain_publishes(Duration::from_secs(1)).await;
    assert_eq!(got, vec![(A.to_owned(), m)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sender_cannot_raise_the_replay_floor_for_others() {
    let (_broker, bridge, ca) = setup(|c| c.windows.replay_capacity = 4).await;
    let addr = bridge.local_addr();
    let (p1, p2, p3) = (
        enroll(addr, &ca, "pub-1").await,
        enroll(addr, &ca, "pub-2").await,
        enroll(addr, &ca, "pub-3").await,
    );
    let mut r1 = joined(&bridge, &ca, &p1, A, Role::Publisher).await;
    let mut r3 = joined(&bridge, &ca, &p3, A, Role::Publisher).await;
    let mut r2 = joined(&bridge, &ca, &p2, B, Role::Publisher).await;
    // pub-1 floods its partition with valid messages dated at the future edge of the window.
    let now = now_ms();
    for i in 0..8u16 {
        let m = option1(&ca, A, &p1, now + 55_000 + u64::from(i), b"flood");
        r1.publish(A, m, Some(10 + i)).await;
        assert!(puback(&mut r1, 10 + i).await < 0x80, "flood message {i}");
    }
    // Its own honest messages now fall under its own floor…
    let m = option1(&ca, A, &p1, now_ms(), b"late");
    r1.publish(A, m, Some(30)).await;
    assert_eq!(puback(&mut r1, 30).await, 0x87);
    // …but another sender of the same group and a sender of another group are unaffected.
    let m = option1(&ca, A, &p3, now_ms(), b"same group");
    r3.publish(A, m.clone(), Some(31)).await;
    assert!(puback(&mut r3, 31).await < 0x80);
    let m2 = option1(&ca, B, &p2, now_ms(), b"other group");
    r2.publish(B, m2, Some(32)).await;
    assert!(puback(&mut r2, 32).await < 0x80);
    // Replays are still refused, in the sender's partition whoever carries them.
    r1.publish(A, m, Some(33)).await;
    assert_eq!(puback(&mut r1, 33).await, 0x87);
    // A valid message published retained on the group topic is dropped: it would outlive its
    // checks.
    let m = option1(&ca, A, &p3, now_ms(), b"retained");
    let p = rmqtt_codec::types::Publish {
        dup: false,
        retain: true,
        qos: QoS::AtLeastOnce,
        topic: ByteString::from(A),
        packet_id: std::num::NonZeroU16::new(35),
        payload: Bytes::from(m),
        properties: Some(v5::PublishProperties::default()),
    };
    r3.send(v5::Packet::Publish(Box::new(p))).await;
    assert_eq!(puback(&mut r3, 35).await, 0x87);
    // A timestamp more than the window ahead is refused outright.
    let m = option1(&ca, A, &p3, now_ms() + 61_000, b"too far");
    r3.publish(A, m, Some(34)).await;
    assert_eq!(puback(&mut r3, 34).await, 0x87);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_clients_cause_no_ca_lookups() {
    let (_broker, bridge, ca) = setup(|_| {}).await;
    let (mut raw, _) = Raw::connect(bridge.local_addr(), "anon", None).await;
    for i in 0..20u16 {
        raw.publish(&format!("plant/random-{i}"), b"x".to_vec(), Some(i + 1))
            .await;
        assert_eq!(puback(&mut raw, i + 1).await, 0x87);
    }
    let ack = raw.subscribe(40, "plant/random-x", vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::NotAuthorized]);
    assert_eq!(ca.get_group_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_cannot_stay_idle_forever() {
    let (_broker, bridge, ca) = setup(|_| {}).await;
    let addr = bridge.local_addr();
    // By default an unauthenticated client without keep-alive (or a longer one) is told 300 s.
    for asked in [0, 1_000] {
        let mut c = plain("idle");
        c.keep_alive = asked;
        let (_, ack) = connect_with(addr, c).await;
        assert_eq!(ack.server_keepalive_sec, Some(300), "asked {asked}");
    }
    let (_, ack) = connect_with(addr, plain("lively")).await;
    assert_eq!(ack.server_keepalive_sec, None);
    // An authenticated device keeps its own (Mosquitto itself answers 65535 for 0).
    let dev = enroll(addr, &ca, "sub-1").await;
    let mut c = plain("dev");
    c.keep_alive = 0;
    let (_, ack) = connect_with(addr, with_cert(c, &dev)).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    assert_ne!(ack.server_keepalive_sec, Some(300));
    // With a short idle timeout, a silent unauthenticated connection is closed.
    let (_b2, bridge2, _ca2) = setup(|c| c.limits.idle_timeout_ms = 1_000).await;
    let mut c = plain("silent");
    c.keep_alive = 0;
    let (mut raw, ack) = connect_with(bridge2.local_addr(), c).await;
    assert_eq!(ack.server_keepalive_sec, Some(1));
    assert!(raw.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_from_a_group_ends_the_members_sessions() {
    let (_broker, bridge, ca) = setup(|_| {}).await;
    let addr = bridge.local_addr();
    let sub = enroll(addr, &ca, "sub-1").await;
    let publisher = enroll(addr, &ca, "pub-1").await;
    let mut sub_raw = joined(&bridge, &ca, &sub, A, Role::Subscriber).await;
    let mut pub_raw = joined(&bridge, &ca, &publisher, A, Role::Publisher).await;
    let ack = sub_raw.subscribe(2, A, vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::GrantedQos1]);
    let _ = sub_raw.drain_publishes(Duration::from_millis(300)).await;
    ca.remove(A, "sub-1", Role::Subscriber);
    // The session ends at once, with a reason.
    let ended = loop {
        match sub_raw.recv().await {
            Some(v5::Packet::Disconnect(d)) => break d.reason_code,
            Some(_) => {}
            None => panic!("the removed member's session did not end"),
        }
    };
    assert_eq!(ended, v5::DisconnectReasonCode::NotAuthorized);
    // The remaining member is unaffected.
    pub_raw.send(v5::Packet::PingRequest).await;
    loop {
        match pub_raw.recv().await {
            Some(v5::Packet::PingResponse) => break,
            Some(_) => {}
            None => panic!("the remaining member lost its connection"),
        }
    }
    // The removed device may reconnect, but not subscribe to the group again.
    let mut again = connect(addr, &sub, "sub-1-again").await;
    let ack = again.subscribe(3, A, vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::NotAuthorized]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_trusts_only_the_pinned_ca_key() {
    let broker = Mosquitto::start().await;
    let ca = TestCa::new();
    ca.create_group(A, Privacy::Standard);
    let client = || -> Option<Arc<dyn quva_bridge::ca::CaClient>> {
        Some(Arc::new(test_ca::Client(ca.clone())))
    };
    // A CA link without a pinned key is refused at start.
    let err = Bridge::start(config(broker.addr), client())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ca.public_key"), "{err}");
    // Pinned to another key, the bridge accepts no certificate of the CA behind the link.
    let other = KeyPair::random(&mut OsRng);
    let bridge = start_bridge(pinned(config(broker.addr), other.public()), client()).await;
    let dev = enroll(bridge.local_addr(), &ca, "sub-1").await;
    let (_, ack) = connect_with(bridge.local_addr(), with_cert(plain("c"), &dev)).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::NotAuthorized);
    // Pinned to the right key, the same device connects.
    let bridge = start_bridge(pinned(config(broker.addr), ca.key.public()), client()).await;
    let (_, ack) = connect_with(bridge.local_addr(), with_cert(plain("c"), &dev)).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_packets_do_not_disturb_an_honest_device() {
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    let (_broker, bridge, ca) = setup(|_| {}).await;
    let addr = bridge.local_addr();
    let publisher = enroll(addr, &ca, "pub-1").await;
    let sub = enroll(addr, &ca, "sub-1").await;
    let mut sub_raw = joined(&bridge, &ca, &sub, A, Role::Subscriber).await;
    let mut pub_raw = joined(&bridge, &ca, &publisher, A, Role::Publisher).await;
    let ack = sub_raw.subscribe(2, A, vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::GrantedQos1]);
    let _ = sub_raw.drain_publishes(Duration::from_millis(300)).await;

    // Attackers, all at once, while the honest device publishes.
    let attack = tokio::spawn(async move {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut connect_frame = bytes::BytesMut::new();
        tokio_util::codec::Encoder::encode(
            &mut v5::Codec::new(0, 0),
            v5::Packet::Connect(Box::new(plain("attacker"))),
            &mut connect_frame,
        )
        .unwrap();
        let attacks: Vec<Vec<u8>> = vec![
            // Garbage instead of a CONNECT.
            vec![0xFF; 64],
            // A CONNECT, then a length that is not a variable byte integer.
            [
                &connect_frame[..],
                &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F][..],
            ]
            .concat(),
            // A CONNECT, then a PUBLISH announcing 200 MB.
            [&connect_frame[..], &[0x30, 0x80, 0x80, 0x80, 0x60][..]].concat(),
            // A CONNECT, then a PUBLISH whose topic length runs past the packet.
            [
                &connect_frame[..],
                &[0x32, 0x04, 0xFF, 0xFF, 0x00, 0x01][..],
            ]
            .concat(),
            // A CONNECT, then a SUBSCRIBE with no filter.
            [&connect_frame[..], &[0x82, 0x03, 0x00, 0x01, 0x00][..]].concat(),
        ];
        for bytes in attacks {
            let mut raw = Raw::tcp(addr).await;
            raw.send_bytes(&bytes).await;
            assert!(
                raw.closed().await,
                "the bridge kept a connection after {bytes:02x?}"
            );
        }
        // Random bytes after a valid CONNECT.
        for _ in 0..40 {
            let mut junk = vec![0u8; 1 + (rng.next_u32() % 300) as usize];
            rng.fill_bytes(&mut junk);
            let mut raw = Raw::tcp(addr).await;
            raw.send_bytes(&[&connect_frame[..], &junk[..]].concat())
                .await;
            let _ = raw.recv_within(Duration::from_millis(50)).await;
        }
        // A protected PUBLISH just over the payload limit, from an unauthenticated client.
        let (mut raw, _) = Raw::connect(addr, "big", None).await;
        raw.publish(A, vec![0; 17 * 1024], Some(1)).await;
        assert_eq!(puback(&mut raw, 1).await, 0x87);
    });
    let mut sent = Vec::new();
    for i in 0..30u16 {
        let m = option1(
            &ca,
            A,
            &publisher,
            now_ms(),
            format!("honest {i}").as_bytes(),
        );
        pub_raw.publish(A, m.clone(), Some(100 + i)).await;
        assert!(
            puback(&mut pub_raw, 100 + i).await < 0x80,
            "honest message {i}"
        );
        sent.push((A.to_owned(), m));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    attack.await.unwrap();
    // The subscriber acknowledges what it gets (the broker keeps at most 20 in flight).
    let mut got = Vec::new();
    while let Some(p) = sub_raw.recv_within(Duration::from_secs(1)).await {
        if let v5::Packet::Publish(p) = p {
            if let Some(id) = p.packet_id {
                sub_raw
                    .send(v5::Packet::PublishAck(v5::PublishAck {
                        packet_id: id,
                        reason_code: v5::PublishAckReason::Success,
                        properties: Vec::new(),
                        reason_string: None,
                    }))
                    .await;
            }
            got.push((p.topic.to_string(), p.payload.to_vec()));
        }
    }
    assert!(
        got == sent,
        "the subscriber got {} of {} honest messages, or out of order",
        got.len(),
        sent.len()
    );
    let metrics = bridge.metrics().render();
    assert!(metrics.contains("reason=\"malformed"), "{metrics}");
    // The bridge still serves new clients.
    let (_c, ack) = Raw::connect(addr, "after", None).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_the_notices_are_read_certificate_connects_ask_the_ca_about_revocation() {
    let broker = Mosquitto::start().await;
    let ca = TestCa::new();
    // The bridge has not read the CA's notice log (it never answers here), so the revocation
    // below has not reached it as a notice.
    ca.hold_notices.store(true, Ordering::SeqCst);
    let bridge = start_bridge(
        pinned(config(broker.addr), ca.key.public()),
        Some(Arc::new(test_ca::Client(ca.clone()))),
    )
    .await;
    let addr = bridge.local_addr();
    let revoked = enroll(addr, &ca, "revoked-1").await;
    let honest = enroll(addr, &ca, "honest-1").await;
    {
        let mut s = ca.state.lock().unwrap();
        let serial = s.certs[revoked.id()].serial();
        s.revoked.insert(serial);
    }
    let (_, ack) = connect_with(addr, with_cert(plain("r"), &revoked)).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::NotAuthorized);
    let (_, ack) = connect_with(addr, with_cert(plain("h"), &honest)).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    // With the CA away as well, a certificate cannot be checked: 0x88, not a silent pass.
    ca.up.store(false, Ordering::SeqCst);
    let (_, ack) = connect_with(addr, with_cert(plain("h2"), &honest)).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::ServerUnavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_certificate_no_longer_connects() {
    let (_broker, bridge, ca) = setup(|_| {}).await;
    let addr = bridge.local_addr();
    // The device enrolls twice (say, its first key store was copied before it re-enrolled).
    let old = enroll(addr, &ca, "sub-1").await;
    let new = enroll(addr, &ca, "sub-1").await;
    assert!(new.cert().serial() > old.cert().serial());
    // Until the bridge has seen the new certificate in use, the old one still connects.
    let (_raw, ack) = connect_with(addr, with_cert(plain("old-before"), &old)).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    // The new certificate joins: the group's member list now names it.
    let _member = joined(&bridge, &ca, &new, A, Role::Subscriber).await;
    let (_raw, ack) = connect_with(addr, with_cert(plain("old-after"), &old)).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::NotAuthorized);
    let (_raw, ack) = connect_with(addr, with_cert(plain("new-after"), &new)).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
}

/// A PUBLISH with the retain flag, QoS 1.
async fn publish_retained(raw: &mut Raw, topic: &str, payload: Vec<u8>, id: u16) {
    let p = rmqtt_codec::types::Publish {
        dup: false,
        retain: true,
        qos: QoS::AtLeastOnce,
        topic: ByteString::from(topic),
        packet_id: std::num::NonZeroU16::new(id),
        payload: Bytes::from(payload),
        properties: Some(v5::PublishProperties::default()),
    };
    raw.send(v5::Packet::Publish(Box::new(p))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_pass_only_from_their_sender_to_their_recipient() {
    use quva_client::direct::DirectSealer;
    let (broker, bridge, ca) = setup(|_| {}).await;
    let addr = bridge.local_addr();
    let sender = enroll(addr, &ca, "pub-1").await;
    let other = enroll(addr, &ca, "pub-3").await;
    let recipient = enroll(addr, &ca, "sub-1").await;
    // Members of a group the bridge has fetched: it knows their certificates.
    let mut from = joined(&bridge, &ca, &sender, A, Role::Publisher).await;
    let mut thief = joined(&bridge, &ca, &other, A, Role::Publisher).await;
    let mut to = joined(&bridge, &ca, &recipient, A, Role::Subscriber).await;
    let ack = to.subscribe(5, "quva/d/sub-1", vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::GrantedQos1]);
    // Only sub-1 reads its direct topic: not another device, not by a wildcard.
    for (i, filter) in ["quva/d/sub-1", "quva/d/+", "quva/#"]
        .into_iter()
        .enumerate()
    {
        let ack = thief.subscribe(6 + i as u16, filter, vec![]).await;
        assert_eq!(
            ack.status,
            vec![v5::SubscribeAckReason::NotAuthorized],
            "{filter}"
        );
    }
    let mut watch = observer(&broker, "quva/d/#").await;
    let seal = |t_ms: u64, m: &[u8]| {
        DirectSealer {
            key: sender.key(),
            cert: sender.cert(),
        }
        .seal(
            recipient.id(),
            recipient.key().public(),
            t_ms,
            m,
            &mut OsRng,
        )
        .unwrap()
    };
    let now = now_ms();
    let honest = seal(now, b"open valve 3");

    // The sender, on the recipient's topic: relayed.
    from.publish("quva/d/sub-1", honest.clone(), Some(10)).await;
    assert!(puback(&mut from, 10).await < 0x80);
    let got = to.drain_publishes(Duration::from_millis(500)).await;
    assert_eq!(got, vec![("quva/d/sub-1".to_owned(), honest.clone())]);

    // The same bytes again: a replay.
    from.publish("quva/d/sub-1", honest.clone(), Some(11)).await;
    assert!(puback(&mut from, 11).await >= 0x80);
    // Another member publishing the sender's fresh message: not its own.
    thief
        .publish("quva/d/sub-1", seal(now + 1, b"x"), Some(12))
        .await;
    assert!(puback(&mut thief, 12).await >= 0x80);
    // Addressed to sub-1 but published on another device's topic.
    from.publish("quva/d/pub-3", seal(now + 2, b"y"), Some(13))
        .await;
    assert!(puback(&mut from, 13).await >= 0x80);
    // Retained: it would wait for the recipient after every check.
    publish_retained(&mut from, "quva/d/sub-1", seal(now + 3, b"z"), 14).await;
    assert_eq!(puback(&mut from, 14).await, 0x87);
    // Unauthenticated.
    let (mut anon, _) = connect_with(addr, plain("anon-d")).await;
    anon.publish("quva/d/sub-1", seal(now + 4, b"w"), Some(15))
        .await;
    assert_eq!(puback(&mut anon, 15).await, 0x87);

    // Only the honest message ever reached the broker.
    let seen = watch.drain_publishes(Duration::from_millis(500)).await;
    assert_eq!(seen, vec![("quva/d/sub-1".to_owned(), honest)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ota_releases_pass_only_from_their_signer_and_as_their_manifest_says() {
    use quva_client::ota::ReleaseSigner;
    let (broker, bridge, ca) = setup(|_| {}).await;
    let addr = bridge.local_addr();
    let signer = enroll(addr, &ca, "pub-1").await;
    let other = enroll(addr, &ca, "pub-3").await;
    let device = enroll(addr, &ca, "sub-1").await;
    let outsider = enroll(addr, &ca, "pub-2").await;
    let mut from = connect(addr, &signer, "pub-1-c").await;
    let key = devices::join(&mut from, &ca, &signer, A, Role::Publisher, 1).await;
    let mut thief = joined(&bridge, &ca, &other, A, Role::Publisher).await;
    let mut dev = joined(&bridge, &ca, &device, A, Role::Subscriber).await;
    let mut out = joined(&bridge, &ca, &outsider, B, Role::Publisher).await;
    // The group's subscribers may follow its releases with one wildcard; no one else may.
    let ack = dev.subscribe(5, "plant/a/_ota/#", vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::GrantedQos1]);
    let ack = out.subscribe(5, "plant/a/_ota/#", vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::NotAuthorized]);
    let ack = dev.subscribe(6, "plant/+/_ota/#", vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::NotAuthorized]);
    let mut watch = observer(&broker, "plant/a/_ota/#").await;

    let g = GroupId::new(A).unwrap();
    let mut rng = OsRng;
    let now = now_ms();
    // Chunks of 4 KiB: the test bridge's payload limit is 16 KiB.
    let image: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let release = ReleaseSigner {
        group: &g,
        key: signer.key(),
        cert: signer.cert(),
    }
    .release(7, "fw-7.bin", &image, 4_096, now, &mut rng)
    .unwrap();
    let manifest = release.manifest_message().to_vec();
    let chunks = release.chunks().to_vec();
    assert_eq!(chunks.len(), 3);
    let topic = |item: &str| format!("plant/a/_ota/pub-1/7/{item}");
    // The group's current epoch (the members who joined after the signer moved it on).
    let info = ca.keys(A).group_info().clone();
    assert!(info.epoch > key.epoch());
    let seal = |t_ms: u64| {
        let s = sealer(&g, info.epoch, signer.id(), signer.key());
        release
            .key_message()
            .seal(&s, &info.q_p, t_ms, &mut OsRng)
            .unwrap()
    };
    let key_message = seal(now);

    // A chunk before its manifest: nothing to check it against.
    publish_retained(&mut from, &topic("c/0"), chunks[0].clone(), 10).await;
    assert_eq!(puback(&mut from, 10).await, 0x87);
    // Another publisher of the group cannot deposit under the signer's topics, even with the
    // signer's own bytes; nor its own copy of the signer's manifest.
    publish_retained(&mut thief, &topic("m"), manifest.clone(), 11).await;
    assert_eq!(puback(&mut thief, 11).await, 0x87);
    publish_retained(&mut thief, "plant/a/_ota/pub-3/7/m", manifest.clone(), 12).await;
    assert_eq!(puback(&mut thief, 12).await, 0x87);
    // A subscriber of the group, and a publisher of another group, signing releases of their
    // own: the member list does not make them publishers of the group.
    for (who, raw, id) in [(&device, &mut dev, 14), (&outsider, &mut out, 15)] {
        let own = ReleaseSigner {
            group: &g,
            key: who.key(),
            cert: who.cert(),
        }
        .release(7, "fw-7.bin", &image, 4_096, now, &mut rng)
        .unwrap();
        let on = format!("plant/a/_ota/{}/7/m", who.id());
        publish_retained(raw, &on, own.manifest_message().to_vec(), id).await;
        assert_eq!(puback(raw, id).await, 0x87);
    }
    // The signer's manifest on another version's topic.
    publish_retained(&mut from, "plant/a/_ota/pub-1/8/m", manifest.clone(), 13).await;
    assert_eq!(puback(&mut from, 13).await, 0x87);

    // The honest release: manifest, chunks, key message, all retained.
    publish_retained(&mut from, &topic("m"), manifest.clone(), 20).await;
    assert_eq!(puback(&mut from, 20).await, 0);
    for (j, ct) in chunks.iter().enumerate() {
        publish_retained(
            &mut from,
            &topic(&format!("c/{j}")),
            ct.clone(),
            21 + j as u16,
        )
        .await;
        assert_eq!(puback(&mut from, 21 + j as u16).await, 0, "chunk {j}");
    }
    publish_retained(&mut from, &topic("k"), key_message.clone(), 24).await;
    assert_eq!(puback(&mut from, 24).await, 0);

    // Replays, a changed chunk, a chunk past the end, a chunk under a wrong index.
    publish_retained(&mut from, &topic("m"), manifest.clone(), 30).await;
    assert_eq!(puback(&mut from, 30).await, 0x87);
    publish_retained(&mut from, &topic("k"), key_message.clone(), 31).await;
    assert_eq!(puback(&mut from, 31).await, 0x87);
    let mut changed = chunks[1].clone();
    changed[100] ^= 1;
    publish_retained(&mut from, &topic("c/1"), changed, 32).await;
    assert_eq!(puback(&mut from, 32).await, 0x87);
    publish_retained(&mut from, &topic("c/3"), chunks[2].clone(), 33).await;
    assert_eq!(puback(&mut from, 33).await, 0x87);
    publish_retained(&mut from, &topic("c/2"), chunks[0].clone(), 34).await;
    assert_eq!(puback(&mut from, 34).await, 0x87);
    publish_retained(&mut from, &topic("c/0"), chunks[1].clone(), 39).await;
    assert_eq!(puback(&mut from, 39).await, 0x87);
    // The key topic carries only the signer's option-2 message: not option 1.
    let option1 = sealer(&g, info.epoch, signer.id(), signer.key())
        .option1(now + 1, b"k", &mut OsRng)
        .unwrap();
    publish_retained(&mut from, &topic("k"), option1, 35).await;
    assert_eq!(puback(&mut from, 35).await, 0x87);
    // Unknown items, and an unauthenticated client.
    publish_retained(&mut from, &topic("x"), b"?".to_vec(), 36).await;
    assert_eq!(puback(&mut from, 36).await, 0x87);
    let (mut anon, _) = connect_with(addr, plain("anon-ota")).await;
    publish_retained(&mut anon, &topic("c/0"), chunks[0].clone(), 37).await;
    assert_eq!(puback(&mut anon, 37).await, 0x87);
    // Retained publishes on data and query topics stay refused.
    publish_retained(&mut from, A, option1_now(&ca, &signer), 38).await;
    assert_eq!(puback(&mut from, 38).await, 0x87);

    // The broker saw exactly the honest release; the group's device received it.
    let mut want = vec![(topic("m"), manifest)];
    for (j, ct) in chunks.iter().enumerate() {
        want.push((topic(&format!("c/{j}")), ct.clone()));
    }
    want.push((topic("k"), key_message));
    assert_eq!(
        watch.drain_publishes(Duration::from_millis(500)).await,
        want
    );
    assert_eq!(dev.drain_publishes(Duration::from_millis(200)).await, want);
    let m = bridge.metrics();
    assert_eq!(m.dropped_count("ota_not_signer"), 1);
    assert_eq!(m.dropped_count("signer_not_listed"), 2);
    assert_eq!(m.dropped_count("topic_mismatch"), 2);
    assert_eq!(m.dropped_count("replayed"), 2);
    assert_eq!(m.dropped_count("unauthenticated"), 1);
    assert_eq!(m.dropped_count("retained"), 1);
    assert_eq!(m.dropped_count("ota_unknown_release"), 1);
    assert_eq!(m.dropped_count("ota_topic"), 1);
    assert_eq!(m.dropped_count("chunk_hash_mismatch"), 2);
    assert_eq!(m.dropped_count("chunk_length_mismatch"), 1);
    assert_eq!(m.dropped_count("chunk_out_of_range"), 1);
    assert_eq!(m.dropped_count("ota_not_key_message"), 1);

    // A signer that does not wait for PUBACKs: manifest, chunks and key message of release 8 in
    // one go are checked in order (the manifest is accepted before its chunks are checked).
    let v8 = ReleaseSigner {
        group: &g,
        key: signer.key(),
        cert: signer.cert(),
    }
    .release(8, "fw-8.bin", &image, 4_096, now_ms(), &mut rng)
    .unwrap();
    let t8 = |item: &str| format!("plant/a/_ota/pub-1/8/{item}");
    let mut burst = vec![(t8("m"), v8.manifest_message().to_vec())];
    for (j, ct) in v8.chunks().iter().enumerate() {
        burst.push((t8(&format!("c/{j}")), ct.clone()));
    }
    let s8 = sealer(&g, info.epoch, signer.id(), signer.key());
    let k8 = v8
        .key_message()
        .seal(&s8, &info.q_p, now_ms(), &mut OsRng)
        .unwrap();
    burst.push((t8("k"), k8));
    for (i, (t, payload)) in burst.iter().enumerate() {
        publish_retained(&mut from, t, payload.clone(), 50 + i as u16).await;
    }
    for i in 0..burst.len() {
        assert_eq!(puback(&mut from, 50 + i as u16).await, 0, "item {i}");
    }
    assert_eq!(
        watch.drain_publishes(Duration::from_millis(500)).await,
        burst
    );

    // Once removed as a publisher, the signer deposits nothing more, not even the chunks its
    // accepted manifest announces.
    ca.remove(A, "pub-1", Role::Publisher);
    assert!(from.closed().await, "the removed signer's session ends");
    let mut again = connect(addr, &signer, "pub-1-again").await;
    publish_retained(&mut again, &topic("c/0"), chunks[0].clone(), 40).await;
    assert_eq!(puback(&mut again, 40).await, 0x87);
    assert_eq!(m.dropped_count("not_member"), 1);
    assert!(
        watch
            .drain_publishes(Duration::from_millis(300))
            .await
            .is_empty()
    );
}

fn option1_now(ca: &TestCa, creds: &Credentials) -> Vec<u8> {
    option1(ca, A, creds, now_ms(), b"retained?")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_pass_only_from_their_own_subscriber() {
    use quva_client::message::{Direction, Sealer};
    use quva_client::ota::{OtaState, StatusReport};
    let (broker, bridge, ca) = setup(|_| {}).await;
    let addr = bridge.local_addr();
    let signer = enroll(addr, &ca, "pub-1").await;
    let device = enroll(addr, &ca, "sub-1").await;
    let other = enroll(addr, &ca, "pub-3").await;
    let _signer = joined(&bridge, &ca, &signer, A, Role::Publisher).await;
    let mut thief = joined(&bridge, &ca, &other, A, Role::Publisher).await;
    let mut dev = connect(addr, &device, "sub-1-c").await;
    let _ = devices::join(&mut dev, &ca, &device, A, Role::Subscriber, 1).await;
    let mut watch = observer(&broker, "plant/a/_q").await;
    let info = ca.keys(A).group_info().clone();
    let g = GroupId::new(A).unwrap();
    let report = |who: &Credentials, as_id: &Credentials, t_ms: u64| {
        let s = Sealer {
            group: &g,
            epoch: info.epoch,
            direction: Direction::Query,
            sender: as_id.id(),
            key: who.key(),
        };
        StatusReport {
            version: 7,
            state: OtaState::Applied,
            detail: "ok".into(),
        }
        .seal(&s, &info.q_s, t_ms, &mut OsRng)
        .unwrap()
    };
    let now = now_ms();
    let honest = report(&device, &device, now);
    dev.publish("plant/a/_q", honest.clone(), Some(10)).await;
    assert_eq!(puback(&mut dev, 10).await, 0);
    // A fresh report of the subscriber sent by another connection: not its sender.
    thief
        .publish("plant/a/_q", report(&device, &device, now + 3), Some(11))
        .await;
    assert_eq!(puback(&mut thief, 11).await, 0x87);
    // A report naming the subscriber but signed with another key, from the subscriber's
    // connection: a forged sender.
    dev.publish("plant/a/_q", report(&other, &device, now + 1), Some(12))
        .await;
    assert_eq!(puback(&mut dev, 12).await, 0x87);
    // A publisher reporting as itself: not a subscriber of the group.
    thief
        .publish("plant/a/_q", report(&other, &other, now + 2), Some(13))
        .await;
    assert_eq!(puback(&mut thief, 13).await, 0x87);
    let seen = watch.drain_publishes(Duration::from_millis(500)).await;
    assert_eq!(seen, vec![("plant/a/_q".to_owned(), honest)]);
    let m = bridge.metrics();
    assert_eq!(m.dropped_count("sender_mismatch"), 1);
    assert_eq!(m.dropped_count("bad_signature"), 1);
    assert_eq!(m.dropped_count("not_member"), 1);
}
