//! Test support: the in-memory test CA served over real gRPC (`quva.ca.v1.DeviceService`) on a
//! loopback port, with a crash switch that closes the listener and every open connection, and a
//! restart on the same address with the same state.

#![allow(
    dead_code,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use quva_bridge::ca::{CaClient, CaError, Notice, NoticeAction};
use quva_client::ids::GroupId;
use quva_proto::v1::device_service_server::{DeviceService, DeviceServiceServer};
use quva_proto::v1::{self as pb, NoticeKind};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use super::test_ca::{Client, TestCa};

fn status(e: CaError) -> Status {
    match e {
        CaError::Refused => Status::permission_denied("refused"),
        CaError::Malformed => Status::invalid_argument("malformed"),
        CaError::NotFound => Status::not_found("not found"),
        _ => Status::unavailable("unavailable"),
    }
}

fn to_pb(n: Notice) -> pb::Notice {
    let mut out = pb::Notice {
        seq: n.seq,
        group: n.group,
        epoch: n.epoch,
        ..Default::default()
    };
    match n.action {
        NoticeAction::Rekey { topic, payload } => {
            out.kind = NoticeKind::Rekey as i32;
            out.topic = topic;
            out.payload = payload;
        }
        NoticeAction::GroupUpdated => out.kind = NoticeKind::GroupUpdated as i32,
        NoticeAction::Revoked { serial, device } => {
            out.kind = NoticeKind::Revoked as i32;
            out.serial = serial;
            out.device_id = device;
        }
        NoticeAction::Superseded {
            serial,
            device,
            successor,
        } => {
            out.kind = NoticeKind::Revoked as i32;
            out.serial = serial;
            out.device_id = device;
            out.superseded_by = successor;
        }
        NoticeAction::Unknown => {}
    }
    out
}

struct Api(Client);

#[tonic::async_trait]
impl DeviceService for Api {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let auth_data = self
            .0
            .enroll(req.into_inner().auth_data)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::EnrollResponse { auth_data }))
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let auth_data = self
            .0
            .renew(req.into_inner().auth_data)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RenewResponse { auth_data }))
    }

    async fn join_group(
        &self,
        req: Request<pb::JoinGroupRequest>,
    ) -> Result<Response<pb::JoinGroupResponse>, Status> {
        let (response, epoch) = self
            .0
            .join_group(req.into_inner().request)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::JoinGroupResponse {
            response,
            epoch: epoch.0,
        }))
    }

    async fn get_group(
        &self,
        req: Request<pb::GetGroupRequest>,
    ) -> Result<Response<pb::GetGroupResponse>, Status> {
        let group =
            GroupId::new(&req.into_inner().group).map_err(|_| Status::invalid_argument("group"))?;
        let snap = self.0.get_group(group).await.map_err(status)?;
        Ok(Response::new(pb::GetGroupResponse {
            group: snap.group.as_str().to_owned(),
            epoch: snap.epoch.0,
            privacy: 0,
            signed_ginfo: snap.signed_ginfo,
            members: snap
                .members
                .into_iter()
                .map(|m| pb::MemberCertificate {
                    role: u32::from(m.role),
                    cert: m.cert,
                    share_point: m.share_point,
                })
                .collect(),
        }))
    }

    async fn get_certificate(
        &self,
        _req: Request<pb::GetCertificateRequest>,
    ) -> Result<Response<pb::GetCertificateResponse>, Status> {
        Err(Status::unimplemented("not used by the bridge"))
    }

    async fn confirm_certificate_use(
        &self,
        req: Request<pb::ConfirmCertificateUseRequest>,
    ) -> Result<Response<pb::ConfirmCertificateUseResponse>, Status> {
        use quva_client::codec::Decode as _;
        let proof =
            quva_client::enrollment::CertConnectProof::from_bytes(&req.into_inner().auth_data)
                .map_err(|_| Status::invalid_argument("malformed"))?;
        let serial = proof.cert.serial();
        self.0
            .confirm_use(serial, Vec::new())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ConfirmCertificateUseResponse {
            serial,
            first_use: false,
        }))
    }

    async fn get_revocation_status(
        &self,
        req: Request<pb::GetRevocationStatusRequest>,
    ) -> Result<Response<pb::GetRevocationStatusResponse>, Status> {
        let mut statuses = Vec::new();
        for serial in req.into_inner().serials {
            let revoked = self.0.is_revoked(serial).await.map_err(status)?;
            statuses.push(pb::RevocationStatus {
                serial,
                revoked,
                known: true,
                revoked_at_ms: 0,
            });
        }
        Ok(Response::new(pb::GetRevocationStatusResponse { statuses }))
    }

    async fn get_ca_info(
        &self,
        _req: Request<pb::GetCaInfoRequest>,
    ) -> Result<Response<pb::GetCaInfoResponse>, Status> {
        let public_key = self.0.ca_public_key().await.map_err(status)?;
        Ok(Response::new(pb::GetCaInfoResponse {
            public_key,
            key_id: Vec::new(),
        }))
    }

    type WatchNoticesStream = Pin<Box<dyn Stream<Item = Result<pb::Notice, Status>> + Send>>;

    async fn watch_notices(
        &self,
        req: Request<pb::WatchNoticesRequest>,
    ) -> Result<Response<Self::WatchNoticesStream>, Status> {
        let from = req.into_inner().from_seq.max(1);
        let notices = self.0.watch_notices(from).await.map_err(status)?;
        let stream = futures_util::stream::unfold(notices, |mut n| async move {
            let item = n.next().await?;
            Some((item.map(to_pb).map_err(status), n))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The test CA on a gRPC port.
pub struct GrpcCa {
    pub ca: Arc<TestCa>,
    pub addr: SocketAddr,
    server: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl GrpcCa {
    /// Serves `ca` on a free loopback port.
    pub async fn start(ca: Arc<TestCa>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut me = GrpcCa {
            ca,
            addr,
            server: None,
            connections: Arc::default(),
        };
        me.serve(listener);
        me
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&mut self, listener: TcpListener) {
        let connections = self.connections.clone();
        let incoming = futures_util::stream::unfold(listener, move |l| {
            let connections = connections.clone();
            async move {
                let accepted = l.accept().await.map(|(s, _)| {
                    if let Ok(fd) = s.as_fd().try_clone_to_owned() {
                        connections
                            .lock()
                            .unwrap()
                            .push(std::net::TcpStream::from(fd));
                    }
                    s
                });
                Some((accepted, l))
            }
        });
        let svc = DeviceServiceServer::new(Api(Client(self.ca.clone())));
        self.server = Some(tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        }));
    }

    /// Crashes the server: the port stops accepting and every open connection is cut.
    pub async fn kill(&mut self) {
        if let Some(task) = self.server.take() {
            task.abort();
            let _ = task.await;
        }
        for c in self.connections.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Serves again on the same address, with the same state.
    pub async fn restart(&mut self) {
        self.kill().await;
        let mut last = None;
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(l) => {
                    self.serve(l);
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("cannot bind {} again: {last:?}", self.addr);
    }
}

impl Drop for GrpcCa {
    fn drop(&mut self) {
        if let Some(task) = self.server.take() {
            task.abort();
        }
        for c in self.connections.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}
