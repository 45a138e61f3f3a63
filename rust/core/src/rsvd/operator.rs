//! The operators the randomized SVD runs on: a matrix known only through products with it.

use std::sync::Mutex;

use faer::linalg::matmul::matmul;
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Accum, Mat, MatMut, MatRef, Par};

#[cfg(target_arch = "x86_64")]
use super::sgemm;
use super::Real;
use crate::error::Result;
use crate::memory::mat_of;

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

/// An explicit matrix as an operator.
#[derive(Debug, Clone, Copy)]
pub struct Dense<'a, T> {
    pub a: MatRef<'a, T>,
}

impl<T: Real> LinearOperator<T> for Dense<'_, T> {
    fn nrows(&self) -> usize {
        self.a.nrows()
    }
    fn ncols(&self) -> usize {
        self.a.ncols()
    }
    fn apply(&self, out: MatMut<'_, T>, x: MatRef<'_, T>, par: Par) {
        product(out, self.a, x, par);
    }
    fn apply_transpose(&self, out: MatMut<'_, T>, x: MatRef<'_, T>, par: Par) {
        product(out, self.a.transpose(), x, par);
    }
}

/// The product `M = W·C` of a weight `W: [d_out, d_in]` and a symmetric covariance `C: [d_in, d_in]`, never formed.
///
/// Forming `W·C` costs `2·d_out·d_in²` flops and then `2·k·d_out·d_in` per product; applying `W` and `C` in turn
/// costs `2·k·(d_out·d_in + d_in²)` per product. Over the `2q + 2` products of a randomized SVD the implicit form
/// is cheaper as long as `(2q + 2)·k < d_out`: 1380 < 4096 for rank 128 + 10 with 4 power iterations on a
/// 4096-row weight: about 2× fewer flops on a 4096 × 4096 layer, 2.4× and 2.9× on 4096 × 11008 and 11008 × 4096.
#[derive(Debug, Clone, Copy)]
pub struct WeightCovariance<'a, T> {
    pub w: MatRef<'a, T>,
    pub c: MatRef<'a, T>,
}

impl<T: Real> LinearOperator<T> for WeightCovariance<'_, T> {
    fn nrows(&self) -> usize {
        self.w.nrows()
    }
    fn ncols(&self) -> usize {
        self.w.ncols()
    }
    /// `W·(C·x)`.
    fn apply(&self, out: MatMut<'_, T>, x: MatRef<'_, T>, par: Par) {
        let mut cx = Mat::<T>::zeros(self.c.nrows(), x.ncols());
        self.apply_through(out, x, cx.as_mut(), par);
    }
    /// `Mᵀ y = Cᵀ Wᵀ y = C·(Wᵀ·y)`, using the symmetry of `C`.
    fn apply_transpose(&self, out: MatMut<'_, T>, x: MatRef<'_, T>, par: Par) {
        let mut wty = Mat::<T>::zeros(self.w.ncols(), x.ncols());
        self.apply_transpose_through(out, x, wty.as_mut(), par);
    }
}

impl<T: Real> WeightCovariance<'_, T> {
    /// `W·(C·x)` with `C·x` in `tmp: [d_in, x.ncols()]`.
    fn apply_through(&self, out: MatMut<'_, T>, x: MatRef<'_, T>, mut tmp: MatMut<'_, T>, par: Par) {
        product(tmp.rb_mut(), self.c, x, par);
        product(out, self.w, tmp.rb(), par);
    }
    /// `C·(Wᵀ·y)` with `Wᵀ·y` in `tmp: [d_in, y.ncols()]`.
    fn apply_transpose_through(&self, out: MatMut<'_, T>, y: MatRef<'_, T>, mut tmp: MatMut<'_, T>, par: Par) {
        product(tmp.rb_mut(), self.w.transpose(), y, par);
        product(out, self.c, tmp.rb(), par);
    }
}

/// [`WeightCovariance`] with its intermediate `[d_in, k]` block allocated once, up front and fallibly: the trait's
/// products cannot report an allocation failure, so the core's own decompositions must not allocate inside them.
pub(super) struct BufferedWeightCovariance<'a, T> {
    op: WeightCovariance<'a, T>,
    tmp: Mutex<Mat<T>>,
}

impl<'a, T: Real> BufferedWeightCovariance<'a, T> {
    /// Room for products with up to `k` columns (wider ones fall back to a fresh block).
    pub(super) fn new(op: WeightCovariance<'a, T>, k: usize) -> Result<Self> {
        let tmp = mat_of(op.w.ncols(), k, T::from_f64(0.0), "the W·C intermediate block")?;
        Ok(Self { op, tmp: Mutex::new(tmp) })
    }

    fn with_tmp(&self, cols: usize, f: impl FnOnce(MatMut<'_, T>)) {
        // Products run one at a time from the algorithm's thread, so the lock is never contended.
        let mut tmp = self.tmp.lock().unwrap_or_else(|e| e.into_inner());
        if cols <= tmp.ncols() {
            f(tmp.as_mut().subcols_mut(0, cols));
        } else {
            f(Mat::<T>::zeros(self.op.w.ncols(), cols).as_mut());
        }
    }
}

impl<T: Real> LinearOperator<T> for BufferedWeightCovariance<'_, T> {
    fn nrows(&self) -> usize {
        self.op.nrows()
    }
    fn ncols(&self) -> usize {
        self.op.ncols()
    }
    fn apply(&self, out: MatMut<'_, T>, x: MatRef<'_, T>, par: Par) {
        self.with_tmp(x.ncols(), |tmp| self.op.apply_through(out, x, tmp, par));
    }
    fn apply_transpose(&self, out: MatMut<'_, T>, y: MatRef<'_, T>, par: Par) {
        self.with_tmp(y.ncols(), |tmp| self.op.apply_transpose_through(out, y, tmp, par));
    }
}

/// `Aᵀ` of an operator, so the range finder can always run on the tall side.
pub(super) struct Transposed<'a, Op: ?Sized>(pub(super) &'a Op);

impl<T, Op: LinearOperator<T> + ?Sized> LinearOperator<T> for Transposed<'_, Op> {
    fn nrows(&self) -> usize {
        self.0.ncols()
    }
    fn ncols(&self) -> usize {
        self.0.nrows()
    }
    fn apply(&self, out: MatMut<'_, T>, x: MatRef<'_, T>, par: Par) {
        self.0.apply_transpose(out, x, par)
    }
    fn apply_transpose(&self, out: MatMut<'_, T>, x: MatRef<'_, T>, par: Par) {
        self.0.apply(out, x, par)
    }
}

/// `out = a · x` for the two products the operators need, through the f32 AVX-512 kernel when it applies.
pub(super) fn product<T: Real>(mut out: MatMut<'_, T>, a: MatRef<'_, T>, x: MatRef<'_, T>, par: Par) {
    #[cfg(target_arch = "x86_64")]
    if core::any::TypeId::of::<T>() == core::any::TypeId::of::<f32>() && sgemm::try_matmul(out.rb_mut(), a, x, par) {
        return;
    }
    matmul(out, Accum::Replace, a, x, T::from_f64(1.0), par);
}
