//! The test vectors of PROTOCOL.md §10: generated from fixed inputs by `examples/gen-vectors.rs`,
//! checked by `tests/vectors.rs`. Each case is recomputed from its inputs, and also checked
//! semantically (signatures verify, keys match), so the file is evidence, not just a snapshot.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use quva_client::codec::{Decode, Encode};
use quva_client::curve::{KeyPair, Point, SecretScalar, hash_to_scalar};
use quva_client::direct::{DirectSealer, UnverifiedDirect};
use quva_client::ecies;
use quva_client::enrollment::{Credentials, ImplicitCert};
use quva_client::enrollment::{EnrollRequest, EnrollResponse, EnrollmentSecret, PendingEnrollment};
use quva_client::group::{
    GroupInfo, GroupKeyRequest, GroupKeys, JoinedMember, Privacy, SignedGroupInfo,
};
use quva_client::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use quva_client::message::{Direction, Sealer, UnverifiedMessage};
use quva_client::ota::{ContentKey, KeyMessage, ReleaseSigner, UnverifiedManifest};
use quva_client::rekey::tree::{
    KeyTree, NodeKey, TreeChanges, TreeError, TreeHolder, TreeKeySet, TreeNotice, index,
};
use quva_client::schnorr::{Signature, VerifyingKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Deterministic "random" bytes for a labelled input: SHA-256("quva-vector" || label).
pub fn fixed32(label: &str) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"quva-vector")
        .chain_update(label)
        .finalize()
        .into()
}

fn fixed_secret(label: &str) -> SecretScalar {
    SecretScalar::new(hash_to_scalar("quva-vector", &[label.as_bytes()]).unwrap()).unwrap()
}

fn fixed16(label: &str) -> [u8; 16] {
    fixed32(label)[..16].try_into().unwrap()
}

fn h(b: &[u8]) -> String {
    hex::encode(b)
}

fn sc(k: &SecretScalar) -> String {
    h(&k.to_bytes()[..])
}

fn pt(p: &Point) -> String {
    h(&p.to_bytes())
}

// ---- reading inputs back ------------------------------------------------------------------------

fn field<'a>(case: &'a Value, name: &str) -> &'a Value {
    case.get(name)
        .unwrap_or_else(|| panic!("case lacks field {name}: {case}"))
}

fn bytes(case: &Value, name: &str) -> Vec<u8> {
    hex::decode(field(case, name).as_str().expect("hex string")).expect("valid hex")
}

fn arr<const N: usize>(case: &Value, name: &str) -> [u8; N] {
    bytes(case, name)
        .try_into()
        .unwrap_or_else(|_| panic!("{name} must be {N} bytes"))
}

fn secret(case: &Value, name: &str) -> SecretScalar {
    SecretScalar::from_bytes(&arr::<32>(case, name)).expect("secret scalar")
}

fn point(case: &Value, name: &str) -> Point {
    Point::from_bytes(&bytes(case, name)).expect("point")
}

fn text<'a>(case: &'a Value, name: &str) -> &'a str {
    field(case, name).as_str().expect("text")
}

fn num(case: &Value, name: &str) -> u64 {
    field(case, name).as_u64().expect("integer")
}

// ---- the kinds -----------------------------------------------------------------------------------

