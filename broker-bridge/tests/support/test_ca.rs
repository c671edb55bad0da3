//! Test support: an in-memory CA behind the bridge's `CaClient` trait. Its answers come from the
//! CA-side steps of quva-client's test kit (`testkit::steps`: issuing, the member of a certificate,
//! group keys with their signed info, deliveries); what is the bridge's own stays here: the
//! `CaClient` impl, the notice log and stream, and the switches that make the CA fail or hang.

#![allow(
    dead_code,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use quva_bridge::ca::{
    BoxFuture, CaClient, CaError, GroupSnapshot, MemberCertificate, Notice, NoticeAction,
    NoticeStream,
};
use quva_bridge::now_ms;
use quva_client::codec::{Decode, Encode};
use quva_client::curve::KeyPair;
use quva_client::enrollment::{EnrollRequest, EnrollmentSecret, ImplicitCert};
use quva_client::group::{GroupKeyRequest, GroupKeys, JoinedMember, Privacy, SignedGroupInfo};
use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
use quva_client::testkit::steps;
use rand_core::OsRng;
use tokio::sync::Notify;

pub struct GroupState {
    pub privacy: Privacy,
    pub allowed: Vec<(DeviceId, Role)>,
    pub joined: Vec<JoinedMember>,
    pub epoch: u32,
    pub keys: Option<GroupKeys>,
    pub signed: Option<SignedGroupInfo>,
}

#[derive(Default)]
pub struct State {
    pub secrets: HashMap<DeviceId, EnrollmentSecret>,
    pub certs: HashMap<DeviceId, ImplicitCert>,
    pub groups: HashMap<GroupId, GroupState>,
    pub notices: Vec<Notice>,
    pub serial: u64,
    /// Revoked serials, as `GetRevocationStatus` answers.
    pub revoked: std::collections::HashSet<u64>,
}

pub struct TestCa {
    pub key: KeyPair,
    pub state: Mutex<State>,
    pub up: AtomicBool,
    pub hang: AtomicBool,
    /// `GetGroup` calls answered or refused.
    pub get_group_calls: AtomicUsize,
    /// `WatchNotices` never answers while set (a bridge that has not read the log yet).
    pub hold_notices: AtomicBool,
    notify: Notify,
}

impl TestCa {
    pub fn new() -> Arc<Self> {
        Arc::new(TestCa {
            key: KeyPair::random(&mut OsRng),
            state: Mutex::default(),
            up: AtomicBool::new(true),
            hang: AtomicBool::new(false),
            get_group_calls: AtomicUsize::new(0),
            hold_notices: AtomicBool::new(false),
            notify: Notify::new(),
        })
    }

    pub fn register(&self, id: &str) -> EnrollmentSecret {
        let s = EnrollmentSecret::random(&mut OsRng);
        self.state
            .lock()
            .unwrap()
            .secrets
            .insert(DeviceId::new(id).unwrap(), s.clone());
        s
    }

    pub fn create_group(&self, group: &str, privacy: Privacy) {
        self.state.lock().unwrap().groups.insert(
            GroupId::new(group).unwrap(),
            GroupState {
                privacy,
                allowed: Vec::new(),
                joined: Vec::new(),
                epoch: 0,
                keys: None,
                signed: None,
            },
        );
    }

    pub fn allow(&self, group: &str, id: &str, role: Role) {
        let mut s = self.state.lock().unwrap();
        let g = s.groups.get_mut(&GroupId::new(group).unwrap()).unwrap();
        g.allowed.push((DeviceId::new(id).unwrap(), role));
    }

    /// Appends a rekey notice: publish `payload` retained on `topic`.
    pub fn push_rekey(&self, group: &str, epoch: u32, topic: &str, payload: Vec<u8>) {
        self.push_notice(
            group,
            epoch,
            NoticeAction::Rekey {
                topic: topic.into(),
                payload,
            },
        );
    }

    pub fn push_notice(&self, group: &str, epoch: u32, action: NoticeAction) {
        let mut s = self.state.lock().unwrap();
        let seq = s.notices.len() as u64 + 1;
        s.notices.push(Notice {
            seq,
            group: group.into(),
            epoch,
            action,
        });
        drop(s);
        self.notify.notify_waiters();
    }

