//! The randomized SVD itself (see the module documentation of [`crate::rsvd`]) and its exact fallback.

use faer::dyn_stack::{MemStack, StackReq};
use faer::linalg::cholesky::llt::factor as llt;
use faer::linalg::householder;
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::qr::no_pivoting::factor as qr;
use faer::linalg::svd::{self as faer_svd, ComputeSvdVectors};
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Accum, Conj, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::checks::{check_covariance, check_finite};
use super::operator::{BufferedWeightCovariance, Dense, LinearOperator, Transposed, WeightCovariance};
use super::rng::fill_gaussian;
use super::{Real, Svd, SvdOptions};
use crate::error::{Error, Result};
use crate::memory::{buffer, mat_of};
use crate::threads::{self, Stop};

/// The most power iterations a decomposition accepts. Each one raises the spectrum ratio `σ_{k+1}/σ_j` to a
/// higher power; past a dozen the error is at rounding level and further rounds only cost time, so a count beyond
/// this is a mistake (or an unsigned wrap-around) rather than a request for accuracy.
pub const MAX_POWER_ITERS: usize = 64;

/// An interrupt check: called on the caller's thread at most every 100 ms while a decomposition runs; returning
/// `true` stops it with [`Error::Interrupted`] at its next step (before the next operator product).
pub type Interrupt<'a> = &'a dyn Fn() -> bool;

/// The truncated SVD of `op` by the randomized algorithm of the module documentation.
///
/// `u: [m, rank]`, `s` descending and non-negative, `vt: [rank, n]` with orthonormal rows. The result is a
/// deterministic function of the operator and `opts` (including the seed), independent of the thread count, and
/// invariant under scaling of the operator by any factor that keeps its entries finite and normal.
///
/// Errors: [`Error::Empty`] for a matrix with no rows or columns, [`Error::Rank`] unless
/// `1 ≤ rank ≤ min(m, n)`, [`Error::Value`] for more than [`MAX_POWER_ITERS`] power iterations or when the small
/// SVD does not converge, [`Error::NonFinite`] when the operator's products are not finite,
/// [`Error::OutOfMemory`] when a working buffer cannot be allocated.
pub fn randomized_svd<T: Real, Op: LinearOperator<T> + ?Sized>(op: &Op, opts: &SvdOptions) -> Result<Svd<T>> {
    svd_of_operator(op, opts, None)
}

/// [`randomized_svd`] that `interrupt` can stop ([`Error::Interrupted`]).
pub fn randomized_svd_interruptible<T: Real, Op: LinearOperator<T> + ?Sized>(
    op: &Op,
    opts: &SvdOptions,
    interrupt: Interrupt<'_>,
) -> Result<Svd<T>> {
    svd_of_operator(op, opts, Some(interrupt))
}

fn svd_of_operator<T: Real, Op: LinearOperator<T> + ?Sized>(
    op: &Op,
    opts: &SvdOptions,
    interrupt: Option<Interrupt<'_>>,
) -> Result<Svd<T>> {
    check_options(op.nrows(), op.ncols(), opts)?;
    threads::run_interruptible(interrupt, |par, stop| svd_on_pool(op, opts, true, par, stop))
}

/// [`randomized_svd`] of an explicit matrix; also rejects NaN and infinity in `a` with [`Error::NonFinite`].
pub fn randomized_svd_dense<T: Real>(a: MatRef<'_, T>, opts: &SvdOptions) -> Result<Svd<T>> {
    svd_of_dense(a, opts, None)
}

/// [`randomized_svd_dense`] that `interrupt` can stop ([`Error::Interrupted`]).
pub fn randomized_svd_dense_interruptible<T: Real>(
    a: MatRef<'_, T>,
    opts: &SvdOptions,
    interrupt: Interrupt<'_>,
) -> Result<Svd<T>> {
    svd_of_dense(a, opts, Some(interrupt))
}

fn svd_of_dense<T: Real>(a: MatRef<'_, T>, opts: &SvdOptions, interrupt: Option<Interrupt<'_>>) -> Result<Svd<T>> {
    check_options(a.nrows(), a.ncols(), opts)?;
    threads::run_interruptible(interrupt, |par, stop| {
        check_finite(a, "matrix")?;
        svd_on_pool(&Dense { a }, opts, true, par, stop)
    })
}

/// The task-aware basis of TLoRA: the top `rank` right singular vectors and singular values of `W·C`.
///
/// Returns `(vt, s)`: `vt: [rank, d_in]` with orthonormal rows, `s` descending. `W: [d_out, d_in]` is the layer
/// weight, `C: [d_in, d_in]` the (symmetric) input covariance; `W·C` is only ever applied, never formed (see
/// [`WeightCovariance`]).
///
/// Errors: [`Error::Shape`] when `C` is not `[d_in, d_in]`, [`Error::Empty`] for a weight with no rows or columns,
/// [`Error::Rank`] unless `1 ≤ rank ≤ min(d_out, d_in)`, [`Error::NonFinite`] naming the argument that holds NaN
/// or infinity, [`Error::Value`] when `C` is not symmetric to `1e-4 · max|C|` or for more than
/// [`MAX_POWER_ITERS`] power iterations, [`Error::OutOfMemory`] when a working buffer cannot be allocated.
pub fn task_aware_basis<T: Real>(w: MatRef<'_, T>, c: MatRef<'_, T>, opts: &SvdOptions) -> Result<(Mat<T>, Vec<T>)> {
    basis(w, c, opts, None)
}

/// [`task_aware_basis`] that `interrupt` can stop ([`Error::Interrupted`]).
pub fn task_aware_basis_interruptible<T: Real>(
    w: MatRef<'_, T>,
    c: MatRef<'_, T>,
    opts: &SvdOptions,
    interrupt: Interrupt<'_>,
) -> Result<(Mat<T>, Vec<T>)> {
    basis(w, c, opts, Some(interrupt))
}

fn basis<T: Real>(
    w: MatRef<'_, T>,
    c: MatRef<'_, T>,
    opts: &SvdOptions,
    interrupt: Option<Interrupt<'_>>,
) -> Result<(Mat<T>, Vec<T>)> {
    let (d_out, d_in) = w.shape();
    if c.nrows() != c.ncols() || c.nrows() != d_in {
        return Err(Error::Shape(format!(
            "covariance must be [d_in, d_in] = [{d_in}, {d_in}] for a weight of shape [{d_out}, {d_in}], got [{}, {}]",
            c.nrows(),
            c.ncols()
        )));
    }
    check_options(d_out, d_in, opts)?;
    threads::run_interruptible(interrupt, |par, stop| {
        check_finite(w, "weight")?;
        check_covariance(c)?;
        let k = opts.rank.saturating_add(opts.oversample).min(d_out.min(d_in));
        let op = BufferedWeightCovariance::new(WeightCovariance { w, c }, k)?;
        let svd = svd_on_pool(&op, opts, false, par, stop)?;
        Ok((svd.vt, svd.s))
    })
}

