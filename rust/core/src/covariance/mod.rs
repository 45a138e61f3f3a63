//! Streaming covariance of input activations.
//!
//! Every update turns the batch's counted tokens into a dense f32 matrix `X_b` (`n_b × dim`, centred as the mode
//! asks), computes the lower triangle of `X_bᵀ X_b` as f32 matrix products (faer's triangular product on the
//! diagonal tiles, its general product below them) and adds it into an f64 accumulator. The product is where the
//! time goes, and f32 is what makes it as fast as a BLAS `syrk`; the f64 accumulator is what keeps the small
//! eigenvalues (summing thousands of batches in f32 loses two orders of magnitude on them). Centring happens before
//! the product, in f64 from the original values, so a large common offset never cancels catastrophically inside
//! the f32 sums.
//!
//! The accumulator stores only the lower triangle, packed row by row, which halves its memory: a model has many
//! target modules, each holding a `dim × dim` statistic for the whole calibration run.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
mod bf16;
mod convert;
mod gather;
mod product;
mod scratch;
#[cfg(test)]
mod tests;

use rayon::prelude::*;

pub use self::convert::{bf16_to_f32, f16_to_f32};
use self::convert::{f16_table, Bf16Conv, F16Conv, F32Conv, F64Conv};
use self::gather::{diagnose, gather, Plan};
pub use self::scratch::release_scratch;
use self::scratch::Scratch;
use crate::error::{Error, Result};

/// How token activations are centred before their outer products are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Center {
    /// Each sequence is centred on its own (unmasked) mean: `C = (1/n) Σ_seq Σ_tok (x − μ_seq)(x − μ_seq)ᵀ`,
    /// `n` the total number of counted tokens. A `[tokens, dim]` input is one sequence.
    ///
    /// The pooled scatter is divided by the token count, so every token weighs the same however the tokens are
    /// grouped into sequences and batches — which is what makes `merge` exact. (The TLoRA reference instead
    /// averages per-sequence covariances, which over-weights short sequences.) A sequence with one counted token
    /// adds zero scatter but still counts one token; a sequence with none adds nothing.
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

impl Elements<'_> {
    fn len(&self) -> usize {
        match self {
            Elements::F16(d) | Elements::Bf16(d) => d.len(),
            Elements::F32(d) => d.len(),
            Elements::F64(d) => d.len(),
        }
    }
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

/// Accumulates `count`, the token mean and the lower triangle of the scatter matrix in f64.
///
/// State after `n` counted tokens `x_k` (`μ` their mean):
/// - [`Center::None`]: `M = Σ_k x_k x_kᵀ`.
/// - [`Center::Global`]: `M = Σ_k (x_k − μ)(x_k − μ)ᵀ`, kept exact across batches by Chan et al.'s update: a batch
///   of `n_b` tokens with mean `μ_b` and scatter `S_b` (about `μ_b`) turns `(n_a, μ_a, M)` into
///   `(n_a + n_b, μ_a + δ·n_b/n, M + S_b + δδᵀ·n_a·n_b/n)`, `δ = μ_b − μ_a`, `n = n_a + n_b`.
/// - [`Center::Sequence`]: `M = Σ_seq Σ_tok (x − μ_seq)(x − μ_seq)ᵀ`.
///
/// and [`covariance`](Self::covariance) is `M / n` in every mode.
#[derive(Clone)]
pub struct CovarianceAccumulator {
    dim: usize,
    center: Center,
    count: u64,
    /// Mean of all counted tokens, in every mode (`mean()` is the global mean even when centring per sequence).
    mean: Vec<f64>,
    /// Lower triangle of `M`, packed by rows: entry `(i, j)`, `j ≤ i`, lives at `i(i+1)/2 + j`.
    scatter: Vec<f64>,
}

