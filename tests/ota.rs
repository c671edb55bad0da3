//! Group OTA (PROTOCOL.md §7.2) and direct messages (§7.1) over real processes: Mosquitto,
//! quva-ca, quva-bridge, a release signer and devices running `quva-node run`.
//!
//! The signer encrypts an image once, deposits it retained on the broker and goes offline; every
//! device (also one that was offline during the release) fetches, verifies and applies it, and the
//! signer collects the devices' status reports later from its persistent session. Rollbacks,
//! unpinned signers, tampered chunks (through the bridge and straight into Mosquitto), a device
//! killed mid-download and a failing apply command are each shown to be handled.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::fs;
use std::path::{Path, PathBuf};
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
             apply_command = [\"/bin/sh\", \"-c\", {apply:?}]\n"
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
fn wait_applied(node: &Node, version: u64, daemon: &Proc) -> Vec<u8> {
    let deadline = Instant::now() + STEP_TIMEOUT * 2;
    loop {
        if let Some(bytes) = applied(node, version) {
            return bytes;
        }
        assert!(
            Instant::now() < deadline,
            "{} never applied version {version}:\n{}",
            node.id,
            daemon.err()
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

fn cluster_with_signer() -> (Cluster, Node) {
    let cluster = Cluster::start(&["fw/#"]);
    cluster.create_group(GROUP);
    let signer = cluster.enrolled(SIGNER, &[(GROUP, "pub")]);
    (cluster, signer)
}

fn device(cluster: &Cluster, id: &str, signers: &[&str], apply: &str) -> Node {
    let node = cluster.enrolled(id, &[(GROUP, "sub")]);
    configure(&node, signers, apply);
    node
}

fn joined(p: &mut Proc) {
    p.wait_stderr("joined");
}

#[test]
fn a_release_reaches_every_device_with_the_signer_offline() {
    let (cluster, signer) = cluster_with_signer();
    let devices: Vec<Node> = (1..=5)
        .map(|i| device(&cluster, &format!("dev-{i}"), &[SIGNER], COPY))
        .collect();
    // Four devices run before the release; the fifth is offline during it.
    let mut running: Vec<Proc> = devices[..4]
        .iter()
        .map(|d| {
            let mut p = d.spawn(&["run"]);
            joined(&mut p);
            p
        })
        .collect();
    // The signer's persistent session exists before the reports are sent.
    status(&signer);

    let img = image(300_000, 1);
    let out = release(&cluster, &signer, 1, &img, 16 * 1024);
    assert!(out.contains("19/19") || out.contains("19 chunks"), "{out}");
    // `ota release` has exited: the signer is offline from here on.
    for (d, p) in devices[..4].iter().zip(&running) {
        assert_eq!(wait_applied(d, 1, p), img, "{}", d.id);
    }
    let mut late = devices[4].spawn(&["run"]);
    assert_eq!(wait_applied(&devices[4], 1, &late), img);
    late.wait_stderr("applied");
    running.push(late);

    // The signer comes back and reads every report from its persistent session.
    for d in &devices {
        wait_status(&signer, &d.id, 1, "applied");
    }
    drop(running);
    // The installed version is remembered: a second run applies nothing again.
    fs::remove_file(applied_dir(&devices[0]).join("1.bin")).unwrap();
    let mut again = devices[0].spawn(&["run"]);
    joined(&mut again);
    std::thread::sleep(Duration::from_secs(2));
    assert!(applied(&devices[0], 1).is_none(), "{}", again.err());
}

#[test]
fn rollbacks_unpinned_signers_and_failing_apply_commands_are_refused() {
    let (cluster, signer) = cluster_with_signer();
    let other = cluster.enrolled("rel-2", &[(GROUP, "pub")]);
    let dev = device(&cluster, "dev-1", &[SIGNER], COPY);
    let mut p = dev.spawn(&["run"]);
    joined(&mut p);

    let v2 = image(40_000, 2);
    release(&cluster, &signer, 2, &v2, 8 * 1024);
    assert_eq!(wait_applied(&dev, 2, &p), v2);

    // A lower version from the pinned signer: a rollback, refused.
    release(&cluster, &signer, 1, &image(40_000, 3), 8 * 1024);
    p.wait_stderr("rollback");
    // A higher version from a publisher that is not pinned: refused.
    release(&cluster, &other, 3, &image(40_000, 4), 8 * 1024);
    p.wait_stderr("not pinned");
    std::thread::sleep(Duration::from_secs(1));
    assert!(applied(&dev, 1).is_none() && applied(&dev, 3).is_none());
    drop(p);

    // A device whose apply command fails reports the failure and records no version.
    let failing = device(&cluster, "dev-2", &[SIGNER], "exit 3");
    status(&signer);
    let mut q = failing.spawn(&["run"]);
    q.wait_stderr("failed");
    wait_status(&signer, "dev-2", 2, "failed");
    let shown = failing.run(&["status"]).success();
    assert!(!shown.contains("version 2"), "{shown}");
}

#[test]
fn tampered_chunks_are_refused_by_the_bridge_and_by_the_device() {
    let (cluster, signer) = cluster_with_signer();
    let dev = device(&cluster, "dev-1", &[SIGNER], COPY);
    let img = image(20_000, 5);
    release(&cluster, &signer, 1, &img, 4 * 1024);

    // Through the bridge, as the signer itself: a chunk whose hash is not in the manifest.
    let raw = RawMqtt::connect_device(cluster.bridge, &signer.store);
    let topic = format!("{GROUP}/_ota/{SIGNER}/1/c/0");
    let code = raw.publish(&topic, &image(4 * 1024, 9));
    assert!(code == 0x87 || code == 0x99, "tampered chunk got {code:#x}");

    // Straight into Mosquitto: the retained chunk 0 is replaced; the device refuses it.
    let direct = RawMqtt::connect(cluster.broker);
    direct.publish_retained(&topic, &image(4 * 1024, 9));
    let mut p = dev.spawn(&["run"]);
    p.wait_stderr("chunk 0");
    std::thread::sleep(Duration::from_secs(1));
    assert!(applied(&dev, 1).is_none(), "{}", p.err());
}

#[test]
fn a_device_killed_mid_download_resumes_without_fetching_verified_chunks_again() {
    let (cluster, signer) = cluster_with_signer();
    let dev = device(&cluster, "dev-1", &[SIGNER], COPY);
    let mut p = dev.spawn(&["run"]);
    joined(&mut p);
    // 4 MiB in 256 chunks: the device is still writing when it is killed.
    let img = image(4 << 20, 6);
    release(&cluster, &signer, 1, &img, 16 * 1024);
    p.wait_stderr("downloading");
    // SIGKILL: no chance to save anything beyond what is already on disk.
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let stored_before = stored_chunks(&dev);
    let mut again = dev.spawn(&["run"]);
    assert_eq!(wait_applied(&dev, 1, &again), img);
    again.wait_stderr("applied");
    let resumed = again.err();
    assert!(resumed.contains("resum"), "{resumed}");
    // Chunks verified before the kill were not written again.
    let fetched = resumed.matches("stored chunk").count();
    assert!(
        fetched <= 256 - stored_before,
        "{fetched} chunks stored after the restart, {stored_before} were verified before:\n{resumed}"
    );
}

/// How many chunks the device's download record marks as verified on disk.
fn stored_chunks(node: &Node) -> usize {
    fn walk(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .flat_map(|e| {
                        let p = e.path();
                        if p.is_dir() { walk(&p) } else { vec![p] }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
    walk(&node.store).len()
}

#[test]
fn a_device_that_joined_after_the_release_gets_the_key_by_direct_message() {
    let (cluster, signer) = cluster_with_signer();
    let first = device(&cluster, "dev-1", &[SIGNER], COPY);
    let mut p = first.spawn(&["run"]);
    joined(&mut p);
    status(&signer);
    let img = image(30_000, 7);
    release(&cluster, &signer, 1, &img, 8 * 1024);
    wait_applied(&first, 1, &p);

    // A new device joins while the signer is offline: the group rekeys, the retained key message
    // is of the previous epoch, and the device asks for the key.
    let epoch = cluster.epoch(GROUP);
    let late = device(&cluster, "dev-2", &[SIGNER], COPY);
    let mut q = late.spawn(&["run"]);
    joined(&mut q);
    cluster.wait_epoch_after(GROUP, epoch);
    q.wait_stderr("need-key");
    // The signer comes online and answers with a direct message.
    let mut s = signer.spawn(&["run"]);
    assert_eq!(wait_applied(&late, 1, &q), img);
    s.wait_stderr("need-key");
}

#[test]
fn direct_messages_reach_only_their_recipient_once() {
    let (cluster, signer) = cluster_with_signer();
    let dev = device(&cluster, "dev-1", &[SIGNER], COPY);
    let mut p = dev.spawn(&["run"]);
    joined(&mut p);
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
