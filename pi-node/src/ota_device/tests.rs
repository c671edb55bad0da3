//! The OTA agent against an in-memory CA, bridge and broker (`testkit`), with its files in a
//! temporary directory and a real apply command.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use quva_client::direct::{DirectFloor, DirectSealer, UnverifiedDirect};
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_client::message::{Direction, Protection, UnverifiedMessage};
use quva_client::ota::{OtaState, ReceivedStatus, Release, ReleaseSigner};
use quva_client::topics::{OtaItem, OtaTopic};

use super::*;
use crate::config::OtaSettings;
use quva_client::testkit::{Node, World};

const GROUP: &str = "fw/sensor-v2";

/// A signer, a device following its releases, the broker's retained OTA messages, and the
/// device's download directory.
struct Rig {
    w: World,
    g: GroupId,
    signer: Node,
    dev: Node,
    retained: BTreeMap<String, Vec<u8>>,
    dir: tempfile::TempDir,
    settings: OtaSettings,
}

fn rig(seed: u64) -> Rig {
    let mut w = World::new(seed);
    let g = w.group(GROUP);
    w.register("release-1", &g, Role::Publisher);
    w.register("dev-1", &g, Role::Subscriber);
    let mut signer = Node::new(w.enroll("release-1"));
    let mut dev = Node::new(w.enroll("dev-1"));
    w.join_node(&mut signer, &g, Role::Publisher, true);
    w.join_node(&mut dev, &g, Role::Subscriber, false);
    w.flush(&mut [&mut signer, &mut dev]);
    let dir = tempfile::tempdir().unwrap();
    let settings = OtaSettings {
        groups: vec![g.clone()],
        signers: vec![DeviceId::new("release-1").unwrap()],
        download_dir: dir.path().join("ota"),
        apply_command: Vec::new(),
        max_image_bytes: 1 << 20,
        apply_timeout: std::time::Duration::from_secs(600),
    };
    Rig {
        w,
        g,
        signer,
        dev,
        retained: BTreeMap::new(),
        dir,
        settings,
    }
}

fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn topic(m: &quva_client::ota::Manifest, item: OtaItem) -> String {
    m.topic(item).to_string()
}

/// Releases `img` as version `v` by `signer` and deposits it in `retained`; the key message is
/// sealed with the signer's keys of the current epoch.
fn deposit(
    w: &mut World,
    g: &GroupId,
    retained: &mut BTreeMap<String, Vec<u8>>,
    signer: &quva_client::device::Device,
    v: u64,
    img: &[u8],
    chunk: u32,
) -> Release {
    let creds = signer.credentials();
    let rel = ReleaseSigner {
        group: g,
        key: creds.key(),
        cert: creds.cert(),
    }
    .release(v, "quva-node.bin", img, chunk, w.now, &mut w.rng)
    .unwrap();
    let m = rel.manifest();
    retained.insert(topic(m, OtaItem::Manifest), rel.manifest_message().to_vec());
    for (j, c) in rel.chunks().iter().enumerate() {
        retained.insert(topic(m, OtaItem::Chunk(j as u32)), c.clone());
    }
    let (_, key) = signer
        .seal(
            g,
            Protection::Confidential,
            Direction::Forward,
            &rel.key_message().to_bytes(),
            w.now,
            &mut w.rng,
        )
        .unwrap();
    retained.insert(topic(m, OtaItem::Key), key);
    rel
}

impl Rig {
    fn release(&mut self, v: u64, img: &[u8], chunk: u32) -> Release {
        deposit(
            &mut self.w,
            &self.g,
            &mut self.retained,
            &self.signer.dev,
            v,
            img,
            chunk,
        )
    }

    fn release_by(&mut self, signer: &Node, v: u64, img: &[u8], chunk: u32) -> Release {
        deposit(
            &mut self.w,
            &self.g,
            &mut self.retained,
            &signer.dev,
            v,
            img,
            chunk,
        )
    }

    /// The status reports as the signer opens them: (version, state, detail).
    fn open_reports(&self, payloads: &[Vec<u8>]) -> Vec<(u64, OtaState, String)> {
        self.received(payloads)
            .into_iter()
            .map(|r| (r.report.version, r.report.state, r.report.detail))
            .collect()
    }

