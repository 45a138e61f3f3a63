"""TA-LoRA on Hugging Face models (docs/methods.md): attach, choose tasks per forward, add a task, the orthogonality
penalty, adapter files, and what the training loop needs from the method.

``lr.attach(model, TaLoraConfig(...))`` puts a :class:`~lowrank_rs.TaLoraLayer` on each adapted attention
layer (as its ``talora`` child) and freezes everything else. Every forward then runs inside
``with lr.use_tasks(model, task_ids):``; :func:`lowrank_rs.train` does that itself from each batch's ``task_ids``,
adds ``λ Σ_{i≠j} ‖A_iᵀ A_j‖²_F`` to the loss, and gives the slow and fast weights their own learning rates.

Supported architectures: LLaMA and Qwen2 decoders (rotary queries, grouped-query attention, causal mask) and BERT
encoders. The prompt branch is computed outside the model's attention code (see the nn module), so any attention
implementation (eager, SDPA, flash) gives the model's own first term.

Files: ``lr.save_adapter`` writes one directory with the shared weights and every task's fast weights (or chosen
tasks only); ``lr.load_adapter`` reads it back. PEFT has no TA-LoRA, so ``peft_type`` is ``"LOWRANK_RS_TA_LORA"``,
which PEFT refuses. TA-LoRA does not merge (the prompt softmax depends on each query and on its task):
``lr.merge`` raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Mapping as MappingABC
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union, cast

import torch
from torch import nn

from ..._core import __version__
from ...adapters.method import Method, TrainingHooks
from ...adapters.peft_format import PEFT_PREFIX
from ...adapters.recipe import Prepared, Settings, settings_targets
from ...adapters.record import Attachment, attachment_of, record_attachment
from ...adapters.registry import has_adapter
from ...adapters.seeding import generator_for
from ...adapters.targets import resolve_modules_to_save
from ...adapters.tasks import task_index
from ...adapters.tasks import task_names as checked_task_names
from ...errors import (
    AdapterFormatError,
    AdapterStateError,
    ConfigError,
    InvalidArgumentError,
    ShapeError,
    TargetError,
    TaskError,
)
from ...package import write_adapter
from .config import PEFT_TYPE, TaLoraConfig
from .export import TALORA_EXPORTS
from .layer import TaLoraLayer

__all__ = [
    "PEFT_TYPE",
    "TaskError",
    "add_task",
    "orthogonality_penalty",
    "talora_layers",
    "task_names",
    "use_tasks",
]

PathLike = Union[str, "os.PathLike[str]"]
TaskIds = Union[torch.Tensor, str, int, Sequence[Union[str, int]]]

CHILD = "talora"
_SLOW = ("theta0", "B", "gate")
_FAST = ("u", "v")


class _Family(NamedTuple):
    """Where one architecture keeps what TA-LoRA needs, relative to its attention module."""

    attention: str  # class name of the attention module that owns q/k/v and the output projection
    q: str
    k: str
    v: str
    o: str
    rotary: bool  # queries are rotated (RoPE) before the scores


_FAMILIES: Dict[str, _Family] = {
    "llama": _Family("LlamaAttention", "q_proj", "k_proj", "v_proj", "o_proj", True),
    "qwen2": _Family("Qwen2Attention", "q_proj", "k_proj", "v_proj", "o_proj", True),
    "bert": _Family("BertAttention", "self.query", "self.key", "self.value", "output.dense", False),
}


class _Site(NamedTuple):
    name: str  # the attention module's name; the layer goes in as its `talora` child
    attention: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    rotary: Any


# -- attach ------------------------------------------------------------------------------------------------------------


def attach_talora(model: nn.Module, config: TaLoraConfig) -> nn.Module:
    """Add TA-LoRA prompts to ``model`` in place (what ``lr.attach(model, TaLoraConfig(...))`` calls); returns it.

    Afterwards only the TA-LoRA parameters and ``modules_to_save`` require grad. ``lr.adapter_config(model)`` gives the
    config with ``layers`` resolved to explicit indices.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"attach needs a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(config, TaLoraConfig):
        raise InvalidArgumentError(f"attach_talora needs a TaLoraConfig, not {type(config).__name__}")
    if has_adapter(model):
        raise AdapterStateError("this model already has an adapter attached; attach TA-LoRA to a fresh copy")
    sites, layers = _sites(model, config.layers)
    modules = dict(model.named_modules())
    keep = resolve_modules_to_save(modules, config.modules_to_save)
    inside = [k for k in keep if any(k == s.name or k.startswith(s.name + ".") for s in sites)]
    if inside:
        raise TargetError(f"modules_to_save entry {inside[0]!r} is inside an adapted attention layer; save a head")
    built = {site.name: _build_layer(site, config) for site in sites}
    for p in model.parameters():
        p.requires_grad_(False)
    for site in sites:
        site.attention.add_module(CHILD, built[site.name])
    for name in keep:
        modules[name].requires_grad_(True)
    resolved = dataclasses.replace(config, layers=tuple(layers))
    record_attachment(model, Attachment(TaLoraMethod.name, resolved, tuple(keep)))
    return model


