r"""Host time of the building blocks of an eager MoE op call (CUDA), GPU idle.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/host_breakdown.py

What one call of each costs the host, on tiny tensors (so the host's time is what is measured):
ATen basics (an allocation, a view, a one-kernel op), an empty ``autograd.Function``, single
Triton launches through ``cvmm_kernel.launcher.launch`` (top-k, switchhead's RoPE, a k-sum), the
routing, the row-tile GEMM and whole ``moe_linear`` / ``moe_mlp`` calls; the Triton rows also with
one of three things turned off (``VARIANTS``): the kept encodings of the tensor descriptors, TMA
loads of the expert matrices (then through pointers), the direct launcher. Writes
``host_breakdown.{json,md}`` to ``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import sys

import torch
from bench_harness import (
    environment_line,
    host_us,
    metadata,
    require_cuda,
    table_header,
    write_results,
)
from cvmm_kernel import launcher, moe_linear, moe_mlp, moe_triton, topk_indices
from cvmm_kernel.moe_ops import Routing, moe_routing
from switchhead.rope import RotaryEmbedding

# (column, switch turned off for it): the launch path and TMA choices compared per row
VARIANTS = (
    ("descriptors encoded at each launch", launcher.KEEP_DESCRIPTORS),
    ("expert matrices through pointers", moe_triton.TENSOR_DESCRIPTORS),
    ("every launch through kernel[grid]", launcher._FAST_LAUNCH),
)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def rows() -> list[dict]:
    dev, bf16 = "cuda", torch.bfloat16
    t = torch.randn(1024, device=dev)
    tokens, heads, e, k, d, dh = 64, 4, 40, 2, 128, 32
    x = torch.randn(tokens, d, device=dev, dtype=bf16, requires_grad=True)
    index = topk_indices(torch.randn(tokens, heads, 10, device=dev), k)
    index = index + torch.arange(heads, device=dev)[:, None] * 10
    gate = torch.rand(tokens, heads, k, device=dev, dtype=bf16, requires_grad=True)
    w = torch.randn(e, d, dh, device=dev, dtype=bf16, requires_grad=True)
    flat = index.flatten()
    routing = Routing(*moe_routing(flat, e, 128, "triton"), 128)
    y = torch.randn(flat.numel(), dh, device=dev, dtype=bf16)
    flat_gate = gate.detach().flatten()
    ff_index = topk_indices(torch.randn(tokens, 387, device=dev), 16)
    ff_gate = torch.rand(tokens, 16, device=dev, dtype=bf16, requires_grad=True)
    w_up = torch.randn(387, d, 16, device=dev, dtype=bf16, requires_grad=True)
    w_down = torch.randn(387, 16, d, device=dev, dtype=bf16, requires_grad=True)
    requires = torch.randn(16, device=dev, requires_grad=True)
    scores = torch.randn(tokens, 387, device=dev)
    rope = RotaryEmbedding(16, 10000, 32).to(dev)
    q = torch.randn(1, tokens, 4, 32, device=dev, dtype=bf16)

    def gemm_rows():
        out = x.new_empty(flat.numel(), dh)
        moe_triton.moe_gemm_rows(
            x.detach(), w.detach(), out, routing, heads * k, a_gather=True,
            out_mode=moe_triton.OUT_SLOT, config=(128, 8, 4),
        )  # fmt: skip

    def linear_fwd():
        return moe_linear(x, index, gate, w, index_bound=e)

    def linear_step():
        linear_fwd().sum().backward()

    def mlp_fwd():
        return moe_mlp(x, ff_index, ff_gate, w_up, w_down, "relu", index_bound=387)

    def mlp_step():
        mlp_fwd().sum().backward()

    def identity_step():
        _Identity.apply(requires).sum().backward()

    basics = [
        ("torch.empty", lambda: torch.empty(1024, device=dev)),
        ("view", lambda: t.view(-1)),
        ("add_ (one kernel)", lambda: t.add_(1.0)),
        ("sum (one kernel)", lambda: t.sum()),
        ("empty autograd.Function, forward", lambda: _Identity.apply(requires)),
        ("empty autograd.Function + sum, forward + backward", identity_step),
    ]
    triton_calls = [  # also timed with each of VARIANTS' switches off
        ("topk_indices (one launch)", lambda: topk_indices(scores, 16)),
        ("RoPE forward (switchhead, one launch)", lambda: rope(q, 0, seq_dim=1)),
        ("gated_group_sum (one launch)", lambda: moe_triton.gated_group_sum(y, flat_gate, k)),
        ("build_routing (routing of moe_linear)", lambda: moe_routing(flat, e, 128, "triton")),
        ("moe_gemm_rows", gemm_rows),
        ("moe_linear forward", linear_fwd),
        ("moe_linear forward + backward", linear_step),
        ("moe_mlp forward", mlp_fwd),
        ("moe_mlp forward + backward", mlp_step),
    ]
    out = [{"what": name, "host_us": host_us(fn)} for name, fn in basics]
    for name, fn in triton_calls:
        entry = {"what": name, "host_us": host_us(fn)}
        for column, switch in VARIANTS:
            switch[0] = False
            try:
                entry[column] = host_us(fn)
            finally:
                switch[0] = True
        out.append(entry)
    return out


def main() -> int:
    if not require_cuda(__file__):
        return 2
    torch.manual_seed(0)
    table_rows = rows()
    meta = metadata(setup="tiny tensors, GPU idle; host us per call")
    lines = [
        f"Host time per call, {environment_line(meta)} ({meta['setup']})",
        "",
        *table_header("what", "host us", *(column for column, _ in VARIANTS)),
    ]
    for r in table_rows:
        cells = [f"{r[c]:.1f}" if c in r else "" for c, _ in VARIANTS]
        lines.append(f"| {r['what']} | {r['host_us']:.1f} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    print(table)
    write_results("host_breakdown", {"meta": meta, "rows": table_rows}, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
