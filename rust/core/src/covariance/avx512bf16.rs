//! The AVX512-BF16 kernel: `vdpbf16ps` on 8 × 32 blocks of f32 accumulators.
//!
//! Only the pair-major operand is needed: entry `(p, i)` of it is both the right operand's row `p`, column `i`
//! and, broadcast, the left operand's row `i`, pair `p`.

use std::arch::x86_64::*;

use super::bf16::KernelTile;

/// Token pairs per block. Each block's sums start from zero and are then added to the tile's running f32 sums: no
/// sequential f32 sum runs over more than 512 tokens, which keeps the rounding error at the level of the f32
/// path's blocked products. The block's rows of the operand (≤ 512 KiB for a 512-wide tile) stay in L2.
const PAIR_BLOCK: usize = 256;
const ROWS: usize = 8;

#[cfg_attr(not(test), allow(dead_code))] // not auto-selected yet (bf16.rs, Kernel::detect)
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// The tile's product into `c` (`t.bi × t.bj` f32, row stride `t.bj`) from `b`, the `pairs × dim_p` pair-major
/// operand. On a diagonal tile only the 8 × 32 blocks reaching the diagonal or below are computed.
///
/// # Safety
/// The CPU must support AVX512F and AVX512-BF16; `b` must hold `pairs × dim_p` elements, `c` at least
/// `t.bi × t.bj`; `t.i0 + t.bi`, `t.j0 + t.bj` must not exceed `dim_p`; edges multiples of 32.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn tile(t: &KernelTile, b: *const u32, c: *mut f32) {
    for pc in (0..t.pairs).step_by(PAIR_BLOCK) {
        let pe = (pc + PAIR_BLOCK).min(t.pairs);
        for is in (0..t.bi).step_by(ROWS) {
            let js_end = if t.diag { (is + ROWS).next_multiple_of(32) } else { t.bj };
            for js in (0..js_end).step_by(32) {
                let cp = c.add(is * t.bj + js);
                let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
                for p in pc..pe {
                    let row = b.add(p * t.ldb);
                    let r0: __m512bh = std::mem::transmute(_mm512_loadu_si512(row.add(t.j0 + js).cast()));
                    let r1: __m512bh = std::mem::transmute(_mm512_loadu_si512(row.add(t.j0 + js + 16).cast()));
                    let left = row.add(t.i0 + is);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let l: __m512bh = std::mem::transmute(_mm512_set1_epi32(*left.add(r) as i32));
                        acc[0] = _mm512_dpbf16_ps(acc[0], l, r0);
                        acc[1] = _mm512_dpbf16_ps(acc[1], l, r1);
                    }
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    if pc != 0 {
                        acc[0] = _mm512_add_ps(acc[0], _mm512_loadu_ps(cp.add(r * t.bj)));
                        acc[1] = _mm512_add_ps(acc[1], _mm512_loadu_ps(cp.add(r * t.bj + 16)));
                    }
                    _mm512_storeu_ps(cp.add(r * t.bj), acc[0]);
                    _mm512_storeu_ps(cp.add(r * t.bj + 16), acc[1]);
                }
            }
        }
    }
}
