//! Client CPU per key setup: the Quva device side against a rustls TLS 1.3 client handshake.
//!
//! Both run in one process with their peer (the CA's steps, or a rustls server) in memory, so
//! the network plays no part. Only the client's steps count: their times are summed, and each
//! runs inside a `#[inline(never)]` function whose name starts with `client_step_`, so that
//! `valgrind --tool=callgrind --toggle-collect='*client_step_*'` counts their instructions and
//! nothing else (`scripts/bench.sh` does this).
//!
//! Quva's device key setup is the four steps of a first connection: build the enrollment
//! request, accept the certificate (`cert || sc(a_i)`, ECQV reconstruction and check), build
//! the group-key request (with its proof of possession of the certificate key) and open the
//! group key from the SUBACK. A reconnection is resumption (PROTOCOL.md §4 v1.1): the
//! certificate proof of `quva-cert-v1`, the key-topic SUBSCRIBE without a group-key request, its
//! SUBACK, and the CA-signed member list that confirms the held key is current.

use std::hint::black_box;
use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use quva_client::codec::{Decode, Encode};
use quva_client::curve::KeyPair;
use quva_client::device::{
    ConnectAuth, Device, DeviceConfig, Enrollment, Output, Subscription, cert_connect_auth,
};
use quva_client::enrollment::{EnrollRequest, EnrollmentSecret};
use quva_client::group::{GroupKeyRequest, Member, Privacy};
use quva_client::ids::{DeviceId, Epoch, GroupId, Role};
use quva_client::rekey::{GroupState, Plan};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use serde::Serialize;

use crate::tls::{Auth, Pki, server_name};

/// What one iteration does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Op {
    /// Quva first connection: enrollment request, certificate, group-key request, group key.
    QuvaSetup,
    /// Quva reconnection (resumption): certificate proof, resumed subscription, member list.
    QuvaReconnect,
    /// rustls TLS 1.3 handshake, ECDSA P-256 server certificate, no client certificate.
    TlsServerOnly,
    /// The same with an ECDSA P-256 client certificate.
    TlsMutual,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 4] = [
        Op::QuvaSetup,
        Op::QuvaReconnect,
        Op::TlsServerOnly,
        Op::TlsMutual,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Op::QuvaSetup => "quva-setup",
            Op::QuvaReconnect => "quva-reconnect",
            Op::TlsServerOnly => "tls-server-only",
            Op::TlsMutual => "tls-mutual",
        }
    }
}

const NOW: u64 = 1_900_000_000_000;
const WINDOW: u64 = 60_000;

/// The CA's side of Quva, in memory.
struct QuvaPeer {
    rng: ChaCha20Rng,
    ca: KeyPair,
    group: GroupId,
    serial: u64,
}

impl QuvaPeer {
    fn new() -> anyhow::Result<Self> {
        let mut rng = ChaCha20Rng::seed_from_u64(42);
        let ca = KeyPair::random(&mut rng);
        Ok(QuvaPeer {
            rng,
            ca,
            group: GroupId::new("bench/cpu")?,
            serial: 0,
        })
    }

