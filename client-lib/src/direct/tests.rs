//! Tests of direct messages: round trips, the byte layout, and one test per refusal.

use super::*;
use crate::codec::Decode;
use crate::enrollment::Credentials;
use crate::ids::Role;
use crate::ids::{Epoch, GroupId};
use crate::message::{GroupLookupError, GroupPublicKeys};
use crate::testkit::{DAY, NOW, Pki};
use proptest::prelude::*;

struct Fx {
    pki: Pki,
    a: Credentials,
    b: Credentials,
    lists: Vec<MemberList>,
}

fn fx(seed: u64) -> Fx {
    let mut pki = Pki::new(seed);
    let a = pki.enroll("owner");
    let b = pki.enroll("sensor-1");
    let g = pki.group(
        "plant/line-3/temp",
        3,
        &[(Role::Publisher, &a), (Role::Subscriber, &b)],
    );
    Fx {
        pki,
        a,
        b,
        lists: vec![g.list],
    }
}

impl Fx {
    fn seal(&mut self, t_ms: u64, m: &[u8]) -> Vec<u8> {
        DirectSealer {
            key: self.a.key(),
            cert: self.a.cert(),
        }
        .seal(
            self.b.id(),
            self.b.key().public(),
            t_ms,
            m,
            &mut self.pki.rng,
        )
        .unwrap()
    }

    fn open(
        &self,
        wire: &[u8],
        floor: DirectFloor,
        now: u64,
    ) -> Result<StagedDirect, DirectRejection> {
        UnverifiedDirect::decode(wire)?.open(
            self.b.id(),
            self.b.key(),
            self.pki.ca.public(),
            &self.lists,
            floor,
            now,
        )
    }
}

/// The bridge's view: the current certificate key of each listed device.
struct BridgeDir<'a>(&'a [MemberList]);

impl Directory for BridgeDir<'_> {
    fn group_keys(
        &self,
        _: &GroupId,
        _: Epoch,
        _: u64,
    ) -> Result<GroupPublicKeys, GroupLookupError> {
        Err(GroupLookupError::UnknownGroup)
    }
    fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey> {
        self.0.iter().find_map(|l| l.key_of(id, NOW))
    }
    fn is_member(&self, _: &GroupId, _: Epoch, _: &DeviceId, _: Role) -> bool {
        false
    }
}

fn at_bridge(
    f: &Fx,
    wire: &[u8],
    conn: &DeviceId,
    replay: &mut DirectReplay,
    now: u64,
) -> Result<BridgeDirect, DirectRejection> {
    UnverifiedDirect::decode(wire)?.verify_at_bridge(
        conn,
        f.pki.ca.public(),
        &BridgeDir(&f.lists),
        replay,
        DEFAULT_DIRECT_WINDOW_MS,
        now,
    )
}

#[test]
fn seals_and_opens_empty_short_and_long_messages() {
    let mut f = fx(1);
    let mut floor = DirectFloor::NONE;
    for (i, m) in [&b""[..], b"x", &[7u8; 5000][..]].into_iter().enumerate() {
        let t = NOW + i as u64;
        let wire = f.seal(t, m);
        let staged = f.open(&wire, floor, NOW + DAY).unwrap();
        let (sender, new_floor) = staged.floor();
        assert_eq!(sender, f.a.id());
        assert_eq!(new_floor, DirectFloor::at(t));
        floor = new_floor;
        let v = staged.commit();
        assert_eq!(v.payload(), m);
        assert_eq!(v.sender(), f.a.id());
        assert_eq!(v.t_ms(), t);
        assert!(!format!("{v:?}").contains("xxxx"));
        // The recipient's own key opens what the sender sealed: xdh(d_a, Q_b) = xdh(d_b, Q_a).
        assert_eq!(
            f.a.key().xdh(f.b.key().public()).unwrap(),
            f.b.key().xdh(f.a.key().public()).unwrap()
        );
    }
}

