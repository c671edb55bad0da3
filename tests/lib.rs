//! Support for Quva's end-to-end tests: a whole deployment as real processes on free loopback
//! ports — Mosquitto (`/usr/sbin/mosquitto` with a generated configuration), `quva-ca` (`init`
//! and `serve` on a temporary data directory), `quva-bridge` in front of Mosquitto, and
//! `quva-node` devices with their own key stores.
//!
//! Every process is killed when its guard drops; every wait has a deadline, so a broken build
//! fails the test instead of hanging it. The binaries are taken from the target directory the
//! test runs from and built with `cargo build` when missing.
//!
//! # Usage
//! ```no_run
//! let cluster = quva_tests::Cluster::start(&["plant/#"]);
//! let secret = cluster.register("sensor-01");
//! cluster.create_group("plant/line-1");
//! cluster.allow("plant/line-1", "sensor-01", "pub");
//! let node = cluster.node("sensor-01");
//! node.enroll(&secret).success();
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod balancer;
pub mod ejabberd;
pub mod mqtt5;
pub mod offline;
pub mod raw;

use std::fs;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long any single step may take before the test fails.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The three binaries under test.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `quva-ca`.
    pub ca: PathBuf,
    /// `quva-bridge`.
    pub bridge: PathBuf,
    /// `quva-node`.
    pub node: PathBuf,
}

impl Binaries {
    /// Finds the binaries next to the running test (`target/<profile>/`), building them first if
    /// one is missing. `QUVA_BIN_DIR` names another directory holding all three.
    pub fn locate() -> Self {
        if let Some(dir) = std::env::var_os("QUVA_BIN_DIR") {
            let dir = PathBuf::from(dir);
            return Binaries {
                ca: dir.join("quva-ca"),
                bridge: dir.join("quva-bridge"),
                node: dir.join("quva-node"),
            };
        }
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/e2e-<hash>, or target/<profile>/<binary> for a program
        // (quva-bench) that uses this harness.
        let mut dir = exe.parent().unwrap().to_path_buf();
        if dir.file_name().and_then(|n| n.to_str()) == Some("deps") {
            dir.pop();
        }
        let bins = Binaries {
            ca: dir.join("quva-ca"),
            bridge: dir.join("quva-bridge"),
            node: dir.join("quva-node"),
        };
        if ![&bins.ca, &bins.bridge, &bins.node]
            .iter()
            .all(|p| p.exists())
        {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let mut cmd = Command::new(cargo);
            cmd.args([
                "build",
                "-p",
                "quva-ca",
                "-p",
                "quva-bridge",
                "-p",
                "quva-node",
            ]);
            if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("cargo must run");
            assert!(status.success(), "building the binaries failed");
        }
        bins
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_port(addr: SocketAddr, child: &mut Child, what: &str) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status} before listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on {addr}");
}

static NEXT_LOG: AtomicUsize = AtomicUsize::new(0);

/// A running process, killed on drop, with stdout and stderr captured to files.
#[derive(Debug)]
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Its name, for messages.
    pub name: String,
    /// Its standard output.
    pub stdout: PathBuf,
    /// Its standard error.
    pub stderr: PathBuf,
}

