r"""Launch settings of the Transformer-XL relative-attention kernels, and their cost against SDPA.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/switchhead/benchmarks/sweep_relative_attention.py [--seq 1024 4096]

The attention core of the SwitchHead XL benchmark layer (B=8, 4 heads, head size 104, causal,
bf16) at T=1024 and 4096: the forward, and the backward with one of its two kernels (``dq`` or
``dkdv``) set, for every candidate ``(BLOCK_M, BLOCK_N, num_warps, num_stages, programs per
SM)`` (median of ``triton.testing.do_bench``), checked against the defaults' outputs; then
forward + backward of the default settings, of the reference path (positional bias + SDPA) and
of SDPA without the positional term, in the same process. ``--baseline FILE``: also forward +
backward of the kernels of an older ``relative_attention_triton.py`` (same launcher functions),
for an A/B in one process. Writes ``sweep_relative_attention.json`` / ``.md`` to ``$OUT`` (else
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch
import torch.nn.functional as F
from bench_harness import (
    environment_line,
    median_ms,
    metadata,
    peak_mib,
    require_cuda,
    table_header,
    write_results,
)

# (BLOCK_M, BLOCK_N, num_warps, num_stages, programs per SM)
CANDIDATES = {
    "fwd": [
        (64, 64, 4, 2, 2),
        (64, 64, 4, 3, 2),
        (64, 32, 4, 2, 2),
        (64, 64, 8, 2, 2),
        (128, 64, 8, 2, 1),
        (128, 64, 8, 3, 1),
        (128, 32, 8, 2, 1),
        (128, 128, 8, 2, 1),
        (64, 64, 8, 2, 1),
        (64, 32, 8, 2, 1),
    ],
    "dq": [
        (64, 64, 4, 2, 2),
        (64, 64, 4, 3, 2),
        (64, 64, 4, 1, 2),
        (64, 32, 4, 2, 2),
        (128, 64, 8, 2, 1),
        (128, 64, 8, 3, 1),
        (64, 64, 8, 2, 1),
        (64, 32, 8, 2, 1),
        (128, 32, 8, 3, 1),
        (32, 64, 4, 2, 2),
    ],
    "dkdv": [
        (16, 64, 4, 2, 2),
        (32, 64, 4, 2, 2),
        (64, 64, 4, 2, 2),
        (16, 64, 4, 3, 2),
        (16, 128, 8, 2, 1),
        (32, 128, 8, 2, 1),
        (16, 128, 8, 3, 1),
        # fewer accumulator registers per thread (Nsight Compute found every kernel at 255
        # registers with local-memory spills: ncu_relative_attention.txt)
        (64, 32, 4, 2, 2),
        (32, 32, 4, 2, 2),
        (64, 64, 8, 2, 1),
        (32, 64, 8, 2, 1),
        (64, 32, 8, 2, 1),
    ],
}


def inputs(b, h, t, d, device="cuda", dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, generator=g) for _ in range(3))
    r = torch.randn(h, 2 * t - 1, d, device=device, dtype=dtype, generator=g) * 0.1
    grad = torch.randn(b, h, t, d, device=device, dtype=dtype, generator=g)
    return q, k, v, r, grad


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("baseline_relative_attention_triton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:  # noqa: C901 (one flat script)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="an older relative_attention_triton.py to A/B against")
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096], help="lengths T")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    baseline = load_baseline(args.baseline) if args.baseline else None
    from switchhead import relative_attention_triton as kt
    from switchhead.relative_attention import reference_relative_attention, relative_attention

    bench = lambda fn: median_ms(fn, warmup=10, rep=60)
    scale = 100**-0.5
    rows = []
    for t in args.seq:
        q, k, v, r, grad = inputs(8, 4, t, 104)
        out, lse = kt.relative_attention_fwd(q, k, v, r, None, True, scale)
        dq, dk, dv, dr = kt.relative_attention_bwd(grad, q, k, v, r, None, out, lse, True, scale)
        ref = (out, dq, dk, dv, dr)
        for kernel, cands in CANDIDATES.items():
            for cfg in cands:
                try:
                    if kernel == "fwd":
                        fn = lambda: kt.relative_attention_fwd(q, k, v, r, None, True, scale, cfg)
                        got = fn()[:1]
                    else:

                        def fn():
                            return kt.relative_attention_bwd(
                                grad, q, k, v, r, None, out, lse, True, scale, {kernel: cfg}
                            )

                        got = fn()
                    err = max(
                        float((a.float() - b.float()).norm() / b.float().norm())
                        for a, b in zip(got, ref[:1] if kernel == "fwd" else ref[1:])
                    )
                    ms = bench(fn)
                except Exception as exc:  # a setting that does not compile (shared memory)
                    ms, err = float("nan"), repr(exc)[:120]
                rows.append({"T": t, "kernel": kernel, "config": cfg, "ms": ms, "err": err})
                print(rows[-1], flush=True)
        # forward + backward: the kernels, the reference path and SDPA without positions
        leaves = [x.detach().requires_grad_() for x in (q, k, v, r)]

        def step(fn):
            def run():
                o = fn(*leaves)
                torch.autograd.grad(o, leaves[:3] if fn is sdpa else leaves, grad)

            return run

        def sdpa(q, k, v, r=None):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

        kernels = lambda q, k, v, r: relative_attention(q, k, v, r, None, True, scale, "triton")
        reference = lambda q, k, v, r: reference_relative_attention(q, k, v, r, None, True, scale)
        for name, mod in (("kernels", kt), ("baseline kernels", baseline)):
            if mod is None:
                continue

            def direct(mod=mod):
                o, lse_ = mod.relative_attention_fwd(q, k, v, r, None, True, scale)
                return mod.relative_attention_bwd(grad, q, k, v, r, None, o, lse_, True, scale)

            got = direct()
            err = max(
                float((a.float() - b.float()).norm() / b.float().norm())
                for a, b in zip(got, (dq, dk, dv, dr))
            )
            rows.append({"T": t, "kernel": f"fwd+bwd {name}, direct", "ms": bench(direct),
                         "fwd_ms": bench(lambda mod=mod: mod.relative_attention_fwd(
                             q, k, v, r, None, True, scale)), "peak_mib": peak_mib(direct),
                         "err": err})  # fmt: skip
            print(rows[-1], flush=True)
        for name, fn in (("kernels", kernels), ("reference", reference), ("sdpa", sdpa)):
            try:
                peak = peak_mib(step(fn))
                ms = bench(step(fn))
                fwd_ms = bench(lambda fn=fn: fn(*[x.detach() for x in leaves]))
            except torch.OutOfMemoryError:
                ms = fwd_ms = peak = float("nan")
            rows.append({"T": t, "kernel": f"fwd+bwd {name}", "ms": ms, "fwd_ms": fwd_ms,
                         "peak_mib": peak})  # fmt: skip
            print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    meta = metadata(
        setup="B=8, H=4, head 104 (SwitchHead d_head 100 padded), causal, bf16",
        baseline=args.baseline,
    )
    lines = [
        f"XL relative attention core, {environment_line(meta)} ({meta['setup']})",
        "",
        *([f"Baseline kernels: `{args.baseline}`.", ""] if args.baseline else []),
        *table_header(
            "T",
            "kernel / path",
            "config (BLOCK_M, BLOCK_N, warps, stages, per SM)",
            "ms",
            "fwd ms",
            "peak MiB",
            "err",
        ),
    ]
    for row in rows:
        lines.append(
            f"| {row['T']} | {row['kernel']} | {row.get('config', '')} | {row['ms']:.3f} | "
            f"{row.get('fwd_ms', float('nan')):.3f} | {row.get('peak_mib', float('nan')):.0f} | "
            f"{row.get('err', '')} |"
        )
    table = "\n".join(lines)
    print(table)
    document = {"meta": meta, "rows": rows}
    write_results(
        "sweep_relative_attention", document, table, script_file=__file__, json_default=str
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