fn check_options(m: usize, n: usize, opts: &SvdOptions) -> Result<()> {
    if m == 0 || n == 0 {
        return Err(Error::Empty(format!("cannot decompose an empty {m}×{n} matrix")));
    }
    let max = m.min(n);
    let rank = opts.rank;
    if rank == 0 || rank > max {
        return Err(Error::Rank(format!("rank {rank} is outside 1..={max} for a {m}×{n} matrix")));
    }
    if opts.power_iters > MAX_POWER_ITERS {
        return Err(Error::Value(format!(
            "power_iters {} is above the maximum of {MAX_POWER_ITERS} (a handful suffices; see the documentation)",
            opts.power_iters
        )));
    }
    Ok(())
}

/// Runs on the core's pool, after validation. `want_u = false` leaves `u` empty (`[m, 0]`): the basis needs
/// only `V`, and skipping `U` saves a product and its re-orthonormalisation.
fn svd_on_pool<T: Real, Op: LinearOperator<T> + ?Sized>(
    op: &Op,
    opts: &SvdOptions,
    want_u: bool,
    par: Par,
    stop: &Stop,
) -> Result<Svd<T>> {
    let (m, n) = (op.nrows(), op.ncols());
    let small = m.min(n);
    let k = opts.rank.saturating_add(opts.oversample).min(small);
    // Singular vectors as columns until the very end: polishing and sign fixing read them contiguously.
    let Factors { mut u, s, mut v } = if k >= small {
        exact_svd(op, par, stop)?
    } else if m >= n {
        range_finder_svd(op, k, opts, want_u, par, stop)?
    } else {
        let t = range_finder_svd(&Transposed(op), k, opts, true, par, stop)?;
        Factors { u: t.v, s: t.s, v: t.u }
    };
    let rank = opts.rank;
    u = if want_u { polish_columns(u.subcols(0, rank), par)? } else { Mat::zeros(m, 0) };
    v = polish_columns(v.subcols(0, rank), par)?;
    fix_signs(u.as_mut(), v.as_mut());
    let mut vt = mat_of(rank, n, T::from_f64(0.0), "the right singular vectors")?;
    vt.copy_from(v.transpose());
    Ok(Svd { u, s: s[..rank].to_vec(), vt })
}

/// A thin SVD with both factors as columns: `u: [m, k]`, `v: [n, k]`.
pub(super) struct Factors<T> {
    pub(super) u: Mat<T>,
    pub(super) s: Vec<T>,
    pub(super) v: Mat<T>,
}

/// Exact thin SVD of the materialised operator. The cheaper of `A·I` and `Aᵀ·I` is the one with the smaller
/// identity.
fn exact_svd<T: Real, Op: LinearOperator<T> + ?Sized>(op: &Op, par: Par, stop: &Stop) -> Result<Factors<T>> {
    let (m, n) = (op.nrows(), op.ncols());
    let (zero, one) = (T::from_f64(0.0), T::from_f64(1.0));
    let mut full = mat_of(m, n, zero, "the materialised matrix")?;
    stop.check()?;
    let small = m.min(n);
    let mut identity = mat_of(small, small, zero, "an identity block")?;
    identity.as_mut().diagonal_mut().fill(one);
    if n <= m {
        op.apply(full.as_mut(), identity.as_ref(), par);
    } else {
        let mut t = mat_of(n, m, zero, "the materialised transpose")?;
        op.apply_transpose(t.as_mut(), identity.as_ref(), par);
        full.copy_from(t.transpose());
    }
    drop(identity);
    ensure_finite(full.as_ref())?;
    stop.check()?;
    // An SVD squares its entries on the way (norms, Givens rotations): scaled to order one, neither tiny nor huge
    // inputs underflow or overflow there, and a power of two changes no bit of the result.
    let scale = unit_scale::<T>(max_abs(full.as_ref()));
    scale_in_place(full.as_mut(), scale);
    let mut factors = thin_svd(full.as_ref(), par)?;
    unscale(&mut factors.s, scale)?;
    Ok(factors)
}

/// `A = U diag(s) Vᵀ` with `U: [m, min]`, `V: [n, min]`, by faer with the caller's parallelism.
pub(super) fn thin_svd<T: Real>(a: MatRef<'_, T>, par: Par) -> Result<Factors<T>> {
    let (m, n) = a.shape();
    let size = m.min(n);
    let zero = T::from_f64(0.0);
    let mut u = mat_of(m, size, zero, "the left singular vectors")?;
    let mut v = mat_of(n, size, zero, "the right singular vectors")?;
    let mut s = mat_of(size, 1, zero, "the singular values")?;
    let req =
        faer_svd::svd_scratch::<T>(m, n, ComputeSvdVectors::Thin, ComputeSvdVectors::Thin, par, Default::default());
    let mut mem = buffer(req, "the SVD workspace")?;
    let s_diag = s.as_mut().col_mut(0).as_diagonal_mut();
    faer_svd::svd(a, s_diag, Some(u.as_mut()), Some(v.as_mut()), par, MemStack::new(&mut mem), Default::default())
        .map_err(|_| Error::Value(format!("the SVD of a {m}×{n} matrix did not converge")))?;
    let s = (0..size).map(|i| s[(i, 0)]).collect();
    Ok(Factors { u, s, v })
}

fn ensure_finite<T: Real>(a: MatRef<'_, T>) -> Result<()> {
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            if !a[(i, j)].finite() {
                return Err(Error::NonFinite("the operator's products contain NaN or infinity".into()));
            }
        }
    }
    Ok(())
}

