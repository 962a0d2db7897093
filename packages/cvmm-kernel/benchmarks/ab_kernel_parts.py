r"""What each part of the 244M shape's GEMM and weight-gradient kernels costs (bf16, medians).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':')packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_kernel_parts.py

One process, MoEUT-244M's FFN shape (T=8192, d=1024, 387 experts of 128, k=16), each kernel
timed alone (``triton.testing.do_bench``, L2 flushed between calls) at its shipped settings with
one part changed at a time: the hidden-gradient GEMM without its epilogue (activation backward,
gate and gate gradient) and with its weights in the other layout, the up projection without its
activation, the weight gradients without the gate, and dW_down computed as dW_up is
(``(g * dy[token])^T h``, written through a transpose: "swapped"). The committed JSON also has
the swapped form with the gate on ``h`` instead, measured with a kernel option since removed
(no faster). Writes ``ab_kernel_parts.json`` to ``$OUT``
(else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from bench_cvmm import routed_rows
from bench_harness import kernel_us_twice, metadata, require_cuda, write_results


def main() -> int:
    if not require_cuda(__file__):
        return 2
    from cvmm_kernel import moe_ops
    from cvmm_kernel import moe_triton as kt

    tokens, d, n_exp, hid, k = 8192, 1024, 387, 128, 16
    dt = torch.bfloat16
    x, dy, gate, r = routed_rows(tokens, d, n_exp, k)
    w_up = torch.randn(n_exp, d, hid, device="cuda", dtype=dt) / 32
    w_down = torch.randn(n_exp, hid, d, device="cuda", dtype=dt) / 11
    w_down_t = w_down.transpose(1, 2).contiguous()  # [E, d, hid]: grad_hidden's B, contiguous
    n = tokens * k
    h = torch.empty(n, hid, device="cuda", dtype=dt)
    out = torch.empty(n, hid, device="cuda", dtype=dt)
    parts = torch.empty(2, n, device="cuda")
    cfg_up = moe_ops._config("up", d, hid)
    cfg_gh = moe_ops._config("grad_hidden", d, hid)

    def up(epilogue, w=w_up, cfg=cfg_up):
        return lambda: kt.moe_gemm(x, w, h if epilogue else out, r, k, a_gather=True,
                                   out_mode=kt.OUT_SORTED, epilogue=epilogue, activation="relu",
                                   config=cfg)  # fmt: skip

    def grad_hidden(epilogue, w, cfg=cfg_gh):
        extra = dict(activation="relu", gate=gate, aux=parts, h=h) if epilogue else {}
        return lambda: kt.moe_gemm(dy, w, out, r, k, a_gather=True, out_mode=kt.OUT_SORTED,
                                   epilogue=epilogue, config=cfg, **extra)  # fmt: skip

    def wgrad(role, gated, swapped=None):
        dw_shape = (n_exp, d, hid) if role == "grad_w_up" else (n_exp, hid, d)
        dw = torch.empty(dw_shape, device="cuda", dtype=dt)
        # dW_down in this form: the settings it shipped with before (ab_wgrad_down.py)
        cfg = moe_ops._config(role, *dw_shape[1:]) if role == "grad_w_up" else (128, 128, 128, 4, 3)
        if role == "grad_w_up":
            return lambda: kt.moe_weight_grad(x, out, dw, r, k, a_gather=True, b_gather=False,
                                              config=cfg)  # fmt: skip
        if swapped is not None:  # dW_down^T = (g * dy[token])^T h, written through a transpose
            dw_t = dw.transpose(1, 2)
            return lambda: kt.moe_weight_grad(dy, h, dw_t, r, k, a_gather=True, b_gather=False,
                                              gate=gate, config=swapped)  # fmt: skip
        return lambda: kt.moe_weight_grad(h, dy, dw, r, k, a_gather=False, b_gather=True,
                                          gate=gate if gated else None, config=cfg)  # fmt: skip

    up(kt.EPI_ACTIVATION)()  # h for the others
    cases = [
        ("up: shipped (relu epilogue)", up(kt.EPI_ACTIVATION)),
        ("up: no epilogue", up(kt.EPI_NONE)),
        ("up: grad_hidden's settings", up(kt.EPI_ACTIVATION, cfg=cfg_gh)),
        ("grad_hidden: shipped (W_down^T view)", grad_hidden(kt.EPI_ACTIVATION_BACKWARD,
                                                             w_down.transpose(1, 2))),
        ("grad_hidden: no epilogue", grad_hidden(kt.EPI_NONE, w_down.transpose(1, 2))),
        ("grad_hidden: W_down^T contiguous", grad_hidden(kt.EPI_ACTIVATION_BACKWARD, w_down_t)),
        ("grad_hidden: no epilogue, W_down^T contiguous", grad_hidden(kt.EPI_NONE, w_down_t)),
        ("grad_hidden: up's settings", grad_hidden(kt.EPI_ACTIVATION_BACKWARD,
                                                   w_down.transpose(1, 2), cfg_up)),
        ("grad_w_up: shipped", wgrad("grad_w_up", False)),
        ("grad_w_down: shipped (gated)", wgrad("grad_w_down", True)),
        ("grad_w_down: no gate", wgrad("grad_w_down", False)),
        *[(f"grad_w_down: swapped {cfg}", wgrad("grad_w_down", True, cfg))
          for cfg in ((64, 128, 128, 4, 4), (128, 128, 128, 4, 3), (64, 128, 128, 8, 3))],
    ]  # fmt: skip
    ref = torch.empty(n_exp, hid, d, device="cuda", dtype=torch.float32)
    swapped = torch.empty_like(ref)
    kt.moe_weight_grad(h, dy, ref, r, k, a_gather=False, b_gather=True, gate=gate,
                       config=(128, 128, 128, 4, 3))  # fmt: skip
    kt.moe_weight_grad(dy, h, swapped.transpose(1, 2), r, k, a_gather=True, b_gather=False,
                       gate=gate, config=(64, 128, 128, 4, 4))  # fmt: skip
    swap_diff = float((swapped - ref).norm() / ref.norm())
    print(f"grad_w_down swapped vs shipped (float32 out): rel. diff {swap_diff:.1e}")
    rows = kernel_us_twice(cases, label_width=48)
    write_results("ab_kernel_parts", {"meta": metadata(), "rows": rows,
                  "grad_w_down_swapped_rel_diff": swap_diff}, script_file=__file__,
                  indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
