"""SwitchHead on bad and unusual inputs (issue #15).

Every case either raises a clear error before any tensor operation runs (checked with a
dispatch mode that records every ATen op), or returns what an explicit float64 computation of the
same formulas gives.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from switchhead import AttentionMask, RotaryEmbedding, SwitchHeadRope, SwitchHeadXL, sdpa_mask
from torch.utils._python_dispatch import TorchDispatchMode

D_MODEL, HEADS, D_HEAD, E, K = 24, 3, 8, 4, 2
B, T = 2, 5


class OpLog(TorchDispatchMode):
    """Records every ATen op that runs inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@functools.cache
def make(cls=SwitchHeadRope, expert_impl="auto"):
    """One float64 module per configuration, shared by the tests (none of them changes it)."""
    torch.manual_seed(0)
    return cls(D_MODEL, HEADS, E, d_head=D_HEAD, moe_k=K, expert_impl=expert_impl).double()


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def bools(*shape, p=0.3, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p


def oracle(m, q_src, kv_src, keep):
    """Float64 attention written out from the module's parameters; ``keep`` (True = attend) is
    broadcast to ``[B, H, Tq, Tk]``; a query whose keys are all masked gets a zero result."""
    p = {n: t.detach().double() for n, t in m.named_parameters()}
    b, tq, tk = q_src.shape[0], q_src.shape[1], kv_src.shape[1]
    h, d = m.n_heads, m.projection_size
    s = (1 / math.sqrt(d)) ** 0.5

    def mix(src, w):
        scores = (src @ w.T).view(*src.shape[:-1], h, E).sigmoid()
        gate, index = scores.topk(K, dim=-1)
        return gate, index + torch.arange(h).view(1, 1, h, 1) * E

    q = (q_src @ p["q.weight"].T * s).view(b, tq, h, d).transpose(1, 2)
    k = (kv_src @ p["k.weight"].T * s).view(b, tk, h, d).transpose(1, 2)
    gate, index = mix(kv_src, p["sel_v"])
    v = torch.einsum("btd,bthjdf,bthj->bhtf", kv_src, p["v"][index], gate)
    if isinstance(m, SwitchHeadRope):
        half = m.n_rotate // 2

        def rope(x, pos):
            out = x.clone()
            for c in range(half):
                theta = pos.double() * 10000.0 ** (-2 * c / m.n_rotate)
                a, bb = x[..., c], x[..., c + half]
                out[..., c] = a * theta.cos() - bb * theta.sin()
                out[..., c + half] = bb * theta.cos() + a * theta.sin()
            return out

        att = rope(q, torch.arange(tq)) @ rope(k, torch.arange(tk)).transpose(-1, -2)
    else:
        rel = (torch.arange(tk)[None, :] - torch.arange(tq)[:, None]).double()
        div = torch.exp(torch.arange(0, D_MODEL, 2).double() * (-math.log(10000.0) / D_MODEL))
        pe = torch.zeros(tq, tk, D_MODEL, dtype=torch.float64)
        pe[..., 0::2] = torch.sin(rel[..., None] * div)
        pe[..., 1::2] = torch.cos(rel[..., None] * div)
        pk = (pe * s @ p["pos_to_pk"].T).view(tq, tk, h, d)
        att = q @ k.transpose(-1, -2) + torch.einsum("bhid,ijhd->bhij", q, pk)
    if keep is not None:
        keep = keep.expand(att.shape)
        att = att.masked_fill(~keep, float("-inf"))
        probs = att.softmax(-1).masked_fill(~keep.any(-1, keepdim=True), 0.0)
    else:
        probs = att.softmax(-1)
    res = probs @ v
    gate, index = mix(q_src, p["sel_o"])
    return torch.einsum("bhtd,bthjdf,bthj->btf", res, p["o"][index], gate)


CAUSAL = torch.ones(T, T, dtype=torch.bool).tril()
PAD = torch.zeros(B, T, dtype=torch.bool)
PAD[0, -2:] = True

# ----- refused: (id, call(module, x, KV cache of 3 tokens), exception, message) -----

x0 = randn(B, T, D_MODEL)


def with_mask(**kw):
    return lambda m, x, c: m(x, x, x, mask=AttentionMask(**kw))


REFUSED = [
    ("q_src 2-D", lambda m, x, c: m(x[0], x[0], x[0]), ValueError, r"\[B, T, d_model=24\]"),
    ("q_src 4-D", lambda m, x, c: m(x[None], x[None], x[None]), ValueError, "d_model=24"),
    ("v_src 2-D", lambda m, x, c: m(x, x, x[0]), ValueError, "d_model=24"),
    ("wrong d_model", lambda m, x, c: m(x[..., :20], x[..., :20], x[..., :20]), ValueError, "24"),
    ("batch mismatch", lambda m, x, c: m(x, x[:1], x[:1]), ValueError, "equal batch"),
    ("k/v length mismatch", lambda m, x, c: m(x, x, x[:, :3]), ValueError, "k/v lengths"),
    ("integer inputs", lambda m, x, c: m(*[x.long()] * 3), TypeError, "floating point"),
    ("bool inputs", lambda m, x, c: m(*[x > 0] * 3), TypeError, "floating point"),
    ("list input", lambda m, x, c: m(x.tolist(), x, x), TypeError, "must be a tensor"),
    ("float32 into float64", lambda m, x, c: m(*[x.float()] * 3), TypeError, "parameters' dtype"),
    ("mixed dtypes", lambda m, x, c: m(x, x.float(), x), TypeError, "parameters' dtype"),
    ("meta inputs", lambda m, x, c: m(*[x.to("meta")] * 3), ValueError, "parameters' device"),
    ("meta v_src", lambda m, x, c: m(x, x, x.to("meta")), ValueError, "parameters' device"),
    (
        "no keys",
        lambda m, x, c: m(x, x[:, :0], x[:, :0], mask=AttentionMask()),
        ValueError,
        "no key",
    ),
    ("causal, Tq > Tk", lambda m, x, c: m(x, x[:, :3], x[:, :3]), ValueError, "Tq=5 > Tk=3"),
    (
        "causal=True, Tq > Tk",
        lambda m, x, c: m(x, x[:, :2], x[:, :2], mask=AttentionMask(causal=True)),
        ValueError,
        "Tq=5 > Tk=2",
    ),
    ("mask is a tensor", lambda m, x, c: m(x, x, x, mask=~CAUSAL), TypeError, "AttentionMask"),
    ("float position_mask", with_mask(position_mask=torch.zeros(T, T)), TypeError, "boolean"),
    (
        "int position_mask",
        with_mask(position_mask=torch.zeros(T, T, dtype=torch.int8)),
        TypeError,
        "boolean",
    ),
    (
        "narrow position_mask",
        with_mask(position_mask=torch.zeros(T, T - 1, dtype=torch.bool)),
        ValueError,
        r"got \(5, 4\)",
    ),
    (
        "wide position_mask",
        with_mask(position_mask=torch.zeros(T, T + 1, dtype=torch.bool)),
        ValueError,
        "position_mask must be",
    ),
    (
        "position_mask with other Tq",
        with_mask(position_mask=torch.zeros(T - 1, T, dtype=torch.bool)),
        ValueError,
        "position_mask must be",
    ),
    (
        "1-D position_mask",
        with_mask(position_mask=torch.zeros(T, dtype=torch.bool)),
        ValueError,
        "position_mask must be",
    ),
    (
        "5-D position_mask",
        with_mask(position_mask=torch.zeros(1, B, HEADS, T, T, dtype=torch.bool)),
        ValueError,
        "position_mask must be",
    ),
    (
        "[B', Tq, Tk] position_mask",
        with_mask(position_mask=torch.zeros(B + 1, T, T, dtype=torch.bool)),
        ValueError,
        r"B in \(1, 2\)",
    ),
    (
        "[B, H', Tq, Tk] position_mask",
        with_mask(position_mask=torch.zeros(B, HEADS - 1, T, T, dtype=torch.bool)),
        ValueError,
        r"H in \(1, 3\)",
    ),
    (
        "[H, H, Tq, Tk] position_mask",
        with_mask(position_mask=torch.zeros(HEADS, HEADS, T, T, dtype=torch.bool)),
        ValueError,
        "position_mask must be",
    ),
    (
        "meta position_mask",
        with_mask(position_mask=torch.zeros(T, T, dtype=torch.bool, device="meta")),
        ValueError,
        "meta",
    ),
    (
        "short src_length_mask",
        with_mask(src_length_mask=torch.zeros(B, T - 1, dtype=torch.bool)),
        ValueError,
        r"src_length_mask must be \[B=2, Tk=5\]",
    ),
    (
        "1-D src_length_mask",
        with_mask(src_length_mask=torch.zeros(T, dtype=torch.bool)),
        ValueError,
        "src_length_mask must be",
    ),
    (
        "[1, Tk] src_length_mask",
        with_mask(src_length_mask=torch.zeros(1, T, dtype=torch.bool)),
        ValueError,
        "src_length_mask must be",
    ),
    (
        "float src_length_mask",
        with_mask(src_length_mask=torch.zeros(B, T)),
        TypeError,
        "boolean",
    ),
    (
        "src_length_mask without the cache",
        lambda m, x, c: m(
            x[:, 3:],
            x[:, 3:],
            x[:, 3:],
            mask=AttentionMask(src_length_mask=torch.zeros(B, 2, dtype=torch.bool)),
            kv_cache=c,
        ),
        ValueError,
        r"Tk=5",
    ),
    (
        "position_mask without the cache",
        lambda m, x, c: m(
            x[:, 3:],
            x[:, 3:],
            x[:, 3:],
            mask=AttentionMask(position_mask=torch.zeros(2, 2, dtype=torch.bool)),
            kv_cache=c,
        ),
        ValueError,
        r"Tk=5",
    ),
    ("kv_cache is a list", lambda m, x, c: m(x, x, x, kv_cache=[]), TypeError, "kv_cache"),
    (
        "kv_cache without v",
        lambda m, x, c: m(x, x, x, kv_cache={"k": c["k"]}),
        ValueError,
        "'k' and 'v'",
    ),
    (
        "kv_cache of another batch",
        lambda m, x, c: m(x[:1], x[:1], x[:1], kv_cache=c),
        ValueError,
        r"B=1",
    ),
    (
        "kv_cache of another head size",
        lambda m, x, c: m(x, x, x, kv_cache={k: v[..., :-1] for k, v in c.items()}),
        ValueError,
        "head_size=8",
    ),
    (
        "kv_cache on meta",
        lambda m, x, c: m(x, x, x, kv_cache={k: v.to("meta") for k, v in c.items()}),
        ValueError,
        "kv_cache must be on cpu",
    ),
]


@functools.cache
def cache_of_3_tokens(cls):
    x = x0[:, :3]
    return make(cls)(x, x, x, kv_cache={})[1]


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSED],
)
def test_refused_before_any_op(cls, call, error, match):
    m = make(cls)
    x = x0.clone()
    cache = cache_of_3_tokens(cls)
    captured = []
    call(lambda *a, **kw: captured.append((a, kw)), x, cache)  # the arguments, built outside
    ((args, kwargs),) = captured
    with OpLog() as log, pytest.raises(error, match=match):
        m(*args, **kwargs)
    assert log.ops == [], f"ops ran before the error: {log.ops[:5]}"


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
def test_kv_cache_of_another_dtype_raises(cls):
    """Checked once this step's keys exist (under autocast their dtype depends on the op)."""
    cache = {k: v.float() for k, v in cache_of_3_tokens(cls).items()}
    x = x0[:, 3:]
    with pytest.raises(TypeError, match=r"kv_cache holds torch\.float32/torch\.float32"):
        make(cls)(x, x, x, kv_cache=cache)


