//! CONNECT proofs for reconnections: `quva-cert-v1` and `quva-group-v1` (PROTOCOL.md §3, §6).

use super::*;

/// `quva-cert-v1` CONNECT data: `cert || u64 T_ms || 16-byte nonce || str(client_id) || sig`,
/// sig = sign(d_i, "quva/v1/connect", all before it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertConnectProof {
    /// The device's certificate.
    pub cert: ImplicitCert,
    /// The device's clock, Unix ms.
    pub t_ms: u64,
    /// A fresh nonce for the bridge's replay cache.
    pub nonce: [u8; NONCE_LEN],
    /// The CONNECT packet's client identifier.
    pub client_id: String,
    /// The signature under d_i.
    pub signature: Signature,
}

fn cert_proof_body(
    cert: &ImplicitCert,
    t_ms: u64,
    nonce: &[u8; NONCE_LEN],
    client_id: &str,
) -> Vec<u8> {
    let mut out = Vec::new();
    cert.encode(&mut out);
    put_u64(&mut out, t_ms);
    out.extend_from_slice(nonce);
    put_str(&mut out, client_id);
    out
}

impl CertConnectProof {
    /// Proves `creds` for the connection `client_id` at `t_ms` with a fresh nonce.
    ///
    /// # Errors
    /// [`EnrollError::ClientIdTooLong`], or [`EnrollError::Curve`] with probability 2⁻²⁵⁶.
    pub fn new(
        creds: &Credentials,
        t_ms: u64,
        client_id: &str,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, EnrollError> {
        let nonce = random_nonce(rng);
        let mut entropy = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut entropy[..]);
        Self::new_with(creds, t_ms, nonce, client_id, &entropy)
    }

    /// [`CertConnectProof::new`] with the nonce and the signature's random bytes given.
    ///
    /// # Errors
    /// [`EnrollError::ClientIdTooLong`], or [`EnrollError::Curve`] with probability 2⁻²⁵⁶.
    pub fn new_with(
        creds: &Credentials,
        t_ms: u64,
        nonce: [u8; NONCE_LEN],
        client_id: &str,
        entropy: &[u8; 32],
    ) -> Result<Self, EnrollError> {
        check_client_id(client_id)?;
        let body = cert_proof_body(&creds.cert, t_ms, &nonce, client_id);
        let signature = creds.key.sign_with_entropy(CONNECT_TAG, &body, entropy)?;
        Ok(CertConnectProof {
            cert: creds.cert.clone(),
            t_ms,
            nonce,
            client_id: client_id.to_owned(),
            signature,
        })
    }

    /// Bridge: checks the proof for a CONNECT whose client identifier is `connect_client_id`:
    /// same client identifier, certificate from `ca_public` and valid now, |T − now| within the
    /// window, signature under the certificate's Q_i. Returns Q_i. Revocation of
    /// `cert.id()`/`cert.serial()` and the nonce cache are the caller's.
    ///
    /// # Errors
    /// [`EnrollError::ClientIdMismatch`], [`EnrollError::WrongCa`], [`EnrollError::Expired`],
    /// [`EnrollError::NotYetValid`], [`EnrollError::OutsideWindow`] or [`EnrollError::BadProof`].
    pub fn verify(
        &self,
        ca_public: &Point,
        connect_client_id: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<VerifyingKey, EnrollError> {
        if self.client_id != connect_client_id {
            return Err(EnrollError::ClientIdMismatch);
        }
        let q = self.cert.open(ca_public)?;
        self.cert.check_validity(now_ms)?;
        check_window(self.t_ms, now_ms, window_ms)?;
        let body = cert_proof_body(&self.cert, self.t_ms, &self.nonce, &self.client_id);
        q.verify(CONNECT_TAG, &body, &self.signature)
            .map_err(|_| EnrollError::BadProof)?;
        Ok(q)
    }
}

impl Encode for CertConnectProof {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&cert_proof_body(
            &self.cert,
            self.t_ms,
            &self.nonce,
            &self.client_id,
        ));
        self.signature.encode(out);
    }
}

impl Decode for CertConnectProof {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(CertConnectProof {
            cert: ImplicitCert::read(r)?,
            t_ms: r.u64("cert proof T")?,
            nonce: r.take_array("cert proof nonce")?,
            client_id: r.str("cert proof client_id")?.to_owned(),
            signature: Signature::read(r)?,
        })
    }
}

