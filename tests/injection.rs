//! Injected traffic: forged, replayed, tampered and stale messages, and publishers that lost
//! their right to publish, both straight into Mosquitto (the subscribers must reject them) and
//! through the bridge (which must drop them before the broker sees them).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use quva_tests::offline::{self, Observed, forge};
use quva_tests::raw::{Captured, RawMqtt};
use quva_tests::{Cluster, Node, Proc};

const GROUP: &str = "plant/inject/temp";

fn now() -> u64 {
    quva_node::now_ms()
}

/// The subscriber's "dropped" log lines about `topic`.
fn drops(sub: &Proc, topic: &str) -> Vec<String> {
    let needle = format!("dropped topic={topic} ");
    sub.err()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_owned)
        .collect()
}

/// Waits until the subscriber has logged at least `n` drops about `topic`.
fn wait_drops(sub: &mut Proc, topic: &str, n: usize) {
    let deadline = std::time::Instant::now() + quva_tests::STEP_TIMEOUT;
    while drops(sub, topic).len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} drops of {n} on {topic}:\nstdout:\n{}\nstderr:\n{}",
            drops(sub, topic).len(),
            sub.out(),
            sub.err()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn flip(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at] ^= 0x01;
    b
}

/// Attack payloads on the data topic: (what, bytes, the subscriber's drop reason).
fn attacks(
    publisher: &Node,
    mallory: &Node,
    legit: &[u8],
    variant: usize,
    epoch: u32,
    observed: &Observed,
) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let q_p = observed.epochs.values().next_back().unwrap().q_p;
    let pub_creds = offline::credentials(&publisher.store);
    let mal_creds = offline::credentials(&mallory.store);
    let t = now();
    let text = format!("injected-{variant}");
    vec![
        (
            "option 2 claiming pub-1, signed by mallory",
            forge(
                &mal_creds,
                "pub-1",
                GROUP,
                epoch,
                t,
                2,
                &q_p,
                mal_creds.key(),
                &text,
            ),
            "bad signature",
        ),
        (
            "option 3 with an outer signature by a non-member",
            forge(
                &mal_creds,
                "pub-1",
                GROUP,
                epoch,
                t,
                3,
                &q_p,
                mal_creds.key(),
                &text,
            ),
            "bad signature",
        ),
        (
            "option 1 by a device outside the group",
            forge(
                &mal_creds,
                "mallory",
                GROUP,
                epoch,
                t,
                1,
                &q_p,
                mal_creds.key(),
                &text,
            ),
            "unknown sender",
        ),
        (
            "tampered ciphertext",
            flip(legit, legit.len() - 80 - variant),
            "bad signature",
        ),
        (
            "tampered signature",
            flip(legit, legit.len() - 2 - variant),
            "bad signature",
        ),
        (
            "stale timestamp (correctly signed)",
            forge(
                &pub_creds,
                "pub-1",
                GROUP,
                epoch,
                t - 600_000,
                2,
                &q_p,
                pub_creds.key(),
                &text,
            ),
            "stale timestamp",
        ),
        (
            "future timestamp (correctly signed)",
            forge(
                &pub_creds,
                "pub-1",
                GROUP,
                epoch,
                t + 600_000,
                2,
                &q_p,
                pub_creds.key(),
                &text,
            ),
            "timestamp in the future",
        ),
        (
            "garbage",
            format!("not a quva message {variant}").into_bytes(),
            "malformed",
        ),
    ]
}

