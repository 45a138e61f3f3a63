"""LoRATRF's filters under instruments, and LoRATRF against LoRA without filters (issue 13, item 4).

Model: the real all-MiniLM-L6-v2 (``AutoModelForSequenceClassification``, a fresh 8-way head). Task: which of 8
standard-library packages a docstring comes from (:func:`lowrank_rs.data.stdlib.package_task`), texts cut to
``--max-length`` tokens. The package's test split stays the test split; a validation split is carved from the
training split by a second hash of the text (15%, the rule ``bench/quality`` uses), and every choice is made on it.
Every run: AdamW, 10% warmup + cosine, batch 16, one thread; a seed fixes the head's init, the adapters' init,
dropout and the data order, and is shared by every configuration, so differences between configurations are paired.

Part 1, ``probe``: the gates of both task-vector inits before training; then instrumented LoRATRF runs (r = 8,
filters on every layer's output; ``--probe``: the ``mean`` init as the package trains it, and with t's Adam rate
×19.6 = √384, which lets t turn), recording at every optimizer step (from the training forward and backward passes
themselves, non-padding tokens only):

- the gate ``s = clamp(cos(h, t), 0, 1)``: fraction of tokens with ``s > 0``, fraction inside ``(0, 1)`` (the only
  tokens whose gradient reaches ``t``), mean and 10/50/90% quantiles;
- the filter's share of the residual stream, ``‖s · h C D‖ / ‖h‖`` per token;
- gradient norms (before clipping) of ``t``, ``C``, ``D`` over all filters, and of the LoRA part's ``B`` for scale;
- how far the parameters moved: the angle between ``t`` and its init, ``‖C − C₀‖ / ‖C₀‖``, ``‖D‖``.

After training, on the validation split: accuracy with the filters as trained, switched off (``D = 0``), and with
each gate replaced by a constant (its mean over validation tokens), which separates what the filter's transform
does from what its token selection does; and the LoRA part's share of its layers' outputs beside the filters'.

Part 2, ``compare``: LoRATRF (each filter site, each task-vector init asked for) against LoRA on LoRATRF's own targets
without filters, at each rank of ``--ranks``, over ``--seeds``: validation and test accuracy, mean ± std, and the
paired difference from LoRA at the same rank (mean, 95% t-interval). Its texts are cut to ``--compare-max-length``
(32) tokens, half of part 1's 64, so that its 15 runs fit the compute budget of a shared 2-core machine.

``python bench/loratrf_probe.py`` runs both parts and writes the ``loratrf-probe`` section of ``bench/RESULTS.md``;
``--quick`` checks the script on a sliver of the data in about a minute and writes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, write_section

import lowrank_rs as lr
from lowrank_rs.data import from_pairs, tokenize
from lowrank_rs.data import stdlib as stdlib_data
from lowrank_rs.methods.lora.layer import LoraLinear
from lowrank_rs.methods.loratrf.filters import resolve as resolve_trf
from lowrank_rs.training import calibration_batches
from lowrank_rs.training import collate as collate_rows
from lowrank_rs.workflows.finetune import default_model_path

Examples = List[Dict[str, torch.Tensor]]
VAL_FRACTION = 0.15
HEADS = ["classifier"]
CALIBRATION_EXAMPLES = 64


# -- data and runs ---------------------------------------------------------------------------------------------------


def _hash(text: str, salt: str) -> float:
    return int.from_bytes(hashlib.sha256((salt + text).encode()).digest()[:8], "little") / 2.0**64


class Data:
    def __init__(self, max_length: int, quick: bool) -> None:
        from transformers import AutoTokenizer

        self.path = default_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        task = stdlib_data.package_task()
        self.labels = list(task.labels)
        # A second hash of the text, as bench/quality does: the split does not move when other docstrings come or go.
        train = [row for row in task.train if _hash(row[0], "validation:") >= VAL_FRACTION]
        val = [row for row in task.train if _hash(row[0], "validation:") < VAL_FRACTION]
        self.train = self._rows(train, max_length)
        self.val = self._rows(val, max_length)
        self.test = self._rows(list(task.test), max_length)
        if quick:
            # Every k-th row keeps the label mix (rows come grouped by package).
            self.train = self.train[:: len(self.train) // 96][:96]
            self.val = self.val[:: len(self.val) // 48][:48]
            self.test = self.test[:: len(self.test) // 48][:48]
        self.calibration = calibration_batches(self.train, CALIBRATION_EXAMPLES, self.tokenizer.pad_token_id)
        self.description = (
            f"{task.name}: {len(self.train)} train / {len(self.val)} validation (carved from the training split) / "
            f"{len(self.test)} test examples, {len(self.labels)} labels, texts {task.fingerprint}; all-MiniLM-L6-v2, "
            f"max {max_length} tokens"
        )

    def _rows(self, pairs: Sequence[Tuple[str, int]], max_length: int) -> Examples:
        return tokenize(from_pairs(pairs, self.labels, "stdlib-package"), self.tokenizer, max_length)

    def model(self, seed: int) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(
            self.path, num_labels=len(self.labels), local_files_only=True
        )


def trf_config(r: int, seed: int, site: str, init: str) -> lr.TrfConfig:
    return lr.TrfConfig(
        r=r, alpha=2 * r, modules_to_save=HEADS, init_seed=seed, filter_site=site, task_vector_init=init
    )


def attach_trf(data: Data, model: torch.nn.Module, config: lr.TrfConfig, t_lr_scale: float = 1.0) -> None:
    extra = {"batches": data.calibration} if config.task_vector_init == "mean" else {}
    lr.attach(model, config, **extra)
    if t_lr_scale != 1.0:
        # The gate reads only t's direction, and Adam's steps do not depend on the gradient's scale: t / k moves
        # k times as fast (in angle) as t at the same learning rate, and gives the same forward pass.
        with torch.no_grad():
            for f in lr.trf_filters(model).values():
                f.task_vector.div_(t_lr_scale)


def train_config(args: argparse.Namespace, seed: int) -> lr.TrainConfig:
    return lr.TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, warmup_ratio=0.1, seed=seed)


def accuracy(model: torch.nn.Module, rows: Examples) -> float:
    result = lr.evaluate(model, rows, batch_size=64)
    assert result.accuracy is not None
    return result.accuracy


# -- part 1: the probe -----------------------------------------------------------------------------------------------


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.double()))


class FilterProbe:
    """Hooks that measure every filter at every optimizer step of ``lr.train`` (pass :meth:`on_step` to it).

    Measurements come from the training passes themselves: a forward hook on each filter sees the hidden state it
    filters and what it returns, a tensor hook on each filter parameter sees its gradient before the loop clips it,
    and a pre-hook on the model takes each batch's ``attention_mask`` so padding never enters a statistic.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.filters = lr.trf_filters(model)
        self.start = {
            name: {"task_vector": f.task_vector.detach().clone(), "C": f.C.detach().clone()}
            for name, f in self.filters.items()
        }
        self.lora_b = [m.lora_B.weight for m in model.modules() if isinstance(m, LoraLinear)]
        self.mask: Optional[torch.Tensor] = None
        self.gates: List[torch.Tensor] = []
        self.shares: List[torch.Tensor] = []
        self.grad_sq = dict.fromkeys(("task_vector", "C", "D", "lora_B"), 0.0)
        self.steps: List[Dict[str, float]] = []
        self.handles = [model.register_forward_pre_hook(self._take_mask, with_kwargs=True)]
        for f in self.filters.values():
            self.handles.append(f.register_forward_hook(self._on_filter))
            for kind in ("task_vector", "C", "D"):
                self.handles.append(getattr(f, kind).register_hook(partial(self._on_grad, kind)))
        for b in self.lora_b:
            self.handles.append(b.register_hook(partial(self._on_grad, "lora_B")))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _take_mask(self, _module: Any, args: Any, kwargs: Dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = mask != 0 if isinstance(mask, torch.Tensor) else None

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
            return x[self.mask]
        return x.reshape(-1, x.shape[-1])

    def _on_filter(self, module: Any, args: Tuple[Any, ...], output: torch.Tensor) -> None:
        if not module.training:
            return
        with torch.no_grad():
            h = self._tokens(args[0].detach()).float()
            delta = self._tokens(output.detach()).float() - h
            self.gates.append(module.gate(h).flatten())
            self.shares.append(torch.linalg.vector_norm(delta, dim=-1) / torch.linalg.vector_norm(h, dim=-1))

    def _on_grad(self, kind: str, grad: torch.Tensor) -> None:
        self.grad_sq[kind] += float(torch.linalg.vector_norm(grad.double())) ** 2

    def on_step(self, step: int) -> None:
        gates = torch.cat(self.gates)
        shares = torch.cat(self.shares)
        q10, q50, q90 = torch.quantile(gates, torch.tensor([0.1, 0.5, 0.9])).tolist()
        angles, c_moves, d_norms = [], [], []
        for name, f in self.filters.items():
            t0, c0 = self.start[name]["task_vector"], self.start[name]["C"]
            cos = float(torch.nn.functional.cosine_similarity(f.task_vector.detach().double(), t0.double(), dim=0))
            angles.append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
            c_moves.append(_norm(f.C.detach() - c0) / _norm(c0))
            d_norms.append(_norm(f.D.detach()))
        self.steps.append(
            {
                "step": step,
                "open": float((gates > 0).float().mean()),
                "passing": float(((gates > 0) & (gates < 1)).float().mean()),
                "mean": float(gates.mean()),
                "q10": q10,
                "q50": q50,
                "q90": q90,
                "share": float(shares.mean()),
                "share_max": float(shares.max()),
                **{f"grad_{k}": math.sqrt(v) for k, v in self.grad_sq.items()},
                "t_angle": statistics.mean(angles),
                "t_angle_max": max(angles),
                "c_move": statistics.mean(c_moves),
                "d_norm": statistics.mean(d_norms),
            }
        )
        self.gates.clear()
        self.shares.clear()
        self.grad_sq = dict.fromkeys(self.grad_sq, 0.0)


@contextmanager
def filters_off(model: torch.nn.Module) -> Iterator[None]:
    """``D = 0`` on every filter (the filter is then exactly the identity), restored on exit."""
    saved = {name: f.D.detach().clone() for name, f in lr.trf_filters(model).items()}
    try:
        with torch.no_grad():
            for f in lr.trf_filters(model).values():
                f.D.zero_()
        yield
    finally:
        with torch.no_grad():
            for name, f in lr.trf_filters(model).items():
                f.D.copy_(saved[name])


@contextmanager
def constant_gates(model: torch.nn.Module, values: Dict[str, float]) -> Iterator[None]:
    """Each filter's gate replaced by a constant: the transform stays, the choice among tokens goes."""
    filters = lr.trf_filters(model)
    for name, f in filters.items():

        def gate(h: torch.Tensor, c: float = values[name]) -> torch.Tensor:
            return torch.full(h.shape[:-1], c, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)

        f.gate = gate  # type: ignore[method-assign]
    try:
        yield
    finally:
        for f in filters.values():
            del f.gate


def site_statistics(model: torch.nn.Module, rows: Examples, pad: int) -> Dict[str, Dict[str, float]]:
    """On ``rows`` in eval mode, per filter: mean gate, mean ‖filter output − h‖ / ‖h‖, and per layer the LoRA part's
    mean ‖γ B A x‖ / ‖W₀ x + b‖ (non-padding tokens)."""
    filters = lr.trf_filters(model)
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    sums: Dict[str, Dict[str, float]] = {}
    state: Dict[str, Any] = {}

    def add(name: str, key: str, values: torch.Tensor) -> None:
        entry = sums.setdefault(name, {})
        entry[key] = entry.get(key, 0.0) + float(values.sum())
        entry[key + "_n"] = entry.get(key + "_n", 0.0) + values.numel()

    def tokens(x: torch.Tensor) -> torch.Tensor:
        mask = state["mask"]
        return x[mask] if tuple(x.shape[:-1]) == tuple(mask.shape) else x.reshape(-1, x.shape[-1])

    def on_filter(name: str, module: Any, args: Tuple[Any, ...], output: torch.Tensor) -> None:
        h = tokens(args[0]).float()
        gate = module.gate(h)
        add(name, "gate", gate)
        add(name, "open", (gate > 0).float())
        delta = tokens(output).float() - h
        add(name, "share", torch.linalg.vector_norm(delta, dim=-1) / torch.linalg.vector_norm(h, dim=-1))

    def on_lora(name: str, module: LoraLinear, args: Tuple[Any, ...], output: torch.Tensor) -> None:
        x = tokens(args[0]).float()
        base = module.base_layer(x)
        update = module.scaling * module.lora_B(module.lora_A(x))
        add(name, "lora", torch.linalg.vector_norm(update, dim=-1) / torch.linalg.vector_norm(base, dim=-1))

    handles = [f.register_forward_hook(partial(on_filter, n)) for n, f in filters.items()]
    handles += [m.register_forward_hook(partial(on_lora, n)) for n, m in lora.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(rows), 64):
                batch = collate_rows(rows[i : i + 64], pad)
                batch.pop("labels")
                state["mask"] = batch["attention_mask"] != 0
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {
        name: {k: v / entry[k + "_n"] for k, v in entry.items() if not k.endswith("_n")} for name, entry in sums.items()
    }


def _shown_steps(total: int) -> List[int]:
    marks = {1, 2, 3, 5, 10, total}
    marks |= {max(1, round(total * f)) for f in (0.25, 0.5, 0.75)}
    return sorted(m for m in marks if m <= total)


def gates_at_init(data: Data) -> str:
    """Each init's gates before any training, per layer, on the validation split."""
    columns: Dict[str, Dict[str, Dict[str, float]]] = {}
    for init in ("normal", "mean"):
        model = data.model(0)
        attach_trf(data, model, trf_config(8, 0, "layer_output", init))
        columns[init] = site_statistics(model, data.val, data.tokenizer.pad_token_id)
    rows = []
    for name in lr.trf_filters(model):
        rows.append(
            [name]
            + [f"{columns[i][name]['gate']:.3f} ({100 * columns[i][name]['open']:.0f}%)" for i in ("normal", "mean")]
        )
    text = (
        "#### The gates at init\n\nMean gate s over the validation split's non-padding tokens (share of tokens with "
        "s > 0), before training, for both task-vector inits.\n\n"
        + table(["layer", "t init normal", "t init mean"], rows)
    )
    print(text, flush=True)
    return text


def run_probe(args: argparse.Namespace, data: Data, variant: str) -> str:
    """One instrumented run; ``variant`` is a task-vector init, optionally ``@k``: t's Adam rate times k."""
    init, _, scale = variant.partition("@")
    t_lr_scale = float(scale) if scale else 1.0
    seed = 0
    model = data.model(seed)
    attach_trf(data, model, trf_config(8, seed, "layer_output", init), t_lr_scale)
    probe = FilterProbe(model)
    t0 = time.perf_counter()
    result = lr.train(
        model, data.train, eval_data=data.val, config=train_config(args, seed), progress=False, on_step=probe.on_step
    )
    probe.remove()
    seconds = time.perf_counter() - t0
    steps = probe.steps
    curve = []
    for s in _shown_steps(len(steps)):
        row = steps[s - 1]
        curve.append(
            [
                str(s),
                f"{result.losses[s - 1]:.3f}",
                f"{100 * row['open']:.0f}%",
                f"{100 * row['passing']:.0f}%",
                f"{row['mean']:.3f}",
                f"{row['q10']:.3f} / {row['q50']:.3f} / {row['q90']:.3f}",
                f"{100 * row['share']:.2f}% ({100 * row['share_max']:.1f}%)",
                f"{row['grad_task_vector']:.1e}",
                f"{row['grad_C']:.1e}",
                f"{row['grad_D']:.1e}",
                f"{row['grad_lora_B']:.1e}",
                f"{row['t_angle']:.2f}° ({row['t_angle_max']:.2f}°)",
                f"{row['c_move']:.3f}",
                f"{row['d_norm']:.3f}",
            ]
        )
    pad = data.tokenizer.pad_token_id
    stats = site_statistics(model, data.val, pad)
    filters = lr.trf_filters(model)
    with_filters = accuracy(model, data.val)
    with filters_off(model):
        without = accuracy(model, data.val)
    with constant_gates(model, {name: stats[name]["gate"] for name in filters}):
        constant = accuracy(model, data.val)
    per_layer = []
    for name in filters:
        loras = [v["lora"] for n, v in stats.items() if n.startswith(name + ".") and "lora" in v]
        per_layer.append(
            [
                name,
                f"{stats[name]['gate']:.3f}",
                f"{100 * stats[name]['share']:.2f}%",
                f"{100 * statistics.mean(loras):.2f}%" if loras else "—",
            ]
        )
    text = (
        f"#### Task vector init `{init}`"
        + (f", t's Adam rate × {t_lr_scale:g} (t divided by {t_lr_scale:g} after attach)" if scale else "")
        + f" (r = 8, rank-8 filters on every layer's output; seed {seed}, {len(steps)} steps, {seconds:.0f} s)\n\n"
        "Per optimizer step, over the step's non-padding training tokens and all 6 filters. *open*: s > 0; "
        "*passing*: 0 < s < 1, the tokens whose gradient reaches t; *share*: mean (max) of ‖s·hCD‖ / ‖h‖; "
        "gradient norms before clipping, over all filters; *t moved*: mean (max) angle between t and its init.\n\n"
        + table(
            [
                "step",
                "loss",
                "open",
                "passing",
                "mean s",
                "s q10 / q50 / q90",
                "share",
                "‖∇t‖",
                "‖∇C‖",
                "‖∇D‖",
                "‖∇B‖ (LoRA)",
                "t moved",
                "‖C−C₀‖/‖C₀‖",
                "‖D‖",
            ],  # fmt: skip
            curve,
        )
        + "\n\nAfter training, on the validation split (eval mode): mean gate, the filter's share ‖s·hCD‖ / ‖h‖ and "
        "the LoRA part's share ‖γBAx‖ / ‖W₀x + b‖ (mean over the layer's adapted linears).\n\n"
        + table(["layer", "mean s", "filter share", "LoRA share"], per_layer)
        + "\n\n"
        + table(
            ["validation accuracy", "filters as trained", "filters off (D = 0)", "gates constant (their mean)"],
            [["", f"{100 * with_filters:.1f}%", f"{100 * without:.1f}%", f"{100 * constant:.1f}%"]],
        )
    )
    print(text, flush=True)
    return text


# -- part 2: the comparison ------------------------------------------------------------------------------------------


def _t95(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def _mean_std(xs: Sequence[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}%"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}%"


def _paired(xs: Sequence[float], ref: Sequence[float]) -> str:
    d = [a - b for a, b in zip(xs, ref)]
    if len(d) < 2:
        return f"{100 * d[0]:+.1f}"
    mean = statistics.mean(d)
    half = _t95(len(d)) * statistics.stdev(d) / math.sqrt(len(d))
    return f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]"


def run_compare(args: argparse.Namespace, data: Data) -> str:
    seeds = [int(s) for s in args.seeds.split(",")]
    probe_model = data.model(0)
    targets = resolve_trf(lr.TrfConfig(), probe_model).target_modules
    del probe_model
    rows = []
    for r in (int(x) for x in args.ranks.split(",")):
        variants: List[Tuple[str, Any]] = [(f"LoRA r = {r}, LoRATRF's targets, no filters", None)]
        for site in args.sites.split(","):
            for init in args.inits.split(","):
                variants.append((f"LoRATRF r = {r}, {site}, t init {init}", (site, init)))
        results: Dict[str, Dict[str, List[float]]] = {}
        params: Dict[str, int] = {}
        for label, variant in variants:
            for seed in seeds:
                model = data.model(seed)
                if variant is None:
                    lr.attach(
                        model,
                        lr.LoraConfig(target_modules=targets, r=r, alpha=2 * r, modules_to_save=HEADS, init_seed=seed),
                    )
                else:
                    attach_trf(data, model, trf_config(r, seed, *variant))
                params[label] = lr.trainable_parameters(model)
                t0 = time.perf_counter()
                config = train_config(args, seed)
                result = lr.train(model, data.train, eval_data=data.val, config=config, progress=False)
                val = result.evals[-1].accuracy
                assert val is not None
                test = accuracy(model, data.test)
                entry = results.setdefault(label, {"val": [], "test": []})
                entry["val"].append(val)
                entry["test"].append(test)
                print(
                    f"  {label:<48} seed {seed}: val {100 * val:.1f}%  test {100 * test:.1f}%  "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        ref = results[variants[0][0]]
        for label, _ in variants:
            res = results[label]
            rows.append(
                [
                    label,
                    f"{params[label]:,}",
                    _mean_std(res["val"]),
                    "—" if res is ref else _paired(res["val"], ref["val"]),
                    _mean_std(res["test"]),
                    "—" if res is ref else _paired(res["test"], ref["test"]),
                ]
            )
    text = (
        f"### LoRATRF against LoRA without filters\n\nSeeds {args.seeds}; paired differences from the LoRA row of the "
        "same rank (percentage points, mean [95% t-interval]); a seed is shared by every row.\n\n"
        + table(["configuration", "trainable params", "validation", "Δ validation", "test", "Δ test"], rows)
    )
    print(text, flush=True)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a sliver of the data, one seed; writes nothing")
    ap.add_argument("--parts", default="probe,compare", help="probe, compare or both (comma-separated)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ranks", default="8,4")
    ap.add_argument("--sites", default="layer_output,linear_input")
    ap.add_argument("--inits", default="mean", help="task-vector inits compared in part 2")
    ap.add_argument(
        "--probe",
        default="mean,mean@19.6",
        help="part 1's instrumented runs: a task-vector init, optionally @k for t's Adam rate times k",
    )
    # Part 2 is 15 runs; at 64 tokens they would take about 30 min on one contended core.
    ap.add_argument("--compare-max-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.ranks, args.epochs = "0", "4", 1
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = Data(args.max_length, args.quick)
    description = data.description
    parts = args.parts.split(",")
    sections = []
    if "probe" in parts:
        sections.append("### The filters during training")
        sections.append(gates_at_init(data))
        for variant in args.probe.split(","):
            sections.append(run_probe(args, data, variant))
    if "compare" in parts:
        if args.compare_max_length != args.max_length:
            data = Data(args.compare_max_length, args.quick)
            description += f" (part 2: max {args.compare_max_length} tokens)"
        sections.append(run_compare(args, data))
    minutes = (time.perf_counter() - started) / 60
    head = (
        "## LoRATRF's filters: probe and ablation (`bench/loratrf_probe.py`)\n\n"
        f"{description}; {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g} (AdamW, 10% warmup + "
        f"cosine). Took {minutes:.0f} min on: {machine()}\n"
    )
    if not args.quick and not args.no_write:
        write_section("loratrf-probe", "\n\n".join([head, *sections]))
        print("wrote bench/RESULTS.md")


if __name__ == "__main__":
    main()
