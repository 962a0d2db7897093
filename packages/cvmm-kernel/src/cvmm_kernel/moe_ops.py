"""The fused sigma-MoE feedforward as ``torch.library`` custom ops (fake and autograd included).

With slots ``s = t * k + j`` (token ``t``, its ``j``-th expert ``e = index[t, j]``, gate
``g = gate[t, j]``)::

    u_s = x_t @ W_up[e]        h_s = act(u_s)        y_s = h_s @ W_down[e]
    out_t = sum_j g_s * y_s

and the backward, with ``z_s = dout_t @ W_down[e]^T``::

    d gate_s = <z_s, h_s>        du_s = g_s * z_s * act'(u_s)
    dx_t = sum_j du_s @ W_up[e]^T
    dW_down[e] = sum_{s in e} (g_s h_s)^T dout_t        dW_up[e] = sum_{s in e} x_t^T du_s

Three ops: ``moe_routing`` (the sorted layout of the slots, built once per call and used by the
forward and the backward), ``moe_mlp_forward`` and ``moe_mlp_backward``. ``backend`` picks the
Triton kernels (:mod:`cvmm_kernel.moe_triton`) or the PyTorch reference below, which follows the
same decomposition one expert at a time. The k-sums over a token's slots are deterministic
(products written per slot, then summed in fp32 by a group-sum kernel); with
``deterministic=False`` the Triton path adds them with fp32 atomics instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .host_math import next_power_of_2
from .interpreter import interpreting
from .shared_grads import grad_buffer, settle
from .traced_ops import register_twins, twin_ops
from .triton_modules import triton_module
from .validation import check_launch_config
from .weight_cache import cast_weight

ACTIVATION_NAMES = ("identity", "relu", "gelu", "silu")
_NEEDS_PREACTIVATION = ("gelu", "silu")

# Rows per tile of the gathered GEMMs (the routing tile table is built for it).
BLOCK_M = 128
# Launch settings per role. GEMMs: (BLOCK_N, BLOCK_K, num_warps, num_stages); weight gradients:
# (BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages). The fastest of benchmarks/sweep_moe.py on
# an H100 at the MoEUT-244M shape (benchmarks/results/sweep_moe.json); with the expert matrices
# by TMA, grad_hidden and grad_input_rows again at all three FFN shapes, down and grad_input at
# the 64 x 4096 one, the only one that runs them (sweep_moe_tma.json).
GEMM_CONFIGS: dict[str, tuple[int, ...]] = {
    "up": (128, 64, 8, 3),
    # down and grad_input run on this kernel for expert sizes above ROWS_MAX_K only
    "down": (256, 64, 8, 4),
    "grad_hidden": (128, 64, 8, 5),
    "grad_input": (256, 64, 8, 4),
    "grad_w_up": (64, 128, 128, 4, 4),
    "grad_w_down": (64, 128, 128, 4, 4),  # of dW_down^T = dy[token]^T (g * h) (ab_wgrad_down)
    # Row-tile kernel (small inner size): (BLOCK_N, num_warps, num_stages).
    "down_rows": (128, 8, 4),
    "grad_input_rows": (128, 8, 4),
    # The whole forward per tile for expert sizes up to ROWS_MAX_K (moe_triton.moe_mlp_rows, in
    # place of "up" and "down_rows"): (BLOCK_K, BLOCK_N, num_warps, up stages, down stages)
    # (benchmarks/results/ab_fused_forward.json).
    "fused_forward": (64, 128, 4, 3, 3),
    # moe_linear (cvmm_kernel.linear_ops): forward, input gradient (with the gate gradient),
    # weight gradient, on the general or the row-tile kernel (benchmarks/sweep_linear.py; the
    # general kernel's input gradient, O's, from sweep_linear_tma.json).
    "linear": (128, 64, 8, 3),
    "linear_rows": (128, 8, 4),
    "linear_grad_input": (128, 64, 8, 3),
    "linear_grad_input_rows": (64, 4, 4),  # also stages x's columns: 128 wide is too much
    # products by pairs of experts (cvmm_kernel.pair_slots): (BLOCK_N, BLOCK_M, num_warps,
    # num_stages; the stages of Triton's pipeliner, unused where the loads are prefetched by
    # hand: ab_pair_prefetch.md)
    "linear_pairs": (128, 64, 8, 3),
    # tiles of a pair's items, any inner size (pair_triton._pair_gemm_kernel): (BLOCK_N,
    # BLOCK_K, num_warps, num_stages); BLOCK_M is the call's block_m (ab_pair_routing.md; 4
    # stages: V 4 x 8 2.5 us faster, O the same with its input gradient on a side stream,
    # ab_linear_overlap.md)
    "linear_pair_gemm": (128, 64, 8, 4),
    # (O's by pairs at 4 x 8 experts: 128-row steps, ab_pair_roles.md)
    "grad_w_linear": (128, 128, 128, 4, 3),
    # the weight gradient by pairs from the gated rows in the experts' order (V's: one operand
    # gathered, no gate in the loop). (64, 64, 128, 4, 4) gains 1% at 4 x 8 experts but loses
    # 6% at 4 x 10 (ab_pair_roles_4x10.md)
    "grad_w_linear_sorted": (64, 128, 128, 4, 4),
}


class Routing(NamedTuple):
    """The expert-sorted layout of the slots (see :mod:`cvmm_kernel.moe_triton`). A call by
    pairs of experts (:mod:`cvmm_kernel.pair_slots`) also has its items sorted by pair, and
    its tile table is the pairs' (tiles of items, numbered by pair)."""

    sorted_to_slot: torch.Tensor  # [N] int32
    slot_to_sorted: torch.Tensor  # [N] int32
    offsets: torch.Tensor  # [E + 1] int32
    tile_expert: torch.Tensor  # [n_tiles] int32, E on padding tiles
    tile_start: torch.Tensor  # [n_tiles] int32
    n_valid: torch.Tensor  # [1] int32, the number of tiles in use (they come first)
    block_m: int
    sorted_lo_slot: torch.Tensor | None = None  # [N / 2] int32, items as lo slots; by pairs only
    pair_offsets: torch.Tensor | None = None  # [E * (E + 1) / 2 + 1] int32, by pairs only


