//! Quva devices driven over the minimal MQTT connection: a deployment of real `quva-ca`,
//! `quva-bridge` and Mosquitto processes (quva-tests' [`Cluster`]), enrollment and group joins
//! with quva-client's sans-IO [`Device`] core.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use quva_client::curve::Point;
use quva_client::device::{
    Device, DeviceConfig, Enrollment, Output, Purpose, Subscription, cert_connect_auth,
};
use quva_client::enrollment::{ENROLLMENT_SECRET_LEN, EnrollmentSecret};
use quva_client::group::GK_PROPERTY;
use quva_client::ids::{DeviceId, GroupId, Role};
use quva_node::now_ms;
use quva_tests::{Cluster, Options};
use rand_core::OsRng;
use rumqttc::v5::mqttbytes::v5::Packet;
use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

use crate::mqtt::{self, Reader, Writer};

/// The protected topic filter and the benchmark's group.
pub const PROTECTED: &str = "bench/#";
/// The group every device joins.
pub const GROUP: &str = "bench/fanout";

/// A running deployment with one group.
pub struct Deployment {
    /// The processes.
    pub cluster: Cluster,
    /// The group.
    pub group: GroupId,
    /// Q_CA.
    pub ca_public: Point,
}

impl Deployment {
    /// Starts Mosquitto, the CA and the bridge and creates the group.
    ///
    /// # Errors
    /// A CA key that does not parse.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&Options::default())
    }

    /// As [`Deployment::start`], with the CA and bridge settings of `options` (for example
    /// another broker instead of Mosquitto).
    ///
    /// # Errors
    /// A CA key that does not parse.
    pub fn start_with(options: &Options) -> anyhow::Result<Self> {
        let cluster = Cluster::start_with(&[PROTECTED], options);
        cluster.create_group(GROUP);
        let ca_public = hex::decode(&cluster.ca_public)
            .ok()
            .and_then(|b| Point::from_bytes(&b))
            .context("the CA's public key")?;
        Ok(Deployment {
            cluster,
            group: group()?,
            ca_public,
        })
    }

    /// The bridge's address.
    pub fn bridge(&self) -> SocketAddr {
        self.cluster.bridge
    }

    /// Registers `id` with the CA and allows it `role` in the group; returns its enrollment
    /// secret.
    ///
    /// # Errors
    /// A secret that does not decode.
    pub fn register(&self, id: &str, role: Role) -> anyhow::Result<EnrollmentSecret> {
        let hexed = Zeroizing::new(self.cluster.register(id));
        let mut bytes = Zeroizing::new([0u8; ENROLLMENT_SECRET_LEN]);
        hex::decode_to_slice(hexed.trim(), &mut bytes[..]).context("enrollment secret")?;
        let role = match role {
            Role::Publisher => "pub",
            Role::Subscriber => "sub",
        };
        self.cluster.allow(GROUP, id, role);
        Ok(EnrollmentSecret::from_bytes(&bytes))
    }
}

/// A device's connection: the device core and the two halves of the MQTT stream.
pub struct Session<R, W> {
    /// The device core.
    pub device: Device,
    /// Incoming packets.
    pub reader: Reader<R>,
    /// Outgoing packets.
    pub writer: Writer<W>,
    next_pkid: u16,
    pending: Vec<(u16, Subscription)>,
    rng: OsRng,
}

