"""relative_attention: the Triton kernels against a float64 oracle written out directly (forward
and every gradient, r included), under the Triton interpreter on CPU (``interpret`` marker) and
on the GPU (``gpu`` marker); the reference path against the same oracle; SwitchHeadXL's two
backends against each other."""

from __future__ import annotations

import math

import pytest
import torch
from switchhead import AttentionMask, SwitchHeadXL, relative_attention

from testing_support import assert_rel_close, rel_error

pytestmark = pytest.mark.filterwarnings("ignore:.*divide by zero.*:RuntimeWarning")

CUDA = torch.cuda.is_available()


def oracle(q, k, v, r, keep, is_causal, scale):
    """float64: s_ij = scale q_i.k_j + q_i.r[j - i + L - 1], masked softmax, rows with no key 0."""
    q, k, v, r = (t.double() for t in (q, k, v, r))
    n_q, n_k = q.shape[-2], k.shape[-2]
    i = torch.arange(n_q).view(-1, 1)
    j = torch.arange(n_k).view(1, -1)
    rel = r[:, (j - i + n_q - 1)]  # [H, L, S, D]
    s = scale * q @ k.transpose(-1, -2) + torch.einsum("bhid,hijd->bhij", q, rel)
    allowed = torch.ones(n_q, n_k, dtype=torch.bool)
    if is_causal:
        allowed = j <= i + n_k - n_q
    if keep is not None:
        allowed = allowed & keep
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def make(b, h, n_q, n_k, d, dv, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(device, dtype)
    q, k, v = t(b, h, n_q, d), t(b, h, n_k, d), t(b, h, n_k, dv)
    r = t(h, n_q + n_k - 1, d, s=0.3)
    return [x.requires_grad_() for x in (q, k, v, r)]


def check(b, h, n_q, n_k, d, dv, is_causal, keep, dtype, device, tol):
    q, k, v, r = make(b, h, n_q, n_k, d, dv, dtype, device)
    keep = keep.to(device) if keep is not None else None
    scale = 1 / math.sqrt(d)
    out = relative_attention(q, k, v, r, keep, is_causal, scale, backend="triton")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, r), grad)
    ref_in = [x.detach().cpu().double().requires_grad_() for x in (q, k, v, r)]
    keep_cpu = keep.cpu() if keep is not None else None
    ref = oracle(*ref_in, keep_cpu, is_causal, scale)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.cpu().double())
    for name, mine, want in zip(("out", "dq", "dk", "dv", "dr"), (out, *grads), (ref, *ref_grads)):
        assert mine.dtype == dtype and mine.shape == want.shape, name
        assert_rel_close(mine.cpu(), want, tol, msg=name)


CASES = [  # b, h, n_q, n_k, d, dv, causal
    (2, 2, 37, 37, 24, 24, True),  # lengths no multiple of the block
    (1, 2, 20, 45, 16, 16, True),  # KV cache: queries after 25 cached keys
    (2, 1, 33, 33, 24, 8, False),  # no mask, value dim != key dim
    (1, 1, 1, 17, 16, 16, True),  # one query (decoding)
    (1, 3, 16, 16, 100, 100, True),  # padded head dim, one block
]


@pytest.mark.interpret
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_oracle_interpreter(case):
    check(*case[:6], case[6], None, torch.float32, "cpu", tol=1e-5)


@pytest.mark.interpret
@pytest.mark.parametrize("keep_shape", [(2, 1, 30, 30), (30, 30), (1, 2, 1, 30)])
def test_keep_mask_interpreter(keep_shape):
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(keep_shape, generator=g) > 0.3
    keep[..., 0] = True  # every row sees a key (the oracle's empty rows are 0, as the kernel's)
    check(2, 2, 30, 30, 16, 16, False, keep, torch.float32, "cpu", tol=1e-5)


@pytest.mark.interpret
def test_row_without_keys_is_zero_interpreter():
    q, k, v, r = make(1, 1, 20, 20, 16, 16, torch.float32, "cpu")
    keep = torch.ones(20, 20, dtype=torch.bool)
    keep[3] = False
    out = relative_attention(q, k, v, r, keep, False, 0.25, backend="triton")
    assert torch.equal(out[0, 0, 3], torch.zeros(16))
    (dq, dk, dv, dr) = torch.autograd.grad(out.sum(), (q, k, v, r))
    assert torch.equal(dq[0, 0, 3], torch.zeros(16))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv, dr))


@pytest.mark.interpret
def test_empty_queries_interpreter():
    q, k, v, r = make(1, 2, 0, 5, 16, 16, torch.float32, "cpu")
    out = relative_attention(q, k, v, r, None, True, 0.25, backend="triton")
    assert out.shape == (1, 2, 0, 16)
    _dq, dk, dv, dr = torch.autograd.grad(out.sum(), (q, k, v, r), allow_unused=True)
    assert float(dk.abs().sum()) == 0.0 and float(dv.abs().sum()) == 0.0
    assert float(dr.abs().sum()) == 0.0