    /// The status reports as the signer opens them.
    fn received(&self, payloads: &[Vec<u8>]) -> Vec<ReceivedStatus> {
        let view = self.signer.dev.view(self.w.now);
        payloads
            .iter()
            .map(|p| {
                let m = UnverifiedMessage::decode(p)
                    .unwrap()
                    .verify_without_window(
                        &view,
                        &view,
                        &self.signer.dev.config().policy,
                        self.w.now,
                    )
                    .unwrap();
                let r = ReceivedStatus::from_message(&m).unwrap();
                assert_eq!(r.device.as_str(), "dev-1");
                r
            })
            .collect()
    }

    fn files(&self) -> OtaFiles {
        OtaFiles::open(&self.settings.download_dir).unwrap()
    }

    /// A device agent built from what is on disk, as after a (re)start.
    fn boot(&self, apply: ApplyCommand) -> Driver {
        let files = self.files();
        let agent = OtaAgent::new(&self.settings, files.load(&self.settings.groups).unwrap());
        Driver {
            agent,
            files,
            apply,
            subs: BTreeSet::new(),
            fetched: Vec::new(),
            reports: Vec::new(),
            logs: Vec::new(),
            applied: 0,
            chunk_budget: None,
            hold_apply: false,
            held: None,
        }
    }
}

/// The daemon's loop for the tests: performs the agent's actions, answers SUBSCRIBEs with the
/// retained messages, runs the apply command.
struct Driver {
    agent: OtaAgent,
    files: OtaFiles,
    apply: ApplyCommand,
    subs: BTreeSet<String>,
    /// Every chunk index whose topic was subscribed (fetched), in order.
    fetched: Vec<u32>,
    reports: Vec<Vec<u8>>,
    logs: Vec<String>,
    applied: usize,
    /// How many more chunk deliveries the "network" carries (None: all).
    chunk_budget: Option<usize>,
    /// Keep the next apply pending (its group and version in `held`) instead of running it.
    hold_apply: bool,
    held: Option<(GroupId, u64)>,
}

fn matches(filter: &str, topic: &str) -> bool {
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Driver {
    fn run(&mut self, r: &mut Rig, actions: Vec<OtaAction>) {
        let mut queue: std::collections::VecDeque<OtaAction> = actions.into();
        while let Some(a) = queue.pop_front() {
            let rest = perform(
                &mut self.agent,
                &self.files,
                &r.dev.dev,
                r.w.now,
                &mut r.w.rng,
                vec![a],
            );
            for a in rest {
                match a {
                    OtaAction::Subscribe(filters) => {
                        for f in filters {
                            self.subs.insert(f.clone());
                            if let Some(OtaTopic {
                                item: OtaItem::Chunk(j),
                                ..
                            }) = OtaTopic::parse(&f)
                            {
                                self.fetched.push(j);
                            }
                            let hits: Vec<(String, Vec<u8>)> = r
                                .retained
                                .iter()
                                .filter(|(t, _)| matches(&f, t))
                                .map(|(t, p)| (t.clone(), p.clone()))
                                .collect();
                            for (t, p) in hits {
                                if matches!(
                                    OtaTopic::parse(&t),
                                    Some(OtaTopic {
                                        item: OtaItem::Chunk(_),
                                        ..
                                    })
                                ) {
                                    match &mut self.chunk_budget {
                                        Some(0) => continue,
                                        Some(n) => *n -= 1,
                                        None => {}
                                    }
                                }
                                queue.extend(self.agent.on_publish(
                                    &t,
                                    &p,
                                    &r.dev.dev,
                                    r.w.now,
                                    &mut r.w.rng,
                                ));
                            }
                        }
                    }
                    OtaAction::Unsubscribe(filters) => {
                        for f in filters {
                            assert!(self.subs.remove(&f), "unsubscribed {f} never subscribed");
                        }
                    }
                    OtaAction::Publish { topic, payload } => {
                        assert_eq!(topic, format!("{GROUP}/_q"));
                        self.reports.push(payload);
                    }
                    OtaAction::Apply {
                        group,
                        version,
                        name,
                    } => {
                        if self.hold_apply {
                            self.held = Some((group, version));
                            continue;
                        }
                        self.applied += 1;
                        let res = self.apply.run(
                            &self.files.staging_path(&group),
                            &group,
                            version,
                            &name,
                        );
                        queue.extend(self.agent.on_apply_result(
                            &group,
                            version,
                            res,
                            &r.dev.dev,
                            r.w.now,
                            &mut r.w.rng,
                        ));
                    }
                    OtaAction::Log { message, .. } => self.logs.push(message),
                    _ => {}
                }
            }
        }
    }

    fn start(&mut self, r: &mut Rig) {
        let first = self.agent.start();
        self.run(r, first);
    }

    fn tick(&mut self, r: &mut Rig) {
        let a = self.agent.tick(&r.dev.dev, r.w.now, &mut r.w.rng);
        self.run(r, a);
    }

    fn states(&self, r: &Rig) -> Vec<OtaState> {
        r.open_reports(&self.reports)
            .into_iter()
            .map(|(_, s, _)| s)
            .collect()
    }
}

/// An apply command that copies the image to `out` (or fails with `exit 3`).
fn copy_to(out: &std::path::Path) -> ApplyCommand {
    ApplyCommand::new(vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "cp \"$1\" '{}' && echo \"$QUVA_OTA_VERSION\" >> '{}.log'",
            out.display(),
            out.display()
        ),
        "apply".into(),
    ])
    .unwrap()
}

