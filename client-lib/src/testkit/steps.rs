//! Single protocol steps, one function each, for fixtures that carry the messages themselves.
//!
//! [`World`](super::World) and [`Pki`](super::Pki) run the whole exchange in memory; fixtures in
//! other crates put a real transport between the two sides instead: the bridge's test CA answers
//! over its `CaClient` trait and its test devices over MQTT, the CA engine's tests send commands
//! to its core, the CA's gRPC tests call the service. They all build their messages and answers
//! here, so that each step of PROTOCOL.md §3 (enrollment, renewal, the `quva-cert-v1` proof) and
//! §4 (group-key request, derivation, signed group info, delivery) is written once.
//!
//! The device's steps take the CA's public key the device was provisioned with; the CA's steps
//! take its key pair. Randomness is a parameter, as everywhere in this crate: seeded fixtures pass
//! their ChaCha20 generator, the daemons' tests `rand_core::OsRng`. Steps whose refusal a test may
//! want to see return the crate's error; the others panic, since a failure there is a broken
//! fixture.

use rand_core::CryptoRngCore;

use crate::codec::{Decode, Encode};
use crate::curve::{KeyPair, Point};
use crate::enrollment::{
    CertConnectProof, Credentials, EnrollError, EnrollRequest, EnrollResponse, EnrollmentSecret,
    ImplicitCert, PendingEnrollment,
};
use crate::group::{
    AcceptedGroupKey, GroupError, GroupKeyRequest, GroupKeys, JoinedMember, Member, Privacy,
    SignedGroupInfo,
};
use crate::ids::{DeviceId, Epoch, GroupId, Role};
use crate::rekey::GroupKeyDelivery;
use crate::rekey::tree::{NodeKey, TreeKeySet};
use crate::schnorr::VerifyingKey;

/// The time window within which the kit's CAs accept a request's timestamp, ms.
pub const WINDOW_MS: u64 = 60_000;

/// Device: an enrollment request of `id` under `secret` at `now`, with a fresh nonce. Returns the
/// pending state that accepts the answer and the request's encoding (a `quva-enroll-v1`
/// CONNECT's authentication data, an `Enroll` call's payload).
pub fn enroll_request(
    id: &str,
    secret: &EnrollmentSecret,
    now: u64,
    rng: &mut impl CryptoRngCore,
) -> (PendingEnrollment, Vec<u8>) {
    let pending = PendingEnrollment::new(DeviceId::new(id).unwrap(), now, rng);
    let request = pending.enroll_request(secret).to_bytes();
    (pending, request)
}

/// Device: a renewal request of `current` at `now` (its certificate key proves possession), with a
/// fresh nonce. Returns the pending state and the request's encoding.
pub fn renew_request(
    current: &Credentials,
    now: u64,
    rng: &mut impl CryptoRngCore,
) -> (PendingEnrollment, Vec<u8>) {
    let pending = PendingEnrollment::new(current.id().clone(), now, rng);
    let request = pending
        .renew_request(current.key(), rng)
        .unwrap()
        .to_bytes();
    (pending, request)
}

/// Device: accepts the CA's answer to an enrollment or renewal (an [`EnrollResponse`]'s
/// encoding) under the pre-loaded CA key `ca`. Panics on a malformed or mismatching answer.
pub fn accept_enrollment(pending: &PendingEnrollment, response: &[u8], ca: &Point) -> Credentials {
    let response = EnrollResponse::from_bytes(response).unwrap();
    pending.accept(&response, ca).unwrap()
}

/// Device: a fresh `quva-cert-v1` proof of `creds` for the connection `client_id` at `now`, encoded.
pub fn cert_proof(
    creds: &Credentials,
    now: u64,
    client_id: &str,
    rng: &mut impl CryptoRngCore,
) -> Vec<u8> {
    CertConnectProof::new(creds, now, client_id, rng)
        .unwrap()
        .to_bytes()
}

/// Device: a group-key request of `creds` for `group` in `role` at `now`, with a fresh nonce
/// (encode it with `to_bytes` for the CA, `to_property` for a `quva-gk` SUBSCRIBE).
pub fn join_request(
    creds: &Credentials,
    group: &GroupId,
    role: Role,
    now: u64,
    ca: &Point,
    rng: &mut impl CryptoRngCore,
) -> GroupKeyRequest {
    GroupKeyRequest::new(
        creds.id(),
        group,
        role,
        now,
        creds.key(),
        creds.group_secret(),
        ca,
        rng,
    )
    .unwrap()
}

/// Device: accepts a delivery of `group`'s key for `role` under the pre-loaded CA key `ca`.
/// Panics if the delivery does not verify.
pub fn accept_delivery(
    delivery: &GroupKeyDelivery,
    ca: &Point,
    creds: &Credentials,
    group: &GroupId,
    role: Role,
) -> AcceptedGroupKey {
    delivery
        .accept(&VerifyingKey(*ca), creds.key(), group, role)
        .unwrap()
        .1
}

