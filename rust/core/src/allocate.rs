//! Budgeted rank and scale allocation.
//!
//! TLoRA gives module `i` a rank `r_i ∝ s_i`, where `s_i ≥ 0` is its sensitivity score, subject to a total budget
//! `R = Σ r_i`, per-module bounds and an optional granularity (ranks that are multiples of 8 suit tensor cores).
//! [`allocate_ranks`] solves that problem exactly and deterministically, and reports infeasible constraints as
//! errors instead of silently bending them. [`allocate_alphas`] computes the matching per-module LoRA scales.
//!
//! # Rank allocation
//!
//! Everything is done in units of `m = multiple_of`, so that granularity is not a separate constraint:
//!
//! ```text
//! B    = R / m                      (R must be a multiple of m)
//! lo   = ⌈min_rank / m⌉
//! hi_i = ⌊max_i / m⌋               (min(·, B): no module can hold more than the whole budget)
//! ```
//!
//! A module with `s_i = 0` gets no share of a proportional split, so it stays at `lo` (`hi_i` is replaced by
//! `lo` for it). This keeps "zero score ⇒ minimum rank" true under every budget; a budget that only fits by
//! giving zero-score modules more than the minimum is reported as infeasible.
//!
//! **Continuous solution (water-filling).** Find `λ ≥ 0` with
//!
//! ```text
//! f(λ) = Σ_i clamp(λ·s_i, lo, hi_i) = B,      x_i = clamp(λ·s_i, lo, hi_i).
//! ```
//!
//! `f` is continuous, non-decreasing and piecewise linear with breakpoints `lo/s_i` (module `i` leaves its lower
//! bound) and `hi_i/s_i` (it reaches its cap), and `f(0) = Σ lo`, `f(∞) = Σ hi_i`, so a solution exists exactly
//! when `Σ lo ≤ B ≤ Σ hi_i`. The breakpoints are sorted and binary-searched for the interval `[t_k, t_{k+1}]` with
//! `f(t_k) ≤ B < f(t_{k+1})` (each `f` evaluated from scratch, so no running sum accumulates cancellation error);
//! inside it the set of free modules `F` is fixed, and
//!
//! ```text
//! λ = (B − Σ_{i at lo} lo − Σ_{i at hi} hi_i) / Σ_{i ∈ F} s_i.
//! ```
//!
//! `x` is the unique bounded-proportional split: free modules are exactly proportional to their scores, the rest
//! sit at the bound that proportionality would cross.
//!
//! **Largest-remainder rounding.** `u_i = ⌊x_i⌋`; the `B − Σ u_i` leftover units go one each to the modules with
//! the largest fractional parts `x_i − u_i` among those below their cap. Ties (fractional parts equal to within
//! 1e-9, which absorbs floating-point noise) go to the larger score, then the lower index, so the result is a
//! deterministic function of the inputs. Because `Σ x_i = B` and every
//! fractional part is below one, at most one unit per module is ever needed; the loop that hands out units
//! nonetheless repeats (and can also take units back) so that floating-point error in `x` cannot break the exact
//! sum. The result is `r_i = m·(u_i + extra_i)`, which satisfies `Σ r_i = R`, `min_rank ≤ r_i ≤ max_i` and
//! `m | r_i`, and is monotone in the score when all modules share the same bounds.
//!
//! The reference implementation rounds with Python's `round` and patches the sum on the largest module, which can
//! push that module past any cap; largest-remainder rounding never does and minimises the rounding error.
//!
//! # Scale allocation
//!
//! `α_i = max(α, round(N·α·s_i / Σ s))` with `round` half-to-even (Python's `round`, as in the reference), so
//! important modules get a larger update magnitude and no module drops below the base `α`.

use crate::error::{Error, Result};

/// The upper bound on each module's rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxRank<'a> {
    /// No cap beyond the budget itself.
    Unbounded,
    /// The same cap for every module.
    Uniform(usize),
    /// One cap per module, in the order of the scores (typically `min(d_in, d_out)` of each module).
    PerModule(&'a [usize]),
}

