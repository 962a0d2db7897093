"""CVMM as ``torch.library`` custom ops, with fake implementations and autograd.

Two ops carry all the arithmetic; ``backend`` picks the implementation inside them:

- ``cvmm_kernel::gather_mm(x, weight, expert, in_row, out_row, bounds, n_out, group, backend)``:
  ``out[out_row[p]] = x[in_row[p]] @ weight[expert[p]]``, shape ``[n_out, d_out]``;
- ``cvmm_kernel::expert_weight_grad(x, grad, expert, in_row, out_row, bounds, backend)``:
  ``dW[e] = sum_{p in e} x[in_row[p]]^T grad[out_row[p]]``.

``expert`` is sorted and ``bounds`` (``[E + 1]``) marks each expert's run of positions.
``group > 0`` promises ``in_row == out_row // group`` with ``out_row`` a permutation (the layout of
``cvmm_prepare_sel2``): the gradient of ``x`` is then a plain sum over groups of ``group`` rows,
deterministic; otherwise it is accumulated with ``index_put_(accumulate=True)``.

The backward of ``gather_mm`` is another ``gather_mm`` with the transposed matrices (for ``x``)
and ``expert_weight_grad`` (for ``weight``), so both backends share one autograd formula and
``torch.compile(fullgraph=True)`` sees opaque ops with known output shapes.
"""

from __future__ import annotations

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


def _reference_expert_weight_grad(x, grad, expert, in_row, out_row, bounds):
    n_experts = bounds.numel() - 1
    dw = x.new_zeros(n_experts, x.shape[1], grad.shape[1])
    if expert.numel() == 0:
        return dw
    counts = torch.diff(bounds).tolist()
    xs = torch.split(x[in_row], counts)
    gs = torch.split(grad[out_row], counts)
    for e, (xe, ge) in enumerate(zip(xs, gs)):
        if xe.shape[0]:
            dw[e] = xe.transpose(0, 1) @ ge
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
) -> torch.Tensor:
    if backend == "triton":
        from .triton_kernels import gather_mm as triton_gather_mm

        return triton_gather_mm(x, weight, expert, in_row, out_row, bounds, n_out)
    return _reference_gather_mm(x, weight, expert, in_row, out_row, bounds, n_out)


@gather_mm.register_fake
def _(x, weight, expert, in_row, out_row, bounds, n_out, group, backend):
    return x.new_empty(n_out, weight.shape[2])


@torch.library.custom_op("cvmm_kernel::expert_weight_grad", mutates_args=())
def expert_weight_grad(
    x: torch.Tensor,
    grad: torch.Tensor,
    expert: torch.Tensor,
    in_row: torch.Tensor,
    out_row: torch.Tensor,
    bounds: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    if backend == "triton":
        from .triton_kernels import expert_weight_grad as triton_expert_weight_grad

        return triton_expert_weight_grad(x, grad, expert, in_row, out_row, bounds)
    return _reference_expert_weight_grad(x, grad, expert, in_row, out_row, bounds)


@expert_weight_grad.register_fake
def _(x, grad, expert, in_row, out_row, bounds, backend):
    return x.new_empty(bounds.shape[0] - 1, x.shape[1], grad.shape[1])


def _setup_context(ctx, inputs, output):
    x, weight, expert, in_row, out_row, bounds, _n_out, group, backend = inputs
    ctx.save_for_backward(x, weight, expert, in_row, out_row, bounds)
    ctx.group = group
    ctx.backend = backend


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
                grad_out, w_t, expert, out_row, out_row, bounds, n, 0, ctx.backend
            )
            grad_x = per_position.view(x.shape[0], ctx.group, x.shape[1]).sum(1)
        else:
            positions = torch.arange(n, device=expert.device)
            per_position = gather_mm(
                grad_out, w_t, expert, out_row, positions, bounds, n, 0, ctx.backend
            )
            grad_x = x.new_zeros(x.shape).index_put_((in_row,), per_position, accumulate=True)
    if ctx.needs_input_grad[1]:
        grad_w = expert_weight_grad(x, grad_out, expert, in_row, out_row, bounds, ctx.backend)
        grad_w = grad_w.to(weight.dtype)
    return grad_x, grad_w, None, None, None, None, None, None, None


gather_mm.register_autograd(_backward, setup_context=_setup_context)
