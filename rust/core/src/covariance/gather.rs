//! Gathering a batch: counted rows, segment means, centred transposed f32 copy, error diagnosis.

use rayon::prelude::*;

use super::convert::{bf16_to_f32, f16_to_f32, Convert};
use super::{simd, Batch, Center, Elements};
use crate::error::{Error, Result};

/// Which source rows are counted and how they group for centring.
pub(super) struct Plan {
    /// Counted token rows (`sequence · seq_len + token`), in order; column `k` of `X_bᵀ` is token `rows[k]`.
    pub(super) rows: Vec<usize>,
    /// `rows[segments[s]..segments[s + 1]]` share one mean: one segment per non-empty sequence (Sequence), or one
    /// for the whole batch.
    segments: Vec<usize>,
    /// Segment of each counted row.
    segment_of: Vec<usize>,
    centred: bool,
    seq_len: usize,
}

impl Plan {
    pub(super) fn new(batch: &Batch<'_>, center: Center) -> Result<Self> {
        let tokens = batch.sequences * batch.seq_len;
        let mut rows: Vec<usize> = Vec::new();
        rows.try_reserve_exact(tokens).map_err(|_| Error::OutOfMemory(format!("cannot index {tokens} tokens")))?;
        match batch.mask {
            Some(mask) => rows.extend(mask.iter().enumerate().filter(|(_, &keep)| keep).map(|(r, _)| r)),
            None => rows.extend(0..tokens),
        }
        let segments = if center == Center::Sequence {
            let mut segments = vec![0];
            let mut k = 0;
            for s in 0..batch.sequences {
                let end = (s + 1) * batch.seq_len;
                while k < rows.len() && rows[k] < end {
                    k += 1;
                }
                if k > *segments.last().unwrap_or(&0) {
                    segments.push(k);
                }
            }
            segments
        } else {
            vec![0, rows.len()]
        };
        let mut segment_of: Vec<usize> = Vec::new();
        segment_of
            .try_reserve_exact(rows.len())
            .map_err(|_| Error::OutOfMemory(format!("cannot index {} tokens", rows.len())))?;
        segment_of.resize(rows.len(), 0);
        for (s, seg) in segments.windows(2).enumerate() {
            segment_of[seg[0]..seg[1]].fill(s);
        }
        Ok(Self { rows, segments, segment_of, centred: center != Center::None, seq_len: batch.seq_len })
    }
}

/// Counted rows per partial sum in the first gather pass: few enough partial vectors to keep, enough of them to
/// share out among the threads.
const SUM_BLOCK: usize = 128;
/// Features × tokens transposed at a time in the second pass: each source row gives one cache line, each output
/// row receives 1 KiB contiguous, and the block (16 KiB) stays in L1. Measured at dim 4096: wider feature tiles
/// or shorter token runs were no faster.
const FEATURE_TILE: usize = 16;
const TOKEN_TILE: usize = 256;

/// Writes `X_bᵀ` (`dim × n_b`, row-major, i.e. feature-major) into `xt`, the per-feature sum of the counted
/// tokens into `batch_sum` and the per-feature sum of squares of `X_b`'s f32 entries into `sum_sq`. Returns false
/// if any counted value is NaN or infinite.
///
/// Feature-major because faer's kernel runs this product ~1.6× faster with both operands contiguous along the
/// token axis. Two parallel passes: the first sums each segment in f64 from the original values, reading whole
/// rows; the second centres, rounds to f32 and transposes through a small cache-resident block so that every
/// write is whole cache lines.
pub(super) fn gather<C: Convert>(
    conv: &C,
    data: &[C::Raw],
    plan: &Plan,
    dim: usize,
    xt: &mut [f32],
    (batch_sum, sum_sq): (&mut [f64], &mut [f32]),
) -> bool {
    match segment_means(conv, data, plan, dim, batch_sum) {
        Some(means) => {
            transpose_centred(conv, data, plan, dim, &means, xt, sum_sq);
            true
        }
        None => false,
    }
}

/// The `segments × dim` segment means (zeros when not centring), adding the column sums into `batch_sum`.
///
/// Partial sums over fixed blocks of rows, combined in order, so the result does not depend on scheduling.
/// `None` if a counted value is not finite: sums of f32-range values cannot overflow f64, so a non-finite sum
/// means a non-finite value (f64 input beyond f32 is caught by the sum-of-squares check).
fn segment_means<C: Convert>(
    conv: &C,
    data: &[C::Raw],
    plan: &Plan,
    dim: usize,
    batch_sum: &mut [f64],
) -> Option<Vec<f64>> {
    let blocks: Vec<(usize, usize, usize)> = plan
        .segments
        .windows(2)
        .enumerate()
        .flat_map(|(s, seg)| (seg[0]..seg[1]).step_by(SUM_BLOCK).map(move |k| (s, k, (k + SUM_BLOCK).min(seg[1]))))
        .collect();
    let partial: Vec<Vec<f64>> = blocks
        .par_iter()
        .map(|&(_, k0, k1)| {
            let mut acc = vec![0f64; dim];
            simd(
                #[inline(always)]
                || {
                    for &r in &plan.rows[k0..k1] {
                        for (a, &x) in acc.iter_mut().zip(&data[r * dim..(r + 1) * dim]) {
                            *a += conv.to_f64(x);
                        }
                    }
                },
            );
            acc
        })
        .collect();
    let segments = plan.segments.len() - 1;
    let mut means = vec![0f64; segments * dim];
    for (&(s, _, _), part) in blocks.iter().zip(&partial) {
        for (m, &p) in means[s * dim..(s + 1) * dim].iter_mut().zip(part) {
            *m += p;
        }
    }
    if !means.iter().all(|m| m.is_finite()) {
        return None;
    }
    for (seg, sums) in plan.segments.windows(2).zip(means.chunks_exact_mut(dim)) {
        for (b, &s) in batch_sum.iter_mut().zip(sums.iter()) {
            *b += s;
        }
        let n = (seg[1] - seg[0]) as f64;
        for m in sums.iter_mut() {
            *m = if plan.centred { *m / n } else { 0.0 };
        }
    }
    Some(means)
}