# ----- accepted inputs: equal to the float64 oracle -----


def pm_cases():
    """(id, AttentionMask, keep broadcastable to [B, H, Tq, Tk])."""
    pm2 = bools(T, T)
    pm2[:, 0] = False
    pm3 = bools(B, T, T, seed=2)
    pm3[..., 0] = False
    pm4 = bools(B, HEADS, T, T, seed=3)
    pm4[..., 0] = False
    pm1h = bools(1, HEADS, T, T, seed=4)
    pm1h[..., 0] = False
    full_row = torch.zeros(T, T, dtype=torch.bool)
    full_row[2] = True  # query 2 sees no key: zero attention result
    head_row = torch.zeros(1, HEADS, T, T, dtype=torch.bool)
    head_row[0, 1, 3] = True  # head 1 of query 3 sees no key
    return [
        ("causal (None)", None, CAUSAL),
        ("causal=True", AttentionMask(causal=True), CAUSAL),
        ("none", AttentionMask(), None),
        ("[Tq, Tk]", AttentionMask(pm2), ~pm2),
        ("[1, Tq, Tk]", AttentionMask(pm2[None]), ~pm2),
        ("[B, Tq, Tk]", AttentionMask(pm3), ~pm3[:, None]),
        ("[B, 1, Tq, Tk]", AttentionMask(pm3[:, None]), ~pm3[:, None]),
        ("[B, H, Tq, Tk]", AttentionMask(pm4), ~pm4),
        ("[1, H, Tq, Tk]", AttentionMask(pm1h), ~pm1h),
        ("non-contiguous [Tq, Tk]", AttentionMask(pm2.t().contiguous().t()), ~pm2),
        ("padding", AttentionMask(src_length_mask=PAD), ~PAD[:, None, None]),
        (
            "padding + causal=True",
            AttentionMask(src_length_mask=PAD, causal=True),
            CAUSAL & ~PAD[:, None, None],
        ),
        ("[B, Tq, Tk] + causal=True", AttentionMask(pm3, causal=True), CAUSAL & ~pm3[:, None]),
        (
            "[B, H, Tq, Tk] + padding",
            AttentionMask(pm4, PAD),
            ~pm4 & ~PAD[:, None, None],
        ),
        ("fully masked query", AttentionMask(full_row), ~full_row),
        ("fully masked head", AttentionMask(head_row), ~head_row),
    ]


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
@pytest.mark.parametrize(("mask", "keep"), [pytest.param(m, k, id=i) for i, m, k in pm_cases()])
def test_accepted_masks_match_float64_oracle(cls, mask, keep):
    m = make(cls)
    x = randn(B, T, D_MODEL, seed=7)
    out, _ = m(x, x, x, mask=mask)
    torch.testing.assert_close(out, oracle(m, x, x, keep), rtol=1e-9, atol=1e-10)