def _sites(model: nn.Module, layers: Optional[Sequence[int]]) -> Tuple[List[_Site], List[int]]:
    """The attention sites of the chosen layers (model order) and the chosen layer indices (non-negative, sorted)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = _FAMILIES.get(model_type or "")
    if family is None:
        raise TargetError(
            f"TA-LoRA supports the model types {sorted(_FAMILIES)}; this {type(model).__name__} is "
            f"{model_type!r}. Other architectures need their query/key/value/output projections mapped in "
            "lowrank_rs.methods.talora.method._FAMILIES"
        )
    # By class name along the MRO: transformers before 4.48 had eager/SDPA/flash subclasses of one attention class.
    found = [
        (name, m)
        for name, m in model.named_modules()
        if any(c.__name__ == family.attention for c in type(m).__mro__) and not getattr(m, "is_cross_attention", False)
    ]
    if not found:
        raise TargetError(f"no {family.attention} module in this {type(model).__name__}; is it a {model_type} model?")
    n = len(found)
    if layers is None:
        chosen = list(range(n // 2, n))
    else:
        wrong = [i for i in layers if not -n <= i < n]
        if wrong:
            raise TargetError(
                f"layers {wrong} do not exist: the model has {n} layers (indices 0..{n - 1}, or -{n}..-1)"
            )
        chosen = sorted({i % n for i in layers})
        if len(chosen) != len(layers):
            raise ConfigError(f"layers {list(layers)} name the same layer twice (negative indices count from the end)")
    sites = []
    for index in chosen:
        name, attention = found[index]
        q, k, v, o = (attention.get_submodule(path) for path in (family.q, family.k, family.v, family.o))
        if hasattr(attention, CHILD):
            raise AdapterStateError(f"{name!r} already has a {CHILD!r} attribute")
        if family.rotary:
            head_dim = int(attention.head_dim)
            scaling = float(getattr(attention, "scaling", head_dim**-0.5))
            rotary = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
            if rotary is None:
                raise TargetError(f"{type(attention).__name__}'s module has no apply_rotary_pos_emb to rotate queries")
        else:
            head_dim = int(attention.self.attention_head_size)
            scaling = float(getattr(attention.self, "scaling", head_dim**-0.5))
            rotary = None
        for proj in (q, k, v, o):
            if not isinstance(getattr(proj, "weight", None), torch.Tensor):
                raise TargetError(f"{name!r}: a projection ({type(proj).__name__}) has no weight")
        sites.append(
            _Site(
                name,
                attention,
                q,
                k,
                v,
                o,
                num_heads=q.weight.shape[0] // head_dim,
                num_kv_heads=k.weight.shape[0] // head_dim,
                head_dim=head_dim,
                scaling=scaling,
                rotary=rotary,
            )  # fmt: skip
        )
    return sites, chosen


def _build_layer(site: _Site, config: TaLoraConfig) -> TaLoraLayer:
    layer = TaLoraLayer(
        prompt_length=config.prompt_length,
        r=config.r,
        attention=site.attention,
        q_proj=site.q,
        k_proj=site.k,
        v_proj=site.v,
        o_proj=site.o,
        num_heads=site.num_heads,
        num_kv_heads=site.num_kv_heads,
        head_dim=site.head_dim,
        scaling=site.scaling,
        rotary=site.rotary,
        prompt_init_std=config.prompt_init_std,
        generator=generator_for(config.init_seed, site.name),
    )
    for task in config.tasks:
        layer.add_task(task, *layer.fresh_task(generator_for(config.init_seed, f"{site.name}#{task}")))
    return layer


# -- model queries -----------------------------------------------------------------------------------------------------


def talora_layers(model: nn.Module) -> Dict[str, TaLoraLayer]:
    """Every :class:`~lowrank_rs.TaLoraLayer` of ``model``, by module name (``...self_attn.talora``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TaLoraLayer)}


