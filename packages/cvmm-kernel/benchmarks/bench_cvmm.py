r"""Benchmark cvmm forward+backward (bf16) against dense and grouped-matmul baselines.

Run on a CUDA machine from the repository root:

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/bench_cvmm.py [--quick]

Every row times, in the same process: our cvmm (Triton), the fused op of the shape (``moe_mlp``
for the feedforward shapes, ``moe_linear`` for SwitchHead's V and O) in its deterministic and
atomic modes, dense matmuls of equal FLOPs, ``torch._grouped_mm`` after a sort and gather (where
this torch has it), and a padded ``bmm``. Each forward + backward is captured in a CUDA graph and
its replays are timed (the eager calls are host-bound on a shared machine), except the padded
``bmm``, whose batch size is read back on the host (timed eagerly).
Writes JSON and a markdown table to ``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from bench_harness import (
    environment_line,
    median_ms,
    metadata,
    peak_mib,
    require_cuda,
    table_header,
    write_results,
)
from cvmm_kernel import cvmm, cvmm_prepare_sel2, moe_linear, moe_mlp

UPSTREAM_MS = {"moeut-244m-ffn": 6.68, "ffn-128x128-k4": 4.42}  # PERF.md, same H100 kind


@dataclass
class Shape:
    name: str
    tokens: int
    d_model: int
    n_experts: int
    expert_size: int
    k: int
    # "ffn": up + relu + weighted down; "v": reduced projection per head; "o": per-head rows
    kind: str
    heads: int = 1


SHAPES = [
    Shape("moeut-244m-ffn", 8192, 1024, 387, 128, 16, "ffn"),
    Shape("ffn-128x128-k4", 8192, 1024, 128, 128, 4, "ffn"),
    Shape("switchhead-v-4x4", 8192, 1024, 4, 128, 2, "v", heads=4),
    Shape("switchhead-o-4x4", 8192, 1024, 4, 128, 2, "o", heads=4),
    Shape("switchhead-v-4x8", 8192, 1024, 8, 128, 2, "v", heads=4),
    Shape("switchhead-o-4x8", 8192, 1024, 8, 128, 2, "o", heads=4),
    Shape("large-64x4096-k2", 8192, 1024, 64, 4096, 2, "ffn"),
]


def switchhead_shapes(experts: tuple[int, ...], kinds: tuple[str, ...]) -> list[Shape]:
    """SwitchHead's V/O shapes as in ``SHAPES`` (8192 tokens, d_model 1024, 4 heads of 128, 2
    experts chosen per head) for each count of ``experts`` per head, each kind of ``kinds``
    (``"v"``, ``"o"``) in turn."""
    return [Shape(f"switchhead-{kind}-4x{e}", 8192, 1024, e, 128, 2, kind, heads=4)
            for e in experts for kind in kinds]  # fmt: skip


def flops(s: Shape) -> float:
    """Multiply-add FLOPs of forward + backward (3 matmuls of the forward's size)."""
    per_matmul = 2 * s.tokens * s.k * s.heads * s.d_model * s.expert_size
    return 3 * per_matmul * (2 if s.kind == "ffn" else 1)


def make_inputs(s: Shape, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16
    n_mat = s.n_experts * s.heads
    x = torch.randn(s.tokens, s.d_model, device=device, dtype=dt, generator=g)
    if s.kind == "ffn":
        scores = torch.randn(s.tokens, s.n_experts, device=device, generator=g)
        gate, index = scores.sigmoid().topk(s.k, dim=-1)
        up = torch.randn(n_mat, s.d_model, s.expert_size, device=device, dtype=dt, generator=g) / 32
        down = (
            torch.randn(n_mat, s.expert_size, s.d_model, device=device, dtype=dt, generator=g) / 11
        )
        return dict(x=x, index=index, gate=gate.to(dt), up=up, down=down)
    scores = torch.randn(s.tokens, s.heads, s.n_experts, device=device, generator=g)
    gate, index = scores.sigmoid().topk(s.k, dim=-1)
    index = index + torch.arange(s.heads, device=device).view(1, -1, 1) * s.n_experts
    if s.kind == "v":
        w = torch.randn(n_mat, s.d_model, s.expert_size, device=device, dtype=dt, generator=g) / 32
        return dict(x=x, index=index, gate=gate.to(dt), w=w)
    rows = torch.randn(s.tokens, s.heads, s.expert_size, device=device, dtype=dt, generator=g)
    w = torch.randn(n_mat, s.expert_size, s.d_model, device=device, dtype=dt, generator=g) / 11
    return dict(x=rows, index=index, gate=gate.to(dt), w=w)


def ours(s: Shape, t: dict, backend: str | None = None, config: tuple[int, ...] | None = None):
    """The shape's layer on ``cvmm`` (``config``: its launch settings, default per size)."""
    bound = s.n_experts * s.heads  # top-k indices: in range without a read-back
    if s.kind == "ffn":
        sel = cvmm_prepare_sel2(t["index"], index_bound=bound)
        h = torch.relu(cvmm(t["x"], sel, t["up"], backend=backend, config=config))
        sel = cvmm_prepare_sel2(t["index"], t["gate"], index_bound=bound)
        return cvmm(h, sel.with_input_rows_per_group(1), t["down"], backend=backend,
                    config=config)  # fmt: skip
    flat = t["index"].flatten(-2)
    sel = cvmm_prepare_sel2(flat, t["gate"], index_bound=bound)
    if s.kind == "o":
        sel = sel.with_input_rows_per_group(s.k)
        sel.reduction_weight = t["gate"].flatten(-2)
    return cvmm(t["x"], sel, t["w"], backend=backend, config=config)


def ours_fused(s: Shape, t: dict, deterministic: bool, **launch):
    """The shape's fused op: ``moe_mlp`` (feedforward) or ``moe_linear`` (SwitchHead V / O);
    ``launch``: the op's launch-setting keywords (``block_m=``, ``gemm_configs=``, ...), none
    for the shipped settings."""
    if s.kind != "ffn":
        x, bound = t["x"], s.n_experts * s.heads
        return moe_linear(x, t["index"], t["gate"], t["w"], reduce_groups=s.kind == "o",
                          deterministic=deterministic, index_bound=bound, **launch)  # fmt: skip
    return moe_mlp(
        t["x"],
        t["index"],
        t["gate"],
        t["up"],
        t["down"],
        "relu",
        deterministic,
        index_bound=s.n_experts,
        **launch,
    )


def grouped_mm_baseline(s: Shape, t: dict):
    """torch._grouped_mm on rows sorted by expert (gather before, scatter/reduce after)."""

    def grouped(rows, index, w, in_row):
        flat = index.flatten()
        order = flat.argsort()
        counts = torch.zeros(w.shape[0], dtype=torch.long, device=flat.device)
        counts.index_add_(0, flat, torch.ones_like(flat))  # bincount without a host sync
        offs = torch.cumsum(counts, 0).to(torch.int32)
        out_sorted = torch._grouped_mm(rows[in_row[order]], w, offs=offs)
        return torch.empty_like(out_sorted).index_copy(0, order, out_sorted)

    if s.kind == "ffn":
        n = t["index"].numel()
        rows_of = torch.arange(n, device=t["x"].device) // s.k
        h = torch.relu(grouped(t["x"], t["index"], t["up"], rows_of))
        o = grouped(h, t["index"], t["down"], torch.arange(n, device=h.device))
        return (t["gate"].unsqueeze(-2) @ o.view(s.tokens, s.k, -1)).squeeze(-2)
    n = t["index"].numel()
    if s.kind == "v":
        rows_of = torch.arange(n, device=t["x"].device) // (s.k * s.heads)
        o = grouped(t["x"], t["index"], t["w"], rows_of).view(s.tokens, s.heads, s.k, -1)
        return (t["gate"].unsqueeze(-2) @ o).squeeze(-2)
    rows_of = torch.arange(n, device=t["x"].device) // s.k
    o = grouped(t["x"].reshape(-1, s.expert_size), t["index"], t["w"], rows_of)
    return (t["gate"].flatten(-2).unsqueeze(-2) @ o.view(s.tokens, s.heads * s.k, -1)).squeeze(-2)


def padded_bmm_baseline(s: Shape, t: dict):
    """Every expert gets a zero-padded batch of the largest expert's row count (one bmm)."""

    def padded(rows, index, w, in_row):
        flat = index.flatten()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=w.shape[0])
        cap = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        sorted_e = flat[order]
        slot = torch.arange(flat.numel(), device=flat.device) - starts[sorted_e]
        batch = rows.new_zeros(w.shape[0], cap, rows.shape[-1])
        batch = batch.index_put((sorted_e, slot), rows[in_row[order]])
        out = torch.bmm(batch, w)[sorted_e, slot]
        return torch.empty_like(out).index_copy(0, order, out)

    if s.kind == "ffn":
        n = t["index"].numel()
        h = torch.relu(
            padded(t["x"], t["index"], t["up"], torch.arange(n, device=t["x"].device) // s.k)
        )
        o = padded(h, t["index"], t["down"], torch.arange(n, device=h.device))
        return (t["gate"].unsqueeze(-2) @ o.view(s.tokens, s.k, -1)).squeeze(-2)
    return None


def dense_equal_flops(s: Shape, device: str):
    """Dense matmuls of the shape's FLOPs: the forward and every gradient, the input's included
    (3 matmuls per projection, as :func:`flops` counts)."""
    dt = torch.bfloat16
    width = s.k * s.heads * s.expert_size
    x = torch.randn(s.tokens, s.d_model, device=device, dtype=dt).requires_grad_()
    a = (torch.randn(s.d_model, width, device=device, dtype=dt) / 32).requires_grad_()
    if s.kind != "ffn":
        return lambda: x @ a, [a, x]
    b = (torch.randn(width, s.d_model, device=device, dtype=dt) / 32).requires_grad_()
    return lambda: torch.relu(x @ a) @ b, [a, b, x]


def routed_rows(tokens: int, d: int, n_experts: int, k: int, device: str = "cuda"):
    """The kernel labs' operands (``ab_kernel_parts.py``, ``ab_wgrad_down.py``), seeded: bf16
    token rows ``x`` and output gradients ``dy`` ``[tokens, d]``, a sigmoid router's top-``k``
    gates per slot (flat, bf16) and the routing of its experts for tiles of ``BLOCK_M`` rows."""
    from cvmm_kernel import moe_ops

    torch.manual_seed(0)
    x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16)
    dy = torch.randn(tokens, d, device=device, dtype=torch.bfloat16)
    gate, index = torch.randn(tokens, n_experts, device=device).sigmoid().topk(k, dim=-1)
    gate = gate.reshape(-1).to(torch.bfloat16).contiguous()
    routing = moe_ops.moe_routing(index.reshape(-1), n_experts, moe_ops.BLOCK_M, "triton")
    return x, dy, gate, moe_ops.Routing(*routing, moe_ops.BLOCK_M)


def trained_tensors(t: dict) -> list[torch.Tensor]:
    """The tensors a training step differentiates: the expert weights and the input rows (the
    gates are differentiated by the ops whether asked or not)."""
    return [t[k].requires_grad_() for k in ("up", "down", "w", "x") if k in t]


def fwd_bwd_step(fn, params, grad: torch.Tensor | None = None):
    """A step: ``fn()`` forward, backward of ``grad`` (default ones), ``params``' grads cleared."""

    def step():
        out = fn()
        out.backward(torch.ones_like(out) if grad is None else grad)
        for p in params:
            p.grad = None

    return step


def time_fwd_bwd(fn, params, cuda_graph: bool = True) -> tuple[float, float]:
    """Median ms of forward+backward (CUDA-graph replays unless ``cuda_graph=False``), and the
    peak extra memory of an eager step in MiB."""
    step = fwd_bwd_step(fn, params)
    step()
    peak = peak_mib(step)
    return median_ms(step, warmup=25, rep=200, cuda_graph=cuda_graph), peak


def rel_error_vs_reference(s: Shape, t: dict) -> float:
    """Relative error of the Triton forward against the float32 reference backend."""
    with torch.no_grad():
        mine = ours(s, t).float()
        t32 = {k: (v.float() if v.is_floating_point() else v) for k, v in t.items()}
        ref = ours(s, t32, backend="reference")
        return float((mine - ref).norm() / ref.norm())


def bench_shape(s: Shape, device: str) -> dict:
    t = make_inputs(s, device)
    params = trained_tensors(t)
    row = {"shape": s.name, "tflop": flops(s) / 1e12}
    row["ours_ms"], row["ours_mib"] = time_fwd_bwd(lambda: ours(s, t), params)
    for det in (True, False):
        key = "fused" if det else "fused_atomic"
        row[f"{key}_ms"], row[f"{key}_mib"] = time_fwd_bwd(
            lambda det=det: ours_fused(s, t, det), params
        )
    dense_fn, dense_params = dense_equal_flops(s, device)
    row["dense_ms"], row["dense_mib"] = time_fwd_bwd(dense_fn, dense_params)
    try:
        row["grouped_mm_ms"], row["grouped_mm_mib"] = time_fwd_bwd(
            lambda: grouped_mm_baseline(s, t), params
        )
    except Exception as exc:  # not in this torch, or its shape constraints
        row["grouped_mm_ms"], row["grouped_mm_error"] = None, f"{type(exc).__name__}: {exc}"[:200]
    if s.kind == "ffn" and s.expert_size <= 128:
        row["padded_bmm_ms"], row["padded_bmm_mib"] = time_fwd_bwd(
            lambda: padded_bmm_baseline(s, t), params, cuda_graph=False
        )
    row["ours_tflops"] = flops(s) / row["ours_ms"] / 1e9
    for key in ("fused", "fused_atomic"):
        if row.get(f"{key}_ms"):
            row[f"{key}_ratio_of_dense_tflops"] = row["dense_ms"] / row[f"{key}_ms"]
            if row.get("grouped_mm_ms"):
                row[f"{key}_speedup_vs_grouped_mm"] = row["grouped_mm_ms"] / row[f"{key}_ms"]
    row["dense_tflops"] = flops(s) / row["dense_ms"] / 1e9
    row["ratio_of_dense_tflops"] = row["ours_tflops"] / row["dense_tflops"]
    if row.get("grouped_mm_ms"):
        row["speedup_vs_grouped_mm"] = row["grouped_mm_ms"] / row["ours_ms"]
    if s.name in UPSTREAM_MS:
        row["upstream_ms_perf_md"] = UPSTREAM_MS[s.name]
        row["speedup_vs_upstream"] = UPSTREAM_MS[s.name] / row["ours_ms"]
    row["rel_error_vs_fp32_reference"] = rel_error_vs_reference(s, t)
    with torch.no_grad():
        ref = ours(
            s,
            {k: (v.float() if v.is_floating_point() else v) for k, v in t.items()},
            backend="reference",
        )
        for det in (True, False):
            got = ours_fused(s, t, det).float()
            key = "fused" if det else "fused_atomic"
            row[f"{key}_rel_error_vs_fp32_reference"] = float((got - ref).norm() / ref.norm())
    return row


def markdown_table(meta: dict, rows: list[dict]) -> str:
    """The results' markdown table (``meta``, ``rows`` as in the JSON the script writes;
    percentages of dense to one decimal, so that a target's 40% reads as met or not)."""
    fmt = lambda v, f="{:.3f}": "n/a" if v is None else f.format(v)
    lines = [
        f"cvmm forward+backward, bf16, {environment_line(meta)}",
        "",
        *table_header(
            "shape",
            "cvmm ms",
            "fused ms (moe_mlp / moe_linear)",
            "fused atomic ms",
            "dense ms (equal FLOPs)",
            "% of dense TFLOP/s: cvmm / fused / atomic",
            "grouped_mm ms",
            "padded bmm ms (eager)",
            "upstream ms (PERF.md)",
            "peak MiB cvmm / fused / dense",
        ),
    ]
    for r in rows:
        pct = lambda key: fmt(r.get(key) and 100 * r[key], "{:.1f}%")
        lines.append(
            f"| {r['shape']} | {r['ours_ms']:.3f} | {fmt(r.get('fused_ms'))} | "
            f"{fmt(r.get('fused_atomic_ms'))} | {r['dense_ms']:.3f} | "
            f"{pct('ratio_of_dense_tflops')} / {pct('fused_ratio_of_dense_tflops')} / "
            f"{pct('fused_atomic_ratio_of_dense_tflops')} | {fmt(r.get('grouped_mm_ms'))} | "
            f"{fmt(r.get('padded_bmm_ms'))} | {fmt(r.get('upstream_ms_perf_md'), '{:.2f}')} | "
            f"{r['ours_mib']:.0f} / {fmt(r.get('fused_mib'), '{:.0f}')} / {r['dense_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the first shape, short timing")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    device = "cuda"
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = []
    for s in shapes:
        rows.append(bench_shape(s, device))
        torch.cuda.empty_cache()

    meta = metadata(
        dtype="bfloat16",
        timing="triton.testing.do_bench median of CUDA-graph replays, forward+backward "
        "(padded bmm: eager)",
    )
    table = markdown_table(meta, rows)
    print(table)
    stem = "cvmm_quick" if args.quick else "cvmm"
    write_results(stem, {"meta": meta, "rows": rows}, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
