//! The device's protocol state machine, without I/O: group keys, rekeying, member lists and
//! messages of one enrolled device.
//!
//! Implements the device side of PROTOCOL.md §4 (join with a `quva-gk` SUBSCRIBE, accept the
//! SUBACK delivery and its key-tree path), §5 and §5.1 (follow the kind-3 tree notices on the key
//! topic, keep the previous epoch's key for the grace period, catch up from the retained notice,
//! join again after a missed epoch), §6
//! (seal options 1–3 in both directions; verify and decrypt received messages against the verified
//! member certificate lists) and §8 (topics).
//!
//! The driver feeds events — SUBACKs ([`Device::on_suback`]), received PUBLISHes
//! ([`Device::on_publish`]) and the passing of time ([`Device::tick`]) — with `now_ms` and an
//! RNG, and gets [`Output`]s back: subscriptions to send, verified messages, adopted keys and
//! drops. [`Device::seal`] builds a PUBLISH payload. [`Device::view`] is the
//! [`Directory`]/[`HeldKeys`] pair that verification uses.
//!
//! Missed epochs (PROTOCOL.md §5.1 "Offline catch-up"): the key topic retains only the latest
//! tree notice, and a notice opens only with the path of the epoch just before it. A CA-signed
//! notice that does not follow the held epoch (or arrives while no key of the role is held) waits,
//! and the role joins again with a fresh `quva-gk` request, reported first by
//! [`Output::MissedEpoch`]. At most one request per (group, role) is in flight, and at most one is
//! sent per [`DeviceConfig::rerequest_interval_ms`], so a stream of notices cannot cause a storm
//! of requests. A notice of an epoch already held is ignored silently (a joiner sees the notice of
//! the epoch it joined in); any other failure is reported as [`Output::Dropped`] and the held key
//! stays.
//!
//! A CA-signed member list of a later epoch that still names the device, with no notice
//! following it, also leads to a new request: a notice was lost.
//!
//! Resumption (PROTOCOL.md §4, v1.1): after a reconnection or a restart, a role whose key is held
//! (kept across the connection or restored from the key store) is subscribed again *without* a
//! group-key request ([`Device::resume`], [`Purpose::Resume`]): no public-key work on the device
//! or at the CA. The retained notices on the key topics bring the key up to date, and the
//! retained member list confirms the epoch. Only when that fails — the bridge refuses the
//! subscription (no longer a member), a newer notice cannot be opened (an epoch was missed and
//! its notice overwritten), the member list names another certificate of the device, or no list
//! confirms the epoch in time — does the device join again with `quva-gk`, once
//! ([`Output::ResumeFailed`] says why).
//!
//! Before any of this, [`Enrollment`] and [`cert_connect_auth`] build the CONNECT authentication
//! of PROTOCOL.md §3 (first enrollment, renewal, certificate proof): the credentials that
//! [`Device::new`] takes.
//!
//! Messages that cannot be checked yet — an epoch the device has not adopted, or no member list
//! for their epoch — wait (bounded) until the key or list arrives, or until the timestamp window
//! has passed.
//!
//! # Usage
//! ```
//! use quva_client::device::{Device, DeviceConfig, Purpose};
//! use quva_client::ids::{GroupId, Role};
//! # use quva_client::codec::{Decode, Encode};
//! # use quva_client::curve::KeyPair;
//! # use quva_client::enrollment::{EnrollRequest, EnrollmentSecret};
//! # use quva_client::ids::DeviceId;
//! # use quva_client::device::Enrollment;
//! let mut rng = rand_core::OsRng;
//! let now = 1_700_000_000_000;
//! # let ca = KeyPair::random(&mut rng);
//! # let secret = EnrollmentSecret::random(&mut rng);
//! # let id = DeviceId::new("sensor-01").unwrap();
//! # let (e, auth) = Enrollment::start(id, &secret, *ca.public(), now, &mut rng);
//! # let issued = EnrollRequest::from_bytes(&auth.data).unwrap().verify(&secret, now, 60_000)
//! #     .unwrap().issue(&ca, 1, now, now + 86_400_000, &mut rng).unwrap();
//! # let creds = e.finish(Some(&issued.to_bytes())).unwrap();
//! # let ca_public = *ca.public();
//! // creds and ca_public come from enrollment or the key store.
//! let mut device = Device::new(creds, ca_public, DeviceConfig::default());
//! let group = GroupId::new("plant/line-3/temp").unwrap();
//! let sub = device.join(&group, Role::Subscriber, true, now, &mut rng).unwrap();
//! assert_eq!(sub.filters[0], "quva/k/plant/line-3/temp/sub");
//! assert!(sub.group_key_request.is_some());
//! assert!(matches!(sub.purpose, Purpose::Join { .. }));
//! ```

use std::collections::{BTreeMap, VecDeque};

use crate::codec::Decode;
use crate::curve::{KeyPair, Point};
use crate::direct::{DirectFloor, DirectRejection, MembershipFn, StagedDirect, UnverifiedDirect};
use crate::enrollment::{Credentials, ImplicitCert};
use crate::group::{GroupError, GroupKeyRequest, SignedGroupInfo};
use crate::ids::{DeviceId, Epoch, GroupId, GroupKeyKind, Role};
use crate::message::{
    Direction, Directory, GroupLookupError, GroupPublicKeys, HeldKeys, Policy, Protection,
    Rejection, SealError, Sealer, UnverifiedMessage, VerifiedMessage,
};
use crate::rekey::tree::{TreeError, TreeKeySet, TreeNotice};
use crate::rekey::{DEFAULT_GRACE_MS, GroupKeyDelivery, Keyring, MAX_PREVIOUS_KEYS, RekeyError};
use crate::replay::ReplayCache;
use crate::schnorr::VerifyingKey;
use rand_core::CryptoRngCore;

use crate::members::{MemberList, MemberListError};
use crate::reasons::suback_meaning;
use crate::topics;

mod connect;

pub use connect::{ConnectAuth, EnrollFailure, Enrollment, cert_connect_auth};

/// Tunables of the device core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// How long the previous epoch's key stays usable after a rekey (PROTOCOL.md §5).
    pub grace_ms: u64,
    /// Message size limit and timestamp window (PROTOCOL.md §6).
    pub policy: Policy,
    /// Received messages waiting for a key or member list, per group.
    pub max_waiting_messages: usize,
    /// Tree notices waiting for the key of the epoch before theirs (a join in flight), per
    /// group.
    pub max_waiting_notices: usize,
    /// Minimum time between two group-key requests of one group and role after a missed epoch
    /// or a lost notice.
    pub rerequest_interval_ms: u64,
    /// Capacity of the replay cache.
    pub replay_capacity: usize,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            grace_ms: DEFAULT_GRACE_MS,
            policy: Policy::default(),
            max_waiting_messages: 64,
            max_waiting_notices: 8,
            rerequest_interval_ms: 5_000,
            replay_capacity: 100_000,
        }
    }
}

