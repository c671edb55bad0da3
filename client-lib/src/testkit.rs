//! The one test kit of the workspace: fixtures over the real protocol, for this crate's tests and,
//! with the `testkit` feature, for the device daemon's. Hidden; not part of the public interface.
//!
//! - [`Pki`] and [`Group`]: a CA that enrolls real devices, and groups whose verified member
//!   lists, keys and directory come from the real derivation (the direct-message and OTA tests).
//! - [`World`] and [`Node`]: an in-memory CA, bridge and broker around [`Device`]s: enrollment
//!   through the CONNECT exchange, group-key requests (SUBACK deliveries with the key-tree path),
//!   rekeys with their kind-3 tree notices retained on the key topics (one per role, PROTOCOL.md
//!   §5.1) and member lists, and exact-topic delivery (the device core's tests, and the daemon's
//!   store, OTA, signer and direct-message tests).
//! - [`steps`]: each protocol step on its own, device side and CA side, for fixtures in other
//!   crates that carry the messages over a real transport (the bridge's test CA and devices, the CA
//!   engine's and gRPC tests). [`Pki`] and [`World`] are built from the same steps.

// Fixtures fail loudly: a panic here is a broken test setup, not bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::codec::{Decode, Encode};
use crate::curve::KeyPair;
use crate::device::{Device, DeviceConfig, Enrollment, Output, Subscription};
use crate::enrollment::{Credentials, EnrollRequest, EnrollmentSecret, ImplicitCert};
use crate::group::{GroupKeyRequest, GroupKeys, JoinedMember, Member, Privacy};
use crate::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use crate::members::MemberList;
use crate::message::{Directory, GroupLookupError, GroupPublicKeys, HeldKeys};
use crate::reasons;
use crate::rekey::{Change, GroupState, Plan};
use crate::schnorr::{Signature, VerifyingKey};
use crate::topics;

pub mod steps;

/// `n` messages for batch verification (the benches and the instruction counts): message `i` is
/// 100 bytes of `i`, signed under `tag` by a key of its own.
pub fn signed_batch(
    n: usize,
    tag: &str,
    rng: &mut ChaCha20Rng,
) -> Vec<(VerifyingKey, Vec<u8>, Signature)> {
    (0..n)
        .map(|i| {
            let k = KeyPair::random(rng);
            let body = vec![i as u8; 100];
            let sig = k.sign(tag, &body, rng).unwrap();
            (k.verifying_key(), body, sig)
        })
        .collect()
}

/// The [`Pki`] fixture's clock.
pub const NOW: u64 = 1_800_000_000_000;
/// One day in milliseconds.
pub const DAY: u64 = 86_400_000;

/// A CA that enrolls devices directly (no bridge), from a seeded RNG.
pub struct Pki {
    /// The CA's key pair.
    pub ca: KeyPair,
    /// The RNG every step draws from.
    pub rng: ChaCha20Rng,
    serial: u64,
}

impl Pki {
    /// A CA whose key and randomness come from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        Pki {
            ca: KeyPair::random(&mut rng),
            rng,
            serial: 0,
        }
    }

    /// Enrolls `name` with a certificate valid for [NOW − 1 day, NOW + 30 days].
    pub fn enroll(&mut self, name: &str) -> Credentials {
        self.enroll_valid(name, NOW - DAY, NOW + 30 * DAY)
    }

    /// Enrolls `name` with a certificate valid from `not_before` to `not_after`.
    pub fn enroll_valid(&mut self, name: &str, not_before: u64, not_after: u64) -> Credentials {
        self.serial += 1;
        let secret = EnrollmentSecret::random(&mut self.rng);
        let (pending, request) = steps::enroll_request(name, &secret, NOW, &mut self.rng);
        let request = EnrollRequest::from_bytes(&request).unwrap();
        let validity = (not_before, not_after);
        let response = steps::issue(
            &self.ca,
            &request,
            &secret,
            self.serial,
            NOW,
            validity,
            &mut self.rng,
        )
        .unwrap();
        steps::accept_enrollment(&pending, &response.to_bytes(), self.ca.public())
    }

    /// A group at `epoch` with these members, its keys and its verified member list.
    pub fn group(&mut self, name: &str, epoch: u32, members: &[(Role, &Credentials)]) -> Group {
        let group = GroupId::new(name).unwrap();
        let joined: Vec<JoinedMember> = members
            .iter()
            .map(|(role, c)| {
                JoinedMember::from_keys(c.id().clone(), *role, c.key().secret(), c.group_secret())
                    .unwrap()
            })
            .collect();
        let (keys, signed) = steps::signed_keys(
            &self.ca,
            &group,
            Epoch(epoch),
            Privacy::Standard,
            &joined,
            &mut self.rng,
        )
        .unwrap();
        let certs: Vec<(Role, &ImplicitCert)> =
            members.iter().map(|(r, c)| (*r, c.cert())).collect();
        let bytes = MemberList::encode(&signed, &certs);
        let list = MemberList::verify(&bytes, self.ca.public(), &group).unwrap();
        Group {
            id: group,
            epoch: Epoch(epoch),
            keys,
            list,
        }
    }
}

