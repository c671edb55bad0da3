//! Fidelity of the bridge on unprotected topics: every MQTT 5 feature a plain application uses
//! is played once against Mosquitto directly and once through the bridge (protecting `plant/#`,
//! the scenario using only `app/…` topics), and both runs must observe the same packets — reason
//! codes, the properties that matter, and their order.
//!
//! Each scenario is one function over a [`Run`] (an address and a namespace), run twice at the
//! same time by [`run_both`]. What the client sees is written into a trace by [`describe`], which
//! applies the only normalizations: values that differ on purpose (docs/operations-bridge.md,
//! "Where the bridge differs from the broker, on purpose"):
//!
//! - **Assigned Client Identifier**: the bridge assigns its own (`qa-…`), Mosquitto its own
//!   (`auto-…`); only its presence is compared.
//! - **Topic Alias Maximum** in CONNACK: the bridge resolves aliases itself and offers 32,
//!   Mosquitto offers 10; only its presence is compared, and the alias scenario takes the number
//!   from the CONNACK it got.
//! - **Maximum Packet Size** in CONNACK: the bridge advertises its own limit
//!   (`limits.max_packet_size`, 307200 by default) where Mosquitto advertises none; that value is
//!   dropped from the trace (any other value stays).
//! - **Topic Alias** on a delivery: the number is not compared, only its presence (no scenario
//!   offers the server aliases, so none is expected).
//! - **Keep-alive expiry**: the bridge tells the client DISCONNECT 0x8D before it closes the
//!   connection, Mosquitto 2.0 closes it without a DISCONNECT; that one packet is skipped.
//! - **Message Expiry Interval** after time has passed is compared as "decreased by 0..=n s"
//!   (the broker counts whole seconds; both runs wait the same time, not the same instants).
//!
//! Besides "both runs agree", every scenario asserts what the direct run saw (the Will arrived,
//! the session was present, ...), so that a scenario that observes nothing cannot pass.
//!
//! `$` topics are the one feature where the bridge differs by a documented security rule: any
//! subscription that could match a `$` topic, `#` included, is refused (SUBACK 0x87 with a Reason
//! String), and `$` topics cannot be published to. [`dollar_topics`] checks both sides against
//! their own expected traces.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quva_tests::Cluster;
use quva_tests::mqtt5::{
    Client, ConnAck, ConnectProperties, DisconnectProperties, DisconnectReasonCode, Event,
    LastWill, LastWillProperties, Packet, Publish, PublishProperties, QoS, RetainForwardRule, Run,
    SubscribeProperties, publish, run_both,
};

/// The bridge's default `limits.max_packet_size`, advertised in its CONNACKs.
const BRIDGE_MAX_PACKET_SIZE: u32 = 307_200;

/// One cluster for the whole file while any test uses it (tests run in parallel; the last one
/// to finish stops the processes).
fn cluster() -> Arc<Cluster> {
    static SHARED: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = slot.upgrade() {
        return c;
    }
    let c = Arc::new(Cluster::start(&["plant/#"]));
    *slot = Arc::downgrade(&c);
    c
}

/// Runs `scenario` against both servers, asserts that the traces are equal and returns the
/// direct one.
fn same_on_both(name: &str, scenario: fn(&mut Run)) -> Vec<String> {
    let cluster = cluster();
    let [direct, bridge] = run_both(&cluster, name, scenario, describe);
    if direct != bridge {
        let width = direct.iter().map(String::len).max().unwrap_or(0).min(90);
        let mut table = String::new();
        for i in 0..direct.len().max(bridge.len()) {
            let d = direct.get(i).map_or("", String::as_str);
            let b = bridge.get(i).map_or("", String::as_str);
            let mark = if d == b { ' ' } else { '≠' };
            table.push_str(&format!("{mark} {d:<width$} | {b}\n"));
        }
        panic!(
            "{name}: the bridge differs from Mosquitto\n  direct{:w$} | bridge\n{table}\n{}",
            "",
            cluster.bridge_log(),
            w = width.saturating_sub(6)
        );
    }
    direct
}

/// Asserts that `trace` has a line that starts with `line`.
fn saw(trace: &[String], line: &str) {
    assert!(
        trace.iter().any(|l| l.starts_with(line)),
        "expected {line:?} in\n{}",
        trace.join("\n")
    );
}

/// Asserts that `trace` has lines starting with each of `lines`, in that order (others may be
/// between).
fn saw_in_order(trace: &[String], lines: &[&str]) {
    let mut at = 0;
    for line in lines {
        match trace[at..].iter().position(|l| l.starts_with(line)) {
            Some(i) => at += i + 1,
            None => panic!("expected {line:?} after line {at} in\n{}", trace.join("\n")),
        }
    }
}

// ------------------------------------------------------------------------------------------
// What a trace line says about a packet (with the normalizations listed above).
// ------------------------------------------------------------------------------------------

fn describe(ev: &Event) -> String {
    match ev {
        Event::Closed => "closed".to_owned(),
        Event::Undecodable(e) => format!("undecodable ({e})"),
        Event::Packet(p) => describe_packet(p),
    }
}

fn describe_packet(p: &Packet) -> String {
    match p {
        Packet::ConnAck(a) => describe_connack(a),
        Packet::Publish(p) => describe_publish(p),
        Packet::PubAck(a) => {
            let mut s = format!("PUBACK {:?}", a.reason);
            if let Some(pr) = &a.properties {
                push_opt(&mut s, "reason", &pr.reason_string);
                push_users(&mut s, &pr.user_properties);
            }
            s
        }
        Packet::PubRec(a) => {
            let mut s = format!("PUBREC {:?}", a.reason);
            if let Some(pr) = &a.properties {
                push_opt(&mut s, "reason", &pr.reason_string);
            }
            s
        }
        Packet::PubRel(a) => format!("PUBREL {:?}", a.reason),
        Packet::PubComp(a) => format!("PUBCOMP {:?}", a.reason),
        Packet::SubAck(a) => {
            let mut s = format!("SUBACK {:?}", a.return_codes);
            if let Some(pr) = &a.properties {
                push_opt(&mut s, "reason", &pr.reason_string);
                push_users(&mut s, &pr.user_properties);
            }
            s
        }
        Packet::UnsubAck(a) => {
            let mut s = format!("UNSUBACK {:?}", a.reasons);
            if let Some(pr) = &a.properties {
                push_opt(&mut s, "reason", &pr.reason_string);
            }
            s
        }
        Packet::Disconnect(d) => {
            let mut s = format!("DISCONNECT {:?}", d.reason_code);
            if let Some(pr) = &d.properties {
                push_opt(&mut s, "session_expiry", &pr.session_expiry_interval);
                push_opt(&mut s, "reason", &pr.reason_string);
                push_opt(&mut s, "server_reference", &pr.server_reference);
                push_users(&mut s, &pr.user_properties);
            }
            s
        }
        Packet::PingResp(_) => "PINGRESP".to_owned(),
        other => format!("unexpected {other:?}"),
    }
}

