//! The bridge reaches a CA that serves TLS and requires bridge client certificates: no bridge
//! token anywhere, and devices still enroll, join and exchange protected messages.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use quva_tests::{Cluster, Options};

const GROUP: &str = "plant/line-9/flow";

#[test]
fn bridge_authenticates_to_the_ca_with_a_client_certificate() {
    let cluster = Cluster::start_with(
        &["plant/#"],
        &Options {
            mutual_tls: true,
            ..Options::default()
        },
    );
    assert!(cluster.ca_url.starts_with("https://"));
    cluster.create_group(GROUP);
    let publisher = cluster.enrolled("pub-1", &[(GROUP, "pub")]);
    let subscriber = cluster.enrolled("sub-1", &[(GROUP, "sub")]);

    let mut sub = subscriber.spawn(&["subscribe", "--group", GROUP, "--json", "--count", "1"]);
    sub.wait_stderr("joined");
    publisher
        .run(&["publish", "--group", GROUP, "--option", "2", "12.5 l/min"])
        .success();
    let out = sub.wait();
    let lines = out.json_lines();
    assert_eq!(lines.len(), 1, "{}\n{}", out.stderr, cluster.daemon_logs());
    assert_eq!(lines[0]["sender"], "pub-1");
    assert_eq!(lines[0]["payload"], "12.5 l/min");

    // The bridge token was never configured; the CA logged no refusal of the bridge.
    let bridge_conf = std::fs::read_to_string(cluster.dir.path().join("bridge.toml")).unwrap();
    assert!(!bridge_conf.contains("token"), "{bridge_conf}");
    let audit = cluster.admin(&["audit"]);
    assert!(
        !audit.to_string().contains("auth.denied"),
        "refusals in the audit log: {audit}"
    );
}
