//! End to end: Mosquitto, quva-ca, quva-bridge and quva-node devices as real processes.
//!
//! One publisher and one subscriber enroll through the bridge, join a group, and exchange
//! messages of options 1, 2 and 3 in both directions (data and query/answer); a second subscriber
//! joining rekeys the group while the first keeps receiving; refusals come back as clear errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use quva_tests::Cluster;

const GROUP: &str = "plant/line-1/temp";

fn ready(p: &mut quva_tests::Proc) {
    // quva-node logs "joined" (info, -v) once its key is held and its traffic subscribed.
    p.wait_stderr("joined");
}

#[test]
fn options_one_to_three_end_to_end() {
    let mut cluster = Cluster::start(&["plant/#"]);
    let pub_secret = cluster.register("pub-1");
    let sub_secret = cluster.register("sub-1");
    cluster.create_group(GROUP);
    cluster.allow(GROUP, "pub-1", "pub");
    cluster.allow(GROUP, "sub-1", "sub");

    let publisher = cluster.node("pub-1");
    let subscriber = cluster.node("sub-1");
    let out = publisher.enroll(&pub_secret).success();
    assert!(out.contains("enrolled pub-1"), "{out}");
    subscriber.enroll(&sub_secret).success();
    // The secret is spent by the first enrollment.
    let err = cluster.node("pub-1-again").enroll(&pub_secret).failure();
    assert!(err.contains("0x87") || err.contains("refused"), "{err}");

    // Forward traffic: the subscriber prints six messages (three before and three after a rekey).
    let mut sub = subscriber.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "6"]);
    ready(&mut sub);
    for option in ["1", "2", "3"] {
        let text = format!("21.{option} C");
        publisher
            .run(&["publish", "--group", GROUP, "--option", option, &text])
            .success();
    }

    // A second subscriber joins: the group rekeys, and the first subscriber follows the notice.
    let late_secret = cluster.register("sub-2");
    cluster.allow(GROUP, "sub-2", "sub");
    let late = cluster.node("sub-2");
    late.enroll(&late_secret).success();
    let mut sub2 = late.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "3"]);
    ready(&mut sub2);
    sub.wait_stderr("rekeyed");
    for option in ["1", "2", "3"] {
        let text = format!("after rekey {option}");
        publisher
            .run(&["publish", "--group", GROUP, "--option", option, &text])
            .success();
    }

    let first = sub.wait();
    let lines = first.json_lines();
    assert_eq!(
        lines.len(),
        6,
        "{}\n{}",
        first.stderr,
        cluster.daemon_logs()
    );
    for (i, line) in lines.iter().enumerate() {
        let option = (i % 3 + 1) as u64;
        assert_eq!(line["group"], GROUP);
        assert_eq!(line["option"], option);
        assert_eq!(line["sender"], "pub-1");
        assert_eq!(line["direction"], "forward");
        assert_eq!(line["anonymous"], option == 3);
        let want = if i < 3 {
            format!("21.{option} C")
        } else {
            format!("after rekey {option}")
        };
        assert_eq!(line["payload"], want.as_str());
    }
    let e1 = lines[0]["epoch"].as_u64().unwrap();
    let e2 = lines[5]["epoch"].as_u64().unwrap();
    assert!(e2 > e1, "the second subscriber's join rekeyed the group");
    let second = sub2.wait().json_lines();
    assert_eq!(second.len(), 3);
    assert_eq!(second[2]["payload"], "after rekey 3");

    // Query direction: the publisher answers each subscriber query with its own option.
    let mut answer = publisher.spawn(&[
        "answer", "--group", GROUP, "--reply", "pong", "--count", "3", "--json",
    ]);
    ready(&mut answer);
    for option in ["1", "2", "3"] {
        let reply = subscriber.run(&[
            "query",
            "--group",
            GROUP,
            "--option",
            option,
            "--count",
            "1",
            "--wait",
            "20s",
            "--json",
            &format!("ping {option}"),
        ]);
        let replies = reply.json_lines();
        assert_eq!(replies.len(), 1, "{}", reply.stderr);
        assert_eq!(replies[0]["payload"], "pong");
        assert_eq!(replies[0]["sender"], "pub-1");
        assert_eq!(replies[0]["option"], option.parse::<u64>().unwrap());
    }
    let answered = answer.wait().json_lines();
    assert_eq!(answered.len(), 3);
    for (i, q) in answered.iter().enumerate() {
        assert_eq!(q["direction"], "query");
        assert_eq!(q["sender"], "sub-1");
        assert_eq!(q["payload"], format!("ping {}", i + 1).as_str());
    }

    // Status shows the certificate and the stored group key with its epoch.
    let status = subscriber.run(&["status", "--json"]).success();
    let v: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(v["device"], "sub-1");
    assert_eq!(v["certificate"]["state"], "valid");
    assert_eq!(v["groups"][0]["group"], GROUP);
    assert_eq!(v["groups"][0]["role"], "subscriber");
    assert!(v["groups"][0]["epoch"].as_u64().unwrap() >= e2);

    // Refusals are explained: a subscriber may not publish, an unknown group is refused.
    let err = subscriber
        .run(&["publish", "--group", GROUP, "--option", "1", "x"])
        .failure();
    assert!(
        err.contains("0x87") && err.contains("not authorized"),
        "{err}"
    );
    let err = publisher
        .run(&["publish", "--group", "plant/other", "--option", "1", "x"])
        .failure();
    assert!(err.contains("0x87"), "{err}");

    // A revoked device is refused at CONNECT.
    cluster.admin(&["device", "revoke", "sub-2"]);
    let err = late
        .run(&["subscribe", "--group", GROUP, "--count", "1"])
        .failure();
    assert!(err.contains("0x87"), "{err}");
    assert!(cluster.alive(), "{}", cluster.daemon_logs());

    // Without the CA: enrollment is refused with 0x88; a device with a stored group key keeps
    // publishing under it (resumed: the CA is not asked).
    let spare_secret = cluster.register("spare-1");
    cluster.stop_ca();
    let err = cluster.node("spare-1").enroll(&spare_secret).failure();
    assert!(err.contains("0x88") && err.contains("CA"), "{err}");
    let done = publisher.run(&["publish", "--group", GROUP, "--option", "2", "no CA"]);
    assert!(
        done.stderr.contains("resumed with the held key"),
        "{}",
        done.stderr
    );
    done.success();
}

#[test]
fn a_denied_subscriber_stops_with_a_clear_error() {
    let cluster = Cluster::start(&["plant/#"]);
    cluster.create_group(GROUP);
    let subscriber = cluster.enrolled("sub-1", &[(GROUP, "sub")]);
    let _other = cluster.enrolled("sub-2", &[(GROUP, "sub")]);
    let mut sub = subscriber.spawn(&["subscribe", "--group", GROUP]);
    ready(&mut sub);
    cluster.admin(&["group", "deny", GROUP, "sub-1", "--role", "sub"]);
    // `subscribe` ends with an error instead of waiting for keys that will not come: either the
    // member list of the next epoch no longer names it, or the bridge ended its session at the
    // removal (PROTOCOL.md §8) and the subscription is refused when it reconnects.
    let err = sub.wait().failure();
    assert!(
        err.contains(&format!("removed from {GROUP} as subscriber"))
            || err.contains(&format!("subscription to {GROUP} refused with reason 0x87")),
        "{err}\n{}",
        cluster.daemon_logs()
    );
}