def strided_cases():
    big = randn(T, B, 2 * D_MODEL, seed=8)
    return [
        ("transposed", lambda: big[..., :D_MODEL].transpose(0, 1)),
        ("every other token", lambda: randn(B, 2 * T, D_MODEL, seed=9)[:, ::2]),
        ("every other channel", lambda: randn(B, T, 2 * D_MODEL, seed=10)[..., ::2]),
        ("expanded batch", lambda: randn(1, T, D_MODEL, seed=11).expand(B, T, D_MODEL)),
    ]


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
@pytest.mark.parametrize("expert_impl", ["dense", "cvmm"])
@pytest.mark.parametrize("make_x", [pytest.param(f, id=i) for i, f in strided_cases()])
def test_non_contiguous_inputs_match_float64_oracle(cls, expert_impl, make_x):
    m = make(cls, expert_impl=expert_impl)
    x = make_x()
    assert not x.is_contiguous()
    out, _ = m(x, x, x)
    torch.testing.assert_close(out, oracle(m, x, x, CAUSAL), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out, m(x.contiguous(), x.contiguous(), x.contiguous())[0])


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
@pytest.mark.parametrize(
    ("shape_q", "shape_kv", "mask"),
    [
        pytest.param((0, T), (0, T), None, id="B=0"),
        pytest.param((B, 0), (B, T), AttentionMask(), id="Tq=0 cross"),
        pytest.param((B, 0), (B, 0), None, id="Tq=Tk=0 causal"),
        pytest.param((B, 0), (B, T), AttentionMask(src_length_mask=PAD), id="Tq=0 padded"),
    ],
)
def test_empty_inputs_give_empty_outputs(cls, shape_q, shape_kv, mask):
    m = make(cls)
    q = randn(*shape_q, D_MODEL, seed=12)
    kv = randn(*shape_kv, D_MODEL, seed=13)
    out, cache = m(q, kv, kv, mask=mask, kv_cache={})
    assert out.shape == (*shape_q, D_MODEL) and out.dtype == torch.float64
    assert cache["k"].shape == (shape_kv[0], HEADS, shape_kv[1], m.head_size)


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_stay_in_their_sequence(cls, bad):
    """A NaN/Inf in one sequence gives non-finite outputs there (from its position on) and leaves
    the other sequence equal to the oracle."""
    m = make(cls)
    x = randn(B, T, D_MODEL, seed=14)
    x[0, 2, 3] = bad
    out, _ = m(x, x, x)
    torch.testing.assert_close(out[1:], oracle(m, x[1:], x[1:], CAUSAL), rtol=1e-9, atol=1e-10)
    assert not torch.isfinite(out[0, 2:]).all(dim=-1).any()