fn describe_connack(a: &ConnAck) -> String {
    let mut s = format!("CONNACK {:?} session_present={}", a.code, a.session_present);
    let Some(pr) = &a.properties else {
        return s;
    };
    push_opt(&mut s, "session_expiry", &pr.session_expiry_interval);
    push_opt(&mut s, "receive_max", &pr.receive_max);
    push_opt(&mut s, "max_qos", &pr.max_qos);
    push_opt(&mut s, "retain_available", &pr.retain_available);
    // Normalized: the bridge's own limit (see the module documentation).
    let max_packet = pr.max_packet_size.filter(|m| *m != BRIDGE_MAX_PACKET_SIZE);
    push_opt(&mut s, "max_packet_size", &max_packet);
    // Normalized: only whether an identifier was assigned.
    push_opt(
        &mut s,
        "assigned_client_id",
        &pr.assigned_client_identifier.as_ref().map(|_| "<assigned>"),
    );
    // Normalized: only whether aliases are offered.
    push_opt(
        &mut s,
        "topic_alias_max",
        &pr.topic_alias_max.map(|_| "<n>"),
    );
    push_opt(&mut s, "reason", &pr.reason_string);
    push_users(&mut s, &pr.user_properties);
    push_opt(&mut s, "wildcards", &pr.wildcard_subscription_available);
    push_opt(&mut s, "sub_ids", &pr.subscription_identifiers_available);
    push_opt(&mut s, "shared", &pr.shared_subscription_available);
    push_opt(&mut s, "server_keep_alive", &pr.server_keep_alive);
    push_opt(&mut s, "response_info", &pr.response_information);
    push_opt(&mut s, "server_reference", &pr.server_reference);
    push_opt(&mut s, "auth_method", &pr.authentication_method);
    s
}

fn describe_publish(p: &Publish) -> String {
    let topic = String::from_utf8_lossy(&p.topic);
    let payload = if p.payload.len() > 64 {
        format!("<{} bytes>", p.payload.len())
    } else {
        format!("{:?}", String::from_utf8_lossy(&p.payload))
    };
    let mut s = format!(
        "PUBLISH {topic} {payload} qos={} retain={} dup={}",
        p.qos as u8, p.retain, p.dup
    );
    if let Some(pr) = &p.properties {
        push_opt(&mut s, "format", &pr.payload_format_indicator);
        push_opt(&mut s, "expiry", &pr.message_expiry_interval);
        // Normalized: only whether an alias was used.
        push_opt(&mut s, "topic_alias", &pr.topic_alias.map(|_| "<n>"));
        push_opt(&mut s, "response_topic", &pr.response_topic);
        push_opt(
            &mut s,
            "correlation",
            &pr.correlation_data
                .as_ref()
                .map(|c| String::from_utf8_lossy(c).into_owned()),
        );
        push_opt(&mut s, "content_type", &pr.content_type);
        if !pr.subscription_identifiers.is_empty() {
            s.push_str(&format!(" sub_ids={:?}", pr.subscription_identifiers));
        }
        push_users(&mut s, &pr.user_properties);
    }
    s
}

fn push_opt<T: std::fmt::Debug>(s: &mut String, name: &str, v: &Option<T>) {
    if let Some(v) = v {
        s.push_str(&format!(" {name}={v:?}"));
    }
}

fn push_users(s: &mut String, users: &[(String, String)]) {
    if !users.is_empty() {
        s.push_str(&format!(" user={users:?}"));
    }
}

// ------------------------------------------------------------------------------------------
// Scenario helpers.
// ------------------------------------------------------------------------------------------

/// Connects `who` with `connect` (and a Will), records the CONNACK and returns the client.
fn join(
    run: &mut Run,
    who: &str,
    connect: quva_tests::mqtt5::Connect,
    will: Option<LastWill>,
) -> (Client, Event) {
    let (c, ack) = Client::connect(run.addr, connect, will);
    run.note(who, &ack);
    (c, ack)
}

/// Connects `who` with the default CONNECT.
fn plain(run: &mut Run, who: &str) -> Client {
    let connect = run.connect(who);
    join(run, who, connect, None).0
}

/// Subscribes `c` to `filters` and records the SUBACK.
fn subscribe(run: &mut Run, c: &mut Client, who: &str, filters: &[quva_tests::mqtt5::Filter]) {
    c.subscribe(filters);
    run.observe(c, who, 1);
}

/// Publishes at QoS 1 and records the PUBACK.
fn publish_acked(run: &mut Run, c: &mut Client, who: &str, p: Publish) {
    c.publish(p);
    run.observe(c, who, 1);
}

/// A Will on `topic` with payload `payload`, QoS 1.
fn will(topic: &str, payload: &str, props: Option<LastWillProperties>) -> LastWill {
    LastWill::new(topic, payload, QoS::AtLeastOnce, false, props)
}

fn will_props() -> LastWillProperties {
    LastWillProperties {
        delay_interval: None,
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    }
}

fn connect_props() -> ConnectProperties {
    ConnectProperties::new()
}

/// A CONNECT of `who` with a session that outlives the connection by `expiry` seconds.
fn persistent(run: &Run, who: &str, clean_start: bool, expiry: u32) -> quva_tests::mqtt5::Connect {
    let mut c = run.connect(who);
    c.clean_start = clean_start;
    c.properties = Some(ConnectProperties {
        session_expiry_interval: Some(expiry),
        ..connect_props()
    });
    c
}

/// Records how long something took, in a bucket both runs agree on: `early` before `at`,
/// `on time` otherwise.
fn timing(run: &mut Run, who: &str, what: &str, since: Instant, at: Duration) {
    let bucket = if since.elapsed() < at {
        "early"
    } else {
        "on time"
    };
    run.fact(who, &format!("{what} {bucket}"));
}

// ------------------------------------------------------------------------------------------
// Scenarios.
// ------------------------------------------------------------------------------------------

/// A client whose network connection fails has its Will published, with its properties.
fn will_on_network_failure(run: &mut Run) {
    let mut sub = plain(run, "sub");
    subscribe(
        run,
        &mut sub,
        "sub",
        &[Client::filter(&run.topic("will"), QoS::AtLeastOnce)],
    );
    let props = LastWillProperties {
        payload_format_indicator: Some(1),
        content_type: Some("text/plain".to_owned()),
        response_topic: Some(run.topic("reply")),
        correlation_data: Some(Bytes::from_static(b"corr-1")),
        user_properties: vec![("why".to_owned(), "network".to_owned())],
        ..will_props()
    };
    let w = will(&run.topic("will"), "gone", Some(props));
    let connect = run.connect("dev");
    let (dev, _) = join(run, "dev", connect, Some(w));
    dev.drop_connection();
    run.observe(&mut sub, "sub", 1);
    run.quiet(&mut sub, "sub");
}

#[test]
fn wills_are_published_when_the_network_fails() {
    let t = same_on_both("will-net", will_on_network_failure);
    saw(
        &t,
        "sub: PUBLISH ~/will \"gone\" qos=1 retain=false dup=false format=1 \
         response_topic=\"~/reply\" correlation=\"corr-1\" content_type=\"text/plain\" \
         user=[(\"why\", \"network\")]",
    );
}

