"""World size 1 vs 2 (gloo on loopback) on the same global work: TLoRA calibration and training step time, and the
bytes each rank sends in sharded calibration against an all-gather of the same activations.

``python bench/distributed.py`` runs the single-process half in this process and launches the two-process half with
torchrun (this file again, with ``--worker``); ``--write`` puts the section into ``bench/RESULTS.md``.

Work: a random-initialised LLaMA (hidden 256, intermediate 512, 2 layers), calibration on 32 examples of 128 tokens
(7 projections per layer, budget r = 8), then 6 optimizer steps of LoRA (r = 8) with a global batch of 8 sequences of
128 tokens. Bytes are the payloads this rank hands to collectives (counted by wrapping ``torch.distributed``), and,
on paper, what an all-gather of the calibration activations would send: ``(W − 1) · tokens per rank · d · bytes`` per
distinct target input, at the reference's setting (256 examples × 256 tokens, hidden 1024) too.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 256, 512, 2, 512
CAL_EXAMPLES, TOKENS, STEPS, GLOBAL_BATCH = 32, 128, 6, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                      num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=TOKENS)  # fmt: skip
    return transformers.LlamaForCausalLM(config).train()


def examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (TOKENS,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


class Counter:
    """Bytes this rank hands to collectives (reduce: non-owners only; all-reduce and all-gather: its input)."""

    def __init__(self):
        import torch.distributed as dist

        self.sent = 0
        self.dist = dist
        self.originals = {}
        for name in ("reduce", "all_reduce", "all_gather", "broadcast"):
            self.originals[name] = getattr(dist, name)
            setattr(dist, name, self.wrap(name))

    def wrap(self, name):
        original = self.originals[name]

        def counted(tensor, *args, **kwargs):
            dst = kwargs.get("dst", args[0] if name == "reduce" and args else None)
            if name != "reduce" or dst != self.dist.get_rank():
                t = tensor[0] if isinstance(tensor, list) else tensor
                self.sent += t.numel() * t.element_size()
            return original(tensor, *args, **kwargs)

        return counted


def run(world):
    import lowrank_rs as lr
    from lowrank_rs.training.distributed import detect

    rank = detect().rank  # initialises the process group under torchrun, as lr.train and lr.calibrate would
    counter = Counter() if world > 1 else None
    m = model()
    cal = [{k: v.unsqueeze(0) for k, v in e.items()} for e in examples(CAL_EXAMPLES, seed=1)]
    config = lr.TLoraConfig(TARGETS, r=8, alpha=16, num_examples=CAL_EXAMPLES)
    if world > 1:
        torch.distributed.barrier()
    tick = time.perf_counter()
    lr.calibrate(m, cal, config, progress=False)
    calibration = time.perf_counter() - tick
    sent = counter.sent if counter else 0

    m = lr.attach(model(), lr.LoraConfig(TARGETS, r=8, alpha=16, init_seed=0))
    per_rank = GLOBAL_BATCH // world
    train = lr.TrainConfig(lr=1e-3, batch_size=per_rank, max_steps=STEPS, seed=0)
    tick = time.perf_counter()
    result = lr.train(m, examples(GLOBAL_BATCH * STEPS, seed=2), config=train, progress=False)
    step = (time.perf_counter() - tick) / STEPS
    return {"rank": rank, "calibration_s": calibration, "step_s": step, "sent": sent, "loss": result.losses[-1],
            "threads": torch.get_num_threads()}  # fmt: skip


def allgather_bytes(tokens_total, d, world, bytes_per):
    return (world - 1) * (tokens_total // world) * d * bytes_per


def reduced_bytes(d):
    return (d * (d + 3) // 2 + 1) * 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    single = run(1)
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker", out]  # fmt: skip
        subprocess.run(command, env=env, check=True, capture_output=True)
        pair = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    # Per-layer distinct inputs of the 7 projections: attention input, o's input, MLP input, down's input.
    dims = [HIDDEN, HIDDEN, HIDDEN, INTERMEDIATE] * LAYERS
    gather = sum(allgather_bytes(CAL_EXAMPLES * TOKENS, d, 2, 4) for d in dims)
    lines = [
        "## Distributed (`bench/distributed.py`)",
        "",
        f"2 processes on loopback (gloo) vs 1, same global work, on {os.cpu_count()} shared CPU cores "
        f"(torch {torch.__version__}; world 1 with {single['threads']} torch thread(s), each world-2 process with "
        f"{pair[0]['threads']}; the machine is shared with other jobs, so ratios, not absolute times, are the result).",
        "",
        "| | world 1 | world 2 (rank 0 / rank 1) |",
        "|---|---|---|",
        f"| TLoRA calibration, {CAL_EXAMPLES}×{TOKENS} tokens, 14 targets (s) | {single['calibration_s']:.2f} | "
        f"{pair[0]['calibration_s']:.2f} / {pair[1]['calibration_s']:.2f} |",
        f"| LoRA training step, global batch {GLOBAL_BATCH}×{TOKENS} (s) | {single['step_s']:.3f} | "
        f"{pair[0]['step_s']:.3f} / {pair[1]['step_s']:.3f} |",
        f"| final loss | {single['loss']:.5f} | {pair[0]['loss']:.5f} |",
        f"| calibration bytes sent (measured) | — | {pair[0]['sent'] / 1e6:.2f} MB / {pair[1]['sent'] / 1e6:.2f} MB |",
        f"| all-gather of the same activations, f32 (paper) | — | {gather / 1e6:.2f} MB per rank |",
        "",
        "Reference setting (256 examples × 256 tokens, one accumulator of hidden 1024, world 2):",
        "",
        "| activations | all-gather per rank | reduced statistics per rank | ratio |",
        "|---|---|---|---|",
    ]
    for label, b in (("float32", 4), ("bfloat16", 2)):
        g, r = allgather_bytes(256 * 256, 1024, 2, b), reduced_bytes(1024)
        lines.append(f"| {label} | {g / 1e6:.1f} MB | {r / 1e6:.2f} MB | **{g / r:.1f}×** |")
    lines += [
        "",
        "Crossover: reduction sends fewer bytes once a rank's tokens exceed `(d + 3) · 4 / ((W − 1) · bytes)` — for "
        "d = 1024 and W = 2, 1027 tokens in float32, 2054 in bfloat16 (4 or 8 sequences of 256 tokens per rank).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        record = run(int(os.environ["WORLD_SIZE"]))
        with open(os.path.join(sys.argv[2], f"rank{record['rank']}.json"), "w") as f:
            json.dump(record, f)
    else:
        section = main()
        sys.stdout.write(section)
        if "--write" in sys.argv:
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
            text = open(path).read()
            begin, end = "<!-- distributed:begin -->", "<!-- distributed:end -->"
            block = f"{begin}\n{section}{end}"
            if begin in text:
                text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
            else:
                text = text.rstrip("\n") + "\n\n" + block + "\n"
            with open(path, "w") as f:
                f.write(text)
