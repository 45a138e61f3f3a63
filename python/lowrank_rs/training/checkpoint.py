"""The training checkpoint format (see "Checkpoints" in :mod:`lowrank_rs.training.loop`): no pickle, written
atomically, resumed bit for bit.

Under several processes every rank takes part in gathering the state (FSDP2 shards are collected into whole
tensors, each rank's RNG states are collected), rank 0 alone writes, and every rank reads the same files back. The
state records the number of processes, since the data order and the global batch depend on it."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._core import __version__
from ..errors import CheckpointError
from .config import RESUMABLE_CHANGES, TrainConfig
from .distributed import Distributed, barrier, full_tensor, gather_objects, shard_like
from .results import EvalResult

__all__ = ["History", "Position", "checkpoint_path", "load_checkpoint", "save_checkpoint"]

PathLike = Union[str, "os.PathLike[str]"]


CHECKPOINT_FORMAT = "lowrank_rs.train_checkpoint"


CHECKPOINT_FORMAT_VERSION = 1


STATE_FILE = "trainer_state.json"


MODEL_FILE = "model.safetensors"


OPTIMIZER_FILE = "optimizer.safetensors"


RNG_FILE = "rng.safetensors"


_CHECKPOINT_PREFIX = "step-"


def save_checkpoint(
    config: TrainConfig,
    position: Position,
    history: History,
    named: Sequence[Tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    order_generator: torch.Generator,
    num_examples: int,
    total_steps: int,
    ctx: Optional[Distributed] = None,
) -> str:
    from safetensors.torch import save_file

    ctx = ctx or Distributed()
    assert config.checkpoint_dir is not None
    root = config.checkpoint_dir
    name = f"{_CHECKPOINT_PREFIX}{position.step:08d}"
    final = os.path.join(root, name)

    # Gathering FSDP2 shards is a collective: every rank runs it, in the same order, before rank 0 writes.
    params = {n: full_tensor(p.detach()) for n, p in named}
    optimizer_tensors, optimizer_json = _optimizer_state(optimizer, named)
    rng = {"rng/torch_cpu": torch.get_rng_state(), "rng/data_order": order_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"rng/cuda/{index}"] = cuda_state
    for rank, states in enumerate(gather_objects(_rank_rng(), ctx)):
        if rank > 0:
            rng.update({f"rng/rank/{rank}/{key}": value for key, value in states.items()})
    if ctx.rank != 0:
        barrier(ctx)
        return final
    os.makedirs(root, exist_ok=True)
    if position.order is not None:
        rng["rng/epoch_order"] = position.order
    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "lowrank_rs_version": __version__,
        "step": position.step,
        "total_steps": total_steps,
        "epoch": position.epoch,
        "offset": position.offset,
        "num_examples": num_examples,
        "world_size": ctx.world,
        "config": config.to_dict(),
        "trainable": {n: list(p.shape) for n, p in named},
        "optimizer": optimizer_json,
        "scheduler": scheduler.state_dict(),
        "history": {
            "losses": history.losses,
            "learning_rates": history.learning_rates,
            "grad_norms": history.grad_norms,
            "evals": [e.to_dict() for e in history.evals],
        },
    }
    metadata = {"format": CHECKPOINT_FORMAT}
    temporary = tempfile.mkdtemp(prefix=f".{name}.", dir=root)
    try:
        for file, tensors in ((MODEL_FILE, params), (OPTIMIZER_FILE, optimizer_tensors), (RNG_FILE, rng)):
            path = os.path.join(temporary, file)
            save_file({k: _cpu(v) for k, v in tensors.items()}, path, metadata=metadata)
            _fsync(path)
        path = os.path.join(temporary, STATE_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _replace_directory(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    barrier(ctx)
    return final


def _rank_rng() -> Dict[str, torch.Tensor]:
    # What a rank other than 0 needs to repeat its dropout: its CPU generator and its own CUDA device's.
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _optimizer_state(
    optimizer: torch.optim.Optimizer, named: Sequence[Tuple[str, nn.Parameter]]
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    # torch keys optimizer state by position; positions are meaningless to a reader, so state and groups are keyed by
    # parameter name. Tensors go to safetensors, anything else (a plain-number step, say) to the JSON.
    state = optimizer.state_dict()
    position_names = [name for group in _group_names(optimizer, named) for name in group]
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for index, entries in state["state"].items():
        name = position_names[index]
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{name}/{key}"] = full_tensor(value)
            else:
                scalars.setdefault(name, {})[key] = value
    groups = []
    for group in state["param_groups"]:
        entry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        entry["params"] = [position_names[i] for i in group["params"]]
        groups.append(entry)
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def _group_names(optimizer: torch.optim.Optimizer, named: Sequence[Tuple[str, nn.Parameter]]) -> List[List[str]]:
    by_param = {id(p): n for n, p in named}
    return [[by_param[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses views into shared storage; a contiguous CPU copy is always safe to write.
    return t.detach().to("cpu").contiguous().clone()


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _replace_directory(temporary: str, final: str) -> None:
    if not os.path.exists(final):
        os.rename(temporary, final)
        return
    # A re-run writing the same step: move the old one aside first, so some complete checkpoint is always there.
    stale = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old.", dir=os.path.dirname(final))
    os.rename(final, os.path.join(stale, "checkpoint"))
    os.rename(temporary, final)
    shutil.rmtree(stale, ignore_errors=True)


def checkpoint_path(path: PathLike) -> str:
    where = os.fspath(path)
    if os.path.isfile(os.path.join(where, STATE_FILE)):
        return where
    if not os.path.isdir(where):
        raise CheckpointError(f"resume_from={where!r} does not exist")
    steps = sorted(
        entry
        for entry in os.listdir(where)
        if entry.startswith(_CHECKPOINT_PREFIX) and os.path.isfile(os.path.join(where, entry, STATE_FILE))
    )
    if not steps:
        raise CheckpointError(
            f"resume_from={where!r} is neither a checkpoint (no {STATE_FILE}) nor a checkpoint_dir holding "
            f"{_CHECKPOINT_PREFIX}NNNNNNNN checkpoints"
        )
    return os.path.join(where, steps[-1])


def load_checkpoint(
    where: str,
    model: nn.Module,
    named: Sequence[Tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    order_generator: torch.Generator,
    config: TrainConfig,
    num_examples: int,
    total_steps: int,
    ctx: Optional[Distributed] = None,
) -> Tuple[Position, History]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ctx = ctx or Distributed()
    try:
        with open(os.path.join(where, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where!r}: cannot read {STATE_FILE}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where!r} is not a lowrank-rs training checkpoint")
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{where!r} has checkpoint format version {state.get('format_version')!r}; this lowrank-rs reads "
            f"version {CHECKPOINT_FORMAT_VERSION}"
        )
    try:
        saved_config = TrainConfig.from_dict(state["config"])
        tensors = {}
        for file in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE):
            tensors[file] = load_file(os.path.join(where, file))
        saved_examples = _count(state, "num_examples", 1, None, where)
        # Checkpoints from before distributed training have no world_size: they were written by one process.
        saved_world = _count(state, "world_size", 1, None, where) if "world_size" in state else 1
        history_json = state["history"]
        if not isinstance(history_json, dict):
            raise CheckpointError(f"{where!r}: history must be an object, not {type(history_json).__name__}")
        history = History(
            losses=_numbers(history_json, "losses", where),
            learning_rates=_numbers(history_json, "learning_rates", where),
            grad_norms=_numbers(history_json, "grad_norms", where),
            evals=[EvalResult(**e) for e in history_json["evals"]],
        )
        optimizer_json = state["optimizer"]
        scheduler_state = state["scheduler"]
        if not isinstance(optimizer_json, dict) or not isinstance(scheduler_state, dict):
            raise CheckpointError(f"{where!r}: optimizer and scheduler must be objects")
    except (KeyError, TypeError, ValueError, OSError, SafetensorError) as e:
        raise CheckpointError(f"{where!r}: a malformed checkpoint: {type(e).__name__}: {e}") from None
    if saved_world != ctx.world:
        raise CheckpointError(
            f"{where!r} was written by a run on {saved_world} process(es) and this run has {ctx.world}: the data order "
            f"and the global batch (batch_size · grad_accum · processes) depend on it, so resume with "
            f"--nproc_per_node/--nnodes giving {saved_world} processes (or start a new run)"
        )
    changed = [
        f"{field} ({getattr(saved_config, field)!r} → {getattr(config, field)!r})"
        for field in (f.name for f in dataclasses.fields(TrainConfig))
        if field not in RESUMABLE_CHANGES and getattr(saved_config, field) != getattr(config, field)
    ]
    if changed:
        raise CheckpointError(
            f"{where!r} was written by a run with a different config: {', '.join(changed)}; resuming it with these "
            f"would not continue the same run (only {sorted(RESUMABLE_CHANGES)} may change)"
        )
    if saved_examples != num_examples:
        raise CheckpointError(
            f"{where!r} was written training on {saved_examples} examples; train_data has {num_examples}"
        )
    # The position is checked against this run, not trusted: a step past the end would silently train nothing.
    step = _count(state, "step", 0, total_steps, where)
    epoch = _count(state, "epoch", 0, step, where)
    offset = _count(state, "offset", 0, num_examples, where)
    if _count(state, "total_steps", 1, None, where) != total_steps:
        raise CheckpointError(
            f"{where!r} belongs to a run of {state['total_steps']} steps; this config and data give {total_steps}"
        )
    lengths = {k: len(getattr(history, k)) for k in ("losses", "learning_rates", "grad_norms")}
    if any(n != step for n in lengths.values()):
        raise CheckpointError(f"{where!r}: the history has {lengths} entries for {step} steps; it is corrupt")
    if scheduler_state.get("last_epoch") != step:
        raise CheckpointError(
            f"{where!r}: the scheduler has taken {scheduler_state.get('last_epoch')!r} steps, the run {step}"
        )

    params = tensors[MODEL_FILE]
    names = [n for n, _ in named]
    missing = [n for n in names if n not in params]
    extra = sorted(set(params) - set(names))
    if missing or extra:
        detail = f"it lacks {missing[:3]}" if missing else f"it has {extra[:3]}, which do not require grad here"
        raise CheckpointError(
            f"{where!r} does not hold this model's trainable parameters: {detail}; resume into the same model, "
            "attached with the same config"
        )
    for n, p in named:
        if tuple(params[n].shape) != tuple(p.shape):
            raise CheckpointError(
                f"{where!r}: parameter {n!r} has shape {list(params[n].shape)} there and {list(p.shape)} here"
            )

    optimizer_state = _optimizer_state_dict(
        where, optimizer_json, tensors[OPTIMIZER_FILE], _group_names(optimizer, named), dict(named)
    )
    with torch.no_grad():
        for n, p in named:
            p.copy_(shard_like(params[n], p))
    try:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where!r}: optimizer or scheduler state does not fit: {e}") from None

    rng = tensors[RNG_FILE]
    own = f"rng/rank/{ctx.rank}/"
    try:
        torch.set_rng_state(rng[own + "torch_cpu"] if ctx.rank > 0 else rng["rng/torch_cpu"])
        order_generator.set_state(rng["rng/data_order"])
        if ctx.rank > 0 and own + "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[own + "cuda"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{where!r}: bad RNG state: {type(e).__name__}: {e}") from None
    cuda_states = sorted((k for k in rng if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda_states and ctx.rank == 0:
        if torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda_states):
            torch.cuda.set_rng_state_all([rng[k] for k in cuda_states])
        else:
            warnings.warn(
                f"{where!r} holds RNG states of {len(cuda_states)} CUDA device(s), which this machine lacks; dropout "
                "on CUDA will not repeat the interrupted run",
                stacklevel=3,
            )
    order = rng.get("rng/epoch_order")
    if order is not None and (
        order.dtype != torch.int64
        or tuple(order.shape) != (num_examples,)
        or not torch.equal(order.sort().values, torch.arange(num_examples))
    ):
        raise CheckpointError(f"{where!r}: the saved data order is not an order of {num_examples} examples")
    if order is not None and offset >= num_examples:
        raise CheckpointError(f"{where!r}: offset {offset} lies past the end of the epoch's {num_examples} examples")
    return Position(step=step, epoch=epoch, offset=offset, order=order), history


def _count(state: Mapping[str, Any], key: str, lowest: int, highest: Optional[int], where: str) -> int:
    # JSON gives ints, floats, bools and strings alike; only a true int in range is a count (bool is an int to Python).
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where!r}: {STATE_FILE} field {key!r} must be an integer, not {value!r}")
    if value < lowest or (highest is not None and value > highest):
        bound = f"from {lowest} to {highest}" if highest is not None else f"at least {lowest}"
        raise CheckpointError(f"{where!r}: {STATE_FILE} field {key!r} is {value}; for this run it must be {bound}")
    return value


def _numbers(history: Mapping[str, Any], key: str, where: str) -> List[float]:
    values = history[key]
    if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise CheckpointError(f"{where!r}: {STATE_FILE} history.{key} must be a list of numbers")
    return [float(v) for v in values]


def _optimizer_state_dict(
    where: str,
    saved: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    groups_here: Sequence[Sequence[str]],
    params: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, Any]:
    try:
        groups_json = list(saved["param_groups"])
        scalars = dict(saved["scalar_state"])
        groups_saved = [list(group["params"]) for group in groups_json]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where!r}: malformed optimizer state: {type(e).__name__}: {e}") from None
    # torch's load_state_dict pairs saved and live parameters by position, so the groups must list the same names in
    # the same order; the same model, attached the same way, always does.
    if groups_saved != [list(group) for group in groups_here]:
        raise CheckpointError(
            f"{where!r}: the optimizer state is for other parameters than this model's trainable ones"
        )
    index = {name: i for i, name in enumerate(name for group in groups_here for name in group)}
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        prefix, _, rest = key.partition("/")
        name, _, state_key = rest.rpartition("/")
        if prefix != "optimizer" or name not in index or not state_key:
            raise CheckpointError(f"{where!r}: unexpected optimizer tensor {key!r}")
        live = params.get(name) if params is not None else None
        if live is not None and tuple(value.shape) == tuple(live.shape):
            # Moments shaped like their parameter are sharded like it under FSDP2.
            value = shard_like(value, live)
        state.setdefault(index[name], {})[state_key] = value
    for name, entries in scalars.items():
        if name not in index or not isinstance(entries, dict):
            raise CheckpointError(f"{where!r}: optimizer state for unknown parameter {name!r}")
        state.setdefault(index[name], {}).update(entries)
    groups = []
    for group in groups_json:
        entry = dict(group)
        if isinstance(entry.get("betas"), list):
            entry["betas"] = tuple(entry["betas"])
        entry["params"] = [index[name] for name in group["params"]]
        groups.append(entry)
    return {"state": state, "param_groups": groups}


@dataclasses.dataclass
class Position:
    """Where the run is: the next step, the epoch and its order, and how far into that order the steps have got."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    order: Optional[torch.Tensor] = None


@dataclasses.dataclass
class History:
    losses: List[float] = dataclasses.field(default_factory=list)
    learning_rates: List[float] = dataclasses.field(default_factory=list)
    grad_norms: List[float] = dataclasses.field(default_factory=list)
    evals: List[EvalResult] = dataclasses.field(default_factory=list)
