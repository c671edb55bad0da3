//! Recovery: a subscriber offline for one rekey (catches up alone) and across several (joins
//! again), periodic rekeys under traffic, and restarts of
//! the CA, the bridge and Mosquitto. After each, messages flow again in option 2, every device
//! holds the CA's current epoch, and nothing that should be refused is accepted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use quva_tests::raw::RawMqtt;
use quva_tests::{Cluster, Node, Proc};

const GROUP: &str = "plant/recovery/temp";

/// The payloads a finished `subscribe --json` printed.
fn payloads(p: Proc) -> Vec<String> {
    p.wait()
        .json_lines()
        .iter()
        .map(|l| l["payload"].as_str().unwrap().to_owned())
        .collect()
}

/// The epoch of the group key in a device's key store (`status --json`).
fn stored_epoch(node: &Node) -> u64 {
    let out = node.run(&["status", "--json"]).success();
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == GROUP)
        .and_then(|g| g["epoch"].as_u64())
        .unwrap_or_else(|| panic!("no stored key of {GROUP}: {v}"))
}

/// The subscriber's warnings about dropped data (replays are logged at debug level).
fn dropped_warnings(p: &Proc) -> Vec<String> {
    p.err()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("dropped"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn subscriber_offline_for_one_rekey_catches_up_alone() {
    let mut cluster = Cluster::start(&["plant/#"]);
    cluster.create_group(GROUP);
    let publisher = cluster.enrolled("pub-1", &[(GROUP, "pub")]);
    let sleeper = cluster.enrolled("sub-sleeper", &[(GROUP, "sub")]);
    let other = cluster.enrolled("sub-other", &[(GROUP, "sub")]);

    let mut s = sleeper.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "1"]);
    s.wait_stderr("joined");
    let mut o = other.spawn(&["subscribe", "--group", GROUP, "--count", "1"]);
    o.wait_stderr("joined");
    publisher.publish(GROUP, 2, "before");
    assert_eq!(payloads(s), ["before"]);
    drop(o);
    let e0 = cluster.epoch(GROUP);

    // One departure while the sleeper is offline: the retained tree notice of the subscribers
    // follows the sleeper's epoch, so it opens it with its stored path, without the CA.
    cluster.admin(&["group", "deny", GROUP, "sub-other", "--role", "sub"]);
    let e1 = cluster.wait_epoch_after(GROUP, e0);
    publisher.publish(GROUP, 1, "sync");
    cluster.stop_ca();

    let mut s = sleeper.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "2"]);
    s.wait_epoch(e1);
    let err = publisher.publish(GROUP, 2, "after-one");
    assert!(err.contains("resumed with the held key"), "{err}");
    publisher.publish(GROUP, 3, "after-two");
    let log = s.err();
    assert!(!log.contains("missed an epoch"), "{log}");
    assert_eq!(payloads(s), ["after-one", "after-two"]);
    assert_eq!(stored_epoch(&sleeper), e1);
}

#[test]
fn subscriber_offline_across_three_rekeys_joins_again() {
    let cluster = Cluster::start(&["plant/#"]);
    cluster.create_group(GROUP);
    let publisher = cluster.enrolled("pub-1", &[(GROUP, "pub")]);
    let sleeper = cluster.enrolled("sub-sleeper", &[(GROUP, "sub")]);
    let other = cluster.enrolled("sub-other", &[(GROUP, "sub")]);

    let mut s = sleeper.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "1"]);
    s.wait_stderr("joined");
    publisher.publish(GROUP, 2, "before");
    assert_eq!(payloads(s), ["before"]);
    let e0 = cluster.epoch(GROUP);

    // Three rekeys while the sleeper is offline: a join, a departure, a forced rekey. Only the
    // last tree notice of each role stays retained, and it does not follow the sleeper's
    // epoch: the sleeper says so and joins again (PROTOCOL.md §5.1, offline catch-up).
    let mut o = other.spawn(&["subscribe", "--group", GROUP, "--count", "1"]);
    o.wait_stderr("joined");
    let e1 = cluster.wait_epoch_after(GROUP, e0);
    drop(o);
    cluster.admin(&["group", "deny", GROUP, "sub-other", "--role", "sub"]);
    let e2 = cluster.wait_epoch_after(GROUP, e1);
    cluster.admin(&["group", "rekey", GROUP]);
    let e3 = cluster.wait_epoch_after(GROUP, e2);
    assert!(e3 >= e0 + 3);

    let mut s = sleeper.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "2"]);
    s.wait_epoch(e3);
    s.wait_stderr("missed an epoch of");
    publisher.publish(GROUP, 2, "after-two");
    publisher.publish(GROUP, 3, "after-three");
    assert_eq!(payloads(s), ["after-two", "after-three"]);
    assert_eq!(stored_epoch(&sleeper), e3);
}

#[test]
fn periodic_rekeys_under_traffic_lose_nothing() {
    let cluster = Cluster::start(&["plant/#"]);
    cluster.admin(&["group", "create", GROUP, "--rekey-interval", "1"]);
    let publisher = cluster.enrolled("pub-1", &[(GROUP, "pub")]);
    let subscriber = cluster.enrolled("sub-1", &[(GROUP, "sub")]);

    let count = 12;
    let mut sub = subscriber.spawn(&[
        "subscribe",
        "--group",
        GROUP,
        "--json",
        "--count",
        &count.to_string(),
    ]);
    sub.wait_stderr("joined");
    let e0 = cluster.epoch(GROUP);
    let publishing = publisher.spawn(&[
        "publish",
        "--group",
        GROUP,
        "--option",
        "2",
        "--every",
        "400ms",
        "--command",
        "date +%s%N",
        "--count",
        &count.to_string(),
    ]);
    let finished = sub.wait();
    let lines = finished.json_lines();
    assert_eq!(lines.len(), count, "{}", finished.stderr);
    publishing.wait().success();
    let mut epochs: Vec<u64> = lines.iter().map(|l| l["epoch"].as_u64().unwrap()).collect();
    epochs.dedup();
    assert!(
        epochs.len() >= 2 && epochs[0] >= e0,
        "the traffic spans periodic rekeys: {epochs:?}"
    );
    let warnings: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|l| l.contains("WARN"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}");
    // The key store follows the CA.
    let stored = stored_epoch(&subscriber);
    assert!(stored >= *epochs.last().unwrap());
    assert!(stored <= cluster.epoch(GROUP));
}

