//! Group OTA over real processes (PROTOCOL.md §7.2) against the two alternatives, in one run:
//!
//! - *plain*: the same bytes (manifest, chunks and key message as opaque blobs) retained on a
//!   Mosquitto without any protection, fetched by `n` clients: the floor a download cannot beat.
//! - *group OTA*: a signer joined as publisher encrypts the image once, deposits manifest, chunks
//!   and key message retained through the bridge (which checks each) and goes offline; then `n`
//!   devices joined as subscribers subscribe through the bridge and each verifies the manifest,
//!   opens the key message with the group key, checks every chunk's hash, decrypts it and checks
//!   H(image).
//! - *per device*: Chien & Wang's model, one pairwise channel per device: the signer seals the
//!   image in chunk-sized §7.1 direct messages for every device (n times the bytes and the AEAD
//!   work), which the devices open as they arrive.
//!
//! Measured: the signer's CPU time (encryption and signing, not I/O), the bytes it publishes and
//! the broker keeps retained, the time to deposit, and each device's time from its SUBSCRIBE to a
//! verified image (p50 and the last one). Images are kept in memory (a device writes them to a
//! staging file; that cost is the same with and without Quva).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use quva_client::curve::Point;
use quva_client::device::Device;
use quva_client::direct::{DirectFloor, DirectSealer, UnverifiedDirect};
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_client::members::MemberList;
use quva_client::message::{Direction, Policy, Protection, UnverifiedMessage};
use quva_client::ota::{
    Download, ImageDigest, OtaPolicy, ReleaseSigner, UnverifiedManifest, VerifiedManifest,
};
use quva_client::topics::{self, OtaItem, OtaTopic};
use quva_node::now_ms;
use rand_core::{OsRng, RngCore};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use serde::Serialize;
use tokio::net::TcpStream;

use crate::fanout::{Rd, Wr};
use crate::mqtt::{self, Reader, Writer};
use crate::quva::{Credential, Deployment, Session};

/// One OTA measurement.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Devices that fetch the image.
    pub devices: usize,
    /// Image size in bytes.
    pub image_bytes: usize,
    /// Chunk size in bytes.
    pub chunk: u32,
    /// The release version (one per run, so that runs do not share retained topics).
    pub version: u64,
}

/// One system's result.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// `plain`, `group OTA` or `per device`.
    pub system: &'static str,
    /// Devices.
    pub devices: usize,
    /// Image size.
    pub image_bytes: usize,
    /// Signer CPU for encryption and signatures, in milliseconds.
    pub signer_cpu_ms: f64,
    /// Payload bytes the signer published.
    pub published_bytes: u64,
    /// Payload bytes the broker keeps retained afterwards.
    pub retained_bytes: u64,
    /// From the first PUBLISH to the last PUBACK of the deposit, in milliseconds (for per-device
    /// delivery the devices receive while it runs).
    pub deposit_ms: f64,
    /// Median time of a device from its SUBSCRIBE to a verified image, in milliseconds.
    pub fetch_p50_ms: f64,
    /// The last device's time, in milliseconds.
    pub fetch_max_ms: f64,
    /// One device fetching alone afterwards (the others idle), in milliseconds.
    pub alone_ms: Option<f64>,
    /// From the first PUBLISH of the signer until every device holds the image.
    pub all_done_ms: f64,
}

/// The header of the table [`table_row`] fills.
pub const TABLE_HEADER: &str = "| devices × image | system | signer CPU | published | retained | \
    deposit | fetch p50 (concurrent) | fetch max | all done | one device alone |\n\
    |---|---|---:|---:|---:|---:|---:|---:|---:|---:|";

