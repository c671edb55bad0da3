//! A group key the device accepted from a delivery or a notice.

use super::{GroupInfo, SignedGroupInfo};
use crate::curve::KeyPair;
use crate::ids::{Epoch, Role};

/// A group key the device accepted: the verified info and the held key (d_P or d_S).
#[derive(Clone, Debug)]
pub struct AcceptedGroupKey {
    signed: SignedGroupInfo,
    role: Role,
    key: KeyPair,
}

impl AcceptedGroupKey {
    /// The verified group info.
    pub fn info(&self) -> &GroupInfo {
        self.signed.info_unverified()
    }

    /// The signed info, as received (verified).
    pub fn signed_info(&self) -> &SignedGroupInfo {
        &self.signed
    }

    /// The epoch of the key.
    pub fn epoch(&self) -> Epoch {
        self.info().epoch
    }

    /// The role the key was delivered for.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The held key: d_P for a subscriber, d_S for a publisher.
    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    /// Only the crate builds accepted keys (after verification).
    pub(crate) fn new_verified(signed: SignedGroupInfo, role: Role, key: KeyPair) -> Self {
        AcceptedGroupKey { signed, role, key }
    }
}
