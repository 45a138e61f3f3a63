//! Scratch buffers kept between updates.

use std::sync::Mutex;

use super::zeroed;
use crate::error::Result;

/// Process-wide scratch for the transposed batch (64 MiB for 4096 tokens at dim 4096). Keeping it between updates
/// saves a fresh buffer's page faults on every update (a few percent of the update); keeping it per process
/// rather than per accumulator keeps memory at one buffer however many modules are being calibrated.
static XT_SCRATCH: Mutex<Vec<f32>> = Mutex::new(Vec::new());

pub(super) struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

impl Scratch {
    /// Takes the cached buffer if it is large enough (its stale contents are overwritten before being read), or a
    /// fresh one. Concurrent updates simply get their own.
    pub(super) fn checkout(len: usize) -> Result<Self> {
        let cached = std::mem::take(&mut *XT_SCRATCH.lock().unwrap_or_else(|e| e.into_inner()));
        let buf = if cached.len() >= len { cached } else { zeroed(len)? };
        Ok(Self { buf, len })
    }

    /// Returns the buffer to the cache, keeping whichever of it and the cached one is larger.
    pub(super) fn checkin(self) {
        let mut cached = XT_SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
        if cached.len() < self.buf.len() {
            *cached = self.buf;
        }
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

/// Frees the scratch buffer updates keep between calls (`4 · tokens · dim` bytes for the largest update so far).
/// The next update allocates it again.
pub fn release_scratch() {
    *XT_SCRATCH.lock().unwrap_or_else(|e| e.into_inner()) = Vec::new();
}
