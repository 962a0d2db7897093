"""SwitchHead against an independent float64 re-derivation of its formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from switchhead import AttentionMask, SwitchHeadRope, SwitchHeadSelfAttention, SwitchHeadXL

from testing_support import rel_error

D_MODEL, HEADS, D_HEAD = 24, 3, 10


def rope_oracle(
    x: torch.Tensor, positions: torch.Tensor, n_rotate: int, base: float
) -> torch.Tensor:
    """Rotate channel pairs (c, c + n/2) of the first n_rotate channels by position * freq_c."""
    out = x.clone()
    half = n_rotate // 2
    for c in range(half):
        theta = positions.double() * base ** (-2 * c / n_rotate)
        cos, sin = theta.cos()[:, None], theta.sin()[:, None]
        a, b = x[..., c], x[..., c + half]
        out[..., c] = a * cos.squeeze(-1) - b * sin.squeeze(-1)
        out[..., c + half] = b * cos.squeeze(-1) + a * sin.squeeze(-1)
    return out


def expert_mix(src, logits_w, weights, n_experts, k, heads):
    """Per head: sum over the top-k sigmoid-scored experts of gate * (src @ W[h*E + e])."""
    scores = (src @ logits_w.T).view(*src.shape[:-1], heads, n_experts).sigmoid()
    gate, index = scores.topk(k, dim=-1)
    index = index + torch.arange(heads).view(1, 1, heads, 1) * n_experts
    return gate, index


def oracle(m, q_src, k_src, v_src, keep, q_offset=0):
    """Attention from the module's parameters, written out directly; query i is at position
    q_offset + i, key j at position j."""
    p = {n: t.double() for n, t in m.named_parameters()}
    b, tq, tk = q_src.shape[0], q_src.shape[1], k_src.shape[1]
    e, k, h, d = m.n_experts, m.moe_k, m.n_heads, m.projection_size
    s = (1 / math.sqrt(d)) ** 0.5
    q = (q_src @ p["q.weight"].T * s).view(b, tq, h, d).transpose(1, 2)
    kk = (k_src @ p["k.weight"].T * s).view(b, tk, h, d).transpose(1, 2)
    if e > 1:
        gate, index = expert_mix(k_src, p["sel_v"], None, e, k, h)
        v = torch.einsum("btd,bthjdf,bthj->bhtf", v_src, p["v"][index], gate)
    else:
        v = (v_src @ p["v"].T).view(b, tk, h, d).transpose(1, 2)
    if isinstance(m, SwitchHeadRope):
        q = rope_oracle(q, torch.arange(tq) + q_offset, m.n_rotate, 10000.0)
        kk = rope_oracle(kk, torch.arange(tk), m.n_rotate, 10000.0)
        att = q @ kk.transpose(-1, -2)
    else:
        dm = m.pe_size
        rel = (torch.arange(tk)[None, :] - torch.arange(tq)[:, None] - q_offset).double()
        div = torch.exp(torch.arange(0, dm, 2).double() * (-math.log(10000.0) / dm))
        pe = torch.zeros(tq, tk, dm, dtype=torch.float64)
        pe[..., 0::2] = torch.sin(rel[..., None] * div)
        pe[..., 1::2] = torch.cos(rel[..., None] * div)
        pk = (pe * s @ p["pos_to_pk"].T).view(tq, tk, h, d)
        att = q @ kk.transpose(-1, -2) + torch.einsum("bhid,ijhd->bhij", q, pk)
    if keep is not None:
        att = att.masked_fill(~keep, float("-inf"))
    res = att.softmax(-1) @ v  # [B, H, Tq, d]
    if e > 1:
        gate, index = expert_mix(q_src, p["sel_o"], None, e, k, h)
        return torch.einsum("bhtd,bthjdf,bthj->btf", res, p["o"][index], gate)
    gate_o = (q_src @ p["sel_o"].T).sigmoid()  # [B, T, H]
    return (res.transpose(1, 2) * gate_o[..., None]).flatten(-2) @ p["o"].T


def make(cls, n_experts, moe_k, **kw):
    torch.manual_seed(0)
    return cls(D_MODEL, HEADS, n_experts, d_head=D_HEAD, moe_k=moe_k, **kw).double()


MASKS = ["causal", "none", "position", "padding", "padding+causal"]


def build_mask(kind, b, tq, tk, g):
    causal_keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    pad = torch.zeros(b, tk, dtype=torch.bool)
    pad[0, -2:] = True  # the first sequence is 2 tokens shorter
    if kind == "causal":
        return None, causal_keep
    if kind == "none":
        return AttentionMask(), None
    if kind == "position":
        pm = torch.rand(tq, tk, generator=g) < 0.3
        pm[:, 0] = False
        return AttentionMask(position_mask=pm), ~pm
    if kind == "padding":
        return AttentionMask(src_length_mask=pad), ~pad[:, None, None, :]
    return AttentionMask(position_mask=~causal_keep, src_length_mask=pad), causal_keep & ~pad[
        :, None, None, :
    ]


def check_against_oracle(m, q_src, kv_src, mask, keep, rtol=1e-9):
    """Output, parameter and input gradients of ``m`` equal the float64 oracle's."""
    q_src = q_src.clone().requires_grad_()
    kv_src = q_src if kv_src is None else kv_src.clone().requires_grad_()
    out, cache = m(q_src, kv_src, kv_src, mask=mask)
    assert cache is None
    expected = oracle(m, q_src, kv_src, kv_src, keep)
    torch.testing.assert_close(out, expected, rtol=rtol, atol=rtol * 0.1)
    grad = torch.randn_like(out)
    inputs = list(m.parameters()) + [q_src] + ([kv_src] if kv_src is not q_src else [])
    names = [n for n, _ in m.named_parameters()] + ["q_src", "kv_src"]
    grads = torch.autograd.grad(out, inputs, grad)
    ref_grads = torch.autograd.grad(expected, inputs, grad)
    for name, g1, g2 in zip(names, grads, ref_grads):
        torch.testing.assert_close(g1, g2, rtol=rtol * 10, atol=rtol * 0.1, msg=name)


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
@pytest.mark.parametrize(("n_experts", "moe_k"), [(1, 1), (4, 1), (4, 2)])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_matches_float64_oracle(cls, n_experts, moe_k, mask_kind):
    g = torch.Generator().manual_seed(1)
    m = make(cls, n_experts, moe_k)
    b, t = 2, 6
    x = torch.randn(b, t, D_MODEL, dtype=torch.float64, generator=g)
    mask, keep = build_mask(mask_kind, b, t, t, g)
    check_against_oracle(m, x, None, mask, keep)


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
@pytest.mark.parametrize("expert_impl", ["dense", "cvmm"])
@pytest.mark.parametrize("pad_head_dim", [False, True])
@pytest.mark.parametrize("mask_kind", ["causal", "padding+causal"])
def test_expert_impl_and_head_padding_match_oracle(cls, expert_impl, pad_head_dim, mask_kind):
    g = torch.Generator().manual_seed(4)
    m = make(cls, 4, 2, expert_impl=expert_impl, pad_head_dim=pad_head_dim)
    assert m.expert_impl == expert_impl
    assert m.head_size == (16 if pad_head_dim else D_HEAD)
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64, generator=g)
    mask, keep = build_mask(mask_kind, 2, 7, 7, g)
    check_against_oracle(m, x, None, mask, keep)