/// The outputs of a case, computed from its inputs.
pub fn compute(case: &Value) -> Value {
    match text(case, "kind") {
        "hash_to_scalar" => {
            let out = hash_to_scalar(text(case, "tag"), &[&bytes(case, "data")]).unwrap();
            json!({ "out": h(&out.to_bytes()) })
        }
        "schnorr" => {
            let key = KeyPair::from_secret(secret(case, "d"));
            let sig = key
                .sign_with_entropy(text(case, "tag"), &bytes(case, "body"), &arr(case, "rand"))
                .unwrap();
            json!({ "sig": h(&sig.to_bytes()) })
        }
        "ecqv" => {
            let ca = KeyPair::from_secret(secret(case, "d_ca"));
            let id = DeviceId::new(text(case, "id")).unwrap();
            let pending = PendingEnrollment::new_with(
                id,
                secret(case, "r"),
                secret(case, "g"),
                num(case, "t_ms"),
                arr(case, "nonce"),
            )
            .unwrap();
            let enroll_secret = EnrollmentSecret::from_bytes(&arr(case, "secret"));
            let request = pending.enroll_request(&enroll_secret);
            let verified = EnrollRequest::from_bytes(&request.to_bytes())
                .unwrap()
                .verify(&enroll_secret, num(case, "t_ms"), 0)
                .unwrap();
            let response = verified
                .dangerous_issue_with(
                    &ca,
                    num(case, "serial"),
                    num(case, "not_before"),
                    num(case, "not_after"),
                    &secret(case, "k"),
                )
                .unwrap();
            let creds = pending
                .accept(
                    &EnrollResponse::from_bytes(&response.to_bytes()).unwrap(),
                    ca.public(),
                )
                .unwrap();
            let q = response.cert.open(ca.public()).unwrap();
            assert_eq!(&q.0, creds.key().public(), "accept's key equals open's");
            json!({
                "request": h(&request.to_bytes()),
                "cert": h(&response.cert.to_bytes()),
                "a": h(&response.reconstruction.to_bytes()),
                "d": sc(creds.key().secret()),
                "q": pt(&q.0),
            })
        }
        "ecies" => {
            let eph = KeyPair::from_secret(secret(case, "r"));
            let out = ecies::dangerous_seal_with_ephemeral(
                &eph,
                &point(case, "q"),
                &bytes(case, "ctx"),
                &bytes(case, "m"),
            );
            json!({ "out": h(&out) })
        }
        "pop" => {
            let role = Role::from_u8(num(case, "role") as u8).expect("role 1 or 2");
            let request = GroupKeyRequest::new_with_nonce(
                &DeviceId::new(text(case, "id")).unwrap(),
                &GroupId::new(text(case, "group")).unwrap(),
                role,
                num(case, "t_ms"),
                arr(case, "nonce"),
                &KeyPair::from_secret(secret(case, "d")),
                &secret(case, "g"),
                &point(case, "q_ca"),
            )
            .unwrap();
            json!({ "out": h(&request.to_bytes()) })
        }
        "group_keys" => {
            let ca = KeyPair::from_secret(secret(case, "d_ca"));
            let members = members(case);
            let privacy = match num(case, "privacy") {
                1 => Privacy::Standard,
                2 => Privacy::Anonymous,
                other => panic!("privacy {other}"),
            };
            let group = GroupId::new(text(case, "group")).unwrap();
            let keys = GroupKeys::derive(
                &ca,
                &group,
                Epoch(num(case, "epoch") as u32),
                privacy,
                &members,
            )
            .unwrap();
            let info = keys.group_info().clone();
            let signed =
                SignedGroupInfo::sign_with_entropy(&ca, info.clone(), &arr(case, "rand")).unwrap();
            json!({
                "d_cag_p": sc(keys.cag_secret(GroupKeyKind::P)),
                "d_cag_s": sc(keys.cag_secret(GroupKeyKind::S)),
                "d_p": sc(keys.key(GroupKeyKind::P).secret()),
                "d_s": sc(keys.key(GroupKeyKind::S).secret()),
                "q_p": pt(keys.key(GroupKeyKind::P).public()),
                "q_s": pt(keys.key(GroupKeyKind::S).public()),
                "ginfo": h(&info.to_bytes()),
                "ginfo_sig": h(&signed.signature().to_bytes()),
            })
        }
        kind @ ("msg1" | "msg2" | "msg3") => {
            let group = GroupId::new(text(case, "group")).unwrap();
            let sender = DeviceId::new(text(case, "sender")).unwrap();
            let key = KeyPair::from_secret(secret(case, "d"));
            let direction = Direction::from_query(field(case, "query").as_bool().expect("bool"));
            let sealer = Sealer {
                group: &group,
                epoch: Epoch(num(case, "epoch") as u32),
                direction,
                sender: &sender,
                key: &key,
            };
            let (t, m) = (num(case, "t_ms"), bytes(case, "m"));
            let out = match kind {
                "msg1" => sealer.option1_with(t, &m, &arr(case, "rand")),
                "msg2" => sealer.option2_with(
                    t,
                    &point(case, "q_target"),
                    &m,
                    &arr(case, "salt"),
                    &arr(case, "rand"),
                ),
                _ => sealer.option3_with(
                    t,
                    &KeyPair::from_secret(secret(case, "d_grp")),
                    &point(case, "q_target"),
                    &m,
                    &secret(case, "z"),
                    &arr(case, "rand_inner"),
                    &arr(case, "rand_outer"),
                ),
            }
            .unwrap();
            json!({ "out": h(&out) })
        }
        "tree_rekey" => tree_rekey(case),
        "direct" => {
            let a = field(case, "a");
            let b = field(case, "b");
            let key = KeyPair::from_secret(secret(a, "d"));
            let cert = ImplicitCert::from_bytes(&bytes(a, "cert")).unwrap();
            assert_eq!(
                cert.id().as_str(),
                text(a, "id"),
                "a.id is the certificate's"
            );
            let out = DirectSealer {
                key: &key,
                cert: &cert,
            }
            .seal_with(
                &DeviceId::new(text(b, "id")).unwrap(),
                &point(b, "q"),
                num(case, "t_ms"),
                &bytes(case, "m"),
                &arr(case, "salt"),
                &arr(case, "rand"),
            )
            .unwrap();
            json!({ "out": h(&out) })
        }
        "ota" => {
            let signer = field(case, "signer");
            let key = KeyPair::from_secret(secret(signer, "d"));
            let cert = ImplicitCert::from_bytes(&bytes(signer, "cert")).unwrap();
            assert_eq!(
                cert.id().as_str(),
                text(signer, "id"),
                "signer.id is the certificate's"
            );
            let group = GroupId::new(text(case, "group")).unwrap();
            let release = ReleaseSigner {
                group: &group,
                key: &key,
                cert: &cert,
            }
            .release_with(
                num(case, "v"),
                text(case, "name"),
                &bytes(case, "image"),
                u32::try_from(num(case, "chunk_size")).unwrap(),
                num(case, "t_ms"),
                &ContentKey::from_bytes(&arr(case, "k_c")),
                &arr(case, "rand"),
            )
            .unwrap();
            let chunks: Vec<String> = release.chunks().iter().map(|c| h(c)).collect();
            json!({
                "manifest": h(release.manifest_message()),
                "chunks": chunks,
                "key_payload": h(&release.key_message().to_bytes()),
            })
        }
        other => panic!("unknown case kind {other}"),
    }
}

