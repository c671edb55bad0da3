//! MQTT 5 reason codes as Quva uses them, and what each means to an operator: one table for the
//! device, the bridge and the CA.
//!
//! The codes are MQTT 5's (§2.4); their Quva meanings follow PROTOCOL.md §3 (CONNACK: enrollment
//! and certificate proofs), §4 (SUBACK: group-key requests) and §6 (PUBACK: message checks). The
//! bridge sends these codes, quva-client's checks compute them (an enrollment error's
//! `connack_reason`, a rejection's `puback_reason_code`), and the device explains the ones it
//! receives with [`connack_meaning`], [`suback_meaning`], [`puback_meaning`] and
//! [`disconnect_meaning`].
//!
//! # Usage
//! ```
//! use quva_client::reasons::{self, NOT_AUTHORIZED, SERVER_UNAVAILABLE};
//! assert!(reasons::connack_meaning(SERVER_UNAVAILABLE).contains("CA"));
//! assert!(reasons::connack_is_transient(SERVER_UNAVAILABLE));
//! assert!(!reasons::connack_is_transient(NOT_AUTHORIZED));
//! assert!(reasons::suback_meaning(NOT_AUTHORIZED).starts_with("not authorized"));
//! ```

/// 0x80: unspecified error (SUBACK: the CA could not decide, or is unavailable).
pub const UNSPECIFIED_ERROR: u8 = 0x80;
/// 0x81: malformed packet.
pub const MALFORMED_PACKET: u8 = 0x81;
/// 0x82: protocol error.
pub const PROTOCOL_ERROR: u8 = 0x82;
/// 0x84: unsupported protocol version.
pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
/// 0x85: client identifier not valid.
pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
/// 0x86: bad user name or password.
pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
/// 0x87, not authorized: unknown, revoked or unproven devices, stale or replayed requests, bad
/// signatures, members not allowed in a role.
pub const NOT_AUTHORIZED: u8 = 0x87;
/// 0x88: server unavailable (the bridge cannot reach the CA).
pub const SERVER_UNAVAILABLE: u8 = 0x88;
/// 0x89: server busy.
pub const SERVER_BUSY: u8 = 0x89;
/// 0x8A: banned.
pub const BANNED: u8 = 0x8A;
/// 0x8B: server shutting down (DISCONNECT).
pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
/// 0x8C: bad authentication method (not a Quva method).
pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
/// 0x8E: session taken over (DISCONNECT: another connection used the client identifier).
pub const SESSION_TAKEN_OVER: u8 = 0x8E;
/// 0x8F: topic filter invalid.
pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
/// 0x90: topic name invalid.
pub const TOPIC_NAME_INVALID: u8 = 0x90;
/// 0x91: packet identifier in use.
pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
/// 0x95: packet too large (authentication data over its limits).
pub const PACKET_TOO_LARGE: u8 = 0x95;
/// 0x97: quota exceeded.
pub const QUOTA_EXCEEDED: u8 = 0x97;
/// 0x98: administrative action (DISCONNECT).
pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
/// 0x99: payload format invalid (data that does not decode, or is oversized).
pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
/// 0x9E: shared subscriptions not supported.
pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
/// 0x9F: connection rate exceeded.
pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
/// 0xA1: subscription identifiers not supported.
pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
/// 0xA2: wildcard subscriptions not supported.
pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;

/// What a CONNACK reason code means for a Quva device (PROTOCOL.md §3).
pub fn connack_meaning(code: u8) -> &'static str {
    match code {
        UNSPECIFIED_ERROR => "unspecified error",
        MALFORMED_PACKET => "malformed packet",
        PROTOCOL_ERROR => "protocol error",
        UNSUPPORTED_PROTOCOL_VERSION => {
            "unsupported protocol version (the server does not speak MQTT 5)"
        }
        CLIENT_IDENTIFIER_NOT_VALID => "client identifier not valid",
        BAD_USER_NAME_OR_PASSWORD => "bad user name or password",
        NOT_AUTHORIZED => {
            "not authorized: the device is unknown, revoked or expired, the enrollment secret is \
             wrong or already used, or this device's clock is off by more than the allowed window"
        }
        SERVER_UNAVAILABLE => "server unavailable: the bridge cannot reach the CA",
        SERVER_BUSY => "server busy",
        BANNED => "banned",
        BAD_AUTHENTICATION_METHOD => {
            "bad authentication method: the server does not speak Quva (is the address the \
             bridge's, not the broker's?)"
        }
        PACKET_TOO_LARGE => "packet too large",
        QUOTA_EXCEEDED => "quota exceeded",
        PAYLOAD_FORMAT_INVALID => "malformed authentication data",
        CONNECTION_RATE_EXCEEDED => "connection rate exceeded",
        _ => "refused",
    }
}

