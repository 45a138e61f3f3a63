//! Deterministic fuzz driver for toolchains without libFuzzer: feeds a target seeded pseudo-random inputs and
//! mutations of valid ones, catches panics, and reports the counts.
//!
//! `cargo run --release --bin drive -- <adapter_file|covariance|rsvd> <cases | Ns> [seed]`
//!
//! No coverage feedback, so it finds less per case than libFuzzer; its value is that it runs anywhere and the same
//! seed replays the same inputs. Inputs that panic are written to `artifacts/<target>/`.

use std::panic;
use std::time::{Duration, Instant};

use lowrank_core::package::{self, DType, TensorView};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64: full period, good enough to pick mutations.
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Valid inputs to start mutating from: real safetensors files and configs for the file target, nothing (random
/// bytes are already well-formed shapes and values) for the numeric ones.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    if target != "adapter_file" {
        return vec![vec![0; 64]];
    }
    let dir = std::env::temp_dir().join(format!("lowrank-drive-{}", std::process::id()));
    let path = dir.join("seed.safetensors");
    let data: Vec<u8> = (0..96u8).collect();
    let shapes: [(&str, DType, &[usize], usize); 4] =
        [("a", DType::F32, &[2, 3], 24), ("b.weight", DType::Bf16, &[4], 8), ("c", DType::F64, &[1, 1, 2], 16), ("d", DType::F16, &[0, 5], 0)];
    let mut out = Vec::new();
    for k in 1..=shapes.len() {
        let views: Vec<TensorView<'_>> = shapes[..k]
            .iter()
            .map(|&(name, dtype, shape, len)| TensorView { name, dtype, shape, data: &data[..len] })
            .collect();
        package::write_safetensors(&path, &views, None).expect("seed file");
        out.push(std::fs::read(&path).expect("seed file"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    out.push(br#"{"r": 8, "lora_alpha": 16, "target_modules": ["q", "v"], "nested": {"a": [1.5e300, null]}}"#.to_vec());
    out.push(b"{}".to_vec());
    out
}

const INTERESTING: [u8; 10] = [0, 1, 0x7f, 0x80, 0xff, b'{', b'"', b'[', b',', b'9'];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    input.clear();
    if rng.below(8) == 0 {
        let len = rng.below(512);
        input.extend((0..len).map(|_| rng.next() as u8));
        return;
    }
    input.extend_from_slice(&seeds[rng.below(seeds.len())]);
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                input.insert(i, rng.next() as u8);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                input.remove(i);
            }
            4 => input.truncate(rng.below(len + 1)),
            // The header length field: the first 8 bytes.
            _ if len >= 8 => {
                let v = match rng.below(3) {
                    0 => rng.next(),
                    1 => rng.below(len * 2) as u64,
                    _ => u64::MAX - rng.below(16) as u64,
                };
                input[..8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: drive <adapter_file|covariance|rsvd> <cases | Ns> [seed]";
    let target = args.get(1).expect(usage).as_str();
    let run: fn(&[u8]) = match target {
        "adapter_file" => lowrank_fuzz::adapter_file,
        "covariance" => lowrank_fuzz::covariance,
        "rsvd" => lowrank_fuzz::rsvd,
        _ => panic!("{usage}"),
    };
    let budget = args.get(2).expect(usage);
    let (max_cases, deadline) = match budget.strip_suffix('s') {
        Some(secs) => (u64::MAX, Some(Duration::from_secs(secs.parse().expect(usage)))),
        None => (budget.parse().expect(usage), None),
    };
    let seed: u64 = args.get(3).map_or(1, |s| s.parse().expect(usage));
    lowrank_core::threads::set_num_threads(1).expect("one thread");
    // Panics are counted and saved, not printed once per case.
    panic::set_hook(Box::new(|_| {}));
    let seeds = seeds(target);
    let mut rng = Rng(seed);
    let mut input = Vec::new();
    let (mut cases, mut panics) = (0u64, 0u64);
    let start = Instant::now();
    while cases < max_cases && deadline.is_none_or(|d| start.elapsed() < d) {
        mutate(&mut rng, &seeds, &mut input);
        cases += 1;
        if panic::catch_unwind(|| run(&input)).is_err() {
            panics += 1;
            let dir = std::path::Path::new("artifacts").join(target);
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join(format!("panic-seed{seed}-case{cases}")), &input);
        }
    }
    println!(
        "{target}: {cases} cases, {panics} panics, {:.1} s ({:.0} cases/s), seed {seed}",
        start.elapsed().as_secs_f64(),
        cases as f64 / start.elapsed().as_secs_f64()
    );
    if panics > 0 {
        std::process::exit(1);
    }
}
