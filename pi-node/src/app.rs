//! The commands of `quva-node`: what each does with the key store, the [`Link`] and the terminal.
//!
//! Standard output carries only the command's result (messages, replies, status); logs go to
//! standard error through `tracing` and never contain keys, secrets or payloads.

use std::path::{Path, PathBuf};

use quva_client::curve::Point;
use quva_client::enrollment::{Credentials, ENROLLMENT_SECRET_LEN, EnrollmentSecret};
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_client::message::{Direction, Protection, VerifiedMessage};
use rand_core::{OsRng, RngCore};
use serde_json::json;
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::cli::{
    AnswerArgs, Cli, Command, DEFAULT_SENSOR, EnrollArgs, OtaCommand, PublishArgs, QueryArgs,
    RunArgs, SendArgs, StatusArgs, SubscribeArgs,
};
use crate::config::{Config, DEFAULT_CONFIG_FILE};
use crate::daemon::show_direct;
use crate::direct::{DirectBook, seal_direct};
use crate::error::{CLOCK_FLOOR_MS, NodeError, rfc3339};
use crate::net::{Link, LinkConfig, LinkEvent, exchange};
use crate::store::{KeyStore, StoredGroup};
use crate::terminal::{log_event, print_line};
use quva_client::device::{Device, Enrollment, StoredGroupKey, cert_connect_auth, role_name};
use quva_daemon::now_ms;
use quva_daemon::shutdown_signal;

/// Runs a parsed command line.
///
/// # Errors
/// The command's [`NodeError`].
pub async fn run(cli: Cli) -> Result<(), NodeError> {
    let ctx = Context::load(&cli)?;
    match cli.command {
        Command::Enroll(a) => enroll(&ctx, a).await,
        Command::Renew(_) => renew(&ctx).await,
        Command::Publish(a) => publish(&ctx, a).await,
        Command::Subscribe(a) => subscribe(&ctx, a).await,
        Command::Query(a) => query(&ctx, a).await,
        Command::Answer(a) => answer(&ctx, a).await,
        Command::Status(a) => status(&ctx, a),
        Command::Send(a) => send(&ctx, a).await,
        Command::Run(a) => run_daemon(&ctx, a).await,
        Command::Ota(OtaCommand::Release(a)) => {
            let group = group_id(&a.group)?;
            let store = KeyStore::open(&ctx.store_dir)?;
            let link = ctx.open_link(false)?;
            let wait = ctx.cfg.connect_timeout() + std::time::Duration::from_secs(10);
            crate::ota_commands::release(link, store, group, &a, wait).await
        }
        Command::Ota(OtaCommand::Status(a)) => {
            let group = group_id(&a.group)?;
            let store = KeyStore::open(&ctx.store_dir)?;
            let link = ctx.open_link(false)?;
            crate::ota_commands::status(link, store, group, a.wait, a.json).await
        }
    }
}

/// Configuration with the command line's overrides.
struct Context {
    cfg: Config,
    store_dir: PathBuf,
    broker_flag: Option<String>,
}

impl Context {
    fn load(cli: &Cli) -> Result<Self, NodeError> {
        let cfg = match &cli.config {
            Some(p) => Config::load(p, true)?,
            None => Config::load(Path::new(DEFAULT_CONFIG_FILE), false)?,
        };
        let store_dir = cli.store.clone().unwrap_or_else(|| cfg.store.clone());
        Ok(Context {
            cfg,
            store_dir,
            broker_flag: cli.broker.clone(),
        })
    }

    /// The broker address: flag, configuration, or the one remembered at enrollment.
    fn broker(&self, store: Option<&KeyStore>) -> Result<String, NodeError> {
        if let Some(b) = self.broker_flag.clone().or_else(|| self.cfg.broker.clone()) {
            return Ok(b);
        }
        match store {
            Some(s) => s.broker()?.ok_or(NodeError::NoBroker),
            None => Err(NodeError::NoBroker),
        }
    }

    fn link_config(&self, address: String, persistent: bool) -> LinkConfig {
        LinkConfig {
            address,
            keep_alive: self.cfg.keep_alive(),
            connect_timeout: self.cfg.connect_timeout(),
            reconnect_max: self.cfg.reconnect_max(),
            persistent,
        }
    }