// ---- tree_rekey (PROTOCOL.md §5.1) ------------------------------------------------------------

fn role_of(case: &Value) -> Role {
    Role::from_u8(num(case, "role") as u8).expect("role 1 or 2")
}

fn ids(case: &Value, name: &str) -> Vec<DeviceId> {
    field(case, name)
        .as_array()
        .expect("id list")
        .iter()
        .map(|v| DeviceId::new(v.as_str().expect("id")).unwrap())
        .collect()
}

fn node_key(v: &Value) -> NodeKey {
    let b: [u8; 32] = hex::decode(v.as_str().expect("hex key"))
        .unwrap()
        .try_into()
        .expect("32-byte node key");
    NodeKey::from_bytes(&b)
}

/// `{"node": key, ...}` → (node, key) pairs.
fn node_map(v: &Value) -> Vec<(u32, NodeKey)> {
    v.as_object()
        .expect("node map")
        .iter()
        .map(|(n, k)| (n.parse().expect("node index"), node_key(k)))
        .collect()
}

fn holders_before(case: &Value) -> Vec<(DeviceId, u32)> {
    field(case, "holders_before")
        .as_array()
        .expect("holders")
        .iter()
        .map(|h| (DeviceId::new(text(h, "id")).unwrap(), num(h, "leaf") as u32))
        .collect()
}

fn tree_signed_info(case: &Value) -> SignedGroupInfo {
    let ca = KeyPair::from_secret(secret(case, "d_ca"));
    let info = GroupInfo::from_bytes(&bytes(case, "ginfo")).unwrap();
    SignedGroupInfo::sign_with_entropy(&ca, info, &arr(case, "rand")).unwrap()
}

fn tree_rekey(case: &Value) -> Value {
    let group = GroupId::new(text(case, "group")).unwrap();
    let role = role_of(case);
    let epoch = num(case, "epoch") as u32;
    let tree = KeyTree::from_parts(
        group,
        role,
        Epoch(epoch - 1),
        num(case, "w_before") as u32,
        holders_before(case),
        node_map(field(case, "node_keys_before")),
    )
    .unwrap();
    let changes = TreeChanges {
        departed: ids(case, "departed"),
        joined: ids(case, "joined"),
    };
    let fresh: Vec<NodeKey> = field(case, "fresh_keys")
        .as_array()
        .expect("fresh keys")
        .iter()
        .map(node_key)
        .collect();
    let mut drawn = fresh.iter();
    let staged = tree
        .plan_with(
            &changes,
            &secret(case, "x_new"),
            &tree_signed_info(case),
            arr(case, "salt"),
            &mut || drawn.next().expect("enough fresh keys").clone(),
        )
        .unwrap();
    assert!(drawn.next().is_none(), "every fresh key is drawn");
    let notice = staged.notice().map(|n| h(&n.to_bytes()));
    let mut key_sets = serde_json::Map::new();
    for (id, set) in staged.key_sets() {
        key_sets.insert(id.as_str().to_owned(), json!(h(&set.to_bytes())));
    }
    let mut tree = tree;
    tree.commit(staged).unwrap();
    let holders_after: Vec<Value> = tree
        .holders()
        .map(|(leaf, id)| {
            let mut path = serde_json::Map::new();
            for n in index::path(leaf, tree.width()) {
                path.insert(n.to_string(), json!(h(tree.key(n).unwrap().as_bytes())));
            }
            json!({ "id": id.as_str(), "leaf": leaf, "path": path })
        })
        .collect();
    json!({
        "w_after": tree.width(),
        "notice": notice,
        "holders_after": holders_after,
        "key_sets": key_sets,
    })
}

