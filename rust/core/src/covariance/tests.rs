use super::convert::{bf16_to_f32, f16_table, f16_to_f32};
use super::product::{tile_size, MAX_TILE, MIN_TILE};
use super::*;

/// One batch of a test stream: values, sequences, seq_len, mask.
type Spec<T> = (Vec<T>, usize, usize, Option<Vec<bool>>);

/// splitmix64: deterministic, dependency-free test data.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    /// Roughly normal (sum of uniforms), exactly representable in f32.
    fn normal32(&mut self) -> f32 {
        (self.uniform() + self.uniform() + self.uniform()) as f32
    }
}

/// Correlated data with a per-feature offset and scale, so the three modes give clearly different answers.
fn random_data(rng: &mut Rng, tokens: usize, dim: usize, offset: f32) -> Vec<f32> {
    let scales: Vec<f32> = (0..dim).map(|f| 0.5 + (f % 7) as f32 * 0.3).collect();
    let offsets: Vec<f32> = (0..dim).map(|f| offset * (1.0 + (f % 3) as f32)).collect();
    let mut out = Vec::with_capacity(tokens * dim);
    for t in 0..tokens {
        let common = rng.normal32();
        let drift = (t % 5) as f32 * 0.25;
        for f in 0..dim {
            out.push(offsets[f] + drift + scales[f] * rng.normal32() + 0.5 * common);
        }
    }
    out
}

/// Naive f64 oracle over a stream of (values, sequences, seq_len, mask) batches: returns (n, mean, cov).
fn oracle(batches: &[Spec<f64>], dim: usize, center: Center) -> (u64, Vec<f64>, Vec<f64>) {
    // Collect counted tokens grouped by sequence.
    let mut seqs: Vec<Vec<&[f64]>> = Vec::new();
    for (data, sequences, seq_len, mask) in batches {
        for s in 0..*sequences {
            let mut seq = Vec::new();
            for t in 0..*seq_len {
                let r = s * seq_len + t;
                if mask.as_ref().is_none_or(|m| m[r]) {
                    seq.push(&data[r * dim..(r + 1) * dim]);
                }
            }
            seqs.push(seq);
        }
    }
    let all: Vec<&[f64]> = seqs.iter().flatten().copied().collect();
    let n = all.len();
    let mean_of = |rows: &[&[f64]]| -> Vec<f64> {
        let mut m = vec![0.0; dim];
        for r in rows {
            for f in 0..dim {
                m[f] += r[f];
            }
        }
        m.iter().map(|s| s / rows.len() as f64).collect()
    };
    let global = mean_of(&all);
    let mut cov = vec![0.0; dim * dim];
    let mut add = |rows: &[&[f64]], mu: &[f64]| {
        for r in rows {
            for i in 0..dim {
                for j in 0..dim {
                    cov[i * dim + j] += (r[i] - mu[i]) * (r[j] - mu[j]);
                }
            }
        }
    };
    match center {
        Center::None => add(&all, &vec![0.0; dim]),
        Center::Global => add(&all, &global),
        Center::Sequence => {
            for seq in seqs.iter().filter(|s| !s.is_empty()) {
                add(seq, &mean_of(seq));
            }
        }
    }
    cov.iter_mut().for_each(|c| *c /= n as f64);
    (n as u64, global, cov)
}

fn assert_close(got: &[f64], want: &[f64], dim: usize, tol: f64) {
    assert_eq!(got.len(), want.len());
    for i in 0..dim {
        for j in 0..dim {
            let scale = (want[i * dim + i] * want[j * dim + j]).sqrt().max(1e-30);
            let err = (got[i * dim + j] - want[i * dim + j]).abs() / scale;
            assert!(err <= tol, "({i},{j}): got {} want {} (rel {err:e})", got[i * dim + j], want[i * dim + j]);
        }
    }
}

fn assert_symmetric(c: &[f64], dim: usize) {
    for i in 0..dim {
        for j in 0..dim {
            assert_eq!(c[i * dim + j].to_bits(), c[j * dim + i].to_bits(), "({i},{j}) not mirrored");
        }
    }
}