impl std::fmt::Debug for CovarianceAccumulator {
    // The derived form would print `dim²/2` numbers.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CovarianceAccumulator")
            .field("dim", &self.dim)
            .field("center", &self.center)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl CovarianceAccumulator {
    /// A new, empty accumulator. `dim` must be positive.
    pub fn new(dim: usize, center: Center) -> Result<Self> {
        if dim == 0 {
            return Err(Error::Value("covariance dimension must be positive, got 0".into()));
        }
        let packed = dim
            .checked_add(1)
            .and_then(|d1| dim.checked_mul(d1))
            .map(|p| p / 2)
            .filter(|&p| p.checked_mul(std::mem::size_of::<f64>()).is_some_and(|b| b <= isize::MAX as usize))
            .ok_or_else(|| Error::Value(format!("covariance dimension {dim} is too large to store")))?;
        Ok(Self { dim, center, count: 0, mean: zeroed(dim)?, scatter: zeroed(packed)? })
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn center(&self) -> Center {
        self.center
    }
    /// Number of counted (unmasked) tokens so far.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Adds a batch. Validates everything first (shape, mask length, finiteness); on error the accumulator is
    /// unchanged. Zero tokens in the shape is an error; a mask that drops every token is not (nothing is added).
    ///
    /// Values of masked-out tokens are never read, so padding may hold anything. Counted values must be finite and
    /// (for f64 input) within the f32 range the products are computed in.
    pub fn update(&mut self, batch: &Batch<'_>) -> Result<()> {
        self.update_with(batch, bf16::Kernel::detect(), None)
    }

    /// [`update`](Self::update) that `interrupt` can stop: it is called on the caller's thread at most every
    /// 100 ms, and once it returns `true` the update ends with [`Error::Interrupted`] and the accumulator
    /// unchanged. The batch's product itself runs to completion once started (stopping half-way would leave a
    /// partial sum), so feed large data as several batches to bound the wait.
    pub fn update_interruptible(&mut self, batch: &Batch<'_>, interrupt: &dyn Fn() -> bool) -> Result<()> {
        self.update_with(batch, bf16::Kernel::detect(), Some(interrupt))
    }

    /// [`update`](Self::update) with the bf16 kernel chosen by the caller (`None`: the f32 path, for tests) and an
    /// optional interrupt check.
    fn update_with(
        &mut self,
        batch: &Batch<'_>,
        kernel: Option<bf16::Kernel>,
        interrupt: Option<&dyn Fn() -> bool>,
    ) -> Result<()> {
        let dim = self.dim;
        if batch.dim != dim {
            return Err(Error::Shape(format!(
                "batch has {} features per token but the accumulator was created for dim {dim}",
                batch.dim
            )));
        }
        let tokens = batch.sequences.checked_mul(batch.seq_len).ok_or_else(|| {
            Error::Shape(format!(
                "{} sequences × {} tokens overflows the address space",
                batch.sequences, batch.seq_len
            ))
        })?;
        let expected = tokens
            .checked_mul(dim)
            .ok_or_else(|| Error::Shape(format!("{tokens} tokens × {dim} features overflows the address space")))?;
        if batch.data.len() != expected {
            return Err(Error::Shape(format!(
                "batch data has {} elements, expected {} sequences × {} tokens × {dim} features = {expected}",
                batch.data.len(),
                batch.sequences,
                batch.seq_len
            )));
        }
        if let Some(mask) = batch.mask {
            if mask.len() != tokens {
                return Err(Error::Shape(format!(
                    "mask has {} entries, expected {} sequences × {} tokens = {tokens}",
                    mask.len(),
                    batch.sequences,
                    batch.seq_len
                )));
            }
        }
        if tokens == 0 {
            return Err(Error::Empty(format!(
                "batch has no tokens ({} sequences × {} tokens)",
                batch.sequences, batch.seq_len
            )));
        }

        let plan = Plan::new(batch, self.center)?;
        let n_b = plan.rows.len();
        if n_b == 0 {
            return Ok(());
        }
        let new_count = u64::try_from(n_b)
            .ok()
            .and_then(|n| self.count.checked_add(n))
            .ok_or_else(|| Error::Value("token count overflows u64".into()))?;
        if let (Elements::Bf16(data), Center::None, Some(kernel)) = (batch.data, self.center, kernel) {
            // The bf16 kernels run one product per chunk and cannot stop inside it; check once before starting.
            if interrupt.is_some_and(|stop| stop()) {
                return Err(Error::Interrupted);
            }
            return self.update_bf16(batch, data, &plan, kernel, new_count);
        }
        let xt_len = n_b
            .checked_mul(dim)
            .ok_or_else(|| Error::Shape(format!("{n_b} tokens × {dim} features overflows the address space")))?;

        let mut xt = Scratch::checkout(xt_len)?;
        let mut batch_sum = zeroed(dim)?;
        let mut sum_sq = zeroed::<f32>(dim)?;
        let result = crate::threads::run_interruptible(interrupt, |par, stop| -> Result<()> {
            stop.check()?;
            let sums = (&mut batch_sum[..], &mut sum_sq[..]);
            let gathered = match batch.data {
                Elements::F16(d) => gather(&F16Conv(f16_table()), d, &plan, dim, &mut xt, sums),
                Elements::Bf16(d) => gather(&Bf16Conv, d, &plan, dim, &mut xt, sums),
                Elements::F32(d) => gather(&F32Conv, d, &plan, dim, &mut xt, sums),
                Elements::F64(d) => gather(&F64Conv, d, &plan, dim, &mut xt, sums),
            };
            if !gathered {
                return Err(diagnose(batch, &plan, None));
            }
            // Every partial sum of the f32 product is bounded by the diagonal's Σx² (Cauchy–Schwarz) times a
            // rounding slack, so this proves before anything is added that no entry of `X_bᵀ X_b` overflows f32.
            let limit = f64::from(f32::MAX) / (4.0 + n_b as f64 * f64::from(f32::EPSILON));
            if let Some(f) = sum_sq.iter().position(|&s| s.is_nan() || f64::from(s) > limit) {
                return Err(diagnose(batch, &plan, Some((f, f64::from(sum_sq[f])))));
            }
            stop.check()?;
            self.accumulate(&xt, n_b, new_count, &batch_sum, par);
            Ok(())
        });
        xt.checkin();
        result
    }

    /// Folds `other` into `self` exactly, as if its tokens had been fed here. Dims and centring must match.
    ///
    /// `None` and `Sequence` add the scatter sums; `Global` adds them plus Chan's `δδᵀ·n_a·n_b/n` between the two
    /// means.
    pub fn merge(&mut self, other: &CovarianceAccumulator) -> Result<()> {
        if other.dim != self.dim {
            return Err(Error::Shape(format!(
                "cannot merge a dim {} accumulator into a dim {} one",
                other.dim, self.dim
            )));
        }
        if other.center != self.center {
            return Err(Error::Value(format!(
                "cannot merge a {:?}-centred accumulator into a {:?}-centred one",
                other.center.as_str(),
                self.center.as_str()
            )));
        }
        if other.count == 0 {
            return Ok(());
        }
        let new_count =
            self.count.checked_add(other.count).ok_or_else(|| Error::Value("token count overflows u64".into()))?;
        if self.count == 0 {
            self.scatter.copy_from_slice(&other.scatter);
            self.mean.copy_from_slice(&other.mean);
            self.count = other.count;
            return Ok(());
        }
        let dim = self.dim;
        let n_a = self.count as f64;
        let n_b = other.count as f64;
        let n = new_count as f64;
        let delta: Vec<f64> = other.mean.iter().zip(&self.mean).map(|(&b, &a)| b - a).collect();
        let weight = if self.center == Center::Global { n_a * n_b / n } else { 0.0 };
        let scatter = &mut self.scatter;
        crate::threads::run(|_| {
            let start = |i: usize| i * (i + 1) / 2;
            packed_rows(scatter, dim).into_par_iter().enumerate().for_each(|(i, row)| {
                let theirs = &other.scatter[start(i)..start(i) + i + 1];
                let wd = weight * delta[i];
                for ((m, &o), &d) in row.iter_mut().zip(theirs).zip(&delta) {
                    *m += o + wd * d;
                }
            });
        });
        let frac = n_b / n;
        for (m, d) in self.mean.iter_mut().zip(&delta) {
            *m += d * frac;
        }
        self.count = new_count;
        Ok(())
    }

    /// Mean of all counted tokens, length `dim`. Error if nothing was counted.
    pub fn mean(&self) -> Result<Vec<f64>> {
        self.require_tokens()?;
        Ok(self.mean.clone())
    }

    /// The covariance `M / n`, `dim × dim` row-major, exactly symmetric (the upper triangle mirrors the lower).
    /// Error if nothing was counted.
    pub fn covariance(&self) -> Result<Vec<f64>> {
        self.covariance_as::<f64>()
    }

    /// [`covariance`](Self::covariance) rounded once to `T` (each entry divided in f64 first). The f32 form is what
    /// the bases are computed in: asking for it directly holds one `dim × dim` f32 matrix instead of an f64 one and
    /// then its f32 copy — for a 5632-wide input 127 MiB at its peak instead of 381.
    pub fn covariance_as<T: Entry>(&self) -> Result<Vec<T>> {
        self.require_tokens()?;
        let dim = self.dim;
        let len =
            dim.checked_mul(dim).ok_or_else(|| Error::Shape(format!("{dim} × {dim} overflows the address space")))?;
        let mut out = zeroed(len)?;
        let n = self.count as f64;
        let scatter = &self.scatter;
        let start = |i: usize| i * (i + 1) / 2;
        // Blocks of output rows: each block reads the packed rows below it in short contiguous runs instead of
        // walking a column of the packed triangle one element per cache line.
        const BLOCK: usize = 64;
        crate::threads::run(|_| {
            out.par_chunks_mut(BLOCK * dim).enumerate().for_each(|(b, rows)| {
                let i0 = b * BLOCK;
                let i1 = i0 + rows.len() / dim;
                for i in i0..i1 {
                    let dst = &mut rows[(i - i0) * dim..(i - i0) * dim + i + 1];
                    for (o, &m) in dst.iter_mut().zip(&scatter[start(i)..start(i) + i + 1]) {
                        *o = T::from_f64(m / n);
                    }
                }
                for j in i0 + 1..dim {
                    let hi = j.min(i1);
                    for (i, &m) in (i0..hi).zip(&scatter[start(j) + i0..start(j) + hi]) {
                        rows[(i - i0) * dim + j] = T::from_f64(m / n);
                    }
                }
            });
        });
        Ok(out)
    }

    fn require_tokens(&self) -> Result<()> {
        if self.count == 0 {
            Err(Error::Empty("no tokens were accumulated (every update so far was empty or fully masked)".into()))
        } else {
            Ok(())
        }
    }
}

/// An element type the covariance can be read out as.
pub trait Entry: Copy + Default + Send + Sync {
    fn from_f64(v: f64) -> Self;
}

impl Entry for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
}

impl Entry for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

/// Disjoint mutable rows of a packed lower triangle, so rows can be updated in parallel.
fn packed_rows(packed: &mut [f64], dim: usize) -> Vec<&mut [f64]> {
    let mut rows = Vec::with_capacity(dim);
    let mut rest = packed;
    for i in 0..dim {
        let (row, tail) = std::mem::take(&mut rest).split_at_mut(i + 1);
        rows.push(row);
        rest = tail;
    }
    rows
}

fn zeroed<T: Clone + Default>(len: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        Error::OutOfMemory(format!("cannot allocate {len} elements of {} bytes", std::mem::size_of::<T>()))
    })?;
    v.resize(len, T::default());
    Ok(v)
}

/// Runs `f` compiled for the widest SIMD level the CPU offers (AVX2+FMA on x86-64), through the dispatcher faer
/// itself uses. The crate is built for baseline x86-64 (SSE2), where the conversion loops run at a third of the
/// speed; `f` must be `#[inline(always)]` for the target features to reach its body.
#[inline(always)]
fn simd<R>(f: impl FnOnce() -> R) -> R {
    faer::traits::pulp::Arch::new().dispatch(f)
}
