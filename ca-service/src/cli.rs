//! The `quva-ca` command line: `init`, `serve` and the admin subcommands, which call the running
//! server over gRPC with the admin token.
//!
//! Output is human-readable; `--json` prints one JSON document for scripts.
//!
//! # Usage
//! ```
//! use clap::Parser;
//! use quva_ca::cli::{Cli, Command};
//! let cli = Cli::try_parse_from(["quva-ca", "init", "--data", "/tmp/ca"]).unwrap();
//! assert!(matches!(cli.command, Command::Init { .. }));
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use quva_proto::v1::admin_service_client::AdminServiceClient;
use quva_proto::v1::{self as pb};
use serde_json::{Value, json};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::config::{Config, ConfigSource};
use crate::datadir::DataDir;
use crate::service::device_state_name;

/// Quva certificate authority: enrollment, group keys and rekeying for Quva MQTT groups.
#[derive(Debug, Parser)]
#[command(name = "quva-ca", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Logging (`--log-format`).
    #[command(flatten)]
    pub log: quva_daemon::LogArgs,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a data directory: CA key, admin token and bridge token (files 0600).
    Init {
        /// The data directory to create.
        #[arg(long, env = "QUVA_CA_DATA")]
        data: PathBuf,
    },
    /// Run the CA daemon until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Manage devices.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Manage groups.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Show the server's status.
    Status(ClientArgs),
    /// Show the audit log.
    Audit {
        /// First sequence number.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// The newest entries instead (ignores --from).
        #[arg(long)]
        tail: bool,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Options of `serve`; flags override the config file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The data directory made by `init`.
    #[arg(long, env = "QUVA_CA_DATA")]
    pub data: PathBuf,
    /// Config file (default: ca.toml in the data directory, if present).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// gRPC listen address (default 127.0.0.1:7443).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Prometheus metrics listen address (off by default).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Batching window of rekeys, milliseconds (default 200).
    #[arg(long)]
    pub batch_window_ms: Option<u64>,
    /// Allowed clock difference of requests, milliseconds (default 60000).
    #[arg(long)]
    pub time_window_ms: Option<u64>,
    /// Certificate lifetime, seconds (default 30 days).
    #[arg(long)]
    pub cert_validity_secs: Option<u64>,
    /// Default lifetime of enrollment secrets, seconds (default 7 days).
    #[arg(long)]
    pub enroll_secret_validity_secs: Option<u64>,
    /// Most waiting commands written in one synced batch (default 1024; 1 syncs each alone).
    #[arg(long)]
    pub max_group_commit: Option<usize>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM, mode 0600).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Root certificate(s) of bridge client certificates (PEM): such a certificate replaces
    /// the bridge token on the device path.
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
    /// Refuse device-path calls without a bridge client certificate.
    #[arg(long)]
    pub require_bridge_cert: bool,
}

impl ServeArgs {
    /// The configuration: file, then flags.
    ///
    /// # Errors
    /// [`crate::config::ConfigError`] if the file cannot be read or parsed.
    pub fn config(&self) -> Result<Config, crate::config::ConfigError> {
        let mut src = match &self.config {
            Some(p) => ConfigSource::from_file(p, true)?,
            None => ConfigSource::from_file(&DataDir::new(&self.data).config_path(), false)?,
        };
        src.set_some("listen", self.listen.map(|a| a.to_string()), "--listen");
        src.set_some(
            "metrics_listen",
            self.metrics_listen.map(|a| a.to_string()),
            "--metrics-listen",
        );
        src.set_uint("batch_window_ms", self.batch_window_ms, "--batch-window-ms")?;
        src.set_uint("time_window_ms", self.time_window_ms, "--time-window-ms")?;
        src.set_uint(
            "cert_validity_secs",
            self.cert_validity_secs,
            "--cert-validity-secs",
        )?;
        src.set_uint(
            "enroll_secret_validity_secs",
            self.enroll_secret_validity_secs,
            "--enroll-secret-validity-secs",
        )?;
        src.set_uint(
            "max_group_commit",
            self.max_group_commit.map(|v| v as u64),
            "--max-group-commit",
        )?;
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            src.set("tls.cert", cert.display().to_string(), "--tls-cert");
            src.set("tls.key", key.display().to_string(), "--tls-key");
        }
        if (self.tls_client_ca.is_some() || self.require_bridge_cert) && !src.contains("tls") {
            // Ignoring them would leave the device path open to token-only bridges.
            return Err(src.rule(
                "--tls-client-ca and --require-bridge-cert need TLS: --tls-cert and --tls-key, \
                 or [tls] in the file",
            ));
        }
        src.set_some(
            "tls.client_ca",
            self.tls_client_ca.as_ref().map(|p| p.display().to_string()),
            "--tls-client-ca",
        );
        if self.require_bridge_cert {
            src.set("tls.require_bridge_cert", true, "--require-bridge-cert");
        }
        src.parse()
    }
}

