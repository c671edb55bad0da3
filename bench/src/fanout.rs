//! Publish-to-receive latency and sustained throughput, one publisher and N subscribers, all
//! MQTT 5 QoS 1 over loopback, every client a task of this process.
//!
//! - Latency: the publisher sends one message every `interval`; a subscriber's latency is the
//!   time from just before the publisher builds the message (Quva: before sealing) to the
//!   arrival of the PUBLISH at the subscriber's socket. The k-th PUBLISH a subscriber receives
//!   is message k (one publisher, QoS 1, in order); its payload is checked afterwards.
//! - Throughput: the publisher keeps at most `window` messages ahead of the slowest subscriber
//!   for `duration`; messages per second delivered to every subscriber.
//!
//! Quva subscribers open (verify and decrypt) their messages after the run, each open timed on
//! its own: N devices each have their own CPU, while here they share two cores with the
//! brokers, so opening inline would make the n-th subscriber wait for n−1 others. A Quva
//! device's latency is reported as arrival + its own open time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use quva_client::device::{Device, Output};
use quva_client::ids::Role;
use quva_client::message::{Direction, Protection};
use quva_client::topics;
use quva_node::now_ms;
use rand_core::OsRng;
use rumqttc::v5::mqttbytes::v5::Packet;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::mqtt::{self, Reader, Writer};
use crate::quva::{Credential, Deployment, Session};
use crate::tls::{self, Auth, Pki};

/// Application payload size (the sequence number and padding).
pub const PAYLOAD: usize = 64;

/// The system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// Mosquitto, plain TCP.
    Plain,
    /// Mosquitto over TLS 1.3 (server-only authentication).
    Tls,
    /// Quva through quva-bridge to Mosquitto with one protection option.
    Quva(Protection),
}

impl System {
    /// A label for tables.
    pub fn label(self) -> String {
        match self {
            System::Plain => "Mosquitto, plain".to_owned(),
            System::Tls => "Mosquitto, TLS 1.3".to_owned(),
            System::Quva(p) => format!("Quva option {}", p.number()),
        }
    }
}

/// The numbers of one run.
#[derive(Clone, Debug, Serialize)]
pub struct FanoutResult {
    /// The system.
    pub system: String,
    /// Subscribers.
    pub subscribers: usize,
    /// Messages published in the latency run.
    pub messages: u64,
    /// Deliveries that arrived / expected.
    pub delivered: u64,
    /// Expected deliveries.
    pub expected: u64,
    /// Publish-to-arrival latency, µs.
    pub arrival_p50_us: u64,
    /// 99th percentile.
    pub arrival_p99_us: u64,
    /// Arrival + the device's own open time (Quva), µs; equal to arrival otherwise.
    pub device_p50_us: u64,
    /// 99th percentile.
    pub device_p99_us: u64,
    /// A Quva device's open time, median µs (0 otherwise).
    pub open_p50_us: u64,
    /// Messages opened and checked.
    pub verified: u64,
    /// Sustained messages per second delivered to every subscriber.
    pub throughput_msgs: f64,
    /// The same, deliveries per second (messages × subscribers).
    pub throughput_deliveries: f64,
}

/// Run settings.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Messages of the latency run.
    pub messages: u64,
    /// Time between them.
    pub interval: Duration,
    /// Length of the throughput run.
    pub duration: Duration,
    /// Messages the publisher may be ahead of the slowest subscriber.
    pub window: u64,
}

/// What subscribers share with the publisher.
struct Shared {
    start: Instant,
    /// Send time of each message, ns since `start`.
    sent: Vec<AtomicU64>,
    /// Messages received per subscriber.
    received: Vec<AtomicU64>,
    progress: Notify,
    stop: AtomicBool,
}

impl Shared {
    fn new(subscribers: usize, capacity: usize) -> Arc<Self> {
        Arc::new(Shared {
            start: Instant::now(),
            sent: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            received: (0..subscribers).map(|_| AtomicU64::new(0)).collect(),
            progress: Notify::new(),
            stop: AtomicBool::new(false),
        })
    }

    fn ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn slowest(&self) -> u64 {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }
}

/// One received PUBLISH.
struct Arrival {
    topic: String,
    payload: Bytes,
    at_ns: u64,
    wall_ms: u64,
}

