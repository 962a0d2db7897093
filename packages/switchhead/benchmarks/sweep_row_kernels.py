r"""Launch settings of SwitchHead's row kernels (expert mixing, RoPE) at the benchmark's shapes.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/switchhead/benchmarks/sweep_row_kernels.py [--seq 4096]

B=8, 4 heads x 4 experts, head 104 (d_head 100 padded), k=2, bf16: each kernel of
``expert_mix_triton`` (gather and spread, with and without the gate gradient) and of
``rope_triton`` (forward) for (rows per program, warps) settings, passed with ``config=``; the
time to move the bytes at 3 TB/s as a floor. Writes ``sweep_row_kernels_T<seq>.json`` and ``.md``
to ``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_harness import environment_line, median_ms, metadata, require_cuda, write_results
from switchhead import expert_mix_triton, rope_triton

SETTINGS = [(8, 2), (8, 4), (16, 4), (32, 4), (32, 8), (64, 4), (64, 8)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    b, t, h, e, c, k = 8, args.seq, 4, 4, 104, 2
    torch.manual_seed(0)
    # the layer's views: values in a fused projection's output, attention output transposed
    fused = torch.randn(b, t, 2 * h * c + h * e * c + 32, device="cuda", dtype=torch.bfloat16)
    values = fused[..., 2 * h * c : 2 * h * c + h * e * c].view(b, t, h, e, c)
    res = torch.randn(b, h, t, c, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    index = torch.rand(b, t, h, e, device="cuda").argsort(-1)[..., :k]
    gate = torch.rand(b, t, h, k, device="cuda")
    grad_spread = torch.randn(b, t, h, e, c, device="cuda", dtype=torch.bfloat16)
    qk = fused[..., : 2 * h * c].view(b, t, 2 * h, c)
    cos = torch.randn(t, c, device="cuda", dtype=torch.bfloat16)
    sin = torch.randn(t, c, device="cuda", dtype=torch.bfloat16)
    mb = b * t * h * c * 2 / 1e6  # one [B, T, H, C] bf16 tensor
    kernels = {
        "gather (mix forward)": (lambda cf: expert_mix_triton.gather(values, index, gate, None, cf),
                                 (k + 1) * mb),
        "gather + dgate (spread backward)": (
            lambda cf: expert_mix_triton.gather(grad_spread, index, gate, res, cf), (k + 2) * mb),
        "spread (output forward)": (
            lambda cf: expert_mix_triton.spread(res, index, gate, e, None, cf), (e + 1) * mb),
        "spread + dgate (mix backward)": (
            lambda cf: expert_mix_triton.spread(res, index, gate, e, values, cf), (e + 1 + k) * mb),
        "rope forward (q and k)": (
            lambda cf: rope_triton.rotate(qk, cos, sin, 0, 50, False, cf), 4 * mb),
    }  # fmt: skip
    rows = []
    for name, (run, megabytes) in kernels.items():
        for setting in SETTINGS:
            ms = median_ms(lambda: run(setting), warmup=10, rep=50)
            rows.append({"kernel": name, "setting": list(setting), "ms": ms,
                         "floor_ms": megabytes / 3e6 * 1e3})  # fmt: skip
    meta = metadata(setup=f"B={b}, T={t}, {h} heads x {e} experts, head {c}, k={k}, bf16")
    lines = [
        f"SwitchHead row kernels, {environment_line(meta)} ({meta['setup']})",
        "",
        "| kernel | (rows, warps) | us | floor us (bytes at 3 TB/s) |",
        "|---|---|---|---|",
        *(
            f"| {r['kernel']} | {tuple(r['setting'])} | {r['ms'] * 1e3:.1f} | "
            f"{r['floor_ms'] * 1e3:.1f} |"
            for r in rows
        ),
    ]
    table = "\n".join(lines)
    print(table)
    write_results(f"sweep_row_kernels_T{t}", {"meta": meta, "rows": rows}, table,
                  script_file=__file__)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
