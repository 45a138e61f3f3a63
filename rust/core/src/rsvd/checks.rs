//! Input validation of the decompositions: finiteness of a matrix and symmetry of a covariance.

use faer::MatRef;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::sgemm;
use super::Real;
use crate::error::{Error, Result};

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

pub(super) fn check_finite<T: Real>(a: MatRef<'_, T>, name: &str) -> Result<()> {
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
pub(super) fn check_covariance<T: Real>(c: MatRef<'_, T>) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use faer::Mat;

    use super::*;

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
