r"""Registers, spill stack and shared memory of the XL relative-attention kernels per launch
setting, compiled for an H100 (sm_90) without a GPU.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/switchhead/benchmarks/kernel_resources.py [--offline]

Each kernel is compiled ahead of time (``triton.compile`` for ``GPUTarget("cuda", 90, 32)``)
with the benchmark's head (104 channels padded to 128, bf16, causal, no mask), and the cubin's
resource usage is read with the ``cuobjdump`` that ships with Triton: ``REG`` registers per
thread, ``STACK`` bytes of per-thread stack (where spilled registers go: 0 means no spills). The
installed Triton's compiler decides, so numbers can differ from a GPU machine's Triton version.
``--offline`` runs it where there is no CUDA device (it compiles only); without the flag it
wants one, as every benchmark script. Writes ``kernel_resources.{json,md}`` to ``$OUT`` (else
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from bench_harness import environment_line, metadata, require_cuda, table_header, write_results
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BF16, F32, I32 = "*bf16", "*fp32", "*i32"
HEAD = dict(D=104, D_V=104, CAUSAL=True, HAS_KEEP=False, IEEE=False, BLOCK_D=128, BLOCK_DV=128,
            ALIGN=8)  # fmt: skip
POINTERS = {  # every pointer argument of the kernels, by name
    "Q": BF16, "K": BF16, "V": BF16, "R": BF16, "KEEP": F32, "DO": BF16, "LSE": F32,
    "DELTA": F32, "DQ": BF16, "DR": F32, "POS": BF16, "DS": BF16, "DK": BF16, "DV": BF16,
    "SLOTS": BF16, "OUT": BF16, "SCRATCH": BF16,
}  # fmt: skip
FLOATS = {"qk_scale", "sm_scale"}


def resources(kernel, constexprs: dict, warps: int, stages: int) -> dict:
    """``{"REG", "STACK", "SHARED"}`` of ``kernel`` compiled for sm_90 with ``constexprs``."""
    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        else:
            signature[p.name] = POINTERS.get(p.name, "fp32" if p.name in FLOATS else "i32")
    given = {k: v for k, v in constexprs.items() if k in signature}
    compiled = triton.compile(
        ASTSource(kernel, signature, given),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps, "num_stages": stages},
    )
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    return {
        key: int(re.search(rf"{key}:(\d+)", text).group(1)) for key in ("REG", "STACK", "SHARED")
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="compile without a CUDA device")
    args = parser.parse_args()
    if not args.offline and not require_cuda(__file__):
        return 2
    from switchhead import relative_attention_triton as kt

    # (kernel name, kernel, extra constexprs, BLOCK_M, BLOCK_N, warps, stages)
    settings = [
        ("fwd", kt._fwd_kernel, {}, 128, 64, 8, 3),
        ("fwd", kt._fwd_kernel, {}, 64, 64, 4, 2),
        ("dq", kt._bwd_dq_kernel, {}, 128, 64, 8, 3),
        ("dq", kt._bwd_dq_kernel, {}, 128, 32, 8, 3),
        ("dq", kt._bwd_dq_kernel, {}, 64, 64, 4, 2),
        ("dkdv", kt._bwd_dkdv_kernel, {}, 64, 64, 4, 2),
        ("dkdv", kt._bwd_dkdv_kernel, {}, 64, 32, 4, 2),
        ("dkdv", kt._bwd_dkdv_kernel, {}, 64, 64, 8, 2),
    ]
    rows = []
    for name, kernel, extra, block_m, block_n, warps, stages in settings:
        constexprs = dict(HEAD, BLOCK_M=block_m, BLOCK_N=block_n, **extra)
        try:
            usage = resources(kernel, constexprs, warps, stages)
        except Exception as exc:  # a setting that does not compile
            usage = {"error": repr(exc)[:120]}
        rows.append({"kernel": name, "config": (block_m, block_n, warps, stages), **usage})
        print(rows[-1], flush=True)
    meta = metadata(gpu="no GPU (compiled for sm_90)",
                    setup="head 104 padded to 128, bf16, causal")  # fmt: skip
    lines = [
        f"XL kernels' resource usage, {environment_line(meta)} ({meta['setup']})",
        "",
        *table_header(
            "kernel",
            "(BLOCK_M, BLOCK_N, warps, stages)",
            "registers / thread",
            "spill stack bytes / thread",
            "shared bytes (static)",
        ),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['config']} | {r['error']} | | |")
        else:
            lines.append(f"| {r['kernel']} | {r['config']} | {r['REG']} | {r['STACK']} | "
                         f"{r['SHARED']} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    write_results("kernel_resources", {"meta": meta, "rows": rows}, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
