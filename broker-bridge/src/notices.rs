//! Rekey notices: follows the CA's notice log and publishes it on the broker.
//!
//! Implements the bridge's part of PROTOCOL.md §5 and §8: each rekey notice is published
//! retained, QoS 1, on its key topic; at every epoch the group's member certificate list is
//! published retained on `quva/c/<group>`; a revocation ends the device's sessions. After any
//! disconnect (CA or broker) the bridge resumes from the sequence number after the last notice it
//! finished.

use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use futures_util::{SinkExt as _, StreamExt as _};
use quva_client::ids::{DeviceId, GroupId};
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v5;
use rmqtt_codec::{MqttCodec, MqttPacket};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::bridge::Shared;
use crate::ca::{Notice, NoticeAction};
use crate::topics::certificates_topic;

/// The bridge's own MQTT 5 connection to the broker, used to publish retained notices.
pub(crate) struct Publisher {
    reader: FramedRead<OwnedReadHalf, MqttCodec>,
    writer: FramedWrite<OwnedWriteHalf, MqttCodec>,
    next_id: u16,
}

/// Why publishing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PublishError {
    /// The broker is unreachable or closed the connection.
    #[error("broker connection lost")]
    Connection,
    /// The broker refused the PUBLISH or the connection.
    #[error("broker refused (reason {0})")]
    Refused(u8),
}

impl Publisher {
    /// Connects with the bridge's own client identifier and credentials.
    pub(crate) async fn connect(shared: &Shared) -> Result<Self, PublishError> {
        let t = Duration::from_millis(shared.cfg.upstream.connect_timeout_ms);
        let stream = tokio::time::timeout(t, TcpStream::connect(&shared.cfg.upstream.address))
            .await
            .map_err(|_| PublishError::Connection)?
            .map_err(|_| PublishError::Connection)?;
        let (rd, wr) = stream.into_split();
        let mut reader = FramedRead::new(rd, MqttCodec::V5(v5::Codec::new(1024 * 1024, 0)));
        let mut writer = FramedWrite::new(wr, MqttCodec::V5(v5::Codec::new(0, 0)));
        let connect = v5::Connect {
            clean_start: true,
            keep_alive: 0,
            client_id: ByteString::from(shared.cfg.upstream.client_id.clone()),
            username: shared.cfg.upstream.username.clone().map(ByteString::from),
            password: shared.upstream_password.clone().map(Bytes::from),
            ..Default::default()
        };
        writer
            .send(MqttPacket::V5(v5::Packet::Connect(Box::new(connect))))
            .await
            .map_err(|_| PublishError::Connection)?;
        match tokio::time::timeout(t, reader.next()).await {
            Ok(Some(Ok((MqttPacket::V5(v5::Packet::ConnectAck(ack)), _)))) => {
                if ack.reason_code == v5::ConnectAckReason::Success {
                    Ok(Publisher {
                        reader,
                        writer,
                        next_id: 1,
                    })
                } else {
                    Err(PublishError::Refused(ack.reason_code.into()))
                }
            }
            _ => Err(PublishError::Connection),
        }
    }

    /// Publishes retained at QoS 1 and waits for the broker's PUBACK.
    pub(crate) async fn publish_retained(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<(), PublishError> {
        let id = NonZeroU16::new(self.next_id).unwrap_or(NonZeroU16::MIN);
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        let publish = Publish {
            dup: false,
            retain: true,
            qos: QoS::AtLeastOnce,
            topic: ByteString::from(topic),
            packet_id: Some(id),
            payload: Bytes::from(payload),
            properties: Some(v5::PublishProperties::default()),
        };
        self.writer
            .send(MqttPacket::V5(v5::Packet::Publish(Box::new(publish))))
            .await
            .map_err(|_| PublishError::Connection)?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.reader.next()).await {
                Ok(Some(Ok((MqttPacket::V5(v5::Packet::PublishAck(a)), _))))
                    if a.packet_id == id =>
                {
                    let code: u8 = a.reason_code.into();
                    return if code < 0x80 {
                        Ok(())
                    } else {
                        Err(PublishError::Refused(code))
                    };
                }
                Ok(Some(Ok(_))) => {}
                _ => return Err(PublishError::Connection),
            }
        }
    }
}

/// Follows the CA's notices until the bridge stops.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut next_seq = 1u64;
    let mut backoff = Duration::from_millis(100);
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        let outcome = tokio::select! {
            () = shared.stop.cancelled() => return,
            r = follow(&shared, &mut next_seq) => r,
        };
        if let Err(e) = outcome {
            tracing::warn!(error = e, next_seq, "notice stream interrupted; resuming");
        }
        tokio::select! {
            () = shared.stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One session of following: connect to the broker and the CA, then apply notices in order.
async fn follow(shared: &Shared, next_seq: &mut u64) -> Result<(), &'static str> {
    let ca = shared.ca.as_ref().ok_or("no CA")?;
    shared
        .ca_public()
        .await
        .ok_or("CA public key unavailable")?;
    let mut publisher = Publisher::connect(shared)
        .await
        .map_err(|_| "broker unavailable")?;
    let mut stream = shared
        .ca_call("watch_notices", ca.watch_notices(*next_seq))
        .await
        .map_err(|_| "CA unavailable")?;
    while let Some(item) = stream.next().await {
        let notice = item.map_err(|_| "CA stream failed")?;
        if notice.seq < *next_seq {
            continue;
        }
        apply(shared, &mut publisher, &notice).await?;
        *next_seq = notice.seq + 1;
    }
    Err("CA stream ended")
}

async fn apply(
    shared: &Shared,
    publisher: &mut Publisher,
    notice: &Notice,
) -> Result<(), &'static str> {
    match &notice.action {
        NoticeAction::Rekey { topic, payload } => {
            if !topic.starts_with(crate::topics::RESERVED_PREFIX) {
                tracing::warn!(seq = notice.seq, "rekey notice for a non-key topic skipped");
                return Ok(());
            }
            publisher
                .publish_retained(topic, payload.clone())
                .await
                .map_err(|_| "publishing a notice failed")?;
            shared.metrics.notice_published();
            tracing::debug!(seq = notice.seq, topic = %topic, "rekey notice published");
        }
        NoticeAction::GroupUpdated => {
            let Ok(group) = GroupId::new(&notice.group) else {
                return Ok(());
            };
            match shared.refresh_group(&group).await {
                Ok(()) => {}
                Err(crate::ca::CaError::Unavailable) => return Err("CA unavailable"),
                Err(_) => return Ok(()),
            }
            if let Some((epoch, list)) = shared.dir.certificate_list(&group) {
                publisher
                    .publish_retained(&certificates_topic(&group), list)
                    .await
                    .map_err(|_| "publishing a certificate list failed")?;
                shared.metrics.notice_published();
                tracing::debug!(group = %group, epoch = epoch.0, "certificate list published");
            }
        }
        NoticeAction::Revoked { serial, device } => {
            let id = DeviceId::new(device).ok();
            shared.dir.revoke(*serial, id.as_ref());
            if let Some(id) = id {
                shared.kick(&id);
                tracing::info!(device = %id, serial, "certificate revoked; sessions closed");
            }
        }
        NoticeAction::Unknown => {}
    }
    Ok(())
}
