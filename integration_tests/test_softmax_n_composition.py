"""softmax_n as the attention core of SwitchHead and MoEUT, against slow_attention_n (the hook's
``backend="reference"``)."""

from __future__ import annotations

import functools

import pytest
import torch
from moeut import MoEUTLM
from softmax_n import softmax_n_attention_fn
from switchhead import AttentionMask, SwitchHeadRope, SwitchHeadXL


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
@pytest.mark.parametrize("mask", [None, AttentionMask()])
def test_switchhead_with_softmax_n(cls, mask):
    make = functools.partial(cls, 32, 2, 4, d_head=8)
    torch.manual_seed(0)
    fast = make(attention_fn=softmax_n_attention_fn(1.0)).double()
    torch.manual_seed(0)
    slow = make(attention_fn=softmax_n_attention_fn(1.0, backend="reference")).double()
    torch.manual_seed(0)
    plain = make().double()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    out_fast = fast(x, x, x, mask=mask)[0]
    torch.testing.assert_close(out_fast, slow(x, x, x, mask=mask)[0], rtol=1e-6, atol=1e-8)
    assert not torch.allclose(out_fast, plain(x, x, x, mask=mask)[0])  # n = 1 changes it


def test_moeut_with_softmax_n():
    kw = dict(
        n_tokens=30,
        d_model=32,
        n_layers=2,
        n_heads=2,
        ff_n_experts=4,
        att_n_experts=2,
        d_head=8,
        ff_k=2,
        ff_expert_size=8,
    )
    torch.manual_seed(0)
    fast = MoEUTLM(**kw, attention_fn=softmax_n_attention_fn(0.5)).double().eval()
    torch.manual_seed(0)
    slow = (
        MoEUTLM(**kw, attention_fn=softmax_n_attention_fn(0.5, backend="reference")).double().eval()
    )
    x = torch.randint(0, 30, (2, 7))
    torch.testing.assert_close(fast(x).outputs, slow(x).outputs, rtol=1e-6, atol=1e-8)
