r"""A/B: host-time savings in MoEUT-244M's eager training step (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/ab_host_savings.py [--rounds 6]

The eager step is host-bound (``host_sampling.txt``: where the host's time goes). Variants, one
model, in alternating rounds (``ab_weight_descriptors.eager_rounds``), at full and at tiny widths
(d_model 128: the host's time alone):

- before: cvmm-kernel's backward puts the input gradient on a side stream in every call, and
  SigmaMoE pads and casts its selection weight at every call;
- the side stream only in CUDA-graph capture (``moe_ops.BACKWARD_SCHEDULE["eager_overlap"]``
  off, shipped);
- the padded selection weight kept per weight version (``sigma_moe.selection_logits``, shipped);
- both (shipped);
- both, and no token-range check in ``MoEUTLM`` (its read-back synchronises the host with the
  GPU at every step): what that check costs.

Writes ``ab_host_savings.json`` and ``.md`` to ``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys

from ab_weight_descriptors import eager_tables
from bench_harness import environment_line, metadata, require_cuda, write_results
from bench_moeut import BATCH, SEQ
from cvmm_kernel import moe_ops
from moeut import MoEUTLM, sigma_moe

SHIPPED_LOGITS = sigma_moe.selection_logits
SHIPPED_CHECK = MoEUTLM._check_tokens
SHIPPED_OVERLAP = moe_ops.BACKWARD_SCHEDULE["eager_overlap"]


def _set(eager_overlap: bool, kept_selection: bool, check_tokens: bool = True) -> None:
    moe_ops.BACKWARD_SCHEDULE["eager_overlap"] = eager_overlap
    sigma_moe.selection_logits = SHIPPED_LOGITS if kept_selection else sigma_moe._padded_linear
    MoEUTLM._check_tokens = SHIPPED_CHECK if check_tokens else (lambda self, x: None)


VARIANTS = {
    "before (side stream eagerly, selection weight padded per call)": lambda: _set(True, False),
    "side stream only in capture": lambda: _set(False, False),
    "selection weight kept padded": lambda: _set(True, True),
    "both (shipped)": lambda: _set(False, True),
    "both, no token-range check": lambda: _set(False, True, check_tokens=False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="eager rounds")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    try:
        eager_lines, times = eager_tables(args.rounds, VARIANTS)
    finally:
        _set(SHIPPED_OVERLAP, True)
    meta = metadata(setup=f"LM forward+backward, bf16 autocast, B={BATCH}, T={SEQ}, vocab 8000")
    head = f"MoEUT-244M eager step: host-time savings, {environment_line(meta)} ({meta['setup']})"
    table = "\n".join([head, *eager_lines])
    print(table)
    results = {"meta": meta, **times}
    write_results("ab_host_savings", results, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
