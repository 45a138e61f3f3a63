"""The adapter methods, one package each. Importing this package registers them all.

Adding a method is a new package here plus one line below. Order matters only where methods share a module type:
a method that takes over some of another's modules in an export (LoRATRF's filtered LoRA layers, DoRA's LoRA-layer
subclass) comes after it, because export hooks are asked latest-registered first.
"""

# isort: off
from . import lora  # noqa: F401  (each import registers its method)
from . import tlora  # noqa: F401
from . import loratrf  # noqa: F401
from . import talora  # noqa: F401
from . import dora  # noqa: F401
# isort: on
