r"""One moe_mlp forward + backward at a benchmark shape, for Nsight Compute.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        ncu --profile-from-start off --section SpeedOfLight --section Occupancy \
        python3 packages/cvmm-kernel/benchmarks/ncu_moe_step.py [shape]

Three warm-up steps (compilation, weight casts), then one step between cudaProfilerStart and
cudaProfilerStop, so that only its kernels are profiled. ``shape``: a name from bench_cvmm.py
(default moeut-244m-ffn); the gate takes its gradient, as in a layer.
"""

from __future__ import annotations

import sys

import torch
from bench_cvmm import SHAPES, make_inputs, ours_fused, trained_tensors
from bench_harness import require_cuda


def main() -> int:
    if not require_cuda(__file__):
        return 2
    name = sys.argv[1] if len(sys.argv) > 1 else "moeut-244m-ffn"
    s = next(s for s in SHAPES if s.name == name)
    t = make_inputs(s, "cuda")
    params = trained_tensors(t)
    t["gate"].requires_grad_()  # as in a layer: the gate's gradient too

    def step():
        out = ours_fused(s, t, True)
        out.backward(torch.randn_like(out))
        for p in [*params, t["gate"]]:
            p.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
