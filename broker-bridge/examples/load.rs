//! Load generator for the bridge: verified PUBLISH throughput, added latency over Mosquitto, and
//! memory per idle connection.
//!
//! Starts its own Mosquitto on a free loopback port, the in-memory test CA served over gRPC, and
//! the release `quva-bridge` binary as a separate process (so its memory is its own), then drives
//! raw MQTT 5 devices through it. Messages are sealed before the clock starts.
//!
//! ```sh
//! cargo build --release -p quva-bridge --bin quva-bridge --example load
//! target/release/examples/load throughput --batch 64
//! target/release/examples/load throughput --batch 1
//! target/release/examples/load latency
//! target/release/examples/load memory --idle 1000
//! target/release/examples/load fanout --subscribers 50 --messages 2000
//! ```

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/broker.rs"]
mod broker;
#[path = "../tests/support/devices.rs"]
mod devices;
#[path = "../tests/support/grpc_ca.rs"]
mod grpc_ca;
#[path = "../tests/support/test_ca.rs"]
mod test_ca;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::{Mosquitto, Raw};
use bytes::Bytes;
use bytestring::ByteString;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt as _, StreamExt as _};
use quva_bridge::now_ms;
use quva_client::enrollment::Credentials;
use quva_client::group::Privacy;
use quva_client::ids::{Epoch, GroupId, Role};
use rand_core::OsRng;
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::{MqttPacket, v5};
use test_ca::TestCa;
use tokio::sync::Semaphore;

const GROUP: &str = "plant/load";
/// The topic of the direct runs (not seen by the bridge's devices).
const DIRECT: &str = "direct/load";

#[derive(Debug, Parser)]
#[command(about = "Load generator for quva-bridge")]
struct Args {
    /// The quva-bridge binary (default: next to this example's directory).
    #[arg(long, global = true)]
    bridge_bin: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Verified option-1 PUBLISHes per second (QoS 1, pipelined), through the bridge and, as the
    /// anchor, the same publishers and payloads straight to Mosquitto.
    Throughput {
        /// `limits.max_batch` of the bridge (1: every signature verified alone).
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Publishing devices, each on its own connection.
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        /// Messages per publisher.
        #[arg(long, default_value_t = 5_000)]
        messages: usize,
        /// QoS 1 PUBLISHes in flight per publisher.
        #[arg(long, default_value_t = 64)]
        window: usize,
    },
    /// Publish-to-delivery latency of option-1 messages, through the bridge and direct.
    Latency {
        /// Messages per run (one at a time).
        #[arg(long, default_value_t = 2_000)]
        messages: usize,
    },
    /// The bridge's CPU time per message delivered to subscribers: `subscribers` connections
    /// through the bridge receive `messages` PUBLISHes sent straight to the broker.
    Fanout {
        /// Subscribers, each on its own connection through the bridge.
        #[arg(long, default_value_t = 50)]
        subscribers: usize,
        /// Messages published (QoS 0, 200-byte payloads).
        #[arg(long, default_value_t = 2_000)]
        messages: usize,
    },
    /// Resident memory of the bridge with no and with `idle` connected devices.
    Memory {
        /// Idle devices to connect.
        #[arg(long, default_value_t = 1_000)]
        idle: usize,
    },
}

/// The bridge as its own process.
struct BridgeProcess {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl BridgeProcess {
    async fn start(
        bin: &PathBuf,
        broker: SocketAddr,
        ca: &str,
        ca_public: &str,
        batch: usize,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let conf = dir.path().join("bridge.toml");
        std::fs::write(
            &conf,
            format!(
                "listen = \"{addr}\"\n\
                 [upstream]\naddress = \"{broker}\"\n\
                 [ca]\nendpoint = \"{ca}\"\npublic_key = \"{ca_public}\"\ntoken = \"load\"\n\
                 [topics]\nprotected = [\"plant/#\"]\n\
                 [limits]\nmax_batch = {batch}\n"
            ),
        )
        .unwrap();
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&conf)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return BridgeProcess {
                    child,
                    addr,
                    _dir: dir,
                };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the bridge did not start");
    }

    /// User plus system CPU time of the bridge process so far, from /proc.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name (which may hold spaces): utime is the 14th field of the
        // line, stime the 15th, in clock ticks (100 per second on Linux).
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = after
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        Duration::from_millis((f[0] + f[1]) * 10)
    }

    /// VmRSS in KiB from /proc.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct World {
    broker: Mosquitto,
    ca: Arc<TestCa>,
    _server: grpc_ca::GrpcCa,
    bridge: BridgeProcess,
}