/// One markdown row, with ratios to the unprotected run `floor` of the same case.
pub fn table_row(row: &Row, floor: &Row) -> String {
    let ratio = |a: f64, b: f64| a / b.max(f64::MIN_POSITIVE);
    let alone = match (row.alone_ms, floor.alone_ms) {
        (Some(a), Some(p)) => format!("{a:.0} ms ({:.2}× plain)", ratio(a, p)),
        _ => "–".to_owned(),
    };
    format!(
        "| {} × {:.1} MiB | {} | {:.1} ms | {:.2} MB ({:.3}× image) | {:.2} MB | {:.0} ms | \
         {:.0} ms ({:.2}× plain) | {:.0} ms | {:.0} ms | {alone} |",
        row.devices,
        row.image_bytes as f64 / 1_048_576.0,
        row.system,
        row.signer_cpu_ms,
        row.published_bytes as f64 / 1e6,
        ratio(row.published_bytes as f64, row.image_bytes as f64),
        row.retained_bytes as f64 / 1e6,
        row.deposit_ms,
        row.fetch_p50_ms,
        ratio(row.fetch_p50_ms, floor.fetch_p50_ms),
        row.fetch_max_ms,
        row.all_done_ms,
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median_max(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let p50 = v.get(v.len() / 2).copied().unwrap_or_default();
    (ms(p50), ms(v.last().copied().unwrap_or_default()))
}

async fn tcp(addr: SocketAddr) -> anyhow::Result<(Rd, Wr)> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (r, w) = tcp.into_split();
    Ok((Box::new(r), Box::new(w)))
}

/// An enrolled device connected with its certificate and joined in `role`.
async fn joined(dep: &Deployment, device: Device, role: Role) -> anyhow::Result<Session<Rd, Wr>> {
    let id = device.id().as_str().to_owned();
    let (r, w) = tcp(dep.bridge()).await?;
    let mut s =
        Session::connect(r, w, &id, dep.ca_public, Credential::Cert(Box::new(device))).await?;
    s.join(&dep.group, role, false).await?;
    s.settle(&dep.group, role).await?;
    Ok(s)
}

/// Handles packets until the device holds the group's verified member list (it arrives, retained,
/// after the join).
async fn await_member_list(s: &mut Session<Rd, Wr>, group: &GroupId) -> anyhow::Result<()> {
    while s.device.member_list(group).is_none() {
        let p = s.reader.expect("the member list").await?;
        s.handle(p).await?;
    }
    Ok(())
}

/// Publishes QoS 1 PUBLISHes (retained or not) and waits for every PUBACK; all must succeed.
async fn deposit(
    reader: &mut Reader<Rd>,
    writer: &mut Writer<Wr>,
    items: &[(String, Vec<u8>)],
    retain: bool,
) -> anyhow::Result<()> {
    // Up to 64 in flight, as a client with a receive maximum would.
    let mut next = 0usize;
    let mut acked = 0usize;
    while acked < items.len() {
        while next < items.len() && next - acked < 64 {
            let (topic, payload) = &items[next];
            let pkid = (next % 65_000) as u16 + 1;
            let mut p = mqtt::publish(pkid, topic, payload.clone());
            if let Packet::Publish(publish) = &mut p {
                publish.retain = retain;
            }
            writer.send(&p).await?;
            next += 1;
        }
        match reader.expect("PUBACK").await? {
            Packet::PubAck(ack) => {
                if !matches!(
                    ack.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                ) {
                    bail!("PUBLISH {} refused: {:?}", ack.pkid, ack.reason);
                }
                acked += 1;
            }
            Packet::Publish(p) if p.pkid != 0 => writer.send(&mqtt::puback(p.pkid)).await?,
            _ => {}
        }
    }
    Ok(())
}

/// The unprotected floor: the same bytes retained on plain Mosquitto, fetched by `n` clients.
///
/// # Errors
/// A refused step or a client that does not receive every byte.
pub async fn plain(
    broker: SocketAddr,
    items: &[(String, Vec<u8>)],
    set: Settings,
) -> anyhow::Result<Row> {
    let n = set.devices;
    let prefix = format!("plain/{}", set.version);
    let (r, w) = tcp(broker).await?;
    let (mut reader, mut writer) = (Reader::new(r), Writer::new(w));
    writer
        .send(&mqtt::connect("ota-plain-signer", None))
        .await?;
    mqtt::connack_ok(reader.expect("CONNACK").await?)?;
    let plain: Vec<(String, Vec<u8>)> = items
        .iter()
        .map(|(t, p)| (format!("{prefix}/{t}"), p.clone()))
        .collect();
    let started = Instant::now();
    deposit(&mut reader, &mut writer, &plain, true).await?;
    let deposit_ms = ms(started.elapsed());
    let total: usize = plain.iter().map(|(_, p)| p.len()).sum();
    let filter = format!("{prefix}/#");
    let mut tasks = Vec::new();
    for i in 0..n {
        let filter = filter.clone();
        tasks.push(tokio::spawn(async move {
            plain_fetch(broker, &format!("ota-plain-{i}"), &filter, total).await
        }));
    }
    let times = join_all(tasks).await?;
    let alone = plain_fetch(broker, "ota-plain-alone", &filter, total).await?;
    let all_done_ms = deposit_ms + ms(times.iter().max().copied().unwrap_or_default());
    let (fetch_p50_ms, fetch_max_ms) = median_max(times);
    Ok(Row {
        system: "plain",
        devices: n,
        image_bytes: set.image_bytes,
        signer_cpu_ms: 0.0,
        published_bytes: total as u64,
        retained_bytes: total as u64,
        deposit_ms,
        fetch_p50_ms,
        fetch_max_ms,
        alone_ms: Some(ms(alone)),
        all_done_ms,
    })
}

/// A plain client subscribes to `filter` and receives `total` payload bytes; returns the time
/// from its SUBSCRIBE.
async fn plain_fetch(
    broker: SocketAddr,
    client_id: &str,
    filter: &str,
    total: usize,
) -> anyhow::Result<Duration> {
    let (r, w) = tcp(broker).await?;
    let (mut reader, mut writer) = (Reader::new(r), Writer::new(w));
    writer.send(&mqtt::connect(client_id, None)).await?;
    mqtt::connack_ok(reader.expect("CONNACK").await?)?;
    let t0 = Instant::now();
    writer
        .send(&mqtt::subscribe(1, &[filter.to_owned()], Vec::new()))
        .await?;
    let mut got = 0usize;
    while got < total {
        if let Packet::Publish(p) = reader.expect("PUBLISH").await? {
            if p.pkid != 0 {
                writer.send(&mqtt::puback(p.pkid)).await?;
            }
            got += p.payload.len();
        }
    }
    Ok(t0.elapsed())
}

async fn join_all<T>(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<T>>>,
) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.context("device task")??);
    }
    Ok(out)
}

