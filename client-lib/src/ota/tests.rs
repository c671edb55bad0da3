//! Tests of group OTA: a release end to end, the byte layout, and one test per refusal.

use super::*;
use crate::codec::{Decode, Encode};
use crate::curve::{KeyPair, sha256};
use crate::direct::{DirectFloor, DirectSealer, UnverifiedDirect};
use crate::enrollment::Credentials;
use crate::ids::{DeviceId, GroupId, Role};
use crate::message::{Direction, Policy, Sealer, UnverifiedMessage};
use crate::testkit::{DAY, Group, NOW, Pki};
use crate::topics::{OtaItem, OtaTopic};
use proptest::prelude::*;

struct Fx {
    pki: Pki,
    signer: Credentials,
    other_pub: Credentials,
    dev: Credentials,
    g: Group,
}

const GROUP: &str = "fw/sensor-v2";

fn fx(seed: u64) -> Fx {
    let mut pki = Pki::new(seed);
    let signer = pki.enroll("release-1");
    let other_pub = pki.enroll("release-2");
    let dev = pki.enroll("dev-1");
    let g = pki.group(
        GROUP,
        2,
        &[
            (Role::Publisher, &signer),
            (Role::Publisher, &other_pub),
            (Role::Subscriber, &dev),
        ],
    );
    Fx {
        pki,
        signer,
        other_pub,
        dev,
        g,
    }
}

