//! A single-precision matrix product specialised for the shapes of a randomized SVD: a large `a: [m, k]` times a
//! skinny `x: [k, n]` (`n` = rank + oversampling, about 138).
//!
//! These products are 80–90% of the time of `task_aware_basis`. faer's general kernel, tuned for squarer shapes,
//! gets 125–150 GFLOP/s per Sapphire Rapids core on them; this one 150–170 with a row-major and 110–125 with a
//! column-major `a` (about 300 and 230 on two cores, against ~200 for faer). One 8 × 48 register tile (24 zmm accumulators) does `acc[c][·] += panel[k][·] · b_c[k]`: 48 lanes come from a
//! packed panel, 8 scalars are broadcast from 8 unit-stride streams. Which matrix plays which role follows `a`'s
//! layout, so the big matrix is always read in its storage order and never transposed:
//!
//! - `a` row-major (numpy's `W`, `C`): the 8 broadcast streams are 8 rows of `a`, the packed panels hold `x`
//!   (packed once per product). Each 8-row tile of `out` goes through a row-major scratch block, then is copied.
//! - `a` column-major (`Wᵀ` of a row-major `W`): the packed panels hold 48-row slabs of `a`, the broadcast streams
//!   are 8 columns of `x`, and tiles land straight in a column-major `out`.
//!
//! Each output element is accumulated by one thread in a fixed order, so results do not depend on the thread
//! count. Returns `false` (and does nothing) where it does not apply, for the caller to use faer instead.

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
                                spill[c * PANEL + r] =
                                    if pc > 0 && c < cols && r < rows { *out.at(i0 + lane0 + r, j0 + c) } else { 0.0 };
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

#[cfg(test)]
mod tests {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, Mat, Par};

    use super::*;
    use crate::rsvd::operator::product;
    use crate::rsvd::rng::gaussian;

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

    #[test]
    fn transpose16_is_a_transpose() {
        if !avx512() {
            return;
        }
        let src: Vec<f32> = (0..20 * 16).map(|i| i as f32).collect();
        let mut dst = vec![0f32; 16 * 18];
        // SAFETY: 16 columns of 16 floats, 20 apart, fit in `src`; 16 rows of 16, 18 apart, fit in `dst`.
        unsafe { transpose16(src.as_ptr(), 20, dst.as_mut_ptr(), 18) };
        for r in 0..16 {
            for c in 0..16 {
                assert_eq!(dst[r * 18 + c], src[c * 20 + r], "({r}, {c})");
            }
        }
    }
}