#[test]
fn forged_replayed_tampered_and_stale_messages_are_rejected() {
    let cluster = Cluster::start(&["plant/#"]);
    cluster.create_group(GROUP);
    let publisher = cluster.enrolled("pub-1", &[(GROUP, "pub")]);
    let subscriber = cluster.enrolled("sub-1", &[(GROUP, "sub")]);
    // Enrolled, but in no group.
    let mallory = cluster.enrolled("mallory", &[]);
    let sniffer = RawMqtt::sniff(cluster.broker);

    let mut sub =
        subscriber.spawn_debug(&["subscribe", "--group", GROUP, "--json", "--count", "2"]);
    sub.wait_stderr("joined");
    publisher.publish(GROUP, 2, "legit-before");
    let legit = sniffer.wait_count(GROUP, 1)[0].payload.clone();
    sub.wait_stdout("legit-before");

    let epoch = u32::try_from(cluster.epoch(GROUP)).unwrap();
    let q_ca = offline::ca_public(&subscriber.store);
    let observed = Observed::from_captured(&sniffer.received(), GROUP, &q_ca);

    // Straight into Mosquitto: the broker takes everything; the subscriber rejects each.
    let direct = RawMqtt::connect(cluster.broker);
    let mut injected = attacks(&publisher, &mallory, &legit, 0, epoch, &observed);
    injected.push(("replayed", legit.clone(), "replayed message"));
    for (what, bytes, _) in &injected {
        assert!(direct.publish(GROUP, bytes) < 0x80, "{what}");
    }
    wait_drops(&mut sub, GROUP, injected.len());
    let dropped = drops(&sub, GROUP);
    for (what, _, reason) in &injected {
        assert!(
            dropped.iter().any(|l| l.contains(reason)),
            "{what}: no drop for {reason:?} in\n{}",
            dropped.join("\n")
        );
    }
    // Forged key material on the key and certificate topics is rejected too.
    let key_topic = format!("quva/k/{GROUP}/sub");
    let certs_topic = format!("quva/c/{GROUP}");
    assert!(direct.publish(&key_topic, b"\x01\x01\x02forged notice") < 0x80);
    assert!(direct.publish(&certs_topic, &flip(&legit, 5)) < 0x80);
    wait_drops(&mut sub, &key_topic, 1);
    wait_drops(&mut sub, &certs_topic, 1);

    // Through the bridge: every attack is refused with a PUBACK error and never reaches the
    // broker. Forgeries come over mallory's own connection, the rest over the publisher's.
    let as_mallory = RawMqtt::connect_device(cluster.bridge, &mallory.store);
    let as_publisher = RawMqtt::connect_device(cluster.bridge, &publisher.store);
    let unauthenticated = RawMqtt::connect(cluster.bridge);
    let mut via_bridge = attacks(&publisher, &mallory, &legit, 1, epoch, &observed);
    via_bridge.push(("replayed", legit.clone(), ""));
    for (i, (what, bytes, _)) in via_bridge.iter().enumerate() {
        let conn = if i < 3 { &as_mallory } else { &as_publisher };
        let code = conn.publish(GROUP, bytes);
        assert!(
            code >= 0x80,
            "the bridge accepted {what} (PUBACK 0x{code:02x})"
        );
        let code = unauthenticated.publish(GROUP, bytes);
        assert!(code >= 0x80, "the bridge accepted {what} unauthenticated");
    }
    for topic in [&key_topic, &certs_topic] {
        let code = as_publisher.publish(topic, &legit);
        assert!(code >= 0x80, "a device published on {topic}");
    }

    publisher.publish(GROUP, 2, "legit-after");
    let lines = sub.wait().json_lines();
    let read: Vec<&str> = lines.iter().filter_map(|l| l["payload"].as_str()).collect();
    assert_eq!(read, ["legit-before", "legit-after"]);

    // What reached the broker: the two legitimate messages and the direct injections only.
    let seen: Vec<Captured> = sniffer
        .received()
        .into_iter()
        .filter(|c| c.topic == GROUP)
        .collect();
    assert_eq!(seen.len(), 2 + injected.len(), "{seen:?}");
    for (what, bytes, _) in &via_bridge {
        let n = seen.iter().filter(|c| &c.payload == bytes).count();
        let direct_copies = injected.iter().filter(|(_, b, _)| b == bytes).count();
        let legit_copies = usize::from(*bytes == legit);
        assert_eq!(
            n,
            direct_copies + legit_copies,
            "{what} went through the bridge"
        );
    }
}

