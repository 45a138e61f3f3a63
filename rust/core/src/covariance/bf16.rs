//! Exact-bf16 products for uncentred bf16 input.
//!
//! A bf16 value has an 8-bit significand, so the product of two is exact in f32: hardware bf16 dot products
//! (AMX `tdpbf16ps`, AVX512-BF16 `vdpbf16ps`) give the same f32 sums as converting to f32 first and multiplying
//! there, at several times the speed. Only uncentred batches qualify: a centred value `x − μ` is no longer bf16.
//!
//! Both kernels read token *pairs*: a `u32` holding one feature of tokens `2p` (low half) and `2p + 1` (high half),
//! which is the operand layout of both instructions. The batch is packed in chunks of at most [`CHUNK`] tokens,
//! whose f32 sums are added into the f64 scatter before the next chunk starts, so no f32 sum ever runs over more
//! tokens than the f32 path's does for a batch of that size.
//!
//! The instructions flush subnormal inputs and f32 results to zero: bf16 magnitudes below 2⁻¹²⁶ count as zero,
//! which the f32 path would square to zero anyway.

use rayon::prelude::*;

use super::gather::{diagnose, Plan};
use super::product::{Tile, TileProduct};
use super::scratch::Scratch;
use super::{bf16_to_f32, simd, zeroed, Batch, CovarianceAccumulator};
use crate::error::Result;

/// Tokens per packed chunk; a multiple of [`K_STEP`].
pub(super) const CHUNK: usize = 4096;
/// Token pairs per kernel step (AMX: 16 rows of a B tile).
const PAIR_STEP: usize = 16;
/// Tokens per kernel step.
const K_STEP: usize = 2 * PAIR_STEP;
/// Features are padded to this (two 16-wide AMX tiles, two 16-lane vectors): padding is zero and adds nothing.
pub(super) const FEATURE_STEP: usize = 32;
/// Extra `u32` per packed row (one cache line).
const PAD: usize = 16;
/// Counted rows per partial sum, as in the f32 path's first gather pass (same blocks, same order, same means).
const SUM_BLOCK: usize = 128;

/// A hardware bf16 dot-product kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernel {
    /// Intel AMX tiles (`amx-bf16`), Sapphire Rapids and later; Linux only (the tile state needs the kernel's
    /// permission).
    Amx,
    /// AVX512-BF16 vectors (Cooper Lake, Sapphire Rapids, Zen 4 and later).
    #[cfg_attr(not(test), allow(dead_code))] // exact but slower than the f32 path until tuned
    Avx512Bf16,
}

impl Kernel {
    /// The fastest kernel this CPU and OS allow, decided once per process.
    pub(super) fn detect() -> Option<Kernel> {
        static DETECTED: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if super::amx::available() {
                    return Some(Kernel::Amx);
                }
                // The AVX512-BF16 kernel is exact but, untuned, measured at ~43 GFLOP/s per tile against ~240 for
                // the f32 path on the same machine: it stays tested (all_available) but is not picked until it wins.
            }
            None
        })
    }

    /// Every kernel usable here, fastest first (for tests comparing them).
    #[cfg(test)]
    pub(super) fn all_available() -> Vec<Kernel> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if super::amx::available() {
                out.push(Kernel::Amx);
            }
            if super::avx512bf16::available() {
                out.push(Kernel::Avx512Bf16);
            }
        }
        out
    }
}

/// A packed chunk: `b` is `pairs × dim_p` (pair-major, each row all features), `a` its transpose `dim_p × pairs`
/// (feature-major; AMX only, its left operand must be contiguous along the tokens).
struct Packed<'a> {
    kernel: Kernel,
    a: &'a [u32],
    b: &'a [u32],
    pairs: usize,
    dim_p: usize,
    /// Row strides (`u32`) of `a` and `b`: one cache line more than the rows, so that the rows a tile load walks
    /// do not all fall into the same L1 set.
    lda: usize,
    ldb: usize,
}

