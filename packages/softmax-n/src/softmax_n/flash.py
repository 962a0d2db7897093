"""``flash_attention_n``: softmax_n attention at the speed of a fused attention kernel.

Identity: with ``lse_i`` the log-sum-exp of row ``i`` of the (scaled, biased) scores, ``out0``
ordinary attention and ``lse_n = logaddexp(lse, log n)`` (the log of softmax_n's denominator),

    out_n = out0 * exp(lse - lse_n) = out0 * sigmoid(lse - log n).

A fused kernel that returns ``lse`` gives ``out_n`` for one in-place row scaling of its output.
The gradient needs no extra kernel either: the probabilities of softmax_n are
``exp(s_ij - lse_n_i)``, so the kernel's own backward, run with ``out_n`` in place of its output
and ``lse_n`` in place of its log-sum-exp, is exactly the backward of softmax_n attention (its row
term ``rowsum(dO * O)`` is then the softmax_n one). No extra tensor of the output's size is made
in either direction. The gradient in ``n`` is ``-rowsum(grad * out_n) * exp(-lse_n)`` (exact at
``n = 0`` too, where a gradient through ``log n`` would be ``0 * inf``).

Attention sinks (``sink``, one logit per head) are the same gate with ``log n`` replaced by
``sink[h]``: ``out = out0 * sigmoid(lse - sink)``, ``lse_n = lse - logsigmoid(lse - sink)``
(``exp(sink)`` is never formed); with ``w`` the gate, ``d sink[h] = -sum_{b, i} w (1 - w)
<dout, out0> = -sum_{b, i} rowsum(dout * out) * sigmoid(sink - lse)``.

Kernels, in order of preference: cuDNN attention on CUDA (compute capability >= 9.0, fp16/bf16,
head dim a multiple of 8 up to 128, no mask or bias, causal only for ``L == S``, no dropout;
PyTorch's own SDPA prefers it there too), PyTorch's flash attention on CUDA (compute capability
>= 8.0, otherwise the same, head dim up to 256) and its CPU flash kernel (any float dtype, masks
and biases that need no gradient). Each CUDA kernel is used only while enabled for SDPA
(``torch.nn.attention.sdpa_kernel`` or ``torch.backends.cuda.enable_*_sdp``). Other cases use
``slow_attention_n`` (same results, quadratic memory).

Fully masked rows (and ``S = 0``) give 0 for every ``n``, as ``F.scaled_dot_product_attention``
does (its math path is a "safe" softmax): PyTorch's CPU kernel returns ``out0 = 0`` there and the
gate is finite. Empty inputs (``B``, ``H``, ``L``, ``S``, ``D`` or ``Dv`` of 0), a value head dim
other than the query's and dropout go to the reference before any kernel runs (the CPU kernel
crashes the process with SIGFPE on ``L = 0`` or ``S = 0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .functional import (
    _check_attention,
    _check_n,
    _check_n_rows,
    _check_sink,
    _expand_kv,
    _reference,
    attention_bias,
)

_ATEN = torch.ops.aten


def _kernel_name(q, k, v, bias, is_causal) -> str | None:
    """The fused kernel that computes this attention (with its log-sum-exp), or None."""
    if bias is not None and bias.requires_grad:
        return None  # the kernels give no gradient for a bias (e.g. XL's positional term)
    if v.shape[-1] != q.shape[-1]:
        return None  # the kernels take one head dim for query, key and value
    if q.device.type == "cpu":
        return "cpu"
    if (
        q.device.type != "cuda"
        or bias is not None
        or q.dtype not in (torch.float16, torch.bfloat16)
        or q.shape[-1] % 8
        or v.shape[-1] != q.shape[-1]
        or (is_causal and q.shape[-2] != k.shape[-2])
    ):
        return None
    if (
        q.shape[-1] <= 128
        and torch.backends.cuda.cudnn_sdp_enabled()
        and torch.backends.cudnn.is_available()
        and torch.cuda.get_device_capability(q.device) >= (9, 0)
    ):
        return "cudnn"
    if (
        q.shape[-1] <= 256
        and torch.backends.cuda.flash_sdp_enabled()
        and torch.cuda.get_device_capability(q.device) >= (8, 0)  # FlashAttention-2: Ampere+
    ):
        return "flash"
    return None


def _kernel_forward(name, q, k, v, bias, is_causal, scale):
    """``(out0, lse, state)``; ``state`` is what the kernel's backward needs besides tensors."""
    if name == "cpu":
        out, lse = _ATEN._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale
        )
        return out, lse, ()
    if name == "cudnn":
        res = _ATEN._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, is_causal, False, scale=scale
        )
    else:
        res = _ATEN._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
    # (cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset)
    return res[0], res[1], tuple(res[2:8])


