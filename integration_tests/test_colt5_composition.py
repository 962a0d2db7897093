"""CoLT5 routing composed with the other packages.

- softmax_n as the heavy-attention core of the CoLT5 attention blocks, against ``slow_attention_n``
  (same module weights, only the ``attention_fn`` hook swapped), outputs and gradients, float64.
- The CoLT5 router on its own choosing which tokens a SwitchHead attention processes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from colt5_routing import (
    ConditionalRoutedAttention,
    ConditionalRoutedAutoregressiveAttention,
    CoordinateDescentRouter,
)
from softmax_n import softmax_n_attention_fn
from switchhead import SwitchHeadRope

# float64 on both sides: the fused path computes out0 * sigmoid(lse - log n) while the reference
# normalises explicitly, so they differ by rounding only (~1e-15 relative); 1e-9 leaves room for
# the reductions over a few dozen terms and still fails on any real difference (softmax_n versus
# softmax changes the outputs at the 1e-2 level here, asserted below).
RTOL, ATOL = 1e-9, 1e-11


def _routed_attention() -> torch.nn.Module:
    return ConditionalRoutedAttention(
        16,
        num_heavy_tokens_q=5,
        num_heavy_tokens_kv=6,
        num_routed_kv=2,
        light_dim_head=4,
        light_heads=2,
        light_window_size=4,
        heavy_dim_head=4,
        heavy_heads=4,
        backend="reference",
    )


def _autoregressive_attention() -> torch.nn.Module:
    return ConditionalRoutedAutoregressiveAttention(
        16,
        num_heavy_tokens_q=3,
        num_heavy_tokens_kv=5,
        num_routed_kv=2,
        light_dim_head=4,
        light_heads=2,
        light_window_size=4,
        heavy_window_size=4,
        heavy_dim_head=4,
        heavy_heads=4,
        backend="reference",
    )


def _with_core(module: torch.nn.Module, core) -> torch.nn.Module:
    """A deep copy of ``module`` (same weights) whose heavy attention uses ``core``."""
    clone = copy.deepcopy(module)
    clone.heavy_attn.attention_fn = core
    return clone


def _run(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor, **kwargs):
    """Output and gradients (input first, then parameters by name) of ``sum(out * weight)``."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x, **kwargs)
    (out * weight).sum().backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


