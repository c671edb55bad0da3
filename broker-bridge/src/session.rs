//! One device connection: the handshake, then the relay between the device and its own upstream
//! connection.
//!
//! Implements the bridge's part of PROTOCOL.md §3 (CONNECT/CONNACK authentication), §4 (the
//! `quva-gk` SUBSCRIBE/SUBACK exchange) and §6 (PUBLISH checks), over MQTT 5 (MQTT 3.1.1 clients
//! only for unprotected topics). The decisions live in sans-IO parts: [`rules`] (CONNECT,
//! CONNACK, filters, topics, acknowledgement order) and [`machine`] (the per-connection
//! [`Session`] state machine that turns events into actions), the same for both MQTT versions
//! (MQTT 3.1.1 packets pass through [`crate::dialect`]). This file only moves bytes, timers and
//! work: one task per connection reads both sockets, carries out the session's actions and runs
//! the work it asks for (the CA gateway, the publish checker).

pub(crate) mod machine;
pub(crate) mod rules;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use quva_client::codec::{Decode, Encode};
use quva_client::enrollment::{AuthMethod, CertConnectProof, EnrollResponse, GroupConnectProof};
use quva_client::group::{GroupKeyRequest, Privacy};
use quva_client::ids::GroupId;
use quva_client::schnorr::VerifyingKey;
use rmqtt_codec::v5::{self, ConnectAckReason, DisconnectReasonCode};
use rmqtt_codec::version::{ProtocolVersion, VersionCodec};
use rmqtt_codec::{MqttCodec, MqttPacket, v3};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use self::machine::{
    Action, Answer, Ask, DeviceFailure, Ending, Limits, Note, Out, Session, UpstreamFailure, Work,
};
use crate::ca::{connack_reason, suback_reason};
use crate::dialect::{Dialect, connack_to_v3, to_v5};
use crate::frames::{Upstream, UpstreamCodec};
use crate::identity::Identity;
use crate::reasons::{ConnectRefusal, SubscribeRefusal};
use crate::shared::{Shared, now_ms};
use crate::topics::topic_device_id;
use crate::verify::{Dropped, Protected, Verdict, check_batch, has_role};

type DeviceReader = FramedRead<OwnedReadHalf, MqttCodec>;
type DeviceWriter = FramedWrite<OwnedWriteHalf, MqttCodec>;
type Decoded = Result<(MqttPacket, u32), rmqtt_codec::error::DecodeError>;

/// Serves one accepted TCP connection until it ends.
pub(crate) async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut reader = FramedRead::with_capacity(rd, MqttCodec::Version(VersionCodec), READ_BUFFER);
    let handshake = Duration::from_millis(shared.cfg.limits.handshake_timeout_ms);
    let deadline = Instant::now() + handshake;
    let version = match tokio::time::timeout(handshake, reader.next()).await {
        Ok(Some(Ok((MqttPacket::Version(v), _)))) => v,
        Ok(_) => {
            shared.metrics.refused("malformed_connect");
            return;
        }
        Err(_) => {
            shared.metrics.refused("handshake_timeout");
            return;
        }
    };
    let dialect = match version {
        ProtocolVersion::MQTT5 => Dialect::Mqtt5,
        ProtocolVersion::MQTT3 => Dialect::Mqtt311,
    };
    *reader.decoder_mut() = dialect.codec(shared.cfg.limits.max_packet_size);
    if version == ProtocolVersion::MQTT5
        && let Some(at) = rules::empty_id_without_clean_start(reader.read_buffer())
        && let Some(flags) = reader.read_buffer_mut().get_mut(at)
    {
        *flags |= 0x02;
    }
    let first = tokio::time::timeout_at(deadline.into(), reader.next()).await;
    let mut writer = FramedWrite::new(wr, dialect.codec(0));
    *writer.write_buffer_mut() = bytes::BytesMut::with_capacity(WRITE_BUFFER);
    match first {
        Ok(Some(Ok((MqttPacket::V5(v5::Packet::Connect(c)), _)))) => {
            accept_v5(reader, writer, c, shared).await;
        }
        Ok(Some(Ok((MqttPacket::V3(v3::Packet::Connect(c)), _)))) => {
            accept_v3(reader, writer, c, shared).await;
        }
        Ok(Some(Err(rmqtt_codec::error::DecodeError::MaxSizeExceeded { .. }))) => {
            shared.metrics.refused("oversize");
            if version == ProtocolVersion::MQTT5 {
                let ack = connack(ConnectRefusal::PacketTooLarge.v5());
                let _ = writer.send(MqttPacket::V5(ack)).await;
            }
        }
        Ok(Some(Err(rmqtt_codec::error::DecodeError::InvalidClientId)))
            if version == ProtocolVersion::MQTT5 =>
        {
            // An empty client identifier with Clean Start 0: there is no session to resume, and
            // the broker would refuse it too (MQTT 5 §3.1.3.1).
            shared.metrics.refused("client_id");
            let ack = connack(ConnectRefusal::ClientIdentifierNotValid.v5());
            let _ = writer.send(MqttPacket::V5(ack)).await;
        }
        Err(_) => shared.metrics.refused("handshake_timeout"),
        _ => shared.metrics.refused("malformed_connect"),
    }
}

