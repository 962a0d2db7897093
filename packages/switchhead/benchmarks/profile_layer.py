r"""Where the time of a SwitchHead layer step goes (CUDA): GPU kernel time per op, vs dense MHA.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/switchhead/benchmarks/profile_layer.py [--seq 4096] \
        [--variant rope-4x4-d100] [--compile] [--python]

The step is the benchmark's (``bench_switchhead.py``: B=8, d_model=1024, causal, bf16 autocast,
forward+backward). For the chosen variant and the dense baseline, in one process: wall time per
step, the summed GPU kernel time of one profiled step and the ops that take the most GPU time.
``--compile`` profiles both ``torch.compile``'d; ``--python`` adds cProfile tables of the host's
Python (where the host time of a host-bound step goes). Writes the text to
``$OUT/profile_<variant>_T<seq>[_compiled].txt`` if ``$OUT`` is set, else to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_harness import profile_steps, python_profile, require_cuda, write_text
from bench_switchhead import DenseMHA, variants


def profile_layer(name: str, make, seq: int, rows: int, compiled: bool, python: bool) -> str:
    torch.manual_seed(0)
    module = make().cuda()
    layer = torch.compile(module) if compiled else module
    x = torch.randn(8, seq, 1024, device="cuda", requires_grad=True)
    dense = isinstance(module, DenseMHA)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x) if dense else layer(x, x, x)[0]
        out.float().sum().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    wall_ms, kernel_ms, events = profile_steps(step)
    table = events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)
    head = f"== {name}, T={seq}: wall {wall_ms:.3f} ms/step, GPU kernel time {kernel_ms:.3f} ms"
    host = events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70)
    text = f"{head}\n{table}\nBy host time (self CPU, inflated by the profiler):\n{host}"
    if python:
        text += f"\nHost Python (cProfile over 5 steps):\n{python_profile(step, rows=rows)}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--variant", default="rope-4x4-d100", choices=[n for n, _ in variants()])
    parser.add_argument("--rows", type=int, default=30, help="ops listed per table")
    parser.add_argument("--compile", action="store_true", help="profile torch.compile'd layers")
    parser.add_argument("--python", action="store_true", help="also cProfile host tables")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    makers = dict(variants())
    parts = [
        f"SwitchHead layer step{' (compiled)' if args.compile else ''} on "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}",
        *(
            profile_layer(name, makers[name], args.seq, args.rows, args.compile, args.python)
            for name in (args.variant, "dense-mha-16x64")
        ),
    ]
    text = "\n\n".join(parts)
    print(text)
    stem = args.variant.split(" ")[0]
    suffix = "_compiled" if args.compile else ""
    write_text(f"profile_{stem}_T{args.seq}{suffix}.txt", text, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
