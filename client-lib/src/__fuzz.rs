//! Fuzzing entry points: decode→encode round trips of every wire structure, and the verification
//! paths run on arbitrary bytes. Hidden; not part of the public interface.
//!
//! Covers the encodings of PROTOCOL.md §2 to §7. Each `pub fn name(data: &[u8])` is the body of
//! the cargo-fuzz target `fuzz/fuzz_targets/name.rs` and of the property tests in
//! `tests/fuzz_decoders.rs`. A round-trip function decodes `data` and, if the decoder accepts it,
//! asserts that encoding the value gives `data` back byte for byte: decoding is strict, every
//! accepted input is the one canonical encoding of its value. A verification function decodes
//! `data` and runs the receiving side's checks against the fixed keys of a built-in fixture; it
//! asserts the invariants that hold for anything accepted. Bad input must never panic: only a
//! failed assertion does, and that is a bug.
//!
//! [`TARGETS`] lists every function by target name; [`seeds`] gives valid encodings to start
//! from (the fixture's messages, requests, proofs, notices and records).
//!
//! # Usage
//! ```
//! use quva_client::__fuzz;
//! // Arbitrary bytes: rejected without a panic.
//! __fuzz::message(b"\x01\x02not a message");
//! // A valid encoding: accepted, and it round-trips.
//! for (target, input) in __fuzz::seeds() {
//!     __fuzz::run(target, &input);
//! }
//! ```

#![allow(clippy::panic)]

use std::sync::OnceLock;

use k256::Scalar;
use rand_core::{CryptoRng, RngCore};

use crate::codec::{Decode, Encode};
use crate::curve::{KeyPair, Point, SecretScalar, scalar_from_bytes, sha256};
use crate::direct::{DirectFloor, DirectMembership, DirectSealer, UnverifiedDirect};
use crate::enrollment::{
    CertConnectProof, CertRequest, Credentials, EnrollRequest, EnrollResponse, EnrollmentSecret,
    GroupConnectProof, ImplicitCert, PendingEnrollment, RenewRequest,
};
use crate::group::{
    GroupInfo, GroupKeyRequest, GroupKeys, JoinedMember, Member, Privacy, SignedGroupInfo,
};
use crate::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use crate::message::{
    AnonymousInner, ConnectionIdentity, Direction, Directory, GroupLookupError, GroupPublicKeys,
    Header, Policy, Protection, Sealer, UnverifiedMessage,
};
use crate::ota::{
    AcceptedKey, ContentKey, Download, KeyMessage, OtaPolicy, OtaState, Release, ReleaseSigner,
    SignerListing, StatusReport, UnverifiedManifest, VerifiedManifest,
};
use crate::rekey::tree::{KeyTree, NodeKey, TreeChanges, TreeHolder, TreeKeySet, TreeNotice};
use crate::rekey::{DEFAULT_GRACE_MS, GroupKeyDelivery, GroupState, Keyring, Plan};
use crate::replay::ReplayCache;
use crate::schnorr::{Signature, VerifyingKey};

/// A fuzz target's function.
pub type Target = fn(&[u8]);

/// Every fuzz target: its name (the file name under `fuzz/fuzz_targets/`) and its function.
pub const TARGETS: &[(&str, Target)] = &[
    ("point", point),
    ("scalar", scalar),
    ("signature", signature),
    ("header", header),
    ("message", message),
    ("anonymous_inner", anonymous_inner),
    ("implicit_cert", implicit_cert),
    ("cert_request", cert_request),
    ("enroll_request", enroll_request),
    ("renew_request", renew_request),
    ("enroll_response", enroll_response),
    ("cert_connect_proof", cert_connect_proof),
    ("group_connect_proof", group_connect_proof),
    ("group_info", group_info),
    ("signed_group_info", signed_group_info),
    ("group_key_request", group_key_request),
    ("group_key_request_property", group_key_request_property),
    ("group_key_delivery", group_key_delivery),
    ("group_key_delivery_property", group_key_delivery_property),
    ("group_record", group_record),
    ("message_verify", message_verify),
    ("enrollment_verify", enrollment_verify),
    ("group_key_verify", group_key_verify),
    ("tree_notice", tree_notice),
    ("tree_key_set", tree_key_set),
    ("tree_notice_verify", tree_notice_verify),
    ("direct_message", direct_message),
    ("ota_manifest", ota_manifest),
    ("ota_payload", ota_payload),
    ("ota_download", ota_download),
];

/// Runs the target named `target` on `data`.
///
/// # Panics
/// If no target has that name, or if the target's property fails.
pub fn run(target: &str, data: &[u8]) {
    match TARGETS.iter().find(|(name, _)| *name == target) {
        Some((_, f)) => f(data),
        None => panic!("no fuzz target named {target}"),
    }
}

/// Asserts that an accepted `T::from_bytes(data)` encodes back to `data`.
fn round_trip<T: Decode + Encode>(data: &[u8]) -> Option<T> {
    let value = T::from_bytes(data).ok()?;
    assert!(
        value.to_bytes() == data,
        "{} does not re-encode to its input",
        core::any::type_name::<T>()
    );
    Some(value)
}

/// `pt(P)`: 33-byte compressed points, never the identity.
pub fn point(data: &[u8]) {
    if let Some(p) = Point::from_bytes(data) {
        assert_eq!(p.to_bytes(), data);
    }
}

/// `sc(k)`: 32-byte scalars below n, and secret scalars (also non-zero).
pub fn scalar(data: &[u8]) {
    let Ok(bytes) = <[u8; 32]>::try_from(data) else {
        return;
    };
    if let Some(k) = scalar_from_bytes(&bytes) {
        assert_eq!(&k.to_bytes()[..], data);
    }
    if let Ok(k) = SecretScalar::from_bytes(&bytes) {
        assert_eq!(&k.to_bytes()[..], data);
        assert!(scalar_from_bytes(&bytes).is_some());
    }
}