impl Proc {
    /// Starts `cmd` with output captured under `logs`.
    pub fn spawn(mut cmd: Command, name: &str, logs: &Path) -> Self {
        let n = NEXT_LOG.fetch_add(1, Ordering::Relaxed);
        let file: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let stdout = logs.join(format!("{n:03}-{file}.out"));
        let stderr = logs.join(format!("{n:03}-{file}.err"));
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.to_owned(),
            stdout,
            stderr,
        }
    }

    /// Standard output so far.
    pub fn out(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Standard error so far, without terminal color codes.
    pub fn err(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.stderr).unwrap_or_default())
    }

    /// Waits until standard error contains `needle` (a log line), or fails.
    pub fn wait_stderr(&mut self, needle: &str) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while Instant::now() < deadline {
            if self.err().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before logging {needle:?}\nstdout:\n{}\nstderr:\n{}",
                    self.name,
                    self.out(),
                    self.err()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not log {needle:?}\nstderr:\n{}",
            self.name,
            self.err()
        );
    }

    /// Waits until standard error contains `needle` at least `n` times, or fails.
    pub fn wait_stderr_count(&mut self, needle: &str, n: usize) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while Instant::now() < deadline {
            if self.err().matches(needle).count() >= n {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before logging {needle:?} {n} times\nstderr:\n{}",
                    self.name,
                    self.err()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not log {needle:?} {n} times\nstderr:\n{}",
            self.name,
            self.err()
        );
    }

    /// Whether this `quva-node` process logged a rekey (or a join) to `epoch`.
    pub fn holds_epoch(&self, epoch: u64) -> bool {
        let token = format!("epoch={epoch}");
        self.err().lines().any(|l| {
            (l.contains("rekeyed") || l.contains("joined") || l.contains("group key adopted"))
                && l.split_whitespace().any(|w| w == token)
        })
    }

    /// Waits until this `quva-node` process holds the key of `epoch` (see
    /// [`Proc::holds_epoch`]), or fails.
    pub fn wait_epoch(&mut self, epoch: u64) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !self.holds_epoch(epoch) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before reaching epoch {epoch}\nstderr:\n{}",
                    self.name,
                    self.err()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not reach epoch {epoch}\nstderr:\n{}",
                self.name,
                self.err()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until standard output contains `needle`, or fails.
    pub fn wait_stdout(&mut self, needle: &str) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while Instant::now() < deadline {
            if self.out().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before printing {needle:?}\nstdout:\n{}\nstderr:\n{}",
                    self.name,
                    self.out(),
                    self.err()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not print {needle:?}\nstdout:\n{}\nstderr:\n{}",
            self.name,
            self.out(),
            self.err()
        );
    }

    /// Waits for the process to exit.
    pub fn wait(mut self) -> Finished {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Finished {
                    name: self.name.clone(),
                    status,
                    stdout: self.out(),
                    stderr: self.err(),
                };
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "{} did not finish\nstdout:\n{}\nstderr:\n{}",
                    self.name,
                    self.out(),
                    self.err()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A finished process.
#[derive(Debug)]
pub struct Finished {
    /// Its name.
    pub name: String,
    /// Its exit status.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Finished {
    /// Asserts success; returns standard output.
    pub fn success(self) -> String {
        assert!(
            self.status.success(),
            "{} failed with {}\nstdout:\n{}\nstderr:\n{}",
            self.name,
            self.status,
            self.stdout,
            self.stderr
        );
        self.stdout
    }

    /// Asserts failure; returns standard error.
    pub fn failure(self) -> String {
        assert!(
            !self.status.success(),
            "{} succeeded unexpectedly\nstdout:\n{}",
            self.name,
            self.stdout
        );
        self.stderr
    }

    /// The JSON lines of standard output.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }
}

/// Mosquitto, the CA and the bridge, on free loopback ports in a temporary directory.
#[derive(Debug)]
pub struct Cluster {
    /// The binaries.
    pub bins: Binaries,
    /// The temporary root (data directories, key stores, logs).
    pub dir: tempfile::TempDir,
    /// The CA's data directory.
    pub ca_data: PathBuf,
    /// The CA's gRPC URL.
    pub ca_url: String,
    /// Q_CA in hex.
    pub ca_public: String,
    /// The bridge's address.
    pub bridge: SocketAddr,
    /// The broker's address (Mosquitto's, or [`Options::upstream`]'s).
    pub broker: SocketAddr,
    /// Mosquitto, unless the bridge uses another broker ([`Options::upstream`]).
    mosquitto: Option<Proc>,
    mosquitto_conf: PathBuf,
    ca: Proc,
    ca_listen: SocketAddr,
    ca_flags: Vec<String>,
    /// The root of the CA's TLS certificate, when the CA serves TLS.
    ca_tls_root: Option<PathBuf>,
    bridge_conf: PathBuf,
    bridge_proc: Proc,
    /// The bridge configuration after `[upstream]`: the CA, the topics and extra settings
    /// (shared by every bridge of the cluster).
    bridge_common: String,
}

/// A broker that the bridge uses instead of its own Mosquitto, with the bridge's credentials.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The broker's MQTT address.
    pub address: SocketAddr,
    /// The bridge's user name there.
    pub username: String,
    /// Its password.
    pub password: String,
}

