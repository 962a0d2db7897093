"""Shared test setup of colt5-routing: a fixed seed per test, so module init is reproducible."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
