//! Randomized SVD over linear operators, and the task-aware basis of `W·C`.
//!
//! TODO(helper): implement per the contract below.

use faer::{Mat, MatMut, MatRef, Par};

use crate::error::Result;

/// A real matrix known only through products with it. Implementations must be `Sync`: products run on the core's
/// thread pool.
pub trait LinearOperator<T>: Sync {
    fn nrows(&self) -> usize;
    fn ncols(&self) -> usize;
    /// `out = A · x`, `x: [ncols, k]`, `out: [nrows, k]`.
    fn apply(&self, out: MatMut<'_, T>, x: MatRef<'_, T>, par: Par);
    /// `out = Aᵀ · x`, `x: [nrows, k]`, `out: [ncols, k]`.
    fn apply_transpose(&self, out: MatMut<'_, T>, x: MatRef<'_, T>, par: Par);
}

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
