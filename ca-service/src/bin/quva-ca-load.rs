//! `quva-ca-load`: load generator for a real `quva-ca serve` over gRPC.
//!
//! `issue` registers devices through the admin API, builds real quva-client enrollment requests,
//! then enrolls them from N concurrent clients (one gRPC connection each) and reports durable
//! issuances per second and latency percentiles; every certificate is then accepted (verified)
//! on the device side. `membership` fills groups of the given sizes and times one device
//! joining and leaving, one at a time.
//!
//! Without `--ca` it starts its own server: `quva-ca init` and `quva-ca serve` (the binary next
//! to this one, or `--quva-ca`) on a fresh data directory under the system temp directory.
//!
//! ```text
//! quva-ca-load issue --clients 1,8,64 --count 5000
//! quva-ca-load membership --sizes 10,100,1000,10000 --rounds 20
//! ```

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use quva_ca::cli::{AdminClient, Bearer, bearer, connect};
use quva_ca::datadir::DataDir;
use quva_client::codec::{Decode, Encode};
use quva_client::curve::Point;
use quva_client::enrollment::{Credentials, EnrollResponse, EnrollmentSecret, PendingEnrollment};
use quva_client::group::GroupKeyRequest;
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_daemon::now_ms;
use quva_proto::v1 as pb;
use quva_proto::v1::device_service_client::DeviceServiceClient;
use rand_core::OsRng;
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type DeviceClient = DeviceServiceClient<InterceptedService<Channel, Bearer>>;

/// Load generator for quva-ca.
#[derive(Parser)]
#[command(name = "quva-ca-load", version, about)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Durable certificate issuances per second with concurrent clients.
    Issue {
        /// Concurrent clients, one run each (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        clients: Vec<usize>,
        /// Enrollments per run.
        #[arg(long, default_value_t = 5000)]
        count: usize,
        /// Where the CA is.
        #[command(flatten)]
        target: Target,
    },
    /// CA time of one join and one leave in groups of the given sizes.
    Membership {
        /// Group sizes (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000,10000")]
        sizes: Vec<usize>,
        /// Timed joins and leaves per size.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Where the CA is.
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args)]
struct Target {
    /// URL of a running CA (e.g. http://127.0.0.1:7443); needs --data for its tokens and key.
    #[arg(long, requires = "data")]
    ca: Option<String>,
    /// Data directory of the CA (tokens, ca.pub).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The quva-ca binary to start when --ca is absent (default: next to this program).
    #[arg(long)]
    quva_ca: Option<PathBuf>,
    /// `--batch-window-ms` of a started server.
    #[arg(long, default_value_t = 0)]
    batch_window_ms: u64,
    /// `--max-group-commit` of a started server (1: one synced write per request).
    #[arg(long)]
    max_group_commit: Option<usize>,
    /// Keep the started server's data directory.
    #[arg(long)]
    keep: bool,
}

/// A CA to talk to, stopped (if started here) on drop.
struct Ca {
    url: String,
    q_ca: Point,
    admin_token: String,
    bridge_token: String,
    child: Option<Child>,
    remove: Option<PathBuf>,
}

