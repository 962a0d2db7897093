r"""A/B: MoEUT-244M compiled, its MoE calls as triton_ops or as opaque custom ops (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/ab_compiled_traced_ops.py [--descriptors]

A compiled graph calls an opaque custom op through the dispatcher into its Python body, which
runs its shape logic and launch bookkeeping again at every call; a triton_op's body is traced
once and its kernels are launched from the graph's own wrapper (``cvmm_kernel.traced_ops``). The
benchmark's training step, plain ``torch.compile`` (no CUDA graph: the mode whose host time this
changes), with ``moe_mlp``'s and ``moe_linear``'s routing and products as triton_ops
(``TRACED_OPS`` on, the default) and as custom ops, each compiled afresh, alternating twice,
beside the dense transformer compiled alike; peak memory included. ``--descriptors``: the
traced kernels take tensor descriptors too (``moe_triton.TRACED_DESCRIPTORS``), as a third
variant. Writes ``ab_compiled_traced_ops.json`` and ``.md`` to ``$OUT`` if set, else to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from ab_attention_experts import run_ab
from bench_harness import require_cuda
from bench_moeut import VOCAB
from cvmm_kernel import moe_triton, traced_ops
from moeut import MoEUTLM, profiles


def moeut_with(traced: bool, descriptors: bool = False) -> MoEUTLM:
    """The model, with the switches its compilation (at its first step) reads."""
    traced_ops.TRACED_OPS[0] = traced
    moe_triton.TRACED_DESCRIPTORS[0] = descriptors
    torch.manual_seed(0)
    return MoEUTLM(VOCAB, **profiles.MoEUT_244M)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--descriptors", action="store_true")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    variants = {
        "MoEUT_244M, MoE calls as triton_ops": lambda: moeut_with(True),
        "MoEUT_244M, MoE calls as custom ops": lambda: moeut_with(False),
    }
    if args.descriptors:
        variants["MoEUT_244M, triton_ops with descriptors"] = lambda: moeut_with(True, True)
    return run_ab(
        variants,
        "MoEUT-244M plain compiled: MoE calls as triton_ops or custom ops A/B",
        "ab_compiled_traced_ops",
        modes=("compiled",),
    )


if __name__ == "__main__":
    sys.exit(main())
