//! The generic ECQV algebra of `quva_client::ecqv` on NIST P-256, checked against published SEC 4
//! vectors: CAMP/SCMS (e = SHA-256(CertU) >> 1) and KISA V2X v1.1 (e = SHA-256(CertU) mod n).
//!
//! CertU = tbsCert || PU (33-byte compressed). Device: dU = e·kU + r; anyone: QU = e·PU + QCA;
//! CA: r = e·k + dCA with PU = RU + k·G. (SEC 4's r is Quva's a; SEC 4's kU is Quva's r_i.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use p256::elliptic_curve::PrimeField;
use p256::elliptic_curve::ops::Reduce;
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use p256::{AffinePoint, EncodedPoint, FieldBytes, NistP256, ProjectivePoint, Scalar, U256};
use quva_client::ecqv::{self, EcqvError};
use sha2::{Digest, Sha256};

/// The vectors, verbatim.
const VECTORS: &str = r#"# Published ECQV (SEC 4) vectors on NIST P-256, for checking the generic ECQV algebra.
# Both sets share the inputs below; they differ only in how the certificate hash becomes e.
# CertU = tbsCert || PU (33-byte compressed). Device: dU = e*kU + r mod n. Anyone: QU = e*PU + QCA.
# CA: r = e*k + dCA mod n, where PU = RU + k*G and RU = kU*G.

tbsCert = 54686973206973206120746573742100
kU  = 1384C31D6982D52BCA3BED8A7E60F52FECDAB44E5C0EA166815A8159E09FFB42
RU  = 04F45A99137B1BB2C150D6D8CF7292CA07DA68C003DAA766A9AF7F67F5EE916828F6A25216F44CB64A96C229AE00B479857B3B81C1319FB2ADF0E8DB2681769729
dCA = 97D1368E8C07A54F66C9DCE284BA76CAF4178206614F809A4EB43CB3106AA60E
QCA = 043BB8FFD19B25EE1BB939CD4935FBFA8FBAADBA64843338A95595A70ED7479B70EB60DDC790E3CB05E85225F636D8A7C20DF3A8135C4B2AE5396367B4E86077F8

## CAMP/SCMS (conz27/crypto-test-vectors, implicit.txt): e = SHA-256(CertU) >> 1
camp1.k    = E2F9CBCEC3F28F7DFBEF044732C41119816C62909FB720B091FB8F380F1B70DC
camp1.PU   = 024A1890E30A584208DAD3838D0C5CECB1ED6B01D48893C684C59908F5B38E3D82
camp1.e    = 4B3766671CF02DAA0DF2B882AEE31FBEF9BBF3CC238B3F15C7497C193FD61C26
camp1.r    = 1FA86893A1AABE8A79F63360F4B6D5617380B4D84B8C260DD8D3D64163C874FD
camp1.dU   = C8599ECA52B58D691B2BB609CDB53DDD9F49C0D635AB652EC79C546914590274
camp1.QU.x = 6E89D7C0F910AAA4AD3137EBE01EF781C0BAB6748318D66FE714471F7F860EB2
camp2.k    = 3396DA2ECBFC6E5F231E2C80EB27AB84F09DD5E724F8652ADE86E60BC800EAD7
camp2.PU   = 036694D1F99A18CBE8035E053B2E56C12EECB94E9D5DBA88E07E5B50CBE309103E
camp2.e    = 27FE62399BE5978ACDAECD70293B6B4C7480103864AAD3F020B4A4E6438600AC
camp2.r    = 001CF7456A157A90FCEA0634699E7A3644FEBFB86C119E6A9686928B8E3F7EF0
camp2.dU   = C9CCC8E83AB985C436A8BC09C0CAA8A5AC627DD7BC9336A5E8AB81B77D3A031D
camp2.QU.x = 8ED40E9601BEEB146A4A0AB96D20EE0FE4CA1E389397F2B1CC67AD9F5B0F579E

