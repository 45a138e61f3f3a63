//! Fallible allocation of the buffers the core sizes from its inputs.
//!
//! Rust's infallible allocations abort the process when memory runs out (or panic, in faer's stack buffers), and a
//! Python host loses everything with it. Every buffer whose size comes from an input shape or a file header is
//! therefore allocated here, and a refusal becomes [`Error::OutOfMemory`] that the caller can handle. Small
//! fixed-size bookkeeping is left to the ordinary allocator.

use faer::dyn_stack::{MemBuffer, StackReq};
use faer::Mat;

use crate::error::{Error, Result};

fn refused(what: &str, bytes: Option<usize>) -> Error {
    match bytes {
        Some(b) => Error::OutOfMemory(format!("cannot allocate {b} bytes for {what}")),
        None => Error::OutOfMemory(format!("{what} is too large to address")),
    }
}

/// A copy of `src`.
pub(crate) fn copy_of<T: Clone>(src: &[T], what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(src.len()).map_err(|_| refused(what, Some(std::mem::size_of_val(src))))?;
    v.extend_from_slice(src);
    Ok(v)
}

/// A `rows × cols` matrix of `value`. faer's own constructors abort when the allocation fails, so the storage is
/// reserved fallibly first; the fill then stays within that capacity.
pub(crate) fn mat_of<T: Clone>(rows: usize, cols: usize, value: T, what: &str) -> Result<Mat<T>> {
    let bytes = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(std::mem::size_of::<T>()))
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| refused(what, None))?;
    let mut m = Mat::<T>::new();
    m.try_reserve(rows, cols).map_err(|_| refused(what, Some(bytes)))?;
    m.resize_with(rows, cols, |_, _| value.clone());
    Ok(m)
}

/// The scratch memory faer's decompositions need.
pub(crate) fn buffer(req: StackReq, what: &str) -> Result<MemBuffer> {
    MemBuffer::try_new(req).map_err(|_| refused(what, Some(req.size_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_errors() {
        let e = copy_of(&[0u8; 4][..], "x").map(|v| v.len());
        assert_eq!(e.unwrap(), 4);
        let e = mat_of(usize::MAX / 4, 3, 0f64, "a test matrix").unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(ref m) if m.contains("too large")), "{e}");
        // Addressable but far beyond any machine: the allocator refuses, nothing aborts.
        let e = mat_of(1 << 30, 1 << 20, 0f32, "a huge matrix").unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
        assert_eq!(mat_of(3, 2, 1.5f64, "m").unwrap(), Mat::from_fn(3, 2, |_, _| 1.5));
        assert_eq!(copy_of(&[1, 2, 3], "c").unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn a_covariance_too_large_for_memory_is_out_of_memory() {
        use crate::covariance::{Center, CovarianceAccumulator};
        // 2^47 packed f64 entries: addressable, but no machine has a petabyte.
        let e = CovarianceAccumulator::new(1 << 24, Center::None).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
    }
}
