r"""A/B of the atomic k-sum in the row-tile kernel: scalar fp32 atomics or a vector reduction.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/ab_atomic_ksum.py

The down projection of ``moe_mlp`` at two feedforward shapes: the deterministic path (per-slot
products, then the group sum) against this script's row-tile kernel adding ``g * y`` into an fp32
``[T, d]`` buffer with Triton's scalar atomics or with Hopper's two-wide vector reduction through
inline PTX (sm_90 only), at several launch settings; relative error against the deterministic
result. One process; medians; prints the table.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from bench_harness import median_ms, require_cuda
from cvmm_kernel import moe_ops
from cvmm_kernel import moe_triton as kt
from cvmm_kernel.moe_triton import _tile_rows, launch


@triton.jit
def _red_v2(ptrs, vals, mask):
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .pred p;
        setp.ne.s32 p, $6, 0;
        @p red.global.add.v2.f32 [$2], {$4, $5};
        mov.b32 $0, 0;
        mov.b32 $1, 0;
        }""",
        constraints="=r,=r,l,l,f,f,r,r",
        args=[ptrs.to(tl.int64), vals, mask.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=2,
    )


@triton.jit
def _rows_atomic(
    a_ptr, w_ptr, out_ptr, sorted_to_slot_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr,
    n_valid_ptr, gate_ptr, K, N, stride_am, stride_we, stride_wk, stride_wn, stride_om,
    OUT_DIV: tl.constexpr, GATE: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, N_STAGES: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    if tile >= tl.load(n_valid_ptr):
        return
    # the shipped kernel's rows: sorted positions in, token rows (slot // OUT_DIV) out
    expert, _positions, mask_m, slot, a_rows, rows = _tile_rows(
        tile, sorted_to_slot_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, 1, OUT_DIV,
        False, 2, BLOCK_M,
    )  # fmt: skip
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :],
                mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
    g = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if GATE:
        g = tl.load(gate_ptr + slot, mask=mask_m, other=0.0).to(tl.float32)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    for n0 in tl.range(0, N, BLOCK_N, num_stages=N_STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        b = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & (offs_n < N)[None, :], other=0.0)  # fmt: skip
        acc = tl.dot(a, b)
        if GATE:
            acc = acc * g[:, None]
        ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        mask = mask_m[:, None] & (offs_n < N)[None, :]
        if VEC:
            _red_v2(ptrs, acc, mask)
        else:
            tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


def rows_atomic(a, w, out, r, top_k, *, gate, config, vec):
    k, n = a.shape[1], w.shape[2]
    bn, warps, stages = config
    launch(
        _rows_atomic, (r.tile_expert.numel(),), a, w, out, r.sorted_to_slot, r.tile_expert,
        r.tile_start, r.offsets, r.n_valid, gate if gate is not None else r.offsets, k, n,
        a.stride(0), *w.stride(), out.stride(0), top_k, gate is not None, vec, r.block_m, bn,
        max(16, triton.next_power_of_2(k)), stages, num_warps=warps, num_stages=stages,
    )  # fmt: skip


SHAPES = [
    ("moeut-244m-ffn", 8192, 1024, 387, 128, 16),
    ("ffn-128x128-k4", 8192, 1024, 128, 128, 4),
]


def main() -> int:
    if not require_cuda(__file__):
        return 2
    for name, tokens, d, n_exp, hid, k in SHAPES:
        torch.manual_seed(0)
        dt = torch.bfloat16
        gate, index = torch.randn(tokens, n_exp, device="cuda").sigmoid().topk(k, dim=-1)
        gate = gate.reshape(-1).contiguous()
        n = tokens * k
        r = moe_ops.Routing(*moe_ops.moe_routing(index.reshape(-1), n_exp, 128, "triton"), 128)
        h = torch.randn(n, hid, device="cuda", dtype=dt).relu()
        w_down = torch.randn(n_exp, hid, d, device="cuda", dtype=dt) / 11
        prod = torch.empty(n, d, device="cuda", dtype=dt)

        def det():
            kt.moe_gemm_rows(h, w_down, prod, r, k, a_gather=False, out_mode=kt.OUT_SLOT,
                             gate=gate, config=moe_ops._config("down_rows", hid, d))  # fmt: skip
            return kt.gated_group_sum(prod, None, k)

        ref = det().float()
        t_det = median_ms(det, warmup=20, rep=100)
        print(f"{name}: deterministic products + sum {t_det * 1e3:.1f} us")
        for cfg in [(128, 8, 4), (128, 4, 4), (64, 4, 3), (128, 8, 3)]:
            for vec in (False, True):
                out = torch.zeros(tokens, d, device="cuda", dtype=torch.float32)

                def fn():
                    out.zero_()
                    rows_atomic(h, w_down, out, r, k, gate=gate, config=cfg, vec=vec)

                try:
                    fn()
                    torch.cuda.synchronize()
                    err = float((out - ref).norm() / ref.norm())
                    ms = median_ms(fn, warmup=20, rep=100)
                except Exception as exc:
                    print(name, cfg, vec, "failed", repr(exc.__cause__)[:300])
                    continue
                    continue
                print(
                    f"  atomic {'v2' if vec else 'scalar'} {cfg} {ms * 1e3:7.1f} us "
                    f"x{ms / t_det:.3f} rel err {err:.1e}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