impl Upstream {
    /// The bridge configuration's `[upstream]` table, with the notice connection's client ID.
    fn toml(&self, client_id: &str) -> String {
        format!(
            "[upstream]\naddress = \"{}\"\nusername = {:?}\npassword = {:?}\nclient_id = {client_id:?}\n",
            self.address, self.username, self.password
        )
    }
}

/// Another bridge of the same [`Cluster`] (same CA and topics), in front of another broker.
#[derive(Debug)]
pub struct ExtraBridge {
    /// Its listening address.
    pub addr: SocketAddr,
    /// The process.
    pub proc: Proc,
}

/// Settings of a [`Cluster`] beyond the protected topics.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Extra flags of `quva-ca serve` (e.g. `--time-window-ms 5000`).
    pub ca_flags: Vec<String>,
    /// Extra TOML appended to the bridge configuration after its `[topics]` table (e.g. a
    /// `[windows]` table).
    pub bridge_toml: String,
    /// The CA serves TLS and requires a bridge client certificate (no bridge token is used).
    pub mutual_tls: bool,
    /// Use this broker instead of starting Mosquitto.
    pub upstream: Option<Upstream>,
}

/// TLS files for a CA that requires bridge client certificates: `--tls-*` flags for
/// `quva-ca serve`, the `[ca]` TLS lines for the bridge, and the server root for admin commands.
fn mutual_tls_files(dir: &Path) -> (Vec<String>, String, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
    };
    let dir = dir.join("tls");
    fs::create_dir_all(&dir).unwrap();
    let root = |name: &str| {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}.pem"));
        fs::write(&path, cert.pem()).unwrap();
        (cert, key, path)
    };
    let leaf = |name: &str, issuer: &(rcgen::Certificate, KeyPair, PathBuf), server: bool| {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        if server {
            params
                .subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
        }
        let cert = params.signed_by(&key, &issuer.0, &issuer.1).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        fs::write(&cert_path, cert.pem()).unwrap();
        fs::write(&key_path, key.serialize_pem()).unwrap();
        fs::set_permissions(
            &key_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        (cert_path, key_path)
    };
    let server_root = root("server-root");
    let bridge_root = root("bridge-root");
    let (server_cert, server_key) = leaf("server", &server_root, true);
    let (bridge_cert, bridge_key) = leaf("bridge", &bridge_root, false);
    let path = |p: &Path| p.display().to_string();
    let flags = vec![
        "--tls-cert".to_owned(),
        path(&server_cert),
        "--tls-key".to_owned(),
        path(&server_key),
        "--tls-client-ca".to_owned(),
        path(&bridge_root.2),
        "--require-bridge-cert".to_owned(),
    ];
    let bridge_toml = format!(
        "ca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        path(&server_root.2),
        path(&bridge_cert),
        path(&bridge_key)
    );
    (flags, bridge_toml, server_root.2)
}

impl Cluster {
    /// Starts the broker, the CA and the bridge, protecting the given topic filters.
    pub fn start(protected: &[&str]) -> Self {
        Self::start_with(protected, &Options::default())
    }

