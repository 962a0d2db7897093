r"""One forward + backward of the XL relative-attention kernels, for Nsight Compute (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':'):packages/switchhead/benchmarks \
        ncu --kernel-name regex:"_bwd_|_fwd_kernel" --launch-skip 6 --launch-count 3 \
        --section SpeedOfLight --section WarpStateStats ... \
        python3 packages/switchhead/benchmarks/ncu_relative_attention.py [--seq 4096]

The benchmark's shape (B=8, H=4, head 104: SwitchHead d_head 100 padded, causal, bf16), the
shipped launch settings; two warm-up passes (compilation) and then one pass: its three kernels
(forward, ``dq``, ``dk``/``dv``) are the 7th to 9th launches that the filter above matches.
``ncu_relative_attention.txt`` in ``benchmarks/results`` holds a run's report.
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_harness import require_cuda
from sweep_relative_attention import inputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    from switchhead import relative_attention_triton as kt

    scale = 100**-0.5
    q, k, v, r, grad = inputs(8, 4, args.seq, 104)
    for _ in range(3):
        out, lse = kt.relative_attention_fwd(q, k, v, r, None, True, scale)
        kt.relative_attention_bwd(grad, q, k, v, r, None, out, lse, True, scale)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