/// [`Signature`]: `pt(V) || sc(s)`.
pub fn signature(data: &[u8]) {
    round_trip::<Signature>(data);
}

/// The message header `hdr` of PROTOCOL.md §6.
pub fn header(data: &[u8]) {
    if let Some(h) = round_trip::<Header>(data) {
        assert_eq!(data.get(1), Some(&h.kind()));
    }
}

/// [`UnverifiedMessage::decode`]: options 1 to 3, both directions. Its encoding is the received
/// bytes, so the round trip also rebuilds the parts: header, claimed sender, signature.
pub fn message(data: &[u8]) {
    let Ok(msg) = UnverifiedMessage::decode(data) else {
        return;
    };
    assert_eq!(msg.as_bytes(), data);
    assert_eq!(msg.to_bytes(), data);
    let hdr = msg.header().to_bytes();
    assert!(data.starts_with(&hdr), "header does not re-encode");
    let rest = data.get(hdr.len()..).unwrap_or_default();
    match msg.claimed_sender() {
        Some(sender) => {
            assert_ne!(msg.header().protection, Protection::Anonymous);
            let mut enc = Vec::new();
            sender.encode(&mut enc);
            assert!(rest.starts_with(&enc), "sender does not re-encode");
        }
        None => assert_eq!(msg.header().protection, Protection::Anonymous),
    }
    let sig = msg.signature().to_bytes();
    assert!(data.ends_with(&sig), "signature does not re-encode");
    assert_eq!(msg.body(), &data[..data.len() - sig.len()]);
    assert_eq!(msg.hash(), &sha256(&[msg.body()]));
    assert_eq!(
        UnverifiedMessage::from_bytes(data).ok().as_ref(),
        Some(&msg)
    );
}

/// The option-3 plaintext `str(sender) || pt(V1) || sc(s1) || blob(M)`.
pub fn anonymous_inner(data: &[u8]) {
    round_trip::<AnonymousInner>(data);
}

/// [`ImplicitCert`].
pub fn implicit_cert(data: &[u8]) {
    if let Some(cert) = round_trip::<ImplicitCert>(data) {
        assert!(cert.not_before() <= cert.not_after());
    }
}

/// [`CertRequest`].
pub fn cert_request(data: &[u8]) {
    round_trip::<CertRequest>(data);
}

/// [`EnrollRequest`] (`quva-enroll-v1` CONNECT data).
pub fn enroll_request(data: &[u8]) {
    round_trip::<EnrollRequest>(data);
}

/// [`RenewRequest`] (`quva-renew-v1` CONNECT data).
pub fn renew_request(data: &[u8]) {
    round_trip::<RenewRequest>(data);
}

/// [`EnrollResponse`] (CONNACK data).
pub fn enroll_response(data: &[u8]) {
    round_trip::<EnrollResponse>(data);
}

/// [`CertConnectProof`] (`quva-cert-v1` CONNECT data).
pub fn cert_connect_proof(data: &[u8]) {
    round_trip::<CertConnectProof>(data);
}

/// [`GroupConnectProof`] (`quva-group-v1` CONNECT data).
pub fn group_connect_proof(data: &[u8]) {
    round_trip::<GroupConnectProof>(data);
}

/// [`GroupInfo`] (`ginfo`).
pub fn group_info(data: &[u8]) {
    round_trip::<GroupInfo>(data);
}

/// [`SignedGroupInfo`] (`ginfo || sig`).
pub fn signed_group_info(data: &[u8]) {
    round_trip::<SignedGroupInfo>(data);
}

/// [`GroupKeyRequest`] as bytes.
pub fn group_key_request(data: &[u8]) {
    round_trip::<GroupKeyRequest>(data);
}

/// [`GroupKeyRequest::from_property`]: the base64url `quva-gk` text of a SUBSCRIBE.
pub fn group_key_request_property(data: &[u8]) {
    let Ok(text) = core::str::from_utf8(data) else {
        return;
    };
    if let Ok(req) = GroupKeyRequest::from_property(text) {
        assert_eq!(req.to_property(), text);
    }
}

/// [`GroupKeyDelivery`] as bytes.
pub fn group_key_delivery(data: &[u8]) {
    round_trip::<GroupKeyDelivery>(data);
}

/// [`GroupKeyDelivery::from_property`]: the base64url `quva-gk` text of a SUBACK.
pub fn group_key_delivery_property(data: &[u8]) {
    let Ok(text) = core::str::from_utf8(data) else {
        return;
    };
    if let Ok(delivery) = GroupKeyDelivery::from_property(text) {
        assert_eq!(delivery.to_property(), text);
    }
}

/// [`GroupState::from_record`] under the fixture's CA key: a record it accepts (signed info,
/// matching shares, keys that re-derive) re-encodes to the same bytes.
pub fn group_record(data: &[u8]) {
    let f = fixture();
    if let Ok(state) = GroupState::from_record(&f.ca, data, f.stored_members(), f.stored_nodes()) {
        assert!(
            state.to_record()[..] == *data,
            "group record does not re-encode"
        );
    }
}

/// A message through the bridge's check and a receiving device's check, against the fixture's
/// group, devices and held keys. Whatever the device accepts, the bridge accepts too; an
/// accepted message is a replay the second time.
pub fn message_verify(data: &[u8]) {
    let Ok(msg) = UnverifiedMessage::decode(data) else {
        return;
    };
    let f = fixture();
    let (bridge, device) = verify_message(f, &msg);
    if let Ok(b) = &bridge {
        assert_eq!(b.hash(), msg.hash());
        assert_eq!(b.header(), msg.header());
        assert_eq!(b.sender(), msg.claimed_sender());
    }
    if let Ok(v) = &device {
        assert!(
            bridge.is_ok(),
            "a device accepted a message the bridge refuses"
        );
        assert_eq!(v.hash(), msg.hash());
        assert_eq!(v.header(), msg.header());
        if let Some(sender) = msg.claimed_sender() {
            assert_eq!(v.sender(), sender);
        }
        assert!(f.is_member(&v.header().group, v.epoch(), v.sender(), sender_role(&msg)));
    }
}

