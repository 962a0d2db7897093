r"""Benchmark: coordinate descent (ours vs upstream colt5-attention) and a routed attention block
vs dense SDPA attention. Needs CUDA. Prints markdown tables, writes JSON + markdown to ``$OUT``
if set, else to ``benchmarks/results/`` next to this script.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/colt5-routing/benchmarks/bench_coor_descent.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
from bench_harness import (
    environment_line,
    median_ms,
    metadata,
    require_cuda,
    table_header,
    write_results,
)

ROWS, N, K, ITERS, SEGMENTS = 16, 32768, 1024, 50, 4
EPS = dict(eps=0.03, eps_init=4.0, eps_decay=0.7)


def bench(fn, quick: bool) -> tuple[float, float]:
    """Median ms (triton.testing.do_bench) and the peak memory in MiB allocated while it times
    ``fn`` (all of it, inputs included: not the harness's ``peak_mib`` of one call)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = median_ms(fn, warmup=5 if quick else 25, rep=20 if quick else 100)
    return ms, torch.cuda.max_memory_allocated() / 2**20


def coor_rows(quick: bool) -> tuple[list[dict], list[str]]:
    from colt5_routing import coor_descent_reference, triton_coor_descent
    from colt5_routing import coor_descent_triton as ours

    notes: list[str] = []
    torch.manual_seed(0)
    s = torch.randn(ROWS, N, device="cuda")
    g = torch.randn(ROWS, N, device="cuda")
    kw = dict(n_iters=ITERS, k=K, **EPS)

    # exactness at the benchmark shape: forward and gradient vs the float64 reference autograd
    s64 = s.double().requires_grad_()
    ref = coor_descent_reference(s64, **kw)
    (gref,) = torch.autograd.grad(ref, s64, g.double())

    shipped = dict(ours.CONFIG)  # restored after the sweep: later rows use the defaults
    variants: dict[str, object] = {}
    for max_block, warps in [(2048, 8), (4096, 8), (4096, 16), (8192, 16), (16384, 32)]:
        name = f"ours triton (block {max_block}, {warps} warps)"

        def run(mb=max_block, w=warps, x=None, **kwa):
            ours.CONFIG.update(max_block=mb, num_warps=w)
            return triton_coor_descent(x, **kw, checkpoint_segments=SEGMENTS)

        variants[name] = run
    variants["ours reference (pytorch)"] = lambda x=None: coor_descent_reference(x, **kw)
    try:
        from colt5_attention import coor_descent as up_torch
        from colt5_attention.triton_coor_descent import triton_coor_descent as up_triton

        variants["upstream colt5-attention triton"] = lambda x=None: up_triton(
            x, **kw, checkpoint_segments=SEGMENTS
        )
        variants["upstream colt5-attention pytorch"] = lambda x=None: up_torch(x, **kw)
    except Exception as exc:
        notes.append(f"upstream colt5-attention not importable ({exc!r}): no upstream rows")

    rows = []
    for name, fn in variants.items():
        row: dict = {"variant": name}
        try:
            x = s.clone().requires_grad_()
            out = fn(x=x)
            (gx,) = torch.autograd.grad(out, x, g)
            row["max_abs_err_fwd"] = (out.double() - ref.detach()).abs().max().item()
            row["max_rel_err_grad"] = (
                (gx.double() - gref).abs().max() / gref.abs().max().clamp(min=1e-30)
            ).item()
            with torch.no_grad():
                row["fwd_ms"], row["fwd_mib"] = bench(lambda: fn(x=s), quick)

            def fwd_bwd():
                xx = s.detach().requires_grad_()
                torch.autograd.grad(fn(x=xx), xx, g)

            row["fwd_bwd_ms"], row["fwd_bwd_mib"] = bench(fwd_bwd, quick)
        except Exception as exc:
            row["error"] = repr(exc)[:300]
        rows.append(row)
        print(row, flush=True)
    ours.CONFIG.update(shipped)
    return rows, notes


def block_rows(quick: bool) -> list[dict]:
    import torch.nn.functional as F
    from colt5_routing import ConditionalRoutedAttention
    from torch import nn

    torch.manual_seed(0)
    dim, heads, dh = 512, 8, 64
    n = 8192 if quick else 32768
    x = torch.randn(1, n, dim, device="cuda", requires_grad=True)
    routed = ConditionalRoutedAttention(
        dim,
        num_heavy_tokens_q=n // 16,
        num_heavy_tokens_kv=n // 16,
        light_window_size=128,
        light_heads=4,
        heavy_heads=heads,
        heavy_dim_head=dh,
    ).cuda()

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * heads * dh, bias=False)
            self.out = nn.Linear(heads * dh, dim, bias=False)

        def forward(self, t):
            q, k, v = self.qkv(self.norm(t)).view(1, n, 3, heads, dh).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v)
            return self.out(o.transpose(1, 2).reshape(1, n, -1))

    dense = Dense().cuda()
    rows = []
    for name, mod in [("routed attention (ours)", routed), ("dense SDPA attention", dense)]:

        def step(m=mod):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = m(x)
            y.float().square().mean().backward()

        ms, mib = bench(step, quick)
        rows.append({"variant": name, "tokens": n, "dim": dim, "fwd_bwd_ms": ms, "peak_mib": mib})
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict], cols: list[str], base: str | None = None, key: str = "") -> str:
    lines = table_header(*cols, *([f"x vs {base}"] if base else []))
    ref = next((r.get(key) for r in rows if r["variant"] == base), None)
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
        if base:
            v = r.get(key)
            cells.append(f"{ref / v:.2f}" if ref and v else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 1
    coor, notes = coor_rows(args.quick)
    blocks = block_rows(args.quick)
    meta = metadata(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        shape={"rows": ROWS, "n": N, "k": K, "n_iters": ITERS, "segments": SEGMENTS, **EPS},
        quick=args.quick,
        notes=notes,
    )
    base = "upstream colt5-attention triton"
    cols = ["variant", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_mib", "max_abs_err_fwd", "max_rel_err_grad"]
    md = [
        f"# coordinate descent, {ROWS} x {N}, k={K}, {ITERS} iterations",
        environment_line(meta),
        "",
        table(coor, [*cols, "error"], base, "fwd_bwd_ms"),
        "",
        *[f"note: {x}" for x in notes],
        "",
        "# routed attention block vs dense SDPA (fwd+bwd, bf16 autocast)",
        "",
        table(blocks, ["variant", "tokens", "fwd_bwd_ms", "peak_mib"], "dense SDPA attention",
              "fwd_bwd_ms"),
    ]  # fmt: skip
    text = "\n".join(md)
    print(text)
    stem = "coor_descent_quick" if args.quick else "coor_descent"
    document = {**meta, "coor_descent": coor, "routed_block": blocks}
    write_results(stem, document, text, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
