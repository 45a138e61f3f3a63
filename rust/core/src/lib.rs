//! lowrank-core: the CPU-side calibration math of lowrank-rs, in pure Rust.
//!
//! - [`covariance`]: streaming input-activation covariance (f32 products, f64 accumulation, masks, three centring
//!   modes, exact merge).
//! - [`rsvd`]: randomized SVD over a linear-operator trait, and the task-aware basis of `W·C` without forming it.
//! - [`allocate`]: budgeted integer rank allocation and per-module scale allocation.
//! - [`package`]: PEFT-layout adapter directories (safetensors + JSON), validated on read, written atomically.
//!
//! Nothing here knows about Python; `lowrank-py` is a thin binding over these functions.

pub mod allocate;
pub mod covariance;
pub mod error;
mod memory;
pub mod package;
pub mod rsvd;
pub mod threads;

pub use error::{Error, Result};
