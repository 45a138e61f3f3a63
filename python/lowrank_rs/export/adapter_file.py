"""ONNX Runtime adapter files (``.onnx_adapter``): written from adapter directories or attached models, checked
against the adapter inputs of a graph.

A file holds one tensor per graph input it overrides, under the input's name, in the graph's dtype: for LoRA/TLoRA
``<module>.lora_A`` (``Aᵀ``, ``[d_in, r]``) and ``<module>.lora_B`` (``γ Bᵀ``, ``[r, d_out]``), and for a
``modules_to_save`` module its parameters under ``<module>.<param>``. ONNX Runtime's own writer
(``onnxruntime.AdapterFormat``) serialises it; ``onnxruntime.LoraAdapter`` reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..adapters.peft_format import check_finite_tensors
from ..adapters.record import attachment_of
from ..errors import (
    AdapterFormatError,
    AdapterIOError,
    AdapterStateError,
    DtypeError,
    InvalidArgumentError,
    ShapeError,
    TargetError,
)
from ..package import read_adapter
from ._common import FLOAT_DTYPES, ONNX_TYPES, ORT_TYPES, require
from .methods import adapter_modules, method_for_file, method_named

__all__ = [
    "AdapterContents",
    "adapter_contents",
    "adapter_tensors",
    "check_adapter",
    "graph_adapter_inputs",
    "read_ort_adapter",
    "write_ort_adapter",
]

PathLike = Union[str, "os.PathLike[str]"]
# (dtype name, shape); a shape entry is a size, a symbol (a dynamic axis) or None (unknown).
Spec = Tuple[str, Tuple[Union[int, str, None], ...]]


def write_ort_adapter(
    adapter: Union[PathLike, nn.Module],
    out_path: PathLike,
    *,
    graph: Optional[PathLike] = None,
    dtype: Optional[str] = None,
) -> Path:
    """Write ``adapter`` as an ONNX Runtime adapter file for an adapters-mode graph; returns ``out_path``.

    ``adapter``: an adapter directory (ours, LoRA or TLoRA, or a plain PEFT LoRA directory) or a model with an
    attached adapter. ``graph``: the adapters-mode ``.onnx`` file the adapter is for; when given, every tensor must
    be one of its adapter inputs with a fitting shape, and takes that input's dtype. Without it the tensors are
    written as ``dtype`` (``"float32"`` by default; ``"float16"``, ``"bfloat16"``, ``"float64"``), which must then
    match the graph's. Scales are folded into ``B`` in float32 before the one rounding to the target dtype. The file
    is written to a temporary name and renamed into place.
    """
    ort = require("onnxruntime")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise DtypeError(f"dtype must be one of {list(FLOAT_DTYPES)}, not {dtype!r}")
    tensors = adapter_tensors(adapter)
    where = _describe(adapter)
    if graph is not None:
        inputs = graph_adapter_inputs(graph)
        dtypes = {name: inputs[name][0] for name in tensors if name in inputs}
        if dtype is not None and any(d != dtype for d in dtypes.values()):
            raise DtypeError(
                f"dtype={dtype!r} differs from the graph's adapter inputs ({sorted(set(dtypes.values()))})"
            )
    else:
        dtypes = {name: dtype or "float32" for name in tensors}
    specs = {name: (dtypes.get(name, "float32"), tuple(t.shape)) for name, t in tensors.items()}
    if graph is not None:
        check_adapter(specs, inputs, where, repr(os.fspath(graph)))

    keep: List[Any] = []  # OrtValue wraps numpy memory without a copy; the arrays must outlive the export
    params = {}
    for name, t in tensors.items():
        arr, onnx_type = _numpy(t, dtypes[name])
        keep.append(arr)
        if onnx_type is None:
            params[name] = ort.OrtValue.ortvalue_from_numpy(arr)
        else:
            params[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr, onnx_type)
    out = Path(out_path)
    if out.is_dir():
        raise InvalidArgumentError(
            f"{os.fspath(out)!r} is a directory; give the path of the .onnx_adapter file to write"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        # The writer's pid in the name lets a later write tell a killed writer's leftover from a live one's file.
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise AdapterIOError(f"cannot write {os.fspath(out)!r}: {e}") from None
    try:
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters(params)
        fmt.export_adapter(tmp)
        # mkstemp creates 0600 whatever the umask; the file should get the mode any other new file would.
        os.chmod(tmp, 0o666 & ~_umask())
        # Durable before it is visible: a crash after the rename must not leave a renamed but empty file.
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, out)
        _fsync(os.fspath(out.parent), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise AdapterIOError(f"cannot write {os.fspath(out)!r}: {e}") from None
        raise
    return out


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    # Reading the umask elsewhere means setting it; it is put back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: str, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:
        if flags & getattr(os, "O_DIRECTORY", 0):
            return  # directories cannot be opened for fsync on every platform; the file itself is synced
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporaries that killed writers of ``out`` left behind (their pid no longer runs)."""
    prefix = f".{out.name}."
    for entry in out.parent.iterdir():
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix) :].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            alive = not _started_after(int(pid), entry)
        except ProcessLookupError:
            alive = False
        except (PermissionError, OverflowError):
            alive = True  # alive under another user, or not a pid at all: leave it
        if not alive:
            with contextlib.suppress(OSError):
                entry.unlink()