/// Each remaining holder, starting from its path in `node_keys_before`, processes the notice and
/// ends with its path in `holders_after` and X_new; each joiner's key set gives its path; a
/// departed holder cannot open the notice.
fn check_tree_rekey(case: &Value) {
    let group = GroupId::new(text(case, "group")).unwrap();
    let role = role_of(case);
    let epoch = Epoch(num(case, "epoch") as u32);
    let q_ca = KeyPair::from_secret(secret(case, "d_ca")).verifying_key();
    let x_new = secret(case, "x_new");
    let before: std::collections::BTreeMap<u32, NodeKey> =
        node_map(field(case, "node_keys_before"))
            .into_iter()
            .collect();
    let notice = TreeNotice::from_bytes(&bytes(case, "notice")).unwrap();
    assert_eq!(notice.epoch(), epoch);
    assert_eq!(notice.salt(), &arr::<16>(case, "salt"));
    let after: Vec<&Value> = field(case, "holders_after")
        .as_array()
        .unwrap()
        .iter()
        .collect();
    let path_after = |id: &str| -> Vec<(u32, NodeKey)> {
        let h = after
            .iter()
            .find(|h| text(h, "id") == id)
            .expect("holder after");
        node_map(field(h, "path"))
    };
    let joined: Vec<DeviceId> = ids(case, "joined");
    let departed: Vec<DeviceId> = ids(case, "departed");
    let w_before = num(case, "w_before") as u32;
    for (id, leaf) in holders_before(case) {
        let path: Vec<(u32, NodeKey)> = index::path(leaf, w_before)
            .into_iter()
            .map(|n| (n, before[&n].clone()))
            .collect();
        let mut holder = TreeHolder::from_parts(
            group.clone(),
            role,
            Epoch(epoch.0 - 1),
            w_before,
            leaf,
            path,
        )
        .unwrap();
        let result = holder.apply(&q_ca, &notice);
        if departed.contains(&id) {
            assert!(result.is_err(), "departed {id} opened the notice");
            continue;
        }
        let adopted = result.unwrap();
        assert!(adopted.key().key().secret() == &x_new, "{id} adopted X_new");
        assert_eq!(holder.path(), &path_after(id.as_str())[..], "{id}'s path");
    }
    for id in &joined {
        let set = TreeKeySet::from_bytes(
            &hex::decode(field(case, "key_sets")[id.as_str()].as_str().unwrap()).unwrap(),
        )
        .unwrap();
        let (mut holder, key) =
            TreeHolder::from_key_set(&q_ca, notice.signed_info(), &group, role, &set).unwrap();
        assert!(key.key().secret() == &x_new);
        assert_eq!(
            holder.path(),
            &path_after(id.as_str())[..],
            "joiner {id}'s path"
        );
        assert_eq!(
            holder.apply(&q_ca, &notice).err(),
            Some(TreeError::StaleEpoch)
        );
    }
}

/// The credentials of an enrolled device, issued from fixed inputs by the vectors' CA.
fn fixed_credentials(label: &str, id: &str, serial: u64) -> Credentials {
    let ca = KeyPair::from_secret(fixed_secret("ca"));
    let t_ms = 1_795_000_000_000u64;
    let pending = PendingEnrollment::new_with(
        DeviceId::new(id).unwrap(),
        fixed_secret(&format!("{label}/r")),
        fixed_secret(&format!("{label}/g")),
        t_ms,
        fixed16(&format!("{label}/nonce")),
    )
    .unwrap();
    let enroll_secret = EnrollmentSecret::from_bytes(&fixed32(&format!("{label}/secret")));
    let response = pending
        .enroll_request(&enroll_secret)
        .verify(&enroll_secret, t_ms, 0)
        .unwrap()
        .dangerous_issue_with(
            &ca,
            serial,
            t_ms,
            t_ms + 365 * 86_400_000,
            &fixed_secret(&format!("{label}/k")),
        )
        .unwrap();
    pending.accept(&response, ca.public()).unwrap()
}

/// Checks that a certificate carried in a case opens, under the vectors' CA, to the key d·G.
fn check_cert_opens_to(party: &Value) {
    let q_ca = Point::mul_base(&fixed_secret("ca"));
    let cert = ImplicitCert::from_bytes(&bytes(party, "cert")).unwrap();
    let d = KeyPair::from_secret(secret(party, "d"));
    assert_eq!(
        cert.open(&q_ca).unwrap().0,
        *d.public(),
        "cert opens to d·G"
    );
}

fn members(case: &Value) -> Vec<JoinedMember> {
    let mut out = Vec::new();
    for (list, role) in [
        ("publishers", Role::Publisher),
        ("subscribers", Role::Subscriber),
    ] {
        for m in field(case, list).as_array().expect("member list") {
            let id = DeviceId::new(text(m, "id")).unwrap();
            out.push(JoinedMember::from_keys(id, role, &secret(m, "d"), &secret(m, "g")).unwrap());
        }
    }
    out
}