fn failing() -> ApplyCommand {
    ApplyCommand::new(vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo 'no space left on /usr' >&2; exit 3".into(),
        "apply".into(),
    ])
    .unwrap()
}

fn out_path(r: &Rig) -> PathBuf {
    r.dir.path().join("installed.bin")
}

#[test]
fn a_release_is_fetched_verified_applied_and_recorded() {
    let mut r = rig(1);
    let img = image(9_500, 1);
    let rel = r.release(3, &img, 1000);
    let out = out_path(&r);
    let mut d = r.boot(copy_to(&out));
    d.start(&mut r);
    assert_eq!(std::fs::read(&out).unwrap(), img);
    assert_eq!(d.applied, 1);
    let reports = r.open_reports(&d.reports);
    let states: Vec<OtaState> = reports.iter().map(|(_, s, _)| *s).collect();
    assert_eq!(
        states,
        [
            OtaState::Available,
            OtaState::Downloading,
            OtaState::Verified,
            OtaState::Applied
        ]
    );
    assert!(reports.iter().all(|(v, _, _)| *v == 3));
    // Each chunk fetched once, then unsubscribed; only the release filters stay.
    let mut fetched = d.fetched.clone();
    fetched.sort_unstable();
    assert_eq!(fetched, (0..rel.chunks().len() as u32).collect::<Vec<_>>());
    assert!(
        d.subs
            .iter()
            .all(|s| s.ends_with("/+/m") || s.ends_with("/+/k")),
        "{:?}",
        d.subs
    );
    assert_eq!(d.agent.installed(&r.g), Some(3));
    assert_eq!(r.files().installed(&r.g).unwrap(), Some(3));
    // The staging file, progress and saved key are gone once applied.
    assert!(!d.files.staging_path(&r.g).exists());
    assert!(
        r.files().load(&[r.g.clone()]).unwrap()[&r.g]
            .release
            .is_none()
    );
    // A restarted device does not take the same release again.
    let mut again = r.boot(copy_to(&out));
    again.start(&mut r);
    assert!(again.reports.is_empty() && again.fetched.is_empty());
}

#[test]
fn a_killed_download_resumes_without_fetching_stored_chunks_again() {
    let mut r = rig(2);
    let img = image(20_000, 2);
    let rel = r.release(5, &img, 1000);
    let n = rel.chunks().len();
    let out = out_path(&r);
    let mut first = r.boot(copy_to(&out));
    // The link dies after 11 chunks; then the process is killed (the agent dropped as it is).
    // The first 8 were checkpointed (staging file synced, then the progress record saved); the
    // other 3 are written but not claimed, so they are fetched again.
    first.chunk_budget = Some(11);
    first.start(&mut r);
    assert_eq!(first.applied, 0);
    let saved = r
        .files()
        .load(&[r.g.clone()])
        .unwrap()
        .remove(&r.g)
        .unwrap();
    let saved = saved.release.expect("the accepted release is saved");
    assert!(saved.progress.is_some() && !saved.key.is_empty());
    let stored: BTreeSet<u32> = first.fetched.iter().copied().take(8).collect();
    assert_eq!(stored.len(), 8);
    let unclaimed: BTreeSet<u32> = first.fetched.iter().copied().skip(8).take(3).collect();
    drop(first);

    let mut second = r.boot(copy_to(&out));
    second.start(&mut r);
    let again: Vec<u32> = second
        .fetched
        .iter()
        .copied()
        .filter(|j| stored.contains(j))
        .collect();
    assert_eq!(
        again,
        Vec::<u32>::new(),
        "chunks fetched again after the restart"
    );
    assert_eq!(second.fetched.len(), n - 8);
    assert!(unclaimed.iter().all(|j| second.fetched.contains(j)));
    assert_eq!(std::fs::read(&out).unwrap(), img);
    assert_eq!(r.files().installed(&r.g).unwrap(), Some(5));
    assert!(
        second
            .logs
            .iter()
            .any(|l| l.contains("resumed, 8 of 8 chunks on disk intact")),
        "{:?}",
        second.logs
    );
    let states = second.states(&r);
    assert_eq!(states.last(), Some(&OtaState::Applied));
}

