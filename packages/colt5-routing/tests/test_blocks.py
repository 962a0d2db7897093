"""Router and routed blocks: shapes, masks, gradients, causality, ViT."""

from __future__ import annotations

import pytest
import torch
from colt5_routing import (
    Attention,
    ConditionalRoutedAttention,
    ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedCrossAttention,
    ConditionalRoutedFeedForward,
    ConditionalRoutedImageAttention,
    ConditionalRoutedTransformerBlock,
    ConditionalRoutedViT,
    CoordinateDescentRouter,
    local_attention,
)

D = 16
SMALL = dict(light_dim_head=8, light_heads=2, heavy_dim_head=8, heavy_heads=2)
SOFT = dict(
    eps=1.0, eps_init=2.0, eps_decay=0.9, n_iters=10, fetch_k_ratio=1.0
)  # unsaturated: visible gradients


def _x(b=2, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, D, generator=g, requires_grad=True)


def _mask(b=2, n=24):
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, n // 2 :] = False
    return mask


def _grads_reach(module, *routers):
    for router in routers:
        g = router.routing_token.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_router_selects_top_scoring_tokens_and_masks():
    torch.manual_seed(0)
    router = CoordinateDescentRouter(D, n_iters=30)
    x = torch.randn(2, 20, D)
    mask = _mask(2, 20)
    ret = router(x, num_tokens=4, mask=mask)
    assert ret.indices.shape == (2, 4) and ret.routed_tokens.shape == (2, 4, D)
    scores = x @ router.routing_token[0]
    for b in range(2):
        s = scores[b].masked_fill(~mask[b], float("-inf"))
        assert set(ret.indices[b].tolist()) == set(s.topk(4).indices.tolist())
    torch.testing.assert_close(ret.routed_tokens, x[torch.arange(2)[:, None], ret.indices])
    assert ret.routed_mask.all()


def test_router_multiple_tokens_blocks_and_padding():
    router = CoordinateDescentRouter(D, num_routing_tokens=3, route_block_size=8)
    x = torch.randn(2, 21, D)  # 3 blocks, the last one padded
    ret = router(x, num_tokens=2)
    assert ret.indices.shape == (2, 3, 6) and ret.routed_tokens.shape == (2, 3, 6, D)
    block = ret.indices // 8
    assert (block.view(2, 3, 3, 2) == torch.arange(3).view(1, 1, 3, 1)).all()
    real = ret.indices < 21
    assert torch.equal(ret.routed_mask, real)
    assert (ret.scores[~real] == 0).all()
    with pytest.raises(ValueError):
        router(torch.randn(2, 21, D + 1), num_tokens=2)
    with pytest.raises(ValueError):
        CoordinateDescentRouter(D)(x, num_tokens=22)


def test_router_learned_tokens_and_cosine():
    router = CoordinateDescentRouter(
        D, learned_routing_tokens=True, num_routing_tokens=2, cosine_sim_routing=True
    )
    x = torch.randn(2, 10, D)
    with pytest.raises(ValueError):
        router(x, num_tokens=3)
    ret = router(x, num_tokens=3, routing_tokens=torch.randn(2, 2, D))
    assert ret.indices.shape == (2, 2, 3)


