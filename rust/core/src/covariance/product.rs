//! The symmetric product `X_bᵀ X_b`, tiled over the lower triangle and added into the f64 scatter.

use std::cell::Cell;

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::{packed_rows, simd, Center, CovarianceAccumulator};

impl CovarianceAccumulator {
    /// Adds the lower triangle of `X_bᵀ X_b` (`xt` = `X_bᵀ`, `dim × n_b` row-major) into the scatter, plus Chan's
    /// rank-1 term in Global mode, and moves mean and count forward.
    ///
    /// The triangle is cut into square tiles, each an f32 product computed sequentially and added into the f64
    /// scatter while it is still in cache. Distributing independent tiles over the pool keeps every core busy —
    /// measured at dim 4096 on 2 cores: 0.20 s, against 0.25–0.28 s for one parallel faer triangular product over
    /// the whole triangle — and no `dim × dim` f32 intermediate is ever allocated. The inputs were checked
    /// beforehand, so nothing here fails.
    pub(super) fn accumulate(&mut self, xt: &[f32], n_b: usize, new_count: u64, batch_sum: &[f64], par: Par) {
        let dim = self.dim;
        let n_a = self.count as f64;
        let n_bf = n_b as f64;
        let n = new_count as f64;
        let delta: Vec<f64> = batch_sum.iter().zip(&self.mean).map(|(&s, &m)| s / n_bf - m).collect();
        // Only Global centres on the running mean; the others' scatter does not depend on it.
        let weight = if self.center == Center::Global { n_a * n_bf / n } else { 0.0 };

        let threads = rayon::current_num_threads();
        let tile = tile_size(dim, threads);
        let panels = dim.div_ceil(tile);
        let coords: Vec<(usize, usize)> = (0..panels).flat_map(|i| (0..=i).map(move |j| (i, j))).collect();
        // A tile's part of each packed row, so that tiles can be added into the scatter concurrently.
        let mut tiles: Vec<Vec<&mut [f64]>> = coords.iter().map(|_| Vec::with_capacity(tile)).collect();
        for (r, row) in packed_rows(&mut self.scatter, dim).into_iter().enumerate() {
            let i = r / tile;
            let mut rest = row;
            for j in 0..=i {
                let width = tile.min(rest.len());
                let (part, tail) = std::mem::take(&mut rest).split_at_mut(width);
                tiles[i * (i + 1) / 2 + j].push(part);
                rest = tail;
            }
        }
        // Few tiles (small dim): let faer split each one instead.
        let inner = if coords.len() >= 2 * threads { Par::Seq } else { par };
        let x = MatRef::from_row_major_slice(xt, dim, n_b);
        tiles.into_par_iter().zip(coords).for_each(|(rows, (i, j))| {
            let (i0, j0) = (i * tile, j * tile);
            let bi = rows.len();
            let bj = if i == j { bi } else { tile };
            let mut buf = TILE_BUFFER.with(Cell::take);
            if buf.len() < bi * bj {
                buf = vec![0f32; tile * tile];
            }
            let dst = MatMut::from_row_major_slice_mut(&mut buf[..bi * bj], bi, bj);
            let (lhs, rhs) = (x.subrows(i0, bi), x.subrows(j0, bj).transpose());
            if i == j {
                triangular::matmul(
                    dst,
                    BlockStructure::TriangularLower,
                    Accum::Replace,
                    lhs,
                    BlockStructure::Rectangular,
                    rhs,
                    BlockStructure::Rectangular,
                    1.0f32,
                    inner,
                );
            } else {
                faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, inner);
            }
            let delta_cols = &delta[j0..];
            let g_all = &buf[..];
            simd(
                #[inline(always)]
                || {
                    for (rr, part) in rows.into_iter().enumerate() {
                        let g = &g_all[rr * bj..rr * bj + part.len()];
                        if weight != 0.0 {
                            let wd = weight * delta[i0 + rr];
                            for ((m, &g), &d) in part.iter_mut().zip(g).zip(delta_cols) {
                                *m += f64::from(g) + wd * d;
                            }
                        } else {
                            for (m, &g) in part.iter_mut().zip(g) {
                                *m += f64::from(g);
                            }
                        }
                    }
                },
            );
            TILE_BUFFER.with(|c| c.set(buf));
        });

        let frac = n_bf / n;
        for (m, d) in self.mean.iter_mut().zip(&delta) {
            *m += d * frac;
        }
        self.count = new_count;
    }
}

thread_local! {
    /// Each worker's f32 tile of the product (at most 1 MiB). Taken out while in use, so a worker that picks up
    /// another tile while waiting inside faer simply allocates a second one.
    static TILE_BUFFER: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Largest tile edge whose product still runs at full kernel speed; smaller when that would leave too few tiles
/// to share among the threads.
pub(super) const MAX_TILE: usize = 512;
pub(super) const MIN_TILE: usize = 64;

pub(super) fn tile_size(dim: usize, threads: usize) -> usize {
    let mut tile = MAX_TILE;
    while tile > MIN_TILE {
        let panels = dim.div_ceil(tile);
        if panels * (panels + 1) / 2 >= 4 * threads {
            break;
        }
        tile /= 2;
    }
    tile
}
