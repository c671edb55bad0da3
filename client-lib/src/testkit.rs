//! Test fixture shared by the direct-message and OTA tests: a CA that enrolls real devices, and
//! groups whose verified member lists, keys and directory come from the real derivation.

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::curve::KeyPair;
use crate::enrollment::{Credentials, EnrollmentSecret, PendingEnrollment};
use crate::group::{GroupKeys, JoinedMember, Privacy, SignedGroupInfo};
use crate::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use crate::members::MemberList;
use crate::message::{Directory, GroupLookupError, GroupPublicKeys, HeldKeys};
use crate::schnorr::VerifyingKey;

pub(crate) const NOW: u64 = 1_800_000_000_000;
pub(crate) const DAY: u64 = 86_400_000;

pub(crate) struct Pki {
    pub ca: KeyPair,
    pub rng: ChaCha20Rng,
    serial: u64,
}

impl Pki {
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

    pub fn enroll_valid(&mut self, name: &str, not_before: u64, not_after: u64) -> Credentials {
        self.serial += 1;
        let secret = EnrollmentSecret::random(&mut self.rng);
        let pending = PendingEnrollment::new(DeviceId::new(name).unwrap(), NOW, &mut self.rng);
        let response = pending
            .enroll_request(&secret)
            .verify(&secret, NOW, 60_000)
            .unwrap()
            .issue(&self.ca, self.serial, not_before, not_after, &mut self.rng)
            .unwrap();
        pending.accept(&response, self.ca.public()).unwrap()
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
        let keys =
            GroupKeys::derive(&self.ca, &group, Epoch(epoch), Privacy::Standard, &joined).unwrap();
        let signed =
            SignedGroupInfo::sign(&self.ca, keys.group_info().clone(), &mut self.rng).unwrap();
        let certs: Vec<(Role, &crate::enrollment::ImplicitCert)> =
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
pub(crate) struct Group {
    pub id: GroupId,
    pub epoch: Epoch,
    pub keys: GroupKeys,
    pub list: MemberList,
}

impl Group {
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