#[test]
fn a_damaged_chunk_on_disk_is_fetched_again_after_a_restart() {
    let mut r = rig(3);
    let img = image(12_000, 3);
    r.release(2, &img, 1000);
    let out = out_path(&r);
    let mut first = r.boot(copy_to(&out));
    first.chunk_budget = Some(8);
    first.start(&mut r);
    let stored: Vec<u32> = first.fetched.iter().copied().take(8).collect();
    drop(first);
    // Bit rot (or a write the progress record should not have trusted) in one stored chunk.
    let victim = stored[1];
    let staging = r.files().staging_path(&r.g);
    let mut bytes = std::fs::read(&staging).unwrap();
    bytes[victim as usize * 1000 + 17] ^= 0x40;
    std::fs::write(&staging, &bytes).unwrap();

    let mut second = r.boot(copy_to(&out));
    // The key message is no longer retained: the saved key is enough.
    r.retained.retain(|t, _| !t.ends_with("/k"));
    second.start(&mut r);
    let again: Vec<u32> = second
        .fetched
        .iter()
        .copied()
        .filter(|j| stored.contains(j))
        .collect();
    assert_eq!(again, vec![victim]);
    assert_eq!(std::fs::read(&out).unwrap(), img);
    assert!(
        second
            .logs
            .iter()
            .any(|l| l.contains("7 of 8 chunks on disk intact")),
        "{:?}",
        second.logs
    );
}

#[test]
fn rollback_is_refused() {
    let mut r = rig(4);
    r.files()
        .record_installed(&r.g, 5, &DeviceId::new("release-1").unwrap())
        .unwrap();
    // v5 (the installed one) and v4 are still retained on the broker.
    r.release(5, &image(3_000, 5), 1000);
    r.release(4, &image(3_000, 4), 1000);
    let out = out_path(&r);
    let mut d = r.boot(copy_to(&out));
    d.start(&mut r);
    assert!(d.reports.is_empty(), "{:?}", d.states(&r));
    assert!(d.fetched.is_empty());
    assert_eq!(d.applied, 0);
    // A lower version placed on a higher version's topic is refused too (topic ≠ manifest).
    let m4 = r.retained[&format!("{GROUP}/_ota/release-1/4/m")].clone();
    let a = d.agent.on_publish(
        &format!("{GROUP}/_ota/release-1/9/m"),
        &m4,
        &r.dev.dev,
        r.w.now,
        &mut r.w.rng,
    );
    d.run(&mut r, a);
    assert!(d.reports.is_empty());
    assert!(
        d.logs.iter().any(|l| l.contains("topic does not match")),
        "{:?}",
        d.logs
    );
    // A newer one is taken.
    let img = image(3_000, 6);
    r.release(6, &img, 1000);
    let mut d = r.boot(copy_to(&out));
    d.start(&mut r);
    assert_eq!(std::fs::read(&out).unwrap(), img);
    assert_eq!(r.files().installed(&r.g).unwrap(), Some(6));
}