/// Checks that do not reuse the generating path: signatures verify under the right key, the
/// certificate key matches the private key, ECIES opens.
pub fn check_semantics(case: &Value) {
    match text(case, "kind") {
        "schnorr" => {
            let key = KeyPair::from_secret(secret(case, "d"));
            let sig = Signature::from_bytes(&bytes(case, "sig")).unwrap();
            key.verifying_key()
                .verify(text(case, "tag"), &bytes(case, "body"), &sig)
                .unwrap();
        }
        "ecqv" => {
            let d = KeyPair::from_secret(secret(case, "d"));
            assert_eq!(d.public(), &point(case, "q"), "d·G == q");
        }
        "ecies" => {
            // r·G is the first 33 bytes of the output.
            let out = bytes(case, "out");
            assert_eq!(&out[..33], &Point::mul_base(&secret(case, "r")).to_bytes());
        }
        "group_keys" => {
            // d_P = Σ (d_p + g_p) + d_CAg,P over publishers, d_S likewise over subscribers,
            // and each public key is its secret times G.
            for (list, secret_name, cag, public) in [
                ("publishers", "d_p", "d_cag_p", "q_p"),
                ("subscribers", "d_s", "d_cag_s", "q_s"),
            ] {
                let mut sum = *secret(case, cag).as_scalar();
                for m in field(case, list).as_array().unwrap() {
                    sum += secret(m, "d").as_scalar();
                    sum += secret(m, "g").as_scalar();
                }
                assert_eq!(
                    &sum,
                    secret(case, secret_name).as_scalar(),
                    "{secret_name} is the sum"
                );
                assert_eq!(
                    Point::mul_base(&secret(case, secret_name)),
                    point(case, public)
                );
            }
            let ca = KeyPair::from_secret(secret(case, "d_ca"));
            let sig = Signature::from_bytes(&bytes(case, "ginfo_sig")).unwrap();
            ca.verifying_key()
                .verify("quva/v1/ginfo", &bytes(case, "ginfo"), &sig)
                .unwrap();
        }
        "tree_rekey" => check_tree_rekey(case),
        kind @ ("msg1" | "msg2" | "msg3") => {
            let msg = UnverifiedMessage::decode(&bytes(case, "out")).unwrap();
            let signer = if kind == "msg3" {
                secret(case, "d_grp")
            } else {
                secret(case, "d")
            };
            VerifyingKey(Point::mul_base(&signer))
                .verify(msg.signature_tag(), msg.body(), msg.signature())
                .unwrap();
            assert_eq!(msg.header().t_ms, num(case, "t_ms"));
        }
        "direct" => {
            let a = field(case, "a");
            check_cert_opens_to(a);
            let msg = UnverifiedDirect::decode(&bytes(case, "out")).unwrap();
            assert_eq!(msg.sender().as_str(), text(a, "id"));
            assert_eq!(msg.recipient().as_str(), text(field(case, "b"), "id"));
            assert_eq!(msg.t_ms(), num(case, "t_ms"));
            VerifyingKey(Point::mul_base(&secret(a, "d")))
                .verify("quva/v1/direct", msg.body(), msg.signature())
                .unwrap();
        }
        "ota" => {
            let signer = field(case, "signer");
            check_cert_opens_to(signer);
            let wire = bytes(case, "manifest");
            let man = UnverifiedManifest::decode(&wire).unwrap();
            let m = man.manifest();
            let body = &wire[..wire.len() - 65];
            let sig = Signature::from_bytes(&wire[wire.len() - 65..]).unwrap();
            VerifyingKey(Point::mul_base(&secret(signer, "d")))
                .verify("quva/v1/ota-manifest", body, &sig)
                .unwrap();
            assert_eq!(m.version, num(case, "v"));
            let image = bytes(case, "image");
            assert_eq!(m.size, image.len() as u64);
            let chunks = field(case, "chunks").as_array().unwrap();
            assert_eq!(chunks.len(), m.chunk_hashes.len());
            for (c, h_j) in chunks.iter().zip(&m.chunk_hashes) {
                let ct = hex::decode(c.as_str().unwrap()).unwrap();
                assert_eq!(&Sha256::digest(&ct)[..], &h_j[..], "h_j = H(ct_j)");
            }
            let key = KeyMessage::from_bytes(&bytes(case, "key_payload")).unwrap();
            assert_eq!(key.version, m.version);
            assert_eq!(&key.manifest_hash[..], &Sha256::digest(body)[..], "H(man)");
            assert_eq!(&key.image_hash[..], &Sha256::digest(&image)[..], "H(image)");
            assert_eq!(key.content_key.as_bytes(), &arr::<32>(case, "k_c"));
            assert_eq!(key.name, text(case, "name"));
        }
        _ => {}
    }
}

