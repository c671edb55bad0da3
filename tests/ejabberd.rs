//! A clustered MQTT 5 broker for scale-out tests: ejabberd nodes (Debian's `ejabberd` package,
//! `mod_mqtt`) on free loopback ports, joined into one cluster over Erlang distribution.
//!
//! Each node runs `erl ... -s ejabberd` in the foreground as a [`Proc`] (killed when dropped,
//! SIGKILLed by [`BrokerCluster::kill`] to simulate a crash), with its configuration
//! (`scripts/scale-out/ejabberd-node.yml.in`), Mnesia directory and logs in a temporary directory.
//! One MQTT account exists, the bridges' ([`BROKER_USER`]); nothing else may connect.
//!
//! # Usage
//! ```no_run
//! if let Some(brokers) = quva_tests::ejabberd::BrokerCluster::start(2) {
//!     let first = brokers.upstream(0); // address, user name and password for a bridge
//! }
//! ```

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Proc, Upstream, free_port, run, wait_port};

/// The bridges' MQTT user name on the broker cluster (a JID of the cluster's only host).
pub const BROKER_USER: &str = "bridge@quva.test";

const NODE_CONFIG: &str = include_str!("../scripts/scale-out/ejabberd-node.yml.in");

/// Where Debian's ejabberd keeps its Erlang applications (`ERL_LIBS`): the multiarch library
/// directory holding `ejabberd-<version>/ebin/mod_mqtt.beam`.
fn libs_dir() -> Option<PathBuf> {
    let arch_dirs = fs::read_dir("/usr/lib").ok()?;
    arch_dirs.flatten().map(|d| d.path()).find(|dir| {
        fs::read_dir(dir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with("ejabberd-")
                    && e.path().join("ebin/mod_mqtt.beam").exists()
            })
        })
    })
}

/// Whether ejabberd and Erlang are installed (`scripts/common.sh` installs them as root).
pub fn installed() -> bool {
    Path::new("/usr/bin/erl").exists() && libs_dir().is_some()
}

/// One running ejabberd node.
#[derive(Debug)]
struct BrokerNode {
    proc: Proc,
    name: String,
    mqtt: SocketAddr,
}

/// Clustered ejabberd nodes; every node is killed when this is dropped.
#[derive(Debug)]
pub struct BrokerCluster {
    nodes: Vec<Option<BrokerNode>>,
    password: String,
    /// Holds the nodes' directories (configurations, Mnesia, logs).
    pub dir: tempfile::TempDir,
}