#[test]
fn a_release_from_an_unpinned_signer_is_refused() {
    let mut r = rig(5);
    // "rogue" is a genuine publisher of the group, with a valid certificate, but not pinned.
    r.w.register("rogue", &r.g.clone(), Role::Publisher);
    let mut rogue = Node::new(r.w.enroll("rogue"));
    let g = r.g.clone();
    r.w.join_node(&mut rogue, &g, Role::Publisher, false);
    r.w.flush(&mut [&mut r.signer, &mut r.dev, &mut rogue]);
    let rel = r.release_by(&rogue, 9, &image(2_000, 9), 1000);
    let out = out_path(&r);
    let mut d = r.boot(copy_to(&out));
    // Delivered to the device anyway (a broad subscription): refused by the pin.
    let m = rel.manifest();
    let a = d.agent.on_publish(
        &topic(m, OtaItem::Manifest),
        rel.manifest_message(),
        &r.dev.dev,
        r.w.now,
        &mut r.w.rng,
    );
    d.run(&mut r, a);
    assert!(
        d.logs.iter().any(|l| l.contains("signer not pinned")),
        "{:?}",
        d.logs
    );
    // Its manifest placed under the pinned signer's topic: refused as well.
    let a = d.agent.on_publish(
        &format!("{GROUP}/_ota/release-1/9/m"),
        rel.manifest_message(),
        &r.dev.dev,
        r.w.now,
        &mut r.w.rng,
    );
    d.run(&mut r, a);
    d.start(&mut r);
    assert!(d.reports.is_empty() && d.fetched.is_empty() && d.applied == 0);
    // The pinned signer's release with a forged signature (last byte flipped) is refused.
    let good = r.release(10, &image(2_000, 10), 1000);
    let mut forged = good.manifest_message().to_vec();
    *forged.last_mut().unwrap() ^= 1;
    let mut d = r.boot(copy_to(&out));
    let a = d.agent.on_publish(
        &topic(good.manifest(), OtaItem::Manifest),
        &forged,
        &r.dev.dev,
        r.w.now,
        &mut r.w.rng,
    );
    d.run(&mut r, a);
    assert!(d.reports.is_empty());
    assert!(
        d.logs.iter().any(|l| l.contains("bad signature")),
        "{:?}",
        d.logs
    );
}

#[test]
fn a_tampered_chunk_is_refused_and_a_corrected_one_accepted() {
    let mut r = rig(6);
    let img = image(5_000, 6);
    let rel = r.release(1, &img, 1000);
    let t2 = topic(rel.manifest(), OtaItem::Chunk(2));
    r.retained.get_mut(&t2).unwrap()[5] ^= 0x01;
    let out = out_path(&r);
    let mut d = r.boot(copy_to(&out));
    d.start(&mut r);
    assert_eq!(d.applied, 0);
    let reports = r.open_reports(&d.reports);
    let failed: Vec<&String> = reports
        .iter()
        .filter(|(_, s, _)| *s == OtaState::Failed)
        .map(|(_, _, d)| d)
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].contains("chunk 2 refused: chunk hash mismatch"),
        "{failed:?}"
    );
    assert!(d.subs.contains(&t2), "the bad chunk stays subscribed");
    // The signer republishes the right chunk (retained, same topic).
    let good = rel.chunks()[2].clone();
    r.retained.insert(t2.clone(), good.clone());
    let a = d
        .agent
        .on_publish(&t2, &good, &r.dev.dev, r.w.now, &mut r.w.rng);
    d.run(&mut r, a);
    assert_eq!(std::fs::read(&out).unwrap(), img);
    assert_eq!(d.states(&r).last(), Some(&OtaState::Applied));
}

#[test]
fn a_failing_apply_is_reported_and_the_version_not_recorded() {
    let mut r = rig(7);
    r.release(4, &image(3_000, 7), 1000);
    let mut d = r.boot(failing());
    d.start(&mut r);
    assert_eq!(d.applied, 1);
    let reports = r.open_reports(&d.reports);
    let (v, state, detail) = reports.last().unwrap().clone();
    assert_eq!((v, state), (4, OtaState::Failed));
    assert!(
        detail.contains("exit status: 3") && detail.ends_with("no space left on /usr"),
        "{detail}"
    );
    assert!(!reports.iter().any(|(_, s, _)| *s == OtaState::Applied));
    assert_eq!(d.agent.installed(&r.g), None);
    assert_eq!(r.files().installed(&r.g).unwrap(), None);
    // Not retried in a loop by the same process.
    let a = d.agent.tick(&r.dev.dev, r.w.now + 1000, &mut r.w.rng);
    d.run(&mut r, a);
    d.start(&mut r);
    assert_eq!(d.applied, 1);
}

