r"""A/B of row-tile kernel variants (the per-slot products of moe_mlp), against the shipped kernel.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/ab_rows_kernel.py [shape ...]

The down projection (gated) and the input gradient's products at two feedforward shapes, from
this script's copy of the row-tile kernel with switches: ``i32+even`` (32-bit offsets, no column
masks), ``pipe`` (a second accumulator: the next column block's product is issued before this
block's store), ``sorted`` (products stored in sorted order, contiguous rows, instead of slot
rows). Then the k-sum over slot rows against one over sorted rows (gathered by
``slot_to_sorted``). Each output is compared with the shipped kernel's. One process; medians.
Writes ``ab_rows_kernel.json`` to ``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from bench_harness import median_ms, metadata, require_cuda, write_results
from cvmm_kernel import moe_ops
from cvmm_kernel import moe_triton as kt
from cvmm_kernel.moe_triton import _tile_rows, launch


@triton.jit
def _epilogue(acc, g, out_ptr, rows, stride_om, n0, mask_m, N, GATE: tl.constexpr,
              BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):  # fmt: skip
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if GATE:
        acc = acc * g[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    if EVEN_N:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_n < N)[None, :])  # fmt: skip


@triton.jit
def _rows_v(
    a_ptr, w_ptr, out_ptr, sorted_to_slot_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr,
    n_valid_ptr, gate_ptr, K, N, stride_am, stride_we, stride_wk, stride_wn, stride_om,
    GATE: tl.constexpr, SORTED_OUT: tl.constexpr, I32: tl.constexpr, PIPE: tl.constexpr,
    EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    N_STAGES: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    if tile >= tl.load(n_valid_ptr):
        return
    # the shipped kernel's rows: sorted positions in, slot rows (or sorted ones) out
    expert, _positions, mask_m, slot, a_rows, rows = _tile_rows(
        tile, sorted_to_slot_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, 1, 1, False,
        0 if SORTED_OUT else 1, BLOCK_M,
    )  # fmt: skip
    if I32:
        a_rows, rows = a_rows.to(tl.int32), rows.to(tl.int32)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :],
                mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
    g = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if GATE:
        g = tl.load(gate_ptr + slot, mask=mask_m, other=0.0).to(tl.float32)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    if PIPE:
        offs_n = tl.arange(0, BLOCK_N)
        b = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & (offs_n < N)[None, :], other=0.0)  # fmt: skip
        acc = tl.dot(a, b)
        for n0 in tl.range(BLOCK_N, N, BLOCK_N, num_stages=N_STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            b = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=mask_k[:, None] & (offs_n < N)[None, :], other=0.0)  # fmt: skip
            acc_next = tl.dot(a, b)
            _epilogue(acc, g, out_ptr, rows, stride_om, n0 - BLOCK_N, mask_m, N, GATE, BLOCK_N,
                      EVEN_N)  # fmt: skip
            acc = acc_next
        last = (tl.cdiv(N, BLOCK_N) - 1) * BLOCK_N
        _epilogue(acc, g, out_ptr, rows, stride_om, last, mask_m, N, GATE, BLOCK_N, EVEN_N)
    else:
        for n0 in tl.range(0, N, BLOCK_N, num_stages=N_STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            b = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=mask_k[:, None] & (offs_n < N)[None, :], other=0.0)  # fmt: skip
            acc = tl.dot(a, b)
            _epilogue(acc, g, out_ptr, rows, stride_om, n0, mask_m, N, GATE, BLOCK_N, EVEN_N)


def rows_v(a, w, out, r, *, gate, config, sorted_out=False, i32=False, pipe=False, even=False):
    k, n = a.shape[1], w.shape[2]
    bn, warps, stages = config
    launch(
        _rows_v, (r.tile_expert.numel(),), a, w, out, r.sorted_to_slot, r.tile_expert,
        r.tile_start, r.offsets, r.n_valid, gate if gate is not None else r.offsets, k, n,
        a.stride(0), *w.stride(), out.stride(0), gate is not None, sorted_out, i32, pipe,
        even and n % bn == 0, r.block_m, bn, max(16, triton.next_power_of_2(k)), stages,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


@triton.jit
def _gather_sum(y_ptr, idx_ptr, out_ptr, n_groups, N, K: tl.constexpr, GATHER: tl.constexpr,
                BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    offs_g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_g = offs_g < n_groups
    mask = mask_g[:, None] & (offs_n < N)[None, :]
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(K):
        slot = offs_g * K + j
        if GATHER:
            row = tl.load(idx_ptr + slot, mask=mask_g, other=0).to(tl.int64)
        else:
            row = slot.to(tl.int64)
        acc += tl.load(y_ptr + row[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(
        out_ptr + offs_g.to(tl.int64)[:, None] * N + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def gather_sum(y, idx, k, gather, bg=32, bn=128, warps=4):
    n_slots, n = y.shape
    out = y.new_empty(n_slots // k, n)
    grid = (triton.cdiv(out.shape[0], bg), triton.cdiv(n, bn))
    launch(_gather_sum, grid, y, idx, out, out.shape[0], n, k, gather, bg, bn, num_warps=warps)
    return out


SHAPES = [
    ("moeut-244m-ffn", 8192, 1024, 387, 128, 16),
    ("ffn-128x128-k4", 8192, 1024, 128, 128, 4),
]
VARIANTS = {  # name: (sorted_out, i32, pipe, even)
    "copy": (False, False, False, False),
    "i32+even": (False, True, False, True),
    "pipe": (False, False, True, False),
    "pipe+i32+even": (False, True, True, True),
    "sorted": (True, False, False, False),
    "sorted+i32+even": (True, True, False, True),
    "sorted+pipe+i32+even": (True, True, True, True),
}
CONFIGS = [(128, 8, 4), (128, 8, 3), (64, 8, 3), (128, 4, 4)]


def main() -> int:
    if not require_cuda(__file__):
        return 2
    rows = []
    only = set(sys.argv[1:])
    for name, tokens, d, n_exp, hid, k in SHAPES:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        dt = torch.bfloat16
        gate, index = torch.randn(tokens, n_exp, device="cuda").sigmoid().topk(k, dim=-1)
        gate = gate.reshape(-1).contiguous()
        n = tokens * k
        r = moe_ops.Routing(*moe_ops.moe_routing(index.reshape(-1), n_exp, 128, "triton"), 128)
        h = torch.randn(n, hid, device="cuda", dtype=dt).relu()
        w_down = torch.randn(n_exp, hid, d, device="cuda", dtype=dt) / 11
        w_up = torch.randn(n_exp, d, hid, device="cuda", dtype=dt) / 32
        s2s = r.sorted_to_slot.long()
        roles = {"down_rows": (w_down, gate), "grad_input_rows": (w_up.transpose(1, 2), None)}
        for role, (w, g) in roles.items():
            ref = torch.empty(n, d, device="cuda", dtype=dt)
            shipped = lambda: kt.moe_gemm_rows(
                h, w, ref, r, k, a_gather=False, out_mode=kt.OUT_SLOT, gate=g,
                config=moe_ops._config(role, hid, d),
            )  # fmt: skip
            shipped()
            base = median_ms(shipped, warmup=20, rep=100)
            rows.append(dict(shape=name, role=role, variant="shipped", config=None, ms=base))
            for cfg in CONFIGS:
                for vname, (sorted_out, i32, pipe, even) in VARIANTS.items():
                    out = torch.full_like(ref, float("nan"))
                    fn = lambda: rows_v(h, w, out, r, gate=g, config=cfg, sorted_out=sorted_out,
                                        i32=i32, pipe=pipe, even=even)  # fmt: skip
                    try:
                        fn()
                        torch.cuda.synchronize()
                        got = out
                        if sorted_out:  # position p holds slot s2s[p]: back to slot order
                            got = torch.empty_like(out)
                            got[s2s] = out[: s2s.numel()]
                        err = float((got.float() - ref.float()).abs().max())
                        ms = median_ms(fn, warmup=20, rep=100)
                    except Exception as exc:
                        print(name, role, vname, cfg, "failed", str(exc)[:200])
                        continue
                    rows.append(dict(shape=name, role=role, variant=vname, config=cfg, ms=ms,
                                     ratio=ms / base, maxdiff=err))  # fmt: skip
            again = median_ms(shipped, warmup=20, rep=100)
            rows.append(dict(shape=name, role=role, variant="shipped again", config=None,
                             ms=again, ratio=again / base))  # fmt: skip
        # the k-sum over slot rows (contiguous) against one over sorted rows (gathered)
        y = torch.randn(n, d, device="cuda", dtype=dt)
        s2p = r.slot_to_sorted
        ref = gather_sum(y, s2p, k, False)
        base = median_ms(lambda: gather_sum(y, s2p, k, False), warmup=20, rep=100)
        rows.append(dict(shape=name, role="ksum", variant="contiguous 32x128", config=None,
                         ms=base))  # fmt: skip
        for bg, bn, warps in [(32, 128, 4), (16, 256, 4), (64, 128, 8), (8, 1024, 8)]:
            fn = lambda: gather_sum(y, s2p, k, True, bg, bn, warps)
            diff = float(
                (
                    gather_sum(
                        y, torch.arange(n, device="cuda", dtype=torch.int32), k, True, bg, bn, warps
                    ).float()
                    - ref.float()
                )
                .abs()
                .max()
            )
            ms = median_ms(fn, warmup=20, rep=100)
            rows.append(
                dict(
                    shape=name,
                    role="ksum",
                    variant=f"gathered {bg}x{bn} w{warps}",
                    config=None,
                    ms=ms,
                    ratio=ms / base,
                    maxdiff=diff,
                )
            )
    for row in rows:
        print(
            f"{row['shape']:16s} {row['role']:16s} {row['variant']:22s} "
            f"{row['config']!s:14s} {row['ms'] * 1e3:7.1f} us x{row.get('ratio', 1):.3f} "
            f"diff {row.get('maxdiff', 0):.1e}"
        )
    write_results("ab_rows_kernel", {"meta": metadata(), "rows": rows}, script_file=__file__,
                  indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