impl MaxRank<'_> {
    fn get(&self, i: usize) -> usize {
        match *self {
            MaxRank::Unbounded => usize::MAX,
            MaxRank::Uniform(cap) => cap,
            MaxRank::PerModule(caps) => caps.get(i).copied().unwrap_or(usize::MAX),
        }
    }
}

/// Checks that scores are a non-empty list of finite, non-negative numbers that are not all zero; returns their
/// sum.
fn validate_scores(scores: &[f64]) -> Result<f64> {
    if scores.is_empty() {
        return Err(Error::Empty("scores is empty: allocation needs one score per target module".into()));
    }
    for (i, &s) in scores.iter().enumerate() {
        if !s.is_finite() {
            return Err(Error::NonFinite(format!(
                "scores[{i}] is {s}: every score must be a finite number (check the calibration for NaN/inf \
                 gradients)"
            )));
        }
        if s < 0.0 {
            return Err(Error::Value(format!("scores[{i}] is {s}: scores must be non-negative")));
        }
    }
    let total: f64 = scores.iter().sum();
    if total <= 0.0 {
        return Err(Error::Value(format!(
            "all {} scores are zero: cannot allocate proportionally to them; give at least one module a positive \
             score",
            scores.len()
        )));
    }
    Ok(total)
}

/// Splits an integer `budget` of rank over modules in proportion to their `scores`.
///
/// Returns `r` with `Σ r_i = budget` exactly, `min_rank ≤ r_i ≤ max_rank_i`, and every `r_i` a multiple of
/// `multiple_of`; see the [module documentation](self) for the algorithm (bounded water-filling, then
/// largest-remainder rounding with deterministic tie-breaking). `min_rank = 0` is allowed: rank 0 means "no adapter
/// on this module". A module with score 0 receives `⌈min_rank/m⌉·m`.
///
/// # Errors
/// - [`Error::Empty`]: no scores.
/// - [`Error::NonFinite`]: a NaN or infinite score.
/// - [`Error::Value`]: a negative score, all scores zero, or `multiple_of == 0`.
/// - [`Error::Shape`]: [`MaxRank::PerModule`] with a length different from `scores`.
/// - [`Error::Infeasible`]: `budget` not a multiple of `multiple_of`, a module whose cap is below `min_rank` (after
///   rounding both to the granularity), or a budget outside the feasible range, which the message states.
pub fn allocate_ranks(
    scores: &[f64],
    budget: usize,
    min_rank: usize,
    max_rank: MaxRank<'_>,
    multiple_of: usize,
) -> Result<Vec<usize>> {
    validate_scores(scores)?;
    if multiple_of == 0 {
        return Err(Error::Value("multiple_of is 0: it must be at least 1 (1 means any integer rank)".into()));
    }
    if let MaxRank::PerModule(caps) = max_rank {
        if caps.len() != scores.len() {
            return Err(Error::Shape(format!(
                "max_rank has {} entries but there are {} scores: give one cap per module",
                caps.len(),
                scores.len()
            )));
        }
    }
    let m = multiple_of;
    if !budget.is_multiple_of(m) {
        let below = budget - budget % m;
        return Err(Error::Infeasible(format!(
            "budget {budget} is not a multiple of multiple_of {m}: ranks that are multiples of {m} can only sum to \
             a multiple of {m} (e.g. {below} or {})",
            below.saturating_add(m)
        )));
    }
    let units = budget / m;
    let lo = min_rank.div_ceil(m);

    let mut hi = Vec::with_capacity(scores.len());
    // The uncapped Σ hi_i, for the message only: hi_i itself is capped at the budget.
    let mut reachable = 0usize;
    for (i, &s) in scores.iter().enumerate() {
        let cap = max_rank.get(i);
        let h = cap / m;
        if h < lo {
            return Err(Error::Infeasible(format!(
                "module {i}: max_rank {cap} is below min_rank {min_rank} once both are rounded to multiples of {m} \
                 ({} < {}); raise its max_rank to at least {} or lower min_rank",
                h.saturating_mul(m),
                lo.saturating_mul(m),
                lo.saturating_mul(m)
            )));
        }
        // A zero score gets no proportional share, so its effective cap is the floor.
        let effective = if s > 0.0 { h } else { lo };
        reachable = reachable.saturating_add(effective);
        hi.push(effective.min(units));
    }

    let sum_lo = lo.saturating_mul(scores.len());
    let sum_hi = hi.iter().fold(0usize, |acc, &h| acc.saturating_add(h));
    if units < sum_lo || units > sum_hi {
        let zero = scores.iter().filter(|&&s| s == 0.0).count();
        let note = if zero > 0 && units > sum_hi {
            format!(
                "; the {zero} module(s) with score 0 stay at min_rank, so only the positive-score modules can \
                 absorb the rest"
            )
        } else {
            String::new()
        };
        let (least, most) = (sum_lo.saturating_mul(m), reachable.saturating_mul(m));
        let range = if most == usize::MAX { format!("from {least} upward") } else { format!("from {least} to {most}") };
        return Err(Error::Infeasible(format!(
            "budget {budget} is infeasible for {} modules with min_rank {min_rank}, these max_rank caps and \
             multiple_of {m}: the feasible budgets are the multiples of {m} {range}{note}",
            scores.len(),
        )));
    }

    // Proportional allocation is scale-invariant; normalising by the largest score keeps every sum below n and so
    // finite however large the scores are.
    let top = scores.iter().copied().fold(0.0f64, f64::max);
    let normalised: Vec<f64> = scores.iter().map(|&s| s / top).collect();
    let x = water_fill(&normalised, units, lo, &hi);
    let units_per_module = round_largest_remainder(scores, &x, units, lo, &hi)?;
    Ok(units_per_module.into_iter().map(|u| u * m).collect())
}