    /// The enrolled device with its stored group keys, and a link to the bridge.
    fn open_link(&self, persistent: bool) -> Result<Link, NodeError> {
        let store = KeyStore::open(&self.store_dir)?;
        let stored = store.load_credentials()?;
        let mut device = Device::new(
            stored.credentials,
            stored.ca_public,
            self.cfg.device_config(),
        );
        for stored in store.load_groups()? {
            match stored {
                StoredGroup::Key(key, _saved) => {
                    if let Err(e) = device.restore(&key) {
                        tracing::warn!(group = %key.group, error = %e, "ignoring a stored group key that does not verify; joining again");
                    }
                }
                StoredGroup::Outdated { group, role } => {
                    tracing::warn!(group = %group, ?role, "the stored group key has no key-tree path (a format before key trees); joining again");
                }
            }
        }
        let address = self.broker(Some(&store))?;
        Ok(Link::new(
            device,
            Some(store),
            self.link_config(address, persistent),
        ))
    }
}

fn device_id(text: &str) -> Result<DeviceId, NodeError> {
    DeviceId::new(text).map_err(|_| {
        NodeError::Input(format!(
            "invalid device id {text:?}: 1–64 characters of A-Z a-z 0-9 . _ -"
        ))
    })
}

fn group_id(text: &str) -> Result<GroupId, NodeError> {
    GroupId::new(text).map_err(|_| {
        NodeError::Input(format!(
            "invalid group {text:?}: an MQTT topic name of 1–128 bytes without + or #, not \
             starting with $ or quva/"
        ))
    })
}

fn protection(option: u8) -> Result<Protection, NodeError> {
    Protection::from_number(option)
        .ok_or_else(|| NodeError::Input(format!("option {option} is not 1, 2 or 3")))
}

/// Reads the enrollment secret from a file, stdin or QUVA_ENROLL_SECRET.
fn read_secret(file: Option<&Path>) -> Result<EnrollmentSecret, NodeError> {
    let text: Zeroizing<String> = match file {
        Some(p) if p == Path::new("-") => {
            let mut line = Zeroizing::new(String::new());
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| NodeError::Input(format!("cannot read the secret from stdin: {e}")))?;
            line
        }
        Some(p) => Zeroizing::new(std::fs::read_to_string(p).map_err(|e| {
            NodeError::Input(format!("cannot read the secret file {}: {e}", p.display()))
        })?),
        None => Zeroizing::new(std::env::var("QUVA_ENROLL_SECRET").map_err(|_| {
            NodeError::Input(
                "no enrollment secret: pass --secret-file PATH, --secret-file - (stdin), or set \
                 QUVA_ENROLL_SECRET"
                    .to_owned(),
            )
        })?),
    };
    let mut bytes = Zeroizing::new([0u8; ENROLLMENT_SECRET_LEN]);
    hex::decode_to_slice(text.trim(), &mut bytes[..]).map_err(|_| {
        NodeError::Input(format!(
            "the enrollment secret must be {} hex digits",
            ENROLLMENT_SECRET_LEN * 2
        ))
    })?;
    Ok(EnrollmentSecret::from_bytes(&bytes))
}

fn read_ca_key(args: &EnrollArgs) -> Result<Point, NodeError> {
    let text = match (&args.ca_key, &args.ca_key_file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => std::fs::read_to_string(p).map_err(|e| {
            NodeError::Input(format!("cannot read the CA key file {}: {e}", p.display()))
        })?,
        (None, None) => {
            return Err(NodeError::Input(
                "pass --ca-key or --ca-key-file".to_owned(),
            ));
        }
    };
    hex::decode(text.trim())
        .ok()
        .and_then(|b| Point::from_bytes(&b))
        .ok_or_else(|| {
            NodeError::Input(
                "the CA public key must be a 33-byte compressed secp256k1 point in hex (66 digits)"
                    .to_owned(),
            )
        })
}

fn random_suffix() -> String {
    format!("{:08x}", OsRng.next_u32())
}