/// Decodes and checks CONNECT/CONNACK data of §3 against the fixture's CA and devices. The first
/// byte selects the structure: 0 [`EnrollRequest`] (CA), 1 [`RenewRequest`] (CA),
/// 2 [`EnrollResponse`] (device), 3 [`CertConnectProof`] (bridge), 4 [`GroupConnectProof`]
/// (bridge); the rest is its encoding.
pub fn enrollment_verify(data: &[u8]) {
    let Some((&selector, data)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let (now, window) = (f.now, WINDOW_MS);
    match selector % 5 {
        0 => {
            let Ok(req) = EnrollRequest::from_bytes(data) else {
                return;
            };
            if let Ok(verified) = req.verify(&f.enroll_secret, now, window) {
                assert_eq!(verified.request(), &req.request);
                let k = secret(0x6b);
                if let Ok(issued) = verified.issue_with(&f.ca, 1, now, now + DAY_MS, &k) {
                    assert_eq!(issued.cert.id(), &req.request.id);
                    assert_eq!(issued.cert.group_base(), &req.request.group_base);
                    assert!(issued.cert.open(f.ca.public()).is_ok());
                }
            }
        }
        1 => {
            let Ok(req) = RenewRequest::from_bytes(data) else {
                return;
            };
            let cert = f.credentials.cert();
            if let Ok(verified) = req.verify(cert, f.ca.public(), now, window) {
                assert_eq!(verified.request(), &req.request);
                assert_eq!(&req.request.id, cert.id());
            }
        }
        2 => {
            let Ok(response) = EnrollResponse::from_bytes(data) else {
                return;
            };
            if let Ok(creds) = f.pending.accept(&response, f.ca.public()) {
                // ECQV: the key the device reconstructs is the key verifiers open.
                let opened = creds.cert().open(f.ca.public());
                assert_eq!(opened.ok(), Some(creds.key().verifying_key()));
                assert_eq!(creds.cert(), &response.cert);
            }
        }
        3 => {
            let Ok(proof) = CertConnectProof::from_bytes(data) else {
                return;
            };
            if let Ok(q) = proof.verify(f.ca.public(), &proof.client_id, now, window) {
                assert_eq!(proof.cert.open(f.ca.public()).ok(), Some(q));
                assert!(proof.cert.is_valid_at(now));
            }
        }
        _ => {
            let Ok(proof) = GroupConnectProof::from_bytes(data) else {
                return;
            };
            let info = f.signed.info_unverified();
            let (q_p, q_s) = (VerifyingKey(info.q_p), VerifyingKey(info.q_s));
            if proof
                .verify(&q_p, &q_s, &proof.client_id, now, window)
                .is_ok()
            {
                assert!(now.abs_diff(proof.t_ms) <= window);
            }
        }
    }
}

/// Decodes and checks the group-key structures of §4 and §5 against the fixture's CA, group and
/// devices. The first byte selects: 0 [`GroupKeyRequest`] (CA opens it), 1 [`GroupKeyDelivery`]
/// (device accepts it), 2 [`TreeNotice`] (a subscriber's keyring applies it); the rest is its
/// encoding.
pub fn group_key_verify(data: &[u8]) {
    let Some((&selector, data)) = data.split_first() else {
        return;
    };
    let f = fixture();
    match selector % 3 {
        0 => {
            let Ok(req) = GroupKeyRequest::from_bytes(data) else {
                return;
            };
            // The member the CA authorized: the one the request names, else another device.
            let member = f
                .members
                .iter()
                .map(|(_, j)| j.member())
                .find(|m| &m.id == req.id() && m.role == req.role())
                .unwrap_or(f.members[0].1.member());
            if let Ok(joined) = req.open(&f.ca, member, f.now, WINDOW_MS) {
                assert_eq!(joined.member(), member);
                let share_point = Point::mul_base(joined.share()).to_projective();
                assert_eq!(
                    share_point,
                    member.q.to_projective() + member.g.to_projective()
                );
            }
        }
        1 => {
            let Ok(delivery) = GroupKeyDelivery::from_bytes(data) else {
                return;
            };
            for (key, joined) in &f.members {
                let role = joined.member().role;
                let q_ca = f.ca.verifying_key();
                if let Ok((tree, held)) = delivery.accept(&q_ca, key, &f.group, role) {
                    assert_eq!(held.key().public(), held.info().held_public_key(role));
                    assert_eq!(held.info().group, f.group);
                    assert_eq!(tree.epoch(), held.epoch());
                }
            }
        }
        _ => {
            let Ok(notice) = TreeNotice::from_bytes(data) else {
                return;
            };
            let mut ring = f.keyring.clone();
            let before = ring.epoch();
            match ring.apply_tree_notice(&notice, f.now) {
                Ok(epoch) => {
                    assert!(epoch > before);
                    assert_eq!(ring.epoch(), epoch);
                    assert_eq!(
                        ring.current_key().public(),
                        ring.group_info().held_public_key(Role::Subscriber)
                    );
                    assert!(ring.key_for(before, f.now).is_some());
                    assert_eq!(ring.tree().epoch(), epoch);
                }
                Err(_) => {
                    assert_eq!(ring.epoch(), before);
                    assert!(
                        ring.tree() == f.keyring.tree(),
                        "a refused notice moved the tree"
                    );
                }
            }
        }
    }
}

/// [`TreeNotice`] (kind 3, PROTOCOL.md §5.1).
pub fn tree_notice(data: &[u8]) {
    round_trip::<TreeNotice>(data);
}

/// [`TreeKeySet`]: a joiner's key set, the ECIES plaintext of a v1.1 key delivery.
pub fn tree_key_set(data: &[u8]) {
    if let Ok(set) = TreeKeySet::from_bytes(data) {
        assert!(
            &set.to_bytes()[..] == data,
            "TreeKeySet does not re-encode to its input"
        );
    }
}

/// [`TreeHolder::apply`]: the fixture's subscriber (leaf 0 of a four-leaf tree at epoch 7)
/// processes a tree notice. Anything adopted is of epoch 8, matches the signed Q_P, took at most
/// log2(W) + 1 openings and leaves a path of the new width; anything refused leaves the state as
/// it was.
pub fn tree_notice_verify(data: &[u8]) {
    let f = fixture();
    let t = tree_fixture();
    let Ok(notice) = TreeNotice::from_bytes(data) else {
        return;
    };
    let mut holder = t.holder.clone();
    match holder.apply(&f.ca.verifying_key(), &notice) {
        Ok(adopted) => {
            let info = notice.signed_info().info_unverified();
            assert_eq!(info.epoch, Epoch(8));
            assert_eq!(adopted.key().key().public(), &info.q_p);
            assert!(adopted.openings() <= notice.width().trailing_zeros() as usize + 1);
            assert_eq!(holder.epoch(), Epoch(8));
            assert_eq!(
                holder.path().len(),
                notice.width().trailing_zeros() as usize + 1
            );
        }
        Err(_) => assert!(holder == t.holder, "a refused notice changed the holder"),
    }
}

/// Valid encodings for every target, built from the fixture: (target name, input).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = fixture().seeds.clone();
    let t = tree_fixture();
    seeds.push(("tree_notice", t.notice.clone()));
    seeds.push(("tree_key_set", t.key_set.clone()));
    seeds.push(("tree_notice_verify", t.notice.clone()));
    seeds.push(("group_key_verify", [vec![2], t.notice.clone()].concat()));
    seeds.extend(ota_seeds());
    seeds
}