def test_auto_expert_impl_rule():
    assert SwitchHeadRope(D_MODEL, 2, 4, moe_k=1).expert_impl == "dense"
    assert SwitchHeadRope(D_MODEL, 2, 8, moe_k=1).expert_impl == "cvmm"
    assert SwitchHeadRope(D_MODEL, 2, 8, moe_k=2).expert_impl == "dense"
    with pytest.raises(ValueError, match="expert_impl"):
        SwitchHeadRope(D_MODEL, 2, 4, expert_impl="sparse")


@settings(max_examples=12, deadline=None)
@given(
    cls=st.sampled_from([SwitchHeadRope, SwitchHeadXL]),
    heads=st.integers(1, 3),
    experts_k=st.sampled_from([(1, 1), (2, 1), (3, 2), (5, 2), (4, 4)]),
    d_head=st.integers(1, 13),
    batch=st.integers(1, 2),
    t_q=st.integers(1, 5),
    t_k=st.integers(1, 5),
    impl=st.sampled_from(["dense", "cvmm"]),
    fraction=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
)
def test_fuzz_shapes_cross_attention(
    cls, heads, experts_k, d_head, batch, t_q, t_k, impl, fraction
):
    """Random shapes, cross-attention with Tq != Tk, no mask, against the oracle."""
    n_experts, moe_k = experts_k
    kw = {"rotate_fraction": fraction} if cls is SwitchHeadRope else {}
    torch.manual_seed(0)
    m = cls(D_MODEL, heads, n_experts, d_head=d_head, moe_k=moe_k, expert_impl=impl, **kw).double()
    q_src = torch.randn(batch, t_q, D_MODEL, dtype=torch.float64)
    kv = torch.randn(batch, t_k, D_MODEL, dtype=torch.float64)
    check_against_oracle(m, q_src, kv, AttentionMask(), None, rtol=1e-8)


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
def test_cross_attention_with_different_lengths(cls):
    g = torch.Generator().manual_seed(2)
    m = make(cls, 4, 2)
    q_src = torch.randn(2, 3, D_MODEL, dtype=torch.float64, generator=g)
    kv = torch.randn(2, 8, D_MODEL, dtype=torch.float64, generator=g)
    out, _ = m(q_src, kv, kv, mask=AttentionMask())
    torch.testing.assert_close(out, oracle(m, q_src, kv, kv, None), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
@pytest.mark.parametrize("n_experts", [1, 4])
@pytest.mark.parametrize("chunk", [1, 3])
def test_kv_cache_decoding_equals_full_forward(cls, n_experts, chunk):
    g = torch.Generator().manual_seed(3)
    m = make(cls, n_experts, 2 if n_experts > 1 else 1)
    x = torch.randn(2, 8, D_MODEL, dtype=torch.float64, generator=g)
    full, _ = m(x, x, x)
    cache: dict = {}
    pieces = []
    for start in range(0, x.shape[1], chunk):
        part = x[:, start : start + chunk]
        out, cache = m(part, part, part, kv_cache=cache)
        pieces.append(out)
    assert cache["k"].shape[-2] == x.shape[1]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    ("cls", "n_experts", "expected"),
    [
        (
            SwitchHeadRope,
            4,
            {
                "q.weight": (30, 24),
                "k.weight": (30, 24),
                "v": (12, 24, 10),
                "o": (12, 10, 24),
                "sel_v": (12, 24),
                "sel_o": (12, 24),
            },
        ),
        (
            SwitchHeadRope,
            1,
            {
                "q.weight": (30, 24),
                "k.weight": (30, 24),
                "v": (30, 24),
                "o": (24, 30),
                "sel_o": (3, 24),
            },
        ),
        (
            SwitchHeadXL,
            4,
            {
                "q.weight": (30, 24),
                "k.weight": (30, 24),
                "v": (12, 24, 10),
                "o": (12, 10, 24),
                "sel_v": (12, 24),
                "sel_o": (12, 24),
                "pos_to_pk": (30, 24),
            },
        ),
    ],
)
def test_state_dict_has_the_authors_keys_and_shapes(cls, n_experts, expected):
    m = make(cls, n_experts, 1)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    clone = make(cls, n_experts, 1)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    clone.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(1, 4, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(clone(x, x, x)[0], m(x, x, x)[0])


@pytest.mark.parametrize(("d_head", "fraction"), [(41, 0.5), (41, 1.0), (7, 0.3), (10, 0.0)])
def test_any_rotate_fraction(d_head, fraction):
    m = SwitchHeadRope(D_MODEL, 2, 2, d_head=d_head, rotate_fraction=fraction).double()
    assert m.n_rotate % 2 == 0 and m.n_rotate <= d_head
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    out, _ = m(x, x, x)
    torch.testing.assert_close(out, oracle(m, x, x, x, torch.ones(5, 5, dtype=torch.bool).tril()))


def test_expert_dropout_only_in_training():
    m = make(SwitchHeadRope, 4, 1, expert_dropout=0.9)
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    m.eval()
    torch.manual_seed(0)
    a = m(x, x, x)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(m(x, x, x)[0], a)
    m.train()
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        outs.append(m(x, x, x)[0])
    assert any(not torch.allclose(o, a) for o in outs)


def test_attention_fn_hook_is_called_with_sdpa_arguments():
    calls = []

    def recording_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0):
        calls.append((attn_mask is None, is_causal, scale))
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p
        )

    m = make(SwitchHeadRope, 4, 2)
    hooked = make(SwitchHeadRope, 4, 2, attention_fn=recording_sdpa)
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(hooked(x, x, x)[0], m(x, x, x)[0])
    assert calls == [
        (True, True, 1 / math.sqrt(D_HEAD))
    ]  # the causal default reaches the fused path, no mask


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
@pytest.mark.parametrize(
    ("n_experts", "moe_k", "expert_impl"), [(1, 1, "auto"), (4, 2, "dense"), (4, 2, "cvmm")]
)
def test_attention_inputs_are_16_byte_aligned(cls, n_experts, moe_k, expert_impl):
    # PyTorch's memory-efficient CUDA kernel faults ("misaligned address") on q/k/v views whose
    # start or row strides are not 16-byte aligned; the fused projection must never produce them.
    seen = []

    def spy(q, k, v, **kwargs):
        seen.extend((q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)

    m = make(cls, n_experts, moe_k, attention_fn=spy, expert_impl=expert_impl).float()
    x = torch.randn(2, 5, D_MODEL)
    m(x, x, x)
    assert len(seen) == 3
    for t in seen:
        assert t.stride(-1) == 1
        assert (t.data_ptr() - t.untyped_storage().data_ptr()) % 16 == 0
        assert all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]), t.stride()