async fn world(bin: &PathBuf, batch: usize) -> World {
    let broker = Mosquitto::start().await;
    let ca = TestCa::new();
    ca.create_group(GROUP, Privacy::Standard);
    let server = grpc_ca::GrpcCa::start(ca.clone()).await;
    let bridge = BridgeProcess::start(
        bin,
        broker.addr,
        &server.endpoint(),
        &hex::encode(ca.key.public().to_bytes()),
        batch,
    )
    .await;
    World {
        broker,
        ca,
        _server: server,
        bridge,
    }
}

/// Enrolls `id`, allowed in the group as `role`, and joins; returns its credentials and a joined
/// connection.
async fn member(w: &World, id: &str, role: Role) -> (Credentials, Raw) {
    w.ca.allow(GROUP, id, role);
    let creds = devices::enroll(w.bridge.addr, &w.ca, id).await;
    let mut raw = devices::connect(w.bridge.addr, &creds, &format!("{id}-c")).await;
    devices::join(&mut raw, &w.ca, &creds, GROUP, role, 1).await;
    (creds, raw)
}

fn seal_many(creds: &Credentials, epoch: Epoch, n: usize) -> Vec<Vec<u8>> {
    let group = GroupId::new(GROUP).unwrap();
    let s = devices::sealer(&group, epoch, creds.id(), creds.key());
    let mut rng = OsRng;
    (0..n)
        .map(|i| {
            s.option1(now_ms(), format!("reading {i:08}").as_bytes(), &mut rng)
                .unwrap()
        })
        .collect()
}

fn publish_packet(topic: &str, payload: Vec<u8>, qos1_id: Option<u16>) -> v5::Packet {
    v5::Packet::Publish(Box::new(Publish {
        dup: false,
        retain: false,
        qos: if qos1_id.is_some() {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        },
        topic: ByteString::from(topic),
        packet_id: qos1_id.and_then(std::num::NonZeroU16::new),
        payload: Bytes::from(payload),
        properties: Some(v5::PublishProperties::default()),
    }))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn throughput(
    bin: &PathBuf,
    batch: usize,
    publishers: usize,
    messages: usize,
    window: usize,
) {
    let w = world(bin, batch).await;
    let mut creds = Vec::new();
    for i in 0..publishers {
        creds.push(member(&w, &format!("pub-{i}"), Role::Publisher).await);
    }
    let epoch = Epoch(w.ca.keys(GROUP).group_info().epoch.0);
    // Every join refreshed the bridge's copy of the group: seal at the current epoch. The direct
    // runs send the same sealed payloads straight to Mosquitto on a topic nobody checks, with the
    // same windows: the anchor of the same run.
    let mut via = Vec::new();
    let mut direct = Vec::new();
    for (i, (c, raw)) in creds.into_iter().enumerate() {
        let payloads = seal_many(&c, epoch, messages);
        let (to_broker, _) = Raw::connect(w.broker.addr, &format!("direct-pub-{i}"), None).await;
        direct.push((to_broker, payloads.clone()));
        via.push((raw, payloads));
    }
    let size = via[0].1[0].len();
    println!("load average before: {}", load_average());
    let direct = pump(direct, DIRECT, window, messages).await;
    let via = pump(via, GROUP, window, messages).await;
    for (name, (acked, refused, secs)) in
        [("direct to Mosquitto", direct), ("through the bridge", via)]
    {
        println!(
            "throughput {name}: max_batch={batch} publishers={publishers} window={window} \
             payload={size} B: {acked} accepted, {refused} refused in {secs:.2} s = {:.0} PUBLISH/s",
            acked as f64 / secs
        );
    }
    let rate = |(acked, _, secs): (usize, usize, f64)| acked as f64 / secs;
    println!(
        "verified through the bridge / direct: {:.0}%",
        100.0 * rate(via) / rate(direct)
    );
    println!("load average after: {}", load_average());
    drop(w.broker);
}

/// Sends each connection's payloads as QoS 1 PUBLISHes to `topic`, at most `window` unacknowledged
/// per connection, until every one is acknowledged; returns (accepted, refused, seconds).
async fn pump(
    loads: Vec<(Raw, Vec<Vec<u8>>)>,
    topic: &'static str,
    window: usize,
    messages: usize,
) -> (usize, usize, f64) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (raw, payloads) in loads {
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = raw.framed.split();
            let window = Arc::new(Semaphore::new(window));
            let reader = {
                let window = window.clone();
                tokio::spawn(async move {
                    let mut acked = 0usize;
                    let mut refused = 0usize;
                    while acked + refused < messages {
                        match stream.next().await {
                            Some(Ok((MqttPacket::V5(v5::Packet::PublishAck(a)), _))) => {
                                let code = u8::from(a.reason_code);
                                if code < 0x80 {
                                    acked += 1;
                                } else {
                                    if refused == 0 {
                                        eprintln!("first refusal: PUBACK {code:#x}");
                                    }
                                    refused += 1;
                                }
                                window.add_permits(1);
                            }
                            Some(Ok(_)) => {}
                            _ => break,
                        }
                    }
                    (acked, refused)
                })
            };
            for (i, p) in payloads.into_iter().enumerate() {
                window.acquire().await.unwrap().forget();
                let id = u16::try_from(i % 65_535 + 1).unwrap();
                sink.send(MqttPacket::V5(publish_packet(topic, p, Some(id))))
                    .await
                    .unwrap();
            }
            reader.await.unwrap()
        }));
    }
    let (mut acked, mut refused) = (0, 0);
    for t in tasks {
        let (a, r) = t.await.unwrap();
        acked += a;
        refused += r;
    }
    (acked, refused, started.elapsed().as_secs_f64())
}

