r"""Probe: what the relative shift costs inside the XL forward kernel, one variant per way of
doing it (CUDA). The forward of relative_attention_triton with the positional term

    0: left out (plain flash attention, the floor)
    1: a [B, B] band product added without any shift (the product's cost alone)
    2: [B, 2B] band product, shifted by tl.gather along the key axis (float32)
    3: as 2 with the band scores rounded to bf16 before the gather
    4: transposed band product [2B, B], tl.gather along axis 0, then tl.trans
    5: band scores written to a per-program global scratch and read back shifted
    6: before the key loop, the query block's positional scores for every key it sees written
       to a per-program global scratch (bf16) in one pass; the loop reads them shifted

B=8, H=4, T=4096, head 104 (padded 128), causal, bf16; median ms of triton.testing.do_bench,
with SDPA's forward on the same inputs first.
Writes probe_relative_shift.json to $OUT (else benchmarks/results). Run from the repository root:

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/switchhead/benchmarks/probe_relative_shift.py
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from bench_harness import median_ms, metadata, require_cuda, write_results


@triton.jit
def _probe_fwd(
    Q, K, V, R, OUT, SCRATCH, L, S, qk_scale,
    D: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    start_m = pid * BLOCK
    h = bh % 4
    local = tl.arange(0, BLOCK)
    offs_m = start_m + local.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = offs_d < D
    base = bh * L * D
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    skew = local[None, :] - local[:, None] + BLOCK - 1
    skew_t = local[:, None] - local[None, :] + BLOCK - 1
    n_pos = L + S - 1
    w2 = tl.arange(0, 2 * BLOCK).to(tl.int64)
    scratch = SCRATCH + (bh * tl.num_programs(1) + pid) * (BLOCK * 2 * BLOCK)
    if MODE == 6:  # scores of positions c_lo .. L + BLOCK - 2 (all keys j < start_m + BLOCK)
        width = L + 2 * BLOCK
        scratch = SCRATCH + (bh * tl.num_programs(1) + pid) * (BLOCK * width)
        c_lo = L - start_m - BLOCK
        for cc in range(0, start_m + 2 * BLOCK, 2 * BLOCK):
            c = c_lo + cc + w2
            band = tl.load(R + (h * n_pos + c[:, None]) * D + offs_d[None, :],
                           mask=(c < n_pos)[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
            pb = tl.dot(q, tl.trans(band))
            tl.store(scratch + local[:, None] * width + cc + w2[None, :], pb.to(tl.bfloat16))
        tl.debug_barrier()
    for start_n in range(0, start_m + BLOCK, BLOCK):
        cols = start_n + local.to(tl.int64)
        kt = tl.load(K + base + cols[None, :] * D + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, kt) * qk_scale
        c = start_n - start_m - (BLOCK - 1) + L - 1 + w2
        ok = (c >= 0) & (c < n_pos)
        if MODE == 1:
            c1 = start_n - start_m + L - 1 + local.to(tl.int64)
            band = tl.load(R + (h * n_pos + c1[:, None]) * D + offs_d[None, :],
                           mask=(c1 < n_pos)[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
            s += tl.dot(q, tl.trans(band)) * 1.4426950408889634
        elif MODE == 6:
            rel = cols[None, :] - offs_m[:, None] + L - 1 - c_lo
            pos = tl.load(scratch + local[:, None] * width + rel)
            s += pos.to(tl.float32) * 1.4426950408889634
        elif MODE >= 2:
            band = tl.load(R + (h * n_pos + c[:, None]) * D + offs_d[None, :],
                           mask=ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
            if MODE == 2:
                s += tl.gather(tl.dot(q, tl.trans(band)), skew, 1) * 1.4426950408889634
            elif MODE == 3:
                pb = tl.dot(q, tl.trans(band)).to(tl.bfloat16)
                s += tl.gather(pb, skew, 1).to(tl.float32) * 1.4426950408889634
            elif MODE == 4:
                pbt = tl.dot(band, tl.trans(q))
                s += tl.trans(tl.gather(pbt, skew_t, 0)) * 1.4426950408889634
            else:
                pb = tl.dot(q, tl.trans(band))
                tl.store(scratch + local[:, None] * (2 * BLOCK) + w2[None, :], pb)
                tl.debug_barrier()
                s += tl.load(scratch + local[:, None] * (2 * BLOCK) + skew) * 1.4426950408889634
                tl.debug_barrier()
        s = tl.where(cols[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + base + cols[:, None] * D + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(OUT + base + offs_m[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=d_ok[None, :])  # fmt: skip


LOG2E = 1.4426950408889634


def main() -> int:
    if not require_cuda(__file__):
        return 2
    b, h, t, d = 8, 4, 4096, 104
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))  # fmt: skip
    r = torch.randn(h, 2 * t - 1, d, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    rows = [{"sdpa_ms": median_ms(sdpa, warmup=5, rep=40)}]
    print(rows[-1], flush=True)
    outs = {}
    for block, warps, stages in ((64, 4, 3), (64, 8, 3), (128, 8, 2)):
        scratch = torch.empty(b * h * (t // block) * block * 2 * block, device="cuda")
        wide = torch.empty(b * h * (t // block) * block * (t + 2 * block), device="cuda",
                           dtype=torch.bfloat16)  # fmt: skip
        for mode in (0, 1, 2, 5, 6):
            out = torch.empty_like(q)

            def run(mode=mode, out=out, block=block, warps=warps, stages=stages, scratch=scratch):
                _probe_fwd[(b * h, t // block)](
                    q, k, v, r, out, wide if mode == 6 else scratch, t, t, d**-0.5 * LOG2E,
                    D=d, MODE=mode, BLOCK=block, BLOCK_D=128, num_warps=warps, num_stages=stages,
                )  # fmt: skip

            try:
                run()
                ms = median_ms(run, warmup=5, rep=40)
                outs[(block, mode)] = out.float()
                err = ""
                if mode == 6 and (block, 5) in outs:  # the same shift, float32 scores
                    ref = outs[(block, 5)]
                    err = float((out.float() - ref).norm() / ref.norm())
            except Exception as exc:
                ms, err = float("nan"), repr(exc)[:100]
            rows.append({"block": block, "warps": warps, "stages": stages, "mode": mode,
                         "ms": ms, "err_vs_mode5": err})  # fmt: skip
            print(rows[-1], flush=True)
    write_results("probe_relative_shift", {"meta": metadata(), "rows": rows}, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
