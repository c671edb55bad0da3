//! A blocking MQTT 5 client at the packet level, and a runner that plays one scenario against
//! two servers (Mosquitto directly and the bridge in front of it) and returns what each saw.
//!
//! The packets are encoded and decoded by rumqttc's `mqttbytes` codec, which is independent of
//! the rmqtt-codec the bridge uses, so a packet the bridge encodes wrongly is not read back by
//! the same mistake. Nothing is hidden by a client library: every packet the server sends is
//! returned as it came (keep-alive, acknowledgements and retries are the scenario's business).
//!
//! # Usage
//! ```no_run
//! use quva_tests::mqtt5::{Client, Run, QoS};
//! fn scenario(run: &mut Run) {
//!     let (mut sub, ack) = Client::connect(run.addr, run.connect("sub"), None);
//!     run.note("sub", &ack);
//!     sub.subscribe(&[Client::filter(&run.topic("x"), QoS::AtLeastOnce)]);
//!     run.observe(&mut sub, "sub", 1);
//! }
//! let cluster = quva_tests::Cluster::start(&["plant/#"]);
//! let [direct, bridged] = quva_tests::mqtt5::run_both(&cluster, "example", scenario, |e| format!("{e:?}"));
//! assert_eq!(direct, bridged);
//! ```

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
pub use rumqttc::v5::mqttbytes::QoS;
pub use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, Disconnect, DisconnectProperties,
    DisconnectReasonCode, Filter, LastWill, LastWillProperties, Packet, PubAck, Publish,
    PublishProperties, RetainForwardRule, Subscribe, SubscribeProperties, Unsubscribe,
};

use crate::Cluster;

/// How long a scenario waits for a packet it expects.
pub const EXPECT: Duration = Duration::from_secs(5);
/// How long a scenario listens to be sure that nothing (more) arrives.
pub const QUIET: Duration = Duration::from_millis(400);

/// What a client received: a packet, or the end of the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A packet from the server.
    Packet(Packet),
    /// The server closed the connection (or reset it).
    Closed,
    /// Bytes that rumqttc's codec cannot read, with its error.
    Undecodable(String),
}

/// One MQTT 5 connection over plain TCP.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    buf: BytesMut,
    next_id: u16,
    closed: bool,
    /// Whether [`Client::next`] answers QoS 1 and 2 deliveries and drives QoS 2 flows by itself
    /// (PUBACK; PUBREC, PUBCOMP; PUBREL for our own QoS 2 PUBLISHes). On by default.
    pub auto_ack: bool,
}

