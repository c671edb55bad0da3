//! One device connection: the handshake, the relay to its own upstream connection, and the
//! checks on CONNECT, SUBSCRIBE and PUBLISH.
//!
//! Implements the bridge's part of PROTOCOL.md §3 (CONNECT/CONNACK authentication), §4 (the
//! `quva-gk` SUBSCRIBE/SUBACK exchange) and §6 (PUBLISH checks), over MQTT 5 (MQTT 3.1.1 clients
//! only for unprotected topics). Every other packet passes through unchanged, except that the
//! Authentication Method and Data never reach the broker and AUTH is never forwarded. The bridge's
//! own PUBACK/PUBREC for a dropped PUBLISH waits behind the acknowledgements still pending
//! upstream, so that a device sees its QoS 1 acknowledgements in order (MQTT 5 §4.6).

pub(crate) mod rules;

use std::collections::HashMap;
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use quva_client::codec::{Decode, Encode};
use quva_client::enrollment::{
    AuthMethod, CertConnectProof, EnrollResponse, GroupConnectProof, REASON_NOT_AUTHORIZED,
    REASON_PAYLOAD_FORMAT_INVALID,
};
use quva_client::group::{GK_PROPERTY, GroupKeyRequest, Privacy};
use quva_client::ids::{GroupId, Role};
use quva_client::schnorr::VerifyingKey;
use rmqtt_codec::types::Publish;
use rmqtt_codec::v5::{
    self, ConnectAckReason, DisconnectReasonCode, PublishAck, PublishAckReason, SubscribeAckReason,
};
use rmqtt_codec::version::{ProtocolVersion, VersionCodec};
use rmqtt_codec::{MqttCodec, MqttPacket, v3};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use self::rules::{AckQueue, FilterPlan, PendingSub, Target, ToDevice, merge_suback};
use crate::ca::{connack_reason, suback_reason};
use crate::frames::{Upstream, UpstreamCodec};
use crate::identity::Identity;
use crate::shared::{Shared, now_ms};
use crate::sync::lock;
use crate::topics::{TopicKind, topic_device_id, unshare, valid_filter};
use crate::verify::{Dropped, Protected, Verdict, check_batch, has_role};

type DeviceReader = FramedRead<OwnedReadHalf, MqttCodec>;
type DeviceWriter = FramedWrite<OwnedWriteHalf, MqttCodec>;
type Decoded = Result<(MqttPacket, u32), rmqtt_codec::error::DecodeError>;

