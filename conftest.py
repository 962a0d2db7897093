"""Workspace-wide pytest setup: the ``gpu`` and ``interpret`` markers, the test helpers' path.

- ``gpu`` tests skip cleanly when CUDA is not available.
- ``interpret`` tests run Triton kernels on CPU tensors. They skip unless ``TRITON_INTERPRET=1``
  was in the environment before Triton was first imported (this file is loaded before any test
  module, so reading the variable here is what Triton will see).
- ``testing_support`` (next to this file: relative error, the tolerance table, backend parameter
  sets) is importable from every test: this directory goes on ``sys.path`` here, because
  ``--import-mode=importlib`` puts nothing there.
- Hypothesis profile ``derandomized`` (what the nox sessions load, through
  ``HYPOTHESIS_PROFILE``): every run draws the same examples, so a CI result is reproducible and
  no fresh random draw turns it red; plain ``pytest`` keeps drawing new ones.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

settings.register_profile("derandomized", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_ROOT = str(Path(__file__).resolve().parent)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)  # for ``import testing_support``; appended, so it shadows nothing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interpret = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 set before triton import")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords and not TRITON_INTERPRET:
            item.add_marker(skip_interpret)
