r"""Which pieces of an eager MoEUT step take its host time (CUDA): inclusive wall time per piece.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/host_shares.py [--steps 20] [--full]

The eager MoEUT-244M step is host-bound (``eager_vs_dense.md``), and ``step_counts.md`` counts
what it issues but not where the time goes. Here every ``torch.autograd.Function`` of the
workspace's packages (its ``forward`` and its ``backward``, which autograd's thread runs) and the
Python entry points the model calls (``moe_linear``, ``moe_mlp``, ``sigmoid_topk``,
``norm_and_cast``, ``entropy_reg``) are wrapped with a clock, and the LM training step of
``host_overhead.py``'s MoEUT-244M structure at tiny widths (B=1, T=64: the GPU waits on the host,
so the step's wall time is host time) is timed with and without the wrappers. Times are
inclusive: an entry point contains the Functions it applies (``moe_linear`` contains
``MoELinearFunction.forward``); the table says which rows nest. ``--full``: MoEUT-244M at its
real widths (B=8, T=1024) instead, where the host's time overlaps the GPU's. Writes
``host_shares.json`` and ``.md`` to ``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from ab_weight_descriptors import lm_step
from bench_harness import environment_line, metadata, require_cuda, table_header, write_results
from host_overhead import BATCH, SEQ, TINY, VOCAB
from moeut import MoEUTLM, profiles

_PACKAGES = ("cvmm_kernel", "switchhead", "moeut")
# (module, name): the Python entry points the MoEUT model calls, timed where the model looks
# them up.
_ENTRY_POINTS = (
    ("switchhead.experts", "moe_linear"),
    ("switchhead.experts", "sigmoid_topk"),
    ("moeut.sigma_moe", "moe_mlp"),
    ("moeut.sigma_moe", "sigmoid_topk"),
    ("moeut.model", "norm_and_cast"),
    ("moeut.model", "entropy_reg"),
)


class Clock:
    """Inclusive wall milliseconds and calls per wrapped piece while ``on``."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.on = False

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms[name] += (time.perf_counter() - start) * 1e3
                self.calls[name] += 1

        return timed


def _functions() -> Iterator[tuple[str, type]]:
    """``(qualified name, class)`` of each autograd Function defined in the packages."""
    seen: set[type] = set()
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.split(".")[0] not in _PACKAGES:
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, torch.autograd.Function)
                and cls.__module__ == module_name
                and cls not in seen
            ):
                seen.add(cls)
                yield f"{module_name.split('.')[-1]}.{cls.__name__}", cls


def install(clock: Clock) -> list[tuple[Any, str, Any]]:
    """Wrap the Functions' ``forward``/``backward`` and the entry points; returns what to
    restore (``(owner, attribute, original)``)."""
    restore: list[tuple[Any, str, Any]] = []
    for name, cls in _functions():
        for method in ("forward", "backward"):
            original = cls.__dict__.get(method)
            if not isinstance(original, staticmethod):
                continue
            restore.append((cls, method, original))
            setattr(cls, method, staticmethod(clock.wrap(f"{name}.{method}", original.__func__)))
    for module_name, attribute in _ENTRY_POINTS:
        module = sys.modules[module_name]
        original = getattr(module, attribute)
        restore.append((module, attribute, original))
        setattr(module, attribute, clock.wrap(f"{attribute} (from {module_name})", original))
    return restore


def uninstall(restore: list[tuple[Any, str, Any]]) -> None:
    for owner, attribute, original in reversed(restore):
        setattr(owner, attribute, original)


def step_ms(step: Callable[[], None], steps: int, warmup: int = 3) -> float:
    """Median wall ms of ``step`` (synced), ``steps`` steps after ``warmup`` untimed."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def shares(step: Callable[[], None], steps: int) -> dict[str, Any]:
    """The step's median ms without and with the clocks, and each piece's ms and calls per step
    (with the clocks)."""
    plain = step_ms(step, steps)
    clock = Clock()
    restore = install(clock)
    try:
        step_ms(step, 2)  # the wrapped pieces warmed up, not counted
        clock.on = True
        timed = step_ms(step, steps, warmup=0)
        clock.on = False
    finally:
        uninstall(restore)
    pieces = {
        name: {"ms": clock.ms[name] / steps, "calls": clock.calls[name] / steps}
        for name in sorted(clock.ms, key=lambda n: -clock.ms[n])
    }
    return {"step_ms": plain, "step_ms_clocked": timed, "pieces": pieces}


# Rows whose time another row contains (the entry point that applies the Function).
_NESTED = {
    "linear_ops.MoELinearFunction.forward": "moe_linear",
    "moe_ops.MoEMLPFunction.forward": "moe_mlp",
    "router._SigmoidTopK.forward": "sigmoid_topk",
    "regularization._FusedEntropy.forward": "entropy_reg",
    "norm_cast._NormCast.forward": "norm_and_cast",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--full", action="store_true", help="MoEUT-244M at its real widths")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    torch.manual_seed(0)
    if args.full:
        model, batch, seq, label = MoEUTLM(VOCAB, **profiles.MoEUT_244M), 8, 1024, "MoEUT-244M"
    else:
        model, batch, seq, label = MoEUTLM(VOCAB, **TINY), BATCH, SEQ, "MoEUT-244M structure"
    result = shares(lm_step(model.cuda().train(), batch=batch, seq=seq), args.steps)
    setup = f"{label}, LM forward+backward, bf16 autocast, B={batch}, T={seq}"
    meta = metadata(setup=setup)
    step = result["step_ms_clocked"]
    lines = [
        f"Host time by piece, eager step, {environment_line(meta)} ({setup}; median of "
        f"{args.steps} steps)",
        "",
        f"Step: {result['step_ms']:.2f} ms without the clocks, {step:.2f} ms with them (the "
        "shares below are of the second).",
        "",
        *table_header("piece (inclusive)", "calls per step", "ms per step", "share of step"),
    ]
    for name, piece in result["pieces"].items():
        inside = next((outer for key, outer in _NESTED.items() if name == key), None)
        shown = f"{name} (inside {inside})" if inside else name
        lines.append(
            f"| {shown} | {piece['calls']:g} | {piece['ms']:.2f} | {piece['ms'] / step:.1%} |"
        )
    table = "\n".join(lines)
    print(table)
    write_results("host_shares" + ("_full" if args.full else ""), {"meta": meta, **result}, table,
                  script_file=__file__)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