/// What a subscriber saw.
struct SubLog {
    arrivals: Vec<Arrival>,
    data: u64,
}

/// Receives until `expected` data messages arrived or the run stops; keeps up to `keep`
/// arrivals (every one for the latency run).
async fn receive<R, W>(
    mut reader: Reader<R>,
    mut writer: Writer<W>,
    data: String,
    shared: Arc<Shared>,
    idx: usize,
    expected: u64,
    keep: usize,
) -> anyhow::Result<(SubLog, Reader<R>, Writer<W>)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut log = SubLog {
        arrivals: Vec::new(),
        data: 0,
    };
    while log.data < expected && !shared.stop.load(Ordering::Relaxed) {
        let p = match tokio::time::timeout(Duration::from_millis(200), reader.next()).await {
            Err(_) => continue,
            Ok(p) => p?.context("the server closed a subscriber's connection")?,
        };
        let Packet::Publish(p) = p else { continue };
        let at_ns = shared.ns();
        if p.pkid != 0 {
            writer.send(&mqtt::puback(p.pkid)).await?;
        }
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let is_data = topic == data;
        if is_data {
            log.data += 1;
            if let Some(r) = shared.received.get(idx) {
                r.store(log.data, Ordering::Release);
            }
            shared.progress.notify_waiters();
        }
        if log.arrivals.len() < keep || !is_data {
            log.arrivals.push(Arrival {
                topic,
                payload: p.payload,
                at_ns,
                wall_ms: now_ms(),
            });
        }
    }
    Ok((log, reader, writer))
}

fn payload(seq: u64) -> Vec<u8> {
    let mut p = vec![0x5a; PAYLOAD];
    p[..8].copy_from_slice(&seq.to_be_bytes());
    p
}

fn seq_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

/// Either half of a connection, whatever the transport.
pub type Rd = Box<dyn AsyncRead + Unpin + Send>;
/// The writing half.
pub type Wr = Box<dyn AsyncWrite + Unpin + Send>;

/// Where the runs connect.
pub struct Targets<'a> {
    /// Plain Mosquitto.
    pub plain: SocketAddr,
    /// Mosquitto with TLS (server-only authentication).
    pub tls: SocketAddr,
    /// Its PKI.
    pub pki: &'a Pki,
    /// The Quva deployment.
    pub quva: &'a Deployment,
}

impl Targets<'_> {
    /// A TCP (and for [`System::Tls`], TLS) connection to the system's entry point.
    async fn stream(&self, system: System) -> anyhow::Result<(Rd, Wr)> {
        let addr = match system {
            System::Plain => self.plain,
            System::Tls => self.tls,
            System::Quva(_) => self.quva.bridge(),
        };
        if system == System::Tls {
            let s = tls::connect(
                addr,
                self.pki.client_config(Auth::ServerOnly)?,
                mqtt::Counters::default(),
            )
            .await?;
            let (r, w) = tokio::io::split(s);
            return Ok((Box::new(r), Box::new(w)));
        }
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (r, w) = tcp.into_split();
        Ok((Box::new(r), Box::new(w)))
    }
}

/// CONNECT and SUBSCRIBE of a client without Quva.
async fn clear_client(
    (r, w): (Rd, Wr),
    id: &str,
    topic: &str,
) -> anyhow::Result<(Reader<Rd>, Writer<Wr>)> {
    let mut reader = Reader::new(r);
    let mut writer = Writer::new(w);
    writer.send(&mqtt::connect(id, None)).await?;
    mqtt::connack_ok(reader.expect("CONNACK").await?)?;
    writer
        .send(&mqtt::subscribe(1, &[topic.to_owned()], Vec::new()))
        .await?;
    mqtt::suback_ok(reader.expect("SUBACK").await?)?;
    Ok((reader, writer))
}

/// Enrolled Quva devices: the publisher and the subscribers.
pub struct Fleet {
    publisher: Option<Device>,
    subscribers: Vec<Option<Device>>,
}