// ---- generation ----------------------------------------------------------------------------------

fn with_outputs(mut inputs: Value) -> Value {
    let outputs = compute(&inputs);
    for (k, v) in outputs.as_object().unwrap() {
        inputs[k] = v.clone();
    }
    inputs
}

const GROUPS: [&str; 3] = ["g", "plant/line-3/temp", "fleet/eu/site-7/hall/2/air"];
const MESSAGES: [&[u8]; 3] = [
    b"",
    b"x",
    b"21.5 C at 2026-11-23T12:00:00Z from the third hall sensor",
];

/// All cases, from fixed inputs.
pub fn generate() -> Value {
    let mut cases = Vec::new();
    for (tag, data) in [
        ("quva/v1/cert", &b""[..]),
        ("quva/v1/nonce", b"\x01"),
        ("quva/v1/ginfo", b"quva test vector data"),
    ] {
        cases.push(with_outputs(
            json!({ "kind": "hash_to_scalar", "tag": tag, "data": h(data) }),
        ));
    }
    for (i, body) in MESSAGES.iter().enumerate() {
        let tag = ["quva/v1/msg1", "quva/v1/connect", "quva/v1/ginfo"][i];
        cases.push(with_outputs(json!({
            "kind": "schnorr",
            "d": sc(&fixed_secret(&format!("schnorr/{i}/d"))),
            "tag": tag,
            "body": h(body),
            "rand": h(&fixed32(&format!("schnorr/{i}/rand"))),
        })));
    }
    for (i, id) in ["a", "sensor-01", "Pi-3B.plus_hall-2.fleet-eu"]
        .iter()
        .enumerate()
    {
        let t_ms = 1_795_000_000_000 + i as u64;
        cases.push(with_outputs(json!({
            "kind": "ecqv",
            "d_ca": sc(&fixed_secret("ca")),
            "id": id,
            "r": sc(&fixed_secret(&format!("ecqv/{i}/r"))),
            "g": sc(&fixed_secret(&format!("ecqv/{i}/g"))),
            "k": sc(&fixed_secret(&format!("ecqv/{i}/k"))),
            "serial": i as u64 + 1,
            "not_before": t_ms,
            "not_after": t_ms + 365 * 86_400_000,
            "t_ms": t_ms,
            "nonce": h(&fixed16(&format!("ecqv/{i}/nonce"))),
            "secret": h(&fixed32(&format!("ecqv/{i}/secret"))),
        })));
    }
    for (i, m) in MESSAGES.iter().enumerate() {
        cases.push(with_outputs(json!({
            "kind": "ecies",
            "q": pt(&Point::mul_base(&fixed_secret(&format!("ecies/{i}/d")))),
            "r": sc(&fixed_secret(&format!("ecies/{i}/r"))),
            "ctx": h(format!("quva/v1/gk-vector-{i}").as_bytes()),
            "m": h(m),
        })));
    }
    for (i, (group, role)) in GROUPS.iter().zip([1u64, 2, 1]).enumerate() {
        cases.push(with_outputs(json!({
            "kind": "pop",
            "id": format!("device-{i}"),
            "group": group,
            "role": role,
            "t_ms": 1_795_000_000_000u64 + i as u64,
            "nonce": h(&fixed16(&format!("pop/{i}/nonce"))),
            "d": sc(&fixed_secret(&format!("pop/{i}/d"))),
            "g": sc(&fixed_secret(&format!("pop/{i}/g"))),
            "q_ca": pt(&Point::mul_base(&fixed_secret("ca"))),
        })));
    }
    // Member counts: (publishers, subscribers); the last group has an empty publisher side.
    for (i, (group, (n_pub, n_sub))) in GROUPS.iter().zip([(1, 1), (2, 3), (0, 2)]).enumerate() {
        let list = |role: &str, n: usize| -> Vec<Value> {
            (0..n)
                .map(|j| {
                    json!({
                        "id": format!("{role}-{j}"),
                        "d": sc(&fixed_secret(&format!("group_keys/{i}/{role}/{j}/d"))),
                        "g": sc(&fixed_secret(&format!("group_keys/{i}/{role}/{j}/g"))),
                    })
                })
                .collect()
        };
        cases.push(with_outputs(json!({
            "kind": "group_keys",
            "d_ca": sc(&fixed_secret("ca")),
            "group": group,
            "epoch": i as u64 + 1,
            "privacy": if i == 2 { 2 } else { 1 },
            "publishers": list("pub", n_pub),
            "subscribers": list("sub", n_sub),
            "rand": h(&fixed32(&format!("group_keys/{i}/rand"))),
        })));
    }
    for kind in ["msg1", "msg2", "msg3"] {
        for (i, (group, m)) in GROUPS.iter().zip(MESSAGES).enumerate() {
            let query = i == 1;
            let mut case = json!({
                "kind": kind,
                "group": group,
                "epoch": 7 + i as u64,
                "t_ms": 1_795_000_000_000u64 + i as u64,
                "sender": format!("device-{i}"),
                "d": sc(&fixed_secret(&format!("{kind}/{i}/d"))),
                "m": h(m),
                "rand": h(&fixed32(&format!("{kind}/{i}/rand"))),
                "query": query,
            });
            if kind != "msg1" {
                case["q_target"] = json!(pt(&Point::mul_base(&fixed_secret(&format!(
                    "{kind}/{i}/target"
                )))));
            }
            if kind == "msg2" {
                case["salt"] = json!(h(&fixed16(&format!("{kind}/{i}/salt"))));
            }
            if kind == "msg3" {
                let obj = case.as_object_mut().unwrap();
                obj.remove("rand");
                obj.insert(
                    "d_grp".into(),
                    json!(sc(&fixed_secret(&format!("{kind}/{i}/grp")))),
                );
                obj.insert(
                    "z".into(),
                    json!(sc(&fixed_secret(&format!("{kind}/{i}/z")))),
                );
                obj.insert(
                    "rand_inner".into(),
                    json!(h(&fixed32(&format!("{kind}/{i}/inner")))),
                );
                obj.insert(
                    "rand_outer".into(),
                    json!(h(&fixed32(&format!("{kind}/{i}/outer")))),
                );
            }
            cases.push(with_outputs(case));
        }
    }
    cases.extend(tree_rekey_cases());
    let direct_ids = [
        ("a", "b"),
        ("owner", "sensor-01"),
        ("Pi-3B.plus_hall-2.fleet-eu", "x"),
    ];
    for (i, ((a_id, b_id), m)) in direct_ids.iter().zip(MESSAGES).enumerate() {
        let a = fixed_credentials(&format!("direct/{i}/a"), a_id, 100 + i as u64);
        cases.push(with_outputs(json!({
            "kind": "direct",
            "a": {
                "id": a_id,
                "d": sc(a.key().secret()),
                "cert": h(&a.cert().to_bytes()),
            },
            "b": {
                "id": b_id,
                "q": pt(&Point::mul_base(&fixed_secret(&format!("direct/{i}/b")))),
            },
            "t_ms": 1_795_000_000_000u64 + i as u64,
            "salt": h(&fixed16(&format!("direct/{i}/salt"))),
            "m": h(m),
            "rand": h(&fixed32(&format!("direct/{i}/rand"))),
        })));
    }
    // Images of 1, 10 and 64 bytes: one chunk under the default size, a shorter last chunk, and
    // an exact multiple of the chunk size.
    let ota = [
        (
            "fw/sensor-v2",
            "release-1",
            &b"\x00"[..],
            65_536u64,
            "sensor-fw-1.bin",
        ),
        ("g", "signer", b"0123456789", 4, "g.img"),
        (GROUPS[2], "fleet-release.eu", &[0x5au8; 64][..], 16, ""),
    ];
    for (i, (group, signer_id, image, chunk_size, name)) in ota.into_iter().enumerate() {
        let signer = fixed_credentials(&format!("ota/{i}/signer"), signer_id, 200 + i as u64);
        cases.push(with_outputs(json!({
            "kind": "ota",
            "group": group,
            "signer": {
                "id": signer_id,
                "d": sc(signer.key().secret()),
                "cert": h(&signer.cert().to_bytes()),
            },
            "v": 1 + 10 * i as u64,
            "name": name,
            "chunk_size": chunk_size,
            "image": h(image),
            "k_c": h(&fixed32(&format!("ota/{i}/k_c"))),
            "t_ms": 1_795_000_000_000u64 + i as u64,
            "rand": h(&fixed32(&format!("ota/{i}/rand"))),
        })));
    }
    json!({ "version": 1, "cases": cases })
}

