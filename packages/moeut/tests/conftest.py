"""Test helpers of moeut: the tiny LM most tests build (a fixture, as ``--import-mode=importlib``
makes test modules unable to import each other)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from moeut import MoEUTLM


def tiny_lm(**kw) -> MoEUTLM:
    """A 4-layer MoEUT LM over 40 tokens, small enough for CPU; seeded, so every call builds the
    same weights. Keyword arguments override the sizes (and any other ``MoEUTLM`` argument)."""
    torch.manual_seed(0)
    args = dict(
        n_tokens=40,
        d_model=32,
        n_layers=4,
        n_heads=2,
        ff_n_experts=8,
        att_n_experts=4,
        d_head=8,
        ff_k=2,
        ff_expert_size=16,
    )
    args.update(kw)
    return MoEUTLM(**args)


@pytest.fixture(name="tiny_lm")
def tiny_lm_fixture() -> Callable[..., MoEUTLM]:
    return tiny_lm
