r"""Launch-setting sweep of moe_mlp's kernels, one role at a time, on the benchmark's FFN shapes.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/sweep_moe.py [shape ...]

Each role (up, down, grad_hidden, grad_input, grad_w_up, grad_w_down) is timed alone with
``triton.testing.do_bench`` (median) for every candidate setting, on inputs made by one real
forward + backward; each candidate's output is compared with the default's. Prints the best
settings per shape and writes ``sweep_moe.json`` to ``$OUT`` (else ``benchmarks/results``).

Environment: ``SWEEP_ROLES=up,down`` (GEMM roles to sweep), ``SWEEP_WGRAD=1`` (also the weight
gradients), ``SWEEP_BLOCK_M=64,128`` (tile heights), ``SWEEP_QUICK=1`` (only the settings that
won before and their neighbours), ``SWEEP_TOP=3`` (rows printed per role); arguments: shape names.
"""

from __future__ import annotations

import itertools
import os
import sys

import torch
from bench_harness import median_ms, metadata, require_cuda, write_results

# (BLOCK_N, BLOCK_K, num_warps, num_stages, persistent)
GEMM_CANDIDATES = [
    (bn, bk, w, s, p)
    for bn, bk, w, s, p in itertools.product(
        (128, 256), (64, 128), (4, 8), (3, 4, 5), (False, True)
    )
    if not (bn == 256 and w == 4)
]
# Row-tile kernel (small inner size): (BLOCK_N, num_warps, num_stages)
ROWS_CANDIDATES = list(itertools.product((128, 256), (4, 8), (2, 3, 4)))
# (BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages)
WGRAD_CANDIDATES = [
    (bm, bk, bn, w, s)
    for bm, (bk, bn), w, s in itertools.product(
        (32, 64, 128), ((64, 128), (128, 64), (128, 128), (64, 256)), (4, 8), (3, 4)
    )
    if not (bm == 128 and s == 4)
]
# Output tiles 256 wide (8 warps): half the re-reads of the other operand's panel.
WIDE_WGRAD = [(bm, bk, bn, 8, s) for bm in (32, 64) for bk, bn in ((256, 128), (128, 256))
              for s in (2, 3)]  # fmt: skip
WGRAD_CANDIDATES += WIDE_WGRAD
# SWEEP_QUICK=1: the settings that came out on top before, and their neighbours.
if os.environ.get("SWEEP_QUICK") == "1":
    GEMM_CANDIDATES = [
        (128, 64, 8, 3, False),
        (128, 64, 4, 3, False),
        (128, 64, 8, 4, False),
        (128, 128, 8, 3, False),
        (128, 64, 8, 3, True),
        (128, 128, 8, 3, True),
        (64, 64, 4, 3, False),
        (64, 128, 4, 3, False),
        (128, 32, 8, 4, False),
    ]
    ROWS_CANDIDATES = [(128, 8, 4), (128, 4, 4), (128, 8, 3), (256, 8, 3), (256, 8, 4)]
    WGRAD_CANDIDATES = [
        (64, 128, 128, 4, 4),
        (64, 128, 128, 4, 3),
        (64, 128, 128, 8, 3),
        (32, 128, 128, 4, 4),
        (128, 128, 128, 4, 3),
        (128, 128, 128, 8, 3),
        (64, 64, 128, 4, 4),
        *WIDE_WGRAD,
    ]
ROLE_KIND = {
    "up": "gather",
    "grad_hidden": "gather",
    "down": "sorted",
    "down_sorted_store": "sorted",
    "grad_input": "sorted",
    "down_rows": "sorted",
    "grad_input_rows": "sorted",
}

SHAPES = [  # name, tokens, d_model, experts, expert size, k
    ("moeut-244m-ffn", 8192, 1024, 387, 128, 16),
    ("ffn-128x128-k4", 8192, 1024, 128, 128, 4),
    ("large-64x4096-k2", 8192, 1024, 64, 4096, 2),
]