/// How admin subcommands reach the server.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Server URL (`https://` with --ca-cert).
    #[arg(
        long,
        env = "QUVA_CA_SERVER",
        default_value = "http://127.0.0.1:7443",
        global = true
    )]
    pub server: String,
    /// Root certificate (PEM) of a TLS server; enables TLS.
    #[arg(long, env = "QUVA_CA_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// The name in the server certificate, if not the URL's host.
    #[arg(long, global = true, requires = "ca_cert")]
    pub tls_domain: Option<String>,
    /// File holding the admin token (default: admin.token in the data directory).
    #[arg(long, env = "QUVA_CA_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// Data directory to read admin.token from.
    #[arg(long, env = "QUVA_CA_DATA", global = true)]
    pub data: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A role on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Publisher (holds d_S).
    #[value(alias = "publisher")]
    Pub,
    /// Subscriber (holds d_P).
    #[value(alias = "subscriber")]
    Sub,
}

impl RoleArg {
    fn wire(self) -> u32 {
        match self {
            RoleArg::Pub => 1,
            RoleArg::Sub => 2,
        }
    }
}

/// `device` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Register a device and print its one-time enrollment secret.
    Add {
        /// Device ID (1..=64 of [A-Za-z0-9._-]).
        id: String,
        /// Free-text note.
        #[arg(long, default_value = "")]
        note: String,
        /// Issue a new secret for an existing device.
        #[arg(long)]
        reissue: bool,
        /// Lifetime of the enrollment secret, seconds (default: the CA's, 7 days unless
        /// configured).
        #[arg(long, default_value_t = 0)]
        secret_validity_secs: u64,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List devices.
    List(ClientArgs),
    /// Show one device with its permissions.
    Show {
        /// Device ID.
        id: String,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke a device: certificates, secret and memberships (its groups rekey).
    Revoke {
        /// Device ID.
        id: String,
        /// Reason, kept in the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `group` subcommands.
#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Create a group (an MQTT topic).
    Create {
        /// Group ID (the data topic).
        id: String,
        /// Anonymous privacy mode (option-3 traffic, group-level connections).
        #[arg(long)]
        anonymous: bool,
        /// Periodic rekey interval in seconds (0: none).
        #[arg(long, default_value_t = 0)]
        rekey_interval: u64,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Allow a device as publisher or subscriber.
    Allow {
        /// Group ID.
        group: String,
        /// Device ID.
        device: String,
        /// Role.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Deny a device a role; a joined member leaves and the group rekeys.
    Deny {
        /// Group ID.
        group: String,
        /// Device ID.
        device: String,
        /// Role.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a group: epoch, keys and members.
    Show {
        /// Group ID.
        id: String,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List groups.
    List(ClientArgs),
    /// Force a new epoch now.
    Rekey {
        /// Group ID.
        id: String,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No token: neither --token-file nor --data.
    #[error("no admin token: pass --token-file or --data (or set QUVA_CA_TOKEN_FILE)")]
    NoToken,
    /// The token file could not be read.
    #[error("cannot read token file {0}: {1}")]
    Token(String, std::io::Error),
    /// The server URL is invalid or unreachable.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, tonic::transport::Error),
    /// The TLS files are unusable.
    #[error("{0}")]
    Tls(quva_proto::tls::TlsError),
    /// The server refused or failed.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rpc(#[from] tonic::Status),
}

fn code_name(c: tonic::Code) -> &'static str {
    match c {
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::Unavailable => "unavailable",
        _ => "error",
    }
}

/// An interceptor that adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// The interceptor adding `token` as bearer token (for admin and bridge clients).
///
/// # Errors
/// [`ClientError::NoToken`] if the token is not valid metadata text.
pub fn bearer(token: &str) -> Result<Bearer, ClientError> {
    let value: MetadataValue<Ascii> = format!("Bearer {token}")
        .parse()
        .map_err(|_| ClientError::NoToken)?;
    Ok(Bearer(value))
}

/// An admin client with the bearer token attached to every call.
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// Connects to `server` with the admin `token`.
///
/// # Errors
/// [`ClientError::Connect`].
pub async fn connect(server: &str, token: &str) -> Result<AdminClient, ClientError> {
    connect_with(server, token, None).await
}

/// Connects to `server` with the admin `token`, over TLS when `tls` is given.
///
/// # Errors
/// [`ClientError::Connect`] or [`ClientError::Tls`].
pub async fn connect_with(
    server: &str,
    token: &str,
    tls: Option<&quva_proto::tls::ClientTls>,
) -> Result<AdminClient, ClientError> {
    let endpoint = quva_proto::tls::endpoint(server, tls).map_err(|e| match e {
        quva_proto::tls::TlsError::Endpoint(t) => ClientError::Connect(server.into(), t),
        other => ClientError::Tls(other),
    })?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| ClientError::Connect(server.into(), e))?;
    Ok(AdminServiceClient::with_interceptor(
        channel,
        bearer(token)?,
    ))
}

impl ClientArgs {
    fn token(&self) -> Result<Zeroizing<String>, ClientError> {
        let path = match (&self.token_file, &self.data) {
            (Some(p), _) => p.clone(),
            (None, Some(d)) => DataDir::new(d).admin_token_path(),
            (None, None) => return Err(ClientError::NoToken),
        };
        let text = Zeroizing::new(
            std::fs::read_to_string(&path)
                .map_err(|e| ClientError::Token(path.display().to_string(), e))?,
        );
        Ok(Zeroizing::new(text.trim().to_owned()))
    }

    async fn client(&self) -> Result<AdminClient, ClientError> {
        let tls = self.ca_cert.as_ref().map(|ca| quva_proto::tls::ClientTls {
            ca_cert: ca.clone(),
            domain: self.tls_domain.clone(),
            ..Default::default()
        });
        connect_with(&self.server, &self.token()?, tls.as_ref()).await
    }
}

fn role_name(r: u32) -> &'static str {
    match r {
        1 => "pub",
        2 => "sub",
        _ => "?",
    }
}

fn privacy_name(p: i32) -> &'static str {
    match p {
        2 => "anonymous",
        _ => "standard",
    }
}

fn device_json(d: &pb::Device) -> Value {
    json!({
        "id": d.id,
        "state": device_state_name(d.state),
        "note": d.note,
        "registered_ms": d.registered_ms,
        "serial": d.serial,
        "pending_serial": d.pending_serial,
        "enroll_secret_expires_ms": d.enroll_secret_expires_ms,
        "not_after_ms": d.not_after_ms,
        "public_key": d.public_key,
        "permissions": d.permissions.iter().map(|p| json!({
            "group": p.group, "role": role_name(p.role), "joined": p.joined,
        })).collect::<Vec<_>>(),
    })
}

fn device_text(d: &pb::Device) -> String {
    let mut s = format!(
        "{}  {}  serial {}{}",
        d.id,
        device_state_name(d.state),
        d.serial,
        if d.note.is_empty() {
            String::new()
        } else {
            format!("  ({})", d.note)
        }
    );
    if !d.public_key.is_empty() {
        s.push_str(&format!(
            "\n  public key {}\n  valid until {} ms",
            d.public_key, d.not_after_ms
        ));
    }
    for p in &d.permissions {
        s.push_str(&format!(
            "\n  {} as {}{}",
            p.group,
            role_name(p.role),
            if p.joined { " (joined)" } else { "" }
        ));
    }
    s
}

fn group_json(g: &pb::Group) -> Value {
    json!({
        "id": g.id,
        "privacy": privacy_name(g.privacy),
        "rekey_interval_secs": g.rekey_interval_secs,
        "epoch": g.epoch,
        "q_p": g.q_p,
        "q_s": g.q_s,
        "created_ms": g.created_ms,
        "epoch_started_ms": g.epoch_started_ms,
        "members": g.members.iter().map(|m| json!({
            "device": m.device, "role": role_name(m.role), "joined": m.joined, "serial": m.serial,
        })).collect::<Vec<_>>(),
    })
}

fn group_text(g: &pb::Group) -> String {
    let mut s = format!(
        "{}  epoch {}  {}{}\n  Q_P {}\n  Q_S {}",
        g.id,
        g.epoch,
        privacy_name(g.privacy),
        if g.rekey_interval_secs > 0 {
            format!("  rekey every {}s", g.rekey_interval_secs)
        } else {
            String::new()
        },
        g.q_p,
        g.q_s
    );
    for m in &g.members {
        s.push_str(&format!(
            "\n  {:<3} {}{}",
            role_name(m.role),
            m.device,
            if m.joined {
                format!("  joined (serial {})", m.serial)
            } else {
                "  allowed".to_owned()
            }
        ));
    }
    s
}

fn audit_json(a: &pb::AuditEntry) -> Value {
    json!({
        "seq": a.seq, "time_ms": a.time_ms, "kind": a.kind, "actor": a.actor,
        "device": a.device, "group": a.group, "outcome": a.outcome, "detail": a.detail,
    })
}

fn audit_text(a: &pb::AuditEntry) -> String {
    let mut s = format!(
        "{:>6} {} {:<16} {:<7} {}",
        a.seq, a.time_ms, a.kind, a.actor, a.outcome
    );
    if !a.device.is_empty() {
        s.push_str(&format!(" device={}", a.device));
    }
    if !a.group.is_empty() {
        s.push_str(&format!(" group={}", a.group));
    }
    if !a.detail.is_empty() {
        s.push_str(&format!(" ({})", a.detail));
    }
    s
}

fn render(json_out: bool, value: Value, text: String) -> String {
    if json_out {
        serde_json::to_string_pretty(&value).unwrap_or_default()
    } else {
        text
    }
}

/// Renders a list: a JSON array, or one line of text per item.
fn render_list<T>(
    json_out: bool,
    items: &[T],
    to_json: fn(&T) -> Value,
    to_text: fn(&T) -> String,
) -> String {
    if json_out {
        render(
            true,
            Value::Array(items.iter().map(to_json).collect()),
            String::new(),
        )
    } else {
        items.iter().map(to_text).collect::<Vec<_>>().join("\n")
    }
}

/// Runs an admin command against the server and returns what to print.
///
/// # Errors
/// [`ClientError`] for a missing token, a connection failure or a refused call.
pub async fn run_admin(cmd: Command) -> Result<String, ClientError> {
    match cmd {
        Command::Device(d) => run_device(d).await,
        Command::Group(g) => run_group(g).await,
        Command::Status(c) => {
            let s = c
                .client()
                .await?
                .get_status(pb::GetStatusRequest {})
                .await?
                .into_inner();
            let v = json!({
                "version": s.version, "ca_public_key": s.ca_public_key, "devices": s.devices,
                "groups": s.groups, "next_serial": s.next_serial,
                "last_notice_seq": s.last_notice_seq, "last_audit_seq": s.last_audit_seq,
                "uptime_secs": s.uptime_secs, "rekeys": s.rekeys,
                "pending_changes": s.pending_changes, "commits": s.commits,
            });
            let t = format!(
                "quva-ca {}  up {}s\nCA public key {}\n{} devices, {} groups, {} epochs\nnext serial {}, last notice {}, last audit {}, pending changes {}, synced commits {}",
                s.version,
                s.uptime_secs,
                s.ca_public_key,
                s.devices,
                s.groups,
                s.rekeys,
                s.next_serial,
                s.last_notice_seq,
                s.last_audit_seq,
                s.pending_changes,
                s.commits
            );
            Ok(render(c.json, v, t))
        }
        Command::Audit {
            from,
            limit,
            tail,
            client,
        } => {
            let r = client
                .client()
                .await?
                .list_audit(pb::ListAuditRequest {
                    from_seq: from,
                    limit,
                    tail,
                })
                .await?
                .into_inner();
            Ok(render_list(client.json, &r.entries, audit_json, audit_text))
        }
        Command::Init { .. } | Command::Serve(_) => Ok(String::new()),
    }
}

async fn run_device(cmd: DeviceCmd) -> Result<String, ClientError> {
    match cmd {
        DeviceCmd::Add {
            id,
            note,
            reissue,
            secret_validity_secs,
            client,
        } => {
            let r = client
                .client()
                .await?
                .register_device(pb::RegisterDeviceRequest {
                    id,
                    note,
                    reissue,
                    secret_validity_secs,
                })
                .await?
                .into_inner();
            let d = r.device.unwrap_or_default();
            let v = json!({"device": device_json(&d), "enroll_secret": r.enroll_secret});
            let t = format!(
                "registered {}\nenrollment secret (shown once): {}",
                d.id, r.enroll_secret
            );
            Ok(render(client.json, v, t))
        }
        DeviceCmd::List(client) => {
            let r = client
                .client()
                .await?
                .list_devices(pb::ListDevicesRequest {})
                .await?
                .into_inner();
            Ok(render_list(
                client.json,
                &r.devices,
                device_json,
                device_text,
            ))
        }
        DeviceCmd::Show { id, client } => {
            let d = client
                .client()
                .await?
                .show_device(pb::ShowDeviceRequest { id })
                .await?
                .into_inner();
            Ok(render(client.json, device_json(&d), device_text(&d)))
        }
        DeviceCmd::Revoke { id, reason, client } => {
            let d = client
                .client()
                .await?
                .revoke_device(pb::RevokeDeviceRequest { id, reason })
                .await?
                .into_inner();
            Ok(render(
                client.json,
                device_json(&d),
                format!("revoked {}", d.id),
            ))
        }
    }
}

async fn run_group(cmd: GroupCmd) -> Result<String, ClientError> {
    let (g, json_out) = match cmd {
        GroupCmd::Create {
            id,
            anonymous,
            rekey_interval,
            client,
        } => {
            let privacy = if anonymous {
                pb::Privacy::Anonymous
            } else {
                pb::Privacy::Standard
            };
            let g = client
                .client()
                .await?
                .create_group(pb::CreateGroupRequest {
                    id,
                    privacy: privacy as i32,
                    rekey_interval_secs: rekey_interval,
                })
                .await?
                .into_inner();
            (g, client.json)
        }
        GroupCmd::Allow {
            group,
            device,
            role,
            client,
        } => {
            let g = set_permission(&client, group, device, role, true).await?;
            (g, client.json)
        }
        GroupCmd::Deny {
            group,
            device,
            role,
            client,
        } => {
            let g = set_permission(&client, group, device, role, false).await?;
            (g, client.json)
        }
        GroupCmd::Show { id, client } => {
            let g = client
                .client()
                .await?
                .show_group(pb::ShowGroupRequest { id })
                .await?
                .into_inner();
            (g, client.json)
        }
        GroupCmd::List(client) => {
            let r = client
                .client()
                .await?
                .list_groups(pb::ListGroupsRequest {})
                .await?
                .into_inner();
            return Ok(render_list(client.json, &r.groups, group_json, group_text));
        }
        GroupCmd::Rekey { id, client } => {
            let g = client
                .client()
                .await?
                .rekey_group(pb::RekeyGroupRequest { id })
                .await?
                .into_inner();
            (g, client.json)
        }
    };
    Ok(render(json_out, group_json(&g), group_text(&g)))
}

async fn set_permission(
    client: &ClientArgs,
    group: String,
    device: String,
    role: RoleArg,
    allow: bool,
) -> Result<pb::Group, ClientError> {
    Ok(client
        .client()
        .await?
        .set_permission(pb::SetPermissionRequest {
            group,
            device,
            role: role.wire(),
            allow,
        })
        .await?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn serve_args(args: &[&str]) -> ServeArgs {
        let mut all = vec!["quva-ca", "serve"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Serve(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn serve_flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_str().unwrap();
        std::fs::write(
            dir.path().join("ca.toml"),
            "batch_window_ms = 10\ntime_window_ms = 7\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        )
        .unwrap();
        let cfg = serve_args(&["--data", data]).config().unwrap();
        assert_eq!((cfg.batch_window_ms, cfg.time_window_ms), (10, 7));
        let cfg = serve_args(&[
            "--data",
            data,
            "--batch-window-ms",
            "50",
            "--listen",
            "127.0.0.1:9",
            "--metrics-listen",
            "127.0.0.1:10",
            "--tls-client-ca",
            "root.pem",
            "--require-bridge-cert",
        ])
        .config()
        .unwrap();
        assert_eq!((cfg.batch_window_ms, cfg.time_window_ms), (50, 7));
        assert_eq!(cfg.listen.port(), 9);
        assert_eq!(cfg.metrics_listen.map(|a| a.port()), Some(10));
        let tls = cfg.tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("c.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("root.pem")));
        assert!(tls.require_bridge_cert);
        let cfg = serve_args(&["--data", data, "--tls-cert", "a.pem", "--tls-key", "b.pem"])
            .config()
            .unwrap();
        let tls = cfg.tls.unwrap();
        assert_eq!((tls.cert, tls.key), ("a.pem".into(), "b.pem".into()));
    }

    #[test]
    fn bridge_cert_flags_without_tls_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_str().unwrap();
        let err = serve_args(&["--data", data, "--require-bridge-cert"])
            .config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("need TLS"), "{err}");
        std::fs::write(dir.path().join("ca.toml"), "batch_window_ms = \"fast\"\n").unwrap();
        let err = serve_args(&["--data", data])
            .config()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ca.toml: batch_window_ms: invalid type"),
            "{err}"
        );
    }

    #[test]
    fn parses_admin_commands() {
        let cli = Cli::try_parse_from([
            "quva-ca", "group", "allow", "plant/t", "s1", "--role", "sub", "--json",
        ])
        .unwrap();
        match cli.command {
            Command::Group(GroupCmd::Allow { role, client, .. }) => {
                assert_eq!(role, RoleArg::Sub);
                assert!(client.json);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["quva-ca", "group", "allow", "g", "d"]).is_err());
    }
}
