"""The LoRA config (docs/methods.md)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional, Sequence

from ...config import JsonConfig, TargetSpec, alpha_field, bool_field, float_field, int_field, name_list, target_spec
from ...errors import ConfigError

__all__ = ["LoraConfig"]


@dataclasses.dataclass(frozen=True)
class LoraConfig(JsonConfig):
    """Plain LoRA (docs/methods.md): ``y = W0 x + γ B A x`` on every target ``nn.Linear``.

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
        self._set("target_modules", target_spec(self.target_modules))
        self._set("r", int_field(self.r, "r", minimum=1))
        self._set("alpha", alpha_field(self.alpha, "alpha"))
        self._check_lora_options()

    def _check_lora_options(self) -> None:
        # Every LoRA field but targets, r and alpha, which TrfConfig may leave unset until it sees the model.
        self._set("use_rslora", bool_field(self.use_rslora, "use_rslora"))
        dropout = float_field(self.dropout, "dropout")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {dropout}")
        self._set("dropout", dropout)
        self._set("modules_to_save", name_list(self.modules_to_save, "modules_to_save"))
        if self.bias != "none":
            raise ConfigError(
                f"bias must be 'none' (adapters never train the base layer's bias), got {self.bias!r}; "
                "to train a bias, list its module in modules_to_save"
            )
        if self.init_seed is not None:
            self._set("init_seed", int_field(self.init_seed, "init_seed", minimum=0))

    def scaling_for(self, rank: int) -> float:
        """γ for a module of ``rank``, computed with PEFT's expression so the two agree bit for bit."""
        return self.alpha / math.sqrt(rank) if self.use_rslora else self.alpha / rank