/// Sends `payloads` one at a time from `publ` and times each until `sub` receives it.
async fn time_deliveries(
    publ: &mut Raw,
    sub: &mut Raw,
    topic: &str,
    payloads: Vec<Vec<u8>>,
    qos1: bool,
) -> Vec<Duration> {
    let mut out = Vec::with_capacity(payloads.len());
    for (i, p) in payloads.into_iter().enumerate() {
        let id = qos1.then(|| u16::try_from(i % 65_535 + 1).unwrap());
        let started = Instant::now();
        publ.send(publish_packet(topic, p, id)).await;
        loop {
            match sub.recv().await {
                Some(v5::Packet::Publish(m)) => {
                    if let Some(pid) = m.packet_id {
                        sub.send(v5::Packet::PublishAck(v5::PublishAck {
                            packet_id: pid,
                            reason_code: v5::PublishAckReason::Success,
                            properties: Vec::new(),
                            reason_string: None,
                        }))
                        .await;
                    }
                    break;
                }
                Some(_) => {}
                None => panic!("message {i} not delivered"),
            }
        }
        out.push(started.elapsed());
        if qos1 {
            // Consume the publisher's PUBACK before the next message.
            loop {
                match publ.recv().await {
                    Some(v5::Packet::PublishAck(_)) => break,
                    Some(_) => {}
                    None => panic!("no PUBACK"),
                }
            }
        }
    }
    out
}

fn percentiles(mut d: Vec<Duration>) -> (f64, f64) {
    d.sort();
    let at = |q: f64| {
        let i = ((d.len() as f64 - 1.0) * q).round() as usize;
        d[i].as_secs_f64() * 1e6
    };
    (at(0.5), at(0.99))
}

async fn latency(bin: &PathBuf, messages: usize) {
    let w = world(bin, 64).await;
    let (pub_creds, mut pub_bridge) = member(&w, "pub-0", Role::Publisher).await;
    let (_sub_creds, mut sub_bridge) = member(&w, "sub-0", Role::Subscriber).await;
    let ack = sub_bridge.subscribe(2, GROUP, vec![]).await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::GrantedQos1]);
    let (mut pub_direct, _) = Raw::connect(w.broker.addr, "direct-pub", None).await;
    let (mut sub_direct, _) = Raw::connect(w.broker.addr, "direct-sub", None).await;
    sub_direct.subscribe(1, DIRECT, vec![]).await;
    let epoch = Epoch(w.ca.keys(GROUP).group_info().epoch.0);
    println!("load average before: {}", load_average());
    for qos1 in [false, true] {
        let qos = if qos1 { 1 } else { 0 };
        // Warm-up (group fetch, connections), then the measured runs.
        let warm = seal_many(&pub_creds, epoch, 50);
        time_deliveries(&mut pub_bridge, &mut sub_bridge, GROUP, warm, qos1).await;
        let via = seal_many(&pub_creds, epoch, messages);
        let size = via[0].len();
        let via =
            percentiles(time_deliveries(&mut pub_bridge, &mut sub_bridge, GROUP, via, qos1).await);
        let direct = seal_many(&pub_creds, epoch, messages);
        time_deliveries(
            &mut pub_direct,
            &mut sub_direct,
            DIRECT,
            direct[..50].to_vec(),
            qos1,
        )
        .await;
        let direct = percentiles(
            time_deliveries(&mut pub_direct, &mut sub_direct, DIRECT, direct, qos1).await,
        );
        println!(
            "latency QoS {qos}, option 1, {size} B, {messages} messages: \
             direct p50 {:.0} µs p99 {:.0} µs; via bridge p50 {:.0} µs p99 {:.0} µs; \
             added p50 {:.0} µs p99 {:.0} µs",
            direct.0,
            direct.1,
            via.0,
            via.1,
            via.0 - direct.0,
            via.1 - direct.1
        );
    }
    println!("load average after: {}", load_average());
}

