//! The `quva-node` command line (clap).
//!
//! Global flags override the configuration file (`/etc/quva/node.toml` unless `--config`).
//!
//! # Usage
//! ```
//! use clap::Parser;
//! use quva_node::cli::{Cli, Command};
//! let cli = Cli::try_parse_from([
//!     "quva-node", "--store", "/tmp/node", "publish", "--group", "plant/temp", "--option", "2",
//!     "21.5",
//! ])
//! .unwrap();
//! assert!(matches!(cli.command, Command::Publish(_)));
//! assert!(Cli::try_parse_from(["quva-node", "publish", "--group", "g", "--option", "4"]).is_err());
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use quva_daemon::duration::parse_positive;

/// The default CPU temperature sensor of a Raspberry Pi.
pub const DEFAULT_SENSOR: &str = "/sys/class/thermal/thermal_zone0/temp";

/// Quva device: end-to-end protected MQTT groups (enroll, publish, subscribe, query, answer).
#[derive(Debug, Parser)]
#[command(name = "quva-node", version, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file [default: /etc/quva/node.toml, if present].
    #[arg(long, env = "QUVA_NODE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Key store directory (overrides `store`) [default: /var/lib/quva-node].
    #[arg(long, env = "QUVA_NODE_STORE", global = true)]
    pub store: Option<PathBuf>,
    /// Bridge address HOST:PORT (overrides `broker`, and the address remembered at enrollment).
    #[arg(long, env = "QUVA_NODE_BROKER", global = true)]
    pub broker: Option<String>,
    /// More log output on stderr: -v info, -vv debug (RUST_LOG overrides).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Logging (`--log-format`).
    #[command(flatten)]
    pub log: quva_daemon::LogArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enroll this device once, with the owner's enrollment secret and the CA public key.
    Enroll(EnrollArgs),
    /// Renew the certificate with the current key (new d_i and g_i).
    Renew(RenewArgs),
    /// Publish messages to a group as a publisher.
    Publish(PublishArgs),
    /// Print every verified message of a group, as a subscriber.
    Subscribe(SubscribeArgs),
    /// Send a query to a group's publishers, as a subscriber, and print the replies.
    Query(QueryArgs),
    /// Answer queries of a group's subscribers, as a publisher.
    Answer(AnswerArgs),
    /// Show the certificate and the stored group keys.
    Status(StatusArgs),
    /// Send one end-to-end encrypted direct message to another device (PROTOCOL.md §7.1).
    Send(SendArgs),
    /// Run as a daemon: show verified direct messages, and serve the stored OTA releases.
    Run(RunArgs),
    /// Group over-the-air updates, as a release signer (PROTOCOL.md §7.2).
    #[command(subcommand)]
    Ota(OtaCommand),
}

/// `ota` subcommands.
#[derive(Debug, Subcommand)]
pub enum OtaCommand {
    /// Encrypt, sign and deposit a release of FILE for a group, as a publisher of the group.
    #[command(disable_version_flag = true)]
    Release(OtaReleaseArgs),
    /// Collect the devices' status reports and show what each reported.
    Status(OtaStatusArgs),
}

/// The chunk size of a release: 1 byte to the largest chunk that fits a PUBLISH.
fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("invalid chunk size {s:?}: a number of bytes"))?;
    let max = quva_client::ota::DEFAULT_MAX_CHUNK_SIZE;
    if n == 0 || n > max {
        return Err(format!("the chunk size must be 1 to {max} bytes"));
    }
    Ok(n)
}

/// `ota release`.
#[derive(Debug, Args)]
pub struct OtaReleaseArgs {
    /// The OTA group (this device must be one of its publishers).
    #[arg(long)]
    pub group: String,
    /// The release version: above every version released before (devices refuse rollbacks).
    #[arg(long)]
    pub version: u64,
    /// The image name devices see (at most 255 bytes), travelling encrypted.
    #[arg(long)]
    pub name: String,
    /// The bytes per chunk.
    #[arg(long, value_parser = parse_chunk_size, default_value_t = quva_client::ota::DEFAULT_CHUNK_SIZE, value_name = "BYTES")]
    pub chunk_size: u32,
    /// The image file.
    pub file: PathBuf,
}

/// `ota status`.
#[derive(Debug, Args)]
pub struct OtaStatusArgs {
    /// The OTA group.
    #[arg(long)]
    pub group: String,
    /// How long to collect reports.
    #[arg(long, value_parser = parse_positive, default_value = "3", value_name = "SECS")]
    pub wait: Duration,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `enroll`.
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// This device's ID, as registered by the owner (1–64 of [A-Za-z0-9._-]).
    #[arg(long)]
    pub id: String,
    /// File holding the hex enrollment secret (`-` for stdin). The secret may instead be given
    /// in the environment variable QUVA_ENROLL_SECRET; it is never accepted as an argument.
    #[arg(long, value_name = "PATH")]
    pub secret_file: Option<PathBuf>,
    /// The CA public key (66 hex digits, from `quva-ca status` or the CA's ca.pub).
    #[arg(
        long,
        value_name = "HEX",
        conflicts_with = "ca_key_file",
        required_unless_present = "ca_key_file"
    )]
    pub ca_key: Option<String>,
    /// File holding the CA public key in hex.
    #[arg(long, value_name = "PATH")]
    pub ca_key_file: Option<PathBuf>,
    /// Replace existing credentials.
    #[arg(long)]
    pub force: bool,
}

/// `renew`.
#[derive(Debug, Args)]
pub struct RenewArgs {}

