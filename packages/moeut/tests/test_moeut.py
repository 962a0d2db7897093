"""MoEUT: shapes, regularisation, KV cache, profiles, state_dict layout, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moeut import MoEUT, MoEUTLM, SigmaMoE, SwitchHeadXL, entropy_reg, profiles
from switchhead import AttentionMask


def test_sigma_moe_matches_direct_formula():
    torch.manual_seed(0)
    moe = SigmaMoE(16, 6, 8, k=2).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    sel_in = torch.randn(3, 5, 16, dtype=torch.float64)
    scores = (sel_in @ moe.expert_sel.T).sigmoid()
    gate, index = scores.topk(2, dim=-1)
    hidden = torch.relu(torch.einsum("btd,btkdh->btkh", x, moe.keys[index]))
    expected = torch.einsum("btk,btkh,btkhd->btd", gate, hidden, moe.values[index])
    torch.testing.assert_close(moe(x, sel_in), expected)


@pytest.mark.parametrize("attention", ["rope", "xl"])
@pytest.mark.parametrize("att_n_experts", [1, 4])
def test_lm_shapes_and_kv_cache(attention, att_n_experts, tiny_lm):
    kw = {"attention": SwitchHeadXL} if attention == "xl" else {}
    m = tiny_lm(att_n_experts=att_n_experts, **kw).double().eval()
    x = torch.randint(0, 40, (2, 9))
    out = m(x)
    assert out.outputs.shape == (2, 9, 40) and out.cache is None
    assert out.reg_loss.item() == 0.0  # not training
    cache: dict = {}
    pieces = []
    for t in range(9):
        step = m(x[:, t : t + 1], kv_cache=cache)
        cache = step.cache
        pieces.append(step.outputs)
    assert sorted(cache) == list(range(4))
    torch.testing.assert_close(torch.cat(pieces, 1), out.outputs, rtol=1e-9, atol=1e-9)


def test_masks_none_and_padding(tiny_lm):
    m = tiny_lm().double().eval()
    x = torch.randint(0, 40, (2, 6))
    emb = m.embedding(x)
    # the MoEUT stack keeps the authors' meaning: AttentionMask() attends everywhere (no TypeError)
    no_mask = m.transformer(emb, mask=AttentionMask(None, None)).outputs
    assert not torch.allclose(no_mask[:, 0], m.transformer(emb).outputs[:, 0])
    causal = m(x).outputs
    # the LM is always causal
    torch.testing.assert_close(m(x, mask=AttentionMask(None, None)).outputs, causal)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    causal_pm = torch.ones(6, 6, dtype=torch.bool).triu(1)
    padded = m(x, mask=AttentionMask(causal_pm, pad)).outputs
    torch.testing.assert_close(padded[0], causal[0])
    torch.testing.assert_close(padded[1, :4], causal[1, :4])


def test_reg_loss_matches_direct_entropy(tiny_lm):
    m = tiny_lm(n_layers=2, group_size=1, entropy_reg=0.5, att_entropy_reg=0.25).double().train()
    x = torch.randint(0, 40, (2, 5))
    logits = {"ff": [], "o": [], "v": []}
    layer = m.transformer.layers[0]

    def record_ffn(mod, inp, out):
        logits["ff"].append(F.linear(inp[1], mod.expert_sel))

    def record_attention(mod, inp, out):
        for key, src, w in (("o", inp[0], mod.sel_o), ("v", inp[1], mod.sel_v)):
            logits[key].append(F.linear(src, w).view(*src.shape[:-1], mod.n_heads, -1))

    hooks = [
        layer.ffn.register_forward_hook(record_ffn),
        layer.attention.register_forward_hook(record_attention),
    ]
    out = m(x)
    for h in hooks:
        h.remove()

    def neg_entropy(chunks, dim):
        p = torch.cat(chunks, dim=dim).softmax(-1).mean(dim)
        return (p * p.log()).sum(-1).mean()

    expected = 0.5 * neg_entropy(logits["ff"], -2) + 0.25 * (
        neg_entropy(logits["o"], -3) + neg_entropy(logits["v"], -3)
    )
    torch.testing.assert_close(out.reg_loss.double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(out.reg_loss)
    out.reg_loss.backward()
    assert layer.ffn.expert_sel.grad is not None and layer.ffn.expert_sel.grad.abs().sum() > 0


def test_reg_loss_zero_with_zero_coefficients(tiny_lm):
    m = tiny_lm(entropy_reg=0.0, att_entropy_reg=0.0).train()
    assert m(torch.randint(0, 40, (2, 5))).reg_loss.item() == 0.0


def test_entropy_reg_of_uniform_choice_is_minus_log_e():
    logits = torch.zeros(3, 7, 5)
    torch.testing.assert_close(entropy_reg(logits, -2), torch.tensor(-torch.log(torch.tensor(5.0))))


PARAMS = {
    "MoEUT_44M": 44.3,
    "MoEUT_126M": 125.7,
    "MoEUT_244M": 243.3,
    "MoEUT_318M": 318.1,
    "MoEUT_727M": 727.4,
    "MoEUT_1B": 1040.3,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_profiles_have_the_paper_parameter_counts(name):
    with torch.device("meta"):
        m = MoEUTLM(8000, **profiles.PROFILES[name])
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == PARAMS[name]


def test_44m_profile_runs():
    """The authors' 44M profile crashes on its odd rotary size (41); ours rotates 40 channels."""
    m = MoEUTLM(8000, **profiles.MoEUT_44M).eval()
    assert m.transformer.layers[0].attention.n_rotate == 40
    with torch.no_grad():
        out = m(torch.randint(0, 8000, (1, 8)))
    assert out.outputs.shape == (1, 8, 8000) and torch.isfinite(out.outputs).all()


