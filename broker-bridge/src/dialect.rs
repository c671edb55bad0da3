//! The MQTT version a device connection speaks, and MQTT 3.1.1 packets translated to and from the
//! MQTT 5 packets the session decides with.
//!
//! One session state machine serves both versions: it works in MQTT 5 packets, and
//! an MQTT 3.1.1 connection's packets pass through this adapter on their way in (from the device
//! and from the broker, [`to_v5`]) and out (to either side, [`to_v3`]). The translation:
//!
//! - 3.1.1 → 5: every packet has an MQTT 5 twin without properties; a CONNACK return code becomes
//!   the MQTT 5 reason of the same meaning ([`connack_to_v5`]), a SUBACK failure 0x80.
//! - 5 → 3.1.1: properties and Reason Strings fall away; a SUBACK reason of 0x80 or more becomes
//!   the failure 0x80 (MQTT 3.1.1 §3.9.3); a PUBACK or PUBREC keeps only its packet identifier (the
//!   session never refuses an MQTT 3.1.1 PUBLISH with an acknowledgement: it closes the connection,
//!   as the session's docs say); a DISCONNECT passes only as a normal end (the client's own).
//!   Any other DISCONNECT is an end the bridge decided: MQTT 3.1.1 has no DISCONNECT from a server,
//!   and towards the broker a 3.1.1 DISCONNECT would discard the client's Will, which an end the
//!   bridge decides must publish; so both sides just see the connection close.

use bytes::BytesMut;
use rmqtt_codec::error::DecodeError;
use rmqtt_codec::types::QoS;
use rmqtt_codec::v5::{
    self, ConnectAckReason, DisconnectReasonCode, PublishAck2Reason, PublishAckReason,
    SubscribeAckReason,
};
use rmqtt_codec::{MqttCodec, MqttPacket, v3};
use tokio_util::codec::Decoder as _;

/// The MQTT version of a device connection (and of its upstream connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// MQTT 5: every Quva feature.
    Mqtt5,
    /// MQTT 3.1.1: unprotected topics only, as an unauthenticated client.
    Mqtt311,
}

impl Dialect {
    /// A codec for this version refusing packets over `max_in` bytes (0: no limit).
    pub(crate) fn codec(self, max_in: u32) -> MqttCodec {
        match self {
            Dialect::Mqtt5 => MqttCodec::V5(v5::Codec::new(max_in, 0)),
            Dialect::Mqtt311 => MqttCodec::V3(v3::Codec::new(max_in)),
        }
    }

    /// `packet` as this version puts it on the wire, or `None` when it has no form in it (see
    /// the module docs).
    pub(crate) fn wire(self, packet: v5::Packet) -> Option<MqttPacket> {
        match self {
            Dialect::Mqtt5 => Some(MqttPacket::V5(packet)),
            Dialect::Mqtt311 => to_v3(packet).map(MqttPacket::V3),
        }
    }
}

/// The next packet in `buf` as the session sees it: an MQTT 5 packet as it is, an MQTT 3.1.1
/// packet as its MQTT 5 twin ([`to_v5`]); `None` until a whole packet is there.
///
/// # Errors
/// The codec's, for bytes that are not a packet of its version or exceed its size limit.
pub(crate) fn decode(
    codec: &mut MqttCodec,
    buf: &mut BytesMut,
) -> Result<Option<v5::Packet>, DecodeError> {
    Ok(match codec {
        MqttCodec::V5(c) => c.decode(buf)?.map(|(p, _)| p),
        MqttCodec::V3(c) => c.decode(buf)?.map(|(p, _)| to_v5(p)),
        MqttCodec::Version(_) => None,
    })
}

/// The MQTT 5 reason of a 3.1.1 CONNACK return code (MQTT 5 §3.2.2.2 names the same refusals).
pub(crate) fn connack_to_v5(code: v3::ConnectAckReason) -> ConnectAckReason {
    use v3::ConnectAckReason as R3;
    match code {
        R3::ConnectionAccepted => ConnectAckReason::Success,
        R3::UnacceptableProtocolVersion => ConnectAckReason::UnsupportedProtocolVersion,
        R3::IdentifierRejected => ConnectAckReason::ClientIdentifierNotValid,
        R3::ServiceUnavailable => ConnectAckReason::ServerUnavailable,
        R3::BadUserNameOrPassword => ConnectAckReason::BadUserNameOrPassword,
        R3::NotAuthorized | R3::Reserved => ConnectAckReason::NotAuthorized,
    }
}