async fn enroll(ctx: &Context, args: EnrollArgs) -> Result<(), NodeError> {
    let id = DeviceId::new(&args.id).map_err(|_| {
        NodeError::Input(format!(
            "invalid device id {:?}: 1–64 characters of A-Z a-z 0-9 . _ -",
            args.id
        ))
    })?;
    let ca_public = read_ca_key(&args)?;
    let secret = read_secret(args.secret_file.as_deref())?;
    let store = KeyStore::create(&ctx.store_dir)?;
    if store.is_enrolled() && !args.force {
        return Err(NodeError::AlreadyEnrolled(ctx.store_dir.clone()));
    }
    let now = now_ms();
    if now < CLOCK_FLOOR_MS {
        return Err(NodeError::ClockNotSet { now: rfc3339(now) });
    }
    let address = ctx.broker(None)?;
    let cfg = ctx.link_config(address.clone(), false);
    let mut rng = OsRng;
    let (enrollment, auth) = Enrollment::start(id.clone(), &secret, ca_public, now, &mut rng);
    drop(secret);
    let client_id = format!("{id}-enroll-{}", random_suffix());
    let data = exchange(&cfg, &client_id, auth).await?;
    let creds = enrollment.finish(data.as_deref())?;
    store.save_credentials(&creds, &ca_public)?;
    store.save_broker(&address)?;
    for stored in store.load_groups().unwrap_or_default() {
        let (group, role) = stored.role();
        store.remove_group_key(group, role)?;
    }
    first_use(&cfg, &creds).await;
    tracing::info!(device = %id, serial = creds.cert().serial(), "enrolled");
    println!(
        "enrolled {id}: certificate serial {}, valid until {}; credentials in {}",
        creds.cert().serial(),
        rfc3339(creds.cert().not_after()),
        ctx.store_dir.display()
    );
    Ok(())
}

async fn renew(ctx: &Context) -> Result<(), NodeError> {
    let store = KeyStore::open(&ctx.store_dir)?;
    let stored = store.load_credentials()?;
    let now = now_ms();
    crate::net::check_clock(&stored.credentials, now)?;
    let address = ctx.broker(Some(&store))?;
    let cfg = ctx.link_config(address, false);
    let mut rng = OsRng;
    let (renewal, auth) = Enrollment::renew(&stored.credentials, stored.ca_public, now, &mut rng)
        .map_err(|e| NodeError::Protocol(e.to_string()))?;
    let client_id = format!("{}-renew-{}", stored.credentials.id(), random_suffix());
    let data = exchange(&cfg, &client_id, auth).await?;
    let creds = renewal.finish(data.as_deref())?;
    store.save_credentials(&creds, &stored.ca_public)?;
    first_use(&cfg, &creds).await;
    println!(
        "renewed {}: certificate serial {}, valid until {}",
        creds.id(),
        creds.cert().serial(),
        rfc3339(creds.cert().not_after())
    );
    Ok(())
}

/// Connects once with the new certificate (`quva-cert-v1`) so that its first use reaches the CA
/// at once (PROTOCOL.md §3): that spends the enrollment secret, or revokes the certificate a
/// renewal replaced. The credentials are already saved; if this connection fails, the next one
/// is the first use instead.
async fn first_use(cfg: &LinkConfig, creds: &Credentials) {
    let client_id = format!("{}-first-use-{}", creds.id(), random_suffix());
    let auth = match cert_connect_auth(creds, &client_id, now_ms(), &mut OsRng) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "cannot prove the new certificate");
            return;
        }
    };
    match exchange(cfg, &client_id, auth).await {
        Ok(_) => tracing::info!(serial = creds.cert().serial(), "certificate in use"),
        Err(e) => tracing::warn!(
            error = %e,
            "first connection with the new certificate failed; the next connection confirms it"
        ),
    }
}

/// A source of readings for `publish --every` and `answer`.
#[derive(Clone, Debug)]
enum Reading {
    Sensor(PathBuf),
    Command(String),
    Text(String),
}