def test_selection_logits_recorded_only_when_asked():
    m = make(SwitchHeadRope, 4, 2)
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    m(x, x, x)
    assert m.last_selection_logits is None
    m.record_selection_logits = True
    m(x, x, x)
    logits = m.last_selection_logits
    assert set(logits) == {"v", "o"} and logits["v"].shape == (2, 5, HEADS, 4)
    assert logits["o"].requires_grad
    expected = (x @ m.sel_o.T).view(2, 5, HEADS, 4)
    torch.testing.assert_close(logits["o"].double(), expected)


def test_self_attention_block_is_residual():
    torch.manual_seed(0)
    block = SwitchHeadSelfAttention(D_MODEL, HEADS, 4, d_head=D_HEAD).double()
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    out, _ = block(x)
    h = block.norm(x)
    torch.testing.assert_close(out, x + block.attention(h, h, h)[0])


def test_bad_inputs_raise():
    m = make(SwitchHeadRope, 4, 2)
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    with pytest.raises(ValueError, match="position_mask"):
        m(x, x, x, mask=AttentionMask(position_mask=torch.zeros(4, 5, dtype=torch.bool)))
    with pytest.raises(TypeError, match="boolean"):
        m(x, x, x, mask=AttentionMask(src_length_mask=torch.zeros(2, 5)))
    with pytest.raises(ValueError, match=r"\[B, T, d_model=24\]"):
        m(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="d_model=24"):
        m(x[..., :20], x[..., :20], x[..., :20])
    with pytest.raises(ValueError, match="equal batch"):
        m(x, x[:1], x[:1])
    with pytest.raises(ValueError, match="k/v lengths"):
        m(x, x, x[:, :3])
    with pytest.raises(ValueError, match="moe_k"):
        SwitchHeadRope(D_MODEL, HEADS, 4, moe_k=5)


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
def test_compile_fullgraph(cls):
    m = make(cls, 4, 2).float()
    x = torch.randn(2, 6, D_MODEL)
    eager = m(x, x, x)[0]
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x, x, x)[0], eager, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
@pytest.mark.parametrize("n_experts", [1, 4])
def test_cuda_float32_matches_float64(cls, n_experts):
    m = make(cls, n_experts, 2 if n_experts > 1 else 1)
    x = torch.randn(2, 64, D_MODEL, dtype=torch.float64)
    expected, _ = m(x, x, x)
    expected.sum().backward()
    ref_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    mc = m.float().cuda()
    xc = x.float().cuda()
    out, _ = mc(xc, xc, xc)
    assert rel_error(out, expected) < 1e-4
    out.sum().backward()
    for (name, p), g in zip(mc.named_parameters(), ref_grads):
        assert rel_error(p.grad, g) < 1e-3, name


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
def test_cuda_bf16_autocast(cls):
    """bf16 may flip near-tied expert choices of a few tokens: most tokens must match."""
    m = make(cls, 4, 2)
    x = torch.randn(2, 64, D_MODEL, dtype=torch.float64)
    expected, _ = m(x, x, x)
    mc = m.float().cuda()
    xc = x.float().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = mc(xc, xc, xc)
    assert out.dtype == torch.bfloat16
    per_token = (out.double().cpu() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert per_token.median() < 2e-2
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mc.parameters())


