//! Group OTA (PROTOCOL.md §7.2) and direct messages (§7.1) over real processes: Mosquitto,
//! quva-ca, quva-bridge, a release signer and devices running `quva-node run`.
//!
//! The signer encrypts an image once, deposits it retained on the broker and goes offline; every
//! device (also one that was offline during the release) fetches, verifies and applies it, and the
//! signer collects the devices' status reports later from its persistent session. Rollbacks,
//! unpinned signers, tampered chunks (through the bridge and straight into Mosquitto), a device
//! killed mid-download, failing and hanging apply commands, and a device whose key only a direct
//! message from the signer can deliver are each shown to be handled.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use quva_tests::raw::RawMqtt;
use quva_tests::{Cluster, Node, Proc, STEP_TIMEOUT};

const GROUP: &str = "fw/sensor-v2";
const SIGNER: &str = "rel-1";

/// A deterministic image of `len` bytes (not all equal, so that chunks differ).
fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
        .collect()
}

/// Where a device's apply command copies the images it installs.
fn applied_dir(node: &Node) -> PathBuf {
    node.store.with_extension("applied")
}

/// The image a device applied as `version`, if any.
fn applied(node: &Node, version: u64) -> Option<Vec<u8>> {
    fs::read(applied_dir(node).join(format!("{version}.bin"))).ok()
}

/// Writes a device's configuration: follows [`GROUP`]'s releases by the pinned `signers`, applies
/// with `apply` (a shell command; the image path is `$0`).
fn configure(node: &Node, signers: &[&str], apply: &str) {
    configure_with(node, signers, apply, "");
}

/// [`configure`] with more lines of the `[ota]` table.
fn configure_with(node: &Node, signers: &[&str], apply: &str, extra: &str) {
    let dir = applied_dir(node);
    fs::create_dir_all(&dir).unwrap();
    let signers = signers
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let apply = apply.replace("{dir}", &dir.display().to_string());
    fs::write(
        node.store.with_extension("toml"),
        format!(
            "connect_timeout_secs = 5\n\n[ota]\ngroups = [\"{GROUP}\"]\nsigners = [{signers}]\n\
             apply_command = [\"/bin/sh\", \"-c\", {apply:?}]\n{extra}"
        ),
    )
    .unwrap();
}

/// The apply command that installs by copying the image to `<applied>/<version>.bin`.
const COPY: &str = "cp \"$0\" \"{dir}/$QUVA_OTA_VERSION.bin\"";

/// Writes `bytes` to a file in the cluster's directory and releases it as `version`.
fn release(cluster: &Cluster, signer: &Node, version: u64, bytes: &[u8], chunk: usize) -> String {
    let file = cluster.dir.path().join(format!("image-{version}.bin"));
    fs::write(&file, bytes).unwrap();
    signer
        .run(&[
            "ota",
            "release",
            "--group",
            GROUP,
            "--version",
            &version.to_string(),
            "--name",
            &format!("sensor-fw-{version}.bin"),
            "--chunk-size",
            &chunk.to_string(),
            &file.display().to_string(),
        ])
        .success()
}