/// Why a subscription was made; the driver hands it back with the SUBACK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// The key topic with a group-key request, and the member certificates.
    Join {
        /// The group.
        group: GroupId,
        /// The role asked for.
        role: Role,
    },
    /// The key topic without a request (the CA was unavailable, the stored key is used).
    Watch {
        /// The group.
        group: GroupId,
        /// The role.
        role: Role,
    },
    /// The key topic and the member certificates without a request, for a role whose key is
    /// held (resumption after a reconnection or a restart).
    Resume {
        /// The group.
        group: GroupId,
        /// The role.
        role: Role,
    },
    /// The traffic the role receives: data for a subscriber, queries for a publisher.
    Listen {
        /// The group.
        group: GroupId,
        /// The role.
        role: Role,
    },
}

/// One SUBSCRIBE packet for the driver to send (QoS 1 for every filter).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// The topic filters, in order.
    pub filters: Vec<String>,
    /// The `quva-gk` user property value, if this SUBSCRIBE asks for a group key.
    pub group_key_request: Option<String>,
    /// What the SUBACK answers.
    pub purpose: Purpose,
}

/// Where an adopted key came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A SUBACK delivery.
    Delivery,
    /// A tree notice (kind 3) on the key topic.
    Notice,
    /// The key store.
    Restored,
}

/// Why a resumed role joins again with a group-key request (PROTOCOL.md §4, "Resumption").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResumeFailure {
    /// The bridge refused the key topic without a request: no longer a joined member of the
    /// role in its member list (0x87), or it could not tell.
    #[error("the bridge refused the resumed subscription (reason 0x{code:02x}: {}); joining again",
        suback_meaning(*code))]
    Refused {
        /// The SUBACK reason code.
        code: u8,
    },
    /// A CA-signed notice of the next epoch that does not open with the held path. (A notice
    /// further ahead is a missed epoch: [`Output::MissedEpoch`].)
    #[error("cannot open the notice of epoch {}; joining again", epoch.0)]
    Unopenable {
        /// The notice's epoch.
        epoch: Epoch,
    },
    /// The member list names this device with another certificate (it was renewed): the CA
    /// must learn the new share.
    #[error("the member list of epoch {} names another certificate of this device; joining \
        again", epoch.0)]
    OtherCertificate {
        /// The list's epoch.
        epoch: Epoch,
    },
    /// No member list confirmed the held epoch within the re-request interval.
    #[error("no member list confirmed the held key's epoch in time; joining again")]
    Unconfirmed,
}

/// A role that cannot follow the tree notices joins again (PROTOCOL.md §5.1 "Offline catch-up").
///
/// Displays as `missed an epoch of <group> as <role>; joining again (...)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissedEpoch {
    /// The group.
    pub group: GroupId,
    /// The role whose key tree was not followed.
    pub role: Role,
    /// The epoch of the newest CA-signed notice that could not be opened.
    pub notice: Epoch,
    /// The epoch of the held key, or `None` if no key of the role is held.
    pub held: Option<Epoch>,
}

impl core::fmt::Display for MissedEpoch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "missed an epoch of {} as {}; joining again (notice of epoch {}, ",
            self.group,
            role_name(self.role),
            self.notice.0
        )?;
        match self.held {
            Some(held) => write!(f, "held key of epoch {})", held.0),
            None => f.write_str("no key held)"),
        }
    }
}

/// `publisher` or `subscriber`, as reports and status output name a role.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Publisher => "publisher",
        Role::Subscriber => "subscriber",
    }
}

/// What was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DropReason {
    /// A message failed verification.
    #[error("message rejected: {0}")]
    Message(Rejection),
    /// A rekey notice failed.
    #[error("rekey notice rejected: {0}")]
    Notice(RekeyError),
    /// A member list failed.
    #[error("member list rejected: {0}")]
    Members(MemberListError),
    /// Too many messages or notices were waiting; the oldest was dropped.
    #[error("too many waiting")]
    Overflow,
    /// A PUBLISH on a topic this device did not subscribe to.
    #[error("unexpected topic")]
    UnknownTopic,
}

/// Something the driver should do or report.
///
/// Exhaustive on purpose: a driver handles every output, and a new one should fail its build
/// rather than be dropped by a catch-all arm.
#[derive(Debug)]
pub enum Output {
    /// Send this SUBSCRIBE.
    Subscribe(Subscription),
    /// A verified message for the application.
    Message(VerifiedMessage),
    /// The group key of `role` in `group` is now at `epoch`.
    KeyAdopted {
        /// The group.
        group: GroupId,
        /// The role whose key changed.
        role: Role,
        /// The new epoch.
        epoch: Epoch,
        /// Where it came from.
        source: KeySource,
    },
    /// A verified member certificate list was stored.
    MembersUpdated {
        /// The group.
        group: GroupId,
        /// Its epoch.
        epoch: Epoch,
        /// The number of members.
        members: usize,
    },
    /// A verified member list of a later epoch no longer names this device in `role`: it was
    /// denied, revoked or its certificate expired, and gets no further keys for that role.
    Removed {
        /// The group.
        group: GroupId,
        /// The role it lost.
        role: Role,
        /// The first epoch without it.
        epoch: Epoch,
    },
    /// The CA could not answer a group-key request; the stored key of this epoch stays in use.
    KeyRequestDeferred {
        /// The group.
        group: GroupId,
        /// The role.
        role: Role,
        /// The SUBACK reason code.
        code: u8,
    },
    /// A held key's role was subscribed again without a group-key request; retained notices and
    /// the member list follow.
    Resumed {
        /// The group.
        group: GroupId,
        /// The role.
        role: Role,
        /// The epoch of the held key.
        epoch: Epoch,
    },
    /// A held key's role could not follow the tree notices (an epoch was missed) or a notice
    /// came while no key was held: it joins again (the `Subscribe` with the request follows).
    MissedEpoch(MissedEpoch),
    /// A resumed role could not catch up and joins again (the `Subscribe` with the request
    /// follows).
    ResumeFailed {
        /// The group.
        group: GroupId,
        /// The role.
        role: Role,
        /// Why.
        reason: ResumeFailure,
    },
    /// A subscription filter was refused.
    SubscriptionRefused {
        /// The filter.
        filter: String,
        /// The SUBACK reason code.
        code: u8,
    },
    /// Received data was dropped.
    Dropped {
        /// The topic it came on.
        topic: String,
        /// Why.
        reason: DropReason,
    },
}

