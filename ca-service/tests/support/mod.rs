//! Shared helpers of the integration tests: a CA served on 127.0.0.1:0 over a temporary RocksDB,
//! clients with tokens, and simulated devices whose messages are the device-side steps of
//! quva-client's test kit (`testkit::steps`).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;

use quva_ca::audit_kind::AuditKind;
use quva_ca::cli::{AdminClient, Bearer, bearer, connect};
use quva_ca::clock::{Clock, ManualClock};
use quva_ca::config::Config;
use quva_ca::datadir::DataDir;
use quva_ca::server::{RunningServer, Server};
use quva_ca::store::records::{self, MetaRecord};
use quva_ca::store::{CaStore, Key, KeyKind, RocksStore};
use quva_client::codec::{Decode, Encode};
use quva_client::curve::Point;
use quva_client::enrollment::{Credentials, EnrollmentSecret};
use quva_client::group::AcceptedGroupKey;
use quva_client::ids::{GroupId, Role};
use quva_client::rekey::GroupKeyDelivery;
use quva_client::testkit::steps;
use quva_proto::v1 as pb;
use quva_proto::v1::device_service_client::DeviceServiceClient;
use rand_core::OsRng;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A bridge-side client.
pub type DeviceClient = DeviceServiceClient<InterceptedService<Channel, Bearer>>;

/// A running CA over a temporary data directory.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub data: DataDir,
    pub store: Arc<RocksStore>,
    pub clock: Arc<ManualClock>,
    pub server: Option<RunningServer>,
    pub url: String,
    pub admin: AdminClient,
    pub device: DeviceClient,
    pub ca: Point,
    pub admin_token: String,
    pub bridge_token: String,
    pub cfg: Config,
}

pub fn system_now() -> u64 {
    quva_ca::clock::SystemClock.now_ms()
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            batch_window_ms: 30,
            sweep_interval_ms: 20,
            ..Config::default()
        })
        .await
    }

    pub async fn start_with(cfg: Config) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path().join("ca"));
        let init = data.init(&mut OsRng).unwrap();
        let store = Arc::new(RocksStore::open(&data.db_path()).unwrap());
        let clock = Arc::new(ManualClock::new(system_now()));
        let server = Server::start_with_store(&data, &cfg, clock.clone(), store.clone())
            .await
            .unwrap();
        let url = format!("http://{}", server.addr());
        let admin = connect(&url, &init.admin_token).await.unwrap();
        let device = device_client(&url, &init.bridge_token).await;
        Harness {
            dir,
            data,
            store,
            clock,
            server: Some(server),
            url,
            admin,
            device,
            ca: init.ca_public,
            admin_token: init.admin_token.to_string(),
            bridge_token: init.bridge_token.to_string(),
            cfg,
        }
    }

    /// Stops the server and starts a new one on the same store (new port, new clients).
    pub async fn restart(&mut self) -> Result<(), quva_ca::server::ServeError> {
        if let Some(s) = self.server.take() {
            s.stop().await.unwrap();
        }
        let server = Server::start_with_store(
            &self.data,
            &self.cfg,
            self.clock.clone(),
            self.store.clone(),
        )
        .await?;
        self.url = format!("http://{}", server.addr());
        self.admin = connect(&self.url, &self.admin_token).await.unwrap();
        self.device = device_client(&self.url, &self.bridge_token).await;
        self.server = Some(server);
        Ok(())
    }

    pub fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await.unwrap();
        }
    }

    /// Every row except the audit log, for "nothing changed" checks.
    pub fn snapshot(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut out = BTreeMap::new();
        for kind in KeyKind::ALL {
            if kind == KeyKind::Audit {
                continue;
            }
            for (k, v) in self.store.scan(&Key::kind_prefix(kind), None, 0).unwrap() {
                if kind == KeyKind::Meta {
                    // The audit counter moves with every refusal; the others must not.
                    let mut m: MetaRecord = records::decode(&v, "meta").unwrap();
                    m.next_audit_seq = 0;
                    out.insert(k, records::encode(&m));
                } else {
                    out.insert(k, v);
                }
            }
        }
        out
    }

    pub async fn register(&mut self, id: &str) -> EnrollmentSecret {
        register(&mut self.admin, id).await
    }

    /// Registers and enrolls a device.
    pub async fn enrolled(&mut self, id: &str) -> Credentials {
        let secret = self.register(id).await;
        let (pending, data) = steps::enroll_request(id, &secret, self.now(), &mut OsRng);
        let r = self
            .device
            .enroll(pb::EnrollRequest { auth_data: data })
            .await
            .unwrap()
            .into_inner();
        steps::accept_enrollment(&pending, &r.auth_data, &self.ca)
    }

    pub async fn create_group(&mut self, id: &str, anonymous: bool, interval: u64) -> pb::Group {
        let privacy = if anonymous {
            pb::Privacy::Anonymous
        } else {
            pb::Privacy::Standard
        };
        self.admin
            .create_group(pb::CreateGroupRequest {
                id: id.into(),
                privacy: privacy as i32,
                rekey_interval_secs: interval,
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn permit(
        &mut self,
        group: &str,
        device: &str,
        role: Role,
        allow: bool,
    ) -> pb::Group {
        self.admin
            .set_permission(pb::SetPermissionRequest {
                group: group.into(),
                device: device.into(),
                role: u32::from(role.to_u8()),
                allow,
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub fn join_request(&self, creds: &Credentials, group: &str, role: Role) -> Vec<u8> {
        let group = GroupId::new(group).unwrap();
        steps::join_request(creds, &group, role, self.now(), &self.ca, &mut OsRng).to_bytes()
    }

    /// Sends a group-key request and accepts the delivered key.
    pub async fn join(
        &mut self,
        creds: &Credentials,
        group: &str,
        role: Role,
    ) -> Result<AcceptedGroupKey, tonic::Status> {
        let request = self.join_request(creds, group, role);
        let r = self
            .device
            .join_group(pb::JoinGroupRequest { request })
            .await?
            .into_inner();
        Ok(accept(&self.ca, creds, group, role, &r.response))
    }

    /// The kind and outcome of every audit entry; a stored kind no version wrote fails the test.
    pub async fn audit_kinds(&mut self) -> Vec<(AuditKind, String)> {
        self.admin
            .list_audit(pb::ListAuditRequest {
                from_seq: 0,
                limit: 10_000,
                tail: false,
            })
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .map(|e| {
                let kind = AuditKind::parse(&e.kind)
                    .unwrap_or_else(|| panic!("unknown audit kind {:?}", e.kind));
                (kind, e.outcome)
            })
            .collect()
    }
}

/// Registers `id` over the admin API; returns its enrollment secret.
pub async fn register(admin: &mut AdminClient, id: &str) -> EnrollmentSecret {
    let r = admin
        .register_device(pb::RegisterDeviceRequest {
            id: id.into(),
            note: String::new(),
            reissue: false,
            secret_validity_secs: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(&r.enroll_secret, &mut bytes).unwrap();
    EnrollmentSecret::from_bytes(&bytes)
}

pub fn accept(
    ca: &Point,
    creds: &Credentials,
    group: &str,
    role: Role,
    response: &[u8],
) -> AcceptedGroupKey {
    let delivery = GroupKeyDelivery::from_bytes(response).unwrap();
    steps::accept_delivery(&delivery, ca, creds, &GroupId::new(group).unwrap(), role)
}

pub async fn device_client(url: &str, token: &str) -> DeviceClient {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    DeviceServiceClient::with_interceptor(channel, bearer(token).unwrap())
}
