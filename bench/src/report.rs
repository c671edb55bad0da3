//! Results: JSON, Markdown tables with the goals, and PNG plots (plotters' bitmap backend with
//! the DejaVu Sans font rendered by ab_glyph, pure Rust).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde::Serialize;

use crate::cpu::CpuTime;
use crate::fanout::FanoutResult;
use crate::setup::SetupBytes;

/// Instructions per client operation (callgrind), if counted.
#[derive(Clone, Debug, Serialize)]
pub struct Instructions {
    /// The operation.
    pub op: String,
    /// Instructions per run.
    pub per_run: u64,
}

/// Everything one run of the harness measured.
#[derive(Clone, Debug, Serialize)]
pub struct Results {
    /// The command that produced this.
    pub command: String,
    /// UTC time at the start.
    pub started: String,
    /// `uptime` before and after.
    pub load: Vec<String>,
    /// Key-setup bytes.
    pub setup: Vec<SetupBytes>,
    /// Client CPU time.
    pub cpu: Vec<CpuTime>,
    /// Client instructions.
    pub instructions: Vec<Instructions>,
    /// Latency and throughput.
    pub fanout: Vec<FanoutResult>,
}

fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "n/a".to_owned()
    } else {
        format!("{:.2}", a / b)
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**not met**" }
}

/// The Markdown tables.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Command: `{}`  ", r.command);
    let _ = writeln!(s, "Started {} UTC; load:", r.started);
    for l in &r.load {
        let _ = writeln!(s, "- `{}`", l.trim());
    }

    let _ = writeln!(s, "\n### Key-setup bytes per device\n");
    let _ = writeln!(
        s,
        "| variant | client → server | server → client | total | of which TLS handshake |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: |");
    for b in &r.setup {
        let _ = writeln!(
            s,
            "| {} | {} | {} | **{}** | {} |",
            b.variant,
            b.sent,
            b.received,
            b.total(),
            b.handshake
        );
    }
    let find = |p: &str| r.setup.iter().find(|b| b.variant.contains(p));
    if let (Some(q), Some(m)) = (find("Quva enrollment"), find("mutual")) {
        let x = q.total() as f64 / m.total() as f64;
        let _ = writeln!(
            s,
            "\nQuva first connection / mutual TLS 1.3: {:.0}% (goal ≤ 25%: {}).",
            x * 100.0,
            met(x <= 0.25)
        );
        if let Some(q2) = find("resumed subscription") {
            let y = q2.total() as f64 / m.total() as f64;
            let _ = writeln!(
                s,
                "Quva reconnection (resumed) / mutual TLS 1.3: {:.0}% (goal ≤ 10%: {}).",
                y * 100.0,
                met(y <= 0.10)
            );
        }
    }

    let _ = writeln!(s, "\n### Client CPU per key setup\n");
    let _ = writeln!(
        s,
        "| operation | median time (µs) | mean time (µs) | instructions |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: |");
    let instr = |op: &str| {
        r.instructions
            .iter()
            .find(|i| i.op == op)
            .map(|i| i.per_run)
    };
    for c in &r.cpu {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {} |",
            c.op,
            c.median_us,
            c.mean_us,
            instr(c.op).map_or("–".to_owned(), |n| n.to_string())
        );
    }
    let time = |op: &str| r.cpu.iter().find(|c| c.op == op).map(|c| c.median_us);
    for (quva, tls) in [
        ("quva-setup", "tls-server-only"),
        ("quva-setup", "tls-mutual"),
        ("quva-reconnect", "tls-server-only"),
        ("quva-reconnect", "tls-mutual"),
    ] {
        let (Some(a), Some(b)) = (time(quva), time(tls)) else {
            continue;
        };
        let ins = match (instr(quva), instr(tls)) {
            (Some(x), Some(y)) => format!(
                ", instructions {} ({})",
                ratio(x as f64, y as f64),
                met((x as f64) <= y as f64 / 3.0)
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "- {quva} / {tls}: time {} ({}){ins}; goal ≤ 0.33.",
            ratio(a, b),
            met(a <= b / 3.0)
        );
    }

    let _ = writeln!(s, "\n### Publish-to-receive latency and throughput\n");
    let _ = writeln!(
        s,
        "| system | subscribers | arrival p50 / p99 (µs) | device p50 / p99 (µs) | open p50 (µs) | delivered | throughput (msg/s) | deliveries/s |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for f in &r.fanout {
        let _ = writeln!(
            s,
            "| {} | {} | {} / {} | {} / {} | {} | {}/{} | {:.0} | {:.0} |",
            f.system,
            f.subscribers,
            f.arrival_p50_us,
            f.arrival_p99_us,
            f.device_p50_us,
            f.device_p99_us,
            f.open_p50_us,
            f.delivered,
            f.expected,
            f.throughput_msgs,
            f.throughput_deliveries
        );
    }
    let at = |sys: &str, n: usize| {
        r.fanout
            .iter()
            .find(|f| f.system == sys && f.subscribers == n)
    };
    let mut counts: Vec<usize> = r.fanout.iter().map(|f| f.subscribers).collect();
    counts.sort_unstable();
    counts.dedup();
    for n in counts {
        if let (Some(q), Some(p), Some(t)) = (
            at("Quva option 2", n),
            at("Mosquitto, plain", n),
            at("Mosquitto, TLS 1.3", n),
        ) {
            let x = q.device_p50_us as f64 / p.arrival_p50_us.max(1) as f64;
            let _ = writeln!(
                s,
                "\nOption 2 at {n} subscribers: device p50 {} µs = {:.2}× plain Mosquitto ({} µs; goal ≤ {GOAL_VS_PLAIN}×: {}), TLS {} µs (goal below TLS: {}).",
                q.device_p50_us,
                x,
                p.arrival_p50_us,
                met(x <= GOAL_VS_PLAIN),
                t.arrival_p50_us,
                met(q.device_p50_us < t.arrival_p50_us)
            );
        }
    }
    s
}

