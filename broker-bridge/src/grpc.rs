//! The CA client over gRPC (package `quva.ca.v1`, service `DeviceService`).
//!
//! Every call carries `authorization: Bearer <token>`; the channel connects lazily, so the bridge
//! starts while the CA is away and each call fails fast with [`CaError::Unavailable`] (the caller
//! bounds it with the configured timeout). gRPC status codes map onto [`CaError`]:
//! `PERMISSION_DENIED`, `UNAUTHENTICATED`, `FAILED_PRECONDITION` and `ALREADY_EXISTS` are refusals,
//! `INVALID_ARGUMENT` is malformed input, `NOT_FOUND` is not found, everything else unavailable.

use std::time::Duration;

use quva_client::ids::{Epoch, GroupId};
use quva_proto::v1::device_service_client::DeviceServiceClient;
use quva_proto::v1::{self as pb, NoticeKind};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::ca::{
    BoxFuture, CaClient, CaError, GroupSnapshot, MemberCertificate, Notice, NoticeAction,
    NoticeStream,
};

/// A [`CaClient`] over a lazily connected gRPC channel.
#[derive(Clone)]
pub struct GrpcCa {
    client: DeviceServiceClient<Channel>,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for GrpcCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcCa").finish_non_exhaustive()
    }
}

fn map_status(s: &Status) -> CaError {
    match s.code() {
        Code::PermissionDenied
        | Code::Unauthenticated
        | Code::FailedPrecondition
        | Code::AlreadyExists => CaError::Refused,
        Code::InvalidArgument | Code::OutOfRange => CaError::Malformed,
        Code::NotFound => CaError::NotFound,
        _ => CaError::Unavailable,
    }
}

impl GrpcCa {
    /// A client for `endpoint` (from [`quva_proto::tls::endpoint`], with or without TLS) with
    /// the bridge's bearer token, if any.
    ///
    /// # Errors
    /// [`CaError::InvalidResponse`] if the token is not usable as metadata.
    pub fn new(
        endpoint: Endpoint,
        token: Option<&str>,
        connect_timeout: Duration,
    ) -> Result<Self, CaError> {
        let channel = endpoint.connect_timeout(connect_timeout).connect_lazy();
        let token = token
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .map_err(|_| CaError::InvalidResponse)?;
        Ok(GrpcCa {
            client: DeviceServiceClient::new(channel),
            token,
        })
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }
}

struct GrpcNotices(tonic::Streaming<pb::Notice>);

impl NoticeStream for GrpcNotices {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Notice, CaError>>> {
        Box::pin(async move {
            match self.0.message().await {
                Ok(Some(n)) => Some(Ok(convert_notice(n))),
                Ok(None) => None,
                Err(s) => Some(Err(map_status(&s))),
            }
        })
    }
}

fn convert_notice(n: pb::Notice) -> Notice {
    let action = match NoticeKind::try_from(n.kind) {
        Ok(NoticeKind::Rekey) => NoticeAction::Rekey {
            topic: n.topic,
            payload: n.payload,
        },
        Ok(NoticeKind::GroupUpdated) => NoticeAction::GroupUpdated,
        Ok(NoticeKind::Revoked) if n.superseded_by != 0 => NoticeAction::Superseded {
            serial: n.serial,
            device: n.device_id,
            successor: n.superseded_by,
        },
        Ok(NoticeKind::Revoked) => NoticeAction::Revoked {
            serial: n.serial,
            device: n.device_id,
        },
        _ => NoticeAction::Unknown,
    };
    Notice {
        seq: n.seq,
        group: n.group,
        epoch: n.epoch,
        action,
    }
}

impl CaClient for GrpcCa {
    fn enroll(&self, auth_data: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, CaError>> {
        Box::pin(async move {
            let r = self.request(pb::EnrollRequest { auth_data });
            let resp = self
                .client
                .clone()
                .enroll(r)
                .await
                .map_err(|s| map_status(&s))?;
            Ok(resp.into_inner().auth_data)
        })
    }

    fn renew(&self, auth_data: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, CaError>> {
        Box::pin(async move {
            let r = self.request(pb::RenewRequest { auth_data });
            let resp = self
                .client
                .clone()
                .renew(r)
                .await
                .map_err(|s| map_status(&s))?;
            Ok(resp.into_inner().auth_data)
        })
    }

    fn join_group(&self, request: Vec<u8>) -> BoxFuture<'_, Result<(Vec<u8>, Epoch), CaError>> {
        Box::pin(async move {
            let r = self.request(pb::JoinGroupRequest { request });
            let resp = self
                .client
                .clone()
                .join_group(r)
                .await
                .map_err(|s| map_status(&s))?;
            let resp = resp.into_inner();
            Ok((resp.response, Epoch(resp.epoch)))
        })
    }

    fn get_group(&self, group: GroupId) -> BoxFuture<'_, Result<GroupSnapshot, CaError>> {
        Box::pin(async move {
            let r = self.request(pb::GetGroupRequest {
                group: group.as_str().to_owned(),
            });
            let resp = self
                .client
                .clone()
                .get_group(r)
                .await
                .map_err(|s| map_status(&s))?;
            let resp = resp.into_inner();
            if resp.group != group.as_str() {
                return Err(CaError::InvalidResponse);
            }
            Ok(GroupSnapshot {
                group,
                epoch: Epoch(resp.epoch),
                signed_ginfo: resp.signed_ginfo,
                members: resp
                    .members
                    .into_iter()
                    .map(|m| MemberCertificate {
                        role: u8::try_from(m.role).unwrap_or(0),
                        cert: m.cert,
                        share_point: m.share_point,
                    })
                    .collect(),
            })
        })
    }

