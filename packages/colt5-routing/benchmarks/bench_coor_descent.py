r"""Benchmark: coordinate descent (ours vs upstream colt5-attention) and a routed attention block
vs dense SDPA attention. Needs CUDA. Prints markdown tables, writes JSON + markdown to ``$OUT``
if set, else to ``benchmarks/results/`` next to this script.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/colt5-routing/benchmarks/bench_coor_descent.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
from collections.abc import Callable

import torch
from bench_harness import (
    environment_line,
    median_ms_and_peak_mib,
    metadata,
    ratios_to_baseline,
    require_cuda,
    table_header,
    write_results,
)

ROWS, N, K, ITERS, SEGMENTS = 16, 32768, 1024, 50, 4
EPS = dict(eps=0.03, eps_init=4.0, eps_decay=0.7)
# launch caps of our kernels, (max_block, num_warps), passed to each call (CONFIG is left alone)
LAUNCHES = [(2048, 8), (4096, 8), (4096, 16), (8192, 16), (16384, 32)]


def timing(quick: bool) -> dict[str, int]:
    """do_bench's budgets (ms of warm-up and of timed calls)."""
    return dict(warmup=5, rep=20) if quick else dict(warmup=25, rep=100)


def coor_rows(quick: bool) -> tuple[list[dict], list[str]]:
    from colt5_routing import coor_descent_reference, triton_coor_descent

    notes: list[str] = []
    torch.manual_seed(0)
    s = torch.randn(ROWS, N, device="cuda")
    g = torch.randn(ROWS, N, device="cuda")
    kw = dict(n_iters=ITERS, k=K, **EPS)

    # exactness at the benchmark shape: forward and gradient vs the float64 reference autograd
    s64 = s.double().requires_grad_()
    ref = coor_descent_reference(s64, **kw)
    (gref,) = torch.autograd.grad(ref, s64, g.double())

    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for max_block, warps in LAUNCHES:
        variants[f"ours triton (block {max_block}, {warps} warps)"] = functools.partial(
            triton_coor_descent, **kw, checkpoint_segments=SEGMENTS, max_block=max_block,
            num_warps=warps,
        )  # fmt: skip
    variants["ours reference (pytorch)"] = lambda x: coor_descent_reference(x, **kw)
    try:
        from colt5_attention import coor_descent as up_torch
        from colt5_attention.triton_coor_descent import triton_coor_descent as up_triton

        variants["upstream colt5-attention triton"] = lambda x: up_triton(
            x, **kw, checkpoint_segments=SEGMENTS
        )
        variants["upstream colt5-attention pytorch"] = lambda x: up_torch(x, **kw)
    except Exception as exc:
        notes.append(f"upstream colt5-attention not importable ({exc!r}): no upstream rows")

    rows = []
    for name, fn in variants.items():
        row: dict = {"variant": name}
        try:
            x = s.clone().requires_grad_()
            out = fn(x)
            (gx,) = torch.autograd.grad(out, x, g)
            row["max_abs_err_fwd"] = (out.double() - ref.detach()).abs().max().item()
            row["max_rel_err_grad"] = (
                (gx.double() - gref).abs().max() / gref.abs().max().clamp(min=1e-30)
            ).item()
            # peaks while timing: everything allocated, inputs and do_bench's buffers included
            with torch.no_grad():
                row["fwd_ms"], row["fwd_mib"] = median_ms_and_peak_mib(
                    lambda fn=fn: fn(s), **timing(quick)
                )

            def fwd_bwd(fn=fn):
                xx = s.detach().requires_grad_()
                torch.autograd.grad(fn(xx), xx, g)

            row["fwd_bwd_ms"], row["fwd_bwd_mib"] = median_ms_and_peak_mib(fwd_bwd, **timing(quick))
        except Exception as exc:
            row["error"] = repr(exc)[:300]
        rows.append(row)
        print(row, flush=True)
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
    # the routed block's coordinate descent runs with the shipped launch settings (CONFIG): the
    # sweep above passed its settings per call and changed nothing here
    for name, mod in [("routed attention (ours)", routed), ("dense SDPA attention", dense)]:

        def step(m=mod):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = m(x)
            y.float().square().mean().backward()

        ms, mib = median_ms_and_peak_mib(step, **timing(quick))
        rows.append({"variant": name, "tokens": n, "dim": dim, "fwd_bwd_ms": ms, "peak_mib": mib})
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict], cols: list[str], base: str, key: str) -> str:
    """``cols`` of ``rows`` and the speed-up over the ``base`` variant (its ``key`` over the
    row's: above 1 is faster than ``base``)."""
    lines = table_header(*cols, f"x vs {base}")
    is_base = lambda r: r["variant"] == base
    for r, ratio in zip(rows, ratios_to_baseline(rows, key=key, is_baseline=is_base)):
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
        cells.append(f"{1 / ratio:.2f}" if ratio else "-")
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
    from colt5_routing.coor_descent_triton import CONFIG

    meta = metadata(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        shape={"rows": ROWS, "n": N, "k": K, "n_iters": ITERS, "segments": SEGMENTS, **EPS},
        quick=args.quick,
        notes=notes,
        launch_defaults=dict(CONFIG),  # what the routed block ran with
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