## KISA V2X v1.1 (01-07.KCAC.V2X.IMPCERTSCH): e = SHA-256(CertU) mod n; k not published
kisa1.PU   = 024A1890E30A584208DAD3838D0C5CECB1ED6B01D48893C684C59908F5B38E3D82
kisa1.r    = 8A7966677B40674389118E269777451174564A3AD57FEC31F4EEFF07C641B4C8
kisa1.dU   = EF6095F346D8DA2B95B88102C7D50B39FBDC1BD75EB56D556020B1EE0B9FA5A7
kisa1.QU   = 04E76F7751EEC099CCCF074927FB0C0E4BC9EF7434B70119B39A91D150A2CA69A9174C7CCA46F5D73439F79987CB613B229ABE3F1F8D163E3D677211A690A8EC31
kisa2.PU   = 02237B2D6610DA5B67E18AAEC0F09C99EE08D4F00852C7ED27C12963120F76A147
kisa2.r    = 06A8D6FCDC18AC05F6D9D88AB2C31B462E72C58C60555A3D9DF83DB6F2E3142B
kisa2.dU   = 49FC4F116692225FEB26CC6366BB6D60CA6D6082DDFA980BD12FF7415AFD8439
kisa2.QU   = 046442A1639E68ACF735E3F30BDC02AC4A6AB4F8D7B497D03BE1B95F0F563424A0C5871A8F84A728DCD52835635CD53F47017B7FC6BE3CAF4052AE6D11D7F3D37C
"#;

fn vectors() -> BTreeMap<String, Vec<u8>> {
    VECTORS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("name = hex");
            (
                k.trim().to_owned(),
                hex::decode(v.trim()).expect("hex value"),
            )
        })
        .collect()
}

struct Vectors(BTreeMap<String, Vec<u8>>);

impl Vectors {
    fn bytes(&self, name: &str) -> &[u8] {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("vector {name} missing"))
    }
    fn scalar(&self, name: &str) -> Scalar {
        let bytes: [u8; 32] = self.bytes(name).try_into().expect("32-byte scalar");
        let repr = FieldBytes::from(bytes);
        Option::from(Scalar::from_repr(repr)).unwrap_or_else(|| panic!("{name} is not below n"))
    }
    fn point(&self, name: &str) -> AffinePoint {
        let ep = EncodedPoint::from_bytes(self.bytes(name)).unwrap();
        Option::from(AffinePoint::from_encoded_point(&ep))
            .unwrap_or_else(|| panic!("{name} is not on P-256"))
    }
}

fn compressed(p: &AffinePoint) -> Vec<u8> {
    p.to_encoded_point(true).as_bytes().to_vec()
}

fn cert_u(tbs: &[u8], pu: &AffinePoint) -> Vec<u8> {
    [tbs, &compressed(pu)].concat()
}

/// CAMP/SCMS: e = SHA-256(CertU) >> 1 (a 255-bit integer, below n).
fn camp_hash(cert: &[u8]) -> Scalar {
    let mut digest: [u8; 32] = Sha256::digest(cert).into();
    let mut carry = 0u8;
    for b in &mut digest {
        let next = *b & 1;
        *b = (*b >> 1) | (carry << 7);
        carry = next;
    }
    Option::from(Scalar::from_repr(FieldBytes::from(digest))).expect("255-bit value below n")
}

/// KISA V2X: e = SHA-256(CertU) mod n.
fn kisa_hash(cert: &[u8]) -> Scalar {
    <Scalar as Reduce<U256>>::reduce_bytes(&Sha256::digest(cert))
}

fn x_of(p: &AffinePoint) -> Vec<u8> {
    p.to_encoded_point(false).as_bytes()[1..33].to_vec()
}

