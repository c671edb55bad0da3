//! Variable-time multi-scalar multiplication for signature verification. Never use with secrets.
//!
//! - [`mul_add_generator_vartime`] computes s·G + h·Q for a single verification: h is split with the
//!   secp256k1 endomorphism (GLV) into two 128-bit halves, s into its low and high 128 bits against
//!   static tables of G and 2¹²⁸·G, so all four share 128 doublings (libsecp256k1's approach).
//! - [`msm_vartime`] computes Σ kᵢ·Pᵢ by Straus' method with width-5 NAF, for batch verification.

use std::sync::LazyLock;

use k256::elliptic_curve::PrimeField;
use k256::elliptic_curve::scalar::IsHigh;
use k256::{AffinePoint, ProjectivePoint, Scalar};

/// Window of the NAF for variable points (tables of 8 odd multiples).
const W_VAR: u32 = 5;
/// Window of the NAF for the generator (static tables of 64 odd multiples).
const W_GEN: u32 = 8;
const GEN_TABLE_LEN: usize = 1 << (W_GEN - 2);
const VAR_TABLE_LEN: usize = 1 << (W_VAR - 2);

/// Odd multiples of G and of 2¹²⁸·G, affine for cheaper mixed additions.
static GEN_TABLES: LazyLock<[[AffinePoint; GEN_TABLE_LEN]; 2]> = LazyLock::new(|| {
    let g = ProjectivePoint::GENERATOR;
    let mut g128 = g;
    for _ in 0..128 {
        g128 = g128.double();
    }
    [
        odd_multiples::<GEN_TABLE_LEN>(&g).map(|p| p.to_affine()),
        odd_multiples::<GEN_TABLE_LEN>(&g128).map(|p| p.to_affine()),
    ]
});

/// s·G + h·Q in variable time.
pub(crate) fn mul_add_generator_vartime(
    s: &Scalar,
    h: &Scalar,
    q: &ProjectivePoint,
) -> ProjectivePoint {
    let (h1, h2) = decompose(h);
    let (h1, p1) = if bool::from(h1.is_high()) {
        (-h1, -*q)
    } else {
        (h1, *q)
    };
    let (h2, p2) = if bool::from(h2.is_high()) {
        (-h2, -q.endomorphism())
    } else {
        (h2, q.endomorphism())
    };
    let t1 = odd_multiples::<VAR_TABLE_LEN>(&p1);
    let t2 = odd_multiples::<VAR_TABLE_LEN>(&p2);
    let n1 = wnaf(&h1, W_VAR);
    let n2 = wnaf(&h2, W_VAR);
    let bytes = s.to_repr();
    let mut lo = [0u8; 32];
    let mut hi = [0u8; 32];
    lo[16..].copy_from_slice(&bytes[16..]);
    hi[16..].copy_from_slice(&bytes[..16]);
    let n3 = wnaf_bytes(&lo, W_GEN);
    let n4 = wnaf_bytes(&hi, W_GEN);
    let g_tables = &*GEN_TABLES;
    let mut acc = ProjectivePoint::IDENTITY;
    for i in (0..=129).rev() {
        acc = acc.double();
        add_digit(&mut acc, &t1, n1[i]);
        add_digit(&mut acc, &t2, n2[i]);
        add_digit_affine(&mut acc, &g_tables[0], n3[i]);
        add_digit_affine(&mut acc, &g_tables[1], n4[i]);
    }
    acc
}

/// Σ kᵢ·Pᵢ in variable time.
pub(crate) fn msm_vartime(terms: &[(ProjectivePoint, Scalar)]) -> ProjectivePoint {
    let nafs: Vec<[i8; 257]> = terms.iter().map(|(_, k)| wnaf(k, W_VAR)).collect();
    let tables: Vec<[ProjectivePoint; VAR_TABLE_LEN]> =
        terms.iter().map(|(p, _)| odd_multiples(p)).collect();
    let top = nafs
        .iter()
        .filter_map(|n| n.iter().rposition(|&d| d != 0))
        .max();
    let Some(top) = top else {
        return ProjectivePoint::IDENTITY;
    };
    let mut acc = ProjectivePoint::IDENTITY;
    for i in (0..=top).rev() {
        acc = acc.double();
        for (naf, table) in nafs.iter().zip(&tables) {
            add_digit(&mut acc, table, naf[i]);
        }
    }
    acc
}

