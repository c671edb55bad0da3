//! Recovery over real sockets: the CA (served over gRPC) crashes and comes back on the same
//! address, the upstream Mosquitto is killed and restarted on the same port. The bridge keeps
//! running, refuses what it cannot serve with 0x88, and loses no notice.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/broker.rs"]
mod broker;
#[path = "support/devices.rs"]
mod devices;
#[path = "support/grpc_ca.rs"]
mod grpc_ca;
#[path = "support/test_ca.rs"]
mod test_ca;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use broker::{Mosquitto, Raw, config, pinned, start_bridge};
use devices::{connect, enroll, join, puback, sealer, try_connect, try_enroll};
use grpc_ca::GrpcCa;
use quva_bridge::now_ms;
use quva_client::group::Privacy;
use quva_client::ids::{GroupId, Role};
use rand_core::OsRng;
use rmqtt_codec::v5;
use test_ca::TestCa;

const GROUP: &str = "plant/a";
const SUB_KEY_TOPIC: &str = "quva/k/plant/a/sub";
const PUB_KEY_TOPIC: &str = "quva/k/plant/a/pub";
const LIST_TOPIC: &str = "quva/c/plant/a";

fn ca_with_group() -> Arc<TestCa> {
    let ca = TestCa::new();
    ca.create_group(GROUP, Privacy::Standard);
    ca.allow(GROUP, "pub-1", Role::Publisher);
    ca.allow(GROUP, "sub-1", Role::Subscriber);
    ca
}

fn rekey_notice(ca: &TestCa, topic: &str, payload: Vec<u8>) {
    ca.push_rekey(GROUP, 9, topic, payload);
}

/// A plain client straight on the broker, subscribed to every `quva/` topic.
async fn watcher(broker: SocketAddr, id: &str) -> Raw {
    let (mut raw, ack) = Raw::connect(broker, id, None).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    let ack = raw.subscribe(1, "quva/#", vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::GrantedQos1]);
    raw
}

/// Collects `quva/` publications until one on `topic` with `payload` arrived (or 15 s passed).
async fn until_published(raw: &mut Raw, topic: &str, payload: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut seen = Vec::new();
    for _ in 0..30 {
        seen.extend(raw.drain_publishes(Duration::from_millis(500)).await);
        if seen.iter().any(|(t, p)| t == topic && p == payload) {
            return seen;
        }
    }
    panic!("nothing on {topic}; saw {seen:?}");
}