fn batch<'a>(data: &'a [f32], sequences: usize, seq_len: usize, dim: usize, mask: Option<&'a [bool]>) -> Batch<'a> {
    Batch { data: Elements::F32(data), sequences, seq_len, dim, mask }
}

const MODES: [Center; 3] = [Center::Sequence, Center::Global, Center::None];

/// A stream of masked batches, some with all-padding sequences, some unmasked.
fn stream(rng: &mut Rng, dim: usize) -> Vec<Spec<f32>> {
    let mut out = Vec::new();
    for (b, &(sequences, seq_len)) in [(3, 17), (1, 40), (4, 9), (2, 1), (5, 33)].iter().enumerate() {
        let data = random_data(rng, sequences * seq_len, dim, 3.0 + b as f32);
        let mask = if b == 1 {
            None
        } else {
            let mut m: Vec<bool> = (0..sequences * seq_len).map(|_| !rng.next_u64().is_multiple_of(4)).collect();
            // Second sequence entirely padding; last sequence exactly one counted token.
            if sequences > 1 {
                m[seq_len..2 * seq_len].iter_mut().for_each(|k| *k = false);
                let last = (sequences - 1) * seq_len;
                m[last..].iter_mut().for_each(|k| *k = false);
                m[last] = true;
            }
            Some(m)
        };
        out.push((data, sequences, seq_len, mask));
    }
    out
}

fn as_f64(s: &[Spec<f32>]) -> Vec<Spec<f64>> {
    s.iter().map(|(d, a, b, m)| (d.iter().map(|&x| f64::from(x)).collect(), *a, *b, m.clone())).collect()
}

fn feed(acc: &mut CovarianceAccumulator, s: &[Spec<f32>]) {
    for (d, sequences, seq_len, m) in s {
        acc.update(&batch(d, *sequences, *seq_len, acc.dim(), m.as_deref())).unwrap();
    }
}

#[test]
fn matches_oracle_in_every_mode() {
    for dim in [1, 5, 37, 130] {
        let mut rng = Rng(dim as u64);
        let s = stream(&mut rng, dim);
        for center in MODES {
            let mut acc = CovarianceAccumulator::new(dim, center).unwrap();
            feed(&mut acc, &s);
            let (n, mean, want) = oracle(&as_f64(&s), dim, center);
            assert_eq!(acc.count(), n);
            let got_mean = acc.mean().unwrap();
            for f in 0..dim {
                assert!((got_mean[f] - mean[f]).abs() <= 1e-12 * mean[f].abs().max(1.0));
            }
            let got = acc.covariance().unwrap();
            assert_symmetric(&got, dim);
            assert_close(&got, &want, dim, 2e-6);
            // The f32 read-out is the f64 covariance rounded once, entry by entry.
            let narrow = acc.covariance_as::<f32>().unwrap();
            assert_eq!(narrow.len(), got.len());
            assert!(got.iter().zip(&narrow).all(|(&w, &n)| (w as f32).to_bits() == n.to_bits()));
        }
    }
    let empty = CovarianceAccumulator::new(3, Center::None).unwrap();
    assert!(matches!(empty.covariance_as::<f32>(), Err(Error::Empty(_))));
}

#[test]
fn tiled_product_matches_oracle() {
    // dim 1100 cuts into 256-wide tiles (a partial last panel) on 2 threads, other sizes elsewhere.
    let dim = 1100;
    let mut rng = Rng(1100);
    let s: Vec<_> = [(3usize, 13usize), (2, 7)]
        .iter()
        .map(|&(sequences, seq_len)| {
            let mask: Vec<bool> = (0..sequences * seq_len).map(|r| r % 5 != 2).collect();
            (random_data(&mut rng, sequences * seq_len, dim, 1.5), sequences, seq_len, Some(mask))
        })
        .collect();
    for center in MODES {
        let mut acc = CovarianceAccumulator::new(dim, center).unwrap();
        feed(&mut acc, &s);
        let (n, _, want) = oracle(&as_f64(&s), dim, center);
        assert_eq!(acc.count(), n);
        let got = acc.covariance().unwrap();
        assert_symmetric(&got, dim);
        assert_close(&got, &want, dim, 2e-6);
    }
}

