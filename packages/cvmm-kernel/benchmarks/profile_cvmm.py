r"""Where the time of one cvmm call goes (CUDA): component timings and a profiler table.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/profile_cvmm.py
"""

from __future__ import annotations

import sys

import torch
from bench_cvmm import SHAPES, make_inputs, ours, trained_tensors
from bench_harness import median_ms, require_cuda
from cvmm_kernel import cvmm_prepare_sel2
from cvmm_kernel.layout import expert_bounds
from cvmm_kernel.triton_kernels import expert_weight_grad, gather_mm
from cvmm_kernel.validation import check_cvmm_inputs


def bench(fn) -> float:
    return median_ms(fn, warmup=10, rep=50)


def main() -> int:
    if not require_cuda(__file__):
        return 2
    for name in ("switchhead-v-4x4", "moeut-244m-ffn"):
        s = next(s for s in SHAPES if s.name == name)
        t = make_inputs(s, "cuda")
        w = t.get("w", t.get("up"))
        x = t["x"]
        index = t["index"].flatten(-2) if s.kind == "v" else t["index"]
        sel = cvmm_prepare_sel2(index)
        expert = sel.sel.flatten()
        n = expert.numel()
        bounds = expert_bounds(expert, w.shape[0])
        so = sel.out_index
        grad = torch.randn(n, w.shape[2], device="cuda", dtype=x.dtype)
        print(f"\n== {name}: {n} positions, {w.shape[0]} matrices {tuple(w.shape[1:])}")
        print(f"prepare_sel2     {bench(lambda: cvmm_prepare_sel2(index)):.3f} ms")
        print(f"validation       {bench(lambda: check_cvmm_inputs(x, sel, w)):.3f} ms")
        print(f"bounds           {bench(lambda: expert_bounds(expert, w.shape[0])):.3f} ms")
        fwd = bench(lambda: gather_mm(x, w, expert, sel.sel_index, so, bounds, n))
        print(f"gather_mm kernel {fwd:.3f} ms")
        wt = w.transpose(1, 2)
        pos = torch.arange(n, device="cuda")
        print(
            "dx kernel        "
            f"{bench(lambda: gather_mm(grad, wt, expert, so, pos, bounds, n)):.3f} ms"
        )
        print(
            "dw kernel        "
            f"{bench(lambda: expert_weight_grad(x, grad, expert, sel.sel_index, so, bounds)):.3f} ms"  # noqa: E501
        )
        per_pos = torch.randn(n, x.shape[1], device="cuda", dtype=x.dtype)
        print(
            "dx index_put     "
            f"{bench(lambda: x.new_zeros(x.shape).index_put_((sel.sel_index,), per_pos, accumulate=True)):.3f} ms"  # noqa: E501
        )
        params = trained_tensors(t)

        def step():
            out = ours(s, t)
            out.backward(torch.ones_like(out))
            for p in params:
                p.grad = None

        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=14, max_name_column_width=60
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
