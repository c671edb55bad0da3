//! What the broker and former or future members can learn.
//!
//! - A raw subscriber to `#` on Mosquitto sees option-1 plaintext (the control) but no plaintext
//!   of options 2 and 3, and no sender identity (ID, certificate, Q_i or G_i) in option 3.
//! - Forward secrecy: a subscriber denied its role cannot read what is published after the
//!   rekey, with its key store and every byte the broker handled.
//! - Backward secrecy: a subscriber that joins cannot read what was published before, likewise.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use quva_client::codec::Encode;
use quva_client::ids::Role;
use quva_client::message::{Rejection, UnverifiedMessage};
use quva_tests::Cluster;
use quva_tests::offline::{self, Observed, feed_device, try_open};
use quva_tests::raw::{Captured, RawMqtt};

const GROUP: &str = "plant/secrecy/temp";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The option of a captured data message (the header's kind byte).
fn option_of(c: &Captured) -> u8 {
    UnverifiedMessage::decode(&c.payload)
        .unwrap()
        .header()
        .protection
        .number()
}

fn epoch_of(c: &Captured) -> u32 {
    UnverifiedMessage::decode(&c.payload)
        .unwrap()
        .header()
        .epoch
        .0
}

#[test]
fn broker_sees_no_plaintext_of_options_two_and_three_and_no_sender_in_option_three() {
    let cluster = Cluster::start(&["plant/#"]);
    cluster.create_group(GROUP);
    // A distinctive ID, so that finding it by chance in random bytes is out of the question.
    let sender_id = "sender-7f3a9c";
    let publisher = cluster.enrolled(sender_id, &[(GROUP, "pub")]);
    let subscriber = cluster.enrolled("reader-1", &[(GROUP, "sub")]);
    let sniffer = RawMqtt::sniff(cluster.broker);

    let mut sub = subscriber.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "3"]);
    sub.wait_stderr("joined");
    let texts = [
        "visible-one-5d1e",
        "confidential-two-8b4f",
        "anonymous-three-2c7a",
    ];
    for (i, text) in texts.iter().enumerate() {
        publisher.publish(GROUP, i as u8 + 1, text);
    }
    let got = sub.wait().json_lines();
    assert_eq!(got.len(), 3);
    for (line, text) in got.iter().zip(texts) {
        assert_eq!(line["payload"], text, "the subscriber reads every option");
    }

    let data = sniffer.wait_count(GROUP, 3);
    let everything: Vec<u8> = sniffer
        .received()
        .iter()
        .flat_map(Captured::all_bytes)
        .collect();
    // The publisher sent them one at a time, in option order.
    assert_eq!(data.len(), 3);
    for (i, c) in data.iter().enumerate() {
        assert_eq!(
            usize::from(option_of(c)),
            i + 1,
            "sent with the option asked for"
        );
    }
    let (one, two, three) = (
        data[0].all_bytes(),
        data[1].all_bytes(),
        data[2].all_bytes(),
    );

    // The raw subscriber does see what the broker carries: option 1 is signed, not encrypted.
    assert!(contains(&one, texts[0].as_bytes()));
    // Options 2 and 3: no plaintext anywhere the broker handled (any topic, any property).
    assert!(!contains(&everything, texts[1].as_bytes()));
    assert!(!contains(&everything, texts[2].as_bytes()));

    // The sender's identity: ID, certificate, Q_i (and its x-coordinate) and G_i.
    let creds = offline::credentials(&publisher.store);
    let q_ca = offline::ca_public(&publisher.store);
    let cert = creds.cert();
    let q_i = cert.open(&q_ca).unwrap().0.to_bytes();
    let identity: Vec<(&str, Vec<u8>)> = vec![
        ("device ID", sender_id.as_bytes().to_vec()),
        ("certificate", cert.to_bytes()),
        ("Q_i", q_i.to_vec()),
        ("x(Q_i)", q_i[1..].to_vec()),
        ("G_i", cert.group_base().to_bytes().to_vec()),
        ("C", cert.public_data().to_bytes().to_vec()),
    ];
    // Option 2 names its sender by design: the search works on these payloads.
    assert!(contains(&two, sender_id.as_bytes()));
    for (what, bytes) in &identity {
        assert!(
            !contains(&three, bytes),
            "the option-3 message shows the sender's {what}"
        );
    }
}

/// Publishes an option-2 and an option-3 message with the given prefix, both received by
/// `sub` (which must run) before the next step.
fn publish_pair(publisher: &quva_tests::Node, prefix: &str) -> [String; 2] {
    let texts = [format!("{prefix}-two"), format!("{prefix}-three")];
    publisher.publish(GROUP, 2, &texts[0]);
    publisher.publish(GROUP, 3, &texts[1]);
    texts
}