# ----- issue #15: mask shapes and causal masking -----


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
@pytest.mark.parametrize("batch", [2, HEADS])
def test_batched_position_mask_is_per_sequence(cls, batch):
    """``[B, Tq, Tk]`` is one mask per sequence for every head (it was read per head when B
    equalled the head count, and crashed otherwise)."""
    g = torch.Generator().manual_seed(5)
    m = make(cls, 4, 2)
    x = torch.randn(batch, 6, D_MODEL, dtype=torch.float64, generator=g)
    pm = torch.rand(batch, 6, 6, generator=g) < 0.4
    pm[..., 0] = False
    check_against_oracle(m, x, None, AttentionMask(position_mask=pm), ~pm[:, None])


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
def test_causal_with_more_queries_than_keys_raises(cls):
    """The first Tq - Tk queries would see no key (their output was silently zero)."""
    m = make(cls, 4, 2)
    q_src = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    kv = torch.randn(2, 3, D_MODEL, dtype=torch.float64)
    for mask in (None, AttentionMask(causal=True)):
        with pytest.raises(ValueError, match="Tq=5 > Tk=3"):
            m(q_src, kv, kv, mask=mask)
    out, _ = m(q_src, kv, kv, mask=AttentionMask())  # cross-attention without a mask works
    torch.testing.assert_close(out, oracle(m, q_src, kv, kv, None), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
def test_position_mask_narrower_than_the_keys_raises(cls):
    """A position mask must cover every key, the cached ones included (it was left-padded)."""
    m = make(cls, 4, 2)
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Tk=5.*got \(5, 4\)"):
        m(x, x, x, mask=AttentionMask(position_mask=torch.zeros(5, 4, dtype=torch.bool)))
    _, cache = m(x[:, :3], x[:, :3], x[:, :3], kv_cache={})
    narrow = torch.zeros(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"Tk=5 \(keys include the KV cache\)"):
        m(x[:, 3:], x[:, 3:], x[:, 3:], mask=AttentionMask(position_mask=narrow), kv_cache=cache)


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
def test_causal_flag_adds_the_causal_mask(cls):
    """``AttentionMask(src_length_mask=pad, causal=True)``: causal attention over a padded batch,
    in one forward and decoding with the KV cache."""
    g = torch.Generator().manual_seed(6)
    m = make(cls, 4, 2)
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64, generator=g)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, -2:] = True
    keep = torch.ones(6, 6, dtype=torch.bool).tril() & ~pad[:, None, None, :]
    mask = AttentionMask(src_length_mask=pad, causal=True)
    check_against_oracle(m, x, None, mask, keep)
    full, _ = m(x, x, x, mask=mask)
    cache: dict = {}
    pieces = []
    for t in range(6):
        step_mask = AttentionMask(src_length_mask=pad[:, : t + 1], causal=True)
        out, cache = m(x[:, t : t + 1], x[:, t : t + 1], x[:, t : t + 1], step_mask, cache)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(m(x, x, x, mask=AttentionMask(causal=True))[0], m(x, x, x)[0])
