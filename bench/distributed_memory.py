"""Covariance memory per rank for TLoRA calibration of LLaMA-7B/13B/70B shapes, on paper (no model is loaded).

All 7 projections of every layer are targets; modules reading one tensor share an accumulator (q/k/v read the
attention input, gate/up the MLP input; o and down read their own), each a float64 ``d × d`` matrix. Compared:

- ours, while collecting: every rank accumulates every module for its own examples (the whole set);
- ours, after the reduction: each accumulator lives only on its owner (largest first to the least-loaded rank);
- the TLoRA reference: every rank computes the same statistics on every example (the whole set, at any world size);
- PEFT's EVA: no covariance, but each target's forward hook all-gathers every rank's activations of its input
  (``world × tokens per rank × d``, bf16) so that every rank can run the same incremental SVD; the column is the
  largest such gather (one module at a time, the down projection's input), for 4 × 2048 tokens per rank.

Usage: ``python bench/distributed_memory.py`` prints the Markdown table that ``docs/distributed.md`` carries.
"""

import sys

MODELS = {
    # name: (hidden, intermediate, layers)
    "LLaMA-7B": (4096, 11008, 32),
    "LLaMA-13B": (5120, 13824, 40),
    "LLaMA-70B": (8192, 28672, 80),
}
WORLDS = (1, 8, 64)
# EVA's gathered batch: 4 sequences of 2048 tokens per rank, bf16.
EVA_TOKENS_PER_RANK = 4 * 2048
EVA_BYTES = 2


def accumulators(hidden, intermediate, layers):
    """The accumulators' dims: per layer q/k/v (shared), o, gate/up (shared), down."""
    return [hidden, hidden, hidden, intermediate] * layers


def owned_max(sizes, world):
    """The largest per-rank load of the greedy assignment ``training.distributed.owners`` makes."""
    load = [0] * world
    for size in sorted(sizes, reverse=True):
        load[load.index(min(load))] += size
    return max(load)


def gib(n):
    return f"{n / 2**30:,.1f}"


def table():
    rows = [
        "| model | world | ours, collecting (GiB/rank) | ours, after reduction (GiB/rank) | TLoRA reference (GiB/rank) "
        "| EVA, largest all-gather (GiB/rank) |",
        "|---|---|---|---|---|---|",
    ]
    for name, (hidden, intermediate, layers) in MODELS.items():
        dims = accumulators(hidden, intermediate, layers)
        sizes = [8 * d * d for d in dims]
        total = sum(sizes)
        eva_per_rank_tokens = max(dims) * EVA_TOKENS_PER_RANK * EVA_BYTES
        for world in WORLDS:
            rows.append(
                f"| {name} | {world} | {gib(total)} | {gib(owned_max(sizes, world))} | {gib(total)} "
                f"| {gib(world * eva_per_rank_tokens)} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