/// Will Delay Interval: the Will waits for the delay, is cancelled by a reconnection to the
/// session, and comes early when the session ends first.
fn will_delay(run: &mut Run) {
    let mut sub = plain(run, "sub");
    subscribe(
        run,
        &mut sub,
        "sub",
        &[Client::filter(&run.topic("will/#"), QoS::AtLeastOnce)],
    );

    // 1. Delay 2 s, session 60 s: published after 2 s.
    let w = will(
        &run.topic("will/delayed"),
        "late",
        Some(LastWillProperties {
            delay_interval: Some(2),
            ..will_props()
        }),
    );
    let (dev, _) = join(run, "dev1", persistent(run, "dev1", true, 60), Some(w));
    let gone = Instant::now();
    dev.drop_connection();
    run.quiet_for(&mut sub, "sub", Duration::from_millis(1200));
    run.observe(&mut sub, "sub", 1);
    timing(
        run,
        "sub",
        "delayed Will",
        gone,
        Duration::from_millis(1500),
    );

    // 2. Reconnecting to the session within the delay cancels the Will.
    let w = will(
        &run.topic("will/cancelled"),
        "never",
        Some(LastWillProperties {
            delay_interval: Some(2),
            ..will_props()
        }),
    );
    let (dev, _) = join(run, "dev2", persistent(run, "dev2", true, 60), Some(w));
    dev.drop_connection();
    std::thread::sleep(Duration::from_millis(300));
    let (dev, _) = join(run, "dev2", persistent(run, "dev2", false, 60), None);
    run.quiet_for(&mut sub, "sub", Duration::from_millis(2500));
    dev.disconnect(
        DisconnectReasonCode::NormalDisconnection,
        Some(DisconnectProperties {
            session_expiry_interval: Some(0),
            reason_string: None,
            user_properties: Vec::new(),
            server_reference: None,
        }),
    );

    // 3. Delay 30 s but session 1 s: published when the session ends.
    let w = will(
        &run.topic("will/session-end"),
        "session over",
        Some(LastWillProperties {
            delay_interval: Some(30),
            ..will_props()
        }),
    );
    let (dev, _) = join(run, "dev3", persistent(run, "dev3", true, 1), Some(w));
    dev.drop_connection();
    run.observe(&mut sub, "sub", 1);
    run.quiet(&mut sub, "sub");
}

#[test]
fn will_delay_interval_is_honoured() {
    let t = same_on_both("will-delay", will_delay);
    saw_in_order(
        &t,
        &[
            "sub: PUBLISH ~/will/delayed \"late\" qos=1 retain=false dup=false",
            "sub: delayed Will on time",
            "dev2: CONNACK Success session_present=true",
            "sub: PUBLISH ~/will/session-end \"session over\" qos=1 retain=false dup=false",
        ],
    );
    assert!(!t.iter().any(|l| l.contains("never")), "{t:#?}");
}

/// A client that stops sending (keep-alive 1 s) is disconnected and its Will published.
fn keep_alive_expiry(run: &mut Run) {
    let mut sub = plain(run, "sub");
    subscribe(
        run,
        &mut sub,
        "sub",
        &[Client::filter(&run.topic("will"), QoS::AtLeastOnce)],
    );
    let mut connect = run.connect("dev");
    connect.keep_alive = 1;
    let (mut dev, _) = join(
        run,
        "dev",
        connect,
        Some(will(&run.topic("will"), "silent", None)),
    );
    let start = Instant::now();
    // Mosquitto 2.0 checks keep-alives every few seconds (the Will comes 1.5 to ~6 s late).
    run.observe_within(&mut sub, "sub", 1, Duration::from_secs(10));
    timing(run, "sub", "Will", start, Duration::from_millis(1000));
    // What the silent client was told before the connection closed. Normalized: Mosquitto 2.0
    // closes an expired connection without a DISCONNECT, the bridge first says DISCONNECT 0x8D
    // (Keep Alive timeout); both are MQTT 5 (docs/operations-bridge.md).
    for _ in 0..2 {
        match dev.next(quva_tests::mqtt5::EXPECT) {
            Some(Event::Packet(Packet::Disconnect(d)))
                if d.reason_code == DisconnectReasonCode::KeepAliveTimeout => {}
            Some(ev) => {
                run.note("dev", &ev);
                if ev == Event::Closed {
                    break;
                }
            }
            None => {
                run.fact("dev", "nothing");
                break;
            }
        }
    }
}

#[test]
fn keep_alive_expiry_publishes_the_will() {
    let t = same_on_both("keep-alive", keep_alive_expiry);
    saw_in_order(
        &t,
        &[
            "sub: PUBLISH ~/will \"silent\" qos=1 retain=false dup=false",
            "sub: Will on time",
        ],
    );
}

/// DISCONNECT 0x00 discards the Will; DISCONNECT 0x04 asks for it.
fn normal_disconnect(run: &mut Run) {
    let mut sub = plain(run, "sub");
    subscribe(
        run,
        &mut sub,
        "sub",
        &[Client::filter(&run.topic("will/+"), QoS::AtLeastOnce)],
    );
    let connect = run.connect("a");
    let (a, _) = join(
        run,
        "a",
        connect,
        Some(will(&run.topic("will/a"), "a", None)),
    );
    a.disconnect(DisconnectReasonCode::NormalDisconnection, None);
    run.quiet_for(&mut sub, "sub", Duration::from_millis(800));
    let connect = run.connect("b");
    let (b, _) = join(
        run,
        "b",
        connect,
        Some(will(&run.topic("will/b"), "b", None)),
    );
    b.disconnect(DisconnectReasonCode::DisconnectWithWillMessage, None);
    run.observe(&mut sub, "sub", 1);
    run.quiet(&mut sub, "sub");
}

#[test]
fn a_normal_disconnect_discards_the_will_and_0x04_sends_it() {
    let t = same_on_both("disconnect", normal_disconnect);
    saw(
        &t,
        "sub: PUBLISH ~/will/b \"b\" qos=1 retain=false dup=false",
    );
    assert!(!t.iter().any(|l| l.contains("~/will/a")), "{t:#?}");
}

/// A protocol error (an unknown topic alias) and a malformed packet end the connection, and the
/// server publishes the Will (MQTT 5 §3.1.2.5).
fn protocol_errors(run: &mut Run) {
    let mut sub = plain(run, "sub");
    subscribe(
        run,
        &mut sub,
        "sub",
        &[Client::filter(&run.topic("will/+"), QoS::AtLeastOnce)],
    );

    let connect = run.connect("alias");
    let (mut dev, _) = join(
        run,
        "alias",
        connect,
        Some(will(&run.topic("will/alias"), "alias", None)),
    );
    let mut p = publish("", QoS::AtLeastOnce, b"x");
    p.properties = Some(PublishProperties {
        topic_alias: Some(1),
        ..PublishProperties::default()
    });
    dev.publish(p);
    run.observe(&mut dev, "alias", 2);
    run.observe(&mut sub, "sub", 1);

    let connect = run.connect("malformed");
    let (mut dev, _) = join(
        run,
        "malformed",
        connect,
        Some(will(&run.topic("will/malformed"), "malformed", None)),
    );
    // A PUBLISH with QoS 3 (MQTT 5 §3.3.1.2: malformed).
    dev.send_bytes(&[0x36, 0x06, 0x00, 0x01, b'a', 0x00, 0x01, 0x00]);
    run.observe(&mut dev, "malformed", 2);
    run.observe(&mut sub, "sub", 1);
    run.quiet(&mut sub, "sub");
}