async fn fanout(bin: &PathBuf, subscribers: usize, messages: usize) {
    let w = world(bin, 64).await;
    let mut subs = Vec::with_capacity(subscribers);
    for i in 0..subscribers {
        let (mut raw, _) = Raw::connect(w.bridge.addr, &format!("fan-{i}"), None).await;
        let s = v5::Subscribe {
            packet_id: std::num::NonZeroU16::MIN,
            id: None,
            user_properties: Vec::new(),
            topic_filters: vec![(
                "fan/out".into(),
                v5::SubscriptionOptions {
                    qos: rmqtt_codec::types::QoS::AtMostOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: v5::RetainHandling::AtSubscribe,
                },
            )],
        };
        raw.send(v5::Packet::Subscribe(s)).await;
        assert!(matches!(
            raw.recv().await,
            Some(v5::Packet::SubscribeAck(_))
        ));
        subs.push(raw);
    }
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut raw| {
            tokio::spawn(async move {
                let mut n = 0;
                while n < messages {
                    match raw.recv_within(Duration::from_secs(10)).await {
                        Some(v5::Packet::Publish(_)) => n += 1,
                        Some(_) => {}
                        None => break,
                    }
                }
                n
            })
        })
        .collect();
    let (mut publisher, _) = Raw::connect(w.broker.addr, "fan-pub", None).await;
    let cpu_before = w.bridge.cpu_time();
    let started = Instant::now();
    for _ in 0..messages {
        publisher
            .send(publish_packet("fan/out", vec![7; 200], None))
            .await;
    }
    let mut delivered = 0;
    for r in readers {
        delivered += r.await.unwrap();
    }
    let elapsed = started.elapsed();
    let cpu = w.bridge.cpu_time() - cpu_before;
    println!(
        "fanout: {subscribers} subscribers x {messages} messages: {delivered} deliveries in {:.2} s; \
         bridge CPU {:.2} s = {:.2} us per delivery (load average {})",
        elapsed.as_secs_f64(),
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64,
        load_average()
    );
}

async fn memory(bin: &PathBuf, idle: usize) {
    let w = world(bin, 64).await;
    let creds = devices::enroll(w.bridge.addr, &w.ca, "idle").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = w.bridge.rss_kib();
    let mut conns = Vec::with_capacity(idle);
    for i in 0..idle {
        let (raw, ack) = devices::try_connect(w.bridge.addr, &creds, &format!("idle-{i}")).await;
        assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
        conns.push(raw);
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let after = w.bridge.rss_kib();
    println!(
        "memory: VmRSS {before} KiB with 0 devices, {after} KiB with {idle} idle devices \
         (certificate CONNECT, one upstream connection each): {:.1} KiB per connection",
        (after.saturating_sub(before)) as f64 / idle as f64
    );
    drop(conns);
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bin = args.bridge_bin.unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap();
        exe.parent()
            .and_then(|p| p.parent())
            .map(|p| p.join("quva-bridge"))
            .unwrap()
    });
    match args.cmd {
        Cmd::Throughput {
            batch,
            publishers,
            messages,
            window,
        } => throughput(&bin, batch, publishers, messages, window).await,
        Cmd::Latency { messages } => latency(&bin, messages).await,
        Cmd::Fanout {
            subscribers,
            messages,
        } => fanout(&bin, subscribers, messages).await,
        Cmd::Memory { idle } => memory(&bin, idle).await,
    }
}
