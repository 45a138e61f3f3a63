"""One run of the harness — (task, method, learning rate, seed) — in its own process, so a crash, a leak or a time
limit costs that run only. ``python bench/quality --unit SPEC_JSON --out FILE`` runs one and writes its result."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import entries
import tasks as task_data
import torch

import lowrank_rs as lr
from lowrank_rs.adapters.recipe import default_targets
from lowrank_rs.data import from_pairs, tokenize
from lowrank_rs.training import collate
from lowrank_rs.workflows.finetune import default_model_path

Examples = List[Dict[str, torch.Tensor]]
BATCH = 16
# Few-shot transfer trains for a fixed number of steps whatever k is: at 16-64 examples a fixed number of epochs
# means a dozen or two steps, too few for even a fresh head to leave the majority class (measured: every method sat
# at it after 16-20 steps, while a fresh LoRA on the whole training set clears it after about 100).
TRANSFER_BATCH = 8
TRANSFER_STEPS = 200


def transfer_epochs(shots: int, steps: int = TRANSFER_STEPS) -> int:
    return max(2, steps * TRANSFER_BATCH // shots)


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore")


class Data:
    """The tokenized splits of one study: a single task, or the multi-task union (one head over every task's labels,
    each task judged among its own labels)."""

    def __init__(
        self, task: str, max_length: int, tokenizer: Any, task_ids: bool, prefix: bool, limit: int = 0
    ) -> None:
        self.tokenizer = tokenizer
        self.limit = limit
        self.peer_task_ids = False  # PEFT's multitask prompt tuning takes task ids as a forward argument
        if task == "multitask":
            all_tasks = task_data.multitask()
            names = [*task_data.SOURCE_TASKS, task_data.TRANSFER_TASK]
            self.slices: Dict[str, Tuple[int, int]] = {}
            union: List[str] = []
            for name in names:
                self.slices[name] = (len(union), len(union) + len(all_tasks[name].labels))
                union += [f"{name}:{label}" for label in all_tasks[name].labels]
            self.labels = union
            self.sources = list(task_data.SOURCE_TASKS)
            self.splits: Dict[str, Dict[str, Examples]] = {}
            for split in ("train", "val", "test"):
                self.splits[split] = {
                    name: self._rows(all_tasks[name], split, i, max_length, task_ids, prefix)
                    for i, name in enumerate(names)
                }
            self.description = "; ".join(all_tasks[n].describe() for n in names)
        else:
            single = task_data.multitask()[task] if task == task_data.TRANSFER_TASK else task_data.SINGLE[task]()
            self.labels = list(single.labels)
            self.slices = {task: (0, len(self.labels))}
            self.sources = [task]
            self.splits = {
                split: {task: self._rows(single, split, None, max_length, False, False)}
                for split in ("train", "val", "test")
            }
            self.description = single.describe()

    def _rows(self, task: task_data.Task, split: str, task_id: Optional[int], max_length: int, ids: bool, prefix: bool):
        lo = self.slices[task.name][0]
        pairs = [((f"task: {task.name}. " + t) if prefix else t, y + lo) for t, y in getattr(task, split)]
        rows = tokenize(from_pairs(pairs, [str(i) for i in range(lo + len(task.labels))], task.name), self.tokenizer,
                        max_length)  # fmt: skip
        if self.limit:
            # Every k-th row, so a sliver keeps the label mix (rows come grouped by source package).
            keep = self.limit if split == "train" else self.limit // 2
            rows = rows[:: max(1, len(rows) // keep)][:keep]
        if ids and task_id is not None:
            rows = [{**row, "task_ids": torch.tensor(task_id)} for row in rows]
        return rows

    def train_rows(self, tasks: Sequence[str]) -> Examples:
        return [row for name in tasks for row in self.splits["train"][name]]

    def accuracy(self, model: torch.nn.Module, split: str, name: str) -> float:
        rows = self.splits[split][name]
        lo, hi = self.slices[name]
        model.eval()
        hits = 0
        with torch.no_grad():
            for i in range(0, len(rows), 64):
                batch = collate(rows[i : i + 64], self.tokenizer.pad_token_id)
                task_ids = batch.pop("task_ids", None)
                labels = batch.pop("labels")
                batch = {k: v.to(_device()) for k, v in batch.items()}
                if task_ids is not None and self.peer_task_ids:
                    logits = model(**batch, task_ids=task_ids.to(_device())).logits
                elif task_ids is not None:
                    with lr.use_tasks(model, task_ids.to(_device())):
                        logits = model(**batch).logits
                else:
                    logits = model(**batch).logits
                hits += int((logits[:, lo:hi].argmax(-1).cpu() + lo == labels).sum())
        return hits / len(rows)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model(num_labels: int, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        default_model_path(), num_labels=num_labels, local_files_only=True
    )


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Train one unit and measure it. ``spec``: task, method, lr, seed, epochs, max_length and, for few-shot
    transfer, ``shots`` and ``start`` (the saved multi-task run to start from)."""
    _quiet()
    from transformers import AutoTokenizer

    started = time.perf_counter()
    entry = entries.ENTRIES[spec["method"]]
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    data = Data(spec["task"], spec["max_length"], tokenizer, task_ids=entry.multitask, prefix=not entry.multitask
                and spec["task"] == "multitask", limit=spec.get("limit", 0))  # fmt: skip
    data.peer_task_ids = entry.family == "peer"
    shots = spec.get("shots")
    transfer = task_data.TRANSFER_TASK
    if shots:
        pool = data.splits["train"][transfer]
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(spec["seed"]))[:shots].tolist()
        train_rows = [pool[i] for i in pick]
        judged = [transfer]
    else:
        train_rows = data.train_rows(data.sources)
        judged = data.sources
    epochs = spec["epochs"]
    batch = TRANSFER_BATCH if shots else BATCH
    steps_per_epoch = math.ceil(len(train_rows) / batch)
    total = steps_per_epoch * epochs
    model = _model(len(data.labels), spec["seed"])
    probe_targets, heads = default_targets(model)
    n_modules = sum(
        1 for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in name
    )
    calibration = [
        collate(train_rows[i : i + 16], tokenizer.pad_token_id)
        for i in range(0, min(entry.calibration_examples, len(train_rows)), 16)
    ]
    options = {"lr": spec["lr"], "tasks": data.sources}
    on_step = None
    ctx = entries.Context(model, spec["seed"], probe_targets, heads, n_modules, calibration, total, options)
    if spec.get("start"):
        model = _resume(ctx, spec, entry)
    else:
        model, on_step = entry.build(ctx)
    model.to(_device())
    trainable = _count(model)
    calibrated = time.perf_counter() - started
    config = lr.TrainConfig(
        lr=spec["lr"], epochs=epochs, batch_size=batch, warmup_ratio=0.1, seed=spec["seed"],
        eval_every=steps_per_epoch * max(1, epochs // 10), eval_batch_size=64,
    )  # fmt: skip
    val_rows = [row for name in judged for row in data.splits["val"][name]]
    trace: List[List[float]] = []
    gates = [m for m in model.modules() if hasattr(m, "gate") and isinstance(m.gate, torch.nn.Parameter)]
    if gates:
        # TA-LoRA's gates start at zero: their trajectory says whether the prompt branch ever opens.
        inner = on_step

        def on_step(step: int) -> None:  # noqa: F811 — wraps the method's own per-step call
            if inner is not None:
                inner(step)
            if step % max(1, total // 20) == 0 or step == total:
                trace.append([step, *[float(torch.tanh(m.gate.detach()).abs().mean()) for m in gates]])

    extra = {"on_step": on_step} if on_step is not None else {}
    result = lr.train(model, train_rows, eval_data=val_rows, config=config, progress=False, **extra)
    out = {
        "spec": spec,
        "trainable": trainable,
        "seconds": time.perf_counter() - started,
        "setup_seconds": calibrated,
        "steps": result.steps,
        "curve": [[e.step / steps_per_epoch, e.accuracy, e.loss] for e in result.evals],
        "losses": result.losses[:: max(1, len(result.losses) // 50)],
        "val": {name: data.accuracy(model, "val", name) for name in judged},
        "test": {name: data.accuracy(model, "test", name) for name in judged},
        "majority": {name: _majority(data.splits["test"][name]) for name in judged},
        "description": data.description,
        "gate_trace": trace,
    }
    out["val_mean"] = sum(out["val"].values()) / len(judged)
    out["test_mean"] = sum(out["test"].values()) / len(judged)
    if spec.get("save"):
        _save(model, spec["save"], entry)
    return out


def _majority(rows: Examples) -> float:
    counts: Dict[int, int] = {}
    for row in rows:
        counts[int(row["labels"])] = counts.get(int(row["labels"]), 0) + 1
    return max(counts.values()) / len(rows)


def _save(model: torch.nn.Module, path: str, entry: entries.Entry) -> None:
    if entry.family == "peer":
        model.save_pretrained(path)
    else:
        lr.save_adapter(model, path)


def _resume(ctx: entries.Context, spec: Dict[str, Any], entry: entries.Entry) -> torch.nn.Module:
    """Few-shot transfer from a saved multi-task run: the saved adapter (and head) continue on the new task's
    examples; TA-LoRA adds the task (mean init) and trains its fast weights and the head (with ``train_shared``,
    the shared weights and gates as well)."""
    if entry.family == "peer":
        import peft
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        # PEFT refuses to load a prompt-learning adapter as trainable, so the run builds it afresh and loads the
        # saved weights into it.
        model, _ = entry.build(ctx)
        set_peft_model_state_dict(model, load_peft_weights(spec["start"]))
        assert isinstance(model, peft.PeftModel)
        return model
    model = ctx.model
    lr.load_adapter(model, spec["start"])
    if entry.multitask:
        lr.add_task(model, task_data.TRANSFER_TASK, init="mean", train_saved=True,
                    train_shared=bool(spec.get("train_shared")))  # fmt: skip
    return model


def versions() -> Dict[str, str]:
    """What a run's numbers depend on besides its spec: the same spec on another install gives another run."""
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "lowrank_rs": lr.__version__}  # fmt: skip


def main_unit(spec_json: str, out_path: str, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    spec = json.loads(spec_json)
    result = run(spec)
    result["versions"] = versions()
    result["threads"] = torch.get_num_threads()  # another thread count sums in another order: another run
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out_path)
