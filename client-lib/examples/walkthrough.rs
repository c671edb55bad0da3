//! The whole Quva v1 protocol in one process, with the real cryptography and no network: a CA
//! enrolls three devices, they join a group, exchange messages in options 1, 2 and 3 in both
//! directions, a subscriber leaves and the group rekeys.
//!
//! Run: `cargo run -p quva-client --example walkthrough`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use quva_client::codec::{Decode, Encode};
use quva_client::curve::KeyPair;
use quva_client::enrollment::{
    Credentials, EnrollRequest, EnrollResponse, EnrollmentSecret, PendingEnrollment,
};
use quva_client::group::{GroupKeyRequest, Member, Privacy};
use quva_client::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use quva_client::message::{
    Direction, Directory, GroupLookupError, GroupPublicKeys, HeldKeys, Policy, Sealer,
    UnverifiedMessage,
};
use quva_client::rekey::tree::TreeNotice;
use quva_client::rekey::{Change, DEFAULT_GRACE_MS, GroupKeyDelivery, GroupState, Keyring, Plan};
use quva_client::replay::ReplayCache;
use quva_client::schnorr::VerifyingKey;
use rand_core::{CryptoRngCore, OsRng};

const WINDOW_MS: u64 = 60_000;

/// A device as the protocol sees it: its credentials, its role and its group keyring.
struct Device {
    creds: Credentials,
    role: Role,
    keyring: Option<Keyring>,
    replay: ReplayCache,
}

/// What a device knows to verify messages: the group info of its keyring and the member
/// certificates (published by the bridge on `quva/c/<group>`).
struct View<'a> {
    device: &'a Device,
    members: &'a BTreeMap<(Role, DeviceId), VerifyingKey>,
    now: u64,
}

impl Directory for View<'_> {
    fn group_keys(
        &self,
        group: &GroupId,
        epoch: Epoch,
        now: u64,
    ) -> Result<GroupPublicKeys, GroupLookupError> {
        let ring = self
            .device
            .keyring
            .as_ref()
            .ok_or(GroupLookupError::UnknownGroup)?;
        if ring.group() != group {
            return Err(GroupLookupError::UnknownGroup);
        }
        let info = ring
            .group_info_for(epoch, now)
            .ok_or(GroupLookupError::WrongEpoch)?;
        Ok(GroupPublicKeys {
            q_p: info.q_p,
            q_s: info.q_s,
        })
    }
    fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey> {
        self.members
            .iter()
            .find(|((_, m), _)| m == id)
            .map(|(_, k)| *k)
    }
    fn is_member(&self, _group: &GroupId, _epoch: Epoch, id: &DeviceId, role: Role) -> bool {
        self.members.contains_key(&(role, id.clone()))
    }
}

impl HeldKeys for View<'_> {
    fn group_secret(&self, _group: &GroupId, epoch: Epoch, kind: GroupKeyKind) -> Option<&KeyPair> {
        let ring = self.device.keyring.as_ref()?;
        (ring.role().held_key() == kind)
            .then(|| ring.key_for(epoch, self.now))
            .flatten()
    }
}

fn short(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        + "…"
}

