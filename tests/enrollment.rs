//! Enrollment over a flaky link, with Mosquitto, quva-ca, quva-bridge and quva-node as real
//! processes (PROTOCOL.md §3): the enrollment secret is spent by the first use of a certificate,
//! so an enrollment whose reply is lost can be retried with the same secret, the certificate the
//! retry supersedes is refused, and after the first use nobody can enroll with the secret again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::time::{Duration, Instant};

use quva_client::codec::{Decode, Encode};
use quva_client::curve::Point;
use quva_client::enrollment::{EnrollResponse, EnrollmentSecret, METHOD_ENROLL, PendingEnrollment};
use quva_client::ids::DeviceId;
use quva_tests::raw::{RawMqtt, connect_once};
use quva_tests::{Cluster, STEP_TIMEOUT};
use rand_core::OsRng;

const ID: &str = "flaky-1";

fn secret_of(hex_text: &str) -> EnrollmentSecret {
    let bytes: Vec<u8> = (0..hex_text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex_text[i..i + 2], 16).unwrap())
        .collect();
    EnrollmentSecret::from_bytes(&bytes.try_into().unwrap())
}

fn ca_key(cluster: &Cluster) -> Point {
    let text = &cluster.ca_public;
    let bytes: Vec<u8> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect();
    Point::from_bytes(&bytes).unwrap()
}

fn enroll_request(secret: &EnrollmentSecret) -> (PendingEnrollment, Vec<u8>) {
    let pending =
        PendingEnrollment::new(DeviceId::new(ID).unwrap(), quva_node::now_ms(), &mut OsRng);
    let data = pending.enroll_request(secret).to_bytes();
    (pending, data)
}

/// Waits until the CA has issued a certificate to `id` (the reply may be lost on the way).
fn wait_issued(cluster: &Cluster, id: &str) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let v = cluster.admin(&["device", "show", id]);
        let issued = ["serial", "pending_serial"].iter().any(|k| {
            v["device"][k]
                .as_u64()
                .or_else(|| v[k].as_u64())
                .unwrap_or(0)
                != 0
        });
        if issued {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no certificate issued to {id}: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_lost_enrollment_reply_does_not_lock_the_device_out() {
    let cluster = Cluster::start(&["plant/#"]);
    let hex_secret = cluster.register(ID);
    let secret = secret_of(&hex_secret);
    let ca = ca_key(&cluster);

    // The CONNECT reaches the CA through the bridge; the socket closes before the CONNACK.
    let (_lost, data) = enroll_request(&secret);
    connect_once(cluster.bridge, "flaky-1-a", METHOD_ENROLL, data, false).unwrap();
    wait_issued(&cluster, ID);

    // A retry with the same secret and a fresh nonce is served. This reply arrives, but the
    // device is cut off again before it uses the certificate.
    let (pending, data) = enroll_request(&secret);
    let reply = connect_once(cluster.bridge, "flaky-1-b", METHOD_ENROLL, data, true)
        .expect("a retry with the same secret before the first use is served")
        .expect("the CONNACK carries the certificate");
    let unused = pending
        .accept(&EnrollResponse::from_bytes(&reply).unwrap(), &ca)
        .unwrap();

    // The device retries once more with quva-node, which uses its certificate at once.
    let node = cluster.node(ID);
    let out = node.enroll(&hex_secret).success();
    assert!(out.contains("enrolled flaky-1"), "{out}");
    let stored = quva_tests::offline::credentials(&node.store);
    assert!(stored.cert().serial() > unused.cert().serial());
    RawMqtt::try_connect_device(cluster.bridge, &node.store)
        .expect("the device's certificate is accepted");

    // The certificate the last retry superseded is refused at the bridge.
    let auth = quva_client::device::cert_connect_auth(
        &unused,
        "flaky-1-old",
        quva_node::now_ms(),
        &mut OsRng,
    )
    .unwrap();
    let refused = RawMqtt::try_connect_as(
        cluster.bridge,
        "flaky-1-old",
        Some((auth.method, auth.data)),
    )
    .expect_err("a superseded certificate is refused");
    assert!(refused.contains("NotAuthorized"), "{refused}");

    // After the first use, a third party holding the secret is refused.
    let (_, data) = enroll_request(&secret);
    let refused = connect_once(cluster.bridge, "thief", METHOD_ENROLL, data, true)
        .expect_err("the secret is spent by the first use");
    assert!(refused.contains("NotAuthorized"), "{refused}");
    let mut thief = cluster.node("thief");
    thief.id = ID.to_owned();
    let err = thief.enroll(&hex_secret).failure();
    assert!(err.contains("0x87") || err.contains("refused"), "{err}");
    // The device is unaffected.
    RawMqtt::try_connect_device(cluster.bridge, &node.store)
        .expect("the device's certificate is still accepted");
}