/// What one run measured, the published items (for the plain run) and the devices back.
pub struct Outcome {
    /// The measurement.
    pub row: Row,
    /// Topic and payload of everything the signer published.
    pub items: Vec<(String, Vec<u8>)>,
    /// The signer.
    pub signer: Device,
    /// The devices.
    pub devices: Vec<Device>,
}

/// The group OTA release of `image` by `signer` to `devices`.
///
/// # Errors
/// Any refused step or a device that does not end with the image.
pub async fn group_ota(
    dep: &Deployment,
    signer: Device,
    devices: Vec<Device>,
    image: &[u8],
    set: Settings,
) -> anyhow::Result<Outcome> {
    let mut rng = OsRng;
    let group = dep.group.clone();
    let n = devices.len();
    // Devices are online and joined before the release; they subscribe to it afterwards, when
    // the signer is gone (the deposit model).
    let mut sessions = Vec::with_capacity(n);
    for d in devices {
        sessions.push(joined(dep, d, Role::Subscriber).await?);
    }
    let mut s = joined(dep, signer, Role::Publisher).await?;

    let cpu = Instant::now();
    let creds = s.device.credentials().clone();
    let release = ReleaseSigner {
        group: &group,
        key: creds.key(),
        cert: creds.cert(),
    }
    .release(
        set.version,
        "bench.img",
        image,
        set.chunk,
        now_ms(),
        &mut rng,
    )
    .map_err(|e| anyhow::anyhow!("release: {e}"))?;
    let (_, key_wire) = s
        .device
        .seal(
            &group,
            Protection::Confidential,
            Direction::Forward,
            &release.key_message().to_bytes(),
            now_ms(),
            &mut rng,
        )
        .map_err(|e| anyhow::anyhow!("key message: {e}"))?;
    let signer_cpu_ms = ms(cpu.elapsed());
    let topic = |item| {
        OtaTopic {
            group: group.clone(),
            signer: creds.id().clone(),
            version: set.version,
            item,
        }
        .to_string()
    };
    let mut items = vec![(
        topic(OtaItem::Manifest),
        release.manifest_message().to_vec(),
    )];
    for (j, c) in release.chunks().iter().enumerate() {
        items.push((topic(OtaItem::Chunk(j as u32)), c.clone()));
    }
    items.push((topic(OtaItem::Key), key_wire));
    let published: u64 = items.iter().map(|(_, p)| p.len() as u64).sum();

    let started = Instant::now();
    deposit(&mut s.reader, &mut s.writer, &items, true).await?;
    let deposit_ms = ms(started.elapsed());
    s.writer.close().await;
    let signer = s.into_device();

    let filter = topics::ota_release_filter(&group, creds.id(), set.version);
    let signer_id = creds.id().clone();
    let mut tasks = Vec::with_capacity(n);
    for sess in sessions {
        let (filter, group, signer_id) = (filter.clone(), group.clone(), signer_id.clone());
        let size = image.len();
        tasks.push(tokio::spawn(async move {
            fetch_release(sess, &filter, &group, &signer_id, size).await
        }));
    }
    let (times, mut devices): (Vec<Duration>, Vec<Device>) =
        join_all(tasks).await?.into_iter().unzip();
    let all_done_ms = deposit_ms + ms(times.iter().max().copied().unwrap_or_default());
    let (fetch_p50_ms, fetch_max_ms) = median_max(times);
    // One device again, alone.
    let mut alone = None;
    if !devices.is_empty() {
        let d = devices.swap_remove(0);
        let sess = joined(dep, d, Role::Subscriber).await?;
        let (t, d) = fetch_release(sess, &filter, &group, &signer_id, image.len()).await?;
        devices.push(d);
        alone = Some(ms(t));
    }
    Ok(Outcome {
        row: Row {
            system: "group OTA",
            devices: n,
            image_bytes: image.len(),
            signer_cpu_ms,
            published_bytes: published,
            retained_bytes: published,
            deposit_ms,
            fetch_p50_ms,
            fetch_max_ms,
            alone_ms: alone,
            all_done_ms,
        },
        items,
        signer,
        devices,
    })
}

