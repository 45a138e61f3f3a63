//! The AMX bf16 kernel: `tdpbf16ps` on 16 × 16 f32 tiles.
//!
//! Rust 1.95 has no stable AMX intrinsics (`_tile_*` sit behind `x86_amx_intrinsics`), so the instructions are
//! written as inline assembly. The tile registers are invisible to the compiler, which never uses them, so their
//! contents live from one `asm!` block to the next within a call.

use std::arch::asm;

use super::bf16::KernelTile;

/// Token pairs per block. Each block's sums start from zero and are then added to the tile's running f32 sums: no
/// sequential f32 sum runs over more than 512 tokens, which keeps the rounding error at the level of the f32
/// path's blocked products (one sequential sum over 4096 tokens was measurably worse). The 32-row strip of the
/// left operand (32 KiB) is reused from L1 across a row of output tiles, the right operand's block (≤ 512 KiB)
/// from L2.
const PAIR_BLOCK: usize = 256;

/// CPU support (CPUID), OS support (XCR0 enables the tile state) and the Linux permission every process must
/// request before its first tile instruction, else that instruction raises SIGILL.
pub(super) fn available() -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is queried only when the maximum leaf allows it. (Safe
        // functions since Rust 1.94; the crate supports 1.89.)
        #[allow(unused_unsafe)]
        let (max_leaf, leaf1, leaf7) = unsafe {
            let max = __cpuid(0).eax;
            (max, __cpuid(1), if max >= 7 { Some(__cpuid_count(7, 0)) } else { None })
        };
        let Some(leaf7) = leaf7 else { return false };
        let amx_bf16 = leaf7.edx & (1 << 22) != 0;
        let amx_tile = leaf7.edx & (1 << 24) != 0;
        let osxsave = leaf1.ecx & (1 << 27) != 0;
        if max_leaf < 7 || !amx_bf16 || !amx_tile || !osxsave {
            return false;
        }
        let xcr0: u64 = {
            let (lo, hi): (u32, u32);
            // SAFETY: XGETBV with ECX = 0 is valid whenever OSXSAVE is set, checked above.
            unsafe { asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
            u64::from(lo) | (u64::from(hi) << 32)
        };
        // XTILECFG (17) and XTILEDATA (18).
        // The kernel adds its partial sums with AVX-512, which every AMX CPU has.
        if xcr0 & (0b11 << 17) != 0b11 << 17 || !is_x86_feature_detected!("avx512f") {
            return false;
        }
        request_tile_permission()
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: process-wide and idempotent. Raw syscall, as the crate
/// has no libc binding; fails (and AMX stays off) on kernels before 5.16.
#[cfg(target_os = "linux")]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: arch_prctl with these arguments only changes the process's permitted XSAVE features; the syscall
    // clobbers rcx and r11 and touches no user memory.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

/// Palette 1, eight tiles of 16 rows × 64 bytes: tmm0–3 the 2 × 2 output tiles (f32), tmm4–5 two 16-feature strips
/// of the left operand, tmm6–7 two of the right (each 16 token pairs deep).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Palette 1 has eight tiles; the fields of the other eight must be zero or `ldtilecfg` faults.
const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Stores the 2 × 2 output tiles as a 32 × 32 block at `c`, row stride `ld` bytes.
#[inline(always)]
unsafe fn store(c: *mut f32, ld: usize) {
    let c10 = c.add(16 * ld / 4);
    asm!(
        "tilestored [{c00} + {ld}*1], tmm0",
        "tilestored [{c01} + {ld}*1], tmm1",
        "tilestored [{c10} + {ld}*1], tmm2",
        "tilestored [{c11} + {ld}*1], tmm3",
        c00 = in(reg) c, c01 = in(reg) c.add(16), c10 = in(reg) c10, c11 = in(reg) c10.add(16),
        ld = in(reg) ld, options(nostack),
    );
}

/// The tile's product into `c` (`t.bi × t.bj` f32, row stride `t.bj`): `a` is the `dim_p × pairs` feature-major
/// operand, `b` the `pairs × dim_p` pair-major one. On a diagonal tile only 32 × 32 blocks on or below the
/// diagonal are computed.
///
/// # Safety
/// AMX must be [`available`]; `a` and `b` must hold `pairs × dim_p` elements, `c` at least `t.bi × t.bj`, and
/// `t.i0 + t.bi`, `t.j0 + t.bj` must not exceed `dim_p`; edges multiples of 32, `pairs` of 16.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile(t: &KernelTile, a: *const u32, b: *const u32, c: *mut f32) {
    let (lda, ldb, ldc) = (t.lda * 4, t.ldb * 4, t.bj * 4);
    let mut scratch = [0f32; 32 * 32];
    asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
    for pc in (0..t.pairs).step_by(PAIR_BLOCK) {
        let pe = (pc + PAIR_BLOCK).min(t.pairs);
        for is in (0..t.bi).step_by(32) {
            let js_end = if t.diag { is + 32 } else { t.bj };
            let a0 = a.add((t.i0 + is) * t.lda);
            let a1 = a0.add(16 * t.lda);
            for js in (0..js_end).step_by(32) {
                let c00 = c.add(is * t.bj + js);
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nomem, nostack));
                let b0 = b.add(t.j0 + js);
                for p in (pc..pe).step_by(16) {
                    asm!(
                        "tileloadd tmm4, [{a0} + {lda}*1]",
                        "tileloadd tmm6, [{b0} + {ldb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm7, [{b1} + {ldb}*1]",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm5, [{a1} + {lda}*1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0.add(p), a1 = in(reg) a1.add(p),
                        b0 = in(reg) b0.add(p * t.ldb), b1 = in(reg) b0.add(p * t.ldb + 16),
                        lda = in(reg) lda, ldb = in(reg) ldb, options(nostack, readonly),
                    );
                }
                if pc == 0 {
                    store(c00, ldc);
                } else {
                    store(scratch.as_mut_ptr(), 32 * 4);
                    for r in 0..32 {
                        for j in 0..32 {
                            *c00.add(r * t.bj + j) += scratch[r * 32 + j];
                        }
                    }
                }
            }
        }
    }
    asm!("tilerelease", options(nomem, nostack));
}