fn connack(reason: ConnectAckReason) -> v5::Packet {
    v5::Packet::ConnectAck(Box::new(v5::ConnectAck {
        reason_code: reason,
        ..Default::default()
    }))
}

fn disconnect(reason: DisconnectReasonCode) -> v5::Packet {
    v5::Packet::Disconnect(v5::Disconnect {
        reason_code: reason,
        session_expiry_interval_secs: None,
        server_reference: None,
        reason_string: None,
        user_properties: Vec::new(),
    })
}

/// The outcome of the CONNECT checks.
struct Admission {
    identity: Identity,
    /// Authentication Method and Data to put into the CONNACK.
    method: Option<ByteString>,
    data: Option<Bytes>,
}

/// Checks the CONNECT's authentication (PROTOCOL.md §3 and §6). `Err` is the CONNACK refusal.
async fn admit(shared: &Shared, connect: &v5::Connect) -> Result<Admission, ConnectRefusal> {
    let Some(method_name) = connect.auth_method.as_ref() else {
        return if shared.cfg.topics.unauthenticated_allowed() {
            Ok(Admission {
                identity: Identity::Anonymous,
                method: None,
                data: None,
            })
        } else {
            Err(ConnectRefusal::NotAuthorized)
        };
    };
    let method =
        AuthMethod::from_name(method_name).ok_or(ConnectRefusal::BadAuthenticationMethod)?;
    let data = connect
        .auth_data
        .as_ref()
        .ok_or(ConnectRefusal::PayloadFormatInvalid)?
        .to_vec();
    let now = now_ms();
    let window = shared.cfg.windows.timestamp_ms;
    let echo = Some(method_name.clone());
    match method {
        AuthMethod::Enroll | AuthMethod::Renew => {
            let ca = shared
                .ca_client()
                .ok_or(ConnectRefusal::ServerUnavailable)?;
            let call = match method {
                AuthMethod::Enroll => ("enroll", ca.enroll(data)),
                _ => ("renew", ca.renew(data)),
            };
            let response = shared
                .ca_call(call.0, call.1)
                .await
                .map_err(|e| connack_reason(&e))?;
            let parsed = EnrollResponse::from_bytes(&response)
                .map_err(|_| ConnectRefusal::ServerUnavailable)?;
            let id =
                topic_device_id(parsed.cert.id().as_str()).ok_or(ConnectRefusal::NotAuthorized)?;
            Ok(Admission {
                identity: Identity::Device(id),
                method: echo,
                data: Some(Bytes::from(response)),
            })
        }
        AuthMethod::Cert => {
            let ca_key = shared
                .ca_public()
                .ok_or(ConnectRefusal::ServerUnavailable)?;
            let proof = CertConnectProof::from_bytes(&data)
                .map_err(|e| refusal(&quva_client::enrollment::EnrollError::from(e)))?;
            proof
                .verify(&ca_key, &connect.client_id, now, window)
                .map_err(|e| refusal(&e))?;
            let cert = &proof.cert;
            let id = topic_device_id(cert.id().as_str()).ok_or(ConnectRefusal::NotAuthorized)?;
            if shared.dir.is_superseded(&id, cert.serial())
                || !shared.certificate_usable(cert.serial(), &data).await?
            {
                return Err(ConnectRefusal::NotAuthorized);
            }
            let identity = Identity::Device(id);
            shared.check_nonce(&identity, proof.nonce, proof.t_ms, now)?;
            Ok(Admission {
                identity,
                method: echo,
                data: None,
            })
        }
        AuthMethod::Group => {
            let proof = GroupConnectProof::from_bytes(&data)
                .map_err(|e| refusal(&quva_client::enrollment::EnrollError::from(e)))?;
            match shared.ensure_group(&proof.group).await {
                Ok(()) => {}
                Err(crate::ca::CaError::Unavailable) => {
                    return Err(ConnectRefusal::ServerUnavailable);
                }
                Err(_) => return Err(ConnectRefusal::NotAuthorized),
            }
            if shared.dir.privacy(&proof.group) != Some(Privacy::Anonymous) {
                return Err(ConnectRefusal::NotAuthorized);
            }
            let keys = shared
                .dir
                .current_keys(&proof.group)
                .ok_or(ConnectRefusal::NotAuthorized)?;
            proof
                .verify(
                    &VerifyingKey(keys.q_p),
                    &VerifyingKey(keys.q_s),
                    &connect.client_id,
                    now,
                    window,
                )
                .map_err(|e| refusal(&e))?;
            let identity = Identity::Group(proof.group.clone(), proof.role);
            shared.check_nonce(&identity, proof.nonce, proof.t_ms, now)?;
            Ok(Admission {
                identity,
                method: echo,
                data: None,
            })
        }
    }
}