/// CA: verifies `request` under the device's `secret` at `now` (within [`WINDOW_MS`]) and issues
/// certificate `serial`, valid from `validity.0` to `validity.1`.
///
/// # Errors
/// The refusal of [`EnrollRequest::verify`] (bad proof, timestamp outside the window) or of
/// `issue` (an empty validity).
pub fn issue(
    ca: &KeyPair,
    request: &EnrollRequest,
    secret: &EnrollmentSecret,
    serial: u64,
    now: u64,
    validity: (u64, u64),
    rng: &mut impl CryptoRngCore,
) -> Result<EnrollResponse, EnrollError> {
    request
        .verify(secret, now, WINDOW_MS)?
        .issue(ca, serial, validity.0, validity.1, rng)
}

/// CA: the member `cert`'s device is in `role`: the key opened from the certificate (which `ca`
/// issued; panics otherwise) and its group base.
pub fn member(ca: &Point, cert: &ImplicitCert, role: Role) -> Member {
    Member {
        id: cert.id().clone(),
        role,
        q: cert.open(ca).unwrap().0,
        g: *cert.group_base(),
    }
}

/// CA: the keys of `group` at `epoch` for the `joined` members, and their group info signed.
///
/// # Errors
/// The refusal of [`GroupKeys::derive`] (a member twice, too many members).
pub fn signed_keys(
    ca: &KeyPair,
    group: &GroupId,
    epoch: Epoch,
    privacy: Privacy,
    joined: &[JoinedMember],
    rng: &mut impl CryptoRngCore,
) -> Result<(GroupKeys, SignedGroupInfo), GroupError> {
    let keys = GroupKeys::derive(ca, group, epoch, privacy, joined)?;
    let signed = SignedGroupInfo::sign(ca, keys.group_info().clone(), rng)?;
    Ok((keys, signed))
}

/// CA: the delivery of `member`'s key for a CA that keeps no key tree: the holder gets a one-leaf
/// tree of its own, so it can accept the key but no tree notice (PROTOCOL.md §5.1 trees come from
/// [`GroupState`](crate::rekey::GroupState), as in [`World`](super::World)). For fixtures whose
/// code under test relays deliveries without reading them, like the bridge.
///
/// # Errors
/// [`GroupError::InfoMismatch`] if `signed` is not the info of `keys`.
pub fn delivery_without_tree(
    signed: &SignedGroupInfo,
    keys: &GroupKeys,
    member: &Member,
    rng: &mut impl CryptoRngCore,
) -> Result<GroupKeyDelivery, GroupError> {
    let x = keys.held_by(member.role).secret().clone();
    // INVARIANT: leaf 0 of a width-1 tree has the path [node 0].
    let set = TreeKeySet::new(x, 1, 0, vec![(0, NodeKey::random(rng))]).unwrap();
    GroupKeyDelivery::seal(signed, keys, &set, member, rng)
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;

    /// Every step against the others: a device enrolls, renews, proves its certificate, joins,
    /// and accepts a delivery from a CA that keeps no tree.
    #[test]
    fn the_steps_make_one_exchange() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let ca = KeyPair::random(&mut rng);
        let now = super::super::NOW;
        let secret = EnrollmentSecret::random(&mut rng);
        let (pending, bytes) = enroll_request("d1", &secret, now, &mut rng);
        let request = EnrollRequest::from_bytes(&bytes).unwrap();
        let wrong = EnrollmentSecret::random(&mut rng);
        assert!(issue(&ca, &request, &wrong, 1, now, (now, now + 1), &mut rng).is_err());
        let late = now + WINDOW_MS + 1;
        assert!(issue(&ca, &request, &secret, 1, late, (now, now + 1), &mut rng).is_err());
        let response = issue(&ca, &request, &secret, 1, now, (now, now + 1), &mut rng).unwrap();
        let creds = accept_enrollment(&pending, &response.to_bytes(), ca.public());
        assert_eq!(creds.id().as_str(), "d1");

        let (_, renewal) = renew_request(&creds, now, &mut rng);
        assert!(!renewal.is_empty());
        assert!(!cert_proof(&creds, now, "client-1", &mut rng).is_empty());

        let group = GroupId::new("plant/line-1/temp").unwrap();
        let member = member(ca.public(), creds.cert(), Role::Subscriber);
        assert_eq!(member.id, *creds.id());
        let req = join_request(&creds, &group, Role::Subscriber, now, ca.public(), &mut rng);
        let joined = req.open(&ca, &member, now, WINDOW_MS).unwrap();
        let twice = [joined.clone(), joined.clone()];
        assert!(signed_keys(&ca, &group, Epoch(1), Privacy::Standard, &twice, &mut rng).is_err());
        let (keys, signed) = signed_keys(
            &ca,
            &group,
            Epoch(1),
            Privacy::Standard,
            &[joined],
            &mut rng,
        )
        .unwrap();
        let delivery = delivery_without_tree(&signed, &keys, &member, &mut rng).unwrap();
        let key = accept_delivery(&delivery, ca.public(), &creds, &group, Role::Subscriber);
        assert_eq!(key.key().public(), keys.held_by(Role::Subscriber).public());
    }
}
