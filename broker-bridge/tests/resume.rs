//! The notice state file (`notices.state_file`): a restarted bridge resumes the CA's notice log
//! after the last notice it applied, publishes its retained set again from the file, and keeps
//! refusing the certificates it saw revoked or superseded; a corrupt file or one of another CA
//! means reading the log from its start.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/broker.rs"]
mod broker;
#[path = "support/devices.rs"]
mod devices;
#[path = "support/test_ca.rs"]
mod test_ca;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker::{Mosquitto, Raw, config, pinned, start_bridge};
use devices::{connect, enroll, try_connect};
use quva_bridge::Bridge;
use quva_bridge::ca::{BoxFuture, CaClient, CaError, GroupSnapshot, NoticeAction, NoticeStream};
use quva_client::codec::Decode;
use quva_client::ids::{Epoch, GroupId};
use rmqtt_codec::v5;
use test_ca::TestCa;

const GROUP: &str = "plant/a";

/// The test CA as the bridge sees it, remembering where each `WatchNotices` started, with a
/// switch that makes the certificate checks (`ConfirmCertificateUse`, `GetRevocationStatus`)
/// unavailable while the notice log still flows.
struct Watched {
    inner: test_ca::Client,
    from: Mutex<Vec<u64>>,
    checks_down: AtomicBool,
}

impl Watched {
    fn new(ca: &Arc<TestCa>) -> Arc<Watched> {
        Arc::new(Watched {
            inner: test_ca::Client(ca.clone()),
            from: Mutex::default(),
            checks_down: AtomicBool::new(false),
        })
    }

    /// The `from_seq` of the first `WatchNotices` (waits for it).
    async fn first_from(&self) -> u64 {
        for _ in 0..200 {
            if let Some(f) = self.from.lock().unwrap().first() {
                return *f;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the bridge never opened the notice stream");
    }
}

impl CaClient for Watched {
    fn enroll(&self, auth_data: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, CaError>> {
        self.inner.enroll(auth_data)
    }

    fn renew(&self, auth_data: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, CaError>> {
        self.inner.renew(auth_data)
    }

    fn join_group(&self, request: Vec<u8>) -> BoxFuture<'_, Result<(Vec<u8>, Epoch), CaError>> {
        self.inner.join_group(request)
    }

    fn get_group(&self, group: GroupId) -> BoxFuture<'_, Result<GroupSnapshot, CaError>> {
        self.inner.get_group(group)
    }

    fn ca_public_key(&self) -> BoxFuture<'_, Result<Vec<u8>, CaError>> {
        self.inner.ca_public_key()
    }

    fn is_revoked(&self, serial: u64) -> BoxFuture<'_, Result<bool, CaError>> {
        if self.checks_down.load(Ordering::SeqCst) {
            return Box::pin(async { Err(CaError::Unavailable) });
        }
        self.inner.is_revoked(serial)
    }

    fn confirm_use(&self, serial: u64, auth_data: Vec<u8>) -> BoxFuture<'_, Result<(), CaError>> {
        if self.checks_down.load(Ordering::SeqCst) {
            return Box::pin(async { Err(CaError::Unavailable) });
        }
        self.inner.confirm_use(serial, auth_data)
    }

    fn watch_notices(
        &self,
        from_seq: u64,
    ) -> BoxFuture<'_, Result<Box<dyn NoticeStream>, CaError>> {
        self.from.lock().unwrap().push(from_seq);
        self.inner.watch_notices(from_seq)
    }
}

fn rekey_notice(ca: &TestCa, topic: &str, payload: Vec<u8>) {
    ca.push_rekey(GROUP, 1, topic, payload);
}

async fn bridge_with_state(
    broker: SocketAddr,
    ca: &Arc<TestCa>,
    client: &Arc<Watched>,
    state: &Path,
) -> Bridge {
    let mut cfg = pinned(config(broker), ca.key.public());
    cfg.notices.state_file = Some(state.to_str().unwrap().to_owned());
    start_bridge(cfg, Some(client.clone() as Arc<dyn CaClient>)).await
}

