//! The bridge's OTA checks without sockets: real certificates and releases from quva-client,
//! each rule attacked and refused.

use quva_client::codec::Encode;
use quva_client::curve::KeyPair;
use quva_client::enrollment::{Credentials, EnrollmentSecret, ImplicitCert, PendingEnrollment};
use quva_client::ids::{Epoch, GroupId};
use quva_client::message::Sealer;
use quva_client::ota::{Release, ReleaseSigner};
use quva_client::schnorr::VerifyingKey;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use super::*;

const NOW: u64 = 1_800_000_000_000;
const DAY: u64 = 86_400_000;
const WINDOW: u64 = 60_000;
const GROUP: &str = "fw/sensor";

/// The certificates a group's current member list holds for its publishers.
struct Listed(Vec<ImplicitCert>);

impl SignerListing for Listed {
    fn lists_publisher(&self, group: &GroupId, cert: &ImplicitCert, _q: &VerifyingKey) -> bool {
        group.as_str() == GROUP && self.0.iter().any(|c| c.to_bytes() == cert.to_bytes())
    }
}

struct World {
    rng: ChaCha20Rng,
    ca: KeyPair,
    signer: Credentials,
    other: Credentials,
}

impl World {
    fn new() -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let ca = KeyPair::random(&mut rng);
        let signer = enroll(&mut rng, &ca, "rel-1", 1);
        let other = enroll(&mut rng, &ca, "rel-2", 2);
        World {
            rng,
            ca,
            signer,
            other,
        }
    }

    fn listed(&self) -> Listed {
        Listed(vec![self.signer.cert().clone(), self.other.cert().clone()])
    }

    fn release_by(&mut self, who: &Credentials, version: u64, t_ms: u64) -> Release {
        let group = GroupId::new(GROUP).unwrap();
        ReleaseSigner {
            group: &group,
            key: who.key(),
            cert: who.cert(),
        }
        .release(
            version,
            "fw.bin",
            &[0x5a; 2_500],
            1_000,
            t_ms,
            &mut self.rng,
        )
        .unwrap()
    }

    fn release(&mut self, version: u64) -> Release {
        let signer = self.signer.clone();
        self.release_by(&signer, version, NOW)
    }
}

fn enroll(rng: &mut ChaCha20Rng, ca: &KeyPair, id: &str, serial: u64) -> Credentials {
    let secret = EnrollmentSecret::random(rng);
    let pending = PendingEnrollment::new(DeviceId::new(id).unwrap(), NOW, rng);
    let response = pending
        .enroll_request(&secret)
        .verify(&secret, NOW, 60_000)
        .unwrap()
        .issue(ca, serial, NOW - DAY, NOW + 30 * DAY, rng)
        .unwrap();
    pending.accept(&response, ca.public()).unwrap()
}

fn topic(t: &str) -> OtaTopic {
    OtaTopic::parse(t).unwrap()
}

