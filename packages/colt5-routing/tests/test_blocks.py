"""Router and routed blocks: shapes, masks, gradients, causality, ViT."""

from __future__ import annotations

import pytest
import torch
from colt5_routing import (
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
    # light branch alone (heavy branch replaced by its base): a pixel sees only its 3 x 3 tile
    attn.attn._heavy = lambda x, mask, nq, nkv, light: light
    light_only = attn(img)
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