#[test]
fn protocol_errors_end_the_connection_and_publish_the_will() {
    let t = same_on_both("protocol-error", protocol_errors);
    saw_in_order(
        &t,
        &[
            "alias: DISCONNECT ProtocolError",
            "sub: PUBLISH ~/will/alias \"alias\" qos=1 retain=false dup=false",
            "malformed: DISCONNECT MalformedPacket",
            "sub: PUBLISH ~/will/malformed \"malformed\" qos=1 retain=false dup=false",
        ],
    );
}

/// Retained messages, Retain Handling 0/1/2, Retain As Published, and deleting a retained
/// message.
fn retained(run: &mut Run) {
    let mut publisher = plain(run, "pub");
    let mut r = publish(&run.topic("r"), QoS::AtLeastOnce, b"r1");
    r.retain = true;
    publish_acked(run, &mut publisher, "pub", r);

    // Retain Handling 0: sent at every subscribe, with the retain flag set.
    let mut s0 = plain(run, "rh0");
    subscribe(
        run,
        &mut s0,
        "rh0",
        &[Client::filter(&run.topic("r"), QoS::AtLeastOnce)],
    );
    run.observe(&mut s0, "rh0", 1);
    subscribe(
        run,
        &mut s0,
        "rh0",
        &[Client::filter(&run.topic("r"), QoS::AtLeastOnce)],
    );
    run.observe(&mut s0, "rh0", 1);

    // Retain Handling 1: only when the subscription is new.
    let mut s1 = plain(run, "rh1");
    let mut f = Client::filter(&run.topic("r"), QoS::AtLeastOnce);
    f.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    subscribe(run, &mut s1, "rh1", &[f.clone()]);
    run.observe(&mut s1, "rh1", 1);
    subscribe(run, &mut s1, "rh1", &[f]);
    run.quiet(&mut s1, "rh1");

    // Retain Handling 2: never.
    let mut s2 = plain(run, "rh2");
    let mut f = Client::filter(&run.topic("r"), QoS::AtLeastOnce);
    f.retain_forward_rule = RetainForwardRule::Never;
    subscribe(run, &mut s2, "rh2", &[f]);
    run.quiet(&mut s2, "rh2");

    // Retain As Published on a live retained message: set on s2, cleared on s0.
    let mut f = Client::filter(&run.topic("live"), QoS::AtLeastOnce);
    f.preserve_retain = true;
    subscribe(run, &mut s2, "rh2", &[f]);
    subscribe(
        run,
        &mut s0,
        "rh0",
        &[Client::filter(&run.topic("live"), QoS::AtLeastOnce)],
    );
    let mut live = publish(&run.topic("live"), QoS::AtLeastOnce, b"live");
    live.retain = true;
    publish_acked(run, &mut publisher, "pub", live);
    run.observe(&mut s2, "rh2", 1);
    run.observe(&mut s0, "rh0", 1);

    // An empty retained PUBLISH deletes the retained message.
    let mut del = publish(&run.topic("r"), QoS::AtLeastOnce, b"");
    del.retain = true;
    publish_acked(run, &mut publisher, "pub", del);
    run.observe(&mut s0, "rh0", 1);
    let mut late = plain(run, "late");
    subscribe(
        run,
        &mut late,
        "late",
        &[Client::filter(&run.topic("r"), QoS::AtLeastOnce)],
    );
    run.quiet(&mut late, "late");
    // Clean up the retained message of the live topic.
    let mut del = publish(&run.topic("live"), QoS::AtMostOnce, b"");
    del.retain = true;
    publisher.publish(del);
}

#[test]
fn retained_messages_and_retain_handling() {
    let t = same_on_both("retained", retained);
    saw_in_order(
        &t,
        &[
            "rh0: PUBLISH ~/r \"r1\" qos=1 retain=true dup=false",
            "rh0: PUBLISH ~/r \"r1\" qos=1 retain=true dup=false",
            "rh1: PUBLISH ~/r \"r1\" qos=1 retain=true dup=false",
            "rh2: PUBLISH ~/live \"live\" qos=1 retain=true dup=false",
            "rh0: PUBLISH ~/live \"live\" qos=1 retain=false dup=false",
        ],
    );
    assert_eq!(
        t.iter().filter(|l| l.starts_with("rh1: PUBLISH")).count(),
        1,
        "{t:#?}"
    );
    assert!(
        !t.iter().any(|l| l.starts_with("rh2: PUBLISH ~/r ")),
        "{t:#?}"
    );
    assert!(!t.iter().any(|l| l.starts_with("late: PUBLISH")), "{t:#?}");
}

/// Session Expiry: a persistent session keeps subscriptions and queues QoS 1 messages while
/// the client is away; a second connection takes the session over; expiry 0 at DISCONNECT
/// ends the session.
fn session_expiry(run: &mut Run) {
    let (mut c, _) = join(run, "c", persistent(run, "c", true, 30), None);
    subscribe(
        run,
        &mut c,
        "c",
        &[Client::filter(&run.topic("q"), QoS::AtLeastOnce)],
    );
    c.disconnect(DisconnectReasonCode::NormalDisconnection, None);

    let mut publisher = plain(run, "pub");
    for (i, qos) in [
        QoS::AtLeastOnce,
        QoS::AtLeastOnce,
        QoS::AtMostOnce,
        QoS::AtLeastOnce,
    ]
    .into_iter()
    .enumerate()
    {
        let p = publish(&run.topic("q"), qos, format!("m{}", i + 1).as_bytes());
        if qos == QoS::AtMostOnce {
            publisher.publish(p);
        } else {
            publish_acked(run, &mut publisher, "pub", p);
        }
    }
    std::thread::sleep(Duration::from_millis(200));

    let (mut c, _) = join(run, "c", persistent(run, "c", false, 30), None);
    run.observe(&mut c, "c", 3);
    run.quiet(&mut c, "c");

    // Another connection with the same client identifier takes the session over.
    let (mut c2, _) = join(run, "c2", persistent(run, "c", false, 30), None);
    run.observe(&mut c, "c", 2);
    publish_acked(
        run,
        &mut publisher,
        "pub",
        publish(&run.topic("q"), QoS::AtLeastOnce, b"m5"),
    );
    run.observe(&mut c2, "c2", 1);

    // Session Expiry 0 at DISCONNECT: the session ends with the connection.
    c2.disconnect(
        DisconnectReasonCode::NormalDisconnection,
        Some(DisconnectProperties {
            session_expiry_interval: Some(0),
            reason_string: None,
            user_properties: Vec::new(),
            server_reference: None,
        }),
    );
    std::thread::sleep(Duration::from_millis(200));
    publish_acked(
        run,
        &mut publisher,
        "pub",
        publish(&run.topic("q"), QoS::AtLeastOnce, b"m6"),
    );
    let (mut c, _) = join(run, "c", persistent(run, "c", false, 30), None);
    run.quiet(&mut c, "c");
    c.disconnect(
        DisconnectReasonCode::NormalDisconnection,
        Some(DisconnectProperties {
            session_expiry_interval: Some(0),
            reason_string: None,
            user_properties: Vec::new(),
            server_reference: None,
        }),
    );
}