impl Reading {
    async fn read(&self, query: Option<&VerifiedMessage>) -> Result<Zeroizing<Vec<u8>>, NodeError> {
        match self {
            Reading::Text(t) => Ok(Zeroizing::new(t.as_bytes().to_vec())),
            Reading::Sensor(p) => read_sensor(p).map(|s| Zeroizing::new(s.into_bytes())),
            Reading::Command(cmd) => run_command(cmd, query).await,
        }
    }
}

/// Reads a sysfs-style file; a thermal zone's millidegrees become degrees Celsius.
fn read_sensor(path: &Path) -> Result<String, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let hint = if path == Path::new(DEFAULT_SENSOR) {
            " (no CPU temperature sensor here: is this a Raspberry Pi? use --sensor PATH or \
             --command CMD)"
        } else {
            ""
        };
        NodeError::Reading(format!("cannot read {}: {e}{hint}", path.display()))
    })?;
    let text = text.trim();
    let thermal = path.to_string_lossy().contains("thermal");
    match text.parse::<i64>() {
        Ok(milli) if thermal => Ok(format!("{:.1}", milli as f64 / 1000.0)),
        _ => Ok(text.to_owned()),
    }
}

async fn run_command(
    cmd: &str,
    query: Option<&VerifiedMessage>,
) -> Result<Zeroizing<Vec<u8>>, NodeError> {
    use tokio::io::AsyncWriteExt as _;
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(q) = query {
        c.env("QUVA_QUERY_SENDER", q.sender().as_str())
            .env("QUVA_QUERY_OPTION", q.protection().number().to_string())
            .env("QUVA_GROUP", q.group().as_str());
    }
    let mut child = c
        .spawn()
        .map_err(|e| NodeError::Reading(format!("cannot run {cmd:?}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        if let Some(q) = query {
            let _ = stdin.write_all(q.payload()).await;
        }
        drop(stdin);
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| NodeError::Reading(format!("{cmd:?} failed: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(NodeError::Reading(format!(
            "{cmd:?} exited with {}: {}",
            out.status,
            err.trim()
        )));
    }
    let mut bytes = out.stdout;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(Zeroizing::new(bytes))
}

/// Publishes and waits for each message's acknowledgement; counts drops.
struct Acks {
    dropped: usize,
    last_code: u8,
}

impl Acks {
    fn new() -> Self {
        Acks {
            dropped: 0,
            last_code: 0,
        }
    }

    fn note(&mut self, ev: &LinkEvent) {
        if let LinkEvent::Refused { code, .. } = ev {
            self.dropped += 1;
            self.last_code = *code;
        }
    }

    fn result(&self) -> Result<(), NodeError> {
        if self.dropped == 0 {
            Ok(())
        } else {
            Err(NodeError::Dropped {
                count: self.dropped,
                code: self.last_code,
            })
        }
    }
}

async fn publish(ctx: &Context, args: PublishArgs) -> Result<(), NodeError> {
    let group = group_id(&args.group)?;
    let prot = protection(args.option)?;
    let periodic = args.every;
    let mut link = ctx.open_link(periodic.is_some())?;
    link.want(group.clone(), Role::Publisher, false);
    let mut acks = Acks::new();
    match (periodic, args.message.as_deref()) {
        (None, Some(m)) if m != "-" => {
            let id = link.publish(
                group,
                prot,
                Direction::Forward,
                Zeroizing::new(m.as_bytes().to_vec()),
            );
            loop {
                let ev = link.next().await?;
                log_event(&ev);
                acks.note(&ev);
                match ev {
                    LinkEvent::Delivered { id: d } | LinkEvent::Refused { id: d, .. }
                        if d == id =>
                    {
                        break;
                    }
                    _ => {}
                }
            }
        }
        (None, _) => {
            let (tx, mut rx) = mpsc::channel::<Zeroizing<Vec<u8>>>(64);
            std::thread::spawn(move || {
                for line in std::io::stdin().lines() {
                    let Ok(line) = line else { break };
                    if tx.blocking_send(Zeroizing::new(line.into_bytes())).is_err() {
                        break;
                    }
                }
            });
            let mut open = true;
            while open || link.unacknowledged() > 0 {
                tokio::select! {
                    line = rx.recv(), if open => match line {
                        Some(l) => {
                            link.publish(group.clone(), prot, Direction::Forward, l);
                        }
                        None => open = false,
                    },
                    ev = link.next() => {
                        let ev = ev?;
                        log_event(&ev);
                        acks.note(&ev);
                    }
                    () = shutdown_signal() => break,
                }
            }
        }
        (Some(every), _) => {
            let source = match (&args.command, &args.sensor) {
                (Some(c), _) => Reading::Command(c.clone()),
                (None, Some(p)) => Reading::Sensor(p.clone()),
                (None, None) => Reading::Sensor(PathBuf::from(DEFAULT_SENSOR)),
            };
            // Fail before connecting if the source does not work at all.
            source.read(None).await?;
            let mut timer = tokio::time::interval(every);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sent = 0u64;
            let limit = args.count.unwrap_or(u64::MAX);
            let shutdown = shutdown_signal();
            tokio::pin!(shutdown);
            while sent < limit || link.unacknowledged() > 0 {
                tokio::select! {
                    _ = timer.tick(), if sent < limit => {
                        match source.read(None).await {
                            Ok(v) => {
                                link.publish(group.clone(), prot, Direction::Forward, v);
                                sent += 1;
                            }
                            Err(e) => tracing::warn!(error = %e, "reading failed"),
                        }
                    }
                    ev = link.next() => {
                        let ev = ev?;
                        log_event(&ev);
                        acks.note(&ev);
                    }
                    () = &mut shutdown => break,
                }
            }
        }
    }
    link.disconnect().await;
    acks.result()
}