#[test]
fn layout_matches_the_spec() {
    let f = fx(2);
    let s = DirectSealer {
        key: f.a.key(),
        cert: f.a.cert(),
    };
    let m = b"hello";
    let wire = s
        .seal_with(
            f.b.id(),
            f.b.key().public(),
            0x0102_0304_0506_0708,
            m,
            &[9; 16],
            &[1; 32],
        )
        .unwrap();
    let cert = f.a.cert().to_bytes();
    let mut expect = vec![1u8, 4, 0, 5];
    expect.extend_from_slice(b"owner");
    expect.extend_from_slice(&[0, 8]);
    expect.extend_from_slice(b"sensor-1");
    expect.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    expect.extend_from_slice(&[9; 16]);
    expect.extend_from_slice(&(cert.len() as u32).to_be_bytes());
    expect.extend_from_slice(&cert);
    let aad = expect.clone();
    expect.extend_from_slice(&((m.len() + TAG_LEN) as u32).to_be_bytes());
    assert_eq!(&wire[..expect.len()], &expect[..]);
    assert_eq!(wire.len(), expect.len() + m.len() + TAG_LEN + 65);
    // docs/protocol.md §15.1: 220 + 2·len(a) + len(b) + len(M).
    assert_eq!(wire.len(), 220 + 2 * 5 + 8 + m.len());
    // ct = AEAD_K(M, aad) with K from the spec's KDF input, recomputed here by hand.
    let shared = f.a.key().xdh(f.b.key().public()).unwrap();
    let mut info = TAG_DIRECT.as_bytes().to_vec();
    info.extend_from_slice(&aad[2..2 + 7 + 10 + 8]);
    let k = kdf(&[9; 16], &shared[..], &[&info]);
    let ct = &wire[expect.len()..expect.len() + m.len() + TAG_LEN];
    assert_eq!(&*aead_open(&k, &aad, ct).unwrap(), m);
    // The signature covers dbody under the direct tag.
    let body = &wire[..wire.len() - 65];
    let sig = Signature::from_bytes(&wire[wire.len() - 65..]).unwrap();
    assert!(
        f.a.key()
            .verifying_key()
            .verify(TAG_DIRECT, body, &sig)
            .is_ok()
    );
    // Neither the payload nor anything derived from it in clear.
    assert!(!wire.windows(m.len()).any(|w| w == m));
}

#[test]
fn refuses_a_message_to_someone_else() {
    let mut f = fx(3);
    let c = f.pki.enroll("other");
    let wire = DirectSealer {
        key: f.a.key(),
        cert: f.a.cert(),
    }
    .seal(c.id(), c.key().public(), NOW, b"m", &mut f.pki.rng)
    .unwrap();
    assert_eq!(
        f.open(&wire, DirectFloor::NONE, NOW).err(),
        Some(DirectRejection::NotForMe)
    );
}

#[test]
fn refuses_replays_and_older_timestamps_by_the_floor() {
    let mut f = fx(4);
    let first = f.seal(NOW + 10, b"one");
    let floor = f.open(&first, DirectFloor::NONE, NOW).unwrap().floor().1;
    // The same message again, also after a reboot (the floor is what was persisted).
    assert_eq!(
        f.open(&first, floor, NOW).err(),
        Some(DirectRejection::Replayed)
    );
    // An older and an equal timestamp are refused; a later one passes.
    let older = f.seal(NOW + 9, b"two");
    let equal = f.seal(NOW + 10, b"three");
    let later = f.seal(NOW + 11, b"four");
    assert_eq!(
        f.open(&older, floor, NOW).err(),
        Some(DirectRejection::Replayed)
    );
    assert_eq!(
        f.open(&equal, floor, NOW).err(),
        Some(DirectRejection::Replayed)
    );
    assert!(f.open(&later, floor, NOW).is_ok());
    // Floors themselves.
    assert_eq!(DirectFloor::NONE.admit(0), Ok(DirectFloor::at(0)));
    assert_eq!(DirectFloor::at(5).admit(5), Err(DirectRejection::Replayed));
    assert_eq!(DirectFloor::at(5).admit(6), Ok(DirectFloor::at(6)));
    assert_eq!(
        DirectFloor::at(u64::MAX).admit(u64::MAX),
        Err(DirectRejection::Replayed)
    );
    assert!(DirectFloor::NONE < DirectFloor::at(0));
}

#[test]
fn refuses_a_certificate_invalid_at_the_recipients_clock() {
    let mut pki = Pki::new(5);
    let a = pki.enroll_valid("owner", NOW - DAY, NOW + DAY);
    let b = pki.enroll("sensor-1");
    let g = pki.group("g", 1, &[(Role::Publisher, &a), (Role::Subscriber, &b)]);
    let mut f = Fx {
        pki,
        a,
        b,
        lists: vec![g.list],
    };
    // Sealed while valid, with a T_ms inside the validity; opened after expiry.
    let wire = f.seal(NOW, b"m");
    assert!(f.open(&wire, DirectFloor::NONE, NOW + DAY).is_ok());
    assert_eq!(
        f.open(&wire, DirectFloor::NONE, NOW + DAY + 1).err(),
        Some(DirectRejection::CertificateExpired)
    );
    assert_eq!(
        f.open(&wire, DirectFloor::NONE, NOW - DAY - 1).err(),
        Some(DirectRejection::CertificateNotYetValid)
    );
}