/// Waits until `node` has applied `version`; returns the image.
fn wait_applied(cluster: &Cluster, node: &Node, version: u64, daemon: &Proc) -> Vec<u8> {
    let deadline = Instant::now() + STEP_TIMEOUT * 2;
    loop {
        if let Some(bytes) = applied(node, version) {
            return bytes;
        }
        assert!(
            Instant::now() < deadline,
            "{} never applied version {version}:\n{}\n{}",
            node.id,
            daemon.err(),
            cluster.daemon_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The signer's view of the devices' reports: (device, version, state).
fn status(signer: &Node) -> Vec<(String, u64, String)> {
    let out = signer.run(&["ota", "status", "--group", GROUP, "--json", "--wait", "3"]);
    let lines = out.json_lines();
    let Some(reports) = lines.first().and_then(|v| v["reports"].as_array()) else {
        return Vec::new();
    };
    reports
        .iter()
        .map(|l| {
            (
                l["device"].as_str().unwrap_or_default().to_owned(),
                l["version"].as_u64().unwrap_or_default(),
                l["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Waits until the signer's status shows `device` in `state` for `version`.
fn wait_status(signer: &Node, device: &str, version: u64, state: &str) {
    let deadline = Instant::now() + STEP_TIMEOUT * 2;
    loop {
        let rows = status(signer);
        if rows
            .iter()
            .any(|(d, v, s)| d == device && *v == version && s == state)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {state} report of {device} for v{version}: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A cluster with the signer enrolled and joined as a publisher of [`GROUP`], and its
/// persistent report session (`ota status`) opened, so that reports sent while it is offline wait
/// for it.
fn cluster_with_signer() -> (Cluster, Node) {
    let cluster = Cluster::start(&["fw/#"]);
    cluster.create_group(GROUP);
    let signer = cluster.enrolled(SIGNER, &[(GROUP, "pub")]);
    signer.publish(GROUP, 1, "online");
    status(&signer);
    (cluster, signer)
}

fn device(cluster: &Cluster, id: &str, signers: &[&str], apply: &str) -> Node {
    device_with(cluster, id, signers, apply, "")
}

fn device_with(cluster: &Cluster, id: &str, signers: &[&str], apply: &str, extra: &str) -> Node {
    let node = cluster.enrolled(id, &[(GROUP, "sub")]);
    configure_with(&node, signers, apply, extra);
    node
}

/// Starts `quva-node run` and waits until it has joined the OTA group (a first join rekeys it).
fn run(node: &Node) -> Proc {
    let mut p = node.spawn_debug(&["run"]);
    p.wait_stderr("joined");
    p
}

#[test]
fn a_release_reaches_every_device_with_the_signer_offline() {
    let (cluster, signer) = cluster_with_signer();
    let devices: Vec<Node> = (1..=5)
        .map(|i| device(&cluster, &format!("dev-{i}"), &[SIGNER], COPY))
        .collect();
    // Every device joins; the fifth then goes offline and misses the release.
    let mut running: Vec<Proc> = devices.iter().map(run).collect();
    drop(running.pop());

    let img = image(300_000, 1);
    let out = release(&cluster, &signer, 1, &img, 16 * 1024);
    assert!(out.contains("19/19") || out.contains("19 chunks"), "{out}");
    // `ota release` has exited: the signer is offline from here on.
    for (d, p) in devices[..4].iter().zip(&running) {
        assert_eq!(wait_applied(&cluster, d, 1, p), img, "{}", d.id);
    }
    let mut late = run(&devices[4]);
    assert_eq!(wait_applied(&cluster, &devices[4], 1, &late), img);
    late.wait_stdout("applied");
    running.push(late);

    // The signer comes back and reads every report from its persistent session.
    for d in &devices {
        wait_status(&signer, &d.id, 1, "applied");
    }
    drop(running);
    // `status` shows the installed version and its signer; the signer's shows its release.
    let st = devices[0].run(&["status", "--json"]).success();
    let v: serde_json::Value = serde_json::from_str(st.trim()).unwrap();
    assert_eq!(v["ota"]["followed"][0]["group"], GROUP, "{v}");
    assert_eq!(v["ota"]["followed"][0]["installed_version"], 1, "{v}");
    assert_eq!(v["ota"]["followed"][0]["signer"], SIGNER, "{v}");
    let text = devices[0].run(&["status"]).success();
    assert!(
        text.contains(&format!(
            "ota         {GROUP}: version 1 from {SIGNER} installed"
        )),
        "{text}"
    );
    let text = signer.run(&["status"]).success();
    assert!(
        text.contains(&format!("ota release {GROUP} version 1")),
        "{text}"
    );
    // The installed version is remembered: a second run applies nothing again.
    fs::remove_file(applied_dir(&devices[0]).join("1.bin")).unwrap();
    let again = run(&devices[0]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(applied(&devices[0], 1).is_none(), "{}", again.err());
}

#[test]
fn rollbacks_unpinned_signers_and_failing_apply_commands_are_refused() {
    let (cluster, signer) = cluster_with_signer();
    let other = cluster.enrolled("rel-2", &[(GROUP, "pub")]);
    other.publish(GROUP, 1, "online");
    let dev = device(&cluster, "dev-1", &[SIGNER], COPY);
    let failing = device(&cluster, "dev-2", &[SIGNER], "exit 3");
    // An apply command that would run for a minute, killed after its 2 s.
    let stuck = device_with(
        &cluster,
        "dev-3",
        &[SIGNER],
        "sleep 60; cp \"$0\" \"{dir}/$QUVA_OTA_VERSION.bin\"",
        "apply_timeout_secs = 2\n",
    );
    let p = run(&dev);
    let mut q = run(&failing);
    let mut r = run(&stuck);

    let v2 = image(40_000, 2);
    release(&cluster, &signer, 2, &v2, 8 * 1024);
    assert_eq!(wait_applied(&cluster, &dev, 2, &p), v2);
    // The failing apply command is reported as failed; nothing is installed.
    q.wait_stderr("failed");
    wait_status(&signer, "dev-2", 2, "failed");
    assert!(applied(&failing, 2).is_none());
    // The stuck one is killed after its timeout and reported as failed.
    r.wait_stdout("apply command timed out after 2 s and was killed");
    wait_status(&signer, "dev-3", 2, "failed");
    assert!(applied(&stuck, 2).is_none());

    // A lower version from the pinned signer (a rollback) and a higher one from a publisher that
    // is not pinned (the device does not even subscribe to its releases), then a newer one from
    // the pinned signer: only the last is installed; the rollback came before it on the same
    // subscription, so it was seen and refused.
    release(&cluster, &signer, 1, &image(40_000, 3), 8 * 1024);
    release(&cluster, &other, 3, &image(40_000, 4), 8 * 1024);
    let v4 = image(40_000, 5);
    release(&cluster, &signer, 4, &v4, 8 * 1024);
    assert_eq!(wait_applied(&cluster, &dev, 4, &p), v4);
    assert!(applied(&dev, 1).is_none() && applied(&dev, 3).is_none());
}

#[test]
fn tampered_chunks_are_refused_by_the_bridge_and_by_the_device() {
    let (cluster, signer) = cluster_with_signer();
    let dev = device(&cluster, "dev-1", &[SIGNER], COPY);
    // The device joins, then is offline during the release.
    drop(run(&dev));
    let img = image(20_000, 5);
    release(&cluster, &signer, 1, &img, 4 * 1024);

    // Through the bridge, as the signer itself: a chunk whose hash is not in the manifest.
    let raw = RawMqtt::connect_device(cluster.bridge, &signer.store);
    let topic = format!("{GROUP}/_ota/{SIGNER}/1/c/0");
    let code = raw.publish_retained(&topic, &image(4 * 1024, 9));
    assert!(code == 0x87 || code == 0x99, "tampered chunk got {code:#x}");

    // Straight into Mosquitto: the retained chunk 0 is replaced; the device refuses it.
    let direct = RawMqtt::connect(cluster.broker);
    direct.publish_retained(&topic, &image(4 * 1024, 9));
    let mut p = run(&dev);
    p.wait_stderr("chunk 0 refused");
    std::thread::sleep(Duration::from_secs(1));
    assert!(applied(&dev, 1).is_none(), "{}", p.err());
}

#[test]
fn a_device_killed_mid_download_resumes_without_fetching_verified_chunks_again() {
    let (cluster, signer) = cluster_with_signer();
    let dev = device(&cluster, "dev-1", &[SIGNER], COPY);
    let mut p = run(&dev);
    // 4 MiB in 256 chunks, each written and synced: the device is still at it when killed.
    let img = image(4 << 20, 6);
    release(&cluster, &signer, 1, &img, 16 * 1024);
    p.wait_stdout("chunks (");
    // SIGKILL: no chance to save anything beyond what is already on disk.
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let mut again = run(&dev);
    assert_eq!(wait_applied(&cluster, &dev, 1, &again), img);
    again.wait_stdout("applied");
    // It resumed from the chunks verified on disk, and fetched only the others.
    let out = again.out();
    let kept: u32 = out
        .split("resumed with ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resumption in:\n{out}"));
    assert!(kept > 0 && kept < 256, "{out}");
}

#[test]
fn a_device_that_joined_after_the_release_asks_for_the_key_and_gets_it_when_the_signer_returns() {
    let (cluster, signer) = cluster_with_signer();
    // The signer's daemon runs once, so that its persistent session holds the report
    // subscription, then goes offline.
    let mut d = signer.spawn_debug(&["run"]);
    d.wait_stderr("running");
    d.wait_stderr("joined");
    drop(d);
    let first = device(&cluster, "dev-1", &[SIGNER], COPY);
    let p = run(&first);
    let img = image(30_000, 7);
    release(&cluster, &signer, 1, &img, 8 * 1024);
    wait_applied(&cluster, &first, 1, &p);

    // A new device joins while the signer is offline: the group rekeys, the retained key
    // message is of the previous epoch, and the device asks for the key.
    let late = device(&cluster, "dev-2", &[SIGNER], COPY);
    let mut q = run(&late);
    q.wait_stdout("need-key");
    // The signer comes online: it deposits the key message of the current epoch at once (and
    // answers the queued need-key with a direct message, which the next test isolates): the
    // device installs the release.
    let s = signer.spawn_debug(&["run"]);
    assert_eq!(wait_applied(&cluster, &late, 1, &q), img);
    drop(s);
}

#[test]
fn a_device_that_cannot_open_the_retained_key_message_gets_the_key_by_direct_message() {
    let (cluster, signer) = cluster_with_signer();
    let img = image(30_000, 8);
    release(&cluster, &signer, 1, &img, 8 * 1024);
    // The key message as deposited, sealed for the release's epoch, read straight from Mosquitto.
    let key_topic = format!("{GROUP}/_ota/{SIGNER}/1/k");
    let broker = RawMqtt::connect(cluster.broker);
    broker.subscribe(&key_topic);
    let stale = broker
        .wait_for("the retained key message", |c| c.topic == key_topic)
        .payload;

    // The signer's daemon serves the release. A new subscriber joins (not following OTA yet):
    // the group rekeys and the daemon deposits the key message sealed for the new epoch.
    let mut d = signer.spawn_debug(&["run"]);
    d.wait_stderr("running");
    let late = cluster.enrolled("dev-2", &[(GROUP, "sub")]);
    let mut sub = late.spawn(&["subscribe", "--group", GROUP]);
    sub.wait_stderr("joined");
    drop(sub);
    d.wait_stderr("depositing the key message for the current epoch");
    d.wait_stderr("release item deposited");

    // The retained key message goes back to the release's epoch (a broker restored from a
    // backup): the new subscriber cannot open it, and the daemon deposits nothing new (its last
    // key message is of the current epoch). Only a direct message can give the device the key.
    assert_eq!(broker.publish_retained(&key_topic, &stale), 0);
    drop(d);
    configure(&late, &[SIGNER], COPY);
    let mut q = late.spawn_debug(&["run"]);
    q.wait_stdout("need-key");
    drop(q);

    // The signer comes back while the device is away: it reads the need-key from its persistent
    // session and answers with a direct message, which waits in the device's session.
    let mut d = signer.spawn_debug(&["run"]);
    d.wait_stderr("answering need-key with a direct message");
    std::thread::sleep(Duration::from_millis(500));
    // The device returns: the answer arrives before the retained manifest, is kept, and serves
    // once the manifest is verified; it does not need to ask again.
    let mut q = late.spawn_debug(&["run"]);
    q.wait_stdout(&format!(
        "[direct] from {SIGNER}: OTA key of version 1 (not shown)"
    ));
    assert_eq!(wait_applied(&cluster, &late, 1, &q), img);
    q.wait_stdout("applied");
    q.wait_stderr("key received from rel-1 as a direct message");
    assert!(!q.out().contains("need-key"), "{}", q.out());
    // The key came by the direct message only: the signer deposited no key message this time.
    assert!(
        !d.err().contains("depositing the key message"),
        "{}",
        d.err()
    );
    drop(d);
}

#[test]
fn direct_messages_reach_only_their_recipient_once() {
    let (cluster, signer) = cluster_with_signer();
    let dev = device(&cluster, "dev-1", &[SIGNER], COPY);
    let mut p = run(&dev);
    signer
        .run(&["send", "--to", "dev-1", "--group", GROUP, "open valve 3"])
        .success();
    p.wait_stdout("open valve 3");
    assert!(p.out().contains(SIGNER), "{}", p.out());
    // A device that is not enrolled in any shared group cannot be addressed.
    let err = signer
        .run(&["send", "--to", "nobody", "--group", GROUP, "x"])
        .failure();
    assert!(!err.is_empty());
}