def block_m_for(backend: str) -> int:
    return 16 if backend == "triton" and interpreting() else BLOCK_M


# ----- launch settings passed per call (moe_mlp / moe_linear: block_m=, gemm_configs=) -----

_ROLES = tuple(GEMM_CONFIGS)


def role_fields(role: str) -> tuple[tuple[str, ...], int]:
    """The fields of ``role``'s launch settings (as in ``GEMM_CONFIGS``) and how many trailing
    ones may be left out."""
    if role.endswith("_rows"):
        return ("BLOCK_N", "num_warps", "num_stages"), 0
    if role == "fused_forward":
        return ("BLOCK_K", "BLOCK_N", "num_warps", "num_stages", "num_stages"), 0
    if role == "linear_pairs":
        return ("BLOCK_N", "BLOCK_M", "num_warps", "num_stages"), 0
    if role == "linear_pair_gemm":
        return ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), 0
    if role.startswith("grad_w"):
        return ("BLOCK_M", "BLOCK_K", "BLOCK_N", "num_warps", "num_stages"), 0
    return ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "persistent"), 1


def check_block_m(block_m: object) -> int | None:
    """``block_m=`` of ``moe_mlp``/``moe_linear``: None or a power of two >= 16."""
    if block_m is None:
        return None
    if isinstance(block_m, bool) or not isinstance(block_m, int):
        raise TypeError(f"block_m must be an int or None, got {block_m!r}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    return block_m


def check_gemm_configs(gemm_configs: object) -> dict[str, tuple[int, ...]] | None:
    """``gemm_configs=`` of ``moe_mlp``/``moe_linear``: None or a mapping from roles of
    ``GEMM_CONFIGS`` to settings of their form (see ``validation.check_launch_config``);
    ``ValueError`` for an unknown role or a bad setting. An empty mapping is None."""
    if gemm_configs is None:
        return None
    if not isinstance(gemm_configs, Mapping):
        raise TypeError(f"gemm_configs must be a mapping role -> settings, got {gemm_configs!r}")
    checked = {}
    for role, cfg in gemm_configs.items():
        if role not in GEMM_CONFIGS:
            raise ValueError(f"gemm_configs: unknown role {role!r}; the roles: {', '.join(_ROLES)}")
        fields, optional = role_fields(role)
        checked[role] = check_launch_config(
            f"gemm_configs[{role!r}]", cfg, fields, optional=optional
        )
    return checked or None


def check_weight_grad_rounding(in_compute_dtype: object) -> bool:
    """``weight_grads_in_compute_dtype=`` of ``moe_mlp``/``moe_linear``: a bool."""
    if not isinstance(in_compute_dtype, bool):
        raise TypeError(f"weight_grads_in_compute_dtype must be a bool, got {in_compute_dtype!r}")
    return in_compute_dtype


def no_second_derivative(backend: str) -> None:
    """Raise in an eager op's backward asked to build a graph (``create_graph=True``) on the
    Triton path: its kernels record none, so a second derivative would come out wrong without a
    word. The reference path's backward is PyTorch ops, which autograd records."""
    if backend == "triton" and torch.is_grad_enabled():
        raise RuntimeError(
            "moe_mlp and moe_linear have no second derivatives on the Triton path "
            "(create_graph=True); use backend='reference' for them"
        )


def weight_grad_dtype(
    in_compute_dtype: bool, compute: torch.dtype, weight: torch.dtype
) -> torch.dtype | None:
    """The dtype a call rounds its weight gradients to: the compute dtype where
    ``weight_grads_in_compute_dtype`` asks for it and it differs from the weights', else None."""
    return compute if in_compute_dtype and compute != weight else None


def in_weight_dtype(grad: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
    """A weight gradient as autograd gets it: in the weight's dtype (from the call's rounding
    dtype, if any; compiled, the cast fuses into what consumes it)."""
    return None if grad is None else grad.to(weight.dtype)


def encode_gemm_configs(configs: Mapping[str, Sequence[int]] | None) -> list[int] | None:
    """Checked ``gemm_configs`` as the custom ops take them (a schema has no mappings): per role
    its position in ``GEMM_CONFIGS``, its length, its values."""
    if not configs:
        return None
    flat = []
    for role, cfg in configs.items():
        flat += [_ROLES.index(role), len(cfg), *cfg]
    return flat


def decode_gemm_configs(flat: Sequence[int] | None) -> dict[str, tuple[int, ...]] | None:
    """The inverse of :func:`encode_gemm_configs`."""
    if not flat:
        return None
    configs, i = {}, 0
    while i < len(flat):
        size = flat[i + 1]
        configs[_ROLES[flat[i]]] = tuple(flat[i + 2 : i + 2 + size])
        i += 2 + size
    return configs


_CONFIGS: dict[tuple, tuple[int, ...]] = {}  # (role, k, n, tuned settings) -> fitted settings


def _config(
    role: str, k: int, n: int, configs: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[int, ...]:
    """Launch settings of ``role`` for a GEMM of inner size ``k`` and width ``n``: the call's
    ``configs[role]`` where given (also under the interpreter), else ``GEMM_CONFIGS[role]``,
    fitted to the sizes (remembered: called several times per op)."""
    cfg = configs.get(role) if configs else None
    if cfg is None:
        if interpreting():
            if role.endswith("_rows"):
                return (16, 1, 1)
            if role == "fused_forward":
                return (16, 16, 1, 1, 1)
            return (16, 16, 16, 1, 1) if role.startswith("grad_w") else (16, 16, 1, 1)
        cfg = GEMM_CONFIGS[role]
    key = (role, k, n, cfg)
    fitted = _CONFIGS.get(key)
    if fitted is None:
        fitted = _CONFIGS[key] = _fit_config(role, k, n, cfg)
    return fitted


def _fit_config(role: str, k: int, n: int, cfg: tuple[int, ...]) -> tuple[int, ...]:
    fit = lambda block, size: min(block, max(16, next_power_of_2(size)))
    if role.endswith("_rows"):
        bn, *rest = cfg
        return (fit(bn, n), *rest)
    if role.startswith("grad_w"):
        bm, bk, bn, *rest = cfg
        return (bm, fit(bk, k), fit(bn, n), *rest)
    if role == "fused_forward":
        bk, bn, *rest = cfg
        return (fit(bk, k), fit(bn, n), *rest)
    if role == "linear_pairs":
        bn, *rest = cfg
        return (fit(bn, n), *rest)
    bn, bk, *rest = cfg
    return (fit(bn, n), fit(bk, k), *rest)


def n_tiles(n_slots: int, n_experts: int, block_m: int) -> int:
    """Length of the tile table: enough for any distribution of the slots over the experts."""
    return -(-n_slots // block_m) + min(n_experts, n_slots)


def _reference_tile_table(counts: torch.Tensor, offsets: torch.Tensor, length: int, block_m: int):
    n_experts = counts.numel()
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0, dtype=torch.int32)
    ids = torch.arange(length, dtype=torch.int32, device=counts.device)
    tile_expert = torch.searchsorted(tile_end, ids, right=True).to(torch.int32)
    e = tile_expert.clamp(max=max(n_experts - 1, 0)).long()
    tile_start = (offsets[e] + (ids - (tile_end - tiles)[e]) * block_m).to(torch.int32)
    n_valid = (
        tile_end[-1:] if n_experts else torch.zeros(1, dtype=torch.int32, device=counts.device)
    )
    return tile_expert, tile_start, n_valid.clone()


def routing_impl(
    index: torch.Tensor, n_experts: int, block_m: int, backend: str, apart: bool = True
):
    """``index [N]`` (expert of each slot, int64) -> ``(sorted_to_slot, slot_to_sorted,
    offsets, tile_expert, tile_start, n_valid)``; no sort and no host sync on Triton, where
    ``apart=False`` makes them views of one allocation (for eager calls, not custom ops)."""
    n = index.numel()
    length = n_tiles(n, n_experts, block_m)
    if backend == "triton" and n > 0:
        return triton_module("moe_triton").build_routing(
            index, n_experts, block_m, length, apart=apart
        )
    order = torch.sort(index, stable=True).indices
    sorted_to_slot = order.to(torch.int32)
    slot_to_sorted = torch.empty_like(sorted_to_slot).scatter_(
        0, order, torch.arange(n, dtype=torch.int32, device=index.device)
    )
    counts = torch.bincount(index, minlength=n_experts).to(torch.int32)
    offsets = torch.zeros(n_experts + 1, dtype=torch.int32, device=index.device)
    offsets[1:] = torch.cumsum(counts, 0, dtype=torch.int32)
    return (
        sorted_to_slot,
        slot_to_sorted,
        offsets,
        *_reference_tile_table(counts, offsets, length, block_m),
    )


def _routing_op(
    index: torch.Tensor, n_experts: int, block_m: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routing layout as an op (see :func:`routing_impl`)."""
    return routing_impl(index, n_experts, block_m, backend)


moe_routing, moe_routing_traced = twin_ops("cvmm_kernel::moe_routing", _routing_op)


def _routing_fake(index, n_experts, block_m, backend):
    n = index.numel()
    length = n_tiles(n, n_experts, block_m)
    new = lambda size: index.new_empty(size, dtype=torch.int32)
    return new(n), new(n), new(n_experts + 1), new(length), new(length), new(1)


moe_routing.register_fake(_routing_fake)
moe_routing_traced.register_fake(_routing_fake)


# ----- the PyTorch reference, one expert at a time -----


def _activate(u: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(u)
    if activation == "gelu":
        return F.gelu(u)
    if activation == "silu":
        return F.silu(u)
    return u


def _activation_grad(u: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return (
            0.5 * (1 + torch.erf(u * 0.5**0.5))
            + u * torch.exp(-0.5 * u * u) * (2 * torch.pi) ** -0.5
        )
    s = torch.sigmoid(u)
    return s + u * s * (1 - s)


def _per_expert(rows: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``rows [P, K]`` in expert-sorted order times their expert's ``w [E, K, N]``."""
    counts = torch.diff(offsets).tolist()
    pieces = [piece @ w[e] for e, piece in enumerate(torch.split(rows, counts)) if piece.shape[0]]
    return torch.cat(pieces) if pieces else rows.new_zeros(0, w.shape[2])


def _per_expert_outer(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, dw: torch.Tensor):
    counts = torch.diff(offsets).tolist()
    for e, (ae, be) in enumerate(zip(torch.split(a, counts), torch.split(b, counts))):
        dw[e] = (ae.transpose(0, 1) @ be).to(dw.dtype) if ae.shape[0] else 0
    return dw


def _sum_slots(sorted_rows: torch.Tensor, sorted_to_slot: torch.Tensor, top_k: int, tokens: int):
    """Rows in sorted order -> per token sum of its k slots (in fp32, deterministic)."""
    width = sorted_rows.shape[1]
    per_slot = sorted_rows.new_empty(tokens * top_k, width)
    per_slot.index_copy_(0, sorted_to_slot.long(), sorted_rows)
    return per_slot.view(tokens, top_k, width).sum(1)


def _reference_forward(x, gate, w_up, w_down, r: Routing, top_k, activation):
    s2s = r.sorted_to_slot.long()
    hidden = _per_expert(x[s2s // top_k], w_up.to(x.dtype), r.offsets)
    h = _activate(hidden, activation)
    y = _per_expert(h, w_down.to(x.dtype), r.offsets) * gate[s2s].to(x.dtype).unsqueeze(-1)
    u = hidden if activation in _NEEDS_PREACTIVATION else hidden.new_empty(0, hidden.shape[1])
    return _sum_slots(y, r.sorted_to_slot, top_k, x.shape[0]), h, u


def _reference_backward(dy, x, gate, w_up, w_down, h, u, r: Routing, top_k, activation,
                        shared=(None, None), grad_dtype=None):  # fmt: skip
    s2s = r.sorted_to_slot.long()
    token = s2s // top_k
    g = gate[s2s].to(x.dtype).unsqueeze(-1)
    z = _per_expert(dy[token], w_down.to(x.dtype).transpose(1, 2), r.offsets)
    acc = torch.promote_types(z.dtype, torch.float32)
    dgate_sorted = (z.to(acc) * h.to(acc)).sum(-1)
    dgate = torch.empty_like(dgate_sorted).index_copy_(0, s2s, dgate_sorted).to(gate.dtype)
    du = z * g
    if activation == "relu":
        du = torch.where(h > 0, du, 0)
    elif activation in _NEEDS_PREACTIVATION:
        du = du * _activation_grad(u, activation)
    dx = _sum_slots(
        _per_expert(du, w_up.to(x.dtype).transpose(1, 2), r.offsets), s2s, top_k, x.shape[0]
    )
    own = lambda i, w: torch.empty_like(w, dtype=grad_dtype if shared[i] is None else None)
    dw_down = _per_expert_outer(h * g, dy[token], r.offsets, own(1, w_down))
    dw_up = _per_expert_outer(x[token], du, r.offsets, own(0, w_up))
    return dx, dgate, settle(shared[0], dw_up, False), settle(shared[1], dw_down, False)


# ----- the Triton path -----


# The deterministic forward of expert sizes up to ROWS_MAX_K in one kernel per tile
# (moe_triton.moe_mlp_rows) instead of the up projection's GEMM and the row-tile kernel: the same
# bits, 1% faster forward + backward at the 244M shape on an H100, equal at 128 x 128
# (ab_fused_forward.json; with fp32 atomics instead of the products it was slower). Set
# FUSED_FORWARD[0] = False for the two kernels (benchmarks/ab_fused_forward.py, tests).
FUSED_FORWARD = [True]


def _triton_forward(x, gate, w_up, w_down, r: Routing, top_k, activation, deterministic,
                    configs=None):  # fmt: skip
    kt = triton_module("moe_triton")

    wu, wd = cast_weight(w_up, x.dtype), cast_weight(w_down, x.dtype)
    tokens, d_in = x.shape
    n, hid = tokens * top_k, w_up.shape[2]
    h = x.new_empty(n, hid)
    u = x.new_empty(n if activation in _NEEDS_PREACTIVATION else 0, hid)
    if FUSED_FORWARD[0] and deterministic and 0 < hid <= kt.ROWS_MAX_K and d_in > 0 and top_k:
        products = x.new_empty(n, w_down.shape[2])
        cfg = _config("fused_forward", d_in, w_down.shape[2], configs)
        kt.moe_mlp_rows(x, wu, wd, h, u if u.numel() else None, products, r, top_k,
                        activation=activation, gate=gate, config=cfg)  # fmt: skip
        return kt.gated_group_sum(products, None, top_k), h, u
    kt.moe_gemm(
        x,
        wu,
        h,
        r,
        top_k,
        a_gather=True,
        out_mode=kt.OUT_SORTED,
        epilogue=kt.EPI_ACTIVATION,
        activation=activation,
        aux=u if u.numel() else None,
        config=_config("up", d_in, hid, configs),
    )
    out = _token_sums(h, wd, r, top_k, tokens, "down", deterministic, gate, configs)
    return out, h, u


def _token_sums(a, w, r: Routing, top_k, tokens, role, deterministic, gate=None, configs=None):
    """``out[t] = sum_j g_s * (a[p(s)] @ w[expert(s)])`` over each token's slots ``s = t*k + j``,
    for rows ``a [N, K]`` in sorted order (the down projection and the input gradient): per-slot
    products then a sum (deterministic), or fp32 atomic adds. Small ``K`` goes to the row-tile
    kernel (``configs``: the call's launch settings per role). Returns ``[tokens, N]`` in ``a``'s
    dtype."""
    kt = triton_module("moe_triton")

    k, n = a.shape[1], w.shape[2]
    if deterministic:
        out, out_mode = a.new_empty(tokens * top_k, n), kt.OUT_SLOT
    else:
        out = torch.zeros(tokens, n, dtype=torch.float32, device=a.device)
        out_mode = kt.OUT_TOKEN_ATOMIC
    if k <= kt.ROWS_MAX_K:
        config = _config(f"{role}_rows", k, n, configs)
        kt.moe_gemm_rows(a, w, out, r, top_k, a_gather=False, out_mode=out_mode, gate=gate,
                         config=config)  # fmt: skip
    else:
        kt.moe_gemm(a, w, out, r, top_k, a_gather=False, out_mode=out_mode,
                    epilogue=kt.EPI_GATE if gate is not None else kt.EPI_NONE, gate=gate,
                    config=_config(role, k, n, configs))  # fmt: skip
    if not deterministic:
        return out.to(a.dtype)
    return kt.gated_group_sum(out, None, top_k) if top_k else out.new_zeros(tokens, n)


class PendingWeightGrad(NamedTuple):
    """One use's weight-gradient GEMM, kept to run with the weight's other uses."""

    a: torch.Tensor
    b: torch.Tensor
    sorted_to_slot: torch.Tensor
    offsets: torch.Tensor
    gate: torch.Tensor | None
    top_k: int
    b_div: int | None
    a_gather: bool
    b_gather: bool
    config: tuple[int, ...]
    like: torch.Tensor  # the weight: shape and dtype of the gradient
    transposed: bool = False  # the GEMM gives the gradient's transpose ([E, N, K])


def _weight_grad(a, b, w, shared, r: Routing, top_k, role, *, a_gather, b_gather, gate=None,
                 b_div=None, transposed=False, configs=None, grad_dtype=None):  # fmt: skip
    """The gradient of the expert weights ``w [E, K, N]`` from the rows ``a [., K]`` and
    ``b [., N]`` (``transposed``: its transpose from ``a [., N]`` and ``b [., K]``;
    :func:`~cvmm_kernel.moe_triton.moe_weight_grad` with the settings of ``role``),
    computed into ``shared``'s buffer where that sums the weight's gradient over its uses, or
    kept for one GEMM over all of them where it defers them, else into a new tensor of
    ``grad_dtype`` (None: ``w``'s). Returns what the backward gives autograd for ``w``
    (:func:`~.shared_grads.settle`)."""
    kt = triton_module("moe_triton")

    k, n = (w.shape[2], w.shape[1]) if transposed else (w.shape[1], w.shape[2])
    config = _config(role, k, n, configs)
    if shared is not None and shared.deferred:
        shared.pending.append(PendingWeightGrad(
            a, b, r.sorted_to_slot, r.offsets, gate, top_k, b_div, a_gather, b_gather, config, w,
            transposed,
        ))  # fmt: skip
        return None
    dw, accumulate = grad_buffer(shared, w, grad_dtype)
    kt.moe_weight_grad(
        a,
        b,
        dw.transpose(1, 2) if transposed else dw,
        r,
        top_k,
        a_gather=a_gather,
        b_gather=b_gather,
        gate=gate,
        b_div=b_div,
        accumulate=accumulate,
        config=config,
    )
    return settle(shared, dw, True)


class _Rows(NamedTuple):
    """The two routing tensors the weight-gradient kernel reads."""

    sorted_to_slot: torch.Tensor
    offsets: torch.Tensor


def combined_weight_grad(uses: list[PendingWeightGrad]) -> torch.Tensor:
    """The sum of the uses' weight gradients as ONE weight-gradient GEMM (float32 ``[E, K, N]``
    in the weight's dtype): the uses' slots renumbered after each other, every expert's rows of
    all uses in one sorted range (those of earlier uses first), gathered operands concatenated
    and sorted ones permuted into that order. No sort and no host sync: positions follow from
    the per-use expert offsets. Uses with other settings run one by one, adding."""
    kt = triton_module("moe_triton")

    first = uses[0]
    settings = lambda u: (u.top_k, u.b_div, u.a_gather, u.b_gather, u.gate is None, u.config,
                          u.a.dtype, u.b.dtype, u.transposed)  # fmt: skip
    target = lambda dw, u: dw.transpose(1, 2) if u.transposed else dw

    def renumbers(u: PendingWeightGrad) -> bool:  # gathered rows follow the renumbered slots
        n = u.sorted_to_slot.numel()
        b_div = u.top_k if u.b_div is None else u.b_div
        return (not u.a_gather or u.a.shape[0] * u.top_k == n) and (
            not u.b_gather or u.b.shape[0] * b_div == n
        )

    alike = all(settings(u) == settings(first) and renumbers(u) for u in uses)
    if len(uses) > 1 and not alike:
        dw = torch.empty_like(first.like)
        for i, u in enumerate(uses):
            kt.moe_weight_grad(u.a, u.b, target(dw, u), _Rows(u.sorted_to_slot, u.offsets),
                               u.top_k, a_gather=u.a_gather, b_gather=u.b_gather, gate=u.gate,
                               b_div=u.b_div, accumulate=i > 0, config=u.config)  # fmt: skip
        return dw
    device, n_experts = first.a.device, first.like.shape[0]
    counts = torch.stack([u.offsets[1:] - u.offsets[:-1] for u in uses]).long()  # [U, E]
    earlier = counts.cumsum(0) - counts  # rows of the earlier uses, per expert
    offsets = torch.zeros(n_experts + 1, dtype=torch.long, device=device)
    offsets[1:] = counts.sum(0).cumsum(0)
    total = sum(u.sorted_to_slot.numel() for u in uses)
    sorted_to_slot = torch.empty(total, dtype=torch.int32, device=device)
    a = first.a.new_empty(total, first.a.shape[1]) if not first.a_gather else None
    b = first.b.new_empty(total, first.b.shape[1]) if not first.b_gather else None
    experts = torch.arange(n_experts, device=device)
    slot_base = 0
    for i, u in enumerate(uses):
        n = u.sorted_to_slot.numel()
        expert = torch.repeat_interleave(experts, counts[i], output_size=n)
        rank = torch.arange(n, device=device) - u.offsets.long()[expert]
        position = offsets[expert] + earlier[i, expert] + rank
        sorted_to_slot[position] = u.sorted_to_slot + slot_base
        if a is not None:
            a[position] = u.a[:n]
        if b is not None:
            b[position] = u.b[:n]
        slot_base += n
    dw = torch.empty_like(first.like)
    kt.moe_weight_grad(
        torch.cat([u.a for u in uses]) if a is None else a,
        torch.cat([u.b for u in uses]) if b is None else b,
        target(dw, first),
        _Rows(sorted_to_slot, offsets.to(torch.int32)),
        first.top_k,
        a_gather=first.a_gather,
        b_gather=first.b_gather,
        gate=None
        if first.gate is None
        else torch.cat([u.gate for u in uses if u.gate is not None]),
        b_div=first.b_div,
        accumulate=False,
        config=first.config,
    )
    return dw


# dW_down as its transpose, ``dy[token]^T (g * h)`` with ``g * h`` stored by the hidden gradient's
# epilogue: the gathered rows as the first operand and no gate in the loop, as in dW_up. On an
# H100 at the MoEUT-244M shape (benchmarks/results/ab_wgrad_down.json) the kernel takes 111 us
# against 176 for ``(g * h)^T dy[token]`` with the gate in the loop (the gathered rows as the
# second operand: 175 us even without the gate; the gate in the loop of the new form: 191), and
# forward + backward 0.976 ms against 1.017 (128 x 128 k=4: 0.322 against 0.329; 64 x 4096
# k=2: 2.29 against 2.44). Set W_DOWN_FROM_GATED_H[0] = False for the old form.
W_DOWN_FROM_GATED_H = [True]


# ``overlap``: run the input gradient's products and k-sum on a side stream while the weight
# gradients run (benchmarks/ab_moe_variants.py times it both ways, passing
# moe_mlp(..., _backward_overlap=)). The shipped default. ``linear_overlap``: the same in
# moe_linear's backward where the weight gradient does not read the input gradient's launch
# (O's by pairs: 0.273 -> 0.268 ms at 4 x 10 experts, ab_linear_overlap.md). Both measured
# replayed from CUDA graphs. ``eager_overlap``: also outside CUDA-graph capture. Off: the side
# stream's waits and events cost host time at every call (4% of the samples of MoEUT-244M's
# eager backward thread, 0.4% without, moeut's benchmarks/results/host_sampling_before.txt and
# host_sampling.txt), which a host-bound eager step pays in full, for 1-2% of these ops' GPU
# time; a captured graph pays it once.
BACKWARD_SCHEDULE = {"overlap": True, "linear_overlap": True, "eager_overlap": False}
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[index]


def side_work(device: torch.device, on: bool):
    """``(context, join)`` for work that overlaps what the current stream runs next: inside
    ``context`` it is queued on the device's side stream, after what the current stream has
    queued; ``join(*made)`` makes the current stream wait for it and records the tensors made
    there (None skipped) as used on the current stream. Not ``on``, not a CUDA device (the
    interpreter's tensors included), or outside CUDA-graph capture without
    ``BACKWARD_SCHEDULE["eager_overlap"]``: the work runs in order and ``join`` does nothing."""
    if (
        not on
        or device.type != "cuda"
        or interpreting()
        or not (BACKWARD_SCHEDULE["eager_overlap"] or torch.cuda.is_current_stream_capturing())
    ):
        return contextlib.nullcontext(), lambda *made: None
    main, side = torch.cuda.current_stream(device), _side_stream(device)
    side.wait_stream(main)

    def join(*made: torch.Tensor | None) -> None:
        main.wait_stream(side)
        for tensor in made:
            if tensor is not None:
                tensor.record_stream(main)

    return torch.cuda.stream(side), join


def _triton_backward(dy, x, gate, w_up, w_down, h, u, r: Routing, top_k, activation, deterministic,
                     shared=(None, None), configs=None, overlap=None,
                     grad_dtype=None):  # fmt: skip
    """``configs``: the call's launch settings per role; ``overlap``: the input gradient on a side
    stream (None: ``BACKWARD_SCHEDULE``'s); ``grad_dtype``: of the weight gradients not summed
    by ``shared`` (None: the weights')."""
    kt = triton_module("moe_triton")

    wu, wd = cast_weight(w_up, x.dtype), cast_weight(w_down, x.dtype)
    tokens = x.shape[0]
    n, hid, d_out = tokens * top_k, w_up.shape[2], w_down.shape[2]
    cfg = _config("grad_hidden", d_out, hid, configs)
    parts = -(-hid // cfg[0])  # column blocks, each with its part of the gate gradient
    part_dtype = gate.dtype if parts == 1 else torch.float32  # one: stored in the gate's dtype
    dgate_parts = torch.empty(parts, n, dtype=part_dtype, device=x.device)
    du = x.new_empty(n, hid)
    gh = x.new_empty(n, hid) if W_DOWN_FROM_GATED_H[0] else None
    kt.moe_gemm(
        dy,
        wd.transpose(1, 2),
        du,
        r,
        top_k,
        a_gather=True,
        out_mode=kt.OUT_SORTED,
        epilogue=kt.EPI_ACTIVATION_BACKWARD,
        activation=activation,
        gate=gate,
        aux=dgate_parts,
        h=h,
        u=u if u.numel() else None,
        gated_h=gh,
        config=cfg,
    )
    dgate = dgate_parts[0] if parts == 1 else dgate_parts.sum(0).to(gate.dtype)
    # dx (memory-bound products and sum, for expert sizes on the row-tile kernel) and the weight
    # gradients (latency-bound GEMMs) are independent: on a side stream the first fills what the
    # second leaves idle. Wider experts make dx a compute-bound GEMM that competes with them
    # (64 x 4096 at k=2: 2.76 ms in order, 2.82 overlapped; ab_moe_block_m64.md).
    if overlap is None:
        overlap = BACKWARD_SCHEDULE["overlap"]
    on_side, join = side_work(x.device, overlap and hid <= kt.ROWS_MAX_K)
    with on_side:
        dx = _token_sums(du, wu.transpose(1, 2), r, top_k, tokens, "grad_input", deterministic,
                         configs=configs)  # fmt: skip
    if gh is not None:  # dW_down^T = dy[token]^T (g * h)
        dw_down = _weight_grad(dy, gh, w_down, shared[1], r, top_k, "grad_w_down", a_gather=True,
                               b_gather=False, transposed=True, configs=configs,
                               grad_dtype=grad_dtype)  # fmt: skip
    else:
        dw_down = _weight_grad(h, dy, w_down, shared[1], r, top_k, "grad_w_down", a_gather=False,
                               b_gather=True, gate=gate, configs=configs,
                               grad_dtype=grad_dtype)  # fmt: skip
    dw_up = _weight_grad(
        x,
        du,
        w_up,
        shared[0],
        r,
        top_k,
        "grad_w_up",
        a_gather=True,
        b_gather=False,
        configs=configs,
        grad_dtype=grad_dtype,
    )
    join(dx)
    return dx, dgate, dw_up, dw_down


# ----- dispatch to a backend (shared by the custom ops and the eager Function) -----


def _forward(x, gate, w_up, w_down, r: Routing, top_k, activation, deterministic, backend,
             configs=None):  # fmt: skip
    if backend == "triton":
        return _triton_forward(x, gate, w_up, w_down, r, top_k, activation, deterministic, configs)
    return _reference_forward(x, gate, w_up, w_down, r, top_k, activation)


def _gradients(grad_out, x, gate, w_up, w_down, h, u, r: Routing, top_k, activation,
               deterministic, backend, shared=(None, None), configs=None,
               overlap=None, grad_dtype=None):  # fmt: skip
    """``(dx, dgate, dw_up, dw_down)``; a weight's gradient is None where ``shared`` (one
    :class:`~cvmm_kernel.shared_grads.SharedGrad` or None per weight) sums it instead, else in
    ``grad_dtype`` (None: the weights'). ``configs``, ``overlap``: the call's launch settings
    (see :func:`_triton_backward`)."""
    dy = grad_out.to(x.dtype).contiguous()
    if backend == "triton":
        return _triton_backward(dy, x, gate, w_up, w_down, h, u, r, top_k, activation,
                                deterministic, shared, configs, overlap, grad_dtype)  # fmt: skip
    return _reference_backward(dy, x, gate, w_up, w_down, h, u, r, top_k, activation, shared,
                               grad_dtype)  # fmt: skip


# ----- the custom ops -----


def _forward_op(
    x: torch.Tensor,
    gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    sorted_to_slot: torch.Tensor,
    slot_to_sorted: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_start: torch.Tensor,
    n_valid: torch.Tensor,
    top_k: int,
    block_m: int,
    activation: str,
    deterministic: bool,
    backend: str,
    gemm_configs: Sequence[int] | None = None,
    backward_overlap: bool | None = None,
    weight_grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [T, d]``, ``gate [T * k]`` -> ``(out [T, d_out], h [T * k, H] sorted, u)`` with ``u``
    the pre-activation where the activation's derivative needs it (else ``[0, H]``).
    ``gemm_configs`` (:func:`encode_gemm_configs`) and ``backward_overlap``: the call's launch
    settings, kept for the backward (None: the shipped ones); ``weight_grad_dtype``: the
    backward's, see :func:`moe_mlp_backward`."""
    r = Routing(sorted_to_slot, slot_to_sorted, offsets, tile_expert, tile_start, n_valid, block_m)
    configs = decode_gemm_configs(gemm_configs)
    return _forward(x, gate, w_up, w_down, r, top_k, activation, deterministic, backend, configs)


moe_mlp_forward, moe_mlp_forward_traced = twin_ops("cvmm_kernel::moe_mlp_forward", _forward_op)


def _forward_fake(x, gate, w_up, w_down, *routing_and_settings):
    top_k, _block_m, activation = routing_and_settings[6:9]
    n, hid = x.shape[0] * top_k, w_up.shape[2]
    u_rows = n if activation in _NEEDS_PREACTIVATION else 0
    return x.new_empty(x.shape[0], w_down.shape[2]), x.new_empty(n, hid), x.new_empty(u_rows, hid)


def _backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    h: torch.Tensor,
    u: torch.Tensor,
    sorted_to_slot: torch.Tensor,
    slot_to_sorted: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_start: torch.Tensor,
    n_valid: torch.Tensor,
    top_k: int,
    block_m: int,
    activation: str,
    deterministic: bool,
    backend: str,
    gemm_configs: Sequence[int] | None = None,
    backward_overlap: bool | None = None,
    weight_grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx [T, d], dgate [T * k], dW_up, dW_down)``; weight gradients in
    ``weight_grad_dtype``, by default the weights' own (the master dtype under autocast: no cast
    follows)."""
    r = Routing(sorted_to_slot, slot_to_sorted, offsets, tile_expert, tile_start, n_valid, block_m)
    configs = decode_gemm_configs(gemm_configs)
    return _gradients(grad_out, x, gate, w_up, w_down, h, u, r, top_k, activation, deterministic,
                      backend, (None, None), configs, backward_overlap,
                      weight_grad_dtype)  # fmt: skip


moe_mlp_backward, moe_mlp_backward_traced = twin_ops("cvmm_kernel::moe_mlp_backward", _backward_op)


def _backward_fake(grad_out, x, gate, w_up, w_down, h, u, sorted_to_slot, slot_to_sorted,
                   offsets, tile_expert, tile_start, n_valid, top_k, block_m, activation,
                   deterministic, backend, gemm_configs=None, backward_overlap=None,
                   weight_grad_dtype=None):  # fmt: skip
    return (
        torch.empty_like(x),
        torch.empty_like(gate),
        torch.empty_like(w_up, dtype=weight_grad_dtype),
        torch.empty_like(w_down, dtype=weight_grad_dtype),
    )


def _setup_context(ctx, inputs, output):
    x, gate, w_up, w_down, *routing = inputs[:10]
    _, h, u = output
    ctx.save_for_backward(x, gate, w_up, w_down, h, u, *routing)
    ctx.settings = inputs[10:]  # top_k, block_m, activation, deterministic, backend, launch


def _autograd_backward(backward_op):
    """The forward op's autograd formula, through ``backward_op`` (its twin's backward)."""

    def backward(ctx, grad_out, _grad_h, _grad_u):
        x, gate, w_up, w_down, h, u, *routing = ctx.saved_tensors
        dx, dgate, dw_up, dw_down = backward_op(
            grad_out, x, gate, w_up, w_down, h, u, *routing, *ctx.settings
        )
        dw_up, dw_down = in_weight_dtype(dw_up, w_up), in_weight_dtype(dw_down, w_down)
        need = ctx.needs_input_grad
        grads = [g if need[i] else None for i, g in enumerate((dx, dgate, dw_up, dw_down))]
        return (*grads, *[None] * (6 + len(ctx.settings)))

    return backward


register_twins(
    (moe_mlp_forward, moe_mlp_forward_traced),
    (moe_mlp_backward, moe_mlp_backward_traced),
    _forward_fake,
    _backward_fake,
    _autograd_backward,
    _setup_context,
)


# ----- the eager path -----
#
# The custom ops above are what torch.compile sees. In eager mode each custom-op call costs
# ~90 us of host time (measured on the H100 host), more than several kernels, so eager calls go
# through this autograd Function, which runs the same implementations.


class MoEMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, w_up, w_down, index, n_experts, top_k, block_m, activation,
                deterministic, backend, shared=(None, None), configs=None,
                overlap=None, grad_dtype=None):  # fmt: skip
        """``shared``: per weight a SharedGrad that sums its gradient over uses, or None.
        ``configs`` (checked, per role) and ``overlap``: the call's launch settings (None: the
        shipped ones); ``grad_dtype``: the weight gradients' rounding (None: none)."""
        routing = routing_impl(index, n_experts, block_m, backend, apart=False)
        r = Routing(*routing, block_m)
        out, h, u = _forward(x, gate, w_up, w_down, r, top_k, activation, deterministic, backend,
                             configs)  # fmt: skip
        ctx.save_for_backward(x, gate, w_up, w_down, h, u, *routing)
        ctx.settings = (top_k, block_m, activation, deterministic, backend)
        ctx.shared = shared
        ctx.launch = (configs, overlap, grad_dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, w_up, w_down, h, u, *routing = ctx.saved_tensors
        top_k, block_m, activation, deterministic, backend = ctx.settings
        no_second_derivative(backend)
        r = Routing(*routing, block_m)
        dx, dgate, dw_up, dw_down = _gradients(grad_out, x, gate, w_up, w_down, h, u, r, top_k,
                                               activation, deterministic, backend, ctx.shared,
                                               *ctx.launch)  # fmt: skip
        grads = (dx, dgate, in_weight_dtype(dw_up, w_up), in_weight_dtype(dw_down, w_down))
        need = ctx.needs_input_grad
        return (*[g if need[i] else None for i, g in enumerate(grads)], *[None] * 11)