impl Drop for Ca {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(dir) = self.remove.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn read_ca_pub(data: &DataDir) -> anyhow::Result<Point> {
    let path = data.ca_pub_path();
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let bytes = hex::decode(text.trim()).context("ca.pub is not hex")?;
    Point::from_bytes(&bytes).context("ca.pub is not a point")
}

impl Target {
    async fn open(&self) -> anyhow::Result<Ca> {
        let (url, root, child, remove) = match &self.ca {
            Some(url) => {
                let Some(data) = &self.data else {
                    bail!("--ca needs --data");
                };
                (url.clone(), data.clone(), None, None)
            }
            None => {
                let bin = match &self.quva_ca {
                    Some(b) => b.clone(),
                    None => std::env::current_exe()?
                        .parent()
                        .context("no directory of this program")?
                        .join("quva-ca"),
                };
                let root =
                    std::env::temp_dir().join(format!("quva-ca-load-{}", std::process::id()));
                let data = root.join("ca");
                std::fs::create_dir_all(&root)?;
                let status = Command::new(&bin)
                    .args(["init", "--data"])
                    .arg(&data)
                    .stdout(Stdio::null())
                    .status()
                    .with_context(|| format!("running {}", bin.display()))?;
                if !status.success() {
                    bail!("quva-ca init failed");
                }
                let port = free_port()?;
                let log = std::fs::File::create(root.join("ca.log"))?;
                let mut serve = Command::new(&bin);
                serve.args(["serve", "--data"]).arg(&data).args([
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--batch-window-ms",
                    &self.batch_window_ms.to_string(),
                ]);
                if let Some(n) = self.max_group_commit {
                    serve.args(["--max-group-commit", &n.to_string()]);
                }
                let child = serve.stdout(Stdio::null()).stderr(log).spawn()?;
                eprintln!(
                    "started {} serve on 127.0.0.1:{port}, data {}",
                    bin.display(),
                    data.display()
                );
                let remove = (!self.keep).then(|| root.clone());
                (
                    format!("http://127.0.0.1:{port}"),
                    data,
                    Some(child),
                    remove,
                )
            }
        };
        let data = DataDir::new(root);
        let mut ca = Ca {
            url,
            q_ca: read_ca_pub(&data)?,
            admin_token: data.admin_token()?.to_string(),
            bridge_token: data.bridge_token()?.to_string(),
            child,
            remove,
        };
        ca.wait_ready().await?;
        Ok(ca)
    }
}

impl Ca {
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        for _ in 0..600 {
            if let Ok(mut a) = connect(&self.url, &self.admin_token).await {
                if a.get_status(pb::GetStatusRequest {}).await.is_ok() {
                    return Ok(());
                }
            }
            if let Some(c) = &mut self.child {
                if let Some(status) = c.try_wait()? {
                    bail!("quva-ca serve exited: {status}");
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{} did not answer", self.url)
    }

    async fn admin(&self) -> anyhow::Result<AdminClient> {
        Ok(connect(&self.url, &self.admin_token).await?)
    }

    async fn device(&self) -> anyhow::Result<DeviceClient> {
        let channel = Endpoint::from_shared(self.url.clone())?.connect().await?;
        Ok(DeviceServiceClient::with_interceptor(
            channel,
            bearer(&self.bridge_token)?,
        ))
    }

    /// Registers `ids` with `parallel` concurrent admin calls; returns their secrets in order.
    async fn register(
        &self,
        ids: &[String],
        parallel: usize,
    ) -> anyhow::Result<Vec<EnrollmentSecret>> {
        let admin = self.admin().await?;
        let out = run_parallel(ids.to_vec(), parallel, move |id| {
            let mut admin = admin.clone();
            async move {
                let r = admin
                    .register_device(pb::RegisterDeviceRequest {
                        id,
                        note: "load test".into(),
                        reissue: false,
                        secret_validity_secs: 0,
                    })
                    .await?
                    .into_inner();
                let mut bytes = [0u8; 32];
                hex::decode_to_slice(&r.enroll_secret, &mut bytes)?;
                Ok(EnrollmentSecret::from_bytes(&bytes))
            }
        })
        .await?;
        Ok(out)
    }

    /// Enrolls devices (untimed setup) and returns their credentials.
    async fn enroll_all(
        &self,
        ids: &[String],
        parallel: usize,
    ) -> anyhow::Result<Vec<Credentials>> {
        let secrets = self.register(ids, parallel).await?;
        let requests = build_requests(ids, &secrets)?;
        let device = self.device().await?;
        let q_ca = self.q_ca;
        run_parallel(requests, parallel, move |(pending, data)| {
            let mut device = device.clone();
            async move {
                let r = device
                    .enroll(pb::EnrollRequest { auth_data: data })
                    .await?
                    .into_inner();
                let resp = EnrollResponse::from_bytes(&r.auth_data)
                    .map_err(|e| anyhow::anyhow!("enroll response: {e}"))?;
                pending
                    .accept(&resp, &q_ca)
                    .map_err(|e| anyhow::anyhow!("certificate refused: {e}"))
            }
        })
        .await
    }
}

/// Runs `f` over `items` with at most `parallel` in flight; results in input order.
async fn run_parallel<I, T, F, Fut>(items: Vec<I>, parallel: usize, f: F) -> anyhow::Result<Vec<T>>
where
    I: Send + 'static,
    T: Send + 'static,
    F: Fn(I) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let mut set = JoinSet::new();
    let mut out: Vec<Option<T>> = Vec::with_capacity(items.len());
    out.resize_with(items.len(), || None);
    for (i, item) in items.into_iter().enumerate() {
        if set.len() >= parallel.max(1) {
            if let Some(done) = set.join_next().await {
                let (j, v) = done?;
                out[j] = Some(v?);
            }
        }
        let fut = f(item);
        set.spawn(async move { (i, fut.await) });
    }
    while let Some(done) = set.join_next().await {
        let (j, v) = done?;
        out[j] = Some(v?);
    }
    out.into_iter()
        .map(|v| v.context("missing result"))
        .collect()
}

fn build_requests(
    ids: &[String],
    secrets: &[EnrollmentSecret],
) -> anyhow::Result<Vec<(PendingEnrollment, Vec<u8>)>> {
    let mut rng = OsRng;
    let now = now_ms();
    ids.iter()
        .zip(secrets)
        .map(|(id, secret)| {
            let pending = PendingEnrollment::new(DeviceId::new(id)?, now, &mut rng);
            let data = pending.enroll_request(secret).to_bytes();
            Ok((pending, data))
        })
        .collect()
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn latency_line(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(h, 0.5),
        ms(h, 0.9),
        ms(h, 0.99),
        h.max() as f64 / 1000.0
    )
}

async fn status(ca: &Ca) -> anyhow::Result<pb::Status> {
    Ok(ca
        .admin()
        .await?
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner())
}

async fn issue(target: &Target, clients: &[usize], count: usize) -> anyhow::Result<()> {
    let ca = target.open().await?;
    for (run, &n) in clients.iter().enumerate() {
        let ids: Vec<String> = (0..count).map(|i| format!("load-{run}-{n}-{i}")).collect();
        let secrets = ca.register(&ids, 64).await?;
        let requests = build_requests(&ids, &secrets)?;
        let (pendings, datas): (Vec<PendingEnrollment>, Vec<Vec<u8>>) =
            requests.into_iter().unzip();
        let datas = Arc::new(datas);
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(ca.device().await?);
        }
        let before = status(&ca).await?;
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut set = JoinSet::new();
        for mut client in conns {
            let (next, datas) = (next.clone(), datas.clone());
            set.spawn(async move {
                let mut h = histogram()?;
                let mut got = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(data) = datas.get(i) else { break };
                    let t = Instant::now();
                    let r = client
                        .enroll(pb::EnrollRequest {
                            auth_data: data.clone(),
                        })
                        .await?
                        .into_inner();
                    h.record(micros(t.elapsed()))?;
                    got.push((i, r.auth_data));
                }
                anyhow::Ok((h, got))
            });
        }
        let mut h = histogram()?;
        let mut responses: Vec<Option<Vec<u8>>> = vec![None; count];
        while let Some(done) = set.join_next().await {
            let (part, got) = done??;
            h.add(part)?;
            for (i, r) in got {
                responses[i] = Some(r);
            }
        }
        let elapsed = start.elapsed();
        let after = status(&ca).await?;
        // Every certificate must open and match on the device side.
        let mut ok = 0usize;
        for (pending, resp) in pendings.into_iter().zip(responses) {
            let resp = resp.context("missing response")?;
            let resp = EnrollResponse::from_bytes(&resp)
                .map_err(|e| anyhow::anyhow!("enroll response: {e}"))?;
            if pending.accept(&resp, &ca.q_ca).is_ok() {
                ok += 1;
            }
        }
        if ok != count {
            bail!("{} of {count} certificates did not verify", count - ok);
        }
        let commits = after.commits.saturating_sub(before.commits);
        println!(
            "issue clients={n:>3} count={count}: {:.0} issuances/s ({:.2} s), {} synced commits \
             ({:.1} issuances/commit); {}",
            count as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
            commits,
            count as f64 / commits.max(1) as f64,
            latency_line(&h)
        );
    }
    Ok(())
}