impl TileProduct for Packed<'_> {
    fn buffer_len(&self, tile: usize) -> usize {
        let t = tile.next_multiple_of(FEATURE_STEP);
        t * t
    }

    fn tile(&self, t: &Tile, out: &mut [f32]) -> usize {
        let (bi, bj) = (t.bi.next_multiple_of(FEATURE_STEP), t.bj.next_multiple_of(FEATURE_STEP));
        // Tiles start at multiples of the tile edge (a power of two ≥ 64), so padded tiles stay inside `dim_p`.
        assert!(t.i0 + bi <= self.dim_p && t.j0 + bj <= self.dim_p && out.len() >= bi * bj);
        assert!(
            self.pairs.is_multiple_of(PAIR_STEP) && self.ldb >= self.dim_p && self.b.len() >= self.pairs * self.ldb
        );
        let (lda, ldb) = (self.lda, self.ldb);
        let shape = KernelTile { i0: t.i0, bi, j0: t.j0, bj, diag: t.diag, pairs: self.pairs, lda, ldb };
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => {
                assert!(self.lda >= self.pairs && self.a.len() >= self.dim_p * self.lda);
                // SAFETY: `Amx` is only constructed after `amx::available()` (CPU support and the OS permission);
                // the assertions above keep every tile load and store inside `a`, `b` and `out`.
                unsafe { super::amx::tile(&shape, self.a.as_ptr(), self.b.as_ptr(), out.as_mut_ptr()) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => {
                // SAFETY: `Avx512Bf16` is only constructed after `avx512bf16::available()`; bounds as above.
                unsafe { super::avx512bf16::tile(&shape, self.b.as_ptr(), out.as_mut_ptr()) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no bf16 kernel is detected off x86-64"),
        }
        bj
    }
}

/// A tile as the kernels see it: every edge a multiple of [`FEATURE_STEP`], `pairs` a multiple of [`PAIR_STEP`].
/// The output is `bi × bj`, row stride `bj`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) struct KernelTile {
    pub(super) i0: usize,
    pub(super) bi: usize,
    pub(super) j0: usize,
    pub(super) bj: usize,
    pub(super) diag: bool,
    pub(super) pairs: usize,
    pub(super) lda: usize,
    pub(super) ldb: usize,
}

impl CovarianceAccumulator {
    /// The uncentred bf16 update: the same validation and state changes as the f32 path, with the product on a
    /// hardware bf16 kernel.
    pub(super) fn update_bf16(
        &mut self,
        batch: &Batch<'_>,
        data: &[u16],
        plan: &Plan,
        kernel: Kernel,
        new_count: u64,
    ) -> Result<()> {
        let dim = self.dim;
        let n_b = plan.rows.len();
        let dim_p = dim.next_multiple_of(FEATURE_STEP);
        let pairs_max = n_b.min(CHUNK).next_multiple_of(K_STEP) / 2;
        let (lda, ldb) = (pairs_max + PAD, dim_p + PAD);
        let per_copy = lda
            .checked_mul(ldb)
            .ok_or_else(|| crate::Error::Shape(format!("{n_b} tokens × {dim} features overflows the address space")))?;
        let copies = if kernel == Kernel::Amx { 2 } else { 1 };
        let mut pack = Scratch::<u32>::checkout(per_copy * copies)?;
        let mut batch_sum = zeroed(dim)?;
        let mut sum_sq = zeroed::<f64>(dim)?;
        let result = crate::threads::run(|_| -> Result<()> {
            if !sums(data, &plan.rows, dim, &mut batch_sum, &mut sum_sq) {
                return Err(diagnose(batch, plan, None));
            }
            // The f32 path's bound on its partial sums, over the longest f32 sum here.
            let limit = f64::from(f32::MAX) / (4.0 + n_b.min(CHUNK) as f64 * f64::from(f32::EPSILON));
            if let Some(f) = sum_sq.iter().position(|&s| s > limit) {
                return Err(diagnose(batch, plan, Some((f, sum_sq[f]))));
            }
            let step = self.begin(n_b, new_count, &batch_sum);
            for (c, rows) in plan.rows.chunks(CHUNK).enumerate() {
                let pairs = rows.len().next_multiple_of(K_STEP) / 2;
                let (b, a) = pack.split_at_mut(per_copy);
                let b = &mut b[..pairs * ldb];
                pack_pairs(data, rows, dim, ldb, b);
                let lda = pairs + PAD;
                let a = if kernel == Kernel::Amx {
                    let a = &mut a[..dim_p * lda];
                    transpose_pairs(b, pairs, ldb, lda, a);
                    &a[..]
                } else {
                    &[]
                };
                let product = Packed { kernel, a, b, pairs, dim_p, lda, ldb };
                // Chan's term belongs to the batch, not to each chunk.
                self.add_product(&product, &step.delta, if c == 0 { step.weight } else { 0.0 });
            }
            self.finish(step);
            Ok(())
        });
        pack.checkin();
        result
    }
}

/// Per-feature sum (into `batch_sum`) and sum of squares of the counted tokens, in f64 over the same row blocks in
/// the same order as the f32 path, so the means agree bit for bit. False if a counted value is not finite.
fn sums(data: &[u16], rows: &[usize], dim: usize, batch_sum: &mut [f64], sum_sq: &mut [f64]) -> bool {
    let partial: Vec<(Vec<f64>, Vec<f64>)> = rows
        .par_chunks(SUM_BLOCK)
        .map(|block| {
            let (mut s, mut q) = (vec![0f64; dim], vec![0f64; dim]);
            simd(
                #[inline(always)]
                || {
                    for &r in block {
                        for ((s, q), &x) in s.iter_mut().zip(q.iter_mut()).zip(&data[r * dim..(r + 1) * dim]) {
                            let x = f64::from(bf16_to_f32(x));
                            *s += x;
                            *q += x * x;
                        }
                    }
                },
            );
            (s, q)
        })
        .collect();
    let mut total = vec![0f64; dim];
    for (s, q) in &partial {
        for (t, &p) in total.iter_mut().zip(s) {
            *t += p;
        }
        for (t, &p) in sum_sq.iter_mut().zip(q) {
            *t += p;
        }
    }
    if !total.iter().chain(sum_sq.iter()).all(|v| v.is_finite()) {
        return false;
    }
    for (b, &t) in batch_sum.iter_mut().zip(&total) {
        *b += t;
    }
    true
}

/// Pairs of counted rows into `out` (`pairs` rows of stride `ldb`): entry `(p, f)` holds feature `f` of rows `2p` and `2p + 1`.
/// Missing rows past the end and entries past `dim` are zero.
fn pack_pairs(data: &[u16], rows: &[usize], dim: usize, ldb: usize, out: &mut [u32]) {
    const PAIRS_PER_TASK: usize = 16;
    out.par_chunks_mut(PAIRS_PER_TASK * ldb).enumerate().for_each(|(t, out)| {
        simd(
            #[inline(always)]
            || {
                for (q, dst) in out.chunks_exact_mut(ldb).enumerate() {
                    let k = 2 * (t * PAIRS_PER_TASK + q);
                    let row = |k: usize| rows.get(k).map(|&r| &data[r * dim..(r + 1) * dim]);
                    let (dst, pad) = dst.split_at_mut(dim);
                    match (row(k), row(k + 1)) {
                        (Some(lo), Some(hi)) => {
                            for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                                *d = u32::from(l) | (u32::from(h) << 16);
                            }
                        }
                        (Some(lo), None) => {
                            for (d, &l) in dst.iter_mut().zip(lo) {
                                *d = u32::from(l);
                            }
                        }
                        _ => dst.fill(0),
                    }
                    pad.fill(0);
                }
            },
        );
    });
}

