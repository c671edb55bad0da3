//! Bearer-token and client-certificate authentication of the two gRPC services.
//!
//! Admin RPCs need the admin token, device-path RPCs the bridge token, sent as the metadata
//! `authorization: Bearer <token>`. With mutual TLS configured ([`BridgeCerts`]), a device-path
//! call over a connection whose client certificate chains to the configured bridge CA (checked
//! by the TLS layer) needs no token, and can be required; a client certificate never grants the
//! admin service. Tokens are compared in constant time (their SHA-256 digests,
//! so the length is not compared either). A missing, malformed or unknown token is
//! `UNAUTHENTICATED`; the other service's token is `PERMISSION_DENIED`. Every refusal is written
//! to the audit log; no token ever is.
//!
//! # Usage
//! ```
//! use quva_ca::auth::{Principal, Tokens};
//! let tokens = Tokens::new("admin-secret", "bridge-secret");
//! assert_eq!(tokens.identify("bridge-secret"), Some(Principal::Bridge));
//! assert_eq!(tokens.identify("guess"), None);
//! ```

use std::sync::Arc;

use quva_client::curve::sha256;
use quva_proto::v1::AuditEntry;
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::audit_kind::AuditKind;

/// Who a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// The owner's tooling.
    Admin,
    /// A bridge.
    Bridge,
}

impl Principal {
    /// The actor name in audit entries.
    pub fn as_str(self) -> &'static str {
        match self {
            Principal::Admin => "admin",
            Principal::Bridge => "bridge",
        }
    }
}

/// The digests of the two tokens.
pub struct Tokens {
    admin: [u8; 32],
    bridge: [u8; 32],
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(<redacted>)")
    }
}

impl Tokens {
    /// Keeps the digests of the admin and bridge tokens.
    pub fn new(admin: &str, bridge: &str) -> Tokens {
        Tokens {
            admin: sha256(&[admin.as_bytes()]),
            bridge: sha256(&[bridge.as_bytes()]),
        }
    }

    /// Whose token this is, in constant time.
    pub fn identify(&self, presented: &str) -> Option<Principal> {
        let d = sha256(&[presented.as_bytes()]);
        let admin = d.ct_eq(&self.admin);
        let bridge = d.ct_eq(&self.bridge);
        if bool::from(admin) {
            Some(Principal::Admin)
        } else if bool::from(bridge) {
            Some(Principal::Bridge)
        } else {
            None
        }
    }
}

/// Where refusals are recorded (the engine's audit log).
pub trait AuditSink: Send + Sync + 'static {
    /// Records an entry; `seq` and `time_ms` are filled in by the sink.
    fn record(&self, entry: AuditEntry);
}

/// What a verified client certificate means on the device path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeCerts {
    /// No bridge CA configured: only the token counts.
    Ignored,
    /// A client certificate from the bridge CA is enough; the bridge token works too.
    Accepted,
    /// A client certificate from the bridge CA is needed; the token alone is refused.
    Required,
}

/// The token check in front of one service.
#[derive(Clone)]
pub struct Guard {
    tokens: Arc<Tokens>,
    need: Principal,
    certs: BridgeCerts,
    audit: Arc<dyn AuditSink>,
}

impl Guard {
    /// A guard admitting only `need`'s token (and, for the bridge, a client certificate as
    /// `certs` says).
    pub fn new(
        tokens: Arc<Tokens>,
        need: Principal,
        certs: BridgeCerts,
        audit: Arc<dyn AuditSink>,
    ) -> Guard {
        Guard {
            tokens,
            need,
            certs,
            audit,
        }
    }

    /// Checks a request's metadata; `client_cert` says whether the connection presented a client
    /// certificate that the TLS layer verified against the bridge CA.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` or `PERMISSION_DENIED`, after recording an audit entry.
    pub fn check(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        client_cert: bool,
    ) -> Result<(), Status> {
        if self.need == Principal::Bridge {
            match (self.certs, client_cert) {
                (BridgeCerts::Accepted | BridgeCerts::Required, true) => return Ok(()),
                (BridgeCerts::Required, false) => {
                    return Err(self.refuse(
                        Status::unauthenticated("client certificate required"),
                        "missing certificate",
                        "anonymous",
                    ));
                }
                _ => {}
            }
        }
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let (status, outcome, actor) = match presented.map(|t| self.tokens.identify(t.trim())) {
            Some(Some(p)) if p == self.need => return Ok(()),
            Some(Some(p)) => (
                Status::permission_denied("token not valid for this service"),
                "wrong service",
                p.as_str(),
            ),
            Some(None) => (
                Status::unauthenticated("invalid token"),
                "unknown token",
                "anonymous",
            ),
            None => (
                Status::unauthenticated("missing bearer token"),
                "missing token",
                "anonymous",
            ),
        };
        Err(self.refuse(status, outcome, actor))
    }

