"""Fixtures shared by the cross-package tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU generator, so that each test draws its own fresh but reproducible inputs."""
    return torch.Generator().manual_seed(20261122)
