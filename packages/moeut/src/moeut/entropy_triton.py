"""Triton kernels of :func:`moeut.regularization.entropy_reg`: the entropy of the mean selection
distribution from one pass over the logits forward and one backward.

The logits are viewed as ``[A, N, C, E]``: ``N`` rows averaged (the ``dim`` of
``entropy_reg``), ``A`` and ``C`` the dims before and after it, ``E`` experts. With ``p`` the
softmax of each row over ``E`` and ``m[a, c] = mean_n p[a, n, c]``, the value is
``mean_{a, c} sum_e m log m`` (``-`` the mean entropy). Forward: each program sums ``p`` over a
range of rows into float32 partial sums (``_entropy_partials``), and one program adds them up in
a fixed order, keeps ``m`` and writes the value (``_entropy_finish``): deterministic. Backward,
with ``g`` the value's gradient and ``c = g (log m + 1) / (A C)``: ``d logits[a, n, c, e] =
p_e (c_e - <p, c>) / N``, each row from its logits again (``_entropy_backward``).

``log m`` is taken of ``max(m, tiny)``: an expert whose mean probability underflows to 0 adds
nothing, as in the logsumexp form of the plain expression.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from cvmm_kernel.host_math import cdiv, next_power_of_2
from cvmm_kernel.launcher import launch

# Launch settings of the row kernels (forward partial sums and backward): elements of a
# [rows, BLOCK_E] tile per loop step, rows per program, warps. The fastest of 36 on an H100 for
# MoEUT-244M's feedforward and attention logits (benchmarks/results/sweep_entropy_reg.md and
# sweep_entropy_reg_small.md: 208 and 53 us forward + backward, against 232 and 57 for the
# first settings, (8192, 256, 4)).
LAUNCH = {"block_elements": 4096, "rows": 128, "warps": 8}
# Elements of a [partials, BLOCK_E] tile per step of the one program that adds the partial sums.
FINISH_ELEMENTS = 8192
TINY = torch.finfo(torch.float32).tiny


def _blocks(e: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_E)``: rows per loop step and the padded expert count."""
    block_e = next_power_of_2(e)
    return max(1, LAUNCH["block_elements"] // block_e), block_e


@triton.jit
def _softmax_rows(X, a, n0, c, N, C, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """``(p, rows_ok, offsets)``: the softmax over the experts of rows ``n0 ..`` of ``(a, c)``
    (float32, 0 in rows past ``N`` and columns past ``E``) and the rows' element offsets."""
    rows = n0 + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    rows_ok = rows < N
    col_ok = cols < E
    offsets = ((a.to(tl.int64) * N + rows) * C + c)[:, None] * E + cols[None, :]
    x = tl.load(X + offsets, mask=rows_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    x = tl.where(col_ok[None, :], x, float("-inf"))
    x = x - tl.max(x, axis=1)[:, None]
    ex = tl.exp(x)
    p = ex / tl.sum(ex, axis=1)[:, None]
    return tl.where(rows_ok[:, None], p, 0.0), rows_ok, offsets


@triton.jit
def _entropy_partials(
    X, PART, N, C, E, NB, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Program ``(nb, ac)``: ``PART[ac, nb, :] = sum of p`` over rows ``nb * ROWS ..``."""
    nb, ac = tl.program_id(0), tl.program_id(1)
    a, c = ac // C, ac % C
    total = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for step in range(0, ROWS, BLOCK_N):
        p, _, _ = _softmax_rows(X, a, nb * ROWS + step, c, N, C, E, BLOCK_N, BLOCK_E)
        total += tl.sum(p, axis=0)
    cols = tl.arange(0, BLOCK_E)
    tl.store(PART + (ac * NB + nb) * E + cols, total, mask=cols < E)


@triton.jit
def _entropy_finish(
    PART, M, OUT, AC, NB, E, inv_n, tiny, BLOCK_NB: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """One program: ``M[ac] = sum_nb PART[ac, nb] / N`` and ``OUT = mean_ac sum_e m log m``."""
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    value = 0.0
    for ac in range(0, AC):
        m = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for nb0 in range(0, NB, BLOCK_NB):
            nbs = nb0 + tl.arange(0, BLOCK_NB)
            ok = (nbs < NB)[:, None] & col_ok[None, :]
            part = tl.load(PART + (ac * NB + nbs)[:, None] * E + cols[None, :], mask=ok, other=0.0)
            m += tl.sum(part, axis=0)
        m = m * inv_n
        tl.store(M + ac * E + cols, m, mask=col_ok)
        value += tl.sum(m * tl.log(tl.maximum(m, tiny)), axis=0)
    tl.store(OUT, value / AC)


@triton.jit
def _entropy_backward(
    X, M, G, DX, N, C, E, inv_n, inv_ac, tiny, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Program ``(nb, ac)``: ``DX`` of rows ``nb * ROWS ..`` of ``(a, c)``."""
    nb, ac = tl.program_id(0), tl.program_id(1)
    a, c = ac // C, ac % C
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    m = tl.load(M + ac * E + cols, mask=col_ok, other=1.0)
    coef = tl.load(G).to(tl.float32) * inv_ac * (tl.log(tl.maximum(m, tiny)) + 1.0)
    for step in range(0, ROWS, BLOCK_N):
        p, rows_ok, offsets = _softmax_rows(X, a, nb * ROWS + step, c, N, C, E, BLOCK_N, BLOCK_E)
        dot = tl.sum(p * coef[None, :], axis=1)
        dx = p * (coef[None, :] - dot[:, None]) * inv_n
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=rows_ok[:, None] & col_ok[None, :])


def _programs(n: int) -> tuple[int, int]:
    """``(ROWS, NB)``: rows per program and programs per ``(a, c)`` for ``n`` rows."""
    rows = min(LAUNCH["rows"], next_power_of_2(max(n, 1)))
    return rows, cdiv(n, rows)


def forward(x: torch.Tensor, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, ...]:
    """``x`` contiguous, ``shape = (A, N, C, E)`` with ``N, E >= 1``: ``(value, m)``, the float32
    scalar and the mean distributions ``[A * C, E]`` (float32)."""
    a, n, c, e = shape
    rows, nb = _programs(n)
    block_n, block_e = _blocks(e)
    block_n = min(block_n, rows)
    parts = torch.empty(a * c, nb, e, dtype=torch.float32, device=x.device)
    launch(_entropy_partials, (nb, a * c), x, parts, n, c, e, nb, rows, block_n, block_e,
           num_warps=LAUNCH["warps"])  # fmt: skip
    m = torch.empty(a * c, e, dtype=torch.float32, device=x.device)
    value = torch.empty((), dtype=torch.float32, device=x.device)
    block_nb = max(1, min(next_power_of_2(nb), FINISH_ELEMENTS // block_e))
    launch(_entropy_finish, (1,), parts, m, value, a * c, nb, e, 1.0 / n, TINY, block_nb, block_e)
    return value, m


def backward(
    x: torch.Tensor, m: torch.Tensor, grad: torch.Tensor, shape: tuple[int, int, int, int]
) -> torch.Tensor:
    """The logits' gradient (``x``'s shape and dtype) from the value's gradient ``grad`` (a
    scalar tensor, read on the device: no sync)."""
    a, n, c, e = shape
    rows, nb = _programs(n)
    block_n, block_e = _blocks(e)
    block_n = min(block_n, rows)
    dx = torch.empty_like(x)
    launch(_entropy_backward, (nb, a * c), x, m, grad.float(), dx, n, c, e, 1.0 / n,
           1.0 / (a * c), TINY, rows, block_n, block_e, num_warps=LAUNCH["warps"])  # fmt: skip
    return dx
