"""norm_and_cast: the layer's input and its layer norm in the autocast dtype, from one kernel
(interpreter, GPU), against a float64 oracle written out per row; the plain path elsewhere."""

from __future__ import annotations

import pytest
import torch
from moeut.norm_cast import norm_and_cast

from testing_support import assert_rel_close

# (device, autocast dtype): the interpreter rounds float32 to bfloat16 by truncation, unlike
# torch and the GPU (round to nearest even), so it runs float16
CASTS = [
    pytest.param("cpu", torch.float16, marks=pytest.mark.interpret, id="interpret-fp16"),
    pytest.param("cuda", torch.float16, marks=pytest.mark.gpu, id="cuda-fp16"),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu, id="cuda-bf16"),
]


def oracle(x, weight, bias, eps):
    """float64 layer norm over the last dimension, written out."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


def _inputs(device, shape, seed):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    norm = torch.nn.LayerNorm(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
        norm.bias.copy_(torch.randn(d, generator=g))
    x = (torch.randn(*shape, generator=g) * 3 + 1).to(device).requires_grad_()
    return x, norm.to(device), g


@pytest.mark.parametrize(("device", "dtype"), CASTS)
@pytest.mark.parametrize("shape", [(2, 5, 24), (7, 100), (3, 1, 1024), (3, 2500)])  # 2500: wide
@pytest.mark.parametrize("used", ["all", "stream and normed", "normed only", "copy only"])
@pytest.mark.parametrize("branch", [False, True], ids=["x", "x+delta"])
def test_kernels_match_the_oracle(device, dtype, shape, used, branch):
    """``s = x`` (passed through) or ``x + delta`` (a branch in the autocast dtype) exactly as
    torch adds them, its copy equal to torch's cast, its norm within one rounding of the
    oracle's; gradients of x, delta (the same values in its dtype), weight and bias (the
    stream's and the copy's gradients added to the norm's) to float32 rounding."""
    x, norm, g = _inputs(device, shape, 0)
    delta = torch.randn(shape, generator=g).to(device, dtype).requires_grad_() if branch else None
    with torch.autocast(x.device.type, dtype=dtype):
        s, sc, n = norm_and_cast(x, norm, delta=delta)
    want_s = x.detach() + delta.detach() if branch else x.detach()
    assert s.dtype == torch.float32 and sc.dtype == n.dtype == dtype
    assert torch.equal(s, want_s) and torch.equal(sc, want_s.to(dtype))
    leaves = [t for t in (x, delta, norm.weight, norm.bias) if t is not None]
    refs = [t.detach().cpu().double().requires_grad_() for t in leaves]
    x64, w64, b64 = refs[0], refs[-2], refs[-1]
    s64 = x64 + refs[1] if branch else x64
    ref = oracle(s64, w64, b64, norm.eps)
    assert_rel_close(n.float().cpu(), ref, 2**-8, msg="normed")
    picked = {
        "all": (0, 1, 2), "stream and normed": (0, 2), "normed only": (2,), "copy only": (1,)
    }[used]  # fmt: skip
    outs, grads, ref_loss = [], [], 0.0
    for i in picked:
        grad = torch.randn(shape, generator=g).to(dtype if i else torch.float32)
        outs.append((s, sc, n)[i])
        grads.append(grad.to(device))
        ref_loss = ref_loss + ((s64, s64, ref)[i] * grad.double()).sum()
    got = torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    want = torch.autograd.grad(ref_loss, refs, allow_unused=True)
    assert got[0].dtype == torch.float32  # the stream's dtype
    names = ["dx", "ddelta", "dweight", "dbias"] if branch else ["dx", "dweight", "dbias"]
    if branch:  # the branch's gradient: the sum's, cast
        assert got[1].dtype == dtype and torch.equal(got[1], got[0].to(dtype))
    for name, a, b in zip(names, got, want, strict=True):
        if b is None or not b.any():  # the copies alone: no gradient for the norm's parameters
            assert a is None or not a.any(), name
            continue
        assert_rel_close(a.float().cpu(), b, 2**-8 if name == "ddelta" else 1e-5, msg=name)