def _kernel_backward(name, state, grad, q, k, v, out, lse, bias, is_causal, scale):
    if name == "cpu":
        return _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, is_causal, attn_mask=bias, scale=scale
        )
    cum_q, cum_k, max_q, max_k, seed, offset = state
    if name == "cudnn":  # attn_bias None reaches the op as an undefined tensor (no bias)
        return _ATEN._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0,
            is_causal, scale=scale,
        )  # fmt: skip
    return _ATEN._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, is_causal, seed, offset,
        scale=scale,
    )  # fmt: skip


def _row_kernels(t: torch.Tensor):
    """``softmax_n.triton_kernels`` where its row kernels run for ``t``: CUDA GPUs from Ampere
    on, half or single precision, Triton installed; else None (the PyTorch expressions)."""
    if not t.is_cuda or t.dtype == torch.float64:
        return None
    if torch.cuda.get_device_capability(t.device) < (8, 0):
        return None
    try:
        from . import triton_kernels
    except ImportError:  # no Triton
        return None
    return triton_kernels


def _row_dot(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``rowsum(grad * out)`` as ``[B, H, L, 1]`` in float32 (at least): one Triton pass where
    :func:`_row_kernels` run, without the float32 copies of both tensors that the PyTorch
    expression makes; PyTorch elsewhere."""
    kernels = _row_kernels(grad)
    if kernels is not None:
        return kernels.row_dot(out, grad).unsqueeze(-1)
    acc = torch.promote_types(grad.dtype, torch.float32)
    return (grad.to(acc) * out.to(acc)).sum(-1, keepdim=True)


def _rows4(t: torch.Tensor) -> torch.Tensor:
    """A kernel's per-row ``[B, H, L]`` or ``[B, H, L, 1]`` as ``[B, H, L, 1]``."""
    return t if t.dim() == 4 else t.unsqueeze(-1)


def _gate(out, lse, n, sink, n_float):
    """Scale the kernel's ``out`` in place into softmax_n's output; returns ``lse_n`` shaped
    like ``lse``. One Triton pass where :func:`_row_kernels` run (sinks or a float ``n``)."""
    kernels = _row_kernels(out)
    if kernels is not None and (sink is not None or n_float is not None):
        c = sink.reshape(-1).float().contiguous() if sink is not None else None
        log_n = math.log(n_float) if n_float else -math.inf
        return kernels.gate_rows(out, lse, c, log_n)
    lse4 = _rows4(lse).to(n.dtype)
    # gate = sigmoid(lse - log n), the difference formed once (no log-sum-exp at the logits'
    # magnitude); lse_n = lse - log(gate)
    if sink is not None:
        diff = lse4 - sink  # log n = sink
    elif n_float is not None:
        diff = lse4 - math.log(n_float)
    else:
        log_n = torch.log(n)
        diff = torch.where(log_n == -math.inf, math.inf, lse4 - log_n)  # n = 0: gate 1
    out.mul_(torch.sigmoid(diff))  # the kernel's fresh output becomes out_n
    lse_n4 = lse4 - torch.nn.functional.logsigmoid(diff)
    return torch.empty_like(lse).copy_(lse_n4.reshape(lse.shape))


def _sink_grad(grad, out, lse_n, sink):
    """``d sink = -sum_{b, i} rowsum(grad * out) * exp(sink - lse_n)`` shaped like ``sink``
    (``exp(sink - lse_n) = sigmoid(sink - lse) <= 1``; 0 for a sink of ``-inf``)."""
    kernels = _row_kernels(grad)
    if kernels is not None:
        c = sink.reshape(-1).float().contiguous()
        return kernels.sink_grad(out, grad, lse_n, c).view(sink.shape)
    row = _row_dot(grad, out).to(sink.dtype)
    w = torch.exp(sink - _rows4(lse_n).to(sink.dtype))
    return (-row * torch.where(sink == -math.inf, 0.0, w)).sum_to_size(sink.shape)


class _FlashAttentionN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, n, sink, bias, is_causal, scale, name, n_float):
        """``n``: the tensor ``n`` in the working dtype (its gradient is returned); ``n_float``:
        the same as a Python float when it is one (fewer small kernels, none for ``n = 0``);
        ``sink``: ``None`` or the sinks as ``[1, H, 1, 1]`` in the working dtype (then ``n`` only
        carries that dtype and ``n_float`` is None)."""
        out, lse, state = _kernel_forward(name, q, k, v, bias, is_causal, scale)
        lse_n = lse if n_float == 0.0 else _gate(out, lse, n, sink, n_float)
        if name == "cpu":  # without a mask, PyTorch's CPU kernel gives 0 for a query row with NaN
            out.masked_fill_(torch.isnan(q).any(-1, keepdim=True), math.nan)
        inv = q.new_empty(0)
        if ctx.needs_input_grad[4]:  # the backward's sink gradient reads lse_n and the sink
            inv = sink.detach()
        elif ctx.needs_input_grad[3]:  # d out_n / d n = -out_n / (n + sum exp) = -out_n exp(-lse_n)
            lse_n4 = _rows4(lse_n).to(n.dtype)
            inv = torch.where(lse_n4 == -math.inf, 0.0, torch.exp(-lse_n4))
        ctx.save_for_backward(
            q, k, v, out, lse_n, bias if bias is not None else q.new_empty(0), inv
        )
        ctx.has_bias = bias is not None
        ctx.is_causal, ctx.scale, ctx.name, ctx.state = is_causal, scale, name, state
        ctx.n_shape = n.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse_n, bias, inv = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        grad = grad.contiguous()
        dq, dk, dv = _kernel_backward(
            ctx.name, ctx.state, grad, q, k, v, out, lse_n, bias, ctx.is_causal, ctx.scale
        )[:3]
        d_n = d_sink = None
        if ctx.needs_input_grad[4]:
            d_sink = _sink_grad(grad, out, lse_n, inv).to(inv.dtype)
        elif ctx.needs_input_grad[3]:
            row = _row_dot(grad, out).to(inv.dtype)
            d_n = (-row * inv).sum_to_size(ctx.n_shape)
        return dq, dk, dv, d_n, d_sink, None, None, None, None, None