/// `Σ_i clamp(λ·s_i, lo, hi_i)`, evaluated from scratch.
fn filled(scores: &[f64], lambda: f64, lo: f64, hi: &[usize]) -> f64 {
    scores.iter().zip(hi).map(|(&s, &h)| if s > 0.0 { (lambda * s).clamp(lo, h as f64) } else { lo }).sum()
}

/// The continuous bounded-proportional split `x_i = clamp(λ·s_i, lo, hi_i)` with `Σ x_i = units`. The caller has
/// checked `Σ lo ≤ units ≤ Σ hi_i` and `hi_i ≥ lo`.
fn water_fill(scores: &[f64], units: usize, lo: usize, hi: &[usize]) -> Vec<f64> {
    let target = units as f64;
    let lo_f = lo as f64;
    let mut breaks: Vec<f64> = vec![0.0];
    for (&s, &h) in scores.iter().zip(hi) {
        if s > 0.0 {
            breaks.push(lo_f / s);
            breaks.push(h as f64 / s);
        }
    }
    // Breakpoints can be +inf for subnormal scores; total_cmp orders them last and they stay usable.
    breaks.sort_by(f64::total_cmp);
    breaks.dedup();

    // Largest k with f(t_k) ≤ target; f(t_0 = 0) = Σ lo ≤ target holds by the caller's check.
    let (mut good, mut bad) = (0usize, breaks.len());
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if filled(scores, breaks[mid], lo_f, hi) <= target {
            good = mid;
        } else {
            bad = mid;
        }
    }
    let t0 = breaks[good];
    let lambda = match breaks.get(good + 1) {
        None => t0,
        Some(&t1) => {
            // Inside (t0, t1) no module changes state: it is at lo if it leaves lo at or after t1, at its cap if it
            // reaches the cap at or before t0, and free otherwise.
            let (mut fixed, mut free) = (0.0f64, 0.0f64);
            for (&s, &h) in scores.iter().zip(hi) {
                if s <= 0.0 || lo_f / s >= t1 {
                    fixed += lo_f;
                } else if h as f64 / s <= t0 {
                    fixed += h as f64;
                } else {
                    free += s;
                }
            }
            if free > 0.0 {
                ((target - fixed) / free).clamp(t0, t1)
            } else {
                t0
            }
        }
    };
    scores.iter().zip(hi).map(|(&s, &h)| if s > 0.0 { (lambda * s).clamp(lo_f, h as f64) } else { lo_f }).collect()
}

