//! Verified throughput through one bridge on a one-node broker against two bridges on a two-node
//! clustered broker (ejabberd, docs/scale-out.md), in one run.
//!
//! Each setup has its own CA and fleet: one publisher per bridge, each sending option-2 QoS 1
//! PUBLISHes as fast as a window of unacknowledged messages allows, and subscribers split evenly
//! across the bridges, each receiving every message (so a message from one node crosses to the
//! other). Counted: PUBLISHes the bridges accepted (PUBACK success, each a verified signature)
//! and deliveries to subscribers, per second. Subscribers count without opening: the devices
//! would otherwise compete with the bridges and brokers for the same two cores.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use quva_client::device::Device;
use quva_client::ids::Role;
use quva_client::message::{Direction, Protection};
use quva_client::topics;
use quva_node::now_ms;
use quva_tests::Options;
use quva_tests::ejabberd::BrokerCluster;
use rand_core::OsRng;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use tokio::net::TcpStream;

use crate::fanout::{Rd, Wr, enroll_via};
use crate::mqtt::{self, Reader, Writer};
use crate::quva::{Credential, Deployment, Session};

/// Unacknowledged PUBLISHes a publisher may have in flight.
const WINDOW: u64 = 64;
/// Messages all publishers together may be ahead of the slowest subscriber. Without this bound
/// ejabberd closes a subscriber whose queue overflows (mod_mqtt's `max_queue`), where Mosquitto
/// would drop messages.
const AHEAD: u64 = 256;

/// Progress the publishers pace themselves by.
struct Flow {
    stop: AtomicBool,
    sent: AtomicU64,
    received: Vec<AtomicU64>,
    accepted: AtomicU64,
}

