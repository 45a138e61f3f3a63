"""``OrtModel``: an exported graph in an ONNX Runtime session, called like the torch model it came from."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import AdapterIOError, ExportError, InvalidArgumentError, ShapeError, TaskError
from ._common import require
from .adapter_file import check_adapter, read_ort_adapter, session_adapter_inputs
from .exporter import METADATA_KEY
from .methods import TASK_INPUT

__all__ = ["OrtModel", "OrtOutput"]

PathLike = Union[str, "os.PathLike[str]"]

_ACTIVE = object()  # "the adapter set with set_adapter", as opposed to an explicit name or None
_NUMPY_INPUT = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32", "tensor(bool)": "bool"}


class OrtOutput(Dict[str, Any]):
    """The graph's outputs by name, readable as attributes like a transformers ``ModelOutput`` (``out.logits``);
    an integer index gives the outputs in graph order (``out[0]``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no output named {name!r}; outputs: {list(self)}") from None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(self.values())


class OrtModel:
    """An ONNX graph from :func:`~lowrank_rs.export_onnx` in an ONNX Runtime session.

    ``providers``: ONNX Runtime execution providers in order of preference. By default CUDA first when the installed
    ONNX Runtime has it (``onnxruntime-gpu``) and a GPU answers, then the CPU; :attr:`providers` says what the
    session got. ``num_threads`` sets the CPU provider's intra-op threads (0: ONNX Runtime's choice).
    ``adapters``: ``.onnx_adapter`` files to load, by name (see :meth:`load_adapter`).

    Call it like the torch model: ``model(input_ids, attention_mask=...)`` or ``model(**tokenizer_output)`` →
    :class:`OrtOutput` with ``.logits`` (or the graph's other outputs). Inputs are torch tensors (any device) or
    numpy arrays; outputs are torch tensors on the first torch input's device when any input is a tensor, numpy
    arrays otherwise. ``attention_mask`` defaults to ones and ``token_type_ids`` to zeros, as in transformers.

    Adapters (adapters-mode graphs): ``adapter="name"`` runs one request with that adapter, ``adapter=None`` runs
    the base model, and without the argument the adapter chosen by :meth:`set_adapter` (initially none) runs.
    Switching costs nothing: the session is never rebuilt.

    TA-LoRA merged graphs take each example's task, as the torch model takes it from ``lr.use_tasks``:
    ``task_ids=`` a ``[batch]`` array or list of task ids or names, or one id or name for the whole batch. They are
    checked against the graph's tasks (its metadata) before ONNX Runtime runs; the graph input is ``task_id``.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        providers: Optional[Sequence[Any]] = None,
        num_threads: int = 0,
        adapters: Optional[Mapping[str, PathLike]] = None,
    ) -> None:
        ort = require("onnxruntime")
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise AdapterIOError(f"ONNX graph {self.path!r} does not exist or is not a file")
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
            raise InvalidArgumentError(f"num_threads must be a non-negative integer, got {num_threads!r}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        # Adapter inputs are initializers listed as graph inputs on purpose; ONNX Runtime warns about each one.
        options.log_severity_level = 3
        wanted = list(providers) if providers is not None else default_providers()
        try:
            self.session = ort.InferenceSession(self.path, options, providers=wanted)
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise ExportError(f"ONNX Runtime cannot load {self.path!r}: {str(e).strip()}") from None
        self._ort = ort
        self.input_names: List[str] = [i.name for i in self.session.get_inputs()]
        self.output_names: List[str] = [o.name for o in self.session.get_outputs()]
        self._input_types = {i.name: i.type for i in self.session.get_inputs()}
        self.adapter_inputs = session_adapter_inputs(self.session)
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.metadata: Dict[str, Any] = json.loads(meta) if meta else {}
        self._adapters: Dict[str, Tuple[Any, Any]] = {}
        self._active: Optional[str] = None
        for name, adapter_path in (adapters or {}).items():
            self.load_adapter(adapter_path, name)

    @property
    def providers(self) -> List[str]:
        return list(self.session.get_providers())

    @property
    def adapters(self) -> List[str]:
        """Names of the loaded adapters."""
        return list(self._adapters)

    @property
    def active_adapter(self) -> Optional[str]:
        return self._active

    def load_adapter(self, path: PathLike, name: Optional[str] = None) -> str:
        """Load an ``.onnx_adapter`` file under ``name`` (default: the file name without ``.onnx_adapter``); returns
        the name.

        The file is checked against the graph first: every tensor must be an adapter input of this graph, with its
        dtype and a fitting shape. A corrupt file raises :class:`~lowrank_rs.AdapterFormatError`, one that does not
        fit raises :class:`~lowrank_rs.TargetError`, :class:`~lowrank_rs.DtypeError` or
        :class:`~lowrank_rs.ShapeError`; nothing is loaded then.
        """
        if name is None:
            name = os.path.basename(os.fspath(path))
            name = name[: -len(".onnx_adapter")] if name.endswith(".onnx_adapter") else name
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"adapter name must be a non-empty string, got {name!r}")
        if not self.adapter_inputs:
            raise InvalidArgumentError(
                f"{self.path!r} has no adapter inputs; export it with export_onnx(..., mode='adapters') to use adapters"
            )
        specs = read_ort_adapter(path)
        check_adapter(specs, self.adapter_inputs, repr(os.fspath(path)), repr(self.path))
        adapter = self._ort.LoraAdapter()
        try:
            adapter.Load(os.fspath(path))
        except RuntimeError as e:  # pragma: no cover - read_ort_adapter has validated the same bytes
            raise AdapterIOError(f"ONNX Runtime cannot load adapter {os.fspath(path)!r}: {e}") from None
        options = self._ort.RunOptions()
        options.add_active_adapter(adapter)
        self._adapters[name] = (adapter, options)
        return name

    def unload_adapter(self, name: str) -> None:
        self._require(name)
        del self._adapters[name]
        if self._active == name:
            self._active = None

    def set_adapter(self, name: Optional[str]) -> None:
        """Make ``name`` the adapter of calls that do not say otherwise; ``None`` runs the base model."""
        if name is not None:
            self._require(name)
        self._active = name

    def _require(self, name: str) -> None:
        if name not in self._adapters:
            raise InvalidArgumentError(f"no adapter named {name!r} is loaded; loaded: {self.adapters}")

    def __call__(self, *args: Any, adapter: Any = _ACTIVE, **kwargs: Any) -> OrtOutput:
        if len(args) > len(self.input_names):
            raise InvalidArgumentError(f"{len(args)} positional inputs given; the graph takes {self.input_names}")
        for name, value in zip(self.input_names, args):
            if name in kwargs:
                raise InvalidArgumentError(f"input {name!r} given both by position and by name")
            kwargs[name] = value
        return self.run(kwargs, adapter=adapter)

    forward = __call__

    def run(self, inputs: Mapping[str, Any], *, adapter: Any = _ACTIVE) -> OrtOutput:
        """Run the graph on ``inputs`` (name → tensor or array); see the class docstring for ``adapter``."""
        import numpy as np

        feeds, device = self._feeds(inputs)
        chosen = self._active if adapter is _ACTIVE else adapter
        options = None
        if chosen is not None:
            self._require(chosen)
            options = self._adapters[chosen][1]
        try:
            values = self.session.run(self.output_names, feeds, run_options=options)
        except Exception as e:  # onnxruntime's Fail / InvalidArgument / RuntimeException
            raise ExportError(f"ONNX Runtime failed to run {self.path!r}: {str(e).strip()}") from None
        if device is None:
            return OrtOutput(zip(self.output_names, values))
        import torch

        return OrtOutput(
            (name, torch.from_numpy(np.ascontiguousarray(v)).to(device)) for name, v in zip(self.output_names, values)
        )

    def _feeds(self, inputs: Mapping[str, Any]) -> Tuple[Dict[str, Any], Any]:
        import numpy as np

        inputs = dict(inputs)
        tasks = inputs.pop("task_ids", None) if "task_ids" not in self._input_types else None
        if tasks is not None and inputs.get(TASK_INPUT) is not None:
            raise TaskError(f"give task_ids or {TASK_INPUT}, not both")
        unknown = [k for k, v in inputs.items() if k not in self._input_types and v is not None]
        if unknown:
            raise InvalidArgumentError(f"the graph has no input {unknown[0]!r}; its inputs are {self.input_names}")
        feeds: Dict[str, Any] = {}
        device = None
        for name, value in inputs.items():
            if value is None:
                continue
            if hasattr(value, "detach") and hasattr(value, "device"):  # a torch tensor, without importing torch
                device = value.device if device is None else device
                value = value.detach().cpu().numpy()
            arr = np.asarray(value)
            want = _NUMPY_INPUT.get(self._input_types[name])
            feeds[name] = arr.astype(want, copy=False) if want is not None else arr
        shape = next((a.shape[:2] for a in feeds.values() if a.ndim >= 2), None)
        if tasks is not None:
            feeds[TASK_INPUT] = self._task_ids(tasks, None if shape is None else int(shape[0]))
        elif TASK_INPUT in feeds:
            feeds[TASK_INPUT] = self._task_ids(feeds[TASK_INPUT], None if shape is None else int(shape[0]))
        missing = [n for n in self.input_names if n not in feeds]
        for name in missing:
            if name == TASK_INPUT:
                raise TaskError(
                    f"{self.path!r} selects TA-LoRA prompts per example: pass task_ids= (one per example, or one for "
                    f"the whole batch; the graph's tasks are {self.tasks})"
                )
            if name in ("attention_mask", "token_type_ids") and shape is not None:
                fill = np.ones if name == "attention_mask" else np.zeros
                feeds[name] = fill(shape, dtype=_NUMPY_INPUT.get(self._input_types[name], "int64"))
            else:
                raise InvalidArgumentError(f"input {name!r} is missing; the graph takes {self.input_names}")
        for name, arr in feeds.items():
            if arr.ndim == 0:
                raise ShapeError(f"input {name!r} is a scalar; the graph takes [batch, ...] tensors")
        return feeds, device

    @property
    def tasks(self) -> List[str]:
        """The TA-LoRA tasks of a merged TA-LoRA graph in id order (empty for other graphs)."""
        return list(self.metadata.get("tasks") or [])

    def _task_ids(self, value: Any, batch: Optional[int]) -> Any:
        """``task_ids`` as the graph's int64 ``[batch]`` ``task_id`` feed, names mapped and every id checked."""
        import numpy as np

        if TASK_INPUT not in self._input_types:
            raise TaskError(
                f"{self.path!r} has no {TASK_INPUT} input: task_ids choose TA-LoRA tasks in a merged TA-LoRA graph "
                "(in an adapters-mode graph the active adapter is the task)"
            )
        names = self.tasks
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        if isinstance(value, (str, int, np.integer)) and not isinstance(value, bool):
            value = np.asarray(value, dtype=object)
        arr = np.asarray(value, dtype=object) if isinstance(value, (list, tuple)) else np.asarray(value)
        if arr.ndim > 1 or arr.size == 0:
            raise TaskError(f"task_ids must be one task per example ([batch]) or one task, not shape {arr.shape}")
        items = [arr.item()] * (batch or 1) if arr.ndim == 0 else arr.tolist()
        ids = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                if item not in names:
                    raise TaskError(f"task_ids[{i}]: {item!r} is not one of the graph's tasks {names}")
                item = names.index(item)
            elif isinstance(item, bool) or not isinstance(item, (int, np.integer)):
                raise TaskError(f"task_ids[{i}] must be a task name or index, not {item!r}")
            if not 0 <= int(item) < len(names):
                raise TaskError(f"task id {int(item)} does not exist: the graph has {len(names)} tasks {names}")
            ids.append(int(item))
        if batch is not None and len(ids) != batch:
            raise TaskError(f"task ids are given for {len(ids)} examples, but the batch has {batch}")
        return np.asarray(ids, dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"OrtModel({self.path!r}, providers={self.providers}, inputs={self.input_names}, "
            f"outputs={self.output_names}, adapters={self.adapters}, active={self._active!r})"
        )


def default_providers() -> List[str]:
    """CUDA first when this ONNX Runtime build has it and a GPU is visible, the CPU always."""
    ort = require("onnxruntime")
    available = ort.get_available_providers()
    out = []
    if "CUDAExecutionProvider" in available and _gpu_present():
        out.append("CUDAExecutionProvider")
    out.append("CPUExecutionProvider")
    return out


def _gpu_present() -> bool:
    try:
        import torch

        if torch.version.cuda is not None:
            return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - a broken CUDA setup counts as no GPU
        return False
    # A CPU-only torch cannot tell; ONNX Runtime falls back to the CPU (with a warning) when CUDA does not start.
    return True