    fn ca_public_key(&self) -> BoxFuture<'_, Result<Vec<u8>, CaError>> {
        Box::pin(async move {
            let r = self.request(pb::GetCaInfoRequest {});
            let resp = self
                .client
                .clone()
                .get_ca_info(r)
                .await
                .map_err(|s| map_status(&s))?;
            Ok(resp.into_inner().public_key)
        })
    }

    fn is_revoked(&self, serial: u64) -> BoxFuture<'_, Result<bool, CaError>> {
        Box::pin(async move {
            let r = self.request(pb::GetRevocationStatusRequest {
                serials: vec![serial],
            });
            let resp = self
                .client
                .clone()
                .get_revocation_status(r)
                .await
                .map_err(|s| map_status(&s))?;
            let status = resp
                .into_inner()
                .statuses
                .into_iter()
                .find(|s| s.serial == serial)
                .ok_or(CaError::InvalidResponse)?;
            Ok(status.revoked || !status.known)
        })
    }

    fn confirm_use(&self, serial: u64, auth_data: Vec<u8>) -> BoxFuture<'_, Result<(), CaError>> {
        Box::pin(async move {
            let r = self.request(pb::ConfirmCertificateUseRequest { auth_data });
            let resp = self
                .client
                .clone()
                .confirm_certificate_use(r)
                .await
                .map_err(|s| map_status(&s))?;
            if resp.into_inner().serial != serial {
                return Err(CaError::InvalidResponse);
            }
            Ok(())
        })
    }

    fn watch_notices(
        &self,
        from_seq: u64,
    ) -> BoxFuture<'_, Result<Box<dyn NoticeStream>, CaError>> {
        Box::pin(async move {
            let r = self.request(pb::WatchNoticesRequest { from_seq });
            let stream = self
                .client
                .clone()
                .watch_notices(r)
                .await
                .map_err(|s| map_status(&s))?
                .into_inner();
            Ok(Box::new(GrpcNotices(stream)) as Box<dyn NoticeStream>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_ca_errors() {
        assert_eq!(
            map_status(&Status::permission_denied("x")),
            CaError::Refused
        );
        assert_eq!(
            map_status(&Status::invalid_argument("x")),
            CaError::Malformed
        );
        assert_eq!(map_status(&Status::not_found("x")), CaError::NotFound);
        assert_eq!(map_status(&Status::unavailable("x")), CaError::Unavailable);
        assert_eq!(
            map_status(&Status::deadline_exceeded("x")),
            CaError::Unavailable
        );
    }

    #[test]
    fn notices_convert_by_kind() {
        let n = convert_notice(pb::Notice {
            seq: 4,
            kind: NoticeKind::Rekey as i32,
            group: "g".into(),
            epoch: 2,
            topic: "quva/k/g/sub".into(),
            payload: vec![1],
            ..Default::default()
        });
        assert_eq!(n.seq, 4);
        assert!(matches!(n.action, NoticeAction::Rekey { .. }));
        let n = convert_notice(pb::Notice {
            kind: 99,
            ..Default::default()
        });
        assert_eq!(n.action, NoticeAction::Unknown);
        // A revocation names a successor only when the certificate was superseded.
        let revoked = |superseded_by| {
            convert_notice(pb::Notice {
                kind: NoticeKind::Revoked as i32,
                serial: 3,
                device_id: "d".into(),
                superseded_by,
                ..Default::default()
            })
            .action
        };
        assert!(matches!(
            revoked(0),
            NoticeAction::Revoked { serial: 3, .. }
        ));
        assert!(matches!(
            revoked(4),
            NoticeAction::Superseded {
                serial: 3,
                successor: 4,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn unreachable_ca_is_unavailable() {
        let endpoint = Endpoint::from_static("http://127.0.0.1:1");
        let ca = GrpcCa::new(endpoint, Some("t"), Duration::from_millis(200)).unwrap();
        assert_eq!(ca.ca_public_key().await, Err(CaError::Unavailable));
    }
}
