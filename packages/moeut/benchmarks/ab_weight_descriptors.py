r"""A/B: cvmm-kernel's expert matrices loaded through tensor descriptors (TMA) or through
pointers, in MoEUT-244M's training step, eager and from a CUDA graph (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/ab_weight_descriptors.py [--rounds 8]

The descriptors make the kernels 0.5-3% faster (cvmm-kernel's ``ab_tensor_descriptors.md``) but
cost host time at every call (a descriptor object per weight operand and per weight-gradient
destination, and its encoding, made afresh for each step's new gradient buffers), and the eager
step is host-bound. Variants: descriptors in every call (shipped), descriptors only in
CUDA-graph capture (``moe_triton.EAGER_DESCRIPTORS`` off), pointers everywhere
(``TENSOR_DESCRIPTORS`` off). The benchmark's step (``bench_moeut``: LM forward +
backward, bf16 autocast, B=8, T=1024), one model for all variants:

- eager, at full and at tiny widths (d_model 128: the host's time alone): ``--rounds`` rounds,
  each timing every variant in turn (the median of 15 steps after 3 untimed ones), wall time
  and the main thread's CPU time until the step returns (autograd runs the CUDA backward on a
  thread of its own, which this leaves out); the shared machine's host speed drifts by tens of
  percent within minutes (descriptors in capture only and pointers everywhere are the same
  code in eager calls), so the tables give each variant's median and best round, and the
  per-round ratios;
- from a CUDA graph (GPU-bound): each variant once (``bench_moeut.time_step``), the dense step
  beside.

Writes ``ab_weight_descriptors.json`` and ``.md`` to ``$OUT`` if set, else to
``benchmarks/results/``. (A first version of this script timed descriptors in every call
against pointers everywhere with one model per row and two rounds, eager wall time only:
``ab_weight_descriptors_before.md``, whose 19% in favour of pointers the rounds of this version
do not repeat.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from bench_harness import environment_line, metadata, require_cuda, write_results
from bench_moeut import BATCH, SEQ, VOCAB, DenseLM, time_step
from cvmm_kernel import moe_triton
from host_overhead import TINY
from moeut import MoEUTLM, profiles

SHIPPED = (moe_triton.TENSOR_DESCRIPTORS[0], moe_triton.EAGER_DESCRIPTORS[0])
VARIANTS = {  # name -> (TENSOR_DESCRIPTORS, EAGER_DESCRIPTORS)
    "descriptors in every call (shipped)": SHIPPED,
    "descriptors in capture only": (SHIPPED[0], False),
    "pointers": (False, False),
}


def _set(switches: tuple[bool, bool]) -> None:
    moe_triton.TENSOR_DESCRIPTORS[0], moe_triton.EAGER_DESCRIPTORS[0] = switches


SET_UPS = {name: (lambda switches=switches: _set(switches)) for name, switches in VARIANTS.items()}


def lm_step(
    model: torch.nn.Module,
    batch: int = BATCH,
    seq: int = SEQ,
    before_backward: Callable[[torch.Tensor], object] | None = None,
) -> Callable[[], None]:
    """One eager LM training step of ``model`` (MoEUTLM or the dense LM): forward + backward,
    bf16 autocast, ``[batch, seq]`` tokens (default B=8, T=1024), the gradients dropped after
    it; ``before_backward(loss)`` is called between the two."""
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens[:, :-1])
            logits, reg = (out, 0.0) if torch.is_tensor(out) else (out.outputs, out.reg_loss)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()) + reg
        if before_backward is not None:
            before_backward(loss)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def timed_steps(step: Callable[[], None], steps: int = 15) -> tuple[float, float]:
    """``(wall, cpu)`` ms of ``step``, medians of ``steps`` after 3 untimed: the wall time
    synced, and the main thread's CPU time until the step returns (``time.thread_time``, before
    the sync; autograd's CUDA backward thread not counted)."""
    for _ in range(3):
        step()
    walls, cpus = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.thread_time()
        step()
        cpus.append((time.thread_time() - start_cpu) * 1e3)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) * 1e3)
    return statistics.median(walls), statistics.median(cpus)


