//! `packaging/bin/quva-node-apply-binary`: atomic install beside the target, idempotent, refuses
//! what is not a quva-node, restarts only after installing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/bin/quva-node-apply-binary")
}

/// A fake quva-node image: a shell script whose `--version` prints `version`.
fn image(dir: &Path, name: &str, version: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, format!("#!/bin/sh\necho '{version}'\n")).unwrap();
    // Staged images are 0600, as quva-node's staging file.
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn apply(image: &Path, target: &Path, restart: &str) -> Output {
    Command::new(script())
        .arg(image)
        .env("QUVA_APPLY_TARGET", target)
        .env("QUVA_APPLY_RESTART", restart)
        .env("QUVA_APPLY_RESTART_DELAY", "0")
        .env("QUVA_OTA_GROUP", "fw/pi")
        .env("QUVA_OTA_VERSION", "7")
        .env("QUVA_OTA_NAME", "quva-node-7")
        .output()
        .unwrap()
}

fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn wait_for(path: &Path) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn installs_by_rename_beside_the_target_and_restarts_after() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let target = bin.join("quva-node");
    fs::write(&target, "#!/bin/sh\necho 'quva-node 0.1.0'\n").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
    let old_inode = fs::metadata(&target).unwrap().ino();
    let img = image(dir.path(), "staging", "quva-node 0.2.0");
    let marker = dir.path().join("restarted");

    let out = apply(&img, &target, &format!("touch {}", marker.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(&target).unwrap(), fs::read(&img).unwrap());
    let meta = fs::metadata(&target).unwrap();
    // A new file renamed into place, not the old one rewritten.
    assert_ne!(meta.ino(), old_inode);
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert_eq!(leftovers(&bin), Vec::<String>::new());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("installed fw/pi v7 (quva-node-7)"),
        "{stdout}"
    );
    assert!(wait_for(&marker), "the restart command did not run");

    // The same image again (a restart before the version was recorded): nothing changes, no
    // restart.
    fs::remove_file(&marker).unwrap();
    let inode = fs::metadata(&target).unwrap().ino();
    let out = apply(&img, &target, &format!("touch {}", marker.display()));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to do"));
    assert_eq!(fs::metadata(&target).unwrap().ino(), inode);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker.exists(), "restarted although nothing was installed");
}

#[test]
fn refuses_an_image_that_is_not_a_quva_node_and_keeps_the_old_binary() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("quva-node");
    fs::write(&target, "old").unwrap();
    let marker = dir.path().join("restarted");
    for (name, version) in [("other", "busybox 1.36"), ("silent", "")] {
        let img = image(dir.path(), name, version);
        let out = apply(&img, &target, &format!("touch {}", marker.display()));
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("is not a quva-node binary"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    }
    let out = apply(&dir.path().join("missing"), &target, "none");
    assert_eq!(out.status.code(), Some(1));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker.exists());
}
