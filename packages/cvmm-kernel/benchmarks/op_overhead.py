r"""Host time of a one-kernel op called from a compiled graph: custom_op vs triton_op (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/op_overhead.py

A chain of 20 calls of a trivial Triton kernel (4096 elements, so the host time is what counts)
in three forms: the Python function launching it, a ``torch.library.custom_op`` and a
``torch.library.triton_op`` (both with the same autograd formula); eager and
``torch.compile(fullgraph=True)``, forward only and forward + backward. The case for registering
this package's Triton-only ops with :mod:`cvmm_kernel.traced_ops`. Writes JSON and markdown to
``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from bench_harness import (
    environment_line,
    host_us,
    metadata,
    require_cuda,
    table_header,
    write_results,
)

CHAIN = 20


@triton.jit
def _double_kernel(X, Y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n) * 2, mask=i < n)


def _double(x: torch.Tensor, wrap) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    wrap(_double_kernel)[(triton.cdiv(n, 1024),)](x, y, n, BLOCK=1024)
    return y


def _chain(op):
    def run(x):
        for _ in range(CHAIN):
            x = op(x)
        return x

    return run


def main() -> int:
    if not require_cuda(__file__):
        return 2

    def plain_body(x: torch.Tensor) -> torch.Tensor:  # opaque to the compiler
        return _double(x, lambda kernel: kernel)

    forms = {"Python function": plain_body}

    def traced_body(x: torch.Tensor) -> torch.Tensor:  # traced once by the compiler
        return _double(x, torch.library.wrap_triton)

    custom = torch.library.custom_op("cvmm_bench::double_custom", mutates_args=())(plain_body)
    custom.register_fake(lambda x: torch.empty_like(x))
    triton_op = torch.library.triton_op("cvmm_bench::double_triton", mutates_args=())(traced_body)
    for label, op in (("custom_op", custom), ("triton_op", triton_op)):
        op.register_autograd(lambda ctx, grad: grad * 2)
        forms[label] = op
    x = torch.randn(4096, device="cuda")
    x_grad = x.clone().requires_grad_()
    rows = []
    for label, op in forms.items():
        compiled = torch.compile(_chain(op), fullgraph=True)
        row = {
            "form": label,
            "eager_us": host_us(lambda op=op: _chain(op)(x)) / CHAIN,
            "compiled_fwd_us": host_us(lambda: compiled(x)) / CHAIN,
        }
        if label != "Python function":
            step = lambda: compiled(x_grad).sum().backward()
            row["compiled_fwd_bwd_us"] = host_us(step) / CHAIN
        rows.append(row)
    meta = metadata(setup=f"a chain of {CHAIN} one-kernel ops on 4096 elements, host us per op")
    lines = [
        f"Host time per op call, {environment_line(meta)} ({meta['setup']})",
        "",
        *table_header("form", "eager", "compiled, forward", "compiled, forward + backward"),
    ]
    for r in rows:
        both = r.get("compiled_fwd_bwd_us")
        lines.append(
            f"| {r['form']} | {r['eager_us']:.1f} | {r['compiled_fwd_us']:.1f} | "
            f"{'-' if both is None else f'{both:.1f}'} |"
        )
    table = "\n".join(lines)
    print(table)
    write_results("op_overhead", {"meta": meta, "rows": rows}, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
