//! TLS 1.3 side of the comparison: a CA, an ECDSA P-256 server certificate and a client
//! certificate generated with rcgen, rustls configurations (ring provider, TLS 1.3 only, no
//! session resumption, so every handshake is a full one) and Mosquitto listening with TLS.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::mqtt::{Counted, Counters};

/// Server-only or mutual authentication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// The client checks the server's certificate.
    ServerOnly,
    /// Both sides present certificates.
    Mutual,
}

impl Auth {
    /// A short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Auth::ServerOnly => "server-only",
            Auth::Mutual => "mutual",
        }
    }
}

/// One certificate and its private key.
pub struct Issued {
    cert: Certificate,
    key: KeyPair,
}

impl Issued {
    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

/// A CA with one server and one client certificate, all ECDSA P-256.
pub struct Pki {
    ca: Issued,
    server: Issued,
    client: Issued,
}

impl Pki {
    /// Generates the three certificates. The server certificate names `localhost` and
    /// 127.0.0.1.
    ///
    /// # Errors
    /// rcgen errors.
    pub fn generate() -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "quva-bench CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;

        let leaf = |name: &str, sans: Vec<String>| -> anyhow::Result<Issued> {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::new(sans)?;
            params.distinguished_name.push(DnType::CommonName, name);
            if name == "localhost" {
                params
                    .subject_alt_names
                    .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            }
            let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
            Ok(Issued { cert, key })
        };
        let server = leaf("localhost", vec!["localhost".to_owned()])?;
        let client = leaf("device-0001", Vec::new())?;
        Ok(Pki {
            ca: Issued {
                cert: ca_cert,
                key: ca_key,
            },
            server,
            client,
        })
    }

    /// Writes `ca.pem`, `server.pem` and `server.key` for Mosquitto.
    ///
    /// # Errors
    /// File system errors.
    pub fn write_mosquitto_files(&self, dir: &Path) -> anyhow::Result<()> {
        fs::write(dir.join("ca.pem"), self.ca.cert.pem())?;
        fs::write(dir.join("server.pem"), self.server.cert.pem())?;
        fs::write(dir.join("server.key"), self.server.key.serialize_pem())?;
        Ok(())
    }

    /// A TLS 1.3 client configuration trusting the CA, presenting the client certificate for
    /// [`Auth::Mutual`], without session resumption.
    ///
    /// # Errors
    /// rustls configuration errors.
    pub fn client_config(&self, auth: Auth) -> anyhow::Result<Arc<ClientConfig>> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der())?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots);
        let mut cfg = match auth {
            Auth::ServerOnly => builder.with_no_client_auth(),
            Auth::Mutual => {
                builder.with_client_auth_cert(vec![self.client.der()], self.client.key_der())?
            }
        };
        cfg.resumption = Resumption::disabled();
        Ok(Arc::new(cfg))
    }

    /// A TLS 1.3 server configuration with the server certificate, requiring a client
    /// certificate for [`Auth::Mutual`] (for in-process handshakes).
    ///
    /// # Errors
    /// rustls configuration errors.
    pub fn server_config(&self, auth: Auth) -> anyhow::Result<Arc<ServerConfig>> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = match auth {
            Auth::ServerOnly => builder.with_no_client_auth(),
            Auth::Mutual => {
                let mut roots = RootCertStore::empty();
                roots.add(self.ca.der())?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut cfg = builder.with_single_cert(vec![self.server.der()], self.server.key_der())?;
        cfg.send_tls13_tickets = 0;
        Ok(Arc::new(cfg))
    }
}

/// rustls with the ring provider (the same P-256 code whether client or server).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server name the certificate carries.
pub fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into())
}

/// Connects with TCP and TLS, counting the bytes on the TCP socket.
///
/// # Errors
/// Connection or handshake errors.
pub async fn connect(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    counters: Counters,
) -> anyhow::Result<TlsStream<Counted<TcpStream>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let tls = TlsConnector::from(cfg)
        .connect(server_name(), Counted::new(tcp, counters))
        .await
        .context("TLS handshake with Mosquitto")?;
    Ok(tls)
}

/// Mosquitto with a TLS 1.3 listener (and nothing else), killed on drop.
pub struct TlsMosquitto {
    /// Its address.
    pub addr: SocketAddr,
    _proc: quva_tests::Proc,
}

impl TlsMosquitto {
    /// Starts Mosquitto on a free port with the PKI's files in `dir`; `auth` sets
    /// `require_certificate`.
    ///
    /// # Errors
    /// Files that cannot be written or a broker that does not start.
    pub fn start(pki: &Pki, dir: &Path, auth: Auth) -> anyhow::Result<Self> {
        pki.write_mosquitto_files(dir)?;
        let port = quva_tests::free_port();
        let conf = dir.join(format!("mosquitto-tls-{}.conf", auth.label()));
        fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 cafile {ca}\ncertfile {cert}\nkeyfile {key}\ntls_version tlsv1.3\n\
                 require_certificate {req}\n",
                ca = dir.join("ca.pem").display(),
                cert = dir.join("server.pem").display(),
                key = dir.join("server.key").display(),
                req = auth == Auth::Mutual,
            ),
        )?;
        let mut cmd = Command::new(mosquitto_exe());
        cmd.arg("-c").arg(&conf);
        let mut proc = quva_tests::Proc::spawn(cmd, "mosquitto-tls", dir);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        quva_tests::wait_port(addr, &mut proc.child, "mosquitto (TLS)");
        Ok(TlsMosquitto { addr, _proc: proc })
    }
}

/// Plain Mosquitto (no bridge, no TLS), killed on drop.
pub struct PlainMosquitto {
    /// Its address.
    pub addr: SocketAddr,
    _proc: quva_tests::Proc,
}

impl PlainMosquitto {
    /// Starts Mosquitto on a free port.
    ///
    /// # Errors
    /// Files that cannot be written or a broker that does not start.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let port = quva_tests::free_port();
        let conf = dir.join("mosquitto-plain.conf");
        fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )?;
        let mut cmd = Command::new(mosquitto_exe());
        cmd.arg("-c").arg(&conf);
        let mut proc = quva_tests::Proc::spawn(cmd, "mosquitto-plain", dir);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        quva_tests::wait_port(addr, &mut proc.child, "mosquitto");
        Ok(PlainMosquitto { addr, _proc: proc })
    }
}

fn mosquitto_exe() -> &'static str {
    ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mosquitto")
}