    fn refuse(&self, status: Status, outcome: &str, actor: &str) -> Status {
        let service = match self.need {
            Principal::Admin => "admin service",
            Principal::Bridge => "device service",
        };
        tracing::warn!(service, outcome, "request refused");
        self.audit.record(AuditEntry {
            kind: AuditKind::AuthDenied.as_str().into(),
            actor: actor.into(),
            outcome: outcome.into(),
            detail: service.into(),
            ..Default::default()
        });
        status
    }
}

impl Interceptor for Guard {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        // With `client_auth_optional`, rustls only hands on certificates that chain to the
        // configured client CA; any other is refused in the handshake.
        let client_cert = req.peer_certs().is_some_and(|c| !c.is_empty());
        self.check(req.metadata(), client_cert)?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tonic::Code;
    use tonic::metadata::MetadataMap;

    #[derive(Default)]
    struct Log(Mutex<Vec<AuditEntry>>);
    impl AuditSink for Log {
        fn record(&self, entry: AuditEntry) {
            self.0.lock().unwrap().push(entry);
        }
    }

    fn md(v: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = v {
            m.insert("authorization", v.parse().unwrap());
        }
        m
    }

    #[test]
    fn statuses_and_audit() {
        let log = Arc::new(Log::default());
        let tokens = Arc::new(Tokens::new("a-token", "b-token"));
        let g = Guard::new(tokens, Principal::Admin, BridgeCerts::Accepted, log.clone());
        assert!(g.check(&md(Some("Bearer a-token")), false).is_ok());
        let cases = [
            (None, Code::Unauthenticated),
            (Some("a-token"), Code::Unauthenticated),
            (Some("Bearer nope"), Code::Unauthenticated),
            (Some("Bearer b-token"), Code::PermissionDenied),
        ];
        for (value, code) in cases {
            assert_eq!(
                g.check(&md(value), false).unwrap_err().code(),
                code,
                "{value:?}"
            );
        }
        let entries = log.0.lock().unwrap();
        assert_eq!(entries.len(), 4);
        assert!(
            entries
                .iter()
                .all(|e| e.kind == AuditKind::AuthDenied.as_str())
        );
        let text = format!("{entries:?}");
        assert!(!text.contains("a-token") && !text.contains("b-token") && !text.contains("nope"));
        assert_eq!(entries[3].actor, "bridge");
        drop(entries);
        // A client certificate never opens the admin service.
        assert_eq!(
            g.check(&md(None), true).unwrap_err().code(),
            Code::Unauthenticated
        );
    }

    #[test]
    fn client_certificates_on_the_device_path() {
        let log = Arc::new(Log::default());
        let tokens = Arc::new(Tokens::new("a-token", "b-token"));
        let guard = |certs| Guard::new(tokens.clone(), Principal::Bridge, certs, log.clone());
        let token = md(Some("Bearer b-token"));
        let none = md(None);
        let ignored = guard(BridgeCerts::Ignored);
        assert!(ignored.check(&token, false).is_ok());
        assert!(ignored.check(&none, true).is_err());
        let accepted = guard(BridgeCerts::Accepted);
        assert!(accepted.check(&none, true).is_ok());
        assert!(accepted.check(&token, false).is_ok());
        assert!(accepted.check(&none, false).is_err());
        let required = guard(BridgeCerts::Required);
        assert!(required.check(&none, true).is_ok());
        assert_eq!(
            required.check(&token, false).unwrap_err().code(),
            Code::Unauthenticated
        );
        let entries = log.0.lock().unwrap();
        let outcomes: Vec<&str> = entries.iter().map(|e| e.outcome.as_str()).collect();
        assert_eq!(
            outcomes,
            ["missing token", "missing token", "missing certificate"]
        );
    }
}