/// Thin QR of the `[rows, k]` blocks of the range finder, with all workspace allocated once.
///
/// The default is Cholesky-QR in f64: `G = YᵀY = L Lᵀ`, `Q = Y L⁻ᵀ`. All its work is two half-size matrix
/// products, so it costs about a quarter of a Householder QR (which spends most of its time in memory-bound panel
/// factorisations and in forming `Q`). Working in f64 on the exactly widened input makes it as accurate as
/// Householder in `T`: the f64 Gram carries `κ(Y)` up to ~1e7 (orthogonality loss `κ²·1e-16`), and `span Q` is
/// `span Y` to f64 rounding. A second pass (Cholesky-QR2) runs when one pass leaves the columns less orthonormal
/// than `T` can represent (always for f64, for f32 when `κ ≳ 1e4`). Where the Gram is singular or `κ` is beyond
/// reach (rank-deficient blocks), Householder QR in `T` takes over; its zero reflectors are identities, so even an
/// all-zero block gets orthonormal columns.
struct Orthonormalizer<T> {
    coeff: Mat<T>,
    q: Mat<T>,
    wide: Mat<f64>,
    wide_next: Mat<f64>,
    gram: Mat<f64>,
    inverse: Mat<f64>,
}

impl<T: Real> Orthonormalizer<T> {
    fn new(rows: usize, k: usize) -> Result<Self> {
        let bs = qr::recommended_block_size::<T>(rows, k);
        let zero = T::from_f64(0.0);
        let what = "the orthonormalisation workspace";
        Ok(Self {
            coeff: mat_of(bs, k, zero, what)?,
            q: mat_of(rows, k, zero, what)?,
            wide: mat_of(rows, k, 0.0, what)?,
            wide_next: mat_of(rows, k, 0.0, what)?,
            gram: mat_of(k, k, 0.0, what)?,
            inverse: mat_of(k, k, 0.0, what)?,
        })
    }

    fn scratch(&self, par: Par) -> StackReq {
        let (rows, k) = self.q.shape();
        let bs = self.coeff.nrows();
        StackReq::any_of(&[
            qr::qr_in_place_scratch::<T>(rows, k, bs, par, Default::default()),
            householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<T>(rows, bs, k),
            llt::cholesky_in_place_scratch::<f64>(k, par, Default::default()),
        ])
    }

    /// Replaces `y` by an orthonormal basis of its column span.
    fn orthonormalize(&mut self, y: &mut Mat<T>, par: Par, stack: &mut MemStack) {
        if !self.cholesky_qr(y, par, stack) {
            self.householder_qr(y, par, stack);
        }
    }

    fn cholesky_qr(&mut self, y: &mut Mat<T>, par: Par, stack: &mut MemStack) -> bool {
        let k = y.ncols();
        convert_columns(self.wide.as_mut(), y.as_ref(), |v| v.to_f64(), par);
        // One pass leaves columns orthonormal to ~κ²·1e-16; enough when that is below T's own rounding.
        let one_pass_limit = (0.1 * T::EPSILON / f64::EPSILON).sqrt();
        for pass in 0..2 {
            tri_matmul(
                self.gram.as_mut(),
                BlockStructure::TriangularLower,
                self.wide.transpose(),
                BlockStructure::Rectangular,
                self.wide.as_ref(),
                BlockStructure::Rectangular,
                par,
            );
            if llt::cholesky_in_place(self.gram.as_mut(), Default::default(), par, stack, Default::default()).is_err() {
                return false;
            }
            let diag = (0..k).map(|i| self.gram[(i, i)]);
            let (lo, hi) = diag.fold((f64::INFINITY, 0f64), |(lo, hi), d| (lo.min(d), hi.max(d)));
            let condition = hi / lo;
            if condition.is_nan() || condition >= 1e7 {
                return false;
            }
            invert_lower_triangular(self.inverse.as_mut(), self.gram.as_ref(), par);
            // Y L⁻ᵀ: L⁻ᵀ is upper triangular.
            tri_matmul(
                self.wide_next.as_mut(),
                BlockStructure::Rectangular,
                self.wide.as_ref(),
                BlockStructure::Rectangular,
                self.inverse.transpose(),
                BlockStructure::TriangularUpper,
                par,
            );
            core::mem::swap(&mut self.wide, &mut self.wide_next);
            if pass == 0 && condition < one_pass_limit {
                break;
            }
        }
        convert_columns(y.as_mut(), self.wide.as_ref(), T::from_f64, par);
        true
    }

    fn householder_qr(&mut self, y: &mut Mat<T>, par: Par, stack: &mut MemStack) {
        qr::qr_in_place(y.as_mut(), self.coeff.as_mut(), par, stack, Default::default());
        let k = self.q.ncols();
        self.q.fill(T::from_f64(0.0));
        for i in 0..k {
            self.q[(i, i)] = T::from_f64(1.0);
        }
        householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
            y.as_ref(),
            self.coeff.as_ref(),
            Conj::No,
            self.q.as_mut(),
            par,
            stack,
        );
        core::mem::swap(y, &mut self.q);
    }
}

/// `dst = lhs · rhs` (only the `dst_structure` part written), with triangular operands read as such.
fn tri_matmul(
    dst: MatMut<'_, f64>,
    dst_structure: BlockStructure,
    lhs: MatRef<'_, f64>,
    lhs_structure: BlockStructure,
    rhs: MatRef<'_, f64>,
    rhs_structure: BlockStructure,
    par: Par,
) {
    triangular::matmul(dst, dst_structure, Accum::Replace, lhs, lhs_structure, rhs, rhs_structure, 1.0, par);
}

/// `dst[i, j] = f(src[i, j])` for column-major matrices of the same shape, columns in parallel.
fn convert_columns<A: Copy + Sync, B: Copy + Send>(
    mut dst: MatMut<'_, B>,
    src: MatRef<'_, A>,
    f: impl Fn(A) -> B + Sync,
    par: Par,
) {
    let run = |(j, mut col): (usize, MatMut<'_, B>)| {
        for i in 0..src.nrows() {
            col[(i, 0)] = f(src[(i, j)]);
        }
    };
    if par.degree() > 1 {
        dst.as_mut().par_col_chunks_mut(1).enumerate().for_each(run);
    } else {
        (0..src.ncols()).for_each(|j| run((j, dst.rb_mut().subcols_mut(j, 1))));
    }
}