/// Each captured data message's payload, with its plaintext as the publisher sent it (matched
/// by order: the publisher sent them one at a time).
fn data_messages(sniffer: &RawMqtt, sent: &[String]) -> Vec<(Captured, String)> {
    let data = sniffer.wait_count(GROUP, sent.len());
    data.into_iter().zip(sent.iter().cloned()).collect()
}

#[test]
fn denied_subscriber_cannot_read_after_the_rekey() {
    let cluster = Cluster::start(&["plant/#"]);
    cluster.create_group(GROUP);
    let publisher = cluster.enrolled("pub-1", &[(GROUP, "pub")]);
    let leaving = cluster.enrolled("sub-leaving", &[(GROUP, "sub")]);
    let staying = cluster.enrolled("sub-staying", &[(GROUP, "sub")]);
    let sniffer = RawMqtt::sniff(cluster.broker);

    let mut left = leaving.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "2"]);
    let mut stay = staying.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "4"]);
    left.wait_stderr("joined");
    stay.wait_stderr("joined");
    let before = publish_pair(&publisher, "before-deny-4e1");
    assert_eq!(left.wait().json_lines().len(), 2);
    let e0 = cluster.epoch(GROUP);

    cluster.admin(&["group", "deny", GROUP, "sub-leaving", "--role", "sub"]);
    stay.wait_stderr("rekeyed");
    let after = publish_pair(&publisher, "after-deny-9a2");
    let lines = stay.wait().json_lines();
    let read: Vec<&str> = lines.iter().filter_map(|l| l["payload"].as_str()).collect();
    assert_eq!(
        read,
        [&before[..], &after[..]].concat(),
        "members keep reading"
    );

    let sent = [&before[..], &after[..]].concat();
    let data = data_messages(&sniffer, &sent);
    for (c, text) in &data[2..] {
        assert!(
            u64::from(epoch_of(c)) > e0,
            "{text} was sealed after the rekey"
        );
    }
    let captured = sniffer.received();

    // The leaving subscriber's device, restored from its key store and fed every captured
    // byte (rekey notices for the others included): it reads the old messages, not the new.
    let replay = feed_device(&leaving.store, GROUP, Role::Subscriber, &captured);
    let accepted: Vec<String> = replay
        .messages
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    for text in &before {
        assert!(
            accepted.contains(text),
            "control: {text} opens with the old key"
        );
    }
    for text in &after {
        assert!(
            !accepted.contains(text),
            "the denied subscriber read {text}"
        );
    }
    assert!(
        replay.adopted.iter().all(|e| u64::from(*e) <= e0),
        "the denied subscriber adopted a later key: {:?}",
        replay.adopted
    );

    // With every check but the cryptography relaxed, its old d_P opens only the old messages.
    let q_ca = offline::ca_public(&leaving.store);
    let observed = Observed::from_captured(&captured, GROUP, &q_ca);
    let keys: Vec<_> = offline::group_keys(&leaving.store)
        .into_iter()
        .map(|k| offline::held_key(&k))
        .collect();
    assert!(!keys.is_empty());
    for (c, text) in &data {
        let opened = try_open(&observed, &c.payload, &keys);
        if before.contains(text) {
            assert_eq!(opened.as_deref(), Ok(text.as_bytes()), "control: {text}");
        } else {
            assert_eq!(opened, Err(Rejection::DecryptionFailed), "{text}");
        }
    }
}

