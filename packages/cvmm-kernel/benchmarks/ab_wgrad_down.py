r"""dW_down computed as dW_up is: ``dW_down[e]^T = dy[token]^T (g * h)`` (the gathered rows as
the first operand, ``g * h`` stored by the hidden gradient's epilogue, each tile stored through
a transpose), against ``dW_down[e] = (g * h)^T dy[token]`` with the gate applied in the loop
(the form shipped before); and the weight-gradient tiles stored by TMA (tensor descriptors)
against pointer stores (bf16, medians in one process).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':')packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_wgrad_down.py

Kernel times at the MoEUT-244M FFN shape: dW_up with either store, dW_down in the old form
(with and without the gate), and the new form with the gate in the loop or without it (``g * h``
given), with each store (``moe_triton.DESCRIPTOR_STORES``) and into an untransposed buffer
(no transpose at all); then forward + backward of ``moe_mlp`` (CUDA-graph replays) at each
feedforward shape of ``bench_cvmm.py``, with ``moe_ops.W_DOWN_FROM_GATED_H`` and the store switch
on and off. Writes ``ab_wgrad_down.json`` to ``$OUT`` (else ``benchmarks/results``). The
committed JSON also has a "pointer store not transposed" case, from an option since removed:
the pointer store used to transpose each tile explicitly, as fast as the layout the compiler
picks (137.2 against 137.6 us), so the kernel now leaves it to the compiler.
"""

from __future__ import annotations

import sys

import torch
from bench_harness import kernel_us_twice, metadata, require_cuda, write_results

# dW_down = (g * h)^T dy[token], the gate applied in the loop (the shipped setting before)
OLD = (128, 128, 128, 4, 3)
# dW_down^T = dy[token]^T (g * h): (BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages)
GATED_H = [(64, 128, 128, 4, 4), (64, 128, 128, 4, 3), (64, 64, 128, 4, 4), (64, 64, 128, 4, 3),
           (32, 128, 128, 4, 4), (64, 128, 64, 4, 4)]  # fmt: skip


def main() -> int:
    if not require_cuda(__file__):
        return 2
    import bench_cvmm as B
    from cvmm_kernel import moe_ops
    from cvmm_kernel import moe_triton as kt

    def switches(gated_h: bool, tma: bool) -> None:
        moe_ops.W_DOWN_FROM_GATED_H[0] = gated_h
        kt.DESCRIPTOR_STORES[0] = tma

    tokens, d, n_exp, hid, k = 8192, 1024, 387, 128, 16
    dt = torch.bfloat16
    x, dy, gate, r = B.routed_rows(tokens, d, n_exp, k)
    h = torch.randn(tokens * k, hid, device="cuda", dtype=dt).relu()
    gh = (h.float() * gate.float()[r.sorted_to_slot.long(), None]).to(dt)  # sorted, as h
    du = torch.randn(tokens * k, hid, device="cuda", dtype=dt)
    cfg_up = moe_ops._config("grad_w_up", d, hid)
    dw_down = torch.empty(n_exp, hid, d, device="cuda", dtype=dt)
    dw_flat = torch.empty(n_exp, d, hid, device="cuda", dtype=dt)  # dW_down^T, not transposed
    dw_up = torch.empty(n_exp, d, hid, device="cuda", dtype=dt)

    def kernel(a, b, dw, cfg, *, a_gather, g=None, tma=True):
        def run():
            switches(True, tma)
            kt.moe_weight_grad(a, b, dw, r, k, a_gather=a_gather, b_gather=not a_gather, gate=g,
                               config=cfg)  # fmt: skip
            switches(True, True)

        return run

    ref = torch.empty(n_exp, hid, d, device="cuda", dtype=torch.float32)
    got = torch.empty_like(ref)
    kt.moe_weight_grad(h, dy, ref, r, k, a_gather=False, b_gather=True, gate=gate, config=OLD)
    kt.moe_weight_grad(dy, gh, got.transpose(1, 2), r, k, a_gather=True, b_gather=False,
                       config=GATED_H[0])  # fmt: skip
    diff = float((got - ref).norm() / ref.norm())
    print(f"new vs old dW_down (float32 out): rel. diff {diff:.1e}")

    dw_down_t = dw_down.transpose(1, 2)
    cases = [
        ("dW_up, TMA store", kernel(x, du, dw_up, cfg_up, a_gather=True)),
        ("dW_up, pointer store", kernel(x, du, dw_up, cfg_up, a_gather=True, tma=False)),
        (f"old dW_down {OLD}", kernel(h, dy, dw_down, OLD, a_gather=False, g=gate, tma=False)),
        ("old dW_down, no gate", kernel(h, dy, dw_down, OLD, a_gather=False, tma=False)),
    ]
    for cfg in GATED_H:
        cases += [
            (f"new {cfg}, TMA store", kernel(dy, gh, dw_down_t, cfg, a_gather=True)),
            (f"new {cfg}, pointer store", kernel(dy, gh, dw_down_t, cfg, a_gather=True, tma=False)),
        ]
    cases += [
        (f"new {GATED_H[0]}, gate in the loop",
         kernel(dy, h, dw_down_t, GATED_H[0], a_gather=True, g=gate, tma=False)),
        (f"new {GATED_H[0]}, untransposed buffer",
         kernel(dy, gh, dw_flat, GATED_H[0], a_gather=True, tma=False)),
    ]  # fmt: skip
    rows = kernel_us_twice(cases, label_width=58)

    steps = []
    for s in B.SHAPES:
        if s.kind != "ffn":
            continue
        t = B.make_inputs(s, "cuda")
        params = B.trained_tensors(t)
        dense = B.time_fwd_bwd(*B.dense_equal_flops(s, "cuda"))[0]
        launch: dict = {}
        fn = lambda: B.ours_fused(s, t, True, **launch)
        old = ("before: gate in the loop, pointer stores", (False, False), OLD)
        variants = [old]
        variants += [(f"g * h, pointer stores {cfg}", (True, False), cfg) for cfg in GATED_H[:3]]
        variants += [(f"g * h, TMA stores {cfg}", (True, True), cfg) for cfg in GATED_H]
        variants += [old]
        for name, on, cfg in variants:
            switches(*on)
            launch["gemm_configs"] = {"grad_w_down": cfg}
            ms = B.time_fwd_bwd(fn, params)[0]
            steps.append({"shape": s.name, "variant": name, "fwd_bwd_ms": ms,
                          "pct_of_dense": dense / ms})  # fmt: skip
            print(f"{s.name:18s} {name:52s} {ms:.4f} ms ({dense / ms:.1%} of dense)")
        switches(True, True)
        torch.cuda.empty_cache()
    write_results("ab_wgrad_down", {"meta": metadata(), "new_vs_old_rel_diff": diff,
                                    "kernels": rows, "fwd_bwd": steps},
                  script_file=__file__, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
