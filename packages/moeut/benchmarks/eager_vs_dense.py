r"""MoEUT-244M's eager training step against the dense model's, in alternating rounds (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/eager_vs_dense.py [--rounds 8] [--gc]

Both eager steps are partly host-bound, and the shared machine's host speed moves by tens of
percent within minutes, so one measurement of each (``bench_moeut.py``) can land in different
host weather. Here both models live in one process and each round times the dense step, then
MoEUT-244M's (the median of 15 steps after 3 untimed, ``ab_weight_descriptors.timed_steps``):
the per-round ratios share the host's state. Issue #14's eager target is MoEUT-244M <= 2.0x the
dense step. ``--gc``: also the time Python's cyclic garbage collector takes per step of each
model (``gc.callbacks``, every thread), and each model's steps with the collector off while
they run (``gc.disable()``; a collection between rounds). Writes ``eager_vs_dense.json`` and
``.md`` to ``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable

import torch
from ab_weight_descriptors import lm_step, round_rows, timed_steps
from bench_harness import environment_line, metadata, require_cuda, write_results
from bench_moeut import BATCH, SEQ, VOCAB, DenseLM
from moeut import MoEUTLM, profiles


class GcClock:
    """Milliseconds Python's cyclic garbage collector ran (``gc.callbacks``: collections in
    any thread, autograd's backward thread included) and collections per generation, while
    installed."""

    def __init__(self) -> None:
        self.ms = 0.0
        self.runs = [0, 0, 0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._start) * 1e3
            self.runs[info["generation"]] += 1

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def collector_rounds(step: Callable[[], None], steps: int = 15) -> dict[str, float]:
    """One round of ``step`` with the collector on (wall ms, GC ms per step and collections of
    each generation per step, over ``steps`` timed steps after 3 untimed) and with it off
    (wall ms)."""
    with GcClock() as clock:
        wall_on, _cpu = timed_steps(step, steps)
    per_step = steps + 3  # the untimed steps collect too
    gc.collect()
    gc.disable()
    try:
        wall_off, _cpu = timed_steps(step, steps)
    finally:
        gc.enable()
    gc.collect()
    return {"wall_gc_on": wall_on, "wall_gc_off": wall_off, "gc_ms": clock.ms / per_step,
            **{f"gen{g}_runs": n / per_step for g, n in enumerate(clock.runs)}}  # fmt: skip


def gc_table(steps: dict[str, Callable[[], None]], rounds: int) -> tuple[list[str], dict]:
    """Markdown lines and results of :func:`collector_rounds` for each model in each round."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            results[name].append(collector_rounds(step))
    lines = ["", f"Python's garbage collector ({rounds} rounds; medians over the rounds):", "",
             "| model | wall ms, GC on | wall ms, GC off | GC ms per step | collections per "
             "step (gen 0 / 1 / 2) |", "|---|---|---|---|---|"]  # fmt: skip
    for name, runs in results.items():
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        gens = " / ".join(f"{med[f'gen{g}_runs']:.1f}" for g in range(3))
        lines.append(f"| {name} | {med['wall_gc_on']:.1f} | {med['wall_gc_off']:.1f} | "
                     f"{med['gc_ms']:.2f} | {gens} |")  # fmt: skip
    off = [m["wall_gc_off"] / d["wall_gc_off"]
           for m, d in zip(results["MoEUT_244M"], results["dense-243M"])]  # fmt: skip
    lines += ["", f"With the collector off, MoEUT-244M / dense per round: median "
              f"{statistics.median(off):.2f}x, best {min(off):.2f}x."]  # fmt: skip
    return lines, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--gc", action="store_true", help="also the garbage collector's share")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    torch.manual_seed(0)
    steps = {
        "dense-243M": lm_step(DenseLM().cuda().train()),
        "MoEUT_244M": lm_step(MoEUTLM(VOCAB, **profiles.MoEUT_244M).cuda().train()),
    }
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            ms, cpu_ms = timed_steps(step)
            wall[name].append(ms)
            cpu[name].append(cpu_ms)
    ratios = [m / d for m, d in zip(wall["MoEUT_244M"], wall["dense-243M"])]
    meta = metadata(setup=f"LM forward+backward, bf16 autocast, B={BATCH}, T={SEQ}, vocab 8000")
    rounds = f"{args.rounds} rounds, dense then MoEUT in each; ms per step, median of 15"
    lines = [
        f"Eager training steps, MoEUT-244M against dense, {environment_line(meta)} "
        f"({meta['setup']})",
        *round_rows(f"Wall time ({rounds}):", wall),
        *round_rows(f"Main thread CPU time until a step returns ({rounds}):", cpu),
        "",
        f"MoEUT-244M / dense, per round: median {statistics.median(ratios):.2f}x, "
        f"best {min(ratios):.2f}x, worst {max(ratios):.2f}x (target <= 2.0x).",
    ]
    results = {"meta": meta, "wall_ms": wall, "cpu_ms": cpu, "ratios": ratios}
    if args.gc:
        gc_lines, results["gc"] = gc_table(steps, args.rounds)
        lines += gc_lines
    table = "\n".join(lines)
    print(table)
    write_results("eager_vs_dense", results, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