def _print_best(name: str, flop: int, shape_rows: dict[str, list[dict]]) -> None:
    """The fastest correct settings of each role of one shape (``flop``: one GEMM's)."""
    print(f"== {name}: one GEMM = {flop / 1e9:.1f} GFLOP")
    for role, rows in shape_rows.items():
        good = sorted((r for r in rows if "ms" in r and r["err"] < 1e-2), key=lambda r: r["ms"])
        bad = [r for r in rows if "ms" in r and r["err"] >= 1e-2]
        for r in good[: int(os.environ.get("SWEEP_TOP", "3"))]:
            tflops = flop / r["ms"] / 1e9
            print(
                f"  {role:12s} bm={r.get('block_m', '-')} {r['config']} "
                f"{r['ms'] * 1e3:7.1f} us {tflops:6.0f} TFLOP/s err {r['err']:.1e}"
            )
        if bad:
            print(f"  {role}: {len(bad)} settings with a wrong result, e.g. {bad[0]}")


def main() -> int:
    if not require_cuda(__file__):
        return 2
    from cvmm_kernel import moe_ops
    from cvmm_kernel import moe_triton as kt

    only = set(sys.argv[1:])
    results = {}
    for name, tokens, d, n_exp, hid, k in SHAPES:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        dt = torch.bfloat16
        x = torch.randn(tokens, d, device="cuda", dtype=dt)
        gate, index = torch.randn(tokens, n_exp, device="cuda").sigmoid().topk(k, dim=-1)
        gate = gate.reshape(-1).contiguous()
        w_up = torch.randn(n_exp, d, hid, device="cuda", dtype=dt) / 32
        w_down = torch.randn(n_exp, hid, d, device="cuda", dtype=dt) / 11
        n = tokens * k
        shape_rows = {}
        block_ms = [int(b) for b in os.environ.get("SWEEP_BLOCK_M", "128").split(",")]
        for block_m in block_ms:
            r = moe_ops.Routing(
                *moe_ops.moe_routing(index.reshape(-1), n_exp, block_m, "triton"), block_m
            )
            h = torch.empty(n, hid, device="cuda", dtype=dt)
            kt.moe_gemm(
                x,
                w_up,
                h,
                r,
                k,
                a_gather=True,
                out_mode=kt.OUT_SORTED,
                epilogue=kt.EPI_ACTIVATION,
                activation="relu",
            )
            dy = torch.randn(tokens, d, device="cuda", dtype=dt)
            parts = torch.empty(hid // 64 + 1, n, device="cuda")
            cases = {
                "up": lambda cfg, out: kt.moe_gemm(
                    x,
                    w_up,
                    out,
                    r,
                    k,
                    a_gather=True,
                    out_mode=kt.OUT_SORTED,
                    epilogue=kt.EPI_ACTIVATION,
                    activation="relu",
                    config=cfg,
                ),
                "grad_hidden": lambda cfg, out: kt.moe_gemm(
                    dy,
                    w_down.transpose(1, 2),
                    out,
                    r,
                    k,
                    a_gather=True,
                    out_mode=kt.OUT_SORTED,
                    epilogue=kt.EPI_ACTIVATION_BACKWARD,
                    activation="relu",
                    gate=gate,
                    aux=parts,
                    h=h,
                    config=cfg,
                ),
                "down": lambda cfg, out: kt.moe_gemm(
                    h,
                    w_down,
                    out,
                    r,
                    k,
                    a_gather=False,
                    out_mode=kt.OUT_SLOT,
                    epilogue=kt.EPI_GATE,
                    gate=gate,
                    config=cfg,
                ),
                "down_sorted_store": lambda cfg, out: kt.moe_gemm(
                    h,
                    w_down,
                    out,
                    r,
                    k,
                    a_gather=False,
                    out_mode=kt.OUT_SORTED,
                    epilogue=kt.EPI_GATE,
                    gate=gate,
                    config=cfg,
                ),
                "grad_input": lambda cfg, out: kt.moe_gemm(
                    h,
                    w_up.transpose(1, 2),
                    out,
                    r,
                    k,
                    a_gather=False,
                    out_mode=kt.OUT_SLOT,
                    config=cfg,
                ),
            }
            cases["down_rows"] = lambda cfg, out: kt.moe_gemm_rows(
                h, w_down, out, r, k, a_gather=False, out_mode=kt.OUT_SLOT, gate=gate, config=cfg
            )
            cases["grad_input_rows"] = lambda cfg, out: kt.moe_gemm_rows(
                h, w_up.transpose(1, 2), out, r, k, a_gather=False, out_mode=kt.OUT_SLOT, config=cfg
            )
            out_shapes = {
                "down_rows": (n, d),
                "grad_input_rows": (n, d),
                "up": (n, hid),
                "grad_hidden": (n, hid),
                "down": (n, d),
                "down_sorted_store": (n, d),
                "grad_input": (n, d),
            }
            only_roles = os.environ.get("SWEEP_ROLES")
            for role, fn in cases.items():
                if only_roles and role not in only_roles.split(","):
                    continue
                ref = torch.empty(out_shapes[role], device="cuda", dtype=dt)
                # The reference output: the general kernel with the committed default setting.
                base = {"down_sorted_store": "down", "down_rows": "down"}.get(role, role)
                base = base.removesuffix("_rows")
                sizes = (d, hid) if ROLE_KIND[role] == "gather" else (hid, d)
                ref_fn = fn if role == "down_sorted_store" else cases[base]
                ref_fn(moe_ops._config(base, *sizes), ref)
                for cfg in ROWS_CANDIDATES if role.endswith("_rows") else GEMM_CANDIDATES:
                    out = torch.full_like(ref, float("nan"))
                    try:
                        fn(cfg, out)
                        torch.cuda.synchronize()
                        err = float((out.float() - ref.float()).norm() / ref.float().norm())
                        ms = median_ms(lambda: fn(cfg, out), warmup=10, rep=40)
                    except Exception as exc:  # out of resources for this setting
                        shape_rows.setdefault(role, []).append(
                            {"block_m": block_m, "config": cfg, "error": str(exc)[:80]}
                        )
                        continue
                    shape_rows.setdefault(role, []).append(
                        {"block_m": block_m, "config": cfg, "ms": ms, "err": err}
                    )
            if os.environ.get("SWEEP_WGRAD") != "1" or block_m != block_ms[0]:
                continue  # the weight gradients do not use the tile table
            wg_cases = {
                "grad_w_up": (
                    lambda cfg, dw: kt.moe_weight_grad(
                        x, h, dw, r, k, a_gather=True, b_gather=False, config=cfg
                    ),
                    (n_exp, d, hid),
                ),
                # as moe_mlp computes it: dW_down^T = dy[token]^T (g * h), g * h sorted as h
                "grad_w_down": (
                    lambda cfg, dw: kt.moe_weight_grad(
                        dy, gh, dw.transpose(1, 2), r, k, a_gather=True, b_gather=False, config=cfg
                    ),
                    (n_exp, hid, d),
                ),
            }
            gh = (h.float() * gate.float()[r.sorted_to_slot.long(), None]).to(dt)
            for role, (fn, shape) in wg_cases.items():
                # Weight gradients in the weights' dtype, as moe_mlp writes them.
                ref = torch.empty(shape, device="cuda", dtype=dt)
                k_n = shape[1:] if role == "grad_w_up" else shape[:0:-1]  # the GEMM's K, N
                fn(moe_ops._config(role, *k_n), ref)
                for cfg in WGRAD_CANDIDATES:
                    out = torch.full_like(ref, float("nan"))
                    try:
                        fn(cfg, out)
                        torch.cuda.synchronize()
                        err = float((out.float() - ref.float()).norm() / ref.float().norm())
                        ms = median_ms(lambda: fn(cfg, out), warmup=10, rep=40)
                    except Exception as exc:
                        shape_rows.setdefault(role, []).append(
                            {"block_m": block_m, "config": cfg, "error": str(exc)[:80]}
                        )
                        continue
                    shape_rows.setdefault(role, []).append(
                        {"block_m": block_m, "config": cfg, "ms": ms, "err": err}
                    )
        results[name] = shape_rows
        _print_best(name, 2 * n * d * hid, shape_rows)
    write_results(
        "sweep_moe", {"meta": metadata(), "results": results}, script_file=__file__, indent=1
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