def _started_after(pid: int, entry: Path) -> bool:
    """Whether process ``pid`` started after ``entry`` was last written, i.e. the pid was reused and the writer is
    gone (pids wrap around, at 32768 on many Linux machines). False when it cannot tell (no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22 (starttime, clock ticks since boot) follows the command name, which may contain spaces.
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
        # btime has one-second resolution: a margin keeps a writer that started just before its file from looking new.
        return started > entry.stat().st_mtime + 2.0
    except (OSError, ValueError, IndexError, StopIteration):
        return False


@dataclasses.dataclass
class AdapterContents:
    """What an adapter supplies to an adapters-mode graph: its method, the slot inputs of each adapted module
    (module → graph-input name → value) and the parameters of its ``modules_to_save`` modules (name → value);
    float32 CPU tensors throughout."""

    method: str
    modules: Dict[str, Dict[str, torch.Tensor]]
    saved: Dict[str, torch.Tensor]

    def tensors(self) -> Dict[str, torch.Tensor]:
        out = {name: t for inputs in self.modules.values() for name, t in inputs.items()}
        clash = sorted(set(out) & set(self.saved))
        if clash:
            raise AdapterFormatError(f"tensor {clash[0]!r} is both a saved module's parameter and an adapter input")
        out.update(self.saved)
        return out


def adapter_tensors(adapter: Union[PathLike, nn.Module]) -> Dict[str, torch.Tensor]:
    """The graph-input values an adapter supplies (float32, CPU), keyed by graph-input name."""
    return adapter_contents(adapter).tensors()


def adapter_contents(adapter: Union[PathLike, nn.Module]) -> AdapterContents:
    """:class:`AdapterContents` of an adapter directory or of a model's attached adapter."""
    if isinstance(adapter, nn.Module):
        return _model_contents(adapter)
    if not isinstance(adapter, (str, os.PathLike)):
        raise InvalidArgumentError(f"adapter must be an adapter directory or a model, not {type(adapter).__name__}")
    where = os.fspath(adapter)
    tensors, config = read_adapter(adapter, framework="torch")
    check_finite_tensors(tensors, where)
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{where!r}: the adapter config is a JSON {type(config).__name__}")
    hook = method_for_file(config, where)
    modules, rest = hook.file_tensors(tensors, config, where)
    if not modules:
        raise AdapterFormatError(f"{where!r} holds no {hook.name} adapter weights")
    return AdapterContents(hook.name, _float(modules), {k: _cpu_float(v) for k, v in rest.items()})


def _model_contents(model: nn.Module) -> AdapterContents:
    adapted = adapter_modules(model)
    if not adapted:
        raise AdapterStateError("the model has no adapter attached (lowrank_rs.attach or load_adapter first)")
    attachment = attachment_of(model)
    # A method may combine module types (LoRATRF: LoRA layers and filters); the attached config names it.
    if attachment is not None:
        method = method_named(attachment.method).name
    else:
        names = sorted({hook.name for hook, _ in adapted.values()})
        if len(names) > 1:
            raise InvalidArgumentError(f"the model mixes adapter methods {names} without an attachment that names one")
        method = names[0]
    modules = {name: hook.model_tensors(name, module) for name, (hook, module) in adapted.items()}
    modules = {name: inputs for name, inputs in modules.items() if inputs}
    if not modules:
        raise AdapterStateError(
            "every adapter of the model is merged into its weights; unmerge it to write its factors"
        )
    saved: Dict[str, torch.Tensor] = {}
    for module in attachment.modules_to_save if attachment is not None else ():
        for pname, p in model.get_submodule(module).named_parameters():
            saved[f"{module}.{pname}"] = _cpu_float(p)
    return AdapterContents(method, _float(modules), saved)


