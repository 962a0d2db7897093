r"""A/B: MoEUT's layer norms and casts under autocast as plain ops or one kernel each way (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/ab_norm_cast.py [--switch SWITCH]

``moeut.norm_cast.FUSED`` off: each layer application runs ``LayerNorm`` in float32 and its
consumers cast the norm and the residual to bf16 themselves; on: ``norm_and_cast``'s kernel
writes both in bf16 (and its backward kernel the residual's gradient and partial weight
gradients). In one process, alternating: the host time of the tiny-width MoEUT-244M structure's
LM step (``host_overhead.step_parts``, six rounds), then the benchmark's training step eager and
from a CUDA graph beside the dense transformer (``bench_moeut.time_step``, twice each). Writes
``ab_norm_cast.json`` and ``.md`` to ``$OUT`` if set, else to ``benchmarks/results/``.
``--switch shared-projection`` compares ``switchhead.shared_projection.ENABLED`` off and on
instead (each application's fused input projection weight made and its gradient added by
autograd, or one weight per forward and one float32 gradient sum):
``ab_shared_projection.{json,md}``. (``ab_norm_shared_grads.md`` measured a removed switch that
summed the shared norms' weight gradients over the repeats in a kernel: slower on the GPU.)
``--switch pair-slots`` compares ``cvmm_kernel.pair_slots.ENABLED`` off and on (the attention's
value and output projections summing per-slot products, or products of each head's pair of
experts): ``ab_pair_slots_moeut.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_harness import environment_line, metadata, require_cuda, write_results
from bench_moeut import VOCAB, DenseLM, time_step
from cvmm_kernel import pair_slots
from host_overhead import TINY, step_parts
from moeut import MoEUTLM, norm_cast, profiles
from switchhead import shared_projection

ROUNDS = 6
# --switch: (the switch, names of its off and on states, results file stem)
SWITCHES = {
    "fused": (norm_cast.FUSED, {False: "plain norms and casts", True: "norm_and_cast"},
              "ab_norm_cast"),
    "shared-projection": (shared_projection.ENABLED, {False: "projection per application",
                          True: "projection shared"}, "ab_shared_projection"),
    "pair-slots": (pair_slots.ENABLED, {False: "per-slot products", True: "pairs of experts"},
                   "ab_pair_slots_moeut"),
}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switch", choices=list(SWITCHES), default="fused",
                        help="the switch turned off and on")  # fmt: skip
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    switch, NAMES, stem = SWITCHES[args.switch]
    shipped = switch[0]
    torch.manual_seed(0)
    tiny = MoEUTLM(VOCAB, **TINY).cuda().train()
    host = []
    for _ in range(ROUNDS):
        for fused in (False, True):
            switch[0] = fused
            fwd, bwd = step_parts(tiny)
            host.append({"variant": NAMES[fused], "forward_ms": fwd, "backward_ms": bwd})
    del tiny
    steps = []
    for mode in ("eager", "graph"):
        steps.append({"model": "dense-243M", "mode": mode, **time_step(DenseLM(), mode)})
        for _ in range(2):
            for fused in (False, True):
                switch[0] = fused
                torch.manual_seed(0)
                timing = time_step(MoEUTLM(VOCAB, **profiles.MoEUT_244M), mode)
                steps.append({"model": f"MoEUT_244M, {NAMES[fused]}", "mode": mode, **timing})
    switch[0] = shipped
    meta = metadata(setup="bf16 autocast; host: tiny widths, B=1, T=64; step: B=8, T=1024")
    lines = [
        f"{NAMES[False]} / {NAMES[True]} A/B, {environment_line(meta)} ({meta['setup']})",
        "",
        "Host time of the tiny-width MoEUT-244M structure's LM step (medians of 20 steps):",
        "",
        "| round | variant | forward host ms | backward host ms |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {i // 2 + 1} | {r['variant']} | {r['forward_ms']:.1f} | {r['backward_ms']:.1f} |"
        for i, r in enumerate(host)
    ]
    for fused in (False, True):
        mine = [r for r in host if r["variant"] == NAMES[fused]]
        lines.append(
            f"| min | {NAMES[fused]} | {min(r['forward_ms'] for r in mine):.1f} | "
            f"{min(r['backward_ms'] for r in mine):.1f} |"
        )
    lines += ["", "Training step (B=8, T=1024):", "", "| model | mode | ms | x dense | peak GiB |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in steps:
        dense = next(
            d["ms"] for d in steps if d["model"] == "dense-243M" and d["mode"] == r["mode"]
        )
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['ms']:.1f} | {r['ms'] / dense:.2f} | "
            f"{r['peak_gib']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    write_results(stem, {"meta": meta, "host": host, "steps": steps}, table,
                  script_file=__file__)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