/// Why joining a group failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The SUBACK refused the key topic: 0x87 not authorized (not allowed in this role, or the
    /// request's timestamp was outside the CA's window: check the clock), 0x80 the CA is
    /// unreachable.
    #[error("group-key request for {group} ({role:?}) refused with reason 0x{code:02x}: {}",
        suback_meaning(*code))]
    Refused {
        /// The group.
        group: GroupId,
        /// The role.
        role: Role,
        /// The SUBACK reason code.
        code: u8,
    },
    /// The SUBACK accepted the key topic but carried no group key.
    #[error("the SUBACK for {0} carried no group key (is the broker a Quva bridge?)")]
    NoDelivery(GroupId),
    /// The group key in the SUBACK did not verify.
    #[error("the group key for {group} did not verify: {error}")]
    BadDelivery {
        /// The group.
        group: GroupId,
        /// What failed.
        error: RekeyError,
    },
    /// The subscription to the role's traffic was refused.
    #[error("subscription to {filter} refused with reason 0x{code:02x}: {}", suback_meaning(*code))]
    ListenRefused {
        /// The filter.
        filter: String,
        /// The SUBACK reason code.
        code: u8,
    },
    /// A group-key request could not be made.
    #[error("group-key request: {0}")]
    Request(GroupError),
}

/// Why a message could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The device holds no key of the sending role in this group yet.
    #[error("no group key for {group} as {role:?}: join the group first")]
    NotJoined {
        /// The group.
        group: GroupId,
        /// The role needed.
        role: Role,
    },
    /// Sealing failed.
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// A group key as kept in the key store: the signed info of its epoch and the key set (the held
/// key X with the key-tree path: W, the leaf and the path keys, PROTOCOL.md §5.1), so that a
/// restarted device follows the next tree notice without joining again.
#[derive(Clone, Debug)]
pub struct StoredGroupKey {
    /// The group.
    pub group: GroupId,
    /// The role whose key this is (publishers hold d_S, subscribers d_P).
    pub role: Role,
    /// The CA-signed group info of the epoch.
    pub signed_info: SignedGroupInfo,
    /// X and the path: secrets, zeroized when dropped and redacted in `Debug`.
    pub key_set: TreeKeySet,
}

/// Where a received topic belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Data,
    Query,
    Key(Role),
    Members,
}

#[derive(Debug, Default)]
struct RoleState {
    receive: bool,
    listening: bool,
    requesting: bool,
    /// The epoch of the newest CA-signed tree notice that could not be followed (an epoch was
    /// missed, or no key was held): the role joins again.
    missed: Option<Epoch>,
    last_request_ms: Option<u64>,
    /// Since when a CA-signed member list names this device in a later epoch than its key.
    behind_since: Option<u64>,
    /// Subscribed without a request on this connection, with no join since: a failure to catch
    /// up leads to one join.
    resumed: bool,
    /// Since when a resumed role waits for a member list that confirms its key's epoch (or,
    /// after a failed resumption, for the join's SUBACK).
    unconfirmed_since: Option<u64>,
}

