//! Reference matrices and accuracy measures shared by the unit tests of the decompositions.

use faer::{Mat, MatRef, Par};

use super::algorithm::{randomized_svd_dense, thin_svd, Factors};
use super::rng::gaussian;
use super::{Real, SvdOptions};

pub(super) fn opts(rank: usize, oversample: usize, power_iters: usize, seed: u64) -> SvdOptions {
    SvdOptions { rank, oversample, power_iters, seed }
}

pub(super) fn orthonormal(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
    let g = gaussian::<f64>(rows, cols, seed);
    g.qr().compute_thin_Q()
}

/// `U diag(s) Vᵀ` with Haar-like random `U`, `V` and the given spectrum.
pub(super) fn with_spectrum(m: usize, n: usize, s: &[f64], seed: u64) -> Mat<f64> {
    let r = s.len();
    let u = orthonormal(m, r, seed);
    let v = orthonormal(n, r, seed.wrapping_add(1));
    let us = Mat::from_fn(m, r, |i, j| u[(i, j)] * s[j]);
    &us * v.transpose()
}

pub(super) fn exact(a: MatRef<'_, f64>) -> (Mat<f64>, Vec<f64>, Mat<f64>) {
    let Factors { u, s, v } = thin_svd(a, Par::Seq).unwrap();
    (u, s, v)
}

pub(super) fn max_abs(a: MatRef<'_, f64>) -> f64 {
    let mut m = 0.0f64;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            m = m.max(a[(i, j)].abs());
        }
    }
    m
}

/// `max |X Xᵀ − I|` over the rows of `x`.
pub(super) fn row_orthonormality_error<T: Real>(x: MatRef<'_, T>) -> f64 {
    let xd = Mat::from_fn(x.nrows(), x.ncols(), |i, j| x[(i, j)].to_f64());
    let g = &xd * xd.transpose();
    max_abs((g - Mat::<f64>::identity(x.nrows(), x.nrows())).as_ref())
}

/// `‖A V‖²_F`: the energy of `A` captured by the row space spanned by `vt`.
pub(super) fn captured(a: MatRef<'_, f64>, vt: MatRef<'_, f64>) -> f64 {
    (a * vt.transpose()).squared_norm_l2()
}

pub(super) fn check_against_exact(a: &Mat<f64>, rank: usize, o: SvdOptions, s_tol: f64, energy_tol: f64) {
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
