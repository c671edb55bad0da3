//! Offline attacks on captured traffic: what a holder of a device's key store can read from the
//! bytes a raw subscriber on the broker collected.
//!
//! Two attackers, both using the library code of `quva-client` and `quva-node`:
//! - [`feed_device`]: the device's own protocol core, restored from its key store and fed every
//!   captured PUBLISH (rekey notices also under its own key topics, in case a notice for another
//!   device opens with its keys): what an honest-but-stale device would accept.
//! - [`try_open`]: every public check relaxed (any epoch, any time, any claimed membership, no
//!   replay cache) so that only the cryptography stands between the key holder and the
//!   plaintext.

use std::collections::BTreeMap;
use std::path::Path;

use quva_client::curve::{KeyPair, Point};
use quva_client::device::{Device, DeviceConfig, Output, StoredGroupKey};
use quva_client::enrollment::Credentials;
use quva_client::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use quva_client::members::MemberList;
use quva_client::message::{
    Direction, Directory, GroupLookupError, GroupPublicKeys, HeldKeys, Policy, Rejection, Sealer,
    UnverifiedMessage,
};
use quva_client::rekey::key_topic;
use quva_client::replay::ReplayCache;
use quva_client::schnorr::VerifyingKey;
use quva_node::KeyStore;
use rand_core::OsRng;

use crate::raw::Captured;

/// The timestamp window of the offline attackers (one hour).
const WINDOW_MS: u64 = 3_600_000;

/// The credentials in a device's key store.
pub fn credentials(store: &Path) -> Credentials {
    KeyStore::open(store)
        .and_then(|s| s.load_credentials())
        .unwrap_or_else(|e| panic!("key store {}: {e}", store.display()))
        .credentials
}

/// Q_CA as stored in a device's key store.
pub fn ca_public(store: &Path) -> Point {
    KeyStore::open(store)
        .and_then(|s| s.load_credentials())
        .unwrap_or_else(|e| panic!("key store {}: {e}", store.display()))
        .ca_public
}

/// The group keys in a device's key store.
pub fn group_keys(store: &Path) -> Vec<StoredGroupKey> {
    KeyStore::open(store)
        .and_then(|s| s.load_group_keys())
        .unwrap_or_else(|e| panic!("key store {}: {e}", store.display()))
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// The group key (d_P or d_S) a stored key set holds.
pub fn held_key(stored: &StoredGroupKey) -> KeyPair {
    KeyPair::from_secret(stored.key_set.x().clone())
}

/// A copy of a device's key store directory as it is now (files and modes), for later attacks
/// with the keys of this moment.
pub fn snapshot(store: &Path, to: &Path) {
    copy_dir(store, to);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
        let mode = std::fs::metadata(entry.path()).unwrap().permissions();
        std::fs::set_permissions(&target, mode).unwrap();
    }
    let mode = std::fs::metadata(from).unwrap().permissions();
    std::fs::set_permissions(to, mode).unwrap();
}

/// Public knowledge from captured traffic: every CA-signed member list of a group gives the
/// group's public keys of its epoch and its members' certificate keys.
#[derive(Debug, Default)]
pub struct Observed {
    /// Q_P and Q_S per epoch.
    pub epochs: BTreeMap<Epoch, GroupPublicKeys>,
    /// Every listed member's Q_i.
    pub devices: Vec<(DeviceId, VerifyingKey)>,
}

impl Observed {
    /// Collects the verified member lists of `group` on `quva/c/<group>`.
    pub fn from_captured(captured: &[Captured], group: &str, q_ca: &Point) -> Self {
        let gid = GroupId::new(group).unwrap();
        let topic = quva_client::members::topic(&gid);
        let mut obs = Observed::default();
        for c in captured.iter().filter(|c| c.topic == topic) {
            let Ok(list) = MemberList::verify(&c.payload, q_ca, &gid) else {
                continue;
            };
            let info = list.info();
            obs.epochs.insert(
                info.epoch,
                GroupPublicKeys {
                    q_p: info.q_p,
                    q_s: info.q_s,
                },
            );
            for m in list.members() {
                let key = VerifyingKey(m.member.q);
                if !obs
                    .devices
                    .iter()
                    .any(|(id, k)| *id == m.member.id && *k == key)
                {
                    obs.devices.push((m.member.id.clone(), key));
                }
            }
        }
        obs
    }
}

struct Lenient<'a> {
    observed: &'a Observed,
    key: &'a KeyPair,
    sender: Option<VerifyingKey>,
}

impl Directory for Lenient<'_> {
    fn group_keys(
        &self,
        _group: &GroupId,
        epoch: Epoch,
        _now_ms: u64,
    ) -> Result<GroupPublicKeys, GroupLookupError> {
        self.observed
            .epochs
            .get(&epoch)
            .copied()
            .ok_or(GroupLookupError::WrongEpoch)
    }

    fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey> {
        self.sender.or_else(|| {
            self.observed
                .devices
                .iter()
                .find(|(d, _)| d == id)
                .map(|(_, k)| *k)
        })
    }

    fn is_member(&self, _group: &GroupId, _epoch: Epoch, _id: &DeviceId, _role: Role) -> bool {
        true
    }
}