/// A subscriber that stays up, a publisher, and a sniffer on the broker.
struct Scene {
    cluster: Cluster,
    publisher: Node,
    subscriber: Node,
}

impl Scene {
    fn new() -> Self {
        let cluster = Cluster::start(&["plant/#"]);
        cluster.create_group(GROUP);
        let publisher = cluster.enrolled("pub-1", &[(GROUP, "pub")]);
        let subscriber = cluster.enrolled("sub-1", &[(GROUP, "sub")]);
        Scene {
            cluster,
            publisher,
            subscriber,
        }
    }

    /// After a restart: a rekey the subscriber follows, option-2 and option-3 messages
    /// received, and the same epoch in the CA and the subscriber's key store.
    fn flows_again(&self, sub: &mut Proc) {
        let e = self.cluster.epoch(GROUP);
        self.cluster.admin(&["group", "rekey", GROUP]);
        let e = self.cluster.wait_epoch_after(GROUP, e);
        sub.wait_epoch(e);
        self.publisher.publish(GROUP, 2, "after-two");
        self.publisher.publish(GROUP, 3, "after-three");
    }
}

#[test]
fn ca_restart_keeps_groups_and_keys() {
    let mut scene = Scene::new();
    let mut sub =
        scene
            .subscriber
            .spawn_debug(&["subscribe", "--group", GROUP, "--json", "--count", "4"]);
    sub.wait_stderr("joined");
    scene.publisher.publish(GROUP, 2, "before");
    let e0 = scene.cluster.epoch(GROUP);

    scene.cluster.restart_ca();
    assert_eq!(
        scene.cluster.epoch(GROUP),
        e0,
        "the epoch survives a restart"
    );
    // A new member after the restart: the CA rekeys from its stored state.
    let late = scene.cluster.enrolled("sub-late", &[(GROUP, "sub")]);
    let mut l = late.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "2"]);
    l.wait_stderr("joined");
    scene.flows_again(&mut sub);
    scene.publisher.publish(GROUP, 2, "last");
    assert_eq!(payloads(l), ["after-two", "after-three"]);
    assert_eq!(
        payloads(sub),
        ["before", "after-two", "after-three", "last"]
    );
    assert_eq!(stored_epoch(&scene.subscriber), scene.cluster.epoch(GROUP));
}

#[test]
fn bridge_restart_reconnects_devices_and_still_refuses_replays() {
    let mut scene = Scene::new();
    let sniffer = RawMqtt::sniff(scene.cluster.broker);
    let mut sub =
        scene
            .subscriber
            .spawn_debug(&["subscribe", "--group", GROUP, "--json", "--count", "3"]);
    sub.wait_stderr("joined");
    scene.publisher.publish(GROUP, 2, "before");
    let captured = sniffer.wait_count(GROUP, 1)[0].payload.clone();
    sub.wait_stdout("before");

    scene.cluster.restart_bridge();
    // The subscriber reconnects and joins again by itself.
    sub.wait_stderr_count("joined", 2);

    // The captured message, replayed within its time window: straight into the broker, the
    // subscriber refuses it (its replay cache outlived the bridge).
    let direct = RawMqtt::connect(scene.cluster.broker);
    assert!(direct.publish(GROUP, &captured) < 0x80);
    sub.wait_stderr("reason=message rejected: replayed message");

    scene.flows_again(&mut sub);
    assert_eq!(payloads(sub), ["before", "after-two", "after-three"]);
    assert_eq!(stored_epoch(&scene.subscriber), scene.cluster.epoch(GROUP));
}

#[test]
fn mosquitto_restart_loses_retained_state_but_not_the_group() {
    let mut scene = Scene::new();
    let mut sub =
        scene
            .subscriber
            .spawn_debug(&["subscribe", "--group", GROUP, "--json", "--count", "3"]);
    sub.wait_stderr("joined");
    scene.publisher.publish(GROUP, 2, "before");
    sub.wait_stdout("before");

    // Mosquitto keeps nothing (no persistence): retained notices and member lists are gone.
    scene.cluster.restart_mosquitto();
    sub.wait_stderr_count("joined", 2);
    scene.flows_again(&mut sub);
    sub.wait_stdout("after-three");
    let warnings = dropped_warnings(&sub);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(payloads(sub), ["before", "after-two", "after-three"]);
    assert_eq!(stored_epoch(&scene.subscriber), scene.cluster.epoch(GROUP));

    // A device joining after the restart gets what it needs from the bridge again.
    let late = scene.cluster.enrolled("sub-late", &[(GROUP, "sub")]);
    let mut l = late.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "1"]);
    l.wait_stderr("joined");
    let e = scene.cluster.epoch(GROUP);
    l.wait_epoch(e);
    scene.publisher.publish(GROUP, 2, "for-the-late-one");
    assert_eq!(payloads(l), ["for-the-late-one"]);
}
