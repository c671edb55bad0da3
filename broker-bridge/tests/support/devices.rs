//! Test support: devices over raw MQTT 5 through the bridge: enrollment, certificate CONNECTs,
//! `quva-gk` joins, sealing and acknowledgements. The messages and their acceptance are the
//! device-side steps of quva-client's test kit (`testkit::steps`); the MQTT packets are built here.

#![allow(
    dead_code,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::net::SocketAddr;

use quva_bridge::now_ms;
use quva_client::curve::KeyPair;
use quva_client::enrollment::{Credentials, METHOD_CERT, METHOD_ENROLL, PendingEnrollment};
use quva_client::group::{AcceptedGroupKey, GK_PROPERTY};
use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
use quva_client::message::{Direction, Sealer};
use quva_client::rekey::GroupKeyDelivery;
use quva_client::testkit::steps;
use rand_core::OsRng;
use rmqtt_codec::v5;

use super::broker::Raw;
use super::test_ca::TestCa;

/// A `quva-enroll-v1` CONNECT for a device the CA registers now; returns its CONNACK.
pub async fn try_enroll(
    addr: SocketAddr,
    ca: &TestCa,
    id: &str,
) -> (Box<v5::ConnectAck>, PendingEnrollment) {
    let secret = ca.register(id);
    let (pending, data) = steps::enroll_request(id, &secret, now_ms(), &mut OsRng);
    let (_raw, ack) = Raw::connect(addr, id, Some((METHOD_ENROLL, data))).await;
    (ack, pending)
}

/// Enrolls a device through the bridge.
pub async fn enroll(addr: SocketAddr, ca: &TestCa, id: &str) -> Credentials {
    let (ack, pending) = try_enroll(addr, ca, id).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    assert_eq!(ack.auth_method.as_deref(), Some(METHOD_ENROLL));
    steps::accept_enrollment(&pending, &ack.auth_data.unwrap(), ca.key.public())
}

/// A fresh `quva-cert-v1` proof.
pub fn cert_proof(creds: &Credentials, client_id: &str) -> Vec<u8> {
    steps::cert_proof(creds, now_ms(), client_id, &mut OsRng)
}

/// A certificate CONNECT; returns the connection and the CONNACK.
pub async fn try_connect(
    addr: SocketAddr,
    creds: &Credentials,
    client_id: &str,
) -> (Raw, Box<v5::ConnectAck>) {
    Raw::connect(
        addr,
        client_id,
        Some((METHOD_CERT, cert_proof(creds, client_id))),
    )
    .await
}

/// A certificate CONNECT that must succeed.
pub async fn connect(addr: SocketAddr, creds: &Credentials, client_id: &str) -> Raw {
    let (raw, ack) = try_connect(addr, creds, client_id).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    raw
}

/// Joins `group` as `role` with a `quva-gk` SUBSCRIBE on its key topic.
pub async fn join(
    raw: &mut Raw,
    ca: &TestCa,
    creds: &Credentials,
    group: &str,
    role: Role,
    pid: u16,
) -> AcceptedGroupKey {
    let gid = GroupId::new(group).unwrap();
    let req = steps::join_request(creds, &gid, role, now_ms(), ca.key.public(), &mut OsRng);
    let topic = format!("quva/k/{group}/{}", role.topic_segment());
    let ack = raw
        .subscribe(pid, &topic, vec![(GK_PROPERTY.into(), req.to_property())])
        .await;
    assert_eq!(ack.status, vec![v5::SubscribeAckReason::GrantedQos1]);
    let value = ack
        .properties
        .iter()
        .find(|(k, _)| k == GK_PROPERTY)
        .map(|(_, v)| v.to_string())
        .expect("quva-gk on the SUBACK");
    let delivery = GroupKeyDelivery::from_property(&value).unwrap();
    steps::accept_delivery(&delivery, ca.key.public(), creds, &gid, role)
}

/// A forward-direction sealer.
pub fn sealer<'a>(
    group: &'a GroupId,
    epoch: Epoch,
    sender: &'a DeviceId,
    key: &'a KeyPair,
) -> Sealer<'a> {
    Sealer {
        group,
        epoch,
        direction: Direction::Forward,
        sender,
        key,
    }
}

/// The reason code of the PUBACK for packet `id`.
pub async fn puback(raw: &mut Raw, id: u16) -> u8 {
    loop {
        match raw.recv().await {
            Some(v5::Packet::PublishAck(a)) if a.packet_id.get() == id => {
                return a.reason_code.into();
            }
            Some(_) => {}
            None => panic!("no PUBACK for {id}"),
        }
    }
}