/// The subscribers' key tree of the fixture's group: sub-1 and three others at epoch 7 (fixed
/// node keys); epoch 8 has sub-3 leave and sub-5 join.
struct TreeFixture {
    holder: TreeHolder,
    notice: Vec<u8>,
    key_set: Vec<u8>,
}

/// The fixed key of node `n` in the fixture's subscriber tree.
fn tree_node_key(n: u32) -> NodeKey {
    NodeKey::from_bytes(&sha256(&[b"quva/fuzz/tree", &n.to_be_bytes()]))
}

fn tree_fixture() -> &'static TreeFixture {
    static TREE: OnceLock<TreeFixture> = OnceLock::new();
    TREE.get_or_init(|| {
        let f = fixture();
        let key = tree_node_key;
        let holders = ["sub-1", "sub-2", "sub-3", "sub-4"];
        let tree = ok(
            KeyTree::from_parts(
                f.group.clone(),
                Role::Subscriber,
                Epoch(7),
                4,
                (0u32..).zip(holders).map(|(l, h)| (id(h), l)),
                (0u32..7).map(|n| (n, key(n))),
            ),
            "tree",
        );
        let holder = f.keyring.tree().clone();
        let info = f.keys.group_info();
        let joined = f.members.iter().map(|(_, j)| j);
        let next = ok(
            GroupKeys::derive(&f.ca, &f.group, Epoch(8), info.privacy, joined),
            "next keys",
        );
        let signed = ok(
            SignedGroupInfo::sign_with_entropy(&f.ca, next.group_info().clone(), &[0x52; 32]),
            "next info",
        );
        let changes = TreeChanges {
            departed: vec![id("sub-3")],
            joined: vec![id("sub-5")],
        };
        let mut n = 100;
        let staged = ok(
            tree.plan_with(
                &changes,
                next.held_by(Role::Subscriber).secret(),
                &signed,
                [0x16; 16],
                &mut || {
                    n += 1;
                    key(n)
                },
            ),
            "tree plan",
        );
        let notice = match staged.notice() {
            Some(notice) => notice.to_bytes(),
            None => panic!("fuzz fixture: the tree has holders"),
        };
        let key_set = match staged.key_set(&id("sub-5")) {
            Some(set) => set.to_bytes().to_vec(),
            None => panic!("fuzz fixture: sub-5 joined"),
        };
        TreeFixture {
            holder,
            notice,
            key_set,
        }
    })
}

/// [`UnverifiedDirect`]: decode→encode, then the recipient's checks as the fixture's enrolled
/// device (the sender listed iff it is that device with its certificate). Anything opened names
/// the device as sender, its certificate, and its T_ms as the new floor; the same message is
/// then below that floor.
pub fn direct_message(data: &[u8]) {
    let Ok(msg) = UnverifiedDirect::from_bytes(data) else {
        return;
    };
    assert!(
        msg.to_bytes() == data,
        "UnverifiedDirect does not re-encode"
    );
    let f = fixture();
    let o = ota_fixture();
    let me = &f.credentials;
    let open = |floor| msg.open(me.id(), me.key(), f.ca.public(), &o.listing, floor, f.now);
    if let Ok(staged) = open(DirectFloor::NONE) {
        let (sender, floor) = staged.floor();
        assert_eq!(sender, me.id());
        assert_eq!(floor, DirectFloor::at(msg.t_ms()));
        assert_eq!(msg.cert(), me.cert());
        assert!(
            open(floor).is_err(),
            "a direct message passed its own floor"
        );
        let v = staged.commit();
        assert_eq!(v.t_ms(), msg.t_ms());
    }
}

/// [`UnverifiedManifest`]: decode→encode (the manifest part re-encodes too), then a device's
/// checks against the fixture's CA, with the enrolled device as the pinned, listed signer of
/// `fw/fuzz`. An accepted manifest is that signer's, above the installed version, and its hash is
/// H(man).
pub fn ota_manifest(data: &[u8]) {
    let Ok(msg) = UnverifiedManifest::decode(data) else {
        return;
    };
    assert!(
        msg.as_bytes() == data,
        "UnverifiedManifest does not keep its bytes"
    );
    let man = msg.manifest().to_bytes();
    assert!(
        data.starts_with(&man) && data.len() == man.len() + 65,
        "Manifest does not re-encode"
    );
    let f = fixture();
    let o = ota_fixture();
    let pins = [f.credentials.id().clone()];
    let verified = msg.verify(
        &o.group,
        &pins,
        Some(0),
        f.ca.public(),
        &o.listing,
        &OtaPolicy::default(),
        f.now,
    );
    if let Ok(v) = verified {
        assert_eq!(v.hash(), &sha256(&[&man]));
        assert_eq!(&v.manifest().signer, f.credentials.id());
        assert!(v.manifest().version > 0);
    }
}

