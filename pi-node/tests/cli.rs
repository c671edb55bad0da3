//! The `quva-node` binary's command line without a bridge: help texts, argument checks and the
//! errors an operator sees before any connection.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::process::{Command, Output};

fn node(args: &[&str], dir: &std::path::Path) -> Output {
    let config = dir.join("node.toml");
    if !config.exists() {
        std::fs::write(&config, "connect_timeout_secs = 2\n").unwrap();
    }
    Command::new(env!("CARGO_BIN_EXE_quva-node"))
        .arg("--config")
        .arg(&config)
        .arg("--store")
        .arg(dir.join("store"))
        .args(args)
        .env_remove("QUVA_ENROLL_SECRET")
        .env_remove("QUVA_NODE_BROKER")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn every_command_has_help() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in [
        "enroll",
        "renew",
        "publish",
        "subscribe",
        "query",
        "answer",
        "status",
    ] {
        let o = node(&[cmd, "--help"], dir.path());
        assert!(o.status.success(), "{cmd}: {}", stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("Usage: quva-node"), "{cmd}: {text}");
    }
    let o = node(&["--help"], dir.path());
    let text = String::from_utf8_lossy(&o.stdout);
    for cmd in [
        "enroll",
        "publish",
        "subscribe",
        "query",
        "answer",
        "status",
    ] {
        assert!(text.contains(cmd), "{text}");
    }
}

#[test]
fn errors_before_enrollment_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let o = node(&["status"], dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("run `quva-node enroll` first"),
        "{}",
        stderr(&o)
    );

    let o = node(
        &["publish", "--group", "plant/a", "--option", "4", "x"],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2), "clap usage error");
    assert!(stderr(&o).contains("1 (authenticated)"), "{}", stderr(&o));

    let o = node(
        &["publish", "--group", "quva/k/x", "--option", "1", "x"],
        dir.path(),
    );
    assert!(stderr(&o).contains("invalid group"), "{}", stderr(&o));

    let ca = format!(
        "02{}",
        "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
    );
    let o = node(&["enroll", "--id", "dev-1", "--ca-key", &ca], dir.path());
    assert!(
        stderr(&o).contains("no enrollment secret"),
        "{}",
        stderr(&o)
    );

    let secret = dir.path().join("secret");
    std::fs::write(&secret, "ab".repeat(32)).unwrap();
    let secret = secret.to_str().unwrap();
    let o = node(
        &[
            "enroll",
            "--id",
            "dev-1",
            "--ca-key",
            "02ff",
            "--secret-file",
            secret,
        ],
        dir.path(),
    );
    assert!(stderr(&o).contains("CA public key"), "{}", stderr(&o));

    let o = node(
        &[
            "enroll",
            "--id",
            "dev 1",
            "--ca-key",
            &ca,
            "--secret-file",
            secret,
        ],
        dir.path(),
    );
    assert!(stderr(&o).contains("invalid device id"), "{}", stderr(&o));

    let o = node(
        &[
            "enroll",
            "--id",
            "dev-1",
            "--ca-key",
            &ca,
            "--secret-file",
            secret,
        ],
        dir.path(),
    );
    assert!(stderr(&o).contains("no broker address"), "{}", stderr(&o));

    // Nothing listens on port 9 of the loopback: a temporary failure, exit status 75.
    let o = node(
        &[
            "--broker",
            "127.0.0.1:9",
            "enroll",
            "--id",
            "dev-1",
            "--ca-key",
            &ca,
            "--secret-file",
            secret,
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot reach the bridge"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains(&"ab".repeat(32)), "the secret leaked");
}

#[test]
fn a_bad_configuration_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("node.toml"), "brokr = \"x:1\"\n").unwrap();
    let o = node(&["status"], dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("node.toml"), "{}", stderr(&o));
}
