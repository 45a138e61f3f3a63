"""Training and calibration across processes (``torchrun``): the process group, who reads which examples, the
wrappers (DDP, FSDP2), reductions, and the rank-agreement check that turns a mismatch into an error, not a hang.

The rules every function here keeps:

- **Data.** The training loop still shuffles the whole data set with its seeded generator, identically on every rank;
  a step's examples are split into micro-batches exactly as one process would split them, and the micro-batches are
  dealt round-robin to the ranks. So a run on ``W`` processes with ``grad_accum = k`` takes the very micro-batches a
  single process takes with ``grad_accum = k·W``: the global batch is ``batch_size · grad_accum · W``.
- **Collectives are symmetric.** Every rank runs the same number of forward/backward passes per step (FSDP2's
  forward all-gathers parameters, so an extra pass on one rank would hang the others): a rank short of micro-batches
  at the end of an epoch runs a pass with weight 0.
- **Check before collective.** Ranks first all-gather a small signature (data size, trainable names and shapes,
  config) and raise the same error everywhere when it differs.

Nothing here names an adapter method: method behaviour reaches the loop through ``TrainingHooks``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import InvalidArgumentError, MissingDependencyError
from .config import DISTRIBUTED_MODES

__all__ = [
    "MODES",
    "Distributed",
    "agree",
    "all_reduce_sum",
    "broadcast_object",
    "detect",
    "full_tensor",
    "is_main_process",
    "reduce_to_owners",
    "round_robin",
    "shard_like",
]

MODES = DISTRIBUTED_MODES


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in the job: ``world == 1`` is the single-process run, with no collective at all."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def available() -> bool:
    """Whether this torch build has torch.distributed at all (some mobile and macOS builds do not)."""
    try:
        return bool(_dist().is_available())
    except ImportError:  # pragma: no cover - builds without the package
        return False


def detect(device: Optional[torch.device] = None) -> Distributed:
    """The running process group, or one ``torchrun``'s environment asks for (``WORLD_SIZE`` > 1), initialised here
    with NCCL when ``device`` is CUDA and gloo otherwise; a single process when neither."""
    if not available():
        return Distributed()
    dist = _dist()
    if not dist.is_initialized():
        world = _env_int("WORLD_SIZE")
        if world is None or world <= 1:
            return Distributed()
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(_env_int("LOCAL_RANK") or 0)
        # torchrun exports MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE: the env:// rendezvous reads them.
        dist.init_process_group(backend=backend)
    local = _env_int("LOCAL_RANK")
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local or 0)


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidArgumentError(f"environment variable {name}={value!r} is not an integer") from None


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that prints and writes files."""
    return not available() or not _dist().is_initialized() or _dist().get_rank() == 0


# -- data ------------------------------------------------------------------------------------------------------------


