//! TLS and mutual TLS on the CA's gRPC listener: the server certificate, bridge client
//! certificates in place of the bridge token, and what stays refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quva_ca::audit_kind::AuditKind;
use quva_ca::clock::{Clock, SystemClock};
use quva_ca::config::{Config, TlsConfig};
use quva_ca::datadir::DataDir;
use quva_ca::server::{RunningServer, ServeError, Server};
use quva_ca::store::RocksStore;
use quva_proto::tls::{ClientTls, endpoint};
use quva_proto::v1 as pb;
use quva_proto::v1::admin_service_client::AdminServiceClient;
use quva_proto::v1::device_service_client::DeviceServiceClient;
use rand_core::OsRng;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// A certificate authority for TLS certificates (not the Quva CA).
struct Issuer {
    cert: Certificate,
    key: KeyPair,
}

impl Issuer {
    fn new(name: &str) -> Issuer {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Issuer { cert, key }
    }

    /// Writes `<name>.pem` and `<name>.key` (mode 0600) signed by this issuer.
    fn issue(&self, dir: &Path, name: &str, server: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let sans = if server {
            vec!["localhost".to_owned()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        if server {
            params
                .subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        write_private(&key_path, &key.serialize_pem());
        (cert_path, key_path)
    }

    fn write_root(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.cert.pem()).unwrap();
        path
    }
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

struct Pki {
    dir: tempfile::TempDir,
    server_root: PathBuf,
    tls: TlsConfig,
    /// A client certificate from the configured bridge CA.
    bridge: (PathBuf, PathBuf),
    /// A client certificate from an unrelated CA.
    stranger: (PathBuf, PathBuf),
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Issuer::new("quva-ca server root");
    let bridge_ca = Issuer::new("quva bridges");
    let other_ca = Issuer::new("someone else");
    let (cert, key) = server_ca.issue(dir.path(), "server", true);
    let bridge = bridge_ca.issue(dir.path(), "bridge-1", false);
    let stranger = other_ca.issue(dir.path(), "stranger", false);
    Pki {
        server_root: server_ca.write_root(dir.path(), "server-root"),
        tls: TlsConfig {
            cert,
            key,
            client_ca: Some(bridge_ca.write_root(dir.path(), "bridge-root")),
            require_bridge_cert: false,
        },
        bridge,
        stranger,
        dir,
    }
}

struct Ca {
    _dir: tempfile::TempDir,
    server: RunningServer,
    store: Arc<RocksStore>,
    admin_token: String,
    bridge_token: String,
}

async fn start(tls: Option<TlsConfig>) -> Result<Ca, ServeError> {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path().join("ca"));
    let init = data.init(&mut OsRng).unwrap();
    let store = Arc::new(RocksStore::open(&data.db_path()).unwrap());
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls,
        ..Config::default()
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let server = Server::start_with_store(&data, &cfg, clock, store.clone()).await?;
    Ok(Ca {
        _dir: dir,
        server,
        store,
        admin_token: init.admin_token.to_string(),
        bridge_token: init.bridge_token.to_string(),
    })
}

impl Ca {
    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://localhost:{}", self.server.addr().port())
    }

    async fn channel(&self, tls: Option<&ClientTls>) -> Result<Channel, tonic::transport::Error> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        endpoint(&self.url(scheme), tls).unwrap().connect().await
    }

    /// GetCaInfo on the device path, with the bridge token if `token`.
    async fn device_call(&self, tls: Option<&ClientTls>, token: bool) -> Result<(), tonic::Status> {
        let channel = self
            .channel(tls)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
        let mut client = DeviceServiceClient::new(channel);
        let req = with_token(
            pb::GetCaInfoRequest {},
            token.then_some(&*self.bridge_token),
        );
        client.get_ca_info(req).await.map(|_| ())
    }

    /// GetStatus on the admin path, with the admin token if `token`.
    async fn admin_call(&self, tls: Option<&ClientTls>, token: bool) -> Result<(), tonic::Status> {
        let mut client = AdminServiceClient::new(self.channel(tls).await.unwrap());
        let req = with_token(pb::GetStatusRequest {}, token.then_some(&*self.admin_token));
        client.get_status(req).await.map(|_| ())
    }

    /// The outcomes of the `auth.denied` audit entries so far.
    fn denials(&self) -> Vec<String> {
        use quva_ca::store::Tables;
        self.store
            .audit(0, 10_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == AuditKind::AuthDenied.as_str())
            .map(|e| format!("{}: {}", e.detail, e.outcome))
            .collect()
    }
}

