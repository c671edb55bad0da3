//! The enrollment rules of PROTOCOL.md §3 through the CA's gRPC server: a secret is spent by the
//! first use of a certificate issued under it, not by the issue; a retry before that use
//! supersedes the unused certificate; secrets expire; the first use of a renewed certificate
//! revokes the previous one; refused enrollments are recorded at a bounded rate per device.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use quva_ca::audit_kind::AuditKind;
use quva_client::codec::Encode;
use quva_client::enrollment::{CertConnectProof, Credentials, EnrollmentSecret, PendingEnrollment};
use quva_client::ids::Role;
use quva_client::testkit::steps;
use quva_proto::v1 as pb;
use rand_core::OsRng;
use support::Harness;
use tokio_stream::StreamExt;
use tonic::Code;

const G: &str = "plant/line-1/temp";
const DAY_MS: u64 = 24 * 3600 * 1000;

/// A fresh enrollment request of `id` under `secret` at the harness's time.
fn enroll_request(
    h: &Harness,
    id: &str,
    secret: &EnrollmentSecret,
) -> (PendingEnrollment, Vec<u8>) {
    steps::enroll_request(id, secret, h.now(), &mut OsRng)
}

async fn enroll(
    h: &mut Harness,
    id: &str,
    secret: &EnrollmentSecret,
) -> Result<Credentials, tonic::Status> {
    let (pending, data) = enroll_request(h, id, secret);
    let r = h
        .device
        .enroll(pb::EnrollRequest { auth_data: data })
        .await?
        .into_inner();
    Ok(steps::accept_enrollment(&pending, &r.auth_data, &h.ca))
}

async fn renew(h: &mut Harness, current: &Credentials) -> Result<Credentials, tonic::Status> {
    let (pending, data) = steps::renew_request(current, h.now(), &mut OsRng);
    let r = h
        .device
        .renew(pb::RenewRequest { auth_data: data })
        .await?
        .into_inner();
    Ok(steps::accept_enrollment(&pending, &r.auth_data, &h.ca))
}