impl Fleet {
    /// Registers, enrolls and joins one publisher and `n` subscribers.
    ///
    /// # Errors
    /// Any refused step.
    pub async fn enroll(dep: &Deployment, n: usize) -> anyhow::Result<Self> {
        let publisher = enroll_one(dep, "pub-0", Role::Publisher).await?;
        let mut subscribers = Vec::with_capacity(n);
        for i in 0..n {
            subscribers.push(Some(
                enroll_one(dep, &format!("sub-{i:03}"), Role::Subscriber).await?,
            ));
        }
        Ok(Fleet {
            publisher: Some(publisher),
            subscribers,
        })
    }
}

/// Registers, enrolls and joins one device in `role` (then disconnects it).
///
/// # Errors
/// Any refused step.
pub async fn enroll_one(dep: &Deployment, id: &str, role: Role) -> anyhow::Result<Device> {
    enroll_via(dep, dep.bridge(), id, role).await
}

/// As [`enroll_one`], through the bridge at `bridge`.
///
/// # Errors
/// Any refused step.
pub async fn enroll_via(
    dep: &Deployment,
    bridge: std::net::SocketAddr,
    id: &str,
    role: Role,
) -> anyhow::Result<Device> {
    let secret = dep.register(id, role)?;
    let tcp = TcpStream::connect(bridge).await?;
    tcp.set_nodelay(true)?;
    let (r, w) = tcp.into_split();
    let mut s = Session::connect(r, w, id, dep.ca_public, Credential::Enroll(&secret)).await?;
    s.join(&dep.group, role, false).await?;
    s.settle(&dep.group, role).await?;
    s.writer.close().await;
    Ok(s.into_device())
}

/// Connects an enrolled device with its certificate and joins (receiving the data topic).
async fn quva_client(
    targets: &Targets<'_>,
    system: System,
    device: Device,
    role: Role,
) -> anyhow::Result<(Device, Reader<Rd>, Writer<Wr>)> {
    let dep = targets.quva;
    let id = device.id().as_str().to_owned();
    let (r, w) = targets.stream(system).await?;
    let mut s =
        Session::connect(r, w, &id, dep.ca_public, Credential::Cert(Box::new(device))).await?;
    s.join(&dep.group, role, role == Role::Subscriber).await?;
    s.settle(&dep.group, role).await?;
    let Session {
        device,
        reader,
        writer,
        ..
    } = s;
    Ok((device, reader, writer))
}

/// How the publisher builds a message.
enum Sealer {
    Clear(String),
    Quva(Box<Device>, Protection, OsRng),
}

impl Sealer {
    fn seal(&mut self, seq: u64) -> anyhow::Result<(String, Vec<u8>)> {
        match self {
            Sealer::Clear(topic) => Ok((topic.clone(), payload(seq))),
            Sealer::Quva(device, protection, rng) => {
                let group = crate::quva::group()?;
                device
                    .seal(
                        &group,
                        *protection,
                        Direction::Forward,
                        &payload(seq),
                        now_ms(),
                        rng,
                    )
                    .map_err(|e| anyhow::anyhow!("seal: {e}"))
            }
        }
    }
}

/// Publishes up to `count` messages: paced by `pace` if given, never more than `window` ahead
/// of the slowest subscriber, and not after `until`. Returns the number published.
#[allow(clippy::too_many_arguments)]
async fn publish(
    sealer: &mut Sealer,
    writer: &mut Writer<Wr>,
    shared: &Shared,
    pace: Option<Duration>,
    window: u64,
    until: Option<Instant>,
    count: u64,
) -> anyhow::Result<u64> {
    let mut seq = 0u64;
    let mut next = Instant::now();
    while seq < count && until.is_none_or(|u| Instant::now() < u) {
        if let Some(pace) = pace {
            tokio::time::sleep_until(next.into()).await;
            next += pace;
        }
        loop {
            let notified = shared.progress.notified();
            if seq < shared.slowest() + window {
                break;
            }
            if tokio::time::timeout(Duration::from_secs(10), notified)
                .await
                .is_err()
                && seq >= shared.slowest() + window
            {
                bail!("subscribers stopped receiving at message {seq}");
            }
        }
        if let Some(s) = shared.sent.get(seq as usize) {
            s.store(shared.ns(), Ordering::Release);
        }
        let (topic, bytes) = sealer.seal(seq)?;
        let pkid = (seq % 65_000) as u16 + 1;
        writer.send(&mqtt::publish(pkid, &topic, bytes)).await?;
        seq += 1;
    }
    Ok(seq)
}

