#!/usr/bin/env bash
# Runs every fuzz target for at most $SECONDS_PER_TARGET seconds (default 30), one job, one thread.
#
# With libFuzzer when `cargo fuzz` is installed (`--sanitizer none` builds on the stable toolchain, no
# RUSTC_BOOTSTRAP needed); otherwise with the deterministic driver of src/bin/drive.rs.
# Set FUZZ_DRIVER=1 to force the driver.
set -euo pipefail
cd "$(dirname "$0")"
secs=${SECONDS_PER_TARGET:-30}
targets=(adapter_file covariance rsvd)
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
if [ "${FUZZ_DRIVER:-0}" != 1 ] && cargo fuzz --version >/dev/null 2>&1; then
  for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    cargo fuzz run --sanitizer none --features libfuzzer "$t" "corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -max_len=4096
  done
else
  cargo build --release --bin drive
  for t in "${targets[@]}"; do
    ./target/release/drive "$t" "${secs}s"
  done
fi