/// The 3.1.1 CONNACK return code of an MQTT 5 reason: the inverse of [`connack_to_v5`], and for
/// the reasons 3.1.1 cannot say, "server unavailable" when the server is the cause (busy, moved,
/// over a rate) and "not authorized" otherwise.
pub(crate) fn connack_to_v3(code: ConnectAckReason) -> v3::ConnectAckReason {
    use v3::ConnectAckReason as R3;
    match code {
        ConnectAckReason::Success => R3::ConnectionAccepted,
        ConnectAckReason::UnsupportedProtocolVersion => R3::UnacceptableProtocolVersion,
        ConnectAckReason::ClientIdentifierNotValid => R3::IdentifierRejected,
        ConnectAckReason::BadUserNameOrPassword => R3::BadUserNameOrPassword,
        ConnectAckReason::ServerUnavailable
        | ConnectAckReason::ServerBusy
        | ConnectAckReason::UseAnotherServer
        | ConnectAckReason::ServerMoved
        | ConnectAckReason::ConnectionRateExceeded
        | ConnectAckReason::QuotaExceeded => R3::ServiceUnavailable,
        _ => R3::NotAuthorized,
    }
}

fn suback_to_v5(code: v3::SubscribeReturnCode) -> SubscribeAckReason {
    match code {
        v3::SubscribeReturnCode::Success(QoS::AtMostOnce) => SubscribeAckReason::GrantedQos0,
        v3::SubscribeReturnCode::Success(QoS::AtLeastOnce) => SubscribeAckReason::GrantedQos1,
        v3::SubscribeReturnCode::Success(QoS::ExactlyOnce) => SubscribeAckReason::GrantedQos2,
        v3::SubscribeReturnCode::Failure => SubscribeAckReason::UnspecifiedError,
    }
}

fn suback_to_v3(code: SubscribeAckReason) -> v3::SubscribeReturnCode {
    match code {
        SubscribeAckReason::GrantedQos0 => v3::SubscribeReturnCode::Success(QoS::AtMostOnce),
        SubscribeAckReason::GrantedQos1 => v3::SubscribeReturnCode::Success(QoS::AtLeastOnce),
        SubscribeAckReason::GrantedQos2 => v3::SubscribeReturnCode::Success(QoS::ExactlyOnce),
        _ => v3::SubscribeReturnCode::Failure,
    }
}

fn puback(packet_id: std::num::NonZeroU16) -> v5::PublishAck {
    v5::PublishAck {
        packet_id,
        reason_code: PublishAckReason::Success,
        properties: Vec::new(),
        reason_string: None,
    }
}

fn puback2(packet_id: std::num::NonZeroU16) -> v5::PublishAck2 {
    v5::PublishAck2 {
        packet_id,
        reason_code: PublishAck2Reason::Success,
        properties: Vec::new(),
        reason_string: None,
    }
}

