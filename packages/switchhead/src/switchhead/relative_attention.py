"""Transformer-XL relative-position attention, one op with two paths.

``relative_attention(q, k, v, r, keep, is_causal, scale)`` scores query ``i`` against key ``j``
with ``scale * q_i . k_j + q_i . r[h, j - i + L - 1]``: ``r [H, L + S - 1, D]`` holds one
(already scaled) embedding per relative position, from ``-(L - 1)`` to ``S - 1`` in key-minus-query
order.

- ``"reference"``: the positional scores ``[B, H, L, L + S - 1]`` as one matmul, skewed into an
  additive ``[B, H, L, S]`` bias for :func:`torch.nn.functional.scaled_dot_product_attention`
  (memory quadratic in the length; any device and dtype).
- ``"triton"``: the flash-style kernels of :mod:`switchhead.relative_attention_triton` (memory
  linear in the length; CUDA, or the Triton interpreter), registered as ``torch.library`` custom
  ops with fake and autograd implementations so ``torch.compile(fullgraph=True)`` traces them.

``backend=None`` picks ``"triton"`` for CUDA tensors in float16, bfloat16 or float32 with head
dims up to 256 when deterministic algorithms are not requested (the backward adds the gradient
of ``r`` with atomics; those of ``q``, ``k`` and ``v`` are reproducible); otherwise
``"reference"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import causal_keep_mask
from .triton_support import KERNEL_DTYPES, kernels_can_run

BACKENDS = ("reference", "triton")
MAX_HEAD_DIM = 256


def skew(pos_scores: torch.Tensor, n_keys: int) -> torch.Tensor:
    """``[..., Tq, Tq + Tk - 1] -> [..., Tq, Tk]``, entry ``(i, j)`` read from column
    ``j - i + Tq - 1`` (relative position to a key), with views only.

    Row ``i`` of the result starts ``Tq - 1 - i`` columns into row ``i`` of the input, so in the
    flattened input it starts at ``Tq - 1 + i * (P - 1)``: a view with row stride ``P - 1``.
    """
    n_q, n_pos = pos_scores.shape[-2:]
    if n_q == 1:
        return pos_scores
    flat = pos_scores.flatten(-2).narrow(-1, n_q - 1, n_q * (n_pos - 1))
    return flat.view(*pos_scores.shape[:-2], n_q, n_pos - 1)[..., :n_keys]


def reference_relative_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    keep: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    attention_fn=F.scaled_dot_product_attention,
) -> torch.Tensor:
    """The positional term as an additive bias for ``attention_fn`` (SDPA's signature); shapes
    as :func:`relative_attention`. Rows that see no key follow ``attention_fn`` (NaN for SDPA)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    pos_scores = torch.matmul(q, r.to(q.dtype).transpose(-1, -2))  # [B, H, L, P]
    bias = skew(pos_scores, n_k)
    if is_causal:
        causal = causal_keep_mask(n_q, n_k, q.device)
        keep = causal if keep is None else keep & causal
    bias = bias.masked_fill(~keep, float("-inf")) if keep is not None else bias.contiguous()
    return attention_fn(q, k, v, attn_mask=bias, is_causal=False, scale=scale)


# ----- the Triton path as custom ops -----


def _kernels():
    from . import relative_attention_triton

    return relative_attention_triton


@torch.library.custom_op("switchhead::relative_attention_fwd", mutates_args=())
def triton_relative_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    keep: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, L, Dv], lse [B, H, L] float32)``; shapes as :func:`relative_attention`."""
    return _kernels().relative_attention_fwd(q, k, v, r, keep, is_causal, scale)


@triton_relative_attention_fwd.register_fake
def _(q, k, v, r, keep, is_causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("switchhead::relative_attention_bwd", mutates_args=())
def triton_relative_attention_bwd(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    keep: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, dr)`` (``dr`` float32 ``[H, P, D]``)."""
    return _kernels().relative_attention_bwd(grad, q, k, v, r, keep, out, lse, is_causal, scale)


@triton_relative_attention_bwd.register_fake
def _(grad, q, k, v, r, keep, out, lse, is_causal, scale):
    dr = q.new_empty((r.shape[0], r.shape[1], q.shape[-1]), dtype=torch.float32)
    # contiguous, as the kernels' launcher allocates them (q, k, v are often transposed views)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dr


