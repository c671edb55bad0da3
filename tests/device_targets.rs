//! A device built for another target (a Raspberry Pi binary run under qemu-user by
//! `scripts/cross-test.sh`) against host devices, through the real Mosquitto, quva-ca and
//! quva-bridge on loopback.
//!
//! `QUVA_DEVICE_NODE` names the device's `quva-node` command (an executable, e.g. a wrapper that
//! runs the aarch64 binary under `qemu-aarch64`); without it the host binary plays the device, so
//! the test still checks the same exchanges. The device enrolls, joins a group as publisher and
//! another as subscriber, and exchanges option 2 and option 3 messages with host devices in both
//! directions, data and query/answer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::PathBuf;

use quva_tests::{Cluster, Node, Proc};

/// The device publishes here; the host subscribes.
const UP: &str = "plant/pi/temp";
/// The host publishes here; the device subscribes.
const DOWN: &str = "plant/pi/cmd";

fn device(cluster: &Cluster, id: &str) -> Node {
    let mut node = cluster.node(id);
    if let Some(bin) = std::env::var_os("QUVA_DEVICE_NODE") {
        node.bin = PathBuf::from(bin);
    }
    eprintln!("device binary: {}", node.bin.display());
    node
}

fn ready(p: &mut Proc) {
    p.wait_stderr("joined");
}

#[test]
fn device_binary_exchanges_options_two_and_three_with_host_devices() {
    let cluster = Cluster::start(&["plant/#"]);
    cluster.create_group(UP);
    cluster.create_group(DOWN);
    let pi_secret = cluster.register("pi-1");
    cluster.allow(UP, "pi-1", "pub");
    cluster.allow(DOWN, "pi-1", "sub");
    let host = cluster.enrolled("host-1", &[(UP, "sub"), (DOWN, "pub")]);

    let pi = device(&cluster, "pi-1");
    let out = pi.enroll(&pi_secret).success();
    assert!(out.contains("enrolled pi-1"), "{out}");

    // Device to host: options 2 and 3 on the data topic.
    let mut host_sub = host.spawn(&["subscribe", "--group", UP, "--json", "--count", "2"]);
    ready(&mut host_sub);
    pi.run(&["publish", "--group", UP, "--option", "2", "48.3"])
        .success();
    pi.run(&["publish", "--group", UP, "--option", "3", "48.4"])
        .success();
    let got = host_sub.wait();
    let lines = got.json_lines();
    assert_eq!(lines.len(), 2, "{}\n{}", got.stderr, cluster.daemon_logs());
    assert_eq!(lines[0]["option"], 2);
    assert_eq!(lines[0]["sender"], "pi-1");
    assert_eq!(lines[0]["payload"], "48.3");
    assert_eq!(lines[1]["option"], 3);
    assert_eq!(lines[1]["anonymous"], true);
    assert_eq!(lines[1]["payload"], "48.4");

    // Host to device: options 2 and 3, the device as subscriber.
    let mut pi_sub = pi.spawn(&["subscribe", "--group", DOWN, "--json", "--count", "2"]);
    ready(&mut pi_sub);
    host.run(&["publish", "--group", DOWN, "--option", "2", "fan on"])
        .success();
    host.run(&["publish", "--group", DOWN, "--option", "3", "fan off"])
        .success();
    let got = pi_sub.wait();
    let lines = got.json_lines();
    assert_eq!(lines.len(), 2, "{}\n{}", got.stderr, cluster.daemon_logs());
    assert_eq!(lines[0]["option"], 2);
    assert_eq!(lines[0]["sender"], "host-1");
    assert_eq!(lines[0]["payload"], "fan on");
    assert_eq!(lines[1]["option"], 3);
    assert_eq!(lines[1]["anonymous"], true);
    assert_eq!(lines[1]["payload"], "fan off");

    // Query direction: the host queries the device's group, the device answers.
    let mut answer = pi.spawn(&[
        "answer", "--group", UP, "--reply", "pong", "--count", "2", "--json",
    ]);
    ready(&mut answer);
    for option in ["2", "3"] {
        let reply = host.run(&[
            "query",
            "--group",
            UP,
            "--option",
            option,
            "--count",
            "1",
            "--wait",
            "30s",
            "--json",
            &format!("ping {option}"),
        ]);
        let replies = reply.json_lines();
        assert_eq!(replies.len(), 1, "{}", reply.stderr);
        assert_eq!(replies[0]["payload"], "pong");
        assert_eq!(replies[0]["option"], option.parse::<u64>().unwrap());
    }
    let answered = answer.wait().json_lines();
    assert_eq!(answered.len(), 2);
    assert_eq!(answered[0]["payload"], "ping 2");
    assert_eq!(answered[1]["payload"], "ping 3");

    // The device's status names it and both stored group keys.
    let status = pi.run(&["status", "--json"]).success();
    let v: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(v["device"], "pi-1");
    assert_eq!(v["certificate"]["state"], "valid");
    let groups: Vec<&str> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["group"].as_str().unwrap())
        .collect();
    assert!(groups.contains(&UP) && groups.contains(&DOWN), "{status}");
}