# several key blocks per query block at the interpreter's block sizes, and a scratch band wider
# than a few blocks
LONG_CASES = [
    (1, 2, 130, 130, 16, 16, True),
    (1, 1, 40, 150, 16, 8, True),  # KV cache: 40 queries after 110 cached keys
    (1, 1, 70, 140, 16, 16, False),
]


@pytest.mark.interpret
@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], *LONG_CASES])
def test_block_shapes_interpreter(case, blocks):
    """Query and key blocks of different sizes, every kernel (``BLOCK_M`` != ``BLOCK_N`` moves
    the tile diagonals, the scratch bands and the unmasked ranges)."""
    from switchhead import relative_attention_triton as kt

    b, h, n_q, n_k, d, dv, causal = case
    q, k, v, r = (x.detach() for x in make(b, h, n_q, n_k, d, dv, torch.float32, "cpu", seed=3))
    cfg = (*blocks, 1, 1, 2)
    out, lse = kt.relative_attention_fwd(q, k, v, r, None, causal, 0.3, cfg)
    grad = torch.randn_like(out)
    grads = kt.relative_attention_bwd(
        grad, q, k, v, r, None, out, lse, causal, 0.3, {"dq": cfg, "dkdv": cfg}
    )
    ref_in = [x.double().requires_grad_() for x in (q, k, v, r)]
    ref = oracle(*ref_in, None, causal, 0.3)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    for name, mine, want in zip(("out", "dq", "dk", "dv", "dr"), (out, *grads), (ref, *ref_grads)):
        assert_rel_close(mine, want, 1e-5, msg=name)


@pytest.mark.parametrize("case", CASES[:3])
def test_reference_matches_oracle(case):
    b, h, n_q, n_k, d, dv, causal = case
    q, k, v, r = make(b, h, n_q, n_k, d, dv, torch.float64, "cpu")
    out = relative_attention(q, k, v, r, None, causal, 0.3, backend="reference")
    assert torch.allclose(out, oracle(q, k, v, r, None, causal, 0.3), atol=1e-12, rtol=0)