    /// As [`Cluster::start`], with extra CA flags and bridge settings.
    pub fn start_with(protected: &[&str], options: &Options) -> Self {
        let bins = Binaries::locate();
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        fs::create_dir_all(&logs).unwrap();

        let (mosquitto, broker, mosquitto_conf) = match &options.upstream {
            Some(up) => (None, up.address, PathBuf::new()),
            None => {
                let (p, addr, conf) = start_mosquitto(dir.path(), &logs);
                (Some(p), addr, conf)
            }
        };

        let ca_data = dir.path().join("ca");
        let out = run(
            Command::new(&bins.ca)
                .args(["init", "--data"])
                .arg(&ca_data),
            "quva-ca init",
            &logs,
        )
        .success();
        assert!(out.contains("CA public key"), "{out}");
        let ca_public = fs::read_to_string(ca_data.join("ca.pub"))
            .unwrap()
            .trim()
            .to_owned();

        let mut ca_flags = options.ca_flags.clone();
        // How the bridge authenticates to the CA: the bridge token, or a client certificate.
        let (ca_auth, ca_tls_root) = if options.mutual_tls {
            let (flags, bridge_toml, root) = mutual_tls_files(dir.path());
            ca_flags.extend(flags);
            (bridge_toml, Some(root))
        } else {
            let token = ca_data.join("bridge.token");
            (format!("token_file = \"{}\"\n", token.display()), None)
        };
        let ca_port = free_port();
        let ca_addr: SocketAddr = format!("127.0.0.1:{ca_port}").parse().unwrap();
        let ca = spawn_ca(&bins, &ca_data, ca_addr, &ca_flags, &logs);
        let scheme = if options.mutual_tls { "https" } else { "http" };
        let ca_url = format!("{scheme}://{ca_addr}");

        let bridge_port = free_port();
        let bridge: SocketAddr = format!("127.0.0.1:{bridge_port}").parse().unwrap();
        let filters: Vec<String> = protected.iter().map(|f| format!("{f:?}")).collect();
        let conf = dir.path().join("bridge.toml");
        let bridge_common = format!(
            "[ca]\nendpoint = \"{ca_url}\"\npublic_key = \"{ca_public}\"\n{ca_auth}\
             [topics]\nprotected = [{}]\n{}\n",
            filters.join(", "),
            options.bridge_toml,
        );
        let upstream = match &options.upstream {
            Some(up) => up.toml("qb-bridge-0"),
            None => format!("[upstream]\naddress = \"{broker}\"\n"),
        };
        fs::write(
            &conf,
            format!("listen = \"{bridge}\"\n{upstream}{bridge_common}"),
        )
        .unwrap();
        let bridge_proc = spawn_bridge(&bins, &conf, bridge, &logs);

        Cluster {
            bins,
            ca_data,
            ca_url,
            ca_public,
            bridge,
            broker,
            mosquitto,
            mosquitto_conf,
            ca,
            ca_listen: ca_addr,
            ca_flags,
            ca_tls_root,
            bridge_conf: conf,
            bridge_proc,
            bridge_common,
            dir,
        }
    }

    /// Starts another bridge with this cluster's CA and topics in front of `upstream` (for
    /// several bridges on a clustered broker); `n` names it (`qb-bridge-<n>` upstream).
    pub fn add_bridge(&self, upstream: &Upstream, n: usize) -> ExtraBridge {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let conf = self.dir.path().join(format!("bridge-{n}.toml"));
        fs::write(
            &conf,
            format!(
                "listen = \"{addr}\"\n{}{}",
                upstream.toml(&format!("qb-bridge-{n}")),
                self.bridge_common
            ),
        )
        .unwrap();
        let proc = spawn_bridge(&self.bins, &conf, addr, &self.logs());
        ExtraBridge { addr, proc }
    }

    /// A device (as [`Cluster::node`]) that connects to `bridge` instead of the first bridge.
    pub fn node_via(&self, name: &str, bridge: SocketAddr) -> Node {
        Node {
            bridge,
            ..self.node(name)
        }
    }

    /// The log directory.
    pub fn logs(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// Runs an admin command of `quva-ca` with `--json` and returns its output.
    pub fn admin(&self, args: &[&str]) -> serde_json::Value {
        let mut cmd = Command::new(&self.bins.ca);
        cmd.args(args)
            .args(["--server", &self.ca_url, "--json", "--data"])
            .arg(&self.ca_data);
        if let Some(root) = &self.ca_tls_root {
            cmd.arg("--ca-cert").arg(root);
        }
        let out = run(
            &mut cmd,
            &format!("quva-ca {}", args.join(" ")),
            &self.logs(),
        )
        .success();
        serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null)
    }

    /// Registers a device; returns its enrollment secret.
    pub fn register(&self, id: &str) -> String {
        let v = self.admin(&["device", "add", id]);
        v["enroll_secret"]
            .as_str()
            .unwrap_or_else(|| panic!("no secret in {v}"))
            .to_owned()
    }

    /// Creates a group.
    pub fn create_group(&self, group: &str) {
        self.admin(&["group", "create", group]);
    }

    /// Allows a device a role (`pub` or `sub`) in a group.
    pub fn allow(&self, group: &str, device: &str, role: &str) {
        self.admin(&["group", "allow", group, device, "--role", role]);
    }

    /// Registers `id`, allows it `role` (`pub` or `sub`) in each listed group and enrolls it.
    pub fn enrolled(&self, id: &str, roles: &[(&str, &str)]) -> Node {
        let secret = self.register(id);
        for (group, role) in roles {
            self.allow(group, id, role);
        }
        let node = self.node(id);
        node.enroll(&secret).success();
        node
    }