def round_robin(step_indices: torch.Tensor, batch_size: int, ctx: Distributed) -> Tuple[List[torch.Tensor], int]:
    """This rank's micro-batches of one optimizer step, and how many passes every rank runs.

    The step is split into micro-batches of ``batch_size`` as a single process would split it; micro-batch ``j`` goes
    to rank ``j mod W``. Ranks with fewer than the most any rank has run the missing passes with weight 0.
    """
    micro = list(torch.split(step_indices, batch_size))
    mine = micro[ctx.rank :: ctx.world]
    passes = -(-len(micro) // ctx.world)
    return mine, passes


# -- wrappers --------------------------------------------------------------------------------------------------------


class Wrapped:
    """The module the loop calls forward on, and how to run a micro-batch without synchronising gradients."""

    def __init__(self, module: nn.Module, mode: Optional[str]) -> None:
        self.module = module
        self.mode = mode

    @contextlib.contextmanager
    def accumulating(self, sync: bool) -> Iterator[None]:
        # Only the last micro-batch of a step reduces gradients: the others accumulate locally.
        if self.mode == "ddp" and not sync:
            with self.module.no_sync():  # type: ignore[operator]
                yield
            return
        if self.mode == "fsdp":
            self.module.set_requires_gradient_sync(sync)  # type: ignore[operator]
        yield


def wrap(
    model: nn.Module, mode: Optional[str], ctx: Distributed, device: torch.device, multitask: bool = False
) -> Wrapped:
    """``model`` under DDP or FSDP2 (``mode``), or as it is for a single process. ``multitask``: a batch may leave
    some trainable parameters (other tasks') out of its graph, which DDP must be told to look for."""
    if not ctx.active:
        return Wrapped(model, None)
    if mode in (None, "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        # Only the trainable parameters take part: the frozen base is identical on every rank by construction (same
        # checkpoint), and broadcasting or bucketing it would cost its full size for nothing.
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        # Buffers (position ids, masks) are constants of the architecture: no need to broadcast them every forward.
        buffers: Dict[str, Any] = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        cuda = [device.index if device.index is not None else ctx.local_rank] if device.type == "cuda" else None
        ddp = DistributedDataParallel(
            model,
            device_ids=cuda,
            find_unused_parameters=multitask,
            **buffers,
        )
        return Wrapped(ddp, "ddp")
    if mode == "fsdp":
        _fully_shard(model, device, ctx)
        return Wrapped(model, "fsdp")
    raise InvalidArgumentError(f"distributed must be one of {list(MODES)}, not {mode!r}")


def _fully_shard(model: nn.Module, device: torch.device, ctx: Distributed) -> None:
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # pragma: no cover - torch < 2.6
        raise MissingDependencyError(f"distributed='fsdp' needs torch with FSDP2 (fully_shard): {e}") from None
    mesh = init_device_mesh(device.type, (ctx.world,))
    blocks = transformer_blocks(model)
    for block in blocks:
        _shard_unit(block, mesh, fully_shard)
    _shard_unit(model, mesh, fully_shard)


def _shard_unit(unit: nn.Module, mesh: Any, fully_shard: Callable[..., Any]) -> None:
    # FSDP2 reduces a unit's gradients in one flat buffer, so its trainable parameters must share a dtype (frozen ones
    # may differ). Modules holding trainable parameters of another dtype than the unit's commonest (say f32 adapters
    # in a bf16 block) become units of their own first.
    owned = [(m, p) for m in unit.modules() if not _is_unit(m) or m is unit for p in m.parameters(recurse=False)]
    trainable = [(m, p) for m, p in owned if p.requires_grad and not _is_unit(m)]
    sizes: Dict[torch.dtype, int] = {}
    for _, p in trainable:
        sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    if len(sizes) > 1:
        main = max(sizes, key=lambda d: sizes[d])
        for module in {id(m): m for m, p in trainable if p.dtype != main}.values():
            dtypes = {p.dtype for p in module.parameters(recurse=False) if p.requires_grad}
            if len(dtypes) > 1:
                raise InvalidArgumentError(
                    f"{type(module).__name__} holds trainable parameters of several dtypes ({sorted(map(str, dtypes))})"
                    "; FSDP2 needs one dtype per sharded unit — cast them to one dtype, or use distributed='ddp'"
                )
            fully_shard(module, mesh=mesh)
    fully_shard(unit, mesh=mesh)


def _is_unit(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks to shard one by one: the classes a transformers model names in ``_no_split_modules``
    (``LlamaDecoderLayer``, ``BertLayer``...), else the members of its longest ``ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if found:
        return found
    lists: List[nn.ModuleList] = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=lambda m: sum(1 for _ in m.children())).children()) if lists else []


# -- tensors ---------------------------------------------------------------------------------------------------------


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a collective: every rank calls it), or ``t`` itself."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like``: this rank's shard when ``like`` is an FSDP2 DTensor, else ``full``."""
    mesh = getattr(like, "device_mesh", None)
    if mesh is None:
        return full
    from torch.distributed.tensor import distribute_tensor

    placements = like.placements  # type: ignore[attr-defined]
    return distribute_tensor(full.to(like.device, like.dtype), mesh, placements)