#[test]
fn refuses_senders_not_listed_with_exactly_this_certificate() {
    let mut f = fx(6);
    let wire = f.seal(NOW, b"m");
    let b = f.b.clone();
    // Revoked: the sender left every list.
    let only_b = f
        .pki
        .group("plant/line-3/temp", 4, &[(Role::Subscriber, &b)]);
    f.lists = vec![only_b.list];
    assert_eq!(
        f.open(&wire, DirectFloor::NONE, NOW).err(),
        Some(DirectRejection::NotListed)
    );
    // Superseded: the sender renewed; the lists carry its new certificate, the message the old.
    let renewed = f.pki.enroll("owner");
    let g = f.pki.group(
        "plant/line-3/temp",
        5,
        &[(Role::Publisher, &renewed), (Role::Subscriber, &b)],
    );
    f.lists = vec![g.list];
    assert_eq!(
        f.open(&wire, DirectFloor::NONE, NOW).err(),
        Some(DirectRejection::NotListed)
    );
    // No list at all (the recipient shares no group with the sender).
    f.lists.clear();
    assert_eq!(
        f.open(&wire, DirectFloor::NONE, NOW).err(),
        Some(DirectRejection::NotListed)
    );
}

#[test]
fn a_listing_in_any_group_of_the_recipient_suffices() {
    let mut f = fx(7);
    let a = f.a.clone();
    let b = f.b.clone();
    let other = f.pki.enroll("x");
    let unrelated = f.pki.group(
        "other",
        1,
        &[(Role::Publisher, &other), (Role::Subscriber, &b)],
    );
    let shared = f.pki.group(
        "fw/sensor",
        2,
        &[(Role::Publisher, &a), (Role::Subscriber, &b)],
    );
    f.lists = vec![unrelated.list, shared.list];
    let wire = f.seal(NOW, b"m");
    assert!(f.open(&wire, DirectFloor::NONE, NOW).is_ok());
    f.lists.truncate(1);
    assert_eq!(
        f.open(&wire, DirectFloor::NONE, NOW).err(),
        Some(DirectRejection::NotListed)
    );
    // A function answers as well.
    let msg = UnverifiedDirect::decode(&wire).unwrap();
    let no = MembershipFn(|_: &ImplicitCert, _: &VerifyingKey| false);
    assert_eq!(
        msg.open(
            f.b.id(),
            f.b.key(),
            f.pki.ca.public(),
            &no,
            DirectFloor::NONE,
            NOW
        )
        .err(),
        Some(DirectRejection::NotListed)
    );
}

#[test]
fn refuses_a_certificate_of_another_ca() {
    let mut f = fx(8);
    let wire = f.seal(NOW, b"m");
    let msg = UnverifiedDirect::decode(&wire).unwrap();
    let other_ca = KeyPair::random(&mut f.pki.rng);
    assert_eq!(
        msg.open(
            f.b.id(),
            f.b.key(),
            other_ca.public(),
            &f.lists,
            DirectFloor::NONE,
            NOW
        )
        .err(),
        Some(DirectRejection::BadCertificate)
    );
}

#[test]
fn every_flipped_byte_is_refused() {
    let mut f = fx(9);
    let wire = f.seal(NOW, b"secret command");
    for i in 0..wire.len() {
        for mask in [0x01u8, 0x80] {
            let mut bad = wire.clone();
            bad[i] ^= mask;
            assert!(
                f.open(&bad, DirectFloor::NONE, NOW).is_err(),
                "flip {mask:#x} at {i} accepted"
            );
        }
    }
}

#[test]
fn a_forged_signature_or_wrong_key_is_caught() {
    let mut f = fx(10);
    let wire = f.seal(NOW, b"m");
    // Another device's signature over the same body.
    let mallory = KeyPair::random(&mut f.pki.rng);
    let n = wire.len();
    let sig = mallory
        .sign(TAG_DIRECT, &wire[..n - 65], &mut f.pki.rng)
        .unwrap();
    let mut forged = wire[..n - 65].to_vec();
    sig.encode(&mut forged);
    assert_eq!(
        f.open(&forged, DirectFloor::NONE, NOW).err(),
        Some(DirectRejection::BadSignature)
    );
    // Signed by a, but encrypted to a key that is not b's: b cannot decrypt.
    let c = f.pki.enroll("c");
    let to_c_key = DirectSealer {
        key: f.a.key(),
        cert: f.a.cert(),
    }
    .seal(f.b.id(), c.key().public(), NOW, b"m", &mut f.pki.rng)
    .unwrap();
    assert_eq!(
        f.open(&to_c_key, DirectFloor::NONE, NOW).err(),
        Some(DirectRejection::DecryptionFailed)
    );
}

