r"""A/B: MoEUT-244M compiled, its shared expert weights' per-use gradients in fp32 or bf16 (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/ab_compiled_weight_grads.py

Compiled, each of the 9 applications of a shared layer returns its expert-weight gradients and
the graph sums them in one fused kernel. The benchmark's training step (compiled and replayed
from a CUDA graph), with ``SigmaMoE.weight_grads_in_compute_dtype`` off (each use writes an
fp32 gradient) and on (bf16, as autocast's matmuls give; the sum casts and adds in fp32), each
compiled afresh, alternating twice, beside the dense transformer; peak memory included. Writes
``ab_compiled_weight_grads.json`` and ``.md`` to ``$OUT`` if set, else to
``benchmarks/results/``.
"""

from __future__ import annotations

import sys

import torch
from ab_attention_experts import run_ab
from bench_harness import require_cuda
from bench_moeut import VOCAB
from moeut import MoEUTLM, SigmaMoE, profiles


def moeut_with(compute_dtype_grads: bool) -> MoEUTLM:
    torch.manual_seed(0)
    model = MoEUTLM(VOCAB, **profiles.MoEUT_244M)
    for module in model.modules():
        if isinstance(module, SigmaMoE):
            module.weight_grads_in_compute_dtype = compute_dtype_grads
    return model


def main() -> int:
    if not require_cuda(__file__):
        return 2
    variants = {
        f"MoEUT_244M, per-use weight gradients in {'bf16' if b else 'fp32'}": (
            lambda b=b: moeut_with(b)
        )
        for b in (False, True)
    }
    return run_ab(
        variants,
        "MoEUT-244M compiled: shared weights' per-use gradients A/B",
        "ab_compiled_weight_grads",
        modes=("compiled-graph",),
    )


if __name__ == "__main__":
    sys.exit(main())