/// Algorithms 4.4 + 5.1 of Halko et al. on a tall operator (`nrows ≥ ncols`), `k < ncols`.
fn range_finder_svd<T: Real, Op: LinearOperator<T> + ?Sized>(
    op: &Op,
    k: usize,
    opts: &SvdOptions,
    want_u: bool,
    par: Par,
    stop: &Stop,
) -> Result<Factors<T>> {
    let (p, q) = (op.nrows(), op.ncols());
    let zero = T::from_f64(0.0);
    // y: the range basis, [p, k]; z: the co-range block, [q, k]. The test matrix lives in z first.
    let mut y = mat_of(p, k, zero, "the range basis")?;
    let mut z = mat_of(q, k, zero, "the test matrix")?;
    fill_gaussian(z.as_mut(), opts.seed);
    let mut orth_p = Orthonormalizer::<T>::new(p, k)?;
    let mut orth_q = Orthonormalizer::<T>::new(q, k)?;
    let mut mem = buffer(StackReq::any_of(&[orth_p.scratch(par), orth_q.scratch(par)]), "the QR workspace")?;
    let stack = MemStack::new(&mut mem);

    stop.check()?;
    op.apply(y.as_mut(), z.as_ref(), par);
    // A broken operator is caught here, before it costs 2q + 1 more products.
    ensure_finite(y.as_ref())?;
    // Every later block is orthonormal, so the products carry the operator's scale only through this factor:
    // multiplying each product by it keeps the Gram matrices and the small SVD at order one whatever the scale of
    // the input (f32 entries of 1e-25 underflow in a Gram matrix, f64 entries of 1e154 overflow). A power of two
    // keeps every product bit-identical up to the exponent.
    let scale = unit_scale::<T>(max_abs(y.as_ref()));
    scale_in_place(y.as_mut(), scale);
    orth_p.orthonormalize(&mut y, par, stack);
    for _ in 0..opts.power_iters {
        stop.check()?;
        op.apply_transpose(z.as_mut(), y.as_ref(), par);
        scale_in_place(z.as_mut(), scale);
        orth_q.orthonormalize(&mut z, par, stack);
        stop.check()?;
        op.apply(y.as_mut(), z.as_ref(), par);
        scale_in_place(y.as_mut(), scale);
        orth_p.orthonormalize(&mut y, par, stack);
    }
    stop.check()?;
    // z = Aᵀ Q = Bᵀ: its SVD z = Uz Σ Vzᵀ gives A ≈ Q B = (Q Vz) Σ Uzᵀ.
    op.apply_transpose(z.as_mut(), y.as_ref(), par);
    ensure_finite(z.as_ref())?;
    scale_in_place(z.as_mut(), scale);
    let Factors { u: uz, mut s, v: vz } = thin_svd(z.as_ref(), par)?;
    unscale(&mut s, scale)?;
    let u = if want_u {
        let mut u = mat_of(p, k, zero, "the left singular vectors")?;
        matmul(u.as_mut(), Accum::Replace, y.as_ref(), vz.as_ref(), T::from_f64(1.0), par);
        u
    } else {
        Mat::zeros(p, 0)
    };
    Ok(Factors { u, s, v: uz })
}

/// The columns of `x: [n, r]` re-orthonormalised in f64 (one Cholesky-QR pass; two for f64 data).
///
/// f32 QR and SVD leave factors orthonormal only to a few `k·ε ≈ 5e-6`; users of the basis rely on `A Aᵀ = I`
/// (TLoRA freezes `A`, and its scale assumes orthonormal rows). The input is already orthonormal to that level, so
/// the Gram is perfectly conditioned, `L ≈ I` barely moves the columns (span and order are kept), and what is
/// left is the final rounding to `T`: ~1e-7 in f32.
fn polish_columns<T: Real>(x: MatRef<'_, T>, par: Par) -> Result<Mat<T>> {
    let (n, r) = x.shape();
    let mut out = mat_of(n, r, T::from_f64(0.0), "the singular vectors")?;
    out.copy_from(x);
    if n == 0 || r == 0 {
        return Ok(out);
    }
    let mut orth = Orthonormalizer::<T>::new(n, r)?;
    let mut mem = buffer(orth.scratch(par), "the QR workspace")?;
    orth.orthonormalize(&mut out, par, MemStack::new(&mut mem));
    Ok(out)
}

fn max_abs<T: Real>(a: MatRef<'_, T>) -> f64 {
    let mut max = 0f64;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            max = max.max(a[(i, j)].magnitude().to_f64());
        }
    }
    max
}

/// The power of two that brings `max` into `[1, 2)`, clamped to what `T` represents (1 for zero or non-finite).
fn unit_scale<T: Real>(max: f64) -> T {
    if max == 0.0 || !max.is_finite() {
        return T::from_f64(1.0);
    }
    // Exponent range of T with room to spare: f32 normals span 2^±126, f64 2^±1022.
    let limit = if T::EPSILON > 1e-10 { 120 } else { 1000 };
    let e = (max.log2().floor() as i32).clamp(-limit, limit);
    T::from_f64(2f64.powi(-e))
}

fn scale_in_place<T: Real>(mut a: MatMut<'_, T>, scale: T) {
    if scale == T::from_f64(1.0) {
        return;
    }
    for j in 0..a.ncols() {
        for x in a.rb_mut().col_mut(j).iter_mut() {
            *x *= scale;
        }
    }
}

/// Undoes [`unit_scale`] on the singular values. The largest one, `‖A‖₂`, can exceed `T`'s range even when every
/// entry is finite (an f32 matrix of entries near `f32::MAX`); that is reported, not returned as infinity.
fn unscale<T: Real>(s: &mut [T], scale: T) -> Result<()> {
    for x in s.iter_mut() {
        *x /= scale;
    }
    if s.iter().any(|x| !x.finite()) {
        return Err(Error::NonFinite(format!(
            "the largest singular value (the matrix's spectral norm) exceeds the range of {}; scale the input down",
            core::any::type_name::<T>()
        )));
    }
    Ok(())
}