#[test]
fn decoding_is_strict_and_bounded() {
    let mut f = fx(11);
    let wire = f.seal(NOW, b"m");
    let msg = UnverifiedDirect::decode(&wire).unwrap();
    assert_eq!(msg.to_bytes(), wire);
    assert_eq!(msg.sender(), f.a.id());
    assert_eq!(msg.recipient(), f.b.id());
    assert_eq!(msg.hash(), &sha256(&[&wire[..wire.len() - 65]]));
    for cut in 0..wire.len() {
        assert!(matches!(
            UnverifiedDirect::decode(&wire[..cut]),
            Err(DirectRejection::Malformed(_))
        ));
    }
    let mut long = wire.clone();
    long.push(0);
    assert!(matches!(
        UnverifiedDirect::decode(&long),
        Err(DirectRejection::Malformed(DecodeError::TrailingBytes(_)))
    ));
    // Kind byte other than 4, version other than 1.
    for (at, v) in [(0usize, 2u8), (1, 2), (1, 0x84)] {
        let mut bad = wire.clone();
        bad[at] = v;
        assert!(matches!(
            UnverifiedDirect::decode(&bad),
            Err(DirectRejection::Malformed(_))
        ));
    }
    // Size checked before parsing.
    assert_eq!(
        UnverifiedDirect::decode_with_limit(&wire, wire.len() - 1).err(),
        Some(DirectRejection::TooLarge)
    );
    assert_eq!(
        UnverifiedDirect::decode(&vec![0xff; DEFAULT_MAX_PAYLOAD + 1]).err(),
        Some(DirectRejection::TooLarge)
    );
    // A certificate of another device than the sender named.
    let c = f.pki.enroll("ownex");
    let forged = DirectSealer {
        key: f.a.key(),
        cert: c.cert(),
    }
    .seal_with(f.b.id(), f.b.key().public(), NOW, b"m", &[0; 16], &[0; 32])
    .unwrap();
    // The sealer writes the certificate's ID as the sender; patch the sender to "owner".
    let mut patched = forged.clone();
    patched[4..9].copy_from_slice(b"owner");
    assert_eq!(
        UnverifiedDirect::decode(&patched).err(),
        Some(DirectRejection::Malformed(DecodeError::InvalidValue(
            "direct certificate id"
        )))
    );
    // An oversize certificate length is refused before reading it.
    let at = 2 + 7 + 10 + 8 + 16;
    let mut big = wire.clone();
    big[at..at + 4].copy_from_slice(&(MAX_CERT_LEN as u32 + 1).to_be_bytes());
    assert_eq!(
        UnverifiedDirect::decode(&big).err(),
        Some(DirectRejection::Malformed(DecodeError::TooLarge(
            "direct certificate"
        )))
    );
}

#[test]
fn sealing_refuses_oversize_payloads() {
    let f = fx(12);
    let s = DirectSealer {
        key: f.a.key(),
        cert: f.a.cert(),
    };
    let big = vec![0u8; MAX_DIRECT_PAYLOAD + 1];
    assert_eq!(
        s.seal_with(f.b.id(), f.b.key().public(), NOW, &big, &[0; 16], &[0; 32])
            .err(),
        Some(DirectSealError::TooLarge)
    );
    // The largest payload between two 64-byte IDs fits the default PUBLISH limit.
    let mut pki = Pki::new(12);
    let long_a = pki.enroll(&"a".repeat(64));
    let long_b = pki.enroll(&"b".repeat(64));
    let max = vec![0u8; MAX_DIRECT_PAYLOAD];
    let wire = DirectSealer {
        key: long_a.key(),
        cert: long_a.cert(),
    }
    .seal_with(
        long_b.id(),
        long_b.key().public(),
        NOW,
        &max,
        &[0; 16],
        &[0; 32],
    )
    .unwrap();
    assert_eq!(wire.len(), DEFAULT_MAX_PAYLOAD);
    assert!(UnverifiedDirect::decode(&wire).is_ok());
}

