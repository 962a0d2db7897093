"""Activation checkpointing of MoEUT: the same outputs, regulariser and gradients as without it,
each shared-layer application recorded once (the recomputation in backward records nothing),
activations not kept, the state dict unchanged."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from moeut import MoEUTLM, SigmaMoE, SwitchHeadXL
from switchhead.attention import SwitchHeadCore


@pytest.fixture(name="tiny_lm")
def tiny_lm_with_large_regularisers(tiny_lm):
    """conftest's ``tiny_lm`` with regularisers large enough that their gradients matter in the
    comparisons."""
    return functools.partial(tiny_lm, entropy_reg=1.0, att_entropy_reg=0.1)


def moe_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (SigmaMoE, SwitchHeadCore))]


class Recorder:
    """Forward hooks on every MoE module: how often each ran, and the selection logits it
    recorded (what a usage counter or the regulariser sees)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        self.recorded: list[torch.Tensor] = []
        for module in moe_modules(model):
            module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output) -> None:
        self.calls += 1
        logits = module.last_selection_logits
        if logits is not None:
            self.recorded += [logits] if isinstance(logits, torch.Tensor) else logits.values()


def train_step(model: MoEUTLM, x: torch.Tensor, seed: int = 5):
    """One forward and backward; the loss's parts and the gradients by name."""
    torch.manual_seed(seed)  # the same dropout masks in both runs
    out = model(x[:, :-1])
    loss = F.cross_entropy(out.outputs.flatten(0, 1).float(), x[:, 1:].flatten())
    (loss + out.reg_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.outputs.detach(), out.reg_loss.detach(), grads


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"attention": SwitchHeadXL, "att_n_experts": 1},
        {"dropout": 0.1, "ff_expert_dropout": 0.25, "att_expert_dropout": 0.25, "group_size": 1},
    ],
    ids=["rope", "xl-dense-attention", "dropouts"],
)
def test_same_outputs_regulariser_and_gradients(kw, tiny_lm):
    x = torch.randint(0, 40, (3, 11), generator=torch.Generator().manual_seed(1))
    plain, checkpointed = (
        tiny_lm(**kw, activation_checkpointing=ac).double().train() for ac in (False, True)
    )
    out_a, reg_a, grads_a = train_step(plain, x)
    out_b, reg_b, grads_b = train_step(checkpointed, x)
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-12)
    assert reg_a.item() < 0  # the regulariser is on
    torch.testing.assert_close(reg_b, reg_a, rtol=1e-12, atol=1e-12)
    assert grads_a.keys() == grads_b.keys() == dict(plain.named_parameters()).keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    # the regulariser reaches the selection weights through the checkpointed layers
    assert grads_a["transformer.layers.0.ffn.expert_sel"].abs().sum() > 0


def test_recomputation_records_nothing(tiny_lm):
    """The backward pass reruns the layers (their hooks fire again) but they record no
    selection logits then: usage counted from the recorded logits is counted once, no logits
    are left on the modules, and the recording switches are restored."""
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    seen = {}
    for ac in (False, True):
        model = tiny_lm(activation_checkpointing=ac).double().train()
        recorder = Recorder(model)
        train_step(model, x)
        seen[ac] = recorder
        for module in moe_modules(model):
            assert module.last_selection_logits is None
            assert module.record_selection_logits  # as the forward set it
    applications = 4 * 2  # 4 layer applications, each with a feedforward and an attention MoE
    assert seen[False].calls == applications
    assert seen[True].calls > applications  # recomputed in backward
    assert len(seen[True].recorded) == len(seen[False].recorded) == 4 * (1 + 2)  # ffn; att v, o
    for a, b in zip(seen[False].recorded, seen[True].recorded, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_activations_are_not_kept(tiny_lm):
    """What autograd keeps for backward outside the checkpoints: a small fraction."""
    x = torch.randint(0, 40, (2, 33), generator=torch.Generator().manual_seed(3))
    kept = {}
    for ac in (False, True):
        model = tiny_lm(activation_checkpointing=ac).train()
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        (out.outputs.square().mean() + out.reg_loss).backward()
        kept[ac] = total
    assert kept[True] < kept[False] / 4


def test_switch_and_state_dict_unchanged(tiny_lm):
    model = tiny_lm()
    assert model.activation_checkpointing is False
    model.activation_checkpointing = True
    assert model.transformer.activation_checkpointing is True
    other = tiny_lm(activation_checkpointing=True)
    assert other.activation_checkpointing is True
    a, b = tiny_lm().state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    tiny_lm().load_state_dict(b)  # strict: checkpoints load either way


def test_no_checkpoint_without_gradients(monkeypatch, tiny_lm):
    """Evaluation and generation (no autograd) run the layers directly, KV cache included."""
    model = tiny_lm(activation_checkpointing=True).double().eval()
    reference = tiny_lm().double().eval()
    x = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(4))

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint called without gradients")

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", refuse)
    with torch.no_grad():
        torch.testing.assert_close(model(x).outputs, reference(x).outputs, rtol=0, atol=0)
    sampled = model.generate(x[:, :3], 4, temperature=0)
    assert torch.equal(sampled, reference.generate(x[:, :3], 4, temperature=0))


def test_same_gradients_under_bf16_autocast(tiny_lm):
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(6))
    results = []
    for ac in (False, True):
        model = tiny_lm(activation_checkpointing=ac).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(train_step(model, x))
    (out_a, reg_a, grads_a), (out_b, reg_b, grads_b) = results
    assert out_a.dtype == torch.bfloat16  # autocast was on in the recomputation too
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    torch.testing.assert_close(reg_b, reg_a, rtol=0, atol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_kv_cache_with_gradients(tiny_lm):
    """A cache built and extended with gradients on: the same gradients either way."""
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(7))
    grads = []
    for ac in (False, True):
        model = tiny_lm(activation_checkpointing=ac).double().train()
        first = model(x[:, :5], kv_cache={})
        second = model(x[:, 5:], kv_cache=first.cache)
        loss = first.outputs.square().mean() + second.outputs.square().mean()
        (loss + first.reg_loss + second.reg_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-10, atol=1e-12, msg=name)
