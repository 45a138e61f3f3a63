"""``export_onnx``: a torch model with adapters → an ONNX graph, merged or with hot-swappable adapter inputs.

The exporter path is pinned: torch's dynamo exporter (``torch.onnx.export(dynamo=True)``, torch.export + onnxscript)
at opset 20. The TorchScript exporter (``dynamo=False``) traces Python control flow into constants; with
transformers 5 it gives wrong BERT and DeBERTa-v2 outputs (errors around 1e-2 against eager), so it is not used.
Attention runs as ``sdpa`` or ``eager`` (whichever the model has); other implementations (flash attention, flex
attention) are switched to ``sdpa`` for the export and back afterwards. ``docs/onnx.md`` has the details.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._core import __version__
from ..adapters.record import attachment_of
from ..adapters.registry import baseline
from ..adapters.targets import matches, nearest, resolve_modules_to_save
from ..errors import AdapterStateError, ExportError, InvalidArgumentError, LowRankError, ShapeError
from ._common import require
from .methods import EMPTY, GraphInput, GraphInputModule, MethodExport, adapter_modules, method_named

__all__ = ["DEFAULT_OPSET", "METADATA_KEY", "export_onnx"]

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_OPSET = 20
METADATA_KEY = "lowrank_rs"
MODES = ("merged", "adapters")
BATCH, SEQUENCE = "batch", "sequence"

# Protobuf cannot serialise a message of 2 GiB or more; bigger graphs keep their weights in a side file.
_EXTERNAL_DATA_BYTES = 1 << 30
_ONNX_ELEM = {
    torch.float32: 1,
    torch.uint8: 2,
    torch.int8: 3,
    torch.int32: 6,
    torch.int64: 7,
    torch.bool: 9,
    torch.float16: 10,
    torch.float64: 11,
    torch.bfloat16: 16,
}


def export_onnx(
    model: nn.Module,
    path: PathLike,
    example_inputs: Any,
    mode: str = "merged",
    *,
    targets: Optional[Union[str, Sequence[str]]] = None,
    method: Optional[str] = None,
    modules_to_save: Optional[Sequence[str]] = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``model`` (adapters attached or not) to the ONNX file ``path``; returns the path.

    ``example_inputs``: the keyword arguments of one forward call (a mapping such as a tokenizer's output, e.g.
    ``input_ids`` and ``attention_mask``, each ``[batch, sequence, ...]``), or one tensor taken as ``input_ids``.
    They become the graph's inputs, in the order of the model's ``forward`` signature, with dynamic batch and
    sequence axes (a size-1 example axis is repeated to 2 for tracing, since torch.export would freeze it). The
    graph's outputs are the tensors of the model's output (``logits``; ``last_hidden_state``, ...) under their
    names; decoders run with ``use_cache=False``, so there are no cache inputs or outputs.

    ``mode="merged"``: every adapter folded into the weights; the graph is the base model's graph with new weights.

    ``mode="adapters"``: the base model's weights, plus graph inputs for the adapter tensors of every adapted
    module (and of every module named by ``targets``, which get slots of the method ``method``, by default the
    baseline method, plain LoRA): for LoRA/TLoRA
    ``<module>.lora_A`` (``[d_in, rank_<module>]``) and ``<module>.lora_B`` (``[rank_<module>, d_out]``, scale
    folded in), in the model's dtype, each module with its own rank symbol, each backed by an empty default so the
    graph computes the base model when no adapter is active. The parameters of ``modules_to_save`` modules (the
    attached adapter's and those named here) become overridable inputs named ``<module>.<param>`` with their
    current values as defaults. ONNX Runtime's LoRA support (``.onnx_adapter`` files from
    :func:`~lowrank_rs.export.write_ort_adapter`, ``RunOptions.add_active_adapter``) feeds them per request.

    The model is left as it was (modules swapped for the export are put back, train/eval mode restored). Raises
    :class:`ExportError` when torch's exporter fails, with its message.
    """
    require("onnx")
    require("onnxscript")
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"export_onnx needs a torch.nn.Module, not {type(model).__name__}")
    if mode not in MODES:
        raise InvalidArgumentError(f"mode must be one of {list(MODES)}, not {mode!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 18:
        raise InvalidArgumentError(f"opset must be an integer ≥ 18 (the dynamo exporter's minimum), got {opset!r}")
    if mode == "merged" and (targets is not None or modules_to_save):
        raise InvalidArgumentError(
            "targets and modules_to_save only apply to mode='adapters' (a merged graph has no slots)"
        )
    path = Path(path)
    if path.is_dir():
        raise InvalidArgumentError(f"{os.fspath(path)!r} is a directory; give the path of the .onnx file to write")

    inputs = _model_inputs(model, example_inputs)
    adapted = adapter_modules(model)
    method = method if method is not None else baseline().name
    if mode == "merged":
        replacements = {name: hook.merged(name, module) for name, (hook, module) in adapted.items()}
        overrides: Dict[str, torch.Tensor] = {}
    else:
        replacements = _slots(model, adapted, targets, method)
        overrides = _overridable_parameters(model, modules_to_save)

    extra: Dict[str, GraphInput] = {}
    slots = [m for m in replacements.values() if isinstance(m, GraphInputModule)]
    for slot in slots:
        for gi in slot.graph_inputs(inputs):
            _add_input(extra, gi, inputs)
    for name, value in overrides.items():
        _add_input(extra, GraphInput(name, value.detach(), {}, value.detach().cpu().clone()), inputs)

    call_kwargs = _call_kwargs(model)
    wrapper = _Wrapper(model, list(inputs), list(extra), slots, list(overrides), call_kwargs).eval()
    symbols = {name: {0: BATCH, 1: SEQUENCE} if t.ndim >= 2 else {0: BATCH} for name, t in inputs.items()}
    symbols.update({name: dict(gi.dynamic) for name, gi in extra.items()})
    # One torch.export dimension per symbol: axes that share a symbol are one size in the graph.
    dims = {BATCH: torch.export.Dim(BATCH), SEQUENCE: torch.export.Dim(SEQUENCE)}
    specs = [{a: dims.setdefault(sym, torch.export.Dim(sym, min=0)) for a, sym in s.items()} for s in symbols.values()]
    examples = tuple(inputs.values()) + tuple(gi.example for gi in extra.values())

    with _swapped(model, replacements), _eval(model), _export_attention(model):
        with torch.no_grad():
            output_names = wrapper.output_names(examples)
        with warnings.catch_warnings(), _quiet_exporter_logs():
            # Every input sharing a symbol (A and B of one module, all batch axes) triggers one of these notes.
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used.*")
            # torch's own deprecations inside its exporter; nothing a caller can act on.
            warnings.filterwarnings("ignore", category=FutureWarning)
            try:
                program = torch.onnx.export(
                    wrapper,
                    examples,
                    None,
                    dynamo=True,
                    input_names=list(inputs) + list(extra),
                    output_names=output_names,
                    dynamic_shapes=(tuple(specs),),
                    opset_version=opset,
                    optimize=True,
                    verbose=False,
                )
            except Exception as e:  # the exporter raises many types; all mean "this model did not export"
                raise ExportError(
                    f"torch.onnx.export (dynamo) failed on {type(model).__name__}: {_first_line(e)}"
                ) from e
    assert program is not None  # export without a file name returns the program
    proto = program.model_proto
    _set_defaults(proto, extra, symbols)
    meta = {
        "version": __version__,
        "mode": mode,
        "methods": sorted({hook.name for hook, _ in adapted.values()} | ({method} if targets is not None else set())),
        "inputs": list(inputs),
        "outputs": output_names,
        "adapter_inputs": [n for n, gi in extra.items() if gi.default is not None],
    }
    for hook in {id(h): h for h, _ in adapted.values()}.values():
        meta.update(hook.metadata(mode, {n: m for n, (h, m) in adapted.items() if h is hook}))
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    _save(proto, path)
    return path


# --- inputs ---------------------------------------------------------------------------------------------------------


def _model_inputs(model: nn.Module, example_inputs: Any) -> Dict[str, torch.Tensor]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = {"input_ids": example_inputs}
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise InvalidArgumentError(
            "example_inputs must be a non-empty mapping of forward keyword arguments to tensors (a tokenizer's "
            f"output, say) or one input_ids tensor, not {type(example_inputs).__name__}"
        )
    if "labels" in example_inputs:
        raise InvalidArgumentError("example_inputs has 'labels': the graph computes the outputs, not a loss; drop them")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    raw: Dict[str, torch.Tensor] = {}
    for name, value in example_inputs.items():
        if value is None:
            continue
        if not isinstance(name, str) or not name.isidentifier():
            raise InvalidArgumentError(f"example_inputs keys must be forward argument names, got {name!r}")
        t = torch.as_tensor(value)
        if t.ndim == 0:
            raise ShapeError(f"example input {name!r} is a scalar; inputs are [batch, ...] tensors")
        raw[name] = t.to(device)
    if not raw:
        raise InvalidArgumentError("example_inputs holds only None values")
    batch = {t.shape[0] for t in raw.values()}
    sequence = {t.shape[1] for t in raw.values() if t.ndim >= 2}
    if len(batch) > 1 or len(sequence) > 1:
        shapes = {n: tuple(t.shape) for n, t in raw.items()}
        raise ShapeError(f"example inputs must share batch (axis 0) and sequence (axis 1) sizes, got {shapes}")
    out: Dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if t.shape[0] < 2:
            t = torch.cat([t, t], dim=0) if t.shape[0] == 1 else t
        if t.ndim >= 2 and t.shape[1] < 2:
            t = torch.cat([t, t], dim=1) if t.shape[1] == 1 else t
        if 0 in t.shape[:2]:
            raise ShapeError(f"example input {name!r} has shape {tuple(t.shape)}; batch and sequence must be ≥ 1")
        out[name] = t
    order = list(inspect.signature(model.forward).parameters)
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _call_kwargs(model: nn.Module) -> Dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    uses_cache = bool(getattr(getattr(model, "config", None), "use_cache", False))
    # A cache would add past key/value outputs, and a cache object is not a tensor the exporter can return.
    return {"use_cache": False} if "use_cache" in params or (takes_kwargs and uses_cache) else {}


def _add_input(extra: Dict[str, GraphInput], gi: GraphInput, inputs: Mapping[str, torch.Tensor]) -> None:
    if gi.name in inputs:
        raise InvalidArgumentError(
            f"graph input {gi.name!r} of an adapter slot collides with a model input of that name"
        )
    if gi.name in extra:
        old = extra[gi.name]
        if old.example.shape != gi.example.shape or dict(old.dynamic) != dict(gi.dynamic):
            raise InvalidArgumentError(f"two adapter slots declare graph input {gi.name!r} with different shapes")
        return
    extra[gi.name] = gi


# --- slots ----------------------------------------------------------------------------------------------------------


def _slots(
    model: nn.Module,
    adapted: Mapping[str, Tuple[MethodExport, nn.Module]],
    targets: Optional[Union[str, Sequence[str]]],
    method: str,
) -> Dict[str, nn.Module]:
    out: Dict[str, nn.Module] = {}
    for name, (hook, module) in adapted.items():
        if getattr(module, "merged", False):
            raise AdapterStateError(
                f"{name!r} is merged, so its base weight holds the update; unmerge the model before an "
                "adapters-mode export, or export with mode='merged'"
            )
        out[name] = hook.slot(name, module)
    if targets is not None:
        hook = method_named(method)
        for name, module in _resolve_targets(model, targets, adapted).items():
            if name in adapted:
                continue
            why = hook.slot_target(name, module)
            if why is not None:
                raise InvalidArgumentError(f"target {why}")
            out[name] = hook.slot(name, module)
    if not out:
        raise InvalidArgumentError(
            "an adapters-mode export needs adapter slots: attach an adapter to the model, or name base modules "
            "with targets=[...] (module-name suffixes, or a regex matched against whole names)"
        )
    return out


def _resolve_targets(
    model: nn.Module, spec: Union[str, Sequence[str]], adapted: Mapping[str, Any]
) -> Dict[str, nn.Module]:
    # Modules inside an adapter module (its base layer, its factors) are the adapter's business, not targets.
    inside = [a for a, (hook, _) in adapted.items() if hook.internal_children]
    modules = {n: m for n, m in model.named_modules() if n and not any(n.startswith(a + ".") for a in inside)}
    if isinstance(spec, str):
        hits = [n for n in modules if re.fullmatch(spec, n)]
        if not hits:
            raise InvalidArgumentError(
                f"target regex {spec!r} matches no module name (it must match the whole name); nearest names: "
                f"{nearest(spec, modules)}"
            )
    else:
        if not isinstance(spec, Sequence) or not all(isinstance(s, str) for s in spec) or not spec:
            raise InvalidArgumentError(f"targets must be a regex string or a non-empty list of names, not {spec!r}")
        hits = []
        for entry in spec:
            found = [n for n in modules if matches(n, entry)]
            if not found:
                raise InvalidArgumentError(
                    f"target {entry!r} matches no module; nearest names: {nearest(entry, modules)}"
                )
            hits += found
    return {n: modules[n] for n in modules if n in set(hits)}


def _overridable_parameters(model: nn.Module, names: Optional[Sequence[str]]) -> Dict[str, torch.Tensor]:
    attachment = attachment_of(model)
    entries = list(attachment.modules_to_save) if attachment is not None else []
    if names:
        if isinstance(names, str):
            raise InvalidArgumentError("modules_to_save must be a list of module names, not one string")
        entries += resolve_modules_to_save(dict(model.named_modules()), list(names))
    out: Dict[str, torch.Tensor] = {}
    for module in dict.fromkeys(entries):
        for pname, p in model.get_submodule(module).named_parameters():
            out[f"{module}.{pname}"] = p
    return out


# --- tracing --------------------------------------------------------------------------------------------------------


class _Wrapper(nn.Module):
    """Positional graph inputs → the model's keyword call, slot inputs bound, outputs flattened to a tuple."""

    def __init__(
        self,
        model: nn.Module,
        input_names: List[str],
        extra_names: List[str],
        slots: List[GraphInputModule],
        override_names: List[str],
        call_kwargs: Dict[str, Any],
    ) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.extra_names = extra_names
        self.slots = slots  # a plain list: they are submodules of the model already
        self.override_names = override_names
        self.call_kwargs = call_kwargs
        self._keys: Optional[List[str]] = None

    def forward(self, *args: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        n = len(self.input_names)
        kwargs = dict(zip(self.input_names, args[:n]), **self.call_kwargs)
        feeds = dict(zip(self.extra_names, args[n:]))
        for slot in self.slots:
            slot.bind(feeds)
        try:
            if self.override_names:
                overrides = {k: feeds[k] for k in self.override_names}
                out = torch.func.functional_call(self.model, overrides, (), kwargs)
            else:
                out = self.model(**kwargs)
        finally:
            for slot in self.slots:
                slot.bind(None)
        named = _named_outputs(out)
        if self._keys is None:
            self._keys = [k for k, _ in named]
        return tuple(v for _, v in named)

    def output_names(self, examples: Tuple[torch.Tensor, ...]) -> List[str]:
        self._keys = None
        self(*examples)
        assert self._keys is not None
        if not self._keys:
            raise ExportError("the model's forward returned no tensors")
        return list(self._keys)


def _named_outputs(out: Any) -> List[Tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [("output", out)]
    if isinstance(out, Mapping):  # transformers' ModelOutput is an OrderedDict of its non-None fields
        return [(k, v) for k, v in out.items() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [(f"output_{i}", v) for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
    raise ExportError(f"the model's forward returned a {type(out).__name__}; expected tensors or a ModelOutput")


@contextlib.contextmanager
def _swapped(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[None]:
    originals: List[Tuple[nn.Module, str, nn.Module]] = []
    try:
        # Innermost first, so that an outer replacement that keeps its original's children keeps the swapped ones.
        for name, new in sorted(replacements.items(), key=lambda kv: -kv[0].count(".")):
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent)
            originals.append((owner, leaf, getattr(owner, leaf)))
            setattr(owner, leaf, new)
        yield
    finally:
        for owner, leaf, old in reversed(originals):
            setattr(owner, leaf, old)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def _export_attention(model: nn.Module) -> Iterator[None]:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in (None, "eager", "sdpa") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    switch = getattr(model, "set_attn_implementation")  # noqa: B009  (a method of transformers models only)
    switch("sdpa")
    try:
        yield
    finally:
        switch(impl)


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    # The exporter logs a warning for each torchvision op it cannot register when torchvision is absent.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- graph surgery --------------------------------------------------------------------------------------------------


def _tensor_proto(name: str, t: torch.Tensor) -> Any:
    import onnx

    t = t.detach().cpu().contiguous()
    if t.dtype not in _ONNX_ELEM:
        raise ExportError(f"graph input {name!r} has dtype {t.dtype}, which has no ONNX element type here")
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return onnx.helper.make_tensor(name, _ONNX_ELEM[t.dtype], list(t.shape), vals=raw, raw=True)


def _set_defaults(proto: Any, extra: Mapping[str, GraphInput], symbols: Mapping[str, Mapping[int, str]]) -> None:
    """Back every optional slot input with its default initializer and give every dynamic axis its own symbol."""
    graph_inputs = {i.name: i for i in proto.graph.input}
    missing = [n for n in extra if n not in graph_inputs]
    if missing:
        raise ExportError(f"the exported graph lost adapter input(s) {missing[:3]}: no operation reads them")
    for name, axes in symbols.items():
        dims = graph_inputs[name].type.tensor_type.shape.dim
        for axis, symbol in axes.items():
            dims[axis].Clear()
            dims[axis].dim_param = symbol
    initializers = {i.name for i in proto.graph.initializer}
    for name, gi in extra.items():
        if gi.default is None:
            continue
        if name in initializers:
            raise ExportError(f"the exported graph already has an initializer named {name!r}")
        value = gi.empty_default() if isinstance(gi.default, str) and gi.default == EMPTY else gi.default
        if not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(
                f"graph input {name!r} has default {gi.default!r}; expected EMPTY, a tensor or None"
            )
        elem = graph_inputs[name].type.tensor_type.elem_type
        if _ONNX_ELEM.get(value.dtype) != elem:
            raise ExportError(f"default of graph input {name!r} is {value.dtype}, the input's ONNX type is {elem}")
        proto.graph.initializer.append(_tensor_proto(name, value))


def _save(proto: Any, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if size >= _EXTERNAL_DATA_BYTES:
            onnx.save_model(
                proto,
                tmp,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=path.name + ".data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(proto, tmp)
        onnx.checker.check_model(tmp)
        os.replace(tmp, path)
    except Exception as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, LowRankError):
            raise
        raise ExportError(f"writing the ONNX graph to {os.fspath(path)!r} failed: {_first_line(e)}") from e