def _setup_context(ctx, inputs, output):
    q, k, v, r, keep, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, r, keep, out, lse)
    ctx.is_causal, ctx.scale = is_causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad, _grad_lse):
    q, k, v, r, keep, out, lse = ctx.saved_tensors
    dq, dk, dv, dr = triton_relative_attention_bwd(
        grad.contiguous(), q, k, v, r, keep, out, lse, ctx.is_causal, ctx.scale
    )
    return dq, dk, dv, dr.to(r.dtype), None, None, None


triton_relative_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----- the public function -----


def _kernels_take(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernels handle these dtypes and head dims."""
    return q.dtype in KERNEL_DTYPES and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM


def kernel_supports(q: torch.Tensor, v: torch.Tensor | None = None) -> bool:
    """Whether ``backend=None`` would run ``q`` (and its k, v, r; ``v`` defaults to ``q``'s
    head size) on the Triton kernels."""
    if not kernels_can_run(q) or not _kernels_take(q, q if v is None else v):
        return False
    return not torch.are_deterministic_algorithms_enabled()


def _check(q, k, v, r, keep, scale, backend) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'reference' or 'triton', got {backend!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, H, T, d], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    if k.shape[:2] != (b, h) or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError(
            f"k must be [B={b}, H={h}, S, {d}] and v [B, H, S, Dv], got {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if r.shape != (h, n_q + n_k - 1, d):
        raise ValueError(
            f"r must be [H={h}, L + S - 1={n_q + n_k - 1}, d={d}], got {tuple(r.shape)}"
        )
    tensors = {"q": q, "k": k, "v": v, "r": r}
    if len({t.device for t in tensors.values()}) != 1:
        devices = {n: str(t.device) for n, t in tensors.items()}
        raise ValueError(f"q, k, v, r must share a device, got {devices}")
    if not all(t.is_floating_point() for t in tensors.values()):
        raise TypeError("q, k, v, r must be floating point")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if keep is not None:
        if keep.dtype != torch.bool:
            raise TypeError(f"keep must be boolean (True = attend), got {keep.dtype}")
        try:
            torch.broadcast_shapes(keep.shape, (b, h, n_q, n_k))
        except RuntimeError:
            raise ValueError(
                f"keep must broadcast to [B, H, L, S] = {[b, h, n_q, n_k]}, got {tuple(keep.shape)}"
            ) from None
        if keep.dim() > 4 or keep.device != q.device:
            raise ValueError(f"keep must be at most 4-D on {q.device}, got {tuple(keep.shape)}")
    if not isinstance(scale, float | int) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if backend == "triton" and not _kernels_take(q, v):
        raise ValueError(
            f"backend='triton' takes float16/bfloat16/float32 and head dims up to "
            f"{MAX_HEAD_DIM}, got {q.dtype}, d={d}, dv={v.shape[-1]}"
        )


def relative_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    keep: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention with Transformer-XL relative positions.

    Args:
        q: ``[B, H, L, D]``; k: ``[B, H, S, D]``; v: ``[B, H, S, Dv]`` (one dtype).
        r: ``[H, L + S - 1, D]``: row ``c`` is the embedding of relative position
            ``c - (L - 1)`` (key minus query index), already multiplied by whatever scale the
            positional term should have; cast to q's dtype.
        keep: optional boolean mask broadcastable to ``[B, H, L, S]``, ``True`` = attend.
        is_causal: query ``i`` sees keys ``j <= i + S - L`` (bottom-right aligned).
        scale: of the content term, default ``1 / sqrt(D)``.
        backend: ``None`` (see the module docstring), ``"reference"`` or ``"triton"``.

    Returns:
        ``[B, H, L, Dv]`` in q's dtype.

    Raises:
        TypeError, ValueError: for inputs outside the above, before any computation.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    _check(q, k, v, r, keep, scale, backend)
    if backend is None:
        backend = "triton" if kernel_supports(q, v) else "reference"
    if backend == "reference":
        return reference_relative_attention(q, k, v, r, keep, is_causal, scale)
    # contiguous here, so that the tensor the op saves for its backward is too (the kernels would
    # otherwise copy a transposed r, as SwitchHeadXL's, once each way)
    r = r.to(q.dtype).contiguous()
    out, _lse = triton_relative_attention_fwd(q, k, v, r, keep, is_causal, float(scale))
    return out


__all__ = [
    "kernel_supports",
    "reference_relative_attention",
    "relative_attention",
    "skew",
]