/// The refusal for a failed connect proof.
fn refusal(e: &quva_client::enrollment::EnrollError) -> ConnectRefusal {
    ConnectRefusal::from_code(e.connack_reason())
}

/// Opens the upstream TCP connection.
async fn dial_upstream(shared: &Shared) -> Option<TcpStream> {
    let t = Duration::from_millis(shared.cfg.upstream.connect_timeout_ms);
    match tokio::time::timeout(t, TcpStream::connect(&shared.cfg.upstream.address)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        _ => None,
    }
}

type UpReader = FramedRead<OwnedReadHalf, UpstreamCodec>;
type UpWriter = FramedWrite<OwnedWriteHalf, MqttCodec>;

/// Connects upstream in `dialect` and sends `connect`; returns the streams and the broker's
/// CONNACK (as MQTT 5, [`crate::dialect`]).
async fn connect_upstream(
    shared: &Shared,
    dialect: Dialect,
    connect: MqttPacket,
) -> Option<(UpReader, UpWriter, Box<v5::ConnectAck>)> {
    let stream = dial_upstream(shared).await?;
    let (rd, wr) = stream.into_split();
    let max_in = shared.cfg.limits.max_packet_size;
    let codec = UpstreamCodec::new(dialect, max_in);
    let mut reader = FramedRead::with_capacity(rd, codec, READ_BUFFER);
    let mut writer = FramedWrite::new(wr, dialect.codec(0));
    *writer.write_buffer_mut() = bytes::BytesMut::with_capacity(WRITE_BUFFER);
    writer.send(connect).await.ok()?;
    let t = Duration::from_millis(shared.cfg.upstream.connect_timeout_ms);
    match tokio::time::timeout(t, reader.next()).await {
        Ok(Some(Ok(Upstream::Packet(v5::Packet::ConnectAck(ack))))) => Some((reader, writer, ack)),
        _ => None,
    }
}

