//! The randomized SVD itself (see the module documentation of [`crate::rsvd`]) and its exact fallback.

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
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
use super::operator::{Dense, LinearOperator, Transposed, WeightCovariance};
use super::rng::gaussian;
use super::{Real, Svd, SvdOptions};
use crate::error::{Error, Result};
use crate::threads;

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
pub(super) struct Factors<T> {
    pub(super) u: Mat<T>,
    pub(super) s: Vec<T>,
    pub(super) v: Mat<T>,
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
pub(super) fn thin_svd<T: Real>(a: MatRef<'_, T>, par: Par) -> Result<Factors<T>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rsvd::test_util::*;

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

    /// Timing on the benchmark shapes (`cargo test --release -p lowrank-core rsvd::algorithm::tests::bench -- --ignored
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
}
