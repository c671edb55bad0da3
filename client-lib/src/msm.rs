//! Variable-time multi-scalar multiplication (Straus' method with width-5 NAF), for batch
//! verification of public signatures. Never use it with secret scalars.

use k256::elliptic_curve::PrimeField;
use k256::{ProjectivePoint, Scalar};

const WINDOW: u32 = 5;
const TABLE_LEN: usize = 1 << (WINDOW - 2);

/// Σ kᵢ·Pᵢ in variable time.
pub(crate) fn msm_vartime(terms: &[(ProjectivePoint, Scalar)]) -> ProjectivePoint {
    let nafs: Vec<[i8; 257]> = terms.iter().map(|(_, k)| wnaf(k)).collect();
    let tables: Vec<[ProjectivePoint; TABLE_LEN]> =
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
            let d = naf.get(i).copied().unwrap_or(0);
            if d > 0 {
                acc += table.get((d as usize) / 2).copied().unwrap_or_default();
            } else if d < 0 {
                acc -= table
                    .get((d.unsigned_abs() as usize) / 2)
                    .copied()
                    .unwrap_or_default();
            }
        }
    }
    acc
}

/// P, 3P, 5P, …, (2^(w−1) − 1)P.
fn odd_multiples(p: &ProjectivePoint) -> [ProjectivePoint; TABLE_LEN] {
    let mut t = [*p; TABLE_LEN];
    let twice = p.double();
    for i in 1..TABLE_LEN {
        t[i] = t[i - 1] + twice;
    }
    t
}

/// The width-w NAF of k, least significant digit first: odd digits in (−2^(w−1), 2^(w−1)).
fn wnaf(k: &Scalar) -> [i8; 257] {
    let be = k.to_repr();
    // Little-endian 64-bit limbs with one spare limb for the carry of negative digits.
    let mut limbs = [0u64; 5];
    for (i, chunk) in be.rchunks(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        if let Some(l) = limbs.get_mut(i) {
            *l = u64::from_be_bytes(b);
        }
    }
    let mut out = [0i8; 257];
    let modulus = 1i64 << WINDOW;
    let mut i = 0;
    while limbs.iter().any(|&l| l != 0) && i < out.len() {
        if limbs[0] & 1 == 1 {
            let mut d = (limbs[0] & (modulus as u64 - 1)) as i64;
            if d >= modulus / 2 {
                d -= modulus;
            }
            out[i] = d as i8;
            if d > 0 {
                sub_small(&mut limbs, d as u64);
            } else {
                add_small(&mut limbs, (-d) as u64);
            }
        }
        shr1(&mut limbs);
        i += 1;
    }
    out
}

fn sub_small(limbs: &mut [u64; 5], v: u64) {
    let mut borrow = v;
    for l in limbs.iter_mut() {
        let (r, b) = l.overflowing_sub(borrow);
        *l = r;
        borrow = u64::from(b);
        if borrow == 0 {
            break;
        }
    }
}

fn add_small(limbs: &mut [u64; 5], v: u64) {
    let mut carry = v;
    for l in limbs.iter_mut() {
        let (r, c) = l.overflowing_add(carry);
        *l = r;
        carry = u64::from(c);
        if carry == 0 {
            break;
        }
    }
}

fn shr1(limbs: &mut [u64; 5]) {
    for i in 0..5 {
        let hi = if i + 1 < 5 { limbs[i + 1] << 63 } else { 0 };
        limbs[i] = (limbs[i] >> 1) | hi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::elliptic_curve::Field;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn matches_naive_sum() {
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
        // Edge scalars: 0, 1, −1 (= n − 1, the largest), 2^128.
        let g = ProjectivePoint::GENERATOR;
        let edge = [
            Scalar::ZERO,
            Scalar::ONE,
            -Scalar::ONE,
            Scalar::from(u64::MAX) * Scalar::from(u64::MAX),
        ];
        for k in edge {
            assert_eq!(msm_vartime(&[(g, k)]), g * k);
        }
    }
}
