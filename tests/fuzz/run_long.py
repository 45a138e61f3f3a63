"""The long fuzz run of issue 14 (Python side): every target for a number of cases or a time budget.

    nice -n 19 python tests/fuzz/run_long.py --examples 1000000 --hours 8 [--target load_jsonl ...]

Each target runs in chunks of ``--chunk`` hypothesis cases with a fresh seed per chunk (so the total is not capped by
hypothesis' own example budget); after every chunk a line ``target cases failures seconds`` goes to stdout and the
failing inputs' reprs to ``--failures`` (one JSON line each). Exit status 1 if anything other than a LowRankError
was raised.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [os.fspath(HERE.parent), os.fspath(HERE.parents[1] / "python")]

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from fuzz.targets import TARGETS, cleanup  # noqa: E402


def _chunk(strategy, run, name, chunk, found, examples, counts):
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @seed(chunk)
    @given(strategy())
    def case(path):
        counts[0] += 1
        try:
            run(path)
        except Exception as e:  # noqa: BLE001 - every non-LowRankError is a finding to record, not to stop at
            trace = traceback.format_exc(limit=8)
            found.append({"target": name, "chunk": chunk, "error": f"{type(e).__name__}: {e}", "trace": trace})
        finally:
            cleanup(path)

    return case


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=1_000_000, help="cases per target")
    parser.add_argument("--hours", type=float, default=8.0, help="time budget for all targets together")
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--target", action="append", choices=sorted(TARGETS))
    parser.add_argument("--failures", default="fuzz-failures.jsonl")
    args = parser.parse_args()
    names = args.target or sorted(TARGETS)
    deadline = time.monotonic() + args.hours * 3600
    share = (deadline - time.monotonic()) / len(names)
    failed = 0
    for index, name in enumerate(names):
        strategy, run = TARGETS[name]
        stop = min(deadline, time.monotonic() + share) if index < len(names) - 1 else deadline
        cases = failures = 0
        chunk = 0
        start = time.monotonic()
        while cases < args.examples and time.monotonic() < stop:
            found: list = []
            counts = [0]
            _chunk(strategy, run, name, chunk, found, min(args.chunk, args.examples - cases), counts)()
            cases += counts[0]
            chunk += 1
            if found:
                failures += len(found)
                with open(args.failures, "a") as f:
                    for item in found:
                        f.write(json.dumps(item) + "\n")
            print(f"{name} {cases} {failures} {time.monotonic() - start:.0f}", flush=True)
        failed += failures
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