def _cpu_float(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().contiguous()


def _float(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> Dict[str, Dict[str, torch.Tensor]]:
    return {m: {k: _cpu_float(v) for k, v in inputs.items()} for m, inputs in modules.items()}


def _describe(adapter: Any) -> str:
    return os.fspath(adapter) if isinstance(adapter, (str, os.PathLike)) else f"the {type(adapter).__name__}'s adapter"


def _numpy(t: torch.Tensor, dtype: str) -> Tuple[Any, Optional[int]]:
    import numpy as np

    if dtype == "bfloat16":  # numpy has no bfloat16: raw bits, typed for ONNX Runtime explicitly
        return np.ascontiguousarray(t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)), 16
    return np.ascontiguousarray(t.to(getattr(torch, dtype)).numpy()), None


def graph_adapter_inputs(graph: PathLike) -> Dict[str, Spec]:
    """The overridable inputs (inputs with a default initializer) of an ONNX graph file, by name."""
    onnx = require("onnx")
    where = os.fspath(graph)
    if not os.path.isfile(where):
        raise AdapterIOError(f"ONNX graph {where!r} does not exist or is not a file")
    try:
        proto = onnx.load(where, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise AdapterFormatError(f"{where!r} is not an ONNX model: {e}") from None
    defaults = {t.name for t in proto.graph.initializer}
    out: Dict[str, Spec] = {}
    for i in proto.graph.input:
        if i.name not in defaults:
            continue
        tt = i.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        out[i.name] = (ONNX_TYPES.get(tt.elem_type, f"onnx type {tt.elem_type}"), dims)
    return out


def session_adapter_inputs(session: Any) -> Dict[str, Spec]:
    """The overridable inputs of an ONNX Runtime session, by name."""
    return {
        a.name: (ORT_TYPES.get(a.type, a.type), tuple(d if isinstance(d, (int, str)) else None for d in a.shape))
        for a in session.get_overridable_initializers()
    }


def read_ort_adapter(path: PathLike) -> Dict[str, Spec]:
    """Validate an ``.onnx_adapter`` file with ONNX Runtime's reader; returns its parameters' dtypes and shapes."""
    ort = require("onnxruntime")
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise AdapterIOError(f"adapter file {where!r} does not exist or is not a file")
    try:
        fmt = ort.AdapterFormat.read_adapter(where)
        params = fmt.get_parameters()
        specs = {name: (ORT_TYPES.get(v.data_type(), v.data_type()), tuple(v.shape())) for name, v in params.items()}
    except RuntimeError as e:
        raise AdapterFormatError(
            f"{where!r} is not a valid ONNX Runtime adapter file (.onnx_adapter): {_ort_reason(e)}"
        ) from None
    if not specs:
        raise AdapterFormatError(f"{where!r} holds no parameters")
    return specs


def _ort_reason(e: BaseException) -> str:
    # ONNX Runtime prefixes its messages with a source location and a C++ signature.
    text = str(e).strip()
    m = re.search(r"\)\s+([^()]+)$", text)
    return m.group(1).strip() if m else text


def check_adapter(params: Mapping[str, Spec], inputs: Mapping[str, Spec], where: str, graph: str) -> None:
    """Raise unless every parameter is an adapter input of the graph with its dtype and a fitting shape.

    Sizes along a symbolic axis must agree within the adapter (``A`` and ``B`` of a module share their rank).
    """
    unknown = sorted(n for n in params if n not in inputs)
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(inputs), n=3, cutoff=0.5) or sorted(inputs)[:3]
        raise TargetError(
            f"{where} has tensor {unknown[0]!r} ({len(unknown)} unknown in all), which is not an adapter input of "
            f"{graph} (nearest: {near}); was the graph exported with mode='adapters' and slots for these modules?"
        )
    seen: Dict[str, Tuple[int, str]] = {}
    for name, (dtype, shape) in sorted(params.items()):
        want_dtype, want_shape = inputs[name]
        if dtype != want_dtype:
            raise DtypeError(f"{where}: {name!r} is {dtype}, but {graph} takes {want_dtype}")
        if len(shape) != len(want_shape):
            raise ShapeError(f"{where}: {name!r} has shape {list(shape)}; {graph} takes {list(want_shape)}")
        for n, w in zip(shape, want_shape):
            if isinstance(w, int) and n != w:
                raise ShapeError(f"{where}: {name!r} has shape {list(shape)}; {graph} takes {list(want_shape)}")
            if isinstance(w, str) and isinstance(n, int):
                first = seen.setdefault(w, (n, name))
                if first[0] != n:
                    raise ShapeError(
                        f"{where}: {name!r} has size {n} along {w!r}, but {first[1]!r} has {first[0]}; "
                        "tensors sharing an axis symbol must agree"
                    )