def task_names(model: nn.Module) -> Tuple[str, ...]:
    """The tasks of a TA-LoRA model, in task-id order."""
    return _require(model).config.tasks


def _require(model: nn.Module) -> Attachment:
    attachment = attachment_of(model)
    if attachment is None or attachment.method != TaLoraMethod.name:
        raise AdapterStateError(
            "the model has no TA-LoRA adapter; attach one with lowrank_rs.attach(model, TaLoraConfig(tasks=[...]))"
        )
    return attachment


# -- task selection ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def use_tasks(model: nn.Module, task_ids: TaskIds) -> Iterator[torch.Tensor]:
    """Run the forwards inside the block with these tasks' prompts; yields the ids as a LongTensor.

    ``task_ids``: one task per example — a LongTensor ``[batch]`` of task indices, or a list of task names or indices
    — or a single name or index (a 0-d tensor too) for every example of the batch. Ids are checked here, once, not in
    the forward — except while ``torch.export`` or ``torch.compile`` traces, when their values are not known yet.
    Blocks nest; leaving one restores the ids before it.

    With gradient checkpointing, call ``backward`` inside the block too: the recomputed forward needs the ids.
    """
    layers = _require_layers(model)
    ids = _task_ids(task_ids, task_names(model))
    previous = {name: layer.task_ids for name, layer in layers.items()}
    for layer in layers.values():
        layer.task_ids = ids.to(layer.theta0.device)
    try:
        yield ids
    finally:
        for name, layer in layers.items():
            layer.task_ids = previous[name]


def _require_layers(model: nn.Module) -> Dict[str, TaLoraLayer]:
    _require(model)
    layers = talora_layers(model)
    if not layers:  # pragma: no cover - attach always adds at least one layer
        raise AdapterStateError("the model has a TA-LoRA attachment but no TA-LoRA layers")
    return layers


def _task_ids(value: Any, names: Sequence[str]) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TaskError(f"task ids must be an integer tensor, not {value.dtype}")
        if value.dim() > 1:
            raise TaskError(f"task ids must be a [batch] tensor (or 0-d for the whole batch), not {list(value.shape)}")
        ids = value.long()
    elif isinstance(value, (str, int)) and not isinstance(value, bool):
        ids = torch.tensor(task_index(value, names, "task"))
    elif isinstance(value, (list, tuple)):
        if not value:
            raise TaskError("task ids are empty; give one task per example")
        ids = torch.tensor([task_index(item, names, f"task_ids[{i}]") for i, item in enumerate(value)])
    else:
        raise TaskError(
            f"task ids must be a LongTensor [batch], a list of task names or indices, or one name or index, not "
            f"{type(value).__name__}"
        )
    if ids.numel() == 0:
        raise TaskError("task ids are empty; give one task per example")
    if torch.compiler.is_compiling():
        # Tracing for export or compilation: the ids are graph inputs whose values are not known here.
        return ids
    bad = ids[(ids < 0) | (ids >= len(names))]
    if bad.numel():
        raise TaskError(f"task id {int(bad[0])} does not exist: the model has {len(names)} tasks {list(names)}")
    return ids


# -- new tasks ---------------------------------------------------------------------------------------------------------