fn main() {
    let mut rng = OsRng;
    let mut now: u64 = 1_795_000_000_000;
    let ca = KeyPair::random(&mut rng);
    println!("== CA\n  Q_CA = {}", short(&ca.public().to_bytes()));

    // The owner registers three devices; each gets a one-time enrollment secret.
    let roster = [
        ("pub-1", Role::Publisher),
        ("sub-1", Role::Subscriber),
        ("sub-2", Role::Subscriber),
    ];
    let mut devices: BTreeMap<String, Device> = BTreeMap::new();
    println!("\n== Enrollment (CONNECT quva-enroll-v1 → CONNACK)");
    for (serial, (name, role)) in roster.iter().enumerate() {
        let id = DeviceId::new(name).unwrap();
        let secret = EnrollmentSecret::random(&mut rng);
        let pending = PendingEnrollment::new(id, now, &mut rng);
        let request = pending.enroll_request(&secret).to_bytes();
        // The CA checks the HMAC proof of identity, the window and the points, then issues.
        let verified = EnrollRequest::from_bytes(&request)
            .unwrap()
            .verify(&secret, now, WINDOW_MS)
            .unwrap();
        let response = verified
            .issue(
                &ca,
                serial as u64 + 1,
                now,
                now + 365 * 86_400_000,
                &mut rng,
            )
            .unwrap();
        let response = response.to_bytes();
        let creds = pending
            .accept(&EnrollResponse::from_bytes(&response).unwrap(), ca.public())
            .unwrap();
        println!(
            "  {name:<6} request {} B, response {} B, serial {}, Q_i = {}",
            request.len(),
            response.len(),
            creds.cert().serial(),
            short(&creds.key().public().to_bytes())
        );
        devices.insert(
            name.to_string(),
            Device {
                creds,
                role: *role,
                keyring: None,
                replay: ReplayCache::default(),
            },
        );
    }

    // Every device asks for its group key with a proof of possession; the CA coalesces the joins.
    let group = GroupId::new("plant/line-3/temp").unwrap();
    let mut state = GroupState::create(
        &ca,
        group.clone(),
        Privacy::Standard,
        Epoch(0),
        now,
        &mut rng,
    )
    .unwrap();
    println!("\n== Join (SUBSCRIBE quva/k/{group}/<pub|sub> with quva-gk → SUBACK)");
    let mut joins = Vec::new();
    let mut members = BTreeMap::new();
    for d in devices.values() {
        let id = d.creds.id().clone();
        let property = GroupKeyRequest::new(
            &id,
            &group,
            d.role,
            now,
            d.creds.key(),
            d.creds.group_secret(),
            ca.public(),
            &mut rng,
        )
        .unwrap()
        .to_property();
        let member = Member {
            id: id.clone(),
            role: d.role,
            q: *d.creds.key().public(),
            g: *d.creds.cert().group_base(),
        };
        let joined = GroupKeyRequest::from_property(&property)
            .unwrap()
            .open(&ca, &member, now, WINDOW_MS)
            .unwrap();
        joins.push(Change::Join(joined));
        members.insert((d.role, id), d.creds.key().verifying_key());
        println!(
            "  {:<6} as {:?}: request {} chars",
            d.creds.id(),
            d.role,
            property.len()
        );
    }
    let Plan::Rekey(staged) = state.stage(&ca, joins, now, &mut rng).unwrap() else {
        unreachable!()
    };
    state.commit(*staged).unwrap();
    for d in devices.values_mut() {
        let member = state.member(d.creds.id(), d.role).unwrap().member().clone();
        let delivery = state.delivery(&member, &mut rng).unwrap().to_property();
        let delivery = GroupKeyDelivery::from_property(&delivery).unwrap();
        let ring = Keyring::from_delivery(
            ca.verifying_key(),
            &group,
            d.role,
            d.creds.key(),
            &delivery,
            DEFAULT_GRACE_MS,
        )
        .unwrap();
        println!(
            "  {:<6} holds d_{:?} of epoch {}",
            d.creds.id(),
            d.role.held_key(),
            ring.epoch()
        );
        d.keyring = Some(ring);
    }

    println!("\n== Messages (PUBLISH on {group} and {group}/_q)");
    let payload = b"21.5 C";
    for option in 1..=3 {
        send(
            &devices,
            &members,
            "pub-1",
            Direction::Forward,
            option,
            payload,
            now,
            &mut rng,
        );
    }
    send(
        &devices,
        &members,
        "sub-1",
        Direction::Query,
        2,
        b"send your calibration date",
        now,
        &mut rng,
    );

    // sub-2 is removed: d_P (which it held) goes to sub-1 individually; d_S goes as a broadcast.
    now += 1_000;
    println!("\n== Rekey: sub-2 leaves");
    let Plan::Rekey(staged) = state
        .stage_leave(
            &ca,
            DeviceId::new("sub-2").unwrap(),
            Role::Subscriber,
            now,
            &mut rng,
        )
        .unwrap()
    else {
        unreachable!()
    };
    let notices = staged.notices().to_vec();
    println!("  epoch {} → {}", staged.from_epoch(), staged.epoch());
    state.commit(*staged).unwrap();
    members.remove(&(Role::Subscriber, DeviceId::new("sub-2").unwrap()));
    for n in &notices {
        let wire = n.payload();
        println!(
            "  tree notice on {} ({} B, {} wraps)",
            n.topic,
            wire.len(),
            n.notice.wraps().len()
        );
        for d in devices.values_mut() {
            if n.role != d.role {
                continue;
            }
            let notice = TreeNotice::from_bytes(&wire).unwrap();
            let ring = d.keyring.as_mut().unwrap();
            match ring.apply_tree_notice(&notice, now) {
                Ok(e) => println!("    {:<6} adopted epoch {e}", d.creds.id()),
                Err(e) => println!("    {:<6} ignored it: {e}", d.creds.id()),
            }
        }
    }
    now += 40_000; // past the grace period of the old epoch
    println!("\n== After the rekey");
    send(
        &devices,
        &members,
        "pub-1",
        Direction::Forward,
        2,
        b"22.0 C",
        now,
        &mut rng,
    );
}

/// Seals a message from `from` and lets every other device try to verify it.
#[allow(clippy::too_many_arguments)]
fn send(
    devices: &BTreeMap<String, Device>,
    members: &BTreeMap<(Role, DeviceId), VerifyingKey>,
    from: &str,
    direction: Direction,
    option: u8,
    payload: &[u8],
    now: u64,
    rng: &mut impl CryptoRngCore,
) {
    let sender = &devices[from];
    let ring = sender.keyring.as_ref().unwrap();
    let info = ring.group_info();
    let sealer = Sealer {
        group: &info.group,
        epoch: ring.epoch(),
        direction,
        sender: sender.creds.id(),
        key: sender.creds.key(),
    };
    let target = if direction == Direction::Forward {
        info.q_p
    } else {
        info.q_s
    };
    let wire = match option {
        1 => sealer.option1(now, payload, rng),
        2 => sealer.option2(now, &target, payload, rng),
        _ => sealer.option3(now, ring.current_key(), &target, payload, rng),
    }
    .unwrap();
    let what = if direction == Direction::Query {
        "query"
    } else {
        "message"
    };
    println!(
        "  {from} sends option-{option} {what} ({} B on the wire, epoch {})",
        wire.len(),
        ring.epoch()
    );
    let plain_visible = wire.windows(payload.len()).any(|w| w == payload);
    let sender_visible = wire.windows(from.len()).any(|w| w == from.as_bytes());
    println!("    broker sees plaintext: {plain_visible}, sender id: {sender_visible}");
    for (name, d) in devices {
        if name == from {
            continue;
        }
        let view = View {
            device: d,
            members,
            now,
        };
        let mut replay = d.replay.clone();
        match UnverifiedMessage::decode(&wire)
            .and_then(|m| m.verify(&view, &view, &Policy::default(), &mut replay, now))
        {
            Ok(m) => println!(
                "    {name:<6} ✓ option {} from {}: {:?}",
                m.protection().number(),
                m.sender(),
                String::from_utf8_lossy(m.payload())
            ),
            Err(e) => println!("    {name:<6} ✗ {e}"),
        }
    }
}