impl Client {
    /// Opens a TCP connection (no CONNECT yet).
    pub fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect_timeout(&addr, EXPECT)
            .unwrap_or_else(|e| panic!("cannot reach {addr}: {e}"));
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: BytesMut::with_capacity(4096),
            next_id: 0,
            closed: false,
            auto_ack: true,
        }
    }

    /// Opens a connection, sends `connect` (with a Will if given) and returns the first thing
    /// the server answers (a CONNACK, unless it closes the connection).
    pub fn connect(addr: SocketAddr, connect: Connect, will: Option<LastWill>) -> (Self, Event) {
        let mut c = Self::open(addr);
        c.send(&Packet::Connect(connect, will, None));
        let first = c
            .next(EXPECT)
            .unwrap_or_else(|| panic!("no CONNACK from {addr}"));
        (c, first)
    }

    /// A CONNECT with Clean Start, keep-alive 30 s and no properties.
    pub fn connect_packet(client_id: &str) -> Connect {
        Connect {
            keep_alive: 30,
            client_id: client_id.to_owned(),
            clean_start: true,
            properties: None,
        }
    }

    /// A subscription filter with the default options (no No Local, Retain As Published 0,
    /// Retain Handling 0).
    pub fn filter(path: &str, qos: QoS) -> Filter {
        Filter::new(path, qos)
    }

    /// Sends one packet.
    pub fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, None).unwrap();
        self.send_bytes(&out);
    }

    /// Sends bytes as they are (for malformed packets). A connection the server already closed
    /// is not an error here: what the server did is observed with [`Client::next`].
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// The next packet identifier (1, 2, ...).
    pub fn packet_id(&mut self) -> u16 {
        self.next_id = self.next_id % u16::MAX + 1;
        self.next_id
    }

    /// Sends a PUBLISH (with a fresh packet identifier at QoS > 0); returns the identifier.
    pub fn publish(&mut self, mut p: Publish) -> u16 {
        if p.qos != QoS::AtMostOnce && p.pkid == 0 {
            p.pkid = self.packet_id();
        }
        let id = p.pkid;
        self.send(&Packet::Publish(p));
        id
    }

    /// Sends a SUBSCRIBE of `filters`; returns its packet identifier.
    pub fn subscribe(&mut self, filters: &[Filter]) -> u16 {
        self.subscribe_with(filters, None)
    }

    /// Sends a SUBSCRIBE of `filters` with properties; returns its packet identifier.
    pub fn subscribe_with(
        &mut self,
        filters: &[Filter],
        props: Option<SubscribeProperties>,
    ) -> u16 {
        let pkid = self.packet_id();
        let s = Subscribe {
            pkid,
            filters: filters.to_vec(),
            properties: props,
        };
        self.send(&Packet::Subscribe(s));
        pkid
    }

    /// Sends an UNSUBSCRIBE of `filters`; returns its packet identifier.
    pub fn unsubscribe(&mut self, filters: &[&str]) -> u16 {
        let pkid = self.packet_id();
        let u = Unsubscribe {
            pkid,
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
            properties: None,
        };
        self.send(&Packet::Unsubscribe(u));
        pkid
    }

    /// Acknowledges a QoS 1 PUBLISH.
    pub fn puback(&mut self, pkid: u16) {
        self.send(&Packet::PubAck(PubAck::new(pkid, None)));
    }

    /// Sends DISCONNECT with `reason` and closes the socket.
    pub fn disconnect(mut self, reason: DisconnectReasonCode, props: Option<DisconnectProperties>) {
        self.send(&Packet::Disconnect(Disconnect {
            reason_code: reason,
            properties: props,
        }));
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Closes the socket without DISCONNECT (a network failure, to the server).
    pub fn drop_connection(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// The next packet, or `Closed`, within `within`; `None` if nothing came in time.
    pub fn next(&mut self, within: Duration) -> Option<Event> {
        if self.closed {
            return Some(Event::Closed);
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(ev) = self.decode() {
                self.acknowledge(&ev);
                return Some(ev);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.closed = true;
                    // Whatever complete packets came before the close are still delivered.
                    return Some(self.decode().unwrap_or(Event::Closed));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    return Some(self.decode().unwrap_or(Event::Closed));
                }
            }
        }
    }

    /// The acknowledgement [`Client::auto_ack`] sends for `ev`, if any.
    fn acknowledge(&mut self, ev: &Event) {
        if !self.auto_ack {
            return;
        }
        use rumqttc::v5::mqttbytes::v5::{PubComp, PubRec, PubRel};
        let reply = match ev {
            Event::Packet(Packet::Publish(p)) => match p.qos {
                QoS::AtMostOnce => return,
                QoS::AtLeastOnce => Packet::PubAck(PubAck::new(p.pkid, None)),
                QoS::ExactlyOnce => Packet::PubRec(PubRec::new(p.pkid, None)),
            },
            Event::Packet(Packet::PubRec(r)) => Packet::PubRel(PubRel::new(r.pkid, None)),
            Event::Packet(Packet::PubRel(r)) => Packet::PubComp(PubComp::new(r.pkid, None)),
            _ => return,
        };
        self.send(&reply);
    }

    /// One packet from the buffer, if a whole one is there.
    fn decode(&mut self) -> Option<Event> {
        // rumqttc reads only PINGRESP (and PINGREQ) without a remaining length; a DISCONNECT
        // without one means Normal Disconnection (MQTT 5 §3.14.2.1).
        // Nor a DISCONNECT of one byte (a reason code without properties, §3.14.2.2.1), which
        // Mosquitto sends.
        let short = match self.buf.get(..3) {
            Some([0xE0, 0x00, ..]) => Some((2, Ok(DisconnectReasonCode::NormalDisconnection))),
            Some([0xE0, 0x01, code]) => Some((3, DisconnectReasonCode::try_from(*code))),
            _ if self.buf.get(..2) == Some(&[0xE0, 0x00]) => {
                Some((2, Ok(DisconnectReasonCode::NormalDisconnection)))
            }
            _ => None,
        };
        if let Some((len, code)) = short {
            let _ = self.buf.split_to(len);
            return Some(match code {
                Ok(reason_code) => Event::Packet(Packet::Disconnect(Disconnect {
                    reason_code,
                    properties: None,
                })),
                Err(e) => Event::Undecodable(e.to_string()),
            });
        }
        if self.buf.is_empty() {
            return None;
        }
        match Packet::read(&mut self.buf, None) {
            Ok(p) => Some(Event::Packet(p)),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => None,
            Err(e) => {
                self.buf.clear();
                Some(Event::Undecodable(e.to_string()))
            }
        }
    }
}

/// A PUBLISH of `payload` on `topic`, no properties, not retained.
pub fn publish(topic: &str, qos: QoS, payload: &[u8]) -> Publish {
    Publish::new(topic, qos, Bytes::copy_from_slice(payload), None)
}

