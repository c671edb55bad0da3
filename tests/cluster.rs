//! Scale-out: two clustered broker nodes (ejabberd, `mod_mqtt`), one quva-bridge per node, one CA,
//! and a sticky TCP balancer in front of the bridges (docs/scale-out.md). Devices are split across
//! the bridges by client identifier; messages of options 1, 2 and 3 cross the nodes both ways; a
//! rekey's notices reach the devices on both nodes; a revocation cuts the device's sessions on both
//! bridges; a message replayed through the other bridge is refused end to end; when one broker
//! node dies its devices reconnect through the other bridge and resume with the key they hold.
//!
//! Needs Debian's `ejabberd` (scripts/common.sh installs it as root); skipped, with a message, only
//! when it is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::time::{Duration, Instant};

use quva_tests::balancer::{Backend, Balancer};
use quva_tests::ejabberd::{self, BROKER_USER, BrokerCluster};
use quva_tests::raw::RawMqtt;
use quva_tests::{Cluster, Node, Options, Proc, STEP_TIMEOUT};

const GROUP: &str = "plant/scale/temp";

/// Devices whose name starts with `b-` are sticky to the second bridge, the others to the first.
fn sticky(client_id: &str) -> usize {
    usize::from(client_id.starts_with("b-"))
}

/// The JSON lines a running `subscribe --json` printed so far whose payload is `payload`.
fn printed(p: &Proc, payload: &str) -> Vec<serde_json::Value> {
    p.out()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["payload"] == payload)
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_bridges_on_a_clustered_broker() {
    let Some(mut brokers) = BrokerCluster::start(2) else {
        eprintln!(
            "SKIPPED two_bridges_on_a_clustered_broker: ejabberd is not installed \
             (run scripts/common.sh as root, or apt-get install ejabberd)"
        );
        assert!(!ejabberd::installed());
        return;
    };
    let cluster = Cluster::start_with(
        &["plant/#"],
        &Options {
            upstream: Some(brokers.upstream(0)),
            ..Options::default()
        },
    );
    let bridge_b = cluster.add_bridge(&brokers.upstream(1), 1);
    let lb = Balancer::start(
        vec![
            Backend {
                bridge: cluster.bridge,
                health: brokers.address(0),
            },
            Backend {
                bridge: bridge_b.addr,
                health: brokers.address(1),
            },
        ],
        Box::new(sticky),
    );
    let via_lb = |mut n: Node| {
        n.bridge = lb.addr;
        n
    };

    cluster.create_group(GROUP);
    let a_pub = via_lb(cluster.enrolled("a-pub", &[(GROUP, "pub")]));
    let b_pub = via_lb(cluster.enrolled("b-pub", &[(GROUP, "pub")]));
    let a_sub = via_lb(cluster.enrolled("a-sub", &[(GROUP, "sub")]));
    let b_sub = via_lb(cluster.enrolled("b-sub", &[(GROUP, "sub")]));

    let mut sa = a_sub.spawn_debug(&["subscribe", "--group", GROUP, "--json"]);
    let mut sb = b_sub.spawn_debug(&["subscribe", "--group", GROUP, "--json"]);
    sa.wait_stderr("joined");
    sb.wait_stderr("joined");
    let routes = lb.routes();
    for (device, bridge) in [("a-sub", 0), ("b-sub", 1)] {
        assert!(
            routes
                .iter()
                .any(|(id, b)| id.starts_with(&format!("{device}-")) && *b == bridge),
            "{device} not on bridge {bridge}: {routes:?}"
        );
    }

    // Options 1, 2 and 3 from node 0 to both nodes, and from node 1 back to node 0.
    for option in [1u8, 2, 3] {
        a_pub.publish(GROUP, option, &format!("from a, option {option}"));
    }
    b_pub.publish(GROUP, 2, "from b, option 2");
    for sub in [&mut sa, &mut sb] {
        for option in [1u8, 2, 3] {
            sub.wait_stdout(&format!("from a, option {option}"));
        }
        sub.wait_stdout("from b, option 2");
    }
    for sub in [&sa, &sb] {
        for option in [1u64, 2, 3] {
            let lines = printed(sub, &format!("from a, option {option}"));
            assert_eq!(lines.len(), 1, "{}: {lines:?}", sub.name);
            assert_eq!(lines[0]["option"], option);
            assert_eq!(lines[0]["sender"], "a-pub");
            assert_eq!(lines[0]["anonymous"], option == 3);
        }
        assert_eq!(printed(sub, "from b, option 2")[0]["sender"], "b-pub");
    }

    // A rekey: each bridge's notice follower publishes the notices on its own node; devices on
    // both nodes move to the new epoch and read the next message. A raw client of the broker on
    // node 1 counts the notices it sees (each bridge publishes every notice).
    let sniffer = RawMqtt::sniff_login(brokers.address(1), BROKER_USER, brokers.password());
    let key_topic = format!("quva/k/{GROUP}/sub");
    let seen_before = sniffer
        .received()
        .iter()
        .filter(|c| c.topic == key_topic)
        .count();
    let e0 = cluster.epoch(GROUP);
    cluster.admin(&["group", "rekey", GROUP]);
    let e1 = cluster.wait_epoch_after(GROUP, e0);
    sa.wait_epoch(e1);
    sb.wait_epoch(e1);
    wait_until("the rekey notice is seen on node 1", || {
        sniffer
            .received()
            .iter()
            .filter(|c| c.topic == key_topic)
            .count()
            > seen_before
    });
    std::thread::sleep(Duration::from_secs(1));
    let notices: Vec<usize> = sniffer
        .received()
        .iter()
        .filter(|c| c.topic == key_topic && !c.retain)
        .map(|c| c.payload.len())
        .collect();
    let lists: Vec<usize> = sniffer
        .received()
        .iter()
        .filter(|c| c.topic == format!("quva/c/{GROUP}") && !c.retain)
        .map(|c| c.payload.len())
        .collect();
    eprintln!(
        "rekey of a 4-member group seen on node 1: subscriber notices of {notices:?} bytes, \
         member lists of {lists:?} bytes"
    );
    b_pub.publish(GROUP, 2, "after the rekey");
    sa.wait_stdout("after the rekey");
    sb.wait_stdout("after the rekey");
    for sub in [&sa, &sb] {
        let lines = printed(sub, "after the rekey");
        assert_eq!(lines.len(), 1, "{}: {lines:?}", sub.name);
        assert_eq!(lines[0]["epoch"], e1);
    }

    // A revocation ends the device's sessions on both bridges, and neither lets it in again.
    let victim = cluster.enrolled("victim", &[(GROUP, "sub")]);
    let on_a = RawMqtt::connect_device(cluster.bridge, &victim.store);
    let on_b = RawMqtt::connect_device(bridge_b.addr, &victim.store);
    assert!(on_a.is_open() && on_b.is_open());
    cluster.admin(&["device", "revoke", "victim"]);
    wait_until("both sessions of the revoked device are closed", || {
        !on_a.is_open() && !on_b.is_open()
    });
    for bridge in [cluster.bridge, bridge_b.addr] {
        assert!(
            RawMqtt::try_connect_device(bridge, &victim.store).is_err(),
            "the revoked device connected to {bridge}"
        );
    }

    // Replay through the other bridge: a message published through bridge A is captured on
    // node 1 and sent again, within its time window, through bridge B by its own publisher's
    // connection. Bridge B has not seen it (replay caches are per bridge), so it may pass the
    // bridge; every subscriber refuses it as a replay, and nobody prints it twice.
    let already = sniffer.received().len();
    a_pub.publish(GROUP, 2, "replay me");
    sa.wait_stdout("replay me");
    sb.wait_stdout("replay me");
    wait_until("the message is seen on node 1", || {
        sniffer.received()[already..]
            .iter()
            .any(|c| c.topic == GROUP)
    });
    let captured = sniffer.received()[already..]
        .iter()
        .find(|c| c.topic == GROUP)
        .unwrap()
        .payload
        .clone();
    let as_a_pub = RawMqtt::connect_device(bridge_b.addr, &a_pub.store);
    let code = as_a_pub.publish(GROUP, &captured);
    if code < 0x80 {
        for sub in [&mut sa, &mut sb] {
            sub.wait_stderr("reason=message rejected: replayed message");
        }
    }
    b_pub.publish(GROUP, 2, "after the replay");
    sa.wait_stdout("after the replay");
    sb.wait_stdout("after the replay");
    for sub in [&sa, &sb] {
        assert_eq!(printed(sub, "replay me").len(), 1, "{}", sub.name);
    }
    eprintln!("bridge B answered the replay with PUBACK 0x{code:02x}");

    // Node 0 dies. Bridge A loses its upstream and closes its devices' connections; they come
    // back through the balancer, whose health check now sends them to bridge B, and resume with
    // the key they hold.
    let before = sa.err().matches("resumed with the held key").count();
    brokers.kill(0);
    sa.wait_stderr("disconnected; reconnecting");
    wait_until("a-sub resumed through bridge B", || {
        sa.err().matches("resumed with the held key").count() > before
    });
    let routes = lb.routes();
    let last_a_sub = routes
        .iter()
        .rev()
        .find(|(id, _)| id.starts_with("a-sub-"))
        .unwrap();
    assert_eq!(
        last_a_sub.1, 1,
        "a-sub did not move to bridge B: {routes:?}"
    );
    a_pub.publish(GROUP, 2, "after the failover");
    sa.wait_stdout("after the failover");
    sb.wait_stdout("after the failover");
    assert!(
        lb.routes()
            .iter()
            .rev()
            .find(|(id, _)| id.starts_with("a-pub-"))
            .is_some_and(|(_, b)| *b == 1),
        "a-pub did not move to bridge B"
    );
    let e = cluster.epoch(GROUP);
    assert!(sa.holds_epoch(e) && sb.holds_epoch(e));
}
