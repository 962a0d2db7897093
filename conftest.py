"""Workspace-wide pytest setup: the ``gpu`` and ``interpret`` markers.

- ``gpu`` tests skip cleanly when CUDA is not available.
- ``interpret`` tests run Triton kernels on CPU tensors. They skip unless ``TRITON_INTERPRET=1``
  was in the environment before Triton was first imported (this file is loaded before any test
  module, so reading the variable here is what Triton will see).
"""

from __future__ import annotations

import os

import pytest
import torch

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interpret = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 set before triton import")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords and not TRITON_INTERPRET:
            item.add_marker(skip_interpret)
