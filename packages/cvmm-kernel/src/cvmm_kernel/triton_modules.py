"""This package's Triton modules, imported at their first use and kept.

They import Triton, which a CPU-only install may lack, so the modules that dispatch to them
import them inside functions. An import statement there costs host time at every call (about a
microsecond: the package lookup and ``_handle_fromlist`` in Python), and an eager MoEUT training
step made about 900 of them; :func:`triton_module` costs one cached call. Not for functions
that ``torch.compile`` traces (Dynamo does not trace ``importlib``): the custom ops' bodies and
the eager path only.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def triton_module(name: str) -> ModuleType:
    """``cvmm_kernel.<name>`` (e.g. ``"moe_triton"``), imported at the first call."""
    return importlib.import_module(f"{__package__}.{name}")