/// The `tree_rekey` cases of PROTOCOL.md §10: (description, holders' role, W before, holders
/// before (id, leaf), departed, joined).
type TreeScenario = (
    &'static str,
    u8,
    u32,
    &'static [(&'static str, u32)],
    &'static [&'static str],
    &'static [&'static str],
);

/// The scenarios §10 asks for, plus a share replacement.
pub const TREE_SCENARIOS: &[TreeScenario] = &[
    (
        "leave only",
        2,
        8,
        &[
            ("s0", 0),
            ("s1", 1),
            ("s2", 2),
            ("s3", 3),
            ("s4", 4),
            ("s5", 5),
        ],
        &["s2"],
        &[],
    ),
    (
        "join only",
        1,
        4,
        &[("p0", 0), ("p1", 1), ("p3", 3)],
        &[],
        &["p9"],
    ),
    (
        "join with one doubling",
        2,
        2,
        &[("a", 0), ("b", 1)],
        &[],
        &["c"],
    ),
    (
        "join with two doublings in one epoch",
        1,
        2,
        &[("a", 0), ("b", 1)],
        &[],
        &["e", "c", "d"],
    ),
    (
        "batched leave + join",
        2,
        8,
        &[("a", 0), ("b", 1), ("d", 3), ("e", 4), ("f", 5), ("g", 6)],
        &["f", "g"],
        &["x"],
    ),
    (
        "a leaf reused by a joiner",
        1,
        4,
        &[("a", 0), ("b", 1), ("c", 2), ("d", 3)],
        &["b"],
        &["z"],
    ),
    (
        "periodic (no change)",
        2,
        4,
        &[("a", 0), ("b", 1), ("c", 2)],
        &[],
        &[],
    ),
    (
        "share replacement (departure + join of the same id)",
        2,
        4,
        &[("a", 0), ("b", 1), ("c", 2)],
        &["b"],
        &["b"],
    ),
];