/// The next sequence number saved in the state file, read at its documented place
/// (`"QVNS" || u8 1 || ca_kid[8] || u64 next_seq || ...`).
fn saved_next_seq(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let b: [u8; 8] = bytes.get(13..21)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

/// Waits until the state file says the bridge applied every notice up to `seq`.
async fn until_saved(path: &Path, seq: u64) {
    for _ in 0..200 {
        if saved_next_seq(path).is_some_and(|n| n > seq) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "state file never reached seq {seq}: {:?}",
        saved_next_seq(path)
    );
}

/// A plain client on the broker, subscribed to every `quva/` topic; collects until `want`
/// publications arrived (or 15 s passed).
async fn retained_on(broker: SocketAddr, id: &str, want: &[(&str, &[u8])]) {
    let (mut raw, ack) = Raw::connect(broker, id, None).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    raw.subscribe(1, "quva/#", vec![]).await;
    let mut seen = Vec::new();
    for _ in 0..30 {
        seen.extend(raw.drain_publishes(Duration::from_millis(500)).await);
        if want
            .iter()
            .all(|(t, p)| seen.iter().any(|(st, sp)| st == t && sp == p))
        {
            return;
        }
    }
    panic!("wanted {want:?}; saw {seen:?}");
}

fn state_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("notices.state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bridge_resumes_after_the_saved_notice_and_republishes_its_retained_set() {
    let mut broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(&dir);
    let ca = TestCa::new();
    rekey_notice(&ca, "quva/k/plant/a/1", vec![1]);
    rekey_notice(&ca, "quva/k/plant/a/2", vec![2]);
    rekey_notice(&ca, "quva/k/plant/a/1", vec![3]);
    let first = Watched::new(&ca);
    let bridge = bridge_with_state(broker.addr, &ca, &first, &path).await;
    assert_eq!(
        first.first_from().await,
        1,
        "no state file yet: from the start"
    );
    until_saved(&path, 3).await;
    bridge.shutdown().await;

    // The broker forgets its retained messages; the log goes on while the bridge is down.
    broker.restart().await;
    rekey_notice(&ca, "quva/k/plant/a/3", vec![4]);
    let second = Watched::new(&ca);
    let bridge = bridge_with_state(broker.addr, &ca, &second, &path).await;
    assert_eq!(
        second.first_from().await,
        4,
        "resumes after the saved notice"
    );
    // The retained set comes from the file (notices 1-3 are not read again), notice 4 from
    // the log.
    retained_on(
        broker.addr,
        "watch-1",
        &[
            ("quva/k/plant/a/1", &[3]),
            ("quva/k/plant/a/2", &[2]),
            ("quva/k/plant/a/3", &[4]),
        ],
    )
    .await;
    until_saved(&path, 4).await;
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_superseded_certificates_stay_refused_across_a_restart() {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(&dir);
    let ca = TestCa::new();
    let first = Watched::new(&ca);
    let bridge = bridge_with_state(broker.addr, &ca, &first, &path).await;
    let addr = bridge.local_addr();
    let revoked = enroll(addr, &ca, "dev-r").await;
    let superseded = enroll(addr, &ca, "dev-s").await;
    // Both certificates are used (the CA confirms them to this bridge).
    drop(connect(addr, &revoked, "dev-r-1").await);
    drop(connect(addr, &superseded, "dev-s-1").await);
    ca.push_notice(
        "",
        0,
        NoticeAction::Revoked {
            serial: revoked.cert().serial(),
            device: "dev-r".into(),
        },
    );
    ca.push_notice(
        "",
        0,
        NoticeAction::Superseded {
            serial: superseded.cert().serial(),
            device: "dev-s".into(),
            successor: 99,
        },
    );
    until_saved(&path, 2).await;
    // From now on the CA cannot answer certificate checks: only the bridge's own knowledge
    // stands between a revoked certificate and the broker.
    first.checks_down.store(true, Ordering::SeqCst);
    for (creds, id) in [(&revoked, "dev-r-2"), (&superseded, "dev-s-2")] {
        let (_raw, ack) = try_connect(addr, creds, id).await;
        assert_eq!(u8::from(ack.reason_code), 0x87, "{id} before the restart");
    }
    bridge.shutdown().await;

    let second = Watched::new(&ca);
    second.checks_down.store(true, Ordering::SeqCst);
    let bridge = bridge_with_state(broker.addr, &ca, &second, &path).await;
    let addr = bridge.local_addr();
    assert_eq!(
        second.first_from().await,
        3,
        "resumes after the revocations"
    );
    // Let the bridge read the (empty) rest of the log, so that it trusts its revocations and
    // no longer needs the CA to answer.
    until_caught_up(&path, addr, &ca).await;
    for (creds, id) in [(&revoked, "dev-r-3"), (&superseded, "dev-s-3")] {
        let (_raw, ack) = try_connect(addr, creds, id).await;
        assert_eq!(u8::from(ack.reason_code), 0x87, "{id} after the restart");
    }
    bridge.shutdown().await;
}

/// Waits until the bridge read its log to the end: a probe notice is applied and saved, and a
/// fresh device whose confirmation the CA cannot answer is let in from the notices (0x88 before).
async fn until_caught_up(path: &Path, addr: SocketAddr, ca: &Arc<TestCa>) {
    rekey_notice(ca, "quva/k/plant/a/probe", vec![0]);
    let seq = ca.state.lock().unwrap().notices.len() as u64;
    until_saved(path, seq).await;
    // An unrevoked certificate the CA issued: refused with 0x88 only while the notices are not
    // current.
    let (ack, pending) = devices::try_enroll(addr, ca, "probe").await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    let resp = quva_client::enrollment::EnrollResponse::from_bytes(&ack.auth_data.unwrap());
    let creds = pending.accept(&resp.unwrap(), ca.key.public()).unwrap();
    for i in 0..200 {
        let (_raw, ack) = try_connect(addr, &creds, &format!("probe-{i}")).await;
        match u8::from(ack.reason_code) {
            0 => return,
            0x88 => tokio::time::sleep(Duration::from_millis(50)).await,
            code => panic!("probe refused with {code:#x}"),
        }
    }
    panic!("the bridge never caught up with the notices");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_foreign_state_file_means_reading_the_log_from_its_start() {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(&dir);
    let ca = TestCa::new();
    rekey_notice(&ca, "quva/k/plant/a/1", vec![1]);
    rekey_notice(&ca, "quva/k/plant/a/2", vec![2]);
    let first = Watched::new(&ca);
    let bridge = bridge_with_state(broker.addr, &ca, &first, &path).await;
    until_saved(&path, 2).await;
    bridge.shutdown().await;

    // One flipped byte in the revocations or the retained set: the whole file is refused.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 40;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let second = Watched::new(&ca);
    let bridge = bridge_with_state(broker.addr, &ca, &second, &path).await;
    assert_eq!(second.first_from().await, 1, "corrupt file: from the start");
    until_saved(&path, 2).await;
    bridge.shutdown().await;

    // The file is valid again, but for this CA only.
    let other = TestCa::new();
    let third = Watched::new(&other);
    let bridge = bridge_with_state(broker.addr, &other, &third, &path).await;
    assert_eq!(
        third.first_from().await,
        1,
        "another CA's file: from the start"
    );
    bridge.shutdown().await;

    // The bridge of the first CA still resumes from it (the control).
    let fourth = Watched::new(&ca);
    let bridge = bridge_with_state(broker.addr, &ca, &fourth, &path).await;
    let from = fourth.first_from().await;
    bridge.shutdown().await;
    assert_eq!(from, 3, "the control resumes");
}