/// One group epoch: a device's view with both group keys (tests pick the one a role holds).
pub struct Group {
    /// The group.
    pub id: GroupId,
    /// Its epoch.
    pub epoch: Epoch,
    /// Both group keys.
    pub keys: GroupKeys,
    /// The verified member list.
    pub list: MemberList,
}

impl Group {
    /// The group public key of `kind`.
    pub fn q(&self, kind: GroupKeyKind) -> &crate::curve::Point {
        self.keys.key(kind).public()
    }
}

impl Directory for Group {
    fn group_keys(
        &self,
        group: &GroupId,
        epoch: Epoch,
        _now_ms: u64,
    ) -> Result<GroupPublicKeys, GroupLookupError> {
        if *group != self.id {
            return Err(GroupLookupError::UnknownGroup);
        }
        if epoch != self.epoch {
            return Err(GroupLookupError::WrongEpoch);
        }
        Ok(GroupPublicKeys {
            q_p: *self.q(GroupKeyKind::P),
            q_s: *self.q(GroupKeyKind::S),
        })
    }

    fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey> {
        self.list.key_of(id, NOW)
    }

    fn is_member(&self, group: &GroupId, epoch: Epoch, id: &DeviceId, role: Role) -> bool {
        *group == self.id && epoch == self.epoch && self.list.contains(id, role)
    }
}

impl HeldKeys for Group {
    fn group_secret(&self, group: &GroupId, epoch: Epoch, kind: GroupKeyKind) -> Option<&KeyPair> {
        (*group == self.id && epoch == self.epoch).then(|| self.keys.key(kind))
    }
}

/// The [`World`]'s clock at the start.
pub const T0: u64 = 1_700_000_000_000;

/// A device with the topics it subscribed to.
pub struct Node {
    /// The device core.
    pub dev: Device,
    /// The topics it subscribed to.
    pub subs: BTreeSet<String>,
}

/// An in-memory CA, bridge and broker (module docs).
pub struct World {
    /// The RNG every step draws from.
    pub rng: ChaCha20Rng,
    /// The CA's key pair.
    pub ca: KeyPair,
    /// The clock, in Unix milliseconds.
    pub now: u64,
    secrets: HashMap<DeviceId, EnrollmentSecret>,
    allowed: HashSet<(GroupId, DeviceId, Role)>,
    certs: HashMap<DeviceId, ImplicitCert>,
    states: HashMap<GroupId, GroupState>,
    /// The broker's retained messages by topic.
    pub retained: BTreeMap<String, Vec<u8>>,
    serial: u64,
    /// Whether the CA answers group-key requests (false: SUBACK 0x80, unspecified error).
    pub ca_up: bool,
    /// Notices and lists published since the last [`World::flush`].
    pub outbox: Vec<(String, Vec<u8>)>,
    /// Every group-key request the CA was asked (a `quva-gk` SUBSCRIBE that reached it).
    pub requests: Vec<(DeviceId, GroupId, Role)>,
}

