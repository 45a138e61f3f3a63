"""The attachment record: what ``attach`` (or ``load_adapter``) leaves on a model, and the one place it is kept."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

from torch import nn

from ..errors import AdapterStateError

__all__ = ["Attachment", "attachment_of", "clear_attachment", "record_attachment", "require_attachment"]

_ATTRIBUTE = "_lowrank_rs_attachment"


@dataclasses.dataclass
class Attachment:
    """Which method adapted a model and how.

    - ``method``: the registered method's name (``"lora"``, ``"tlora"``, ...).
    - ``config``: the config resolved for this model (targets, ranks or layers filled in); a method may replace it
      as the adapter grows (TA-LoRA's ``add_task``).
    - ``modules_to_save``: full names of the modules trained and saved whole.
    """

    method: str
    config: Any
    modules_to_save: Tuple[str, ...] = ()


def attachment_of(model: nn.Module) -> Optional[Attachment]:
    """The model's record, or ``None`` for a model without adapter."""
    record = getattr(model, _ATTRIBUTE, None)
    return record if isinstance(record, Attachment) else None


def require_attachment(model: nn.Module) -> Attachment:
    record = attachment_of(model)
    if record is None:
        raise AdapterStateError("the model has no adapter attached by lowrank_rs.attach (or load_adapter)")
    return record


def record_attachment(model: nn.Module, record: Attachment) -> None:
    # object.__setattr__ keeps the record out of nn.Module's registries (it is not a parameter, buffer or module).
    object.__setattr__(model, _ATTRIBUTE, record)


def clear_attachment(model: nn.Module) -> None:
    if hasattr(model, _ATTRIBUTE):
        object.__delattr__(model, _ATTRIBUTE)