/// Whether a CONNACK refusal may clear by itself (the CA comes back, the server's load drops),
/// so that retrying later can succeed; every other refusal needs an operator.
pub fn connack_is_transient(code: u8) -> bool {
    matches!(
        code,
        SERVER_UNAVAILABLE | SERVER_BUSY | QUOTA_EXCEEDED | CONNECTION_RATE_EXCEEDED
    )
}

/// What a SUBACK reason code means for a Quva subscription (PROTOCOL.md §4, §8).
pub fn suback_meaning(code: u8) -> &'static str {
    match code {
        UNSPECIFIED_ERROR => "the CA is unavailable or failed",
        NOT_AUTHORIZED => "not authorized (role not allowed, device revoked, or clock skew)",
        TOPIC_FILTER_INVALID => "invalid topic filter",
        PACKET_IDENTIFIER_IN_USE => "packet identifier in use",
        QUOTA_EXCEEDED => "quota exceeded",
        SHARED_SUBSCRIPTIONS_NOT_SUPPORTED => "shared subscriptions not supported",
        SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED => "subscription identifiers not supported",
        WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED => "wildcard subscriptions not supported",
        _ => "refused",
    }
}

/// What a PUBACK reason code means for a Quva message (PROTOCOL.md §6).
pub fn puback_meaning(code: u8) -> &'static str {
    match code {
        NOT_AUTHORIZED => {
            "not authorized (not a member in this role, stale epoch or timestamp, bad signature, \
             or a replay)"
        }
        PAYLOAD_FORMAT_INVALID => "malformed or oversized message",
        TOPIC_NAME_INVALID => "topic name invalid",
        QUOTA_EXCEEDED => "quota exceeded",
        _ => "refused",
    }
}

/// Why the bridge ended a session, from its DISCONNECT reason code.
pub fn disconnect_meaning(code: u8) -> &'static str {
    match code {
        NOT_AUTHORIZED => "not authorized (revoked?)",
        SERVER_SHUTTING_DOWN => "the bridge is shutting down",
        SESSION_TAKEN_OVER => "another connection took over this client identifier",
        ADMINISTRATIVE_ACTION => "administrative action",
        _ => "see the bridge's log",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codes_quva_gives_have_their_own_meaning() {
        for code in [
            NOT_AUTHORIZED,
            SERVER_UNAVAILABLE,
            BAD_AUTHENTICATION_METHOD,
            PACKET_TOO_LARGE,
            PAYLOAD_FORMAT_INVALID,
            CLIENT_IDENTIFIER_NOT_VALID,
        ] {
            assert_ne!(connack_meaning(code), "refused", "CONNACK 0x{code:02x}");
        }
        for code in [UNSPECIFIED_ERROR, NOT_AUTHORIZED, TOPIC_FILTER_INVALID] {
            assert_ne!(suback_meaning(code), "refused", "SUBACK 0x{code:02x}");
        }
        for code in [NOT_AUTHORIZED, PAYLOAD_FORMAT_INVALID] {
            assert_ne!(puback_meaning(code), "refused", "PUBACK 0x{code:02x}");
        }
        for code in [NOT_AUTHORIZED, SERVER_SHUTTING_DOWN, SESSION_TAKEN_OVER] {
            assert_ne!(
                disconnect_meaning(code),
                "see the bridge's log",
                "DISCONNECT 0x{code:02x}"
            );
        }
        assert!(connack_meaning(SERVER_UNAVAILABLE).contains("CA"));
        assert!(connack_meaning(BAD_AUTHENTICATION_METHOD).contains("Quva"));
    }

    #[test]
    fn success_and_unknown_codes_read_as_a_plain_refusal() {
        for code in [0x00, 0x01, 0x83, 0xFF] {
            assert_eq!(connack_meaning(code), "refused");
            assert_eq!(suback_meaning(code), "refused");
            assert_eq!(puback_meaning(code), "refused");
            assert!(!connack_is_transient(code));
        }
    }

    #[test]
    fn only_load_and_availability_refusals_are_transient() {
        let transient: Vec<u8> = (0..=u8::MAX).filter(|c| connack_is_transient(*c)).collect();
        assert_eq!(
            transient,
            [
                SERVER_UNAVAILABLE,
                SERVER_BUSY,
                QUOTA_EXCEEDED,
                CONNECTION_RATE_EXCEEDED
            ]
        );
    }
}