/// One run of a scenario against one server: the address, a namespace for topics and client
/// identifiers that no other run uses, and the trace of what the scenario observed.
#[derive(Debug)]
pub struct Run {
    /// The server (Mosquitto or the bridge).
    pub addr: SocketAddr,
    /// `app/<scenario>/<side>`: every topic of this run starts with it.
    pub ns: String,
    /// The trace: one line per observation, in the scenario's order.
    pub trace: Vec<String>,
    describe: fn(&Event) -> String,
}

impl Run {
    /// A run of the scenario `name` on `side` (`direct` or `bridge`) against `addr`, describing
    /// events with `describe` (which applies the normalizations of the caller).
    pub fn new(addr: SocketAddr, name: &str, side: &str, describe: fn(&Event) -> String) -> Self {
        Run {
            addr,
            ns: format!("app/{name}/{side}"),
            trace: Vec::new(),
            describe,
        }
    }

    /// A topic of this run.
    pub fn topic(&self, rest: &str) -> String {
        format!("{}/{rest}", self.ns)
    }

    /// A client identifier of this run.
    pub fn client_id(&self, who: &str) -> String {
        format!("{}-{who}", self.ns.replace('/', "-"))
    }

    /// The default CONNECT of this run's client `who`.
    pub fn connect(&self, who: &str) -> Connect {
        Client::connect_packet(&self.client_id(who))
    }

    /// Records one event seen by `who`. The namespace is replaced by `~` so that both runs
    /// write the same lines.
    pub fn note(&mut self, who: &str, ev: &Event) {
        let line = format!("{who}: {}", (self.describe)(ev));
        self.trace.push(self.relative(&line));
    }

    /// Records a free-form observation (a timing bucket, a count).
    pub fn fact(&mut self, who: &str, what: &str) {
        let line = format!("{who}: {what}");
        self.trace.push(self.relative(&line));
    }

    fn relative(&self, line: &str) -> String {
        line.replace(&self.ns, "~")
            .replace(&self.ns.replace('/', "-"), "~")
    }

    /// Waits for `n` events of `client` (each within [`EXPECT`]) and records them; records
    /// `nothing` if one does not come. Returns them.
    pub fn observe(&mut self, client: &mut Client, who: &str, n: usize) -> Vec<Event> {
        self.observe_within(client, who, n, EXPECT)
    }

    /// [`Run::observe`], waiting up to `within` for each event.
    pub fn observe_within(
        &mut self,
        client: &mut Client,
        who: &str,
        n: usize,
        within: Duration,
    ) -> Vec<Event> {
        let mut got = Vec::new();
        for _ in 0..n {
            match client.next(within) {
                Some(ev) => {
                    self.note(who, &ev);
                    let end = ev == Event::Closed;
                    got.push(ev);
                    if end {
                        break;
                    }
                }
                None => {
                    self.fact(who, "nothing");
                    break;
                }
            }
        }
        got
    }

    /// Listens to `client` for `d` and records everything that arrives (a scenario calls this
    /// where it expects nothing; the other run's trace then shows the difference).
    pub fn quiet_for(&mut self, client: &mut Client, who: &str, d: Duration) {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match client.next(left) {
                Some(ev) => {
                    self.note(who, &ev);
                    if ev == Event::Closed {
                        return;
                    }
                }
                None => return,
            }
        }
    }

    /// [`Run::quiet_for`] for [`QUIET`].
    pub fn quiet(&mut self, client: &mut Client, who: &str) {
        self.quiet_for(client, who, QUIET);
    }
}

/// Runs `scenario` twice at the same time, against Mosquitto directly (`direct`) and through the
/// bridge (`bridge`), each in its own namespace; returns both traces, direct first.
///
/// # Panics
/// If a run panics (its message names the side).
pub fn run_both(
    cluster: &Cluster,
    name: &str,
    scenario: fn(&mut Run),
    describe: fn(&Event) -> String,
) -> [Vec<String>; 2] {
    let sides = [("direct", cluster.broker), ("bridge", cluster.bridge)];
    let handles = sides.map(|(side, addr)| {
        let mut run = Run::new(addr, name, side, describe);
        std::thread::Builder::new()
            .name(format!("{name}-{side}"))
            .spawn(move || {
                scenario(&mut run);
                run.trace
            })
            .unwrap()
    });
    let [direct, bridge] = handles.map(|h| h.join());
    match (direct, bridge) {
        (Ok(d), Ok(b)) => [d, b],
        (Err(_), _) => panic!("the direct run of {name} failed (see its panic above)"),
        (_, Err(_)) => panic!("the bridged run of {name} failed (see its panic above)"),
    }
}
