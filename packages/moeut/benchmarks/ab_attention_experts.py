r"""A/B: MoEUT-244M's attention experts on the sparse path (cvmm) or the dense-gated one (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/ab_attention_experts.py

The benchmark's training step (``bench_moeut.py``: LM forward+backward, bf16 autocast, B=8,
T=1024) eager and from a CUDA graph, with each SwitchHead layer's ``expert_impl`` set to
``"cvmm"`` (what ``"auto"`` picks for 4 heads x 10 experts, k=2) or ``"dense"``, alternating
twice, beside the dense transformer. Writes ``ab_attention_experts.json`` and ``.md`` to ``$OUT``
if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import sys

import torch
from bench_harness import environment_line, metadata, require_cuda, write_results
from bench_moeut import VOCAB, DenseLM, time_step
from moeut import MoEUTLM, profiles
from switchhead import SwitchHeadCore


def moeut_with(expert_impl: str) -> MoEUTLM:
    torch.manual_seed(0)
    model = MoEUTLM(VOCAB, **profiles.MoEUT_244M)
    for module in model.modules():
        if isinstance(module, SwitchHeadCore):
            module.expert_impl = expert_impl  # same parameters on both paths
    return model


def run_ab(
    variants: dict, title: str, stem: str, modes: tuple[str, ...] = ("eager", "graph")
) -> int:
    """Each step mode of ``modes`` (``bench_moeut.time_step``'s): the dense model, then every
    variant of ``variants`` (name -> model factory) twice, alternating; the table of times,
    ratios to the dense step of the same mode and peak memory, written as ``stem``.json/.md (the
    caller checks for CUDA)."""
    rows = []
    for mode in modes:
        rows.append({"model": "dense-243M", "mode": mode, **time_step(DenseLM(), mode)})
        for name, make in [*variants.items(), *variants.items()]:
            rows.append({"model": name, "mode": mode, **time_step(make(), mode)})
    meta = metadata(setup="LM forward+backward, bf16 autocast, B=8, T=1024, vocab 8000")
    lines = [
        f"{title}, {environment_line(meta)} ({meta['setup']})",
        "",
        "| model | mode | ms | x dense (same mode) | peak GiB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        dense = next(d["ms"] for d in rows if d["model"] == "dense-243M" and d["mode"] == r["mode"])
        r["ratio_to_dense"] = r["ms"] / dense
        lines.append(f"| {r['model']} | {r['mode']} | {r['ms']:.1f} | {r['ratio_to_dense']:.2f} |"
                     f" {r['peak_gib']:.1f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    write_results(stem, {"meta": meta, "rows": rows}, table, script_file=__file__)
    return 0


def main() -> int:
    if not require_cuda(__file__):
        return 2
    variants = {
        f"MoEUT_244M, {impl} attention experts": lambda impl=impl: moeut_with(impl)
        for impl in ("cvmm", "dense")
    }
    return run_ab(variants, "MoEUT-244M attention experts A/B", "ab_attention_experts")


if __name__ == "__main__":
    sys.exit(main())
