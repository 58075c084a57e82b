//! Paired significance tests of two runs' per-query values, as IR papers report them: the mean
//! difference with its standard error, Student's paired t-test, and a paired randomization
//! (sign-flip permutation) test. Both p-values are two-sided and follow scipy's definitions
//! (`scipy.stats.ttest_rel`; `scipy.stats.permutation_test` with `permutation_type='samples'`
//! on the mean difference), so they can be checked against it.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The comparison of a run against a baseline over the queries both evaluated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedTest {
    pub queries: usize,
    /// Mean of (run - baseline).
    pub difference: f64,
    /// Standard error of that mean (sample standard deviation / sqrt(n)).
    pub std_error: f64,
    pub t: f64,
    /// Two-sided p-value of the paired t-test (n - 1 degrees of freedom); NaN when every
    /// difference is the same (as scipy).
    pub p_t_test: f64,
    /// Two-sided p-value of the sign-flip permutation test.
    pub p_permutation: f64,
    /// Sign assignments the permutation test looked at: all 2^n when that is at most the
    /// requested number (exact), else that many random ones.
    pub permutations: u64,
}

/// Paired tests of `run` against `baseline` (the same queries, in the same order).
/// `permutations` bounds the permutation test's work: exact enumeration when 2^n fits, else
/// that many random sign flips drawn from `seed`.
pub fn paired_test(baseline: &[f64], run: &[f64], permutations: u64, seed: u64) -> PairedTest {
    assert_eq!(baseline.len(), run.len(), "paired values");
    let d: Vec<f64> = run.iter().zip(baseline).map(|(r, b)| r - b).collect();
    let n = d.len();
    let mean = d.iter().sum::<f64>() / n as f64;
    let variance = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0);
    let std_error = (variance / n as f64).sqrt();
    let t = mean / std_error;
    let p_t_test = if t.is_finite() && n > 1 {
        let df = (n - 1) as f64;
        regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
    } else {
        f64::NAN
    };
    let (p_permutation, permutations) = sign_flip_test(&d, permutations, seed);
    PairedTest {
        queries: n,
        difference: mean,
        std_error,
        t,
        p_t_test,
        p_permutation,
        permutations,
    }
}

/// Two-sided sign-flip test of the mean of `d`: twice the smaller tail, scipy's tolerance of
/// 100 ulps of the observed statistic, and (randomized only) scipy's +1 on both counts.
fn sign_flip_test(d: &[f64], permutations: u64, seed: u64) -> (f64, u64) {
    let n = d.len();
    if n == 0 {
        return (f64::NAN, 0);
    }
    let observed = d.iter().sum::<f64>() / n as f64;
    let gamma = (observed * f64::EPSILON * 100.0).abs();
    let (mut below, mut above) = (0u64, 0u64);
    let mut count = |stat: f64| {
        below += u64::from(stat <= observed + gamma);
        above += u64::from(stat >= observed - gamma);
    };
    let exact = n < 64 && (1u64 << n) <= permutations;
    let (total, adjustment) = if exact {
        for signs in 0..(1u64 << n) {
            count(flipped_mean(d, |i| signs >> i & 1 == 1));
        }
        (1u64 << n, 0)
    } else {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut flips = vec![false; n];
        for _ in 0..permutations {
            flips.iter_mut().for_each(|f| *f = rng.random());
            count(flipped_mean(d, |i| flips[i]));
        }
        (permutations, 1)
    };
    let tail = |hits: u64| (hits + adjustment) as f64 / (total + adjustment) as f64;
    ((2.0 * tail(below).min(tail(above))).min(1.0), total)
}

fn flipped_mean(d: &[f64], flip: impl Fn(usize) -> bool) -> f64 {
    d.iter()
        .enumerate()
        .map(|(i, &x)| if flip(i) { -x } else { x })
        .sum::<f64>()
        / d.len() as f64
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms; relative error ~1e-15).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1-x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// I_x(a, b), the regularized incomplete beta function, by its continued fraction (modified
/// Lentz), on the side of the symmetry where it converges fast.
fn regularized_incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_continued_fraction(x, a, b) / a
    } else {
        1.0 - front * beta_continued_fraction(1.0 - x, b, a) / b
    }
}

fn beta_continued_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let clamp = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / clamp(1.0 - qab * x / qap);
    let mut h = d;
    for m in 1..=10_000 {
        let m = f64::from(m);
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 / clamp(1.0 + aa * d);
        c = clamp(1.0 + aa / c);
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 / clamp(1.0 + aa * d);
        c = clamp(1.0 + aa / c);
        let step = d * c;
        h *= step;
        if (step - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_gamma_matches_factorials_and_half_integers() {
        for n in 1..20u32 {
            let factorial: f64 = (1..n).map(f64::from).product();
            assert!(
                (ln_gamma(f64::from(n)) - factorial.ln()).abs() < 1e-12,
                "{n}"
            );
        }
        let sqrt_pi = std::f64::consts::PI.sqrt();
        assert!((ln_gamma(0.5) - sqrt_pi.ln()).abs() < 1e-13);
        assert!((ln_gamma(1.5) - (sqrt_pi / 2.0).ln()).abs() < 1e-13);
    }

    #[test]
    fn the_t_distribution_with_one_degree_of_freedom_is_cauchy() {
        // Two-sided p of |t| with df = 1 is 1 - 2 atan(t) / π.
        for t in [0.1f64, 0.5, 1.0, 3.0, 40.0] {
            let p = regularized_incomplete_beta(1.0 / (1.0 + t * t), 0.5, 0.5);
            let cauchy = 1.0 - 2.0 * t.atan() / std::f64::consts::PI;
            assert!((p - cauchy).abs() < 1e-13, "t={t}: {p} vs {cauchy}");
        }
    }

    #[test]
    fn identical_runs_have_no_difference_and_no_t_statistic() {
        let a = [0.1, 0.5, 0.9];
        let test = paired_test(&a, &a, 1000, 0);
        assert_eq!(test.difference, 0.0);
        assert!(test.t.is_nan() && test.p_t_test.is_nan());
        assert_eq!(test.p_permutation, 1.0);
        assert_eq!(test.permutations, 8);
    }

    #[test]
    fn random_sign_flips_approach_the_exact_p_value_and_repeat_by_seed() {
        let base: Vec<f64> = (0..16).map(|i| f64::from(i) / 16.0).collect();
        let run: Vec<f64> = base
            .iter()
            .enumerate()
            .map(|(i, b)| b + if i % 3 == 0 { -0.05 } else { 0.08 })
            .collect();
        let exact = paired_test(&base, &run, 1 << 16, 0);
        assert_eq!(exact.permutations, 65_536);
        let sampled = paired_test(&base, &run, 20_000, 3);
        assert_eq!(sampled.permutations, 20_000);
        // Monte Carlo error of a p near 0.02 over 20,000 draws: ~0.001.
        assert!(
            (sampled.p_permutation - exact.p_permutation).abs() < 0.005,
            "{} vs {}",
            sampled.p_permutation,
            exact.p_permutation
        );
        assert_eq!(paired_test(&base, &run, 20_000, 3), sampled);
        assert_eq!(sampled.p_t_test, exact.p_t_test);
    }
}