#[test]
fn an_image_over_the_limit_is_refused_and_reported() {
    let mut r = rig(8);
    r.settings.max_image_bytes = 4_000;
    r.release(2, &image(4_001, 8), 1000);
    let out = out_path(&r);
    let mut d = r.boot(copy_to(&out));
    d.start(&mut r);
    let reports = r.open_reports(&d.reports);
    assert_eq!(reports.len(), 1);
    assert_eq!(
        (reports[0].1, reports[0].2.as_str()),
        (OtaState::Failed, "image too large")
    );
    assert!(d.fetched.is_empty() && d.applied == 0);
}

#[test]
fn need_key_is_asked_once_per_epoch_and_a_direct_key_is_accepted() {
    let mut w = World::new(9);
    let g = w.group(GROUP);
    w.register("release-1", &g, Role::Publisher);
    w.register("dev-1", &g, Role::Subscriber);
    let mut signer = Node::new(w.enroll("release-1"));
    w.join_node(&mut signer, &g, Role::Publisher, true);
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig {
        settings: OtaSettings {
            groups: vec![g.clone()],
            signers: vec![DeviceId::new("release-1").unwrap()],
            download_dir: dir.path().join("ota"),
            apply_command: Vec::new(),
            max_image_bytes: 1 << 20,
            apply_timeout: std::time::Duration::from_secs(600),
        },
        dev: Node::new(w.enroll("dev-1")),
        w,
        g: g.clone(),
        signer,
        retained: BTreeMap::new(),
        dir,
    };
    // The release and its key message are made before the device joins: the key message is of
    // an epoch the device never held (the signer is offline afterwards and does not republish).
    let img = image(4_500, 9);
    let rel = r.release(7, &img, 1000);
    let (w, dev, signer) = (&mut r.w, &mut r.dev, &mut r.signer);
    w.join_node(dev, &g, Role::Subscriber, false);
    w.flush(&mut [signer, dev]);
    let out = out_path(&r);
    let mut d = r.boot(copy_to(&out));
    d.start(&mut r);
    let states = d.states(&r);
    assert_eq!(states, [OtaState::Available, OtaState::NeedKey]);
    // Both were sealed in the same millisecond, yet with increasing T_ms: the signer's book, which
    // keeps the highest T_ms per device and version, holds `need-key`, the state it answers.
    let mut book = quva_client::ota::StatusBook::new();
    for status in r.received(&d.reports) {
        book.record(status);
    }
    let latest = book.get(&g, &DeviceId::new("dev-1").unwrap(), 7).unwrap();
    assert_eq!(latest.state, OtaState::NeedKey);
    // The retained key message again (a reconnection) and time passing: no second request.
    d.start(&mut r);
    d.tick(&mut r);
    r.w.now += 60_000;
    d.tick(&mut r);
    assert_eq!(d.states(&r), [OtaState::Available, OtaState::NeedKey]);
    assert!(d.fetched.is_empty());

    // The signer answers with K_c as a direct message (PROTOCOL.md §7.1).
    let sc = r.signer.dev.credentials();
    let bytes = DirectSealer {
        key: sc.key(),
        cert: sc.cert(),
    }
    .seal(
        r.dev.dev.id(),
        r.dev.dev.credentials().key().public(),
        r.w.now,
        &rel.key_message().to_bytes(),
        &mut r.w.rng,
    )
    .unwrap();
    let lists = vec![r.dev.dev.member_list(&g).unwrap().clone()];
    let direct = UnverifiedDirect::decode(&bytes)
        .unwrap()
        .open(
            r.dev.dev.id(),
            r.dev.dev.credentials().key(),
            r.dev.dev.ca_public(),
            &lists,
            DirectFloor::NONE,
            r.w.now,
        )
        .unwrap()
        .commit();
    let a = d
        .agent
        .on_direct(&direct, &r.dev.dev, r.w.now, &mut r.w.rng);
    d.run(&mut r, a);
    assert_eq!(std::fs::read(&out).unwrap(), img);
    assert_eq!(
        d.states(&r),
        [
            OtaState::Available,
            OtaState::NeedKey,
            OtaState::Downloading,
            OtaState::Verified,
            OtaState::Applied
        ]
    );
}

