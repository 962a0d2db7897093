"""Test helpers of moeut: the tiny LM most tests build (a fixture, as ``--import-mode=importlib``
makes test modules unable to import each other)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from moeut import MoEUTLM

from testing_support import TINY_MOEUT, TINY_VOCAB


def tiny_lm(**kw) -> MoEUTLM:
    """A 4-layer MoEUT LM over 40 tokens, small enough for CPU; seeded, so every call builds the
    same weights. Keyword arguments override the sizes (and any other ``MoEUTLM`` argument)."""
    torch.manual_seed(0)
    args = dict(n_tokens=TINY_VOCAB, **TINY_MOEUT)
    args.update(kw)
    return MoEUTLM(**args)


@pytest.fixture(name="tiny_lm")
def tiny_lm_fixture() -> Callable[..., MoEUTLM]:
    return tiny_lm