    /// The current group keys (test-side knowledge, for building messages and checking).
    pub fn keys(&self, group: &str) -> GroupKeys {
        let s = self.state.lock().unwrap();
        s.groups[&GroupId::new(group).unwrap()]
            .keys
            .clone()
            .unwrap()
    }

    /// Moves a group to a new epoch without membership change (a periodic rekey).
    pub fn rekey(&self, group: &str) {
        self.rekey_with(group, |_| {});
    }

    /// Denies a joined member: it leaves the group in a new epoch.
    pub fn remove(&self, group: &str, id: &str, role: Role) {
        let id = DeviceId::new(id).unwrap();
        self.rekey_with(group, |g| {
            g.allowed.retain(|(d, r)| !(d == &id && *r == role));
            g.joined
                .retain(|j| !(j.member().id == id && j.member().role == role));
        });
    }

    fn rekey_with(&self, group: &str, change: impl FnOnce(&mut GroupState)) {
        let gid = GroupId::new(group).unwrap();
        let mut s = self.state.lock().unwrap();
        let g = s.groups.get_mut(&gid).unwrap();
        change(g);
        g.epoch += 1;
        let (keys, signed) = steps::signed_keys(
            &self.key,
            &gid,
            Epoch(g.epoch),
            g.privacy,
            &g.joined,
            &mut OsRng,
        )
        .unwrap();
        g.keys = Some(keys);
        g.signed = Some(signed);
        let epoch = g.epoch;
        drop(s);
        self.push_notice(group, epoch, NoticeAction::GroupUpdated);
    }

    fn check(&self) -> Result<(), CaError> {
        if self.up.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(CaError::Unavailable)
        }
    }

    async fn gate(&self) -> Result<(), CaError> {
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.check()
    }

    fn enroll_sync(&self, data: &[u8]) -> Result<Vec<u8>, CaError> {
        let req = EnrollRequest::from_bytes(data).map_err(|_| CaError::Malformed)?;
        let mut s = self.state.lock().unwrap();
        let secret = s
            .secrets
            .get(&req.request.id)
            .ok_or(CaError::Refused)?
            .clone();
        let now = now_ms();
        let validity = (now - 1_000, now + 86_400_000);
        let resp = steps::issue(
            &self.key,
            &req,
            &secret,
            s.serial + 1,
            now,
            validity,
            &mut OsRng,
        )
        .map_err(|_| CaError::Refused)?;
        s.serial += 1;
        s.secrets.remove(&req.request.id);
        s.certs.insert(req.request.id.clone(), resp.cert.clone());
        Ok(resp.to_bytes())
    }

    fn join_sync(&self, data: &[u8]) -> Result<(Vec<u8>, Epoch), CaError> {
        let req = GroupKeyRequest::from_bytes(data).map_err(|_| CaError::Malformed)?;
        let now = now_ms();
        let mut s = self.state.lock().unwrap();
        let cert = s.certs.get(req.id()).ok_or(CaError::Refused)?;
        let member = steps::member(self.key.public(), cert, req.role());
        let g = s.groups.get_mut(req.group()).ok_or(CaError::Refused)?;
        if !g.allowed.contains(&(req.id().clone(), req.role())) {
            return Err(CaError::Refused);
        }
        let joined = req
            .open(&self.key, &member, now, steps::WINDOW_MS)
            .map_err(|_| CaError::Refused)?;
        if g.joined.contains(&joined) && g.keys.is_some() {
            // Same member, same share: the current keys, no rekey (PROTOCOL.md §4).
            let keys = g.keys.clone().unwrap();
            let signed = g.signed.clone().unwrap();
            let delivery = steps::delivery_without_tree(&signed, &keys, &member, &mut OsRng)
                .map_err(|_| CaError::Refused)?;
            return Ok((delivery.to_bytes(), Epoch(g.epoch)));
        }
        g.joined
            .retain(|j| !(j.member().id == member.id && j.member().role == member.role));
        g.joined.push(joined);
        g.epoch += 1;
        let (keys, signed) = steps::signed_keys(
            &self.key,
            req.group(),
            Epoch(g.epoch),
            g.privacy,
            &g.joined,
            &mut OsRng,
        )
        .map_err(|_| CaError::Refused)?;
        // The bridge never reads the key set, so this CA keeps no key tree (PROTOCOL.md §5.1 trees
        // are exercised with the real CA in quva-tests).
        let delivery = steps::delivery_without_tree(&signed, &keys, &member, &mut OsRng)
            .map_err(|_| CaError::Refused)?;
        g.keys = Some(keys);
        g.signed = Some(signed);
        let epoch = g.epoch;
        let group = req.group().as_str().to_owned();
        drop(s);
        self.push_notice(&group, epoch, NoticeAction::GroupUpdated);
        Ok((delivery.to_bytes(), Epoch(epoch)))
    }

    fn snapshot(&self, group: &GroupId) -> Result<GroupSnapshot, CaError> {
        let s = self.state.lock().unwrap();
        let g = s.groups.get(group).ok_or(CaError::NotFound)?;
        let signed = g.signed.as_ref().ok_or(CaError::NotFound)?;
        let members = g
            .joined
            .iter()
            .map(|j| {
                let m = j.member();
                MemberCertificate {
                    role: m.role.to_u8(),
                    cert: s.certs[&m.id].to_bytes(),
                    share_point: m.g.to_bytes().to_vec(),
                }
            })
            .collect();
        Ok(GroupSnapshot {
            group: group.clone(),
            epoch: Epoch(g.epoch),
            signed_ginfo: signed.to_bytes(),
            members,
        })
    }
}