/// How a session authenticates its CONNECT.
pub enum Credential<'a> {
    /// A first enrollment with the owner's secret (`quva-enroll-v1`).
    Enroll(&'a EnrollmentSecret),
    /// An enrolled device's certificate proof (`quva-cert-v1`).
    Cert(Box<Device>),
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Session<R, W> {
    /// CONNECT and CONNACK: enrolls `id` or proves its certificate.
    ///
    /// # Errors
    /// Refusals, bad answers and socket errors.
    pub async fn connect(
        reader: R,
        writer: W,
        id: &str,
        ca_public: Point,
        credential: Credential<'_>,
    ) -> anyhow::Result<Self> {
        let mut rng = OsRng;
        let mut reader = Reader::new(reader);
        let mut writer = Writer::new(writer);
        let client_id = format!("{id}-bench");
        let device = match credential {
            Credential::Enroll(secret) => {
                let dev_id = DeviceId::new(id).context("device id")?;
                let (enrollment, auth) =
                    Enrollment::start(dev_id, secret, ca_public, now_ms(), &mut rng);
                writer
                    .send(&mqtt::connect(&client_id, Some((auth.method, auth.data))))
                    .await?;
                let ack = mqtt::connack_ok(reader.expect("CONNACK").await?)?;
                let data = ack.properties.and_then(|p| p.authentication_data);
                let creds = enrollment
                    .finish(data.as_deref())
                    .map_err(|e| anyhow::anyhow!("enrollment of {id}: {e}"))?;
                Device::new(creds, ca_public, DeviceConfig::default())
            }
            Credential::Cert(device) => {
                let auth = cert_connect_auth(device.credentials(), &client_id, now_ms(), &mut rng)
                    .map_err(|e| anyhow::anyhow!("certificate proof: {e}"))?;
                writer
                    .send(&mqtt::connect(&client_id, Some((auth.method, auth.data))))
                    .await?;
                mqtt::connack_ok(reader.expect("CONNACK").await?)?;
                *device
            }
        };
        Ok(Session {
            device,
            reader,
            writer,
            next_pkid: 1,
            pending: Vec::new(),
            rng,
        })
    }

    /// Sends the SUBSCRIBE of a subscription (with its `quva-gk` request, if any).
    ///
    /// # Errors
    /// Socket errors.
    pub async fn subscribe(&mut self, sub: Subscription) -> anyhow::Result<()> {
        let pkid = self.next_pkid;
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        let props = sub
            .group_key_request
            .iter()
            .map(|v| (GK_PROPERTY.to_owned(), v.clone()))
            .collect();
        self.writer
            .send(&mqtt::subscribe(pkid, &sub.filters, props))
            .await?;
        self.pending.push((pkid, sub));
        Ok(())
    }

    /// Sends the group-key request (SUBSCRIBE with `quva-gk`) for `role`, and with `receive` the
    /// data subscription once the key is held.
    ///
    /// # Errors
    /// Socket errors.
    pub async fn join(&mut self, group: &GroupId, role: Role, receive: bool) -> anyhow::Result<()> {
        let sub = self
            .device
            .join(group, role, receive, now_ms(), &mut self.rng)
            .map_err(|e| anyhow::anyhow!("group-key request: {e}"))?;
        self.subscribe(sub).await
    }

    /// Sends the resumed subscriptions of every group key the device holds (PROTOCOL.md §4 v1.1:
    /// no `quva-gk` request, no public-key work at the bridge).
    ///
    /// # Errors
    /// A device that holds nothing to resume, socket errors.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let subs = self
            .device
            .resume_all(now_ms(), &mut self.rng)
            .map_err(|e| anyhow::anyhow!("resumption: {e}"))?;
        anyhow::ensure!(!subs.is_empty(), "nothing to resume");
        for sub in subs {
            self.subscribe(sub).await?;
        }
        Ok(())
    }

    /// Handles one incoming packet: SUBACKs and PUBLISHes go to the device core (which may ask
    /// for more subscriptions); QoS 1 PUBLISHes are acknowledged. Returns whether a SUBACK of a
    /// join arrived.
    ///
    /// # Errors
    /// A refused join, socket errors.
    pub async fn handle(&mut self, p: Packet) -> anyhow::Result<bool> {
        let mut outs = Vec::new();
        let mut joined = false;
        match p {
            Packet::SubAck(ack) => {
                let Some(i) = self.pending.iter().position(|(id, _)| *id == ack.pkid) else {
                    return Ok(false);
                };
                let (_, sub) = self.pending.swap_remove(i);
                let codes = mqtt::suback_codes(&ack);
                let gk = ack.properties.as_ref().and_then(|p| {
                    p.user_properties
                        .iter()
                        .find(|(k, _)| k == GK_PROPERTY)
                        .map(|(_, v)| v.clone())
                });
                joined = matches!(sub.purpose, Purpose::Join { .. });
                outs = self
                    .device
                    .on_suback(&sub.purpose, &codes, gk.as_deref(), now_ms(), &mut self.rng)
                    .map_err(|e| anyhow::anyhow!("join refused: {e}"))?;
            }
            Packet::Publish(p) => {
                if p.pkid != 0 {
                    self.writer.send(&mqtt::puback(p.pkid)).await?;
                }
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                outs = self
                    .device
                    .on_publish(&topic, &p.payload, now_ms(), &mut self.rng);
            }
            _ => {}
        }
        for o in outs {
            if let Output::Subscribe(s) = o {
                self.subscribe(s).await?;
            }
        }
        Ok(joined)
    }

    /// Handles packets until the group key of `role` is held and no subscription is pending.
    ///
    /// # Errors
    /// A refused join, timeouts, socket errors.
    pub async fn settle(&mut self, group: &GroupId, role: Role) -> anyhow::Result<()> {
        while !self.pending.is_empty() || self.device.keyring(group, role).is_none() {
            let p = self.reader.expect("SUBACK").await?;
            self.handle(p).await?;
        }
        Ok(())
    }

    /// Splits off the device (ending the session).
    pub fn into_device(self) -> Device {
        self.device
    }
}

/// Checks a join's outcome.
///
/// # Errors
/// When the device holds no key of `role`.
pub fn ensure_key(device: &Device, group: &GroupId, role: Role) -> anyhow::Result<()> {
    if device.keyring(group, role).is_none() {
        bail!("{} holds no {role:?} key of {group}", device.id());
    }
    Ok(())
}

/// The benchmark's group.
///
/// # Errors
/// Never in practice (the name is valid).
pub fn group() -> anyhow::Result<GroupId> {
    GroupId::new(GROUP).map_err(|e| anyhow::anyhow!("group name: {e:?}"))
}