/// Waits until neither device is a joined member of the group any more and every process has
/// followed the rekey; returns the epoch.
fn wait_removed(cluster: &Cluster, gone: &[&str], procs: &[&Proc]) -> u64 {
    let deadline = std::time::Instant::now() + quva_tests::STEP_TIMEOUT;
    loop {
        let v = cluster.admin(&["group", "show", GROUP]);
        let members = v["members"].as_array().cloned().unwrap_or_default();
        let listed = members.iter().any(|m| {
            gone.iter().any(|g| m["device"] == *g) && m["joined"].as_bool().unwrap_or(true)
        });
        let epoch = v["epoch"].as_u64().unwrap();
        if !listed && procs.iter().all(|p| p.holds_epoch(epoch)) {
            return epoch;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{gone:?} still members or the rekey to {epoch} not followed: {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn denied_and_revoked_publishers_are_dropped() {
    let cluster = Cluster::start(&["plant/#"]);
    cluster.create_group(GROUP);
    let good = cluster.enrolled("pub-good", &[(GROUP, "pub")]);
    let denied = cluster.enrolled("pub-denied", &[(GROUP, "pub")]);
    let revoked = cluster.enrolled("pub-revoked", &[(GROUP, "pub")]);
    let readers = [
        cluster.enrolled("sub-1", &[(GROUP, "sub")]),
        cluster.enrolled("sub-2", &[(GROUP, "sub")]),
    ];
    let sniffer = RawMqtt::sniff(cluster.broker);
    let mut subs: Vec<Proc> = readers
        .iter()
        .map(|r| r.spawn_debug(&["subscribe", "--group", GROUP, "--json", "--count", "4"]))
        .collect();
    for s in &mut subs {
        s.wait_stderr("joined");
    }
    good.publish(GROUP, 2, "control-pub-good");
    let q_ca = offline::ca_public(&good.store);

    let mut via_bridge = Vec::new();
    let mut injected = Vec::new();
    let direct = RawMqtt::connect(cluster.broker);
    let removals: [(&Node, Vec<&str>); 2] = [
        (
            &denied,
            vec!["group", "deny", GROUP, "pub-denied", "--role", "pub"],
        ),
        (&revoked, vec!["device", "revoke", "pub-revoked"]),
    ];
    for (node, removal) in removals {
        // Control: while allowed, the publisher reaches both subscribers (and stores the key
        // of the current epoch).
        let control = format!("control-{}", node.id);
        node.publish(GROUP, 2, &control);
        for s in &mut subs {
            s.wait_stdout(&control);
        }
        let e0 = u32::try_from(cluster.epoch(GROUP)).unwrap();
        cluster.admin(&removal);
        let e1 = wait_removed(&cluster, &[&node.id], &subs.iter().collect::<Vec<_>>());
        let e1 = u32::try_from(e1).unwrap();
        let observed = Observed::from_captured(&sniffer.received(), GROUP, &q_ca);
        let q_p_new = observed.epochs[&quva_client::ids::Epoch(e1)].q_p;

        // What the former publisher can make with its key store: messages of its stored
        // epoch (still within the subscribers' grace period) with its keys, and of the new
        // epoch with the public key from the broker.
        let creds = offline::credentials(&node.store);
        let stored = offline::group_keys(&node.store);
        let old = stored.first().expect("a stored group key");
        let old_key = offline::held_key(old);
        let info = old.signed_info.info_unverified();
        assert_eq!(info.epoch.0, e0);
        let id = node.id.as_str();
        let mut forged = Vec::new();
        for (epoch, q_p, options) in [(e0, &info.q_p, &[1, 2, 3][..]), (e1, &q_p_new, &[1, 2])] {
            for option in options {
                let text = format!("{id}-epoch-{epoch}-option-{option}");
                let bytes = forge(
                    &creds,
                    id,
                    GROUP,
                    epoch,
                    now(),
                    *option,
                    q_p,
                    &old_key,
                    &text,
                );
                forged.push((text, *option, bytes));
            }
        }

        // Through the bridge: the denied publisher still connects, but its messages are
        // dropped; the revoked one cannot connect at all. (An option-3 message proves only
        // "a publisher of the epoch": the bridge cannot tell who sent it, the subscribers'
        // inner check must.)
        match RawMqtt::try_connect_device(cluster.bridge, &node.store) {
            Ok(conn) => {
                assert_eq!(id, "pub-denied", "a revoked device connected");
                for (text, option, bytes) in &forged {
                    let again = forge(&creds, id, GROUP, e1, now(), 1, &q_p_new, &old_key, text);
                    for b in [bytes, &again] {
                        if *option == 3 && b == bytes {
                            continue;
                        }
                        let code = conn.publish(GROUP, b);
                        assert!(code >= 0x80, "the bridge accepted {text} (0x{code:02x})");
                        if b == &again {
                            // Sent only through the bridge (the others also go in directly).
                            via_bridge.push(b.clone());
                        }
                    }
                }
            }
            Err(e) => assert_eq!(id, "pub-revoked", "{id} refused: {e}"),
        }
        // The command-line device is refused too.
        let out = node.run(&["publish", "--group", GROUP, "--option", "2", "cli-after"]);
        assert!(!out.status.success(), "{id} published:\n{}", out.stderr);

        // Straight into Mosquitto: every subscriber drops all of them.
        for (_, _, bytes) in &forged {
            assert!(direct.publish(GROUP, bytes) < 0x80);
            injected.push(bytes.clone());
        }
        for s in &mut subs {
            wait_drops(s, GROUP, injected.len());
            let drops = drops(s, GROUP);
            assert!(
                drops.iter().all(|l| l.contains("not a member")
                    || l.contains("wrong epoch")
                    || l.contains("unknown sender")),
                "{drops:?}"
            );
        }
    }

    good.publish(GROUP, 2, "after-removal");
    for s in subs {
        let lines = s.wait().json_lines();
        let read: Vec<&str> = lines.iter().filter_map(|l| l["payload"].as_str()).collect();
        assert_eq!(
            read,
            [
                "control-pub-good",
                "control-pub-denied",
                "control-pub-revoked",
                "after-removal"
            ]
        );
    }
    let seen: Vec<Captured> = sniffer
        .received()
        .into_iter()
        .filter(|c| c.topic == GROUP)
        .collect();
    for bytes in &via_bridge {
        assert!(
            !seen.iter().any(|c| &c.payload == bytes),
            "the bridge let a message through"
        );
    }
    assert_eq!(
        seen.len(),
        3 + injected.len() + 1,
        "only the direct injections went past the bridge"
    );
}