/// The protection option of a message: 1 authenticated, 2 confidential, 3 anonymous.
fn parse_option(s: &str) -> Result<u8, String> {
    match s {
        "1" | "2" | "3" => s.parse().map_err(|_| String::new()),
        _ => Err("the option is 1 (authenticated), 2 (confidential) or 3 (anonymous)".to_owned()),
    }
}

/// `publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The group (its data topic).
    #[arg(long)]
    pub group: String,
    /// Protection: 1 authenticated, 2 confidential, 3 anonymous.
    #[arg(long, value_parser = parse_option)]
    pub option: u8,
    /// One message to publish; `-` (or none, without --every) reads one message per stdin line.
    #[arg(conflicts_with = "every")]
    pub message: Option<String>,
    /// Publish a reading periodically (e.g. 5s, 1m) until interrupted.
    #[arg(long, value_parser = parse_positive, value_name = "DURATION")]
    pub every: Option<Duration>,
    /// The file to read with --every [default: the CPU temperature, /sys/class/thermal/thermal_zone0/temp].
    #[arg(long, value_name = "PATH", conflicts_with = "command")]
    pub sensor: Option<PathBuf>,
    /// A shell command whose output is the reading, with --every.
    #[arg(long, value_name = "CMD")]
    pub command: Option<String>,
    /// Stop after this many periodic readings.
    #[arg(long, requires = "every")]
    pub count: Option<u64>,
}

/// `subscribe`.
#[derive(Debug, Args)]
pub struct SubscribeArgs {
    /// The group (its data topic).
    #[arg(long)]
    pub group: String,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Exit after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
}

/// `query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The group.
    #[arg(long)]
    pub group: String,
    /// Protection of the query: 1 authenticated, 2 confidential, 3 anonymous.
    #[arg(long, value_parser = parse_option)]
    pub option: u8,
    /// The query text.
    pub message: String,
    /// How long to wait for replies.
    #[arg(long, value_parser = parse_positive, default_value = "5s", value_name = "DURATION")]
    pub wait: Duration,
    /// Exit after this many replies.
    #[arg(long)]
    pub count: Option<u64>,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

/// `answer`.
#[derive(Debug, Args)]
pub struct AnswerArgs {
    /// The group.
    #[arg(long)]
    pub group: String,
    /// Protection of replies [default: the query's own option].
    #[arg(long, value_parser = parse_option)]
    pub option: Option<u8>,
    /// Reply with this text.
    #[arg(long, conflicts_with_all = ["command", "sensor"])]
    pub reply: Option<String>,
    /// Reply with the output of this shell command; the query arrives on its stdin and in
    /// QUVA_QUERY_SENDER / QUVA_QUERY_OPTION.
    #[arg(long, value_name = "CMD", conflicts_with = "sensor")]
    pub command: Option<String>,
    /// Reply with this file's reading [default: the CPU temperature].
    #[arg(long, value_name = "PATH")]
    pub sensor: Option<PathBuf>,
    /// Print each query answered, as JSON lines.
    #[arg(long)]
    pub json: bool,
    /// Exit after answering this many queries.
    #[arg(long)]
    pub count: Option<u64>,
}

/// `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The recipient device.
    #[arg(long, value_name = "DEVICE")]
    pub to: String,
    /// The group whose member list gives the recipient's certificate [default: every group
    /// whose key this device holds].
    #[arg(long)]
    pub group: Option<String>,
    /// The message.
    pub message: String,
}

/// `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size("1"), Ok(1));
        assert!(parse_chunk_size("0").is_err());
        assert!(parse_chunk_size("300000").is_err());
        let cli = Cli::try_parse_from([
            "quva-node",
            "ota",
            "release",
            "--group",
            "fw/a",
            "--version",
            "3",
            "--name",
            "n",
            "f",
        ])
        .unwrap();
        let Command::Ota(OtaCommand::Release(a)) = cli.command else {
            panic!("not a release");
        };
        assert_eq!(a.chunk_size, quva_client::ota::DEFAULT_CHUNK_SIZE);
    }

    #[test]
    fn durations_and_options() {
        let every = |v: &str| {
            Cli::try_parse_from([
                "quva-node",
                "publish",
                "--group",
                "g",
                "--option",
                "1",
                "--every",
                v,
            ])
            .map(|c| match c.command {
                Command::Publish(p) => p.every,
                _ => None,
            })
        };
        assert_eq!(every("5s").unwrap(), Some(Duration::from_secs(5)));
        assert_eq!(every("250ms").unwrap(), Some(Duration::from_millis(250)));
        assert_eq!(every("2m").unwrap(), Some(Duration::from_secs(120)));
        assert_eq!(every("7").unwrap(), Some(Duration::from_secs(7)));
        assert!(every("0s").is_err());
        assert!(every("5 parsecs").is_err());
        assert_eq!(parse_option("3"), Ok(3));
        assert!(parse_option("0").is_err());
    }

    #[test]
    fn enroll_requires_a_ca_key_and_refuses_a_secret_argument() {
        assert!(Cli::try_parse_from(["quva-node", "enroll", "--id", "d"]).is_err());
        assert!(
            Cli::try_parse_from(["quva-node", "enroll", "--id", "d", "--secret", "00"]).is_err()
        );
        let cli = Cli::try_parse_from([
            "quva-node",
            "enroll",
            "--id",
            "d",
            "--ca-key",
            "02aa",
            "--secret-file",
            "-",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Enroll(_)));
    }
}