/// Reads and drops what the publisher receives (PUBACKs) until told to stop.
fn drain(mut reader: Reader<Rd>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Reader<Rd>> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(100), reader.next()).await {
                Ok(Ok(Some(_))) | Err(_) => {}
                Ok(_) => break,
            }
        }
        reader
    })
}

type Conn = (Reader<Rd>, Writer<Wr>);

/// Runs every subscriber's [`receive`] and the publisher; returns the logs, the connections and
/// the number of messages published and the elapsed time from first send to last arrival.
#[allow(clippy::too_many_arguments)]
async fn one_run(
    subs: Vec<Conn>,
    sealer: &mut Sealer,
    writer: &mut Writer<Wr>,
    data: &str,
    shared: Arc<Shared>,
    pace: Option<Duration>,
    window: u64,
    until: Option<Instant>,
    count: u64,
    keep: usize,
) -> anyhow::Result<(Vec<(SubLog, Conn)>, u64, Duration)> {
    let mut tasks = Vec::with_capacity(subs.len());
    for (idx, (r, w)) in subs.into_iter().enumerate() {
        let shared = shared.clone();
        let data = data.to_owned();
        tasks.push(tokio::spawn(async move {
            let (log, r, w) = receive(r, w, data, shared, idx, count, keep).await?;
            Ok::<_, anyhow::Error>((log, (r, w)))
        }));
    }
    let t0 = Instant::now();
    let published = publish(sealer, writer, &shared, pace, window, until, count).await;
    let published = match published {
        Ok(p) => p,
        Err(e) => {
            shared.stop.store(true, Ordering::Relaxed);
            return Err(e);
        }
    };
    // Wait for the last deliveries.
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.slowest() < published && Instant::now() < deadline {
        let notified = shared.progress.notified();
        if shared.slowest() >= published {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
    let elapsed = t0.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await??);
    }
    Ok((out, published, elapsed))
}

