"""MoEUT, MoEUTLM and SigmaMoE on bad and unusual inputs (issue #15).

Every case either raises a clear error before the model computes anything (checked with a
dispatch mode that records every ATen op: only the read-back of the token range may run), or
returns what a float64 reference computation gives (an explicit formula, or the same float64
module on the equivalent plain input).
"""

from __future__ import annotations

import functools

import pytest
import torch
from moeut import MoEUT, MoEUTLM, SigmaMoE, SwitchHeadXL, entropy_reg
from switchhead import AttentionMask, SwitchHeadRope
from torch.utils._python_dispatch import TorchDispatchMode

N_TOKENS, D_MODEL, HEADS = 20, 16, 2
B, T = 2, 5
aten = torch.ops.aten
# what the token range check may run (min/max, one stacked read-back)
TOKEN_CHECK_OPS = {
    aten.min.default,
    aten.max.default,
    aten.stack.default,
    aten.cat.default,
    aten.unsqueeze.default,
    aten.view.default,
    aten._local_scalar_dense.default,
}


class OpLog(TorchDispatchMode):
    """Records every ATen op that runs inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@functools.cache
def lm(attention=SwitchHeadRope):
    """One float64 eval-mode LM per attention class, shared (no test changes it)."""
    torch.manual_seed(0)
    return (
        MoEUTLM(
            n_tokens=N_TOKENS,
            d_model=D_MODEL,
            n_layers=2,
            n_heads=HEADS,
            ff_n_experts=4,
            att_n_experts=2,
            d_head=8,
            group_size=2,
            ff_k=2,
            att_k=1,
            ff_expert_size=8,
            attention=attention,
        )
        .double()
        .eval()
    )


@functools.cache
def moe():
    torch.manual_seed(0)
    return SigmaMoE(D_MODEL, 6, 8, k=2).double()


def tokens(*shape, seed=0):
    return torch.randint(0, N_TOKENS, shape, generator=torch.Generator().manual_seed(seed))


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def bools(*shape, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.3


@functools.cache
def cache_of_3_tokens():
    return lm()(tokens(B, 3), kv_cache={}).cache


X = tokens(B, T)
Z = torch.zeros(B, T, dtype=torch.bool)


def masked(**kw):
    return lambda m, x: m(x, mask=AttentionMask(**kw))


def step(**kw):
    """Decode 2 tokens after the 3 cached ones with ``mask=AttentionMask(**kw)``."""
    return lambda m, x: m(x[:, :2], mask=AttentionMask(**kw), kv_cache=cache_of_3_tokens())


# (id, target: "lm" | "stack" | "moe" | "generate", call(target, x), exception, message)
REFUSED = [
    ("float tokens", "lm", lambda m, x: m(x.double()), TypeError, "integer token ids"),
    ("bool tokens", "lm", lambda m, x: m(x > 3), TypeError, "integer token ids"),
    ("int16 tokens", "lm", lambda m, x: m(x.short()), TypeError, "integer token ids"),
    ("list tokens", "lm", lambda m, x: m(x.tolist()), TypeError, "must be a tensor"),
    ("1-D tokens", "lm", lambda m, x: m(x[0]), ValueError, r"\[B, T\]"),
    ("3-D tokens", "lm", lambda m, x: m(x[None]), ValueError, r"\[B, T\]"),
    ("token id = n_tokens", "lm", lambda m, x: m(x.clamp(max=0) + 20), IndexError, r"\[0, 20\)"),
    ("token id = -1", "lm", lambda m, x: m(x - x.max() - 1), IndexError, r"\[0, 20\)"),
    ("meta tokens", "lm", lambda m, x: m(x.to("meta")), ValueError, "meta"),
    ("mask is a tensor", "lm", lambda m, x: m(x, mask=Z), TypeError, "AttentionMask"),
    ("float position_mask", "lm", masked(position_mask=torch.zeros(T, T)), TypeError, "boolean"),
    (
        "narrow position_mask",
        "lm",
        masked(position_mask=torch.zeros(T, T - 1, dtype=torch.bool)),
        ValueError,
        "position_mask must be",
    ),
    (
        "[B', T, T] position_mask",
        "lm",
        masked(position_mask=torch.zeros(B + 1, T, T, dtype=torch.bool)),
        ValueError,
        "position_mask must be",
    ),
    (
        "[B, H', T, T] position_mask",
        "lm",
        masked(position_mask=torch.zeros(B, HEADS + 1, T, T, dtype=torch.bool)),
        ValueError,
        "position_mask must be",
    ),
    (
        "5-D position_mask",
        "lm",
        masked(position_mask=torch.zeros(1, B, HEADS, T, T, dtype=torch.bool)),
        ValueError,
        "position_mask must be",
    ),
    (
        "short src_length_mask",
        "lm",
        masked(src_length_mask=Z[:, :-1]),
        ValueError,
        "src_length_mask must be",
    ),
    ("float src_length_mask", "lm", masked(src_length_mask=Z.double()), TypeError, "boolean"),
    (
        "src_length_mask without the cache",
        "lm",
        step(src_length_mask=Z[:, :2]),
        ValueError,
        r"Tk=5\] \(keys include the KV cache\)",
    ),
    (
        "position_mask without the cache",
        "lm",
        step(position_mask=torch.zeros(2, 2, dtype=torch.bool)),
        ValueError,
        r"Tk=5 \(keys include the KV cache\)",
    ),
    ("kv_cache is a list", "lm", lambda m, x: m(x, kv_cache=[]), TypeError, "kv_cache"),
    ("stack: 2-D x", "stack", lambda m, x: m(x[0]), ValueError, r"\[B, T, d_model=16\]"),
    ("stack: wrong d_model", "stack", lambda m, x: m(x[..., :8]), ValueError, "d_model=16"),
    ("stack: integer x", "stack", lambda m, x: m(x.long()), TypeError, "floating point"),
    ("stack: float32 x", "stack", lambda m, x: m(x.float()), TypeError, "parameters' dtype"),
    ("stack: meta x", "stack", lambda m, x: m(x.to("meta")), ValueError, "meta"),
    (
        "stack: narrow position_mask",
        "stack",
        lambda m, x: m(x, mask=AttentionMask(torch.zeros(T, 1, dtype=torch.bool))),
        ValueError,
        "position_mask must be",
    ),
    ("generate: max_new_tokens < 0", "generate", lambda g, x: g(x, -1), ValueError, ">= 0"),
    ("generate: float max_new_tokens", "generate", lambda g, x: g(x, 2.0), TypeError, "an int"),
    ("generate: bool max_new_tokens", "generate", lambda g, x: g(x, True), TypeError, "an int"),
    (
        "generate: temperature < 0",
        "generate",
        lambda g, x: g(x, 2, temperature=-0.5),
        ValueError,
        "temperature",
    ),
    (
        "generate: NaN temperature",
        "generate",
        lambda g, x: g(x, 2, temperature=float("nan")),
        ValueError,
        "temperature",
    ),
    (
        "generate: inf temperature",
        "generate",
        lambda g, x: g(x, 2, temperature=float("inf")),
        ValueError,
        "temperature",
    ),
    ("generate: top_k = 0", "generate", lambda g, x: g(x, 2, top_k=0), ValueError, "top_k"),
    ("generate: top_k < 0", "generate", lambda g, x: g(x, 2, top_k=-3), ValueError, "top_k"),
    ("generate: float top_k", "generate", lambda g, x: g(x, 2, top_k=1.5), ValueError, "top_k"),
    ("generate: empty prompt", "generate", lambda g, x: g(x[:, :0], 2), ValueError, "T >= 1"),
    (
        "generate: token out of range",
        "generate",
        lambda g, x: g(x + N_TOKENS, 2),
        IndexError,
        r"\[0, 20\)",
    ),
    ("generate: float prompt", "generate", lambda g, x: g(x.float(), 2), TypeError, "integer"),
    (
        "moe: sel_input transposed",
        "moe",
        lambda f, x: f(x, x.transpose(0, 1)),
        ValueError,
        "sel_input must have input's shape",
    ),
    (
        "moe: sel_input flattened",
        "moe",
        lambda f, x: f(x, x.flatten(0, 1)),
        ValueError,
        "sel_input must have input's shape",
    ),
    (
        "moe: sel_input with fewer rows",
        "moe",
        lambda f, x: f(x, x[:, :-1]),
        ValueError,
        "sel_input must have input's shape",
    ),
    (
        "moe: sel_input of another width",
        "moe",
        lambda f, x: f(x, x[..., :-1]),
        ValueError,
        "sel_input must have input's shape",
    ),
    ("moe: input of another width", "moe", lambda f, x: f(x[..., :-1]), ValueError, "d_model=16"),
    ("moe: 0-dim input", "moe", lambda f, x: f(x[0, 0, 0]), ValueError, "d_model=16"),
    ("moe: integer input", "moe", lambda f, x: f(x.long()), TypeError, "floating point"),
    ("moe: float32 input", "moe", lambda f, x: f(x.float()), TypeError, "parameters' dtype"),
    (
        "moe: float32 sel_input",
        "moe",
        lambda f, x: f(x, x.float()),
        TypeError,
        "parameters' dtype",
    ),
    ("moe: meta input", "moe", lambda f, x: f(x.to("meta")), ValueError, "parameters' device"),
    (
        "moe: meta sel_input",
        "moe",
        lambda f, x: f(x, x.to("meta")),
        ValueError,
        "parameters' device",
    ),
    ("moe: list input", "moe", lambda f, x: f(x.tolist()), TypeError, "must be a tensor"),
]


@pytest.mark.parametrize(
    ("target", "call", "error", "match"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSED],
)
def test_refused_before_any_computation(target, call, error, match):
    m = {"lm": lm, "stack": lambda: lm().transformer, "moe": moe}.get(target, lm)()
    fn = m.generate if target == "generate" else m
    x = X if target in ("lm", "generate") else randn(B, T, D_MODEL)
    captured = []
    call(lambda *a, **kw: captured.append((a, kw)), x)  # the arguments, built outside the log
    ((args, kwargs),) = captured
    with OpLog() as log, pytest.raises(error, match=match):
        fn(*args, **kwargs)
    assert set(log.ops) <= TOKEN_CHECK_OPS, f"computation ran before the error: {log.ops[:8]}"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: SigmaMoE(D_MODEL, 6, 8, k=0), id="SigmaMoE k=0"),
        pytest.param(lambda: SigmaMoE(D_MODEL, 6, 8, k=7), id="SigmaMoE k>n_experts"),
        pytest.param(lambda: SigmaMoE(D_MODEL, 6, 8, 2, expert_dropout=1.0), id="expert_dropout=1"),
        pytest.param(lambda: SigmaMoE(D_MODEL, 6, 0, 2), id="SigmaMoE expert_size=0"),
        pytest.param(lambda: MoEUT(D_MODEL, 3, HEADS, 8, 4, 2, group_size=2), id="group_size"),
        pytest.param(
            lambda: MoEUT(D_MODEL, 2, HEADS, 8, 4, 2, att_expert_dropout=1.0), id="att dropout=1"
        ),
    ],
)
def test_constructor_refuses(make):
    with pytest.raises(ValueError):
        make()


# ----- accepted inputs: equal to a float64 reference -----


def causal_or(pm: torch.Tensor) -> torch.Tensor:
    """The LM's mask in the authors' (stack) convention: position mask OR not-yet-seen."""
    return pm | torch.ones(T, T, dtype=torch.bool).triu(1)


def lm_mask_cases():
    """(id, mask given to MoEUTLM, the equivalent mask for the MoEUT stack)."""
    pm2, pm3, pm4 = bools(T, T), bools(B, T, T, seed=2), bools(B, HEADS, T, T, seed=3)
    pad = Z.clone()
    pad[1, 3:] = True
    return [
        ("None", None, None),
        ("AttentionMask()", AttentionMask(), None),
        ("causal=True", AttentionMask(causal=True), None),
        ("all-False [T, T]", AttentionMask(torch.zeros(T, T, dtype=torch.bool)), None),
        ("[T, T]", AttentionMask(pm2), AttentionMask(causal_or(pm2))),
        ("[B, T, T]", AttentionMask(pm3), AttentionMask(causal_or(pm3)[:, None])),
        ("[B, 1, T, T]", AttentionMask(pm3[:, None]), AttentionMask(causal_or(pm3)[:, None])),
        ("[B, H, T, T]", AttentionMask(pm4), AttentionMask(causal_or(pm4))),
        ("padding", AttentionMask(src_length_mask=pad), AttentionMask(causal_or(Z[0, None]), pad)),
        ("[T, T] + padding", AttentionMask(pm2, pad), AttentionMask(causal_or(pm2), pad)),
    ]


@pytest.mark.parametrize("attention", [SwitchHeadRope, SwitchHeadXL], ids=["rope", "xl"])
@pytest.mark.parametrize(
    ("mask", "stack_mask"), [pytest.param(m, s, id=i) for i, m, s in lm_mask_cases()]
)
def test_lm_masks_are_always_causal(attention, mask, stack_mask):
    """MoEUTLM(mask) equals the float64 stack given the explicitly causal mask."""
    m = lm(attention)
    out = m(X, mask=mask).outputs
    hidden = m.transformer(m.embedding(X), mask=stack_mask).outputs
    torch.testing.assert_close(out, m.lm_head(m.out_norm(hidden)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attention", [SwitchHeadRope, SwitchHeadXL], ids=["rope", "xl"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_sequences(attention, side):
    """Valid tokens of a padded batch get the logits of the unpadded sequence (relative
    positions, so left padding shifts nothing); padded queries see no key and stay finite."""
    m = lm(attention)
    x = tokens(B, 6, seed=4)
    pad = torch.zeros(B, 6, dtype=torch.bool)
    valid = slice(2, None) if side == "left" else slice(None, 4)
    pad[1] = True
    pad[1, valid] = False
    out = m(x, mask=AttentionMask(src_length_mask=pad)).outputs
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], m(x[:1]).outputs[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[1, valid], m(x[1:, valid]).outputs[0], rtol=1e-9, atol=1e-9)


def test_decoding_a_padded_batch_with_the_cache_equals_the_full_forward():
    m = lm()
    x = tokens(B, 6, seed=5)
    pad = torch.zeros(B, 6, dtype=torch.bool)
    pad[0, 4:] = True
    full = m(x, mask=AttentionMask(src_length_mask=pad)).outputs
    out = m(x[:, :3], mask=AttentionMask(src_length_mask=pad[:, :3]), kv_cache={})
    pieces = [out.outputs]
    for t in range(3, 6):
        out = m(x[:, t : t + 1], AttentionMask(src_length_mask=pad[:, : t + 1]), out.cache)
        pieces.append(out.outputs)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "make_tokens",
    [
        pytest.param(lambda: X.int(), id="int32"),
        pytest.param(lambda: X.t().contiguous().t(), id="transposed"),
        pytest.param(lambda: torch.stack([X, X], -1)[..., 0], id="strided"),
        pytest.param(lambda: X[:1].expand(B, T), id="expanded"),
    ],
)
def test_token_layouts_and_dtypes_match_int64(make_tokens):
    m = lm()
    x = make_tokens()
    torch.testing.assert_close(m(x).outputs, m(x.long().contiguous()).outputs, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(B, 0), (0, T), (0, 0)])
@pytest.mark.parametrize("training", [False, True])
def test_empty_token_batches(shape, training):
    m = lm()
    m.train(training)
    try:
        out = m(torch.zeros(shape, dtype=torch.long))
    finally:
        m.eval()
    assert out.outputs.shape == (*shape, N_TOKENS)
    assert out.reg_loss.item() == 0.0


def test_generate_edge_arguments_match_greedy():
    m = lm()
    prompt = tokens(B, 3, seed=6)
    greedy = m.generate(prompt, 4, temperature=0)
    assert torch.equal(m.generate(prompt, 0), prompt)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(m.generate(prompt, 4, top_k=1, generator=g), greedy)
    assert torch.equal(m.generate(prompt, 4, temperature=1e-30, generator=g), greedy)
    a = m.generate(prompt, 4, top_k=N_TOKENS + 5, generator=torch.Generator().manual_seed(1))
    b = m.generate(prompt, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def moe_formula(f: SigmaMoE, x: torch.Tensor, sel_in: torch.Tensor) -> torch.Tensor:
    """sum over the top-k sigmoid-scored experts of score * relu(x @ keys[e]) @ values[e]."""
    scores = (sel_in.double() @ f.expert_sel.detach().T).sigmoid()
    gate, index = scores.topk(f.n_heads, dim=-1)
    hidden = torch.relu(torch.einsum("...d,...kdh->...kh", x.double(), f.keys.detach()[index]))
    return torch.einsum("...k,...kh,...khd->...d", gate, hidden, f.values.detach()[index])


def moe_inputs():
    base = randn(3, 4, 2 * D_MODEL, seed=7)
    return [
        ("transposed input", lambda: base[..., :D_MODEL].transpose(0, 1), None),
        ("every other channel", lambda: base[..., ::2], None),
        ("transposed sel_input", lambda: randn(3, 4, D_MODEL), lambda: base[..., ::2]),
        ("expanded", lambda: randn(1, 4, D_MODEL).expand(3, 4, D_MODEL), None),
        ("1-D", lambda: randn(D_MODEL), None),
        ("4-D", lambda: randn(2, 2, 3, D_MODEL), None),
        ("empty rows", lambda: randn(0, D_MODEL), None),
        ("empty middle dim", lambda: randn(3, 0, D_MODEL), None),
    ]


@pytest.mark.parametrize(
    ("make_x", "make_sel"), [pytest.param(x, s, id=i) for i, x, s in moe_inputs()]
)
def test_sigma_moe_inputs_match_formula(make_x, make_sel):
    f = moe()
    x = make_x()
    sel_in = make_sel() if make_sel else x
    out = f(x, sel_in if make_sel else None)
    assert out.shape == x.shape
    torch.testing.assert_close(out, moe_formula(f, x, sel_in), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_sigma_moe_non_finite_row_stays_in_its_row(bad):
    f = moe()
    x = randn(4, D_MODEL, seed=8)
    x[1, 3] = bad
    out = f(x)
    rows = [0, 2, 3]
    torch.testing.assert_close(out[rows], moe_formula(f, x[rows], x[rows]), rtol=1e-12, atol=0)
    assert not torch.isfinite(out[1]).all()


def test_entropy_reg_of_empty_logits_is_zero_and_differentiable():
    logits = torch.zeros(2, 0, 5, requires_grad=True)
    loss = entropy_reg(logits, -2)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == logits.shape