/// The latency goal for option 2 against plain Mosquitto, at every subscriber count.
const GOAL_VS_PLAIN: f64 = 1.3;

/// Registers DejaVu Sans for the plots.
///
/// # Errors
/// When the font is not installed.
fn register_font() -> anyhow::Result<()> {
    let path = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .context("DejaVuSans.ttf is not installed (apt-get install fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
    Ok(())
}

fn err(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow::anyhow!("plot: {e:?}")
}

/// Writes `setup-bytes.png`, `latency.png` and `throughput.png` into `dir`.
///
/// # Errors
/// A missing font or a file that cannot be written.
pub fn plots(r: &Results, dir: &Path) -> anyhow::Result<()> {
    register_font()?;
    setup_plot(r, &dir.join("setup-bytes.png"))?;
    line_plot(
        r,
        &dir.join("latency.png"),
        "Publish-to-receive latency p50 (device: arrival + own open)",
        "µs",
        |f| f.device_p50_us as f64,
    )?;
    line_plot(
        r,
        &dir.join("throughput.png"),
        "Sustained throughput to every subscriber",
        "messages/s",
        |f| f.throughput_msgs,
    )?;
    Ok(())
}

fn short(variant: &str) -> &'static str {
    if variant.contains("plain") {
        "MQTT"
    } else if variant.contains("server-only") {
        "TLS 1.3"
    } else if variant.contains("mutual") {
        "mutual TLS 1.3"
    } else if variant.contains("enrollment") {
        "Quva 1st"
    } else {
        "Quva reconnect"
    }
}

fn setup_plot(r: &Results, path: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = r.setup.len();
    let max = r.setup.iter().map(SetupBytes::total).max().unwrap_or(1) as f64 * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Key-setup bytes per device (both directions)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..max)
        .map_err(err)?;
    let names: Vec<&str> = r.setup.iter().map(|b| short(&b.variant)).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                names.get(i).copied().unwrap_or("").to_owned()
            } else {
                String::new()
            }
        })
        .y_desc("bytes")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(r.setup.iter().enumerate().map(|(i, b)| {
            let color = if b.variant.contains("Quva") {
                RGBColor(0x2a, 0x7a, 0x3a)
            } else {
                RGBColor(0x55, 0x66, 0x99)
            };
            Rectangle::new(
                [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, b.total() as f64)],
                color.filled(),
            )
        }))
        .map_err(err)?;
    chart
        .draw_series(r.setup.iter().enumerate().map(|(i, b)| {
            Text::new(
                b.total().to_string(),
                (i as f64 + 0.35, b.total() as f64 + max * 0.02),
                ("sans-serif", 15),
            )
        }))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn line_plot(
    r: &Results,
    path: &Path,
    title: &str,
    unit: &str,
    value: impl Fn(&FanoutResult) -> f64,
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut systems: Vec<&str> = Vec::new();
    for f in &r.fanout {
        if !systems.contains(&f.system.as_str()) {
            systems.push(&f.system);
        }
    }
    let max_x = r.fanout.iter().map(|f| f.subscribers).max().unwrap_or(1) as f64;
    let max_y = r.fanout.iter().map(&value).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..max_x * 1.05, 0f64..max_y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("subscribers")
        .y_desc(unit)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    let palette = [
        RGBColor(0x33, 0x33, 0x33),
        RGBColor(0x55, 0x66, 0x99),
        RGBColor(0x9c, 0xcf, 0x9c),
        RGBColor(0x2a, 0x7a, 0x3a),
        RGBColor(0x10, 0x40, 0x18),
    ];
    for (k, sys) in systems.iter().enumerate() {
        let color = palette.get(k % palette.len()).copied().unwrap_or(BLACK);
        let points: Vec<(f64, f64)> = r
            .fanout
            .iter()
            .filter(|f| f.system == *sys)
            .map(|f| (f.subscribers as f64, value(f)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(*sys)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
