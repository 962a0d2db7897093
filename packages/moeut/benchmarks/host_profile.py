r"""Where the host time of the eager MoE pieces goes (CUDA): launches, ATen ops and Python.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/host_profile.py [--case SwitchHead] [--calls 100] \
        [--compiled]

For each case of ``host_overhead.py`` (tiny widths, so that the host's time is what is measured)
whose name contains a ``--case`` string: the host time per call, the driver calls per call
(kernel launches, memsets, copies) and ATen ops per call from the torch profiler, and cProfile
tables of the Python over ``--calls`` calls (own time and cumulative time). ``--compiled``
profiles ``moe_linear`` and ``moe_mlp`` forward + backward under ``torch.compile`` instead (their
custom ops called from the compiled graphs). Writes the text to ``$OUT/host_profile.txt``
(``host_profile_compiled.txt``) if ``$OUT`` is set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from bench_harness import host_us, python_profile, require_cuda, write_text
from host_overhead import ATT_E, FF_E, HEADS, op_cases, op_inputs
from torch.profiler import ProfilerActivity, profile

_DRIVER_CALLS = ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel", "cudaMemsetAsync",
                 "cudaMemcpyAsync")  # fmt: skip


def profiled_events(fn: Callable[[], object], calls: int) -> tuple[Counter[str], Counter[str], Any]:
    """``(counts, self_us, prof)``: each event's count and own host us over ``calls`` calls of
    ``fn`` under the torch profiler (CPU and CUDA), after one untimed call."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    counts: Counter[str] = Counter()
    self_us: Counter[str] = Counter()
    for event in prof.key_averages():
        counts[event.key] += event.count
        self_us[event.key] += event.self_cpu_time_total
    return counts, self_us, prof


def call_counts(fn: Callable[[], object], calls: int = 10) -> str:
    """Driver calls and ATen ops per call of ``fn``, and the ops with the most host time of
    their own (torch profiler over ``calls`` calls)."""
    counts, self_us, _prof = profiled_events(fn, calls)
    driver = {name: counts[name] / calls for name in _DRIVER_CALLS if counts[name]}
    aten = {k: v / calls for k, v in counts.items() if k.startswith("aten::")}
    top = sorted(aten.items(), key=lambda kv: -kv[1])[:25]
    lines = [
        "driver calls per call: "
        + ", ".join(f"{k} {v:g}" for k, v in driver.items())
        + f" (total {sum(driver.values()):g})",
        f"ATen ops per call (nested ones included): {sum(aten.values()):g}; most frequent: "
        + ", ".join(f"{k[6:]} {v:g}" for k, v in top),
        "own host us per call under the profiler (all ops): "
        + ", ".join(f"{k} {v / calls:.0f}" for k, v in self_us.most_common(20)),
    ]
    return "\n".join(lines)


def compiled_cases() -> list[tuple[str, Callable[[], object]]]:
    """``moe_linear`` (V) and ``moe_mlp`` forward + backward of ``op_cases``' sizes (64 tokens),
    each compiled (``fullgraph=True``): the host time of their custom ops."""
    from cvmm_kernel import moe_linear, moe_mlp

    t = op_inputs(64)
    linear_args = [t[k] for k in ("x", "index", "gate", "w_v")]
    mlp_args = [t[k] for k in ("x", "ff_index", "ff_gate", "w_up", "w_down")]
    linear = torch.compile(lambda *a: moe_linear(*a, index_bound=HEADS * ATT_E), fullgraph=True)
    mlp = torch.compile(lambda *a: moe_mlp(*a, "relu", index_bound=FF_E), fullgraph=True)
    return [
        ("moe_linear forward + backward (V), compiled",
         lambda: linear(*linear_args).sum().backward()),
        ("moe_mlp forward + backward, compiled", lambda: mlp(*mlp_args).sum().backward()),
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="profile the cases containing this")
    parser.add_argument("--calls", type=int, default=100, help="calls under cProfile")
    parser.add_argument("--rows", type=int, default=40, help="functions per cProfile table")
    parser.add_argument("--compiled", action="store_true", help="the ops under torch.compile")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    torch.manual_seed(0)
    parts = [f"Host profile on {torch.cuda.get_device_name()}, torch {torch.__version__}"]
    cases = compiled_cases() if args.compiled else op_cases()
    for name, fn in cases:
        if args.case and not any(c.lower() in name.lower() for c in args.case):
            continue
        head = f"== {name}: host {host_us(fn):.0f} us per call"
        profiled = python_profile(fn, steps=args.calls, rows=args.rows)
        parts.append(f"{head}\n{call_counts(fn)}\ncProfile over {args.calls} calls:\n{profiled}")
        print(parts[-1].splitlines()[0], flush=True)
    text = "\n\n".join(parts)
    name = "host_profile_compiled.txt" if args.compiled else "host_profile.txt"
    write_text(name, text, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
