//! The reasons the bridge itself gives when it refuses a CONNECT, a subscription filter or a
//! PUBLISH: one small enum per packet, each with its MQTT 5 reason code (MQTT 5 §2.4) and what an
//! MQTT 3.1.1 client hears instead.
//!
//! The codes follow PROTOCOL.md §3 (CONNACK), §4 (SUBACK) and §6 (PUBACK), named in
//! [`quva_client::reasons`] (their one home, with what each means to a device). Reasons that
//! quva-client computes as bytes (an enrollment or message check's `connack_reason` or
//! `puback_reason_code`) enter through `from_code`, which keeps the codes this bridge uses and
//! reads any other as "not authorized", the safest refusal. Why the bridge ends a connection is
//! rmqtt-codec's own `DisconnectReasonCode`, already an enum.

use quva_client::reasons::{
    BAD_AUTHENTICATION_METHOD, CLIENT_IDENTIFIER_NOT_VALID, NOT_AUTHORIZED, PACKET_TOO_LARGE,
    PAYLOAD_FORMAT_INVALID, SERVER_UNAVAILABLE, TOPIC_FILTER_INVALID, UNSPECIFIED_ERROR,
};
use rmqtt_codec::v3;
use rmqtt_codec::v5::{ConnectAckReason, PublishAckReason, SubscribeAckReason};

use crate::dialect::connack_to_v3;

/// Why the bridge refuses a CONNECT (the CONNACK reason, PROTOCOL.md §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnectRefusal {
    /// 0x85: an empty client identifier without Clean Start (MQTT 5 §3.1.3.1).
    ClientIdentifierNotValid,
    /// 0x87: a proof, certificate, Will or identity the bridge does not accept.
    NotAuthorized,
    /// 0x88: the CA or the broker cannot be reached.
    ServerUnavailable,
    /// 0x8C: an Authentication Method that is not Quva's.
    BadAuthenticationMethod,
    /// 0x95: a CONNECT over the maximum packet size, or authentication data over its limits.
    PacketTooLarge,
    /// 0x99: authentication data that does not decode.
    PayloadFormatInvalid,
}

impl ConnectRefusal {
    /// The MQTT 5 reason code.
    pub(crate) const fn code(self) -> u8 {
        match self {
            ConnectRefusal::ClientIdentifierNotValid => CLIENT_IDENTIFIER_NOT_VALID,
            ConnectRefusal::NotAuthorized => NOT_AUTHORIZED,
            ConnectRefusal::ServerUnavailable => SERVER_UNAVAILABLE,
            ConnectRefusal::BadAuthenticationMethod => BAD_AUTHENTICATION_METHOD,
            ConnectRefusal::PacketTooLarge => PACKET_TOO_LARGE,
            ConnectRefusal::PayloadFormatInvalid => PAYLOAD_FORMAT_INVALID,
        }
    }

    /// The refusal of a CONNACK reason code computed by quva-client (module docs).
    pub(crate) const fn from_code(code: u8) -> Self {
        match code {
            CLIENT_IDENTIFIER_NOT_VALID => ConnectRefusal::ClientIdentifierNotValid,
            SERVER_UNAVAILABLE => ConnectRefusal::ServerUnavailable,
            BAD_AUTHENTICATION_METHOD => ConnectRefusal::BadAuthenticationMethod,
            PACKET_TOO_LARGE => ConnectRefusal::PacketTooLarge,
            PAYLOAD_FORMAT_INVALID => ConnectRefusal::PayloadFormatInvalid,
            _ => ConnectRefusal::NotAuthorized,
        }
    }

    /// The MQTT 5 CONNACK reason.
    pub(crate) fn v5(self) -> ConnectAckReason {
        match self {
            ConnectRefusal::ClientIdentifierNotValid => ConnectAckReason::ClientIdentifierNotValid,
            ConnectRefusal::NotAuthorized => ConnectAckReason::NotAuthorized,
            ConnectRefusal::ServerUnavailable => ConnectAckReason::ServerUnavailable,
            ConnectRefusal::BadAuthenticationMethod => ConnectAckReason::BadAuthenticationMethod,
            ConnectRefusal::PacketTooLarge => ConnectAckReason::PacketTooLarge,
            ConnectRefusal::PayloadFormatInvalid => ConnectAckReason::PayloadFormatInvalid,
        }
    }

    /// The MQTT 3.1.1 CONNACK return code: 3 (server unavailable), 2 (identifier rejected), and 5
    /// (not authorized) for the rest, which 3.1.1 cannot tell apart ([`connack_to_v3`]).
    pub(crate) fn v3(self) -> v3::ConnectAckReason {
        connack_to_v3(self.v5())
    }
}

/// Why the bridge refuses one subscription filter (its SUBACK reason, PROTOCOL.md §4, §8). An
/// MQTT 3.1.1 client hears the failure 0x80 for each ([`crate::dialect`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SubscribeRefusal {
    /// 0x80: the CA could not decide (unavailable, or no answer).
    Unspecified,
    /// 0x87: a protected or reserved topic the connection may not read, or a wildcard that can
    /// match one.
    NotAuthorized,
    /// 0x8F: not a valid topic filter.
    TopicFilterInvalid,
}

