//! The two message-layer flaws of the paper that PROTOCOL.md §9.1 and §9.2 fix, each shown
//! exploitable against a test-only model of the paper's construction and harmless against ours.

use k256::elliptic_curve::Field;
use k256::elliptic_curve::ops::{MulByGenerator, Reduce};
use k256::{ProjectivePoint, Scalar, U256};
use zeroize::Zeroizing;

use super::testkit::World;
use super::{
    AnonymousInner, Content, Direction, Protection, Rejection, TAG_MSG3, TAG_MSG3_INNER,
    TAG_MSG3_OUTER, UnverifiedMessage,
};
use crate::codec::{Decode, Encode, Reader, put_blob, put_point, put_scalar, put_str};
use crate::curve::{KeyPair, Point, SecretScalar, hash_to_scalar, sha256, xdh};
use crate::replay::ReplayCache;
use crate::schnorr::Signature;
use crate::symmetric::{aead_open, aead_seal, kdf};

/// The paper's challenge: H(M || T || ID_G), reduced mod n. It does not bind V or the key.
fn paper_challenge(m: &[u8], t_ms: u64, group: &str) -> Scalar {
    let digest = sha256(&[m, &t_ms.to_be_bytes(), group.as_bytes()]);
    <Scalar as Reduce<U256>>::reduce_bytes(&digest.into())
}

/// The paper's option-1 verifier: V == s·G + h·Q with h = H(M || T || ID_G).
fn paper_verify_option1(q: &Point, m: &[u8], t_ms: u64, group: &str, sig: &Signature) -> bool {
    let h = paper_challenge(m, t_ms, group);
    let rhs = ProjectivePoint::mul_by_generator(&sig.response) + q.to_projective() * h;
    rhs == sig.commitment.to_projective()
}

/// Forgery without the key: pick s, set V = s·G + h·Q.
fn forge_paper_option1(q: &Point, m: &[u8], t_ms: u64, group: &str, s: Scalar) -> Signature {
    let h = paper_challenge(m, t_ms, group);
    let v = ProjectivePoint::mul_by_generator(&s) + q.to_projective() * h;
    Signature {
        commitment: Point::from_projective(&v).unwrap(),
        response: s,
    }
}

#[test]
fn paper_option1_challenge_is_forgeable_and_ours_is_not() {
    let w = World::new(40);
    let d = Direction::Forward;
    let q_i = *w.pub_key.public();
    let m = b"open the valve";
    let t = w.now;
    let s = Scalar::random(&mut *w.rng.borrow_mut());
    let forged = forge_paper_option1(&q_i, m, t, w.group.as_str(), s);

    // The paper's verifier accepts a signature nobody with d_i made.
    assert!(paper_verify_option1(&q_i, m, t, w.group.as_str(), &forged));

    // The same (V, s) on our option-1 wire message is refused, by the bridge and the receiver.
    let genuine = w.seal(Protection::Authenticated, d, m, t);
    let body_len = genuine.len() - 65;
    let mut wire = genuine[..body_len].to_vec();
    forged.encode(&mut wire);
    let msg = UnverifiedMessage::decode(&wire).unwrap();
    let mut replay = ReplayCache::default();
    let conn = super::ConnectionIdentity::Device(w.publisher.clone());
    let policy = super::Policy::default();
    assert_eq!(
        msg.verify_at_bridge(&w, &conn, &policy, &mut Default::default(), t),
        Err(Rejection::BadSignature)
    );
    assert_eq!(
        msg.verify(&w, &w.receiver(d), &policy, &mut replay, t)
            .err(),
        Some(Rejection::BadSignature)
    );

    // Nor can the trick be adapted to our challenge: h depends on V, so fixing h first and then
    // solving for V gives a V that no longer matches h.
    let v0 = forged.commitment;
    let h_ours = hash_to_scalar(
        "quva/v1/msg1",
        &[&v0.to_bytes(), &q_i.to_bytes(), &wire[..body_len]],
    )
    .unwrap();
    let v1 = ProjectivePoint::mul_by_generator(&s) + q_i.to_projective() * h_ours;
    let attempt = Signature {
        commitment: Point::from_projective(&v1).unwrap(),
        response: s,
    };
    assert_ne!(attempt.commitment, v0);
    let mut wire2 = genuine[..body_len].to_vec();
    attempt.encode(&mut wire2);
    let msg2 = UnverifiedMessage::decode(&wire2).unwrap();
    assert_eq!(
        msg2.verify_at_bridge(
            &w,
            &conn,
            &policy,
            &mut crate::message::BridgeReplay::default(),
            t
        ),
        Err(Rejection::BadSignature)
    );
}

/// The paper's option 3 (forward), one z for everything: Z = z·G encrypts (ECIES to Q_P), the
/// inner signature is s1 = z − h1·d_i and the outer one s2 = z − h2·d_S.
struct PaperOption3 {
    z_point: Point,
    ct: Vec<u8>,
    s2: Scalar,
}

const PAPER_CTX: &[u8] = b"paper/option3";