fn image(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

impl Fx {
    fn release(&mut self, v: u64, img: &[u8], chunk_size: u32) -> Release {
        ReleaseSigner {
            group: &self.g.id,
            key: self.signer.key(),
            cert: self.signer.cert(),
        }
        .release(v, "fw.bin", img, chunk_size, NOW, &mut self.pki.rng)
        .unwrap()
    }

    fn pinned(&self) -> Vec<DeviceId> {
        vec![self.signer.id().clone()]
    }

    fn verify(&self, wire: &[u8], installed: Option<u64>) -> Result<VerifiedManifest, OtaError> {
        self.verify_with(wire, installed, &OtaPolicy::default(), NOW)
    }

    fn verify_with(
        &self,
        wire: &[u8],
        installed: Option<u64>,
        policy: &OtaPolicy,
        now: u64,
    ) -> Result<VerifiedManifest, OtaError> {
        UnverifiedManifest::decode(wire)?.verify(
            &self.g.id,
            &self.pinned(),
            installed,
            self.pki.ca.public(),
            &self.g.list,
            policy,
            now,
        )
    }

    /// The key message as the signer seals it and as the device verifies it (late, no window).
    fn key_message(
        &mut self,
        sender: &Credentials,
        m: &KeyMessage,
        direction: Direction,
    ) -> crate::message::VerifiedMessage {
        let sealer = Sealer {
            group: &self.g.id,
            epoch: self.g.epoch,
            direction,
            sender: sender.id(),
            key: sender.key(),
        };
        let wire = sealer
            .option2(
                NOW,
                self.g.q(direction.target_key()),
                &m.to_bytes(),
                &mut self.pki.rng,
            )
            .unwrap();
        UnverifiedMessage::decode(&wire)
            .unwrap()
            .verify_without_window(&self.g, &self.g, &Policy::default(), NOW + 30 * DAY)
            .unwrap()
    }

    fn accepted(&mut self, release: &Release) -> (VerifiedManifest, AcceptedKey) {
        let man = self.verify(release.manifest_message(), None).unwrap();
        let signer = self.signer.clone();
        let sealer = Sealer {
            group: &self.g.id,
            epoch: self.g.epoch,
            direction: Direction::Forward,
            sender: signer.id(),
            key: signer.key(),
        };
        let wire = release
            .key_message()
            .seal(
                &sealer,
                self.g.q(crate::ids::GroupKeyKind::P),
                NOW,
                &mut self.pki.rng,
            )
            .unwrap();
        let msg = UnverifiedMessage::decode(&wire)
            .unwrap()
            .verify_without_window(&self.g, &self.g, &Policy::default(), NOW + 30 * DAY)
            .unwrap();
        let key = man.accept_key_message(&msg).unwrap();
        (man, key)
    }
}

/// Fetches every chunk (in reverse order) into a staging buffer and finishes.
fn download_all(d: &mut Download, release: &Release) -> Vec<u8> {
    let size = d.manifest().manifest().size as usize;
    let mut staging = vec![0u8; size];
    let missing: Vec<u32> = d.missing().collect();
    for j in missing.into_iter().rev() {
        let c = d.open_chunk(j, &release.chunks()[j as usize]).unwrap();
        let at = c.offset() as usize;
        let plaintext = c.plaintext().to_vec();
        // Moving the plaintext out gives the same bytes.
        let moved = c.into_plaintext();
        assert_eq!(&moved[..], &plaintext[..]);
        staging[at..at + moved.len()].copy_from_slice(&moved);
        d.mark_stored(j).unwrap();
    }
    staging
}

#[test]
fn a_release_installs_end_to_end() {
    let mut f = fx(1);
    for (n, chunk) in [
        (1usize, DEFAULT_CHUNK_SIZE),
        (1, 1),
        (10, 3),
        (9, 3),
        (200_000, DEFAULT_CHUNK_SIZE),
    ] {
        let img = image(n);
        let release = f.release(5, &img, chunk);
        assert_eq!(release.chunks().len(), n.div_ceil(chunk as usize));
        let (man, key) = f.accepted(&release);
        assert_eq!(key.key_message().name, "fw.bin");
        let mut d = Download::new(man, key).unwrap();
        assert_eq!(d.finish(&sha256(&[&img])).err(), Some(OtaError::Incomplete));
        let staged = download_all(&mut d, &release);
        assert!(d.is_complete());
        assert_eq!(staged, img);
        let mut digest = ImageDigest::new();
        for part in staged.chunks(1000) {
            digest.update(part);
        }
        let ready = d.finish(&digest.finalize()).unwrap();
        assert_eq!(ready.version, 5);
        assert_eq!(ready.size, n as u64);
        assert_eq!(&ready.signer, f.signer.id());
        // Bytes deposited: the image, 16 per chunk, and the manifest.
        let man_len = release.manifest_message().len();
        assert_eq!(
            release.deposited_len(),
            n + 16 * release.chunks().len() + man_len
        );
    }
}

#[test]
fn manifest_layout_matches_the_spec() {
    let mut f = fx(2);
    let img = image(10);
    let signer = ReleaseSigner {
        group: &f.g.id,
        key: f.signer.key(),
        cert: f.signer.cert(),
    };
    let k_c = ContentKey::from_bytes(&[7; 32]);
    let r = signer
        .release_with(0x0102, "n", &img, 4, 0x0a0b, &k_c, &[3; 32])
        .unwrap();
    let cert = f.signer.cert().to_bytes();
    let mut expect = vec![1u8, 0, GROUP.len() as u8];
    expect.extend_from_slice(GROUP.as_bytes());
    expect.extend_from_slice(&[0, 9]);
    expect.extend_from_slice(b"release-1");
    expect.extend_from_slice(&(cert.len() as u32).to_be_bytes());
    expect.extend_from_slice(&cert);
    expect.extend_from_slice(&0x0102u64.to_be_bytes());
    expect.extend_from_slice(&10u64.to_be_bytes());
    expect.extend_from_slice(&4u32.to_be_bytes());
    expect.extend_from_slice(&3u32.to_be_bytes());
    for j in 0..3u32 {
        // ct_j recomputed by hand from the spec's KDF and AEAD inputs.
        let mut info = b"quva/v1/ota-chunk".to_vec();
        info.extend_from_slice(&[0, GROUP.len() as u8]);
        info.extend_from_slice(GROUP.as_bytes());
        info.extend_from_slice(&0x0102u64.to_be_bytes());
        info.extend_from_slice(&j.to_be_bytes());
        let k_j = crate::symmetric::kdf(b"", &[7; 32], &[&info]);
        let mut aad = 0x0102u64.to_be_bytes().to_vec();
        aad.extend_from_slice(&j.to_be_bytes());
        let m_j = &img[j as usize * 4..(j as usize * 4 + 4).min(10)];
        let ct = crate::symmetric::aead_seal(&k_j, &aad, m_j);
        assert_eq!(r.chunks()[j as usize], ct, "chunk {j}");
        expect.extend_from_slice(&sha256(&[&ct]));
    }
    expect.extend_from_slice(&0x0a0bu64.to_be_bytes());
    let msg = r.manifest_message();
    assert_eq!(&msg[..msg.len() - 65], &expect[..]);
    // docs/protocol.md §15.2: 207 + len(group) + 2·len(signer) + 32·n_chunks; M: 107 + len(name).
    assert_eq!(msg.len(), 207 + GROUP.len() + 2 * 9 + 32 * 3);
    assert_eq!(r.key_message().to_bytes().len(), 107 + 1);
    let sig = crate::schnorr::Signature::from_bytes(&msg[msg.len() - 65..]).unwrap();
    assert!(
        f.signer
            .key()
            .verifying_key()
            .verify(TAG_OTA_MANIFEST, &expect, &sig)
            .is_ok()
    );
    assert_eq!(r.manifest().hash(), sha256(&[&expect]));
    // M = u8 1 || u64 v || H(man) || K_c || H(image) || str(name).
    let mut m = vec![1u8];
    m.extend_from_slice(&0x0102u64.to_be_bytes());
    m.extend_from_slice(&sha256(&[&expect]));
    m.extend_from_slice(&[7; 32]);
    m.extend_from_slice(&sha256(&[&img]));
    m.extend_from_slice(&[0, 1, b'n']);
    assert_eq!(&*r.key_message().to_bytes(), &m[..]);
    // The manifest shows neither the name nor the image hash.
    assert!(!msg.windows(32).any(|w| w == sha256(&[&img])));
    let _ = &mut f;
}

#[test]
fn tampered_chunks_are_refused_before_decryption() {
    let mut f = fx(3);
    let img = image(100);
    let release = f.release(1, &img, 32);
    let (man, key) = f.accepted(&release);
    let d = Download::new(man, key).unwrap();
    let c0 = &release.chunks()[0];
    for i in 0..c0.len() {
        let mut bad = c0.clone();
        bad[i] ^= 1;
        assert_eq!(
            d.open_chunk(0, &bad).err(),
            Some(OtaError::ChunkHashMismatch),
            "byte {i}"
        );
    }
    // Another chunk of the same length in the wrong place.
    assert_eq!(
        d.open_chunk(0, &release.chunks()[1]).err(),
        Some(OtaError::ChunkHashMismatch)
    );
    // Truncated, extended, out of range.
    assert_eq!(
        d.open_chunk(0, &c0[1..]).err(),
        Some(OtaError::ChunkLengthMismatch)
    );
    let mut long = c0.clone();
    long.push(0);
    assert_eq!(
        d.open_chunk(0, &long).err(),
        Some(OtaError::ChunkLengthMismatch)
    );
    assert_eq!(
        d.open_chunk(3, &release.chunks()[2]).err(),
        Some(OtaError::ChunkLengthMismatch)
    );
    assert_eq!(d.open_chunk(4, c0).err(), Some(OtaError::ChunkOutOfRange));
    assert_eq!(
        d.open_chunk(u32::MAX, c0).err(),
        Some(OtaError::ChunkOutOfRange)
    );
    // A listed chunk under a key message with another K_c (a broken signer): decryption fails.
    let man = d.manifest().clone();
    let mut wrong = d.key().key_message().clone();
    wrong.content_key = ContentKey::from_bytes(&[9; 32]);
    let wrong_key = man.restore_key(&wrong.to_bytes()).unwrap();
    let d2 = Download::new(man, wrong_key).unwrap();
    assert_eq!(d2.open_chunk(0, c0).err(), Some(OtaError::DecryptionFailed));
}

#[test]
fn the_final_image_hash_is_checked() {
    let mut f = fx(4);
    let img = image(50);
    let release = f.release(1, &img, 16);
    let (man, key) = f.accepted(&release);
    let mut d = Download::new(man, key).unwrap();
    let mut staged = download_all(&mut d, &release);
    staged[7] ^= 1;
    assert_eq!(
        d.finish(&sha256(&[&staged])).err(),
        Some(OtaError::ImageHashMismatch)
    );
    staged[7] ^= 1;
    assert!(d.finish(&sha256(&[&staged])).is_ok());
}

#[test]
fn downloads_resume_from_their_progress() {
    let mut f = fx(5);
    let img = image(1000);
    let release = f.release(3, &img, 64);
    let (man, key) = f.accepted(&release);
    let mut d = Download::new(man.clone(), key.clone()).unwrap();
    for j in [0u32, 5, 15, 8] {
        d.open_chunk(j, &release.chunks()[j as usize]).unwrap();
        d.mark_stored(j).unwrap();
    }
    d.mark_stored(5).unwrap();
    assert_eq!(d.mark_stored(16).err(), Some(OtaError::ChunkOutOfRange));
    let progress = d.progress();
    assert_eq!(progress.len(), 1 + 32 + 4 + 2);
    // After a restart: the manifest verified again, the key restored from storage.
    let man2 = f.verify(man.as_bytes(), None).unwrap();
    let key2 = man2.restore_key(&key.to_bytes()).unwrap();
    let resumed = Download::resume(man2, key2, &progress).unwrap();
    assert_eq!(resumed.missing_count(), 12);
    let missing: Vec<u32> = resumed.missing().collect();
    assert_eq!(missing, [1, 2, 3, 4, 6, 7, 9, 10, 11, 12, 13, 14]);
    assert!(resumed.is_stored(15) && !resumed.is_stored(14) && !resumed.is_stored(16));
    assert_eq!(resumed.progress(), progress);
    // A record of another release, a bad version, stray bits, and truncation are refused.
    let other = f.release(4, &img, 64);
    let (oman, okey) = f.accepted(&other);
    assert_eq!(
        Download::resume(oman, okey, &progress).err(),
        Some(OtaError::ProgressMismatch)
    );
    let mut bad = progress.clone();
    bad[0] = 2;
    assert!(matches!(
        Download::resume(man.clone(), key.clone(), &bad),
        Err(OtaError::Malformed(_))
    ));
    // 16 chunks fill two bytes exactly; use a 15-chunk release for a spare bit.
    let r15 = f.release(6, &image(15), 1);
    let (m15, k15) = f.accepted(&r15);
    let mut p15 = Download::new(m15.clone(), k15.clone()).unwrap().progress();
    *p15.last_mut().unwrap() |= 1;
    assert!(matches!(
        Download::resume(m15, k15, &p15),
        Err(OtaError::Malformed(_))
    ));
    for cut in 0..progress.len() {
        assert!(Download::resume(man.clone(), key.clone(), &progress[..cut]).is_err());
    }
    let mut long = progress.clone();
    long.push(0);
    assert!(Download::resume(man.clone(), key.clone(), &long).is_err());
}

#[test]
fn every_flipped_manifest_byte_is_refused() {
    let mut f = fx(6);
    let release = f.release(2, &image(70), 32);
    let wire = release.manifest_message().to_vec();
    assert!(f.verify(&wire, None).is_ok());
    for i in 0..wire.len() {
        let mut bad = wire.clone();
        bad[i] ^= 0x01;
        assert!(f.verify(&bad, None).is_err(), "flip at {i} accepted");
    }
}

#[test]
fn a_manifest_signed_by_another_key_is_refused() {
    let mut f = fx(7);
    let release = f.release(2, &image(10), 4);
    let wire = release.manifest_message();
    let body = &wire[..wire.len() - 65];
    // A pinned, listed signer's manifest re-signed by another publisher's key.
    let sig = f
        .other_pub
        .key()
        .sign(TAG_OTA_MANIFEST, body, &mut f.pki.rng)
        .unwrap();
    let mut forged = body.to_vec();
    sig.encode(&mut forged);
    assert_eq!(f.verify(&forged, None).err(), Some(OtaError::BadSignature));
    // The signer refuses to sign with a key its certificate does not open to.
    let stray = KeyPair::random(&mut f.pki.rng);
    let signer = ReleaseSigner {
        group: &f.g.id,
        key: &stray,
        cert: f.signer.cert(),
    };
    assert_eq!(
        signer.release(1, "x", b"x", 1, NOW, &mut f.pki.rng).err(),
        Some(OtaError::CertificateMismatch)
    );
}

#[test]
fn unpinned_signers_are_refused() {
    let mut f = fx(8);
    let other = f.other_pub.clone();
    let release = ReleaseSigner {
        group: &f.g.id,
        key: other.key(),
        cert: other.cert(),
    }
    .release(1, "x", &image(5), 2, NOW, &mut f.pki.rng)
    .unwrap();
    // A valid publisher of the group, with a valid signature, but not pinned.
    assert_eq!(
        f.verify(release.manifest_message(), None).err(),
        Some(OtaError::SignerNotPinned)
    );
    let msg = UnverifiedManifest::decode(release.manifest_message()).unwrap();
    let pins = [other.id().clone()];
    assert!(
        msg.verify(
            &f.g.id,
            &pins,
            None,
            f.pki.ca.public(),
            &f.g.list,
            &OtaPolicy::default(),
            NOW
        )
        .is_ok()
    );
    assert_eq!(
        msg.verify(
            &f.g.id,
            &[],
            None,
            f.pki.ca.public(),
            &f.g.list,
            &OtaPolicy::default(),
            NOW
        )
        .err(),
        Some(OtaError::SignerNotPinned)
    );
    // A manifest of another group.
    let elsewhere = GroupId::new("fw/other").unwrap();
    assert_eq!(
        msg.verify(
            &elsewhere,
            &pins,
            None,
            f.pki.ca.public(),
            &f.g.list,
            &OtaPolicy::default(),
            NOW
        )
        .err(),
        Some(OtaError::WrongGroup)
    );
}

#[test]
fn rollback_is_refused() {
    let mut f = fx(9);
    let release = f.release(7, &image(5), 2);
    let wire = release.manifest_message();
    assert_eq!(f.verify(wire, Some(7)).err(), Some(OtaError::Rollback));
    assert_eq!(f.verify(wire, Some(8)).err(), Some(OtaError::Rollback));
    assert_eq!(
        f.verify(wire, Some(u64::MAX)).err(),
        Some(OtaError::Rollback)
    );
    assert!(f.verify(wire, Some(6)).is_ok());
    assert!(f.verify(wire, None).is_ok());
    let zero = f.release(0, &image(5), 2);
    assert_eq!(
        f.verify(zero.manifest_message(), Some(0)).err(),
        Some(OtaError::Rollback)
    );
}

#[test]
fn oversize_images_chunks_and_manifests_are_refused() {
    let mut f = fx(10);
    let release = f.release(1, &image(1000), 100);
    let wire = release.manifest_message();
    let tight = OtaPolicy {
        max_image_size: 999,
        ..OtaPolicy::default()
    };
    assert_eq!(
        f.verify_with(wire, None, &tight, NOW).err(),
        Some(OtaError::ImageTooLarge)
    );
    let exact = OtaPolicy {
        max_image_size: 1000,
        max_chunk_size: 100,
        ..OtaPolicy::default()
    };
    assert!(f.verify_with(wire, None, &exact, NOW).is_ok());
    let small_chunks = OtaPolicy {
        max_chunk_size: 99,
        ..OtaPolicy::default()
    };
    assert_eq!(
        f.verify_with(wire, None, &small_chunks, NOW).err(),
        Some(OtaError::ChunkSizeTooLarge)
    );
    assert_eq!(
        UnverifiedManifest::decode_with_limit(wire, wire.len() - 1).err(),
        Some(OtaError::TooLarge)
    );
    let short = OtaPolicy {
        max_manifest_len: wire.len() - 1,
        ..OtaPolicy::default()
    };
    assert_eq!(
        f.verify_with(wire, None, &short, NOW).err(),
        Some(OtaError::TooLarge)
    );
}

#[test]
fn revoked_superseded_or_expired_signer_certificates_are_refused() {
    let mut f = fx(11);
    let release = f.release(1, &image(8), 4);
    let wire = release.manifest_message().to_vec();
    let (signer, other, dev) = (f.signer.clone(), f.other_pub.clone(), f.dev.clone());
    // Revoked: the signer left the group's member list.
    let without = f.pki.group(
        GROUP,
        3,
        &[(Role::Publisher, &other), (Role::Subscriber, &dev)],
    );
    f.g = without;
    assert_eq!(f.verify(&wire, None).err(), Some(OtaError::SignerNotListed));
    // Superseded: the list holds the signer's renewed certificate.
    let renewed = f.pki.enroll("release-1");
    f.g = f.pki.group(
        GROUP,
        4,
        &[(Role::Publisher, &renewed), (Role::Subscriber, &dev)],
    );
    assert_eq!(f.verify(&wire, None).err(), Some(OtaError::SignerNotListed));
    // Listed, but only as a subscriber.
    f.g = f.pki.group(
        GROUP,
        5,
        &[(Role::Subscriber, &signer), (Role::Publisher, &other)],
    );
    assert_eq!(f.verify(&wire, None).err(), Some(OtaError::SignerNotListed));
    // The list of another group.
    let other_group = f.pki.group("fw/other", 1, &[(Role::Publisher, &signer)]);
    let msg = UnverifiedManifest::decode(&wire).unwrap();
    assert_eq!(
        msg.verify(
            &GroupId::new(GROUP).unwrap(),
            &[signer.id().clone()],
            None,
            f.pki.ca.public(),
            &other_group.list,
            &OtaPolicy::default(),
            NOW
        )
        .err(),
        Some(OtaError::SignerNotListed)
    );
    // Renewed and re-signed, the release is accepted again.
    f.g = f.pki.group(
        GROUP,
        6,
        &[(Role::Publisher, &renewed), (Role::Subscriber, &dev)],
    );
    let m = release.manifest();
    let (_, resigned) = ReleaseSigner {
        group: &f.g.id,
        key: renewed.key(),
        cert: renewed.cert(),
    }
    .sign_manifest(
        m.version,
        m.size,
        m.chunk_size,
        m.chunk_hashes.clone(),
        NOW + 1,
        &[1; 32],
    )
    .unwrap();
    assert!(f.verify(&resigned, None).is_ok());
    // Expired at the device's clock; another CA.
    let mut pki = Pki::new(12);
    let short = pki.enroll_valid("release-1", NOW - DAY, NOW);
    let dev2 = pki.enroll("dev-1");
    let g = pki.group(
        GROUP,
        1,
        &[(Role::Publisher, &short), (Role::Subscriber, &dev2)],
    );
    let rel = ReleaseSigner {
        group: &g.id,
        key: short.key(),
        cert: short.cert(),
    }
    .release(1, "x", b"x", 1, NOW, &mut pki.rng)
    .unwrap();
    let msg = UnverifiedManifest::decode(rel.manifest_message()).unwrap();
    let pins = [short.id().clone()];
    let check = |q_ca: &crate::curve::Point, now| {
        msg.verify(
            &g.id,
            &pins,
            None,
            q_ca,
            &g.list,
            &OtaPolicy::default(),
            now,
        )
    };
    assert!(check(pki.ca.public(), NOW).is_ok());
    assert_eq!(
        check(pki.ca.public(), NOW + 1).err(),
        Some(OtaError::CertificateExpired)
    );
    assert_eq!(
        check(pki.ca.public(), NOW - DAY - 1).err(),
        Some(OtaError::CertificateNotYetValid)
    );
    assert_eq!(
        check(f.pki.ca.public(), NOW).err(),
        Some(OtaError::BadCertificate)
    );
}

#[test]
fn the_signer_may_be_listed_in_any_of_several_lists() {
    let mut f = fx(20);
    let release = f.release(1, &image(8), 4);
    let msg = UnverifiedManifest::decode(release.manifest_message()).unwrap();
    let (signer, dev) = (f.signer.clone(), f.dev.clone());
    let other = f.pki.group(
        "fw/other",
        1,
        &[(Role::Publisher, &signer), (Role::Subscriber, &dev)],
    );
    let pins = [signer.id().clone()];
    let check = |lists: &[crate::members::MemberList]| {
        msg.verify(
            &f.g.id,
            &pins,
            None,
            f.pki.ca.public(),
            &MembershipLists(lists),
            &OtaPolicy::default(),
            NOW,
        )
    };
    assert!(check(&[other.list.clone(), f.g.list.clone()]).is_ok());
    // Listed as a publisher, but only in another group's list.
    assert_eq!(
        check(std::slice::from_ref(&other.list)).err(),
        Some(OtaError::SignerNotListed)
    );
    assert_eq!(check(&[]).err(), Some(OtaError::SignerNotListed));
}

#[test]
fn key_messages_must_come_from_the_signer_for_this_manifest() {
    let mut f = fx(13);
    let release = f.release(4, &image(20), 8);
    let man = f.verify(release.manifest_message(), None).unwrap();
    let good = release.key_message().clone();
    let signer = f.signer.clone();
    let other = f.other_pub.clone();
    let dev = f.dev.clone();
    // From the signer: accepted.
    let msg = f.key_message(&signer, &good, Direction::Forward);
    assert!(man.accept_key_message(&msg).is_ok());
    // The same M from another publisher of the group.
    let msg = f.key_message(&other, &good, Direction::Forward);
    assert_eq!(
        man.accept_key_message(&msg).err(),
        Some(OtaError::KeySenderMismatch)
    );
    // Another manifest hash, another version.
    let mut wrong_hash = good.clone();
    wrong_hash.manifest_hash[0] ^= 1;
    let msg = f.key_message(&signer, &wrong_hash, Direction::Forward);
    assert_eq!(
        man.accept_key_message(&msg).err(),
        Some(OtaError::KeyManifestMismatch)
    );
    let mut wrong_v = good.clone();
    wrong_v.version = 5;
    let msg = f.key_message(&signer, &wrong_v, Direction::Forward);
    assert_eq!(
        man.accept_key_message(&msg).err(),
        Some(OtaError::KeyVersionMismatch)
    );
    // A query is not a key message; nor is a status report's M.
    let msg = f.key_message(&dev, &good, Direction::Query);
    assert_eq!(
        man.accept_key_message(&msg).err(),
        Some(OtaError::NotOtaMessage)
    );
    let status = StatusReport {
        version: 4,
        state: OtaState::NeedKey,
        detail: String::new(),
    };
    assert!(matches!(
        man.accept_key(signer.id(), &status.to_bytes().unwrap()),
        Err(OtaError::Malformed(_))
    ));
    // The key sealer refuses the query direction.
    let q = Sealer {
        group: &f.g.id,
        epoch: f.g.epoch,
        direction: Direction::Query,
        sender: signer.id(),
        key: signer.key(),
    };
    assert_eq!(
        good.seal(&q, f.g.q(crate::ids::GroupKeyKind::S), NOW, &mut f.pki.rng)
            .err(),
        Some(OtaError::NotOtaMessage)
    );
}

#[test]
fn a_key_message_of_another_group_is_refused() {
    let mut f = fx(14);
    let release = f.release(4, &image(20), 8);
    let man = f.verify(release.manifest_message(), None).unwrap();
    let (signer, dev) = (f.signer.clone(), f.dev.clone());
    let other = f.pki.group(
        "fw/other",
        1,
        &[(Role::Publisher, &signer), (Role::Subscriber, &dev)],
    );
    f.g = other;
    let msg = f.key_message(&signer, release.key_message(), Direction::Forward);
    assert_eq!(
        man.accept_key_message(&msg).err(),
        Some(OtaError::NotOtaMessage)
    );
}

#[test]
fn a_key_can_come_as_a_direct_message_from_the_signer_only() {
    let mut f = fx(15);
    let release = f.release(4, &image(20), 8);
    let man = f.verify(release.manifest_message(), None).unwrap();
    let lists = vec![f.g.list.clone()];
    let m = release.key_message().to_bytes();
    for (from, ok) in [(f.signer.clone(), true), (f.other_pub.clone(), false)] {
        let wire = DirectSealer {
            key: from.key(),
            cert: from.cert(),
        }
        .seal(f.dev.id(), f.dev.key().public(), NOW, &m, &mut f.pki.rng)
        .unwrap();
        let opened = UnverifiedDirect::decode(&wire)
            .unwrap()
            .open(
                f.dev.id(),
                f.dev.key(),
                f.pki.ca.public(),
                &lists,
                DirectFloor::NONE,
                NOW,
            )
            .unwrap()
            .commit();
        let r = man.accept_direct_key(&opened);
        if ok {
            assert_eq!(r.unwrap().key_message(), release.key_message());
        } else {
            assert_eq!(r.err(), Some(OtaError::KeySenderMismatch));
        }
    }
}

#[test]
fn status_reports_keep_the_latest_state_per_device_and_version() {
    let mut f = fx(16);
    let dev = f.dev.clone();
    let gid = f.g.id.clone();
    let sealer = Sealer {
        group: &gid,
        epoch: f.g.epoch,
        direction: Direction::Query,
        sender: dev.id(),
        key: dev.key(),
    };
    let q_s = *f.g.q(crate::ids::GroupKeyKind::S);
    let mut book = StatusBook::new();
    let receive = |t: u64, v: u64, state: OtaState, detail: &str, f: &mut Fx| {
        let report = StatusReport {
            version: v,
            state,
            detail: detail.to_owned(),
        };
        let wire = report.seal(&sealer, &q_s, t, &mut f.pki.rng).unwrap();
        // Collected a week later from the persistent session: no window.
        let msg = UnverifiedMessage::decode(&wire)
            .unwrap()
            .verify_without_window(&f.g, &f.g, &Policy::default(), NOW + 7 * DAY)
            .unwrap();
        let got = ReceivedStatus::from_message(&msg).unwrap();
        assert_eq!(got.report, report);
        assert_eq!(&got.device, dev.id());
        got
    };
    assert!(book.record(receive(NOW + 2, 1, OtaState::Downloading, "", &mut f)));
    assert!(book.record(receive(NOW + 5, 1, OtaState::Applied, "ok", &mut f)));
    // Older and equally old reports arrive late: the applied state stays.
    assert!(!book.record(receive(NOW + 3, 1, OtaState::Failed, "disk", &mut f)));
    assert!(!book.record(receive(NOW + 5, 1, OtaState::Failed, "same time", &mut f)));
    assert!(book.record(receive(NOW + 1, 2, OtaState::NeedKey, "", &mut f)));
    let g = f.g.id.clone();
    let e = book.get(&g, dev.id(), 1).unwrap();
    assert_eq!(
        (e.t_ms, e.state, e.detail.as_str()),
        (NOW + 5, OtaState::Applied, "ok")
    );
    assert_eq!(book.get(&g, dev.id(), 2).unwrap().state, OtaState::NeedKey);
    assert_eq!(
        book.devices_in(&g, 2, OtaState::NeedKey)
            .collect::<Vec<_>>(),
        [dev.id()]
    );
    assert_eq!(book.iter().count(), 2);
    // A forward message is not a status report; the sealer refuses the forward direction.
    let signer = f.signer.clone();
    let m = StatusReport {
        version: 1,
        state: OtaState::Applied,
        detail: String::new(),
    };
    let key = f.release(1, b"x", 1).key_message().clone();
    let fwd = f.key_message(&signer, &key, Direction::Forward);
    assert_eq!(
        ReceivedStatus::from_message(&fwd).err(),
        Some(OtaError::NotOtaMessage)
    );
    let fwd_sealer = Sealer {
        direction: Direction::Forward,
        ..sealer
    };
    assert_eq!(
        m.seal(&fwd_sealer, &q_s, NOW, &mut f.pki.rng).err(),
        Some(OtaError::NotOtaMessage)
    );
    // Details are bounded.
    let long = StatusReport {
        detail: "x".repeat(MAX_DETAIL_LEN + 1),
        ..m
    };
    assert_eq!(long.to_bytes().err(), Some(OtaError::DetailTooLong));
}

#[test]
fn status_report_codec() {
    for (i, s) in [
        OtaState::Available,
        OtaState::Downloading,
        OtaState::Verified,
        OtaState::Applied,
        OtaState::Failed,
        OtaState::NeedKey,
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(s.to_u8() as usize, i + 1);
        let r = StatusReport {
            version: 9,
            state: s,
            detail: "d".into(),
        };
        let b = r.to_bytes().unwrap();
        assert_eq!(
            b,
            [&[2u8][..], &9u64.to_be_bytes(), &[s.to_u8(), 0, 1, b'd']].concat()
        );
        assert_eq!(StatusReport::from_bytes(&b), Ok(r));
    }
    for bad_state in [0u8, 7, 255] {
        let b = [&[2u8][..], &9u64.to_be_bytes(), &[bad_state, 0, 0]].concat();
        assert!(StatusReport::from_bytes(&b).is_err());
    }
    let mut long = vec![2u8];
    long.extend_from_slice(&1u64.to_be_bytes());
    long.push(1);
    long.extend_from_slice(&((MAX_DETAIL_LEN + 1) as u16).to_be_bytes());
    long.extend(std::iter::repeat_n(b'x', MAX_DETAIL_LEN + 1));
    assert!(StatusReport::from_bytes(&long).is_err());
}

#[test]
fn bridge_checks_topic_connection_signature_and_chunks() {
    let mut f = fx(17);
    let release = f.release(3, &image(40), 16);
    let m = release.manifest();
    let topic = m.topic(OtaItem::Manifest);
    assert_eq!(topic.to_string(), "fw/sensor-v2/_ota/release-1/3/m");
    let msg = UnverifiedManifest::decode(release.manifest_message()).unwrap();
    let check = |topic: &OtaTopic, conn: &DeviceId| {
        msg.verify_at_bridge(
            topic,
            conn,
            f.pki.ca.public(),
            &f.g.list,
            &OtaPolicy::default(),
            NOW,
        )
    };
    let ok = check(&topic, f.signer.id()).unwrap();
    assert_eq!(
        check(&topic, f.other_pub.id()).err(),
        Some(OtaError::SignerMismatch)
    );
    for wrong in [
        m.topic(OtaItem::Key),
        m.topic(OtaItem::Chunk(0)),
        OtaTopic {
            version: 4,
            ..topic.clone()
        },
        OtaTopic {
            signer: f.other_pub.id().clone(),
            ..topic.clone()
        },
    ] {
        assert_eq!(
            check(&wrong, f.signer.id()).err(),
            Some(OtaError::TopicMismatch)
        );
    }
    // Chunks pass only with their listed hash.
    for (j, c) in release.chunks().iter().enumerate() {
        assert!(ok.check_chunk(j as u32, c).is_ok());
        assert_eq!(
            OtaTopic::parse(&m.topic(OtaItem::Chunk(j as u32)).to_string())
                .unwrap()
                .item,
            OtaItem::Chunk(j as u32)
        );
    }
    let mut bad = release.chunks()[1].clone();
    bad[0] ^= 1;
    assert_eq!(
        ok.check_chunk(1, &bad).err(),
        Some(OtaError::ChunkHashMismatch)
    );
    assert_eq!(
        OtaError::Malformed(crate::codec::DecodeError::Truncated("x")).puback_reason_code(),
        0x99
    );
    assert_eq!(OtaError::ChunkHashMismatch.puback_reason_code(), 0x87);
}

#[test]
fn releases_refuse_bad_parameters() {
    let mut f = fx(18);
    let signer = f.signer.clone();
    let s = ReleaseSigner {
        group: &f.g.id,
        key: signer.key(),
        cert: signer.cert(),
    };
    let rng = &mut f.pki.rng;
    assert_eq!(
        s.release(1, "x", b"", 4, NOW, rng).err(),
        Some(OtaError::EmptyImage)
    );
    assert_eq!(
        s.release(1, "x", b"abc", 0, NOW, rng).err(),
        Some(OtaError::InvalidChunkSize)
    );
    assert_eq!(
        s.release(1, &"n".repeat(MAX_NAME_LEN + 1), b"abc", 1, NOW, rng)
            .err(),
        Some(OtaError::NameTooLong)
    );
    assert!(
        s.release(1, &"n".repeat(MAX_NAME_LEN), b"abc", 1, NOW, rng)
            .is_ok()
    );
    assert!(matches!(
        s.sign_manifest(1, 10, 4, vec![[0; 32]; 2], NOW, &[0; 32]),
        Err(OtaError::Malformed(_))
    ));
    assert_eq!(
        s.sign_manifest(1, u64::MAX, 1, vec![], NOW, &[0; 32]).err(),
        Some(OtaError::TooManyChunks)
    );
}

#[test]
fn manifest_decoding_is_strict() {
    let mut f = fx(19);
    let release = f.release(3, &image(10), 4);
    let man = release.manifest().to_bytes();
    assert_eq!(Manifest::from_bytes(&man).unwrap(), *release.manifest());
    let cert_len = f.signer.cert().to_bytes().len();
    let after_cert = 1 + 2 + GROUP.len() + 2 + 9 + 4 + cert_len;
    let size_at = after_cert + 8;
    let count_at = size_at + 8 + 4;
    // n_chunks must be ceil(size / chunk_size); size and chunk_size at least 1.
    for (at, bytes) in [
        (count_at, 2u32.to_be_bytes().to_vec()),
        (count_at, 4u32.to_be_bytes().to_vec()),
        (size_at, 0u64.to_be_bytes().to_vec()),
        (size_at + 8, 0u32.to_be_bytes().to_vec()),
        (size_at, 13u64.to_be_bytes().to_vec()),
    ] {
        let mut bad = man.clone();
        bad[at..at + bytes.len()].copy_from_slice(&bytes);
        assert_eq!(
            Manifest::from_bytes(&bad).err(),
            Some(crate::codec::DecodeError::InvalidValue(
                "manifest chunk count"
            )),
            "patch at {at}"
        );
    }
    // A huge chunk count with no hashes behind it is truncation, not an allocation.
    let mut huge = man[..size_at].to_vec();
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    huge.extend_from_slice(&1u32.to_be_bytes());
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(Manifest::from_bytes(&huge).is_err());
    for cut in 0..man.len() {
        assert!(Manifest::from_bytes(&man[..cut]).is_err());
    }
    let mut long = man.clone();
    long.push(0);
    assert!(Manifest::from_bytes(&long).is_err());
    // A certificate of another device than the named signer.
    let mut renamed = man.clone();
    let at = 1 + 2 + GROUP.len() + 2;
    renamed[at..at + 9].copy_from_slice(b"release-2");
    assert_eq!(
        Manifest::from_bytes(&renamed).err(),
        Some(crate::codec::DecodeError::InvalidValue(
            "manifest certificate id"
        ))
    );
    // Key messages: type byte, bounded name, exact length.
    let m = release.key_message().to_bytes();
    assert_eq!(KeyMessage::from_bytes(&m).unwrap(), *release.key_message());
    let mut bad_type = m.to_vec();
    bad_type[0] = 2;
    assert!(KeyMessage::from_bytes(&bad_type).is_err());
    for cut in 0..m.len() {
        assert!(KeyMessage::from_bytes(&m[..cut]).is_err());
    }
    let mut long_name = m[..m.len() - 2 - 6].to_vec();
    long_name.extend_from_slice(&((MAX_NAME_LEN + 1) as u16).to_be_bytes());
    long_name.extend(std::iter::repeat_n(b'n', MAX_NAME_LEN + 1));
    assert!(KeyMessage::from_bytes(&long_name).is_err());
    assert!(!format!("{:?}", release.key_message()).contains("07070707"));
    assert_eq!(
        format!("{:?}", ContentKey::from_bytes(&[7; 32])),
        "ContentKey(<redacted>)"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic_any_decoder(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(m) = Manifest::from_bytes(&data) {
            prop_assert_eq!(m.to_bytes(), data.clone());
        }
        if let Ok(m) = UnverifiedManifest::decode(&data) {
            prop_assert_eq!(m.as_bytes(), &data[..]);
        }
        if let Ok(k) = KeyMessage::from_bytes(&data) {
            prop_assert_eq!(&*k.to_bytes(), &data[..]);
        }
        if let Ok(s) = StatusReport::from_bytes(&data) {
            prop_assert_eq!(s.to_bytes().unwrap(), data.clone());
        }
        let _ = OtaTopic::parse(&String::from_utf8_lossy(&data));
        FIXTURE.with(|(man, key, _)| {
            let _ = Download::resume(man.clone(), key.clone(), &data);
            let d = Download::new(man.clone(), key.clone()).unwrap();
            let j = data.first().copied().unwrap_or(0) as u32;
            let _ = d.open_chunk(j % 4, &data);
        });
    }

    #[test]
    fn valid_prefixes_then_noise_never_panic(
        which in 0usize..3,
        cut in any::<prop::sample::Index>(),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        FIXTURE.with(|(man, key, d)| {
            let seed = match which {
                0 => man.as_bytes().to_vec(),
                1 => key.to_bytes().to_vec(),
                _ => d.clone(),
            };
            let mut data = seed[..cut.index(seed.len() + 1)].to_vec();
            data.extend_from_slice(&tail);
            let _ = UnverifiedManifest::decode(&data);
            let _ = KeyMessage::from_bytes(&data);
            let _ = Download::resume(man.clone(), key.clone(), &data);
        });
    }
}

thread_local! {
    static FIXTURE: (VerifiedManifest, AcceptedKey, Vec<u8>) = {
        let mut f = fx(99);
        let release = f.release(1, &image(30), 8);
        let (man, key) = f.accepted(&release);
        let progress = Download::new(man.clone(), key.clone()).unwrap().progress();
        (man, key, progress)
    };
}