const REMAINDER_QUANTUM: f64 = 1e9;

/// Rounds `x` to integers in `[lo, hi_i]` summing to `units`: floor, then hand leftover units to the largest
/// fractional parts (ties: larger score, then lower index).
fn round_largest_remainder(scores: &[f64], x: &[f64], units: usize, lo: usize, hi: &[usize]) -> Result<Vec<usize>> {
    let mut u: Vec<usize> = x
        .iter()
        .zip(hi)
        .map(|(&xi, &h)| {
            // `as` saturates, and the clamp keeps float error from leaving the bounds.
            (xi.floor() as usize).clamp(lo, h)
        })
        .collect();
    // Remainders that agree to 1e-9 are the same rational number up to floating-point noise (1.6 and 5.6 from 8·2/10
    // and 8·7/10 have fractional parts .6000000000000001 and .5999999999999996); quantising them lets such exact
    // ties fall to the documented tie-break instead of to rounding noise, and keeps the sort key a total order.
    let frac: Vec<i64> =
        x.iter().zip(&u).map(|(&xi, &ui)| ((xi - ui as f64) * REMAINDER_QUANTUM).round() as i64).collect();
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| frac[b].cmp(&frac[a]).then(scores[b].total_cmp(&scores[a])).then(a.cmp(&b)));

    let assigned = u.iter().fold(0usize, |acc, &v| acc.saturating_add(v));
    if assigned <= units {
        let mut left = units - assigned;
        // One pass suffices in exact arithmetic; further passes only absorb floating-point slack.
        while left > 0 {
            let before = left;
            for &i in &order {
                if left == 0 {
                    break;
                }
                if u[i] < hi[i] {
                    u[i] += 1;
                    left -= 1;
                }
            }
            if left == before {
                return Err(internal_error());
            }
        }
    } else {
        let mut excess = assigned - units;
        while excess > 0 {
            let before = excess;
            for &i in order.iter().rev() {
                if excess == 0 {
                    break;
                }
                if u[i] > lo {
                    u[i] -= 1;
                    excess -= 1;
                }
            }
            if excess == before {
                return Err(internal_error());
            }
        }
    }
    Ok(u)
}

/// Unreachable after the feasibility checks; an error rather than a panic so no input can abort the caller.
fn internal_error() -> Error {
    Error::Infeasible("internal error: rounding could not meet the budget within the bounds (please report)".into())
}

