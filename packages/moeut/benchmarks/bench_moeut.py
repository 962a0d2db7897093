r"""Benchmark an LM training step (forward + backward) of MoEUT against a dense transformer (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/bench_moeut.py [--quick] [--compile] [--cuda-graph] \
        [--compiled-graph] [--no-eager]

bf16 autocast, B=8, T=1024, vocabulary 8000. In the same process: a dense pre-norm transformer of
matched parameter count (d 1024, 18 layers, 16 heads, FFN 4096, SDPA causal). Ratios are like for
like: each row against the dense model run the same way (eager, compiled, CUDA graph, or compiled
and replayed from a CUDA graph as ``torch.compile(mode="reduce-overhead")`` would: the GPU-bound
compiled step). Writes
JSON and a markdown table to ``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch
import torch.nn.functional as F
from bench_harness import (
    environment_line,
    median_ms,
    metadata,
    peak_mib,
    ratios_to_baseline,
    require_cuda,
    table_header,
    write_results,
)
from moeut import MoEUTLM, profiles

VOCAB, BATCH, SEQ = 8000, 8, 1024
UPSTREAM_MS = {"MoEUT_244M": 227.0}  # PERF.md, H100


class DenseBlock(torch.nn.Module):
    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.up, self.down = torch.nn.Linear(d, ff), torch.nn.Linear(ff, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class DenseLM(torch.nn.Module):
    """Pre-norm transformer LM with SDPA attention (the baseline)."""

    def __init__(self, d=1024, layers=18, heads=16, ff=4096):
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCAB, d)
        self.blocks = torch.nn.ModuleList(DenseBlock(d, heads, ff) for _ in range(layers))
        self.out_norm = torch.nn.LayerNorm(d)
        self.lm_head = torch.nn.Linear(d, VOCAB)

    def forward(self, x):
        h = self.embedding(x)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.out_norm(h))


def time_step(model: torch.nn.Module, mode: str) -> dict:
    """``mode``: "eager", "compiled" (torch.compile), "graph" (the whole step in a CUDA graph) or
    "compiled-graph" (both)."""
    gc.collect()  # a previous step's CUDA graph pool must not count towards this model's peak
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = model.cuda().train()
    run = torch.compile(model) if mode.startswith("compiled") else model
    graph = mode.endswith("graph")
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device="cuda")

    def step():
        # the autocast weight cache must be off while a CUDA graph is captured
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graph):
            out = run(tokens[:, :-1])
            logits, reg = (out, 0.0) if torch.is_tensor(out) else (out.outputs, out.reg_loss)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()) + reg
        loss.backward()
        model.zero_grad(set_to_none=not graph)

    step()
    step()
    peak = peak_mib(step, baseline_bytes=base) / 1024  # GiB: the model's weights included
    ms = median_ms(step, warmup=300, rep=1500, cuda_graph=graph)
    params = sum(p.numel() for p in model.parameters())
    return {
        "ms": ms,
        "tokens_per_s": BATCH * SEQ / ms * 1e3,
        "peak_gib": peak,
        "params_m": params / 1e6,
    }


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MoEUT_244M and dense only")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="also time each step replayed from a CUDA graph"
    )
    parser.add_argument(
        "--compiled-graph",
        action="store_true",
        help="also time compiled steps replayed from a CUDA graph",
    )
    parser.add_argument("--no-eager", action="store_true", help="skip the eager steps")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    names = ["MoEUT_244M"] if args.quick else ["MoEUT_244M", "MoEUT_126M", "MoEUT_44M"]
    models = [("dense-243M", lambda: DenseLM())]
    models += [(n, lambda n=n: MoEUTLM(VOCAB, **profiles.PROFILES[n])) for n in names]
    rows = []
    modes = ["eager"] * (not args.no_eager) + ["compiled"] * args.compile
    modes += ["graph"] * args.cuda_graph + ["compiled-graph"] * args.compiled_graph
    if not modes:
        parser.error("--no-eager needs --compile, --cuda-graph or --compiled-graph")
    suffix = {
        "eager": "",
        "compiled": " (compiled)",
        "graph": " (CUDA graph)",
        "compiled-graph": " (compiled, CUDA graph)",
    }
    for name, make in models:
        for mode in modes:
            torch.manual_seed(0)
            try:
                timing = time_step(make(), mode)
            except Exception as exc:  # report a mode that cannot run, keep the others
                print(f"{name} {mode}: {exc!r}"[:300], file=sys.stderr)
                continue
            row = {"model": name + suffix[mode], "mode": mode, **timing}
            if name in UPSTREAM_MS and mode == "eager":
                row["upstream_ms_perf_md"] = UPSTREAM_MS[name]
            rows.append(row)
    # like for like: against the dense model run the same way (None if that one failed)
    is_dense = lambda r: r["model"] == "dense-243M" + suffix[r["mode"]]
    for r, ratio in zip(rows, ratios_to_baseline(rows, key="ms", is_baseline=is_dense,
                                                 match=("mode",))):  # fmt: skip
        r["ratio_to_dense"] = ratio
    meta = metadata(setup=f"LM forward+backward, bf16 autocast, B={BATCH}, T={SEQ}, vocab {VOCAB}")
    lines = [
        f"MoEUT training step, {environment_line(meta)} ({meta['setup']})",
        "",
        *table_header(
            "model",
            "params",
            "ms",
            "tokens/s",
            "x dense (same mode)",
            "peak GiB",
            "upstream ms (PERF.md)",
        ),
    ]
    for r in rows:
        up = r.get("upstream_ms_perf_md")
        lines.append(
            f"| {r['model']} | {r['params_m']:.1f}M | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{_ratio(r['ratio_to_dense'])} | {r['peak_gib']:.1f} | {'' if up is None else up} |"
        )
    table = "\n".join(lines)
    print(table)
    stem = "moeut_quick" if args.quick else "moeut"
    write_results(stem, {"meta": meta, "rows": rows}, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