#[allow(clippy::too_many_arguments)]
fn paper_seal_option3(
    d_i: &KeyPair,
    id: &str,
    d_s: &KeyPair,
    q_p: &Point,
    z: &SecretScalar,
    m: &[u8],
    t_ms: u64,
    group: &str,
) -> PaperOption3 {
    let z_point = Point::mul_base(z);
    let key = kdf(&z_point.to_bytes(), &xdh(z, q_p).unwrap()[..], &[PAPER_CTX]);
    let h1 = paper_challenge(m, t_ms, group);
    let s1 = *z.as_scalar() - h1 * d_i.secret().as_scalar();
    let mut inner = Vec::new();
    put_str(&mut inner, id);
    put_scalar(&mut inner, &s1);
    put_blob(&mut inner, m);
    let ct = aead_seal(&key, PAPER_CTX, &inner);
    let h2 = paper_challenge(&ct, t_ms, group);
    let s2 = *z.as_scalar() - h2 * d_s.secret().as_scalar();
    PaperOption3 { z_point, ct, s2 }
}

/// What any holder of d_S (every other publisher) computes from one paper option-3 message:
/// z = s2 + h2·d_S, then the plaintext, then d_i = (z − s1) / h1.
fn paper_attack(
    msg: &PaperOption3,
    d_s: &KeyPair,
    q_p: &Point,
    t_ms: u64,
    group: &str,
) -> Option<(Scalar, Scalar, Vec<u8>)> {
    let h2 = paper_challenge(&msg.ct, t_ms, group);
    let z = msg.s2 + h2 * d_s.secret().as_scalar();
    let z_secret = SecretScalar::new(z).ok()?;
    if Point::mul_base(&z_secret) != msg.z_point {
        return None;
    }
    let key = kdf(
        &msg.z_point.to_bytes(),
        &xdh(&z_secret, q_p).ok()?[..],
        &[PAPER_CTX],
    );
    let inner = aead_open(&key, PAPER_CTX, &msg.ct).ok()?;
    let mut r = Reader::new(&inner);
    let _id = r.str("id").ok()?;
    let s1 = r.scalar("s1").ok()?;
    let m = r.blob("m").ok()?.to_vec();
    let h1 = paper_challenge(&m, t_ms, group);
    let d_i = (z - s1) * Option::<Scalar>::from(h1.invert())?;
    Some((z, d_i, m))
}

#[test]
fn paper_option3_leaks_the_senders_key_and_ours_does_not() {
    let w = World::new(41);
    let t = w.now;
    let g = w.group.as_str();
    let m = b"anonymous reading";

    // The paper: another publisher (holding d_S) recovers z, the plaintext meant for the
    // subscribers, and the sender's long-term key d_i.
    let z = SecretScalar::random(&mut *w.rng.borrow_mut());
    let paper = paper_seal_option3(&w.pub_key, "pub-1", &w.d_s, w.d_p.public(), &z, m, t, g);
    let (z_rec, d_rec, m_rec) =
        paper_attack(&paper, &w.d_s, w.d_p.public(), t, g).expect("the paper's attack works");
    assert_eq!(z_rec, *z.as_scalar());
    assert_eq!(d_rec, *w.pub_key.secret().as_scalar());
    assert_eq!(m_rec, m);

    // Ours: the same computation on a v1 option-3 message.
    let wire = w.seal(Protection::Anonymous, Direction::Forward, m, t);
    let msg = UnverifiedMessage::decode(&wire).unwrap();
    let Content::Anonymous {
        z: z_point,
        ciphertext,
    } = &msg.content
    else {
        panic!("option 3 expected");
    };
    let outer = msg.signature;
    let h2 = hash_to_scalar(
        TAG_MSG3_OUTER,
        &[
            &outer.commitment.to_bytes(),
            &w.d_s.public().to_bytes(),
            msg.body(),
        ],
    )
    .unwrap();
    let z_guess = outer.response + h2 * w.d_s.secret().as_scalar();
    // It yields only the outer signature's own nonce (z_guess·G = V2), not z.
    let z_guess = SecretScalar::new(z_guess).unwrap();
    assert_eq!(Point::mul_base(&z_guess), outer.commitment);
    assert_ne!(Point::mul_base(&z_guess), *z_point);
    // So it cannot decrypt ...
    let hdr = msg.hdr();
    let key = kdf(
        &z_point.to_bytes(),
        &xdh(&z_guess, w.d_p.public()).unwrap()[..],
        &[TAG_MSG3.as_bytes(), hdr],
    );
    let mut aad = hdr.to_vec();
    put_point(&mut aad, z_point);
    assert!(aead_open(&key, &aad, msg.slice(ciphertext.clone())).is_err());
    // ... and even given the inner signature (say by a colluding subscriber), it does not
    // yield d_i.
    let real_key = kdf(
        &z_point.to_bytes(),
        &xdh(w.d_p.secret(), z_point).unwrap()[..],
        &[TAG_MSG3.as_bytes(), hdr],
    );
    let inner = aead_open(&real_key, &aad, msg.slice(ciphertext.clone())).unwrap();
    let inner = AnonymousInner::from_bytes(&inner).unwrap();
    let mut signed = Zeroizing::new(aad.clone());
    inner.sender.encode(&mut signed);
    put_blob(&mut signed, &inner.payload);
    let h1 = hash_to_scalar(
        TAG_MSG3_INNER,
        &[
            &inner.signature.commitment.to_bytes(),
            &w.pub_key.public().to_bytes(),
            &signed,
        ],
    )
    .unwrap();
    let d_guess = (*z_guess.as_scalar() - inner.signature.response)
        * Option::<Scalar>::from(h1.invert()).unwrap();
    assert_ne!(d_guess, *w.pub_key.secret().as_scalar());
    assert_ne!(
        Point::from_projective(&ProjectivePoint::mul_by_generator(&d_guess)).ok(),
        Some(*w.pub_key.public())
    );
}