/// An MQTT 5 CONNECT: the Will and authentication are checked (PROTOCOL.md §3, §8) and the
/// CONNECT relayed; then [`Relay`] runs the connection.
async fn accept_v5(
    reader: DeviceReader,
    mut writer: DeviceWriter,
    connect: Box<v5::Connect>,
    shared: Arc<Shared>,
) {
    let client_id = connect.client_id.clone();
    if let Some(will) = &connect.last_will
        && !shared.policy.will_allowed(&will.topic)
    {
        shared.metrics.refused("will");
        tracing::info!(client_id = %client_id, topic = %will.topic, "CONNECT refused: Will on a protected or reserved topic");
        let _ = writer
            .send(MqttPacket::V5(connack(ConnectRefusal::NotAuthorized.v5())))
            .await;
        return;
    }
    let admission = match admit(&shared, &connect).await {
        Ok(a) => a,
        Err(refusal) => {
            shared.metrics.refused("auth");
            tracing::info!(client_id = %client_id, reason = refusal.code(), "CONNECT refused");
            let _ = writer.send(MqttPacket::V5(connack(refusal.v5()))).await;
            return;
        }
    };
    // An empty client identifier gets one from the bridge (MQTT 5 §3.1.3.1), returned in the
    // CONNACK; upstream every identifier is namespaced by the identity (PROTOCOL.md §8).
    let assigned = client_id.is_empty().then(assigned_client_id);
    let effective_id = assigned.as_ref().unwrap_or(&client_id);
    let our_max = shared.cfg.limits.max_packet_size;
    let upstream = rules::Upstream {
        username: shared.cfg.upstream.username.clone().map(ByteString::from),
        password: shared.upstream_password.clone().map(Bytes::from),
        max_packet_size: our_max,
    };
    let up_connect =
        rules::upstream_connect(&connect, &admission.identity, effective_id, &upstream);
    let keep_alive = rules::keep_alive_for(
        &admission.identity,
        connect.keep_alive,
        shared.cfg.limits.idle_timeout_ms,
    );
    if let Some(m) = connect.max_packet_size
        && let MqttCodec::V5(c) = writer.encoder_mut()
    {
        c.set_max_outbound_size(m.get());
    }
    let up_connect = MqttPacket::V5(v5::Packet::Connect(Box::new(up_connect)));
    let Some((up_reader, up_writer, up_ack)) =
        connect_upstream(&shared, Dialect::Mqtt5, up_connect).await
    else {
        shared.metrics.refused("upstream_unavailable");
        if admission.data.is_some() {
            // A certificate was issued: deliver it, then say the broker is unavailable.
            let mut ack = v5::ConnectAck {
                auth_method: admission.method,
                auth_data: admission.data,
                topic_alias_max: 0,
                ..Default::default()
            };
            ack.reason_string = Some("broker unavailable".into());
            let _ = writer.send(MqttPacket::V5(ack.into())).await;
            let _ = writer
                .send(MqttPacket::V5(disconnect(DisconnectReasonCode::ServerBusy)))
                .await;
        } else {
            let _ = writer
                .send(MqttPacket::V5(connack(
                    ConnectRefusal::ServerUnavailable.v5(),
                )))
                .await;
        }
        return;
    };
    let grant = rules::Grant {
        method: admission.method,
        data: admission.data,
        assigned,
        asked_keep_alive: connect.keep_alive,
        keep_alive,
    };
    let ack = rules::device_connack(*up_ack, grant, our_max);
    let accepted = ack.reason_code == ConnectAckReason::Success;
    if writer.send(MqttPacket::V5(ack.into())).await.is_err() || !accepted {
        return;
    }
    tracing::debug!(client_id = %client_id, identity = ?admission.identity, "connected");
    let relay = Relay {
        dialect: Dialect::Mqtt5,
        device: (reader, writer),
        upstream: (up_reader, up_writer),
    };
    relay
        .serve(&shared, &admission.identity, &client_id, keep_alive)
        .await;
}