impl Flow {
    fn slowest(&self) -> u64 {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    fn delivered(&self) -> u64 {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum()
    }
}

/// One setup's result.
#[derive(Clone, Debug)]
pub struct Row {
    /// Broker nodes (and bridges, one per node).
    pub nodes: usize,
    /// Subscribers in total.
    pub subscribers: usize,
    /// PUBLISHes accepted by the bridges per second.
    pub accepted_per_s: f64,
    /// Deliveries to subscribers per second.
    pub delivered_per_s: f64,
}

async fn session(
    dep: &Deployment,
    bridge: std::net::SocketAddr,
    device: Device,
    role: Role,
) -> anyhow::Result<Session<Rd, Wr>> {
    let id = device.id().as_str().to_owned();
    let tcp = TcpStream::connect(bridge).await?;
    tcp.set_nodelay(true)?;
    let (r, w) = tcp.into_split();
    let (r, w): (Rd, Wr) = (Box::new(r), Box::new(w));
    let mut s =
        Session::connect(r, w, &id, dep.ca_public, Credential::Cert(Box::new(device))).await?;
    s.join(&dep.group, role, role == Role::Subscriber).await?;
    s.settle(&dep.group, role).await?;
    Ok(s)
}

/// Sends option-2 messages until stopped, keeping at most [`WINDOW`] unacknowledged and all
/// publishers at most [`AHEAD`] ahead of the slowest subscriber; counts accepted ones.
async fn publisher(mut s: Session<Rd, Wr>, flow: Arc<Flow>) -> anyhow::Result<()> {
    let group = crate::quva::group()?;
    let mut rng = OsRng;
    let (mut sent, mut acked) = (0u64, 0u64);
    let payload = vec![0x5a; 64];
    while !flow.stop.load(Ordering::Relaxed) {
        while sent - acked < WINDOW && flow.sent.load(Ordering::Relaxed) < flow.slowest() + AHEAD {
            flow.sent.fetch_add(1, Ordering::Relaxed);
            let (topic, bytes) = s
                .device
                .seal(
                    &group,
                    Protection::Confidential,
                    Direction::Forward,
                    &payload,
                    now_ms(),
                    &mut rng,
                )
                .map_err(|e| anyhow::anyhow!("seal: {e}"))?;
            let pkid = (sent % 65_000) as u16 + 1;
            s.writer.send(&mqtt::publish(pkid, &topic, bytes)).await?;
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_millis(5), s.reader.next()).await {
            Err(_) => continue,
            Ok(p) => match p?.context("the bridge closed the publisher's connection")? {
                Packet::PubAck(a) => {
                    acked += 1;
                    if matches!(
                        a.reason,
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                    ) {
                        flow.accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Packet::Publish(p) if p.pkid != 0 => {
                    s.writer.send(&mqtt::puback(p.pkid)).await?;
                }
                _ => {}
            },
        }
    }
    Ok(())
}

/// Counts data PUBLISHes into its counter of `flow` until stopped.
async fn subscriber(
    mut reader: Reader<Rd>,
    mut writer: Writer<Wr>,
    data: String,
    flow: Arc<Flow>,
    idx: usize,
) -> anyhow::Result<()> {
    while !flow.stop.load(Ordering::Relaxed) {
        let p = match tokio::time::timeout(Duration::from_millis(200), reader.next()).await {
            Err(_) => continue,
            Ok(p) => p?.context("the bridge closed a subscriber's connection")?,
        };
        if let Packet::Publish(p) = p {
            if p.pkid != 0 {
                writer.send(&mqtt::puback(p.pkid)).await?;
            }
            if p.topic.as_ref() == data.as_bytes() {
                if let Some(r) = flow.received.get(idx) {
                    r.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    Ok(())
}

/// One setup: `nodes` clustered ejabberd nodes (1 or 2), a bridge per node, a publisher per
/// bridge and `subscribers` split across them, for `duration`.
///
/// # Errors
/// ejabberd missing, refused steps, a connection closed during the run.
pub async fn run(nodes: usize, subscribers: usize, duration: Duration) -> anyhow::Result<Row> {
    let brokers = BrokerCluster::start(nodes).context("ejabberd is not installed")?;
    let dep = Deployment::start_with(&Options {
        upstream: Some(brokers.upstream(0)),
        ..Options::default()
    })?;
    let extra: Vec<_> = (1..nodes)
        .map(|i| dep.cluster.add_bridge(&brokers.upstream(i), i))
        .collect();
    let bridges: Vec<std::net::SocketAddr> = std::iter::once(dep.bridge())
        .chain(extra.iter().map(|b| b.addr))
        .collect();
    // A new bridge first catches up with the CA's notices (member lists, revocations).
    if nodes > 1 {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let data = topics::data(&dep.group);
    let flow = Arc::new(Flow {
        stop: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        received: (0..subscribers).map(|_| AtomicU64::new(0)).collect(),
        accepted: AtomicU64::new(0),
    });

    let mut subs = Vec::with_capacity(subscribers);
    for i in 0..subscribers {
        // Enrolled through the bridge it will use: ejabberd may close a session that reconnects
        // through another node right after the previous one closed.
        let device = enroll_via(
            &dep,
            bridges[i % nodes],
            &format!("sub-{i:03}"),
            Role::Subscriber,
        )
        .await?;
        let s = match session(&dep, bridges[i % nodes], device, Role::Subscriber).await {
            Ok(s) => s,
            Err(e) => {
                let logs: Vec<String> = extra
                    .iter()
                    .map(|b| format!("{}{}", b.proc.out(), b.proc.err()))
                    .collect();
                return Err(e.context(format!(
                    "subscriber {i}; other bridges:\n{}",
                    logs.join("\n")
                )));
            }
        };
        subs.push(s);
    }
    let mut pubs = Vec::with_capacity(nodes);
    for (i, &bridge) in bridges.iter().enumerate() {
        let device = enroll_via(&dep, bridge, &format!("pub-{i}"), Role::Publisher).await?;
        pubs.push(session(&dep, bridge, device, Role::Publisher).await?);
    }
    // Retained notices and member lists arrive before anything is counted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut tasks = Vec::new();
    for (idx, s) in subs.into_iter().enumerate() {
        let Session { reader, writer, .. } = s;
        tasks.push(tokio::spawn(subscriber(
            reader,
            writer,
            data.clone(),
            flow.clone(),
            idx,
        )));
    }
    // Warm-up, then the counted interval.
    let warm = Duration::from_secs(1);
    for s in pubs {
        tasks.push(tokio::spawn(publisher(s, flow.clone())));
    }
    tokio::time::sleep(warm).await;
    let (a0, d0) = (flow.accepted.load(Ordering::Relaxed), flow.delivered());
    let t0 = Instant::now();
    tokio::time::sleep(duration).await;
    let (a1, d1) = (flow.accepted.load(Ordering::Relaxed), flow.delivered());
    let secs = t0.elapsed().as_secs_f64();
    flow.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        if let Err(e) = t.await.context("a bench task")? {
            let log = format!(
                "{}\n--- ejabberd ---\n{}",
                dep.cluster.daemon_logs(),
                brokers.log(0)
            );
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(e.context(format!("bridge log:\n{}", tail.join("\n"))));
        }
    }
    drop(extra);
    Ok(Row {
        nodes,
        subscribers,
        accepted_per_s: (a1 - a0) as f64 / secs,
        delivered_per_s: (d1 - d0) as f64 / secs,
    })
}