fn device(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

/// Checks a manifest as the bridge does, with the default limits and `listed` publishers.
fn check(
    w: &World,
    listed: &Listed,
    on: &str,
    connection: &str,
    payload: &[u8],
    replay: &mut BridgeReplay,
    now: u64,
) -> Result<VerifiedManifest, OtaRefusal> {
    check_with(
        w,
        listed,
        OtaPolicy::default(),
        on,
        connection,
        payload,
        replay,
        now,
    )
}

#[allow(clippy::too_many_arguments)]
fn check_with(
    w: &World,
    listed: &Listed,
    policy: OtaPolicy,
    on: &str,
    connection: &str,
    payload: &[u8],
    replay: &mut BridgeReplay,
    now: u64,
) -> Result<VerifiedManifest, OtaRefusal> {
    let checks = ManifestChecks {
        q_ca: w.ca.public(),
        signers: listed,
        policy,
        window_ms: WINDOW,
    };
    check_manifest(
        &topic(on),
        &device(connection),
        payload,
        &checks,
        replay,
        now,
    )
}

const M7: &str = "fw/sensor/_ota/rel-1/7/m";

#[test]
fn an_honest_manifest_passes_once() {
    let mut w = World::new();
    let r = w.release(7);
    let listed = w.listed();
    let mut replay = BridgeReplay::default();
    let m = check(
        &w,
        &listed,
        M7,
        "rel-1",
        r.manifest_message(),
        &mut replay,
        NOW,
    )
    .unwrap();
    assert_eq!(m.manifest().version, 7);
    // The same bytes again, from the same connection: a replay.
    assert_eq!(
        check(
            &w,
            &listed,
            M7,
            "rel-1",
            r.manifest_message(),
            &mut replay,
            NOW + 1
        ),
        Err(OtaRefusal::Message(Rejection::Replayed))
    );
}

#[test]
fn a_manifest_is_refused_for_each_broken_rule() {
    let mut w = World::new();
    let r = w.release(7);
    let msg = r.manifest_message().to_vec();
    let listed = w.listed();
    let fresh = BridgeReplay::default;
    let refused = |on: &str, conn: &str, payload: &[u8], listed: &Listed, now: u64| {
        check(&w, listed, on, conn, payload, &mut fresh(), now).unwrap_err()
    };
    // Published by another device on its own topic: the signer is not the connection.
    assert_eq!(
        refused("fw/sensor/_ota/rel-2/7/m", "rel-2", &msg, &listed, NOW),
        OtaRefusal::Ota(OtaError::TopicMismatch)
    );
    assert_eq!(
        refused(M7, "rel-2", &msg, &listed, NOW),
        OtaRefusal::Ota(OtaError::SignerMismatch)
    );
    // On another version's topic, or another group's.
    assert_eq!(
        refused("fw/sensor/_ota/rel-1/8/m", "rel-1", &msg, &listed, NOW),
        OtaRefusal::Ota(OtaError::TopicMismatch)
    );
    assert_eq!(
        refused("fw/other/_ota/rel-1/7/m", "rel-1", &msg, &listed, NOW),
        OtaRefusal::Ota(OtaError::TopicMismatch)
    );
    // The signer is not (or no longer) a publisher of the group with this certificate.
    assert_eq!(
        refused(
            M7,
            "rel-1",
            &msg,
            &Listed(vec![w.other.cert().clone()]),
            NOW
        ),
        OtaRefusal::Ota(OtaError::SignerNotListed)
    );
    // Outside the time window, either way.
    assert_eq!(
        refused(M7, "rel-1", &msg, &listed, NOW + WINDOW + 1),
        OtaRefusal::Message(Rejection::StaleTimestamp)
    );
    assert_eq!(
        refused(M7, "rel-1", &msg, &listed, NOW - WINDOW - 1),
        OtaRefusal::Message(Rejection::FutureTimestamp)
    );
    // A forged signature (last byte flipped).
    let mut forged = msg.clone();
    *forged.last_mut().unwrap() ^= 1;
    assert_eq!(
        refused(M7, "rel-1", &forged, &listed, NOW),
        OtaRefusal::Ota(OtaError::BadSignature)
    );
    // The window is checked before the signature: a stale forgery costs no verification.
    assert_eq!(
        refused(M7, "rel-1", &forged, &listed, NOW + WINDOW + 1),
        OtaRefusal::Message(Rejection::StaleTimestamp)
    );
    // A changed chunk hash: the signature no longer covers it.
    let mut changed = msg.clone();
    let at = r.manifest().to_bytes().len() - 8 - 1;
    changed[at] ^= 1;
    assert_eq!(
        refused(M7, "rel-1", &changed, &listed, NOW),
        OtaRefusal::Ota(OtaError::BadSignature)
    );
    // Garbage and oversize payloads: 0x99 before any cryptography.
    let garbage = refused(M7, "rel-1", b"not a manifest", &listed, NOW);
    assert!(matches!(garbage, OtaRefusal::Ota(OtaError::Malformed(_))));
    assert_eq!(garbage.puback_reason().code(), 0x99);
    let limits = OtaPolicy {
        max_manifest_len: msg.len() - 1,
        ..OtaPolicy::default()
    };
    let big = check_with(&w, &listed, limits, M7, "rel-1", &msg, &mut fresh(), NOW).unwrap_err();
    assert_eq!(big, OtaRefusal::Ota(OtaError::TooLarge));
    assert_eq!(big.puback_reason().code(), 0x99);
    // An image over the configured limit.
    let limits = OtaPolicy {
        max_image_size: 2_499,
        ..OtaPolicy::default()
    };
    assert_eq!(
        check_with(&w, &listed, limits, M7, "rel-1", &msg, &mut fresh(), NOW),
        Err(OtaRefusal::Ota(OtaError::ImageTooLarge))
    );
    // None of the refusals spent the honest manifest's place in the replay cache.
    assert!(check(&w, &listed, M7, "rel-1", &msg, &mut fresh(), NOW).is_ok());
}

#[test]
fn a_manifest_signed_under_another_ca_is_refused() {
    let mut w = World::new();
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let rogue_ca = KeyPair::random(&mut rng);
    let rogue = enroll(&mut rng, &rogue_ca, "rel-1", 1);
    let r = w.release_by(&rogue, 7, NOW);
    // Even listed, its key does not open under the pinned Q_CA.
    let listed = Listed(vec![rogue.cert().clone()]);
    let got = check(
        &w,
        &listed,
        M7,
        "rel-1",
        r.manifest_message(),
        &mut BridgeReplay::default(),
        NOW,
    );
    assert!(
        matches!(
            got,
            Err(OtaRefusal::Ota(
                OtaError::BadCertificate | OtaError::BadSignature
            ))
        ),
        "{got:?}"
    );
}

fn accepted(w: &mut World, who: &Credentials, version: u64) -> (Release, VerifiedManifest) {
    let r = w.release_by(who, version, NOW);
    let listed = w.listed();
    let on = r.manifest().topic(OtaItem::Manifest).to_string();
    let m = check(
        w,
        &listed,
        &on,
        who.id().as_str(),
        r.manifest_message(),
        &mut BridgeReplay::default(),
        NOW,
    )
    .unwrap();
    (r, m)
}

#[test]
fn chunks_pass_only_against_an_accepted_manifest() {
    let mut w = World::new();
    let signer = w.signer.clone();
    let (r, m) = accepted(&mut w, &signer, 7);
    let chunk = |j: u32| topic(&format!("fw/sensor/_ota/rel-1/7/c/{j}"));
    let mut releases = Releases::new(4, 16);
    // Before the manifest: no release to check against.
    assert_eq!(
        releases.check_chunk(&chunk(0), &r.chunks()[0]),
        Err(OtaRefusal::UnknownRelease)
    );
    releases.remember(m);
    for (j, ct) in r.chunks().iter().enumerate() {
        assert_eq!(
            releases.check_chunk(&chunk(j as u32), ct),
            Ok(()),
            "chunk {j}"
        );
    }
    // A chunk on another index, a changed chunk, an index past the end.
    assert_eq!(
        releases.check_chunk(&chunk(1), &r.chunks()[0]),
        Err(OtaRefusal::Ota(OtaError::ChunkHashMismatch))
    );
    let mut bad = r.chunks()[0].clone();
    bad[3] ^= 1;
    assert_eq!(
        releases.check_chunk(&chunk(0), &bad),
        Err(OtaRefusal::Ota(OtaError::ChunkHashMismatch))
    );
    assert_eq!(
        releases.check_chunk(&chunk(3), &r.chunks()[0]),
        Err(OtaRefusal::Ota(OtaError::ChunkOutOfRange))
    );
    // The same chunk under another version or another signer's release.
    assert_eq!(
        releases.check_chunk(&topic("fw/sensor/_ota/rel-1/8/c/0"), &r.chunks()[0]),
        Err(OtaRefusal::UnknownRelease)
    );
    assert_eq!(
        releases.check_chunk(&topic("fw/sensor/_ota/rel-2/7/c/0"), &r.chunks()[0]),
        Err(OtaRefusal::UnknownRelease)
    );
}

#[test]
fn the_store_forgets_the_oldest_release_of_a_group_then_of_all() {
    let mut w = World::new();
    let signer = w.signer.clone();
    let other = w.other.clone();
    let mut releases = Releases::new(2, 3);
    let first_chunk = |r: &Release, v: u64, who: &str| {
        (
            topic(&format!("fw/sensor/_ota/{who}/{v}/c/0")),
            r.chunks()[0].clone(),
        )
    };
    let (r1, m1) = accepted(&mut w, &signer, 1);
    let (r2, m2) = accepted(&mut w, &signer, 2);
    let (r3, m3) = accepted(&mut w, &signer, 3);
    let c1 = first_chunk(&r1, 1, "rel-1");
    let c2 = first_chunk(&r2, 2, "rel-1");
    let c3 = first_chunk(&r3, 3, "rel-1");
    releases.remember(m1.clone());
    releases.remember(m2.clone());
    // Republishing release 1 replaces it (and makes it the newest) without evicting anything.
    releases.remember(m1);
    assert_eq!(releases.len(), 2);
    // A third release of the group: the oldest of the group (now 2) goes.
    releases.remember(m3);
    assert_eq!(releases.len(), 2);
    assert_eq!(releases.check_chunk(&c1.0, &c1.1), Ok(()));
    assert_eq!(
        releases.check_chunk(&c2.0, &c2.1),
        Err(OtaRefusal::UnknownRelease)
    );
    assert_eq!(releases.check_chunk(&c3.0, &c3.1), Ok(()));
    // The total cap counts every group: a store of 3 with two groups' releases.
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let group_b = GroupId::new("fw/other").unwrap();
    let rb = ReleaseSigner {
        group: &group_b,
        key: other.key(),
        cert: other.cert(),
    }
    .release(1, "b.bin", &[1; 10], 10, NOW, &mut rng)
    .unwrap();
    let checks = ManifestChecks {
        q_ca: w.ca.public(),
        signers: &AnyGroup(vec![other.cert().clone()]),
        policy: OtaPolicy::default(),
        window_ms: WINDOW,
    };
    let mb = check_manifest(
        &topic("fw/other/_ota/rel-2/1/m"),
        other.id(),
        rb.manifest_message(),
        &checks,
        &mut BridgeReplay::default(),
        NOW,
    )
    .unwrap();
    let (r4, m4) = accepted(&mut w, &other, 4);
    releases.remember(m4);
    releases.remember(mb);
    assert_eq!(releases.len(), 3);
    // The oldest of all (release 1 of rel-1, remembered before 3) went.
    assert_eq!(
        releases.check_chunk(&c1.0, &c1.1),
        Err(OtaRefusal::UnknownRelease)
    );
    assert_eq!(releases.check_chunk(&c3.0, &c3.1), Ok(()));
    let c4 = first_chunk(&r4, 4, "rel-2");
    assert_eq!(releases.check_chunk(&c4.0, &c4.1), Ok(()));
    assert_eq!(
        releases.check_chunk(&topic("fw/other/_ota/rel-2/1/c/0"), &rb.chunks()[0]),
        Ok(())
    );
}

/// Lists the certificates as publishers of any group.
struct AnyGroup(Vec<ImplicitCert>);

impl SignerListing for AnyGroup {
    fn lists_publisher(&self, _group: &GroupId, cert: &ImplicitCert, _q: &VerifyingKey) -> bool {
        self.0.iter().any(|c| c.to_bytes() == cert.to_bytes())
    }
}

#[test]
fn a_key_topic_carries_only_the_signers_option_2_forward_message() {
    let mut w = World::new();
    let group = GroupId::new(GROUP).unwrap();
    let q_p = *KeyPair::random(&mut w.rng).public();
    let k7 = topic("fw/sensor/_ota/rel-1/7/k");
    let seal = |w: &mut World, g: &GroupId, direction: Direction, who: &Credentials, option: u8| {
        let s = Sealer {
            group: g,
            epoch: Epoch(1),
            direction,
            sender: who.id(),
            key: who.key(),
        };
        let bytes = match option {
            1 => s.option1(NOW, b"m", &mut w.rng).unwrap(),
            _ => s.option2(NOW, &q_p, b"m", &mut w.rng).unwrap(),
        };
        UnverifiedMessage::decode(&bytes).unwrap()
    };
    let signer = w.signer.clone();
    let other = w.other.clone();
    let honest = seal(&mut w, &group, Direction::Forward, &signer, 2);
    assert!(key_message_fits(&k7, &honest));
    // Not on a manifest or chunk topic.
    assert!(!key_message_fits(
        &topic("fw/sensor/_ota/rel-1/7/m"),
        &honest
    ));
    for bad in [
        seal(&mut w, &group, Direction::Forward, &signer, 1),
        seal(&mut w, &group, Direction::Query, &signer, 2),
        seal(&mut w, &group, Direction::Forward, &other, 2),
        seal(
            &mut w,
            &GroupId::new("fw/other").unwrap(),
            Direction::Forward,
            &signer,
            2,
        ),
    ] {
        assert!(!key_message_fits(&k7, &bad), "{bad:?}");
    }
}