impl World {
    /// A world whose CA key and randomness come from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let ca = KeyPair::random(&mut rng);
        World {
            rng,
            ca,
            now: T0,
            secrets: HashMap::new(),
            allowed: HashSet::new(),
            certs: HashMap::new(),
            states: HashMap::new(),
            retained: BTreeMap::new(),
            serial: 0,
            ca_up: true,
            outbox: Vec::new(),
            requests: Vec::new(),
        }
    }

    /// Creates a standard group at epoch 0.
    pub fn group(&mut self, name: &str) -> GroupId {
        let g = GroupId::new(name).unwrap();
        let state = GroupState::create(
            &self.ca,
            g.clone(),
            Privacy::Standard,
            Epoch(0),
            self.now,
            &mut self.rng,
        )
        .unwrap();
        self.states.insert(g.clone(), state);
        g
    }

    /// The CA's state of a group.
    pub fn state(&self, g: &GroupId) -> &GroupState {
        &self.states[g]
    }

    /// Registers `id` (an enrollment secret on first use) and allows it in `role`.
    pub fn register(&mut self, id: &str, g: &GroupId, role: Role) {
        let id = DeviceId::new(id).unwrap();
        if !self.secrets.contains_key(&id) {
            let s = EnrollmentSecret::random(&mut self.rng);
            self.secrets.insert(id.clone(), s);
        }
        self.allowed.insert((g.clone(), id, role));
    }

    /// Enrolls through the CONNECT exchange and returns the device.
    pub fn enroll(&mut self, id: &str) -> Device {
        self.enroll_with(id, DeviceConfig::default())
    }

    /// [`World::enroll`] with the device core's tunables.
    pub fn enroll_with(&mut self, id: &str, config: DeviceConfig) -> Device {
        let id = DeviceId::new(id).unwrap();
        let secret = self.secrets[&id].clone();
        let (e, auth) = Enrollment::start(
            id.clone(),
            &secret,
            *self.ca.public(),
            self.now,
            &mut self.rng,
        );
        self.serial += 1;
        let request = EnrollRequest::from_bytes(&auth.data).unwrap();
        let validity = (self.now - 1000, self.now + 365 * DAY);
        let issued = steps::issue(
            &self.ca,
            &request,
            &secret,
            self.serial,
            self.now,
            validity,
            &mut self.rng,
        )
        .unwrap();
        let creds = e.finish(Some(&issued.to_bytes())).unwrap();
        self.certs.insert(id, creds.cert().clone());
        Device::new(creds, *self.ca.public(), config)
    }

    fn member(&self, id: &DeviceId, role: Role) -> Member {
        steps::member(self.ca.public(), &self.certs[id], role)
    }

    /// The CA's delivery of the current key to `id` in `role`, as a SUBACK would carry it.
    pub fn delivery_for(&mut self, g: &GroupId, id: &DeviceId, role: Role) -> String {
        let member = self.member(id, role);
        self.states[g]
            .delivery(&member, &mut self.rng)
            .unwrap()
            .to_property()
    }

    /// The bridge's member list of the group's current epoch.
    pub fn member_list(&self, g: &GroupId) -> Vec<u8> {
        let state = &self.states[g];
        let certs: Vec<(Role, &ImplicitCert)> = state
            .members()
            .map(|m| (m.member().role, &self.certs[&m.member().id]))
            .collect();
        MemberList::encode(state.signed_info(), &certs)
    }

    /// Commits a plan: notices and the member list go out retained. Returns what was published.
    fn commit(&mut self, g: &GroupId, plan: Plan) -> Vec<(String, Vec<u8>)> {
        let Plan::Rekey(staged) = plan else {
            return Vec::new();
        };
        let mut published: Vec<(String, Vec<u8>)> = staged
            .notices()
            .iter()
            .map(|n| (n.topic.clone(), n.payload()))
            .collect();
        self.states.get_mut(g).unwrap().commit(*staged).unwrap();
        published.push((topics::certificates(g), self.member_list(g)));
        for (t, p) in &published {
            self.retained.insert(t.clone(), p.clone());
        }
        self.outbox.extend(published.iter().cloned());
        published
    }

    /// Whether `device` is a joined member of `group` in `role` at the current epoch.
    pub fn is_member(&self, g: &GroupId, device: &DeviceId, role: Role) -> bool {
        self.states
            .get(g)
            .is_some_and(|s| s.member(device, role).is_some())
    }

    /// The bridge's rule for a filter without a request (PROTOCOL.md §4 "Resumption"): a key
    /// topic to a joined member of its role, a data topic to a subscriber, a query topic to a
    /// publisher; anything else is granted.
    fn grant(&self, device: &DeviceId, filter: &str) -> u8 {
        for g in self.states.keys() {
            let needed = if filter == g.as_str() {
                Some(Role::Subscriber)
            } else if filter == topics::query(g) {
                Some(Role::Publisher)
            } else {
                [Role::Publisher, Role::Subscriber]
                    .into_iter()
                    .find(|r| filter == topics::key(g, *r))
            };
            if let Some(role) = needed {
                return if self.is_member(g, device, role) {
                    0
                } else {
                    reasons::NOT_AUTHORIZED
                };
            }
        }
        0
    }

    /// The bridge and CA answer a SUBSCRIBE: reason codes and the `quva-gk` property.
    pub fn answer(&mut self, device: &DeviceId, sub: &Subscription) -> (Vec<u8>, Option<String>) {
        let Some(text) = &sub.group_key_request else {
            let codes = sub.filters.iter().map(|f| self.grant(device, f)).collect();
            return (codes, None);
        };
        let mut codes = vec![0u8; sub.filters.len()];
        if !self.ca_up {
            codes[0] = reasons::UNSPECIFIED_ERROR;
            return (codes, None);
        }
        let req = GroupKeyRequest::from_property(text).unwrap();
        assert_eq!(req.id(), device);
        self.requests
            .push((device.clone(), req.group().clone(), req.role()));
        let key = (req.group().clone(), device.clone(), req.role());
        if !self.allowed.contains(&key) {
            codes[0] = reasons::NOT_AUTHORIZED;
            return (codes, None);
        }
        let member = self.member(device, req.role());
        let joined = req
            .open(&self.ca, &member, self.now, steps::WINDOW_MS)
            .unwrap();
        let g = req.group().clone();
        let plan = self.states[&g]
            .stage_join(&self.ca, joined, self.now, &mut self.rng)
            .unwrap();
        self.commit(&g, plan);
        let delivery = self.states[&g].delivery(&member, &mut self.rng).unwrap();
        (codes, Some(delivery.to_property()))
    }

    /// Runs the device's outputs: SUBSCRIBEs are answered and their retained messages delivered.
    /// Returns every other output.
    pub fn run(&mut self, node: &mut Node, outputs: Vec<Output>) -> Vec<Output> {
        let mut queue: VecDeque<Output> = outputs.into();
        let mut done = Vec::new();
        while let Some(o) = queue.pop_front() {
            match o {
                Output::Subscribe(sub) => {
                    let id = node.dev.id().clone();
                    let (codes, gk) = self.answer(&id, &sub);
                    let res = node
                        .dev
                        .on_suback(&sub.purpose, &codes, gk.as_deref(), self.now, &mut self.rng)
                        .unwrap();
                    queue.extend(res);
                    for (f, code) in sub.filters.iter().zip(&codes) {
                        if *code < 0x80 {
                            node.subs.insert(f.clone());
                            if let Some(p) = self.retained.get(f).cloned() {
                                let res = node.dev.on_publish(f, &p, self.now, &mut self.rng);
                                queue.extend(res);
                            }
                        }
                    }
                }
                other => done.push(other),
            }
        }
        done
    }

    /// The node joins `g` in `role` and the SUBSCRIBEs run; returns the other outputs.
    pub fn join_node(
        &mut self,
        node: &mut Node,
        g: &GroupId,
        role: Role,
        receive: bool,
    ) -> Vec<Output> {
        let sub = node
            .dev
            .join(g, role, receive, self.now, &mut self.rng)
            .unwrap();
        self.run(node, vec![Output::Subscribe(sub)])
    }

    /// Publishes to every node subscribed to `topic`; returns each node's outputs.
    pub fn publish(
        &mut self,
        nodes: &mut [&mut Node],
        topic: &str,
        payload: &[u8],
    ) -> Vec<Vec<Output>> {
        let mut all = Vec::new();
        for node in nodes.iter_mut() {
            if node.subs.contains(topic) {
                let res = node.dev.on_publish(topic, payload, self.now, &mut self.rng);
                all.push(self.run(node, res));
            } else {
                all.push(Vec::new());
            }
        }
        all
    }

    /// Delivers a batch of published (topic, payload) pairs to the nodes.
    pub fn deliver(
        &mut self,
        nodes: &mut [&mut Node],
        published: &[(String, Vec<u8>)],
    ) -> Vec<Vec<Output>> {
        let mut all: Vec<Vec<Output>> = nodes.iter().map(|_| Vec::new()).collect();
        for (t, p) in published {
            for (i, out) in self.publish(nodes, t, p).into_iter().enumerate() {
                all[i].extend(out);
            }
        }
        all
    }

    /// Delivers everything published since the last flush.
    pub fn flush(&mut self, nodes: &mut [&mut Node]) -> Vec<Vec<Output>> {
        let published = core::mem::take(&mut self.outbox);
        self.deliver(nodes, &published)
    }

    /// The CA denies `id` in `role`: a departure rekey. Returns what was published.
    pub fn leave(&mut self, g: &GroupId, id: &str, role: Role) -> Vec<(String, Vec<u8>)> {
        let id = DeviceId::new(id).unwrap();
        self.allowed.remove(&(g.clone(), id.clone(), role));
        let plan = self.states[g]
            .stage(
                &self.ca,
                [Change::Leave { id, role }],
                self.now,
                &mut self.rng,
            )
            .unwrap();
        self.commit(g, plan)
    }

    /// A periodic rekey of `g`. Returns what was published.
    pub fn periodic(&mut self, g: &GroupId) -> Vec<(String, Vec<u8>)> {
        let plan = self.states[g]
            .stage_periodic(&self.ca, self.now, &mut self.rng)
            .unwrap();
        self.commit(g, plan)
    }
}

impl Node {
    /// A node that subscribed to nothing yet.
    pub fn new(dev: Device) -> Self {
        Node {
            dev,
            subs: BTreeSet::new(),
        }
    }
}