def test_state_dict_layout_of_the_authors(tiny_lm):
    m = tiny_lm(n_layers=4, group_size=2)
    keys = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expected = {
        "embedding.weight": (40, 32),
        "lm_head.weight": (40, 32),
        "lm_head.bias": (40,),
        "out_norm.weight": (32,),
        "out_norm.bias": (32,),
    }
    for i in range(2):
        p = f"transformer.layers.{i}."
        expected.update(
            {
                p + "attention.q.weight": (16, 32),
                p + "attention.k.weight": (16, 32),
                p + "attention.v": (8, 32, 8),
                p + "attention.o": (8, 8, 32),
                p + "attention.sel_v": (8, 32),
                p + "attention.sel_o": (8, 32),
                p + "ffn.keys": (8, 32, 16),
                p + "ffn.values": (8, 16, 32),
                p + "ffn.expert_sel": (8, 32),
                p + "ln1.weight": (32,),
                p + "ln1.bias": (32,),
                p + "ln2.weight": (32,),
                p + "ln2.bias": (32,),
            }
        )
    assert keys == expected


def test_generate_greedy_equals_argmax_of_full_forward(tiny_lm):
    m = tiny_lm().double()
    prompt = torch.randint(0, 40, (2, 4))
    seq = m.generate(prompt, 5, temperature=0)
    assert seq.shape == (2, 9) and torch.equal(seq[:, :4], prompt)
    m.eval()
    logits = m(seq[:, :-1]).outputs
    torch.testing.assert_close(logits[:, 3:].argmax(-1), seq[:, 4:])


def test_group_size_must_divide_layers():
    with pytest.raises(ValueError, match="multiple of group_size"):
        MoEUT(32, 5, 2, 16, 8, 4, group_size=2)


def test_compile_fullgraph(tiny_lm):
    m = tiny_lm().eval()
    x = torch.randint(0, 40, (2, 6))
    eager = m(x).outputs
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x).outputs, eager, rtol=1e-4, atol=1e-4)


def test_tiny_model_learns_associative_recall(tiny_lm):
    """Sequences of (key, value) pairs then a query key: predict its value.

    Chance level is log(8) = 2.08 nats for the answer; a model that learned the task gets far
    below 1.0 after a few hundred steps, which is what we assert.
    """
    torch.manual_seed(0)
    m = tiny_lm(
        n_tokens=20,
        d_model=48,
        n_layers=2,
        group_size=1,
        ff_n_experts=8,
        att_n_experts=2,
        d_head=24,
        att_k=1,
    )
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n=64):
        keys = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(n)])
        values = torch.randint(8, 16, (n, 4), generator=g)
        pick = torch.randint(0, 4, (n,), generator=g)
        seq = torch.stack([keys, values], -1).flatten(1)
        query = keys.gather(1, pick[:, None])
        answer = values.gather(1, pick[:, None])
        return torch.cat([seq, query, answer], 1)

    def answer_loss(x):
        logits = m(x[:, :-1]).outputs[:, -1]
        return F.cross_entropy(logits, x[:, -1])

    m.train()
    for _ in range(300):
        x = batch()
        out = m(x[:, :-1])
        loss = F.cross_entropy(out.outputs[:, -1], x[:, -1]) + out.reg_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        final = answer_loss(batch(256)).item()
    assert final < 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_every_profile_runs_on_cuda(name):
    m = MoEUTLM(8000, **profiles.PROFILES[name]).cuda()
    x = torch.randint(0, 8000, (1, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x)
    assert torch.isfinite(out.outputs).all()
    (out.outputs.float().mean() + out.reg_loss).backward()


# ----- issue #15 -----


@pytest.mark.parametrize("attention", ["rope", "xl"])
def test_lm_with_padding_mask_stays_causal(attention, tiny_lm):
    """A padding mask used to replace the causal mask: the padded batch trained a bidirectional
    model. Now the logits of the valid tokens equal those of the unpadded sequences."""
    kw = {"attention": SwitchHeadXL} if attention == "xl" else {}
    m = tiny_lm(**kw).double().eval()
    x = torch.randint(0, 40, (2, 7))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True  # the second sequence has 4 tokens
    out = m(x, mask=AttentionMask(src_length_mask=pad)).outputs
    torch.testing.assert_close(out[0], m(x[:1]).outputs[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[1, :4], m(x[1:, :4]).outputs[0], rtol=1e-9, atol=1e-9)
    later = x.clone()
    later[:, 5] = (later[:, 5] + 1) % 40  # changing a later token leaves earlier logits alone
    out_later = m(later, mask=AttentionMask(src_length_mask=pad)).outputs
    torch.testing.assert_close(out_later[:, :5], out[:, :5], rtol=1e-9, atol=1e-9)


def test_sigma_moe_refuses_sel_input_of_another_shape():
    """Rows of sel_input choose the experts of the same rows of input: a sel_input with other
    leading dims (same number of rows) used to compute on the wrong rows."""
    moe = SigmaMoE(16, 6, 8, k=2).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    for sel_in in (x.transpose(0, 1), x.reshape(15, 16), x[:, :4]):
        with pytest.raises(ValueError, match="sel_input must have input's shape"):
            moe(x, sel_in)


@pytest.mark.parametrize("shape", [(2, 0), (0, 3)])
def test_training_forward_without_tokens(shape, tiny_lm):
    """T = 0 raised "math domain error" and B = 0 gave a NaN regularisation loss."""
    m = tiny_lm().double().train()
    out = m(torch.zeros(shape, dtype=torch.long))
    assert out.outputs.shape == (*shape, 40)
    assert out.reg_loss.item() == 0.0
    (out.outputs.sum() + out.reg_loss).backward()
    assert entropy_reg(torch.zeros(2, 0, 5), -2).item() == 0.0


def test_generate_refuses_bad_arguments(tiny_lm):
    m = tiny_lm().double()
    prompt = torch.randint(0, 40, (2, 3))
    for kwargs, match in [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 2, "temperature": -0.5}, "temperature"),
        ({"max_new_tokens": 2, "temperature": float("nan")}, "temperature"),
        ({"max_new_tokens": 2, "top_k": 0}, "top_k"),
        ({"max_new_tokens": 2, "top_k": -2}, "top_k"),
    ]:
        with pytest.raises(ValueError, match=match):
            m.generate(prompt, **kwargs)
    seq = m.generate(prompt, 0)
    assert torch.equal(seq, prompt) and seq.data_ptr() != prompt.data_ptr()


