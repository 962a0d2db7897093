r"""A/B of the k-sum over consecutive slots: ``torch.sum`` against Triton group sums (bf16).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/ab_ksum.py

``y [T*k, 1024] -> [T, 1024]`` with fp32 accumulation, the sum ``moe_mlp`` and ``moe_linear``
take over a token's per-slot products: ``y.view(T, k, -1).sum(1)`` (timed first and last) and
this script's group-sum kernel (the shipped ``gated_group_sum(y, None, k)`` without a gate) at
several block shapes, with and without masks. One process; medians. Writes ``ab_ksum.json`` to
``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from bench_harness import median_ms, metadata, require_cuda, write_results


@triton.jit
def _group_sum(y_ptr, out_ptr, n_groups, N, K: tl.constexpr, BLOCK_G: tl.constexpr,
               BLOCK_N: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    offs_g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_g < n_groups)[:, None] & (offs_n < N)[None, :]
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(K):
        ptrs = y_ptr + (offs_g.to(tl.int64) * K + j)[:, None] * N + offs_n[None, :]
        y = tl.load(ptrs) if EVEN else tl.load(ptrs, mask=mask, other=0.0)
        acc += y.to(tl.float32)
    out_ptrs = out_ptr + offs_g.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def group_sum(y, k, block_g, block_n, warps, even):
    from cvmm_kernel.moe_triton import launch

    n_slots, n = y.shape
    out = y.new_empty(n_slots // k, n)
    grid = (triton.cdiv(out.shape[0], block_g), triton.cdiv(n, block_n))
    even = even and out.shape[0] % block_g == 0 and n % block_n == 0
    launch(_group_sum, grid, y, out, out.shape[0], n, k, block_g, block_n, even, num_warps=warps)
    return out


BLOCKS = [(32, 128, 4), (16, 256, 4), (8, 512, 4), (4, 1024, 4), (32, 256, 8), (64, 128, 8),
          (16, 512, 8), (8, 1024, 8), (16, 128, 4), (8, 256, 2)]  # fmt: skip


def main() -> int:
    if not require_cuda(__file__):
        return 2
    rows = []
    for tokens, k in [(8192, 16), (8192, 4), (8192, 2)]:
        y = torch.randn(tokens * k, 1024, device="cuda", dtype=torch.bfloat16)
        ref = y.view(tokens, k, -1).sum(1)
        base = median_ms(lambda: y.view(tokens, k, -1).sum(1), warmup=20, rep=100)
        rows.append(dict(tokens=tokens, k=k, variant="torch.sum", ms=base))
        for bg, bn, warps in BLOCKS:
            for even in (False, True):
                fn = lambda: group_sum(y, k, bg, bn, warps, even)
                diff = float((fn().float() - ref.float()).abs().max())
                ms = median_ms(fn, warmup=20, rep=100)
                rows.append(dict(tokens=tokens, k=k, variant=f"triton {bg}x{bn} w{warps} "
                                 f"even={int(even)}", ms=ms, max_abs_diff=diff))  # fmt: skip
        again = median_ms(lambda: y.view(tokens, k, -1).sum(1), warmup=20, rep=100)
        rows.append(dict(tokens=tokens, k=k, variant="torch.sum again", ms=again))
        for row in rows:
            row.setdefault("vs_torch_sum", row["ms"] / base if row["k"] == k else None)
    for row in rows:
        print(f"T={row['tokens']} k={row['k']:2d} {row['variant']:30s} {row['ms'] * 1e3:7.1f} us "
              f"x{row['vs_torch_sum']:.3f}")  # fmt: skip
    write_results("ab_ksum", {"meta": metadata(), "rows": rows}, script_file=__file__, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