#[test]
fn session_expiry_and_offline_queueing() {
    let t = same_on_both("session", session_expiry);
    saw_in_order(
        &t,
        &[
            "c: CONNACK Success session_present=true",
            "c: PUBLISH ~/q \"m1\" qos=1 retain=false dup=false",
            "c: PUBLISH ~/q \"m2\" qos=1 retain=false dup=false",
            "c: PUBLISH ~/q \"m4\" qos=1 retain=false dup=false",
            "c2: CONNACK Success session_present=true",
            // Mosquitto 2.0 closes a taken-over connection without DISCONNECT 0x8E.
            "c: closed",
            "c2: PUBLISH ~/q \"m5\" qos=1 retain=false dup=false",
            "c: CONNACK Success session_present=false",
        ],
    );
    assert!(
        !t.iter()
            .any(|l| l.contains("\"m6\"") && l.starts_with("c:")),
        "{t:#?}"
    );
}

/// Request/response: Response Topic and Correlation Data reach the responder unchanged, and the
/// response reaches the requester; Request Response Information is answered as the broker does.
fn request_response(run: &mut Run) {
    let mut responder = plain(run, "responder");
    subscribe(
        run,
        &mut responder,
        "responder",
        &[Client::filter(&run.topic("req"), QoS::AtLeastOnce)],
    );
    let mut connect = run.connect("requester");
    connect.properties = Some(ConnectProperties {
        request_response_info: Some(1),
        ..connect_props()
    });
    let (mut requester, _) = join(run, "requester", connect, None);
    subscribe(
        run,
        &mut requester,
        "requester",
        &[Client::filter(&run.topic("resp"), QoS::AtLeastOnce)],
    );
    let mut req = publish(&run.topic("req"), QoS::AtLeastOnce, b"what time is it");
    req.properties = Some(PublishProperties {
        response_topic: Some(run.topic("resp")),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        ..PublishProperties::default()
    });
    publish_acked(run, &mut requester, "requester", req);
    let got = run.observe(&mut responder, "responder", 1);
    let Some(Event::Packet(Packet::Publish(got))) = got.first() else {
        return;
    };
    let props = got.properties.clone().unwrap_or_default();
    let mut resp = publish(
        props.response_topic.as_deref().unwrap_or("nowhere"),
        QoS::AtLeastOnce,
        b"noon",
    );
    resp.properties = Some(PublishProperties {
        correlation_data: props.correlation_data,
        ..PublishProperties::default()
    });
    publish_acked(run, &mut responder, "responder", resp);
    run.observe(&mut requester, "requester", 1);
}

#[test]
fn request_response_properties_pass_unchanged() {
    let t = same_on_both("request-response", request_response);
    saw_in_order(
        &t,
        &[
            "responder: PUBLISH ~/req \"what time is it\" qos=1 retain=false dup=false \
             response_topic=\"~/resp\" correlation=\"\\0\\u{1}corr\"",
            "requester: PUBLISH ~/resp \"noon\" qos=1 retain=false dup=false \
             correlation=\"\\0\\u{1}corr\"",
        ],
    );
}

/// User properties: several, repeated keys, order kept, UTF-8.
fn user_properties(run: &mut Run) {
    let mut sub = plain(run, "sub");
    let props = SubscribeProperties {
        id: None,
        user_properties: vec![("on-subscribe".to_owned(), "1".to_owned())],
    };
    sub.subscribe_with(
        &[Client::filter(&run.topic("u"), QoS::AtLeastOnce)],
        Some(props),
    );
    run.observe(&mut sub, "sub", 1);
    let mut connect = run.connect("pub");
    connect.properties = Some(ConnectProperties {
        user_properties: vec![("on-connect".to_owned(), "1".to_owned())],
        ..connect_props()
    });
    let (mut publisher, _) = join(run, "pub", connect, None);
    let mut p = publish(&run.topic("u"), QoS::AtLeastOnce, b"props");
    p.properties = Some(PublishProperties {
        user_properties: vec![
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
            ("a".to_owned(), "3".to_owned()),
            ("ключ".to_owned(), "значение ✓".to_owned()),
            (String::new(), String::new()),
        ],
        ..PublishProperties::default()
    });
    publish_acked(run, &mut publisher, "pub", p);
    run.observe(&mut sub, "sub", 1);
}

#[test]
fn user_properties_pass_in_order() {
    let t = same_on_both("user-properties", user_properties);
    saw(
        &t,
        "sub: PUBLISH ~/u \"props\" qos=1 retain=false dup=false user=[(\"a\", \"1\"), \
         (\"b\", \"2\"), (\"a\", \"3\"), (\"ключ\", \"значение ✓\"), (\"\", \"\")]",
    );
}

/// Replaces the Message Expiry Interval of a delivery by how much it decreased from `set`
/// (the broker counts whole seconds).
fn note_expiry(run: &mut Run, who: &str, ev: &Event, set: u32) {
    let Event::Packet(Packet::Publish(p)) = ev else {
        run.note(who, ev);
        return;
    };
    let mut p = p.clone();
    let left = p
        .properties
        .as_mut()
        .and_then(|pr| pr.message_expiry_interval.take());
    run.note(who, &Event::Packet(Packet::Publish(p)));
    let what = match left {
        None => "no expiry".to_owned(),
        Some(l) if l <= set && set - l <= 3 => "expiry decreased by 0..=3 s".to_owned(),
        Some(l) => format!("expiry {l} (set {set})"),
    };
    run.fact(who, &what);
}

