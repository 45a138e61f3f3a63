"""The TA-LoRA config (docs/methods.md)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Sequence

from ...adapters.tasks import task_names
from ...config import JsonConfig, float_field, int_field, name_list, positive_float
from ...errors import ConfigError

__all__ = ["PEFT_TYPE", "TaLoraConfig"]

# PEFT has no TA-LoRA, so its files carry a peft_type of their own, which PEFT refuses.
PEFT_TYPE = "LOWRANK_RS_TA_LORA"


@dataclasses.dataclass(frozen=True)
class TaLoraConfig(JsonConfig):
    """TA-LoRA (docs/methods.md): multi-task low-rank prompts with shared slow and per-task fast weights.

    - ``tasks``: the task name_list, in task-id order (letters, digits, ``_`` and ``-``: they become tensor names).
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
        self._set("tasks", task_names(self.tasks, "tasks"))
        if not self.tasks:
            raise ConfigError("tasks must name at least one task")
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
                raise ConfigError(f"layers must be a non-empty list of layer indices or null, not {layers!r}")
            layers = tuple(int_field(i, "layers", minimum=-(2**31)) for i in layers)
            if len(set(layers)) != len(layers):
                raise ConfigError(f"layers lists an index twice: {list(layers)}")
            self._set("layers", layers)
        self._set("prompt_length", int_field(self.prompt_length, "prompt_length", minimum=1))
        self._set("r", int_field(self.r, "r", minimum=1))
        weight = float_field(self.orthogonality_weight, "orthogonality_weight")
        if weight < 0:
            raise ConfigError(f"orthogonality_weight must be at least 0, got {weight}")
        self._set("orthogonality_weight", weight)
        self._set("slow_lr", positive_float(self.slow_lr, "slow_lr"))
        self._set("fast_lr", positive_float(self.fast_lr, "fast_lr"))
        self._set("prompt_init_std", positive_float(self.prompt_init_std, "prompt_init_std"))
        self._set("modules_to_save", name_list(self.modules_to_save, "modules_to_save"))
        if self.init_seed is not None:
            self._set("init_seed", int_field(self.init_seed, "init_seed", minimum=0))