/// One message as a line of text or JSON.
fn render(m: &VerifiedMessage, json_out: bool) -> String {
    let anonymous = m.protection() == Protection::Anonymous;
    let text = std::str::from_utf8(m.payload()).ok();
    if json_out {
        let mut v = json!({
            "group": m.group().as_str(),
            "option": m.protection().number(),
            "direction": if m.direction() == Direction::Query { "query" } else { "forward" },
            "epoch": m.epoch().0,
            "t_ms": m.t_ms(),
            "sender": m.sender().as_str(),
            "anonymous": anonymous,
        });
        match text {
            Some(t) => v["payload"] = json!(t),
            None => v["payload_hex"] = json!(hex::encode(m.payload())),
        }
        v.to_string()
    } else {
        let payload = match text {
            Some(t) => t.to_owned(),
            None => format!("hex:{}", hex::encode(m.payload())),
        };
        let sender = if anonymous {
            format!("{} (anonymous to the bridge)", m.sender())
        } else {
            m.sender().to_string()
        };
        format!(
            "[{}] option {} from {}: {}",
            m.group(),
            m.protection().number(),
            sender,
            payload
        )
    }
}

async fn subscribe(ctx: &Context, args: SubscribeArgs) -> Result<(), NodeError> {
    let group = group_id(&args.group)?;
    let mut link = ctx.open_link(true)?;
    link.want(group, Role::Subscriber, true);
    // Direct messages to this device are shown too (not counted in --count).
    let store = KeyStore::open(&ctx.store_dir)?;
    let mut book = DirectBook::load(&store)?;
    link.watch(quva_client::topics::direct(link.device().id()));
    let limit = args.count.unwrap_or(u64::MAX);
    let mut seen = 0u64;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    while seen < limit {
        tokio::select! {
            ev = link.next() => {
                let ev = ev?;
                log_event(&ev);
                match ev {
                    LinkEvent::Message(m) => {
                        print_line(&render(&m, args.json))?;
                        seen += 1;
                    }
                    LinkEvent::Publish { topic, payload, .. } => {
                        // An OTA key is not printed; subscribe has no OTA agent to hand it to.
                        let _ = show_direct(link.device(), &mut book, &store, &topic, &payload, args.json)?;
                    }
                    LinkEvent::Removed { group, role: Role::Subscriber, epoch } => {
                        link.disconnect().await;
                        return Err(NodeError::Removed {
                            group: group.to_string(),
                            role: "subscriber",
                            epoch: epoch.0,
                        });
                    }
                    _ => {}
                }
            }
            () = &mut shutdown => break,
        }
    }
    link.disconnect().await;
    Ok(())
}

