#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lowrank_fuzz::covariance(data));