impl HeldKeys for Lenient<'_> {
    fn group_secret(
        &self,
        _group: &GroupId,
        _epoch: Epoch,
        _kind: GroupKeyKind,
    ) -> Option<&KeyPair> {
        Some(self.key)
    }
}

/// Tries to open one captured message with each of `keys` as the held group secret, with every
/// public check relaxed: any epoch the captured member lists describe, any time, any claimed
/// membership, every listed certificate key of the claimed sender. Returns the plaintext of the
/// first success, else the last rejection.
pub fn try_open(observed: &Observed, bytes: &[u8], keys: &[KeyPair]) -> Result<Vec<u8>, Rejection> {
    let msg = UnverifiedMessage::decode(bytes)?;
    let policy = Policy {
        max_payload: usize::MAX,
        window_ms: WINDOW_MS,
    };
    let now = quva_node::now_ms();
    let senders: Vec<Option<VerifyingKey>> = match msg.claimed_sender() {
        Some(id) => observed
            .devices
            .iter()
            .filter(|(d, _)| d == id)
            .map(|(_, k)| Some(*k))
            .collect(),
        None => vec![None],
    };
    let mut last = Rejection::KeyNotHeld;
    for key in keys {
        for sender in &senders {
            let view = Lenient {
                observed,
                key,
                sender: *sender,
            };
            let mut replay: ReplayCache = ReplayCache::new(policy.window_ms, 16);
            match msg.verify(&view, &view, &policy, &mut replay, now) {
                Ok(m) => return Ok(m.payload().to_vec()),
                Err(e) => last = e,
            }
        }
    }
    Err(last)
}

/// What a device restored from a key store accepted from captured traffic.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Payloads of the verified messages.
    pub messages: Vec<Vec<u8>>,
    /// Epochs of group keys adopted from the traffic (rekey notices).
    pub adopted: Vec<u32>,
}

/// Restores the device of `store` (credentials and group keys), joins `group` as `role`
/// (offline: the SUBSCRIBEs go nowhere) and feeds it every captured PUBLISH in order; rekey
/// notices of the group are also offered on its own key topics. Reports what it accepted.
pub fn feed_device(store: &Path, group: &str, role: Role, captured: &[Captured]) -> Replayed {
    let creds = credentials(store);
    let q_ca = ca_public(store);
    let gid = GroupId::new(group).unwrap();
    // A long window, so that slow test machines do not turn the controls into stale messages.
    let mut config = DeviceConfig::default();
    config.policy.window_ms = WINDOW_MS;
    let mut device = Device::new(creds, q_ca, config);
    let mut rng = OsRng;
    let now = quva_node::now_ms();
    for key in group_keys(store) {
        device.restore(&key).unwrap();
    }
    device.join(&gid, role, true, now, &mut rng).unwrap();
    let own_topics = [key_topic(&gid, role)];
    let key_prefix = format!("quva/k/{group}/");
    let mut out = Replayed::default();
    let collect = |outs: Vec<Output>, out: &mut Replayed| {
        for o in outs {
            match o {
                Output::Message(m) => out.messages.push(m.payload().to_vec()),
                Output::KeyAdopted { epoch, .. } => out.adopted.push(epoch.0),
                _ => {}
            }
        }
    };
    for c in captured {
        let now = quva_node::now_ms();
        let outs = device.on_publish(&c.topic, &c.payload, now, &mut rng);
        collect(outs, &mut out);
        if c.topic.starts_with(&key_prefix) {
            for t in &own_topics {
                if *t != c.topic {
                    let outs = device.on_publish(t, &c.payload, now, &mut rng);
                    collect(outs, &mut out);
                }
            }
        }
    }
    // Whatever still waits for a key is judged now.
    let outs = device.tick(quva_node::now_ms() + WINDOW_MS + 1, &mut rng);
    collect(outs, &mut out);
    out
}

/// Seals a forward message as the holder of `creds` can, with any claimed sender, epoch and
/// timestamp: option 1 or 2 signed with d_i, option 3 encrypted to `q_p` and signed outside
/// with `d_grp` (the group key the forger holds, or any key).
#[allow(clippy::too_many_arguments)]
pub fn forge(
    creds: &Credentials,
    sender: &str,
    group: &str,
    epoch: u32,
    t_ms: u64,
    option: u8,
    q_p: &Point,
    d_grp: &KeyPair,
    text: &str,
) -> Vec<u8> {
    let group = GroupId::new(group).unwrap();
    let sender = DeviceId::new(sender).unwrap();
    let sealer = Sealer {
        group: &group,
        epoch: Epoch(epoch),
        direction: Direction::Forward,
        sender: &sender,
        key: creds.key(),
    };
    let mut rng = OsRng;
    let m = text.as_bytes();
    match option {
        1 => sealer.option1(t_ms, m, &mut rng),
        2 => sealer.option2(t_ms, q_p, m, &mut rng),
        _ => sealer.option3(t_ms, d_grp, q_p, m, &mut rng),
    }
    .unwrap()
}
