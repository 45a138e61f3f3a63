"""The LoRATRF config (docs/methods.md): a LoRA (or TLoRA) part plus the task-aware filters."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence

from ...config import TargetSpec, alpha_field, choice, field_default, int_field, target_spec
from ...errors import ConfigError
from ..lora.config import LoraConfig
from ..tlora.config import TLoraConfig

__all__ = ["TrfConfig"]


@dataclasses.dataclass(frozen=True)
class TrfConfig(LoraConfig):
    """LoRATRF (docs/methods.md): LoRA plus task-aware filters ``h ← h + clamp(cos(h, t), 0, 1) · h C D``.

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
            self._set("target_modules", target_spec(self.target_modules))
        if self.r is not None:
            self._set("r", int_field(self.r, "r", minimum=1))
        if self.alpha is not None:
            self._set("alpha", alpha_field(self.alpha, "alpha"))
        self._check_lora_options()
        self._set("filter_rank", int_field(self.filter_rank, "filter_rank", minimum=1))
        self._set("filter_site", choice(self.filter_site, "filter_site", ("layer_output", "linear_input")))
        if self.filter_layers is not None:
            layers = self.filter_layers
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
                raise ConfigError(f"filter_layers must be a list of layer indices or null, not {layers!r}")
            indices = [int_field(i, "filter_layers", minimum=0) for i in layers]
            if not indices:
                raise ConfigError("filter_layers must name at least one layer (null means every layer)")
            if len(set(indices)) != len(indices):
                raise ConfigError(f"filter_layers lists a layer twice: {indices}")
            self._set("filter_layers", tuple(sorted(indices)))
        self._set("task_vector_init", choice(self.task_vector_init, "task_vector_init", ("normal", "mean")))
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
            if mine == field_default(f):
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