fn tree_rekey_cases() -> Vec<Value> {
    let mut out = Vec::new();
    for (i, (description, role, w_before, holders, departed, joined)) in
        TREE_SCENARIOS.iter().enumerate()
    {
        let label = |what: &str| format!("tree_rekey/{i}/{what}");
        let group = GROUPS[i % GROUPS.len()];
        let epoch = 5 + i as u32;
        let mut node_keys = serde_json::Map::new();
        for x in 0..(2 * w_before - 1) {
            if holders.iter().any(|(_, leaf)| index::covers(x, *leaf)) {
                node_keys.insert(
                    x.to_string(),
                    json!(h(&fixed32(&label(&format!("node/{x}"))))),
                );
            }
        }
        let x_new = fixed_secret(&label("x"));
        let role = Role::from_u8(*role).unwrap();
        let other = Point::mul_base(&fixed_secret(&label("other")));
        let (q_p, q_s) = match role {
            Role::Subscriber => (Point::mul_base(&x_new), other),
            Role::Publisher => (other, Point::mul_base(&x_new)),
        };
        let n_after = (holders.len() + joined.len() - departed.len()) as u32;
        let (n_pub, n_sub) = match role {
            Role::Subscriber => (1, n_after),
            Role::Publisher => (n_after, 1),
        };
        let info = GroupInfo {
            group: GroupId::new(group).unwrap(),
            epoch: Epoch(epoch),
            q_cag_p: Point::mul_base(&fixed_secret(&label("cag_p"))),
            q_cag_s: Point::mul_base(&fixed_secret(&label("cag_s"))),
            q_p,
            q_s,
            privacy: Privacy::Standard,
            n_pub,
            n_sub,
            members_digest: fixed32(&label("members_digest")),
        };
        let mut case = json!({
            "kind": "tree_rekey",
            "description": description,
            "group": group,
            "role": role.to_u8(),
            "epoch": epoch,
            "w_before": w_before,
            "holders_before": holders.iter().map(|(id, leaf)| json!({"id": id, "leaf": leaf})).collect::<Vec<_>>(),
            "node_keys_before": node_keys,
            "departed": departed,
            "joined": joined,
            "fresh_keys": [],
            "salt": h(&fixed16(&label("salt"))),
            "x_new": sc(&x_new),
            "d_ca": sc(&fixed_secret("ca")),
            "ginfo": h(&info.to_bytes()),
            "rand": h(&fixed32(&label("rand"))),
        });
        // Draw fixed "random" keys until the planner has what it needs, then record them.
        let fresh: Vec<Value> = (0..64)
            .map(|k| json!(h(&fixed32(&label(&format!("fresh/{k}"))))))
            .collect();
        case["fresh_keys"] = json!(fresh);
        let needed = count_fresh(&case);
        case["fresh_keys"] = json!(fresh[..needed].to_vec());
        out.push(with_outputs(case));
    }
    out
}

/// How many fresh keys the planner draws for `case`.
fn count_fresh(case: &Value) -> usize {
    let tree = KeyTree::from_parts(
        GroupId::new(text(case, "group")).unwrap(),
        role_of(case),
        Epoch(num(case, "epoch") as u32 - 1),
        num(case, "w_before") as u32,
        holders_before(case),
        node_map(field(case, "node_keys_before")),
    )
    .unwrap();
    let mut n = 0;
    tree.plan_with(
        &TreeChanges {
            departed: ids(case, "departed"),
            joined: ids(case, "joined"),
        },
        &secret(case, "x_new"),
        &tree_signed_info(case),
        arr(case, "salt"),
        &mut || {
            n += 1;
            NodeKey::from_bytes(&[n as u8; 32])
        },
    )
    .unwrap();
    n
}