/// Payload Format Indicator and Content Type pass; Message Expiry Interval counts down and
/// expired messages are not delivered (retained or queued).
fn format_and_expiry(run: &mut Run) {
    let mut sub = plain(run, "sub");
    subscribe(
        run,
        &mut sub,
        "sub",
        &[Client::filter(&run.topic("m"), QoS::AtLeastOnce)],
    );
    let mut publisher = plain(run, "pub");

    let mut p = publish(
        &run.topic("m"),
        QoS::AtLeastOnce,
        "{\"ok\":\"✓\"}".as_bytes(),
    );
    p.properties = Some(PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".to_owned()),
        ..PublishProperties::default()
    });
    publish_acked(run, &mut publisher, "pub", p);
    run.observe(&mut sub, "sub", 1);

    // Format indicator 1 with a payload that is not UTF-8.
    let mut p = publish(&run.topic("m"), QoS::AtLeastOnce, b"\xff\xfe");
    p.properties = Some(PublishProperties {
        payload_format_indicator: Some(1),
        ..PublishProperties::default()
    });
    publish_acked(run, &mut publisher, "pub", p);
    run.quiet(&mut sub, "sub");

    // A live delivery carries the expiry.
    let mut p = publish(&run.topic("m"), QoS::AtLeastOnce, b"expires");
    p.properties = Some(PublishProperties {
        message_expiry_interval: Some(30),
        ..PublishProperties::default()
    });
    publish_acked(run, &mut publisher, "pub", p);
    if let Some(ev) = sub.next(quva_tests::mqtt5::EXPECT) {
        note_expiry(run, "sub", &ev, 30);
    }

    // Retained and queued messages: the 1 s ones expire, the 60 s ones count down.
    let (mut away, _) = join(run, "away", persistent(run, "away", true, 60), None);
    subscribe(
        run,
        &mut away,
        "away",
        &[Client::filter(&run.topic("q"), QoS::AtLeastOnce)],
    );
    away.disconnect(DisconnectReasonCode::NormalDisconnection, None);
    for (topic, secs, retain) in [
        ("e1", 1, true),
        ("e60", 60, true),
        ("q", 1, false),
        ("q", 60, false),
    ] {
        let mut p = publish(
            &run.topic(topic),
            QoS::AtLeastOnce,
            format!("{topic}-{secs}").as_bytes(),
        );
        p.retain = retain;
        p.properties = Some(PublishProperties {
            message_expiry_interval: Some(secs),
            ..PublishProperties::default()
        });
        publish_acked(run, &mut publisher, "pub", p);
    }
    std::thread::sleep(Duration::from_millis(2300));
    let mut late = plain(run, "late");
    subscribe(
        run,
        &mut late,
        "late",
        &[
            Client::filter(&run.topic("e1"), QoS::AtLeastOnce),
            Client::filter(&run.topic("e60"), QoS::AtLeastOnce),
        ],
    );
    if let Some(ev) = late.next(quva_tests::mqtt5::EXPECT) {
        note_expiry(run, "late", &ev, 60);
    }
    run.quiet(&mut late, "late");
    let (mut away, _) = join(run, "away", persistent(run, "away", false, 0), None);
    if let Some(ev) = away.next(quva_tests::mqtt5::EXPECT) {
        note_expiry(run, "away", &ev, 60);
    }
    run.quiet(&mut away, "away");
    for topic in ["e1", "e60"] {
        let mut del = publish(&run.topic(topic), QoS::AtMostOnce, b"");
        del.retain = true;
        publisher.publish(del);
    }
}

#[test]
fn payload_format_and_message_expiry() {
    let t = same_on_both("format-expiry", format_and_expiry);
    saw_in_order(
        &t,
        &[
            "sub: PUBLISH ~/m \"{\\\"ok\\\":\\\"✓\\\"}\" qos=1 retain=false dup=false format=1 \
             content_type=\"application/json\"",
            "sub: PUBLISH ~/m \"expires\" qos=1 retain=false dup=false",
            "sub: expiry decreased by 0..=3 s",
            "late: PUBLISH ~/e60 \"e60-60\" qos=1 retain=true dup=false",
            "late: expiry decreased by 0..=3 s",
            "away: CONNACK Success session_present=true",
            "away: PUBLISH ~/q \"q-60\" qos=1 retain=false dup=false",
            "away: expiry decreased by 0..=3 s",
        ],
    );
    assert!(!t.iter().any(|l| l.contains("-1\"")), "{t:#?}");
}

/// Subscription options and identifiers: No Local, the QoS of the subscription caps the
/// delivery, Subscription Identifiers on deliveries, overlapping subscriptions, UNSUBACK codes.
fn subscription_options(run: &mut Run) {
    let mut c = plain(run, "c");
    let mut nl = Client::filter(&run.topic("nl"), QoS::AtLeastOnce);
    nl.nolocal = true;
    subscribe(
        run,
        &mut c,
        "c",
        &[
            nl,
            Client::filter(&run.topic("l"), QoS::AtLeastOnce),
            Client::filter(&run.topic("q0"), QoS::AtMostOnce),
        ],
    );
    publish_acked(
        run,
        &mut c,
        "c",
        publish(&run.topic("nl"), QoS::AtLeastOnce, b"own, no local"),
    );
    run.quiet(&mut c, "c");
    c.publish(publish(&run.topic("l"), QoS::AtLeastOnce, b"own, local"));
    run.observe(&mut c, "c", 2);
    let mut other = plain(run, "other");
    publish_acked(
        run,
        &mut other,
        "other",
        publish(&run.topic("nl"), QoS::AtLeastOnce, b"other's"),
    );
    run.observe(&mut c, "c", 1);
    publish_acked(
        run,
        &mut other,
        "other",
        publish(&run.topic("q0"), QoS::AtLeastOnce, b"downgraded"),
    );
    run.observe(&mut c, "c", 1);

    // Subscription identifiers, and two subscriptions matching one message.
    let mut s = plain(run, "s");
    s.subscribe_with(
        &[Client::filter(&run.topic("ov/+"), QoS::AtLeastOnce)],
        Some(SubscribeProperties {
            id: Some(7),
            user_properties: Vec::new(),
        }),
    );
    run.observe(&mut s, "s", 1);
    s.subscribe_with(
        &[Client::filter(&run.topic("ov/#"), QoS::AtMostOnce)],
        Some(SubscribeProperties {
            id: Some(300),
            user_properties: Vec::new(),
        }),
    );
    run.observe(&mut s, "s", 1);
    publish_acked(
        run,
        &mut other,
        "other",
        publish(&run.topic("ov/x"), QoS::AtLeastOnce, b"twice"),
    );
    run.observe(&mut s, "s", 2);
    run.quiet(&mut s, "s");

    // UNSUBSCRIBE: one that existed, one that did not.
    c.unsubscribe(&[&run.topic("l"), &run.topic("never")]);
    run.observe(&mut c, "c", 1);
    publish_acked(
        run,
        &mut other,
        "other",
        publish(&run.topic("l"), QoS::AtLeastOnce, b"after"),
    );
    run.quiet(&mut c, "c");
}

#[test]
fn subscription_options_no_local_and_identifiers() {
    let t = same_on_both("sub-options", subscription_options);
    saw_in_order(
        &t,
        &[
            "c: SUBACK [Success(AtLeastOnce), Success(AtLeastOnce), Success(AtMostOnce)]",
            "c: PUBLISH ~/l \"own, local\" qos=1 retain=false dup=false",
            "c: PUBLISH ~/nl \"other's\" qos=1 retain=false dup=false",
            "c: PUBLISH ~/q0 \"downgraded\" qos=0 retain=false dup=false",
            "c: UNSUBACK [Success, NoSubscriptionExisted]",
        ],
    );
    assert!(
        !t.iter().any(|l| l.contains("own, no local\" qos")),
        "{t:#?}"
    );
    assert!(
        t.iter()
            .any(|l| l.starts_with("s: PUBLISH ~/ov/x") && l.contains("sub_ids=")),
        "{t:#?}"
    );
}

/// An invalid topic filter in SUBSCRIBE (a misplaced `#`) is a malformed packet.
fn invalid_filter(run: &mut Run) {
    let mut c = plain(run, "c");
    subscribe(
        run,
        &mut c,
        "c",
        &[
            Client::filter(&run.topic("a#"), QoS::AtLeastOnce),
            Client::filter(&run.topic("ok"), QoS::AtLeastOnce),
        ],
    );
    run.quiet(&mut c, "c");
}

#[test]
fn an_invalid_filter_ends_the_connection_as_at_the_broker() {
    let t = same_on_both("invalid-filter", invalid_filter);
    saw_in_order(&t, &["c: DISCONNECT MalformedPacket", "c: closed"]);
}