    fn issue(&mut self, secret: &EnrollmentSecret, request: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.serial += 1;
        let issued = EnrollRequest::from_bytes(request)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .verify(secret, NOW, WINDOW)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .issue(
                &self.ca,
                self.serial,
                NOW - 1000,
                NOW + 86_400_000,
                &mut self.rng,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(issued.to_bytes())
    }

    /// Answers a group-key request with a fresh group (one join each, like the first member);
    /// also returns the group's member list (`quva/c/<group>`) after the join.
    fn deliver(
        &mut self,
        device: &Device,
        sub: &Subscription,
    ) -> anyhow::Result<(String, Vec<u8>)> {
        let text = sub
            .group_key_request
            .as_deref()
            .context("no group-key request")?;
        let req = GroupKeyRequest::from_property(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let cert = device.credentials().cert();
        let member = Member {
            id: device.id().clone(),
            role: Role::Subscriber,
            q: cert
                .open(self.ca.public())
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .0,
            g: *cert.group_base(),
        };
        let joined = req
            .open(&self.ca, &member, NOW, WINDOW)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut state = GroupState::create(
            &self.ca,
            self.group.clone(),
            Privacy::Standard,
            Epoch(0),
            NOW,
            &mut self.rng,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Plan::Rekey(staged) = state
            .stage_join(&self.ca, joined, NOW, &mut self.rng)
            .map_err(|e| anyhow::anyhow!("{e}"))?
        {
            state.commit(*staged).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let delivery = state
            .delivery(&member, &mut self.rng)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .to_property();
        let list = quva_client::members::MemberList::encode(
            state.signed_info(),
            &[(Role::Subscriber, cert)],
        );
        Ok((delivery, list))
    }
}

#[inline(never)]
fn client_step_enroll_request(
    id: &DeviceId,
    secret: &EnrollmentSecret,
    peer: &QuvaPeer,
    rng: &mut ChaCha20Rng,
) -> (Enrollment, ConnectAuth) {
    Enrollment::start(id.clone(), secret, *peer.ca.public(), NOW, rng)
}

#[inline(never)]
fn client_step_accept_certificate(
    e: Enrollment,
    answer: &[u8],
    peer: &QuvaPeer,
) -> anyhow::Result<Device> {
    let creds = e.finish(Some(answer)).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Device::new(
        creds,
        *peer.ca.public(),
        DeviceConfig::default(),
    ))
}

#[inline(never)]
fn client_step_certificate_proof(
    device: &Device,
    rng: &mut ChaCha20Rng,
) -> anyhow::Result<ConnectAuth> {
    cert_connect_auth(device.credentials(), "bench-cpu-1", NOW, rng)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

#[inline(never)]
fn client_step_group_key_request(
    device: &mut Device,
    group: &GroupId,
    rng: &mut ChaCha20Rng,
) -> anyhow::Result<Subscription> {
    device
        .join(group, Role::Subscriber, false, NOW, rng)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

#[inline(never)]
fn client_step_open_group_key(
    device: &mut Device,
    sub: &Subscription,
    delivery: &str,
    rng: &mut ChaCha20Rng,
) -> anyhow::Result<Vec<Output>> {
    let codes = vec![1u8; sub.filters.len()];
    device
        .on_suback(&sub.purpose, &codes, Some(delivery), NOW, rng)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// One Quva key setup; returns the client's time.
fn quva_once(
    peer: &mut QuvaPeer,
    reconnect: bool,
    i: usize,
    rng: &mut ChaCha20Rng,
) -> anyhow::Result<Duration> {
    let id = DeviceId::new(&format!("cpu-{i}"))?;
    let secret = EnrollmentSecret::random(&mut peer.rng);
    let mut spent = Duration::ZERO;
    let group = peer.group.clone();
    if reconnect {
        // A device that enrolled and joined earlier: none of that is part of the count.
        let (e, auth) = Enrollment::start(id, &secret, *peer.ca.public(), NOW, rng);
        let answer = peer.issue(&secret, &auth.data)?;
        let creds = e
            .finish(Some(&answer))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut device = Device::new(creds, *peer.ca.public(), DeviceConfig::default());
        // (Not through the client_step_* functions: callgrind counts only those.)
        let sub = device
            .join(&group, Role::Subscriber, false, NOW, rng)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (delivery, list) = peer.deliver(&device, &sub)?;
        let codes = vec![1u8; sub.filters.len()];
        device
            .on_suback(&sub.purpose, &codes, Some(&delivery), NOW, rng)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // The retained member list that came with the join.
        let topic = quva_client::members::topic(&group);
        device.on_publish(&topic, &list, NOW, rng);
        // The reconnection.
        let t = Instant::now();
        black_box(client_step_certificate_proof(&device, rng)?);
        let subs = client_step_resume(&mut device, rng)?;
        spent += t.elapsed();
        let [sub] = subs.as_slice() else {
            bail!("expected one resumed subscription");
        };
        if sub.group_key_request.is_some() {
            bail!("the reconnection asked for a group key");
        }
        let t = Instant::now();
        black_box(client_step_resumed(&mut device, sub, &list, rng)?);
        spent += t.elapsed();
        if !device.is_current(&group, Role::Subscriber) {
            bail!("the member list did not confirm the held key");
        }
        return Ok(spent);
    }
    let t = Instant::now();
    let (e, auth) = client_step_enroll_request(&id, &secret, peer, rng);
    spent += t.elapsed();
    let answer = peer.issue(&secret, &auth.data)?;
    let t = Instant::now();
    let mut device = client_step_accept_certificate(e, &answer, peer)?;
    spent += t.elapsed();
    let t = Instant::now();
    let sub = client_step_group_key_request(&mut device, &group, rng)?;
    spent += t.elapsed();
    let (delivery, _) = peer.deliver(&device, &sub)?;
    let t = Instant::now();
    black_box(client_step_open_group_key(
        &mut device,
        &sub,
        &delivery,
        rng,
    )?);
    spent += t.elapsed();
    if device.keyring(&group, Role::Subscriber).is_none() {
        bail!("the device did not adopt the group key");
    }
    Ok(spent)
}

#[inline(never)]
fn client_step_resume(
    device: &mut Device,
    rng: &mut ChaCha20Rng,
) -> anyhow::Result<Vec<Subscription>> {
    device
        .resume_all(NOW, rng)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The resumed subscription's SUBACK, then the retained member list on `quva/c/<group>` (the same
/// bytes the device verified before the link dropped: it is not verified again).
#[inline(never)]
fn client_step_resumed(
    device: &mut Device,
    sub: &Subscription,
    list: &[u8],
    rng: &mut ChaCha20Rng,
) -> anyhow::Result<Vec<Output>> {
    let codes = vec![1u8; sub.filters.len()];
    let mut out = device
        .on_suback(&sub.purpose, &codes, None, NOW, rng)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let topic = quva_client::members::topic(&sub_group(sub)?);
    out.extend(device.on_publish(&topic, list, NOW, rng));
    Ok(out)
}

fn sub_group(sub: &Subscription) -> anyhow::Result<GroupId> {
    let key_topic = sub.filters.first().context("no filter")?;
    let g = key_topic
        .strip_prefix("quva/k/")
        .and_then(|t| t.rsplit_once('/'))
        .map(|(g, _)| g)
        .context("not a key topic")?;
    Ok(GroupId::new(g)?)
}

#[inline(never)]
fn client_step_tls_new(cfg: &Arc<ClientConfig>) -> anyhow::Result<ClientConnection> {
    Ok(ClientConnection::new(cfg.clone(), server_name())?)
}

#[inline(never)]
fn client_step_tls_write(c: &mut ClientConnection, out: &mut Vec<u8>) -> anyhow::Result<()> {
    while c.wants_write() {
        c.write_tls(out)?;
    }
    Ok(())
}

#[inline(never)]
fn client_step_tls_read(c: &mut ClientConnection, mut input: &[u8]) -> anyhow::Result<()> {
    while !input.is_empty() {
        c.read_tls(&mut input)?;
        c.process_new_packets()?;
    }
    Ok(())
}

/// One full TLS 1.3 handshake in memory; returns the client's time.
fn tls_once(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> anyhow::Result<Duration> {
    let mut spent = Duration::ZERO;
    let t = Instant::now();
    let mut c = client_step_tls_new(client)?;
    spent += t.elapsed();
    let mut s = ServerConnection::new(server.clone())?;
    let mut to_server = Vec::new();
    let mut to_client = Vec::new();
    for _ in 0..16 {
        to_server.clear();
        let t = Instant::now();
        client_step_tls_write(&mut c, &mut to_server)?;
        spent += t.elapsed();
        let mut input = &to_server[..];
        while !input.is_empty() {
            s.read_tls(&mut input)?;
            s.process_new_packets()?;
        }
        to_client.clear();
        while s.wants_write() {
            s.write_tls(&mut to_client)?;
        }
        let t = Instant::now();
        client_step_tls_read(&mut c, &to_client)?;
        spent += t.elapsed();
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            // Application data both ways proves the keys agree.
            c.writer().write_all(b"ping")?;
            to_server.clear();
            client_step_tls_write(&mut c, &mut to_server)?;
            let mut input = &to_server[..];
            while !input.is_empty() {
                s.read_tls(&mut input)?;
                s.process_new_packets()?;
            }
            let mut got = [0u8; 4];
            s.reader().read_exact(&mut got)?;
            if &got != b"ping" {
                bail!("TLS data did not arrive");
            }
            return Ok(spent);
        }
    }
    bail!("the TLS handshake did not finish")
}

/// Runs `op` `n` times after one warm-up run; returns each run's client time.
///
/// # Errors
/// Any failure of the protocol.
pub fn run(op: Op, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let mut times = Vec::with_capacity(n);
    match op {
        Op::QuvaSetup | Op::QuvaReconnect => {
            let mut peer = QuvaPeer::new()?;
            for i in 0..=n {
                let t = quva_once(&mut peer, op == Op::QuvaReconnect, i, &mut rng)?;
                if i > 0 {
                    times.push(t);
                }
            }
        }
        Op::TlsServerOnly | Op::TlsMutual => {
            let auth = if op == Op::TlsMutual {
                Auth::Mutual
            } else {
                Auth::ServerOnly
            };
            let pki = Pki::generate()?;
            let client = pki.client_config(auth)?;
            let server = pki.server_config(auth)?;
            for i in 0..=n {
                let t = tls_once(&client, &server)?;
                if i > 0 {
                    times.push(t);
                }
            }
        }
    }
    Ok(times)
}

/// Median and mean client time of one operation.
#[derive(Clone, Debug, Serialize)]
pub struct CpuTime {
    /// The operation.
    pub op: &'static str,
    /// Runs.
    pub runs: usize,
    /// Median, µs.
    pub median_us: f64,
    /// Mean, µs.
    pub mean_us: f64,
}

/// Times every operation `n` times.
///
/// # Errors
/// Any failure of the protocol.
pub fn times(n: usize) -> anyhow::Result<Vec<CpuTime>> {
    Op::ALL
        .iter()
        .map(|&op| {
            let mut t = run(op, n)?;
            t.sort();
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            Ok(CpuTime {
                op: op.name(),
                runs: n,
                median_us: t.get(n / 2).map_or(0.0, |d| us(*d)),
                mean_us: t.iter().map(|d| us(*d)).sum::<f64>() / n.max(1) as f64,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_client_operation_completes() {
        for op in Op::ALL {
            let times = run(op, 2).unwrap();
            assert_eq!(times.len(), 2, "{}", op.name());
        }
    }
}
