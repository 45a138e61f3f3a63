//! Element formats to f32/f64, exactly.

use std::sync::OnceLock;

/// IEEE binary16 bits to f32, exactly (every f16 is an f32), using integer operations only so that a thread's
/// denormals-are-zero mode cannot flush the subnormals.
pub fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let exp = (h >> 10) & 0x1f;
    let man = h & 0x3ff;
    let bits = if exp == 0x1f {
        // Infinity, or NaN with its payload kept.
        sign | 0x7f80_0000 | (man << 13)
    } else if exp != 0 {
        sign | ((exp + 127 - 15) << 23) | (man << 13)
    } else if man == 0 {
        sign
    } else {
        // Subnormal `man · 2⁻²⁴` is normal in f32: move the leading bit to the implicit position.
        let top = 31 - man.leading_zeros();
        sign | ((top + 127 - 24) << 23) | ((man << (23 - top)) & 0x7f_ffff)
    };
    f32::from_bits(bits)
}

/// bfloat16 bits to f32 (bfloat16 is the top half of an f32).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// All 65536 f16 values: a table lookup is cheaper than the branchy conversion in the gather loop.
pub(super) fn f16_table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(f16_to_f32).collect())
}

/// Reads one element as f64. f64 input stays f64 so that means are computed from the original values.
pub(super) trait Convert: Sync {
    type Raw: Copy + Sync;
    fn to_f64(&self, x: Self::Raw) -> f64;
    /// The value as the f32 the product uses (f64 input rounds to nearest).
    fn to_f32(&self, x: Self::Raw) -> f32;
}

pub(super) struct F16Conv(pub(super) &'static [f32]);
pub(super) struct Bf16Conv;
pub(super) struct F32Conv;
pub(super) struct F64Conv;

impl Convert for F16Conv {
    type Raw = u16;
    #[inline(always)]
    fn to_f64(&self, x: u16) -> f64 {
        // The table has exactly 65536 entries, so this index is always in bounds.
        f64::from(self.0[usize::from(x)])
    }
    #[inline(always)]
    fn to_f32(&self, x: u16) -> f32 {
        self.0[usize::from(x)]
    }
}
impl Convert for Bf16Conv {
    type Raw = u16;
    #[inline(always)]
    fn to_f64(&self, x: u16) -> f64 {
        f64::from(bf16_to_f32(x))
    }
    #[inline(always)]
    fn to_f32(&self, x: u16) -> f32 {
        bf16_to_f32(x)
    }
}
impl Convert for F32Conv {
    type Raw = f32;
    #[inline(always)]
    fn to_f64(&self, x: f32) -> f64 {
        f64::from(x)
    }
    #[inline(always)]
    fn to_f32(&self, x: f32) -> f32 {
        x
    }
}
impl Convert for F64Conv {
    type Raw = f64;
    #[inline(always)]
    fn to_f64(&self, x: f64) -> f64 {
        x
    }
    #[inline(always)]
    fn to_f32(&self, x: f64) -> f32 {
        x as f32
    }
}
