use quva_client::direct::DirectRejection;
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_client::message::{Direction, Protection, UnverifiedMessage};
use quva_client::ota::{KeyMessage, OtaState, StatusReport, UnverifiedManifest};
use quva_client::topics::OtaItem;

use super::*;
use crate::direct::{DirectBook, receive_direct};
use quva_client::testkit::{Node, World};

/// `rel-1` publishes (signs releases) in `fw/a`; `sensor-01` and `sensor-02` subscribe.
struct Setup {
    w: World,
    g: GroupId,
    signer: Node,
    s1: Node,
    s2: Node,
}

fn setup(seed: u64) -> Setup {
    let mut w = World::new(seed);
    let g = w.group("fw/a");
    w.register("rel-1", &g, Role::Publisher);
    w.register("sensor-01", &g, Role::Subscriber);
    w.register("sensor-02", &g, Role::Subscriber);
    let mut signer = Node::new(w.enroll("rel-1"));
    let mut s1 = Node::new(w.enroll("sensor-01"));
    let mut s2 = Node::new(w.enroll("sensor-02"));
    w.join_node(&mut signer, &g, Role::Publisher, true);
    w.join_node(&mut s1, &g, Role::Subscriber, true);
    w.join_node(&mut s2, &g, Role::Subscriber, true);
    w.flush(&mut [&mut signer, &mut s1, &mut s2]);
    Setup {
        w,
        g,
        signer,
        s1,
        s2,
    }
}

/// What a subscriber reads from a retained key message: M, if it opens.
fn open_key(node: &Node, payload: &[u8], now: u64) -> Option<KeyMessage> {
    let msg = UnverifiedMessage::decode(payload).ok()?;
    let view = node.dev.view(now);
    let v = msg
        .verify_without_window(&view, &view, &node.dev.config().policy, now)
        .ok()?;
    KeyMessage::from_bytes(v.payload()).ok()
}

fn report(node: &Node, w: &mut World, g: &GroupId, v: u64, state: OtaState, t: u64) -> Vec<u8> {
    let m = StatusReport {
        version: v,
        state,
        detail: String::new(),
    }
    .to_bytes()
    .unwrap();
    node.dev
        .seal(
            g,
            Protection::Confidential,
            Direction::Query,
            &m,
            t,
            &mut w.rng,
        )
        .unwrap()
        .1
}

fn cut(s: &mut Setup, releases: &Releases, v: u64, image: &[u8]) -> (Vec<Deposit>, StoredRelease) {
    cut_release(
        &s.signer.dev,
        releases,
        &s.g,
        v,
        "fw.bin",
        image,
        1000,
        s.w.now,
        &mut s.w.rng,
    )
    .unwrap()
}

#[test]
fn a_release_deposits_manifest_chunks_and_a_key_message_subscribers_open() {
    let mut s = setup(1);
    let image = vec![7u8; 2500];
    let (deposits, stored) = cut(&mut s, &Releases::default(), 3, &image);
    let topics: Vec<&str> = deposits.iter().map(|d| d.topic.as_str()).collect();
    assert_eq!(
        topics,
        [
            "fw/a/_ota/rel-1/3/m",
            "fw/a/_ota/rel-1/3/c/0",
            "fw/a/_ota/rel-1/3/c/1",
            "fw/a/_ota/rel-1/3/c/2",
            "fw/a/_ota/rel-1/3/k",
        ]
    );
    assert_eq!(stored.sizes(), Some((2500, 3)));
    let key = deposits.last().unwrap();
    assert_eq!(key.item, OtaItem::Key);
    let m = open_key(&s.s1, &key.payload, s.w.now).expect("a subscriber opens the key message");
    assert_eq!(m, stored.key);
    assert_eq!(m.version, 3);
    // The key message is not readable by a publisher-side key alone: it is option 2 to Q_P.
    assert!(open_key(&s.signer, &key.payload, s.w.now).is_none());
}

