//! A plain MQTT 5 client (rumqttc) for tests that look at or inject raw bytes: a subscriber to
//! `#` attached directly to Mosquitto sees everything the broker stores and forwards; the same
//! client publishes hand-made payloads, to Mosquitto directly or through the bridge (optionally
//! authenticated with a device's certificate proof).
//!
//! # Usage
//! ```no_run
//! let cluster = quva_tests::Cluster::start(&["plant/#"]);
//! let sniffer = quva_tests::raw::RawMqtt::sniff(cluster.broker);
//! // ... traffic ...
//! let seen = sniffer.received();
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectProperties, ConnectReturnCode, Packet, PubAckReason};
use rumqttc::v5::{Client, Event, MqttOptions};

use crate::STEP_TIMEOUT;

/// One PUBLISH received by a [`RawMqtt`] client.
#[derive(Clone, Debug)]
pub struct Captured {
    /// The topic.
    pub topic: String,
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// Whether it came as a retained message.
    pub retain: bool,
    /// Its user properties.
    pub user_properties: Vec<(String, String)>,
}

impl Captured {
    /// Every byte of the message a broker sees besides framing: topic, payload and properties.
    pub fn all_bytes(&self) -> Vec<u8> {
        let mut out = self.topic.as_bytes().to_vec();
        out.extend_from_slice(&self.payload);
        for (k, v) in &self.user_properties {
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }
}

#[derive(Default)]
struct Log {
    connack: Option<Result<(), String>>,
    received: Vec<Captured>,
    pubacks: Vec<u8>,
    subacks: usize,
    closed: Option<String>,
}

/// A raw MQTT 5 client with its event loop on a thread; everything it receives is kept.
pub struct RawMqtt {
    client: Client,
    log: Arc<Mutex<Log>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RawMqtt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawMqtt").finish_non_exhaustive()
    }
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

fn fresh_client_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// The MQTT 5 reason code of a PUBACK.
pub fn puback_code(reason: &PubAckReason) -> u8 {
    match reason {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

impl RawMqtt {
    /// Connects without authentication (to Mosquitto directly, or to the bridge's unprotected
    /// side) and waits for the CONNACK.
    pub fn connect(addr: SocketAddr) -> Self {
        let id = fresh_client_id("raw");
        Self::connect_as(addr, &id, None)
    }

    /// Connects to `addr` as `client_id`, with an Authentication Method and Data if given, and
    /// waits for a successful CONNACK.
    pub fn connect_as(addr: SocketAddr, client_id: &str, auth: Option<(&str, Vec<u8>)>) -> Self {
        Self::try_connect_as(addr, client_id, auth)
            .unwrap_or_else(|e| panic!("raw MQTT connection to {addr} refused: {e}"))
    }

    /// As [`RawMqtt::connect_as`], returning a refusal (or a closed connection) as an error.
    ///
    /// # Errors
    /// The CONNACK's refusal or the connection error, as text.
    pub fn try_connect_as(
        addr: SocketAddr,
        client_id: &str,
        auth: Option<(&str, Vec<u8>)>,
    ) -> Result<Self, String> {
        Self::try_connect_with(addr, client_id, auth, None)
    }

    /// Connects to a broker that requires a user name and password (as a bridge does) and
    /// subscribes to `#`.
    pub fn sniff_login(addr: SocketAddr, username: &str, password: &str) -> Self {
        let id = fresh_client_id("raw");
        let raw = Self::try_connect_with(addr, &id, None, Some((username, password)))
            .unwrap_or_else(|e| panic!("raw MQTT connection to {addr} refused: {e}"));
        raw.subscribe("#");
        raw
    }

    fn try_connect_with(
        addr: SocketAddr,
        client_id: &str,
        auth: Option<(&str, Vec<u8>)>,
        login: Option<(&str, &str)>,
    ) -> Result<Self, String> {
        let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        if let Some((user, password)) = login {
            o.set_credentials(user, password);
        }
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_start(true);
        o.set_max_packet_size(Some(1024 * 1024));
        let mut props = ConnectProperties::new();
        props.max_packet_size = Some(1024 * 1024);
        if let Some((method, data)) = auth {
            props.authentication_method = Some(method.to_owned());
            props.authentication_data = Some(Bytes::from(data));
        }
        o.set_connect_properties(props);
        let (client, mut conn) = Client::new(o, 64);
        let log = Arc::new(Mutex::new(Log::default()));
        let shared = Arc::clone(&log);
        let thread = std::thread::spawn(move || {
            for ev in conn.iter() {
                let mut l = shared.lock().unwrap();
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        l.connack = Some(if ack.code == ConnectReturnCode::Success {
                            Ok(())
                        } else {
                            Err(format!("{:?}", ack.code))
                        });
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => l.received.push(Captured {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                        user_properties: p
                            .properties
                            .map(|pr| pr.user_properties)
                            .unwrap_or_default(),
                    }),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        l.pubacks.push(puback_code(&ack.reason));
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => l.subacks += 1,
                    Ok(Event::Incoming(Packet::Disconnect(d))) => {
                        l.closed = Some(format!("DISCONNECT {:?}", d.reason_code));
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if l.connack.is_none() {
                            l.connack = Some(Err(e.to_string()));
                        }
                        l.closed = Some(e.to_string());
                        return;
                    }
                }
            }
        });
        let raw = RawMqtt {
            client,
            log,
            thread: Some(thread),
        };
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let connack = raw.log.lock().unwrap().connack.clone();
            match connack {
                Some(Ok(())) => return Ok(raw),
                Some(Err(e)) => return Err(e),
                None if Instant::now() > deadline => return Err("no CONNACK".to_owned()),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Connects to the bridge at `addr` as the enrolled device whose key store is `store`,
    /// with a fresh `quva-cert-v1` proof (as `quva-node` does).
    pub fn connect_device(addr: SocketAddr, store: &Path) -> Self {
        Self::try_connect_device(addr, store)
            .unwrap_or_else(|e| panic!("device connection to {addr} refused: {e}"))
    }

    /// As [`RawMqtt::connect_device`], returning a refusal as an error.
    ///
    /// # Errors
    /// The CONNACK's refusal or the connection error, as text.
    pub fn try_connect_device(addr: SocketAddr, store: &Path) -> Result<Self, String> {
        let creds = crate::offline::credentials(store);
        let id = fresh_client_id(creds.id().as_str());
        let mut rng = rand_core::OsRng;
        let auth =
            quva_client::device::cert_connect_auth(&creds, &id, quva_node::now_ms(), &mut rng)
                .expect("a certificate proof");
        Self::try_connect_as(addr, &id, Some((auth.method, auth.data)))
    }

    /// Connects to `addr` and subscribes to `#` (everything but `$SYS`), retained messages
    /// included.
    pub fn sniff(addr: SocketAddr) -> Self {
        let raw = Self::connect(addr);
        raw.subscribe("#");
        raw
    }

    fn wait(&self, what: &str, done: impl Fn(&Log) -> bool) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while Instant::now() < deadline {
            {
                let l = self.log.lock().unwrap();
                if done(&l) {
                    return;
                }
                if let Some(c) = &l.closed {
                    panic!("raw MQTT connection closed while waiting for {what}: {c}");
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("raw MQTT client: no {what}");
    }

    /// Subscribes to `filter` at QoS 1 and waits for the SUBACK.
    pub fn subscribe(&self, filter: &str) {
        let before = self.log.lock().unwrap().subacks;
        self.client.subscribe(filter, QoS::AtLeastOnce).unwrap();
        self.wait("SUBACK", |l| l.subacks > before);
    }

    /// Publishes `payload` on `topic` at QoS 1 and returns the PUBACK reason code.
    pub fn publish(&self, topic: &str, payload: &[u8]) -> u8 {
        self.publish_with(topic, payload, false)
    }

    /// Publishes `payload` retained on `topic` at QoS 1 and returns the PUBACK reason code.
    pub fn publish_retained(&self, topic: &str, payload: &[u8]) -> u8 {
        self.publish_with(topic, payload, true)
    }

    fn publish_with(&self, topic: &str, payload: &[u8], retain: bool) -> u8 {
        let before = self.log.lock().unwrap().pubacks.len();
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .unwrap();
        self.wait("PUBACK", |l| l.pubacks.len() > before);
        self.log.lock().unwrap().pubacks[before]
    }

    /// Everything received so far, in order.
    pub fn received(&self) -> Vec<Captured> {
        self.log.lock().unwrap().received.clone()
    }

    /// Waits until a received message satisfies `pred`; returns it.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Captured) -> bool) -> Captured {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(c) = self.log.lock().unwrap().received.iter().find(|c| pred(c)) {
                return c.clone();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("raw MQTT client: never received {what}");
    }

    /// Waits until `n` messages on exactly `topic` have been received; returns them in order.
    pub fn wait_count(&self, topic: &str, n: usize) -> Vec<Captured> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let got: Vec<Captured> = self
                .received()
                .into_iter()
                .filter(|c| c.topic == topic)
                .collect();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "raw MQTT client: {} of {n} messages on {topic}",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        self.log.lock().unwrap().closed.is_none()
    }
}

/// Sends one MQTT 5 CONNECT with an Authentication Method and Data over a fresh TCP connection.
///
/// With `read_connack`, waits for the CONNACK and returns its Authentication Data (`Ok`) or its
/// refusal (`Err`, the reason as text). Without, closes the socket right after the CONNECT, before
/// any CONNACK can arrive: a reply lost on the way (PROTOCOL.md §3), and returns `Ok(None)`.
///
/// # Errors
/// The CONNACK's refusal, or a connection closed before the CONNACK, as text.
pub fn connect_once(
    addr: SocketAddr,
    client_id: &str,
    method: &str,
    data: Vec<u8>,
    read_connack: bool,
) -> Result<Option<Vec<u8>>, String> {
    use std::io::{Read as _, Write as _};

    use bytes::BytesMut;
    use rumqttc::v5::mqttbytes::v5::Connect;

    let mut props = ConnectProperties::new();
    props.authentication_method = Some(method.to_owned());
    props.authentication_data = Some(Bytes::from(data));
    let connect = Connect {
        keep_alive: 30,
        client_id: client_id.to_owned(),
        clean_start: true,
        properties: Some(props),
    };
    let mut out = BytesMut::new();
    Packet::Connect(connect, None, None)
        .write(&mut out, None)
        .map_err(|e| e.to_string())?;
    let mut socket = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    socket.write_all(&out).map_err(|e| e.to_string())?;
    if !read_connack {
        drop(socket);
        return Ok(None);
    }
    socket
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut input = BytesMut::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the CONNACK".to_owned());
        }
        input.extend_from_slice(&chunk[..n]);
        match Packet::read(&mut input, None) {
            Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
                return Ok(ack
                    .properties
                    .and_then(|p| p.authentication_data)
                    .map(|d| d.to_vec()));
            }
            Ok(Packet::ConnAck(ack)) => return Err(format!("{:?}", ack.code)),
            Ok(other) => return Err(format!("{other:?} before the CONNACK")),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

impl Drop for RawMqtt {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        if let Some(t) = self.thread.take() {
            // The event loop ends after the DISCONNECT is written (or the connection is gone).
            let deadline = Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
