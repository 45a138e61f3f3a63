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

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::cholesky::llt::factor as llt;
use faer::linalg::householder;
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::qr::no_pivoting::factor as qr;
use faer::linalg::svd::{self as faer_svd, ComputeSvdVectors};
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::traits::RealField;
use faer::{Accum, Conj, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::threads;

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
struct Transposed<'a, Op: ?Sized>(&'a Op);

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

/// The truncated SVD of `op` by the randomized algorithm of the module documentation.
///
/// `u: [m, rank]`, `s` descending and non-negative, `vt: [rank, n]` with orthonormal rows. The result is a
/// deterministic function of the operator and `opts` (including the seed), independent of the thread count.
///
/// Errors: [`Error::Empty`] for a matrix with no rows or columns, [`Error::Rank`] unless
/// `1 ≤ rank ≤ min(m, n)`, [`Error::NonFinite`] when the operator's products are not finite, [`Error::Value`]
/// when the small SVD does not converge.
pub fn randomized_svd<T: Real, Op: LinearOperator<T> + ?Sized>(op: &Op, opts: &SvdOptions) -> Result<Svd<T>> {
    let (m, n) = (op.nrows(), op.ncols());
    check_rank(m, n, opts.rank)?;
    threads::run(|par| svd_on_pool(op, opts, true, par))
}