/// The MQTT 5 twin of an MQTT 3.1.1 packet (from the device or from the broker).
pub(crate) fn to_v5(packet: v3::Packet) -> v5::Packet {
    match packet {
        v3::Packet::Connect(c) => v5::Packet::Connect(Box::new(v5::Connect {
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            client_id: c.client_id,
            ..Default::default()
        })),
        v3::Packet::ConnectAck(a) => v5::Packet::ConnectAck(Box::new(v5::ConnectAck {
            session_present: a.session_present,
            reason_code: connack_to_v5(a.return_code),
            ..Default::default()
        })),
        v3::Packet::Publish(p) => v5::Packet::Publish(p),
        v3::Packet::PublishAck { packet_id } => v5::Packet::PublishAck(puback(packet_id)),
        v3::Packet::PublishReceived { packet_id } => v5::Packet::PublishReceived(puback(packet_id)),
        v3::Packet::PublishRelease { packet_id } => v5::Packet::PublishRelease(puback2(packet_id)),
        v3::Packet::PublishComplete { packet_id } => {
            v5::Packet::PublishComplete(puback2(packet_id))
        }
        v3::Packet::Subscribe {
            packet_id,
            topic_filters,
        } => v5::Packet::Subscribe(v5::Subscribe {
            packet_id,
            id: None,
            user_properties: Vec::new(),
            topic_filters: topic_filters
                .into_iter()
                .map(|(f, qos)| {
                    (
                        f,
                        v5::SubscriptionOptions {
                            qos,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
        }),
        v3::Packet::SubscribeAck { packet_id, status } => {
            v5::Packet::SubscribeAck(v5::SubscribeAck {
                packet_id,
                properties: Vec::new(),
                reason_string: None,
                status: status.into_iter().map(suback_to_v5).collect(),
            })
        }
        v3::Packet::Unsubscribe {
            packet_id,
            topic_filters,
        } => v5::Packet::Unsubscribe(v5::Unsubscribe {
            packet_id,
            user_properties: Vec::new(),
            topic_filters,
        }),
        v3::Packet::UnsubscribeAck { packet_id } => {
            v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
                packet_id,
                properties: Vec::new(),
                reason_string: None,
                status: Vec::new(),
            })
        }
        v3::Packet::PingRequest => v5::Packet::PingRequest,
        v3::Packet::PingResponse => v5::Packet::PingResponse,
        v3::Packet::Disconnect => v5::Packet::Disconnect(v5::Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
            session_expiry_interval_secs: None,
            server_reference: None,
            reason_string: None,
            user_properties: Vec::new(),
        }),
    }
}

/// The MQTT 3.1.1 form of an MQTT 5 packet, or `None` when it has none (module docs).
pub(crate) fn to_v3(packet: v5::Packet) -> Option<v3::Packet> {
    Some(match packet {
        v5::Packet::Connect(c) => v3::Packet::Connect(Box::new(v3::Connect {
            clean_session: c.clean_start,
            keep_alive: c.keep_alive,
            client_id: c.client_id,
            ..Default::default()
        })),
        v5::Packet::ConnectAck(a) => v3::Packet::ConnectAck(v3::ConnectAck {
            return_code: connack_to_v3(a.reason_code),
            session_present: a.session_present,
        }),
        v5::Packet::Publish(mut p) => {
            p.properties = None;
            v3::Packet::Publish(p)
        }
        v5::Packet::PublishAck(a) => v3::Packet::PublishAck {
            packet_id: a.packet_id,
        },
        v5::Packet::PublishReceived(a) => v3::Packet::PublishReceived {
            packet_id: a.packet_id,
        },
        v5::Packet::PublishRelease(a) => v3::Packet::PublishRelease {
            packet_id: a.packet_id,
        },
        v5::Packet::PublishComplete(a) => v3::Packet::PublishComplete {
            packet_id: a.packet_id,
        },
        v5::Packet::Subscribe(s) => v3::Packet::Subscribe {
            packet_id: s.packet_id,
            topic_filters: s
                .topic_filters
                .into_iter()
                .map(|(f, o)| (f, o.qos))
                .collect(),
        },
        v5::Packet::SubscribeAck(a) => v3::Packet::SubscribeAck {
            packet_id: a.packet_id,
            status: a.status.into_iter().map(suback_to_v3).collect(),
        },
        v5::Packet::Unsubscribe(u) => v3::Packet::Unsubscribe {
            packet_id: u.packet_id,
            topic_filters: u.topic_filters,
        },
        v5::Packet::UnsubscribeAck(a) => v3::Packet::UnsubscribeAck {
            packet_id: a.packet_id,
        },
        v5::Packet::PingRequest => v3::Packet::PingRequest,
        v5::Packet::PingResponse => v3::Packet::PingResponse,
        v5::Packet::Disconnect(d) if d.reason_code == DisconnectReasonCode::NormalDisconnection => {
            v3::Packet::Disconnect
        }
        v5::Packet::Disconnect(_) | v5::Packet::Auth(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU16;

    fn id(n: u16) -> NonZeroU16 {
        NonZeroU16::new(n).unwrap()
    }

    #[test]
    fn every_client_packet_survives_the_round_trip() {
        let publish = rmqtt_codec::types::Publish {
            dup: false,
            retain: true,
            qos: QoS::ExactlyOnce,
            topic: "a/b".into(),
            packet_id: Some(id(4)),
            payload: bytes::Bytes::from_static(b"x"),
            properties: None,
        };
        let packets = vec![
            v3::Packet::Publish(Box::new(publish)),
            v3::Packet::PublishAck { packet_id: id(1) },
            v3::Packet::PublishReceived { packet_id: id(2) },
            v3::Packet::PublishRelease { packet_id: id(3) },
            v3::Packet::PublishComplete { packet_id: id(4) },
            v3::Packet::Subscribe {
                packet_id: id(5),
                topic_filters: vec![
                    ("a/#".into(), QoS::AtLeastOnce),
                    ("b".into(), QoS::ExactlyOnce),
                ],
            },
            v3::Packet::SubscribeAck {
                packet_id: id(5),
                status: vec![
                    v3::SubscribeReturnCode::Success(QoS::AtMostOnce),
                    v3::SubscribeReturnCode::Failure,
                    v3::SubscribeReturnCode::Success(QoS::ExactlyOnce),
                ],
            },
            v3::Packet::Unsubscribe {
                packet_id: id(6),
                topic_filters: vec!["a/#".into()],
            },
            v3::Packet::UnsubscribeAck { packet_id: id(6) },
            v3::Packet::PingRequest,
            v3::Packet::PingResponse,
            v3::Packet::Disconnect,
            v3::Packet::ConnectAck(v3::ConnectAck {
                return_code: v3::ConnectAckReason::BadUserNameOrPassword,
                session_present: true,
            }),
        ];
        for p in packets {
            assert_eq!(to_v3(to_v5(p.clone())), Some(p.clone()), "{p:?}");
        }
    }

    #[test]
    fn connack_codes_keep_their_meaning() {
        use v3::ConnectAckReason as R3;
        for code in [
            R3::ConnectionAccepted,
            R3::UnacceptableProtocolVersion,
            R3::IdentifierRejected,
            R3::ServiceUnavailable,
            R3::BadUserNameOrPassword,
            R3::NotAuthorized,
        ] {
            assert_eq!(connack_to_v3(connack_to_v5(code)), code);
        }
        assert_eq!(
            connack_to_v3(ConnectAckReason::ServerBusy),
            R3::ServiceUnavailable
        );
        assert_eq!(
            connack_to_v3(ConnectAckReason::BadAuthenticationMethod),
            R3::NotAuthorized
        );
    }

    #[test]
    fn refusals_and_bridge_disconnects_have_no_3_1_1_form_beyond_failure_and_close() {
        let suback = v5::Packet::SubscribeAck(v5::SubscribeAck {
            packet_id: id(1),
            properties: vec![("k".into(), "v".into())],
            reason_string: Some("why".into()),
            status: vec![
                SubscribeAckReason::NotAuthorized,
                SubscribeAckReason::TopicFilterInvalid,
                SubscribeAckReason::GrantedQos1,
            ],
        });
        assert_eq!(
            to_v3(suback),
            Some(v3::Packet::SubscribeAck {
                packet_id: id(1),
                status: vec![
                    v3::SubscribeReturnCode::Failure,
                    v3::SubscribeReturnCode::Failure,
                    v3::SubscribeReturnCode::Success(QoS::AtLeastOnce),
                ],
            })
        );
        for code in [
            DisconnectReasonCode::DisconnectWithWillMessage,
            DisconnectReasonCode::NotAuthorized,
            DisconnectReasonCode::KeepAliveTimeout,
            DisconnectReasonCode::ServerShuttingDown,
        ] {
            let d = v5::Packet::Disconnect(v5::Disconnect {
                reason_code: code,
                session_expiry_interval_secs: None,
                server_reference: None,
                reason_string: None,
                user_properties: Vec::new(),
            });
            assert!(Dialect::Mqtt311.wire(d).is_none(), "{code:?}");
        }
    }
}