fn add_digit(acc: &mut ProjectivePoint, table: &[ProjectivePoint], d: i8) {
    if d > 0 {
        *acc += table[(d as usize) / 2];
    } else if d < 0 {
        *acc -= table[(d.unsigned_abs() as usize) / 2];
    }
}

fn add_digit_affine(acc: &mut ProjectivePoint, table: &[AffinePoint], d: i8) {
    if d > 0 {
        *acc += &table[(d as usize) / 2];
    } else if d < 0 {
        *acc -= &table[(d.unsigned_abs() as usize) / 2];
    }
}

/// P, 3P, 5P, …, (2N − 1)P.
fn odd_multiples<const N: usize>(p: &ProjectivePoint) -> [ProjectivePoint; N] {
    let mut t = [*p; N];
    let twice = p.double();
    for i in 1..N {
        t[i] = t[i - 1] + twice;
    }
    t
}

/// The width-w NAF of k, least significant digit first: odd digits in (−2^(w−1), 2^(w−1)).
fn wnaf(k: &Scalar, w: u32) -> [i8; 257] {
    wnaf_bytes(&k.to_repr().into(), w)
}

fn wnaf_bytes(be: &[u8; 32], w: u32) -> [i8; 257] {
    let limbs = limbs(be);
    let bits = |pos: usize, count: usize| -> u64 {
        // Bits [pos, pos + count) of the 256-bit value, count ≤ 8.
        let (i, shift) = (pos / 64, pos % 64);
        let lo = limbs.get(i).copied().unwrap_or(0) >> shift;
        let hi = if shift + count > 64 {
            limbs.get(i + 1).copied().unwrap_or(0) << (64 - shift)
        } else {
            0
        };
        (lo | hi) & ((1u64 << count) - 1)
    };
    let w = w as usize;
    let mut out = [0i8; 257];
    let mut carry = 0u64;
    let mut bit = 0usize;
    while bit < 256 {
        if bits(bit, 1) == carry {
            bit += 1;
            continue;
        }
        let now = w.min(256 - bit);
        let mut word = (bits(bit, now) + carry) as i64;
        carry = ((word >> (w - 1)) & 1) as u64;
        word -= (carry as i64) << w;
        out[bit] = word as i8;
        bit += now;
    }
    out[256] = carry as i8;
    out
}

// GLV constants of secp256k1 (the same as libsecp256k1's and k256's): λ is a cube root of unity
// mod n with λ·(x, y) = (β·x, y); g1, g2 replace the divisions of the lattice reduction.
const MINUS_LAMBDA: [u8; 32] =
    hex32("ac9c52b33fa3cf1f5ad9e3fd77ed9ba4a880b9fc8ec739c2e0cfc810b51283cf");
const MINUS_B1: [u8; 32] =
    hex32("00000000000000000000000000000000e4437ed6010e88286f547fa90abfe4c3");
const MINUS_B2: [u8; 32] =
    hex32("fffffffffffffffffffffffffffffffe8a280ac50774346dd765cda83db1562c");
const G1: [u8; 32] = hex32("3086d221a7d46bcde86c90e49284eb153daa8a1471e8ca7fe893209a45dbb031");
const G2: [u8; 32] = hex32("e4437ed6010e88286f547fa90abfe4c4221208ac9df506c61571b4ae8ac47f71");

const fn hex32(s: &str) -> [u8; 32] {
    let b = s.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = (nibble(b[2 * i]) << 4) | nibble(b[2 * i + 1]);
        i += 1;
    }
    out
}

const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => 0,
    }
}

fn scalar(bytes: &[u8; 32]) -> Scalar {
    // INVARIANT: every constant above is below n.
    Option::from(Scalar::from_repr((*bytes).into())).unwrap_or(Scalar::ZERO)
}