def add_task(
    model: nn.Module, name: str, *, init: str = "mean", train_shared: bool = False, train_saved: bool = False
) -> nn.Module:
    """Add task ``name`` (the next task id) to a TA-LoRA model, for few-shot transfer; returns the model.

    - ``init="mean"``: ``u`` and ``v`` of every layer start from the mean of the existing tasks' ``u_i`` and ``v_i``;
      ``"random"``: as a task at attach (``u ~ N(0, 1/r)``, ``v = 0``, so it starts from ``θ0`` alone).
    - Afterwards only the new task's ``u, v`` require grad, so training changes no other task's predictions;
      ``train_shared=True`` also trains ``θ0``, ``B`` and the gates (every task then changes), ``train_saved=True``
      the ``modules_to_save``. The base model stays frozen either way.
    """
    attachment = _require(model)
    layers = _require_layers(model)
    (name,) = checked_task_names([name], "task name")
    config = attachment.config
    if name in config.tasks:
        raise TaskError(f"task {name!r} exists already; the model's tasks are {list(config.tasks)}")
    if init not in ("mean", "random"):
        raise TaskError(f"init must be 'mean' (the mean of the existing tasks) or 'random', not {init!r}")
    for flag, what in ((train_shared, "train_shared"), (train_saved, "train_saved")):
        if not isinstance(flag, bool):
            raise InvalidArgumentError(f"{what} must be true or false, not {flag!r}")
    with torch.no_grad():
        for layer_name, layer in layers.items():
            if init == "mean":
                u, v = layer.fast_weights()
                layer.add_task(name, u.mean(dim=0), v.mean(dim=0))
            else:
                site = layer_name[: -len("." + CHILD)]
                layer.add_task(name, *layer.fresh_task(generator_for(config.init_seed, f"{site}#{name}")))
    new = str(len(config.tasks))  # the new task's id: its index in the layers' u and v lists
    for layer in layers.values():
        for param_name, p in layer.named_parameters():
            kind, _, task = param_name.partition(".")
            p.requires_grad_(task == new or (train_shared and kind in _SLOW))
    for saved in attachment.modules_to_save:
        model.get_submodule(saved).requires_grad_(train_saved)
    attachment.config = dataclasses.replace(config, tasks=config.tasks + (name,))
    return model


# -- the orthogonality penalty -----------------------------------------------------------------------------------------


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """``Σ_layers Σ_{i≠j} ‖A_iᵀ A_j‖²_F`` (float32 scalar, unweighted); :func:`lowrank_rs.train` adds
    ``orthogonality_weight`` times it to the loss. For rank-1 ``A_i = u_i v_iᵀ`` each term is
    ``(u_i·u_j)² ‖v_i‖² ‖v_j‖²``."""
    total: Optional[torch.Tensor] = None
    for layer in _require_layers(model).values():
        term = layer.orthogonality()
        # Layers may sit on different devices (a model split across GPUs); the sum lives on the first one's.
        total = term if total is None else total + term.to(total.device)
    assert total is not None  # _require_layers never returns an empty mapping
    return total


# -- what lr.train needs -----------------------------------------------------------------------------------------------


class _TrainingHooks(TrainingHooks):
    """The training loop's view of a TA-LoRA model: task ids from examples, slow and fast rates, the penalty."""

    def __init__(self, model: nn.Module, attachment: Attachment) -> None:
        self.model = model
        self.config = attachment.config
        self.layers = _require_layers(model)

    def convert_example(self, example: Any, where: str) -> Any:
        """``task`` (a name or index) or ``task_ids`` (an index) becomes a 0-d ``task_ids`` tensor."""
        if not isinstance(example, MappingABC):
            return example  # collate explains what an example must be
        has_task, has_ids = "task" in example, "task_ids" in example
        if has_task and has_ids:
            raise TaskError(f"{where} has both 'task' and 'task_ids'; give one")
        if not has_task and not has_ids:
            raise TaskError(
                f"{where} has no task: examples for a TA-LoRA model carry 'task' (a task name, one of "
                f"{list(self.config.tasks)}) or 'task_ids' (its index)"
            )
        key = "task" if has_task else "task_ids"
        task_id = task_index(example[key], self.config.tasks, f"{where}: {key}")
        out = {k: v for k, v in example.items() if k not in ("task", "task_ids")}
        out["task_ids"] = torch.tensor(task_id)
        return out

    def param_groups(self, names: Sequence[str]) -> List[Tuple[str, List[str], float]]:
        """``("talora.slow", [θ0, B, gate names], slow_lr)`` and ``("talora.fast", [u, v names], fast_lr)``, among
        ``names`` (the trainable parameters); empty groups are left out."""
        slow: List[str] = []
        fast: List[str] = []
        for name in names:
            owner = next((prefix for prefix in self.layers if name.startswith(prefix + ".")), None)
            if owner is None:
                continue
            kind = name[len(owner) + 1 :].split(".", 1)[0]
            (slow if kind in _SLOW else fast).append(name)
        groups = [("talora.slow", slow, self.config.slow_lr), ("talora.fast", fast, self.config.fast_lr)]
        return [group for group in groups if group[1]]

    def regularizer(self) -> Optional[torch.Tensor]:
        if self.config.orthogonality_weight == 0:
            return None
        return self.config.orthogonality_weight * orthogonality_penalty(self.model)

    def model_inputs(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in batch.items() if k != "task_ids"}

    def context(self, batch: Mapping[str, Any]) -> Any:
        if "task_ids" not in batch:
            raise TaskError("a batch for a TA-LoRA model needs 'task_ids' ([batch] task indices)")
        return use_tasks(self.model, batch["task_ids"])


