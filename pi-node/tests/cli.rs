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

/// A key store with credentials of `id` from a throw-away CA, and no group key.
fn enrolled_store(dir: &std::path::Path, id: &str) {
    use quva_client::curve::KeyPair;
    use quva_client::enrollment::{EnrollmentSecret, PendingEnrollment};
    use quva_client::ids::DeviceId;
    let mut rng = rand_core::OsRng;
    let now = quva_node::now_ms();
    let ca = KeyPair::random(&mut rng);
    let secret = EnrollmentSecret::random(&mut rng);
    let p = PendingEnrollment::new(DeviceId::new(id).unwrap(), now, &mut rng);
    let resp = p
        .enroll_request(&secret)
        .verify(&secret, now, 60_000)
        .unwrap()
        .issue(&ca, 1, now - 1000, now + 86_400_000, &mut rng)
        .unwrap();
    let creds = p.accept(&resp, ca.public()).unwrap();
    let store = quva_node::KeyStore::create(dir.join("store")).unwrap();
    store.save_credentials(&creds, ca.public()).unwrap();
    store.save_broker("127.0.0.1:9").unwrap();
}

#[test]
fn send_needs_a_group_that_lists_the_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let o = node(&["send", "--to", "sensor-01", "hello"], dir.path());
    assert!(
        stderr(&o).contains("run `quva-node enroll` first"),
        "{}",
        stderr(&o)
    );
    enrolled_store(dir.path(), "owner");
    let o = node(&["send", "--to", "sensor 01", "hello"], dir.path());
    assert!(stderr(&o).contains("invalid device id"), "{}", stderr(&o));
    let o = node(&["send", "--to", "sensor-01", "hello"], dir.path());
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("in no group yet"), "{}", stderr(&o));
    let o = node(
        &["send", "--to", "sensor-01", "--group", "fw/a", "hello"],
        dir.path(),
    );
    assert!(
        stderr(&o).contains("holds no key of fw/a"),
        "{}",
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains("hello"),
        "the message leaked into the log"
    );
    let o = node(&["send", "--group", "fw/a", "hello"], dir.path());
    assert_eq!(o.status.code(), Some(2), "--to is required");
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
        "send",
        "run",
        "ota",
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

#[test]
fn ota_release_checks_its_input_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["release", "status"] {
        let o = node(&["ota", sub, "--help"], dir.path());
        assert!(o.status.success(), "{sub}: {}", stderr(&o));
    }
    enrolled_store(dir.path(), "rel-1");
    let base = [
        "ota",
        "release",
        "--group",
        "fw/a",
        "--version",
        "1",
        "--name",
        "fw.bin",
    ];
    let missing = dir.path().join("missing.bin");
    let mut args = base.to_vec();
    args.push(missing.to_str().unwrap());
    let o = node(&args, dir.path());
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot read"), "{}", stderr(&o));

    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let mut args = base.to_vec();
    args.push(empty.to_str().unwrap());
    let o = node(&args, dir.path());
    assert!(stderr(&o).contains("is empty"), "{}", stderr(&o));

    let image = dir.path().join("fw.bin");
    std::fs::write(&image, b"firmware").unwrap();
    let mut args = base.to_vec();
    args.extend(["--chunk-size", "0", image.to_str().unwrap()]);
    let o = node(&args, dir.path());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("chunk size"), "{}", stderr(&o));
}