#[test]
fn tile_sizes() {
    assert_eq!(tile_size(4096, 2), 512);
    assert_eq!(tile_size(4096, 16), 256);
    assert_eq!(tile_size(1100, 2), 256);
    assert_eq!(tile_size(10, 64), MIN_TILE);
    for dim in [1, 63, 64, 65, 700, 4097, 11008] {
        for threads in [1, 2, 3, 16, 128] {
            let t = tile_size(dim, threads);
            assert!((MIN_TILE..=MAX_TILE).contains(&t) && t.is_power_of_two());
        }
    }
}

#[test]
fn modes_differ_on_offset_data() {
    let dim = 4;
    let mut rng = Rng(7);
    let s = stream(&mut rng, dim);
    let covs: Vec<Vec<f64>> = MODES
        .iter()
        .map(|&c| {
            let mut acc = CovarianceAccumulator::new(dim, c).unwrap();
            feed(&mut acc, &s);
            acc.covariance().unwrap()
        })
        .collect();
    assert!((covs[0][0] - covs[1][0]).abs() > 1e-3);
    assert!((covs[1][0] - covs[2][0]).abs() > 1.0);
}

#[test]
fn global_centring_survives_a_large_offset() {
    // Mean 1e4, unit variance: an uncentred f32 sum would lose the variance entirely.
    let dim = 8;
    let mut rng = Rng(11);
    let s: Vec<_> = (0..4).map(|_| (random_data(&mut rng, 300, dim, 1e4), 1, 300, None)).collect();
    let mut acc = CovarianceAccumulator::new(dim, Center::Global).unwrap();
    feed(&mut acc, &s);
    let (_, _, want) = oracle(&as_f64(&s), dim, Center::Global);
    assert_close(&acc.covariance().unwrap(), &want, dim, 1e-6);
}

#[test]
fn other_element_types() {
    let dim = 6;
    let (sequences, seq_len) = (3, 11);
    let tokens = sequences * seq_len;
    let mut rng = Rng(3);
    // Bit patterns of moderate, sign-varying values (f16 exponents 12..18, bf16 exponents 124..130), plus a
    // few subnormals in f16.
    let f16: Vec<u16> = (0..tokens * dim)
        .map(|i| {
            let r = rng.next_u64();
            if i % 17 == 0 {
                (r as u16) & 0x83ff
            } else {
                ((r as u16) & 0x83ff) | ((12 + (r >> 20) % 7) as u16) << 10
            }
        })
        .collect();
    let bf16: Vec<u16> = (0..tokens * dim)
        .map(|_| {
            let r = rng.next_u64();
            ((r as u16) & 0x807f) | ((124 + (r >> 20) % 7) as u16) << 7
        })
        .collect();
    let f64s: Vec<f64> = (0..tokens * dim).map(|_| rng.uniform() * 3.0 + 1.0).collect();
    let mask: Vec<bool> = (0..tokens).map(|r| r % 4 != 1).collect();
    let cases: Vec<(Elements<'_>, Vec<f64>)> = vec![
        (Elements::F16(&f16), f16.iter().map(|&h| f64::from(f16_to_f32(h))).collect()),
        (Elements::Bf16(&bf16), bf16.iter().map(|&h| f64::from(bf16_to_f32(h))).collect()),
        // f64 input is rounded to f32 only after centring; the oracle sees the original values.
        (Elements::F64(&f64s), f64s.clone()),
    ];
    for (data, values) in cases {
        for center in MODES {
            let mut acc = CovarianceAccumulator::new(dim, center).unwrap();
            acc.update(&Batch { data, sequences, seq_len, dim, mask: Some(&mask) }).unwrap();
            let (n, mean, want) = oracle(&[(values.clone(), sequences, seq_len, Some(mask.clone()))], dim, center);
            assert_eq!(acc.count(), n);
            let got_mean = acc.mean().unwrap();
            for f in 0..dim {
                assert!((got_mean[f] - mean[f]).abs() <= 1e-12 * mean[f].abs().max(1.0), "{data:?}");
            }
            assert_close(&acc.covariance().unwrap(), &want, dim, 2e-6);
        }
    }
}

