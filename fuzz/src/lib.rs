//! The fuzz targets of lowrank-core, as plain functions of a byte string so that libFuzzer (`fuzz_targets/`) and
//! the deterministic driver (`src/bin/drive.rs`, for toolchains without libFuzzer) run the same code.
//!
//! A target passes when the core returns (`Ok` or `Err`) without panicking, and what it returns is consistent.

use faer::{Mat, MatRef};
use lowrank_core::covariance::{Batch, Center, CovarianceAccumulator, Elements};
use lowrank_core::package::{self, TensorView};
use lowrank_core::rsvd::{self, SvdOptions};

/// Safetensors parsing of arbitrary bytes, the re-encoding of whatever parses, and the config normalisation.
pub fn adapter_file(data: &[u8]) {
    if let Ok((tensors, _)) = package::parse_safetensors_bytes(data) {
        for (_, t) in &tensors {
            let n: usize = t.shape.iter().product::<usize>() * t.dtype.size();
            assert_eq!(n, t.data.len(), "a parsed tensor's data does not match its shape");
        }
        // Whatever parses must survive an encoding and a re-parse unchanged.
        let views: Vec<TensorView<'_>> = tensors
            .iter()
            .map(|(name, t)| TensorView { name, dtype: t.dtype, shape: &t.shape, data: &t.data })
            .collect();
        if let Ok(bytes) = package::encode_safetensors(&views, None) {
            let (again, _) = package::parse_safetensors_bytes(&bytes).expect("re-parsing what was just encoded");
            assert_eq!(again, tensors, "round trip changed the tensors");
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(normal) = package::normalise_config(text) {
            assert_eq!(package::normalise_config(&normal).expect("normal form parses"), normal, "not idempotent");
        }
    }
}

/// Reads little-endian numbers off the input; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn upto(&mut self, max: usize) -> usize {
        self.byte() as usize % (max + 1)
    }
    fn f32(&mut self) -> f32 {
        f32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    fn f64(&mut self) -> f64 {
        f64::from_le_bytes(std::array::from_fn(|_| self.byte()))
    }
    /// Mostly tame values (small integers and scaled ones), sometimes raw bit patterns (NaN, ∞, subnormals).
    fn value(&mut self) -> f64 {
        match self.byte() % 8 {
            0 => self.f64(),
            1 => self.f32() as f64,
            2 => 0.0,
            k => (self.byte() as i8 as f64) * 10f64.powi((k as i32 - 5) * 10),
        }
    }
}

/// A covariance accumulator fed arbitrary shapes, masks, centring modes and values (dim ≤ 24, ≤ 64 tokens).
pub fn covariance(data: &[u8]) {
    let mut b = Bytes(data);
    let dim = b.upto(24);
    let center = [Center::None, Center::Global, Center::Sequence][b.upto(2)];
    let Ok(mut acc) = CovarianceAccumulator::new(dim, center) else {
        assert_eq!(dim, 0);
        return;
    };
    let mut other = CovarianceAccumulator::new(dim, center).unwrap();
    for round in 0..b.upto(3) + 1 {
        let (sequences, seq_len) = (b.upto(4), b.upto(16));
        let tokens = sequences * seq_len;
        // Sometimes a wrong length, to exercise the shape checks.
        let len = if b.upto(15) == 0 { (tokens * dim).saturating_sub(1) } else { tokens * dim };
        let mask: Option<Vec<bool>> = (b.upto(1) == 1).then(|| (0..tokens).map(|_| b.upto(3) != 0).collect());
        let wide = b.upto(1) == 1;
        let values: Vec<f64> = (0..len).map(|_| b.value()).collect();
        let (f32s, f64s): (Vec<f32>, Vec<f64>) = (values.iter().map(|&v| v as f32).collect(), values.clone());
        let elements = if wide { Elements::F64(&f64s) } else { Elements::F32(&f32s) };
        let batch = Batch { data: elements, sequences, seq_len, dim, mask: mask.as_deref() };
        let target = if round % 2 == 0 { &mut acc } else { &mut other };
        let before = target.count();
        if target.update(&batch).is_err() {
            assert_eq!(target.count(), before, "a failed update changed the count");
        }
    }
    let _ = acc.merge(&other);
    if let Ok(cov) = acc.covariance() {
        for i in 0..dim {
            for j in 0..dim {
                let (x, y) = (cov[i * dim + j], cov[j * dim + i]);
                assert!(x == y || (x.is_nan() && y.is_nan()), "covariance not symmetric at ({i}, {j})");
            }
        }
    }
}

/// Randomized SVD and the task-aware basis of arbitrary small matrices (≤ 24 × 24) and options.
pub fn rsvd(data: &[u8]) {
    let mut b = Bytes(data);
    let (m, n) = (b.upto(24), b.upto(24));
    let opts = SvdOptions { rank: b.upto(26), oversample: b.upto(12), power_iters: b.upto(4), seed: b.byte() as u64 };
    let values: Vec<f64> = (0..m * n).map(|_| b.value()).collect();
    if b.upto(1) == 0 {
        let a = Mat::from_fn(m, n, |i, j| values[i * n + j]);
        check_svd(a.as_ref(), &opts);
        let a32 = Mat::from_fn(m, n, |i, j| values[i * n + j] as f32);
        check_svd(a32.as_ref(), &opts);
    } else {
        let w = Mat::from_fn(m, n, |i, j| values[i * n + j]);
        let g: Vec<f64> = (0..n * n).map(|_| b.value()).collect();
        // Symmetric most of the time, so that the decomposition itself is reached.
        let symmetric = b.upto(3) != 0;
        let c = Mat::from_fn(n, n, |i, j| if symmetric && j > i { g[j * n + i] } else { g[i * n + j] });
        if let Ok((vt, s)) = rsvd::task_aware_basis(w.as_ref(), c.as_ref(), &opts) {
            assert_eq!(vt.shape(), (opts.rank, n));
            assert!(s.iter().all(|x| x.is_finite() && *x >= 0.0), "singular values {s:?}");
        }
    }
}

fn check_svd<T: rsvd::Real>(a: MatRef<'_, T>, opts: &SvdOptions) {
    if let Ok(svd) = rsvd::randomized_svd_dense(a, opts) {
        assert_eq!(svd.u.shape(), (a.nrows(), opts.rank));
        assert_eq!(svd.vt.shape(), (opts.rank, a.ncols()));
        assert!(svd.s.iter().all(|x| x.finite() && x.to_f64() >= 0.0), "non-finite or negative singular value");
        assert!(svd.s.windows(2).all(|p| p[1] <= p[0]), "singular values not descending");
    }
}
