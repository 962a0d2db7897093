r"""A/B: MoEUT-244M's shared expert-weight gradients summed per use or in one GEMM (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/ab_deferred_weight_grads.py

The benchmark's training step eager and from a CUDA graph with ``MoEUT.deferred_weight_grads``
off (each use adds its gradient in the weight-gradient kernel) and on (one GEMM per shared weight
over all its uses, ``cvmm_kernel.accumulate_weight_grads(..., deferred=True)``), alternating
twice, beside the dense transformer; peak memory included. Writes
``ab_deferred_weight_grads.json`` and ``.md`` to ``$OUT`` if set, else to
``benchmarks/results/``.
"""

from __future__ import annotations

import sys

import torch
from ab_attention_experts import run_ab
from bench_harness import require_cuda
from bench_moeut import VOCAB
from moeut import MoEUTLM, profiles


def moeut_with(deferred: bool) -> MoEUTLM:
    torch.manual_seed(0)
    model = MoEUTLM(VOCAB, **profiles.MoEUT_244M)
    model.transformer.deferred_weight_grads = deferred
    return model


def main() -> int:
    if not require_cuda(__file__):
        return 2
    variants = {
        f"MoEUT_244M, weight gradients {'deferred' if d else 'per use'}": (
            lambda d=d: moeut_with(d)
        )
        for d in (False, True)
    }
    return run_ab(variants, "MoEUT-244M shared weight gradients A/B", "ab_deferred_weight_grads")


if __name__ == "__main__":
    sys.exit(main())
