r"""Sweep of spread-kernel designs for ``dense_slots`` (bf16, SwitchHead's 4 x 4 values: 8192
rows of 8 slots, 16 experts of 128 columns; CUDA, medians).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/sweep_spread.py

Designs (each checked against ``dense_slots.reference_spread``):

- ``row``: one program per row (and expert block), every expert's tile in registers, each slot
  added where its expert matches;
- ``expert``: one program per (rows, expert), masked loads of the slots that chose it;
- ``package``: the kernel the package ships (``moe_triton.spread_slots``; in the committed run
  of 2026-11-27 a design since replaced: a block of rows per program, their slots' source rows
  loaded as one ``[rows, slots, columns]`` tile, each expert's block a sum over the slots; the
  package now ships ``row`` with one warp);
- ``scatter``: a zero fill, then one program per block of slots storing each slot's gated row
  into its expert's block (a slot whose expert an earlier slot of its row chose too stores
  nothing; the first such slot stores the sum).

Writes ``sweep_spread.json`` to ``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from bench_harness import median_ms, metadata, require_cuda, write_results


@triton.jit
def _row_kernel(src_ptr, index_ptr, gate_ptr, out_ptr, W, n_experts, SRC_DIV: tl.constexpr,
                DIV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_W: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    experts = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_E, BLOCK_W), dtype=tl.float32)
    for j in tl.static_range(DIV):
        slot = row * DIV + j
        e = tl.load(index_ptr + slot)
        g = tl.load(gate_ptr + slot).to(tl.float32)
        src = tl.load(src_ptr + (slot // SRC_DIV) * W + cols, mask=cols < W, other=0.0)
        acc += tl.where(experts[:, None] == e, g * src.to(tl.float32)[None, :], 0.0)
    ptrs = out_ptr + row * n_experts * W + experts.to(tl.int64)[:, None] * W + cols[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=(experts < n_experts)[:, None] & (cols < W)[None, :])  # fmt: skip


@triton.jit
def _expert_kernel(src_ptr, index_ptr, gate_ptr, out_ptr, n_rows, W, n_experts,
                   SRC_DIV: tl.constexpr, DIV: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_W: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    e = tl.program_id(2)
    mask_r, mask_c = rows < n_rows, cols < W
    acc = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
    for j in tl.static_range(DIV):
        slot = rows * DIV + j
        chosen = (tl.load(index_ptr + slot, mask=mask_r, other=-1) == e) & mask_r
        g = tl.load(gate_ptr + slot, mask=chosen, other=0.0).to(tl.float32)
        src = tl.load(src_ptr + (slot // SRC_DIV).to(tl.int64)[:, None] * W + cols[None, :],
                      mask=chosen[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
        acc += g[:, None] * src.to(tl.float32)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * n_experts * W + e * W + cols[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def _scatter_kernel(src_ptr, index_ptr, gate_ptr, out_ptr, n_slots, W, n_experts,
                    SRC_DIV: tl.constexpr, DIV: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_W: tl.constexpr):  # fmt: skip
    slots = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask_s, mask_c = slots < n_slots, cols < W
    e = tl.load(index_ptr + slots, mask=mask_s, other=0)
    row_start = (slots // DIV) * DIV
    acc = tl.zeros((BLOCK_S, BLOCK_W), dtype=tl.float32)
    first = mask_s
    for j in tl.static_range(DIV):
        other = row_start + j
        same = (tl.load(index_ptr + other, mask=mask_s, other=-1) == e) & mask_s
        first = first & ~(same & (other < slots))  # an earlier slot of the row has e
        g = tl.load(gate_ptr + other, mask=same, other=0.0).to(tl.float32)
        src = tl.load(src_ptr + (other // SRC_DIV).to(tl.int64)[:, None] * W + cols[None, :],
                      mask=same[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
        acc += g[:, None] * src.to(tl.float32)
    rows = (slots // DIV).to(tl.int64)
    ptrs = out_ptr + rows[:, None] * n_experts * W + e[:, None] * W + cols[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=first[:, None] & mask_c[None, :])


def main() -> int:
    if not require_cuda(__file__):
        return 2
    from cvmm_kernel import dense_slots, moe_triton

    tokens, heads, k, experts, width = 8192, 4, 2, 4, 128
    n_experts, div, src_div = heads * experts, heads * k, k
    torch.manual_seed(0)
    scores = torch.randn(tokens, heads, experts, device="cuda")
    gate, index = scores.sigmoid().topk(k, dim=-1)
    index = (index + torch.arange(heads, device="cuda").view(1, -1, 1) * experts).reshape(-1)
    gate = gate.reshape(-1).to(torch.bfloat16).contiguous()
    src = torch.randn(tokens * heads, width, device="cuda", dtype=torch.bfloat16)
    expected = dense_slots.reference_spread(src, index, gate, n_experts, div, src_div)
    rows_out = tokens
    out = torch.empty(rows_out, n_experts * width, device="cuda", dtype=torch.bfloat16)

    def row(warps, block_e):
        return lambda: _row_kernel[(rows_out, 1, triton.cdiv(n_experts, block_e))](
            src, index, gate, out, width, n_experts, src_div, div, block_e, 128, num_warps=warps
        )

    def expert(block_r, warps):
        return lambda: _expert_kernel[(triton.cdiv(rows_out, block_r), 1, n_experts)](
            src, index, gate, out, rows_out, width, n_experts, src_div, div, block_r, 128,
            num_warps=warps)  # fmt: skip

    def scatter(block_s, warps):
        def run():
            out.zero_()
            _scatter_kernel[(triton.cdiv(index.numel(), block_s), 1)](
                src, index, gate, out, index.numel(), width, n_experts, src_div, div, block_s,
                128, num_warps=warps)  # fmt: skip

        return run

    def package():
        out.copy_(moe_triton.spread_slots(src, index, gate, n_experts, div, src_div))

    variants = {"package": package, "zero fill alone": lambda: out.zero_()}
    for warps in (1, 2, 4, 8):
        for block_e in (4, 16):
            variants[f"row warps={warps} block_e={block_e}"] = row(warps, block_e)
    for block_r in (16, 32, 64):
        for warps in (2, 4, 8):
            variants[f"expert block_r={block_r} warps={warps}"] = expert(block_r, warps)
    for block_s in (16, 32, 64):
        for warps in (2, 4, 8):
            variants[f"scatter block_s={block_s} warps={warps}"] = scatter(block_s, warps)
    results = []
    for name, fn in variants.items():
        out.fill_(float("nan"))
        fn()
        ok = name.startswith("zero") or torch.allclose(out.float(), expected.float(), atol=1e-2)
        ms = median_ms(fn, warmup=20, rep=200)
        results.append({"variant": name, "us": 1000 * ms, "correct": ok})
        print(f"{name:40s} {1000 * ms:8.1f} us  {'ok' if ok else 'WRONG'}")
    write_results("sweep_spread", {"meta": metadata(), "rows": results}, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