/// Shared subscriptions: each message goes to one member of the share group; a plain
/// subscription still gets every message.
fn shared_subscriptions(run: &mut Run) {
    let shared = format!("$share/g/{}", run.topic("s"));
    let mut m1 = plain(run, "m1");
    subscribe(
        run,
        &mut m1,
        "m1",
        &[Client::filter(&shared, QoS::AtLeastOnce)],
    );
    let mut m2 = plain(run, "m2");
    subscribe(
        run,
        &mut m2,
        "m2",
        &[Client::filter(&shared, QoS::AtLeastOnce)],
    );
    let mut all = plain(run, "all");
    subscribe(
        run,
        &mut all,
        "all",
        &[Client::filter(&run.topic("s"), QoS::AtLeastOnce)],
    );
    let mut publisher = plain(run, "pub");
    for i in 1..=4 {
        publish_acked(
            run,
            &mut publisher,
            "pub",
            publish(
                &run.topic("s"),
                QoS::AtLeastOnce,
                format!("s{i}").as_bytes(),
            ),
        );
    }
    run.observe(&mut all, "all", 4);
    let mut got = Vec::new();
    for (who, c) in [("m1", &mut m1), ("m2", &mut m2)] {
        let deadline = Instant::now() + Duration::from_millis(800);
        while let Some(ev) = c.next(deadline.saturating_duration_since(Instant::now())) {
            match ev {
                Event::Packet(Packet::Publish(p)) => {
                    got.push(String::from_utf8_lossy(&p.payload).into_owned());
                }
                other => run.note(who, &other),
            }
        }
    }
    got.sort();
    run.fact("share group", &format!("received {got:?}"));
    // Unsubscribing the share works like any other unsubscribe.
    m1.unsubscribe(&[&shared]);
    run.observe(&mut m1, "m1", 1);
}

#[test]
fn shared_subscriptions_deliver_each_message_once() {
    let t = same_on_both("shared", shared_subscriptions);
    saw(&t, "share group: received [\"s1\", \"s2\", \"s3\", \"s4\"]");
    saw(&t, "m1: UNSUBACK [Success]");
}

/// Flow control: the server sends at most Receive Maximum unacknowledged QoS 1 messages.
fn receive_maximum(run: &mut Run) {
    let mut connect = run.connect("slow");
    connect.properties = Some(ConnectProperties {
        receive_maximum: Some(2),
        ..connect_props()
    });
    let (mut slow, _) = join(run, "slow", connect, None);
    slow.auto_ack = false;
    subscribe(
        run,
        &mut slow,
        "slow",
        &[Client::filter(&run.topic("f"), QoS::AtLeastOnce)],
    );
    let mut publisher = plain(run, "pub");
    for i in 1..=5 {
        publish_acked(
            run,
            &mut publisher,
            "pub",
            publish(
                &run.topic("f"),
                QoS::AtLeastOnce,
                format!("f{i}").as_bytes(),
            ),
        );
    }
    let mut ids = Vec::new();
    for ev in run.observe(&mut slow, "slow", 2) {
        if let Event::Packet(Packet::Publish(p)) = ev {
            ids.push(p.pkid);
        }
    }
    run.quiet(&mut slow, "slow");
    for id in ids {
        slow.puback(id);
        for ev in run.observe(&mut slow, "slow", 1) {
            if let Event::Packet(Packet::Publish(p)) = ev {
                slow.puback(p.pkid);
            }
        }
    }
    // The last one, after both acknowledgements went out.
    for ev in run.observe(&mut slow, "slow", 1) {
        if let Event::Packet(Packet::Publish(p)) = ev {
            slow.puback(p.pkid);
        }
    }
    run.quiet(&mut slow, "slow");
}

#[test]
fn receive_maximum_limits_unacknowledged_deliveries() {
    let t = same_on_both("receive-maximum", receive_maximum);
    let deliveries: Vec<&String> = t
        .iter()
        .filter(|l| l.starts_with("slow: PUBLISH"))
        .collect();
    assert_eq!(deliveries.len(), 5, "{t:#?}");
    saw_in_order(
        &t,
        &[
            "slow: PUBLISH ~/f \"f1\" qos=1 retain=false dup=false",
            "slow: PUBLISH ~/f \"f2\" qos=1 retain=false dup=false",
            "slow: PUBLISH ~/f \"f3\" qos=1 retain=false dup=false",
            "slow: PUBLISH ~/f \"f4\" qos=1 retain=false dup=false",
            "slow: PUBLISH ~/f \"f5\" qos=1 retain=false dup=false",
        ],
    );
    // Nothing arrived while two were unacknowledged: the third came after the first PUBACK.
    let pos = |s: &str| t.iter().position(|l| l.contains(s)).unwrap();
    assert_eq!(pos("\"f2\"") + 1, pos("\"f3\""), "{t:#?}");
}

/// Maximum Packet Size of the client: the server does not send it larger packets (it drops
/// them for that client); QoS 2 delivery as well.
fn maximum_packet_size(run: &mut Run) {
    let mut connect = run.connect("small");
    connect.properties = Some(ConnectProperties {
        max_packet_size: Some(128),
        ..connect_props()
    });
    let (mut small, _) = join(run, "small", connect, None);
    subscribe(
        run,
        &mut small,
        "small",
        &[Client::filter(&run.topic("b"), QoS::ExactlyOnce)],
    );
    let mut publisher = plain(run, "pub");
    publish_acked(
        run,
        &mut publisher,
        "pub",
        publish(&run.topic("b"), QoS::AtLeastOnce, b"fits"),
    );
    publish_acked(
        run,
        &mut publisher,
        "pub",
        publish(&run.topic("b"), QoS::AtLeastOnce, &[b'x'; 400]),
    );
    // QoS 2 both ways: PUBREC, PUBREL (sent by the client), PUBCOMP.
    publisher.publish(publish(&run.topic("b"), QoS::ExactlyOnce, b"fits too"));
    run.observe(&mut publisher, "pub", 2);
    run.observe(&mut small, "small", 3);
    run.quiet(&mut small, "small");
}

#[test]
fn maximum_packet_size_of_the_client_is_respected() {
    let t = same_on_both("max-packet", maximum_packet_size);
    saw_in_order(
        &t,
        &[
            "small: PUBLISH ~/b \"fits\" qos=1 retain=false dup=false",
            "small: PUBLISH ~/b \"fits too\" qos=2 retain=false dup=false",
            "small: PUBREL Success",
        ],
    );
    assert!(!t.iter().any(|l| l.contains("<400 bytes>")), "{t:#?}");
}

/// A zero-length client identifier gets an Assigned Client Identifier, with Clean Start 1 or 0,
/// and the connection works.
fn zero_length_client_id(run: &mut Run) {
    let mut assigned = Vec::new();
    for clean_start in [true, false] {
        let mut connect = run.connect("anon");
        connect.client_id = String::new();
        connect.clean_start = clean_start;
        let (mut c, ack) = join(run, "anon", connect, None);
        if let Event::Packet(Packet::ConnAck(a)) = ack {
            assigned.push(a.properties.and_then(|p| p.assigned_client_identifier));
        }
        subscribe(
            run,
            &mut c,
            "anon",
            &[Client::filter(&run.topic("z"), QoS::AtLeastOnce)],
        );
        publish_acked(
            run,
            &mut c,
            "anon",
            publish(&run.topic("z"), QoS::AtLeastOnce, b"hello"),
        );
        run.observe(&mut c, "anon", 1);
        c.disconnect(DisconnectReasonCode::NormalDisconnection, None);
    }
    let distinct = assigned.len() == 2 && assigned[0] != assigned[1] && assigned[0].is_some();
    run.fact(
        "anon",
        &format!("two distinct assigned identifiers: {distinct}"),
    );
}