@pytest.mark.gpu
def test_deferred_weight_grads_give_the_same_gradients(tiny_lm):
    """``deferred_weight_grads``: one weight-gradient GEMM per shared expert weight over all its
    applications (cvmm's deferred mode, Triton on CUDA) gives the default path's gradients."""
    model = tiny_lm().cuda()
    tokens = torch.randint(0, model.embedding.num_embeddings, (2, 24), device="cuda")
    grads = []
    for deferred in (False, True):
        model.transformer.deferred_weight_grads = deferred
        model.zero_grad(set_to_none=True)
        out = model(tokens)
        (out.outputs.square().mean() + out.reg_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, want in grads[0].items():
        err = float((grads[1][name] - want).norm() / want.norm().clamp_min(1e-30))
        assert err < 1e-4, (name, err)


def test_repeated_layers_round_their_expert_weight_grads_per_use(tiny_lm):
    """Only layers applied several times per step give each use's expert-weight gradients in
    the compute dtype (``SigmaMoE.weight_grads_in_compute_dtype``)."""
    for layer in tiny_lm().transformer.layers:
        assert layer.ffn.weight_grads_in_compute_dtype
        assert layer.attention.weight_grads_in_compute_dtype
    for layer in tiny_lm(group_size=4).transformer.layers:
        assert not layer.ffn.weight_grads_in_compute_dtype
        assert not layer.attention.weight_grads_in_compute_dtype


@pytest.mark.gpu
def test_compiled_training_step_rounds_shared_expert_grads(tiny_lm):
    """Compiled, each use of a shared layer gives bf16-rounded expert-weight gradients that the
    graph sums in fp32: within bf16's precision of the unrounded sum, float32, not the same
    bits. (Compiled against compiled: the same graph chooses the same experts; eager and
    Inductor may round a selection logit apart and choose another expert.)"""
    from testing_support import rel_error

    m = tiny_lm().cuda()
    x = torch.randint(0, 40, (2, 16), device="cuda")
    experts = (".ffn.keys", ".ffn.values", ".attention.v", ".attention.o")

    def expert_grads(rounded: bool):
        for layer in m.transformer.layers:
            layer.ffn.weight_grads_in_compute_dtype = rounded
            layer.attention.weight_grads_in_compute_dtype = rounded
        torch._dynamo.reset()
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = torch.compile(m, fullgraph=True)(x)
        (out.outputs.float().square().mean() + out.reg_loss).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if n.endswith(experts)}

    plain, rounded = expert_grads(False), expert_grads(True)
    assert plain.keys() == rounded.keys() and len(plain) == 8
    for name in ("transformer.layers.0.ffn.keys", "transformer.layers.1.ffn.values"):
        assert not torch.equal(rounded[name], plain[name]), name
    for name, want in plain.items():
        assert rounded[name].dtype == torch.float32, name
        assert rel_error(rounded[name], want) < 1e-2, (name, rel_error(rounded[name], want))