#[test]
fn merge_of_split_streams_equals_one_stream() {
    let dim = 23;
    let mut rng = Rng(5);
    let s = stream(&mut rng, dim);
    for center in MODES {
        let mut whole = CovarianceAccumulator::new(dim, center).unwrap();
        feed(&mut whole, &s);
        for split in 0..=s.len() {
            let mut a = CovarianceAccumulator::new(dim, center).unwrap();
            let mut b = CovarianceAccumulator::new(dim, center).unwrap();
            feed(&mut a, &s[..split]);
            feed(&mut b, &s[split..]);
            a.merge(&b).unwrap();
            assert_eq!(a.count(), whole.count());
            let (ma, mw) = (a.mean().unwrap(), whole.mean().unwrap());
            for f in 0..dim {
                assert!((ma[f] - mw[f]).abs() <= 1e-12 * mw[f].abs().max(1.0));
            }
            let (ca, cw) = (a.covariance().unwrap(), whole.covariance().unwrap());
            for (x, y) in ca.iter().zip(&cw) {
                assert!((x - y).abs() <= 1e-12 * cw[0].abs().max(1.0), "{center:?} split {split}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn merge_empty_is_noop_and_into_empty_copies() {
    let dim = 9;
    let mut rng = Rng(9);
    let s = stream(&mut rng, dim);
    for center in MODES {
        let mut full = CovarianceAccumulator::new(dim, center).unwrap();
        feed(&mut full, &s);
        let before = (full.count(), full.mean().unwrap(), full.covariance().unwrap());
        full.merge(&CovarianceAccumulator::new(dim, center).unwrap()).unwrap();
        assert_eq!((full.count(), full.mean().unwrap(), full.covariance().unwrap()), before);
        let mut empty = CovarianceAccumulator::new(dim, center).unwrap();
        empty.merge(&full).unwrap();
        assert_eq!((empty.count(), empty.mean().unwrap(), empty.covariance().unwrap()), before);
    }
}

#[test]
fn sequence_mode_batching_does_not_matter() {
    let (dim, seq_len) = (12, 20);
    let mut rng = Rng(13);
    let data = random_data(&mut rng, 2 * seq_len, dim, 2.0);
    let mask: Vec<bool> = (0..2 * seq_len).map(|r| r % 3 != 0).collect();
    let mut together = CovarianceAccumulator::new(dim, Center::Sequence).unwrap();
    together.update(&batch(&data, 2, seq_len, dim, Some(&mask))).unwrap();
    let mut apart = CovarianceAccumulator::new(dim, Center::Sequence).unwrap();
    let half = seq_len * dim;
    apart.update(&batch(&data[..half], 1, seq_len, dim, Some(&mask[..seq_len]))).unwrap();
    apart.update(&batch(&data[half..], 1, seq_len, dim, Some(&mask[seq_len..]))).unwrap();
    assert_eq!(together.count(), apart.count());
    assert_close(&together.covariance().unwrap(), &apart.covariance().unwrap(), dim, 1e-6);
    // ...and is not the same as treating the two sequences as one.
    let mut one = CovarianceAccumulator::new(dim, Center::Sequence).unwrap();
    one.update(&batch(&data, 1, 2 * seq_len, dim, Some(&mask))).unwrap();
    assert!((one.covariance().unwrap()[0] - together.covariance().unwrap()[0]).abs() > 1e-3);
}

#[test]
fn single_token_sequences_count_but_add_no_scatter() {
    let dim = 3;
    let data = [1.0f32, 2.0, 3.0, -4.0, 5.0, 6.0, 7.0, 8.0, -9.0];
    let mut acc = CovarianceAccumulator::new(dim, Center::Sequence).unwrap();
    acc.update(&batch(&data, 3, 1, dim, None)).unwrap();
    assert_eq!(acc.count(), 3);
    assert!(acc.covariance().unwrap().iter().all(|&c| c == 0.0));
    assert_eq!(acc.mean().unwrap(), vec![4.0 / 3.0, 5.0, 0.0]);
}

#[test]
fn clone_behaves_identically() {
    let dim = 17;
    let mut rng = Rng(17);
    let s = stream(&mut rng, dim);
    let mut a = CovarianceAccumulator::new(dim, Center::Global).unwrap();
    feed(&mut a, &s[..2]);
    let mut b = a.clone();
    feed(&mut a, &s[2..]);
    feed(&mut b, &s[2..]);
    assert_eq!(a.covariance().unwrap(), b.covariance().unwrap());
    assert_eq!(a.mean().unwrap(), b.mean().unwrap());
}

#[test]
fn f16_known_bit_patterns() {
    let cases: [(u16, f32); 12] = [
        (0x0000, 0.0),
        (0x3c00, 1.0),
        (0xc000, -2.0),
        (0x3555, 0.333_251_95),
        (0x7bff, 65504.0),
        (0x0400, 6.103_515_6e-5),  // smallest normal 2^-14
        (0x0001, 5.960_464_5e-8),  // smallest subnormal 2^-24
        (0x03ff, 6.097_555e-5),    // largest subnormal 1023·2^-24
        (0x8200, -3.051_757_8e-5), // -512·2^-24
        (0x7c00, f32::INFINITY),
        (0xfc00, f32::NEG_INFINITY),
        (0x3e00, 1.5),
    ];
    for (bits, want) in cases {
        assert_eq!(f16_to_f32(bits), want, "{bits:#06x}");
    }
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x8000).to_bits(), 0x8000_0000);
    assert!(f16_to_f32(0x7e00).is_nan());
    assert!(f16_to_f32(0xfd01).is_nan());
    // Table and scalar agree everywhere, NaN payloads included.
    let table = f16_table();
    for h in 0..=u16::MAX {
        assert_eq!(table[usize::from(h)].to_bits(), f16_to_f32(h).to_bits());
    }
    // Every finite f16 round-trips through the exact value 2^(e-15)·(1+m/1024) / m·2^-24.
    for h in 0..0x7c00u16 {
        let (e, m) = (i32::from(h >> 10), f64::from(h & 0x3ff));
        let want = if e == 0 { m * 2f64.powi(-24) } else { (1.0 + m / 1024.0) * 2f64.powi(e - 15) };
        assert_eq!(f64::from(f16_to_f32(h)), want, "{h:#06x}");
    }
}

#[test]
fn bf16_known_bit_patterns() {
    let cases: [(u16, f32); 6] = [
        (0x0000, 0.0),
        (0x3f80, 1.0),
        (0xc040, -3.0),
        (0x4049, 3.140_625),
        (0x7f7f, 3.389_531_4e38),
        (0x7f80, f32::INFINITY),
    ];
    for (bits, want) in cases {
        assert_eq!(bf16_to_f32(bits), want, "{bits:#06x}");
    }
    assert_eq!(bf16_to_f32(0x0001), 2f32.powi(-133));
    assert!(bf16_to_f32(0x7fc0).is_nan());
}

fn snapshot(acc: &CovarianceAccumulator) -> (u64, Vec<f64>, Vec<f64>) {
    (acc.count(), acc.mean.clone(), acc.scatter.clone())
}

#[test]
fn rejected_updates_leave_state_unchanged() {
    let dim = 4;
    let mut rng = Rng(21);
    let good = random_data(&mut rng, 6, dim, 1.0);
    for center in MODES {
        let mut acc = CovarianceAccumulator::new(dim, center).unwrap();
        acc.update(&batch(&good, 2, 3, dim, None)).unwrap();
        let before = snapshot(&acc);

        let err = acc.update(&batch(&good[..20], 5, 1, 5, None)).unwrap_err();
        assert!(matches!(&err, Error::Shape(m) if m.contains('5') && m.contains('4')), "{err}");
        let err = acc.update(&batch(&good[..20], 2, 3, dim, None)).unwrap_err();
        assert!(matches!(err, Error::Shape(_)), "{err}");
        let err = acc.update(&batch(&good, 2, 3, dim, Some(&[true; 5]))).unwrap_err();
        assert!(matches!(err, Error::Shape(_)), "{err}");
        assert!(matches!(acc.update(&batch(&[], 0, 3, dim, None)), Err(Error::Empty(_))));
        assert!(matches!(acc.update(&batch(&[], 3, 0, dim, None)), Err(Error::Empty(_))));
        // Overflowing shapes are rejected, not a panic.
        let err = acc.update(&batch(&good, usize::MAX, 2, dim, None)).unwrap_err();
        assert!(matches!(err, Error::Shape(_)), "{err}");
        let err = acc.update(&batch(&good, usize::MAX / 2, 1, dim, None)).unwrap_err();
        assert!(matches!(err, Error::Shape(_)), "{err}");

        // NaN in a counted token: named by (sequence, token, feature).
        let mut bad = good.clone();
        bad[(3 + 2) * dim + 1] = f32::NAN;
        let err = acc.update(&batch(&bad, 2, 3, dim, None)).unwrap_err();
        assert!(matches!(&err, Error::NonFinite(m) if m.contains("sequence 1, token 2, feature 1")), "{err}");
        bad[dim + 3] = f32::NEG_INFINITY;
        let err = acc.update(&batch(&bad, 2, 3, dim, None)).unwrap_err();
        assert!(matches!(&err, Error::NonFinite(m) if m.contains("sequence 0, token 1, feature 3")), "{err}");
        // f64 beyond f32 range, and f32 values whose products overflow.
        let mut big: Vec<f64> = good.iter().map(|&x| f64::from(x)).collect();
        big[2] = 1e300;
        let err =
            acc.update(&Batch { data: Elements::F64(&big), sequences: 2, seq_len: 3, dim, mask: None }).unwrap_err();
        assert!(matches!(&err, Error::NonFinite(m) if m.contains("feature 2")), "{err}");
        let mut huge = good.clone();
        huge[0] = 3e30;
        huge[dim] = -3e30;
        let err = acc.update(&batch(&huge, 2, 3, dim, None)).unwrap_err();
        assert!(matches!(err, Error::NonFinite(_)), "{err}");
        assert_eq!(snapshot(&acc), before, "{center:?}");

        // Masked-out padding may hold NaN; a mask dropping everything changes nothing.
        let mask = [true, true, true, true, true, false];
        acc.update(&batch(&bad[..], 2, 3, dim, Some(&[false; 6]))).unwrap();
        assert_eq!(snapshot(&acc), before);
        let mut padded = good.clone();
        padded[5 * dim..].fill(f32::NAN);
        acc.update(&batch(&padded, 2, 3, dim, Some(&mask))).unwrap();
        assert_eq!(acc.count(), before.0 + 5);
        assert!(acc.covariance().unwrap().iter().all(|c| c.is_finite()));
    }
}

#[test]
fn empty_and_mismatch_errors() {
    assert!(matches!(CovarianceAccumulator::new(0, Center::None), Err(Error::Value(_))));
    assert!(matches!(CovarianceAccumulator::new(usize::MAX, Center::None), Err(Error::Value(_))));
    let mut acc = CovarianceAccumulator::new(3, Center::Global).unwrap();
    assert!(matches!(acc.mean(), Err(Error::Empty(m)) if m.contains("no tokens were accumulated")));
    assert!(matches!(acc.covariance(), Err(Error::Empty(m)) if m.contains("no tokens were accumulated")));
    acc.update(&batch(&[1.0; 6], 1, 2, 3, Some(&[false, false]))).unwrap();
    assert!(matches!(acc.covariance(), Err(Error::Empty(_))));
    let other_dim = CovarianceAccumulator::new(4, Center::Global).unwrap();
    assert!(matches!(acc.merge(&other_dim), Err(Error::Shape(_))));
    let other_center = CovarianceAccumulator::new(3, Center::None).unwrap();
    assert!(matches!(acc.merge(&other_center), Err(Error::Value(_))));
    assert!(matches!("median".parse::<Center>(), Err(Error::Value(_))));
    for c in MODES {
        assert_eq!(c.as_str().parse::<Center>().unwrap(), c);
    }
}

#[test]
fn release_scratch_then_update_still_works() {
    let dim = 8;
    let mut rng = Rng(31);
    let data = random_data(&mut rng, 50, dim, 0.0);
    let mut a = CovarianceAccumulator::new(dim, Center::None).unwrap();
    a.update(&batch(&data, 1, 50, dim, None)).unwrap();
    release_scratch();
    a.update(&batch(&data, 1, 50, dim, None)).unwrap();
    let mut b = CovarianceAccumulator::new(dim, Center::None).unwrap();
    b.update(&batch(&data, 1, 50, dim, None)).unwrap();
    assert_eq!(a.covariance().unwrap(), b.covariance().unwrap());
}

/// Random bf16 bit patterns of moderate, sign-varying magnitude (exponents 120..134), plus a per-feature offset
/// so that centring matters; every fifth token is masked out.
fn bf16_batch(rng: &mut Rng, tokens: usize, dim: usize) -> (Vec<u16>, Vec<bool>) {
    let data = (0..tokens * dim)
        .map(|i| {
            let r = rng.next_u64();
            let x = f32::from_bits((((r as u32) & 0x807f) | ((120 + (r >> 20) % 15) as u32) << 7) << 16);
            let offset = if (i % dim).is_multiple_of(3) { 8.0 } else { 0.0 };
            ((x + offset).to_bits() >> 16) as u16
        })
        .collect();
    let mask = (0..tokens).map(|r| r % 5 != 3).collect();
    (data, mask)
}

/// Every bf16 kernel against the f32 path (which converts to f32 first) and the f64 oracle, on shapes that
/// exercise the padding: dims off multiples of 16 and 32, token counts off multiples of 32 (odd ones too),
/// masks, all three modes (centred modes stay on the f32 path: the check is that they still route correctly).
#[test]
fn bf16_kernels_match_f32_path_and_oracle() {
    let kernels = bf16::Kernel::all_available();
    eprintln!("bf16 kernels available: {kernels:?}; detected: {:?}", bf16::Kernel::detect());
    for (dim, sequences, seq_len) in [(1, 3, 7), (17, 2, 19), (33, 3, 37), (70, 1, 45), (130, 4, 33), (600, 2, 61)] {
        let mut rng = Rng(dim as u64 * 7 + 1);
        let (data, mask) = bf16_batch(&mut rng, sequences * seq_len, dim);
        let values: Vec<f64> = data.iter().map(|&h| f64::from(bf16_to_f32(h))).collect();
        let b = Batch { data: Elements::Bf16(&data), sequences, seq_len, dim, mask: Some(&mask) };
        for center in MODES {
            let (n, mean, want) = oracle(&[(values.clone(), sequences, seq_len, Some(mask.clone()))], dim, center);
            let mut reference = CovarianceAccumulator::new(dim, center).unwrap();
            reference.update_with(&b, None, None).unwrap();
            reference.update_with(&b, None, None).unwrap();
            let reference = reference.covariance().unwrap();
            assert_close(&reference, &want, dim, 2e-6);
            for &kernel in &kernels {
                let mut acc = CovarianceAccumulator::new(dim, center).unwrap();
                acc.update_with(&b, Some(kernel), None).unwrap();
                acc.update_with(&b, Some(kernel), None).unwrap();
                assert_eq!(acc.count(), 2 * n);
                let got_mean = acc.mean().unwrap();
                for f in 0..dim {
                    assert!((got_mean[f] - mean[f]).abs() <= 1e-12 * mean[f].abs().max(1.0), "{kernel:?}");
                }
                let got = acc.covariance().unwrap();
                assert_symmetric(&got, dim);
                assert_close(&got, &want, dim, 2e-6);
                assert_close(&got, &reference, dim, 2e-6);
            }
        }
    }
}

/// A batch longer than one packed chunk: the f32 sums restart per chunk, the result does not change.
#[test]
fn bf16_kernels_multi_chunk_batch() {
    let (dim, sequences, seq_len) = (40, 3, bf16::CHUNK / 2 + 5);
    let mut rng = Rng(99);
    let (data, mask) = bf16_batch(&mut rng, sequences * seq_len, dim);
    let values: Vec<f64> = data.iter().map(|&h| f64::from(bf16_to_f32(h))).collect();
    let b = Batch { data: Elements::Bf16(&data), sequences, seq_len, dim, mask: Some(&mask) };
    let (n, _, want) = oracle(&[(values, sequences, seq_len, Some(mask.clone()))], dim, Center::None);
    for kernel in bf16::Kernel::all_available() {
        let mut acc = CovarianceAccumulator::new(dim, Center::None).unwrap();
        acc.update_with(&b, Some(kernel), None).unwrap();
        assert_eq!(acc.count(), n);
        assert_close(&acc.covariance().unwrap(), &want, dim, 2e-6);
    }
}

/// With the bf16 kernels forced off, bf16 input takes the f32 path (what CPUs without them run); and exactly
/// representable data gives bit-identical results on every path, since all of them sum exact products.
#[test]
fn bf16_fallback_path_and_exact_agreement() {
    let (dim, sequences, seq_len) = (45, 2, 50);
    // Small integers: every product and every partial sum is exact in f32, whatever the summation order.
    let data: Vec<u16> =
        (0..sequences * seq_len * dim).map(|i| ((((i * 7919) % 17) as f32 - 8.0).to_bits() >> 16) as u16).collect();
    let b = Batch { data: Elements::Bf16(&data), sequences, seq_len, dim, mask: None };
    let mut fallback = CovarianceAccumulator::new(dim, Center::None).unwrap();
    fallback.update_with(&b, None, None).unwrap();
    let values: Vec<f64> = data.iter().map(|&h| f64::from(bf16_to_f32(h))).collect();
    let (_, _, want) = oracle(&[(values, sequences, seq_len, None)], dim, Center::None);
    let expect = fallback.covariance().unwrap();
    assert_close(&expect, &want, dim, 1e-15);
    for kernel in bf16::Kernel::all_available() {
        let mut acc = CovarianceAccumulator::new(dim, Center::None).unwrap();
        acc.update_with(&b, Some(kernel), None).unwrap();
        assert_eq!(acc.covariance().unwrap(), expect, "{kernel:?}");
    }
}

/// Non-finite or overflowing bf16 input is rejected by the kernel path exactly as by the f32 path.
#[test]
fn bf16_kernels_reject_bad_input_unchanged() {
    let dim = 5;
    let mut data = vec![0x3f80u16; 4 * dim];
    for kernel in bf16::Kernel::all_available().into_iter().map(Some).chain([None]) {
        let mut acc = CovarianceAccumulator::new(dim, Center::None).unwrap();
        data[2 * dim + 3] = 0x7fc0; // NaN
        let b = Batch { data: Elements::Bf16(&data), sequences: 2, seq_len: 2, dim, mask: None };
        let err = acc.update_with(&b, kernel, None).unwrap_err();
        assert!(matches!(&err, Error::NonFinite(m) if m.contains("sequence 1, token 0, feature 3")), "{err}");
        data[2 * dim + 3] = 0x7f00; // 1.7e38: its square overflows f32
        let b = Batch { data: Elements::Bf16(&data), sequences: 2, seq_len: 2, dim, mask: None };
        let err = acc.update_with(&b, kernel, None).unwrap_err();
        assert!(matches!(&err, Error::NonFinite(m) if m.contains("feature 3")), "{err}");
        assert_eq!(acc.count(), 0);
        assert!(acc.scatter.iter().all(|&m| m == 0.0));
        data[2 * dim + 3] = 0x3f80;
    }
}

/// `cargo test --release -p lowrank-core covariance::tests::bench -- --ignored --nocapture`
/// (compare with numpy's `x.T @ x` on the same machine; `bench/` has the side-by-side script).
#[test]
#[ignore]
fn bench_update_4096() {
    let (dim, sequences, seq_len) = (4096, 8, 512);
    let mut rng = Rng(1);
    let data: Vec<f32> = (0..sequences * seq_len * dim).map(|_| rng.normal32()).collect();
    let bf16: Vec<u16> = data.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
    for center in MODES {
        for (name, data) in [("f32", Elements::F32(&data)), ("bf16", Elements::Bf16(&bf16))] {
            let mut acc = CovarianceAccumulator::new(dim, center).unwrap();
            let b = Batch { data, sequences, seq_len, dim, mask: None };
            acc.update(&b).unwrap();
            let mut times: Vec<f64> = (0..7)
                .map(|_| {
                    let t = std::time::Instant::now();
                    acc.update(&b).unwrap();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            println!(
                "update {center:?} {name} [{}, {dim}]: median {:.4}s min {:.4}s",
                sequences * seq_len,
                times[3],
                times[0]
            );
        }
    }
}
