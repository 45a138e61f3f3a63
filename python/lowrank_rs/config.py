"""Validated configs for the adapter methods, with a JSON round trip.

Configs are frozen dataclasses: a config that exists is valid, and ``dataclasses.replace`` builds a changed copy that
is validated again. Sequences are stored as tuples so that a config can be hashed and compared; ``to_dict`` turns them
back into lists for JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

from .errors import ConfigError, LowRankError

__all__ = ["ConfigError", "LoraConfig", "TLoraConfig", "TaLoraConfig", "TrfConfig", "config_from_dict"]

C = TypeVar("C", bound="JsonConfig")

TargetSpec = Union[str, Sequence[str]]



class JsonConfig:
    """The JSON round trip every config of the package shares (adapter configs, :class:`TrainConfig`).

    Subclasses are frozen dataclasses; tuples serialise as lists, unknown keys are an error listing the valid ones.
    """

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls: Type[C], data: Mapping[str, Any]) -> C:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict needs a mapping, not {type(data).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {valid}")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ConfigError(f"{cls.__name__} needs field(s) {missing}")
        return cls(**dict(data))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls: Type[C], text: str) -> C:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls.__name__}.from_json: not valid JSON: {e}") from None
        return cls.from_dict(data)

    def _set(self, name: str, value: Any) -> None:
        # Frozen dataclasses only allow normalisation in __post_init__ through object.__setattr__.
        object.__setattr__(self, name, value)


@dataclasses.dataclass(frozen=True)
class LoraConfig(JsonConfig):
    """Plain LoRA (METHODS.md §1): ``y = W0 x + γ B A x`` on every target ``nn.Linear``.

    - ``target_modules``: module-name suffixes (a module ``m`` matches ``t`` when ``m == t`` or ``m`` ends with
      ``"." + t``), or one regex string matched with ``re.fullmatch`` against the full module name — PEFT's rules.
    - ``r``, ``alpha``: rank and scale; ``γ = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
    - ``dropout``: dropout on the adapter's input only.
    - ``modules_to_save``: modules (matched like list targets) that train in full and are saved whole, e.g. a
      classifier head.
    - ``bias``: only ``"none"``; kept so that the field PEFT users know is refused rather than ignored.
    - ``init_seed``: seeds the Kaiming init of ``A`` for reproducible adapters; ``None`` uses torch's global RNG.
    """

    method: ClassVar[str] = "lora"

    target_modules: TargetSpec
    r: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    dropout: float = 0.0
    modules_to_save: Sequence[str] = ()
    bias: str = "none"
    init_seed: Optional[int] = None

    def __post_init__(self) -> None:
        self._set("target_modules", _target_spec(self.target_modules))
        self._set("r", _int(self.r, "r", minimum=1))
        self._set("alpha", _positive_float(self.alpha, "alpha"))
        self._check_lora_options()

    def _check_lora_options(self) -> None:
        # Every LoRA field but targets, r and alpha, which TrfConfig may leave unset until it sees the model.
        self._set("use_rslora", _bool(self.use_rslora, "use_rslora"))
        dropout = _float(self.dropout, "dropout")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {dropout}")
        self._set("dropout", dropout)
        self._set("modules_to_save", _names(self.modules_to_save, "modules_to_save"))
        if self.bias != "none":
            raise ConfigError(
                f"bias must be 'none' (adapters never train the base layer's bias), got {self.bias!r}; "
                "to train a bias, list its module in modules_to_save"
            )
        if self.init_seed is not None:
            self._set("init_seed", _int(self.init_seed, "init_seed", minimum=0))

    def scaling_for(self, rank: int) -> float:
        """γ for a module of ``rank``, computed with PEFT's expression so the two agree bit for bit."""
        return self.alpha / math.sqrt(rank) if self.use_rslora else self.alpha / rank


