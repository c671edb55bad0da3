//! Crash safety: kill -9 the real `quva-ca` process during a storm of joins and leaves over
//! several groups, restart it, and check that nothing acknowledged was lost.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quva_ca::cli::{AdminClient, connect};
use quva_client::codec::{Decode, Encode};
use quva_client::curve::Point;
use quva_client::enrollment::{Credentials, EnrollResponse, EnrollmentSecret, ImplicitCert};
use quva_client::group::{Member, SignedGroupInfo};
use quva_client::ids::{GroupId, Role};
use quva_client::schnorr::VerifyingKey;
use quva_client::testkit::steps;
use quva_proto::v1 as pb;
use rand_core::OsRng;
use support::{DeviceClient, device_client, system_now};
use tokio_stream::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_quva-ca");
const GROUPS: [&str; 3] = ["storm/a", "storm/b", "storm/c/deep"];
const DEVICES: usize = 6;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn serve(data: &Path, port: u16, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(BIN)
        .args(["serve", "--data"])
        .arg(data)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--batch-window-ms",
            "40",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn ready(url: &str, token: &str, bridge: &str) -> (AdminClient, DeviceClient) {
    for _ in 0..600 {
        if let Ok(mut admin) = connect(url, token).await {
            if admin.get_status(pb::GetStatusRequest {}).await.is_ok() {
                return (admin, device_client(url, bridge).await);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not come up");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Join,
    Deny,
    Allow,
}

#[derive(Debug, Default)]
struct PairLog {
    last_acked: Option<Op>,
    in_flight: Option<Op>,
    max_epoch: u32,
}

type Logs = Arc<Mutex<HashMap<(usize, &'static str), PairLog>>>;

fn role_of(device: usize) -> Role {
    if device % 2 == 0 {
        Role::Subscriber
    } else {
        Role::Publisher
    }
}

fn join_request(creds: &Credentials, group: &str, ca: &Point) -> Vec<u8> {
    let group = GroupId::new(group).unwrap();
    let role = role_of(device_index(creds));
    steps::join_request(creds, &group, role, system_now(), ca, &mut OsRng).to_bytes()
}

fn device_index(creds: &Credentials) -> usize {
    creds
        .id()
        .as_str()
        .trim_start_matches("dev")
        .parse()
        .unwrap()
}

async fn enroll(
    admin: &mut AdminClient,
    device: &mut DeviceClient,
    id: &str,
    ca: &Point,
) -> Credentials {
    let secret = support::register(admin, id).await;
    let (pending, data) = steps::enroll_request(id, &secret, system_now(), &mut OsRng);
    let resp = device
        .enroll(pb::EnrollRequest { auth_data: data })
        .await
        .unwrap()
        .into_inner();
    steps::accept_enrollment(&pending, &resp.auth_data, ca)
}

#[allow(clippy::too_many_arguments)]
async fn storm_pair(
    device_idx: usize,
    group: &'static str,
    creds: Arc<Credentials>,
    ca: Point,
    mut admin: AdminClient,
    mut device: DeviceClient,
    logs: Logs,
    killed: Arc<AtomicBool>,
) {
    let role = role_of(device_idx);
    let mut op = Op::Join;
    loop {
        logs.lock()
            .unwrap()
            .entry((device_idx, group))
            .or_default()
            .in_flight = Some(op);
        let result = match op {
            Op::Join => device
                .join_group(pb::JoinGroupRequest {
                    request: join_request(&creds, group, &ca),
                })
                .await
                .map(|r| r.into_inner().epoch),
            Op::Deny | Op::Allow => admin
                .set_permission(pb::SetPermissionRequest {
                    group: group.into(),
                    device: creds.id().as_str().into(),
                    role: u32::from(role.to_u8()),
                    allow: op == Op::Allow,
                })
                .await
                .map(|r| r.into_inner().epoch),
        };
        match result {
            Ok(epoch) => {
                let mut l = logs.lock().unwrap();
                let log = l.entry((device_idx, group)).or_default();
                log.last_acked = Some(op);
                log.in_flight = None;
                log.max_epoch = log.max_epoch.max(epoch);
            }
            Err(e) => {
                assert!(
                    killed.load(Ordering::SeqCst),
                    "{op:?} failed before the kill: {e}"
                );
                return;
            }
        }
        op = match op {
            Op::Join => Op::Deny,
            Op::Deny => Op::Allow,
            Op::Allow => Op::Join,
        };
    }
}

async fn enroll_storm(
    mut admin: AdminClient,
    mut device: DeviceClient,
    ca: Point,
    acked: Arc<Mutex<BTreeMap<u64, String>>>,
    killed: Arc<AtomicBool>,
) {
    for i in 0.. {
        let id = format!("late{i}");
        let reg = admin
            .register_device(pb::RegisterDeviceRequest {
                id: id.clone(),
                note: String::new(),
                reissue: false,
                secret_validity_secs: 0,
            })
            .await;
        let Ok(reg) = reg else {
            assert!(killed.load(Ordering::SeqCst));
            return;
        };
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&reg.into_inner().enroll_secret, &mut bytes).unwrap();
        let secret = EnrollmentSecret::from_bytes(&bytes);
        let (pending, data) = steps::enroll_request(&id, &secret, system_now(), &mut OsRng);
        match device.enroll(pb::EnrollRequest { auth_data: data }).await {
            Ok(r) => {
                let resp = EnrollResponse::from_bytes(&r.into_inner().auth_data).unwrap();
                let serial = resp.cert.serial();
                pending.accept(&resp, &ca).unwrap();
                assert!(
                    acked.lock().unwrap().insert(serial, id).is_none(),
                    "serial repeated"
                );
            }
            Err(_) => {
                assert!(killed.load(Ordering::SeqCst));
                return;
            }
        }
    }
}

async fn all_notices(device: &mut DeviceClient, last: u64) -> Vec<pb::Notice> {
    let mut stream = device
        .watch_notices(pb::WatchNoticesRequest { from_seq: 1 })
        .await
        .unwrap()
        .into_inner();
    let mut out: Vec<pb::Notice> = Vec::new();
    while out.last().is_none_or(|n| n.seq < last) {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        out.push(n);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_storm_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ca");
    let log = dir.path().join("serve.log");
    let out = Command::new(BIN)
        .args(["init", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let token = token.trim().to_owned();
    let bridge = std::fs::read_to_string(data.join("bridge.token")).unwrap();
    let bridge = bridge.trim().to_owned();
    let mut ca_bytes = [0u8; 33];
    hex::decode_to_slice(
        std::fs::read_to_string(data.join("ca.pub")).unwrap().trim(),
        &mut ca_bytes,
    )
    .unwrap();
    let ca = Point::from_bytes(&ca_bytes).unwrap();

    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = serve(&data, port, &log);
    let (mut admin, mut device) = ready(&url, &token, &bridge).await;

    for g in GROUPS {
        admin
            .create_group(pb::CreateGroupRequest {
                id: g.into(),
                privacy: pb::Privacy::Standard as i32,
                rekey_interval_secs: 0,
            })
            .await
            .unwrap();
    }
    let mut creds = Vec::new();
    let acked_serials = Arc::new(Mutex::new(BTreeMap::new()));
    for i in 0..DEVICES {
        let c = enroll(&mut admin, &mut device, &format!("dev{i}"), &ca).await;
        acked_serials
            .lock()
            .unwrap()
            .insert(c.cert().serial(), c.id().as_str().to_owned());
        for g in GROUPS {
            admin
                .set_permission(pb::SetPermissionRequest {
                    group: g.into(),
                    device: c.id().as_str().into(),
                    role: u32::from(role_of(i).to_u8()),
                    allow: true,
                })
                .await
                .unwrap();
        }
        creds.push(Arc::new(c));
    }

    let logs: Logs = Arc::default();
    let killed = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, c) in creds.iter().enumerate() {
        for g in GROUPS {
            tasks.push(tokio::spawn(storm_pair(
                i,
                g,
                c.clone(),
                ca,
                admin.clone(),
                device.clone(),
                logs.clone(),
                killed.clone(),
            )));
        }
    }
    tasks.push(tokio::spawn(enroll_storm(
        admin.clone(),
        device.clone(),
        ca,
        acked_serials.clone(),
        killed.clone(),
    )));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    killed.store(true, Ordering::SeqCst);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let acked_joins = logs
        .lock()
        .unwrap()
        .values()
        .filter(|l| l.last_acked == Some(Op::Join))
        .count();
    assert!(acked_joins > 0 || logs.lock().unwrap().values().any(|l| l.max_epoch > 1));

    // Restart on the same data.
    let mut child = serve(&data, port, &log);
    let (mut admin, mut device) = ready(&url, &token, &bridge).await;
    let status = admin
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    // Retention may have compacted old epochs away (gaps); what is kept is in order and ends
    // at the last notice written.
    let notices = all_notices(&mut device, status.last_notice_seq).await;
    assert!(
        notices.windows(2).all(|w| w[0].seq < w[1].seq),
        "notice sequence out of order"
    );
    assert_eq!(notices.last().map(|n| n.seq), Some(status.last_notice_seq));

    let logs = logs.lock().unwrap().drain().collect::<HashMap<_, _>>();
    for g in GROUPS {
        let r = device
            .get_group(pb::GetGroupRequest { group: g.into() })
            .await
            .unwrap()
            .into_inner();
        let info = SignedGroupInfo::from_bytes(&r.signed_ginfo)
            .unwrap()
            .verify(&VerifyingKey(ca))
            .unwrap()
            .clone();
        // Public keys are the sums over the members.
        let members: Vec<Member> = r
            .members
            .iter()
            .map(|m| {
                let cert = ImplicitCert::from_bytes(&m.cert).unwrap();
                Member {
                    id: cert.id().clone(),
                    role: Role::from_u8(u8::try_from(m.role).unwrap()).unwrap(),
                    q: cert.open(&ca).unwrap().0,
                    g: *cert.group_base(),
                }
            })
            .collect();
        info.check_members(&members).unwrap();
        // Epochs only grew.
        let max_acked = logs
            .iter()
            .filter(|((_, lg), _)| *lg == g)
            .map(|(_, l)| l.max_epoch)
            .max()
            .unwrap_or(0);
        assert!(
            info.epoch.0 >= max_acked,
            "{g}: epoch {} < acknowledged {max_acked}",
            info.epoch
        );
        // The last notice of the group matches the state.
        let last = notices
            .iter()
            .rfind(|n| n.group == g && n.kind == pb::NoticeKind::GroupUpdated as i32)
            .unwrap();
        assert_eq!(
            last.epoch, info.epoch.0,
            "{g}: last notice is not the current epoch"
        );
        // No acknowledged change lost.
        for ((idx, lg), l) in logs.iter() {
            if *lg != g || l.in_flight.is_some() {
                continue;
            }
            let id = format!("dev{idx}");
            let present = members.iter().any(|m| m.id.as_str() == id);
            match l.last_acked {
                Some(Op::Join) => assert!(present, "{g}: acknowledged join of {id} lost"),
                Some(Op::Deny | Op::Allow) => {
                    assert!(!present, "{g}: acknowledged leave of {id} lost")
                }
                None => {}
            }
        }
    }
    drop(logs);

    // No serial repeated, none lost; new serials go on above.
    let serials = acked_serials.lock().unwrap().clone();
    for (serial, id) in &serials {
        let c = device
            .get_certificate(pb::GetCertificateRequest {
                by: Some(pb::get_certificate_request::By::Serial(*serial)),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&c.device_id, id, "serial {serial}");
    }
    let fresh = enroll(&mut admin, &mut device, "after-restart", &ca).await;
    assert!(fresh.cert().serial() > *serials.keys().next_back().unwrap());
    assert!(fresh.cert().serial() >= status.next_serial);

    child.kill().unwrap();
    child.wait().unwrap();
}
