"""Whether Triton runs this package's kernels on the CPU (``TRITON_INTERPRET=1``): the one check
every module that chooses launch settings or backends consults."""

from __future__ import annotations

import os

# ``os.environ``'s own storage and the encoded key and value (CPython's ``os._Environ``), read
# with one dict lookup: ``os.environ.get`` costs several Python calls, and an eager MoEUT
# training step asks about a thousand times (moeut's benchmarks/results/step_counts_after.md).
_STORE = getattr(os.environ, "_data", None)
try:
    _KEY, _ONE = os.environ.encodekey("TRITON_INTERPRET"), os.environ.encodevalue("1")
except AttributeError:  # another os.environ: the plain lookup
    _STORE = None


def interpreting() -> bool:
    """``TRITON_INTERPRET=1`` is set: Triton kernels take CPU tensors and run in the interpreter
    (read at call time, like the rest of the backend choice)."""
    if _STORE is not None:
        return _STORE.get(_KEY) == _ONE
    return os.environ.get("TRITON_INTERPRET") == "1"