impl SubscribeRefusal {
    /// The MQTT 5 reason code.
    pub(crate) const fn code(self) -> u8 {
        match self {
            SubscribeRefusal::Unspecified => UNSPECIFIED_ERROR,
            SubscribeRefusal::NotAuthorized => NOT_AUTHORIZED,
            SubscribeRefusal::TopicFilterInvalid => TOPIC_FILTER_INVALID,
        }
    }

    /// The MQTT 5 SUBACK reason.
    pub(crate) fn v5(self) -> SubscribeAckReason {
        match self {
            SubscribeRefusal::Unspecified => SubscribeAckReason::UnspecifiedError,
            SubscribeRefusal::NotAuthorized => SubscribeAckReason::NotAuthorized,
            SubscribeRefusal::TopicFilterInvalid => SubscribeAckReason::TopicFilterInvalid,
        }
    }
}

/// Why the bridge drops a PUBLISH (its PUBACK or PUBREC reason, PROTOCOL.md §6). MQTT 3.1.1 has
/// no negative acknowledgement: an MQTT 3.1.1 client's connection is closed instead (the
/// session's rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PublishRefusal {
    /// 0x87: not signed by an allowed sender, replayed, stale, or on a topic the connection may
    /// not publish to.
    NotAuthorized,
    /// 0x99: a payload that does not decode, or over its size limit.
    PayloadFormatInvalid,
}

impl PublishRefusal {
    /// The MQTT 5 reason code.
    pub(crate) const fn code(self) -> u8 {
        match self {
            PublishRefusal::NotAuthorized => NOT_AUTHORIZED,
            PublishRefusal::PayloadFormatInvalid => PAYLOAD_FORMAT_INVALID,
        }
    }

    /// The refusal of a PUBACK reason code computed by quva-client (module docs).
    pub(crate) const fn from_code(code: u8) -> Self {
        match code {
            PAYLOAD_FORMAT_INVALID => PublishRefusal::PayloadFormatInvalid,
            _ => PublishRefusal::NotAuthorized,
        }
    }

    /// The MQTT 5 PUBACK/PUBREC reason.
    pub(crate) fn v5(self) -> PublishAckReason {
        match self {
            PublishRefusal::NotAuthorized => PublishAckReason::NotAuthorized,
            PublishRefusal::PayloadFormatInvalid => PublishAckReason::PayloadFormatInvalid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quva_client::enrollment::{
        REASON_BAD_AUTHENTICATION_METHOD, REASON_NOT_AUTHORIZED, REASON_PACKET_TOO_LARGE,
        REASON_PAYLOAD_FORMAT_INVALID,
    };

    const CONNECT: [ConnectRefusal; 6] = [
        ConnectRefusal::ClientIdentifierNotValid,
        ConnectRefusal::NotAuthorized,
        ConnectRefusal::ServerUnavailable,
        ConnectRefusal::BadAuthenticationMethod,
        ConnectRefusal::PacketTooLarge,
        ConnectRefusal::PayloadFormatInvalid,
    ];

    #[test]
    fn each_refusal_has_one_code_and_its_mqtt5_reason_says_the_same() {
        for r in CONNECT {
            assert_eq!(u8::from(r.v5()), r.code(), "{r:?}");
            assert_eq!(ConnectRefusal::from_code(r.code()), r);
        }
        for r in [
            SubscribeRefusal::Unspecified,
            SubscribeRefusal::NotAuthorized,
            SubscribeRefusal::TopicFilterInvalid,
        ] {
            assert_eq!(u8::from(r.v5()), r.code(), "{r:?}");
        }
        for r in [
            PublishRefusal::NotAuthorized,
            PublishRefusal::PayloadFormatInvalid,
        ] {
            assert_eq!(u8::from(r.v5()), r.code(), "{r:?}");
            assert_eq!(PublishRefusal::from_code(r.code()), r);
        }
    }

    #[test]
    fn quva_client_codes_map_to_their_refusals_and_unknown_ones_to_not_authorized() {
        assert_eq!(
            ConnectRefusal::from_code(REASON_NOT_AUTHORIZED),
            ConnectRefusal::NotAuthorized
        );
        assert_eq!(
            ConnectRefusal::from_code(REASON_BAD_AUTHENTICATION_METHOD),
            ConnectRefusal::BadAuthenticationMethod
        );
        assert_eq!(
            ConnectRefusal::from_code(REASON_PACKET_TOO_LARGE),
            ConnectRefusal::PacketTooLarge
        );
        assert_eq!(
            ConnectRefusal::from_code(REASON_PAYLOAD_FORMAT_INVALID),
            ConnectRefusal::PayloadFormatInvalid
        );
        // Success or an unknown byte is never read as anything but a refusal.
        for code in [0x00, 0x01, 0x80, 0x9F, 0xFF] {
            assert_eq!(
                ConnectRefusal::from_code(code),
                ConnectRefusal::NotAuthorized
            );
            assert_eq!(
                PublishRefusal::from_code(code),
                PublishRefusal::NotAuthorized
            );
        }
    }

    #[test]
    fn mqtt311_clients_hear_unavailable_rejected_or_not_authorized() {
        use v3::ConnectAckReason as R3;
        let heard: Vec<_> = CONNECT.iter().map(|r| r.v3()).collect();
        assert_eq!(
            heard,
            [
                R3::IdentifierRejected,
                R3::NotAuthorized,
                R3::ServiceUnavailable,
                R3::NotAuthorized,
                R3::NotAuthorized,
                R3::NotAuthorized
            ]
        );
    }
}