/// [`randomized_svd`] of an explicit matrix; also rejects NaN and infinity in `a` with [`Error::NonFinite`].
pub fn randomized_svd_dense<T: Real>(a: MatRef<'_, T>, opts: &SvdOptions) -> Result<Svd<T>> {
    check_rank(a.nrows(), a.ncols(), opts.rank)?;
    threads::run(|par| {
        check_finite(a, "matrix")?;
        svd_on_pool(&Dense { a }, opts, true, par)
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
/// or infinity, [`Error::Value`] when `C` is not symmetric to `1e-4 · max|C|`.
pub fn task_aware_basis<T: Real>(w: MatRef<'_, T>, c: MatRef<'_, T>, opts: &SvdOptions) -> Result<(Mat<T>, Vec<T>)> {
    let (d_out, d_in) = w.shape();
    if c.nrows() != c.ncols() || c.nrows() != d_in {
        return Err(Error::Shape(format!(
            "covariance must be [d_in, d_in] = [{d_in}, {d_in}] for a weight of shape [{d_out}, {d_in}], got [{}, {}]",
            c.nrows(),
            c.ncols()
        )));
    }
    check_rank(d_out, d_in, opts.rank)?;
    threads::run(|par| {
        check_finite(w, "weight")?;
        check_covariance(c)?;
        let svd = svd_on_pool(&WeightCovariance { w, c }, opts, false, par)?;
        Ok((svd.vt, svd.s))
    })
}

fn check_rank(m: usize, n: usize, rank: usize) -> Result<()> {
    if m == 0 || n == 0 {
        return Err(Error::Empty(format!("cannot decompose an empty {m}×{n} matrix")));
    }
    let max = m.min(n);
    if rank == 0 || rank > max {
        return Err(Error::Rank(format!("rank {rank} is outside 1..={max} for a {m}×{n} matrix")));
    }
    Ok(())
}

/// `a` as a view with unit row stride (of `a` itself or of `aᵀ`), so scans run in memory order; `true` if transposed.
fn unit_rows<T>(a: MatRef<'_, T>) -> (MatRef<'_, T>, bool) {
    if a.row_stride() != 1 && a.col_stride() == 1 {
        (a.transpose(), true)
    } else {
        (a, false)
    }
}

fn column_is_finite<T: Real>(v: MatRef<'_, T>, j: usize) -> bool {
    match v.col(j).try_as_col_major() {
        // No early exit: a branch-free fold vectorises.
        Some(col) => col.as_slice().iter().fold(true, |ok, x| ok & x.finite()),
        None => (0..v.nrows()).all(|i| v[(i, j)].finite()),
    }
}

fn check_finite<T: Real>(a: MatRef<'_, T>, name: &str) -> Result<()> {
    let (v, transposed) = unit_rows(a);
    let Some(j) = (0..v.ncols()).into_par_iter().with_min_len(16).find_first(|&j| !column_is_finite(v, j)) else {
        return Ok(());
    };
    let i = (0..v.nrows()).find(|&i| !v[(i, j)].finite()).unwrap_or(0);
    let (r, c) = if transposed { (j, i) } else { (i, j) };
    Err(Error::NonFinite(format!("{name} contains {} at ({r}, {c})", a[(r, c)].to_f64())))
}

/// Tile edge of the symmetry check: a 64 × 64 tile and the transposed copy of its mirror stay in L1.
const BLOCK: usize = 64;

/// Rejects a covariance with NaN/infinity or with `|C_ij − C_ji| > 1e-4 · max|C| + tiny`.
///
/// One pass over the tile pairs `(I, J)`, `I ≥ J`, of a unit-row-stride view (C and Cᵀ have the same asymmetry):
/// the mirror tile is transposed into a buffer so the comparison runs on contiguous, vectorisable columns. Only a
/// failure pays for a second pass that finds the place to report.
fn check_covariance<T: Real>(c: MatRef<'_, T>) -> Result<()> {
    let (v, transposed) = unit_rows(c);
    // A view with no unit stride at all (never produced by the bindings) is scanned from a compact copy.
    let owned;
    let v = if v.row_stride() == 1 {
        v
    } else {
        owned = v.to_owned();
        owned.as_ref()
    };
    let d = v.nrows();
    let blocks = d.div_ceil(BLOCK);
    let zero = T::from_f64(0.0);
    let column = |j: usize, i0: usize, len: usize| -> &[T] {
        v.col(j).subrows(i0, len).try_as_col_major().expect("unit row stride").as_slice()
    };
    // Per-lane accumulators: a single running max is a loop-carried select chain that does not vectorise.
    // Non-finite entries need no test of their own: they make `|x − y|` infinite or NaN, and NaN is kept.
    const LANES: usize = 16;
    #[derive(Clone, Copy)]
    struct Lanes<T> {
        abs: [T; LANES],
        diff: [T; LANES],
    }
    #[inline(always)]
    #[allow(clippy::eq_op)]
    fn update<T: Real>(acc: &mut Lanes<T>, l: usize, x: T, y: T) {
        let (ax, ay, dxy) = (x.magnitude(), y.magnitude(), (x - y).magnitude());
        let m = if ay > ax { ay } else { ax };
        acc.abs[l] = if m > acc.abs[l] { m } else { acc.abs[l] };
        acc.diff[l] = if dxy > acc.diff[l] || dxy != dxy { dxy } else { acc.diff[l] };
    }
    // (max |C|, max |C_ij − C_ji|, all finite) over the tile pairs of column block bj.
    let scan_column_block = |bj: usize, mirror: &mut Vec<T>| {
        mirror.resize(BLOCK * BLOCK, zero);
        let mut acc = Lanes { abs: [zero; LANES], diff: [zero; LANES] };
        let (j0, jb) = (bj * BLOCK, BLOCK.min(d - bj * BLOCK));
        for bi in bj..blocks {
            let (i0, ib) = (bi * BLOCK, BLOCK.min(d - bi * BLOCK));
            // The upper tiles are 64 short column pieces a page apart each, which no hardware prefetcher follows:
            // ask for the next one while this one is compared.
            #[cfg(target_arch = "x86_64")]
            if bi + 1 < blocks {
                let next = (bi + 1) * BLOCK;
                let per_line = 64 / core::mem::size_of::<T>();
                for ii in 0..BLOCK.min(d - next) {
                    let top = v.ptr_at(j0, next + ii);
                    for r in (0..jb).step_by(per_line) {
                        // SAFETY: a prefetch is only a hint, and the address is inside column next + ii anyway.
                        unsafe {
                            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(top.add(r).cast())
                        };
                    }
                }
            }
            // mirror[jj·BLOCK + ii] = C[j0 + jj, i0 + ii], read down the columns of the upper tile.
            if !transpose_tile_fast(v, i0, j0, ib, jb, mirror) {
                for ii in 0..ib {
                    for (jj, &x) in column(i0 + ii, j0, jb).iter().enumerate() {
                        mirror[jj * BLOCK + ii] = x;
                    }
                }
            }
            for jj in 0..jb {
                let lower = column(j0 + jj, i0, ib);
                let upper = &mirror[jj * BLOCK..jj * BLOCK + ib];
                if let (Ok(lower), Ok(upper)) = (<&[T; BLOCK]>::try_from(lower), <&[T; BLOCK]>::try_from(upper)) {
                    // Full tile: fixed trip counts, so the whole column compare unrolls into vector code.
                    for c in 0..BLOCK / LANES {
                        for l in 0..LANES {
                            update(&mut acc, l, lower[c * LANES + l], upper[c * LANES + l]);
                        }
                    }
                } else {
                    for (r, (&x, &y)) in lower.iter().zip(upper).enumerate() {
                        update(&mut acc, r % LANES, x, y);
                    }
                }
            }
        }
        let max_abs = acc.abs.iter().fold(0f64, |m, x| m.max(x.to_f64()));
        let diffs = acc.diff.map(|x| x.to_f64());
        let finite = diffs.iter().all(|x| x.is_finite());
        (max_abs, diffs.iter().fold(0f64, |m, &x| m.max(x)), finite)
    };
    // Column block bj holds blocks − bj tile pairs: split down to single blocks so idle threads can steal.
    let (max_abs, max_diff, finite) = (0..blocks)
        .into_par_iter()
        .with_max_len(1)
        .map_init(Vec::new, |mirror, bj| scan_column_block(bj, mirror))
        .reduce(|| (0.0, 0.0, true), |a, b| (a.0.max(b.0), a.1.max(b.1), a.2 & b.2));
    if !finite {
        check_finite(c, "covariance")?;
    }
    let tolerance = 1e-4 * max_abs + f64::from(f32::MIN_POSITIVE);
    if max_diff > tolerance {
        let (i, j) = (0..d)
            .flat_map(|j| (j..d).map(move |i| (i, j)))
            .find(|&(i, j)| (v[(i, j)].to_f64() - v[(j, i)].to_f64()).abs() > tolerance)
            .map(|(i, j)| if transposed { (j, i) } else { (i, j) })
            .unwrap_or((0, 0));
        return Err(Error::Value(format!(
            "covariance is not symmetric: |C[{i}, {j}] − C[{j}, {i}]| = {:e} exceeds 1e-4 · max|C| = {:e}",
            (c[(i, j)].to_f64() - c[(j, i)].to_f64()).abs(),
            1e-4 * max_abs
        )));
    }
    Ok(())
}

/// `mirror[jj·BLOCK + ii] = v[j0 + jj, i0 + ii]` for a full f32 tile with AVX-512 16 × 16 transposes (the scalar
/// copy is most of the symmetry check's time); `false` where it does not apply.
fn transpose_tile_fast<T: 'static>(
    v: MatRef<'_, T>,
    i0: usize,
    j0: usize,
    ib: usize,
    jb: usize,
    mirror: &mut [T],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if core::any::TypeId::of::<T>() == core::any::TypeId::of::<f32>()
        && ib == BLOCK
        && jb == BLOCK
        && v.row_stride() == 1
        && sgemm::avx512()
    {
        let src = v.ptr_at(j0, i0) as *const f32;
        let dst = mirror.as_mut_ptr() as *mut f32;
        for bi in (0..BLOCK).step_by(16) {
            for bj in (0..BLOCK).step_by(16) {
                // SAFETY: T is f32; rows j0..j0+64 and columns i0..i0+64 are inside `v` (full tile), and the
                // 64 × 64 buffer holds the destination block.
                unsafe {
                    sgemm::transpose16(
                        src.offset(bj as isize + bi as isize * v.col_stride()),
                        v.col_stride(),
                        dst.add(bj * BLOCK + bi),
                        BLOCK,
                    )
                };
            }
        }
        return true;
    }
    let _ = (v, i0, j0, ib, jb, mirror);
    false
}

/// Runs on the core's pool, after validation. `want_u = false` leaves `u` empty (`[m, 0]`): the basis needs
/// only `V`, and skipping `U` saves a product and its re-orthonormalisation.
fn svd_on_pool<T: Real, Op: LinearOperator<T> + ?Sized>(
    op: &Op,
    opts: &SvdOptions,
    want_u: bool,
    par: Par,
) -> Result<Svd<T>> {
    let (m, n) = (op.nrows(), op.ncols());
    let small = m.min(n);
    let k = opts.rank.saturating_add(opts.oversample).min(small);
    // Singular vectors as columns until the very end: polishing and sign fixing read them contiguously.
    let Factors { mut u, s, mut v } = if k >= small {
        exact_svd(op, par)?
    } else if m >= n {
        range_finder_svd(op, k, opts, want_u, par)?
    } else {
        let t = range_finder_svd(&Transposed(op), k, opts, true, par)?;
        Factors { u: t.v, s: t.s, v: t.u }
    };
    let rank = opts.rank;
    u = if want_u { polish_columns(u.subcols(0, rank), par) } else { Mat::zeros(m, 0) };
    v = polish_columns(v.subcols(0, rank), par);
    fix_signs(u.as_mut(), v.as_mut());
    Ok(Svd { u, s: s[..rank].to_vec(), vt: v.transpose().to_owned() })
}

/// A thin SVD with both factors as columns: `u: [m, k]`, `v: [n, k]`.
struct Factors<T> {
    u: Mat<T>,
    s: Vec<T>,
    v: Mat<T>,
}

/// Exact thin SVD of the materialised operator. The cheaper of `A·I` and `Aᵀ·I` is the one with the smaller
/// identity.
fn exact_svd<T: Real, Op: LinearOperator<T> + ?Sized>(op: &Op, par: Par) -> Result<Factors<T>> {
    let (m, n) = (op.nrows(), op.ncols());
    m.checked_mul(n).ok_or_else(|| Error::Value(format!("a {m}×{n} matrix does not fit in memory")))?;
    let mut full = Mat::<T>::zeros(m, n);
    if n <= m {
        op.apply(full.as_mut(), Mat::<T>::identity(n, n).as_ref(), par);
    } else {
        let mut t = Mat::<T>::zeros(n, m);
        op.apply_transpose(t.as_mut(), Mat::<T>::identity(m, m).as_ref(), par);
        full.copy_from(t.transpose());
    }
    ensure_finite(full.as_ref())?;
    thin_svd(full.as_ref(), par)
}

/// `A = U diag(s) Vᵀ` with `U: [m, min]`, `V: [n, min]`, by faer with the caller's parallelism.
fn thin_svd<T: Real>(a: MatRef<'_, T>, par: Par) -> Result<Factors<T>> {
    let (m, n) = a.shape();
    let size = m.min(n);
    let mut u = Mat::<T>::zeros(m, size);
    let mut v = Mat::<T>::zeros(n, size);
    let mut s = faer::diag::Diag::<T>::zeros(size);
    let req =
        faer_svd::svd_scratch::<T>(m, n, ComputeSvdVectors::Thin, ComputeSvdVectors::Thin, par, Default::default());
    let mut mem = MemBuffer::new(req);
    faer_svd::svd(a, s.as_mut(), Some(u.as_mut()), Some(v.as_mut()), par, MemStack::new(&mut mem), Default::default())
        .map_err(|_| Error::Value(format!("the SVD of a {m}×{n} matrix did not converge")))?;
    let s = (0..size).map(|i| s[i]).collect();
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
    fn new(rows: usize, k: usize) -> Self {
        let bs = qr::recommended_block_size::<T>(rows, k);
        Self {
            coeff: Mat::zeros(bs, k),
            q: Mat::zeros(rows, k),
            wide: Mat::zeros(rows, k),
            wide_next: Mat::zeros(rows, k),
            gram: Mat::zeros(k, k),
            inverse: Mat::zeros(k, k),
        }
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
) -> Result<Factors<T>> {
    let (p, q) = (op.nrows(), op.ncols());
    // y: the range basis, [p, k]; z: the co-range block, [q, k]. The test matrix lives in z first.
    let mut y = Mat::<T>::zeros(p, k);
    let mut z = gaussian::<T>(q, k, opts.seed);
    let mut orth_p = Orthonormalizer::<T>::new(p, k);
    let mut orth_q = Orthonormalizer::<T>::new(q, k);
    let mut mem = MemBuffer::new(StackReq::any_of(&[orth_p.scratch(par), orth_q.scratch(par)]));
    let stack = MemStack::new(&mut mem);

    op.apply(y.as_mut(), z.as_ref(), par);
    // A broken operator is caught here, before it costs 2q + 1 more products.
    ensure_finite(y.as_ref())?;
    orth_p.orthonormalize(&mut y, par, stack);
    for _ in 0..opts.power_iters {
        op.apply_transpose(z.as_mut(), y.as_ref(), par);
        orth_q.orthonormalize(&mut z, par, stack);
        op.apply(y.as_mut(), z.as_ref(), par);
        orth_p.orthonormalize(&mut y, par, stack);
    }
    // z = Aᵀ Q = Bᵀ: its SVD z = Uz Σ Vzᵀ gives A ≈ Q B = (Q Vz) Σ Uzᵀ.
    op.apply_transpose(z.as_mut(), y.as_ref(), par);
    ensure_finite(z.as_ref())?;
    let Factors { u: uz, s, v: vz } = thin_svd(z.as_ref(), par)?;
    let u = if want_u {
        let mut u = Mat::<T>::zeros(p, k);
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
fn polish_columns<T: Real>(x: MatRef<'_, T>, par: Par) -> Mat<T> {
    let mut out = x.to_owned();
    let (n, r) = out.shape();
    if n == 0 || r == 0 {
        return out;
    }
    let mut orth = Orthonormalizer::<T>::new(n, r);
    let mut mem = MemBuffer::new(orth.scratch(par));
    orth.orthonormalize(&mut out, par, MemStack::new(&mut mem));
    out
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

/// A `[rows, cols]` standard Gaussian matrix; column `j` is its own stream seeded from `(seed, j)`, so it can be
/// filled in parallel and still not depend on the thread count.
fn gaussian<T: Real>(rows: usize, cols: usize, seed: u64) -> Mat<T> {
    let mut out = Mat::<T>::zeros(rows, cols);
    let base = splitmix64(seed);
    out.as_mut().par_col_chunks_mut(1).enumerate().for_each(|(j, mut col)| {
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
    out
}

/// `out = a · x` for the two products the operators need, through the f32 AVX-512 kernel when it applies.
fn product<T: Real>(mut out: MatMut<'_, T>, a: MatRef<'_, T>, x: MatRef<'_, T>, par: Par) {
    #[cfg(target_arch = "x86_64")]
    if core::any::TypeId::of::<T>() == core::any::TypeId::of::<f32>() && sgemm::try_matmul(out.rb_mut(), a, x, par) {
        return;
    }
    matmul(out, Accum::Replace, a, x, T::from_f64(1.0), par);
}

/// A single-precision matrix product specialised for the shapes of a randomized SVD: a large `a: [m, k]` times a
/// skinny `x: [k, n]` (`n` = rank + oversampling, about 138).
///
/// These products are 80–90% of the time of `task_aware_basis`. faer's general kernel, tuned for squarer shapes,
/// gets 125–150 GFLOP/s per Sapphire Rapids core on them; this one 150–170 with a row-major and 110–125 with a
/// column-major `a` (about 300 and 230 on two cores, against ~200 for faer). One 8 × 48 register tile (24 zmm accumulators) does `acc[c][·] += panel[k][·] · b_c[k]`: 48 lanes come from a
/// packed panel, 8 scalars are broadcast from 8 unit-stride streams. Which matrix plays which role follows `a`'s
/// layout, so the big matrix is always read in its storage order and never transposed:
///
/// - `a` row-major (numpy's `W`, `C`): the 8 broadcast streams are 8 rows of `a`, the packed panels hold `x`
///   (packed once per product). Each 8-row tile of `out` goes through a row-major scratch block, then is copied.
/// - `a` column-major (`Wᵀ` of a row-major `W`): the packed panels hold 48-row slabs of `a`, the broadcast streams
///   are 8 columns of `x`, and tiles land straight in a column-major `out`.
///
/// Each output element is accumulated by one thread in a fixed order, so results do not depend on the thread
/// count. Returns `false` (and does nothing) where it does not apply, for the caller to use faer instead.
#[cfg(target_arch = "x86_64")]
// The AVX-512 intrinsics are stable since Rust 1.89 (faer itself needs 1.84).
#[clippy::msrv = "1.89"]
mod sgemm {
    use core::arch::x86_64::*;
    use std::sync::OnceLock;

    use faer::{MatMut, MatRef, Par};
    use rayon::prelude::*;

    /// Broadcast streams per tile.
    const NB: usize = 8;
    /// Lanes per packed panel: three zmm vectors.
    const PANEL: usize = 48;
    /// Depth of a block. A packed panel (`KC × 48` f32: 36 KiB row-major, 24 KiB column-major) stays in the
    /// 48 KiB L1 while the broadcast streams pass it; measured best among 64–256 on Sapphire Rapids.
    const KC_ROW: usize = 192;
    const KC_COL: usize = 128;
    /// Rows of `out` per task in the row-major driver; the scratch block (`MC × n`) and the `MC × KC` slice of
    /// `a` stay in L2.
    const MC_ROW: usize = 256;
    /// 48-row slabs per task in the column-major driver (192 rows: 22 tasks at 4096 rows split evenly over 2).
    const SLABS: usize = 4;
    /// Below this many multiply-adds the packing does not pay off.
    const MIN_WORK: usize = 1 << 22;

    pub(super) fn avx512() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }

    pub(super) fn try_matmul<T: 'static>(out: MatMut<'_, T>, a: MatRef<'_, T>, x: MatRef<'_, T>, par: Par) -> bool {
        if core::any::TypeId::of::<T>() != core::any::TypeId::of::<f32>() || !avx512() {
            return false;
        }
        let (m, k) = a.shape();
        let n = x.ncols();
        // What faer's matmul would assert; here it also guards the raw-pointer kernel against bad shapes.
        assert!(x.nrows() == k && out.nrows() == m && out.ncols() == n, "matrix product shapes do not match");
        if m.saturating_mul(n).saturating_mul(k) < MIN_WORK || n < 16 || m < PANEL {
            return false;
        }
        // SAFETY: T is f32 (checked above), so the pointers point at f32 data with the given shapes and strides.
        let a = Strided { ptr: a.as_ptr() as *const f32, rs: a.row_stride(), cs: a.col_stride() };
        let x = Strided { ptr: x.as_ptr() as *const f32, rs: x.row_stride(), cs: x.col_stride() };
        let o = StridedMut { ptr: out.as_ptr_mut() as *mut f32, rs: out.row_stride(), cs: out.col_stride() };
        let threads = par.degree();
        if a.cs == 1 && a.rs >= 1 {
            // SAFETY: shapes and strides come from valid faer views; the kernel is gated on AVX-512F.
            unsafe { row_major(o, a, x, m, k, n, threads) };
            true
        } else if a.rs == 1 && a.cs >= 1 && x.rs == 1 && x.cs >= 1 && o.rs == 1 && o.cs >= 1 {
            // SAFETY: as above.
            unsafe { col_major(o, a, x, m, k, n, threads) };
            true
        } else {
            false
        }
    }

    /// `dst[r·ld_dst + c] = src[c·ld_src + r]` for a 16 × 16 block: `src` holds 16 columns (16 contiguous floats each,
    /// `ld_src` apart), `dst` receives them as 16 rows. The standard unpack / shuffle network.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose16(src: *const f32, ld_src: isize, dst: *mut f32, ld_dst: usize) {
        let r: [__m512; 16] = core::array::from_fn(|i| _mm512_loadu_ps(src.offset(i as isize * ld_src)));
        let t: [__m512; 16] = core::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        // u[4g + 0..4] from t[4g + 0..4]: 64-bit interleaves of (t0, t2) and (t1, t3).
        let u: [__m512; 16] = core::array::from_fn(|i| {
            let g = i & !3;
            let (a, b) = match i % 4 {
                0 | 1 => (t[g], t[g + 2]),
                _ => (t[g + 1], t[g + 3]),
            };
            let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
            _mm512_castpd_ps(if i % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) })
        });
        // 128-bit lanes: v[8h + j] pairs u[8h + j] with u[8h + 4 + j] (even lanes for j < 4, odd lanes after).
        let v: [__m512; 16] = core::array::from_fn(|i| {
            let (h, j) = (i & !7, i % 8);
            let (a, b) = (u[h + j % 4], u[h + 4 + j % 4]);
            if j < 4 {
                _mm512_shuffle_f32x4::<0x88>(a, b)
            } else {
                _mm512_shuffle_f32x4::<0xdd>(a, b)
            }
        });
        for i in 0..16 {
            let (a, b) = (v[i % 8], v[8 + i % 8]);
            let row = if i < 8 { _mm512_shuffle_f32x4::<0x88>(a, b) } else { _mm512_shuffle_f32x4::<0xdd>(a, b) };
            _mm512_storeu_ps(dst.add(i * ld_dst), row);
        }
    }

    #[derive(Clone, Copy)]
    struct Strided {
        ptr: *const f32,
        rs: isize,
        cs: isize,
    }
    // SAFETY: only ever read, from views the caller keeps alive for the whole product.
    unsafe impl Send for Strided {}
    unsafe impl Sync for Strided {}

    impl Strided {
        #[inline(always)]
        unsafe fn at(&self, i: usize, j: usize) -> *const f32 {
            self.ptr.offset(i as isize * self.rs + j as isize * self.cs)
        }
    }

    #[derive(Clone, Copy)]
    struct StridedMut {
        ptr: *mut f32,
        rs: isize,
        cs: isize,
    }
    // SAFETY: parallel tasks write disjoint row ranges.
    unsafe impl Send for StridedMut {}
    unsafe impl Sync for StridedMut {}

    impl StridedMut {
        #[inline(always)]
        unsafe fn at(&self, i: usize, j: usize) -> *mut f32 {
            self.ptr.offset(i as isize * self.rs + j as isize * self.cs)
        }
    }

    /// `(first lane, width)` of the packed panels covering `len` lanes: 48 wide, the last one rounded up to 16.
    fn panels(len: usize) -> Vec<(usize, usize)> {
        (0..len.div_ceil(PANEL)).map(|p| (p * PANEL, (len - p * PANEL).min(PANEL).next_multiple_of(16))).collect()
    }

    /// `tile[c][0..16·VR] (+)= Σ_k panel[k][0..16·VR] · b[c][k]` for `c < NB`; `tile` rows are `ldt` apart.
    /// With `PF`, also prefetches one cache line of each stream `pf[c]` every 16 steps (the next tile's rows).
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const VR: usize, const PF: bool>(
        kc: usize,
        panel: *const f32,
        b: &[*const f32; NB],
        pf: &[*const f32; NB],
        tile: *mut f32,
        ldt: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); VR]; NB];
        if accumulate {
            for (c, row) in acc.iter_mut().enumerate() {
                for (v, r) in row.iter_mut().enumerate() {
                    *r = _mm512_loadu_ps(tile.add(c * ldt + 16 * v));
                }
            }
        }
        let mut p = panel;
        let step = |k: usize, p: *const f32, acc: &mut [[__m512; VR]; NB]| {
            let lanes: [__m512; VR] = core::array::from_fn(|v| _mm512_loadu_ps(p.add(16 * v)));
            for (c, row) in acc.iter_mut().enumerate() {
                let bc = _mm512_set1_ps(*b[c].add(k));
                for (r, l) in row.iter_mut().zip(lanes.iter()) {
                    *r = _mm512_fmadd_ps(*l, bc, *r);
                }
            }
        };
        let mut k = 0;
        if PF {
            while k + 16 <= kc {
                for s in pf {
                    _mm_prefetch::<_MM_HINT_T0>(s.add(k) as *const i8);
                }
                for kk in k..k + 16 {
                    step(kk, p, &mut acc);
                    p = p.add(16 * VR);
                }
                k += 16;
            }
        }
        while k < kc {
            step(k, p, &mut acc);
            p = p.add(16 * VR);
            k += 1;
        }
        for (c, row) in acc.iter().enumerate() {
            for (v, r) in row.iter().enumerate() {
                _mm512_storeu_ps(tile.add(c * ldt + 16 * v), *r);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel_any(
        vr: usize,
        kc: usize,
        panel: *const f32,
        b: &[*const f32; NB],
        pf: Option<&[*const f32; NB]>,
        tile: *mut f32,
        ldt: usize,
        accumulate: bool,
    ) {
        match (vr, pf) {
            (3, Some(pf)) => kernel::<3, true>(kc, panel, b, pf, tile, ldt, accumulate),
            (3, None) => kernel::<3, false>(kc, panel, b, b, tile, ldt, accumulate),
            (2, Some(pf)) => kernel::<2, true>(kc, panel, b, pf, tile, ldt, accumulate),
            (2, None) => kernel::<2, false>(kc, panel, b, b, tile, ldt, accumulate),
            (_, Some(pf)) => kernel::<1, true>(kc, panel, b, pf, tile, ldt, accumulate),
            (_, None) => kernel::<1, false>(kc, panel, b, b, tile, ldt, accumulate),
        }
    }

    fn run_blocks(blocks: usize, threads: usize, f: impl Fn(usize, &mut Vec<f32>) + Sync + Send) {
        if threads <= 1 {
            let mut scratch = Vec::new();
            (0..blocks).for_each(|b| f(b, &mut scratch));
        } else {
            (0..blocks).into_par_iter().with_min_len(1).for_each_init(Vec::new, |scratch, b| f(b, scratch));
        }
    }

    /// `a` row-major: broadcast 8 rows of `a`, panels of packed `x`.
    #[target_feature(enable = "avx512f")]
    unsafe fn row_major(out: StridedMut, a: Strided, x: Strided, m: usize, k: usize, n: usize, threads: usize) {
        let panels = panels(n);
        let (kc_row, mc_row) = (KC_ROW, MC_ROW);
        let npad: usize = panels.iter().map(|p| p.1).sum();
        // packed[pc·npad + kc·lane0 + kk·w + l] = x[pc + kk, lane0 + l] (zero past n): depth block pc, panel at lane0.
        let mut packed = vec![0f32; k * npad];
        let pack_block = |pc: usize, block: &mut [f32]| {
            let kc = kc_row.min(k - pc);
            for &(lane0, w) in &panels {
                let dst = &mut block[kc * lane0..kc * (lane0 + w)];
                for l in 0..w.min(n.saturating_sub(lane0)) {
                    for kk in 0..kc {
                        dst[kk * w + l] = *x.at(pc + kk, lane0 + l);
                    }
                }
            }
        };
        if threads <= 1 {
            packed.chunks_mut(kc_row * npad).enumerate().for_each(|(b, blk)| pack_block(b * kc_row, blk));
        } else {
            packed.par_chunks_mut(kc_row * npad).enumerate().for_each(|(b, blk)| pack_block(b * kc_row, blk));
        }
        let zeros = vec![0f32; k];
        let packed = Strided { ptr: packed.as_ptr(), rs: 0, cs: 1 };
        let zero = Strided { ptr: zeros.as_ptr(), rs: 0, cs: 1 };
        run_blocks(m.div_ceil(mc_row), threads, |blk, tmp| {
            let i0 = blk * mc_row;
            let mb = mc_row.min(m - i0);
            let tiles = mb.div_ceil(NB);
            tmp.clear();
            tmp.resize(tiles * NB * npad, 0.0);
            let mut pc = 0;
            while pc < k {
                let kc = kc_row.min(k - pc);
                let rows = |t: usize| -> [*const f32; NB] {
                    core::array::from_fn(|c| {
                        let i = i0 + t * NB + c;
                        if i < m {
                            a.at(i, pc)
                        } else {
                            zero.at(0, pc)
                        }
                    })
                };
                // Panel-outer: one panel (kc × 48) stays in L1 while all tiles of the block stream their rows past it.
                for (q, &(lane0, w)) in panels.iter().enumerate() {
                    let panel = packed.at(0, pc * npad + kc * lane0);
                    for t in 0..tiles {
                        let b = rows(t);
                        // The first pass brings the next tile's rows in from memory while this one computes.
                        let next = if t + 1 < tiles { rows(t + 1) } else { b };
                        let pf = if q == 0 && t + 1 < tiles { Some(&next) } else { None };
                        let tile = tmp.as_mut_ptr().add(t * NB * npad + lane0);
                        kernel_any(w / 16, kc, panel, &b, pf, tile, npad, pc > 0);
                    }
                }
                pc += kc;
            }
            for j in 0..n {
                for r in 0..mb {
                    *out.at(i0 + r, j) = tmp[r * npad + j];
                }
            }
        });
    }

    /// `a` column-major: panels of packed 48-row slabs of `a`, broadcast 8 columns of `x`; `x`, `out` column-major.
    #[target_feature(enable = "avx512f")]
    unsafe fn col_major(out: StridedMut, a: Strided, x: Strided, m: usize, k: usize, n: usize, threads: usize) {
        let zeros = vec![0f32; k];
        let zero = Strided { ptr: zeros.as_ptr(), rs: 0, cs: 1 };
        let (kc_col, slabs_n) = (KC_COL, SLABS);
        let block_rows = slabs_n * PANEL;
        run_blocks(m.div_ceil(block_rows), threads, |blk, scratch| {
            let i0 = blk * block_rows;
            let slabs = panels(block_rows.min(m - i0));
            scratch.clear();
            scratch.resize(slabs_n * kc_col * PANEL + NB * PANEL, 0.0);
            let (pack, spill) = scratch.split_at_mut(slabs_n * kc_col * PANEL);
            let mut pc = 0;
            while pc < k {
                let kc = kc_col.min(k - pc);
                // pack[s][kk][l] = a[i0 + lane0_s + l, pc + kk] (zero past m). Usually already in L2: see below.
                for kk in 0..kc {
                    for (s, &(lane0, w)) in slabs.iter().enumerate() {
                        let dst = pack.as_mut_ptr().add(s * kc_col * PANEL + kk * w);
                        let src = a.at(i0 + lane0, pc + kk);
                        let rows = (m - i0 - lane0).min(w);
                        for v in 0..w / 16 {
                            // Masked past the last row, so the padding lanes are zero and nothing past `a` is read.
                            let valid = rows.saturating_sub(16 * v).min(16);
                            let mask: __mmask16 = if valid == 16 { 0xFFFF } else { (1u16 << valid) - 1 };
                            _mm512_storeu_ps(dst.add(16 * v), _mm512_maskz_loadu_ps(mask, src.add(16 * v)));
                        }
                    }
                }
                // Every column of the block is a separate page, which no hardware prefetcher follows, and packing
                // from memory would stall the core for a fifth of the time. So the kernels below spread prefetches
                // of the next block (the next depth range, or the next rows) into L2 between their calls.
                let (next_i0, next_pc) = if pc + kc < k { (i0, pc + kc) } else { (i0 + block_rows, 0) };
                let next_rows = block_rows.min(m.saturating_sub(next_i0));
                let next_cols = kc_col.min(k - next_pc);
                let lines_per_col = next_rows.div_ceil(16);
                let total_lines = if next_rows > 0 { lines_per_col * next_cols } else { 0 };
                let calls = slabs.len() * n.div_ceil(NB);
                let per_call = total_lines.div_ceil(calls.max(1));
                let mut cursor = 0;
                // Slab-outer: one packed slab (kc × 48) stays in L1 while the columns of x stream past it.
                for (s, &(lane0, w)) in slabs.iter().enumerate() {
                    for j0 in (0..n).step_by(NB) {
                        let cols = NB.min(n - j0);
                        let b: [*const f32; NB] =
                            core::array::from_fn(|c| if c < cols { x.at(pc, j0 + c) } else { zero.at(0, pc) });
                        let rows = (m - i0 - lane0).min(w);
                        let panel = pack.as_ptr().add(s * kc_col * PANEL);
                        for line in cursor..(cursor + per_call).min(total_lines) {
                            let (col, piece) = (line / lines_per_col, line % lines_per_col);
                            _mm_prefetch::<_MM_HINT_T1>(a.at(next_i0 + 16 * piece, next_pc + col) as *const i8);
                        }
                        cursor += per_call;
                        if rows == w && cols == NB {
                            kernel_any(w / 16, kc, panel, &b, None, out.at(i0 + lane0, j0), out.cs as usize, pc > 0);
                        } else {
                            // Edge tile: through a spill buffer so nothing outside `out` is touched.
                            for c in 0..NB {
                                for r in 0..w {
                                    spill[c * PANEL + r] = if pc > 0 && c < cols && r < rows {
                                        *out.at(i0 + lane0 + r, j0 + c)
                                    } else {
                                        0.0
                                    };
                                }
                            }
                            kernel_any(w / 16, kc, panel, &b, None, spill.as_mut_ptr(), PANEL, pc > 0);
                            for c in 0..cols {
                                for r in 0..rows {
                                    *out.at(i0 + lane0 + r, j0 + c) = spill[c * PANEL + r];
                                }
                            }
                        }
                    }
                }
                pc += kc;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(rank: usize, oversample: usize, power_iters: usize, seed: u64) -> SvdOptions {
        SvdOptions { rank, oversample, power_iters, seed }
    }

    fn orthonormal(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
        let g = gaussian::<f64>(rows, cols, seed);
        g.qr().compute_thin_Q()
    }

    /// `U diag(s) Vᵀ` with Haar-like random `U`, `V` and the given spectrum.
    fn with_spectrum(m: usize, n: usize, s: &[f64], seed: u64) -> Mat<f64> {
        let r = s.len();
        let u = orthonormal(m, r, seed);
        let v = orthonormal(n, r, seed.wrapping_add(1));
        let us = Mat::from_fn(m, r, |i, j| u[(i, j)] * s[j]);
        &us * v.transpose()
    }

    fn exact(a: MatRef<'_, f64>) -> (Mat<f64>, Vec<f64>, Mat<f64>) {
        let Factors { u, s, v } = thin_svd(a, Par::Seq).unwrap();
        (u, s, v)
    }

    fn max_abs(a: MatRef<'_, f64>) -> f64 {
        let mut m = 0.0f64;
        for j in 0..a.ncols() {
            for i in 0..a.nrows() {
                m = m.max(a[(i, j)].abs());
            }
        }
        m
    }

    /// `max |X Xᵀ − I|` over the rows of `x`.
    fn row_orthonormality_error<T: Real>(x: MatRef<'_, T>) -> f64 {
        let xd = Mat::from_fn(x.nrows(), x.ncols(), |i, j| x[(i, j)].to_f64());
        let g = &xd * xd.transpose();
        max_abs((g - Mat::<f64>::identity(x.nrows(), x.nrows())).as_ref())
    }

    /// `‖A V‖²_F`: the energy of `A` captured by the row space spanned by `vt`.
    fn captured(a: MatRef<'_, f64>, vt: MatRef<'_, f64>) -> f64 {
        (a * vt.transpose()).squared_norm_l2()
    }

    fn check_against_exact(a: &Mat<f64>, rank: usize, o: SvdOptions, s_tol: f64, energy_tol: f64) {
        let svd = randomized_svd_dense(a.as_ref(), &o).unwrap();
        let (m, n) = a.shape();
        assert_eq!(svd.u.shape(), (m, rank));
        assert_eq!(svd.vt.shape(), (rank, n));
        assert_eq!(svd.s.len(), rank);
        let (_, s_exact, _) = exact(a.as_ref());
        let scale = s_exact[0].max(f64::MIN_POSITIVE);
        for (i, (&got, &want)) in svd.s.iter().zip(&s_exact).enumerate() {
            assert!((got - want).abs() <= s_tol * scale, "σ{i}: {got} vs exact {want}");
        }
        assert!(svd.s.windows(2).all(|p| p[1] <= p[0]));
        assert!(row_orthonormality_error(svd.vt.as_ref()) < 1e-10);
        assert!(row_orthonormality_error(svd.u.transpose()) < 1e-10);
        let top: f64 = s_exact[..rank].iter().map(|x| x * x).sum();
        if top > 0.0 {
            let got = captured(a.as_ref(), svd.vt.as_ref());
            assert!(got >= (1.0 - energy_tol) * top, "captured {got} of {top}");
        }
        // U and V diagonalise A exactly on the subspaces they span: Uᵀ A V = diag(s), since Uᵀ A V = Ũᵀ B Ṽ.
        let core = svd.u.transpose() * a * svd.vt.transpose();
        let diag = Mat::from_fn(rank, rank, |i, j| if i == j { svd.s[i] } else { 0.0 });
        assert!(max_abs((core - diag).as_ref()) <= 1e-10 * scale.max(1.0));
    }

    /// The AVX-512 product against faer's on both layouts, with every kind of edge (rows, columns and depth that
    /// are not multiples of the tile, panel and block sizes), sequential and parallel.
    #[test]
    fn f32_kernel_matches_faer() {
        for &(m, k, n) in &[(203usize, 1100usize, 37usize), (500, 300, 138), (48, 2100, 60), (1000, 300, 16)] {
            let a = gaussian::<f32>(m, k, 1);
            let a_row = a.transpose().to_owned();
            let x = gaussian::<f32>(k, n, 2);
            let mut expected = Mat::<f32>::zeros(m, n);
            matmul(expected.as_mut(), Accum::Replace, a.as_ref(), x.as_ref(), 1.0, Par::Seq);
            for a_view in [a.as_ref(), a_row.transpose()] {
                for par in [Par::Seq, Par::rayon(3)] {
                    let mut got = Mat::<f32>::from_fn(m, n, |_, _| f32::NAN);
                    product(got.as_mut(), a_view, x.as_ref(), par);
                    let err = (0..n)
                        .flat_map(|j| (0..m).map(move |i| (i, j)))
                        .map(|(i, j)| (got[(i, j)] - expected[(i, j)]).abs())
                        .fold(0f32, f32::max);
                    assert!(err < 1e-3 * (k as f32).sqrt(), "{m}x{k}x{n}: max error {err}");
                }
            }
        }
    }

    /// `max |QᵀQ − I|` and the relative residual `‖Y − Q Qᵀ Y‖ / ‖Y‖` of an orthonormalised block.
    fn orthonormalize_check<T: Real>(y: &Mat<T>) -> (f64, f64) {
        let mut q = y.clone();
        let (rows, k) = y.shape();
        let mut orth = Orthonormalizer::<T>::new(rows, k);
        let mut mem = MemBuffer::new(orth.scratch(Par::Seq));
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

    /// Timing on the benchmark shapes (`cargo test --release -p lowrank-core rsvd::tests::bench -- --ignored
    /// --nocapture`); `bench/` compares against torch side by side.
    #[test]
    #[ignore]
    fn bench_task_aware_basis() {
        crate::threads::set_num_threads(2);
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transpose16_is_a_transpose() {
        if !sgemm::avx512() {
            return;
        }
        let src: Vec<f32> = (0..20 * 16).map(|i| i as f32).collect();
        let mut dst = vec![0f32; 16 * 18];
        // SAFETY: 16 columns of 16 floats, 20 apart, fit in `src`; 16 rows of 16, 18 apart, fit in `dst`.
        unsafe { sgemm::transpose16(src.as_ptr(), 20, dst.as_mut_ptr(), 18) };
        for r in 0..16 {
            for c in 0..16 {
                assert_eq!(dst[r * 18 + c], src[c * 20 + r], "({r}, {c})");
            }
        }
    }

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
        let seq = svd_on_pool(&Dense { a: a.as_ref() }, &o, true, Par::Seq).unwrap();
        let par = svd_on_pool(&Dense { a: a.as_ref() }, &o, true, Par::rayon(3)).unwrap();
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

    /// The symmetry check walks tile pairs of a unit-row-stride view; a defect deep in an off-diagonal tile, on
    /// either side of the diagonal and in either storage order, is found and reported where it is.
    #[test]
    fn symmetry_check_covers_every_tile() {
        symmetry_check_in::<f64>();
        // f32 full tiles take the vectorised transpose.
        symmetry_check_in::<f32>();
    }

    fn symmetry_check_in<T: Real>() {
        let d = 3 * BLOCK + 7;
        let (one, half) = (T::from_f64(1.0), T::from_f64(0.5));
        let identity = Mat::<T>::from_fn(d, d, |i, j| if i == j { one } else { T::from_f64(0.0) });
        for row_major in [false, true] {
            for &(i, j) in &[(d - 1, BLOCK + 3), (BLOCK + 3, d - 1), (5, 2 * BLOCK + 1), (2 * BLOCK + 17, BLOCK + 40)] {
                let mut c = identity.clone();
                c[(i, j)] = half;
                let c_row = c.transpose().to_owned();
                let view = if row_major { c_row.transpose() } else { c.as_ref() };
                assert!(view == c.as_ref());
                let e = check_covariance(view).unwrap_err();
                let pair = [format!("C[{i}, {j}]"), format!("C[{j}, {i}]")];
                assert!(matches!(e, Error::Value(ref m) if pair.iter().any(|p| m.contains(p.as_str()))), "{e}");
                c[(i, j)] = T::from_f64(f64::INFINITY);
                let c_row = c.transpose().to_owned();
                let view = if row_major { c_row.transpose() } else { c.as_ref() };
                let e = check_covariance(view).unwrap_err();
                assert!(matches!(e, Error::NonFinite(ref m) if m.contains(&format!("({i}, {j})"))), "{e}");
            }
            // A symmetric matrix with distinct entries everywhere passes (every mirrored pair really is compared).
            let sym = Mat::<T>::from_fn(d, d, |i, j| T::from_f64((i * j + i + j) as f64));
            let sym_row = sym.transpose().to_owned();
            assert!(check_covariance(if row_major { sym_row.transpose() } else { sym.as_ref() }).is_ok());
        }
    }
}
