"""softmax_n.surgery on small Hugging Face models built offline, and the policy registry."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from softmax_n import slow_attention_n
from softmax_n.surgery import apply_attention_softmax_n, policy_registry

transformers = pytest.importorskip("transformers")


def bert():
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.BertModel(cfg).eval().double()


def llama():
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)  # the same weights whatever ran before in this process
    return transformers.LlamaForCausalLM(cfg).eval().double()


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        is_causal=None, **kwargs):  # fmt: skip
    """transformers' SDPA attention with ``slow_attention_n`` in place of SDPA: the test's oracle
    (the mask logic is SDPA's: causal only without a mask, for more than one query)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    out = slow_attention_n(
        query, key, value, attn_mask=attention_mask, is_causal=causal, scale=scaling,
        softmax_n_param=module.config.oracle_n,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def expected_output(model, n, *args):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("oracle_n", reference_attention)
    AttentionMaskInterface.register("oracle_n", sdpa_mask)
    oracle = copy.deepcopy(model)
    oracle.config.oracle_n = n
    oracle.set_attn_implementation("oracle_n")
    with torch.no_grad():
        return oracle(*args)


INPUT = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(2, 9, dtype=torch.long)
MASK[1, 6:] = 0


@pytest.mark.parametrize("build", [bert, llama])
@pytest.mark.parametrize("n", [0.5, 1.0, 3.0])
def test_surgery_matches_the_oracle(build, n):
    model = build()
    want = expected_output(model, n, INPUT, MASK)
    with torch.no_grad():
        before = model(INPUT, attention_mask=MASK)
    converted = apply_attention_softmax_n(model, n)
    assert converted == [""]
    with torch.no_grad():
        got = model(INPUT, attention_mask=MASK)
    key = "last_hidden_state" if "last_hidden_state" in got else "logits"
    valid = MASK.bool()  # padded query rows are not compared
    torch.testing.assert_close(got[key][valid], want[key][valid])
    assert not torch.allclose(got[key][valid], before[key][valid])


@pytest.mark.parametrize("build", [bert, llama])
def test_n_zero_leaves_outputs_unchanged(build):
    model = build()
    with torch.no_grad():
        before = [model(INPUT, attention_mask=MASK)[0], model(INPUT)[0]]
    apply_attention_softmax_n(model, 0.0)
    with torch.no_grad():
        after = [model(INPUT, attention_mask=MASK)[0], model(INPUT)[0]]
    valid = MASK.bool()
    torch.testing.assert_close(after[0][valid], before[0][valid])
    torch.testing.assert_close(after[1], before[1])


def test_llama_generation_with_kv_cache_runs():
    model = llama()
    apply_attention_softmax_n(model, 1.0)
    model.generation_config.eos_token_id = None  # a random model may emit EOS and stop early
    out = model.generate(INPUT[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 13)
    with torch.no_grad():  # the cached step equals a full forward on the longer sequence
        full = model(out[:, :-1]).logits[:, -1]
    assert torch.equal(full.argmax(-1), out[:, -1])


class ToyAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.n = 0.0
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        q = self.proj(x)[:, None]
        return slow_attention_n(q, q, q, softmax_n_param=self.n)[:, 0]


def test_policy_registry_and_warning_for_unconverted_modules():
    @policy_registry.register(ToyAttention)
    def convert(module, index, n):
        module.n = n
        return module

    try:
        model = torch.nn.Sequential(ToyAttention(), torch.nn.MultiheadAttention(8, 2))
        with pytest.warns(UserWarning, match=r"not converted.*MultiheadAttention"):
            converted = apply_attention_softmax_n(model, 2.0)
        assert converted == ["0"] and model[0].n == 2.0
        x = torch.randn(2, 5, 8)
        q = model[0].proj(x)
        e = (q @ q.transpose(-1, -2) / math.sqrt(8)).exp()
        torch.testing.assert_close(model[0](x), (e / (2.0 + e.sum(-1, keepdim=True))) @ q)
    finally:
        policy_registry.pop(ToyAttention)
    with pytest.warns(UserWarning, match="converted nothing"):
        apply_attention_softmax_n(torch.nn.Linear(2, 2), 1.0)
    with pytest.raises(TypeError):
        policy_registry.register(int)