struct Notices {
    ca: Arc<TestCa>,
    next: u64,
}

impl NoticeStream for Notices {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Notice, CaError>>> {
        Box::pin(async move {
            loop {
                let wait = self.ca.notify.notified();
                if self.ca.check().is_err() {
                    return Some(Err(CaError::Unavailable));
                }
                let found = {
                    let s = self.ca.state.lock().unwrap();
                    s.notices.iter().find(|n| n.seq >= self.next).cloned()
                };
                if let Some(n) = found {
                    self.next = n.seq + 1;
                    return Some(Ok(n));
                }
                let _ = tokio::time::timeout(std::time::Duration::from_millis(100), wait).await;
            }
        })
    }
}

/// The CA as the bridge sees it.
pub struct Client(pub Arc<TestCa>);

impl CaClient for Client {
    fn enroll(&self, auth_data: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, CaError>> {
        Box::pin(async move {
            self.0.gate().await?;
            self.0.enroll_sync(&auth_data)
        })
    }

    fn renew(&self, _auth_data: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, CaError>> {
        Box::pin(async move {
            self.0.gate().await?;
            Err(CaError::Refused)
        })
    }

    fn join_group(&self, request: Vec<u8>) -> BoxFuture<'_, Result<(Vec<u8>, Epoch), CaError>> {
        Box::pin(async move {
            self.0.gate().await?;
            self.0.join_sync(&request)
        })
    }

    fn get_group(&self, group: GroupId) -> BoxFuture<'_, Result<GroupSnapshot, CaError>> {
        Box::pin(async move {
            self.0.get_group_calls.fetch_add(1, Ordering::SeqCst);
            self.0.gate().await?;
            self.0.snapshot(&group)
        })
    }

    fn ca_public_key(&self) -> BoxFuture<'_, Result<Vec<u8>, CaError>> {
        Box::pin(async move {
            self.0.gate().await?;
            Ok(self.0.key.public().to_bytes().to_vec())
        })
    }

    fn is_revoked(&self, serial: u64) -> BoxFuture<'_, Result<bool, CaError>> {
        Box::pin(async move {
            self.0.gate().await?;
            Ok(self.0.state.lock().unwrap().revoked.contains(&serial))
        })
    }

    fn watch_notices(
        &self,
        from_seq: u64,
    ) -> BoxFuture<'_, Result<Box<dyn NoticeStream>, CaError>> {
        Box::pin(async move {
            self.0.gate().await?;
            if self.0.hold_notices.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            Ok(Box::new(Notices {
                ca: self.0.clone(),
                next: from_seq,
            }) as Box<dyn NoticeStream>)
        })
    }
}