/// An MQTT 3.1.1 client: unauthenticated, unprotected topics only (PROTOCOL.md §8). The CONNECT
/// is checked and relayed here; then the same [`Session`] as for MQTT 5 runs the connection.
async fn accept_v3(
    reader: DeviceReader,
    mut writer: DeviceWriter,
    connect: Box<v3::Connect>,
    shared: Arc<Shared>,
) {
    let client_id = connect.client_id.clone();
    let refusal = if connect
        .last_will
        .as_ref()
        .is_some_and(|w| !shared.policy.will_allowed(&w.topic))
    {
        Some("will")
    } else if !shared.cfg.topics.unauthenticated_allowed() {
        Some("auth")
    } else {
        None
    };
    if let Some(label) = refusal {
        shared.metrics.refused(label);
        tracing::info!(client_id = %client_id, reason = label, "MQTT 3.1.1 CONNECT refused");
        let ack = connack_v3(ConnectRefusal::NotAuthorized.v3(), false);
        let _ = writer.send(ack).await;
        return;
    }
    let effective_id = if client_id.is_empty() {
        assigned_client_id()
    } else {
        client_id.clone()
    };
    let upstream = rules::Upstream {
        username: shared.cfg.upstream.username.clone().map(ByteString::from),
        password: shared.upstream_password.clone().map(Bytes::from),
        max_packet_size: shared.cfg.limits.max_packet_size,
    };
    let up_connect = rules::upstream_connect_v3(&connect, &effective_id, &upstream);
    let up_connect = MqttPacket::V3(v3::Packet::Connect(Box::new(up_connect)));
    let Some((up_reader, up_writer, up_ack)) =
        connect_upstream(&shared, Dialect::Mqtt311, up_connect).await
    else {
        shared.metrics.refused("upstream_unavailable");
        let ack = connack_v3(ConnectRefusal::ServerUnavailable.v3(), false);
        let _ = writer.send(ack).await;
        return;
    };
    // The broker's answer, a refusal too, reaches the client as the broker gave it.
    let code = connack_to_v3(up_ack.reason_code);
    let ack = connack_v3(code, up_ack.session_present);
    if writer.send(ack).await.is_err() || code != v3::ConnectAckReason::ConnectionAccepted {
        return;
    }
    let keep_alive = rules::keep_alive_for(
        &Identity::Anonymous,
        connect.keep_alive,
        shared.cfg.limits.idle_timeout_ms,
    );
    let relay = Relay {
        dialect: Dialect::Mqtt311,
        device: (reader, writer),
        upstream: (up_reader, up_writer),
    };
    relay
        .serve(&shared, &Identity::Anonymous, &client_id, keep_alive)
        .await;
}

/// An MQTT 3.1.1 CONNACK.
fn connack_v3(return_code: v3::ConnectAckReason, session_present: bool) -> MqttPacket {
    MqttPacket::V3(v3::Packet::ConnectAck(v3::ConnectAck {
        return_code,
        session_present,
    }))
}

/// Silence after which a connection ends: 1.5 × the keep-alive (MQTT 5 §3.1.2.10), or the idle
/// timeout when the client asked for none.
fn idle_ms(keep_alive: u16, idle_timeout_ms: u64) -> Option<u64> {
    if keep_alive > 0 {
        Some(u64::from(keep_alive) * 1500)
    } else {
        (idle_timeout_ms > 0).then_some(idle_timeout_ms)
    }
}

