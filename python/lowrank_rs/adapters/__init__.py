"""Generic adapter machinery: the :class:`Method` interface and its one registry, the attachment record, target
matching, PEFT's file conventions, seeding, task ids, and the public calls that dispatch through the registry.

Nothing here names a method; the methods (``lowrank_rs.methods``) build on this package.
"""

from .api import (
    adapter_config,
    adapter_state,
    attach,
    load_adapter,
    merge,
    save_adapter,
    trainable_parameters,
    unmerge,
)
from .method import Method, TrainingHooks
from .recipe import Prepared, Settings
from .record import Attachment, attachment_of
from .registry import config_from_dict, method_for, method_named, method_of, methods, register

__all__ = [
    "Attachment",
    "Method",
    "Prepared",
    "Settings",
    "TrainingHooks",
    "adapter_config",
    "adapter_state",
    "attach",
    "attachment_of",
    "config_from_dict",
    "load_adapter",
    "merge",
    "method_for",
    "method_named",
    "method_of",
    "methods",
    "register",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
]