/// A device subscribes to one release and takes it to a verified image; returns the time from
/// its SUBSCRIBE.
async fn fetch_release(
    mut s: Session<Rd, Wr>,
    filter: &str,
    group: &GroupId,
    signer: &DeviceId,
    size: usize,
) -> anyhow::Result<(Duration, Device)> {
    let t0 = Instant::now();
    s.writer
        .send(&mqtt::subscribe(60_000, &[filter.to_owned()], Vec::new()))
        .await?;
    let pins = [signer.clone()];
    let mut manifest: Option<VerifiedManifest> = None;
    let mut download: Option<Download> = None;
    let mut key_wire: Option<Vec<u8>> = None;
    let mut pending: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let mut staging = vec![0u8; size];
    loop {
        let p = s.reader.expect("an OTA PUBLISH").await?;
        let Packet::Publish(p) = p else { continue };
        if p.pkid != 0 {
            s.writer.send(&mqtt::puback(p.pkid)).await?;
        }
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let Some(ota) = OtaTopic::parse(&topic) else {
            let mut rng = OsRng;
            s.device.on_publish(&topic, &p.payload, now_ms(), &mut rng);
            continue;
        };
        let now = now_ms();
        match ota.item {
            OtaItem::Manifest => {
                let list = s
                    .device
                    .member_list(group)
                    .context("no member list of the OTA group")?;
                let m = UnverifiedManifest::decode(&p.payload)
                    .map_err(|e| anyhow::anyhow!("manifest: {e}"))?
                    .verify(
                        group,
                        &pins,
                        None,
                        s.device.ca_public(),
                        list,
                        &OtaPolicy::default(),
                        now,
                    )
                    .map_err(|e| anyhow::anyhow!("manifest: {e}"))?;
                manifest = Some(m);
            }
            OtaItem::Key => key_wire = Some(p.payload.to_vec()),
            OtaItem::Chunk(j) => {
                pending.insert(j, p.payload.to_vec());
            }
        }
        if download.is_none() {
            if let (Some(m), Some(k)) = (manifest.as_ref(), key_wire.as_ref()) {
                let view = s.device.view(now);
                let msg = UnverifiedMessage::decode(k)
                    .map_err(|e| anyhow::anyhow!("key message: {e:?}"))?
                    .verify_without_window(&view, &view, &Policy::default(), now)
                    .map_err(|e| anyhow::anyhow!("key message: {e:?}"))?;
                let key = m
                    .accept_key_message(&msg)
                    .map_err(|e| anyhow::anyhow!("key message: {e}"))?;
                download = Some(
                    Download::new(m.clone(), key).map_err(|e| anyhow::anyhow!("download: {e}"))?,
                );
            }
        }
        let Some(d) = download.as_mut() else { continue };
        for (j, ct) in std::mem::take(&mut pending) {
            let c = d
                .open_chunk(j, &ct)
                .map_err(|e| anyhow::anyhow!("chunk {j}: {e}"))?;
            let at = usize::try_from(c.offset())?;
            staging
                .get_mut(at..at + c.plaintext().len())
                .context("chunk beyond the image")?
                .copy_from_slice(c.plaintext());
            d.mark_stored(j)
                .map_err(|e| anyhow::anyhow!("chunk {j}: {e}"))?;
        }
        if d.is_complete() {
            let mut digest = ImageDigest::new();
            digest.update(&staging);
            d.finish(&digest.finalize())
                .map_err(|e| anyhow::anyhow!("image: {e}"))?;
            return Ok((t0.elapsed(), s.into_device()));
        }
    }
}