/// A request with `authorization: Bearer <token>` when a token is given.
fn with_token<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(t) = token {
        let value = format!("Bearer {t}").parse().unwrap();
        req.metadata_mut().insert("authorization", value);
    }
    req
}

/// Why `start` refused `tls`.
async fn refusal(tls: TlsConfig, what: &str) -> String {
    start(Some(tls))
        .await
        .err()
        .unwrap_or_else(|| panic!("started {what}"))
        .to_string()
}

fn client(p: &Pki, identity: Option<&(PathBuf, PathBuf)>) -> ClientTls {
    ClientTls {
        ca_cert: p.server_root.clone(),
        cert: identity.map(|i| i.0.clone()),
        key: identity.map(|i| i.1.clone()),
        domain: None,
    }
}

async fn settle() {
    // Audit entries of refusals go through the engine queue.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
}

#[tokio::test]
async fn tls_with_tokens_and_no_client_ca() {
    let p = pki();
    let tls = TlsConfig {
        client_ca: None,
        ..p.tls.clone()
    };
    let ca = start(Some(tls)).await.unwrap();
    let server_only = client(&p, None);
    ca.admin_call(Some(&server_only), true).await.unwrap();
    ca.device_call(Some(&server_only), true).await.unwrap();
    // Without a client CA a client certificate cannot even be offered successfully in place of
    // the token: the device path still wants the token.
    let err = ca.device_call(Some(&server_only), false).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Plain text against the TLS listener gets no answer.
    assert!(ca.device_call(None, true).await.is_err());
    ca.server.stop().await.unwrap();
}

#[tokio::test]
async fn bridge_certificate_replaces_the_bridge_token() {
    let p = pki();
    let ca = start(Some(p.tls.clone())).await.unwrap();
    let bridge = client(&p, Some(&p.bridge));
    let anonymous = client(&p, None);
    // A bridge certificate and no token: the device path answers.
    ca.device_call(Some(&bridge), false).await.unwrap();
    // The token still works without a certificate.
    ca.device_call(Some(&anonymous), true).await.unwrap();
    // Neither: refused.
    assert_eq!(
        ca.device_call(Some(&anonymous), false)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    // The bridge certificate never opens the admin service.
    assert_eq!(
        ca.admin_call(Some(&bridge), false)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    ca.admin_call(Some(&bridge), true).await.unwrap();
    // A certificate from another CA is refused in the handshake.
    let stranger = client(&p, Some(&p.stranger));
    assert!(ca.device_call(Some(&stranger), true).await.is_err());
    settle().await;
    assert_eq!(
        ca.denials(),
        [
            "device service: missing token",
            "admin service: missing token"
        ]
    );
    ca.server.stop().await.unwrap();
}

#[tokio::test]
async fn required_bridge_certificate_refuses_the_token_alone() {
    let p = pki();
    let tls = TlsConfig {
        require_bridge_cert: true,
        ..p.tls.clone()
    };
    let ca = start(Some(tls)).await.unwrap();
    let anonymous = client(&p, None);
    assert_eq!(
        ca.device_call(Some(&anonymous), true)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    ca.device_call(Some(&client(&p, Some(&p.bridge))), false)
        .await
        .unwrap();
    // Admin tools need no certificate.
    ca.admin_call(Some(&anonymous), true).await.unwrap();
    settle().await;
    assert_eq!(ca.denials(), ["device service: missing certificate"]);
    ca.server.stop().await.unwrap();
}

#[tokio::test]
async fn unusable_tls_settings_stop_the_start() {
    let p = pki();
    // A key readable by others.
    let loose = p.dir.path().join("loose.key");
    std::fs::copy(&p.tls.key, &loose).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let tls = TlsConfig {
        key: loose,
        ..p.tls.clone()
    };
    let err = refusal(tls, "with a world-readable key").await;
    assert!(err.contains("readable by group or others"), "{err}");
    // A missing certificate file.
    let tls = TlsConfig {
        cert: p.dir.path().join("absent.pem"),
        ..p.tls.clone()
    };
    let err = refusal(tls, "without a certificate").await;
    assert!(err.contains("absent.pem"), "{err}");
    // Requiring bridge certificates without saying which CA signs them.
    let tls = TlsConfig {
        client_ca: None,
        require_bridge_cert: true,
        ..p.tls.clone()
    };
    let err = refusal(tls, "without a client CA").await;
    assert!(err.contains("client_ca"), "{err}");
}