/// Runs latency and throughput for one system and `n` subscribers.
///
/// # Errors
/// Connection failures, refused joins, stalled runs.
pub async fn run(
    system: System,
    n: usize,
    targets: &Targets<'_>,
    fleet: &mut Fleet,
    settings: Settings,
) -> anyhow::Result<FanoutResult> {
    let clear_topic = "bench/clear";
    let data = match system {
        System::Quva(_) => topics::data(&crate::quva::group()?),
        _ => clear_topic.to_owned(),
    };
    let mut subs = Vec::with_capacity(n);
    let mut devices = Vec::new();
    for i in 0..n {
        match system {
            System::Quva(_) => {
                let device = fleet
                    .subscribers
                    .get_mut(i)
                    .and_then(Option::take)
                    .context("not enough enrolled subscribers")?;
                let (d, r, w) = quva_client(targets, system, device, Role::Subscriber).await?;
                devices.push(d);
                subs.push((r, w));
            }
            _ => {
                let s = targets.stream(system).await?;
                subs.push(clear_client(s, &format!("sub-{i:03}"), clear_topic).await?);
            }
        }
    }
    let (mut sealer, pub_reader, mut pub_writer) = match system {
        System::Quva(protection) => {
            let device = fleet.publisher.take().context("no enrolled publisher")?;
            let (d, r, w) = quva_client(targets, system, device, Role::Publisher).await?;
            (Sealer::Quva(Box::new(d), protection, OsRng), r, w)
        }
        _ => {
            let s = targets.stream(system).await?;
            let (r, w) = clear_client(s, "pub-0", "bench/unused").await?;
            (Sealer::Clear(clear_topic.to_owned()), r, w)
        }
    };
    // Retained notices and member lists arrive before anything is measured; the subscribers'
    // runs keep whatever is still on its way.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let drainer = drain(pub_reader, stop.clone());

    // Latency.
    let shared = Shared::new(n, settings.messages as usize);
    let (logs, published, _) = one_run(
        subs,
        &mut sealer,
        &mut pub_writer,
        &data,
        shared.clone(),
        Some(settings.interval),
        settings.window.max(settings.messages),
        None,
        settings.messages,
        usize::MAX,
    )
    .await?;
    let mut arrival = Histogram::<u64>::new(3)?;
    let mut device_lat = Histogram::<u64>::new(3)?;
    let mut open = Histogram::<u64>::new(3)?;
    let mut delivered = 0u64;
    let mut verified = 0u64;
    let mut subs = Vec::with_capacity(n);
    for (i, (log, conn)) in logs.into_iter().enumerate() {
        subs.push(conn);
        delivered += log.data;
        let rows: Vec<(u64, u64, u64)> = match devices.get_mut(i) {
            Some(device) => {
                let (rows, failed) = open_all(device, &log, &data);
                if failed > 0 {
                    bail!("{failed} messages did not open at subscriber {i}");
                }
                rows
            }
            None => log
                .arrivals
                .iter()
                .filter(|a| a.topic == data)
                .map(|a| Ok((seq_of(&a.payload).context("short payload")?, a.at_ns, 0)))
                .collect::<anyhow::Result<_>>()?,
        };
        for (k, (seq, at_ns, open_ns)) in rows.into_iter().enumerate() {
            if seq != k as u64 {
                bail!("subscriber {i} received message {seq} as its number {k}");
            }
            verified += 1;
            let sent = shared
                .sent
                .get(seq as usize)
                .map_or(0, |s| s.load(Ordering::Acquire));
            let lat_us = at_ns.saturating_sub(sent) / 1000;
            arrival.record(lat_us.max(1))?;
            device_lat.record((lat_us + open_ns / 1000).max(1))?;
            if open_ns > 0 {
                open.record((open_ns / 1000).max(1))?;
            }
        }
    }
    let expected = published * n as u64;

    // Throughput.
    let shared = Shared::new(n, 0);
    let until = Instant::now() + settings.duration;
    let (logs, sent, elapsed) = one_run(
        subs,
        &mut sealer,
        &mut pub_writer,
        &data,
        shared.clone(),
        None,
        settings.window,
        Some(until),
        u64::MAX,
        16,
    )
    .await?;
    let complete = shared.slowest();
    let mut conns = Vec::new();
    for (i, (log, conn)) in logs.into_iter().enumerate() {
        conns.push(conn);
        if let Some(device) = devices.get_mut(i) {
            let (rows, failed) = open_all(device, &log, &data);
            if failed > 0 || rows.is_empty() {
                bail!("messages of the throughput run did not open at subscriber {i}");
            }
        }
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    stop.store(true, Ordering::Relaxed);
    let _ = drainer.await;
    for (_, mut w) in conns {
        w.close().await;
    }
    pub_writer.close().await;

    // Give the devices back for the next run.
    for (i, d) in devices.into_iter().enumerate() {
        if let Some(slot) = fleet.subscribers.get_mut(i) {
            *slot = Some(d);
        }
    }
    if let Sealer::Quva(d, _, _) = sealer {
        fleet.publisher = Some(*d);
    }
    let _ = sent;
    Ok(FanoutResult {
        system: system.label(),
        subscribers: n,
        messages: published,
        delivered,
        expected,
        arrival_p50_us: arrival.value_at_quantile(0.5),
        arrival_p99_us: arrival.value_at_quantile(0.99),
        device_p50_us: device_lat.value_at_quantile(0.5),
        device_p99_us: device_lat.value_at_quantile(0.99),
        open_p50_us: if open.is_empty() {
            0
        } else {
            open.value_at_quantile(0.5)
        },
        verified,
        throughput_msgs: complete as f64 / secs,
        throughput_deliveries: complete as f64 * n as f64 / secs,
    })
}

/// Opens a Quva subscriber's kept arrivals in order; returns (seq, arrival ns, open ns) of each
/// data message and the number that did not open.
fn open_all(device: &mut Device, log: &SubLog, data: &str) -> (Vec<(u64, u64, u64)>, u64) {
    let mut rng = OsRng;
    let mut opened = Vec::new();
    let mut failed = 0;
    for a in &log.arrivals {
        let t = Instant::now();
        let outs = device.on_publish(&a.topic, &a.payload, a.wall_ms, &mut rng);
        let dt = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if a.topic != data {
            continue;
        }
        match outs.iter().find_map(|o| match o {
            Output::Message(m) => seq_of(m.payload()),
            _ => None,
        }) {
            Some(seq) => opened.push((seq, a.at_ns, dt.max(1))),
            None => failed += 1,
        }
    }
    (opened, failed)
}