@dataclasses.dataclass(frozen=True)
class TLoraConfig(LoraConfig):
    """TLoRA (METHODS.md §2): task-aware frozen ``A``, budgeted rank and scale per module.

    - ``budget``: total rank over the ``N`` target modules; ``None`` means ``r × N`` (LoRA's parameter count).
    - ``min_rank``, ``max_rank``, ``multiple_of``: bounds and rounding of each module's rank; rank 0 (allowed with
      ``min_rank=0``) leaves a module without adapter.
    - ``center``: covariance centring, ``"sequence"`` (the reference's), ``"global"`` or ``"none"``.
    - ``num_examples``: calibration examples; ``count_prompt_tokens``: whether tokens labelled -100 enter ``C``.
    - ``scaling``: ``"reference"`` gives ``γ_i = α_i / r`` with the base ``r`` (what the reference computes),
      ``"per_rank"`` gives ``γ_i = α_i / r_i``.
    - ``train_a``: train ``A`` too (the paper freezes it; the released code forgot to).
    - ``oversample``, ``power_iters``: randomized SVD settings for the basis.
    - ``per_example_scores``: sensitivity per example (batch size 1), as the reference, or per batch.
    """

    method: ClassVar[str] = "tlora"

    budget: Optional[int] = None
    min_rank: int = 1
    max_rank: Optional[int] = None
    multiple_of: int = 1
    center: str = "sequence"
    num_examples: int = 32
    count_prompt_tokens: bool = True
    scaling: str = "reference"
    train_a: bool = False
    oversample: int = 10
    power_iters: int = 4
    per_example_scores: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is not None:
            self._set("budget", _int(self.budget, "budget", minimum=1))
        self._set("min_rank", _int(self.min_rank, "min_rank", minimum=0))
        if self.max_rank is not None:
            max_rank = _int(self.max_rank, "max_rank", minimum=1)
            if max_rank < self.min_rank:
                raise ConfigError(f"max_rank ({max_rank}) must be at least min_rank ({self.min_rank})")
            self._set("max_rank", max_rank)
        self._set("multiple_of", _int(self.multiple_of, "multiple_of", minimum=1))
        self._set("center", _choice(self.center, "center", ("sequence", "global", "none")))
        self._set("num_examples", _int(self.num_examples, "num_examples", minimum=1))
        self._set("count_prompt_tokens", _bool(self.count_prompt_tokens, "count_prompt_tokens"))
        self._set("scaling", _choice(self.scaling, "scaling", ("reference", "per_rank")))
        self._set("train_a", _bool(self.train_a, "train_a"))
        self._set("oversample", _int(self.oversample, "oversample", minimum=0))
        self._set("power_iters", _int(self.power_iters, "power_iters", minimum=0))
        self._set("per_example_scores", _bool(self.per_example_scores, "per_example_scores"))


_CONFIGS: Dict[str, Type[LoraConfig]] = {LoraConfig.method: LoraConfig, TLoraConfig.method: TLoraConfig}


def config_from_dict(method: str, data: Mapping[str, Any]) -> LoraConfig:
    """The config of ``method`` (``"lora"``, ``"tlora"``, ``"loratrf"``, ...) from its ``to_dict`` form, as adapter
    files store it."""
    if method not in _CONFIGS:
        raise ConfigError(f"unknown adapter method {method!r}; known: {sorted(_CONFIGS)}")
    return _CONFIGS[method].from_dict(data)


