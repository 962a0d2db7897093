"""CVMM as ``torch.library`` custom ops, with fake implementations and autograd.

Two ops carry all the arithmetic; ``backend`` picks the implementation inside them:

- ``cvmm_kernel::gather_mm(x, weight, expert, in_row, out_row, bounds, n_out, group, backend)``:
  ``out[out_row[p]] = x[in_row[p]] @ weight[expert[p]]``, shape ``[n_out, d_out]``;
- ``cvmm_kernel::expert_weight_grad(x, grad, expert, in_row, out_row, bounds, out_dtype, backend)``:
  ``dW[e] = sum_{p in e} x[in_row[p]]^T grad[out_row[p]]`` (accumulated in fp32, returned in
  ``out_dtype``, the weight's dtype).

``gather_mm`` takes ``weight`` in ``x``'s dtype or a wider one (fp32 weights under autocast): it
casts a transient copy for the kernel, which measured faster on the H100 than the Triton
kernel's own tile-by-tile cast, and autograd saves only the original weight.

``expert`` is sorted and ``bounds`` (``[E + 1]``) marks each expert's run of positions.
``group > 0`` promises ``in_row == out_row // group`` with ``out_row`` a permutation (the layout of
``cvmm_prepare_sel2``): the gradient of ``x`` is then a plain sum over groups of ``group`` rows,
deterministic; otherwise it is accumulated with ``index_put_(accumulate=True)``.

The backward of ``gather_mm`` is another ``gather_mm`` with the transposed matrices (for ``x``)
and ``expert_weight_grad`` (for ``weight``), so both backends share one autograd formula and
``torch.compile(fullgraph=True)`` sees opaque ops with known output shapes.

Each op takes a last, optional ``config``: the Triton launch settings
``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` of the call (``cvmm(..., config=)``, checked
there), kept for the backward's launches; None chooses them per problem size, the reference
ignores them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _reference_gather_mm(x, weight, expert, in_row, out_row, bounds, n_out):
    out = x.new_zeros(n_out, weight.shape[2])
    if expert.numel() == 0:
        return out
    counts = torch.diff(bounds).tolist()
    pieces = torch.split(x[in_row], counts)
    products = [piece @ weight[e] for e, piece in enumerate(pieces) if piece.shape[0]]
    out[out_row] = torch.cat(products).to(out.dtype)
    return out


def _reference_expert_weight_grad(x, grad, expert, in_row, out_row, bounds, out_dtype):
    n_experts = bounds.numel() - 1
    dw = x.new_zeros(n_experts, x.shape[1], grad.shape[1], dtype=out_dtype)
    if expert.numel() == 0:
        return dw
    counts = torch.diff(bounds).tolist()
    xs = torch.split(x[in_row], counts)
    gs = torch.split(grad[out_row], counts)
    for e, (xe, ge) in enumerate(zip(xs, gs)):
        if xe.shape[0]:
            dw[e] = (xe.transpose(0, 1) @ ge).to(out_dtype)
    return dw


@torch.library.custom_op("cvmm_kernel::gather_mm", mutates_args=())
def gather_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert: torch.Tensor,
    in_row: torch.Tensor,
    out_row: torch.Tensor,
    bounds: torch.Tensor,
    n_out: int,
    group: int,
    backend: str,
    config: Sequence[int] | None = None,
) -> torch.Tensor:
    weight = weight.to(x.dtype)  # no copy when the dtypes agree
    if backend == "triton":
        from .triton_kernels import gather_mm as triton_gather_mm

        return triton_gather_mm(x, weight, expert, in_row, out_row, bounds, n_out, config=config)
    return _reference_gather_mm(x, weight, expert, in_row, out_row, bounds, n_out)


@gather_mm.register_fake
def _(x, weight, expert, in_row, out_row, bounds, n_out, group, backend, config=None):
    return x.new_empty(n_out, weight.shape[2])


@torch.library.custom_op("cvmm_kernel::expert_weight_grad", mutates_args=())
def expert_weight_grad(
    x: torch.Tensor,
    grad: torch.Tensor,
    expert: torch.Tensor,
    in_row: torch.Tensor,
    out_row: torch.Tensor,
    bounds: torch.Tensor,
    out_dtype: torch.dtype,
    backend: str,
    config: Sequence[int] | None = None,
) -> torch.Tensor:
    if backend == "triton":
        from .triton_kernels import expert_weight_grad as triton_expert_weight_grad

        return triton_expert_weight_grad(
            x, grad, expert, in_row, out_row, bounds, out_dtype, config=config
        )
    return _reference_expert_weight_grad(x, grad, expert, in_row, out_row, bounds, out_dtype)


@expert_weight_grad.register_fake
def _(x, grad, expert, in_row, out_row, bounds, out_dtype, backend, config=None):
    return x.new_empty(bounds.shape[0] - 1, x.shape[1], grad.shape[1], dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, expert, in_row, out_row, bounds, _n_out, group, backend, config = inputs
    ctx.save_for_backward(x, weight, expert, in_row, out_row, bounds)
    ctx.group = group
    ctx.backend = backend
    ctx.config = config


def _backward(ctx, grad_out):
    x, weight, expert, in_row, out_row, bounds = ctx.saved_tensors
    grad_out = grad_out.to(x.dtype)
    grad_x = grad_w = None
    n = expert.numel()
    if ctx.needs_input_grad[0]:
        w_t = weight.transpose(1, 2)
        if ctx.group > 0:
            # in_row == out_row // group: write each position's row at out_row, sum the groups.
            per_position = gather_mm(
                grad_out, w_t, expert, out_row, out_row, bounds, n, 0, ctx.backend, ctx.config
            )
            grad_x = per_position.view(x.shape[0], ctx.group, x.shape[1]).sum(1)
        else:
            positions = torch.arange(n, device=expert.device)
            per_position = gather_mm(
                grad_out, w_t, expert, out_row, positions, bounds, n, 0, ctx.backend, ctx.config
            )
            grad_x = x.new_zeros(x.shape).index_put_((in_row,), per_position, accumulate=True)
    if ctx.needs_input_grad[1]:
        grad_w = expert_weight_grad(
            x, grad_out, expert, in_row, out_row, bounds, weight.dtype, ctx.backend, ctx.config
        )
    return grad_x, grad_w, None, None, None, None, None, None, None, None


gather_mm.register_autograd(_backward, setup_context=_setup_context)


# ----- gather-mm with the weighted reduction fused into the op -----
#
# out[t] = sum_{q // k == t} rw[q] * x[in_row[p]] @ weight[expert[p]]   (q = out_row[p])
#
# The forward still forms the [N, d_out] products (one transient tensor, reduced at once by a
# batched matmul), but nothing of that size is saved for the backward or formed in it: with
# z[q] = grad[q // k] @ weight[e]^T (a gather-mm whose input rows are the k-groups),
#   d x[in_row[p]] += rw[q] z[q],   d rw[q] = <z[q], x[in_row[p]]>,
#   d weight[e] = sum_p (rw[q] x[in_row[p]])^T grad[q // k],
# all on tensors of the input's width (d_in), which is the narrow side of a down-projection.


@torch.library.custom_op("cvmm_kernel::gather_mm_reduce", mutates_args=())
def gather_mm_reduce(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert: torch.Tensor,
    in_row: torch.Tensor,
    out_row: torch.Tensor,
    bounds: torch.Tensor,
    reduction_weight: torch.Tensor,
    n_groups: int,
    group: int,
    backend: str,
    config: Sequence[int] | None = None,
) -> torch.Tensor:
    n = expert.numel()
    products = gather_mm(x, weight, expert, in_row, out_row, bounds, n, group, backend, config)
    k = n // n_groups if n_groups else 0
    rw = reduction_weight.reshape(n_groups, 1, k).to(products.dtype)
    return torch.bmm(rw, products.view(n_groups, k, weight.shape[2])).squeeze(1)


@gather_mm_reduce.register_fake
def _(x, weight, expert, in_row, out_row, bounds, reduction_weight, n_groups, group, backend,
      config=None):  # fmt: skip
    return x.new_empty(n_groups, weight.shape[2])


def _setup_reduce_context(ctx, inputs, output):
    x, weight, expert, in_row, out_row, bounds, rw, n_groups, group, backend, config = inputs
    k = max(expert.numel() // n_groups, 1) if n_groups else 1
    ctx.save_for_backward(x, weight, expert, in_row, out_row, bounds, rw)
    ctx.k, ctx.group, ctx.backend, ctx.config = k, group, backend, config


def _reduce_backward(ctx, grad_out):
    x, weight, expert, in_row, out_row, bounds, rw = ctx.saved_tensors
    grad_out = grad_out.to(x.dtype)
    n, k, group = expert.numel(), ctx.k, ctx.group  # k >= 1 (no positions when k would be 0)
    need_x, need_w, need_rw = (
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        ctx.needs_input_grad[6],
    )
    grad_x = grad_w = grad_rw = None
    rw_flat = rw.reshape(n)
    # z[q] = grad[q // k] @ weight[e]^T, rows in output-position order
    z = gather_mm(grad_out, weight.transpose(1, 2), expert, out_row // k, out_row, bounds, n, 0,
                  ctx.backend, ctx.config)  # fmt: skip
    if group > 0:  # in_row == out_row // group: x's row of output position q is q // group
        x_of_q = x.repeat_interleave(group, dim=0) if need_rw else None
    else:
        x_of_q = x.new_empty(n, x.shape[1]).index_copy_(0, out_row, x[in_row]) if need_rw else None
    if need_rw:
        acc = torch.promote_types(z.dtype, torch.float32)  # bf16/fp16 rows summed in fp32
        grad_rw = (z.to(acc) * x_of_q.to(acc)).sum(-1).to(rw.dtype).view(rw.shape)
    if need_x:
        scaled = z * rw_flat.to(z.dtype).unsqueeze(-1)
        if group > 0:
            grad_x = scaled.view(x.shape[0], group, x.shape[1]).sum(1)
        else:
            grad_x = x.new_zeros(x.shape).index_put_((in_row,), scaled[out_row], accumulate=True)
    if need_w:
        x_scaled = x[in_row] * rw_flat[out_row].to(x.dtype).unsqueeze(-1)  # [N, d_in], sorted
        positions = torch.arange(n, device=expert.device)
        grad_w = expert_weight_grad(x_scaled, grad_out, expert, positions, out_row // k, bounds,
                                    weight.dtype, ctx.backend, ctx.config)  # fmt: skip
    return grad_x, grad_w, None, None, None, None, grad_rw, None, None, None, None


gather_mm_reduce.register_autograd(_reduce_backward, setup_context=_setup_reduce_context)
