//! Test fixture: one group with a publisher, a subscriber and a registered outsider.

use core::cell::RefCell;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use super::{
    Direction, Directory, GroupLookupError, GroupPublicKeys, HeldKeys, Protection, Sealer,
};
use crate::curve::KeyPair;
use crate::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use crate::schnorr::VerifyingKey;

pub(super) struct World {
    pub group: GroupId,
    pub epoch: Epoch,
    pub prev_epoch: Epoch,
    /// The previous epoch is accepted until this time.
    pub grace_until: u64,
    pub now: u64,
    pub publisher: DeviceId,
    pub pub_key: KeyPair,
    pub subscriber: DeviceId,
    pub sub_key: KeyPair,
    /// Registered (has a certificate) but a member of no role.
    pub outsider: DeviceId,
    pub out_key: KeyPair,
    pub d_p: KeyPair,
    pub d_s: KeyPair,
    pub prev_d_p: KeyPair,
    pub prev_d_s: KeyPair,
    pub rng: RefCell<ChaCha20Rng>,
}

impl World {
    pub const PROTECTIONS: [Protection; 3] = [
        Protection::Authenticated,
        Protection::Confidential,
        Protection::Anonymous,
    ];
    pub const DIRECTIONS: [Direction; 2] = [Direction::Forward, Direction::Query];

    pub fn new(seed: u64) -> Self {
        Self::with_group(seed, "plant/line-3/temp")
    }

    pub fn with_group(seed: u64, group: &str) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let now = 1_700_000_000_000;
        World {
            group: GroupId::new(group).unwrap(),
            epoch: Epoch(7),
            prev_epoch: Epoch(6),
            grace_until: now + 30_000,
            now,
            publisher: DeviceId::new("pub-1").unwrap(),
            pub_key: KeyPair::random(&mut rng),
            subscriber: DeviceId::new("sub-1").unwrap(),
            sub_key: KeyPair::random(&mut rng),
            outsider: DeviceId::new("eve").unwrap(),
            out_key: KeyPair::random(&mut rng),
            d_p: KeyPair::random(&mut rng),
            d_s: KeyPair::random(&mut rng),
            prev_d_p: KeyPair::random(&mut rng),
            prev_d_s: KeyPair::random(&mut rng),
            rng: RefCell::new(rng),
        }
    }

    pub fn group_keys(&self) -> GroupPublicKeys {
        GroupPublicKeys {
            q_p: *self.d_p.public(),
            q_s: *self.d_s.public(),
        }
    }

    pub fn sender_id(&self, d: Direction) -> &DeviceId {
        match d {
            Direction::Forward => &self.publisher,
            Direction::Query => &self.subscriber,
        }
    }

    pub fn sender_key(&self, d: Direction) -> &KeyPair {
        match d {
            Direction::Forward => &self.pub_key,
            Direction::Query => &self.sub_key,
        }
    }

    /// The sender's held group key (option-3 signer) and the target key at `epoch`.
    pub fn keys_at(&self, epoch: Epoch) -> (&KeyPair, &KeyPair) {
        if epoch == self.prev_epoch {
            (&self.prev_d_p, &self.prev_d_s)
        } else {
            (&self.d_p, &self.d_s)
        }
    }

    pub fn sealer(&self, d: Direction) -> Sealer<'_> {
        Sealer {
            group: &self.group,
            epoch: self.epoch,
            direction: d,
            sender: self.sender_id(d),
            key: self.sender_key(d),
        }
    }

    /// Seals with the right sender and keys for `d` at the current epoch.
    pub fn seal(&self, p: Protection, d: Direction, m: &[u8], t_ms: u64) -> Vec<u8> {
        self.seal_as(self.sealer(d), p, m, t_ms)
    }

    /// Seals with an arbitrary sealer (other sender, epoch or key), using the group keys of the
    /// sealer's epoch.
    pub fn seal_as(&self, s: Sealer<'_>, p: Protection, m: &[u8], t_ms: u64) -> Vec<u8> {
        let (d_p, d_s) = self.keys_at(s.epoch);
        let (target, d_grp) = match s.direction {
            Direction::Forward => (d_p.public(), d_s),
            Direction::Query => (d_s.public(), d_p),
        };
        let rng = &mut *self.rng.borrow_mut();
        match p {
            Protection::Authenticated => s.option1(t_ms, m, rng),
            Protection::Confidential => s.option2(t_ms, target, m, rng),
            Protection::Anonymous => s.option3(t_ms, d_grp, target, m, rng),
        }
        .unwrap()
    }

    /// The keyring of the receivers of `d`: subscribers hold d_P, publishers d_S (both epochs).
    pub fn receiver(&self, d: Direction) -> Holder<'_> {
        let kind = d.target_key();
        Holder { world: self, kind }
    }
}

impl Directory for World {
    fn group_keys(
        &self,
        group: &GroupId,
        epoch: Epoch,
        now_ms: u64,
    ) -> Result<GroupPublicKeys, GroupLookupError> {
        if *group != self.group {
            return Err(GroupLookupError::UnknownGroup);
        }
        if epoch == self.epoch || (epoch == self.prev_epoch && now_ms <= self.grace_until) {
            let (d_p, d_s) = self.keys_at(epoch);
            Ok(GroupPublicKeys {
                q_p: *d_p.public(),
                q_s: *d_s.public(),
            })
        } else {
            Err(GroupLookupError::WrongEpoch)
        }
    }

    fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey> {
        [
            (&self.publisher, &self.pub_key),
            (&self.subscriber, &self.sub_key),
            (&self.outsider, &self.out_key),
        ]
        .into_iter()
        .find(|(i, _)| *i == id)
        .map(|(_, k)| k.verifying_key())
    }

    fn is_member(&self, group: &GroupId, _epoch: Epoch, id: &DeviceId, role: Role) -> bool {
        *group == self.group
            && ((*id == self.publisher && role == Role::Publisher)
                || (*id == self.subscriber && role == Role::Subscriber))
    }
}

/// A device's held group keys: one kind, current and previous epoch.
pub(super) struct Holder<'a> {
    world: &'a World,
    kind: GroupKeyKind,
}

impl HeldKeys for Holder<'_> {
    fn group_secret(&self, group: &GroupId, epoch: Epoch, kind: GroupKeyKind) -> Option<&KeyPair> {
        let w = self.world;
        if *group != w.group || kind != self.kind {
            return None;
        }
        let (d_p, d_s) = if epoch == w.epoch {
            (&w.d_p, &w.d_s)
        } else if epoch == w.prev_epoch {
            (&w.prev_d_p, &w.prev_d_s)
        } else {
            return None;
        };
        Some(match kind {
            GroupKeyKind::P => d_p,
            GroupKeyKind::S => d_s,
        })
    }
}