#[test]
fn a_zero_length_client_id_is_assigned_one() {
    let t = same_on_both("empty-id", zero_length_client_id);
    assert_eq!(
        t.iter()
            .filter(|l| l.contains("assigned_client_id=\"<assigned>\""))
            .count(),
        2,
        "{t:#?}"
    );
    saw(&t, "anon: two distinct assigned identifiers: true");
    saw(
        &t,
        "anon: PUBLISH ~/z \"hello\" qos=1 retain=false dup=false",
    );
}

/// Topic aliases from client to server: set, used, remapped; an alias above the server's Topic
/// Alias Maximum ends the connection (0x94) and publishes the Will.
fn topic_aliases(run: &mut Run) {
    let mut sub = plain(run, "sub");
    subscribe(
        run,
        &mut sub,
        "sub",
        &[
            Client::filter(&run.topic("a/#"), QoS::AtLeastOnce),
            Client::filter(&run.topic("will"), QoS::AtLeastOnce),
        ],
    );
    let connect = run.connect("dev");
    let (mut dev, ack) = join(
        run,
        "dev",
        connect,
        Some(will(&run.topic("will"), "alias", None)),
    );
    let max = match ack {
        Event::Packet(Packet::ConnAck(a)) => {
            a.properties.and_then(|p| p.topic_alias_max).unwrap_or(0)
        }
        _ => 0,
    };
    let aliased = |topic: &str, alias: u16, payload: &[u8]| {
        let mut p = publish(topic, QoS::AtLeastOnce, payload);
        p.properties = Some(PublishProperties {
            topic_alias: Some(alias),
            ..PublishProperties::default()
        });
        p
    };
    publish_acked(run, &mut dev, "dev", aliased(&run.topic("a/1"), 1, b"set"));
    publish_acked(run, &mut dev, "dev", aliased("", 1, b"used"));
    publish_acked(
        run,
        &mut dev,
        "dev",
        aliased(&run.topic("a/2"), 1, b"remapped"),
    );
    publish_acked(run, &mut dev, "dev", aliased("", 1, b"used again"));
    publish_acked(
        run,
        &mut dev,
        "dev",
        aliased(&run.topic("a/3"), max, b"highest"),
    );
    run.observe(&mut sub, "sub", 5);
    dev.publish(aliased(&run.topic("a/4"), max + 1, b"too high"));
    run.observe(&mut dev, "dev", 2);
    run.observe(&mut sub, "sub", 1);
    run.quiet(&mut sub, "sub");
}

#[test]
fn topic_aliases_from_the_client_resolve_as_at_the_broker() {
    let t = same_on_both("topic-alias", topic_aliases);
    saw_in_order(
        &t,
        &[
            "sub: PUBLISH ~/a/1 \"set\" qos=1 retain=false dup=false",
            "sub: PUBLISH ~/a/1 \"used\" qos=1 retain=false dup=false",
            "sub: PUBLISH ~/a/2 \"remapped\" qos=1 retain=false dup=false",
            "sub: PUBLISH ~/a/2 \"used again\" qos=1 retain=false dup=false",
            "sub: PUBLISH ~/a/3 \"highest\" qos=1 retain=false dup=false",
            "dev: DISCONNECT TopicAliasInvalid",
            "sub: PUBLISH ~/will \"alias\" qos=1 retain=false dup=false",
        ],
    );
    assert!(!t.iter().any(|l| l.contains("too high")), "{t:#?}");
}

/// `$` topics: a subscriber to `#` and `+/broker/version` gets no `$SYS` message (MQTT 5
/// §4.7.2) while one to `$SYS/broker/version` gets the retained one; a client PUBLISH to a `$`
/// topic.
fn dollar(run: &mut Run) {
    let mut a = plain(run, "a");
    subscribe(
        run,
        &mut a,
        "a",
        &[
            Client::filter("#", QoS::AtMostOnce),
            Client::filter("+/broker/version", QoS::AtMostOnce),
        ],
    );
    // Mosquitto's `$SYS/broker/version` is retained: a match would be delivered at once. `#`
    // also gets the traffic of other tests; only `$` topics count.
    let deadline = Instant::now() + Duration::from_millis(800);
    let mut dollar = false;
    while let Some(ev) = a.next(deadline.saturating_duration_since(Instant::now())) {
        match ev {
            Event::Packet(Packet::Publish(p)) => dollar |= p.topic.starts_with(b"$"),
            other => run.note("a", &other),
        }
    }
    run.fact("a", &format!("$ topics delivered: {dollar}"));

    let mut b = plain(run, "b");
    subscribe(
        run,
        &mut b,
        "b",
        &[Client::filter("$SYS/broker/version", QoS::AtMostOnce)],
    );
    let got = b.next(Duration::from_millis(800));
    let version = matches!(&got, Some(Event::Packet(Packet::Publish(p))) if p.topic == "$SYS/broker/version" && p.retain);
    run.fact("b", &format!("$SYS/broker/version delivered: {version}"));

    publish_acked(
        run,
        &mut b,
        "b",
        publish("$app/x", QoS::AtLeastOnce, b"dollar"),
    );
}

/// The bridge's Reason String for a refused wildcard filter (broker-bridge's `WILDCARD_REFUSED`).
const WILDCARD_REFUSED: &str = "a wildcard filter that can match protected Quva topics (groups, \
     quva/, $) is refused; subscribe to unprotected topics with a narrower filter and to each \
     group by its exact topic";

#[test]
fn dollar_topics_are_not_matched_by_wildcards_and_not_reachable_through_the_bridge() {
    let cluster = cluster();
    let [direct, bridge] = run_both(&cluster, "dollar", dollar, describe);
    let expected_direct = [
        "a: CONNACK Success session_present=false receive_max=20 topic_alias_max=\"<n>\"",
        "a: SUBACK [Success(AtMostOnce), Success(AtMostOnce)]",
        "a: $ topics delivered: false",
        "b: CONNACK Success session_present=false receive_max=20 topic_alias_max=\"<n>\"",
        "b: SUBACK [Success(AtMostOnce)]",
        "b: $SYS/broker/version delivered: true",
        "b: PUBACK NoMatchingSubscribers",
    ];
    assert_eq!(direct, expected_direct, "direct");
    // The documented rule: no filter that could match a `$` topic is granted, and no client may
    // publish to one (docs/operations-bridge.md).
    let refused = format!("a: SUBACK [NotAuthorized, NotAuthorized] reason={WILDCARD_REFUSED:?}");
    let expected_bridge = [
        expected_direct[0],
        &refused,
        expected_direct[2],
        expected_direct[3],
        "b: SUBACK [NotAuthorized]",
        "b: $SYS/broker/version delivered: false",
        "b: PUBACK NotAuthorized",
    ];
    assert_eq!(bridge, expected_bridge, "bridge");
}