#[test]
fn bridge_accepts_once_and_checks_window_identity_and_certificate() {
    let mut f = fx(13);
    let wire = f.seal(NOW, b"m");
    let a = f.a.id().clone();
    let mut replay = DirectReplay::default();
    let ok = at_bridge(&f, &wire, &a, &mut replay, NOW).unwrap();
    assert_eq!(ok.sender(), &a);
    assert_eq!(ok.recipient(), f.b.id());
    assert_eq!(ok.t_ms(), NOW);
    assert_eq!(
        at_bridge(&f, &wire, &a, &mut replay, NOW).err(),
        Some(DirectRejection::Replayed)
    );
    // Window.
    let mut fresh = DirectReplay::default();
    assert_eq!(
        at_bridge(
            &f,
            &wire,
            &a,
            &mut fresh,
            NOW + DEFAULT_DIRECT_WINDOW_MS + 1
        )
        .err(),
        Some(DirectRejection::StaleTimestamp)
    );
    assert_eq!(
        at_bridge(
            &f,
            &wire,
            &a,
            &mut fresh,
            NOW - DEFAULT_DIRECT_WINDOW_MS - 1
        )
        .err(),
        Some(DirectRejection::FutureTimestamp)
    );
    // Another connection.
    assert_eq!(
        at_bridge(&f, &wire, f.b.id(), &mut fresh, NOW).err(),
        Some(DirectRejection::SenderMismatch)
    );
    // Not the sender's current certificate (revoked: unknown to the bridge).
    let b = f.b.clone();
    let only_b = f
        .pki
        .group("plant/line-3/temp", 4, &[(Role::Subscriber, &b)]);
    let saved = core::mem::replace(&mut f.lists, vec![only_b.list]);
    assert_eq!(
        at_bridge(&f, &wire, &a, &mut fresh, NOW).err(),
        Some(DirectRejection::NotListed)
    );
    f.lists = saved;
    // Bad signature: nothing recorded.
    let mut bad = wire.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    assert_eq!(
        at_bridge(&f, &bad, &a, &mut fresh, NOW).err(),
        Some(DirectRejection::BadSignature)
    );
    assert!(fresh.is_empty());
    assert!(at_bridge(&f, &wire, &a, &mut fresh, NOW).is_ok());
    assert_eq!(DirectRejection::TooLarge.puback_reason_code(), 0x99);
    assert_eq!(DirectRejection::NotListed.puback_reason_code(), 0x87);
}

#[test]
fn bridge_refuses_an_expired_certificate() {
    let mut pki = Pki::new(14);
    let a = pki.enroll_valid("owner", NOW - DAY, NOW);
    let b = pki.enroll("sensor-1");
    let g = pki.group("g", 1, &[(Role::Publisher, &a), (Role::Subscriber, &b)]);
    let mut f = Fx {
        pki,
        a,
        b,
        lists: vec![g.list],
    };
    let wire = f.seal(NOW + 1, b"m");
    let a = f.a.id().clone();
    assert_eq!(
        at_bridge(&f, &wire, &a, &mut DirectReplay::default(), NOW + 1).err(),
        Some(DirectRejection::CertificateExpired)
    );
}

#[test]
fn labels_are_distinct_and_listed() {
    let all = [
        DirectRejection::TooLarge,
        DirectRejection::Malformed(DecodeError::Truncated("x")),
        DirectRejection::NotForMe,
        DirectRejection::BadCertificate,
        DirectRejection::CertificateExpired,
        DirectRejection::CertificateNotYetValid,
        DirectRejection::SenderMismatch,
        DirectRejection::NotListed,
        DirectRejection::Replayed,
        DirectRejection::StaleTimestamp,
        DirectRejection::FutureTimestamp,
        DirectRejection::BadSignature,
        DirectRejection::DecryptionFailed,
    ];
    let labels: Vec<&str> = all.iter().map(DirectRejection::label).collect();
    assert_eq!(labels, DirectRejection::LABELS);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(msg) = UnverifiedDirect::decode(&data) {
            prop_assert_eq!(msg.to_bytes(), data);
        }
    }

    #[test]
    fn valid_prefix_then_noise_never_panics(
        cut in any::<prop::sample::Index>(),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let wire = VALID.with(|w| w.clone());
        let mut data = wire[..cut.index(wire.len() + 1)].to_vec();
        data.extend_from_slice(&tail);
        let _ = UnverifiedDirect::decode(&data);
    }
}

thread_local! {
    static VALID: Vec<u8> = fx(99).seal(NOW, b"payload");
}
