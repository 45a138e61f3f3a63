//! Streaming covariance of input activations.
//!
//! TODO(helper): implement per the contract below.

use crate::error::{Error, Result};

/// How token activations are centred before their outer products are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Center {
    /// Each sequence is centred on its own (unmasked) mean: `C = (1/n) Σ_seq Σ_tok (x − μ_seq)(x − μ_seq)ᵀ`,
    /// `n` the total number of counted tokens. A `[tokens, dim]` input is one sequence.
    Sequence,
    /// All tokens centred on the global mean of everything accumulated so far (Chan's parallel update).
    Global,
    /// No centring: the second moment `(1/n) Σ x xᵀ`.
    None,
}

impl std::str::FromStr for Center {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sequence" => Ok(Center::Sequence),
            "global" => Ok(Center::Global),
            "none" => Ok(Center::None),
            other => Err(Error::Value(format!(
                "unknown centring mode {other:?}: expected \"sequence\", \"global\" or \"none\""
            ))),
        }
    }
}

impl Center {
    pub fn as_str(self) -> &'static str {
        match self {
            Center::Sequence => "sequence",
            Center::Global => "global",
            Center::None => "none",
        }
    }
}

/// Borrowed, contiguous, row-major element data of a batch. 16-bit formats are raw bit patterns.
#[derive(Debug, Clone, Copy)]
pub enum Elements<'a> {
    F16(&'a [u16]),
    Bf16(&'a [u16]),
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// One update's input: `sequences × seq_len` tokens of `dim` features, row-major, plus an optional keep-mask of
/// `sequences × seq_len` entries (`true` = counted; padding is `false`).
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub data: Elements<'a>,
    pub sequences: usize,
    pub seq_len: usize,
    pub dim: usize,
    pub mask: Option<&'a [bool]>,
}

/// Accumulates `count`, the token sum and the lower triangle of the scatter matrix in f64.
#[derive(Debug, Clone)]
pub struct CovarianceAccumulator {
    // TODO(helper)
    dim: usize,
    center: Center,
}

impl CovarianceAccumulator {
    /// A new, empty accumulator. `dim` must be positive.
    pub fn new(dim: usize, center: Center) -> Result<Self> {
        let _ = (dim, center);
        todo!()
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn center(&self) -> Center {
        self.center
    }
    /// Number of counted (unmasked) tokens so far.
    pub fn count(&self) -> u64 {
        todo!()
    }
    /// Adds a batch. Validates everything first (shape, mask length, finiteness); on error the accumulator is
    /// unchanged. Zero tokens in the shape is an error; a mask that drops every token is not (nothing is added).
    pub fn update(&mut self, batch: &Batch<'_>) -> Result<()> {
        let _ = batch;
        todo!()
    }
    /// Folds `other` into `self` exactly, as if its tokens had been fed here. Dims and centring must match.
    pub fn merge(&mut self, other: &CovarianceAccumulator) -> Result<()> {
        let _ = other;
        todo!()
    }
    /// Mean of all counted tokens, length `dim`. Error if nothing was counted.
    pub fn mean(&self) -> Result<Vec<f64>> {
        todo!()
    }
    /// The covariance, `dim × dim` row-major, exactly symmetric. Error if nothing was counted.
    pub fn covariance(&self) -> Result<Vec<f64>> {
        todo!()
    }
}