/// The plaintexts of OTA key messages and status reports: decode→encode of both.
pub fn ota_payload(data: &[u8]) {
    if let Ok(k) = KeyMessage::from_bytes(data) {
        assert!(&k.to_bytes()[..] == data, "KeyMessage does not re-encode");
    }
    if let Ok(s) = StatusReport::from_bytes(data) {
        assert!(
            s.to_bytes().ok().as_deref() == Some(data),
            "StatusReport does not re-encode"
        );
    }
}

/// A device's download of the fixture's release. First byte 0: the rest is a progress record to
/// resume from (an accepted record re-encodes to itself); 1: the second byte is a chunk index j
/// and the rest a chunk ciphertext (an opened chunk is the release's chunk j and decrypts to the
/// image's bytes at j·chunk_size).
pub fn ota_download(data: &[u8]) {
    let o = ota_fixture();
    match data.split_first() {
        Some((0, progress)) => {
            if let Ok(d) = Download::resume(o.manifest.clone(), o.key.clone(), progress) {
                assert!(d.progress() == progress, "progress does not re-encode");
                assert_eq!(d.missing().count() as u32, d.missing_count());
            }
        }
        Some((1, rest)) => {
            let Some((&j, ct)) = rest.split_first() else {
                return;
            };
            let d = match Download::new(o.manifest.clone(), o.key.clone()) {
                Ok(d) => d,
                Err(e) => panic!("fuzz fixture: download: {e:?}"),
            };
            if let Ok(c) = d.open_chunk(u32::from(j), ct) {
                assert_eq!(
                    o.release.chunks().get(usize::from(j)).map(Vec::as_slice),
                    Some(ct)
                );
                let at = c.offset() as usize;
                assert_eq!(
                    OTA_IMAGE.get(at..at + c.plaintext().len()),
                    Some(c.plaintext())
                );
            }
        }
        _ => {}
    }
}

/// The image of the fixture's release: 100 bytes in chunks of 16.
const OTA_IMAGE: &[u8; 100] = &[0x3c; 100];

/// One OTA release by the fixture's enrolled device, verified and with its key accepted.
struct OtaFixture {
    group: GroupId,
    listing: CertListing,
    release: Release,
    manifest: VerifiedManifest,
    key: AcceptedKey,
}

/// Lists exactly one certificate, as a publisher of one group and as a member for direct
/// messages.
struct CertListing {
    group: GroupId,
    cert: ImplicitCert,
}

impl SignerListing for CertListing {
    fn lists_publisher(&self, group: &GroupId, cert: &ImplicitCert, _q: &VerifyingKey) -> bool {
        *group == self.group && *cert == self.cert
    }
}

impl DirectMembership for CertListing {
    fn lists(&self, cert: &ImplicitCert, _q: &VerifyingKey) -> bool {
        *cert == self.cert
    }
}

fn ota_fixture() -> &'static OtaFixture {
    static OTA: OnceLock<OtaFixture> = OnceLock::new();
    OTA.get_or_init(|| {
        let f = fixture();
        let creds = &f.credentials;
        let group = ok(GroupId::new("fw/fuzz"), "ota group");
        let listing = CertListing {
            group: group.clone(),
            cert: creds.cert().clone(),
        };
        let release = ok(
            ReleaseSigner {
                group: &group,
                key: creds.key(),
                cert: creds.cert(),
            }
            .release_with(
                3,
                "fuzz.bin",
                OTA_IMAGE,
                16,
                f.now,
                &ContentKey::from_bytes(&[0x6b; 32]),
                &[0x6c; 32],
            ),
            "release",
        );
        let pins = [creds.id().clone()];
        let manifest = ok(
            ok(
                UnverifiedManifest::decode(release.manifest_message()),
                "manifest",
            )
            .verify(
                &group,
                &pins,
                None,
                f.ca.public(),
                &listing,
                &OtaPolicy::default(),
                f.now,
            ),
            "manifest verify",
        );
        let key = ok(
            manifest.accept_key(creds.id(), &release.key_message().to_bytes()),
            "key",
        );
        OtaFixture {
            group,
            listing,
            release,
            manifest,
            key,
        }
    })
}

/// Seeds of the direct-message and OTA targets.
fn ota_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let f = fixture();
    let o = ota_fixture();
    let creds = &f.credentials;
    let direct = ok(
        DirectSealer {
            key: creds.key(),
            cert: creds.cert(),
        }
        .seal_with(
            creds.id(),
            creds.key().public(),
            f.now,
            b"rotate",
            &[8; 16],
            &[9; 32],
        ),
        "direct",
    );
    let status = ok(
        StatusReport {
            version: 3,
            state: OtaState::Failed,
            detail: "disk full".into(),
        }
        .to_bytes(),
        "status",
    );
    let mut d = ok(Download::new(o.manifest.clone(), o.key.clone()), "download");
    ok(d.mark_stored(2), "mark");
    let mut seeds = vec![
        ("direct_message", direct),
        ("ota_manifest", o.release.manifest_message().to_vec()),
        ("ota_payload", o.release.key_message().to_bytes().to_vec()),
        ("ota_payload", status),
        ("ota_download", [vec![0], d.progress()].concat()),
    ];
    for (j, c) in o.release.chunks().iter().enumerate().take(2) {
        seeds.push(("ota_download", [vec![1, j as u8], c.clone()].concat()));
    }
    seeds
}

/// The fixture's clock, Unix ms.
const NOW_MS: u64 = 1_700_000_000_000;
/// The timestamp window of the fixture's checks.
const WINDOW_MS: u64 = 60_000;
/// One day in ms.
const DAY_MS: u64 = 86_400_000;

