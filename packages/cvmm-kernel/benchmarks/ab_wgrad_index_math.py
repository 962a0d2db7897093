r"""A/B of the weight-gradient kernel's index arithmetic, one role at a time (bf16, medians).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/ab_wgrad_index_math.py [shape ...]

The weight-gradient kernel walks an expert's rows block by block, so the row arithmetic (the
token of each slot, ``slot // top_k``, and the row offsets) runs every step. This script's copy
of the kernel switches it: ``div`` (top_k a compile-time divisor instead of a run-time one),
``i32`` (32-bit offsets instead of 64-bit) and ``even`` (no column masks), each timed against
the shipped ``moe_weight_grad`` at its committed settings (``shipped``, before and after the
variants) and compared with its output. Writes ``ab_wgrad_index_math.json`` to ``$OUT`` (else
``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from bench_harness import median_ms, metadata, require_cuda, write_results


@triton.jit
def _wgrad_variant(
    a_ptr, b_ptr, dw_ptr, sorted_to_slot_ptr, offsets_ptr, gate_ptr, K, N, a_div, b_div,
    stride_am, stride_ak, stride_bm, stride_bn, stride_de, stride_dk, stride_dn,
    A_DIV: tl.constexpr, B_DIV: tl.constexpr, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr,
    A_GATE: tl.constexpr, I32: tl.constexpr, EVEN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The shipped kernel's loop; ``A_DIV``/``B_DIV`` 0: divide by the run-time ``a_div``."""
    pid = tl.program_id(0)
    k_blocks = tl.cdiv(K, BLOCK_K)
    n_blocks = tl.cdiv(N, BLOCK_N)
    expert = pid // (k_blocks * n_blocks)
    pid_k = pid % (k_blocks * n_blocks) // n_blocks
    pid_n = pid % n_blocks
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        slot = tl.load(sorted_to_slot_ptr + offs_m, mask=mask_m, other=0)
        a_row = offs_m
        b_row = offs_m
        if A_GATHER:
            if A_DIV > 0:  # noqa: SIM108 (constexpr branch inside a Triton kernel)
                a_row = (slot.to(tl.uint32) // A_DIV).to(tl.int32)
            else:
                a_row = slot // a_div
        if B_GATHER:
            if B_DIV > 0:  # noqa: SIM108
                b_row = (slot.to(tl.uint32) // B_DIV).to(tl.int32)
            else:
                b_row = slot // b_div
        if not I32:
            a_row = a_row.to(tl.int64)
            b_row = b_row.to(tl.int64)
        a_ptrs = a_ptr + a_row[None, :] * stride_am + offs_k[:, None] * stride_ak
        b_ptrs = b_ptr + b_row[:, None] * stride_bm + offs_n[None, :] * stride_bn
        if EVEN:
            a = tl.load(a_ptrs, mask=mask_m[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if A_GATE:
            g = tl.load(gate_ptr + slot, mask=mask_m, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * g[None, :]).to(a.dtype)
        acc = tl.dot(a, b, acc)
    dw_ptrs = (
        dw_ptr + expert.to(tl.int64) * stride_de + offs_k[:, None] * stride_dk
        + offs_n[None, :] * stride_dn
    )  # fmt: skip
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


def wgrad_variant(a, b, dw, routing, top_k, *, a_gather, b_gather, gate, config, div, i32, even):
    from cvmm_kernel.moe_triton import launch

    n_experts, k, n = dw.shape
    bm, bk, bn, warps, stages = config
    const = top_k if div else 0
    launch(
        _wgrad_variant, (n_experts * triton.cdiv(k, bk) * triton.cdiv(n, bn),),
        a, b, dw, routing.sorted_to_slot, routing.offsets,
        gate if gate is not None else routing.offsets, k, n, top_k, top_k,
        *a.stride(), *b.stride(), *dw.stride(), const, const, a_gather, b_gather,
        gate is not None, i32, even and k % bk == 0 and n % bn == 0, bm, bn, bk,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


SHAPES = [  # name, tokens, d_model, experts, expert size, k
    ("moeut-244m-ffn", 8192, 1024, 387, 128, 16),
    ("ffn-128x128-k4", 8192, 1024, 128, 128, 4),
    ("large-64x4096-k2", 8192, 1024, 64, 4096, 2),
]
CONFIGS = {
    "grad_w_up": [(64, 128, 128, 4, 4), (64, 128, 128, 4, 3), (32, 128, 128, 4, 4)],
    "grad_w_down": [(128, 128, 128, 4, 3), (64, 128, 128, 4, 3), (64, 128, 128, 4, 4)],
}
VARIANTS = {  # name: (div, i32, even)
    "runtime div, i64": (False, False, False),
    "div": (True, False, False),
    "div+even": (True, False, True),
    "div+i32": (True, True, False),
    "div+even+i32": (True, True, True),
}


def main() -> int:
    if not require_cuda(__file__):
        return 2
    from cvmm_kernel import moe_ops
    from cvmm_kernel import moe_triton as kt

    only = set(sys.argv[1:])
    rows = []
    for name, tokens, d, n_exp, hid, k in SHAPES:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        dt = torch.bfloat16
        x = torch.randn(tokens, d, device="cuda", dtype=dt)
        gate, index = torch.randn(tokens, n_exp, device="cuda").sigmoid().topk(k, dim=-1)
        gate = gate.reshape(-1).contiguous()
        n = tokens * k
        r = moe_ops.Routing(*moe_ops.moe_routing(index.reshape(-1), n_exp, 128, "triton"), 128)
        h = torch.randn(n, hid, device="cuda", dtype=dt).relu()
        du = torch.randn(n, hid, device="cuda", dtype=dt)
        dy = torch.randn(tokens, d, device="cuda", dtype=dt)
        roles = {
            "grad_w_up": dict(a=x, b=du, shape=(n_exp, d, hid), a_gather=True, b_gather=False,
                              gate=None),
            "grad_w_down": dict(a=h, b=dy, shape=(n_exp, hid, d), a_gather=False, b_gather=True,
                                gate=gate),
        }  # fmt: skip
        for role, c in roles.items():
            ref = torch.empty(c["shape"], device="cuda", dtype=dt)
            operands = dict(a_gather=c["a_gather"], b_gather=c["b_gather"], gate=c["gate"])
            shipped = lambda out: kt.moe_weight_grad(
                c["a"], c["b"], out, r, k, **operands,
                config=moe_ops._config(role, c["shape"][1], c["shape"][2]),
            )  # fmt: skip
            shipped(ref)
            base = median_ms(lambda: shipped(ref), warmup=20, rep=100)
            rows.append(dict(shape=name, role=role, variant="shipped", config=None, ms=base))
            for cfg in CONFIGS[role]:
                for variant, (div, i32, even) in VARIANTS.items():
                    out = torch.full_like(ref, float("nan"))
                    fn = lambda: wgrad_variant(c["a"], c["b"], out, r, k, **operands, config=cfg,
                                               div=div, i32=i32, even=even)  # fmt: skip
                    fn()
                    torch.cuda.synchronize()
                    err = float((out.float() - ref.float()).norm() / ref.float().norm())
                    ms = median_ms(fn, warmup=20, rep=100)
                    rows.append(dict(shape=name, role=role, variant=variant, config=cfg, ms=ms,
                                     vs_shipped=ms / base, rel_diff=err))  # fmt: skip
            again = median_ms(lambda: shipped(ref), warmup=20, rep=100)
            rows.append(dict(shape=name, role=role, variant="shipped again", config=None,
                             ms=again, vs_shipped=again / base))  # fmt: skip
    for row in rows:
        print(f"{row['shape']:18s} {row['role']:12s} {row['variant']:17s} "
              f"{row['config']!s:22s} {row['ms'] * 1e3:7.1f} us "
              f"x{row.get('vs_shipped', 1.0):.3f}")  # fmt: skip
    write_results("ab_wgrad_index_math", {"meta": metadata(), "rows": rows},
                  script_file=__file__, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
