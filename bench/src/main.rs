//! `quva-bench`: Quva against TLS 1.3 and plain MQTT on one machine, over loopback, with real
//! Mosquitto, `quva-ca` and `quva-bridge` processes.
//!
//! - `quva-bench run --out docs/bench` measures key-setup bytes, client CPU per key setup,
//!   latency and throughput, and writes `results.json`, `results.md` and PNG plots.
//! - `quva-bench client-op <op> <n>` runs one client operation n+1 times, for
//!   `valgrind --tool=callgrind --toggle-collect='*client_step_*'` (see `scripts/bench.sh`).

mod cpu;
mod fanout;
mod mqtt;
mod ota;
mod quva;
mod report;
mod scale;
mod setup;
mod tls;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use quva_client::message::Protection;

use crate::fanout::{Fleet, Settings, System, Targets};
use crate::report::{Instructions, Results};

/// Quva against TLS 1.3 and plain MQTT.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Measure everything and write the results.
    Run(RunArgs),
    /// Group OTA (PROTOCOL.md §7.2) against per-device encryption and an unprotected fetch.
    Ota(OtaArgs),
    /// Verified throughput: one bridge on one ejabberd node against two bridges on two
    /// clustered nodes (docs/scale-out.md).
    Scale(ScaleArgs),
    /// Run one client operation n+1 times (the first is a warm-up), for instruction counting.
    ClientOp {
        /// The operation.
        #[arg(value_enum)]
        op: cpu::Op,
        /// Counted runs.
        n: usize,
    },
}

#[derive(clap::Args, Debug)]
struct OtaArgs {
    /// Runs, each DEVICESxBYTES: devices × image size.
    #[arg(
        long = "case",
        value_delimiter = ',',
        default_value = "100x1048576,10x10485760"
    )]
    cases: Vec<String>,
    /// Chunk size in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    chunk: u32,
}

#[derive(clap::Args, Debug)]
struct ScaleArgs {
    /// Subscribers in total (split across the bridges).
    #[arg(long, default_value_t = 20)]
    subscribers: usize,
    /// Seconds counted in each setup (after a one-second warm-up).
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Where results.json, results.md and the plots go.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Subscriber counts.
    #[arg(long, value_delimiter = ',', default_value = "10,50,100,200")]
    subscribers: Vec<usize>,
    /// Messages of each latency run.
    #[arg(long, default_value_t = 100)]
    messages: u64,
    /// Milliseconds between two messages of a latency run.
    #[arg(long, default_value_t = 50)]
    interval_ms: u64,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 3)]
    duration_secs: u64,
    /// Messages the publisher may be ahead of the slowest subscriber in a throughput run.
    #[arg(long, default_value_t = 64)]
    window: u64,
    /// Timed runs of each client operation.
    #[arg(long, default_value_t = 200)]
    cpu_runs: usize,
    /// Instruction counts (`op<TAB>instructions` lines) from callgrind, to include.
    #[arg(long)]
    instructions: Option<PathBuf>,
    /// Skip the latency and throughput runs.
    #[arg(long)]
    skip_fanout: bool,
}

fn uptime() -> String {
    Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("uptime: {e}"))
}

fn read_instructions(path: Option<&PathBuf>) -> anyhow::Result<Vec<Instructions>> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (op, n) = l
                .split_once('\t')
                .with_context(|| format!("{}: bad line {l:?}", path.display()))?;
            Ok(Instructions {
                op: op.to_owned(),
                per_run: n.trim().parse()?,
            })
        })
        .collect()
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let mut results = Results {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started: Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default(),
        load: vec![uptime()],
        setup: Vec::new(),
        cpu: Vec::new(),
        instructions: read_instructions(args.instructions.as_ref())?,
        fanout: Vec::new(),
    };

    eprintln!("==> client CPU per key setup ({} runs each)", args.cpu_runs);
    results.cpu = cpu::times(args.cpu_runs)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let work = tempfile::tempdir()?;
    eprintln!("==> starting Mosquitto, quva-ca and quva-bridge");
    let dep = quva::Deployment::start()?;
    eprintln!("==> key-setup bytes");
    results.setup = runtime.block_on(setup::run(&dep, work.path()))?;

    if !args.skip_fanout {
        let pki = tls::Pki::generate()?;
        let plain = tls::PlainMosquitto::start(work.path())?;
        let tls_dir = work.path().join("fanout-tls");
        std::fs::create_dir_all(&tls_dir)?;
        let tls_broker = tls::TlsMosquitto::start(&pki, &tls_dir, tls::Auth::ServerOnly)?;
        let targets = Targets {
            plain: plain.addr,
            tls: tls_broker.addr,
            pki: &pki,
            quva: &dep,
        };
        let most = args.subscribers.iter().copied().max().unwrap_or(0);
        eprintln!("==> enrolling 1 publisher and {most} subscribers");
        let mut fleet = runtime.block_on(Fleet::enroll(&dep, most))?;
        let settings = Settings {
            messages: args.messages,
            interval: Duration::from_millis(args.interval_ms),
            duration: Duration::from_secs(args.duration_secs),
            window: args.window,
        };
        let systems = [
            System::Plain,
            System::Tls,
            System::Quva(Protection::Authenticated),
            System::Quva(Protection::Confidential),
            System::Quva(Protection::Anonymous),
        ];
        for &n in &args.subscribers {
            for system in systems {
                eprintln!("==> {} with {n} subscribers", system.label());
                let r = runtime.block_on(fanout::run(system, n, &targets, &mut fleet, settings))?;
                eprintln!(
                    "    arrival p50 {} µs, device p50 {} µs, {:.0} msg/s",
                    r.arrival_p50_us, r.device_p50_us, r.throughput_msgs
                );
                results.fanout.push(r);
            }
        }
    }
    results.load.push(uptime());

    // The tables go to standard output first, so that a full disk loses no measurement.
    let md = report::markdown(&results);
    println!("{md}");
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(args.out.join("results.md"), &md)?;
    if let Err(e) = report::plots(&results, &args.out) {
        eprintln!("warning: no plots: {e:#}");
    }
    Ok(())
}