@dataclasses.dataclass(frozen=True)
class TrfConfig(LoraConfig):
    """LoRATRF (METHODS.md §3): LoRA plus task-aware filters ``h ← h + clamp(cos(h, t), 0, 1) · h C D``.

    The LoRA part is this config's :class:`LoraConfig` fields. Three of them may stay ``None`` (the default) and are
    then filled in for the model's architecture family by :func:`lowrank_rs.attach` (``model.config.model_type``):

    - ``target_modules``: encoders (``bert``, ``roberta``, ``xlm-roberta``, ``electra``, ``deberta-v2``): the value
      projection and both FFN matrices of every layer — ``attention.self.value`` (``value_proj`` in DeBERTa-v2),
      ``intermediate.dense`` and the layer's ``output.dense`` (not the attention block's ``output.dense``), as a regex.
      Decoders (``llama``, ``mistral``, ``qwen2``, ``qwen3``): ``["o_proj", "up_proj", "down_proj"]`` — the paper's
      ``W_o, W_f1, W_f2``; ``gate_proj``, the third matrix of a SwiGLU FFN, is not adapted (list it to add it).
    - ``r``: 8 for encoders (on DeBERTaV3-base exactly 884,736 LoRA parameters, the paper's 0.88M), 32 for decoders,
      8 for other models.
    - ``alpha``: ``2 · r`` (γ = 2: this package's LoRA default 16 / 8, and the r = 32, α = 64 of the LLaMA recipe the
      paper compares with).

    Other models need ``target_modules``. The filter:

    - ``filter_rank``: ``r_f``, the rank of ``T = C D``. Each filter of width ``d`` adds ``d · (2 r_f + 1)``
      trainable parameters (``t``, ``C``, ``D``).
    - ``filter_site``: ``"layer_output"`` (default): one filter on the output hidden state of each selected
      transformer layer, ``d`` = hidden size. ``"linear_input"``: one on the input of each LoRA-adapted linear inside
      the selected layers, ``d`` = its ``in_features``; it stays when the LoRA part is merged.
    - ``filter_layers``: indices of the transformer layers that get filters; ``None`` (default) is every layer.
    - ``task_vector_init``: ``"normal"`` (default): ``t ~ N(0, I)``. ``"mean"``: ``t`` = the mean hidden state at
      the filter's site over the non-padding tokens of calibration batches, rescaled to norm ``√d`` (the expected
      norm of the normal init, so both inits move at the same rate under Adam); pass the batches as
      ``lowrank_rs.attach(model, config, batches=...)``.
    - ``layers_module``: name (or name suffix) of the ``nn.ModuleList`` holding the transformer layers; ``None``
      finds the one list of identical modules with ``model.config.num_hidden_layers`` entries.
    - ``tlora``: a :class:`TLoraConfig` for the LoRA part, which makes it TLoRA (task-aware frozen ``A``, ranks and
      scales from a calibration plan): ``lowrank_rs.attach(model, TrfConfig(...), plan=lr.calibrate(model, batches,
      tlora_config))``; ``attach`` sets it from the plan. LoRA fields left at their defaults take its values; any
      other value must equal its.

    ``init_seed`` seeds the filters' ``t`` and ``C`` too. After ``attach``, :func:`lowrank_rs.adapter_config` returns
    the config resolved for the model (targets, ``r``, ``alpha`` and ``filter_layers`` filled in), which is also what
    an adapter file records.
    """

    method: ClassVar[str] = "loratrf"

    target_modules: Optional[TargetSpec] = None  # type: ignore[assignment]
    r: Optional[int] = None  # type: ignore[assignment]
    alpha: Optional[float] = None  # type: ignore[assignment]
    filter_rank: int = 8
    filter_site: str = "layer_output"
    filter_layers: Optional[Sequence[int]] = None
    task_vector_init: str = "normal"
    layers_module: Optional[str] = None
    tlora: Optional[TLoraConfig] = None

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            self._set("target_modules", _target_spec(self.target_modules))
        if self.r is not None:
            self._set("r", _int(self.r, "r", minimum=1))
        if self.alpha is not None:
            self._set("alpha", _positive_float(self.alpha, "alpha"))
        self._check_lora_options()
        self._set("filter_rank", _int(self.filter_rank, "filter_rank", minimum=1))
        self._set("filter_site", _choice(self.filter_site, "filter_site", ("layer_output", "linear_input")))
        if self.filter_layers is not None:
            layers = self.filter_layers
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
                raise ConfigError(f"filter_layers must be a list of layer indices or null, not {layers!r}")
            indices = [_int(i, "filter_layers", minimum=0) for i in layers]
            if not indices:
                raise ConfigError("filter_layers must name at least one layer (null means every layer)")
            if len(set(indices)) != len(indices):
                raise ConfigError(f"filter_layers lists a layer twice: {indices}")
            self._set("filter_layers", tuple(sorted(indices)))
        self._set("task_vector_init", _choice(self.task_vector_init, "task_vector_init", ("normal", "mean")))
        if self.layers_module is not None and (not isinstance(self.layers_module, str) or not self.layers_module):
            raise ConfigError(f"layers_module must be a module name or null, not {self.layers_module!r}")
        if self.tlora is not None:
            self._take_lora_part(self.tlora)

    def _take_lora_part(self, tlora: Any) -> None:
        if isinstance(tlora, Mapping):
            tlora = TLoraConfig.from_dict(tlora)
        if not isinstance(tlora, TLoraConfig):
            raise ConfigError(f"tlora must be a TLoraConfig (or its dict), not {type(tlora).__name__}")
        self._set("tlora", tlora)
        lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
        for f in (f for f in dataclasses.fields(self) if f.name in lora_fields):
            mine, theirs = getattr(self, f.name), getattr(tlora, f.name)
            if mine == _field_default(f):
                self._set(f.name, theirs)
            elif mine != theirs:
                raise ConfigError(
                    f"{f.name}={mine!r} differs from the TLoRA part's {theirs!r}; the LoRA part follows tlora, so "
                    f"set {f.name} there (or leave it unset here)"
                )

    @property
    def resolved(self) -> bool:
        """Whether the per-model fields (targets, ``r``, ``alpha``, ``filter_layers``) are all set."""
        return None not in (self.target_modules, self.r, self.alpha, self.filter_layers)

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["tlora"] = None if self.tlora is None else self.tlora.to_dict()
        return out


_CONFIGS[TrfConfig.method] = TrfConfig


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _target_spec(value: Any) -> Union[str, Tuple[str, ...]]:
    if isinstance(value, str):
        if not value:
            raise ConfigError("target_modules must not be an empty regex")
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(
                f"target_modules is a string, so it is a regex, and {value!r} does not compile: {e}"
            ) from None
        return value
    names = _names(value, "target_modules")
    if not names:
        raise ConfigError("target_modules must name at least one module (a list of name suffixes or a regex string)")
    return names