/// `a` (rows of stride `lda`, one per feature) = transpose of `b` (`pairs` rows of stride `ldb`), through blocks
/// small enough for L1. `a`'s entries past `pairs` are never read and stay as they were.
fn transpose_pairs(b: &[u32], pairs: usize, ldb: usize, lda: usize, a: &mut [u32]) {
    const F: usize = 16;
    const P: usize = 64;
    a.par_chunks_mut(F * lda).enumerate().for_each(|(t, a)| {
        let f0 = t * F;
        for p0 in (0..pairs).step_by(P) {
            let p1 = (p0 + P).min(pairs);
            for (f, dst) in a.chunks_mut(lda).enumerate() {
                for (p, d) in (p0..p1).zip(&mut dst[p0..p1]) {
                    *d = b[p * ldb + f0 + f];
                }
            }
        }
    });
}

#[cfg(test)]
mod bench {
    use super::*;
    use crate::covariance::Center;

    /// Time of each piece of an uncentred bf16 update at dim 4096, 4096 tokens, per kernel:
    /// `cargo test --release -p lowrank-core covariance::bf16::bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_bf16_pieces() {
        let (dim, n) = (4096, 4096);
        let data: Vec<u16> = (0..n * dim).map(|i| (0x3f00 + (i * 2_654_435_761) % 0x100) as u16).collect();
        let rows: Vec<usize> = (0..n).collect();
        let dim_p = dim.next_multiple_of(FEATURE_STEP);
        let pairs = n.next_multiple_of(K_STEP) / 2;
        let (lda, ldb) = (pairs + PAD, dim_p + PAD);
        let (mut a, mut b) = (vec![0u32; dim_p * lda], vec![0u32; pairs * ldb]);
        let median = |f: &mut dyn FnMut()| {
            f();
            let mut t: Vec<f64> = (0..5)
                .map(|_| {
                    let s = std::time::Instant::now();
                    f();
                    s.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            t.sort_by(f64::total_cmp);
            t[2]
        };
        crate::threads::run(|_| {
            let (mut s, mut q) = (vec![0f64; dim], vec![0f64; dim]);
            println!("sums      {:.1} ms", median(&mut || assert!(sums(&data, &rows, dim, &mut s, &mut q))));
            println!("pack      {:.1} ms", median(&mut || pack_pairs(&data, &rows, dim, ldb, &mut b)));
            println!("transpose {:.1} ms", median(&mut || transpose_pairs(&b, pairs, ldb, lda, &mut a)));
            struct Null;
            impl TileProduct for Null {
                fn buffer_len(&self, tile: usize) -> usize {
                    tile * tile
                }
                fn tile(&self, t: &Tile, _: &mut [f32]) -> usize {
                    t.bj
                }
            }
            let mut acc = CovarianceAccumulator::new(dim, Center::None).unwrap();
            let delta = vec![0f64; dim];
            println!("add only  {:.1} ms", median(&mut || acc.add_product(&Null, &delta, 0.0)));
            for kernel in Kernel::all_available() {
                let mut acc = CovarianceAccumulator::new(dim, Center::None).unwrap();
                let delta = vec![0f64; dim];
                let product = Packed { kernel, a: &a, b: &b, pairs, dim_p, lda, ldb };
                let mut out = vec![0f32; 512 * 512];
                let t = Tile { i0: 1024, bi: 512, j0: 0, bj: 512, diag: false };
                let one = median(&mut || {
                    product.tile(&t, &mut out);
                });
                println!(
                    "{kernel:?} one 512² tile: {one:.2} ms ({:.0} GFLOP/s as 2·MAC)",
                    2.0 * (512 * 512 * n) as f64 / one / 1e6
                );
                let ms = median(&mut || acc.add_product(&product, &delta, 0.0));
                println!(
                    "{kernel:?} product+add {ms:.1} ms ({:.0} GFLOP/s as n·d²)",
                    (n * dim * dim) as f64 / ms / 1e6
                );
            }
        });
    }
}