# -- adapter files -----------------------------------------------------------------------------------------------------


def _signature(model: nn.Module) -> Dict[str, Any]:
    config = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return {k: getattr(config, k, None) for k in keys}


def _tensors(model: nn.Module, tasks: Sequence[str]) -> Dict[str, torch.Tensor]:
    attachment = _require(model)
    out: Dict[str, torch.Tensor] = {}
    for name, layer in _require_layers(model).items():
        for kind in _SLOW:
            out[f"{PEFT_PREFIX}{name}.{kind}"] = getattr(layer, kind).detach()
        for task in tasks:
            u, v = layer.task_parameters(task)
            out[f"{PEFT_PREFIX}{name}.u.{task}"] = u.detach()
            out[f"{PEFT_PREFIX}{name}.v.{task}"] = v.detach()
    for saved in attachment.modules_to_save:
        for key, value in model.get_submodule(saved).state_dict().items():
            out[f"{PEFT_PREFIX}{saved}.{key}"] = value.detach()
    return out


def _chosen_tasks(model: nn.Module, tasks: Optional[Sequence[str]]) -> Tuple[str, ...]:
    names = task_names(model)
    if tasks is None:
        return names
    chosen = checked_task_names(list(tasks) if isinstance(tasks, (list, tuple)) else tasks, "tasks")
    if not chosen:
        raise TaskError("tasks=[] would save no task; name at least one, or pass None for all")
    unknown = [t for t in chosen if t not in names]
    if unknown:
        raise TaskError(f"tasks= names {unknown[0]!r}, which is not one of the model's tasks {list(names)}")
    return chosen


def save_talora(model: nn.Module, path: PathLike, *, vllm: bool = False, tasks: Optional[Sequence[str]] = None) -> None:
    """``lr.save_adapter`` for TA-LoRA: shared weights, the chosen tasks' fast weights (all by default, in the given
    order, which becomes the saved adapter's task-id order) and ``modules_to_save``, atomically."""
    attachment = _require(model)
    if vllm:
        raise InvalidArgumentError(
            "vLLM serves LoRA adapters only; TA-LoRA prompts cannot be written for it (save without vllm)"
        )
    chosen = _chosen_tasks(model, tasks)
    layers = _require_layers(model)
    config = dataclasses.replace(attachment.config, tasks=chosen)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_config = {
        "peft_type": PEFT_TYPE,
        "task_type": None,
        "base_model_name_or_path": name_or_path,
        "inference_mode": True,
        "lowrank_rs": {
            "version": __version__,
            "method": TaLoraMethod.name,
            "config": config.to_dict(),
            "modules": sorted(layers),
            "modules_to_save": list(attachment.modules_to_save),
            "model": _signature(model),
        },
    }
    write_adapter(path, _tensors(model, chosen), peft_config)