def test_local_attention_matches_dense_masked():
    torch.manual_seed(0)
    b, h, n, d, w = 2, 2, 13, 4, 4
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(b, n) > 0.2
    for causal in (False, True):
        out = local_attention(q, k, v, w, causal=causal, mask=mask)
        i = torch.arange(n)
        vis = ((i[:, None] // w) - (i[None, :] // w)).abs() <= 1
        if causal:
            vis &= i[None, :] <= i[:, None]
        keep = vis[None, None] & mask[:, None, None, :]
        att = (q @ k.transpose(-1, -2) / d**0.5).masked_fill(~keep, float("-inf"))
        ref = att.softmax(-1).nan_to_num() @ v
        torch.testing.assert_close(out, ref)


def test_feedforward_shapes_mask_and_grads():
    ff = ConditionalRoutedFeedForward(D, num_heavy_tokens=6, router_kwargs=SOFT)
    x = _x()
    out = ff(x, mask=_mask())
    assert out.shape == x.shape
    out.sum().backward()
    _grads_reach(ff, ff.router)
    # masked tokens are never routed: heavy branch leaves them at the light output
    x2 = x.detach()
    torch.testing.assert_close(ff(x2, mask=_mask())[1, 12:], ff.light_ff(x2)[1, 12:])
    assert ff(x2, num_heavy_tokens=3).shape == x.shape


@pytest.mark.parametrize("num_routed_kv", [1, 2])
def test_attention_shapes_mask_grads(num_routed_kv):
    attn = ConditionalRoutedAttention(
        D,
        num_heavy_tokens_q=6,
        num_heavy_tokens_kv=8,
        num_routed_kv=num_routed_kv,
        light_window_size=8,
        router_kwargs=SOFT,
        multiply_keys_by_score=True,
        **SMALL,
    )
    x = _x()
    out = attn(x, mask=_mask())
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    _grads_reach(attn, attn.q_router, attn.kv_router)
    # variable lengths: padding a sequence does not change its real outputs
    x_short = x.detach()[:1, :12]
    x_pad = torch.cat([x_short, torch.randn(1, 12, D)], dim=1)
    m = torch.zeros(1, 24, dtype=torch.bool)
    m[:, :12] = True
    torch.testing.assert_close(attn(x_pad, mask=m)[:, :12], attn(x_short), rtol=1e-4, atol=1e-5)


def test_attention_fn_hook_is_used():
    calls = []

    def fn(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    attn = ConditionalRoutedAttention(
        D,
        num_heavy_tokens_q=4,
        num_heavy_tokens_kv=4,
        light_window_size=8,
        attention_fn=fn,
        **SMALL,
    )
    attn(_x())
    assert calls and calls[0][2] == 4


def test_cross_attention_long_memory_blocks():
    attn = ConditionalRoutedCrossAttention(
        D,
        num_tokens_q=5,
        num_tokens_kv=4,
        kv_routing_tokens=2,
        route_block_size=16,
        dim_head=8,
        heads=2,
        router_kwargs=SOFT,
    )
    x, ctx = _x(), torch.randn(2, 70, D, requires_grad=True)
    cmask = torch.rand(2, 70) > 0.3
    out = attn(x, ctx, mask=_mask(), context_mask=cmask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    _grads_reach(attn, attn.q_router, attn.kv_router)
    assert ctx.grad is not None and (ctx.grad[~cmask] == 0).all()


def test_autoregressive_is_causal():
    torch.manual_seed(0)
    w = 6
    attn = ConditionalRoutedAutoregressiveAttention(
        D, num_heavy_tokens_q=3, num_heavy_tokens_kv=3, light_window_size=4, heavy_window_size=w,
        router_kwargs=SOFT, **SMALL,
    )  # fmt: skip
    x = _x(n=20).detach()
    out = attn(x)
    assert out.shape == x.shape
    for t in (7, 12, 18):  # perturb token t: outputs of earlier heavy windows are unchanged
        x2 = x.clone()
        x2[:, t:] += torch.randn_like(x2[:, t:])
        cut = (t // w) * w
        torch.testing.assert_close(attn(x2)[:, :cut], out[:, :cut])
    # all queries routed: causal token by token
    strict = ConditionalRoutedAutoregressiveAttention(
        D, num_heavy_tokens_q=w, num_heavy_tokens_kv=3, light_window_size=4, heavy_window_size=w,
        **SMALL,
    )  # fmt: skip
    ref = strict(x)
    for t in (3, 10, 17):
        x2 = x.clone()
        x2[:, t:] += torch.randn_like(x2[:, t:])
        torch.testing.assert_close(strict(x2)[:, :t], ref[:, :t])


def test_autoregressive_grads_and_unrouted_output():
    attn = ConditionalRoutedAutoregressiveAttention(
        D, num_heavy_tokens_q=2, num_heavy_tokens_kv=3, num_routed_kv=2, light_window_size=4,
        heavy_window_size=6, router_kwargs=SOFT, **SMALL,
    )  # fmt: skip
    x = _x(n=17)
    out = attn(x, mask=torch.ones(2, 17, dtype=torch.bool))
    out.square().sum().backward()
    _grads_reach(attn, attn.q_router, attn.kv_router)
    assert attn.null_q_token.grad is not None and attn.null_q_token.grad.abs().sum() > 0


@pytest.mark.parametrize("channel_first", [False, True])
def test_image_attention_layouts_and_tiles(channel_first):
    attn = ConditionalRoutedImageAttention(
        D, num_heavy_tokens_q=5, num_heavy_tokens_kv=5, light_window_size=3,
        channel_first=channel_first, **SMALL,
    )  # fmt: skip
    img = torch.randn(2, D, 5, 7) if channel_first else torch.randn(2, 5, 7, D)
    out = attn(img)
    assert out.shape == img.shape and torch.isfinite(out).all()
    # light branch alone (no routed query, zero null output): a pixel sees only its 3 x 3 tile
    with torch.no_grad():
        attn.attn.null_q_token.zero_()
    light_only = attn(img, num_heavy_tokens_q=0)
    last = img.permute(0, 2, 3, 1) if channel_first else img
    got = light_only.permute(0, 2, 3, 1) if channel_first else light_only
    ref = attn.attn.light_attn(last[:, 3:5, 3:6].reshape(2, 6, D)).view(2, 2, 3, D)
    torch.testing.assert_close(got[:, 3:5, 3:6], ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        attn(torch.randn(2, 5, D))


def test_transformer_block_and_vit():
    blk = ConditionalRoutedTransformerBlock(
        D, num_heavy_attn_tokens_q=4, num_heavy_attn_tokens_kv=4, num_heavy_ff_tokens=4,
        light_window_size=8, **SMALL,
    )  # fmt: skip
    x = _x()
    out = blk(x, mask=_mask())
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    vit = ConditionalRoutedViT(
        image_size=16, patch_size=4, num_classes=5, dim=D, depth=2,
        attn_num_heavy_tokens_q=4, attn_num_heavy_tokens_kv=4, attn_light_window_size=4,
        attn_light_dim_head=8, attn_light_heads=2, attn_heavy_dim_head=8, attn_heavy_heads=2,
        ff_num_heavy_tokens=4, router_kwargs=SOFT,
    )  # fmt: skip
    logits = vit(torch.randn(3, 3, 16, 16))
    assert logits.shape == (3, 5)
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in vit.parameters() if p.requires_grad)


# ---- issue #15 -------------------------------------------------------------------------------


def _block(name):
    """A small block of each routed kind and how to call it on ``x [2, 24, D]``."""
    if name == "feedforward":
        return ConditionalRoutedFeedForward(D, num_heavy_tokens=6), lambda m, x: m(x)
    if name == "attention":
        m = ConditionalRoutedAttention(
            D, num_heavy_tokens_q=6, num_heavy_tokens_kv=6, light_window_size=8, **SMALL
        )
        return m, lambda m, x: m(x)
    if name == "cross":
        m = ConditionalRoutedCrossAttention(D, num_tokens_q=5, num_tokens_kv=6, dim_head=8, heads=2)
        return m, lambda m, x: m(x, x.flip(1))
    if name == "autoregressive":
        m = ConditionalRoutedAutoregressiveAttention(
            D, num_heavy_tokens_q=3, num_heavy_tokens_kv=3, light_window_size=4,
            heavy_window_size=6, **SMALL,
        )  # fmt: skip
        return m, lambda m, x: m(x)
    if name == "image":
        m = ConditionalRoutedImageAttention(
            D, num_heavy_tokens_q=5, num_heavy_tokens_kv=5, light_window_size=3, **SMALL
        )
        return m, lambda m, x: m(x.reshape(2, 4, 6, D))
    m = ConditionalRoutedTransformerBlock(
        D, num_heavy_attn_tokens_q=4, num_heavy_attn_tokens_kv=4, num_heavy_ff_tokens=4,
        light_window_size=8, **SMALL,
    )  # fmt: skip
    return m, lambda m, x: m(x)


@pytest.mark.parametrize("name", ["attention", "cross", "autoregressive", "image", "block"])
def test_cpu_bf16_autocast(name):
    # the heavy output (bf16 under autocast) was scatter-added onto an fp32 base: dtype error
    m, call = _block(name)
    x = _x()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(m, x)
    assert out.shape[0] == 2 and out.shape[-1] == D
    assert torch.isfinite(out).all()
    out.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["feedforward", "attention"])
def test_compile_fullgraph_matches_eager(name):
    # a read-back of the largest routed index (`int(indices.max())`) broke the graph
    torch._dynamo.reset()
    kw = dict(router_kwargs=dict(n_iters=3))
    if name == "feedforward":
        m = ConditionalRoutedFeedForward(8, num_heavy_tokens=3, **kw)
    else:
        m = ConditionalRoutedAttention(
            8, num_heavy_tokens_q=3, num_heavy_tokens_kv=3, light_window_size=4,
            light_dim_head=4, light_heads=2, heavy_dim_head=4, heavy_heads=2, **kw,
        )  # fmt: skip
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 6:] = False
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    # aot_eager traces what inductor would get; the backward through the router and the scatter
    # is checked on the attention block (the feedforward's heavy part is a plain MLP)
    grad = name == "attention"
    x = torch.randn(2, 8, 8, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = compiled(x, mask=mask)
        ref = m(x, mask=mask)
    torch.testing.assert_close(out, ref)
    if grad:
        g = torch.randn_like(ref)
        (g1,) = torch.autograd.grad(out, x, g)
        (g2,) = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(g1, g2)


def test_causal_attention_heavy_branch_is_causal():
    # causal=True made only the light branch causal: routed queries saw later routed keys
    attn = ConditionalRoutedAttention(
        D, num_heavy_tokens_q=8, num_heavy_tokens_kv=8, light_window_size=8, causal=True,
        router_kwargs=SOFT, **SMALL,
    )  # fmt: skip
    x = _x(n=20).detach()
    out = attn(x)
    # perturb the future in directions the routers do not see (orthogonal to the routing
    # tokens), so routing is unchanged and only attention could carry the change backwards
    basis = torch.cat([attn.q_router.routing_token, attn.kv_router.routing_token]).detach()
    ortho, _ = torch.linalg.qr(basis.T)
    for t in (5, 11, 16):
        delta = torch.randn(2, 20 - t, D)
        x2 = x.clone()
        x2[:, t:] += delta - delta @ ortho @ ortho.T
        out2 = attn(x2)
        torch.testing.assert_close(out2[:, :t], out[:, :t])
        assert not torch.allclose(out2[:, t:], out[:, t:])
    # every token routed: strictly causal token by token, whatever the perturbation
    full = ConditionalRoutedAttention(
        D, num_heavy_tokens_q=20, num_heavy_tokens_kv=20, light_window_size=8, causal=True,
        **SMALL,
    )  # fmt: skip
    ref = full(x)
    for t in (3, 12):
        x2 = x.clone()
        x2[:, t:] += torch.randn_like(x2[:, t:])
        torch.testing.assert_close(full(x2)[:, :t], ref[:, :t])


def test_heavy_attention_causal_mask_matches_dense():
    attn = Attention(D, dim_head=8, heads=2)
    x, ctx = torch.randn(2, 5, D), torch.randn(2, 7, D)
    qpos, kpos = torch.randint(0, 10, (2, 5)), torch.randint(0, 10, (2, 7))
    calls = {}

    def fn(q, k, v, attn_mask=None):
        calls["mask"] = attn_mask
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    attn.attention_fn = fn
    attn(x, ctx, q_positions=qpos, kv_positions=kpos, causal=True)
    expected = kpos[:, None, None, :] <= qpos[:, None, :, None]
    torch.testing.assert_close(calls["mask"][..., 1:], expected.expand(2, 2, 5, 7))
    assert calls["mask"][..., 0].all()  # the null key is always visible


def _rotate_upstream(t, pos, theta=10000.0):
    # upstream's RotaryEmbedding / apply_rotary_pos_emb, written out independently
    d = t.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    freqs = pos.float()[..., None] * inv_freq
    freqs = torch.cat([freqs, freqs], dim=-1).to(t.dtype)
    x1, x2 = t.chunk(2, dim=-1)
    return t * freqs.cos() + torch.cat([-x2, x1], dim=-1) * freqs.sin()


def test_light_branch_rotary_matches_dense_reference():
    from colt5_routing import LocalMHA

    mha = LocalMHA(D, window_size=4, dim_head=8, heads=2).double()
    assert mha.use_rotary
    x = torch.randn(2, 11, D, dtype=torch.float64)
    out = mha(x)
    q, k, v = mha.to_qkv(mha.norm(x)).view(2, 11, 3, 2, 8).permute(2, 0, 3, 1, 4)
    pos = torch.arange(11)
    q, k = _rotate_upstream(q, pos), _rotate_upstream(k, pos)
    i = torch.arange(11)
    vis = ((i[:, None] // 4) - (i[None, :] // 4)).abs() <= 1
    att = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~vis, float("-inf"))
    ref = mha.to_out((att.softmax(-1) @ v).transpose(1, 2).reshape(2, 11, 16))
    torch.testing.assert_close(out, ref)
    plain = LocalMHA(D, window_size=4, dim_head=8, heads=2, use_rotary=False).double()
    plain.load_state_dict(mha.state_dict())
    assert not torch.allclose(plain(x), out)


def test_heavy_rotary_is_relative_and_uses_routed_positions():
    attn = Attention(D, dim_head=8, heads=2, use_rotary=True)
    logits = []

    def fn(q, k, v, attn_mask=None):
        logits.append(q @ k[:, :, 1:].transpose(-1, -2))  # real keys (the null key has no position)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    attn.attention_fn = fn
    x, ctx = torch.randn(2, 5, D), torch.randn(2, 7, D)
    qpos, kpos = torch.randint(0, 50, (2, 5)), torch.randint(0, 50, (2, 7))
    attn(x, ctx, q_positions=qpos, kv_positions=kpos)
    attn(x, ctx, q_positions=qpos + 13, kv_positions=kpos + 13)
    attn(x, ctx, q_positions=qpos, kv_positions=kpos.flip(-1))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits[2], logits[0])
    # the routed block passes the routed tokens' positions
    block = ConditionalRoutedAttention(
        D, num_heavy_tokens_q=5, num_heavy_tokens_kv=6, light_window_size=8, **SMALL
    )
    seen = {}
    forward = block.heavy_attn.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return forward(*args, **kwargs)

    block.heavy_attn.forward = spy
    xb = _x().detach()
    block(xb)
    idx_q = block.q_router(xb, num_tokens=5).indices
    idx_kv = block.kv_router(xb, num_tokens=6, keep_one_route_dim=True).indices
    assert torch.equal(seen["q_positions"], idx_q) and torch.equal(seen["kv_positions"], idx_kv)


@pytest.mark.parametrize("name", ["attention", "autoregressive", "block"])
def test_rotary_option_keeps_state_dict(name):
    kw = dict(light_window_size=8, **SMALL)
    if name == "attention":
        make = lambda **o: ConditionalRoutedAttention(
            D, num_heavy_tokens_q=6, num_heavy_tokens_kv=6, **kw, **o
        )
    elif name == "autoregressive":
        make = lambda **o: ConditionalRoutedAutoregressiveAttention(
            D, num_heavy_tokens_q=3, num_heavy_tokens_kv=3, heavy_window_size=6, **kw, **o
        )
    else:
        make = lambda **o: ConditionalRoutedTransformerBlock(
            D, num_heavy_attn_tokens_q=4, num_heavy_attn_tokens_kv=4, num_heavy_ff_tokens=4,
            **kw, **o,
        )  # fmt: skip
    on, off = make(), make(use_rotary=False)
    assert on.state_dict().keys() == off.state_dict().keys()
    assert not any("rot" in k or "freq" in k for k in on.state_dict())
    off.load_state_dict(on.state_dict())  # strict: the same parameters and buffers
    x = _x().detach()
    assert not torch.allclose(on(x), off(x))


def test_queries_scaled_by_score_after_projection():
    # the query score scaled the input of a LayerNorm, which removed it (and its gradient)
    attn = Attention(D, dim_head=8, heads=2)
    queries = []

    def fn(q, k, v, attn_mask=None):
        queries.append(q)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    attn.attention_fn = fn
    x, ctx = torch.randn(2, 5, D), torch.randn(2, 7, D)
    s = torch.rand(2, 5) + 0.25
    attn(x, ctx)
    attn(x, ctx, normalized_scores_q=s)
    torch.testing.assert_close(queries[1], queries[0] * s[:, None, :, None])


HEAVY_KEYS = [
    "q_router.routing_token",
    "kv_router.routing_token",
    "heavy_attn.null_kv",
    "heavy_attn.norm.weight",
    "heavy_attn.norm.bias",
    "heavy_attn.norm_context.weight",
    "heavy_attn.norm_context.bias",
    "heavy_attn.to_q.weight",
    "heavy_attn.to_kv.weight",
    "heavy_attn.to_out.weight",
]
LIGHT_KEYS = [
    "light_attn.norm.weight",
    "light_attn.norm.bias",
    "light_attn.to_qkv.weight",
    "light_attn.to_out.weight",
]


@pytest.mark.parametrize("null", [True, False])
@pytest.mark.parametrize("name", ["attention", "autoregressive", "cross"])
def test_attention_blocks_state_dict_keys(name, null):
    """The heavy branch built by ``routed.heavy_attention_parts`` keeps the blocks' own keys, in
    the order of every release (checkpoints and seeded initialisation depend on it)."""
    kw = dict(use_null_q_tokens=null)
    if name == "attention":
        block = ConditionalRoutedAttention(
            D, num_heavy_tokens_q=6, num_heavy_tokens_kv=6, num_routed_kv=2, **SMALL, **kw
        )
    elif name == "autoregressive":
        block = ConditionalRoutedAutoregressiveAttention(
            D, num_heavy_tokens_q=3, num_heavy_tokens_kv=3, heavy_window_size=6, **SMALL, **kw
        )
    else:
        block = ConditionalRoutedCrossAttention(
            D, num_tokens_q=4, num_tokens_kv=4, num_sets_kv=2, route_block_size=8, **kw
        )
    light = [] if name == "cross" else LIGHT_KEYS
    assert list(block.state_dict()) == ["null_q_token"] * null + light + HEAVY_KEYS
    assert isinstance(block.heavy_attn, Attention)
    assert block.kv_router.num_routing_tokens == (1 if name == "autoregressive" else 2)
    assert block.kv_router.route_block_size == (8 if name == "cross" else None)