async fn query(ctx: &Context, args: QueryArgs) -> Result<(), NodeError> {
    let group = group_id(&args.group)?;
    let prot = protection(args.option)?;
    let mut link = ctx.open_link(false)?;
    link.want(group.clone(), Role::Subscriber, true);
    let id = link.publish(
        group,
        prot,
        Direction::Query,
        Zeroizing::new(args.message.into_bytes()),
    );
    let mut acks = Acks::new();
    let limit = args.count.unwrap_or(u64::MAX);
    let mut replies = 0u64;
    let mut deadline: Option<tokio::time::Instant> = None;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = link.next() => {
                let ev = ev?;
                log_event(&ev);
                acks.note(&ev);
                match ev {
                    LinkEvent::Delivered { id: d } if d == id => {
                        deadline = Some(tokio::time::Instant::now() + args.wait);
                    }
                    LinkEvent::Refused { id: d, .. } if d == id => break,
                    LinkEvent::Message(m) if m.direction() == Direction::Forward => {
                        print_line(&render(&m, args.json))?;
                        replies += 1;
                        if replies >= limit {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            () = sleep => break,
            () = &mut shutdown => break,
        }
    }
    link.disconnect().await;
    acks.result()?;
    if replies == 0 {
        tracing::warn!("no reply within {:?}", args.wait);
    }
    Ok(())
}

async fn answer(ctx: &Context, args: AnswerArgs) -> Result<(), NodeError> {
    let group = group_id(&args.group)?;
    let forced = args.option.map(protection).transpose()?;
    let source = match (&args.reply, &args.command, &args.sensor) {
        (Some(t), _, _) => Reading::Text(t.clone()),
        (None, Some(c), _) => Reading::Command(c.clone()),
        (None, None, Some(p)) => Reading::Sensor(p.clone()),
        (None, None, None) => Reading::Sensor(PathBuf::from(DEFAULT_SENSOR)),
    };
    if matches!(source, Reading::Sensor(_)) {
        source.read(None).await?;
    }
    let mut link = ctx.open_link(true)?;
    link.want(group.clone(), Role::Publisher, true);
    let limit = args.count.unwrap_or(u64::MAX);
    let mut answered = 0u64;
    let mut acks = Acks::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    while answered < limit || link.unacknowledged() > 0 {
        tokio::select! {
            ev = link.next() => {
                let ev = ev?;
                log_event(&ev);
                acks.note(&ev);
                if let LinkEvent::Message(q) = ev
                    && q.direction() == Direction::Query
                    && answered < limit
                {
                    match source.read(Some(&q)).await {
                        Ok(reply) => {
                            let prot = forced.unwrap_or(q.protection());
                            link.publish(group.clone(), prot, Direction::Forward, reply);
                            answered += 1;
                            let line = if args.json {
                                render(&q, true)
                            } else {
                                format!("answered {}", render(&q, false))
                            };
                            print_line(&line)?;
                        }
                        Err(e) => tracing::warn!(error = %e, "no reply"),
                    }
                }
            }
            () = &mut shutdown => break,
        }
    }
    link.disconnect().await;
    acks.result()
}

/// The groups and roles whose keys the store holds: all of them, or those of `group`.
fn held_roles(
    store: &KeyStore,
    group: Option<&GroupId>,
) -> Result<Vec<(GroupId, Role)>, NodeError> {
    let mut roles: Vec<(GroupId, Role)> = store
        .load_groups()?
        .iter()
        .map(|g| {
            let (group, role) = g.role();
            (group.clone(), role)
        })
        .filter(|(g, _)| group.is_none_or(|want| want == g))
        .collect();
    roles.sort();
    roles.dedup();
    Ok(roles)
}

async fn send(ctx: &Context, args: SendArgs) -> Result<(), NodeError> {
    let to = device_id(&args.to)?;
    let group = args.group.as_deref().map(group_id).transpose()?;
    let store = KeyStore::open(&ctx.store_dir)?;
    let roles = held_roles(&store, group.as_ref())?;
    if roles.is_empty() {
        return Err(NodeError::Input(match &group {
            Some(g) => format!(
                "this device holds no key of {g}: its member list gives the recipient's \
                 certificate, so join it first (quva-node publish or subscribe)"
            ),
            None => "this device is in no group yet: the recipient's certificate comes from \
                     the member list of a group both belong to (join one first)"
                .to_owned(),
        }));
    }
    let mut link = ctx.open_link(false)?;
    for (g, r) in &roles {
        link.want(g.clone(), *r, false);
    }
    let wait = ctx.cfg.connect_timeout() + std::time::Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + wait;
    let listing = loop {
        let now = now_ms();
        if let Some((g, _)) = roles
            .iter()
            .find(|(g, _)| link.device().member_key(g, &to, now).is_some())
        {
            break g.clone();
        }
        let all_known = roles.iter().all(|(g, r)| {
            link.is_ready(g, *r)
                && link.device().member_list(g).is_some_and(|l| {
                    link.device()
                        .keyring(g, *r)
                        .is_some_and(|k| l.epoch() >= k.epoch())
                })
        });
        if all_known {
            link.disconnect().await;
            let names: Vec<String> = roles.iter().map(|(g, _)| g.to_string()).collect();
            return Err(NodeError::Input(format!(
                "{to} is not listed with a valid certificate in the member list of {}",
                names.join(", ")
            )));
        }
        tokio::select! {
            ev = link.next() => {
                let ev = ev?;
                log_event(&ev);
            }
            () = tokio::time::sleep_until(deadline) => {
                link.disconnect().await;
                return Err(NodeError::Lost(format!(
                    "no member list listing {to} arrived within {}s", wait.as_secs()
                )));
            }
        }
    };
    let mut book = DirectBook::load(&store)?;
    let (topic, bytes, t_ms) = seal_direct(
        link.device(),
        &mut book,
        &listing,
        &to,
        args.message.as_bytes(),
        now_ms(),
        &mut OsRng,
    )
    .map_err(|e| NodeError::Protocol(e.to_string()))?;
    // T_ms is durable before the message leaves: a crash cannot reuse it.
    book.save(&store)?;
    let id = link.publish_raw(topic, bytes, false);
    let mut acks = Acks::new();
    loop {
        let ev = link.next().await?;
        log_event(&ev);
        acks.note(&ev);
        match ev {
            LinkEvent::Delivered { id: d } | LinkEvent::Refused { id: d, .. } if d == id => break,
            _ => {}
        }
    }
    link.disconnect().await;
    acks.result()?;
    print_line(&format!(
        "sent a direct message to {to} (t_ms {t_ms}; certificate from the member list of {listing})"
    ))
}

/// `run`: the daemon.
async fn run_daemon(ctx: &Context, args: RunArgs) -> Result<(), NodeError> {
    let store = KeyStore::open(&ctx.store_dir)?;
    let roles = held_roles(&store, None)?;
    // Groups in [ota]: the device side of group OTA, its files under the effective store.
    let ota_settings = ctx
        .cfg
        .ota
        .settings(&ctx.store_dir)
        .map_err(NodeError::Input)?;
    let ota = if ota_settings.groups.is_empty() {
        None
    } else {
        Some(crate::ota_device::OtaService::new(
            &ota_settings,
            args.json,
        )?)
    };
    let link = ctx.open_link(true)?;
    crate::daemon::run(link, store, roles, args.json, ota).await
}

fn status(ctx: &Context, args: StatusArgs) -> Result<(), NodeError> {
    let store = KeyStore::open(&ctx.store_dir)?;
    let stored = store.load_credentials()?;
    let creds = &stored.credentials;
    let cert = creds.cert();
    let now = now_ms();
    let broker = ctx.broker(Some(&store)).ok();
    let files = store.load_groups()?;
    let groups: Vec<(&StoredGroupKey, u64)> = files
        .iter()
        .filter_map(|f| match f {
            StoredGroup::Key(k, saved) => Some((k.as_ref(), *saved)),
            StoredGroup::Outdated { .. } => None,
        })
        .collect();
    let outdated: Vec<(&GroupId, Role)> = files
        .iter()
        .filter(|f| matches!(f, StoredGroup::Outdated { .. }))
        .map(StoredGroup::role)
        .collect();
    let ota_settings = ctx
        .cfg
        .ota
        .settings(&ctx.store_dir)
        .map_err(NodeError::Input)?;
    let ota = crate::ota_commands::ota_summary(&ota_settings, &store)?;
    let state = if now < cert.not_before() {
        "not yet valid"
    } else if now > cert.not_after() {
        "expired"
    } else {
        "valid"
    };
    if args.json {
        let outdated: Vec<_> = outdated
            .iter()
            .map(|(group, role)| json!({ "group": group.as_str(), "role": role_name(*role) }))
            .collect();
        let groups: Vec<_> = groups
            .iter()
            .map(|(k, saved)| {
                let info = k.signed_info.info_unverified();
                json!({
                    "group": k.group.as_str(),
                    "role": role_name(k.role),
                    "epoch": info.epoch.0,
                    "publishers": info.n_pub,
                    "subscribers": info.n_sub,
                    "anonymous": info.privacy == quva_client::group::Privacy::Anonymous,
                    "saved_ms": saved,
                })
            })
            .collect();
        let v = json!({
            "device": creds.id().as_str(),
            "certificate": {
                "serial": cert.serial(),
                "not_before_ms": cert.not_before(),
                "not_after_ms": cert.not_after(),
                "state": state,
                "public_key": hex::encode(creds.key().public().to_bytes()),
            },
            "ca_public_key": hex::encode(stored.ca_public.to_bytes()),
            "broker": broker,
            "store": ctx.store_dir.display().to_string(),
            "groups": groups,
            "outdated_group_keys": outdated,
            "ota": ota.to_json(),
        });
        return print_line(&v.to_string());
    }
    let mut lines = vec![
        format!("device      {}", creds.id()),
        format!(
            "certificate serial {}, {state}, {} .. {}",
            cert.serial(),
            rfc3339(cert.not_before()),
            rfc3339(cert.not_after())
        ),
        format!(
            "public key  {}",
            hex::encode(creds.key().public().to_bytes())
        ),
        format!("CA key      {}", hex::encode(stored.ca_public.to_bytes())),
        format!("broker      {}", broker.as_deref().unwrap_or("(not set)")),
        format!("store       {}", ctx.store_dir.display()),
    ];
    if groups.is_empty() && outdated.is_empty() {
        lines.push("groups      (none joined yet)".to_owned());
    }
    for (k, saved) in &groups {
        let info = k.signed_info.info_unverified();
        lines.push(format!(
            "group       {} as {}: epoch {}, {} publisher(s), {} subscriber(s), key saved {}",
            k.group,
            role_name(k.role),
            info.epoch,
            info.n_pub,
            info.n_sub,
            rfc3339(*saved)
        ));
    }
    for (group, role) in &outdated {
        lines.push(format!(
            "group       {group} as {}: stored key without its key-tree path (an older format); \
             the device joins again when it next connects",
            role_name(*role)
        ));
    }
    lines.extend(ota.lines());
    print_line(&lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensor_readings() {
        let dir = tempfile::tempdir().unwrap();
        let thermal = dir.path().join("thermal_zone0-temp");
        std::fs::write(&thermal, "48312\n").unwrap();
        assert_eq!(read_sensor(&thermal).unwrap(), "48.3");
        let other = dir.path().join("humidity");
        std::fs::write(&other, " 41 %\n").unwrap();
        assert_eq!(read_sensor(&other).unwrap(), "41 %");
        let err = read_sensor(Path::new(DEFAULT_SENSOR)).map(|_| ());
        if let Err(e) = err {
            assert!(e.to_string().contains("Raspberry Pi"), "{e}");
        }
    }

    #[test]
    fn secrets_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, format!("{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(read_secret(Some(&f)).unwrap().as_bytes(), &[0xab; 32]);
        std::fs::write(&f, "abcd").unwrap();
        let err = read_secret(Some(&f)).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }

    #[tokio::test]
    async fn commands_as_readings() {
        let r = Reading::Command("printf '21.5\\n'".to_owned());
        assert_eq!(&*r.read(None).await.unwrap(), b"21.5");
        let bad = Reading::Command("echo oops >&2; exit 3".to_owned());
        let err = bad.read(None).await.map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("oops"), "{err}");
    }
}
