"""The ``lowrank-rs`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .errors import LowRankError

DESCRIPTION = """\
lowrank-rs: LoRA-family adapters with a Rust calibration core.

Commands:
  demo      a short TLoRA calibration on generated activations: streams them through the core's covariance
            accumulators, allocates a rank budget, computes each module's task-aware basis and writes an adapter
  inspect   print the tensors and config of an adapter directory
"""


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lowrank-rs", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="calibration demo on generated activations")
    demo.add_argument("--out", default="lowrank-rs-out/demo-adapter", help="adapter directory to write")
    demo.add_argument("--layers", type=int, default=4, help="transformer layers to simulate (default 4)")
    demo.add_argument("--dim", type=int, default=512, help="hidden size (default 512)")
    demo.add_argument("--rank", type=int, default=16, help="base rank r; the budget is r × modules (default 16)")
    demo.add_argument("--batches", type=int, default=16, help="calibration batches (default 16)")
    demo.add_argument("--seed", type=int, default=0)

    inspect = sub.add_parser("inspect", help="print an adapter directory's tensors and config")
    inspect.add_argument("path", help="adapter directory")

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(
                out=args.out,
                layers=args.layers,
                dim=args.dim,
                rank=args.rank,
                batches=args.batches,
                seed=args.seed,
            )
        elif args.command == "inspect":
            _inspect(args.path)
    except LowRankError as e:
        print(f"lowrank-rs: error: {e}", file=sys.stderr)
        return 2
    return 0


def _inspect(path: str) -> None:
    import json

    from .package import read_adapter

    tensors, config = read_adapter(path)
    total = 0
    print(f"{path}: {len(tensors)} tensors")
    for name, arr in sorted(tensors.items()):
        total += arr.size
        print(f"  {name:<60} {str(arr.dtype):>8} {tuple(arr.shape)}")
    print(f"  {total:,} parameters")
    print(json.dumps(config, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