@pytest.mark.parametrize(
    "make", [_routed_attention, _autoregressive_attention], ids=["routed", "autoregressive"]
)
# n as a Python float and as a float64 tensor. (A float n other than 1 loses precision in
# float64: flash_attention_n builds log n as a float32 scalar, ~1e-8 relative; see the report.)
@pytest.mark.parametrize("n", [1.0, 3.0], ids=["float-1", "tensor-3"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_colt5_heavy_attention_with_softmax_n(make, n, padded, generator):
    torch.manual_seed(0)
    if n != 1.0:
        n = torch.tensor(n, dtype=torch.float64)
    base = make().double()
    b, t, d = 2, 11, 16  # 11 is not a multiple of the windows: padding paths are exercised
    x = torch.randn(b, t, d, dtype=torch.float64, generator=generator)
    weight = torch.randn(b, t, d, dtype=torch.float64, generator=generator)
    kwargs = {}
    if padded:
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[1, 7:] = False  # True = real token
        kwargs["mask"] = mask

    fast = _with_core(base, softmax_n_attention_fn(n))
    slow = _with_core(base, softmax_n_attention_fn(n, backend="reference"))
    plain = _with_core(base, F.scaled_dot_product_attention)
    out_fast, grads_fast = _run(fast, x, weight, **kwargs)
    out_slow, grads_slow = _run(slow, x, weight, **kwargs)
    out_plain, _ = _run(plain, x, weight, **kwargs)

    assert out_fast.shape == (b, t, d)
    torch.testing.assert_close(out_fast, out_slow, rtol=RTOL, atol=ATOL)
    assert grads_fast.keys() == grads_slow.keys()
    for name, g in grads_fast.items():
        if grads_slow[name] is None:  # e.g. a null token never used by this routing
            assert g is None, name
            continue
        torch.testing.assert_close(g, grads_slow[name], rtol=RTOL, atol=ATOL, msg=name)
    # the hook is really used: the heavy branch with n > 0 is not the softmax one
    assert (out_fast - out_plain).abs().max() > 1e-3
    # and the heavy attention's weights receive a gradient through the softmax_n core
    assert grads_fast["heavy_attn.to_q.weight"].abs().sum() > 0


def test_autoregressive_block_with_softmax_n_stays_causal(generator):
    """With every query of a heavy window routed, the block is causal token by token, also with
    softmax_n in the heavy branch: changing the last token leaves all earlier outputs alone."""
    torch.manual_seed(0)
    module = ConditionalRoutedAutoregressiveAttention(
        16,
        num_heavy_tokens_q=4,
        num_heavy_tokens_kv=5,
        light_dim_head=4,
        light_heads=2,
        light_window_size=4,
        heavy_window_size=4,
        heavy_dim_head=4,
        heavy_heads=4,
        backend="reference",
        attention_fn=softmax_n_attention_fn(1.0),
    ).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64, generator=generator)
    changed = x.clone()
    changed[:, -1] += torch.randn(16, dtype=torch.float64, generator=generator)
    out, out_changed = module(x), module(changed)
    torch.testing.assert_close(out[:, :-1], out_changed[:, :-1], rtol=0, atol=1e-12)
    assert (out[:, -1] - out_changed[:, -1]).abs().max() > 1e-6


class RoutedSwitchHead(torch.nn.Module):
    """The CoLT5 router picks ``num_tokens`` tokens of each sequence; SwitchHead attends among
    them (in sequence order, causally); its output is scaled by the router score and added to
    the routed positions. Other positions pass through unchanged."""

    def __init__(self, d_model: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.router = CoordinateDescentRouter(d_model, backend="reference")
        self.attention = SwitchHeadRope(d_model, 2, 4, d_head=8, moe_k=2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        indices, scores, _, _ = self.router(x, num_tokens=self.num_tokens, mask=mask)
        order = indices.argsort(dim=-1)  # keep the sequence order for causal attention + RoPE
        indices, scores = indices.gather(-1, order), scores.gather(-1, order)
        routed = x.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        heavy, _ = self.attention(routed, routed, routed)
        heavy = heavy * scores.unsqueeze(-1)
        index = indices.unsqueeze(-1).expand_as(heavy)
        return x.scatter_add(1, index, heavy), indices, scores


def test_router_selects_tokens_for_switchhead(generator):
    torch.manual_seed(0)
    b, t, d, k = 3, 20, 32, 6
    model = RoutedSwitchHead(d, k).double()
    x = torch.randn(b, t, d, dtype=torch.float64, generator=generator, requires_grad=True)
    out, indices, scores = model(x)

    assert out.shape == (b, t, d)
    assert indices.shape == scores.shape == (b, k)
    for row in indices:
        assert row.unique().numel() == k  # k distinct positions per sequence
    routed = torch.zeros(b, t, dtype=torch.bool)
    routed.scatter_(1, indices, True)
    # unrouted positions are the input, exactly; routed ones got the attention output
    assert torch.equal(out[~routed], x[~routed])
    assert ((out - x)[routed].abs().amax(-1) > 0).all()
    # the router picks the tokens with the highest routing scores
    raw = x.detach() @ model.router.routing_token.detach()[0]
    expected = raw.topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(indices.sort(-1).values, expected)
    # routed outputs are SwitchHead on the routed tokens (in sequence order), times the scores
    rows = torch.arange(b)[:, None]
    picked = x[rows, indices]
    direct, _ = model.attention(picked, picked, picked)
    torch.testing.assert_close(
        out[rows, indices] - picked,
        direct * scores.unsqueeze(-1),
        rtol=1e-12,
        atol=1e-12,
    )

    weight = torch.randn(b, t, d, dtype=torch.float64, generator=generator)
    (out * weight).sum().backward()
    assert model.router.routing_token.grad is not None
    assert model.router.routing_token.grad.abs().sum() > 0
    for name, p in model.attention.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_router_with_padding_never_routes_padding(generator):
    torch.manual_seed(0)
    b, t, d, k = 2, 12, 32, 4
    model = RoutedSwitchHead(d, k).double()
    x = torch.randn(b, t, d, dtype=torch.float64, generator=generator)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 3:] = False  # the second sequence has only 3 real tokens (< k)
    out, indices, scores = model(x, mask=mask)
    picked_real = mask.gather(1, indices)
    assert picked_real[0].all()
    assert picked_real[1].sum() == 3
    assert (scores[~picked_real] == 0).all()  # padding picks carry no weight
    torch.testing.assert_close(out[~mask], x[~mask], rtol=0, atol=0)