fn scale_runs(args: ScaleArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "quva-bench scale, {} (load: {})",
        std::env::args().collect::<Vec<_>>().join(" "),
        uptime()
    );
    let duration = Duration::from_secs(args.duration_secs);
    let mut rows = Vec::new();
    for nodes in [1, 2] {
        eprintln!(
            "==> {nodes} ejabberd node(s), {nodes} bridge(s), {} subscribers",
            args.subscribers
        );
        let row = runtime.block_on(scale::run(nodes, args.subscribers, duration))?;
        eprintln!(
            "    {:.0} accepted/s, {:.0} delivered/s",
            row.accepted_per_s, row.delivered_per_s
        );
        rows.push(row);
    }
    println!();
    println!(
        "| broker nodes + bridges | publishers | subscribers | accepted PUBLISH/s | deliveries/s | ratio to one node |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let base = rows
        .first()
        .map_or(1.0, |r| r.delivered_per_s.max(f64::MIN_POSITIVE));
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.2} |",
            r.nodes,
            r.nodes,
            r.subscribers,
            r.accepted_per_s,
            r.delivered_per_s,
            r.delivered_per_s / base
        );
    }
    println!("\n(load after: {})", uptime());
    Ok(())
}

fn ota_runs(args: OtaArgs) -> anyhow::Result<()> {
    let cases = args
        .cases
        .iter()
        .map(|c| {
            let (n, bytes) = c
                .split_once('x')
                .with_context(|| format!("--case {c}: expected DEVICESxBYTES"))?;
            Ok((n.parse::<usize>()?, bytes.parse::<usize>()?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let most = cases.iter().map(|c| c.0).max().unwrap_or(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let work = tempfile::tempdir()?;
    println!(
        "quva-bench ota, {} (load: {})",
        std::env::args().collect::<Vec<_>>().join(" "),
        uptime()
    );
    eprintln!("==> starting Mosquitto, quva-ca and quva-bridge, and a plain Mosquitto");
    let plain = tls::PlainMosquitto::start(work.path())?;
    let dep = quva::Deployment::start()?;
    eprintln!("==> enrolling 1 signer and {most} devices");
    let (mut signer, mut devices) = runtime.block_on(ota::enroll(&dep, most))?;
    println!();
    println!("{}", ota::TABLE_HEADER);
    for (i, &(n, bytes)) in cases.iter().enumerate() {
        let image = ota::image(bytes);
        let rest = devices.split_off(n.min(devices.len()));
        let set = ota::Settings {
            devices: n,
            image_bytes: bytes,
            chunk: args.chunk,
            version: i as u64 + 1,
        };
        eprintln!("==> {n} devices × {bytes} bytes: group OTA");
        let group = runtime.block_on(ota::group_ota(&dep, signer, devices, &image, set))?;
        eprintln!("==> {n} devices × {bytes} bytes: plain");
        let floor = runtime.block_on(ota::plain(plain.addr, &group.items, set))?;
        eprintln!("==> {n} devices × {bytes} bytes: per device");
        let single = runtime.block_on(ota::per_device(
            &dep,
            group.signer,
            group.devices,
            &image,
            set,
        ))?;
        for row in [&floor, &group.row, &single.row] {
            println!("{}", ota::table_row(row, &floor));
        }
        signer = single.signer;
        devices = single.devices;
        devices.extend(rest);
    }
    println!("\n(load after: {})", uptime());
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Ota(args) => ota_runs(args),
        Cmd::Scale(args) => scale_runs(args),
        Cmd::ClientOp { op, n } => cpu::run(op, n).map(|_| ()),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
