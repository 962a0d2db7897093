r"""A/B of the weight-gradient kernel's row split at SwitchHead's V and O shapes (bf16, medians).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/ab_wgrad_row_split.py

``moe_linear``'s weight gradient (4 heads x 4 or 8 experts of 1024 x 128, 2 per head, T=8192)
with each expert's rows cut into 1-8 ranges (``moe_weight_grad(..., split=)``, the ranges'
float32 sums added by one ``sum``) and with ``row_split``'s choice, each compared with the
whole-rows output. One process. Writes ``ab_wgrad_row_split.json`` to ``$OUT`` (else
``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from bench_harness import median_ms, metadata, require_cuda, write_results


def main() -> int:
    if not require_cuda(__file__):
        return 2
    from cvmm_kernel import moe_ops
    from cvmm_kernel import moe_triton as kt

    rows = measure(moe_ops, kt)
    write_results("ab_wgrad_row_split", {"meta": metadata(), "rows": rows},
                  script_file=__file__, indent=1)  # fmt: skip
    return 0


def measure(moe_ops, kt) -> list[dict]:
    T, d = 8192, 1024
    dt = torch.bfloat16
    rows = []
    cases = []
    for heads, experts in ((4, 4), (4, 8)):
        E, k = heads * experts, 2
        scores = torch.randn(T, heads, experts, device="cuda")
        gate, index = scores.sigmoid().topk(k, dim=-1)
        index = (index + torch.arange(heads, device="cuda").view(1, -1, 1) * experts).reshape(-1)
        gate = gate.reshape(-1).to(dt).contiguous()
        r = moe_ops.Routing(*moe_ops.moe_routing(index, E, 128, "triton"), 128)
        x = torch.randn(T, d, device="cuda", dtype=dt)
        dy_v = torch.randn(T * heads, 128, device="cuda", dtype=dt)
        xo = torch.randn(T * heads, 128, device="cuda", dtype=dt)
        dy_o = torch.randn(T, d, device="cuda", dtype=dt)
        cases.append((f"v-{heads}x{experts}", x, dy_v, (E, d, 128), heads * k, k, gate, r))
        cases.append((f"o-{heads}x{experts}", xo, dy_o, (E, 128, d), k, heads * k, gate, r))
    for name, a, b, shape, a_div, b_div, gate, r in cases:
        cfg = moe_ops._config("grad_w_linear", shape[1], shape[2])
        ref = torch.empty(shape, device="cuda", dtype=dt)
        fn = lambda out, s: kt.moe_weight_grad(
            a,
            b,
            out,
            r,
            a_div,
            a_gather=True,
            b_gather=True,
            gate=gate,
            b_div=b_div,
            config=cfg,
            split=s,
        )
        fn(ref, 1)
        base = median_ms(lambda: fn(ref, 1), warmup=20, rep=100)
        auto = kt.row_split(
            shape[0] * -(-shape[1] // cfg[1]) * -(-shape[2] // cfg[2]),
            r.sorted_to_slot.numel(),
            shape[0],
            cfg[0],
            a.device,
        )
        for s in (1, 2, 3, 4, 5, 6, 8, None):
            out = torch.full_like(ref, float("nan"))
            fn(out, s)
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            ms = median_ms(lambda: fn(out, s), warmup=20, rep=100)
            rows.append(
                dict(
                    case=name,
                    split=s if s else f"auto={auto}",
                    us=ms * 1e3,
                    vs_whole=ms / base,
                    rel_diff=err,
                )
            )
            print(
                f"{name:8s} split {rows[-1]['split']!s:7s} {ms * 1e3:7.1f} us x{ms / base:.3f} "
                f"diff {err:.1e}"
            )
    return rows


if __name__ == "__main__":
    sys.exit(main())