def eager_rounds(
    rounds: int, config: dict, variants: Mapping[str, Callable[[], None]]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``(wall, cpu)``: ms per eager step (:func:`lm_step`, :func:`timed_steps`) of each variant
    in each round, one model of ``config``, each variant set up by its callable before its
    steps."""
    torch.manual_seed(0)
    step = lm_step(MoEUTLM(VOCAB, **config).cuda().train())
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, set_up in variants.items():
            set_up()
            ms, cpu_ms = timed_steps(step)
            wall[name].append(ms)
            cpu[name].append(cpu_ms)
    return wall, cpu


def round_rows(title: str, times: Mapping[str, list[float]]) -> list[str]:
    """Markdown lines: each variant's median and best round and its per-round ratios to the
    first variant's."""
    base = next(iter(times.values()))
    lines = ["", title, "", "| variant | median ms | best round ms | per round, vs the first |",
             "|---|---|---|---|"]  # fmt: skip
    for name, ms in times.items():
        ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(ms, base))
        lines.append(f"| {name} | {statistics.median(ms):.1f} | {min(ms):.1f} | {ratios} |")
    return lines


def eager_tables(rounds: int, variants: Mapping[str, Callable[[], None]]) -> tuple[list, dict]:
    """The variants' :func:`eager_rounds` at MoEUT-244M's widths and at tiny widths
    (``host_overhead.TINY``): markdown tables of the wall and main-thread CPU times, and those
    times (``eager_wall_ms``, ``eager_cpu_ms``, ``tiny_wall_ms``, ``tiny_cpu_ms``)."""
    wall, cpu = eager_rounds(rounds, profiles.MoEUT_244M, variants)
    tiny_wall, tiny_cpu = eager_rounds(rounds, TINY, variants)
    what = f"{rounds} rounds, the variants in turn in each; ms per step, median of 15"
    lines = [
        *round_rows(f"Eager, wall time ({what}):", wall),
        *round_rows(f"Eager, the main thread's CPU time until a step returns ({what}):", cpu),
        *round_rows(f"Eager at tiny widths (d_model 128: the host's time alone), wall ({what}):",
                    tiny_wall),
        *round_rows(f"Eager at tiny widths, main thread CPU time ({what}):", tiny_cpu),
    ]  # fmt: skip
    times = {"eager_wall_ms": wall, "eager_cpu_ms": cpu, "tiny_wall_ms": tiny_wall,
             "tiny_cpu_ms": tiny_cpu}  # fmt: skip
    return lines, times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="eager rounds")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    try:
        eager_lines, times = eager_tables(args.rounds, SET_UPS)
        graph = {"dense-243M": time_step(DenseLM(), "graph")}
        for name, switches in VARIANTS.items():
            _set(switches)
            torch.manual_seed(0)
            graph[name] = time_step(MoEUTLM(VOCAB, **profiles.MoEUT_244M), "graph")
    finally:
        _set(SHIPPED)
    meta = metadata(setup=f"LM forward+backward, bf16 autocast, B={BATCH}, T={SEQ}, vocab 8000")
    lines = [
        f"MoEUT-244M: expert matrices by TMA descriptors or pointers, {environment_line(meta)} "
        f"({meta['setup']})",
        *eager_lines,
        "", "From a CUDA graph:", "", "| variant | ms | x dense | peak GiB |", "|---|---|---|---|",
    ]  # fmt: skip
    dense = graph["dense-243M"]["ms"]
    for name, r in graph.items():
        lines.append(f"| {name} | {r['ms']:.1f} | {r['ms'] / dense:.2f} | {r['peak_gib']:.1f} |")
    table = "\n".join(lines)
    print(table)
    results = {"meta": meta, **times, "graph": graph}
    write_results("ab_weight_descriptors", results,
                  table, script_file=__file__)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
