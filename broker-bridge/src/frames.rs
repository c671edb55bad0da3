//! Framing of the broker's side of a device connection: PUBLISH deliveries pass through as the
//! broker's bytes, everything else is decoded.
//!
//! The bridge never changes a delivery on its way to a subscriber (the broker uses no topic
//! aliases towards the bridge, whose CONNECT sets Topic Alias Maximum 0, and it already honours the
//! device's Maximum Packet Size, which the bridge forwards), so decoding it and encoding it again
//! would only cost time and a copy per subscriber. This codec cuts the stream into whole MQTT
//! frames (MQTT 5 §2.1: fixed header, then the remaining length as a variable byte integer); a
//! PUBLISH frame (type 3) is returned as it is, any other frame is decoded by rmqtt-codec. A PUBLISH
//! frame has the same form in MQTT 3.1.1 (§2.2), so an MQTT 3.1.1 connection's deliveries pass as
//! bytes too; its other frames are decoded as 3.1.1 and handed on as their MQTT 5 twins
//! ([`crate::dialect`]).

use bytes::{Buf as _, Bytes, BytesMut};
use rmqtt_codec::error::DecodeError;
use rmqtt_codec::{MqttCodec, v5};
use tokio_util::codec::Decoder;

use crate::dialect::{Dialect, decode};

/// One frame from the broker.
#[derive(Debug)]
pub(crate) enum Upstream {
    /// A PUBLISH, as the broker's bytes (fixed header included).
    Publish(Bytes),
    /// Any other packet, decoded.
    Packet(v5::Packet),
}

/// The MQTT 5 packet type of PUBLISH (MQTT 5 §2.1.2).
const PUBLISH: u8 = 3;

/// Cuts the broker's byte stream into [`Upstream`] frames.
#[derive(Debug)]
pub(crate) struct UpstreamCodec {
    inner: MqttCodec,
    max_in: u32,
}

impl UpstreamCodec {
    /// A codec for a broker connection speaking `dialect`, refusing frames whose remaining length
    /// exceeds `max_in` (0: no limit).
    pub(crate) fn new(dialect: Dialect, max_in: u32) -> Self {
        UpstreamCodec {
            inner: dialect.codec(max_in),
            max_in,
        }
    }
}

/// The remaining length of the frame at the start of `src` and the fixed header's length, or
/// `None` while the header is incomplete.
fn fixed_header(src: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value: usize = 0;
    for (i, byte) in src.iter().skip(1).take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 2)));
        }
    }
    if src.len() >= 5 {
        // A fifth length byte: not a variable byte integer (MQTT 5 §1.5.5).
        return Err(DecodeError::MalformedPacket);
    }
    Ok(None)
}

impl Decoder for UpstreamCodec {
    type Item = Upstream;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Upstream>, DecodeError> {
        let Some((remaining, header)) = fixed_header(src)? else {
            return Ok(None);
        };
        let size = u32::try_from(remaining).unwrap_or(u32::MAX);
        if self.max_in != 0 && size > self.max_in {
            return Err(DecodeError::MaxSizeExceeded {
                size,
                max: self.max_in,
            });
        }
        let total = header + remaining;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        if src.first().is_some_and(|b| b >> 4 == PUBLISH) {
            return Ok(Some(Upstream::Publish(src.split_to(total).freeze())));
        }
        // A whole frame: the inner codec decodes it in one call and is back at a frame boundary.
        let mut frame = src.split_to(total);
        match decode(&mut self.inner, &mut frame)? {
            Some(p) if !frame.has_remaining() => Ok(Some(Upstream::Packet(p))),
            _ => Err(DecodeError::MalformedPacket),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytestring::ByteString;
    use rmqtt_codec::types::{Publish, QoS};
    use tokio_util::codec::Encoder as _;

    fn encode(p: v5::Packet) -> BytesMut {
        let mut out = BytesMut::new();
        v5::Codec::new(0, 0).encode(p, &mut out).unwrap();
        out
    }

    fn publish(payload: &[u8]) -> v5::Packet {
        v5::Packet::Publish(Box::new(Publish {
            dup: false,
            retain: false,
            qos: QoS::AtLeastOnce,
            topic: ByteString::from("plant/a"),
            packet_id: std::num::NonZeroU16::new(7),
            payload: Bytes::copy_from_slice(payload),
            properties: Some(v5::PublishProperties::default()),
        }))
    }

    #[test]
    fn publishes_pass_as_bytes_and_other_packets_decode() {
        let big = vec![0xAB; 300];
        let p1 = encode(publish(b"one"));
        let p2 = encode(publish(&big));
        let ping = encode(v5::Packet::PingResponse);
        let mut stream = BytesMut::new();
        for part in [&p1, &ping, &p2] {
            stream.extend_from_slice(part);
        }
        let mut codec = UpstreamCodec::new(Dialect::Mqtt5, 0);
        // Fed one byte at a time, the frames come out whole and in order.
        let mut fed = BytesMut::new();
        let mut out = Vec::new();
        for b in stream.iter() {
            fed.extend_from_slice(&[*b]);
            while let Some(f) = codec.decode(&mut fed).unwrap() {
                out.push(f);
            }
        }
        assert!(fed.is_empty());
        assert_eq!(out.len(), 3);
        assert!(matches!(&out[0], Upstream::Publish(b) if b[..] == p1[..]));
        assert!(matches!(
            &out[1],
            Upstream::Packet(v5::Packet::PingResponse)
        ));
        assert!(matches!(&out[2], Upstream::Publish(b) if b[..] == p2[..]));
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut codec = UpstreamCodec::new(Dialect::Mqtt5, 100);
        let mut big = encode(publish(&[0; 200]));
        assert!(matches!(
            codec.decode(&mut big),
            Err(DecodeError::MaxSizeExceeded { .. })
        ));
        // Five length bytes.
        let mut bad = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert!(
            UpstreamCodec::new(Dialect::Mqtt5, 0)
                .decode(&mut bad)
                .is_err()
        );
        // A SUBACK too short for its packet identifier.
        let mut short = BytesMut::from(&[0x90, 0x01, 0x00][..]);
        assert!(
            UpstreamCodec::new(Dialect::Mqtt5, 0)
                .decode(&mut short)
                .is_err()
        );
    }
}
