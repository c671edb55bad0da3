//! The gRPC services of `quva.ca.v1`: the device path for bridges and the admin path.
//!
//! State changes go to the engine's writer task; reads go straight to the store. Domain errors
//! become statuses only here (`impl From<CaError> for Status`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use quva_client::codec::Decode;
use quva_client::curve::Point;
use quva_client::enrollment::CaKid;
use quva_client::group::{Privacy, SignedGroupInfo};
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_proto::v1::admin_service_server::AdminService;
use quva_proto::v1::device_service_server::DeviceService;
use quva_proto::v1::{self as pb, get_certificate_request::By};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::engine::EngineHandle;
use crate::error::CaError;
use crate::store::records::DeviceState;
use crate::store::{CaStore, CertRecord, DeviceRecord, GroupRecord, Tables};

/// Notices sent per store read while catching up a watcher.
const NOTICE_PAGE: usize = 256;

fn device_id(s: &str) -> Result<DeviceId, Status> {
    DeviceId::new(s).map_err(|_| Status::invalid_argument("invalid device id"))
}

fn group_id(s: &str) -> Result<GroupId, Status> {
    GroupId::new(s).map_err(|_| Status::invalid_argument("invalid group id"))
}

fn role(v: u32) -> Result<Role, Status> {
    u8::try_from(v)
        .ok()
        .and_then(Role::from_u8)
        .ok_or_else(|| Status::invalid_argument("role must be 1 (publisher) or 2 (subscriber)"))
}

/// Reads of a group's member list that may meet a concurrent epoch change before giving up.
const GET_GROUP_ATTEMPTS: usize = 8;

fn group_record(store: &dyn CaStore, gid: &GroupId) -> Result<GroupRecord, Status> {
    store
        .group(gid)
        .map_err(store_err)?
        .ok_or_else(|| Status::not_found("group not found"))
}

fn store_err(e: crate::store::StoreError) -> Status {
    CaError::from(e).into()
}

/// The device path, for bridges.
pub struct DeviceApi {
    engine: EngineHandle,
    store: Arc<dyn CaStore>,
    ca_public: Point,
    stopping: watch::Receiver<bool>,
}

impl DeviceApi {
    /// The service over an engine and its store. Notice streams end when `stopping` turns true,
    /// so a graceful shutdown does not wait for watching bridges.
    pub fn new(
        engine: EngineHandle,
        store: Arc<dyn CaStore>,
        ca_public: Point,
        stopping: watch::Receiver<bool>,
    ) -> DeviceApi {
        DeviceApi {
            engine,
            store,
            ca_public,
            stopping,
        }
    }
}

fn cert_response(c: &CertRecord) -> pb::GetCertificateResponse {
    pb::GetCertificateResponse {
        cert: c.cert.clone(),
        serial: c.serial,
        device_id: c.device_id.clone(),
        not_after_ms: c.not_after_ms,
        revoked: c.revoked_ms != 0,
    }
}

