r"""Sweep the Triton block sizes of cvmm on the benchmark shapes (CUDA), to pick the defaults.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/sweep_blocks.py
"""

from __future__ import annotations

import sys

import torch
from bench_cvmm import SHAPES, make_inputs, ours, trained_tensors
from bench_harness import median_ms, require_cuda

CONFIGS = [
    (64, 128, 64, 4, 3),
    (64, 128, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 64, 64, 4, 3),
    (64, 128, 128, 8, 3),
    (32, 128, 64, 4, 4),
]


def main() -> int:
    if not require_cuda(__file__):
        return 2
    for s in SHAPES:
        t = make_inputs(s, "cuda")
        params = trained_tensors(t)
        results = []
        for cfg in CONFIGS:

            def fwd(cfg=cfg):
                return ours(s, t, config=cfg)  # every launch of the call and its backward

            def step():
                out = fwd()
                out.backward(torch.ones_like(out))
                for p in params:
                    p.grad = None

            try:
                f_ms = median_ms(fwd, warmup=10, rep=50)
                fb_ms = median_ms(step, warmup=10, rep=50)
            except Exception as exc:  # a config that does not fit the chip
                results.append((cfg, None, None, str(exc)[:80]))
                continue
            results.append((cfg, f_ms, fb_ms, ""))
        print(f"\n{s.name}: config (BM, BN, BK, warps, stages) -> fwd ms, fwd+bwd ms")
        for cfg, f_ms, fb_ms, err in results:
            print(
                f"  {cfg}: {f_ms if f_ms is None else round(f_ms, 3)}, "
                f"{fb_ms if fb_ms is None else round(fb_ms, 3)} {err}"
            )
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