def _names(value: Any, name: str) -> Tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{name} must be a list of module names, not {type(value).__name__} {value!r}")
    out = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{name} must hold non-empty strings, got {item!r}")
        out.append(item)
    if len(set(out)) != len(out):
        raise ConfigError(f"{name} lists a name twice: {out}")
    return tuple(out)


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, not {type(value).__name__} {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, not {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    return value


def _positive_float(value: Any, name: str) -> float:
    value = _float(value, name)
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, not {type(value).__name__} {value!r}")
    return value


def _choice(value: Any, name: str, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


# --- TA-LoRA --------------------------------------------------------------------------------------------------------

_TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclasses.dataclass(frozen=True)
class TaLoraConfig(JsonConfig):
    """TA-LoRA (METHODS.md §4): multi-task low-rank prompts with shared slow and per-task fast weights.

    - ``tasks``: the task names, in task-id order (letters, digits, ``_`` and ``-``: they become tensor names).
    - ``layers``: indices of the transformer layers that get a prompt (negative counts from the end); ``None`` means
      the last half, ``range(n // 2, n)`` of ``n`` layers (the paper adapts 14 of Qwen2.5-7B's 28).
    - ``prompt_length``: ``L_p``, prompt tokens per layer; ``r``: the rank of the shared ``B: [L_p, r]``.
    - ``orthogonality_weight``: ``λ`` of the training loss's ``λ Σ_{i≠j} ‖A_iᵀ A_j‖²_F`` (summed over layers).
    - ``slow_lr``: learning rate of the shared ``θ0``, ``B`` and the gates; ``fast_lr``: of the tasks' ``u_i, v_i``.
      :func:`lowrank_rs.train` schedules both like ``TrainConfig.lr``, which applies to any other trainable
      parameter (``modules_to_save``).
    - ``prompt_init_std``: ``θ0 ~ N(0, prompt_init_std²)``, on the scale of the normalised hidden states that the key
      and value projections read.
    - ``modules_to_save``: modules trained in full and saved whole (a classifier head), matched like LoRA's.
    - ``init_seed``: seeds the initial ``θ0``, ``B`` and ``u_i`` per layer; ``None`` uses torch's global RNG.
    """

    method: ClassVar[str] = "talora"

    tasks: Sequence[str]
    layers: Optional[Sequence[int]] = None
    prompt_length: int = 10
    r: int = 4
    orthogonality_weight: float = 1e-3
    slow_lr: float = 5e-3
    fast_lr: float = 5e-2
    prompt_init_std: float = 1.0
    modules_to_save: Sequence[str] = ()
    init_seed: Optional[int] = None

    def __post_init__(self) -> None:
        self._set("tasks", _task_names(self.tasks, "tasks"))
        if not self.tasks:
            raise ConfigError("tasks must name at least one task")
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
                raise ConfigError(f"layers must be a non-empty list of layer indices or null, not {layers!r}")
            layers = tuple(_int(i, "layers", minimum=-(2**31)) for i in layers)
            if len(set(layers)) != len(layers):
                raise ConfigError(f"layers lists an index twice: {list(layers)}")
            self._set("layers", layers)
        self._set("prompt_length", _int(self.prompt_length, "prompt_length", minimum=1))
        self._set("r", _int(self.r, "r", minimum=1))
        weight = _float(self.orthogonality_weight, "orthogonality_weight")
        if weight < 0:
            raise ConfigError(f"orthogonality_weight must be at least 0, got {weight}")
        self._set("orthogonality_weight", weight)
        self._set("slow_lr", _positive_float(self.slow_lr, "slow_lr"))
        self._set("fast_lr", _positive_float(self.fast_lr, "fast_lr"))
        self._set("prompt_init_std", _positive_float(self.prompt_init_std, "prompt_init_std"))
        self._set("modules_to_save", _names(self.modules_to_save, "modules_to_save"))
        if self.init_seed is not None:
            self._set("init_seed", _int(self.init_seed, "init_seed", minimum=0))


def _task_names(value: Any, name: str) -> Tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{name} must be a list of task names, not {type(value).__name__} {value!r}")
    for item in value:
        if not isinstance(item, str) or not _TASK_NAME.fullmatch(item):
            raise ConfigError(f"{name}: task name {item!r} must be a non-empty string of letters, digits, '_' and '-'")
    if len(set(value)) != len(value):
        raise ConfigError(f"{name} lists a task twice: {list(value)}")
    return tuple(value)