#[test]
fn a_version_is_released_once_and_the_store_keeps_it() {
    let mut s = setup(2);
    let mut releases = Releases::default();
    let (_, stored) = cut(&mut s, &releases, 1, b"image");
    releases.insert(stored.clone());
    let err = cut_release(
        &s.signer.dev,
        &releases,
        &s.g,
        1,
        "fw.bin",
        b"other",
        1000,
        s.w.now,
        &mut s.w.rng,
    )
    .unwrap_err();
    assert!(matches!(err, SignerError::AlreadyReleased { .. }), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let store = KeyStore::create(dir.path().join("signer")).unwrap();
    releases.save(&store).unwrap();
    let back = Releases::load(&store).unwrap();
    let r = back.get(&s.g, 1).unwrap();
    assert_eq!(r.key, stored.key);
    assert_eq!(r.manifest_message, stored.manifest_message);
    assert_eq!(r.key_epoch, stored.key_epoch);
}

#[test]
fn a_new_epoch_gets_a_key_message_sealed_with_its_keys() {
    let mut s = setup(3);
    let mut releases = Releases::default();
    let (_, stored) = cut(&mut s, &releases, 5, b"firmware bytes");
    let old_epoch = stored.key_epoch.unwrap();
    releases.insert(stored);
    // Same epoch: nothing to republish.
    let none = releases
        .key_messages_for(&s.signer.dev, &s.g, s.w.now, &mut s.w.rng)
        .unwrap();
    assert!(none.is_empty());
    // sensor-02 leaves: a new epoch.
    let published = s.w.leave(&s.g, "sensor-02", Role::Subscriber);
    s.w.deliver(&mut [&mut s.signer, &mut s.s1, &mut s.s2], &published);
    s.w.flush(&mut [&mut s.signer, &mut s.s1, &mut s.s2]);
    let new_epoch = s.signer.dev.keyring(&s.g, Role::Publisher).unwrap().epoch();
    assert!(new_epoch > old_epoch);
    let again = releases
        .key_messages_for(&s.signer.dev, &s.g, s.w.now, &mut s.w.rng)
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].topic, "fw/a/_ota/rel-1/5/k");
    assert_eq!(releases.get(&s.g, 5).unwrap().key_epoch, Some(new_epoch));
    assert!(open_key(&s.s1, &again[0].payload, s.w.now).is_some());
    // The removed device cannot open the new epoch's key message.
    assert!(open_key(&s.s2, &again[0].payload, s.w.now).is_none());
    // Once done, not again.
    assert!(
        releases
            .key_messages_for(&s.signer.dev, &s.g, s.w.now, &mut s.w.rng)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn reports_are_collected_late_and_the_newest_wins() {
    let mut s = setup(4);
    let mut ledger = StatusLedger::default();
    let t = s.w.now;
    let downloading = report(&s.s1, &mut s.w, &s.g, 5, OtaState::Downloading, t);
    let applied = report(&s.s1, &mut s.w, &s.g, 5, OtaState::Applied, t + 10);
    // Collected an hour later, newest first: no time window, and the older one does not win.
    let later = t + 3_600_000;
    let (st, changed) = ledger
        .on_query(&s.signer.dev, &KeyArchive::default(), &applied, later)
        .unwrap();
    assert!(changed);
    assert_eq!(st.device.as_str(), "sensor-01");
    let (_, changed) = ledger
        .on_query(&s.signer.dev, &KeyArchive::default(), &downloading, later)
        .unwrap();
    assert!(!changed, "an older report never overwrites a newer one");
    let (_, changed) = ledger
        .on_query(&s.signer.dev, &KeyArchive::default(), &applied, later)
        .unwrap();
    assert!(!changed, "a replay changes nothing");
    let e = ledger
        .book()
        .get(&s.g, &DeviceId::new("sensor-01").unwrap(), 5)
        .unwrap();
    assert_eq!(e.state, OtaState::Applied);
    // A tampered report is refused.
    let mut bad = applied.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    assert!(
        ledger
            .on_query(&s.signer.dev, &KeyArchive::default(), &bad, later)
            .is_err()
    );
    // A plain query (not a report) is refused as such.
    let q =
        s.s1.dev
            .seal(
                &s.g,
                Protection::Confidential,
                Direction::Query,
                b"temp?",
                t,
                &mut s.w.rng,
            )
            .unwrap()
            .1;
    assert!(matches!(
        ledger.on_query(&s.signer.dev, &KeyArchive::default(), &q, t),
        Err(ReportRejection::NotReport(_))
    ));
    // The ledger survives a restart.
    let back = StatusLedger::from_bytes(&ledger.to_bytes()).unwrap();
    let e = back
        .book()
        .get(&s.g, &DeviceId::new("sensor-01").unwrap(), 5)
        .unwrap();
    assert_eq!((e.state, e.t_ms), (OtaState::Applied, t + 10));
}

#[test]
fn need_key_is_answered_by_direct_message_to_current_subscribers_only() {
    let mut s = setup(5);
    let mut releases = Releases::default();
    let (_, stored) = cut(&mut s, &releases, 2, b"fw");
    releases.insert(stored.clone());
    let mut ledger = StatusLedger::default();
    let mut direct = DirectBook::default();
    let t = s.w.now;
    let need = report(&s.s1, &mut s.w, &s.g, 2, OtaState::NeedKey, t);
    let (st, _) = ledger
        .on_query(&s.signer.dev, &KeyArchive::default(), &need, t)
        .unwrap();
    let (topic, wire) = ledger
        .answer_need_key(&s.signer.dev, &releases, &mut direct, &st, t, &mut s.w.rng)
        .unwrap()
        .expect("answered");
    assert_eq!(topic, "quva/d/sensor-01");
    let staged = receive_direct(&s.s1.dev, &DirectBook::default(), &topic, &wire, t).unwrap();
    let m = staged.commit();
    assert_eq!(KeyMessage::from_bytes(m.payload()).unwrap(), stored.key);
    // Not twice within the interval.
    assert!(
        ledger
            .answer_need_key(
                &s.signer.dev,
                &releases,
                &mut direct,
                &st,
                t + 1,
                &mut s.w.rng
            )
            .unwrap()
            .is_none()
    );
    // A report for a version this signer never released: nothing to send.
    let unknown = report(&s.s1, &mut s.w, &s.g, 9, OtaState::NeedKey, t + 2);
    let (st9, _) = ledger
        .on_query(&s.signer.dev, &KeyArchive::default(), &unknown, t + 2)
        .unwrap();
    assert!(
        ledger
            .answer_need_key(
                &s.signer.dev,
                &releases,
                &mut direct,
                &st9,
                t + 2,
                &mut s.w.rng
            )
            .unwrap()
            .is_none()
    );
    // sensor-02 asks, then is removed before the signer answers: no key for it.
    let need2 = report(&s.s2, &mut s.w, &s.g, 2, OtaState::NeedKey, t + 3);
    let (st2, _) = ledger
        .on_query(&s.signer.dev, &KeyArchive::default(), &need2, t + 3)
        .unwrap();
    let published = s.w.leave(&s.g, "sensor-02", Role::Subscriber);
    s.w.deliver(&mut [&mut s.signer, &mut s.s1, &mut s.s2], &published);
    s.w.flush(&mut [&mut s.signer, &mut s.s1, &mut s.s2]);
    assert!(
        !s.signer
            .dev
            .lists_member(&s.g, &st2.device, Role::Subscriber)
    );
    let later = t + NEED_KEY_INTERVAL_MS + 10;
    assert!(
        ledger
            .answer_need_key(
                &s.signer.dev,
                &releases,
                &mut direct,
                &st2,
                later,
                &mut s.w.rng
            )
            .unwrap()
            .is_none(),
        "a removed subscriber gets no key"
    );
    // The direct answer to sensor-01 is refused at sensor-02 (not its message).
    let r = receive_direct(&s.s2.dev, &DirectBook::default(), &topic, &wire, t);
    assert_eq!(r.err(), Some(DirectRejection::NotForMe));
}

#[test]
fn a_report_from_an_epoch_past_the_grace_opens_only_with_the_archived_key() {
    let mut s = setup(6);
    let mut archive = KeyArchive::default();
    assert!(archive.remember(&s.signer.dev, &s.g, s.w.now));
    assert!(
        !archive.remember(&s.signer.dev, &s.g, s.w.now),
        "an epoch is archived once"
    );
    let t = s.w.now;
    let old = report(&s.s1, &mut s.w, &s.g, 5, OtaState::Applied, t);
    // Two rekeys and a day later, the report is collected from the persistent session.
    for _ in 0..2 {
        let published = s.w.periodic(&s.g);
        s.w.deliver(&mut [&mut s.signer, &mut s.s1, &mut s.s2], &published);
        s.w.flush(&mut [&mut s.signer, &mut s.s1, &mut s.s2]);
        s.w.now += 60_000;
        s.signer.dev.tick(s.w.now, &mut s.w.rng);
    }
    let later = t + 86_400_000;
    s.signer.dev.tick(later, &mut s.w.rng);
    let mut ledger = StatusLedger::default();
    // Without the archive the signer no longer holds that epoch's d_S.
    assert!(
        ledger
            .on_query(&s.signer.dev, &KeyArchive::default(), &old, later)
            .is_err()
    );
    let (st, changed) = ledger
        .on_query(&s.signer.dev, &archive, &old, later)
        .unwrap();
    assert!(changed);
    assert_eq!(st.report.state, OtaState::Applied);
    // The archive survives a restart, checked against Q_CA; past the retention it is of no use.
    let q_ca = *s.signer.dev.ca_public();
    let back = KeyArchive::from_bytes(&archive.to_bytes(), &q_ca).unwrap();
    let mut fresh = StatusLedger::default();
    assert!(fresh.on_query(&s.signer.dev, &back, &old, later).is_ok());
    let expired = t + REPORT_KEY_RETENTION_MS + 1;
    assert!(
        StatusLedger::default()
            .on_query(&s.signer.dev, &back, &old, expired)
            .is_err()
    );
    // A sender no longer listed as a subscriber is refused for the archived epoch.
    let published = s.w.leave(&s.g, "sensor-01", Role::Subscriber);
    s.w.deliver(&mut [&mut s.signer, &mut s.s1, &mut s.s2], &published);
    s.w.flush(&mut [&mut s.signer, &mut s.s1, &mut s.s2]);
    assert!(
        StatusLedger::default()
            .on_query(&s.signer.dev, &back, &old, later)
            .is_err()
    );
    // An archive whose key is not its epoch's d_S is refused at loading.
    let other = KeyArchive::from_bytes(&archive.to_bytes(), s.s1.dev.credentials().key().public());
    assert!(
        other.is_err(),
        "another CA's key does not verify the group info"
    );
}

#[test]
fn after_a_renewal_manifests_are_signed_again_and_key_messages_follow() {
    let mut s = setup(7);
    let mut releases = Releases::default();
    let (deposits, stored) = cut(&mut s, &releases, 4, b"0123456789abcdef");
    releases.insert(stored.clone());
    // With the current certificate there is nothing to sign again.
    assert!(
        releases
            .resign_after_renewal(&s.signer.dev, s.w.now, &mut s.w.rng)
            .unwrap()
            .is_empty()
    );
    assert!(signer_is_listed(&s.signer.dev, &s.g));
    // The signer gets a new certificate (same ID, new key and serial).
    let renewed = s.w.enroll("rel-1");
    assert!(
        !signer_is_listed(&renewed, &s.g),
        "no list names the new certificate yet"
    );
    assert_ne!(
        renewed.credentials().cert(),
        s.signer.dev.credentials().cert()
    );
    let later = s.w.now + 1000;
    let out = releases
        .resign_after_renewal(&renewed, later, &mut s.w.rng)
        .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].topic, "fw/a/_ota/rel-1/4/m");
    let new = UnverifiedManifest::decode(&out[0].payload).unwrap();
    let old = UnverifiedManifest::decode(&deposits[0].payload).unwrap();
    assert_eq!(&new.manifest().cert, renewed.credentials().cert());
    assert_eq!(new.manifest().chunk_hashes, old.manifest().chunk_hashes);
    assert_eq!(new.manifest().t_ms, later);
    let r = releases.get(&s.g, 4).unwrap();
    assert_eq!(r.manifest_message, out[0].payload);
    assert_eq!(r.key.manifest_hash, new.manifest().hash());
    assert_ne!(r.key.manifest_hash, stored.key.manifest_hash);
    assert_eq!(
        r.key.content_key, stored.key.content_key,
        "same chunks, same K_c"
    );
    assert_eq!(
        r.key_epoch, None,
        "the key message is sealed again at the next epoch check"
    );
    // Done once.
    assert!(
        releases
            .resign_after_renewal(&renewed, later, &mut s.w.rng)
            .unwrap()
            .is_empty()
    );
}
