//! The operators the randomized SVD runs on: a matrix known only through products with it.

use faer::linalg::matmul::matmul;
use faer::reborrow::ReborrowMut;
use faer::{Accum, Mat, MatMut, MatRef, Par};

#[cfg(target_arch = "x86_64")]
use super::sgemm;
use super::Real;

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
        product(cx.as_mut(), self.c, x, par);
        product(out, self.w, cx.as_ref(), par);
    }
    /// `Mᵀ y = Cᵀ Wᵀ y = C·(Wᵀ·y)`, using the symmetry of `C`.
    fn apply_transpose(&self, out: MatMut<'_, T>, x: MatRef<'_, T>, par: Par) {
        let mut wty = Mat::<T>::zeros(self.w.ncols(), x.ncols());
        product(wty.as_mut(), self.w.transpose(), x, par);
        product(out, self.c, wty.as_ref(), par);
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