async fn revoked(h: &mut Harness, serial: u64) -> bool {
    let r = h
        .device
        .get_revocation_status(pb::GetRevocationStatusRequest {
            serials: vec![serial],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.statuses[0].known, "serial {serial} unknown");
    r.statuses[0].revoked
}

/// A group the device may subscribe to, so that a group-key request is a use of its certificate.
async fn group_for(h: &mut Harness, id: &str) {
    if h.admin
        .show_group(pb::ShowGroupRequest { id: G.into() })
        .await
        .is_err()
    {
        h.create_group(G, false, 0).await;
    }
    h.permit(G, id, Role::Subscriber, true).await;
}

#[tokio::test]
async fn a_lost_reply_does_not_lock_the_device_out() {
    let mut h = Harness::start().await;
    let secret = h.register("d1").await;
    group_for(&mut h, "d1").await;
    // The CA issues, the reply never reaches the device.
    let (_lost, data) = enroll_request(&h, "d1", &secret);
    h.device
        .enroll(pb::EnrollRequest { auth_data: data })
        .await
        .unwrap();
    // The device retries with the same secret and a fresh nonce.
    let creds = enroll(&mut h, "d1", &secret)
        .await
        .expect("a retry before the first use is served");
    h.join(&creds, G, Role::Subscriber)
        .await
        .expect("the new certificate works");
    h.stop().await;
}

#[tokio::test]
async fn a_retry_supersedes_the_unused_certificate() {
    let mut h = Harness::start().await;
    let secret = h.register("d1").await;
    group_for(&mut h, "d1").await;
    let first = enroll(&mut h, "d1", &secret).await.unwrap();
    let second = enroll(&mut h, "d1", &secret).await.unwrap();
    assert!(second.cert().serial() > first.cert().serial());
    assert!(revoked(&mut h, first.cert().serial()).await);
    assert!(!revoked(&mut h, second.cert().serial()).await);
    let e = h.join(&first, G, Role::Subscriber).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    h.join(&second, G, Role::Subscriber).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn the_first_use_spends_the_secret() {
    let mut h = Harness::start().await;
    let secret = h.register("d1").await;
    group_for(&mut h, "d1").await;
    let creds = enroll(&mut h, "d1", &secret).await.unwrap();
    h.join(&creds, G, Role::Subscriber).await.unwrap();
    // Someone else holding the secret, after the first use.
    let e = enroll(&mut h, "d1", &secret).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // The device's certificate is untouched.
    assert!(!revoked(&mut h, creds.cert().serial()).await);
    h.join(&creds, G, Role::Subscriber).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn an_enrollment_secret_expires_after_seven_days_by_default() {
    let mut h = Harness::start().await;
    let secret = h.register("d1").await;
    h.clock.advance(7 * DAY_MS + 1);
    let e = enroll(&mut h, "d1", &secret).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Just inside the default lifetime it is accepted.
    let secret = h.register("d2").await;
    h.clock.advance(7 * DAY_MS - 1000);
    enroll(&mut h, "d2", &secret).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn the_first_use_of_a_renewed_certificate_revokes_the_previous_one() {
    let mut h = Harness::start().await;
    let secret = h.register("d1").await;
    group_for(&mut h, "d1").await;
    let old = enroll(&mut h, "d1", &secret).await.unwrap();
    h.join(&old, G, Role::Subscriber).await.unwrap();
    let new = renew(&mut h, &old).await.unwrap();
    // Until the new certificate is used, the old one keeps working.
    assert!(!revoked(&mut h, old.cert().serial()).await);
    h.join(&old, G, Role::Subscriber)
        .await
        .expect("the previous certificate stays valid until the new one is used");
    // The first use of the new one revokes the old one.
    h.join(&new, G, Role::Subscriber).await.unwrap();
    assert!(revoked(&mut h, old.cert().serial()).await);
    let e = h.join(&old, G, Role::Subscriber).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = renew(&mut h, &old).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    h.stop().await;
}

#[tokio::test]
async fn refused_enrollments_are_recorded_at_a_bounded_rate_per_device() {
    let mut h = Harness::start().await;
    let secret = h.register("d1").await;
    h.register("d2").await;
    let wrong = EnrollmentSecret::random(&mut OsRng);
    let audit_len = |kinds: &[(AuditKind, String)]| kinds.len();
    let before = audit_len(&h.audit_kinds().await);
    for _ in 0..50 {
        let e = enroll(&mut h, "d1", &wrong).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }
    let after_d1 = audit_len(&h.audit_kinds().await);
    assert!(
        after_d1 - before <= 8,
        "{} audit entries for 50 refusals of one device",
        after_d1 - before
    );
    // Another device's refusals are still recorded.
    let e = enroll(&mut h, "d2", &wrong).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(audit_len(&h.audit_kinds().await), after_d1 + 1);
    // Unknown device ids share one budget, so fresh ids do not buy fresh records.
    let before = audit_len(&h.audit_kinds().await);
    for i in 0..50 {
        let e = enroll(&mut h, &format!("ghost-{i}"), &wrong)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }
    let recorded = audit_len(&h.audit_kinds().await) - before;
    assert!(recorded <= 8, "{recorded} audit entries for 50 unknown ids");
    // The flood does not lock the device out.
    enroll(&mut h, "d1", &secret)
        .await
        .expect("a valid enrollment passes during a flood of refusals");
    h.stop().await;
}

/// `quva-cert-v1` CONNECT data for `creds`, as a device sends it through the bridge.
fn connect_proof(h: &Harness, creds: &Credentials) -> Vec<u8> {
    CertConnectProof::new(creds, h.now(), "client-1", &mut OsRng)
        .unwrap()
        .to_bytes()
}

async fn confirm(
    h: &mut Harness,
    creds: &Credentials,
) -> Result<pb::ConfirmCertificateUseResponse, tonic::Status> {
    let auth_data = connect_proof(h, creds);
    h.device
        .confirm_certificate_use(pb::ConfirmCertificateUseRequest { auth_data })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_connection_reported_by_the_bridge_is_the_first_use() {
    let mut h = Harness::start().await;
    let secret = h.register("d1").await;
    let creds = enroll(&mut h, "d1", &secret).await.unwrap();
    let r = confirm(&mut h, &creds).await.unwrap();
    assert_eq!(r.serial, creds.cert().serial());
    assert!(r.first_use);
    // The secret is spent; later uses change nothing.
    let e = enroll(&mut h, "d1", &secret).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let before = h.snapshot();
    let r = confirm(&mut h, &creds).await.unwrap();
    assert!(!r.first_use);
    assert!(h.snapshot() == before, "a later use changed the store");
    let kinds = h.audit_kinds().await;
    assert_eq!(
        kinds
            .iter()
            .filter(|(k, _)| *k == AuditKind::DeviceFirstUse)
            .count(),
        1
    );
    h.stop().await;
}

#[tokio::test]
async fn a_superseded_certificate_is_refused_and_its_notice_names_the_successor() {
    let mut h = Harness::start().await;
    let secret = h.register("d1").await;
    let first = enroll(&mut h, "d1", &secret).await.unwrap();
    let second = enroll(&mut h, "d1", &secret).await.unwrap();
    let e = confirm(&mut h, &first).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // The refusal spent nothing: the secret still serves, and supersedes `second` in turn.
    let third = enroll(&mut h, "d1", &secret).await.unwrap();
    let e = confirm(&mut h, &second).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(confirm(&mut h, &third).await.unwrap().first_use);
    let mut stream = h
        .device
        .watch_notices(pb::WatchNoticesRequest { from_seq: 1 })
        .await
        .unwrap()
        .into_inner();
    let mut superseded = Vec::new();
    while superseded.len() < 2 {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
            .await
            .expect("notice in time")
            .expect("stream open")
            .unwrap();
        if n.kind == pb::NoticeKind::Revoked as i32 {
            assert_eq!(n.device_id, "d1");
            superseded.push((n.serial, n.superseded_by));
        }
    }
    assert_eq!(
        superseded,
        vec![
            (first.cert().serial(), second.cert().serial()),
            (second.cert().serial(), third.cert().serial())
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn the_ca_checks_the_reported_proof_itself() {
    let mut h = Harness::start().await;
    let secret = h.register("d1").await;
    let creds = enroll(&mut h, "d1", &secret).await.unwrap();
    let proof = connect_proof(&h, &creds);
    let before = h.snapshot();
    for i in [proof.len() - 1, proof.len() - 40, 20] {
        let mut bad = proof.clone();
        bad[i] ^= 0x01;
        let e = h
            .device
            .confirm_certificate_use(pb::ConfirmCertificateUseRequest { auth_data: bad })
            .await
            .unwrap_err();
        assert!(
            matches!(e.code(), Code::PermissionDenied | Code::InvalidArgument),
            "byte {i}: {e:?}"
        );
    }
    // A proof outside the timestamp window.
    let stale = CertConnectProof::new(&creds, h.now() - 3_600_000, "c", &mut OsRng)
        .unwrap()
        .to_bytes();
    let e = h
        .device
        .confirm_certificate_use(pb::ConfirmCertificateUseRequest { auth_data: stale })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(h.snapshot() == before, "a refused proof changed the store");
    // The secret was not spent by any of them.
    enroll(&mut h, "d1", &secret).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn a_secret_lifetime_can_be_set_per_device() {
    let mut h = Harness::start().await;
    let r = h
        .admin
        .register_device(pb::RegisterDeviceRequest {
            id: "short".into(),
            secret_validity_secs: 60,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let dev = r.device.unwrap();
    assert_eq!(dev.enroll_secret_expires_ms, h.now() + 60_000);
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(&r.enroll_secret, &mut bytes).unwrap();
    let secret = EnrollmentSecret::from_bytes(&bytes);
    h.clock.advance(60_001);
    let e = enroll(&mut h, "short", &secret).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let kinds = h.audit_kinds().await;
    assert!(
        kinds
            .iter()
            .any(|(k, o)| *k == AuditKind::DeviceEnroll && o == "enrollment secret expired")
    );
    h.stop().await;
}

#[tokio::test]
async fn a_renewal_with_the_unused_key_is_its_first_use_and_one_with_the_old_key_supersedes_it() {
    let mut h = Harness::start().await;
    let secret = h.register("d1").await;
    let c1 = enroll(&mut h, "d1", &secret).await.unwrap();
    confirm(&mut h, &c1).await.unwrap();
    let c2 = renew(&mut h, &c1).await.unwrap();
    // Signed with the unused c2: c2's first use revokes c1; c3 is the new unused one.
    let c3 = renew(&mut h, &c2).await.unwrap();
    assert!(revoked(&mut h, c1.cert().serial()).await);
    assert!(!revoked(&mut h, c2.cert().serial()).await);
    // Signed with c2 (in use) again: supersedes the unused c3.
    let c4 = renew(&mut h, &c2).await.unwrap();
    assert!(revoked(&mut h, c3.cert().serial()).await);
    assert_eq!(
        confirm(&mut h, &c3).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert!(!confirm(&mut h, &c2).await.unwrap().first_use);
    assert!(confirm(&mut h, &c4).await.unwrap().first_use);
    assert!(revoked(&mut h, c2.cert().serial()).await);
    assert_eq!(
        renew(&mut h, &c1).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    h.stop().await;
}

#[tokio::test]
async fn the_unused_certificate_survives_a_restart() {
    let mut h = Harness::start().await;
    let secret = h.register("d1").await;
    let first = enroll(&mut h, "d1", &secret).await.unwrap();
    h.restart().await.unwrap();
    let second = enroll(&mut h, "d1", &secret).await.unwrap();
    assert!(revoked(&mut h, first.cert().serial()).await);
    let shown = h
        .admin
        .show_device(pb::ShowDeviceRequest { id: "d1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.pending_serial, second.cert().serial());
    assert!(confirm(&mut h, &second).await.unwrap().first_use);
    h.restart().await.unwrap();
    assert_eq!(
        enroll(&mut h, "d1", &secret).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    h.stop().await;
}