/// A protected option-1 PUBLISH at QoS 1; returns the PUBACK reason code.
async fn publish_protected(
    raw: &mut Raw,
    creds: &quva_client::enrollment::Credentials,
    epoch: quva_client::ids::Epoch,
    body: &[u8],
    pid: u16,
) -> (u8, Vec<u8>) {
    let group = GroupId::new(GROUP).unwrap();
    let m = sealer(&group, epoch, creds.id(), creds.key())
        .option1(now_ms(), body, &mut OsRng)
        .unwrap();
    raw.publish(GROUP, m.clone(), Some(pid)).await;
    (puback(raw, pid).await, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_crash_refuses_with_0x88_then_resumes_notices_without_loss() {
    let broker = Mosquitto::start().await;
    let ca = ca_with_group();
    let mut server = GrpcCa::start(ca.clone()).await;
    let mut cfg = pinned(config(broker.addr), ca.key.public());
    cfg.ca.endpoint = server.endpoint();
    cfg.ca.token = Some("bridge-token".into());
    let client = quva_bridge::grpc_ca(&cfg).unwrap();
    assert!(client.is_some());
    let bridge = start_bridge(cfg, client).await;
    let addr = bridge.local_addr();
    let publisher = enroll(addr, &ca, "pub-1").await;
    let mut pub_raw = connect(addr, &publisher, "pub-1-c").await;
    let key = join(&mut pub_raw, &ca, &publisher, GROUP, Role::Publisher, 1).await;
    let mut watch = watcher(broker.addr, "watch-1").await;
    // Before the crash: a notice goes through the gRPC stream.
    rekey_notice(&ca, SUB_KEY_TOPIC, vec![1]);
    until_published(&mut watch, SUB_KEY_TOPIC, &[1]).await;

    server.kill().await;
    // Enrollment needs the CA: refused with 0x88 (server unavailable), never left hanging.
    let (ack, _) = try_enroll(addr, &ca, "late-1").await;
    assert_eq!(u8::from(ack.reason_code), 0x88);
    // A certificate CONNECT is checked with the cached Q_CA: devices keep connecting.
    let (mut during, ack) = try_connect(addr, &publisher, "pub-1-d").await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    let accepted = bridge.metrics().accepted_count();
    let (code, _) = publish_protected(&mut during, &publisher, key.epoch(), b"during", 7).await;
    // Success, or 0x10 (no matching subscribers) from Mosquitto: relayed either way.
    assert!(code < 0x80, "PUBACK {code:#x}");
    assert_eq!(
        bridge.metrics().accepted_count(),
        accepted + 1,
        "protected traffic of known groups is verified from the cache"
    );
    // The CA logs a notice while the bridge cannot follow.
    rekey_notice(&ca, PUB_KEY_TOPIC, vec![2]);

    server.restart().await;
    let seen = until_published(&mut watch, PUB_KEY_TOPIC, &[2]).await;
    assert_eq!(
        seen,
        vec![(PUB_KEY_TOPIC.to_string(), vec![2])],
        "resumed after the last applied notice: the missed one once, nothing again"
    );
    // The notice is retained: a client arriving later gets it from the broker.
    let mut late = watcher(broker.addr, "watch-2").await;
    let got = late.drain_publishes(Duration::from_millis(500)).await;
    assert!(
        got.contains(&(PUB_KEY_TOPIC.to_string(), vec![2])),
        "{got:?}"
    );
    // CA calls work again (the gRPC channel reconnects): enrollment succeeds.
    let mut enrolled = false;
    for _ in 0..20 {
        let (ack, _) = try_enroll(addr, &ca, "late-2").await;
        if ack.reason_code == v5::ConnectAckReason::Success {
            enrolled = true;
            break;
        }
        assert_eq!(u8::from(ack.reason_code), 0x88);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(enrolled, "enrollment works after the CA restarted");
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_keeps_the_bridge_and_republishes_retained_notices() {
    let mut broker = Mosquitto::start().await;
    let ca = ca_with_group();
    let bridge = start_bridge(
        pinned(config(broker.addr), ca.key.public()),
        Some(Arc::new(test_ca::Client(ca.clone()))),
    )
    .await;
    let addr = bridge.local_addr();
    let publisher = enroll(addr, &ca, "pub-1").await;
    let subscriber = enroll(addr, &ca, "sub-1").await;
    let mut sub_raw = connect(addr, &subscriber, "sub-1-c").await;
    join(&mut sub_raw, &ca, &subscriber, GROUP, Role::Subscriber, 1).await;
    let mut pub_raw = connect(addr, &publisher, "pub-1-c").await;
    let key = join(&mut pub_raw, &ca, &publisher, GROUP, Role::Publisher, 1).await;
    rekey_notice(&ca, SUB_KEY_TOPIC, vec![7, 7]);
    let mut watch = watcher(broker.addr, "watch-1").await;
    let before = until_published(&mut watch, SUB_KEY_TOPIC, &[7, 7]).await;
    let list = before
        .iter()
        .rev()
        .find(|(t, _)| t == LIST_TOPIC)
        .expect("certificate list retained")
        .1
        .clone();

    broker.kill();
    // Device sessions end with the broker; the bridge keeps accepting and answers 0x88.
    assert!(pub_raw.closed().await);
    assert!(sub_raw.closed().await);
    let (_raw, ack) = try_connect(addr, &publisher, "pub-1-x").await;
    assert_eq!(u8::from(ack.reason_code), 0x88);

    broker.restart().await;
    // The restarted broker has no retained messages of its own; the bridge publishes them again.
    let mut after = watcher(broker.addr, "watch-2").await;
    let seen = until_published(&mut after, SUB_KEY_TOPIC, &[7, 7]).await;
    assert!(
        seen.contains(&(LIST_TOPIC.to_string(), list.clone())),
        "certificate list published again"
    );
    // And they are retained again: a later client gets both from the broker.
    let mut late = watcher(broker.addr, "watch-3").await;
    let got = late.drain_publishes(Duration::from_millis(500)).await;
    assert!(
        got.contains(&(SUB_KEY_TOPIC.to_string(), vec![7, 7])),
        "{got:?}"
    );
    assert!(got.contains(&(LIST_TOPIC.to_string(), list)), "{got:?}");
    // New notices flow on the new connection.
    rekey_notice(&ca, PUB_KEY_TOPIC, vec![8]);
    until_published(&mut late, PUB_KEY_TOPIC, &[8]).await;

    // Devices reconnect and exchange protected messages again.
    let mut sub_raw = connect(addr, &subscriber, "sub-1-c").await;
    let ack = sub_raw.subscribe(2, GROUP, vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::GrantedQos1]);
    let mut pub_raw = connect(addr, &publisher, "pub-1-c").await;
    let (code, sent) = publish_protected(&mut pub_raw, &publisher, key.epoch(), b"back", 3).await;
    assert_eq!(code, 0);
    let got: Vec<Vec<u8>> = sub_raw
        .drain_publishes(Duration::from_millis(500))
        .await
        .into_iter()
        .filter(|(t, _)| t == GROUP)
        .map(|(_, p)| p)
        .collect();
    assert_eq!(got, vec![sent]);
    bridge.shutdown().await;
}

/// A TCP relay whose open connections can be frozen: bytes stop flowing both ways while neither
/// socket closes, as behind a silent middlebox or with a hung peer. Connections accepted after a
/// freeze flow normally.
struct FreezingRelay {
    addr: SocketAddr,
    freezes: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezingRelay {
    async fn start(to: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let freezes = Arc::new(AtomicU64::new(0));
        let f = freezes.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                    continue;
                };
                let born = f.load(Ordering::SeqCst);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                for (mut r, mut w) in [
                    (
                        Box::new(ri) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(ro), Box::new(wi)),
                ] {
                    let f = f.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match r.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if f.load(Ordering::SeqCst) != born {
                                // Frozen: hold both sockets open and pass nothing on.
                                std::future::pending::<()>().await;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        FreezingRelay {
            addr,
            freezes,
            task,
        }
    }

    fn freeze(&self) {
        self.freezes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for FreezingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_ca_link_is_noticed_and_notices_resume() {
    let broker = Mosquitto::start().await;
    let ca = ca_with_group();
    let server = GrpcCa::start(ca.clone()).await;
    let to = server
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let relay = FreezingRelay::start(to).await;
    let mut cfg = pinned(config(broker.addr), ca.key.public());
    cfg.ca.endpoint = format!("http://{}", relay.addr);
    cfg.ca.token = Some("bridge-token".into());
    cfg.ca.keepalive_ms = 300;
    let bridge = start_bridge(cfg.clone(), quva_bridge::grpc_ca(&cfg).unwrap()).await;
    let mut watch = watcher(broker.addr, "watch-k").await;
    rekey_notice(&ca, SUB_KEY_TOPIC, vec![1]);
    until_published(&mut watch, SUB_KEY_TOPIC, &[1]).await;

    // The link goes silent: no FIN, no RST, nothing. The CA logs a notice meanwhile.
    relay.freeze();
    rekey_notice(&ca, PUB_KEY_TOPIC, vec![2]);
    // An unanswered keepalive ping fails the link; the bridge connects again and catches up.
    until_published(&mut watch, PUB_KEY_TOPIC, &[2]).await;
    bridge.shutdown().await;
    drop(server);
}