#[test]
fn a_key_from_another_sender_is_not_accepted() {
    let mut r = rig(10);
    let img = image(2_000, 10);
    let rel = r.release(3, &img, 1000);
    // The device (a subscriber) could not send on the data topic through the bridge, but its
    // option-2 forward message would open: the sender check refuses it.
    r.w.register("dev-2", &r.g.clone(), Role::Publisher);
    let mut other = Node::new(r.w.enroll("dev-2"));
    let g = r.g.clone();
    r.w.join_node(&mut other, &g, Role::Publisher, false);
    r.w.flush(&mut [&mut r.signer, &mut r.dev, &mut other]);
    let (_, forged) = other
        .dev
        .seal(
            &g,
            Protection::Confidential,
            Direction::Forward,
            &rel.key_message().to_bytes(),
            r.w.now,
            &mut r.w.rng,
        )
        .unwrap();
    r.retained
        .insert(topic(rel.manifest(), OtaItem::Key), forged);
    let out = out_path(&r);
    let mut d = r.boot(copy_to(&out));
    d.start(&mut r);
    assert_eq!(d.states(&r), [OtaState::Available]);
    assert!(
        d.logs
            .iter()
            .any(|l| l.contains("key message from another sender")),
        "{:?}",
        d.logs
    );
    assert!(d.fetched.is_empty());
}

#[test]
fn releases_are_followed_by_wildcards_inside_the_group_ota_level_only() {
    let r = rig(11);
    let signer = DeviceId::new("release-1").unwrap();
    r.files().record_installed(&r.g, 2, &signer).unwrap();
    let d = r.boot(copy_to(&out_path(&r)));
    let [OtaAction::Subscribe(filters)] = &d.agent.start()[..] else {
        panic!("one subscription expected");
    };
    // The filters the bridge grants to the group's subscribers (`<group>/_ota/…` with the group
    // spelt out), one pair per pinned signer, whatever the installed version.
    assert_eq!(
        filters,
        &[
            format!("{GROUP}/_ota/release-1/+/m"),
            format!("{GROUP}/_ota/release-1/+/k")
        ]
    );
    assert!(filters.iter().all(|f| d.agent.is_release_filter(f)));
    assert!(
        !d.agent
            .is_release_filter(&format!("{GROUP}/_ota/other/+/m"))
    );
    assert!(
        !d.agent
            .is_release_filter(&format!("{GROUP}/_ota/release-1/7/c/0"))
    );
}

#[test]
fn the_installed_version_is_recorded_with_its_signer() {
    let mut r = rig(13);
    let img = image(2_000, 13);
    r.release(3, &img, 1000);
    let mut d = r.boot(copy_to(&out_path(&r)));
    d.start(&mut r);
    assert_eq!(
        r.files().installed_release(&r.g).unwrap(),
        Some((3, Some(DeviceId::new("release-1").unwrap())))
    );
    // A record written before the signer was kept (`str(G) || u64 v`) still reads.
    let files = r.files();
    let path = files.path().join(format!(
        "{}.installed",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            GROUP.as_bytes()
        )
    ));
    let mut old = Vec::new();
    quva_client::codec::put_str(&mut old, GROUP);
    quva_client::codec::put_u64(&mut old, 2);
    crate::store::KeyStore::create(files.path())
        .unwrap()
        .write_record(&path, 0x10, &old)
        .unwrap();
    assert_eq!(r.files().installed_release(&r.g).unwrap(), Some((2, None)));
    assert_eq!(r.files().installed(&r.g).unwrap(), Some(2));
}

/// The signer's answer to `need-key`: `m` sealed as a direct message to the device, opened.
fn direct_from_signer(r: &mut Rig, m: &[u8]) -> quva_client::direct::VerifiedDirect {
    let sc = r.signer.dev.credentials();
    let bytes = DirectSealer {
        key: sc.key(),
        cert: sc.cert(),
    }
    .seal(
        r.dev.dev.id(),
        r.dev.dev.credentials().key().public(),
        r.w.now,
        m,
        &mut r.w.rng,
    )
    .unwrap();
    let lists = vec![r.dev.dev.member_list(&r.g).unwrap().clone()];
    UnverifiedDirect::decode(&bytes)
        .unwrap()
        .open(
            r.dev.dev.id(),
            r.dev.dev.credentials().key(),
            r.dev.dev.ca_public(),
            &lists,
            DirectFloor::NONE,
            r.w.now,
        )
        .unwrap()
        .commit()
}