/// A CA, one group at epoch 7 with a publisher and a subscriber, an enrolled device and a
/// pending enrollment; every key is a fixed small scalar, so runs are reproducible.
struct Fixture {
    now: u64,
    ca: KeyPair,
    group: GroupId,
    /// (d_i, joined member): the publisher, then the subscriber.
    members: Vec<(KeyPair, JoinedMember)>,
    keys: GroupKeys,
    signed: SignedGroupInfo,
    /// The subscriber's keyring at the current epoch.
    keyring: Keyring,
    /// The CA's state with both members joined at epoch 7.
    state: GroupState,
    enroll_secret: EnrollmentSecret,
    pending: PendingEnrollment,
    credentials: Credentials,
    seeds: Vec<(&'static str, Vec<u8>)>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(Fixture::build)
}

fn secret(v: u64) -> SecretScalar {
    match SecretScalar::new(Scalar::from(v)) {
        Ok(k) => k,
        Err(_) => panic!("fixture scalar {v} is zero"),
    }
}

fn ok<T, E: core::fmt::Debug>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("fuzz fixture: {what}: {e:?}"),
    }
}

fn id(s: &str) -> DeviceId {
    ok(DeviceId::new(s), "device id")
}

fn sender_role(msg: &UnverifiedMessage) -> Role {
    msg.header().direction.sender_role()
}

/// A deterministic generator for the few fixture steps that take an RNG: SHA-256 of a counter.
struct CounterRng(u64);

impl RngCore for CounterRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_be_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_be_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(32) {
            let block = sha256(&[b"quva/fuzz/rng", &self.0.to_be_bytes()]);
            self.0 += 1;
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for CounterRng {}

impl Fixture {
    fn build() -> Self {
        let now = NOW_MS;
        let ca = KeyPair::from_secret(secret(0xca));
        let group = ok(GroupId::new("plant/line-3/temp"), "group id");
        let epoch = Epoch(7);
        let members: Vec<(KeyPair, JoinedMember)> = [
            ("pub-1", Role::Publisher, 0x11, 0x12),
            ("sub-1", Role::Subscriber, 0x21, 0x22),
        ]
        .into_iter()
        .map(|(name, role, d, g)| {
            let d = secret(d);
            let joined = ok(
                JoinedMember::from_keys(id(name), role, &d, &secret(g)),
                "member",
            );
            (KeyPair::from_secret(d), joined)
        })
        .collect();
        let joined = members.iter().map(|(_, j)| j);
        let keys = ok(
            GroupKeys::derive(&ca, &group, epoch, Privacy::Standard, joined),
            "group keys",
        );
        let signed = ok(
            SignedGroupInfo::sign_with_entropy(&ca, keys.group_info().clone(), &[0x51; 32]),
            "signed info",
        );
        // sub-1 sits on leaf 0 of the four-leaf subscriber tree of `tree_fixture`.
        let sub_member = members[1].1.member();
        let set = ok(
            TreeKeySet::new(
                keys.held_by(Role::Subscriber).secret().clone(),
                4,
                0,
                [0, 1, 3].map(|n| (n, tree_node_key(n))).to_vec(),
            ),
            "key set",
        );
        let delivery = ok(
            GroupKeyDelivery::seal(&signed, &keys, &set, sub_member, &mut CounterRng(0x41)),
            "delivery",
        );
        let keyring = ok(
            Keyring::from_delivery(
                ca.verifying_key(),
                &group,
                Role::Subscriber,
                &members[1].0,
                &delivery,
                DEFAULT_GRACE_MS,
            ),
            "keyring",
        );

        let enroll_secret = EnrollmentSecret::from_bytes(&[0x5e; 32]);
        let new_pending = |name: &str, r: u64, g: u64| {
            ok(
                PendingEnrollment::new_with(id(name), secret(r), secret(g), now, [7; 16]),
                "pending enrollment",
            )
        };
        let enrolled = new_pending("sensor-7", 0x31, 0x32);
        let issue = |p: &PendingEnrollment, k: u64| {
            let verified = ok(
                p.enroll_request(&enroll_secret)
                    .verify(&enroll_secret, now, WINDOW_MS),
                "enroll verify",
            );
            ok(
                verified.issue_with(&ca, 1, now - DAY_MS, now + DAY_MS, &secret(k)),
                "issue",
            )
        };
        let credentials = ok(
            enrolled.accept(&issue(&enrolled, 0x33), ca.public()),
            "accept",
        );
        let pending = new_pending("sensor-8", 0x34, 0x35);
        let response = issue(&pending, 0x36);

        let state = group_state(&ca, &group, &members, now);
        let mut f = Fixture {
            now,
            state,
            ca,
            group,
            members,
            keys,
            signed,
            keyring,
            enroll_secret,
            pending,
            credentials,
            seeds: Vec::new(),
        };
        f.seeds = f.build_seeds(&delivery, &response);
        f
    }