struct Waiting {
    received_ms: u64,
    topic: String,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct GroupSession {
    rings: BTreeMap<Role, Keyring>,
    roles: BTreeMap<Role, RoleState>,
    lists: BTreeMap<Epoch, MemberList>,
    /// SHA-256 of the bytes of the newest list verified, and its epoch: the same retained list
    /// arriving again (every reconnection resubscribes to it) is not verified again.
    verified_list: Option<([u8; 32], Epoch)>,
    /// Tree notices that do not follow the held epoch, kept until a delivery catches up.
    notices: Vec<(Role, TreeNotice)>,
    waiting: VecDeque<Waiting>,
}

impl GroupSession {
    /// The current epoch of any held key.
    fn epoch(&self) -> Option<Epoch> {
        self.rings.values().map(Keyring::epoch).max()
    }
}

/// One enrolled device's protocol state.
pub struct Device {
    creds: Credentials,
    ca_public: Point,
    config: DeviceConfig,
    groups: BTreeMap<GroupId, GroupSession>,
    replay: ReplayCache,
}

impl core::fmt::Debug for Device {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Device")
            .field("id", self.creds.id())
            .field("groups", &self.groups.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Device {
    /// A device with its credentials and the pre-loaded CA key.
    pub fn new(creds: Credentials, ca_public: Point, config: DeviceConfig) -> Self {
        let replay = ReplayCache::new(config.policy.window_ms, config.replay_capacity);
        Device {
            creds,
            ca_public,
            config,
            groups: BTreeMap::new(),
            replay,
        }
    }

    /// The device ID.
    pub fn id(&self) -> &DeviceId {
        self.creds.id()
    }

    /// The credentials.
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// The CA public key.
    pub fn ca_public(&self) -> &Point {
        &self.ca_public
    }

    /// The configuration.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// The key held for `group` in `role`, if any.
    pub fn keyring(&self, group: &GroupId, role: Role) -> Option<&Keyring> {
        self.groups.get(group)?.rings.get(&role)
    }

    /// Every held key, for the key store.
    pub fn stored_keys(&self) -> Vec<StoredGroupKey> {
        self.groups
            .iter()
            .flat_map(|(g, s)| {
                s.rings.iter().map(|(role, ring)| StoredGroupKey {
                    group: g.clone(),
                    role: *role,
                    signed_info: ring.signed_group_info().clone(),
                    key_set: ring.key_set(),
                })
            })
            .collect()
    }

    /// The newest verified member list of `group`.
    pub fn member_list(&self, group: &GroupId) -> Option<&MemberList> {
        self.groups.get(group)?.lists.values().next_back()
    }

    /// Q of `id` from the newest verified member list of `group`, if it lists `id` (in any role)
    /// with a certificate valid at `now_ms`: the recipient key of a direct message (§7.1).
    pub fn member_key(&self, group: &GroupId, id: &DeviceId, now_ms: u64) -> Option<Point> {
        self.member_list(group)?.key_of(id, now_ms).map(|k| k.0)
    }

    /// Whether `id` is listed in `role` in the newest verified member list of `group`.
    pub fn lists_member(&self, group: &GroupId, id: &DeviceId, role: Role) -> bool {
        self.member_list(group)
            .is_some_and(|l| l.contains(id, role))
    }

    /// Verifies and decrypts a direct message addressed to this device (PROTOCOL.md §7.1): the
    /// sender's certificate opens under Q_CA and is valid at `now_ms`, the sender is listed with
    /// exactly that certificate in the newest verified member list of one of this device's
    /// groups, T_ms is above `floor` (the one stored for [`UnverifiedDirect::sender`]), the
    /// signature verifies and the ciphertext opens. The caller persists
    /// [`StagedDirect::floor`] before taking the payload.
    ///
    /// # Errors
    /// The first failing check's [`DirectRejection`].
    pub fn open_direct(
        &self,
        msg: &UnverifiedDirect,
        floor: DirectFloor,
        now_ms: u64,
    ) -> Result<StagedDirect, DirectRejection> {
        let current = MembershipFn(|cert: &ImplicitCert, q: &VerifyingKey| {
            self.groups.values().any(|s| {
                s.lists
                    .values()
                    .next_back()
                    .is_some_and(|l| l.entries_of(cert, q).next().is_some())
            })
        });
        msg.open(
            self.id(),
            self.creds.key(),
            &self.ca_public,
            &current,
            floor,
            now_ms,
        )
    }

    /// Restores a stored key set with its key-tree path. The CA's signature, the group and X·G
    /// are checked again, as for a delivery; the path is checked by the next notice it opens. A
    /// key of the same or a later epoch already held wins (`Ok(None)`).
    ///
    /// # Errors
    /// [`RekeyError`] if the stored key does not verify (a corrupt or foreign store).
    pub fn restore(&mut self, stored: &StoredGroupKey) -> Result<Option<Output>, RekeyError> {
        let ring = Keyring::from_tree_key_set(
            VerifyingKey(self.ca_public),
            &stored.signed_info,
            &stored.group,
            stored.role,
            &stored.key_set,
            self.config.grace_ms,
        )?;
        let epoch = ring.epoch();
        let session = self.groups.entry(stored.group.clone()).or_default();
        session.roles.entry(stored.role).or_default();
        if session
            .rings
            .get(&stored.role)
            .is_some_and(|held| held.epoch() >= epoch)
        {
            return Ok(None);
        }
        session.rings.insert(stored.role, ring);
        Ok(Some(Output::KeyAdopted {
            group: stored.group.clone(),
            role: stored.role,
            epoch,
            source: KeySource::Restored,
        }))
    }

    /// Starts joining `group` as `role`: the SUBSCRIBE to the key topic with a fresh group-key
    /// request, and to the member certificates. With `receive`, the
    /// role's traffic (data for a subscriber, queries for a publisher) is subscribed once the key
    /// has arrived.
    ///
    /// # Errors
    /// [`JoinError::Request`] with probability 2⁻²⁵⁶.
    pub fn join(
        &mut self,
        group: &GroupId,
        role: Role,
        receive: bool,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Subscription, JoinError> {
        let session = self.groups.entry(group.clone()).or_default();
        let state = session.roles.entry(role).or_default();
        state.receive |= receive;
        state.listening = false;
        self.request(group, role, now_ms, rng)
    }

    fn request(
        &mut self,
        group: &GroupId,
        role: Role,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Subscription, JoinError> {
        let req = GroupKeyRequest::new(
            self.creds.id(),
            group,
            role,
            now_ms,
            self.creds.key(),
            self.creds.group_secret(),
            &self.ca_public,
            rng,
        )
        .map_err(JoinError::Request)?;
        if let Some(state) = self
            .groups
            .get_mut(group)
            .and_then(|s| s.roles.get_mut(&role))
        {
            state.requesting = true;
            state.last_request_ms = Some(now_ms);
            state.resumed = false;
            state.unconfirmed_since = None;
        }
        Ok(Subscription {
            filters: self.key_filters(group, role),
            group_key_request: Some(req.to_property()),
            purpose: Purpose::Join {
                group: group.clone(),
                role,
            },
        })
    }

    fn key_filters(&self, group: &GroupId, role: Role) -> Vec<String> {
        vec![topics::key(group, role), topics::certificates(group)]
    }

    /// Takes part in `group` as `role` again after a (re)connection: with a held key (kept or
    /// restored from the key store) the key topics are subscribed without a group-key request
    /// ([`Purpose::Resume`], PROTOCOL.md §4 "Resumption"); without one this is [`Device::join`].
    /// (A role whose stored key could not be used, for instance a key file of an older format
    /// without its key-tree path, therefore joins again.)
    /// With `receive`, the role's traffic is subscribed once the SUBACK has arrived.
    ///
    /// # Errors
    /// [`JoinError::Request`] with probability 2⁻²⁵⁶ (joins only).
    pub fn resume(
        &mut self,
        group: &GroupId,
        role: Role,
        receive: bool,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Subscription, JoinError> {
        if self.keyring(group, role).is_none() {
            return self.join(group, role, receive, now_ms, rng);
        }
        if let Some(state) = self.state_or_default(group, role) {
            state.receive |= receive;
            state.listening = false;
            state.requesting = false;
            state.resumed = false;
            // Not known to be current until the SUBACK and a member list have arrived.
            state.unconfirmed_since = Some(now_ms);
        }
        Ok(Subscription {
            filters: self.key_filters(group, role),
            group_key_request: None,
            purpose: Purpose::Resume {
                group: group.clone(),
                role,
            },
        })
    }

    /// The subscriptions to send again after a reconnection, for every role taken part in:
    /// [`Device::resume`] (a resumption where a key is held, else a join).
    ///
    /// # Errors
    /// [`JoinError::Request`] with probability 2⁻²⁵⁶.
    pub fn resume_all(
        &mut self,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<Subscription>, JoinError> {
        let wanted: Vec<(GroupId, Role)> = self
            .groups
            .iter()
            .flat_map(|(g, s)| s.roles.keys().map(move |r| (g.clone(), *r)))
            .collect();
        let mut out = Vec::new();
        for (g, r) in wanted {
            out.push(self.resume(&g, r, false, now_ms, rng)?);
        }
        Ok(out)
    }

    /// Whether the key of `role` in `group` is held and, after a resumption, confirmed current
    /// by a member list (or renewed since).
    pub fn is_current(&self, group: &GroupId, role: Role) -> bool {
        let Some(session) = self.groups.get(group) else {
            return false;
        };
        // A role that missed an epoch holds a key it knows to be old until its new join is
        // answered.
        session.rings.contains_key(&role)
            && session
                .roles
                .get(&role)
                .is_none_or(|st| st.unconfirmed_since.is_none() && st.missed.is_none())
    }

    /// Handles the SUBACK of a [`Subscription`]: `codes` are its reason codes in filter order,
    /// `group_key` its `quva-gk` user property.
    ///
    /// # Errors
    /// [`JoinError`] when the device cannot take part: the key request was refused and no stored
    /// key exists, the delivery is missing or invalid, or the role's traffic was refused.
    pub fn on_suback(
        &mut self,
        purpose: &Purpose,
        codes: &[u8],
        group_key: Option<&str>,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<Output>, JoinError> {
        let mut out = Vec::new();
        match purpose {
            Purpose::Join { group, role } => {
                self.refused_extras(codes, &self.key_filters(group, *role), &mut out);
                if let Some(state) = self.state_mut(group, *role) {
                    state.requesting = false;
                    state.unconfirmed_since = None;
                }
                let code = codes.first().copied().unwrap_or(0x80);
                if code >= 0x80 {
                    // The notices that waited for this answer cannot be opened with the held key:
                    // a later notice (or member list) leads to the next request, one interval on.
                    self.forget_waiting_notices(group, *role);
                    if self.keyring(group, *role).is_none() {
                        return Err(JoinError::Refused {
                            group: group.clone(),
                            role: *role,
                            code,
                        });
                    }
                    out.push(Output::KeyRequestDeferred {
                        group: group.clone(),
                        role: *role,
                        code,
                    });
                    out.push(Output::Subscribe(Subscription {
                        filters: vec![topics::key(group, *role)],
                        group_key_request: None,
                        purpose: Purpose::Watch {
                            group: group.clone(),
                            role: *role,
                        },
                    }));
                } else {
                    let text = group_key.ok_or_else(|| JoinError::NoDelivery(group.clone()))?;
                    let delivery = GroupKeyDelivery::from_property(text).map_err(|e| {
                        JoinError::BadDelivery {
                            group: group.clone(),
                            error: RekeyError::Decode(e),
                        }
                    })?;
                    let adopted = self
                        .adopt_delivery(group, *role, &delivery, now_ms)
                        .map_err(|error| JoinError::BadDelivery {
                            group: group.clone(),
                            error,
                        })?;
                    out.extend(adopted);
                    self.after_key_change(group, now_ms, &mut out);
                }
                if let Some(listen) = self.listen(group, *role) {
                    out.push(Output::Subscribe(listen));
                }
            }
            Purpose::Watch { group, role } => {
                self.refused_extras(codes, &[topics::key(group, *role)], &mut out);
            }
            Purpose::Resume { group, role } => {
                self.refused_extras(codes, &self.key_filters(group, *role), &mut out);
                self.on_resumed(group, *role, codes, now_ms, rng, &mut out);
            }
            Purpose::Listen { group, role } => {
                let filter = topics::receive(group, *role);
                match codes.first().copied() {
                    Some(code) if code < 0x80 => {}
                    code => {
                        if let Some(state) = self.state_mut(group, *role) {
                            state.listening = false;
                        }
                        return Err(JoinError::ListenRefused {
                            filter,
                            code: code.unwrap_or(0x80),
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// The SUBACK of a resumption: accepted, the role waits for the retained notices and member
    /// list; refused, it joins again.
    fn on_resumed(
        &mut self,
        group: &GroupId,
        role: Role,
        codes: &[u8],
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
        out: &mut Vec<Output>,
    ) {
        let code = codes.first().copied().unwrap_or(0x80);
        if code >= 0x80 {
            let reason = ResumeFailure::Refused { code };
            self.fall_back(group, role, reason, now_ms, rng, out);
            return;
        }
        let epoch = self.keyring(group, role).map(Keyring::epoch);
        if let Some(state) = self.state_mut(group, role) {
            state.resumed = true;
            state.unconfirmed_since = Some(now_ms);
        }
        if let Some(epoch) = epoch {
            out.push(Output::Resumed {
                group: group.clone(),
                role,
                epoch,
            });
        }
        if let Some(listen) = self.listen(group, role) {
            out.push(Output::Subscribe(listen));
        }
    }

    /// Joins again after a failed resumption (once: the request ends the resumption).
    fn fall_back(
        &mut self,
        group: &GroupId,
        role: Role,
        reason: ResumeFailure,
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
        out: &mut Vec<Output>,
    ) {
        out.push(Output::ResumeFailed {
            group: group.clone(),
            role,
            reason,
        });
        if let Ok(sub) = self.request(group, role, now_ms, rng) {
            out.push(Output::Subscribe(sub));
        }
        // The held key may be outdated: not current until the join's SUBACK.
        if let Some(state) = self.state_mut(group, role) {
            state.unconfirmed_since = Some(now_ms);
        }
    }

    /// Whether `role` in `group` was resumed and has not fallen back to a join since.
    fn is_resumed(&self, group: &GroupId, role: Role) -> bool {
        self.groups
            .get(group)
            .and_then(|s| s.roles.get(&role))
            .is_some_and(|st| st.resumed)
    }

    /// Reports refused filters after the first (the key topic is judged separately).
    fn refused_extras(&self, codes: &[u8], filters: &[String], out: &mut Vec<Output>) {
        for (code, filter) in codes.iter().zip(filters).skip(1) {
            if *code >= 0x80 {
                out.push(Output::SubscriptionRefused {
                    filter: filter.clone(),
                    code: *code,
                });
            }
        }
    }

    fn state_mut(&mut self, group: &GroupId, role: Role) -> Option<&mut RoleState> {
        self.groups.get_mut(group)?.roles.get_mut(&role)
    }

    /// The role's state, created if the group is known.
    fn state_or_default(&mut self, group: &GroupId, role: Role) -> Option<&mut RoleState> {
        Some(self.groups.get_mut(group)?.roles.entry(role).or_default())
    }

    /// The subscription to the role's traffic, once, if wanted and a key is held.
    fn listen(&mut self, group: &GroupId, role: Role) -> Option<Subscription> {
        let session = self.groups.get_mut(group)?;
        if !session.rings.contains_key(&role) {
            return None;
        }
        let state = session.roles.get_mut(&role)?;
        if !state.receive || state.listening {
            return None;
        }
        state.listening = true;
        Some(Subscription {
            filters: vec![topics::receive(group, role)],
            group_key_request: None,
            purpose: Purpose::Listen {
                group: group.clone(),
                role,
            },
        })
    }

    fn adopt_delivery(
        &mut self,
        group: &GroupId,
        role: Role,
        delivery: &GroupKeyDelivery,
        now_ms: u64,
    ) -> Result<Option<Output>, RekeyError> {
        let q_ca = VerifyingKey(self.ca_public);
        let grace = self.config.grace_ms;
        let key = self.creds.key().clone();
        let session = self.groups.entry(group.clone()).or_default();
        session.roles.entry(role).or_default();
        let epoch = match session.rings.get_mut(&role) {
            Some(ring) => match ring.apply_delivery(&key, delivery, now_ms) {
                Ok(e) => e,
                Err(RekeyError::StaleEpoch) => return Ok(None),
                Err(e) => return Err(e),
            },
            None => {
                let ring = Keyring::from_delivery(q_ca, group, role, &key, delivery, grace)?;
                let e = ring.epoch();
                session.rings.insert(role, ring);
                e
            }
        };
        Ok(Some(Output::KeyAdopted {
            group: group.clone(),
            role,
            epoch,
            source: KeySource::Delivery,
        }))
    }

    /// Handles a received PUBLISH.
    pub fn on_publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        let Some((group, route)) = self.route(topic) else {
            out.push(Output::Dropped {
                topic: topic.to_owned(),
                reason: DropReason::UnknownTopic,
            });
            return out;
        };
        match route {
            Route::Key(role) => {
                self.on_notice(&group, role, topic, payload, now_ms, rng, &mut out);
            }
            Route::Members => self.on_members(&group, topic, payload, now_ms, rng, &mut out),
            Route::Data | Route::Query => {
                self.on_message(&group, topic, payload.to_vec(), now_ms, &mut out);
            }
        }
        self.rerequest(now_ms, rng, &mut out);
        out
    }

    fn route(&self, topic: &str) -> Option<(GroupId, Route)> {
        for (g, s) in &self.groups {
            if topic == g.as_str() {
                return Some((g.clone(), Route::Data));
            }
            if topic == topics::query(g) {
                return Some((g.clone(), Route::Query));
            }
            if topic == topics::certificates(g) {
                return Some((g.clone(), Route::Members));
            }
            for role in s.roles.keys() {
                if topic == topics::key(g, *role) {
                    return Some((g.clone(), Route::Key(*role)));
                }
            }
        }
        None
    }

    /// A PUBLISH on the key topic of `role`: a tree notice (PROTOCOL.md §5.1).
    #[allow(clippy::too_many_arguments)]
    fn on_notice(
        &mut self,
        group: &GroupId,
        role: Role,
        topic: &str,
        payload: &[u8],
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
        out: &mut Vec<Output>,
    ) {
        let notice = match TreeNotice::from_bytes(payload) {
            Ok(n) => n,
            Err(e) => {
                out.push(Output::Dropped {
                    topic: topic.to_owned(),
                    reason: DropReason::Notice(RekeyError::Decode(e)),
                });
                return;
            }
        };
        match self.apply_notice(group, role, &notice, now_ms) {
            Ok(adopted) => {
                out.push(adopted);
                self.after_key_change(group, now_ms, out);
            }
            // A retained notice of an epoch already held (a joiner's own epoch, or a replay).
            Err(RekeyError::Tree(TreeError::StaleEpoch)) => {}
            // CA-signed, of this group and role, but it does not follow the held epoch: it waits
            // for the delivery of the join that `rerequest` sends (at most one in flight).
            Err(RekeyError::Tree(TreeError::MissedEpoch)) => {
                let epoch = notice.epoch();
                self.wait_notice(group, role, notice, topic, out);
                if let Some(state) = self.state_mut(group, role) {
                    state.missed = state.missed.max(Some(epoch));
                }
            }
            Err(e) => {
                out.push(Output::Dropped {
                    topic: topic.to_owned(),
                    reason: DropReason::Notice(e),
                });
                if let Some(epoch) = self.newer_signed_epoch(group, role, &notice) {
                    let reason = ResumeFailure::Unopenable { epoch };
                    self.fall_back(group, role, reason, now_ms, rng, out);
                }
            }
        }
    }

    /// The epoch of a notice that failed to open, if the role was resumed and the notice is
    /// CA-signed, of this group and newer than the held key: the device cannot catch up from
    /// it. A forged or foreign notice is only dropped.
    fn newer_signed_epoch(
        &self,
        group: &GroupId,
        role: Role,
        notice: &TreeNotice,
    ) -> Option<Epoch> {
        if !self.is_resumed(group, role) || notice.role() != role {
            return None;
        }
        let held = self.keyring(group, role)?.epoch();
        let info = notice
            .signed_info()
            .verify(&VerifyingKey(self.ca_public))
            .ok()?;
        (&info.group == group && info.epoch > held).then_some(info.epoch)
    }

    /// Applies a tree notice to the held keyring of `role`.
    ///
    /// # Errors
    /// What [`Keyring::apply_tree_notice`] returns. Without a keyring, a notice that is CA-signed,
    /// of this group and of this role counts as [`TreeError::MissedEpoch`] (no path to open it
    /// with: join again); anything else is refused as by the keyring.
    fn apply_notice(
        &mut self,
        group: &GroupId,
        role: Role,
        notice: &TreeNotice,
        now_ms: u64,
    ) -> Result<Output, RekeyError> {
        let q_ca = VerifyingKey(self.ca_public);
        let session = self.groups.entry(group.clone()).or_default();
        let epoch = match session.rings.get_mut(&role) {
            Some(ring) => ring.apply_tree_notice(notice, now_ms)?,
            None => {
                if notice.role() != role {
                    return Err(RekeyError::Tree(TreeError::WrongRole("tree notice")));
                }
                let info = notice.signed_info().verify(&q_ca)?;
                if &info.group != group {
                    return Err(RekeyError::Tree(TreeError::WrongGroup("tree notice")));
                }
                return Err(RekeyError::Tree(TreeError::MissedEpoch));
            }
        };
        Ok(Output::KeyAdopted {
            group: group.clone(),
            role,
            epoch,
            source: KeySource::Notice,
        })
    }

    fn wait_notice(
        &mut self,
        group: &GroupId,
        role: Role,
        notice: TreeNotice,
        topic: &str,
        out: &mut Vec<Output>,
    ) {
        let max = self.config.max_waiting_notices.max(1);
        let Some(session) = self.groups.get_mut(group) else {
            return;
        };
        if session
            .notices
            .iter()
            .any(|(r, n)| *r == role && *n == notice)
        {
            return;
        }
        session.notices.push((role, notice));
        while session.notices.len() > max {
            session.notices.remove(0);
            out.push(Output::Dropped {
                topic: topic.to_owned(),
                reason: DropReason::Overflow,
            });
        }
    }

    /// Forgets the waiting notices of `role` and the missed epoch they stood for.
    fn forget_waiting_notices(&mut self, group: &GroupId, role: Role) {
        let Some(session) = self.groups.get_mut(group) else {
            return;
        };
        session.notices.retain(|(r, _)| *r != role);
        if let Some(state) = session.roles.get_mut(&role) {
            state.missed = None;
        }
    }

    /// After a key change: retry waiting notices (oldest epoch first), then waiting messages.
    fn after_key_change(&mut self, group: &GroupId, now_ms: u64, out: &mut Vec<Output>) {
        loop {
            let Some(session) = self.groups.get_mut(group) else {
                return;
            };
            let mut pending = core::mem::take(&mut session.notices);
            pending.sort_by_key(|(_, n)| n.epoch());
            let mut progressed = false;
            let mut keep = Vec::new();
            for (role, notice) in pending {
                match self.apply_notice(group, role, &notice, now_ms) {
                    Ok(adopted) => {
                        out.push(adopted);
                        progressed = true;
                    }
                    Err(RekeyError::Tree(TreeError::MissedEpoch)) => keep.push((role, notice)),
                    // Stale, or failing for good: forget it.
                    Err(_) => {}
                }
            }
            if let Some(session) = self.groups.get_mut(group) {
                let newer = core::mem::take(&mut session.notices);
                session.notices = keep;
                session.notices.extend(newer);
            }
            if !progressed {
                break;
            }
        }
        if let Some(session) = self.groups.get_mut(group) {
            let newest = session.lists.keys().next_back().copied();
            for (role, ring) in &session.rings {
                let Some(state) = session.roles.get_mut(role) else {
                    continue;
                };
                if newest.is_none_or(|e| ring.epoch() >= e) {
                    state.behind_since = None;
                }
                // Caught up past the list: the resumed key is current.
                if newest.is_some_and(|e| ring.epoch() >= e) {
                    state.unconfirmed_since = None;
                }
                // The missed epoch is the newest notice still waiting for a delivery, if any.
                state.missed = session
                    .notices
                    .iter()
                    .filter(|(r, _)| r == role)
                    .map(|(_, n)| n.epoch())
                    .max();
            }
        }
        self.prune_lists(group, now_ms);
        self.retry_waiting(group, now_ms, out);
    }

    fn on_members(
        &mut self,
        group: &GroupId,
        topic: &str,
        payload: &[u8],
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
        out: &mut Vec<Output>,
    ) {
        let hash = crate::curve::sha256(&[payload]);
        let seen = self.groups.get(group).and_then(|s| match s.verified_list {
            Some((h, epoch)) if h == hash => s.lists.get(&epoch).cloned(),
            _ => None,
        });
        let verified = match seen {
            Some(list) => Ok(list),
            None => MemberList::verify(payload, &self.ca_public, group),
        };
        let list = match verified {
            Ok(l) => l,
            Err(e) => {
                out.push(Output::Dropped {
                    topic: topic.to_owned(),
                    reason: DropReason::Members(e),
                });
                return;
            }
        };
        let epoch = list.epoch();
        let members = list.members().len();
        let id = self.creds.id().clone();
        let stale = self.stale_certificate_roles(group, &list);
        let Some(session) = self.groups.get_mut(group) else {
            return;
        };
        // After a resumption, a list not later than the held key confirms it is current.
        for (role, ring) in &session.rings {
            if epoch <= ring.epoch()
                && let Some(state) = session.roles.get_mut(role)
            {
                state.unconfirmed_since = None;
            }
        }
        // A later epoch that still lists this device means a notice was missed: unless one
        // arrives soon, ask again (see `rerequest`). One that does not list it means it was
        // removed from that role.
        for (role, ring) in &session.rings {
            if epoch <= ring.epoch() {
                continue;
            }
            if !list.contains(&id, *role) {
                out.push(Output::Removed {
                    group: group.clone(),
                    role: *role,
                    epoch,
                });
            } else if let Some(state) = session.roles.get_mut(role) {
                state.behind_since.get_or_insert(now_ms);
            }
        }
        session.lists.insert(epoch, list);
        if session.verified_list.is_none_or(|(_, e)| e <= epoch) {
            session.verified_list = Some((hash, epoch));
        }
        out.push(Output::MembersUpdated {
            group: group.clone(),
            epoch,
            members,
        });
        for role in stale {
            let reason = ResumeFailure::OtherCertificate { epoch };
            self.fall_back(group, role, reason, now_ms, rng, out);
        }
        self.prune_lists(group, now_ms);
        self.retry_waiting(group, now_ms, out);
    }

    /// The resumed roles in which `list` names this device with another public key than its
    /// own: the CA holds the share of a previous certificate.
    fn stale_certificate_roles(&self, group: &GroupId, list: &MemberList) -> Vec<Role> {
        let own = self.creds.key().public();
        let id = self.creds.id();
        [Role::Publisher, Role::Subscriber]
            .into_iter()
            .filter(|role| self.is_resumed(group, *role))
            .filter(|role| {
                list.members()
                    .iter()
                    .any(|m| &m.member.id == id && m.member.role == *role && &m.member.q != own)
            })
            .collect()
    }

    /// Keeps the lists of the epochs still usable plus any later ones, at most
    /// `MAX_PREVIOUS_KEYS + 2` of them.
    fn prune_lists(&mut self, group: &GroupId, _now_ms: u64) {
        let Some(session) = self.groups.get_mut(group) else {
            return;
        };
        while session.lists.len() > MAX_PREVIOUS_KEYS + 2 {
            session.lists.pop_first();
        }
    }

    fn on_message(
        &mut self,
        group: &GroupId,
        topic: &str,
        bytes: Vec<u8>,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        let msg = match UnverifiedMessage::decode_with_limit(&bytes, self.config.policy.max_payload)
        {
            Ok(m) => m,
            Err(r) => {
                out.push(Output::Dropped {
                    topic: topic.to_owned(),
                    reason: DropReason::Message(r),
                });
                return;
            }
        };
        if self.should_wait(group, &msg, now_ms) {
            let max = self.config.max_waiting_messages.max(1);
            if let Some(session) = self.groups.get_mut(group) {
                session.waiting.push_back(Waiting {
                    received_ms: now_ms,
                    topic: topic.to_owned(),
                    bytes,
                });
                while session.waiting.len() > max {
                    if let Some(w) = session.waiting.pop_front() {
                        out.push(Output::Dropped {
                            topic: w.topic,
                            reason: DropReason::Overflow,
                        });
                    }
                }
            }
            return;
        }
        out.push(self.verify(topic, &msg, now_ms));
    }

    /// Whether a message should wait: its epoch is later than the held key's, or no member list
    /// of its epoch has arrived yet, and its timestamp is still within the window.
    fn should_wait(&self, group: &GroupId, msg: &UnverifiedMessage, now_ms: u64) -> bool {
        let h = msg.header();
        if h.t_ms.saturating_add(self.config.policy.window_ms) < now_ms {
            return false;
        }
        let Some(session) = self.groups.get(group) else {
            return false;
        };
        let holder = h.direction.target_key().holder_role();
        let key_ahead = match session.rings.get(&holder) {
            None => true,
            Some(ring) => h.epoch > ring.epoch(),
        };
        key_ahead || !session.lists.contains_key(&h.epoch)
    }

    fn verify(&mut self, topic: &str, msg: &UnverifiedMessage, now_ms: u64) -> Output {
        let view = DeviceView {
            groups: &self.groups,
            scope: Some((&msg.header().group, msg.header().epoch)),
            now_ms,
        };
        match msg.verify(&view, &view, &self.config.policy, &mut self.replay, now_ms) {
            Ok(m) => Output::Message(m),
            Err(r) => Output::Dropped {
                topic: topic.to_owned(),
                reason: DropReason::Message(r),
            },
        }
    }

    fn retry_waiting(&mut self, group: &GroupId, now_ms: u64, out: &mut Vec<Output>) {
        let Some(session) = self.groups.get_mut(group) else {
            return;
        };
        let waiting = core::mem::take(&mut session.waiting);
        let mut keep = VecDeque::new();
        for w in waiting {
            let Ok(msg) = UnverifiedMessage::decode_with_limit(&w.bytes, usize::MAX) else {
                continue;
            };
            let expired = now_ms.saturating_sub(w.received_ms) > self.config.policy.window_ms;
            if !expired && self.should_wait(group, &msg, now_ms) {
                keep.push_back(w);
            } else {
                out.push(self.verify(&w.topic, &msg, now_ms));
            }
        }
        if let Some(session) = self.groups.get_mut(group) {
            keep.extend(core::mem::take(&mut session.waiting));
            session.waiting = keep;
        }
    }

    /// Sends the group-key requests that a missed epoch or a lost notice made necessary: per
    /// (group, role) none while one is in flight, and at most one per interval.
    fn rerequest(&mut self, now_ms: u64, rng: &mut impl CryptoRngCore, out: &mut Vec<Output>) {
        let interval = self.config.rerequest_interval_ms;
        let since = |t: Option<u64>| t.is_some_and(|t| now_ms.saturating_sub(t) >= interval);
        let due = self.roles_where(|st| {
            let quiet = st.last_request_ms.is_none() || since(st.last_request_ms);
            (st.missed.is_some() || since(st.behind_since)) && !st.requesting && quiet
        });
        for (g, r) in due {
            let missed = self
                .groups
                .get(&g)
                .and_then(|s| s.roles.get(&r))
                .and_then(|st| st.missed);
            if let Ok(sub) = self.request(&g, r, now_ms, rng) {
                if let Some(notice) = missed {
                    out.push(Output::MissedEpoch(MissedEpoch {
                        group: g.clone(),
                        role: r,
                        notice,
                        held: self.keyring(&g, r).map(Keyring::epoch),
                    }));
                }
                out.push(Output::Subscribe(sub));
            }
        }
        let unconfirmed =
            self.roles_where(|st| st.resumed && since(st.unconfirmed_since) && !st.requesting);
        for (g, r) in unconfirmed {
            self.fall_back(&g, r, ResumeFailure::Unconfirmed, now_ms, rng, out);
        }
    }

    /// Every (group, role) whose state satisfies `pred`.
    fn roles_where(&self, pred: impl Fn(&RoleState) -> bool) -> Vec<(GroupId, Role)> {
        self.groups
            .iter()
            .flat_map(|(g, s)| {
                s.roles
                    .iter()
                    .filter(|(_, st)| pred(st))
                    .map(move |(r, _)| (g.clone(), *r))
            })
            .collect()
    }

    /// The passing of time: expires waiting messages, forgets keys past their grace period and
    /// old replay entries, and re-requests keys after a gap.
    pub fn tick(&mut self, now_ms: u64, rng: &mut impl CryptoRngCore) -> Vec<Output> {
        let mut out = Vec::new();
        let groups: Vec<GroupId> = self.groups.keys().cloned().collect();
        for g in groups {
            if let Some(session) = self.groups.get_mut(&g) {
                for ring in session.rings.values_mut() {
                    ring.prune(now_ms);
                }
            }
            self.retry_waiting(&g, now_ms, &mut out);
        }
        self.replay.evict_expired(now_ms);
        self.rerequest(now_ms, rng, &mut out);
        out
    }

    /// Seals one message for `group`: forward (as a publisher, on the data topic) or a query (as
    /// a subscriber, on the query topic), with the current epoch's keys. Returns the topic and
    /// the payload.
    ///
    /// # Errors
    /// [`SendError::NotJoined`] without a key of the sending role; [`SendError::Seal`].
    pub fn seal(
        &self,
        group: &GroupId,
        protection: Protection,
        direction: Direction,
        payload: &[u8],
        now_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(String, Vec<u8>), SendError> {
        let role = direction.sender_role();
        let ring = self
            .keyring(group, role)
            .ok_or_else(|| SendError::NotJoined {
                group: group.clone(),
                role,
            })?;
        let info = ring.group_info();
        let target = info.public_key(direction.target_key());
        let sealer = Sealer {
            group,
            epoch: ring.epoch(),
            direction,
            sender: self.creds.id(),
            key: self.creds.key(),
        };
        let bytes = match protection {
            Protection::Authenticated => sealer.option1(now_ms, payload, rng)?,
            Protection::Confidential => sealer.option2(now_ms, target, payload, rng)?,
            Protection::Anonymous => {
                sealer.option3(now_ms, ring.current_key(), target, payload, rng)?
            }
        };
        let topic = match direction {
            Direction::Forward => topics::data(group),
            Direction::Query => topics::query(group),
        };
        Ok((topic, bytes))
    }

    /// The [`Directory`] and [`HeldKeys`] of this device at `now_ms`.
    pub fn view(&self, now_ms: u64) -> DeviceView<'_> {
        DeviceView {
            groups: &self.groups,
            scope: None,
            now_ms,
        }
    }

    /// A summary of every group for `status`.
    pub fn summary(&self) -> Vec<GroupSummary> {
        self.groups
            .iter()
            .map(|(g, s)| GroupSummary {
                group: g.clone(),
                epoch: s.epoch(),
                roles: s.rings.keys().copied().collect(),
                members: s.lists.values().next_back().map(|l| l.members().len()),
            })
            .collect()
    }
}

/// One group in [`Device::summary`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSummary {
    /// The group.
    pub group: GroupId,
    /// The current epoch of the held keys.
    pub epoch: Option<Epoch>,
    /// The roles whose keys are held.
    pub roles: Vec<Role>,
    /// The size of the newest member list.
    pub members: Option<usize>,
}

/// A device's view for verification at one instant: groups and their epochs from the verified
/// keyrings, senders and memberships from the verified member lists, held keys from the
/// keyrings.
#[derive(Clone, Copy)]
pub struct DeviceView<'a> {
    groups: &'a BTreeMap<GroupId, GroupSession>,
    scope: Option<(&'a GroupId, Epoch)>,
    now_ms: u64,
}

impl core::fmt::Debug for DeviceView<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceView")
            .field("now_ms", &self.now_ms)
            .finish_non_exhaustive()
    }
}

impl Directory for DeviceView<'_> {
    fn group_keys(
        &self,
        group: &GroupId,
        epoch: Epoch,
        now_ms: u64,
    ) -> Result<GroupPublicKeys, GroupLookupError> {
        let session = self
            .groups
            .get(group)
            .filter(|s| !s.rings.is_empty())
            .ok_or(GroupLookupError::UnknownGroup)?;
        session
            .rings
            .values()
            .find_map(|r| r.group_info_for(epoch, now_ms))
            .map(|info| GroupPublicKeys {
                q_p: info.q_p,
                q_s: info.q_s,
            })
            .ok_or(GroupLookupError::WrongEpoch)
    }

    /// The sender's key from the member list of the message's group and epoch when verifying a
    /// message (a renewed certificate changes Q_i from one epoch to the next), else from the
    /// newest list that names it.
    fn device_key(&self, id: &DeviceId) -> Option<VerifyingKey> {
        if let Some((group, epoch)) = self.scope {
            return self
                .groups
                .get(group)?
                .lists
                .get(&epoch)?
                .key_of(id, self.now_ms);
        }
        self.groups
            .values()
            .flat_map(|s| s.lists.values().rev())
            .find_map(|l| l.key_of(id, self.now_ms))
    }

    /// Listed in `role` at `epoch` and in every later list held: a member denied or revoked in
    /// a later epoch still holds the keys of `epoch` during the grace period, and its messages
    /// are refused from the first list that no longer names it.
    fn is_member(&self, group: &GroupId, epoch: Epoch, id: &DeviceId, role: Role) -> bool {
        self.groups.get(group).is_some_and(|s| {
            s.lists.contains_key(&epoch)
                && s.lists.range(epoch..).all(|(_, l)| l.contains(id, role))
        })
    }
}

impl HeldKeys for DeviceView<'_> {
    fn group_secret(&self, group: &GroupId, epoch: Epoch, kind: GroupKeyKind) -> Option<&KeyPair> {
        self.groups
            .get(group)?
            .rings
            .get(&kind.holder_role())?
            .key_for(epoch, self.now_ms)
    }
}

#[cfg(test)]
mod tests;
