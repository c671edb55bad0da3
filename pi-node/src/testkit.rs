//! An in-memory CA, bridge and broker for the device core's tests: enrollment, group-key
//! requests (SUBACK deliveries with the key-tree path), rekeys with their kind-3 tree notices
//! retained on the key topics (one per role, PROTOCOL.md §5.1) and member lists, and exact-topic
//! delivery.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use quva_client::codec::{Decode, Encode};
use quva_client::curve::KeyPair;
use quva_client::enrollment::{EnrollRequest, EnrollmentSecret, ImplicitCert};
use quva_client::group::{GroupKeyRequest, Member, Privacy};
use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
use quva_client::rekey::{Change, GroupState, Plan, key_topic};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::device::{Device, DeviceConfig, Output, Subscription};
use crate::enroll::Enrollment;
use quva_client::members::MemberList;

pub(crate) const T0: u64 = 1_700_000_000_000;

/// A device with the topics it subscribed to.
pub(crate) struct Node {
    pub dev: Device,
    pub subs: BTreeSet<String>,
}

pub(crate) struct World {
    pub rng: ChaCha20Rng,
    pub ca: KeyPair,
    pub now: u64,
    secrets: HashMap<DeviceId, EnrollmentSecret>,
    allowed: HashSet<(GroupId, DeviceId, Role)>,
    certs: HashMap<DeviceId, ImplicitCert>,
    states: HashMap<GroupId, GroupState>,
    pub retained: BTreeMap<String, Vec<u8>>,
    serial: u64,
    /// Whether the CA answers group-key requests (false: SUBACK 0x80).
    pub ca_up: bool,
    /// Notices and lists published since the last [`World::flush`].
    pub outbox: Vec<(String, Vec<u8>)>,
    /// Every group-key request the CA was asked (a `quva-gk` SUBSCRIBE that reached it).
    pub requests: Vec<(DeviceId, GroupId, Role)>,
}

impl World {
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

    pub fn state(&self, g: &GroupId) -> &GroupState {
        &self.states[g]
    }

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
        let issued = EnrollRequest::from_bytes(&auth.data)
            .unwrap()
            .verify(&secret, self.now, 60_000)
            .unwrap()
            .issue(
                &self.ca,
                self.serial,
                self.now - 1000,
                self.now + 365 * 86_400_000,
                &mut self.rng,
            )
            .unwrap();
        let creds = e.finish(Some(&issued.to_bytes())).unwrap();
        self.certs.insert(id, creds.cert().clone());
        Device::new(creds, *self.ca.public(), config)
    }

    fn member(&self, id: &DeviceId, role: Role) -> Member {
        let cert = &self.certs[id];
        Member {
            id: id.clone(),
            role,
            q: cert.open(self.ca.public()).unwrap().0,
            g: *cert.group_base(),
        }
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
        published.push((quva_client::members::topic(g), self.member_list(g)));
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
            } else if filter == crate::device::query_topic(g) {
                Some(Role::Publisher)
            } else {
                [Role::Publisher, Role::Subscriber]
                    .into_iter()
                    .find(|r| filter == key_topic(g, *r))
            };
            if let Some(role) = needed {
                return if self.is_member(g, device, role) {
                    0
                } else {
                    0x87
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
            codes[0] = 0x80;
            return (codes, None);
        }
        let req = GroupKeyRequest::from_property(text).unwrap();
        assert_eq!(req.id(), device);
        self.requests
            .push((device.clone(), req.group().clone(), req.role()));
        let key = (req.group().clone(), device.clone(), req.role());
        if !self.allowed.contains(&key) {
            codes[0] = 0x87;
            return (codes, None);
        }
        let member = self.member(device, req.role());
        let joined = req.open(&self.ca, &member, self.now, 60_000).unwrap();
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
        let mut queue: std::collections::VecDeque<Output> = outputs.into();
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

    pub fn periodic(&mut self, g: &GroupId) -> Vec<(String, Vec<u8>)> {
        let plan = self.states[g]
            .stage_periodic(&self.ca, self.now, &mut self.rng)
            .unwrap();
        self.commit(g, plan)
    }
}

impl Node {
    pub fn new(dev: Device) -> Self {
        Node {
            dev,
            subs: BTreeSet::new(),
        }
    }
}
