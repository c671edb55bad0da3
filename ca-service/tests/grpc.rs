//! The CA through its real gRPC server on 127.0.0.1:0 over a temporary RocksDB.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use quva_ca::audit_kind::AuditKind;
use quva_ca::config::Config;
use quva_client::codec::{Decode, Encode};
use quva_client::curve::Point;
use quva_client::enrollment::{Credentials, EnrollmentSecret, ImplicitCert, PendingEnrollment};
use quva_client::group::{Member, SignedGroupInfo};
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_client::rekey::tree::TreeNotice;
use quva_client::rekey::{DEFAULT_GRACE_MS, GroupKeyDelivery, Keyring};
use quva_client::schnorr::VerifyingKey;
use quva_proto::v1 as pb;
use rand_core::OsRng;
use support::{Harness, device_client};
use tokio_stream::StreamExt;
use tonic::Code;

const G: &str = "plant/line-3/temp";

async fn group_info(
    h: &mut Harness,
    group: &str,
) -> (pb::GetGroupResponse, quva_client::group::GroupInfo) {
    let r = h
        .device
        .get_group(pb::GetGroupRequest {
            group: group.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let signed = SignedGroupInfo::from_bytes(&r.signed_ginfo).unwrap();
    let info = signed.verify(&VerifyingKey(h.ca)).unwrap().clone();
    (r, info)
}

fn members_of(ca: &Point, r: &pb::GetGroupResponse) -> Vec<Member> {
    r.members
        .iter()
        .map(|m| {
            let cert = ImplicitCert::from_bytes(&m.cert).unwrap();
            Member {
                id: cert.id().clone(),
                role: Role::from_u8(u8::try_from(m.role).unwrap()).unwrap(),
                q: cert.open(ca).unwrap().0,
                g: *cert.group_base(),
            }
        })
        .collect()
}

/// Notices from `from` until one satisfies `stop` (inclusive).
async fn notices_until(
    h: &mut Harness,
    from: u64,
    stop: impl Fn(&pb::Notice) -> bool,
) -> Vec<pb::Notice> {
    let mut stream = h
        .device
        .watch_notices(pb::WatchNoticesRequest { from_seq: from })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("notice in time")
            .expect("stream open")
            .unwrap();
        let done = stop(&n);
        out.push(n);
        if done {
            return out;
        }
    }
}

#[tokio::test]
async fn enroll_join_and_group_keys_verify_on_the_device() {
    let mut h = Harness::start().await;
    let s1 = h.enrolled("s1").await;
    let p1 = h.enrolled("p1").await;
    let g = h.create_group(G, false, 0).await;
    assert_eq!(g.epoch, 0);
    h.permit(G, "s1", Role::Subscriber, true).await;
    h.permit(G, "p1", Role::Publisher, true).await;

    let ks = h.join(&s1, G, Role::Subscriber).await.unwrap();
    assert_eq!(ks.epoch().0, 1);
    assert_eq!(ks.key().public(), &ks.info().q_p);
    let kp = h.join(&p1, G, Role::Publisher).await.unwrap();
    assert_eq!(kp.epoch().0, 2);
    assert_eq!(kp.key().public(), &kp.info().q_s);

    // The bridge's view: signed info, member certificates, Q_P and Q_S as sums over members.
    let (r, info) = group_info(&mut h, G).await;
    assert_eq!(info.epoch.0, 2);
    assert_eq!(r.members.len(), 2);
    info.check_members(&members_of(&h.ca, &r)).unwrap();
    assert_eq!(&info.q_s, kp.key().public());

    // The same share again: current keys, no new epoch.
    let again = h.join(&p1, G, Role::Publisher).await.unwrap();
    assert_eq!(again.epoch().0, 2);
    let status = h
        .admin
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.rekeys, 2);
    assert_eq!(status.devices, 2);
    assert_eq!(status.next_serial, 3);

    let shown = h
        .admin
        .show_group(pb::ShowGroupRequest { id: G.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.q_p, hex::encode(info.q_p.to_bytes()));
    assert!(shown.members.iter().all(|m| m.joined));
    h.stop().await;
}

#[tokio::test]
async fn rejections_have_the_right_status_and_change_nothing() {
    let mut h = Harness::start().await;
    let s1 = h.enrolled("s1").await;
    let r1 = h.enrolled("r1").await;
    h.create_group(G, false, 0).await;
    h.permit(G, "s1", Role::Subscriber, true).await;
    h.permit(G, "r1", Role::Subscriber, true).await;
    h.join(&s1, G, Role::Subscriber).await.unwrap();
    h.join(&r1, G, Role::Subscriber).await.unwrap();

    // Wrong tokens.
    let before = h.snapshot();
    let mut wrong = device_client(&h.url, &h.admin_token).await;
    let e = wrong
        .get_ca_info(pb::GetCaInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut none = device_client(&h.url, "not-a-token").await;
    let e = none.get_ca_info(pb::GetCaInfoRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut admin_as_bridge = quva_ca::cli::connect(&h.url, &h.bridge_token)
        .await
        .unwrap();
    let e = admin_as_bridge
        .list_devices(pb::ListDevicesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(h.snapshot() == before, "storage changed");

    // Unknown device.
    let ghost = PendingEnrollment::new(DeviceId::new("ghost").unwrap(), h.now(), &mut OsRng);
    let data = ghost
        .enroll_request(&EnrollmentSecret::random(&mut OsRng))
        .to_bytes();
    let e = h
        .device
        .enroll(pb::EnrollRequest { auth_data: data })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "not authorized");
    assert!(h.snapshot() == before, "storage changed");

    // Wrong enrollment secret, then a replayed enrollment.
    let secret = h.register("e1").await;
    let pending = PendingEnrollment::new(DeviceId::new("e1").unwrap(), h.now(), &mut OsRng);
    let before = h.snapshot();
    let bad = pending
        .enroll_request(&EnrollmentSecret::random(&mut OsRng))
        .to_bytes();
    let e = h
        .device
        .enroll(pb::EnrollRequest { auth_data: bad })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(h.snapshot() == before, "storage changed");
    let good = pending.enroll_request(&secret).to_bytes();
    h.device
        .enroll(pb::EnrollRequest {
            auth_data: good.clone(),
        })
        .await
        .unwrap();
    let before = h.snapshot();
    let e = h
        .device
        .enroll(pb::EnrollRequest { auth_data: good })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(h.snapshot() == before, "storage changed");

    // Malformed bytes.
    let e = h
        .device
        .enroll(pb::EnrollRequest {
            auth_data: vec![1, 2, 3],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = h
        .device
        .join_group(pb::JoinGroupRequest {
            request: vec![0xff; 40],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = h
        .device
        .join_group(pb::JoinGroupRequest {
            request: vec![1; 5000],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    assert!(h.snapshot() == before, "storage changed");

    // Bad proof of possession: every tampered byte of the ciphertext is refused.
    let req = h.join_request(&s1, G, Role::Subscriber);
    for i in [req.len() - 1, req.len() - 20, req.len() - 40] {
        let mut bad = req.clone();
        bad[i] ^= 0x01;
        let e = h
            .device
            .join_group(pb::JoinGroupRequest { request: bad })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "byte {i}");
    }
    assert!(h.snapshot() == before, "storage changed");

    // A replayed group-key request.
    let req = h.join_request(&s1, G, Role::Subscriber);
    h.device
        .join_group(pb::JoinGroupRequest {
            request: req.clone(),
        })
        .await
        .unwrap();
    let before = h.snapshot();
    let e = h
        .device
        .join_group(pb::JoinGroupRequest { request: req })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(h.snapshot() == before, "storage changed");

    // Unauthorized role and unknown group.
    let e = h.join(&s1, G, Role::Publisher).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = h
        .join(&s1, "other/group", Role::Subscriber)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(h.snapshot() == before, "storage changed");

    // A revoked device: its group rekeys without it, then it is refused.
    let epoch = h.join(&s1, G, Role::Subscriber).await.unwrap().epoch().0;
    h.admin
        .revoke_device(pb::RevokeDeviceRequest {
            id: "r1".into(),
            reason: "lost".into(),
        })
        .await
        .unwrap();
    let mut info = group_info(&mut h, G).await.1;
    for _ in 0..200 {
        if info.epoch.0 > epoch {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        info = group_info(&mut h, G).await.1;
    }
    assert_eq!(info.epoch.0, epoch + 1);
    assert_eq!(info.n_sub, 1);
    let before = h.snapshot();
    let e = h.join(&r1, G, Role::Subscriber).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(h.snapshot() == before, "storage changed");
    let cert = h
        .device
        .get_certificate(pb::GetCertificateRequest {
            by: Some(pb::get_certificate_request::By::DeviceId("r1".into())),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cert.revoked);

    // Every refusal is in the audit log; no secret is.
    let kinds = h.audit_kinds().await;
    assert_eq!(
        kinds
            .iter()
            .filter(|(k, _)| *k == AuditKind::AuthDenied)
            .count(),
        3
    );
    assert!(
        kinds
            .iter()
            .any(|(k, o)| *k == AuditKind::DeviceEnroll && o == "unknown device")
    );
    assert!(kinds.iter().any(|(k, o)| *k == AuditKind::DeviceEnroll
        && (o == "replayed nonce" || o == "no enrollment secret")));
    assert!(
        kinds
            .iter()
            .any(|(k, o)| *k == AuditKind::GroupJoin && o == "bad proof of possession")
    );
    assert!(
        kinds
            .iter()
            .any(|(k, o)| *k == AuditKind::GroupJoin && o == "role not allowed")
    );
    assert!(
        kinds
            .iter()
            .any(|(k, o)| *k == AuditKind::GroupJoin && o == "revoked device")
    );
    assert!(kinds.iter().any(|(k, _)| *k == AuditKind::DeviceRevoke));
    h.stop().await;
}

#[tokio::test]
async fn a_departed_subscriber_cannot_read_the_new_key() {
    let mut h = Harness::start().await;
    let s1 = h.enrolled("s1").await;
    let s2 = h.enrolled("s2").await;
    let p1 = h.enrolled("p1").await;
    h.create_group(G, false, 0).await;
    for (d, r) in [
        ("s1", Role::Subscriber),
        ("s2", Role::Subscriber),
        ("p1", Role::Publisher),
    ] {
        h.permit(G, d, r, true).await;
    }
    for (c, r) in [
        (&s1, Role::Subscriber),
        (&s2, Role::Subscriber),
        (&p1, Role::Publisher),
    ] {
        h.join(c, G, r).await.unwrap();
    }
    // Current keys for everyone (same shares: no rekey).
    let q_ca = VerifyingKey(h.ca);
    let gid = GroupId::new(G).unwrap();
    let mut rings = Vec::new();
    for (c, r) in [
        (&s1, Role::Subscriber),
        (&s2, Role::Subscriber),
        (&p1, Role::Publisher),
    ] {
        let req = h.join_request(c, G, r);
        let resp = h
            .device
            .join_group(pb::JoinGroupRequest { request: req })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.epoch, 3);
        let d = GroupKeyDelivery::from_bytes(&resp.response).unwrap();
        rings.push(Keyring::from_delivery(q_ca, &gid, r, c.key(), &d, DEFAULT_GRACE_MS).unwrap());
    }
    let last = h
        .admin
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .last_notice_seq;

    h.permit(G, "s2", Role::Subscriber, false).await;
    let notices = notices_until(&mut h, last + 1, |n| {
        n.kind == pb::NoticeKind::GroupUpdated as i32 && n.epoch == 4
    })
    .await;
    let (_, info) = group_info(&mut h, G).await;
    assert_eq!(info.epoch.0, 4);
    let rekeys: Vec<TreeNotice> = notices
        .iter()
        .filter(|n| n.kind == pb::NoticeKind::Rekey as i32)
        .map(|n| TreeNotice::from_bytes(&n.payload).unwrap())
        .collect();
    // One tree notice per role, on the key topics: no individual notice any more.
    assert_eq!(rekeys.len(), 2);
    let key_topics = [format!("quva/k/{G}/pub"), format!("quva/k/{G}/sub")];
    assert!(
        notices
            .iter()
            .filter(|n| n.kind == pb::NoticeKind::Rekey as i32)
            .all(|n| key_topics.contains(&n.topic))
    );
    let now = h.now();
    // s2 departed: no notice opens for it.
    for n in &rekeys {
        assert!(rings[1].clone().apply_tree_notice(n, now).is_err());
    }
    // s1 (subscriber, d_P) and p1 (publisher, d_S) adopt the new epoch.
    for i in [0usize, 2] {
        let adopted = rekeys
            .iter()
            .filter_map(|n| rings[i].apply_tree_notice(n, now).ok())
            .count();
        assert_eq!(adopted, 1, "ring {i}");
        assert_eq!(rings[i].epoch().0, 4);
    }
    assert_eq!(rings[0].current_key().public(), &info.q_p);
    assert_eq!(rings[2].current_key().public(), &info.q_s);
    // The removed subscriber's old key is not the new one.
    assert_ne!(rings[1].current_key().public(), &info.q_p);
    h.stop().await;
}

#[tokio::test]
async fn joins_inside_one_window_make_one_epoch() {
    let mut h = Harness::start_with(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        batch_window_ms: 400,
        ..Config::default()
    })
    .await;
    h.create_group(G, false, 0).await;
    let mut reqs = Vec::new();
    for i in 0..4 {
        let id = format!("d{i}");
        let c = h.enrolled(&id).await;
        h.permit(G, &id, Role::Subscriber, true).await;
        reqs.push(h.join_request(&c, G, Role::Subscriber));
    }
    let mut tasks = Vec::new();
    for req in &reqs {
        let mut client = h.device.clone();
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            client
                .join_group(pb::JoinGroupRequest { request: req })
                .await
                .unwrap()
                .into_inner()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().epoch, 1);
    }
    let (_, info) = group_info(&mut h, G).await;
    assert_eq!((info.epoch.0, info.n_sub), (1, 4));
    h.stop().await;
}

/// A fresh keyring of `creds` from a group-key request answered with the current keys.
async fn keyring(h: &mut Harness, creds: &Credentials, role: Role) -> (Keyring, u32) {
    let request = h.join_request(creds, G, role);
    let r = h
        .device
        .join_group(pb::JoinGroupRequest { request })
        .await
        .unwrap()
        .into_inner();
    let d = GroupKeyDelivery::from_bytes(&r.response).unwrap();
    let gid = GroupId::new(G).unwrap();
    let ring = Keyring::from_delivery(
        VerifyingKey(h.ca),
        &gid,
        role,
        creds.key(),
        &d,
        DEFAULT_GRACE_MS,
    )
    .unwrap();
    (ring, r.epoch)
}

fn rekey_notices(notices: &[pb::Notice]) -> Vec<(u32, TreeNotice)> {
    notices
        .iter()
        .filter(|n| n.kind == pb::NoticeKind::Rekey as i32)
        .map(|n| (n.epoch, TreeNotice::from_bytes(&n.payload).unwrap()))
        .collect()
}

async fn last_notice_seq(h: &mut Harness) -> u64 {
    h.admin
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .last_notice_seq
}

#[tokio::test]
async fn the_periodic_timer_changes_every_key_without_membership_changes() {
    let mut h = Harness::start().await;
    let s1 = h.enrolled("s1").await;
    let p1 = h.enrolled("p1").await;
    h.create_group(G, false, 60).await;
    h.permit(G, "s1", Role::Subscriber, true).await;
    h.permit(G, "p1", Role::Publisher, true).await;
    h.join(&s1, G, Role::Subscriber).await.unwrap();
    h.join(&p1, G, Role::Publisher).await.unwrap();
    let (mut ring_s, e0) = keyring(&mut h, &s1, Role::Subscriber).await;
    let (mut ring_p, _) = keyring(&mut h, &p1, Role::Publisher).await;
    let (r0, before) = group_info(&mut h, G).await;
    assert_eq!(before.epoch.0, e0);
    let last = last_notice_seq(&mut h).await;

    // Not yet due: nothing moves.
    h.clock.advance(30_000);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(group_info(&mut h, G).await.1.epoch.0, e0);

    h.clock.advance(31_000);
    let notices = notices_until(&mut h, last + 1, |n| {
        n.kind == pb::NoticeKind::GroupUpdated as i32 && n.group == G
    })
    .await;
    let (r1, after) = group_info(&mut h, G).await;
    assert_eq!(after.epoch.0, e0 + 1);
    assert_ne!(after.q_p, before.q_p);
    assert_ne!(after.q_s, before.q_s);
    assert_ne!(after.q_cag_p, before.q_cag_p);
    assert_ne!(after.q_cag_s, before.q_cag_s);
    // Same members, same certificates.
    assert_eq!((after.n_pub, after.n_sub), (1, 1));
    assert_eq!(after.members_digest, before.members_digest);
    assert_eq!(members_of(&h.ca, &r1), members_of(&h.ca, &r0));
    // Nobody left: both keys travel in one tree notice per role (a root wrap under the
    // unchanged trees), and both members adopt them.
    let rekeys = rekey_notices(&notices);
    assert_eq!(rekeys.len(), 2);
    assert!(rekeys.iter().all(|(_, n)| n.wraps().is_empty()));
    let now = h.now();
    for (ring, q) in [(&mut ring_s, &after.q_p), (&mut ring_p, &after.q_s)] {
        let adopted = rekeys
            .iter()
            .filter(|(_, n)| ring.apply_tree_notice(n, now).is_ok())
            .count();
        assert_eq!(adopted, 1);
        assert_eq!(ring.epoch().0, e0 + 1);
        assert_eq!(ring.current_key().public(), q);
    }
    let kinds = h.audit_kinds().await;
    assert_eq!(
        kinds
            .iter()
            .filter(|(k, _)| *k == AuditKind::GroupRekey)
            .count(),
        3
    );
    h.stop().await;
}

#[tokio::test]
async fn an_expired_certificate_leaves_its_groups() {
    let mut h = Harness::start_with(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        batch_window_ms: 30,
        sweep_interval_ms: 20,
        cert_validity_secs: 100,
        ..Config::default()
    })
    .await;
    h.create_group(G, false, 0).await;
    let old = h.enrolled("old").await;
    h.clock.advance(50_000);
    let young = h.enrolled("young").await;
    for (id, c) in [("old", &old), ("young", &young)] {
        h.permit(G, id, Role::Subscriber, true).await;
        h.join(c, G, Role::Subscriber).await.unwrap();
    }
    let (mut ring, e0) = keyring(&mut h, &young, Role::Subscriber).await;
    let (mut old_ring, _) = keyring(&mut h, &old, Role::Subscriber).await;
    let last = last_notice_seq(&mut h).await;

    // 120 s after the first enrollment: "old" has expired, "young" has not.
    h.clock.advance(70_000);
    let notices = notices_until(&mut h, last + 1, |n| {
        n.kind == pb::NoticeKind::GroupUpdated as i32 && n.group == G
    })
    .await;
    let (r, info) = group_info(&mut h, G).await;
    assert_eq!(info.epoch.0, e0 + 1);
    assert_eq!(info.n_sub, 1);
    let members = members_of(&h.ca, &r);
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].id.as_str(), "young");
    // A departed holder of d_P: the new one goes to the remaining subscriber alone.
    let now = h.now();
    let rekeys = rekey_notices(&notices);
    assert!(
        rekeys
            .iter()
            .all(|(_, n)| old_ring.apply_tree_notice(n, now).is_err())
    );
    let adopted = rekeys
        .iter()
        .filter(|(_, n)| ring.apply_tree_notice(n, now).is_ok())
        .count();
    assert_eq!(adopted, 1);
    assert_eq!(ring.current_key().public(), &info.q_p);
    // The expired device cannot get keys again; its permission stays for a renewed
    // certificate.
    let refused = h.join(&old, G, Role::Subscriber).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let shown = h
        .admin
        .show_group(pb::ShowGroupRequest { id: G.into() })
        .await
        .unwrap()
        .into_inner();
    let old_row = shown.members.iter().find(|m| m.device == "old").unwrap();
    assert!(!old_row.joined);
    let kinds = h.audit_kinds().await;
    assert!(kinds.iter().any(|(k, _)| *k == AuditKind::GroupRekey));
    h.stop().await;
}

#[tokio::test]
async fn a_joiner_cannot_open_notices_of_earlier_epochs() {
    let mut h = Harness::start().await;
    let s1 = h.enrolled("s1").await;
    let p1 = h.enrolled("p1").await;
    let late = h.enrolled("late").await;
    h.create_group(G, false, 0).await;
    h.permit(G, "s1", Role::Subscriber, true).await;
    h.permit(G, "p1", Role::Publisher, true).await;
    h.join(&s1, G, Role::Subscriber).await.unwrap();
    h.join(&p1, G, Role::Publisher).await.unwrap();
    // Two more epochs before the late joiner arrives.
    for _ in 0..2 {
        h.admin
            .rekey_group(pb::RekeyGroupRequest { id: G.into() })
            .await
            .unwrap();
    }
    let mut earlier_keys = Vec::new();
    let (_, info) = group_info(&mut h, G).await;
    earlier_keys.push(info.q_p);
    h.permit(G, "late", Role::Subscriber, true).await;
    let joined = h.join(&late, G, Role::Subscriber).await.unwrap();
    let join_epoch = joined.epoch().0;
    assert!(join_epoch > info.epoch.0);

    let notices = notices_until(&mut h, 1, |n| {
        n.kind == pb::NoticeKind::GroupUpdated as i32 && n.epoch == join_epoch
    })
    .await;
    let earlier: Vec<(u32, TreeNotice)> = rekey_notices(&notices)
        .into_iter()
        .filter(|(e, _)| *e < join_epoch)
        .collect();
    assert!(earlier.len() >= 4);
    let (mut ring, _) = keyring(&mut h, &late, Role::Subscriber).await;
    let now = h.now();
    for (_, n) in &earlier {
        assert!(ring.apply_tree_notice(n, now).is_err());
    }
    assert_eq!(ring.epoch().0, join_epoch);
    // The joiner's key is new: none of the subscribers' earlier keys.
    assert!(!earlier_keys.contains(ring.current_key().public()));
    h.stop().await;
}

/// The group state comes back from the group record and the member rows after a restart, and a
/// member row whose share does not match, or a missing row, stops the CA from serving.
#[tokio::test]
async fn restart_rebuilds_groups_from_member_rows() {
    use quva_ca::store::{Batch, CaStore, Tables};
    let mut h = Harness::start().await;
    h.create_group(G, false, 0).await;
    let mut creds = Vec::new();
    for (id, role) in [
        ("s1", Role::Subscriber),
        ("s2", Role::Subscriber),
        ("p1", Role::Publisher),
    ] {
        let c = h.enrolled(id).await;
        h.permit(G, id, role, true).await;
        h.join(&c, G, role).await.unwrap();
        creds.push((c, role));
    }
    let (before, info) = group_info(&mut h, G).await;
    assert_eq!((info.n_pub, info.n_sub), (1, 2));

    h.restart().await.unwrap();
    let (after, again) = group_info(&mut h, G).await;
    assert_eq!(again, info);
    assert_eq!(after.members, before.members);
    // The restored shares are the members': a repeated join gets the same keys, no new epoch.
    for (c, role) in &creds {
        let key = h.join(c, G, *role).await.unwrap();
        assert_eq!(key.info(), &info);
    }

    let gid = GroupId::new(G).unwrap();
    let id = |s: &str| DeviceId::new(s).unwrap();
    let s1 = h
        .store
        .member(&gid, Role::Subscriber, &id("s1"))
        .unwrap()
        .unwrap();
    let s2 = h
        .store
        .member(&gid, Role::Subscriber, &id("s2"))
        .unwrap()
        .unwrap();
    let p1 = h
        .store
        .member(&gid, Role::Publisher, &id("p1"))
        .unwrap()
        .unwrap();
    let write = |h: &Harness, edit: &dyn Fn(&mut Batch)| {
        let mut batch = Batch::new();
        edit(&mut batch);
        h.store.commit(batch).unwrap();
    };
    h.server.take().unwrap().stop().await.unwrap();

    // Another member's (valid) share in s1's row.
    let mut swapped = s1.clone();
    swapped.share = s2.share.clone();
    write(&h, &|b| b.put_member(&gid, &swapped).unwrap());
    assert!(h.restart().await.is_err(), "served with a wrong share");

    // A joined member's row gone: the keys no longer match the signed info.
    write(&h, &|b| {
        b.put_member(&gid, &s1).unwrap();
        b.delete_member(&gid, Role::Publisher, &id("p1"));
    });
    assert!(h.restart().await.is_err(), "served without a member");

    write(&h, &|b| b.put_member(&gid, &p1).unwrap());
    h.restart().await.unwrap();
    assert_eq!(group_info(&mut h, G).await.1, info);
    h.server.take().unwrap().stop().await.unwrap();

    // The subscribers' key tree: one node row gone, or a member moved to another leaf.
    let nodes = h.store.tree_nodes(&gid).unwrap();
    let (role, node, key) = nodes
        .iter()
        .find(|(r, _, _)| *r == Role::Subscriber)
        .unwrap()
        .clone();
    write(&h, &|b| b.delete_tree_node(&gid, role, node));
    assert!(h.restart().await.is_err(), "served with a node key missing");
    write(&h, &|b| b.put_tree_node(&gid, role, node, &key));
    let mut moved = s1.clone();
    moved.leaf += 2;
    write(&h, &|b| b.put_member(&gid, &moved).unwrap());
    assert!(
        h.restart().await.is_err(),
        "served with a member off its leaf"
    );
    write(&h, &|b| b.put_member(&gid, &s1).unwrap());
    h.restart().await.unwrap();
    assert_eq!(group_info(&mut h, G).await.1, info);
    h.stop().await;
}

/// The Prometheus endpoint reports the epochs and the writer time they took.
#[tokio::test]
async fn metrics_report_epochs_and_writer_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut h = Harness::start_with(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        batch_window_ms: 30,
        sweep_interval_ms: 20,
        ..Config::default()
    })
    .await;
    let metrics = h.server.as_ref().unwrap().metrics_addr().unwrap();
    let scrape = || async move {
        let mut s = tokio::net::TcpStream::connect(metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        let value = |name: &str| -> u64 {
            body.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing in {body}"))
                .trim()
                .parse()
                .unwrap()
        };
        (
            value("quva_ca_rekeys_total"),
            value("quva_ca_rekey_writer_microseconds_total"),
        )
    };
    assert_eq!(scrape().await, (0, 0));
    h.create_group(G, false, 0).await;
    let c = h.enrolled("s1").await;
    h.permit(G, "s1", Role::Subscriber, true).await;
    h.join(&c, G, Role::Subscriber).await.unwrap();
    let (rekeys, micros) = scrape().await;
    assert_eq!(rekeys, 1);
    assert!(micros > 0);
    h.stop().await;
}

/// Notices of the group before compaction and after: the current epoch minus one and the
/// latest REKEY notice of each topic stay, the rest is deleted; `WatchNotices` then sends only
/// what is kept, and a `from_seq` inside a gap starts at the next kept notice.
#[tokio::test]
async fn watch_notices_after_compaction_sends_the_kept_notices_across_gaps() {
    use quva_ca::store::Tables;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut h = Harness::start_with(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        batch_window_ms: 30,
        sweep_interval_ms: 20,
        retention: quva_ca::config::RetentionConfig {
            notice_epochs: 1,
            ..Default::default()
        },
        ..Config::default()
    })
    .await;
    let s1 = h.enrolled("s1").await;
    let p1 = h.enrolled("p1").await;
    h.create_group(G, false, 0).await;
    h.permit(G, "s1", Role::Subscriber, true).await;
    h.permit(G, "p1", Role::Publisher, true).await;
    h.join(&s1, G, Role::Subscriber).await.unwrap();
    h.join(&p1, G, Role::Publisher).await.unwrap();
    for _ in 0..4 {
        h.admin
            .rekey_group(pb::RekeyGroupRequest { id: G.into() })
            .await
            .unwrap();
    }
    let current = group_info(&mut h, G).await.1.epoch.0;
    let last = last_notice_seq(&mut h).await;
    // The sweep compacts on its own timer.
    let old =
        |n: &pb::Notice| n.kind == pb::NoticeKind::GroupUpdated as i32 && n.epoch + 1 < current;
    let mut kept = Vec::new();
    for _ in 0..200 {
        kept = h.store.notices(0, 0).unwrap();
        if !kept.iter().any(old) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(!kept.iter().any(old), "old epochs compacted");
    let kept_seqs: Vec<u64> = kept.iter().map(|n| n.seq).collect();
    assert!(
        kept_seqs.len() < usize::try_from(last).unwrap(),
        "some notices dropped"
    );
    assert_eq!(kept_seqs.last(), Some(&last), "the newest notice stays");
    // The stream from the start: exactly the kept notices, in order.
    let streamed = notices_until(&mut h, 1, |n| n.seq == last).await;
    assert_eq!(streamed, kept);
    // From inside a gap: the next kept notice.
    let gap = (1..last).find(|s| !kept_seqs.contains(s)).expect("a gap");
    let next_kept = *kept_seqs.iter().find(|s| **s > gap).unwrap();
    let from_gap = notices_until(&mut h, gap, |n| n.seq == last).await;
    assert_eq!(from_gap.first().map(|n| n.seq), Some(next_kept));
    assert!(from_gap.iter().all(|n| kept_seqs.contains(&n.seq)));
    // The metrics count the deleted notices.
    let metrics = h.server.as_ref().unwrap().metrics_addr().unwrap();
    let dropped = last - u64::try_from(kept.len()).unwrap();
    let mut counted = 0;
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        counted = body
            .lines()
            .find_map(|l| l.strip_prefix("quva_ca_compacted_notices_total "))
            .unwrap_or_else(|| panic!("no compaction counter in {body}"))
            .trim()
            .parse()
            .unwrap();
        if counted == dropped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counted, dropped, "quva_ca_compacted_notices_total");
    // Every kept notice of an old epoch is the latest REKEY notice of its topic.
    for n in kept.iter().filter(|n| n.epoch + 1 < current) {
        assert_eq!(n.kind, pb::NoticeKind::Rekey as i32, "seq {}", n.seq);
        assert!(
            !kept.iter().any(|m| m.topic == n.topic && m.seq > n.seq),
            "seq {} is not the latest on {}",
            n.seq,
            n.topic
        );
    }
    h.stop().await;
}
