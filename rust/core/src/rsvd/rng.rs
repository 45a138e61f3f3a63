//! The seeded pseudo-random numbers of the test matrix. Hand-written rather than a dependency so that the test
//! matrix, and with it every result, stays bit-identical across dependency upgrades.

use faer::reborrow::ReborrowMut;
use faer::MatMut;
use rayon::prelude::*;

use super::Real;

/// SplitMix64's finaliser: a bijective mix, used to derive independent stream seeds.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256++ (Blackman & Vigna), seeded through SplitMix64 as its authors recommend.
struct Xoshiro256pp([u64; 4]);

impl Xoshiro256pp {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            splitmix64(x.wrapping_sub(0x9E37_79B9_7F4A_7C15))
        };
        Self([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `(-1, 1)` with 53 random bits.
    fn symmetric_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (2.0 / (1u64 << 53) as f64) - 1.0
    }

    /// A pair of independent standard normals by Marsaglia's polar method (no trigonometry, 21% rejection).
    fn normal_pair(&mut self) -> (f64, f64) {
        loop {
            let (a, b) = (self.symmetric_unit(), self.symmetric_unit());
            let r2 = a * a + b * b;
            if r2 < 1.0 && r2 > 0.0 {
                let f = (-2.0 * r2.ln() / r2).sqrt();
                return (a * f, b * f);
            }
        }
    }
}

/// Fills `out` with standard Gaussian samples; column `j` is its own stream seeded from `(seed, j)`, so it can be
/// filled in parallel and still not depend on the thread count.
pub(super) fn fill_gaussian<T: Real>(mut out: MatMut<'_, T>, seed: u64) {
    let rows = out.nrows();
    let base = splitmix64(seed);
    out.rb_mut().par_col_chunks_mut(1).enumerate().for_each(|(j, mut col)| {
        let mut rng = Xoshiro256pp::new(base ^ splitmix64(j as u64 ^ 0xD1B5_4A32_D192_ED03));
        let mut i = 0;
        while i < rows {
            let (a, b) = rng.normal_pair();
            col[(i, 0)] = T::from_f64(a);
            if i + 1 < rows {
                col[(i + 1, 0)] = T::from_f64(b);
            }
            i += 2;
        }
    });
}

/// A `[rows, cols]` matrix of [`fill_gaussian`]'s samples, for tests.
#[cfg(test)]
pub(super) fn gaussian<T: Real>(rows: usize, cols: usize, seed: u64) -> faer::Mat<T> {
    let mut out = faer::Mat::<T>::zeros(rows, cols);
    fill_gaussian(out.as_mut(), seed);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_matrix_is_standard_normal() {
        let g = gaussian::<f64>(20_000, 3, 7);
        for j in 0..3 {
            let col: Vec<f64> = (0..20_000).map(|i| g[(i, j)]).collect();
            let mean = col.iter().sum::<f64>() / 20_000.0;
            let var = col.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 20_000.0;
            assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
        }
        assert_ne!(g[(0, 0)], g[(0, 1)]);
    }
}