/// `quva-group-v1` CONNECT data (anonymous groups, §6):
/// `str(group) || u8 role || u64 T_ms || 16-byte nonce || str(client_id) || sig`,
/// sig = sign(d_grp, "quva/v1/group-connect", all before it), d_grp the role's held group key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupConnectProof {
    /// The group.
    pub group: GroupId,
    /// The role the connection acts as.
    pub role: Role,
    /// The device's clock, Unix ms.
    pub t_ms: u64,
    /// A fresh nonce for the bridge's replay cache.
    pub nonce: [u8; NONCE_LEN],
    /// The CONNECT packet's client identifier (fresh and random per connection).
    pub client_id: String,
    /// The signature under the held group key.
    pub signature: Signature,
}

fn group_proof_body(
    group: &GroupId,
    role: Role,
    t_ms: u64,
    nonce: &[u8; NONCE_LEN],
    client_id: &str,
) -> Vec<u8> {
    let mut out = Vec::new();
    group.encode(&mut out);
    put_u8(&mut out, role.to_u8());
    put_u64(&mut out, t_ms);
    out.extend_from_slice(nonce);
    put_str(&mut out, client_id);
    out
}

impl GroupConnectProof {
    /// Proves membership of `group` as `role` with the role's held group key (d_S for a
    /// publisher, d_P for a subscriber), with a fresh nonce.
    ///
    /// # Errors
    /// [`EnrollError::ClientIdTooLong`], or [`EnrollError::Curve`] with probability 2⁻²⁵⁶.
    pub fn new(
        held_key: &KeyPair,
        group: GroupId,
        role: Role,
        t_ms: u64,
        client_id: &str,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, EnrollError> {
        let nonce = random_nonce(rng);
        let mut entropy = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut entropy[..]);
        Self::new_with(held_key, group, role, t_ms, nonce, client_id, &entropy)
    }

    /// [`GroupConnectProof::new`] with the nonce and the signature's random bytes given.
    ///
    /// # Errors
    /// [`EnrollError::ClientIdTooLong`], or [`EnrollError::Curve`] with probability 2⁻²⁵⁶.
    pub fn new_with(
        held_key: &KeyPair,
        group: GroupId,
        role: Role,
        t_ms: u64,
        nonce: [u8; NONCE_LEN],
        client_id: &str,
        entropy: &[u8; 32],
    ) -> Result<Self, EnrollError> {
        check_client_id(client_id)?;
        let body = group_proof_body(&group, role, t_ms, &nonce, client_id);
        let signature = held_key.sign_with_entropy(GROUP_CONNECT_TAG, &body, entropy)?;
        Ok(GroupConnectProof {
            group,
            role,
            t_ms,
            nonce,
            client_id: client_id.to_owned(),
            signature,
        })
    }

    /// Bridge: checks the proof for a CONNECT whose client identifier is `connect_client_id`,
    /// given the group's current public keys Q_P and Q_S: the signature is verified under the key
    /// the claimed role holds (Q_S for a publisher, Q_P for a subscriber; [`Role::held_key`]).
    /// The caller looks the keys up by `group` (current or previous epoch within grace) and keeps
    /// the nonce cache.
    ///
    /// # Errors
    /// [`EnrollError::ClientIdMismatch`], [`EnrollError::OutsideWindow`] or
    /// [`EnrollError::BadProof`].
    pub fn verify(
        &self,
        q_p: &VerifyingKey,
        q_s: &VerifyingKey,
        connect_client_id: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<(), EnrollError> {
        if self.client_id != connect_client_id {
            return Err(EnrollError::ClientIdMismatch);
        }
        check_window(self.t_ms, now_ms, window_ms)?;
        let key = match self.role.held_key() {
            GroupKeyKind::P => q_p,
            GroupKeyKind::S => q_s,
        };
        let body = group_proof_body(
            &self.group,
            self.role,
            self.t_ms,
            &self.nonce,
            &self.client_id,
        );
        key.verify(GROUP_CONNECT_TAG, &body, &self.signature)
            .map_err(|_| EnrollError::BadProof)
    }
}

impl Encode for GroupConnectProof {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&group_proof_body(
            &self.group,
            self.role,
            self.t_ms,
            &self.nonce,
            &self.client_id,
        ));
        self.signature.encode(out);
    }
}

impl Decode for GroupConnectProof {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(GroupConnectProof {
            group: GroupId::read(r, "group proof group")?,
            role: Role::read(r, "group proof role")?,
            t_ms: r.u64("group proof T")?,
            nonce: r.take_array("group proof nonce")?,
            client_id: r.str("group proof client_id")?.to_owned(),
            signature: Signature::read(r)?,
        })
    }
}