#[tonic::async_trait]
impl DeviceService for DeviceApi {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let auth_data = self.engine.enroll(req.into_inner().auth_data).await?;
        Ok(Response::new(pb::EnrollResponse { auth_data }))
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let auth_data = self.engine.renew(req.into_inner().auth_data).await?;
        Ok(Response::new(pb::RenewResponse { auth_data }))
    }

    async fn confirm_certificate_use(
        &self,
        req: Request<pb::ConfirmCertificateUseRequest>,
    ) -> Result<Response<pb::ConfirmCertificateUseResponse>, Status> {
        let used = self.engine.confirm_use(req.into_inner().auth_data).await?;
        Ok(Response::new(pb::ConfirmCertificateUseResponse {
            serial: used.serial,
            first_use: used.first,
        }))
    }

    async fn join_group(
        &self,
        req: Request<pb::JoinGroupRequest>,
    ) -> Result<Response<pb::JoinGroupResponse>, Status> {
        let r = self.engine.join(req.into_inner().request).await?;
        Ok(Response::new(pb::JoinGroupResponse {
            response: r.response,
            epoch: r.epoch,
        }))
    }

    async fn get_group(
        &self,
        req: Request<pb::GetGroupRequest>,
    ) -> Result<Response<pb::GetGroupResponse>, Status> {
        let gid = group_id(&req.into_inner().group)?;
        // An epoch change writes the group record and the member rows in one batch. Read the
        // rows between two reads of the epoch: if it did not move, they are that epoch's.
        for _ in 0..GET_GROUP_ATTEMPTS {
            let g = group_record(self.store.as_ref(), &gid)?;
            let rows = self.store.members(&gid).map_err(store_err)?;
            if group_record(self.store.as_ref(), &gid)?.epoch != g.epoch {
                continue;
            }
            let e = self
                .store
                .epoch(&gid, g.epoch)
                .map_err(store_err)?
                .ok_or_else(|| Status::internal("epoch record missing"))?;
            let mut members = Vec::new();
            for m in rows.iter().filter(|m| m.joined()) {
                let c = self
                    .store
                    .cert(m.serial)
                    .map_err(store_err)?
                    .ok_or_else(|| Status::internal("member certificate missing"))?;
                members.push(pb::MemberCertificate {
                    role: m.role,
                    cert: c.cert,
                    share_point: c.share_point,
                });
            }
            return Ok(Response::new(pb::GetGroupResponse {
                group: g.id.clone(),
                epoch: e.epoch,
                privacy: g.privacy,
                signed_ginfo: e.signed_ginfo,
                members,
            }));
        }
        Err(Status::unavailable("group is rekeying; retry"))
    }

    async fn get_certificate(
        &self,
        req: Request<pb::GetCertificateRequest>,
    ) -> Result<Response<pb::GetCertificateResponse>, Status> {
        let serial = match req.into_inner().by {
            Some(By::Serial(s)) => s,
            Some(By::DeviceId(id)) => {
                let d = self
                    .store
                    .device(&device_id(&id)?)
                    .map_err(store_err)?
                    .ok_or_else(|| Status::not_found("certificate not found"))?;
                d.current_serial()
            }
            None => return Err(Status::invalid_argument("device_id or serial required")),
        };
        let c = self
            .store
            .cert(serial)
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found("certificate not found"))?;
        Ok(Response::new(cert_response(&c)))
    }

    async fn get_revocation_status(
        &self,
        req: Request<pb::GetRevocationStatusRequest>,
    ) -> Result<Response<pb::GetRevocationStatusResponse>, Status> {
        let serials = req.into_inner().serials;
        if serials.len() > 10_000 {
            return Err(Status::out_of_range("at most 10000 serials"));
        }
        let mut statuses = Vec::with_capacity(serials.len());
        for serial in serials {
            let c = self.store.cert(serial).map_err(store_err)?;
            statuses.push(pb::RevocationStatus {
                serial,
                revoked: c.as_ref().is_some_and(|c| c.revoked_ms != 0),
                known: c.is_some(),
                revoked_at_ms: c.map_or(0, |c| c.revoked_ms),
            });
        }
        Ok(Response::new(pb::GetRevocationStatusResponse { statuses }))
    }

    async fn get_ca_info(
        &self,
        _req: Request<pb::GetCaInfoRequest>,
    ) -> Result<Response<pb::GetCaInfoResponse>, Status> {
        Ok(Response::new(pb::GetCaInfoResponse {
            public_key: self.ca_public.to_bytes().to_vec(),
            key_id: CaKid::of(&self.ca_public).0.to_vec(),
        }))
    }

    type WatchNoticesStream = Pin<Box<dyn Stream<Item = Result<pb::Notice, Status>> + Send>>;

    async fn watch_notices(
        &self,
        req: Request<pb::WatchNoticesRequest>,
    ) -> Result<Response<Self::WatchNoticesStream>, Status> {
        let mut next = req.into_inner().from_seq.max(1);
        let store = self.store.clone();
        let mut committed = self.engine.notices();
        let mut stopping = self.stopping.clone();
        let (tx, rx) = mpsc::channel(NOTICE_PAGE);
        tokio::spawn(async move {
            loop {
                if *stopping.borrow_and_update() {
                    return;
                }
                // Mark the current value seen before reading, so no commit slips between.
                let _ = committed.borrow_and_update();
                let page = match store.notices(next, NOTICE_PAGE) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(store_err(e))).await;
                        return;
                    }
                };
                let full = page.len() == NOTICE_PAGE;
                for n in page {
                    next = n.seq + 1;
                    if tx.send(Ok(n)).await.is_err() {
                        return;
                    }
                }
                if full {
                    continue;
                }
                tokio::select! {
                    changed = committed.changed() => {
                        if changed.is_err() {
                            return; // engine stopped
                        }
                    }
                    () = tx.closed() => return,
                    _ = stopping.changed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The admin path.
pub struct AdminApi {
    engine: EngineHandle,
    store: Arc<dyn CaStore>,
    ca_public: Point,
    started: Instant,
}

impl AdminApi {
    /// The service over an engine and its store.
    pub fn new(engine: EngineHandle, store: Arc<dyn CaStore>, ca_public: Point) -> AdminApi {
        AdminApi {
            engine,
            store,
            ca_public,
            started: Instant::now(),
        }
    }

    fn device_view(&self, d: &DeviceRecord, with_permissions: bool) -> Result<pb::Device, Status> {
        let cert = match d.current_serial() {
            0 => None,
            serial => self.store.cert(serial).map_err(store_err)?,
        };
        let mut permissions = Vec::new();
        if with_permissions {
            let id = device_id(&d.id)?;
            for g in self.store.groups().map_err(store_err)? {
                let gid = group_id(&g.id)?;
                for r in [Role::Publisher, Role::Subscriber] {
                    if let Some(m) = self.store.member(&gid, r, &id).map_err(store_err)? {
                        permissions.push(pb::Permission {
                            group: g.id.clone(),
                            role: u32::from(r.to_u8()),
                            joined: m.joined(),
                        });
                    }
                }
            }
        }
        Ok(pb::Device {
            id: d.id.clone(),
            state: d.state,
            note: d.note.clone(),
            registered_ms: d.registered_ms,
            serial: d.current_serial(),
            not_after_ms: cert.as_ref().map_or(0, |c| c.not_after_ms),
            public_key: cert.map(|c| hex::encode(c.public_key)).unwrap_or_default(),
            permissions,
            pending_serial: d.pending_serial,
            enroll_secret_expires_ms: if d.enroll_secret.is_empty() {
                0
            } else {
                d.secret_expires_ms
            },
        })
    }

    fn group_view(&self, g: &GroupRecord) -> Result<pb::Group, Status> {
        let gid = group_id(&g.id)?;
        let (q_p, q_s) = match self.store.epoch(&gid, g.epoch).map_err(store_err)? {
            Some(e) => match SignedGroupInfo::from_bytes(&e.signed_ginfo) {
                Ok(s) => {
                    let i = s.info_unverified();
                    (hex::encode(i.q_p.to_bytes()), hex::encode(i.q_s.to_bytes()))
                }
                Err(_) => (String::new(), String::new()),
            },
            None => (String::new(), String::new()),
        };
        let members = self
            .store
            .members(&gid)
            .map_err(store_err)?
            .into_iter()
            .map(|m| pb::Member {
                device: m.device.clone(),
                role: m.role,
                joined: m.joined(),
                serial: m.serial,
            })
            .collect();
        Ok(pb::Group {
            id: g.id.clone(),
            privacy: i32::try_from(g.privacy).unwrap_or(0),
            rekey_interval_secs: g.rekey_interval_secs,
            epoch: g.epoch,
            q_p,
            q_s,
            members,
            created_ms: g.created_ms,
            epoch_started_ms: g.epoch_started_ms,
        })
    }

    fn load_group(&self, gid: &GroupId) -> Result<pb::Group, Status> {
        self.group_view(&group_record(self.store.as_ref(), gid)?)
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn register_device(
        &self,
        req: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        let r = req.into_inner();
        let id = device_id(&r.id)?;
        if r.note.len() > 1024 {
            return Err(Status::invalid_argument("note longer than 1024 bytes"));
        }
        let validity_ms = r.secret_validity_secs.saturating_mul(1000);
        let reg = self
            .engine
            .register_device(id, r.note, r.reissue, validity_ms)
            .await?;
        Ok(Response::new(pb::RegisterDeviceResponse {
            device: Some(self.device_view(&reg.device, false)?),
            enroll_secret: reg.secret.to_string(),
        }))
    }

    async fn list_devices(
        &self,
        _req: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let devices = self
            .store
            .devices()
            .map_err(store_err)?
            .iter()
            .map(|d| self.device_view(d, false))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListDevicesResponse { devices }))
    }

    async fn show_device(
        &self,
        req: Request<pb::ShowDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let id = device_id(&req.into_inner().id)?;
        let d = self
            .store
            .device(&id)
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found("device not found"))?;
        Ok(Response::new(self.device_view(&d, true)?))
    }

    async fn revoke_device(
        &self,
        req: Request<pb::RevokeDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let r = req.into_inner();
        let id = device_id(&r.id)?;
        if r.reason.len() > 1024 {
            return Err(Status::invalid_argument("reason longer than 1024 bytes"));
        }
        let d = self.engine.revoke_device(id, r.reason).await?;
        Ok(Response::new(self.device_view(&d, true)?))
    }

    async fn create_group(
        &self,
        req: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let r = req.into_inner();
        let gid = group_id(&r.id)?;
        let privacy = match pb::Privacy::try_from(r.privacy) {
            Ok(pb::Privacy::Unspecified | pb::Privacy::Standard) => Privacy::Standard,
            Ok(pb::Privacy::Anonymous) => Privacy::Anonymous,
            Err(_) => return Err(Status::invalid_argument("unknown privacy mode")),
        };
        let g = self
            .engine
            .create_group(gid, privacy, r.rekey_interval_secs)
            .await?;
        Ok(Response::new(self.group_view(&g)?))
    }

    async fn set_permission(
        &self,
        req: Request<pb::SetPermissionRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let r = req.into_inner();
        let gid = group_id(&r.group)?;
        let dev = device_id(&r.device)?;
        let role = role(r.role)?;
        self.engine
            .set_permission(gid.clone(), dev, role, r.allow)
            .await?;
        Ok(Response::new(self.load_group(&gid)?))
    }

    async fn show_group(
        &self,
        req: Request<pb::ShowGroupRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let gid = group_id(&req.into_inner().id)?;
        Ok(Response::new(self.load_group(&gid)?))
    }

    async fn list_groups(
        &self,
        _req: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let groups = self
            .store
            .groups()
            .map_err(store_err)?
            .iter()
            .map(|g| self.group_view(g))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn rekey_group(
        &self,
        req: Request<pb::RekeyGroupRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let gid = group_id(&req.into_inner().id)?;
        self.engine.rekey(gid.clone()).await?;
        Ok(Response::new(self.load_group(&gid)?))
    }

    async fn get_status(
        &self,
        _req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::Status>, Status> {
        let meta = self.store.meta().map_err(store_err)?;
        let stats = self.engine.stats();
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Ok(Response::new(pb::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            ca_public_key: hex::encode(self.ca_public.to_bytes()),
            devices: count(self.store.devices().map_err(store_err)?.len()),
            groups: count(self.store.groups().map_err(store_err)?.len()),
            next_serial: meta.next_serial.max(1),
            last_notice_seq: meta.next_notice_seq.saturating_sub(1),
            last_audit_seq: meta.next_audit_seq.saturating_sub(1),
            uptime_secs: self.started.elapsed().as_secs(),
            rekeys: meta.rekeys,
            pending_changes: stats.pending_changes.load(Ordering::Relaxed),
            commits: stats.commits.load(Ordering::Relaxed),
            rekey_micros: stats.rekey_micros.load(Ordering::Relaxed),
        }))
    }

    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 100,
            n => n.min(10_000),
        };
        let limit = usize::try_from(limit).unwrap_or(100);
        let from = if r.tail {
            let last = self
                .store
                .meta()
                .map_err(store_err)?
                .next_audit_seq
                .saturating_sub(1);
            last.saturating_sub(u64::try_from(limit).unwrap_or(0)) + 1
        } else {
            r.from_seq
        };
        let entries = self.store.audit(from, limit).map_err(store_err)?;
        Ok(Response::new(pb::ListAuditResponse { entries }))
    }
}

/// The device state as text.
pub fn device_state_name(state: i32) -> &'static str {
    DeviceState::from_i32(state).map_or("unknown", DeviceState::name)
}