impl BrokerCluster {
    /// Starts `n` nodes, creates the bridges' account and joins every node to the first.
    /// `None` when ejabberd is not installed.
    pub fn start(n: usize) -> Option<Self> {
        if !Path::new("/usr/bin/erl").exists() {
            return None;
        }
        let libs = libs_dir()?;
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        fs::create_dir_all(&logs).unwrap();
        // Node names and the Erlang cookie are unique per cluster, so that clusters of tests
        // running at the same time never meet (they share the machine's epmd).
        let tag = free_port();
        let cookie = format!("quva-{tag}-{}", std::process::id());
        let password = format!("pw-{cookie}");
        let mut nodes = Vec::new();
        for i in 0..n {
            let port = free_port();
            let node_dir = dir.path().join(format!("node{i}"));
            fs::create_dir_all(&node_dir).unwrap();
            let config = node_dir.join("ejabberd.yml");
            fs::write(
                &config,
                NODE_CONFIG
                    .replace("@PORT@", &port.to_string())
                    .replace("@IP@", "127.0.0.1"),
            )
            .unwrap();
            let name = format!("quva-ej{i}-{tag}@127.0.0.1");
            let mut cmd = Command::new("/usr/bin/erl");
            cmd.current_dir(&node_dir)
                .env("EJABBERD_CONFIG_PATH", &config)
                .env("EJABBERD_LOG_PATH", node_dir.join("ejabberd.log"))
                .env("ERL_LIBS", &libs)
                .env("ERL_CRASH_DUMP_BYTES", "0")
                .env("HOME", &node_dir)
                .args([
                    "-name",
                    &name,
                    "-setcookie",
                    &cookie,
                    "-noinput",
                    "-noshell",
                ])
                .args(["-mnesia", "dir"])
                .arg(format!("\"{}\"", node_dir.join("mnesia").display()))
                .args(["-s", "ejabberd"]);
            let mut proc = Proc::spawn(cmd, &format!("ejabberd-{i}"), &logs);
            let mqtt: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            wait_port(mqtt, &mut proc.child, &format!("ejabberd node {i}"));
            nodes.push(Some(BrokerNode { proc, name, mqtt }));
        }
        // Every node's ejabberd application fully started first: its MQTT port opens before the
        // application has finished starting, and a join in that gap fails with
        // `{already_started, ejabberd}` (the join restarts the application). Then the account
        // (on the first node), then the joins: joining copies the tables.
        let first = &nodes[0].as_ref().unwrap().name;
        let mut script = String::from(
            "Started = fun Wait(N, 0) -> timeout; Wait(N, K) -> \
               case rpc:call(N, application, which_applications, []) of \
                 L when is_list(L) -> case lists:keymember(ejabberd, 1, L) of \
                   true -> ok; false -> timer:sleep(100), Wait(N, K - 1) end; \
                 _ -> timer:sleep(100), Wait(N, K - 1) end end, ",
        );
        for (i, node) in nodes.iter().enumerate() {
            let name = &node.as_ref().unwrap().name;
            script.push_str(&format!(
                "io:format(\"started {i} ~p~n\", [Started('{name}', 300)]), "
            ));
        }
        script.push_str(&format!(
            "R0 = rpc:call('{first}', ejabberd_admin, register, [<<\"bridge\">>, <<\"quva.test\">>, <<\"{password}\">>]), \
             io:format(\"register ~p~n\", [element(1, R0)]), "
        ));
        for (i, node) in nodes.iter().enumerate().skip(1) {
            let name = &node.as_ref().unwrap().name;
            script.push_str(&format!(
                "R{i} = rpc:call('{name}', ejabberd_cluster, join, ['{first}']), \
                 io:format(\"join {i} ~p~n\", [R{i}]), "
            ));
        }
        script.push_str(&format!(
            "io:format(\"nodes ~p~n\", [length(rpc:call('{first}', ejabberd_cluster, get_nodes, []))]), halt()."
        ));
        let out = run(
            Command::new("/usr/bin/erl")
                .env("HOME", dir.path())
                .args(["-name", &format!("quva-ejctl-{tag}@127.0.0.1")])
                .args([
                    "-setcookie",
                    &cookie,
                    "-hidden",
                    "-noinput",
                    "-eval",
                    &script,
                ]),
            "ejabberd cluster join",
            &logs,
        )
        .success();
        for i in 0..n {
            assert!(
                out.contains(&format!("started {i} ok")),
                "node {i} not started: {out}"
            );
        }
        assert!(out.contains("register ok"), "account not created: {out}");
        for i in 1..n {
            assert!(out.contains(&format!("join {i} ok")), "node {i}: {out}");
        }
        assert!(out.contains(&format!("nodes {n}")), "{out}");
        Some(BrokerCluster {
            nodes,
            password,
            dir,
        })
    }

    /// The MQTT address of node `i`.
    pub fn address(&self, i: usize) -> SocketAddr {
        self.nodes[i].as_ref().expect("node was killed").mqtt
    }

    /// What a bridge in front of node `i` needs: its address and the bridges' credentials.
    pub fn upstream(&self, i: usize) -> Upstream {
        Upstream {
            address: self.address(i),
            username: BROKER_USER.to_owned(),
            password: self.password.clone(),
        }
    }

    /// The bridges' password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Kills node `i` with SIGKILL, as a crash of its machine would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut node) = self.nodes[i].take() {
            let _ = node.proc.child.kill();
            let _ = node.proc.child.wait();
        }
    }

    /// The node's ejabberd log (for failure messages).
    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(self.node_dir(i).join("ejabberd.log")).unwrap_or_default()
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{i}"))
    }
}