/// Per-device delivery (Chien & Wang): the image in chunk-sized direct messages to each device.
///
/// # Errors
/// Any refused step or a device that does not end with the image.
pub async fn per_device(
    dep: &Deployment,
    signer: Device,
    devices: Vec<Device>,
    image: &[u8],
    set: Settings,
) -> anyhow::Result<Outcome> {
    let mut rng = OsRng;
    let n = devices.len();
    let mut s = joined(dep, signer, Role::Publisher).await?;
    await_member_list(&mut s, &dep.group).await?;
    let mut sessions = Vec::with_capacity(n);
    for d in devices {
        let mut sess = joined(dep, d, Role::Subscriber).await?;
        await_member_list(&mut sess, &dep.group).await?;
        let own = topics::direct(sess.device.id());
        sess.writer
            .send(&mqtt::subscribe(60_001, &[own], Vec::new()))
            .await?;
        loop {
            if let Packet::SubAck(_) = sess.reader.expect("SUBACK").await? {
                break;
            }
        }
        sessions.push(sess);
    }
    let list = s
        .device
        .member_list(&dep.group)
        .context("no member list at the signer")?
        .clone();
    let pieces: Vec<&[u8]> = image.chunks(set.chunk as usize).collect();

    let ids: Vec<DeviceId> = sessions.iter().map(|s| s.device.id().clone()).collect();
    // Devices receive while the signer sends.
    let mut tasks = Vec::with_capacity(n);
    let sender = s.device.id().clone();
    for sess in sessions {
        let (count, size, sender) = (pieces.len(), image.len(), sender.clone());
        tasks.push(tokio::spawn(async move {
            receive_direct(sess, &sender, count, size).await
        }));
    }

    let creds = s.device.credentials().clone();
    let sealer = DirectSealer {
        key: creds.key(),
        cert: creds.cert(),
    };
    let started = Instant::now();
    let mut cpu = Duration::ZERO;
    let mut published = 0u64;
    let base = now_ms();
    let recipients: Vec<(DeviceId, Point)> = list
        .members()
        .iter()
        .map(|m| &m.member)
        .filter(|m| m.role == Role::Subscriber && ids.contains(&m.id))
        .map(|m| (m.id.clone(), m.q))
        .collect();
    anyhow::ensure!(
        recipients.len() == n,
        "{} of {n} devices listed",
        recipients.len()
    );
    for (id, q) in &recipients {
        let mut items = Vec::with_capacity(pieces.len());
        let t = Instant::now();
        for (j, piece) in pieces.iter().enumerate() {
            let wire = sealer
                .seal(id, q, base + j as u64, piece, &mut rng)
                .map_err(|e| anyhow::anyhow!("direct message: {e}"))?;
            published += wire.len() as u64;
            items.push((topics::direct(id), wire));
        }
        cpu += t.elapsed();
        deposit(&mut s.reader, &mut s.writer, &items, false).await?;
    }
    let deposit_ms = ms(started.elapsed());
    let (times, devices): (Vec<Duration>, Vec<Device>) = join_all(tasks).await?.into_iter().unzip();
    let all_done_ms = ms(started.elapsed());
    let (fetch_p50_ms, fetch_max_ms) = median_max(times);
    s.writer.close().await;
    let row = Row {
        system: "per device",
        devices: n,
        image_bytes: image.len(),
        signer_cpu_ms: ms(cpu),
        published_bytes: published,
        retained_bytes: 0,
        deposit_ms,
        fetch_p50_ms,
        fetch_max_ms,
        alone_ms: None,
        all_done_ms,
    };
    Ok(Outcome {
        row,
        items: Vec::new(),
        signer: s.into_device(),
        devices,
    })
}