/// A fresh client identifier for a client that sent an empty one.
fn assigned_client_id() -> ByteString {
    let mut b = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    ByteString::from(format!(
        "qa-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    ))
}

/// Initial read and write buffers of each socket: an idle connection holds two of each, and a
/// burst grows them as needed.
const READ_BUFFER: usize = 1024;
const WRITE_BUFFER: usize = 1024;

/// Bytes gathered for the device before a write even if more is waiting.
const WRITE_BATCH: usize = 64 * 1024;

/// Packets read from one side at once before the other side gets its turn.
const READ_BURST: usize = 256;

/// How long the last words to each side may take when a connection ends.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Work running for a session ([`Work`]).
type WorkFuture = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// Both ends of an accepted connection.
struct Relay {
    dialect: Dialect,
    device: (DeviceReader, DeviceWriter),
    upstream: (UpReader, UpWriter),
}

impl Relay {
    /// Runs the accepted connection of `identity` until it ends, reachable by kicks meanwhile.
    async fn serve(
        self,
        shared: &Arc<Shared>,
        identity: &Identity,
        client_id: &str,
        keep_alive: u16,
    ) {
        let kick = shared.sessions.register(identity);
        let limits = Limits {
            max_batch: shared.cfg.limits.max_batch,
            idle_ms: idle_ms(keep_alive, shared.cfg.limits.idle_timeout_ms),
        };
        self.run(shared, identity, client_id, limits, &kick).await;
        shared.sessions.unregister(identity, &kick);
    }

    /// Moves bytes, timers and work for the connection's [`Session`] until it ends. Whatever is
    /// ready at once is read in one go and written in one go: raw deliveries are appended to the
    /// device's write buffer as they are, packets are encoded into it, and each side is flushed
    /// once per round.
    async fn run(
        self,
        shared: &Arc<Shared>,
        identity: &Identity,
        client_id: &str,
        limits: Limits,
        kick: &CancellationToken,
    ) {
        let Relay {
            dialect,
            device: (mut device_rd, mut device_wr),
            upstream: (mut up_rd, mut up_wr),
        } = self;
        let started = tokio::time::Instant::now();
        let now = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut session = Session::new(&shared.policy, identity.clone(), dialect, limits, 0);
        let mut work: Option<WorkFuture> = None;
        loop {
            while let Some(action) = session.next_action() {
                match action {
                    Action::Device(Out::Raw(frame)) => {
                        device_wr.write_buffer_mut().extend_from_slice(&frame);
                        if device_wr.write_buffer().len() >= WRITE_BATCH
                            && device_wr.flush().await.is_err()
                        {
                            session.device_failed(DeviceFailure::Gone);
                        }
                    }
                    Action::Device(Out::Packet(p)) => {
                        if let Some(p) = dialect.wire(p)
                            && device_wr.feed(p).await.is_err()
                        {
                            session.device_failed(DeviceFailure::Gone);
                        }
                    }
                    Action::Upstream(p) => {
                        if let Some(p) = dialect.wire(p)
                            && up_wr.feed(p).await.is_err()
                        {
                            session.upstream_failed(UpstreamFailure::Closed);
                        }
                    }
                    Action::Work(w) => work = Some(start_work(shared.clone(), identity.clone(), w)),
                    Action::Note(n) => note(shared, client_id, n),
                    Action::Close(ending) => {
                        let last_words = close(dialect, device_wr, up_wr, ending);
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, last_words).await;
                        return;
                    }
                }
            }
            if device_wr.flush().await.is_err() {
                session.device_failed(DeviceFailure::Gone);
                continue;
            }
            if up_wr.flush().await.is_err() {
                session.upstream_failed(UpstreamFailure::Closed);
                continue;
            }
            let deadline = session
                .deadline_ms()
                .map(|ms| started + Duration::from_millis(ms));
            tokio::select! {
                () = shared.stop.cancelled() => session.shutdown(),
                () = kick.cancelled() => session.kick(),
                () = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => session.tick(now()),
                answer = async {
                    match work.as_mut() {
                        Some(w) => w.await,
                        None => std::future::pending().await,
                    }
                }, if work.is_some() => {
                    work = None;
                    session.answered(answer, now());
                }
                next = device_rd.next(), if session.wants_device_input() => {
                    from_device(&mut session, next, now());
                    for _ in 0..READ_BURST {
                        if !session.wants_device_input() || session.batch_full() {
                            break;
                        }
                        match device_rd.next().now_or_never() {
                            Some(next) => from_device(&mut session, next, now()),
                            None => break,
                        }
                    }
                    session.input_drained();
                }
                next = up_rd.next() => {
                    from_upstream(&mut session, next);
                    for _ in 0..READ_BURST {
                        match up_rd.next().now_or_never() {
                            Some(next) if !session.is_ended() => from_upstream(&mut session, next),
                            _ => break,
                        }
                    }
                }
            }
        }
    }
}

fn from_device(session: &mut Session<'_>, next: Option<Decoded>, now_ms: u64) {
    use rmqtt_codec::error::DecodeError as E;
    match next {
        Some(Ok((MqttPacket::V5(p), _))) => session.device_packet(p, now_ms),
        Some(Ok((MqttPacket::V3(p), _))) => session.device_packet(to_v5(p), now_ms),
        None | Some(Err(E::Io(_))) => session.device_failed(DeviceFailure::Gone),
        Some(Err(E::MaxSizeExceeded { .. })) => session.device_failed(DeviceFailure::Oversize),
        Some(_) => session.device_failed(DeviceFailure::Malformed),
    }
}

fn from_upstream(
    session: &mut Session<'_>,
    next: Option<Result<Upstream, rmqtt_codec::error::DecodeError>>,
) {
    match next {
        Some(Ok(up)) => session.upstream(up),
        Some(Err(_)) => session.upstream_failed(UpstreamFailure::Malformed),
        None => session.upstream_failed(UpstreamFailure::Closed),
    }
}

/// The last words to each side ([`Ending`], none in MQTT 3.1.1), then both sockets close.
async fn close(dialect: Dialect, mut device: DeviceWriter, mut up: UpWriter, ending: Ending) {
    if let Some(p) = ending
        .device
        .and_then(|code| dialect.wire(disconnect(code)))
    {
        let _ = device.send(p).await;
    }
    let _ = device.close().await;
    if let Some(p) = ending
        .upstream
        .and_then(|code| dialect.wire(disconnect(code)))
    {
        let _ = up.send(p).await;
    }
    let _ = up.close().await;
}

/// Counts and logs what the session noted.
fn note(shared: &Shared, client_id: &str, note: Note) {
    match note {
        Note::Accepted => shared.metrics.accepted(),
        Note::Dropped { topic, drop } => {
            let code = drop.reason.code();
            tracing::info!(client_id, topic = %topic, reason = drop.label, code, "PUBLISH dropped");
            shared.metrics.dropped(drop.label);
        }
        Note::FilterRefused { filter, reason } => {
            let code = reason.code();
            tracing::info!(client_id, filter = %filter, code, "subscription refused");
        }
        Note::Refused(label) => shared.metrics.refused(label),
    }
}

/// Runs a session's [`Work`].
fn start_work(shared: Arc<Shared>, identity: Identity, work: Work) -> WorkFuture {
    Box::pin(async move {
        match work {
            Work::Check(items) => Answer::Checked(check(&shared, &identity, items).await),
            Work::Authorize(asks) => Answer::Authorized(authorize(&shared, &identity, asks).await),
        }
    })
}

/// The verdicts of a batch's protected PUBLISHes, in order, after fetching groups the bridge
/// does not know yet ([`crate::verify`]).
async fn check(shared: &Arc<Shared>, identity: &Identity, items: Vec<Protected>) -> Vec<Verdict> {
    let Some(connection) = identity.connection() else {
        return Vec::new();
    };
    let mut fetched: Vec<GroupId> = Vec::new();
    for g in items.iter().filter_map(Protected::group) {
        if !fetched.contains(g) {
            let _ = shared.ensure_group(g).await;
            fetched.push(g.clone());
        }
    }
    let order: Vec<usize> = items.iter().map(|p| p.index).collect();
    let verdicts: HashMap<usize, Verdict> = check_batch(shared, &connection, items)
        .await
        .into_iter()
        .collect();
    order
        .iter()
        .map(|i| {
            verdicts
                .get(i)
                .copied()
                .unwrap_or(Verdict::Drop(Dropped::not_authorized("not_authorized")))
        })
        .collect()
}

/// The subscription decisions that need the CA.
async fn authorize(
    shared: &Arc<Shared>,
    identity: &Identity,
    asks: Vec<Ask>,
) -> Vec<Result<Option<String>, SubscribeRefusal>> {
    let mut out = Vec::with_capacity(asks.len());
    for ask in asks {
        out.push(match ask {
            Ask::Member(group, role) => {
                let _ = shared.ensure_group(&group).await;
                let member = identity
                    .connection()
                    .is_some_and(|c| has_role(&c, &shared.dir, &group, role));
                if member {
                    Ok(None)
                } else {
                    Err(SubscribeRefusal::NotAuthorized)
                }
            }
            Ask::Join(req) => join(shared, &req).await.map(Some),
        });
    }
    out
}

/// The `quva-gk` exchange (PROTOCOL.md §4): the CA checks the request; the answer goes into the
/// SUBACK.
async fn join(shared: &Shared, req: &GroupKeyRequest) -> Result<String, SubscribeRefusal> {
    let ca = shared.ca_client().ok_or(SubscribeRefusal::Unspecified)?;
    let (delivery, _epoch) = shared
        .ca_call("join_group", ca.join_group(req.to_bytes()))
        .await
        .map_err(|e| suback_reason(&e))?;
    // The membership changed: refresh the cached group so that data subscriptions pass.
    let _ = shared.refresh_group(req.group()).await;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(delivery))
}