def all_reduce_sum(values: Sequence[float], ctx: Distributed) -> List[float]:
    """Sums of ``values`` over the ranks, in float64 (loss sums, example and token counts)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if ctx.active:
        t = on_backend(t)
        _dist().all_reduce(t)
    return [float(v) for v in t.cpu()]


def on_backend(t: torch.Tensor) -> torch.Tensor:
    """``t`` where the process group's backend reduces it."""
    # NCCL reduces CUDA tensors only; gloo takes CPU ones.
    if _dist().get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def broadcast_object(value: Any, ctx: Distributed, src: int = 0) -> Any:
    """``value`` as rank ``src`` has it, on every rank (pickled by torch; only for small, trusted objects)."""
    if not ctx.active:
        return value
    box = [value]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def signature(value: Any) -> str:
    """A short digest of a JSON-able value, to compare across ranks without sending the value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def agree(what: str, value: Any, ctx: Distributed, error: Callable[[str], Exception]) -> None:
    """Raise ``error(message)`` on every rank when ranks hold different ``value``s (compared by digest), before a
    collective that would otherwise wait forever for a rank computing something else."""
    if not ctx.active:
        return
    gathered: List[Any] = [None] * ctx.world
    _dist().all_gather_object(gathered, signature(value))
    if len(set(gathered)) > 1:
        groups: Dict[str, List[int]] = {}
        for rank, digest in enumerate(gathered):
            groups.setdefault(digest, []).append(rank)
        raise error(
            f"the {ctx.world} processes disagree on {what}: ranks {sorted(groups.values())} hold different values; "
            "every rank must run the same model, config and data"
        )


# -- sharded statistics (calibration) ----------------------------------------------------------------------------------


def owners(sizes: Mapping[str, int], world: int) -> Dict[str, int]:
    """An owner rank for each accumulator: largest first, each to the least-loaded rank so far (so per-rank memory is
    about total / world); ties by name, so every rank computes the same assignment."""
    load = [0] * world
    out: Dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        out[name] = rank
        load[rank] += int(sizes[name])
    return out


def reduce_to_owners(
    layout: Any,
    sizes: Mapping[str, int],
    produce: Callable[[str], torch.Tensor],
    ctx: Distributed,
    error: Callable[[str], Exception],
) -> Iterator[Tuple[str, int, Optional[torch.Tensor]]]:
    """Sum additive statistics over the ranks, each accumulator onto one owner rank.

    ``layout`` (names, shapes, dtypes: what must match) is agreed on first, so a rank measuring something else is an
    ``error`` everywhere instead of a hang. ``sizes`` gives each accumulator's size (for :func:`owners`); for each name
    in sorted order ``produce(name)`` makes this rank's flat tensor of the accumulator's additive terms (scatter sum,
    the means' terms, counts), which is ``reduce``d — never all-gathered — onto its owner. Yields ``(name, owner,
    sum)`` with the sum on the owner and ``None`` elsewhere; one accumulator is in flight at a time, so a rank holds at
    most one extra copy. A single process owns everything.
    """
    agree("the accumulators (targets, shapes, dtypes)", layout, ctx, error)
    owner = owners(sizes, ctx.world)
    for name in sorted(sizes):
        local = produce(name)
        if not ctx.active:
            yield name, 0, local
            continue
        t = on_backend(local.contiguous())
        _dist().reduce(t, dst=owner[name])
        yield name, owner[name], t.to(local.device) if ctx.rank == owner[name] else None


def gather_owned(results: Mapping[str, Any], owner: Mapping[str, int], ctx: Distributed) -> Dict[str, Any]:
    """Each owner's per-accumulator result (a basis, a rank, a score: small next to the statistics), on every rank."""
    if not ctx.active:
        return dict(results)
    gathered: List[Any] = [None] * ctx.world
    _dist().all_gather_object(gathered, {k: v for k, v in results.items() if owner.get(k) == ctx.rank})
    out: Dict[str, Any] = {}
    for part in gathered:
        out.update(part)
    return out


def gather_objects(value: Any, ctx: Distributed) -> List[Any]:
    """Every rank's ``value`` (small objects: RNG states, digests), in rank order."""
    if not ctx.active:
        return [value]
    gathered: List[Any] = [None] * ctx.world
    _dist().all_gather_object(gathered, value)
    return gathered


def barrier(ctx: Distributed) -> None:
    """Wait for every rank (after rank 0 writes a file the others may read)."""
    if ctx.active:
        _dist().barrier()