/// A device opens `count` direct messages from `sender` into the image.
async fn receive_direct(
    mut s: Session<Rd, Wr>,
    sender: &DeviceId,
    count: usize,
    size: usize,
) -> anyhow::Result<(Duration, Device)> {
    let t0 = Instant::now();
    let me = s.device.id().clone();
    let creds = s.device.credentials().clone();
    let group = crate::quva::group()?;
    let mut floor = DirectFloor::default();
    let mut staging = Vec::with_capacity(size);
    let mut got = 0usize;
    while got < count {
        let Packet::Publish(p) = s.reader.expect("a direct message").await? else {
            continue;
        };
        if p.pkid != 0 {
            s.writer.send(&mqtt::puback(p.pkid)).await?;
        }
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        if topics::parse_direct(&topic).as_ref() != Some(&me) {
            let mut rng = OsRng;
            s.device.on_publish(&topic, &p.payload, now_ms(), &mut rng);
            continue;
        }
        let msg = UnverifiedDirect::decode(&p.payload)
            .map_err(|e| anyhow::anyhow!("direct message: {e}"))?;
        if msg.sender() != sender {
            bail!("a direct message from {}", msg.sender());
        }
        let lists: Vec<MemberList> = s.device.member_list(&group).cloned().into_iter().collect();
        let staged = msg
            .open(
                &me,
                creds.key(),
                s.device.ca_public(),
                &lists,
                floor,
                now_ms(),
            )
            .map_err(|e| anyhow::anyhow!("direct message: {e}"))?;
        floor = staged.floor().1;
        staging.extend_from_slice(staged.commit().payload());
        got += 1;
    }
    anyhow::ensure!(staging.len() == size, "{} bytes of {size}", staging.len());
    Ok((t0.elapsed(), s.into_device()))
}

/// Enrolls the signer and `n` devices for the OTA runs.
///
/// # Errors
/// Any refused step.
pub async fn enroll(dep: &Deployment, n: usize) -> anyhow::Result<(Device, Vec<Device>)> {
    let signer = crate::fanout::enroll_one(dep, "ota-signer", Role::Publisher).await?;
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        devices.push(
            crate::fanout::enroll_one(dep, &format!("ota-dev-{i:03}"), Role::Subscriber).await?,
        );
    }
    Ok((signer, devices))
}

/// A random image.
pub fn image(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    OsRng.fill_bytes(&mut v);
    v
}