#[test]
fn joining_subscriber_cannot_read_before_its_join() {
    let cluster = Cluster::start(&["plant/#"]);
    cluster.create_group(GROUP);
    let publisher = cluster.enrolled("pub-1", &[(GROUP, "pub")]);
    let first = cluster.enrolled("sub-first", &[(GROUP, "sub")]);
    let sniffer = RawMqtt::sniff(cluster.broker);

    let mut old = first.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "4"]);
    old.wait_stderr("joined");
    let before = publish_pair(&publisher, "before-join-31c");
    let e0 = cluster.epoch(GROUP);

    let joining = cluster.enrolled("sub-joining", &[(GROUP, "sub")]);
    let mut new = joining.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "2"]);
    new.wait_stderr("joined");
    old.wait_stderr("rekeyed");
    let after = publish_pair(&publisher, "after-join-c07");
    let read: Vec<String> = new
        .wait()
        .json_lines()
        .iter()
        .map(|l| l["payload"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(read, after, "the new subscriber reads from its join on");
    assert_eq!(old.wait().json_lines().len(), 4);

    let sent = [&before[..], &after[..]].concat();
    let data = data_messages(&sniffer, &sent);
    for (c, text) in &data[2..] {
        assert!(
            u64::from(epoch_of(c)) > e0,
            "{text} was sealed after the join"
        );
    }
    let captured = sniffer.received();

    let replay = feed_device(&joining.store, GROUP, Role::Subscriber, &captured);
    let accepted: Vec<String> = replay
        .messages
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    for text in &after {
        assert!(
            accepted.contains(text),
            "control: {text} opens with the new key"
        );
    }
    for text in &before {
        assert!(!accepted.contains(text), "the new subscriber read {text}");
    }

    let q_ca = offline::ca_public(&joining.store);
    let observed = Observed::from_captured(&captured, GROUP, &q_ca);
    let keys: Vec<_> = offline::group_keys(&joining.store)
        .into_iter()
        .map(|k| offline::held_key(&k))
        .collect();
    assert!(!keys.is_empty());
    for (c, text) in &data {
        let opened = try_open(&observed, &c.payload, &keys);
        if after.contains(text) {
            assert_eq!(opened.as_deref(), Ok(text.as_bytes()), "control: {text}");
        } else {
            assert_eq!(opened, Err(Rejection::DecryptionFailed), "{text}");
        }
    }
}

/// Key trees over real processes (PROTOCOL.md §5.1): a revocation, a joiner that takes the freed
/// leaf, and joins that double the subscribers' tree. Every remaining subscriber follows each
/// kind-3 notice live and reads every message; the revoked one, fed every byte the broker
/// handled, adopts nothing after its revocation and reads nothing sealed after it.
#[test]
fn tree_rekeys_reach_every_remaining_subscriber_and_no_revoked_one() {
    use quva_client::codec::Decode;
    use quva_client::rekey::tree::TreeNotice;

    let cluster = Cluster::start(&["plant/#"]);
    cluster.create_group(GROUP);
    let publisher = cluster.enrolled("pub-1", &[(GROUP, "pub")]);
    let sniffer = RawMqtt::sniff(cluster.broker);
    let key_topic = format!("quva/k/{GROUP}/sub");
    let notice_of = |epoch: u64| {
        let c = sniffer.wait_for("the subscribers' tree notice", |c| {
            c.topic == key_topic
                && TreeNotice::from_bytes(&c.payload).is_ok_and(|n| u64::from(n.epoch().0) == epoch)
        });
        TreeNotice::from_bytes(&c.payload).unwrap()
    };

    // s1, s2, s3 on leaves 0, 1, 2 of a four-leaf tree; each reads every later message.
    let counts = [
        ("s1", 4),
        ("s2", 4),
        ("s3", 0),
        ("s4", 3),
        ("s5", 2),
        ("s6", 1),
    ];
    let nodes: Vec<_> = counts
        .iter()
        .map(|(id, _)| cluster.enrolled(id, &[(GROUP, "sub")]))
        .collect();
    let spawn = |i: usize| {
        let count = counts[i].1.max(1).to_string();
        let mut p = nodes[i].spawn(&["subscribe", "--group", GROUP, "--json", "--count", &count]);
        p.wait_stderr("joined");
        p
    };
    let mut live = vec![spawn(0), spawn(1), spawn(2)];
    let mut epoch = cluster.epoch(GROUP);
    let mut sent = Vec::new();
    let step =
        |live: &mut Vec<quva_tests::Proc>, text: &str, epoch: u64, sent: &mut Vec<String>| {
            for p in live.iter_mut() {
                p.wait_epoch(epoch);
            }
            publisher.publish(GROUP, 2, text);
            sent.push(text.to_owned());
        };

    // The revocation re-draws s3's path: the notice carries wraps for the remaining holders.
    let revoked = live.remove(2);
    cluster.admin(&["device", "revoke", "s3"]);
    epoch = cluster.wait_epoch_after(GROUP, epoch);
    let revoked_at = epoch;
    drop(revoked);
    step(&mut live, "after-revoke-7d1", epoch, &mut sent);
    let n = notice_of(revoked_at);
    assert!(!n.wraps().is_empty(), "the remaining holders receive wraps");
    assert_eq!(n.width(), 4);

    // s4 takes the leaf s3 left (leaf 2); s5 the last blank one; s6 doubles the tree to 8.
    for (i, leaf, width, text) in [
        (3usize, 2u32, 4u32, "after-s4-0b3"),
        (4, 3, 4, "after-s5-5e8"),
        (5, 4, 8, "after-s6-c29"),
    ] {
        live.push(spawn(i));
        epoch = cluster.wait_epoch_after(GROUP, epoch);
        let n = notice_of(epoch);
        assert_eq!(
            n.joined_leaves(),
            &[leaf],
            "{} joins on leaf {leaf}",
            counts[i].0
        );
        assert_eq!(n.width(), width);
        step(&mut live, text, epoch, &mut sent);
    }

    // Every remaining subscriber read everything published after it joined.
    let mut wanted = vec![
        (0usize, sent.clone()),
        (1, sent.clone()),
        (3, sent[1..].to_vec()),
        (4, sent[2..].to_vec()),
        (5, sent[3..].to_vec()),
    ];
    for (p, (i, want)) in live.into_iter().zip(wanted.drain(..)) {
        let read: Vec<String> = p
            .wait()
            .json_lines()
            .iter()
            .map(|l| l["payload"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            read, want,
            "{} reads every message since its join",
            counts[i].0
        );
    }

    // The revoked subscriber, restored from its key store and fed every captured byte.
    let captured = sniffer.received();
    let replay = feed_device(&nodes[2].store, GROUP, Role::Subscriber, &captured);
    let accepted: Vec<String> = replay
        .messages
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    for text in &sent {
        assert!(
            !accepted.contains(text),
            "the revoked subscriber read {text}"
        );
    }
    assert!(
        replay.adopted.iter().all(|e| u64::from(*e) < revoked_at),
        "the revoked subscriber adopted a later key: {:?}",
        replay.adopted
    );
}

/// One epoch that batches a departure and four joins (PROTOCOL.md §5.1 change order): the
/// departure blanks leaf 1, the joiners take it and then double the tree twice (2 → 4 → 8).
/// The remaining subscriber follows the one notice; the joiners read from their join; the
/// departed subscriber reads nothing later.
#[test]
fn one_epoch_batches_a_departure_and_joins_that_double_the_tree_twice() {
    use quva_client::codec::Decode;
    use quva_client::rekey::tree::TreeNotice;
    use quva_tests::Options;

    // Long enough for five changes to arrive together, shorter than the bridge's CA timeout.
    let options = Options {
        ca_flags: vec!["--batch-window-ms".into(), "1500".into()],
        ..Options::default()
    };
    let cluster = Cluster::start_with(&["plant/#"], &options);
    cluster.create_group(GROUP);
    let publisher = cluster.enrolled("pub-1", &[(GROUP, "pub")]);
    let ids = ["s1", "s2", "s3", "s4", "s5", "s6"];
    let nodes: Vec<_> = ids
        .iter()
        .map(|id| cluster.enrolled(id, &[(GROUP, "sub")]))
        .collect();
    let sniffer = RawMqtt::sniff(cluster.broker);
    let subscribe = |i: usize, count: &str| {
        nodes[i].spawn(&["subscribe", "--group", GROUP, "--json", "--count", count])
    };
    let mut s1 = subscribe(0, "2");
    s1.wait_stderr("joined");
    let mut s2 = subscribe(1, "1");
    s2.wait_stderr("joined");
    s1.wait_stderr("rekeyed");
    publisher.publish(GROUP, 2, "before-batch-1f4");
    assert_eq!(s2.wait().json_lines().len(), 1);
    let e0 = cluster.epoch(GROUP);

    // Four joins and a departure inside one batching window.
    let mut joiners: Vec<_> = (2..6).map(|i| subscribe(i, "1")).collect();
    cluster.admin(&["group", "deny", GROUP, "s2", "--role", "sub"]);
    for j in &mut joiners {
        j.wait_stderr("joined");
    }
    let e1 = cluster.epoch(GROUP);
    assert_eq!(e1, e0 + 1, "one epoch for the whole batch");
    let key_topic = format!("quva/k/{GROUP}/sub");
    let c = sniffer.wait_for("the batch's tree notice", |c| {
        c.topic == key_topic
            && TreeNotice::from_bytes(&c.payload).is_ok_and(|n| u64::from(n.epoch().0) == e1)
    });
    let notice = TreeNotice::from_bytes(&c.payload).unwrap();
    assert_eq!(notice.joined_leaves(), &[1, 2, 3, 4]);
    assert_eq!(notice.width(), 8);
    assert!(!notice.wraps().is_empty(), "s1 receives wraps");

    s1.wait_epoch(e1);
    publisher.publish(GROUP, 2, "after-batch-93a");
    let read = |p: quva_tests::Proc| -> Vec<String> {
        p.wait()
            .json_lines()
            .iter()
            .map(|l| l["payload"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(read(s1), ["before-batch-1f4", "after-batch-93a"]);
    for j in joiners {
        assert_eq!(read(j), ["after-batch-93a"]);
    }

    let captured = sniffer.received();
    let replay = feed_device(&nodes[1].store, GROUP, Role::Subscriber, &captured);
    let accepted: Vec<String> = replay
        .messages
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    assert!(accepted.contains(&"before-batch-1f4".to_owned()), "control");
    assert!(
        !accepted.contains(&"after-batch-93a".to_owned()),
        "s2 read after its departure"
    );
    assert!(replay.adopted.iter().all(|e| u64::from(*e) < e1));
}