def flash_attention_n(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    softmax_n_param: float | torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    attn_mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    is_causal: bool = False,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with softmax_n for any real ``n >= 0``, or with attention sinks (see the module
    docstring).

    Args:
        query: ``[B, H, L, D]``; key: ``[B, Hkv, S, D]`` (grouped-query, ``H % Hkv == 0``) or
            ``[B, S, D]`` (shared by all heads); value: the same with its own head dim ``Dv``
            (``Dv != D`` runs on the reference). One float dtype and device.
        softmax_n_param: ``n``: ``None``/0 (softmax), a finite float ``>= 0``, or a tensor of
            such values shaped as one of ``softmax_n.functional.N_SHAPES``: 0-dim, ``[H, 1, 1]``
            (per head, learnable), ``[H, L, 1]``, ``[B, H, L, 1]`` or anything else with a
            trailing 1 that broadcasts to ``[B, H, L, 1]`` without growing it. ``[H]`` and
            ``[H, 1]`` are refused (they would broadcast against the keys / the query length).
        scale: score scale (default ``1/sqrt(D)``).
        dropout_p: attention dropout in ``[0, 1]`` (applied by the reference path).
        attn_mask: as ``F.scaled_dot_product_attention``: bool (True = keep), or a float mask of
            the query's dtype or float32, added to the scores; broadcastable to ``[B, H, L, S]``.
            Other dtypes (e.g. a 0/1 integer mask) raise ``TypeError``.
        attn_bias: additive float bias, e.g. ALiBi ``[H, L, S]``.
        is_causal: query ``i`` sees keys ``<= i + S - L`` (bottom-right aligned).
        sink: attention sinks, ``[H]``, one logit per query head (any float dtype, on the
            query's device, learnable; no NaN or ``+inf``, ``-inf`` = no sink): softmax over the
            scores and one extra column ``sink[h]`` that is dropped, i.e. softmax_n with
            ``n = exp(sink)`` computed in log space. Mutually exclusive with ``softmax_n_param``.

    Returns:
        ``[B, H, L, Dv]`` in the query's dtype. A row that sees no key is 0 for every ``n``
        (as SDPA).

    Raises:
        TypeError: non-tensors, non-float or mixed dtypes, a mask dtype SDPA refuses, a
            non-float ``sink``.
        ValueError: bad shapes, mixed devices, a bad ``n`` (NaN, inf, negative, or a shape as
            above), a non-finite scale, ``dropout_p`` outside ``[0, 1]``, a ``sink`` not shaped
            ``[H]``, on another device, with NaN or ``+inf``, or given with ``softmax_n_param``.
            All before any kernel.
    """
    key, value, scale = _check_attention(
        query, key, value, attn_mask, attn_bias, scale, dropout_p, softmax_n_param,
        "flash_attention_n", sink,
    )  # fmt: skip
    b, h, n_q, d = query.shape
    n_k, d_v = key.shape[-2], value.shape[-1]
    if dropout_p > 0 or 0 in (b, h, n_q, n_k, d, d_v):  # no kernel is given empty tensors
        return _reference(
            query, key, value, attn_mask, dropout_p, is_causal, scale, softmax_n_param, None,
            True, attn_bias, sink,
        )  # fmt: skip
    key, value = _expand_kv(key, query), _expand_kv(value, query)
    causal_in_kernel = is_causal and n_q == n_k and attn_mask is None and attn_bias is None
    bias = None
    if not causal_in_kernel:
        bias = attention_bias(n_q, n_k, attn_mask, attn_bias, is_causal, query.device, query.dtype)
        if bias is not None:
            bias = bias.expand(b, h, n_q, n_k)
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    kernel = _kernel_name(q, k, v, bias, causal_in_kernel)
    if kernel is None:
        return _reference(
            query, key, value, attn_mask, 0.0, is_causal, scale, softmax_n_param, None, True,
            attn_bias, sink,
        )  # fmt: skip
    work_dtype = torch.promote_types(query.dtype, torch.float32)
    if sink is not None:  # [1, H, 1, 1], differentiable; n only carries the working dtype
        n, n_float = query.new_empty((), dtype=work_dtype), None
        sink = sink.to(work_dtype).view(1, -1, 1, 1)
    elif isinstance(softmax_n_param, torch.Tensor):
        n, n_float = softmax_n_param.to(query.device, work_dtype), None  # differentiable
    else:  # only its shape and dtype are used: no fill kernel
        n, n_float = query.new_empty((), dtype=work_dtype), float(softmax_n_param or 0.0)
    return _FlashAttentionN.apply(q, k, v, n, sink, bias, causal_in_kernel, scale, kernel, n_float)


def softmax_n_attention_fn(
    n: float | torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> Callable[..., torch.Tensor]:
    """An attention core with SDPA's signature for ``attention_fn`` hooks (SwitchHead, MoEUT,
    CoLT5): ``fn(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0)``.
    ``n``, or ``sink`` (``[H]`` attention-sink logits, e.g. a module's learnable parameter; not
    both), is checked here (type and values) and again, with its shape, at each call.

    ``backend`` picks the op each call runs: ``None`` (default) :func:`flash_attention_n`
    (PyTorch's fused kernels with the gate where they take the inputs, else the reference),
    ``"reference"`` :func:`~softmax_n.slow_attention_n`, ``"triton"``
    :func:`~softmax_n.flash_attention_n_triton`, which raises where it cannot run (float64, CPU
    tensors without ``TRITON_INTERPRET=1``, ...) and takes no ``attn_mask`` and no dropout: a
    call with either raises ``ValueError``. Any other value raises ``ValueError`` here."""
    if backend is not None and backend not in ("reference", "triton"):
        raise ValueError(f"backend must be None, 'reference' or 'triton', got {backend!r}")
    _check_n(n)
    _check_n_rows(n, None)
    _check_sink(sink, n, None, "softmax_n_attention_fn")
    op: Callable[..., torch.Tensor] = flash_attention_n
    if backend == "reference":
        from .functional import slow_attention_n

        op = slow_attention_n
    elif backend == "triton":
        from .fused import flash_attention_n_triton

        def triton(q, k, v, *, attn_mask, dropout_p, **options):
            if attn_mask is not None or dropout_p:
                given = "an attn_mask" if attn_mask is not None else f"dropout_p={dropout_p}"
                raise ValueError(
                    "softmax_n_attention_fn(backend='triton'): flash_attention_n_triton takes no "
                    f"attn_mask and no dropout, got {given}; use backend=None or 'reference'"
                )
            return flash_attention_n_triton(q, k, v, **options)

        op = triton

    def attention(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0):
        return op(
            q,
            k,
            v,
            softmax_n_param=n,
            scale=scale,
            dropout_p=dropout_p,
            attn_mask=attn_mask,
            is_causal=is_causal,
            sink=sink,
        )

    return attention