async fn membership(target: &Target, sizes: &[usize], rounds: usize) -> anyhow::Result<()> {
    let ca = target.open().await?;
    let mut admin = ca.admin().await?;
    let device = ca.device().await?;
    for &size in sizes {
        let group = format!("load/members-{size}");
        admin
            .create_group(pb::CreateGroupRequest {
                id: group.clone(),
                privacy: pb::Privacy::Standard as i32,
                rekey_interval_secs: 0,
            })
            .await?;
        let ids: Vec<String> = (0..=size).map(|i| format!("m{size}-{i}")).collect();
        let creds = ca.enroll_all(&ids, 64).await?;
        let (churn, members) = creds.split_first().context("no devices")?;
        let allow = |id: String, allow: bool| {
            let mut admin = admin.clone();
            let group = group.clone();
            async move {
                admin
                    .set_permission(pb::SetPermissionRequest {
                        group,
                        device: id,
                        role: u32::from(Role::Subscriber.to_u8()),
                        allow,
                    })
                    .await?;
                anyhow::Ok(())
            }
        };
        run_parallel(ids[1..].to_vec(), 64, |id| allow(id, true)).await?;
        let q_ca = ca.q_ca;
        let join = |c: Credentials| {
            let mut device = device.clone();
            let group = group.clone();
            async move {
                let request = join_request(&c, &group, &q_ca)?;
                let r = device
                    .join_group(pb::JoinGroupRequest { request })
                    .await?
                    .into_inner();
                anyhow::Ok(r.epoch)
            }
        };
        let setup = Instant::now();
        run_parallel(members.to_vec(), 256, join).await?;
        let setup = setup.elapsed();
        let (mut hj, mut hl) = (histogram()?, histogram()?);
        // The writer's own time per epoch (staging and writing, not the disk sync), from the
        // server's counter.
        let (mut wj, mut wl) = (histogram()?, histogram()?);
        let writer_micros = || {
            let mut admin = admin.clone();
            async move {
                let s = admin
                    .get_status(pb::GetStatusRequest {})
                    .await?
                    .into_inner();
                anyhow::Ok(s.rekey_micros)
            }
        };
        for _ in 0..rounds {
            allow(ids[0].clone(), true).await?;
            let request = join_request(churn, &group, &q_ca)?;
            let mut d = device.clone();
            let w = writer_micros().await?;
            let t = Instant::now();
            d.join_group(pb::JoinGroupRequest { request }).await?;
            hj.record(micros(t.elapsed()))?;
            wj.record((writer_micros().await? - w).max(1))?;
            let w = writer_micros().await?;
            let t = Instant::now();
            allow(ids[0].clone(), false).await?;
            hl.record(micros(t.elapsed()))?;
            wl.record((writer_micros().await? - w).max(1))?;
        }
        let info = admin
            .show_group(pb::ShowGroupRequest { id: group.clone() })
            .await?
            .into_inner();
        println!(
            "members={size:>5} (filled in {:.1} s, epoch {}): join {}; leave {}",
            setup.as_secs_f64(),
            info.epoch,
            latency_line(&hj),
            latency_line(&hl)
        );
        println!(
            "members={size:>5} writer time per epoch: join {}; leave {}",
            latency_line(&wj),
            latency_line(&wl)
        );
    }
    Ok(())
}

fn join_request(c: &Credentials, group: &str, q_ca: &Point) -> anyhow::Result<Vec<u8>> {
    Ok(GroupKeyRequest::new(
        c.id(),
        &GroupId::new(group)?,
        Role::Subscriber,
        now_ms(),
        c.key(),
        c.group_secret(),
        q_ca,
        &mut OsRng,
    )?
    .to_bytes())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.mode {
        Mode::Issue {
            clients,
            count,
            target,
        } => issue(target, clients, *count).await,
        Mode::Membership {
            sizes,
            rounds,
            target,
        } => membership(target, sizes, *rounds).await,
    }
}
