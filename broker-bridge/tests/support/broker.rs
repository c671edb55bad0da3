//! Test support: a Mosquitto broker on a free loopback port, the bridge in front of it, and a raw
//! MQTT 5 client built on the bridge's own codec (for what rumqttc hides).

#![allow(
    dead_code,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use futures_util::{SinkExt, StreamExt};
use quva_bridge::ca::CaClient;
use quva_bridge::{Bridge, Config};
use rmqtt_codec::v5;
use rmqtt_codec::{MqttCodec, MqttPacket};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// A Mosquitto process with its own configuration, killed on drop.
pub struct Mosquitto {
    child: Child,
    pub addr: SocketAddr,
    conf: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn spawn_mosquitto(conf: &std::path::Path) -> Child {
    let exe = ["/usr/sbin/mosquitto", "mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("mosquitto");
    Command::new(exe)
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto must be installed")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Mosquitto {
    /// Starts Mosquitto with anonymous access on a free loopback port.
    pub async fn start() -> Self {
        Self::start_with("allow_anonymous true\n").await
    }

    /// Starts Mosquitto with extra configuration lines.
    pub async fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = free_port();
            let conf = dir.path().join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!("listener {port} 127.0.0.1\npersistence false\n{extra}"),
            )
            .unwrap();
            let mut child = spawn_mosquitto(&conf);
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            for _ in 0..100 {
                if TcpStream::connect(addr).await.is_ok() {
                    // Another process may own the port: make sure Mosquitto is still running.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if !matches!(child.try_wait(), Ok(None)) {
                        break;
                    }
                    return Mosquitto {
                        child,
                        addr,
                        conf,
                        _dir: dir,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("mosquitto did not start");
    }
}

impl Mosquitto {
    /// Kills the broker (SIGKILL): without persistence it forgets every retained message.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the broker again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            self.child = spawn_mosquitto(&self.conf);
            for _ in 0..40 {
                if TcpStream::connect(self.addr).await.is_ok() {
                    return;
                }
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // The port may still be held for a moment: try again.
            self.kill();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("mosquitto did not restart on {}", self.addr);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bridge configuration for tests: loopback, the given broker, `plant/#` protected.
pub fn config(broker: SocketAddr) -> Config {
    let mut cfg =
        Config::from_toml("listen = \"127.0.0.1:0\"\n[topics]\nprotected = [\"plant/#\"]").unwrap();
    cfg.upstream.address = broker.to_string();
    cfg.limits.handshake_timeout_ms = 500;
    cfg.limits.max_packet_size = 64 * 1024;
    cfg.limits.max_payload = 16 * 1024;
    cfg.limits.shutdown_grace_ms = 2_000;
    cfg.ca.timeout_ms = 500;
    cfg
}

/// `cfg` with Q_CA pinned (PROTOCOL.md §8).
pub fn pinned(mut cfg: Config, ca_public: &quva_client::curve::Point) -> Config {
    cfg.ca.public_key = Some(hex::encode(ca_public.to_bytes()));
    cfg
}

pub async fn start_bridge(cfg: Config, ca: Option<Arc<dyn CaClient>>) -> Bridge {
    Bridge::start(cfg, ca).await.unwrap()
}

/// A raw MQTT 5 connection.
pub struct Raw {
    pub framed: Framed<TcpStream, MqttCodec>,
}

pub const STEP: Duration = Duration::from_secs(5);

impl Raw {
    pub async fn tcp(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.unwrap();
        Raw {
            framed: Framed::new(s, MqttCodec::V5(v5::Codec::new(0, 0))),
        }
    }

    /// Connects and returns the CONNACK.
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        auth: Option<(&str, Vec<u8>)>,
    ) -> (Self, Box<v5::ConnectAck>) {
        let mut raw = Self::tcp(addr).await;
        let mut c = v5::Connect {
            clean_start: true,
            keep_alive: 30,
            client_id: ByteString::from(client_id),
            ..Default::default()
        };
        if let Some((m, d)) = auth {
            c.auth_method = Some(ByteString::from(m));
            c.auth_data = Some(Bytes::from(d));
        }
        raw.send(v5::Packet::Connect(Box::new(c))).await;
        match raw.recv().await {
            Some(v5::Packet::ConnectAck(a)) => (raw, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn send(&mut self, p: v5::Packet) {
        self.framed.send(MqttPacket::V5(p)).await.unwrap();
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.framed.get_mut().write_all(b).await.unwrap();
    }

    /// The next packet, or `None` when the connection closed or nothing came within [`STEP`].
    pub async fn recv(&mut self) -> Option<v5::Packet> {
        self.recv_within(STEP).await
    }

    pub async fn recv_within(&mut self, t: Duration) -> Option<v5::Packet> {
        match tokio::time::timeout(t, self.framed.next()).await {
            Ok(Some(Ok((MqttPacket::V5(p), _)))) => Some(p),
            _ => None,
        }
    }

    /// Whether the peer closed the connection within [`STEP`] (after any packets).
    pub async fn closed(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(deadline, self.framed.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    pub async fn subscribe(
        &mut self,
        id: u16,
        filter: &str,
        props: Vec<(String, String)>,
    ) -> v5::SubscribeAck {
        let s = v5::Subscribe {
            packet_id: std::num::NonZeroU16::new(id).unwrap(),
            id: None,
            user_properties: props
                .into_iter()
                .map(|(k, v)| (ByteString::from(k), ByteString::from(v)))
                .collect(),
            topic_filters: vec![(
                ByteString::from(filter),
                v5::SubscriptionOptions {
                    qos: rmqtt_codec::types::QoS::AtLeastOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: v5::RetainHandling::AtSubscribe,
                },
            )],
        };
        self.send(v5::Packet::Subscribe(s)).await;
        loop {
            match self.recv().await {
                Some(v5::Packet::SubscribeAck(a)) => return a,
                Some(_) => {}
                None => panic!("no SUBACK"),
            }
        }
    }

    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>, qos1_id: Option<u16>) {
        let p = rmqtt_codec::types::Publish {
            dup: false,
            retain: false,
            qos: if qos1_id.is_some() {
                rmqtt_codec::types::QoS::AtLeastOnce
            } else {
                rmqtt_codec::types::QoS::AtMostOnce
            },
            topic: ByteString::from(topic),
            packet_id: qos1_id.and_then(std::num::NonZeroU16::new),
            payload: Bytes::from(payload),
            properties: Some(v5::PublishProperties::default()),
        };
        self.send(v5::Packet::Publish(Box::new(p))).await;
    }

    /// Collects the payloads of PUBLISHes received within `t`.
    pub async fn drain_publishes(&mut self, t: Duration) -> Vec<(String, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + t;
        let mut out = Vec::new();
        while let Ok(Some(Ok((MqttPacket::V5(p), _)))) =
            tokio::time::timeout_at(deadline, self.framed.next()).await
        {
            if let v5::Packet::Publish(p) = p {
                out.push((p.topic.to_string(), p.payload.to_vec()));
            }
        }
        out
    }
}