def load_talora(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], peft_config: Mapping[str, Any], path: PathLike
) -> nn.Module:
    """``lr.load_adapter`` for TA-LoRA files and TA-LoRA models.

    An unattached model is attached with the file's config first; an attached one must have the same layers,
    ``prompt_length``, ``r`` and tasks (names and order) — its own training settings are kept. The file must have been
    written for a model of this type and size. Everything is checked before the model changes.
    """
    where = os.fspath(path)
    if peft_config.get("peft_type") != PEFT_TYPE:
        raise AdapterStateError(
            f"the model has a TA-LoRA adapter attached, and {where!r} is a {peft_config.get('peft_type')!r} adapter; "
            "load it into a fresh copy of the model"
        )
    extras = peft_config.get("lowrank_rs")
    try:
        if not isinstance(extras, dict) or extras.get("method") != TaLoraMethod.name:
            raise AdapterFormatError(
                f"{where!r}: a malformed TA-LoRA adapter config: its lowrank_rs key does not name method "
                f"{TaLoraMethod.name!r}"
            )
        file_config = TaLoraConfig.from_dict(extras["config"])
        file_modules = list(extras["modules"])
        file_signature = dict(extras["model"])
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise AdapterFormatError(f"{where!r}: a malformed TA-LoRA adapter config: {type(e).__name__}: {e}") from None
    here = _signature(model)
    differ = [
        f"{k} {file_signature.get(k)!r} there, {here[k]!r} here" for k in here if file_signature.get(k) != here[k]
    ]
    if differ:
        raise TargetError(f"{where!r} was written for another model: {'; '.join(differ)}")

    attachment = attachment_of(model)
    if attachment is None:
        if has_adapter(model):
            raise AdapterStateError("the model has adapter layers; load TA-LoRA into a fresh copy of the model")
        sites, _ = _sites(model, file_config.layers)
        expected_layers = {f"{s.name}.{CHILD}": s for s in sites}
        kept = resolve_modules_to_save(dict(model.named_modules()), file_config.modules_to_save)
        widths = {name: int(cast(torch.Tensor, s.k.weight).shape[1]) for name, s in expected_layers.items()}
        shapes: Dict[str, Dict[str, Tuple[int, ...]]] = {
            name: {"theta0": (file_config.prompt_length, widths[name]), "B": (file_config.prompt_length,
                   file_config.r), "gate": (s.num_heads,), "u": (file_config.r,), "v": (widths[name],)}
            for name, s in expected_layers.items()
        }  # fmt: skip
        tasks = file_config.tasks
    else:
        if attachment.method != TaLoraMethod.name:
            raise AdapterStateError(
                f"the model has a {attachment.method} adapter attached; load {where!r} into a fresh copy"
            )
        mine = attachment.config
        for field in ("layers", "prompt_length", "r"):
            if getattr(mine, field) != getattr(file_config, field):
                raise ShapeError(
                    f"{where!r} has {field}={getattr(file_config, field)!r}; the model's TA-LoRA has "
                    f"{getattr(mine, field)!r}"
                )
        if mine.tasks != file_config.tasks:
            raise TaskError(
                f"{where!r} holds tasks {list(file_config.tasks)}; the model's TA-LoRA has {list(mine.tasks)} "
                "(same names in the same order needed); load it into a fresh copy of the model instead"
            )
        layers = _require_layers(model)
        kept = list(attachment.modules_to_save)
        shapes = {
            name: {k: tuple(int(n) for n in getattr(layer, k).shape) for k in _SLOW}
            | {"u": (layer.r,), "v": (layer.hidden_size,)}
            for name, layer in layers.items()
        }
        tasks = mine.tasks
    if sorted(shapes) != sorted(file_modules):
        raise TargetError(
            f"{where!r} has prompts for {sorted(file_modules)[:4]}; this model's layers {file_config.layers} are "
            f"{sorted(shapes)[:4]}"
        )

    expected: Dict[str, Tuple[int, ...]] = {}
    for name, kinds in shapes.items():
        for kind in _SLOW:
            expected[f"{PEFT_PREFIX}{name}.{kind}"] = kinds[kind]
        for task in tasks:
            expected[f"{PEFT_PREFIX}{name}.u.{task}"] = kinds["u"]
            expected[f"{PEFT_PREFIX}{name}.v.{task}"] = kinds["v"]
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterFormatError(f"{where!r} lacks tensor {missing[0]!r} ({len(missing)} missing)")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ShapeError(f"{where!r}: {key!r} has shape {tuple(tensors[key].shape)}; the model needs {shape}")
    saved = _saved_states({k: v for k, v in tensors.items() if k not in expected}, kept, model, where)

    if attachment is None:
        attach_talora(model, file_config)
    with torch.no_grad():
        for name, layer in talora_layers(model).items():
            for kind in _SLOW:
                getattr(layer, kind).copy_(tensors[f"{PEFT_PREFIX}{name}.{kind}"])
            for task in tasks:
                u, v = layer.task_parameters(task)
                u.copy_(tensors[f"{PEFT_PREFIX}{name}.u.{task}"])
                v.copy_(tensors[f"{PEFT_PREFIX}{name}.v.{task}"])
    for module_name, state in saved.items():
        model.get_submodule(module_name).load_state_dict(state, strict=True)
    return model