/// Makes the largest-magnitude entry of each right singular vector (column of `v`) positive, the first one on a
/// tie, flipping the matching column of `u` (if present) with it.
fn fix_signs<T: Real>(mut u: MatMut<'_, T>, mut v: MatMut<'_, T>) {
    let zero = T::from_f64(0.0);
    for j in 0..v.ncols() {
        let col = v.rb().col(j);
        let mut best = 0;
        for i in 1..col.nrows() {
            if col[i].magnitude() > col[best].magnitude() {
                best = i;
            }
        }
        if col[best] < zero {
            v.rb_mut().col_mut(j).iter_mut().for_each(|x| *x = -*x);
            if j < u.ncols() {
                u.rb_mut().col_mut(j).iter_mut().for_each(|x| *x = -*x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rsvd::rng::gaussian;
    use crate::rsvd::test_util::*;

    /// `max |QᵀQ − I|` and the relative residual `‖Y − Q Qᵀ Y‖ / ‖Y‖` of an orthonormalised block.
    fn orthonormalize_check<T: Real>(y: &Mat<T>) -> (f64, f64) {
        let mut q = y.clone();
        let (rows, k) = y.shape();
        let mut orth = Orthonormalizer::<T>::new(rows, k).unwrap();
        let mut mem = faer::dyn_stack::MemBuffer::new(orth.scratch(Par::Seq));
        orth.orthonormalize(&mut q, Par::Seq, MemStack::new(&mut mem));
        let qd = Mat::from_fn(rows, k, |i, j| q[(i, j)].to_f64());
        let yd = Mat::from_fn(rows, k, |i, j| y[(i, j)].to_f64());
        let residual = (&yd - &qd * (qd.transpose() * &yd)).norm_l2() / yd.norm_l2().max(f64::MIN_POSITIVE);
        (row_orthonormality_error(qd.transpose()), residual)
    }

    #[test]
    fn orthonormalizer_keeps_the_span_on_every_path() {
        // Well conditioned: one Cholesky-QR pass.
        let y = gaussian::<f32>(500, 40, 1);
        let (orth, res) = orthonormalize_check(&y);
        assert!(orth < 1e-6 && res < 1e-6, "f32 random: {orth:e} {res:e}");
        // κ = 1e5: a second pass in f32, always two in f64.
        let s: Vec<f64> = (0..40).map(|i| 10f64.powf(-5.0 * i as f64 / 39.0)).collect();
        let y64 = with_spectrum(500, 40, &s, 2);
        let (orth, res) = orthonormalize_check(&y64);
        assert!(orth < 1e-13 && res < 1e-13, "f64 κ=1e5: {orth:e} {res:e}");
        let y32 = Mat::from_fn(500, 40, |i, j| y64[(i, j)] as f32);
        let (orth, res) = orthonormalize_check(&y32);
        assert!(orth < 1e-6 && res < 1e-6, "f32 κ=1e5: {orth:e} {res:e}");
        // Rank-deficient and zero blocks: Householder, still orthonormal.
        let deficient = with_spectrum(300, 30, &[3.0, 2.0, 1.0], 3);
        let (orth, res) = orthonormalize_check(&deficient);
        assert!(orth < 1e-12 && res < 1e-12, "rank 3: {orth:e} {res:e}");
        let (orth, _) = orthonormalize_check(&Mat::<f32>::zeros(200, 20));
        assert!(orth < 1e-6, "zero block: {orth:e}");
    }

    #[test]
    fn no_power_iterations_on_a_fast_decaying_spectrum() {
        let s: Vec<f64> = (0..50).map(|i| 0.5f64.powi(i)).collect();
        let a = with_spectrum(150, 120, &s, 8);
        check_against_exact(&a, 5, opts(5, 10, 0, 2), 1e-6, 1e-10);
    }

    /// Timing on the benchmark shapes (`cargo test --release -p lowrank-core rsvd::algorithm::tests::bench -- --ignored
    /// --nocapture`); `bench/` compares against torch side by side.
    #[test]
    #[ignore]
    fn bench_task_aware_basis() {
        crate::threads::set_num_threads(2).unwrap();
        for &(d_out, d_in) in &[(4096usize, 4096usize), (4096, 11008), (11008, 4096)] {
            // C = G Gᵀ / t + 0.05 I with three outlier channels; W Gaussian with power-law column scales. Row-major
            // views, as numpy hands them over.
            let t = 1024;
            let mut g = gaussian::<f32>(d_in, t, 1);
            for &ch in &[3, d_in / 3, d_in - 5] {
                for j in 0..t {
                    g[(ch, j)] *= 30.0;
                }
            }
            let mut c = Mat::<f32>::zeros(d_in, d_in);
            crate::threads::run(|par| {
                matmul(c.as_mut(), Accum::Replace, g.as_ref(), g.transpose(), 1.0 / t as f32, par);
            });
            let c = Mat::from_fn(d_in, d_in, |i, j| {
                let v = if i >= j { c[(i, j)] } else { c[(j, i)] };
                v + if i == j { 0.05 } else { 0.0 }
            });
            let w = gaussian::<f32>(d_in, d_out, 2);
            let w = Mat::from_fn(d_in, d_out, |i, j| w[(i, j)] / (1.0 + i as f32).sqrt());
            let (w_rows, c_rows) = (w.transpose(), c.transpose());
            let o = opts(128, 10, 4, 0);
            let mut times = Vec::new();
            for _ in 0..3 {
                let start = std::time::Instant::now();
                let (vt, _) = task_aware_basis(w_rows, c_rows, &o).unwrap();
                times.push(start.elapsed().as_secs_f64());
                assert_eq!(vt.shape(), (128, d_in));
            }
            times.sort_by(f64::total_cmp);
            println!("task_aware_basis {d_out}x{d_in}, rank 128, 2 threads: median {:.3}s {times:?}", times[1]);
        }
    }

    #[test]
    fn random_matrices_match_exact_svd() {
        for &(m, n) in &[(120usize, 80usize), (80, 120), (300, 40), (40, 300)] {
            let a = gaussian::<f64>(m, n, 3);
            // A flat Gaussian spectrum is the hardest case for a sketch; four power iterations still nail the top.
            check_against_exact(&a, 10, opts(10, 10, 4, 1), 2e-2, 2e-2);
        }
    }

    #[test]
    fn decaying_spectra_match_exact_svd() {
        let s: Vec<f64> = (0..60).map(|i| 10f64.powf(-(i as f64) / 6.0)).collect();
        for &(m, n) in &[(200usize, 150usize), (150, 200)] {
            let a = with_spectrum(m, n, &s, 11);
            check_against_exact(&a, 20, opts(20, 10, 4, 5), 1e-9, 1e-12);
        }
        // Power law as in trained weights.
        let s: Vec<f64> = (0..100).map(|i| 1.0 / (1.0 + i as f64)).collect();
        let a = with_spectrum(160, 220, &s, 2);
        check_against_exact(&a, 16, opts(16, 10, 4, 9), 1e-3, 1e-4);
    }

    #[test]
    fn rank_deficient_and_zero_matrices() {
        let a = with_spectrum(90, 70, &[5.0, 3.0, 1.0], 4);
        check_against_exact(&a, 8, opts(8, 5, 2, 0), 1e-10, 1e-12);
        let svd = randomized_svd_dense(a.as_ref(), &opts(8, 5, 2, 0)).unwrap();
        for &s in &svd.s[3..] {
            assert!(s.abs() < 1e-10);
        }
        let zero = Mat::<f64>::zeros(50, 40);
        let svd = randomized_svd_dense(zero.as_ref(), &opts(5, 5, 2, 0)).unwrap();
        assert!(svd.s.iter().all(|&s| s == 0.0));
        assert!(svd.u.as_ref().is_all_finite() && svd.vt.as_ref().is_all_finite());
        assert!(row_orthonormality_error(svd.vt.as_ref()) < 1e-12);
    }

    #[test]
    fn tiny_matrices_take_the_exact_path() {
        let a = Mat::from_fn(1, 1, |_, _| -3.0f64);
        let svd = randomized_svd_dense(a.as_ref(), &opts(1, 10, 4, 0)).unwrap();
        assert_eq!(svd.s, vec![3.0]);
        assert_eq!(svd.vt[(0, 0)], 1.0);
        assert_eq!(svd.u[(0, 0)], -1.0);

        let a = Mat::from_fn(1, 5, |_, j| j as f64 - 3.0);
        let svd = randomized_svd_dense(a.as_ref(), &opts(1, 0, 0, 0)).unwrap();
        let norm = a.norm_l2();
        assert!((svd.s[0] - norm).abs() < 1e-12);
        for j in 0..5 {
            assert!((svd.vt[(0, j)] * svd.u[(0, 0)] * norm - a[(0, j)]).abs() < 1e-12);
        }
        // Largest-|.| entry of v is a[0,0] = -3, so v is flipped positive there.
        assert!(svd.vt[(0, 0)] > 0.0);

        let a = Mat::from_fn(6, 1, |i, _| i as f64 + 1.0);
        let svd = randomized_svd_dense(a.as_ref(), &opts(1, 3, 1, 0)).unwrap();
        assert!((svd.s[0] - a.norm_l2()).abs() < 1e-12);
    }

    #[test]
    fn exact_fallback_when_the_sketch_is_not_smaller() {
        let a = gaussian::<f64>(30, 25, 8);
        // rank + oversample = 25 = min(m, n): no sketch, the exact SVD, to rounding.
        let svd = randomized_svd_dense(a.as_ref(), &opts(20, 5, 0, 1)).unwrap();
        let (_, s, _) = exact(a.as_ref());
        for i in 0..20 {
            assert!((svd.s[i] - s[i]).abs() < 1e-12 * s[0]);
        }
        let wide = a.transpose().to_owned();
        let svd_t = randomized_svd_dense(wide.as_ref(), &opts(20, 5, 0, 1)).unwrap();
        for i in 0..20 {
            assert!((svd_t.s[i] - s[i]).abs() < 1e-12 * s[0]);
        }
        check_against_exact(&a, 25, opts(25, 0, 0, 0), 1e-12, 1e-12);
    }

    #[test]
    fn deterministic_for_a_seed_and_any_thread_count() {
        let a = gaussian::<f32>(150, 90, 21);
        let o = opts(12, 6, 2, 42);
        let first = randomized_svd_dense(a.as_ref(), &o).unwrap();
        let second = randomized_svd_dense(a.as_ref(), &o).unwrap();
        assert_eq!(first.s, second.s);
        assert!(first.u == second.u && first.vt == second.vt);
        // Same seed under a different parallelism: the test matrix is identical, the results agree to rounding.
        let seq = svd_on_pool(&Dense { a: a.as_ref() }, &o, true, Par::Seq, &Stop::default()).unwrap();
        let par = svd_on_pool(&Dense { a: a.as_ref() }, &o, true, Par::rayon(3), &Stop::default()).unwrap();
        for i in 0..12 {
            assert!((seq.s[i] - par.s[i]).abs() <= 1e-4 * seq.s[0]);
        }
        assert!(gaussian::<f64>(64, 5, 9) == gaussian::<f64>(64, 5, 9));
        let other = randomized_svd_dense(a.as_ref(), &opts(12, 6, 2, 43)).unwrap();
        assert!(other.vt != first.vt);
    }

    /// Random SPD covariance `G Gᵀ / t` with a few outlier channels, as LLM activations have.
    fn covariance(d: usize, seed: u64) -> Mat<f64> {
        let t = 2 * d;
        let mut g = gaussian::<f64>(d, t, seed);
        for &ch in &[1usize, d / 3, d - 2] {
            for j in 0..t {
                g[(ch, j)] *= 20.0;
            }
        }
        let c = &g * g.transpose() * (1.0 / t as f64);
        // Exact symmetry (the product rounds its two triangles independently).
        Mat::from_fn(d, d, |i, j| 0.5 * (c[(i, j)] + c[(j, i)]))
    }

    fn power_law_weight(d_out: usize, d_in: usize, seed: u64) -> Mat<f64> {
        let s: Vec<f64> = (0..d_out.min(d_in)).map(|i| 3.0 / (1.0 + i as f64).powf(0.7)).collect();
        with_spectrum(d_out, d_in, &s, seed)
    }

    #[test]
    fn task_aware_basis_matches_exact_svd_of_the_product() {
        for &(d_out, d_in) in &[(120usize, 90usize), (90, 140)] {
            let w = power_law_weight(d_out, d_in, 17);
            let c = covariance(d_in, 23);
            let m = &w * &c;
            let rank = 16;
            let (vt, s) = task_aware_basis(w.as_ref(), c.as_ref(), &opts(rank, 10, 4, 3)).unwrap();
            assert_eq!(vt.shape(), (rank, d_in));
            let (_, s_exact, v_exact) = exact(m.as_ref());
            for i in 0..rank {
                assert!((s[i] - s_exact[i]).abs() < 1e-3 * s_exact[0], "σ{i}: {} vs {}", s[i], s_exact[i]);
            }
            let top: f64 = s_exact[..rank].iter().map(|x| x * x).sum();
            assert!(captured(m.as_ref(), vt.as_ref()) >= 0.99999 * top);
            // Subspace agreement: the exact top-r right singular vectors project almost fully onto span(vt).
            let overlap = (&vt * v_exact.subcols(0, rank)).squared_norm_l2() / rank as f64;
            assert!(overlap > 0.999, "subspace overlap {overlap}");
            assert!(row_orthonormality_error(vt.as_ref()) < 1e-12);
        }
    }

    #[test]
    fn task_aware_basis_in_f32_has_orthonormal_rows_and_captures_the_energy() {
        for &(d_out, d_in) in &[(384usize, 256usize), (256, 384)] {
            let w = power_law_weight(d_out, d_in, 5);
            let c = covariance(d_in, 6);
            let w32 = Mat::from_fn(d_out, d_in, |i, j| w[(i, j)] as f32);
            let c32 = Mat::from_fn(d_in, d_in, |i, j| c[(i, j)] as f32);
            let (w32_rows, c32_rows) = (w32.transpose().to_owned(), c32.transpose().to_owned());
            let m = &w * &c;
            let (_, s_exact, _) = exact(m.as_ref());
            let rank = 64;
            let top: f64 = s_exact[..rank].iter().map(|x| x * x).sum();
            // Column-major and row-major (numpy) storage take different kernel paths; both must hold.
            for (wv, cv) in [(w32.as_ref(), c32.as_ref()), (w32_rows.transpose(), c32_rows.transpose())] {
                let (vt, s) = task_aware_basis(wv, cv, &opts(rank, 10, 4, 0)).unwrap();
                let err = row_orthonormality_error(vt.as_ref());
                assert!(err < 5e-7, "rows of vt orthonormal to {err}");
                let vt64 = Mat::from_fn(rank, d_in, |i, j| vt[(i, j)] as f64);
                let got = captured(m.as_ref(), vt64.as_ref());
                assert!(got >= 0.995 * top, "captured {got} of {top}");
                assert!((s[0] as f64 - s_exact[0]).abs() < 1e-4 * s_exact[0]);
            }
        }
    }

    #[test]
    fn f32_dense_matches_f64() {
        let s: Vec<f64> = (0..80).map(|i| 0.9f64.powi(i)).collect();
        let a = with_spectrum(200, 120, &s, 1);
        let a32 = Mat::from_fn(200, 120, |i, j| a[(i, j)] as f32);
        let svd = randomized_svd_dense(a32.as_ref(), &opts(10, 10, 4, 0)).unwrap();
        for (i, (&got, &want)) in svd.s.iter().zip(&s).enumerate() {
            assert!((got as f64 - want).abs() < 1e-5, "σ{i}");
        }
        let err = row_orthonormality_error(svd.vt.as_ref());
        assert!(err < 2e-6);
    }

    #[test]
    fn errors_are_reported_not_panicked() {
        let a = Mat::<f64>::zeros(4, 3);
        let e = randomized_svd_dense(a.as_ref(), &opts(0, 2, 1, 0)).unwrap_err();
        assert!(matches!(e, Error::Rank(ref m) if m.contains("rank 0") && m.contains("4×3")), "{e}");
        let e = randomized_svd_dense(a.as_ref(), &opts(4, 2, 1, 0)).unwrap_err();
        assert!(matches!(e, Error::Rank(ref m) if m.contains("rank 4") && m.contains("1..=3")), "{e}");
        let e = randomized_svd_dense(Mat::<f64>::zeros(0, 3).as_ref(), &opts(1, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, Error::Empty(_)), "{e}");
        let e = randomized_svd_dense(Mat::<f32>::zeros(3, 0).as_ref(), &opts(1, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, Error::Empty(_)), "{e}");
        let mut nan = Mat::<f64>::zeros(4, 3);
        nan[(2, 1)] = f64::NAN;
        let e = randomized_svd_dense(nan.as_ref(), &opts(1, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, Error::NonFinite(ref m) if m.contains("matrix") && m.contains("(2, 1)")), "{e}");
        let e = randomized_svd(&Dense { a: nan.as_ref() }, &opts(1, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, Error::NonFinite(_)), "{e}");
        let e = randomized_svd(&Dense { a: Mat::<f64>::zeros(5, 0).as_ref() }, &opts(1, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, Error::Empty(_)), "{e}");

        let w = Mat::<f32>::from_fn(6, 4, |i, j| (i + j) as f32);
        let c = Mat::<f32>::identity(4, 4);
        let e = task_aware_basis(w.as_ref(), Mat::<f32>::identity(5, 5).as_ref(), &opts(1, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, Error::Shape(ref m) if m.contains("[5, 5]") && m.contains("[6, 4]")), "{e}");
        let e = task_aware_basis(w.as_ref(), Mat::<f32>::zeros(4, 5).as_ref(), &opts(1, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, Error::Shape(ref m) if m.contains("[4, 5]")), "{e}");
        let e = task_aware_basis(Mat::<f32>::zeros(0, 4).as_ref(), c.as_ref(), &opts(1, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, Error::Empty(_)), "{e}");
        let e = task_aware_basis(w.as_ref(), c.as_ref(), &opts(5, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, Error::Rank(ref m) if m.contains("rank 5")), "{e}");
        let e = task_aware_basis(w.as_ref(), c.as_ref(), &opts(0, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, Error::Rank(_)), "{e}");
        let mut w_bad = w.clone();
        w_bad[(3, 2)] = f32::INFINITY;
        let e = task_aware_basis(w_bad.as_ref(), c.as_ref(), &opts(1, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, Error::NonFinite(ref m) if m.contains("weight") && m.contains("(3, 2)")), "{e}");
        let mut c_bad = c.clone();
        c_bad[(1, 3)] = f32::NAN;
        let e = task_aware_basis(w.as_ref(), c_bad.as_ref(), &opts(1, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, Error::NonFinite(ref m) if m.contains("covariance") && m.contains("(1, 3)")), "{e}");
        let mut c_asym = c.clone();
        c_asym[(0, 3)] = 0.01;
        let e = task_aware_basis(w.as_ref(), c_asym.as_ref(), &opts(1, 0, 0, 0)).unwrap_err();
        assert!(matches!(e, Error::Value(ref m) if m.contains("covariance is not symmetric")), "{e}");
        // Asymmetry below 1e-4 · max|C| is rounding, not an error.
        let mut c_close = c.clone();
        c_close[(0, 3)] = 5e-5;
        assert!(task_aware_basis(w.as_ref(), c_close.as_ref(), &opts(1, 0, 0, 0)).is_ok());
    }

    /// An operator that only has a shape: its products would be huge, and it sleeps instead of computing.
    struct Phantom {
        rows: usize,
        cols: usize,
        delay_ms: u64,
    }

    impl LinearOperator<f64> for Phantom {
        fn nrows(&self) -> usize {
            self.rows
        }
        fn ncols(&self) -> usize {
            self.cols
        }
        fn apply(&self, mut out: MatMut<'_, f64>, x: MatRef<'_, f64>, _: Par) {
            std::thread::sleep(std::time::Duration::from_millis(self.delay_ms));
            out.fill(0.0);
            let rows = out.nrows();
            for j in 0..x.ncols().min(out.ncols()) {
                out[(j % rows, j)] = 1.0 + j as f64;
            }
        }
        fn apply_transpose(&self, out: MatMut<'_, f64>, x: MatRef<'_, f64>, par: Par) {
            self.apply(out, x, par)
        }
    }

    #[test]
    fn buffers_too_large_for_memory_are_an_error_not_an_abort() {
        // 2^40 × 2^20 with k = 20: the range basis alone is 2^40 · 20 · 8 bytes.
        let op = Phantom { rows: 1 << 40, cols: 1 << 20, delay_ms: 0 };
        let e = randomized_svd(&op, &opts(10, 10, 1, 0)).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(ref m) if m.contains("range basis")), "{e}");
        // The exact path materialises the matrix: 2^31 × 30 f64 is 480 GiB.
        let op = Phantom { rows: 1 << 31, cols: 30, delay_ms: 0 };
        let e = randomized_svd(&op, &opts(25, 10, 1, 0)).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(ref m) if m.contains("materialised")), "{e}");
    }

    #[test]
    fn power_iterations_are_capped() {
        let a = gaussian::<f64>(20, 10, 1);
        let e = randomized_svd_dense(a.as_ref(), &opts(2, 2, MAX_POWER_ITERS + 1, 0)).unwrap_err();
        assert!(matches!(e, Error::Value(ref m) if m.contains("power_iters 65") && m.contains("64")), "{e}");
        let e = task_aware_basis(a.as_ref(), Mat::<f64>::identity(10, 10).as_ref(), &opts(2, 2, usize::MAX, 0));
        assert!(matches!(e, Err(Error::Value(_))));
        assert!(randomized_svd_dense(a.as_ref(), &opts(2, 2, MAX_POWER_ITERS, 0)).is_ok());
    }

    #[test]
    fn an_interrupt_stops_the_power_iterations() {
        // 2 + 2·20 products of 30 ms each: well past the 100 ms poll interval.
        let op = Phantom { rows: 200, cols: 100, delay_ms: 30 };
        let polls = std::sync::atomic::AtomicUsize::new(0);
        let interrupt = || {
            polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            true
        };
        let started = std::time::Instant::now();
        let e = randomized_svd_interruptible(&op, &opts(5, 5, 20, 0), &interrupt).unwrap_err();
        assert!(matches!(e, Error::Interrupted), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_millis(800), "{:?}", started.elapsed());
        assert_eq!(polls.load(std::sync::atomic::Ordering::Relaxed), 1);
        // A check that never fires changes nothing.
        let a = gaussian::<f64>(60, 40, 2);
        let o = opts(5, 5, 2, 0);
        let quiet = || false;
        let plain = randomized_svd_dense(a.as_ref(), &o).unwrap();
        let checked = randomized_svd_dense_interruptible(a.as_ref(), &o, &quiet).unwrap();
        assert!(plain.s == checked.s && plain.vt == checked.vt);
    }

    /// Singular values scale with the input and singular vectors do not, across the whole representable range,
    /// on both the range-finder and the exact path.
    #[test]
    fn results_are_scale_invariant() {
        let s: Vec<f64> = (0..40).map(|i| 0.8f64.powi(i)).collect();
        let a = with_spectrum(90, 60, &s, 3);
        for o in [opts(8, 6, 3, 1), opts(50, 10, 0, 1)] {
            // Directions past the 40 of the spectrum are rounding noise, different for every rounding of the input.
            let signal = o.rank.min(s.len());
            let a32 = Mat::from_fn(90, 60, |i, j| a[(i, j)] as f32);
            let base = randomized_svd_dense(a32.as_ref(), &o).unwrap();
            for f in [1e-30f32, 1e-25, 1.0, 1e25] {
                let scaled = Mat::from_fn(90, 60, |i, j| a32[(i, j)] * f);
                let got = randomized_svd_dense(scaled.as_ref(), &o).unwrap();
                for (i, (&g, &b)) in got.s.iter().zip(&base.s).enumerate() {
                    let rel = ((g / f) as f64 - b as f64).abs() / base.s[0] as f64;
                    assert!(rel < 1e-5, "f32 ×{f:e}, σ{i}: {} vs {b}", g / f);
                }
                let dv = (0..signal).flat_map(|i| (0..60).map(move |j| (i, j)));
                let err = dv.map(|(i, j)| (got.vt[(i, j)] - base.vt[(i, j)]).abs()).fold(0f32, f32::max);
                assert!(err < 1e-3, "f32 ×{f:e}: vt differs by {err}");
            }
            let base = randomized_svd_dense(a.as_ref(), &o).unwrap();
            for f in [1e-150f64, 1e154, 1e300] {
                let scaled = Mat::from_fn(90, 60, |i, j| a[(i, j)] * f);
                let got = randomized_svd_dense(scaled.as_ref(), &o).unwrap();
                for (i, (&g, &b)) in got.s.iter().zip(&base.s).enumerate() {
                    assert!((g / f - b).abs() < 1e-12 * base.s[0], "f64 ×{f:e}, σ{i}: {} vs {b}", g / f);
                }
                let dv = (0..signal).flat_map(|i| (0..60).map(move |j| (i, j)));
                let err = dv.map(|(i, j)| (got.vt[(i, j)] - base.vt[(i, j)]).abs()).fold(0f64, f64::max);
                assert!(err < 1e-9, "f64 ×{f:e}: vt differs by {err}");
            }
        }
    }

    /// Found by the rsvd fuzz target: finite entries whose spectral norm f32 cannot hold.
    #[test]
    fn a_norm_beyond_the_type_range_is_an_error() {
        let a = Mat::from_fn(6, 5, |_, _| 3e38f32);
        // The exact path materialises A exactly and finds the norm too large; the sketch overflows in A·Ω.
        let e = randomized_svd_dense(a.as_ref(), &opts(4, 1, 1, 0)).unwrap_err();
        assert!(matches!(e, Error::NonFinite(ref m) if m.contains("f32")), "{e}");
        let e = randomized_svd_dense(a.as_ref(), &opts(2, 1, 1, 0)).unwrap_err();
        assert!(matches!(e, Error::NonFinite(_)), "{e}");
        let half = Mat::from_fn(6, 5, |_, _| 3e37f32);
        assert!(randomized_svd_dense(half.as_ref(), &opts(2, 1, 1, 0)).unwrap().s[0].is_finite());
    }
}