    fn build_seeds(
        &self,
        delivery: &GroupKeyDelivery,
        response: &EnrollResponse,
    ) -> Vec<(&'static str, Vec<u8>)> {
        let mut seeds: Vec<(&'static str, Vec<u8>)> = Vec::new();
        let info = self.signed.info_unverified();
        seeds.push(("point", info.q_p.to_bytes().to_vec()));
        seeds.push(("scalar", secret(0x1234).to_bytes().to_vec()));
        seeds.push(("signature", self.signed.signature().to_bytes()));

        for m in self.messages() {
            let split = UnverifiedMessage::decode(&m)
                .ok()
                .map(|msg| msg.header().to_bytes());
            if let Some(hdr) = split {
                seeds.push(("header", hdr));
            }
            seeds.push(("message", m.clone()));
            seeds.push(("message_verify", m));
        }
        let (sub_key, sub) = &self.members[1];
        let mut inner = Vec::new();
        sub.member().id.encode(&mut inner);
        self.signed.signature().encode(&mut inner);
        crate::codec::put_blob(&mut inner, b"21.5 C");
        seeds.push(("anonymous_inner", inner));

        let creds = &self.credentials;
        let enroll = self.pending.enroll_request(&self.enroll_secret);
        let renew = ok(
            renewal(creds, self.now).renew_request_with_entropy(creds.key(), &[9; 32]),
            "renew request",
        );
        let cert_proof = ok(
            CertConnectProof::new_with(creds, self.now, [3; 16], "fuzz-client", &[4; 32]),
            "cert proof",
        );
        let group_proof = ok(
            GroupConnectProof::new_with(
                self.keys.held_by(Role::Subscriber),
                self.group.clone(),
                Role::Subscriber,
                self.now,
                [5; 16],
                "anon-1f2e",
                &[6; 32],
            ),
            "group proof",
        );
        seeds.push(("implicit_cert", creds.cert().to_bytes()));
        seeds.push(("cert_request", enroll.request.to_bytes()));
        seeds.push(("enroll_request", enroll.to_bytes()));
        seeds.push(("renew_request", renew.to_bytes()));
        seeds.push(("enroll_response", response.to_bytes()));
        seeds.push(("cert_connect_proof", cert_proof.to_bytes()));
        seeds.push(("group_connect_proof", group_proof.to_bytes()));
        for (selector, bytes) in [
            (0u8, enroll.to_bytes()),
            (1, renew.to_bytes()),
            (2, response.to_bytes()),
            (3, cert_proof.to_bytes()),
            (4, group_proof.to_bytes()),
        ] {
            seeds.push(("enrollment_verify", [vec![selector], bytes].concat()));
        }

        let request = ok(
            GroupKeyRequest::new_with_nonce(
                &sub.member().id,
                &self.group,
                Role::Subscriber,
                self.now,
                [8; 16],
                sub_key,
                &secret(0x22),
                self.ca.public(),
            ),
            "group-key request",
        );
        seeds.push(("group_info", info.to_bytes()));
        seeds.push(("signed_group_info", self.signed.to_bytes()));
        seeds.push(("group_key_request", request.to_bytes()));
        seeds.push((
            "group_key_request_property",
            request.to_property().into_bytes(),
        ));
        seeds.push(("group_key_delivery", delivery.to_bytes()));
        seeds.push((
            "group_key_delivery_property",
            delivery.to_property().into_bytes(),
        ));
        seeds.push(("group_key_verify", [vec![0], request.to_bytes()].concat()));
        seeds.push(("group_key_verify", [vec![1], delivery.to_bytes()].concat()));
        seeds.push(("group_record", self.state.to_record()));
        seeds
    }

    /// Options 1 to 3 in both directions, sealed now by the direction's sender.
    fn messages(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for direction in [Direction::Forward, Direction::Query] {
            let role = direction.sender_role();
            let (key, joined) = match role {
                Role::Publisher => &self.members[0],
                Role::Subscriber => &self.members[1],
            };
            let sealer = Sealer {
                group: &self.group,
                epoch: self.keys.group_info().epoch,
                direction,
                sender: &joined.member().id,
                key,
            };
            let info = self.keys.group_info();
            let target = info.public_key(direction.target_key());
            let d_grp = self.keys.held_by(role);
            let m = b"21.5 C";
            out.push(ok(sealer.option1_with(self.now, m, &[1; 32]), "option 1"));
            out.push(ok(
                sealer.option2_with(self.now, target, m, &[2; 16], &[2; 32]),
                "option 2",
            ));
            let z = secret(0x77);
            out.push(ok(
                sealer.option3_with(self.now, d_grp, target, m, &z, &[3; 32], &[4; 32]),
                "option 3",
            ));
        }
        out
    }

    /// The members as the CA stores them: each with its leaf.
    fn stored_members(&self) -> Vec<(JoinedMember, u32)> {
        self.members
            .iter()
            .filter_map(|(_, j)| {
                let m = j.member();
                let leaf = self.state.tree(m.role).leaf_of(&m.id)?;
                Some((j.clone(), leaf))
            })
            .collect()
    }

    /// The node keys of both trees as the CA stores them.
    fn stored_nodes(&self) -> Vec<(Role, u32, NodeKey)> {
        [Role::Publisher, Role::Subscriber]
            .into_iter()
            .flat_map(|role| {
                self.state
                    .tree(role)
                    .node_keys()
                    .map(move |(n, k)| (role, n, k.clone()))
            })
            .collect()
    }
}

/// The CA's state of the group with both members joined at epoch 7.
fn group_state(
    ca: &KeyPair,
    group: &GroupId,
    members: &[(KeyPair, JoinedMember)],
    now: u64,
) -> GroupState {
    let mut rng = CounterRng(0);
    let mut state = ok(
        GroupState::create(
            ca,
            group.clone(),
            Privacy::Standard,
            Epoch(6),
            now,
            &mut rng,
        ),
        "group state",
    );
    let changes = members
        .iter()
        .map(|(_, j)| crate::rekey::Change::Join(j.clone()));
    match ok(state.stage(ca, changes, now, &mut rng), "stage") {
        Plan::Rekey(staged) => ok(state.commit(*staged), "commit"),
        Plan::Unchanged => panic!("fuzz fixture: members join"),
    }
    state
}

/// A pending renewal for the enrolled device (new r_i, same g_i).
fn renewal(creds: &Credentials, now: u64) -> PendingEnrollment {
    ok(
        PendingEnrollment::new_with(
            creds.id().clone(),
            secret(0x37),
            creds.group_secret().clone(),
            now,
            [0x0d; 16],
        ),
        "renewal",
    )
}

/// Verifies at the bridge (connection: the claimed sender, or a group-level connection of the
/// sender's role for option 3) and at a device holding both group keys; fresh replay caches.
fn verify_message(
    f: &Fixture,
    msg: &UnverifiedMessage,
) -> (
    Result<crate::message::BridgeVerified, crate::message::Rejection>,
    Result<crate::message::VerifiedMessage, crate::message::Rejection>,
) {
    let policy = Policy::default();
    let connection = match msg.claimed_sender() {
        Some(sender) => ConnectionIdentity::Device(sender.clone()),
        None => ConnectionIdentity::Group {
            group: msg.header().group.clone(),
            role: sender_role(msg),
        },
    };
    let bridge = msg.verify_at_bridge(
        f,
        &connection,
        &policy,
        &mut crate::message::BridgeReplay::default(),
        f.now,
    );
    let mut replay = ReplayCache::default();
    let device = msg.verify(f, f, &policy, &mut replay, f.now);
    if device.is_ok() {
        let again = msg.verify(f, f, &policy, &mut replay, f.now);
        assert!(again.is_err(), "an accepted message was accepted twice");
    }
    (bridge, device)
}

impl Directory for Fixture {
    fn group_keys(
        &self,
        group: &GroupId,
        epoch: Epoch,
        _now_ms: u64,
    ) -> Result<GroupPublicKeys, GroupLookupError> {
        let info = self.keys.group_info();
        if *group != info.group {
            Err(GroupLookupError::UnknownGroup)
        } else if epoch != info.epoch {
            Err(GroupLookupError::WrongEpoch)
        } else {
            Ok(GroupPublicKeys {
                q_p: info.q_p,
                q_s: info.q_s,
            })
        }
    }

    fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey> {
        self.members
            .iter()
            .find(|(_, j)| &j.member().id == id)
            .map(|(k, _)| k.verifying_key())
    }

    fn is_member(&self, group: &GroupId, epoch: Epoch, id: &DeviceId, role: Role) -> bool {
        let info = self.keys.group_info();
        *group == info.group
            && epoch == info.epoch
            && self.members.iter().any(|(_, j)| {
                let m: &Member = j.member();
                &m.id == id && m.role == role
            })
    }
}

impl crate::message::HeldKeys for Fixture {
    fn group_secret(&self, group: &GroupId, epoch: Epoch, kind: GroupKeyKind) -> Option<&KeyPair> {
        let info = self.keys.group_info();
        (*group == info.group && epoch == info.epoch).then(|| self.keys.held_by(kind.holder_role()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_a_seed_and_every_seed_a_target() {
        let seeds = seeds();
        for (name, _) in TARGETS {
            assert!(seeds.iter().any(|(t, _)| t == name), "no seed for {name}");
        }
        for (name, input) in &seeds {
            run(name, input);
        }
    }

    #[test]
    fn the_fixture_accepts_its_own_messages() {
        let f = fixture();
        let messages = f.messages();
        assert_eq!(messages.len(), 6);
        for m in messages {
            let msg = UnverifiedMessage::decode(&m).unwrap();
            let (bridge, device) = verify_message(f, &msg);
            assert!(bridge.is_ok(), "{:?}", msg.header());
            assert_eq!(device.unwrap().payload(), b"21.5 C");
        }
    }

    #[test]
    fn the_fixture_accepts_its_own_notices_and_record() {
        let f = fixture();
        let notice = TreeNotice::from_bytes(&tree_fixture().notice).unwrap();
        let mut ring = f.keyring.clone();
        assert_eq!(ring.apply_tree_notice(&notice, f.now), Ok(Epoch(8)));
        let state = GroupState::from_record(
            &f.ca,
            &f.state.to_record(),
            f.stored_members(),
            f.stored_nodes(),
        )
        .unwrap();
        assert_eq!(state.epoch(), Epoch(7));
        assert_eq!(state.members().count(), 2);
    }

    #[test]
    fn the_fixture_accepts_its_own_connect_data() {
        let f = fixture();
        let creds = &f.credentials;
        let renew = renewal(creds, f.now)
            .renew_request_with_entropy(creds.key(), &[9; 32])
            .unwrap();
        assert!(
            renew
                .verify(creds.cert(), f.ca.public(), f.now, WINDOW_MS)
                .is_ok()
        );
        let proof =
            CertConnectProof::new_with(creds, f.now, [3; 16], "fuzz-client", &[4; 32]).unwrap();
        assert!(
            proof
                .verify(f.ca.public(), "fuzz-client", f.now, WINDOW_MS)
                .is_ok()
        );
    }

    #[test]
    fn the_fixture_holder_adopts_its_own_tree_notice() {
        let t = tree_fixture();
        let notice = TreeNotice::from_bytes(&t.notice).unwrap();
        let mut holder = t.holder.clone();
        let adopted = holder
            .apply(&fixture().ca.verifying_key(), &notice)
            .unwrap();
        assert_eq!(adopted.openings(), 2);
        assert_eq!(holder.epoch(), Epoch(8));
    }

    #[test]
    fn the_fixture_accepts_its_own_direct_message_and_release() {
        let f = fixture();
        let o = ota_fixture();
        let seeds = ota_seeds();
        let (_, direct) = seeds.iter().find(|(t, _)| *t == "direct_message").unwrap();
        let msg = UnverifiedDirect::from_bytes(direct).unwrap();
        let me = &f.credentials;
        let opened = msg
            .open(
                me.id(),
                me.key(),
                f.ca.public(),
                &o.listing,
                DirectFloor::NONE,
                f.now,
            )
            .unwrap()
            .commit();
        assert_eq!(opened.payload(), b"rotate");
        let mut d = Download::new(o.manifest.clone(), o.key.clone()).unwrap();
        let mut image = Vec::new();
        for (j, c) in o.release.chunks().iter().enumerate() {
            image.extend_from_slice(d.open_chunk(j as u32, c).unwrap().plaintext());
            d.mark_stored(j as u32).unwrap();
        }
        assert_eq!(&image[..], &OTA_IMAGE[..]);
        assert!(d.finish(&sha256(&[&image])).is_ok());
    }

    #[test]
    fn an_unknown_target_panics() {
        assert!(std::panic::catch_unwind(|| run("no-such-target", &[])).is_err());
    }
}