@pytest.mark.parametrize("cls", [SwitchHeadRope, SwitchHeadXL])
def test_causal_cross_attention_with_fewer_queries_is_bottom_right_aligned(cls):
    m = make(cls)
    q = randn(B, 3, D_MODEL, seed=15)
    kv = randn(B, T, D_MODEL, seed=16)
    out, _ = m(q, kv, kv)
    expected_keep = torch.ones(3, T, dtype=torch.bool).tril(T - 3)
    # query i is at position i (its RoPE/XL position), keys at 0..T-1: compare with the same
    # module on explicit masks
    explicit, _ = m(q, kv, kv, mask=AttentionMask(position_mask=~expected_keep))
    torch.testing.assert_close(out, explicit, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(lambda r, x: r(x, offset=-1), ValueError, "offset", id="negative offset"),
        pytest.param(lambda r, x: r(x, seq_dim=-1), ValueError, "seq_dim", id="seq_dim=channels"),
        pytest.param(lambda r, x: r(x, seq_dim=3), ValueError, "seq_dim", id="seq_dim too big"),
        pytest.param(lambda r, x: r(x, seq_dim=-5), ValueError, "seq_dim", id="seq_dim too small"),
        pytest.param(lambda r, x: r(x.long()), TypeError, "floating", id="integer x"),
        pytest.param(lambda r, x: r(x[..., :-1]), ValueError, "8", id="wrong channels"),
        pytest.param(lambda r, x: r(x[0, 0, 0]), ValueError, "2 dims", id="1-D x"),
    ],
)
def test_rotary_embedding_refuses(call, error, match):
    rope = RotaryEmbedding(4, head_size=8)
    x = randn(2, 5, 8)[:, :, None].expand(2, 5, 3, 8)
    captured = []
    call(lambda *a, **kw: captured.append((a, kw)), x)
    ((args, kwargs),) = captured
    with OpLog() as log, pytest.raises(error, match=match):
        rope(*args, **kwargs)
    assert log.ops == []


