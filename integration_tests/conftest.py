"""Fixtures shared by the cross-package tests."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[1] / "examples" / "train_lm.py"

# FSDP2 (fully_shard) runs on CPU process groups from torch 2.6 ("FSDP requires CUDA for
# streams" on 2.5); the CPU tests of it skip on older torch.
CPU_FSDP = torch.__version__ >= (2, 6)


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU generator, so that each test draws its own fresh but reproducible inputs."""
    return torch.Generator().manual_seed(20261122)


def load_demo(name: str = "train_lm_demo"):
    """``examples/train_lm.py`` loaded as a module named ``name`` (it imports its helpers, the
    ``lm_demo`` package of the ``lm-demo-examples`` workspace member, as installed). Spawned test
    workers import it as ``integration_tests.conftest.load_demo``."""
    spec = importlib.util.spec_from_file_location(name, DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A free local TCP port for a process group of spawned test workers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo():
    """``examples/train_lm.py`` loaded once per test module (see :func:`load_demo`)."""
    return load_demo()


@pytest.fixture
def one_thread():
    """Tiny CPU runs are faster on one thread, much faster on a busy machine (no spinning
    OpenMP workers); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