/// Per-module LoRA scales `α_i = max(α, round(N·α·s_i / Σ s))`, `round` being half-to-even like Python's.
///
/// The product is evaluated as `((N·α)·s_i) / Σ s`, left to right, with `Σ s` summed in order, to match the
/// reference's rounding at exact halves. Scores whose sum overflows are first divided by the largest one.
///
/// # Errors
/// [`Error::Value`] for `alpha` not finite or not positive, or scales too large to represent; the score errors of
/// [`allocate_ranks`] ([`Error::Empty`], [`Error::NonFinite`], [`Error::Value`]).
pub fn allocate_alphas(scores: &[f64], alpha: f64) -> Result<Vec<f64>> {
    if !alpha.is_finite() || alpha <= 0.0 {
        return Err(Error::Value(format!("alpha is {alpha}: it must be a finite number greater than 0")));
    }
    let mut total = validate_scores(scores)?;
    let mut scale = 1.0;
    if !total.is_finite() {
        scale = scores.iter().copied().fold(0.0f64, f64::max);
        total = scores.iter().map(|&s| s / scale).sum();
    }
    let n = scores.len() as f64;
    scores
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let share = n * alpha * (s / scale) / total;
            let a = share.round_ties_even().max(alpha);
            if a.is_finite() {
                Ok(a)
            } else {
                Err(Error::Value(format!(
                    "alpha {alpha} is too large: the scale of module {i} overflows a 64-bit float"
                )))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranks(scores: &[f64], budget: usize, min: usize, max: MaxRank<'_>, m: usize) -> Vec<usize> {
        allocate_ranks(scores, budget, min, max, m).unwrap()
    }

    /// A tiny deterministic generator so property tests need no dependency.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn worked_examples() {
        // 1:2:3 of 12 is exactly 2, 4, 6.
        assert_eq!(ranks(&[1.0, 2.0, 3.0], 12, 0, MaxRank::Unbounded, 1), vec![2, 4, 6]);
        // 1:1:1 of 10: x = 3⅓ each, floor 3+3+3, one leftover unit; equal fractions and scores → lowest index.
        assert_eq!(ranks(&[1.0, 1.0, 1.0], 10, 0, MaxRank::Unbounded, 1), vec![4, 3, 3]);
        // 1:2:7 of 8: x = 0.8, 1.6, 5.6 → floors 0,1,5 (6), two units to remainders .8, .6(score 7), .6(score 2)
        // → 1, 1, 6: .8 first, then the tie at .6 goes to the larger score.
        assert_eq!(ranks(&[1.0, 2.0, 7.0], 8, 0, MaxRank::Unbounded, 1), vec![1, 1, 6]);
        // With min_rank 2, only the largest module leaves the floor: 2 + 2 + 7λ = 8 gives λ = 4/7, and indeed
        // 2λ = 8/7 < 2 keeps module 1 at the floor → 2, 2, 4.
        assert_eq!(ranks(&[1.0, 2.0, 7.0], 8, 2, MaxRank::Unbounded, 1), vec![2, 2, 4]);
        // Cap 5 on 1:1:8 of 12: the big module caps at 5, the rest split 7 equally: 3.5, 3.5 → 4, 3.
        assert_eq!(ranks(&[1.0, 1.0, 8.0], 12, 0, MaxRank::Uniform(5), 1), vec![4, 3, 5]);
        // Multiples of 8: 16 units of 8 over 1:3 → 4, 12 units → 32, 96.
        assert_eq!(ranks(&[1.0, 3.0], 128, 8, MaxRank::Unbounded, 8), vec![32, 96]);
    }

    #[test]
    fn default_budget_reproduces_uniform_rank_for_equal_scores() {
        let r = ranks(&[0.5; 7], 7 * 16, 1, MaxRank::Unbounded, 1);
        assert_eq!(r, vec![16; 7]);
    }

    #[test]
    fn random_problems_meet_every_constraint() {
        let mut rng = Lcg(7);
        for _ in 0..2000 {
            let n = 1 + rng.below(12) as usize;
            let m = [1usize, 2, 4, 8][rng.below(4) as usize];
            let min_rank = rng.below(3) as usize * m;
            let caps: Vec<usize> = (0..n).map(|_| min_rank + rng.below(40) as usize).collect();
            let scores: Vec<f64> =
                (0..n).map(|_| if rng.below(5) == 0 { 0.0 } else { rng.below(1000) as f64 / 7.0 }).collect();
            let budget = rng.below(300) as usize * m;
            match allocate_ranks(&scores, budget, min_rank, MaxRank::PerModule(&caps), m) {
                Ok(r) => {
                    assert_eq!(r.iter().sum::<usize>(), budget);
                    for i in 0..n {
                        assert!(r[i] >= min_rank && r[i] <= caps[i] && r[i] % m == 0, "{scores:?} {caps:?} {r:?}");
                        if scores[i] == 0.0 {
                            assert_eq!(r[i], min_rank.div_ceil(m) * m);
                        }
                    }
                }
                Err(Error::Infeasible(_)) | Err(Error::Value(_)) => {}
                Err(e) => panic!("unexpected error {e:?}"),
            }
        }
    }

    /// An independent continuous solution by plain bisection on λ.
    fn bisection_oracle(scores: &[f64], units: usize, lo: usize, hi: &[usize]) -> Vec<f64> {
        let f = |l: f64| -> Vec<f64> {
            scores
                .iter()
                .zip(hi)
                .map(|(&s, &h)| if s > 0.0 { (l * s).clamp(lo as f64, h as f64) } else { lo as f64 })
                .collect()
        };
        let (mut a, mut b) = (0.0f64, 1.0f64);
        while f(b).iter().sum::<f64>() < units as f64 {
            b *= 2.0;
        }
        for _ in 0..200 {
            let mid = 0.5 * (a + b);
            if f(mid).iter().sum::<f64>() < units as f64 {
                a = mid;
            } else {
                b = mid;
            }
        }
        f(b)
    }

    #[test]
    fn within_one_unit_of_the_continuous_optimum() {
        let mut rng = Lcg(3);
        let mut checked = 0;
        for _ in 0..2000 {
            let n = 1 + rng.below(10) as usize;
            let m = [1usize, 4, 8][rng.below(3) as usize];
            let min_rank = rng.below(3) as usize * m;
            let caps: Vec<usize> = (0..n).map(|_| min_rank + rng.below(80) as usize).collect();
            let scores: Vec<f64> = (0..n).map(|_| rng.below(50) as f64 / 3.0 + 0.01).collect();
            let budget = rng.below(200) as usize * m;
            let Ok(r) = allocate_ranks(&scores, budget, min_rank, MaxRank::PerModule(&caps), m) else {
                continue;
            };
            let hi: Vec<usize> = caps.iter().map(|&c| (c / m).min(budget / m)).collect();
            let x = bisection_oracle(&scores, budget / m, min_rank.div_ceil(m), &hi);
            for i in 0..n {
                assert!(((r[i] / m) as f64 - x[i]).abs() < 1.0 + 1e-6, "{scores:?} {caps:?} {r:?} {x:?}");
            }
            checked += 1;
        }
        assert!(checked > 500, "too few feasible random problems: {checked}");
    }

    #[test]
    fn monotone_in_score_without_caps() {
        let mut rng = Lcg(11);
        for _ in 0..500 {
            let n = 2 + rng.below(10) as usize;
            let scores: Vec<f64> = (0..n).map(|_| rng.below(100) as f64 * 0.37).collect();
            if scores.iter().all(|&s| s == 0.0) {
                continue;
            }
            let min_rank = rng.below(3) as usize;
            let budget = n * min_rank + rng.below(200) as usize;
            let r = ranks(&scores, budget, min_rank, MaxRank::Unbounded, 1);
            assert_eq!(r.iter().sum::<usize>(), budget);
            for a in 0..n {
                for b in 0..n {
                    if scores[a] > scores[b] {
                        assert!(r[a] >= r[b], "{scores:?} -> {r:?}");
                    }
                }
            }
            // Largest remainder keeps every rank within one unit of its exact proportional share when no bound binds.
            if min_rank == 0 {
                let total: f64 = scores.iter().sum();
                for i in 0..n {
                    let exact = budget as f64 * scores[i] / total;
                    assert!((r[i] as f64 - exact).abs() < 1.0 + 1e-9, "{scores:?} -> {r:?}");
                }
            }
        }
    }

    #[test]
    fn multiple_of_and_per_module_caps() {
        let r = ranks(&[1.0, 1.0, 10.0, 1.0], 64, 8, MaxRank::PerModule(&[64, 64, 23, 64]), 8);
        // Cap 23 rounds down to 16; the other 48 split equally into units of 8: 16, 16, 16.
        assert_eq!(r, vec![16, 16, 16, 16]);
        let r = ranks(&[5.0, 1.0], 24, 0, MaxRank::PerModule(&[8, 100]), 4);
        assert_eq!(r, vec![8, 16]);
    }

    #[test]
    fn rank_zero_is_allowed() {
        assert_eq!(ranks(&[0.0, 1.0, 3.0], 8, 0, MaxRank::Unbounded, 1), vec![0, 2, 6]);
        assert_eq!(ranks(&[1.0, 100.0], 4, 0, MaxRank::Unbounded, 1), vec![0, 4]);
        assert_eq!(ranks(&[1.0, 1.0], 0, 0, MaxRank::Unbounded, 1), vec![0, 0]);
    }

    #[test]
    fn bounds_that_bind_exactly() {
        // Budget equals Σ lo: everyone at the floor.
        assert_eq!(ranks(&[1.0, 9.0, 3.0], 6, 2, MaxRank::Uniform(10), 1), vec![2, 2, 2]);
        // Budget equals Σ hi: everyone at the cap.
        assert_eq!(ranks(&[1.0, 9.0, 3.0], 30, 2, MaxRank::Uniform(10), 1), vec![10, 10, 10]);
    }

    #[test]
    fn extreme_score_ranges() {
        let r = ranks(&[1e300, 1e-300, 5e-324, 1.0], 40, 1, MaxRank::Uniform(37), 1);
        assert_eq!(r.iter().sum::<usize>(), 40);
        assert_eq!(r[0], 37);
        let r = ranks(&[f64::MAX, f64::MAX], 1 << 40, 0, MaxRank::Unbounded, 1);
        assert_eq!(r, vec![1 << 39, 1 << 39]);
    }

    #[test]
    fn errors() {
        let e = allocate_ranks(&[], 8, 0, MaxRank::Unbounded, 1).unwrap_err();
        assert!(matches!(e, Error::Empty(_)));
        let e = allocate_ranks(&[1.0, f64::NAN], 8, 0, MaxRank::Unbounded, 1).unwrap_err();
        assert!(matches!(&e, Error::NonFinite(m) if m.contains("scores[1]")), "{e}");
        let e = allocate_ranks(&[f64::INFINITY], 8, 0, MaxRank::Unbounded, 1).unwrap_err();
        assert!(matches!(&e, Error::NonFinite(m) if m.contains("scores[0]")), "{e}");
        let e = allocate_ranks(&[1.0, 2.0, -0.5], 8, 0, MaxRank::Unbounded, 1).unwrap_err();
        assert!(matches!(&e, Error::Value(m) if m.contains("scores[2]")), "{e}");
        let e = allocate_ranks(&[0.0, 0.0], 8, 0, MaxRank::Unbounded, 1).unwrap_err();
        assert!(matches!(&e, Error::Value(m) if m.contains("cannot allocate proportionally")), "{e}");
        let e = allocate_ranks(&[1.0], 8, 0, MaxRank::Unbounded, 0).unwrap_err();
        assert!(matches!(&e, Error::Value(m) if m.contains("multiple_of")), "{e}");
        let e = allocate_ranks(&[1.0, 2.0], 8, 0, MaxRank::PerModule(&[4]), 1).unwrap_err();
        assert!(matches!(e, Error::Shape(_)));
        let e = allocate_ranks(&[1.0, 2.0], 12, 0, MaxRank::Unbounded, 8).unwrap_err();
        assert!(matches!(&e, Error::Infeasible(m) if m.contains("not a multiple of multiple_of 8")), "{e}");
        let e = allocate_ranks(&[1.0, 2.0], 16, 4, MaxRank::PerModule(&[8, 3]), 1).unwrap_err();
        assert!(matches!(&e, Error::Infeasible(m) if m.starts_with("module 1:")), "{e}");
        // A cap of 12 with multiples of 8 allows only 8, below min_rank 9 (→ 16).
        let e = allocate_ranks(&[1.0], 16, 9, MaxRank::Uniform(12), 8).unwrap_err();
        assert!(matches!(&e, Error::Infeasible(m) if m.contains("module 0")), "{e}");
        let e = allocate_ranks(&[1.0, 2.0, 3.0], 5, 2, MaxRank::Unbounded, 1).unwrap_err();
        assert!(matches!(&e, Error::Infeasible(m) if m.contains("multiples of 1 from 6 upward")), "{e}");
        let e = allocate_ranks(&[1.0, 2.0], 8, 8, MaxRank::Uniform(64), 8).unwrap_err();
        assert!(matches!(&e, Error::Infeasible(m) if m.contains("multiples of 8 from 16 to 128")), "{e}");
        let e = allocate_ranks(&[1.0, 2.0, 3.0], 31, 2, MaxRank::Uniform(10), 1).unwrap_err();
        assert!(matches!(&e, Error::Infeasible(m) if m.contains("from 6 to 30")), "{e}");
        let e = allocate_ranks(&[0.0, 1.0], 10, 0, MaxRank::Uniform(4), 1).unwrap_err();
        assert!(matches!(&e, Error::Infeasible(m) if m.contains("from 0 to 4") && m.contains("score 0")), "{e}");
    }

    #[test]
    fn alphas_match_the_formula() {
        // N = 4, α = 16, Σs = 10: N·α·s/Σs = 6.4·s.
        let a = allocate_alphas(&[1.0, 2.0, 3.0, 4.0], 16.0).unwrap();
        assert_eq!(a, vec![16.0, 16.0, 19.0, 26.0]); // 6.4, 12.8, 19.2, 25.6
                                                     // Equal scores give exactly α.
        assert_eq!(allocate_alphas(&[0.3; 5], 32.0).unwrap(), vec![32.0; 5]);
        // Zero score falls back to α.
        assert_eq!(allocate_alphas(&[0.0, 1.0], 8.0).unwrap(), vec![8.0, 16.0]);
    }

    #[test]
    fn alphas_round_half_to_even() {
        // Shares are N·α·s_i/Σs, all exact in binary; Python's round gives round(4.5) == 4, round(2.5) == 2,
        // round(1.5) == 2, round(3.5) == 4, where rounding half away from zero would give 5 and 3 for the first two.
        // N = 4, α = 2, Σs = 16: 8·9/16 = 4.5 → 4; 8·3/16 = 1.5 → 2; 8·1/16 = 0.5 → 0, raised to α = 2.
        assert_eq!(allocate_alphas(&[9.0, 3.0, 3.0, 1.0], 2.0).unwrap(), vec![4.0, 2.0, 2.0, 2.0]);
        // N = 2, α = 2, Σs = 8: 4·5/8 = 2.5 → 2, 4·3/8 = 1.5 → 2.
        assert_eq!(allocate_alphas(&[5.0, 3.0], 2.0).unwrap(), vec![2.0, 2.0]);
        // 4·7/8 = 3.5 → 4, 4·1/8 = 0.5 → 0 → α.
        assert_eq!(allocate_alphas(&[7.0, 1.0], 2.0).unwrap(), vec![4.0, 2.0]);
        // α need not be an integer: 2·0.75·1/1 = 1.5 → 2, and the zero-score module keeps α itself.
        assert_eq!(allocate_alphas(&[1.0, 0.0], 0.75).unwrap(), vec![2.0, 0.75]);
    }

    #[test]
    fn alpha_errors() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(allocate_alphas(&[1.0], bad), Err(Error::Value(_))));
        }
        assert!(matches!(allocate_alphas(&[], 1.0), Err(Error::Empty(_))));
        assert!(matches!(allocate_alphas(&[1.0, f64::NAN], 1.0), Err(Error::NonFinite(_))));
        assert!(matches!(allocate_alphas(&[-1.0], 1.0), Err(Error::Value(_))));
        assert!(matches!(allocate_alphas(&[0.0, 0.0], 1.0), Err(Error::Value(_))));
        assert!(matches!(allocate_alphas(&[1.0, 1.0], f64::MAX), Err(Error::Value(_))));
        // Scores whose sum overflows still work through the rescaled path.
        assert_eq!(allocate_alphas(&[f64::MAX, f64::MAX, 0.0], 4.0).unwrap(), vec![6.0, 6.0, 4.0]);
    }
}