/// Splits k into (k1, k2) with k1 + k2·λ ≡ k (mod n) and |k1|, |k2| < 2¹²⁹.
fn decompose(k: &Scalar) -> (Scalar, Scalar) {
    let kb: [u8; 32] = k.to_repr().into();
    let c1 = scalar(&mul_shift_384(&kb, &G1)) * scalar(&MINUS_B1);
    let c2 = scalar(&mul_shift_384(&kb, &G2)) * scalar(&MINUS_B2);
    let k2 = c1 + c2;
    let k1 = *k + k2 * scalar(&MINUS_LAMBDA);
    (k1, k2)
}

/// round(a·b / 2³⁸⁴) for 256-bit big-endian a and b (the result fits in 128 bits).
fn mul_shift_384(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let la = limbs(a);
    let lb = limbs(b);
    let mut prod = [0u64; 8];
    for i in 0..4 {
        let mut carry = 0u128;
        for j in 0..4 {
            let t = u128::from(la[i]) * u128::from(lb[j]) + u128::from(prod[i + j]) + carry;
            prod[i + j] = t as u64;
            carry = t >> 64;
        }
        prod[i + 4] = carry as u64;
    }
    // Bits 384..512 plus the rounding bit 383.
    let round = u128::from(prod[5] >> 63);
    let hi = (u128::from(prod[7]) << 64 | u128::from(prod[6])) + round;
    let mut out = [0u8; 32];
    out[16..].copy_from_slice(&hi.to_be_bytes());
    out
}

fn limbs(be: &[u8; 32]) -> [u64; 4] {
    let mut l = [0u64; 4];
    for (i, chunk) in be.rchunks(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        l[i] = u64::from_be_bytes(b);
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::elliptic_curve::Field;
    use k256::elliptic_curve::ops::MulByGenerator;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn edge_scalars() -> Vec<Scalar> {
        vec![
            Scalar::ZERO,
            Scalar::ONE,
            -Scalar::ONE,
            Scalar::from(u64::MAX) * Scalar::from(u64::MAX),
            scalar(&MINUS_LAMBDA),
            -scalar(&MINUS_LAMBDA),
        ]
    }

    #[test]
    fn msm_matches_naive_sum() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        for n in [0usize, 1, 2, 5, 17] {
            let terms: Vec<(ProjectivePoint, Scalar)> = (0..n)
                .map(|_| {
                    (
                        ProjectivePoint::GENERATOR * Scalar::random(&mut rng),
                        Scalar::random(&mut rng),
                    )
                })
                .collect();
            let naive: ProjectivePoint = terms.iter().map(|(p, k)| *p * k).sum();
            assert_eq!(msm_vartime(&terms), naive);
        }
        let g = ProjectivePoint::GENERATOR;
        for k in edge_scalars() {
            assert_eq!(msm_vartime(&[(g, k)]), g * k);
        }
    }

    #[test]
    fn glv_decomposition_is_correct_and_short() {
        let mut rng = ChaCha20Rng::seed_from_u64(10);
        let lambda = -scalar(&MINUS_LAMBDA);
        let mut ks = edge_scalars();
        ks.extend((0..200).map(|_| Scalar::random(&mut rng)));
        for k in ks {
            let (k1, k2) = decompose(&k);
            assert_eq!(k1 + k2 * lambda, k);
            for part in [k1, k2] {
                let abs = if bool::from(part.is_high()) {
                    -part
                } else {
                    part
                };
                let bytes = abs.to_repr();
                assert!(
                    bytes[..16].iter().all(|&b| b == 0),
                    "half longer than 128 bits"
                );
            }
        }
        let q = ProjectivePoint::GENERATOR * Scalar::from(12345u64);
        assert_eq!(q.endomorphism(), q * lambda);
    }

    #[test]
    fn single_combination_matches_constant_time_arithmetic() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let mut cases: Vec<(Scalar, Scalar)> = (0..100)
            .map(|_| (Scalar::random(&mut rng), Scalar::random(&mut rng)))
            .collect();
        for a in edge_scalars() {
            for b in edge_scalars() {
                cases.push((a, b));
            }
        }
        for (s, h) in cases {
            let q = ProjectivePoint::GENERATOR * Scalar::random(&mut rng);
            let expected = ProjectivePoint::mul_by_generator(&s) + q * h;
            assert_eq!(mul_add_generator_vartime(&s, &h, &q), expected);
        }
    }
}
