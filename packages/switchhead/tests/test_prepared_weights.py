"""The fused projection matrices kept per weight version (``switchhead.prepared_weights``): the
same matrix and parameter gradients as laying them out with autograd ops on every call, rebuilt
after an in-place update, in autocast's dtype under autocast, and correct for a layer applied
several times in one graph (MoEUT's shared layers)."""

from __future__ import annotations

import pytest
import torch
from switchhead import SwitchHeadRope
from switchhead.prepared_weights import prepared_matrix

CASES = [  # (n_experts, d_head, expert_impl): padded and unpadded heads, both expert paths
    (4, 10, "dense"),
    (4, 16, "dense"),
    (1, 10, "dense"),
    (5, 12, "cvmm"),
]


def _layer(n_experts, d_head, expert_impl):
    torch.manual_seed(n_experts * 100 + d_head)
    layer = SwitchHeadRope(32, 2, n_experts, d_head=d_head, moe_k=2 if n_experts > 1 else 1,
                           expert_impl=expert_impl).double()  # fmt: skip
    return layer


def _plain(blocks):
    """The matrix laid out with autograd ops (what a compiled trace does)."""
    first = next(b.param for b in blocks if b.param is not None)
    return torch.cat(
        [
            b.layout(b.param) if b.param is not None else first.new_zeros(b.rows, first.shape[-1])
            for b in blocks
        ]
    )


def _blocks(layer, name):
    sels = [layer.sel_o, layer.sel_v] if layer.n_experts > 1 else [layer.sel_o]
    if name == "o":
        return [layer._o_block()]
    from switchhead.prepared_weights import Block

    ident = lambda x: x
    blocks = [layer._head_block(layer.q.weight), layer._head_block(layer.k.weight)]
    blocks += [layer._v_block()] if layer.experts.fuses_values else []
    blocks += [Block(w, w.shape[0], ident, ident) for w in sels] + [Block(None, 3, ident, ident)]
    return blocks


@pytest.mark.parametrize(("n_experts", "d_head", "expert_impl"), CASES)
@pytest.mark.parametrize("name", ["in", "o"])
def test_matrix_and_gradients_match_the_plain_layout(n_experts, d_head, expert_impl, name):
    layer = _layer(n_experts, d_head, expert_impl)
    blocks = _blocks(layer, name)
    params = [b.param for b in blocks if b.param is not None]
    plain = _plain(blocks)
    kept = prepared_matrix({}, name, blocks)
    assert torch.equal(kept, plain)
    grad = torch.randn_like(plain)
    expected = torch.autograd.grad(plain, params, grad)
    got = torch.autograd.grad(kept, params, grad)
    for g, e, p in zip(got, expected, params, strict=True):
        assert g.shape == p.shape and g.dtype == p.dtype
        assert torch.equal(g, e)


def test_kept_until_the_weights_change_and_summed_over_uses(monkeypatch):
    """One matrix per weight version (an in-place update makes a new one); a layer applied
    twice gets the sum of both uses' gradients, as with the plain layout."""
    layer = _layer(4, 10, "dense")
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    w1 = layer._input_rows([layer.sel_o, layer.sel_v], True, 0)
    w2 = layer._input_rows([layer.sel_o, layer.sel_v], True, 0)
    assert w1.data_ptr() == w2.data_ptr()  # the same kept matrix
    out = layer(x, x, x)[0]
    out = layer(out, out, out)[0]  # applied twice in one graph
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    # the plain layout: what torch.compile's trace uses (patched so for the comparison)
    layer._prepared.clear()
    import switchhead.attention as attention

    monkeypatch.setattr(attention, "prepared_matrix", lambda cache, name, blocks: _plain(blocks))
    out = layer(x, x, x)[0]
    out = layer(out, out, out)[0]
    out.square().sum().backward()
    monkeypatch.undo()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        layer.q.weight.mul_(2.0)  # an optimizer step: in place, a new version
    w3 = layer._input_rows([layer.sel_o, layer.sel_v], True, 0)
    assert w3.data_ptr() != w1.data_ptr()
    torch.testing.assert_close(w3[:20], 2 * w1.detach()[:20])  # q's padded rows, doubled


def test_autocast_dtype_and_no_grad():
    layer = _layer(4, 16, "dense").float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = layer._o_cols()
    assert w.dtype == torch.bfloat16 and w.requires_grad
    with torch.no_grad():
        assert layer._o_cols().grad_fn is None
    layer = _layer(4, 10, "dense")  # float64: autocast leaves it alone, and so does the matrix
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(1, 3, 32, dtype=torch.float64)
        assert layer(x, x, x)[0].dtype == torch.float64
