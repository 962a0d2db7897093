"""moeut.hf: the transformers wrappers (config, causal LM, cache, generate, Trainer, Auto)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moeut import MoEUTLM, SwitchHeadXL
from moeut.hf import MoEUTCache, MoEUTConfig, MoEUTForCausalLM
from transformers import AutoConfig, AutoModelForCausalLM

from testing_support import TINY_MOEUT, TINY_VOCAB

VOCAB = TINY_VOCAB


def tiny_config(**kw) -> MoEUTConfig:
    args = dict(vocab_size=VOCAB, **TINY_MOEUT, group_size=2)
    args.update(kw)
    return MoEUTConfig(**args)


def tiny_model(**kw) -> MoEUTForCausalLM:
    torch.manual_seed(0)
    return MoEUTForCausalLM(tiny_config(**kw))


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


def test_config_mirrors_moeut_lm_and_profiles():
    cfg = tiny_config(attention="xl")
    kw = cfg.moeut_kwargs()
    assert kw["n_tokens"] == VOCAB and kw["attention"] is SwitchHeadXL
    assert cfg.hidden_size == 32 and cfg.num_hidden_layers == 4 and cfg.n_tokens == VOCAB
    assert not cfg.tie_word_embeddings
    with pytest.raises(ValueError, match="attention"):
        MoEUTConfig(attention="flash")

    p = MoEUTConfig.from_profile("MoEUT_44M", vocab_size=8000)
    assert (p.d_model, p.n_layers, p.ff_n_experts, p.ff_k, p.group_size) == (412, 16, 155, 12, 2)
    with torch.device("meta"):
        model = MoEUTForCausalLM(p)
    assert round(sum(q.numel() for q in model.parameters()) / 1e6, 1) == 44.3  # as the README
    assert MoEUTConfig.from_profile("MoEUT_1B", vocab_size=100, dropout=0.1).dropout == 0.1
    with pytest.raises(ValueError, match="unknown profile"):
        MoEUTConfig.from_profile("MoEUT_7B")


@pytest.mark.parametrize("attention", ["rope", "xl"])
def test_save_and_load_give_identical_logits(tmp_path, attention):
    model = tiny_model(attention=attention).eval()
    x = tokens(2, 9)
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "pytorch_model.bin").exists()
    loaded = MoEUTForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.moeut_kwargs() == model.config.moeut_kwargs()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), name  # RoPE's non-persistent permutations are rebuilt
    assert torch.equal(loaded(x).logits, expected)


def test_auto_classes_resolve(tmp_path):
    cfg = tiny_config()
    auto = AutoConfig.for_model("moeut", vocab_size=VOCAB, d_model=32)
    assert type(auto) is MoEUTConfig and auto.d_model == 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    assert type(model) is MoEUTForCausalLM
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is MoEUTConfig
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is MoEUTForCausalLM
    x = tokens(1, 5)
    assert torch.equal(loaded.eval()(x).logits, model.eval()(x).logits)


def test_wraps_moeut_lm_state_dict():
    torch.manual_seed(3)
    cfg = tiny_config()
    lm = MoEUTLM(**cfg.moeut_kwargs()).eval()
    hf = MoEUTForCausalLM.from_moeut(lm, cfg).eval()
    assert set(hf.state_dict()) == {f"model.{k}" for k in lm.state_dict()}
    x = tokens(2, 6)
    assert torch.equal(hf(x).logits, lm(x).outputs)


def test_loss_is_shifted_cross_entropy_plus_regulariser():
    model = tiny_model().train()
    x = tokens(3, 10)
    labels = x.clone()
    labels[0, 4:] = -100
    torch.manual_seed(5)
    out = model(x, labels=labels)
    ref = model.model(x)  # the wrapped MoEUTLM, same (deterministic) training forward
    assert ref.reg_loss.item() != 0  # (the entropy regulariser may be negative)
    ce = F.cross_entropy(ref.outputs[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.aux_loss, ref.reg_loss)
    torch.testing.assert_close(out.loss, ce + ref.reg_loss)
    assert out.past_key_values is None  # no cache in training by default
    out.loss.backward()
    assert model.model.embedding.weight.grad is not None

    model.eval()
    out = model(x, labels=labels)
    assert out.aux_loss.item() == 0
    torch.testing.assert_close(
        out.loss, F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    )
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=labels[:, :-1])


@pytest.mark.parametrize("attention", ["rope", "xl"])
def test_greedy_generate_equals_moeut_generate(attention):
    model = tiny_model(attention=attention).eval()
    prompt = tokens(3, 6)
    expected = model.model.generate(prompt, max_new_tokens=8, temperature=0)

    lengths = []
    hook = model.model.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    try:
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    finally:
        hook.remove()
    assert torch.equal(out, expected)
    assert lengths == [6] + [1] * 7  # prefill, then one token per step through the KV cache

    no_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(no_cache, expected)


def test_beam_search_with_cache_equals_without():
    model = tiny_model().eval()
    prompt = tokens(2, 5)
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=3)
    assert torch.equal(model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw))


def test_cache_forward_equals_full_forward_and_padding_mask():
    model = tiny_model().eval()
    x = tokens(2, 9)
    full = model(x, use_cache=False)
    assert full.past_key_values is None
    first = model(x[:, :6], use_cache=True)
    cache = first.past_key_values
    assert isinstance(cache, MoEUTCache) and cache.get_seq_length() == 6
    rest = model(x[:, 6:], past_key_values=cache)
    assert rest.past_key_values is cache and cache.get_seq_length() == 9
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full.logits)
    with pytest.raises(TypeError, match="MoEUTCache"):
        model(x, past_key_values=((None, None),))

    # left padding: real tokens' logits equal those of the unpadded sequence (RoPE is relative)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x[:1]], dim=1)
    mask = torch.ones_like(padded)
    mask[:, :3] = 0
    out = model(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(out, full.logits[:1], atol=1e-5, rtol=1e-4)
    # an all-ones mask takes the unmasked path: identical logits
    assert torch.equal(model(x, attention_mask=torch.ones_like(x)).logits, full.logits)


def test_left_padded_generate_matches_unpadded():
    model = tiny_model().eval()
    prompt = tokens(1, 5)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt], dim=1)
    mask = torch.ones_like(padded)
    mask[:, :2] = 0
    out = model.generate(
        padded, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert torch.equal(out[:, 2:], expected)


def test_trainer_step_runs(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    data = [{"input_ids": row, "labels": row} for row in tokens(8, 12)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.embedding.weight" in changed and "model.lm_head.weight" in changed


def test_import_moeut_without_transformers():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"  # makes `import transformers` fail
        "import moeut\n"
        "assert 'transformers' not in sys.modules or sys.modules['transformers'] is None\n"
        "try:\n"
        "    import moeut.hf\n"
        "except ImportError:\n"
        "    print('ok')\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