@pytest.mark.parametrize(
    "case", ["no autocast", "float64 input", "no affine", "cpu without interpreter", "hooked"]
)
def test_plain_path_elsewhere(case, monkeypatch):
    """Outside what the kernels take, the plain (x, norm(x)): the same tensors autograd gives."""
    x, norm, _ = _inputs("cpu", (3, 8), 1)
    if case == "float64 input":
        x, norm = x.detach().double().requires_grad_(), norm.double()
    if case == "no affine":
        norm = torch.nn.LayerNorm(8, elementwise_affine=False)
    if case == "cpu without interpreter":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if case == "hooked":  # a forward hook on the norm: it must see the norm called
        norm.register_forward_hook(lambda *_: None)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case != "no autocast"):
        s, xc, n = norm_and_cast(x, norm)
        want = norm(x)
    assert s is x and xc is x
    assert torch.equal(n, want) and n.dtype == want.dtype
    delta = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case != "no autocast"):
        s, sc, n = norm_and_cast(x, norm, delta=delta)
        want = norm(x + delta)
    assert sc is s and torch.equal(s, x + delta)
    assert torch.equal(n, want) and n.dtype == want.dtype


@pytest.mark.parametrize(("device", "dtype"), CASTS)
def test_moeut_lm_under_autocast_matches_the_plain_path(device, dtype, monkeypatch):
    """The MoEUT LM under autocast gives the outputs and gradients of its layers written with
    plain norms (autocast casting each consumer's input): the same up to float32 sum order."""
    from moeut import MoEUTLM, norm_cast

    from testing_support import TINY_MOEUT, TINY_VOCAB

    torch.manual_seed(0)
    model = MoEUTLM(TINY_VOCAB, **TINY_MOEUT).to(device)
    tokens = torch.randint(0, TINY_VOCAB, (2, 9), device=device)

    def run():
        model.zero_grad()
        with torch.autocast(tokens.device.type, dtype=dtype):
            out = model(tokens)
        (out.outputs.float().square().mean() + out.reg_loss).backward()
        return [out.outputs.detach()] + [p.grad.clone() for p in model.parameters()]

    fused = run()
    monkeypatch.setattr(norm_cast, "_fused_dtype", lambda x, norm: None)
    plain = run()
    for a, b in zip(fused, plain, strict=True):
        assert_rel_close(a.float(), b.float(), 2e-2)


@pytest.mark.parametrize(("device", "dtype"), CASTS[:2])
def test_second_derivatives_raise(device, dtype):
    """The backward kernels record no graph: asking for a second derivative raises instead of
    returning a wrong one."""
    x, norm, _ = _inputs(device, (3, 16), 4)
    with torch.autocast(x.device.type, dtype=dtype):
        _, _, n = norm_and_cast(x, norm)
    (dx,) = torch.autograd.grad(n.float().square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        dx.sum().backward()


@pytest.mark.parametrize(("device", "dtype"), CASTS[:2])
def test_hooks_on_a_layers_norms_still_fire(device, dtype):
    """A forward hook on a MoEUT layer's norm is called under autocast (the layer then takes
    the plain ops for that norm), with the same outputs as without the hook."""
    from moeut import MoEUTLM

    from testing_support import TINY_MOEUT, TINY_VOCAB

    torch.manual_seed(0)
    model = MoEUTLM(TINY_VOCAB, **TINY_MOEUT).to(device)
    tokens = torch.randint(0, TINY_VOCAB, (2, 5), device=device)
    with torch.autocast(tokens.device.type, dtype=dtype):
        want = model(tokens).outputs
        calls = []
        handle = model.transformer.layers[0].ln1.register_forward_hook(lambda *_: calls.append(1))
        got = model(tokens).outputs
        handle.remove()
    assert len(calls) == TINY_MOEUT["n_layers"] // 2  # each application of the shared layer
    assert_rel_close(got.float(), want.float(), 2e-2)


def test_moeut_lm_with_shared_input_projections(monkeypatch):
    """MoEUT's shared layers (applied twice) with the projections shared: the gradients of the
    LM as without."""
    from moeut import MoEUTLM
    from switchhead import shared_projection

    from testing_support import TINY_MOEUT, TINY_VOCAB

    torch.manual_seed(0)
    model = MoEUTLM(TINY_VOCAB, **{**TINY_MOEUT, "n_layers": 4, "group_size": 2})
    tokens = torch.randint(0, TINY_VOCAB, (2, 9))

    def run(enabled):
        monkeypatch.setattr(shared_projection, "ENABLED", [enabled])
        model.zero_grad(set_to_none=True)
        out = model(tokens)
        (out.outputs.float().square().mean() + out.reg_loss).backward()
        return [p.grad for p in model.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        assert_rel_close(a, b, 1e-5)