@pytest.mark.parametrize("seq_dim", [0, 1, -3, -2])
def test_rotary_embedding_any_sequence_dim_matches_formula(seq_dim):
    rope = RotaryEmbedding(4, head_size=6).double()
    x = randn(3, 4, 5, 6, seed=17)
    out = rope(x, offset=2, seq_dim=seq_dim)
    d = seq_dim % 4
    pos = (torch.arange(x.shape[d]) + 2).double()
    shape = [1] * 3  # the dims of one channel x[..., c]
    shape[d] = -1
    expected = x.clone()
    for c in range(2):
        theta = (pos * 10000.0 ** (-2 * c / 4)).view(shape)
        a, b = x[..., c], x[..., c + 2]
        expected[..., c] = a * theta.cos() - b * theta.sin()
        expected[..., c + 2] = b * theta.cos() + a * theta.sin()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"moe_k": 0}, id="moe_k=0"),
        pytest.param({"moe_k": E + 1}, id="moe_k>E"),
        pytest.param({"expert_dropout": 1.0}, id="expert_dropout=1"),
        pytest.param({"expert_dropout": -0.1}, id="expert_dropout<0"),
        pytest.param({"dropout": 1.0}, id="dropout=1"),
        pytest.param({"expert_impl": "sparse"}, id="expert_impl"),
        pytest.param({"rotate_fraction": 1.5}, id="rotate_fraction"),
    ],
)
def test_constructor_refuses(kwargs):
    with pytest.raises(ValueError):
        SwitchHeadRope(D_MODEL, HEADS, E, d_head=D_HEAD, **kwargs)


def test_sdpa_mask_shapes():
    """The keep mask always has 4 dims, batch first, heads second."""
    pm3 = bools(B, T, T)
    keep, causal = sdpa_mask(AttentionMask(pm3), B, T, T, torch.device("cpu"), HEADS)
    assert keep.shape == (B, 1, T, T) and not causal
    assert torch.equal(keep, ~pm3[:, None])
    assert sdpa_mask(AttentionMask(causal=True), B, T, T, torch.device("cpu")) == (None, True)
    keep, _ = sdpa_mask(AttentionMask(causal=True), B, 2, T, torch.device("cpu"))
    assert torch.equal(keep[0, 0], torch.ones(2, T, dtype=torch.bool).tril(T - 2))
