r"""A/B: MoEUT-244M compiled, its MoE calls as triton_ops or as opaque custom ops (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/ab_compiled_traced_ops.py [--cuda-graph]

A compiled graph calls an opaque custom op through the dispatcher into its Python body, which
runs its shape logic and launch bookkeeping again at every call; a triton_op's body is traced
once and its kernels are launched from the graph's own wrapper (``cvmm_kernel.traced_ops``). The
benchmark's training step, plain ``torch.compile`` (no CUDA graph: the mode whose host time this
changes), with ``moe_mlp``'s and ``moe_linear``'s routing and products as triton_ops
(``TRACED_OPS`` on, the default) and as custom ops, each compiled afresh, alternating twice,
beside the dense transformer compiled alike; peak memory included. Writes
``ab_compiled_traced_ops.json`` and ``.md`` to ``$OUT`` if set, else to
``benchmarks/results/``. ``--cuda-graph``: the compiled steps replayed from a CUDA graph
instead (the GPU-bound step; the custom ops' bodies, run at capture, take tensor descriptors
where the traced kernels take pointers), written as ``ab_compiled_graph_traced_ops``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from ab_attention_experts import run_ab
from bench_harness import require_cuda
from bench_moeut import VOCAB
from cvmm_kernel import traced_ops
from moeut import MoEUTLM, profiles


def moeut_with(traced: bool) -> MoEUTLM:
    """The model, with the switch its compilation (at its first step) reads."""
    traced_ops.TRACED_OPS[0] = traced
    torch.manual_seed(0)
    return MoEUTLM(VOCAB, **profiles.MoEUT_244M)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-graph", action="store_true")
    graph = parser.parse_args().cuda_graph
    if not require_cuda(__file__):
        return 2
    variants = {
        "MoEUT_244M, MoE calls as triton_ops": lambda: moeut_with(True),
        "MoEUT_244M, MoE calls as custom ops": lambda: moeut_with(False),
    }
    return run_ab(
        variants,
        f"MoEUT-244M {'compiled, CUDA graph' if graph else 'plain compiled'}: MoE calls as "
        "triton_ops or custom ops A/B",
        f"ab_compiled{'_graph' if graph else ''}_traced_ops",
        modes=("compiled-graph" if graph else "compiled",),
    )


if __name__ == "__main__":
    sys.exit(main())