def test_bad_inputs_raise_before_computing():
    q, k, v, r = make(1, 2, 4, 4, 8, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="r must be"):
        relative_attention(q, k, v, r[:, :-1])
    with pytest.raises(TypeError, match="keep must be boolean"):
        relative_attention(q, k, v, r, keep=torch.ones(4, 4))
    with pytest.raises(ValueError, match="keep must broadcast"):
        relative_attention(q, k, v, r, keep=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        relative_attention(q, k, v, r, backend="cuda")
    with pytest.raises(ValueError, match="k must be"):
        relative_attention(q, k[:, :1], v, r)
    with pytest.raises(ValueError, match="scale"):
        relative_attention(q, k, v, r, scale=-1.0)
    with pytest.raises(ValueError, match="backend='triton' takes"):
        relative_attention(q.double(), k.double(), v.double(), r.double(), backend="triton")


def test_xl_rejects_triton_backend_with_custom_attention():
    with pytest.raises(ValueError, match="attention_fn"):
        SwitchHeadXL(16, 2, 2, backend="triton", attention_fn=lambda *a, **kw: None)
    with pytest.raises(ValueError, match="backend"):
        SwitchHeadXL(16, 2, 2, backend="fused")


def _xl_pair(device, dtype):
    torch.manual_seed(0)
    ref = SwitchHeadXL(32, 2, 4, d_head=12, backend="reference").to(device, dtype)
    fast = SwitchHeadXL(32, 2, 4, d_head=12, backend="triton").to(device, dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _xl_backends_agree(device, dtype, tol):
    ref, fast = _xl_pair(device, dtype)
    x = torch.randn(2, 21, 32, device=device, dtype=dtype)
    keep = torch.ones(2, 21, dtype=torch.bool, device=device)
    keep[1, 15:] = False
    for mask in (None, AttentionMask(src_length_mask=~keep, causal=True), AttentionMask()):
        outs, grads = [], []
        for m in (ref, fast):
            m.zero_grad()
            out, _ = m(x, x, x, mask)
            out.float().square().sum().backward()
            outs.append(out.float())
            grads.append(torch.cat([p.grad.float().flatten() for p in m.parameters()]))
        assert rel_error(outs[1], outs[0]) < tol
        assert rel_error(grads[1], grads[0]) < tol


def _xl_decoding_agrees(device, dtype, tol):
    _, fast = _xl_pair(device, dtype)
    x = torch.randn(1, 12, 32, device=device, dtype=dtype)
    full, _ = fast(x, x, x)
    cache: dict = {}
    steps = []
    for t in range(0, 12, 5):  # chunks of 5, 5, 2 through the KV cache
        chunk = x[:, t : t + 5]
        out, cache = fast(chunk, chunk, chunk, kv_cache=cache)
        steps.append(out)
    assert float((torch.cat(steps, 1) - full).abs().max()) < tol


@pytest.mark.interpret
def test_xl_backends_agree_interpreter():
    _xl_backends_agree("cpu", torch.float32, 1e-5)


@pytest.mark.interpret
def test_xl_kv_cache_decoding_interpreter():
    _xl_decoding_agrees("cpu", torch.float32, 1e-5)


# ----- GPU -----

gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_kernels_match_oracle_gpu(case, dtype):
    # bf16 inputs: products are exact in fp32, the softmax weights and dS are rounded to bf16
    # for the MMAs (as in FlashAttention), so ~1e-2 relative error is the dtype's own.
    check(*case[:6], case[6], None, dtype, "cuda", tol=1e-5 if dtype == torch.float32 else 3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_long_sequence_gpu():
    keep = None
    check(2, 2, 300, 300, 64, 64, True, keep, torch.bfloat16, "cuda", tol=3e-2)
    check(1, 2, 200, 330, 128, 128, True, keep, torch.float32, "cuda", tol=1e-5)
    # SwitchHead's padded head (256-byte rows: the largest blocks), KV cache offset
    check(1, 2, 390, 520, 104, 104, True, keep, torch.bfloat16, "cuda", tol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_qkv_gradients_reproducible_gpu():
    """dq, dk and dv are written without atomics: equal bit for bit run to run (dr is added
    atomically, so it may differ in the last bits)."""
    q, k, v, r = make(2, 4, 700, 700, 104, 104, torch.bfloat16, "cuda", seed=5)
    out = relative_attention(q, k, v, r, None, True, 0.1, backend="triton")
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad)
    for name, a, b in zip("qkv", first, second):
        assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_xl_backends_agree_gpu():
    _xl_backends_agree("cuda", torch.float32, 1e-4)
    _xl_decoding_agrees("cuda", torch.float32, 1e-4)


def _heads_inner(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` with the memory layout of ``[B, T, H, D]``, as SwitchHeadXL passes it."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["contiguous", "heads-inner"])
def test_fake_kernels_match_real_strides_interpreter(layout):
    """torch.library.opcheck: the fake kernels give the outputs the shapes and strides of the
    real ones (torch.compile relies on it; q, k, v are often transposed views)."""
    q, k, v, r = (t.detach() for t in make(1, 2, 9, 9, 16, 16, torch.float32, "cpu"))
    if layout == "heads-inner":
        q, k, v = (_heads_inner(t) for t in (q, k, v))
    fwd = torch.ops.switchhead.relative_attention_fwd.default
    bwd = torch.ops.switchhead.relative_attention_bwd.default
    out, lse = fwd(q, k, v, r, None, True, 0.2)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(fwd, (q, k, v, r, None, True, 0.2), test_utils=checks)
    torch.library.opcheck(
        bwd, (torch.randn_like(out), q, k, v, r, None, out, lse, True, 0.2), test_utils=checks
    )


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("layout", ["contiguous", "heads-inner"])
def test_compile_fullgraph_gpu(layout):
    q, k, v, r = make(2, 2, 70, 70, 32, 32, torch.bfloat16, "cuda")
    if layout == "heads-inner":
        q, k, v = (_heads_inner(t.detach()).requires_grad_() for t in (q, k, v))

    def f(q, k, v, r):
        return relative_attention(q, k, v, r, None, True, 0.2, backend="triton")

    eager = f(q, k, v, r)
    compiled = torch.compile(f, fullgraph=True)(q, k, v, r)
    assert torch.equal(eager, compiled)
    g_eager = torch.autograd.grad(eager.float().sum(), (q, r))
    g_comp = torch.autograd.grad(compiled.float().sum(), (q, r))
    assert torch.equal(g_eager[0], g_comp[0])
    assert torch.allclose(g_eager[1], g_comp[1], rtol=1e-2, atol=1e-3)  # dr: atomics


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_xl_memory_linear_in_length_gpu():
    """The Triton path holds no [T, T] tensor: peak memory grows ~linearly with T. (Its scratch
    is one [BLOCK, T] panel per program, with programs capped at a multiple of the SMs: linear
    in T once batch x heads x query blocks fill the GPU, as B = 8 does here.)"""
    m = SwitchHeadXL(256, 4, 4, d_head=64).cuda()
    peaks = []
    # the first call fills first-use caches (cast weights, masks): measured only from the second
    for t in (1024, 1024, 4096):
        x = torch.randn(8, t, 256, device="cuda", requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", torch.bfloat16):
            out, _ = m(x, x, x)
        out.float().sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    # quadratic would be 16x; linear 4x plus the fixed [H, P, d] terms
    assert peaks[2] < 6 * peaks[1], peaks
