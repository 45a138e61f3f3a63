"""Seeded initialisation that does not depend on what else a model has."""

from __future__ import annotations

import hashlib
from typing import Optional

import torch

__all__ = ["generator_for"]


def generator_for(seed: Optional[int], name: str) -> Optional[torch.Generator]:
    # One stream per module, so a module's initial A depends on the seed and its name only, not on which other
    # modules were adapted, given an init_a, or had their rank changed.
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
