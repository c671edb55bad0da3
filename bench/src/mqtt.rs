//! A minimal MQTT 5 connection over any byte stream (TCP or TLS), with rumqttc's v5 packet codec,
//! and a stream wrapper that counts the bytes crossing the socket in each direction.
//!
//! rumqttc's own event loop is not used because TLS would need its `use-rustls` feature, which
//! would change a dependency shared with the rest of the workspace; the same client code then
//! runs over plain TCP, TLS and the Quva bridge, so the three are compared like for like.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Filter, Packet, PubAck, PubAckReason,
    Publish, SubAck, Subscribe, SubscribeProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Largest packet accepted (a 256 KiB Quva message with room for framing).
pub const MAX_PACKET: u32 = 300 * 1024;

/// How long one request may wait for its answer.
pub const STEP: Duration = Duration::from_secs(30);

/// Bytes read from and written to a socket.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl Counters {
    /// Bytes received so far.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Bytes sent so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// A stream that counts what passes through it.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    counters: Counters,
}

impl<S> Counted<S> {
    /// Wraps `inner`; the counters are shared with the caller.
    pub fn new(inner: S, counters: Counters) -> Self {
        Counted { inner, counters }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        self.counters.read.fetch_add(n, Ordering::Relaxed);
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            self.counters
                .written
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads MQTT 5 packets from a stream.
#[derive(Debug)]
pub struct Reader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// A reader over `io`.
    pub fn new(io: R) -> Self {
        Reader {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// The next packet; `None` when the peer closed the connection.
    ///
    /// # Errors
    /// A socket error or a malformed packet.
    pub async fn next(&mut self) -> anyhow::Result<Option<Packet>> {
        loop {
            match Packet::read(&mut self.buf, Some(MAX_PACKET)) {
                Ok(p) => return Ok(Some(p)),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => bail!("malformed packet from the server: {e:?}"),
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Bytes received but not yet decoded (they belong to later packets).
    pub fn buffered(&self) -> u64 {
        self.buf.len() as u64
    }

    /// The next packet within [`STEP`], which must exist.
    ///
    /// # Errors
    /// Timeout, closed connection, socket error or malformed packet.
    pub async fn expect(&mut self, what: &str) -> anyhow::Result<Packet> {
        tokio::time::timeout(STEP, self.next())
            .await
            .with_context(|| format!("no {what} within {STEP:?}"))??
            .with_context(|| format!("the server closed the connection before {what}"))
    }
}

/// Writes MQTT 5 packets to a stream.
#[derive(Debug)]
pub struct Writer<W> {
    io: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    /// A writer over `io`.
    pub fn new(io: W) -> Self {
        Writer {
            io,
            buf: BytesMut::with_capacity(4096),
        }
    }

    /// Encodes and sends one packet.
    ///
    /// # Errors
    /// A socket or encoding error.
    pub async fn send(&mut self, p: &Packet) -> anyhow::Result<()> {
        self.buf.clear();
        p.write(&mut self.buf, None)
            .map_err(|e| anyhow::anyhow!("cannot encode {p:?}: {e:?}"))?;
        self.io.write_all(&self.buf).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Sends DISCONNECT-free close (shutdown of the write side).
    pub async fn close(&mut self) {
        let _ = self.io.shutdown().await;
    }
}

/// A CONNECT with a clean start and, for Quva, an Authentication Method and Data.
pub fn connect(client_id: &str, auth: Option<(&str, Vec<u8>)>) -> Packet {
    let mut props = ConnectProperties::new();
    props.max_packet_size = Some(MAX_PACKET);
    if let Some((method, data)) = auth {
        props.authentication_method = Some(method.to_owned());
        props.authentication_data = Some(Bytes::from(data));
    }
    Packet::Connect(
        Connect {
            keep_alive: 60,
            client_id: client_id.to_owned(),
            clean_start: true,
            properties: Some(props),
        },
        None,
        None,
    )
}

/// A SUBSCRIBE of `filters` at QoS 1 with optional user properties.
pub fn subscribe(pkid: u16, filters: &[String], user_properties: Vec<(String, String)>) -> Packet {
    let filters = filters
        .iter()
        .map(|f| Filter::new(f.clone(), QoS::AtLeastOnce))
        .collect();
    let properties = (!user_properties.is_empty()).then_some(SubscribeProperties {
        id: None,
        user_properties,
    });
    Packet::Subscribe(Subscribe {
        pkid,
        filters,
        properties,
    })
}

/// A QoS 1 PUBLISH.
pub fn publish(pkid: u16, topic: &str, payload: Vec<u8>) -> Packet {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload, None);
    p.pkid = pkid;
    Packet::Publish(p)
}

/// The PUBACK of a received QoS 1 PUBLISH.
pub fn puback(pkid: u16) -> Packet {
    Packet::PubAck(PubAck {
        pkid,
        reason: PubAckReason::Success,
        properties: None,
    })
}

/// Checks that a packet is a successful CONNACK and returns it.
///
/// # Errors
/// Any other packet or a refusal.
pub fn connack_ok(p: Packet) -> anyhow::Result<ConnAck> {
    match p {
        Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok(ack),
        Packet::ConnAck(ack) => bail!("connection refused: {:?}", ack.code),
        other => bail!("expected CONNACK, got {other:?}"),
    }
}

/// Checks that a packet is a SUBACK granting every filter and returns it.
///
/// # Errors
/// Any other packet or a refused filter.
pub fn suback_ok(p: Packet) -> anyhow::Result<SubAck> {
    match p {
        Packet::SubAck(ack) => {
            if let Some(bad) = ack
                .return_codes
                .iter()
                .find(|c| !matches!(c, SubscribeReasonCode::Success(_)))
            {
                bail!("subscription refused: {bad:?}");
            }
            Ok(ack)
        }
        other => bail!("expected SUBACK, got {other:?}"),
    }
}

/// The SUBACK reason codes as bytes (for the device core).
pub fn suback_codes(ack: &SubAck) -> Vec<u8> {
    ack.return_codes
        .iter()
        .map(|c| match c {
            SubscribeReasonCode::Success(q) => *q as u8,
            SubscribeReasonCode::NotAuthorized => 0x87,
            SubscribeReasonCode::QuotaExceeded => 0x97,
            _ => 0x80,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn counts_both_directions_and_decodes_packets() {
        let (a, b) = tokio::io::duplex(4096);
        let c = Counters::default();
        let (r, w) = tokio::io::split(Counted::new(a, c.clone()));
        let mut writer = Writer::new(w);
        writer.send(&connect("dev-1", None)).await.unwrap();
        let sent = c.written();
        assert!(sent > 10);

        let (peer_r, peer_w) = tokio::io::split(b);
        let mut peer = Reader::new(peer_r);
        assert!(matches!(
            peer.next().await.unwrap(),
            Some(Packet::Connect(..))
        ));
        let mut peer_w = Writer::new(peer_w);
        peer_w.send(&puback(7)).await.unwrap();
        peer_w.send(&puback(8)).await.unwrap();

        let mut reader = Reader::new(r);
        let first = reader.next().await.unwrap();
        assert!(matches!(first, Some(Packet::PubAck(ref a)) if a.pkid == 7));
        // Whatever was read past the first PUBACK is still buffered, not lost.
        assert_eq!(c.read() - reader.buffered(), 4);
        assert!(matches!(reader.next().await.unwrap(), Some(Packet::PubAck(ref a)) if a.pkid == 8));
        assert_eq!(c.written(), sent);
    }
}