/// Runs one case through issue, accept and open; `k` is the CA's nonce.
fn check_case(v: &Vectors, case: &str, k: &Scalar, hash: fn(&[u8]) -> Scalar) -> AffinePoint {
    let tbs = v.bytes("tbsCert");
    let ku = v.scalar("kU");
    let ru = v.point("RU");
    let d_ca = v.scalar("dCA");
    let q_ca = v.point("QCA");
    assert_eq!(
        ProjectivePoint::from(ru),
        ProjectivePoint::GENERATOR * ku,
        "RU = kU·G"
    );
    assert_eq!(
        ProjectivePoint::from(q_ca),
        ProjectivePoint::GENERATOR * d_ca,
        "QCA = dCA·G"
    );

    let issued = ecqv::issue::<NistP256>(&ru, &d_ca, k, |pu| Some(hash(&cert_u(tbs, pu)))).unwrap();
    assert_eq!(
        compressed(&issued.public_data),
        v.bytes(&format!("{case}.PU")),
        "{case}.PU"
    );
    if let Some(e) = v.0.get(&format!("{case}.e")) {
        assert_eq!(&issued.hash.to_repr()[..], &e[..], "{case}.e");
    }
    assert_eq!(
        issued.reconstruction,
        v.scalar(&format!("{case}.r")),
        "{case}.r"
    );

    let pu = v.point(&format!("{case}.PU"));
    let e = hash(&cert_u(tbs, &pu));
    let d_u =
        ecqv::accept::<NistP256>(&ku, &pu, &e, &v.scalar(&format!("{case}.r")), &q_ca).unwrap();
    assert_eq!(*d_u, v.scalar(&format!("{case}.dU")), "{case}.dU");
    let q_u = ecqv::open::<NistP256>(&pu, &e, &q_ca).unwrap();
    assert_eq!(
        ProjectivePoint::from(q_u),
        ProjectivePoint::GENERATOR * *d_u,
        "{case}: accept's key equals open's"
    );

    // A flipped reconstruction value, or the other convention's hash, is refused.
    let bad = v.scalar(&format!("{case}.r")) + Scalar::ONE;
    assert_eq!(
        ecqv::accept::<NistP256>(&ku, &pu, &e, &bad, &q_ca).err(),
        Some(EcqvError::KeyMismatch),
        "{case}: altered r"
    );
    q_u
}

#[test]
fn camp_scms_vectors() {
    let v = Vectors(vectors());
    for case in ["camp1", "camp2"] {
        let q_u = check_case(&v, case, &v.scalar(&format!("{case}.k")), camp_hash);
        assert_eq!(x_of(&q_u), v.bytes(&format!("{case}.QU.x")), "{case}.QU.x");
    }
}

#[test]
fn kisa_v2x_vectors() {
    let v = Vectors(vectors());
    for case in ["kisa1", "kisa2"] {
        // k is not published: recover it from r = e·k + dCA, then re-issue and compare PU and r.
        let pu = v.point(&format!("{case}.PU"));
        let e = kisa_hash(&cert_u(v.bytes("tbsCert"), &pu));
        let e_inv: Scalar = Option::from(e.invert()).unwrap();
        let k = (v.scalar(&format!("{case}.r")) - v.scalar("dCA")) * e_inv;
        let q_u = check_case(&v, case, &k, kisa_hash);
        assert_eq!(
            q_u.to_encoded_point(false).as_bytes(),
            v.bytes(&format!("{case}.QU")),
            "{case}.QU"
        );
    }
    // kisa1 shares PU with camp1, so the recovered k must be camp1's.
    let pu = v.point("kisa1.PU");
    let e = kisa_hash(&cert_u(v.bytes("tbsCert"), &pu));
    let k = (v.scalar("kisa1.r") - v.scalar("dCA")) * Option::<Scalar>::from(e.invert()).unwrap();
    assert_eq!(k, v.scalar("camp1.k"), "kisa1 k = camp1.k");
}

#[test]
fn the_two_conventions_give_different_keys() {
    let v = Vectors(vectors());
    let tbs = v.bytes("tbsCert");
    let pu = v.point("camp1.PU");
    assert_ne!(camp_hash(&cert_u(tbs, &pu)), kisa_hash(&cert_u(tbs, &pu)));
    assert_ne!(v.scalar("camp1.dU"), v.scalar("kisa1.dU"));
}