/// Serves one accepted TCP connection until it ends.
pub(crate) async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, MqttCodec::Version(VersionCodec));
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
    let max_in = shared.cfg.limits.max_packet_size;
    *reader.decoder_mut() = match version {
        ProtocolVersion::MQTT5 => MqttCodec::V5(v5::Codec::new(max_in, 0)),
        ProtocolVersion::MQTT3 => MqttCodec::V3(v3::Codec::new(max_in)),
    };
    if version == ProtocolVersion::MQTT5
        && let Some(at) = rules::empty_id_without_clean_start(reader.read_buffer())
        && let Some(flags) = reader.read_buffer_mut().get_mut(at)
    {
        *flags |= 0x02;
    }
    let first = tokio::time::timeout_at(deadline.into(), reader.next()).await;
    let writer_codec = match version {
        ProtocolVersion::MQTT5 => MqttCodec::V5(v5::Codec::new(0, 0)),
        ProtocolVersion::MQTT3 => MqttCodec::V3(v3::Codec::new(0)),
    };
    let mut writer = FramedWrite::new(wr, writer_codec);
    match first {
        Ok(Some(Ok((MqttPacket::V5(v5::Packet::Connect(c)), _)))) => {
            run_v5(reader, writer, c, shared).await;
        }
        Ok(Some(Ok((MqttPacket::V3(v3::Packet::Connect(c)), _)))) => {
            run_v3(reader, writer, c, shared).await;
        }
        Ok(Some(Err(rmqtt_codec::error::DecodeError::MaxSizeExceeded { .. }))) => {
            shared.metrics.refused("oversize");
            if version == ProtocolVersion::MQTT5 {
                let ack = connack(ConnectAckReason::PacketTooLarge);
                let _ = writer.send(MqttPacket::V5(ack)).await;
            }
        }
        Ok(Some(Err(rmqtt_codec::error::DecodeError::InvalidClientId)))
            if version == ProtocolVersion::MQTT5 =>
        {
            // An empty client identifier with Clean Start 0: there is no session to resume, and
            // the broker would refuse it too (MQTT 5 §3.1.3.1).
            shared.metrics.refused("client_id");
            let ack = connack(ConnectAckReason::ClientIdentifierNotValid);
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

fn connack_code(code: u8) -> ConnectAckReason {
    ConnectAckReason::try_from(code).unwrap_or(ConnectAckReason::NotAuthorized)
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

/// Checks the CONNECT's authentication (PROTOCOL.md §3 and §6). `Err` is a CONNACK reason code.
async fn admit(shared: &Shared, connect: &v5::Connect) -> Result<Admission, u8> {
    let Some(method_name) = connect.auth_method.as_ref() else {
        return if shared.cfg.topics.unauthenticated_allowed() {
            Ok(Admission {
                identity: Identity::Anonymous,
                method: None,
                data: None,
            })
        } else {
            Err(REASON_NOT_AUTHORIZED)
        };
    };
    let method = AuthMethod::from_name(method_name).ok_or(0x8C_u8)?;
    let data = connect
        .auth_data
        .as_ref()
        .ok_or(REASON_PAYLOAD_FORMAT_INVALID)?
        .to_vec();
    let now = now_ms();
    let window = shared.cfg.windows.timestamp_ms;
    let echo = Some(method_name.clone());
    match method {
        AuthMethod::Enroll | AuthMethod::Renew => {
            let ca = shared.ca_client().ok_or(0x88_u8)?;
            let call = match method {
                AuthMethod::Enroll => ("enroll", ca.enroll(data)),
                _ => ("renew", ca.renew(data)),
            };
            let response = shared
                .ca_call(call.0, call.1)
                .await
                .map_err(|e| connack_reason(&e))?;
            let parsed = EnrollResponse::from_bytes(&response).map_err(|_| 0x88_u8)?;
            let id = topic_device_id(parsed.cert.id().as_str()).ok_or(REASON_NOT_AUTHORIZED)?;
            Ok(Admission {
                identity: Identity::Device(id),
                method: echo,
                data: Some(Bytes::from(response)),
            })
        }
        AuthMethod::Cert => {
            let ca_key = shared.ca_public().ok_or(0x88_u8)?;
            let proof = CertConnectProof::from_bytes(&data)
                .map_err(|e| quva_client::enrollment::EnrollError::from(e).connack_reason())?;
            proof
                .verify(&ca_key, &connect.client_id, now, window)
                .map_err(|e| e.connack_reason())?;
            let cert = &proof.cert;
            let id = topic_device_id(cert.id().as_str()).ok_or(REASON_NOT_AUTHORIZED)?;
            if shared.dir.is_superseded(&id, cert.serial())
                || shared.is_revoked(cert.serial()).await?
            {
                return Err(REASON_NOT_AUTHORIZED);
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
                .map_err(|e| quva_client::enrollment::EnrollError::from(e).connack_reason())?;
            match shared.ensure_group(&proof.group).await {
                Ok(()) => {}
                Err(crate::ca::CaError::Unavailable) => return Err(0x88),
                Err(_) => return Err(REASON_NOT_AUTHORIZED),
            }
            if shared.dir.privacy(&proof.group) != Some(Privacy::Anonymous) {
                return Err(REASON_NOT_AUTHORIZED);
            }
            let keys = shared
                .dir
                .current_keys(&proof.group)
                .ok_or(REASON_NOT_AUTHORIZED)?;
            proof
                .verify(
                    &VerifyingKey(keys.q_p),
                    &VerifyingKey(keys.q_s),
                    &connect.client_id,
                    now,
                    window,
                )
                .map_err(|e| e.connack_reason())?;
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

/// Connects upstream and sends `connect`; returns the streams and the broker's CONNACK.
async fn connect_upstream_v5(
    shared: &Shared,
    connect: v5::Connect,
) -> Option<(UpReader, UpWriter, Box<v5::ConnectAck>)> {
    let stream = dial_upstream(shared).await?;
    let (rd, wr) = stream.into_split();
    let max_in = shared.cfg.limits.max_packet_size;
    let mut reader = FramedRead::new(rd, UpstreamCodec::new(max_in));
    let mut writer = FramedWrite::new(wr, MqttCodec::V5(v5::Codec::new(0, 0)));
    writer
        .send(MqttPacket::V5(v5::Packet::Connect(Box::new(connect))))
        .await
        .ok()?;
    let t = Duration::from_millis(shared.cfg.upstream.connect_timeout_ms);
    match tokio::time::timeout(t, reader.next()).await {
        Ok(Some(Ok(Upstream::Packet(v5::Packet::ConnectAck(ack))))) => Some((reader, writer, ack)),
        _ => None,
    }
}

type PendingSubs = Arc<Mutex<HashMap<NonZeroU16, PendingSub>>>;

/// The per-connection relay state of an MQTT 5 device.
struct V5Session {
    aliases: rules::Aliases,
    shared: Arc<Shared>,
    identity: Identity,
    client_id: ByteString,
    up: UpWriter,
    to_device: mpsc::Sender<ToDevice>,
    subs: PendingSubs,
    end: CancellationToken,
}

/// Why the relay of a connection stopped.
enum Stop {
    /// Close quietly (the device disconnected, or the socket failed).
    Quiet,
    /// Tell the device why, then close.
    Tell(DisconnectReasonCode),
}

async fn run_v5(
    mut reader: DeviceReader,
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
            .send(MqttPacket::V5(connack(ConnectAckReason::NotAuthorized)))
            .await;
        return;
    }
    let admission = match admit(&shared, &connect).await {
        Ok(a) => a,
        Err(code) => {
            shared.metrics.refused("auth");
            tracing::info!(client_id = %client_id, reason = code, "CONNECT refused");
            let _ = writer
                .send(MqttPacket::V5(connack(connack_code(code))))
                .await;
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
    let Some((mut up_reader, up_writer, up_ack)) = connect_upstream_v5(&shared, up_connect).await
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
                .send(MqttPacket::V5(connack(ConnectAckReason::ServerUnavailable)))
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

    let end = CancellationToken::new();
    let kick = shared.sessions.register(&admission.identity);
    let (tx, rx) = mpsc::channel::<ToDevice>(256);
    let writer_task = tokio::spawn(device_writer(writer, rx));
    let subs: PendingSubs = Arc::default();

    // Broker → device.
    let up_task = {
        let tx = tx.clone();
        let subs = subs.clone();
        let end = end.clone();
        tokio::spawn(async move {
            let stop = upstream_to_device(&mut up_reader, &tx, &subs, &end).await;
            end.cancel();
            if let Stop::Tell(code) = stop {
                let _ = tx.send(ToDevice::Packet(disconnect(code))).await;
            }
        })
    };

    let mut session = V5Session {
        aliases: rules::Aliases::default(),
        shared: shared.clone(),
        identity: admission.identity.clone(),
        client_id,
        up: up_writer,
        to_device: tx,
        subs,
        end: end.clone(),
    };
    let stop = session
        .device_to_upstream(&mut reader, keep_alive, &kick)
        .await;
    end.cancel();
    match stop {
        Stop::Tell(code) => {
            let _ = session
                .to_device
                .send(ToDevice::Packet(disconnect(code)))
                .await;
            // The bridge ended the connection, not the client: to the broker that is an
            // abnormal end, so the client's Will is published as it would be without the bridge
            // (MQTT 5 §3.1.2.5; a normal DISCONNECT would discard it).
            let _ = session
                .up
                .send(MqttPacket::V5(disconnect(
                    DisconnectReasonCode::DisconnectWithWillMessage,
                )))
                .await;
        }
        Stop::Quiet => {}
    }
    let _ = session.up.close().await;
    drop(session);
    let _ = up_task.await;
    let _ = writer_task.await;
    shared.sessions.unregister(&admission.identity, &kick);
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

/// Writes what reaches the device. Whatever is ready at once goes out in one write: raw
/// deliveries are appended to the write buffer as they are, packets are encoded into it, and the
/// buffer is flushed when nothing more is waiting (or it holds [`WRITE_BATCH`] bytes).
async fn device_writer(mut writer: DeviceWriter, mut rx: mpsc::Receiver<ToDevice>) {
    let mut queue = AckQueue::default();
    while let Some(mut ev) = rx.recv().await {
        loop {
            match ev {
                ToDevice::Raw(frame) => writer.write_buffer_mut().extend_from_slice(&frame),
                ev => {
                    for p in queue.push(ev) {
                        let last = matches!(p, v5::Packet::Disconnect(_));
                        if writer.feed(MqttPacket::V5(p)).await.is_err() {
                            return;
                        }
                        if last {
                            let _ = writer.close().await;
                            return;
                        }
                    }
                }
            }
            if writer.write_buffer().len() >= WRITE_BATCH {
                break;
            }
            match rx.try_recv() {
                Ok(next) => ev = next,
                Err(_) => break,
            }
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.close().await;
}

/// Bytes gathered for the device before a write even if more is waiting.
const WRITE_BATCH: usize = 64 * 1024;

async fn upstream_to_device(
    up: &mut UpReader,
    tx: &mpsc::Sender<ToDevice>,
    subs: &PendingSubs,
    end: &CancellationToken,
) -> Stop {
    loop {
        let next = tokio::select! {
            () = end.cancelled() => return Stop::Quiet,
            n = up.next() => n,
        };
        let packet = match next {
            Some(Ok(Upstream::Publish(frame))) => {
                if tx.send(ToDevice::Raw(frame)).await.is_err() {
                    return Stop::Quiet;
                }
                continue;
            }
            Some(Ok(Upstream::Packet(p))) => p,
            Some(Err(_)) => return Stop::Tell(DisconnectReasonCode::UnspecifiedError),
            // The broker closed the connection without a DISCONNECT (Mosquitto does so on a
            // session takeover, and when it stops): the device sees the same, a plain close.
            None => return Stop::Quiet,
        };
        let ev = match packet {
            v5::Packet::PublishAck(a) => {
                ToDevice::UpstreamAck(a.packet_id, v5::Packet::PublishAck(a))
            }
            v5::Packet::PublishReceived(a) => {
                ToDevice::UpstreamAck(a.packet_id, v5::Packet::PublishReceived(a))
            }
            v5::Packet::SubscribeAck(mut ack) => {
                let pending = lock(subs).remove(&ack.packet_id);
                if let Some(p) = pending {
                    merge_suback(&mut ack, p);
                }
                ToDevice::Packet(v5::Packet::SubscribeAck(ack))
            }
            v5::Packet::Disconnect(d) => {
                let _ = tx.send(ToDevice::Packet(v5::Packet::Disconnect(d))).await;
                return Stop::Quiet;
            }
            v5::Packet::Connect(_) | v5::Packet::ConnectAck(_) | v5::Packet::Auth(_) => {
                return Stop::Tell(DisconnectReasonCode::UnspecifiedError);
            }
            p => ToDevice::Packet(p),
        };
        if tx.send(ev).await.is_err() {
            return Stop::Quiet;
        }
    }
}

/// A PUBLISH waiting in a verification batch.
struct Candidate {
    publish: Box<Publish>,
    target: Target,
}

impl V5Session {
    async fn device_to_upstream(
        &mut self,
        reader: &mut DeviceReader,
        keep_alive: u16,
        kick: &CancellationToken,
    ) -> Stop {
        let idle = if keep_alive > 0 {
            Some(Duration::from_millis(u64::from(keep_alive) * 1500))
        } else if self.shared.cfg.limits.idle_timeout_ms > 0 {
            Some(Duration::from_millis(
                self.shared.cfg.limits.idle_timeout_ms,
            ))
        } else {
            None
        };
        let mut stash: Option<Decoded> = None;
        loop {
            let next = match stash.take() {
                Some(d) => Some(d),
                None => {
                    let read = async {
                        match idle {
                            Some(t) => tokio::time::timeout(t, reader.next()).await.ok(),
                            None => Some(reader.next().await),
                        }
                    };
                    tokio::select! {
                        () = self.shared.stop.cancelled() => {
                            return Stop::Tell(DisconnectReasonCode::ServerShuttingDown);
                        }
                        () = kick.cancelled() => {
                            return Stop::Tell(DisconnectReasonCode::NotAuthorized);
                        }
                        () = self.end.cancelled() => return Stop::Quiet,
                        r = read => match r {
                            Some(n) => n,
                            None => {
                                self.shared.metrics.refused("keep_alive");
                                return Stop::Tell(DisconnectReasonCode::KeepAliveTimeout);
                            }
                        },
                    }
                }
            };
            let packet = match next {
                None => return Stop::Quiet,
                Some(Err(e)) => return self.decode_failure(&e),
                Some(Ok((MqttPacket::V5(p), _))) => p,
                Some(Ok(_)) => return Stop::Tell(DisconnectReasonCode::ProtocolError),
            };
            let result = match packet {
                v5::Packet::Publish(p) => match self.classify_publish(p) {
                    Ok(Some(first)) => {
                        let mut batch = vec![first];
                        while batch.len() < self.shared.cfg.limits.max_batch {
                            match reader.next().now_or_never() {
                                Some(Some(Ok((MqttPacket::V5(v5::Packet::Publish(p)), n)))) => {
                                    match self.classify_publish(p) {
                                        Ok(Some(c)) => batch.push(c),
                                        Ok(None) => {}
                                        Err(stop) => {
                                            let _ = self.process_batch(batch).await;
                                            return stop;
                                        }
                                    }
                                    let _ = n;
                                }
                                Some(Some(other)) => {
                                    stash = Some(other);
                                    break;
                                }
                                Some(None) => {
                                    let _ = self.process_batch(batch).await;
                                    return Stop::Quiet;
                                }
                                None => break,
                            }
                        }
                        self.process_batch(batch).await
                    }
                    Ok(None) => Ok(()),
                    Err(stop) => return stop,
                },
                v5::Packet::Subscribe(s) if rules::has_malformed_filter(&s) => {
                    self.shared.metrics.refused("malformed");
                    return Stop::Tell(DisconnectReasonCode::MalformedPacket);
                }
                v5::Packet::Subscribe(s) => self.subscribe(s).await,
                v5::Packet::Disconnect(d) => {
                    let _ = self
                        .up
                        .send(MqttPacket::V5(v5::Packet::Disconnect(d)))
                        .await;
                    return Stop::Quiet;
                }
                p @ (v5::Packet::PublishAck(_)
                | v5::Packet::PublishReceived(_)
                | v5::Packet::PublishRelease(_)
                | v5::Packet::PublishComplete(_)
                | v5::Packet::Unsubscribe(_)
                | v5::Packet::PingRequest) => self.forward(p).await,
                v5::Packet::Auth(_) => return Stop::Tell(DisconnectReasonCode::ProtocolError),
                _ => return Stop::Tell(DisconnectReasonCode::ProtocolError),
            };
            if result.is_err() {
                return Stop::Quiet;
            }
        }
    }

    fn decode_failure(&self, e: &rmqtt_codec::error::DecodeError) -> Stop {
        use rmqtt_codec::error::DecodeError as E;
        match e {
            E::MaxSizeExceeded { .. } => {
                self.shared.metrics.refused("oversize");
                Stop::Tell(DisconnectReasonCode::PacketTooLarge)
            }
            E::Io(_) => Stop::Quiet,
            _ => {
                self.shared.metrics.refused("malformed");
                Stop::Tell(DisconnectReasonCode::MalformedPacket)
            }
        }
    }

    async fn forward(&mut self, p: v5::Packet) -> Result<(), ()> {
        self.up.send(MqttPacket::V5(p)).await.map_err(|_| ())
    }

    async fn own_ack(&mut self, publish: &Publish, drop: Dropped) -> Result<(), ()> {
        tracing::info!(
            client_id = %self.client_id,
            topic = %publish.topic,
            reason = drop.label,
            "PUBLISH dropped"
        );
        self.shared.metrics.dropped(drop.label);
        let Some(id) = publish.packet_id else {
            return Ok(());
        };
        let ack = PublishAck {
            packet_id: id,
            reason_code: PublishAckReason::try_from(drop.code)
                .unwrap_or(PublishAckReason::NotAuthorized),
            properties: Vec::new(),
            reason_string: None,
        };
        let p = match publish.qos {
            rmqtt_codec::types::QoS::ExactlyOnce => v5::Packet::PublishReceived(ack),
            _ => v5::Packet::PublishAck(ack),
        };
        self.to_device
            .send(ToDevice::OwnAck(id, p))
            .await
            .map_err(|_| ())
    }

    async fn forward_publish(&mut self, publish: Box<Publish>) -> Result<(), ()> {
        if let Some(id) = publish.packet_id {
            self.to_device
                .send(ToDevice::Expect(id))
                .await
                .map_err(|_| ())?;
        }
        self.forward(v5::Packet::Publish(publish)).await
    }

    /// Sorts a PUBLISH: unprotected ones are relayed at once, protected ones returned for the
    /// batch. `Err` stops the connection (protocol errors).
    fn classify_publish(&mut self, mut p: Box<Publish>) -> Result<Option<Candidate>, Stop> {
        self.aliases.resolve(&mut p).map_err(Stop::Tell)?;
        let target = rules::target(&self.shared.policy, &p);
        Ok(Some(Candidate { publish: p, target }))
    }

    /// Verifies a batch of PUBLISHes and relays or drops each, in order.
    async fn process_batch(&mut self, batch: Vec<Candidate>) -> Result<(), ()> {
        let verdicts = self.verify(&batch).await;
        for (c, verdict) in batch.into_iter().zip(verdicts) {
            match verdict {
                Verdict::Relay => self.forward_publish(c.publish).await?,
                Verdict::Accept => {
                    self.shared.metrics.accepted();
                    self.forward_publish(c.publish).await?;
                }
                Verdict::Drop(d) => self.own_ack(&c.publish, d).await?,
            }
        }
        Ok(())
    }

    /// The verdict of each PUBLISH of a batch, in order. Protected ones are checked off the
    /// async workers ([`crate::verify`]).
    async fn verify(&mut self, batch: &[Candidate]) -> Vec<Verdict> {
        let connection = self.identity.connection();
        // Fetch unknown groups first; never for an unauthenticated connection, whose protected
        // PUBLISHes are dropped anyway (no CA lookup on its behalf).
        let mut fetched: Vec<&GroupId> = Vec::new();
        for c in batch {
            if let Target::Group(g, _) = &c.target
                && connection.is_some()
                && !fetched.contains(&g)
            {
                fetched.push(g);
                let _ = self.shared.ensure_group(g).await;
            }
        }
        let mut verdicts: Vec<Option<Verdict>> = Vec::with_capacity(batch.len());
        let mut protected = Vec::new();
        for (i, c) in batch.iter().enumerate() {
            verdicts.push(match &c.target {
                Target::Unprotected => Some(Verdict::Relay),
                Target::Reserved => Some(Verdict::Drop(Dropped::not_authorized("reserved_topic"))),
                Target::Retained => Some(Verdict::Drop(Dropped::not_authorized("retained"))),
                Target::Group(..) if connection.is_none() => {
                    Some(Verdict::Drop(Dropped::not_authorized("unauthenticated")))
                }
                Target::Group(group, direction) => {
                    protected.push(Protected {
                        index: i,
                        payload: c.publish.payload.clone(),
                        group: group.clone(),
                        direction: *direction,
                    });
                    None
                }
            });
        }
        if let Some(connection) = connection
            && !protected.is_empty()
        {
            for (i, v) in check_batch(&self.shared, &connection, protected).await {
                if let Some(slot) = verdicts.get_mut(i) {
                    *slot = Some(v);
                }
            }
        }
        verdicts
            .into_iter()
            .map(|v| v.unwrap_or(Verdict::Drop(Dropped::not_authorized("not_authorized"))))
            .collect()
    }

    /// Whether this connection may subscribe to a group's traffic as `role`.
    fn is_role(&self, group: &GroupId, role: Role) -> bool {
        self.identity
            .connection()
            .is_some_and(|c| has_role(&c, &self.shared.dir, group, role))
    }

    async fn subscribe(&mut self, mut s: v5::Subscribe) -> Result<(), ()> {
        let gk_request = s
            .user_properties
            .iter()
            .find(|(k, _)| k == GK_PROPERTY)
            .map(|(_, v)| v.to_string());
        s.user_properties.retain(|(k, _)| k != GK_PROPERTY);
        let mut slots = Vec::with_capacity(s.topic_filters.len());
        let mut forwarded = Vec::new();
        let mut gk: Option<(usize, String)> = None;
        let mut gk_used = false;
        let mut reason = None;
        for (i, (filter, opts)) in std::mem::take(&mut s.topic_filters).into_iter().enumerate() {
            let decision = self
                .authorize_filter(&filter, gk_request.as_deref(), &mut gk_used)
                .await;
            match decision {
                Ok(delivery) => {
                    if let Some(d) = delivery {
                        gk = Some((i, d));
                    }
                    slots.push(None);
                    forwarded.push((filter, opts));
                }
                Err(code) => {
                    tracing::info!(client_id = %self.client_id, filter = %filter, code, "subscription refused");
                    reason = reason.or_else(|| rules::refusal_reason(&self.shared.policy, &filter));
                    slots.push(Some(
                        SubscribeAckReason::try_from(code)
                            .unwrap_or(SubscribeAckReason::NotAuthorized),
                    ));
                }
            }
        }
        let id = s.packet_id;
        if forwarded.is_empty() {
            let ack = v5::SubscribeAck {
                packet_id: id,
                properties: Vec::new(),
                reason_string: reason.map(ByteString::from_static),
                status: slots.into_iter().flatten().collect(),
            };
            return self
                .to_device
                .send(ToDevice::Packet(v5::Packet::SubscribeAck(ack)))
                .await
                .map_err(|_| ());
        }
        lock(&self.subs).insert(id, PendingSub { slots, gk, reason });
        s.topic_filters = forwarded;
        self.forward(v5::Packet::Subscribe(s)).await
    }

    /// Decides one subscription filter ([`rules::plan_filter`]), asking the CA what the plan
    /// needs. `Ok(Some(value))` carries a `quva-gk` delivery for the SUBACK; `Err` is the SUBACK
    /// reason code.
    async fn authorize_filter(
        &mut self,
        filter: &str,
        gk_request: Option<&str>,
        gk_used: &mut bool,
    ) -> Result<Option<String>, u8> {
        let unused_gk = gk_request.filter(|_| !*gk_used);
        match rules::plan_filter(
            &self.shared.policy,
            &self.identity,
            filter,
            unused_gk.is_some(),
        ) {
            FilterPlan::Relay => Ok(None),
            FilterPlan::Refuse(code) => Err(code),
            FilterPlan::IfMember(g, role) => {
                let _ = self.shared.ensure_group(&g).await;
                self.is_role(&g, role).then_some(None).ok_or(0x87)
            }
            FilterPlan::Join(g, role) => {
                *gk_used = true;
                let text = unused_gk.unwrap_or_default();
                self.join(&g, role, text).await.map(Some)
            }
        }
    }

    /// The `quva-gk` exchange (PROTOCOL.md §4): the CA checks the request; the answer goes into
    /// the SUBACK.
    async fn join(&mut self, group: &GroupId, role: Role, text: &str) -> Result<String, u8> {
        let Identity::Device(id) = &self.identity else {
            return Err(0x87);
        };
        let req = GroupKeyRequest::from_property(text).map_err(|_| 0x87_u8)?;
        if req.id() != id || req.group() != group || req.role() != role {
            return Err(0x87);
        }
        let ca = self.shared.ca_client().ok_or(0x80_u8)?;
        let (delivery, _epoch) = self
            .shared
            .ca_call("join_group", ca.join_group(req.to_bytes()))
            .await
            .map_err(|e| suback_reason(&e))?;
        // The membership changed: refresh the cached group so that data subscriptions pass.
        let _ = self.shared.refresh_group(group).await;
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(delivery))
    }
}

// ------------------------------------------------------------------------------------------
// MQTT 3.1.1: unprotected topics only.
// ------------------------------------------------------------------------------------------

async fn run_v3(
    mut reader: DeviceReader,
    mut writer: DeviceWriter,
    connect: Box<v3::Connect>,
    shared: Arc<Shared>,
) {
    use v3::ConnectAckReason as R;
    let bad_will = connect
        .last_will
        .as_ref()
        .is_some_and(|w| !shared.policy.will_allowed(&w.topic));
    if bad_will || !shared.cfg.topics.unauthenticated_allowed() {
        shared
            .metrics
            .refused(if bad_will { "will" } else { "auth" });
        let ack = v3::ConnectAck {
            return_code: R::NotAuthorized,
            session_present: false,
        };
        let _ = writer
            .send(MqttPacket::V3(v3::Packet::ConnectAck(ack)))
            .await;
        return;
    }
    let mut up_connect = (*connect).clone();
    up_connect.username = shared.cfg.upstream.username.clone().map(ByteString::from);
    up_connect.password = shared.upstream_password.clone().map(Bytes::from);
    let own_id = if connect.client_id.is_empty() {
        assigned_client_id()
    } else {
        connect.client_id.clone()
    };
    up_connect.client_id = ByteString::from(Identity::Anonymous.upstream_client_id(&own_id));
    let Some(stream) = dial_upstream(&shared).await else {
        shared.metrics.refused("upstream_unavailable");
        let ack = v3::ConnectAck {
            return_code: R::ServiceUnavailable,
            session_present: false,
        };
        let _ = writer
            .send(MqttPacket::V3(v3::Packet::ConnectAck(ack)))
            .await;
        return;
    };
    let (rd, wr) = stream.into_split();
    let max_in = shared.cfg.limits.max_packet_size;
    let mut up_reader = FramedRead::new(rd, MqttCodec::V3(v3::Codec::new(max_in)));
    let mut up_writer = FramedWrite::new(wr, MqttCodec::V3(v3::Codec::new(0)));
    if up_writer
        .send(MqttPacket::V3(v3::Packet::Connect(Box::new(up_connect))))
        .await
        .is_err()
    {
        return;
    }
    let end = CancellationToken::new();
    let subs: Arc<Mutex<HashMap<NonZeroU16, Vec<Option<v3::SubscribeReturnCode>>>>> =
        Arc::default();
    let (tx, mut rx) = mpsc::channel::<v3::Packet>(256);
    let writer_task = tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            if writer.send(MqttPacket::V3(p)).await.is_err() {
                break;
            }
        }
        let _ = writer.close().await;
    });
    let up_task = {
        let tx = tx.clone();
        let end = end.clone();
        let subs = subs.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = end.cancelled() => break,
                    n = up_reader.next() => n,
                };
                let p = match next {
                    Some(Ok((
                        MqttPacket::V3(v3::Packet::SubscribeAck { packet_id, status }),
                        _,
                    ))) => {
                        let pending = lock(&subs).remove(&packet_id);
                        let status = match pending {
                            Some(slots) => {
                                let mut up = status.into_iter();
                                slots
                                    .into_iter()
                                    .map(|s| {
                                        s.unwrap_or_else(|| {
                                            up.next().unwrap_or(v3::SubscribeReturnCode::Failure)
                                        })
                                    })
                                    .collect()
                            }
                            None => status,
                        };
                        v3::Packet::SubscribeAck { packet_id, status }
                    }
                    Some(Ok((MqttPacket::V3(p), _))) => p,
                    _ => break,
                };
                if tx.send(p).await.is_err() {
                    break;
                }
            }
            end.cancel();
        })
    };
    let keep_alive = rules::keep_alive_for(
        &Identity::Anonymous,
        connect.keep_alive,
        shared.cfg.limits.idle_timeout_ms,
    );
    let idle = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    loop {
        let read = async {
            match idle {
                Some(t) => tokio::time::timeout(t, reader.next()).await.ok(),
                None => Some(reader.next().await),
            }
        };
        let next = tokio::select! {
            () = shared.stop.cancelled() => break,
            () = end.cancelled() => break,
            r = read => r,
        };
        let packet = match next {
            Some(Some(Ok((MqttPacket::V3(p), _)))) => p,
            Some(Some(Err(rmqtt_codec::error::DecodeError::MaxSizeExceeded { .. }))) => {
                shared.metrics.refused("oversize");
                break;
            }
            Some(None) => break,
            None => {
                shared.metrics.refused("keep_alive");
                break;
            }
            _ => {
                shared.metrics.refused("malformed");
                break;
            }
        };
        let forward = match packet {
            v3::Packet::Publish(p) => {
                if shared.policy.classify(&p.topic) != TopicKind::Unprotected {
                    // MQTT 3.1.1 cannot refuse a PUBLISH: close the connection (§3.3.5).
                    shared.metrics.dropped("unauthenticated");
                    break;
                }
                Some(v3::Packet::Publish(p))
            }
            v3::Packet::Subscribe {
                packet_id,
                topic_filters,
            } => {
                let mut slots = Vec::new();
                let mut allowed = Vec::new();
                for (f, qos) in topic_filters {
                    let inner = unshare(&f);
                    let ok = valid_filter(inner)
                        && if inner.contains(['+', '#']) {
                            !shared.policy.filter_touches_protected(inner)
                        } else {
                            shared.policy.classify(inner) == TopicKind::Unprotected
                        };
                    if ok {
                        slots.push(None);
                        allowed.push((f, qos));
                    } else {
                        slots.push(Some(v3::SubscribeReturnCode::Failure));
                    }
                }
                if allowed.is_empty() {
                    let status = slots.into_iter().flatten().collect();
                    if tx
                        .send(v3::Packet::SubscribeAck { packet_id, status })
                        .await
                        .is_err()
                    {
                        break;
                    }
                    None
                } else {
                    lock(&subs).insert(packet_id, slots);
                    Some(v3::Packet::Subscribe {
                        packet_id,
                        topic_filters: allowed,
                    })
                }
            }
            v3::Packet::Disconnect => {
                let _ = up_writer.send(MqttPacket::V3(v3::Packet::Disconnect)).await;
                break;
            }
            v3::Packet::Connect(_)
            | v3::Packet::ConnectAck(_)
            | v3::Packet::SubscribeAck { .. }
            | v3::Packet::UnsubscribeAck { .. }
            | v3::Packet::PingResponse => break,
            p => Some(p),
        };
        if let Some(p) = forward
            && up_writer.send(MqttPacket::V3(p)).await.is_err()
        {
            break;
        }
    }
    end.cancel();
    let _ = up_writer.close().await;
    drop(tx);
    let _ = up_task.await;
    let _ = writer_task.await;
}
