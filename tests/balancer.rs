//! A TCP load balancer for scale-out tests, doing what the reference deployment asks of HAProxy
//! (docs/scale-out.md): it reads each connection's MQTT CONNECT, sends it to the bridge that the
//! client identifier is sticky to, and skips a bridge whose health check fails. The health check
//! of a bridge is a TCP connect to the broker node behind it (HAProxy: `check addr <node> port
//! <port>`), because a bridge whose node is gone still accepts TCP but can only refuse devices.
//!
//! Each connection is relayed byte for byte by two threads; nothing is decoded past the CONNECT.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One backend: a bridge and the broker node its health check looks at.
#[derive(Clone, Copy, Debug)]
pub struct Backend {
    /// The bridge's listening address.
    pub bridge: SocketAddr,
    /// The broker node behind that bridge.
    pub health: SocketAddr,
}

/// Chooses the preferred backend (an index) from the MQTT client identifier.
pub type Sticky = dyn Fn(&str) -> usize + Send + Sync;

/// A running balancer; it listens until the test process ends.
#[derive(Debug)]
pub struct Balancer {
    /// Where devices connect.
    pub addr: SocketAddr,
    routes: Arc<Mutex<Vec<(String, usize)>>>,
}

impl Balancer {
    /// Listens on a free loopback port in front of `backends`.
    pub fn start(backends: Vec<Backend>, sticky: Box<Sticky>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(backends);
        let sticky: Arc<Sticky> = Arc::from(sticky);
        let routes = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&routes);
        std::thread::spawn(move || {
            for device in listener.incoming().flatten() {
                let backends = Arc::clone(&backends);
                let sticky = Arc::clone(&sticky);
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let _ = relay(device, &backends, &*sticky, &log);
                });
            }
        });
        Balancer { addr, routes }
    }

    /// Every connection relayed so far: its client identifier and the backend it went to.
    pub fn routes(&self) -> Vec<(String, usize)> {
        self.routes.lock().unwrap().clone()
    }
}

fn healthy(b: &Backend) -> bool {
    TcpStream::connect_timeout(&b.health, Duration::from_millis(300)).is_ok()
}

fn relay(
    mut device: TcpStream,
    backends: &[Backend],
    sticky: &Sticky,
    routes: &Mutex<Vec<(String, usize)>>,
) -> std::io::Result<()> {
    device.set_read_timeout(Some(Duration::from_secs(10)))?;
    let connect = read_packet(&mut device)?;
    device.set_read_timeout(None)?;
    let id = client_id(&connect).unwrap_or_default();
    let preferred = sticky(&id) % backends.len();
    let order = (0..backends.len()).map(|k| (preferred + k) % backends.len());
    let mut bridge = None;
    for i in order {
        if healthy(&backends[i]) {
            if let Ok(s) = TcpStream::connect(backends[i].bridge) {
                routes.lock().unwrap().push((id.clone(), i));
                bridge = Some(s);
                break;
            }
        }
    }
    let Some(mut bridge) = bridge else {
        return device.shutdown(Shutdown::Both);
    };
    bridge.write_all(&connect)?;
    let (mut d2, mut b2) = (device.try_clone()?, bridge.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut d2, &mut b2);
        let _ = b2.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut bridge, &mut device);
    let _ = device.shutdown(Shutdown::Both);
    let _ = bridge.shutdown(Shutdown::Both);
    let _ = up.join();
    Ok(())
}

/// Reads one whole MQTT packet (fixed header, remaining length, body).
fn read_packet(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = vec![0u8; 1];
    s.read_exact(&mut out)?;
    let (mut len, mut mul) = (0usize, 1usize);
    for _ in 0..4 {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        out.push(b[0]);
        len += usize::from(b[0] & 0x7f) * mul;
        mul *= 128;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let start = out.len();
    out.resize(start + len, 0);
    s.read_exact(&mut out[start..])?;
    Ok(out)
}

/// The client identifier of an MQTT 5 CONNECT.
fn client_id(packet: &[u8]) -> Option<String> {
    let mut at = 1;
    while packet.get(at)? & 0x80 != 0 {
        at += 1;
    }
    at += 1; // end of the remaining length
    let name_len = usize::from(u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]));
    at += 2 + name_len + 1 + 1 + 2; // protocol name, level, flags, keep alive
    let (mut props, mut mul) = (0usize, 1usize);
    loop {
        let b = *packet.get(at)?;
        at += 1;
        props += usize::from(b & 0x7f) * mul;
        mul *= 128;
        if b & 0x80 == 0 {
            break;
        }
    }
    at += props;
    let id_len = usize::from(u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]));
    let id = packet.get(at + 2..at + 2 + id_len)?;
    String::from_utf8(id.to_vec()).ok()
}