#[test]
fn a_direct_key_that_arrives_before_its_manifest_waits_for_it() {
    let mut w = World::new(14);
    let g = w.group(GROUP);
    w.register("release-1", &g, Role::Publisher);
    w.register("dev-1", &g, Role::Subscriber);
    let mut signer = Node::new(w.enroll("release-1"));
    w.join_node(&mut signer, &g, Role::Publisher, true);
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig {
        settings: OtaSettings {
            groups: vec![g.clone()],
            signers: vec![DeviceId::new("release-1").unwrap()],
            download_dir: dir.path().join("ota"),
            apply_command: Vec::new(),
            max_image_bytes: 1 << 20,
            apply_timeout: std::time::Duration::from_secs(600),
        },
        dev: Node::new(w.enroll("dev-1")),
        w,
        g: g.clone(),
        signer,
        retained: BTreeMap::new(),
        dir,
    };
    // The key message is of an epoch the device never held: only a direct message can help.
    let img = image(3_000, 14);
    let rel = r.release(5, &img, 1000);
    let (w, dev, signer) = (&mut r.w, &mut r.dev, &mut r.signer);
    w.join_node(dev, &g, Role::Subscriber, false);
    w.flush(&mut [signer, dev]);
    let out = out_path(&r);
    let mut d = r.boot(copy_to(&out));
    // The signer's answer waited at the broker and arrives first, before any manifest.
    let direct = direct_from_signer(&mut r, &rel.key_message().to_bytes());
    let a = d
        .agent
        .on_direct(&direct, &r.dev.dev, r.w.now, &mut r.w.rng);
    assert!(!a.is_empty(), "the key is kept");
    d.run(&mut r, a);
    assert!(d.fetched.is_empty());
    // Then the retained manifest and key message: the kept key serves, without `need-key`.
    d.start(&mut r);
    assert_eq!(std::fs::read(&out).unwrap(), img);
    assert_eq!(
        d.states(&r),
        [
            OtaState::Available,
            OtaState::Downloading,
            OtaState::Verified,
            OtaState::Applied
        ]
    );
    assert!(
        d.logs
            .iter()
            .any(|l| l.contains("key received from release-1 as a direct message")),
        "{:?}",
        d.logs
    );
}

#[test]
fn a_newer_release_waits_while_one_is_applied_then_follows() {
    let mut r = rig(12);
    r.release(3, &image(2_000, 3), 1000);
    let out = out_path(&r);
    // The apply command of v3 is still running when v4 is published.
    let mut d = r.boot(copy_to(&out));
    d.hold_apply = true;
    d.start(&mut r);
    let (g, v) = d.held.take().expect("v3 is being applied");
    assert_eq!(v, 3);
    let img4 = image(2_000, 4);
    let rel4 = r.release(4, &img4, 1000);
    // Its manifest and key message arrive live on the release subscriptions.
    for item in [OtaItem::Manifest, OtaItem::Key] {
        let t = topic(rel4.manifest(), item);
        let p = r.retained[&t].clone();
        let a = d
            .agent
            .on_publish(&t, &p, &r.dev.dev, r.w.now, &mut r.w.rng);
        d.run(&mut r, a);
    }
    assert!(
        d.files.staging_path(&g).exists(),
        "the image being applied was discarded"
    );
    assert_eq!(d.agent.installed(&g), None);
    // v3's apply succeeds: recorded, then v4 is taken (its key message is retained).
    d.hold_apply = false;
    let res = d.apply.run(&d.files.staging_path(&g), &g, 3, "n");
    let a = d
        .agent
        .on_apply_result(&g, 3, res, &r.dev.dev, r.w.now, &mut r.w.rng);
    d.run(&mut r, a);
    let versions: Vec<(u64, OtaState)> = r
        .open_reports(&d.reports)
        .into_iter()
        .map(|(v, s, _)| (v, s))
        .collect();
    assert!(versions.contains(&(3, OtaState::Applied)), "{versions:?}");
    assert_eq!(r.files().installed(&g).unwrap(), Some(4), "{versions:?}");
    assert_eq!(versions.last(), Some(&(4, OtaState::Applied)));
    assert_eq!(std::fs::read(&out).unwrap(), img4);
}