def _saved_states(
    rest: Mapping[str, torch.Tensor], kept: Sequence[str], model: nn.Module, where: str
) -> Dict[str, Dict[str, torch.Tensor]]:
    out: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in kept}
    for key, value in rest.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        owner = max((k for k in kept if name.startswith(k + ".")), key=len, default=None)
        if owner is None:
            raise AdapterFormatError(
                f"{where!r} has tensor {key!r}, which is neither a TA-LoRA weight nor a saved module"
            )
        out[owner][name[len(owner) + 1 :]] = value
    for name, state in out.items():
        wanted = model.get_submodule(name).state_dict()
        if set(state) != set(wanted):
            raise AdapterFormatError(
                f"{where!r}: saved module {name!r} has tensors {sorted(state)}, not {sorted(wanted)}"
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(wanted[key].shape):
                raise ShapeError(
                    f"{where!r}: {name}.{key} has shape {tuple(value.shape)}; the model's is {tuple(wanted[key].shape)}"
                )
    return out


# -- the method -------------------------------------------------------------------------------------------------------


class TaLoraMethod(Method):
    name = "talora"
    title = "TA-LoRA"
    config_type = TaLoraConfig
    multitask = True
    description = (
        "multi-task low-rank prompts: shared slow weights, per-task rank-1 fast weights, gated attention (one "
        "prompt set per task of the data's 'task' field; --rank is the shared rank)"
    )

    def attach(self, model: nn.Module, config: Any, **options: Any) -> nn.Module:
        if options:
            raise InvalidArgumentError(f"attach got option(s) {sorted(options)}; a TaLoraConfig takes none")
        return attach_talora(model, config)

    def adapter_modules(self, model: nn.Module) -> Dict[str, nn.Module]:
        return dict(talora_layers(model))

    def merge(self, model: nn.Module) -> nn.Module:
        raise AdapterStateError(
            "TA-LoRA cannot be merged into the base weights: its prompt branch is a second softmax over each query "
            "and the example's task, not a weight update. Keep the adapter attached (or export with per-task "
            "prompt keys/values)"
        )

    unmerge = merge

    def adapter_state(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        return _tensors(model, task_names(model))

    def save_adapter(self, model: nn.Module, path: PathLike, **options: Any) -> None:
        unknown = sorted(set(options) - {"vllm", "tasks"})
        if unknown:
            raise InvalidArgumentError(f"save_adapter got option(s) {unknown}; a TA-LoRA adapter takes tasks= only")
        save_talora(model, path, **options)

    def reads_file(self, peft_config: Mapping[str, Any]) -> bool:
        return peft_config.get("peft_type") == PEFT_TYPE

    def load_adapter(
        self, model: nn.Module, tensors: Mapping[str, torch.Tensor], peft_config: Mapping[str, Any], path: PathLike
    ) -> nn.Module:
        return load_talora(model, tensors, peft_config, path)

    def training_hooks(self, model: nn.Module) -> TrainingHooks:
        return _TrainingHooks(model, _require(model))

    def export_hooks(self) -> Sequence[Any]:
        return TALORA_EXPORTS

    def prepare(self, model: nn.Module, examples: Sequence[Dict[str, Any]], settings: Settings, pad: int) -> Prepared:
        _, heads = settings_targets(model, settings)
        config = TaLoraConfig(
            tasks=list(settings.tasks), r=settings.rank, modules_to_save=heads, init_seed=settings.seed
        )
        return Prepared(self.attach(model, config))
