//! Scratch buffers kept between updates.

use std::sync::Mutex;

use super::zeroed;
use crate::error::Result;

/// Process-wide scratch for the transposed batch (64 MiB for 4096 tokens at dim 4096). Keeping it between updates
/// saves a fresh buffer's page faults on every update (a few percent of the update); keeping it per process
/// rather than per accumulator keeps memory at one buffer however many modules are being calibrated.
static XT_SCRATCH: Mutex<Vec<f32>> = Mutex::new(Vec::new());

/// The same for the bf16 kernels' packed token pairs (two copies of a chunk, 64 MiB at 4096 tokens × dim 4096).
static PAIR_SCRATCH: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Element types with a process-wide cached buffer.
pub(super) trait Cached: Clone + Default + Sized + 'static {
    fn cache() -> &'static Mutex<Vec<Self>>;
}

impl Cached for f32 {
    fn cache() -> &'static Mutex<Vec<f32>> {
        &XT_SCRATCH
    }
}

impl Cached for u32 {
    fn cache() -> &'static Mutex<Vec<u32>> {
        &PAIR_SCRATCH
    }
}

pub(super) struct Scratch<T: Cached> {
    buf: Vec<T>,
    len: usize,
}

impl<T: Cached> Scratch<T> {
    /// Takes the cached buffer if it is large enough (its stale contents are overwritten before being read), or a
    /// fresh one. Concurrent updates simply get their own.
    pub(super) fn checkout(len: usize) -> Result<Self> {
        let cached = std::mem::take(&mut *T::cache().lock().unwrap_or_else(|e| e.into_inner()));
        let buf = if cached.len() >= len { cached } else { zeroed(len)? };
        Ok(Self { buf, len })
    }

    /// Returns the buffer to the cache, keeping whichever of it and the cached one is larger.
    pub(super) fn checkin(self) {
        let mut cached = T::cache().lock().unwrap_or_else(|e| e.into_inner());
        if cached.len() < self.buf.len() {
            *cached = self.buf;
        }
    }
}

impl<T: Cached> std::ops::Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[..self.len]
    }
}

impl<T: Cached> std::ops::DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[..self.len]
    }
}

/// Frees the scratch buffers updates keep between calls (`4 · tokens · dim` bytes for the largest update so far).
/// The next update allocates them again.
pub fn release_scratch() {
    *XT_SCRATCH.lock().unwrap_or_else(|e| e.into_inner()) = Vec::new();
    *PAIR_SCRATCH.lock().unwrap_or_else(|e| e.into_inner()) = Vec::new();
}
