//! Test support: devices over raw MQTT 5 through the bridge: enrollment, certificate CONNECTs,
//! `quva-gk` joins, sealing and acknowledgements.

#![allow(
    dead_code,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::net::SocketAddr;

use quva_bridge::now_ms;
use quva_client::codec::{Decode, Encode};
use quva_client::curve::KeyPair;
use quva_client::enrollment::{
    CertConnectProof, Credentials, EnrollResponse, METHOD_CERT, METHOD_ENROLL, PendingEnrollment,
};
use quva_client::group::{AcceptedGroupKey, GK_PROPERTY, GroupKeyRequest};
use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
use quva_client::message::{Direction, Sealer};
use quva_client::rekey::GroupKeyDelivery;
use quva_client::rng::SystemRng;
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
    let pending =
        PendingEnrollment::new(DeviceId::new(id).unwrap(), now_ms(), &mut SystemRng::new());
    let data = pending.enroll_request(&secret).to_bytes();
    let (_raw, ack) = Raw::connect(addr, id, Some((METHOD_ENROLL, data))).await;
    (ack, pending)
}

/// Enrolls a device through the bridge.
pub async fn enroll(addr: SocketAddr, ca: &TestCa, id: &str) -> Credentials {
    let (ack, pending) = try_enroll(addr, ca, id).await;
    assert_eq!(ack.reason_code, v5::ConnectAckReason::Success);
    assert_eq!(ack.auth_method.as_deref(), Some(METHOD_ENROLL));
    let resp = EnrollResponse::from_bytes(&ack.auth_data.unwrap()).unwrap();
    pending.accept(&resp, ca.key.public()).unwrap()
}

/// A fresh `quva-cert-v1` proof.
pub fn cert_proof(creds: &Credentials, client_id: &str) -> Vec<u8> {
    CertConnectProof::new(creds, now_ms(), client_id, &mut SystemRng::new())
        .unwrap()
        .to_bytes()
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
    let req = GroupKeyRequest::new(
        creds.id(),
        &gid,
        role,
        now_ms(),
        creds.key(),
        creds.group_secret(),
        ca.key.public(),
        &mut SystemRng::new(),
    )
    .unwrap();
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
    GroupKeyDelivery::from_property(&value)
        .unwrap()
        .accept(&ca.key.verifying_key(), creds.key(), &gid, role)
        .unwrap()
        .1
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
