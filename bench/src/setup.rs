//! Key-setup bytes per device, counted on the client's TCP socket in both directions (TCP
//! payload; TCP/IP headers are not included and add the same per-segment overhead to every
//! variant): from the first byte of the connection to the end of the SUBACK.

use std::net::SocketAddr;
use std::path::Path;

use quva_client::ids::Role;
use rumqttc::v5::mqttbytes::v5::Packet;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::mqtt::{self, Counted, Counters, Reader, Writer};
use crate::quva::{Credential, Deployment, Session};
use crate::tls::{self, Auth, Pki, PlainMosquitto, TlsMosquitto};

/// One variant's bytes.
#[derive(Clone, Debug, Serialize)]
pub struct SetupBytes {
    /// What was measured.
    pub variant: String,
    /// Client to server.
    pub sent: u64,
    /// Server to client.
    pub received: u64,
    /// Of which the TLS handshake (0 without TLS), both directions.
    pub handshake: u64,
}

impl SetupBytes {
    /// Both directions.
    pub fn total(&self) -> u64 {
        self.sent + self.received
    }
}

const TOPIC: &str = "bench/fanout/data";

/// CONNECT/CONNACK and SUBSCRIBE/SUBACK of one data topic over an established stream.
async fn mqtt_setup<S>(stream: S, client_id: &str) -> anyhow::Result<Reader<tokio::io::ReadHalf<S>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (r, w) = tokio::io::split(stream);
    let mut reader = Reader::new(r);
    let mut writer = Writer::new(w);
    writer.send(&mqtt::connect(client_id, None)).await?;
    mqtt::connack_ok(reader.expect("CONNACK").await?)?;
    writer
        .send(&mqtt::subscribe(1, &[TOPIC.to_owned()], Vec::new()))
        .await?;
    mqtt::suback_ok(reader.expect("SUBACK").await?)?;
    Ok(reader)
}

/// Plain MQTT 5 to Mosquitto.
async fn plain(addr: SocketAddr) -> anyhow::Result<SetupBytes> {
    let c = Counters::default();
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let reader = mqtt_setup(Counted::new(tcp, c.clone()), "plain-1").await?;
    Ok(SetupBytes {
        variant: "MQTT 5, plain TCP".to_owned(),
        sent: c.written(),
        received: c.read() - reader.buffered(),
        handshake: 0,
    })
}

/// MQTT 5 over TLS 1.3 to Mosquitto.
async fn over_tls(addr: SocketAddr, pki: &Pki, auth: Auth) -> anyhow::Result<SetupBytes> {
    let c = Counters::default();
    let stream = tls::connect(addr, pki.client_config(auth)?, c.clone()).await?;
    let handshake = c.read() + c.written();
    let _reader = mqtt_setup(stream, "tls-1").await?;
    Ok(SetupBytes {
        variant: format!("MQTT 5 over TLS 1.3, {}", auth.label()),
        sent: c.written(),
        received: c.read(),
        handshake,
    })
}

/// Quva: enrollment CONNECT/CONNACK and the group join SUBSCRIBE/SUBACK on one connection
/// through the bridge, then a reconnection with a certificate proof and the resumed subscription
/// (PROTOCOL.md §4 v1.1), then, for comparison, a reconnection that joins again.
async fn quva(dep: &Deployment, id: &str) -> anyhow::Result<Vec<SetupBytes>> {
    let secret = dep.register(id, Role::Subscriber)?;
    let mut rows = Vec::new();
    let mut device = None;
    for (n, variant) in [
        "Quva enrollment + group join (1st connection)",
        "Quva certificate proof + resumed subscription (reconnection)",
        "Quva certificate proof + group join (reconnection that joins again)",
    ]
    .into_iter()
    .enumerate()
    {
        let c = Counters::default();
        let tcp = TcpStream::connect(dep.bridge()).await?;
        tcp.set_nodelay(true)?;
        let (r, w) = tokio::io::split(Counted::new(tcp, c.clone()));
        let credential = match device.take() {
            None => Credential::Enroll(&secret),
            Some(d) => Credential::Cert(Box::new(d)),
        };
        let mut s = Session::connect(r, w, id, dep.ca_public, credential).await?;
        if n == 1 {
            s.resume().await?;
        } else {
            s.join(&dep.group, Role::Subscriber, false).await?;
        }
        // Up to the SUBACK of the join, or of the resumed subscription.
        loop {
            let p = s.reader.expect("SUBACK").await?;
            let suback = matches!(p, Packet::SubAck(_));
            if s.handle(p).await? || (n == 1 && suback) {
                break;
            }
        }
        crate::quva::ensure_key(&s.device, &dep.group, Role::Subscriber)?;
        rows.push(SetupBytes {
            variant: variant.to_owned(),
            sent: c.written(),
            received: c.read() - s.reader.buffered(),
            handshake: 0,
        });
        s.writer.close().await;
        device = Some(s.into_device());
    }
    Ok(rows)
}

/// Measures every variant; `dir` holds the brokers' files.
///
/// # Errors
/// Any failed connection.
pub async fn run(dep: &Deployment, dir: &Path) -> anyhow::Result<Vec<SetupBytes>> {
    let pki = Pki::generate()?;
    let plain_broker = PlainMosquitto::start(dir)?;
    let server_only = TlsMosquitto::start(&pki, dir, Auth::ServerOnly)?;
    let mutual_dir = dir.join("mutual");
    std::fs::create_dir_all(&mutual_dir)?;
    let mutual = TlsMosquitto::start(&pki, &mutual_dir, Auth::Mutual)?;

    let mut rows = vec![
        plain(plain_broker.addr).await?,
        over_tls(server_only.addr, &pki, Auth::ServerOnly).await?,
        over_tls(mutual.addr, &pki, Auth::Mutual).await?,
    ];
    rows.extend(quva(dep, "setup-bytes-1").await?);
    Ok(rows)
}