    /// A device with its own key store in the cluster's directory.
    pub fn node(&self, name: &str) -> Node {
        Node {
            bin: self.bins.node.clone(),
            store: self.dir.path().join("nodes").join(name),
            bridge: self.bridge,
            ca_public: self.ca_public.clone(),
            id: name.to_owned(),
            logs: self.logs(),
        }
    }

    /// Whether the three daemons still run (for diagnostics).
    pub fn alive(&mut self) -> bool {
        [
            self.mosquitto.as_mut(),
            Some(&mut self.ca),
            Some(&mut self.bridge_proc),
        ]
        .into_iter()
        .flatten()
        .all(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// Stops the CA (to test how devices and the bridge cope without it).
    pub fn stop_ca(&mut self) {
        let _ = self.ca.child.kill();
        let _ = self.ca.child.wait();
    }

    /// Starts the CA again on the same data directory and address (after [`Cluster::stop_ca`]);
    /// kills it first (SIGKILL, as a crash) if it still runs.
    pub fn restart_ca(&mut self) {
        self.stop_ca();
        self.ca = spawn_ca(
            &self.bins,
            &self.ca_data,
            self.ca_listen,
            &self.ca_flags,
            &self.logs(),
        );
    }

    /// Kills the bridge (SIGKILL) and starts it again with the same configuration and address.
    pub fn restart_bridge(&mut self) {
        let _ = self.bridge_proc.child.kill();
        let _ = self.bridge_proc.child.wait();
        self.bridge_proc = spawn_bridge(&self.bins, &self.bridge_conf, self.bridge, &self.logs());
    }

    /// Kills Mosquitto (SIGKILL; it keeps nothing, retained messages included) and starts it
    /// again on the same port.
    pub fn restart_mosquitto(&mut self) {
        let mosquitto = self
            .mosquitto
            .as_mut()
            .expect("this cluster's bridge uses another broker, not its own Mosquitto");
        let _ = mosquitto.child.kill();
        let _ = mosquitto.child.wait();
        let mut cmd = Command::new(mosquitto_exe());
        cmd.arg("-c").arg(&self.mosquitto_conf);
        let mut p = Proc::spawn(cmd, "mosquitto", &self.logs());
        wait_port(self.broker, &mut p.child, "mosquitto");
        self.mosquitto = Some(p);
    }

    /// The bridge's standard error so far (its drop log lines).
    pub fn bridge_log(&self) -> String {
        self.bridge_proc.err()
    }

    /// Waits until the group's epoch is later than `epoch`; returns the new one.
    pub fn wait_epoch_after(&self, group: &str, epoch: u64) -> u64 {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let e = self.epoch(group);
            if e > epoch {
                return e;
            }
            assert!(Instant::now() < deadline, "{group} stayed at epoch {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The current epoch of a group, from `quva-ca group show`.
    pub fn epoch(&self, group: &str) -> u64 {
        let v = self.admin(&["group", "show", group]);
        v["epoch"]
            .as_u64()
            .unwrap_or_else(|| panic!("no epoch in {v}"))
    }

    /// The daemons' logs, for failure messages (both log to stderr).
    pub fn daemon_logs(&self) -> String {
        format!(
            "--- quva-ca ---\n{}\n--- quva-bridge ---\n{}",
            self.ca.err(),
            self.bridge_proc.err()
        )
    }
}

fn spawn_ca(
    bins: &Binaries,
    data: &Path,
    listen: SocketAddr,
    flags: &[String],
    logs: &Path,
) -> Proc {
    let mut cmd = Command::new(&bins.ca);
    cmd.arg("serve");
    // A short batching window unless the test sets its own.
    if !flags.iter().any(|f| f == "--batch-window-ms") {
        cmd.args(["--batch-window-ms", "50"]);
    }
    cmd.arg("--data")
        .arg(data)
        .args(["--listen", &listen.to_string()])
        .args(flags);
    let mut ca = Proc::spawn(cmd, "quva-ca", logs);
    wait_port(listen, &mut ca.child, "quva-ca");
    ca
}

/// Starts a bridge with info logs, or the `RUST_LOG` filter in `QUVA_TEST_BRIDGE_LOG` (for
/// example `quva_bridge=debug` to see every connection while a test is investigated).
fn spawn_bridge(bins: &Binaries, conf: &Path, listen: SocketAddr, logs: &Path) -> Proc {
    let mut cmd = Command::new(&bins.bridge);
    cmd.arg("--config").arg(conf);
    cmd.env(
        "RUST_LOG",
        std::env::var("QUVA_TEST_BRIDGE_LOG").unwrap_or_else(|_| "info".to_owned()),
    );
    let mut bridge = Proc::spawn(cmd, "quva-bridge", logs);
    wait_port(listen, &mut bridge.child, "quva-bridge");
    bridge
}

fn mosquitto_exe() -> &'static str {
    ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mosquitto")
}

fn start_mosquitto(dir: &Path, logs: &Path) -> (Proc, SocketAddr, PathBuf) {
    let exe = mosquitto_exe();
    for attempt in 0..5 {
        let port = free_port();
        let conf = dir.join(format!("mosquitto-{attempt}.conf"));
        fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let mut cmd = Command::new(exe);
        cmd.arg("-c").arg(&conf);
        let mut p = Proc::spawn(cmd, "mosquitto", logs);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = p.child.try_wait() {
                break; // the port was taken: try another
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                std::thread::sleep(Duration::from_millis(100));
                if matches!(p.child.try_wait(), Ok(None)) {
                    return (p, addr, conf);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("mosquitto did not start (is it installed at /usr/sbin/mosquitto?)");
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs a command to completion.
pub fn run(cmd: &mut Command, name: &str, logs: &Path) -> Finished {
    let mut own = Command::new(cmd.get_program());
    own.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => own.env(k, v),
            None => own.env_remove(k),
        };
    }
    Proc::spawn(own, name, logs).wait()
}

/// One `quva-node` device.
#[derive(Clone, Debug)]
pub struct Node {
    /// The binary.
    pub bin: PathBuf,
    /// Its key store.
    pub store: PathBuf,
    /// The bridge.
    pub bridge: SocketAddr,
    /// Q_CA in hex.
    pub ca_public: String,
    /// Its device ID.
    pub id: String,
    logs: PathBuf,
}

impl Node {
    /// A `quva-node` command with this node's store and broker, no config file, info logs.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(self.store.with_extension("toml"))
            .arg("--store")
            .arg(&self.store)
            .args(["--broker", &self.bridge.to_string(), "-v"])
            .args(args);
        if !self.store.with_extension("toml").exists() {
            fs::create_dir_all(self.store.parent().unwrap()).unwrap();
            fs::write(
                self.store.with_extension("toml"),
                "connect_timeout_secs = 5\n",
            )
            .unwrap();
        }
        cmd
    }

    /// Runs a command to completion.
    pub fn run(&self, args: &[&str]) -> Finished {
        let name = format!("{} {}", self.id, args.first().copied().unwrap_or(""));
        Proc::spawn(self.command(args), &name, &self.logs).wait()
    }

    /// Starts a long-running command.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        let name = format!("{} {}", self.id, args.first().copied().unwrap_or(""));
        Proc::spawn(self.command(args), &name, &self.logs)
    }

    /// Starts a long-running command with debug logs of `quva-node` itself (every dropped
    /// message, replays included, is logged).
    pub fn spawn_debug(&self, args: &[&str]) -> Proc {
        let name = format!("{} {}", self.id, args.first().copied().unwrap_or(""));
        let mut cmd = self.command(args);
        cmd.env("RUST_LOG", "quva_node=debug");
        Proc::spawn(cmd, &name, &self.logs)
    }

    /// Runs `publish` of one message and returns its standard error (asserting success).
    pub fn publish(&self, group: &str, option: u8, message: &str) -> String {
        let out = self.run(&[
            "publish",
            "--group",
            group,
            "--option",
            &option.to_string(),
            message,
        ]);
        let err = out.stderr.clone();
        out.success();
        err
    }

    /// Enrolls with `secret` (written to a 0600 file, as an operator would).
    pub fn enroll(&self, secret: &str) -> Finished {
        let file = self.store.with_extension("secret");
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        let mut f = fs::File::create(&file).unwrap();
        writeln!(f, "{secret}").unwrap();
        let file = file.display().to_string();
        self.run(&[
            "enroll",
            "--id",
            &self.id,
            "--ca-key",
            &self.ca_public,
            "--secret-file",
            &file,
        ])
    }
}