fn transpose_centred<C: Convert>(
    conv: &C,
    data: &[C::Raw],
    plan: &Plan,
    dim: usize,
    means: &[f64],
    xt: &mut [f32],
    sum_sq: &mut [f32],
) {
    if plan.centred {
        transpose_tiles::<C, true>(conv, data, plan, dim, means, xt, sum_sq)
    } else {
        transpose_tiles::<C, false>(conv, data, plan, dim, means, xt, sum_sq)
    }
}

/// The second gather pass, monomorphised on whether to centre: uncentred f32-family input converts without the
/// f64 round trip.
fn transpose_tiles<C: Convert, const CENTRED: bool>(
    conv: &C,
    data: &[C::Raw],
    plan: &Plan,
    dim: usize,
    means: &[f64],
    xt: &mut [f32],
    sum_sq: &mut [f32],
) {
    let n_b = plan.rows.len();
    xt.par_chunks_mut(FEATURE_TILE * n_b).zip(sum_sq.par_chunks_mut(FEATURE_TILE)).enumerate().for_each(
        |(t, (out, sum_sq))| {
            simd(
                #[inline(always)]
                || transpose_tile::<C, CENTRED>(conv, data, plan, dim, means, t, out, sum_sq),
            )
        },
    );
}

/// One feature tile of [`transpose_tiles`]; always inlined so that it is compiled for the SIMD level `simd` picks.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn transpose_tile<C: Convert, const CENTRED: bool>(
    conv: &C,
    data: &[C::Raw],
    plan: &Plan,
    dim: usize,
    means: &[f64],
    t: usize,
    out: &mut [f32],
    sum_sq: &mut [f32],
) {
    let n_b = plan.rows.len();
    let (f0, width) = (t * FEATURE_TILE, out.len() / n_b);
    let mut block = [[0f32; FEATURE_TILE]; TOKEN_TILE];
    let mut sq = [0f32; FEATURE_TILE];
    let mut k0 = 0;
    while k0 < n_b {
        let k1 = (k0 + TOKEN_TILE).min(n_b);
        for ((&r, &seg), dst) in plan.rows[k0..k1].iter().zip(&plan.segment_of[k0..k1]).zip(&mut block) {
            let src = &data[r * dim + f0..r * dim + f0 + width];
            if CENTRED {
                let mu = &means[seg * dim + f0..seg * dim + f0 + width];
                for ((d, &x), &m) in dst.iter_mut().zip(src).zip(mu) {
                    *d = (conv.to_f64(x) - m) as f32;
                }
            } else {
                for (d, &x) in dst.iter_mut().zip(src) {
                    *d = conv.to_f32(x);
                }
            }
            for (q, &y) in sq.iter_mut().zip(dst.iter()) {
                *q += y * y;
            }
        }
        for (f, row) in out.chunks_exact_mut(n_b).enumerate() {
            for (o, b) in row[k0..k1].iter_mut().zip(&block) {
                *o = b[f];
            }
        }
        k0 = k1;
    }
    for (s, &q) in sum_sq.iter_mut().zip(&sq) {
        *s = q;
    }
}

/// The error for a batch whose values the fast path found unusable: the first counted non-finite value, else the
/// first f64 value beyond f32, else the feature whose sum of squares is too large for f32 products.
pub(super) fn diagnose(batch: &Batch<'_>, plan: &Plan, too_large: Option<(usize, f64)>) -> Error {
    let dim = batch.dim;
    let value = |i: usize| -> f64 {
        match batch.data {
            Elements::F16(d) => f64::from(f16_to_f32(d[i])),
            Elements::Bf16(d) => f64::from(bf16_to_f32(d[i])),
            Elements::F32(d) => f64::from(d[i]),
            Elements::F64(d) => d[i],
        }
    };
    let position = |r: usize, f: usize| {
        format!("(sequence {}, token {}, feature {f})", r / plan.seq_len.max(1), r % plan.seq_len.max(1))
    };
    for &r in &plan.rows {
        for f in 0..dim {
            let v = value(r * dim + f);
            if !v.is_finite() {
                return Error::NonFinite(format!("batch value at {} is {v}", position(r, f)));
            }
        }
    }
    for &r in &plan.rows {
        for f in 0..dim {
            let v = value(r * dim + f);
            if v.abs() > f64::from(f32::MAX) {
                return Error::NonFinite(format!(
                    "batch value at {} is {v:e}, beyond the f32 range the products are computed in",
                    position(r, f)
                ));
            }
        }
    }
    match too_large {
        Some((f, sum_sq)) => Error::NonFinite(format!(
            "feature {f} of the batch is too large for f32 products: its centred sum of squares is {sum_sq:e}, \
             beyond the f32 range"
        )),
        None => Error::NonFinite("the batch's centred values overflow f32".into()),
    }
}
