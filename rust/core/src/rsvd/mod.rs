//! Randomized SVD over linear operators, and the task-aware basis of `W·C`.
//!
//! # The algorithm (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1)
//!
//! For `A: [m, n]`, target rank `r`, oversampling `p` and `q` power iterations, let `k = min(r + p, min(m, n))`.
//!
//! 1. Draw a Gaussian test matrix `Ω: [·, k]` from the seed.
//! 2. Range finder with subspace iteration: `Q = qr(A Ω)`, then `q` times `Q = qr(Aᵀ Q)`, `Q = qr(A Q)`. After
//!    `q` rounds `range(Q) = range((A Aᵀ)^q A Ω)`, whose error decays like `(σ_{k+1}/σ_j)^{2q+1}`. The
//!    re-orthonormalisation after *every* product is what keeps the small singular directions from drowning in
//!    the rounding error of the large ones: without it the columns of `(A Aᵀ)^q A Ω` collapse onto the top
//!    singular vector in f32 after one or two rounds.
//! 3. Project: `B = Qᵀ A`, computed as `(Aᵀ Q)ᵀ` because the operator only offers products from the right.
//! 4. Thin SVD of the small `B = Ũ Σ Ṽᵀ`; `U = Q Ũ`, `V = Ṽ`, truncated to `r`.
//!
//! That is `2q + 2` operator products, all but the last followed by a thin QR of a `[·, k]` block (Cholesky-QR in
//! f64 with a Householder fallback, see `Orthonormalizer`). For `W·C` the products are 80–90% of the time, so the
//! f32 ones go through a dedicated AVX-512 kernel (`sgemm`) where the CPU has it.
//!
//! **Which side is sketched.** Every product and every QR in the loop costs the same whichever side the range
//! finder runs on (one product with `A` and one with `Aᵀ` per round, one QR of each height), so the only
//! difference is the final small SVD: it is of `B: [k, n]`, so the range finder runs on whichever of `A` and
//! `Aᵀ` is tall, and `B` is `k × min(m, n)`. For `m < n` it runs on `Aᵀ` and the roles of `U` and `V` swap at the
//! end. The test matrix is therefore always drawn on the smaller dimension, `Ω: [min(m, n), k]`.
//!
//! **Exact fallback.** When `k ≥ min(m, n)` the sketch would not be smaller than the matrix, so the operator is
//! materialised (applied to the identity) and given to faer's exact thin SVD.
//!
//! **Orthonormality.** The returned singular vectors are re-orthonormalised in f64 (`polish_columns`), so in f32
//! `V Vᵀ = I` holds to ~1e-7 rather than the ~5e-6 that f32 QR and SVD leave.
//!
//! **Determinism.** Column `j` of `Ω` comes from its own xoshiro256++ stream seeded from `(seed, j)`, so the test
//! matrix, and with it the result, is a function of the seed alone, not of the thread count (different thread
//! counts can only change the last bits of faer's parallel reductions). Singular vectors are unique only up to
//! sign; each pair `(u_i, v_i)` is flipped so that the largest-magnitude entry of `v_i` (the first one on a tie)
//! is positive.
//!
//! # Layout
//!
//! - `algorithm`: the public entry points, the range finder, the exact path and the orthonormalisation.
//! - `operator`: [`LinearOperator`] and its implementations ([`Dense`], [`WeightCovariance`]).
//! - `rng`: the seeded Gaussian test matrix.
//! - `checks`: input validation (finiteness, covariance symmetry).
//! - `sgemm`: the x86-64 AVX-512 single-precision product kernel.

use faer::traits::RealField;
use faer::Mat;

mod algorithm;
mod checks;
mod operator;
mod rng;
#[cfg(target_arch = "x86_64")]
// The AVX-512 intrinsics are stable since Rust 1.89 (faer itself needs 1.84).
#[clippy::msrv = "1.89"]
mod sgemm;
#[cfg(test)]
mod test_util;

pub use algorithm::{
    randomized_svd, randomized_svd_dense, randomized_svd_dense_interruptible, randomized_svd_interruptible,
    task_aware_basis, task_aware_basis_interruptible, Interrupt, MAX_POWER_ITERS,
};
pub use operator::{Dense, LinearOperator, WeightCovariance};

/// Randomized-SVD settings (Halko, Martinsson & Tropp 2011).
#[derive(Debug, Clone, Copy)]
pub struct SvdOptions {
    pub rank: usize,
    pub oversample: usize,
    pub power_iters: usize,
    pub seed: u64,
}

/// A truncated SVD `A ≈ U diag(s) Vᵀ`: `u: [m, rank]`, `s` descending, `vt: [rank, n]`.
#[derive(Debug, Clone)]
pub struct Svd<T> {
    pub u: Mat<T>,
    pub s: Vec<T>,
    pub vt: Mat<T>,
}

/// The floating-point types the decompositions run in: `f32` and `f64`.
pub trait Real: RealField + Copy + Send + Sync + core::ops::Neg<Output = Self> + 'static {
    /// Rounds an `f64` to the nearest value of this type.
    fn from_f64(x: f64) -> Self;
    /// Widens to `f64` (exact for both implementors).
    fn to_f64(self) -> f64;
    /// Neither NaN nor infinite.
    fn finite(self) -> bool;
    /// `|self|`.
    fn magnitude(self) -> Self;
    /// The machine epsilon of this type.
    const EPSILON: f64;
}

impl Real for f32 {
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn finite(self) -> bool {
        self.is_finite()
    }
    #[inline(always)]
    fn magnitude(self) -> Self {
        self.abs()
    }
    const EPSILON: f64 = f32::EPSILON as f64;
}

impl Real for f64 {
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn finite(self) -> bool {
        self.is_finite()
    }
    #[inline(always)]
    fn magnitude(self) -> Self {
        self.abs()
    }
    const EPSILON: f64 = f64::EPSILON;
}
