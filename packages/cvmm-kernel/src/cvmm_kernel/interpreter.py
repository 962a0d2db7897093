"""Whether Triton runs this package's kernels on the CPU (``TRITON_INTERPRET=1``): the one check
every module that chooses launch settings or backends consults."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """``TRITON_INTERPRET=1`` is set: Triton kernels take CPU tensors and run in the interpreter
    (read at call time, like the rest of the backend choice)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
