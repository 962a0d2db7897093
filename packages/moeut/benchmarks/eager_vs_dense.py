r"""MoEUT-244M's eager training step against the dense model's, in alternating rounds (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/eager_vs_dense.py [--rounds 8]

Both eager steps are partly host-bound, and the shared machine's host speed moves by tens of
percent within minutes, so one measurement of each (``bench_moeut.py``) can land in different
host weather. Here both models live in one process and each round times the dense step, then
MoEUT-244M's (the median of 15 steps after 3 untimed, ``ab_weight_descriptors.timed_steps``):
the per-round ratios share the host's state. Issue #14's eager target is MoEUT-244M <= 2.0x the
dense step. Writes ``eager_vs_dense.json`` and ``.md`` to ``$OUT`` if set, else to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from ab_weight_descriptors import lm_step, round_rows, timed_steps
from bench_harness import environment_line, metadata, require_cuda, write_results
from bench_moeut import BATCH, SEQ, VOCAB, DenseLM
from moeut import MoEUTLM, profiles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
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
    table = "\n".join(lines)
    print(table)
    results = {"meta": meta, "wall_ms": wall, "cpu_ms": cpu, "ratios": ratios}
    write_results("eager_vs_dense", results, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
