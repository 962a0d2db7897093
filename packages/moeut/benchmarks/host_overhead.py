r"""Host time of an eager MoEUT training step and of its MoE ops (CUDA), with the GPU kept idle.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/host_overhead.py

An eager step is host-bound when the host takes longer to issue its kernels than the GPU to run
them (``profile_step.py``: wall time above kernel time). This script measures the host side alone:
the MoEUT-244M layer structure (18 layers in groups of 2, 4 heads x 10 attention experts with
k=2, 387 feedforward experts with k=16) at tiny widths and 64 tokens, so that every kernel is
short and the time per call is the host's. Rows: the forward and the backward of the LM step, the
same for the dense baseline of ``bench_moeut.py`` at the same tiny width, and per call the MoE
pieces (routing, top-k, ``moe_linear``, ``moe_mlp``, a SwitchHead and a SigmaMoE layer, forward
alone and with the backward, and a whole MoEUT layer's forward). Writes
JSON and markdown to ``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_harness import (
    environment_line,
    host_us,
    metadata,
    require_cuda,
    table_header,
    write_results,
)
from bench_moeut import DenseLM
from cvmm_kernel import moe_linear, moe_mlp, topk_indices
from cvmm_kernel.moe_triton import build_routing
from moeut import MoEUTLM, profiles

VOCAB, BATCH, SEQ = 8000, 1, 64
TINY = dict(profiles.MoEUT_244M, d_model=128, d_head=32, ff_expert_size=16)


def step_parts(model: torch.nn.Module) -> tuple[float, float]:
    """(forward, backward) host ms of one LM step under bf16 autocast: each timed from a synced
    start to the return of the call that issues its kernels."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device="cuda")
    fwd, bwd = [], []
    for i in range(25):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens[:, :-1])
            logits, reg = (out, 0.0) if torch.is_tensor(out) else (out.outputs, out.reg_loss)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()) + reg
        mid = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if i >= 5:
            fwd.append((mid - start) * 1e3)
            bwd.append((end - mid) * 1e3)
    return sorted(fwd)[len(fwd) // 2], sorted(bwd)[len(bwd) // 2]


# The MoE ops' sizes per call: 4 heads x 10 attention experts (k=2), 387 feedforward experts
# (k=16), at tiny widths.
HEADS, ATT_E, ATT_K, FF_E, FF_K = 4, 10, 2, 387, 16


def op_inputs(tokens: int = BATCH * SEQ) -> dict[str, torch.Tensor]:
    """The operands of ``moe_linear`` (V: ``x, index, gate, w_v``) and ``moe_mlp`` (``x,
    ff_index, ff_gate, w_up, w_down``) at the sizes above, bf16 on CUDA, and the attention
    router's ``logits``."""
    dev, bf16 = "cuda", torch.bfloat16
    logits = torch.randn(tokens, HEADS, ATT_E, device=dev)
    index = topk_indices(logits, ATT_K) + torch.arange(HEADS, device=dev)[:, None] * ATT_E
    grad = dict(device=dev, dtype=bf16, requires_grad=True)
    return dict(
        x=torch.randn(tokens, 128, **grad),
        logits=logits,
        index=index,
        gate=torch.rand(tokens, HEADS, ATT_K, **grad),
        w_v=torch.randn(HEADS * ATT_E, 128, 32, **grad),
        ff_index=topk_indices(torch.randn(tokens, FF_E, device=dev), FF_K),
        ff_gate=torch.rand(tokens, FF_K, **grad),
        w_up=torch.randn(FF_E, 128, 16, **grad),
        w_down=torch.randn(FF_E, 16, 128, **grad),
    )


def op_cases() -> list[tuple[str, Callable[[], object]]]:
    """(name, call) of the MoE pieces timed per call: routing, top-k, ``moe_linear``,
    ``moe_mlp``, a SwitchHead and a SigmaMoE layer of the MoEUT-244M structure at tiny widths."""
    dev, bf16 = "cuda", torch.bfloat16
    t = op_inputs()
    x, logits, index, gate, w_v = (t[k] for k in ("x", "logits", "index", "gate", "w_v"))
    ff_index, ff_gate, w_up, w_down = (t[k] for k in ("ff_index", "ff_gate", "w_up", "w_down"))
    tokens, ff_e = x.shape[0], FF_E
    flat = ff_index.flatten().int()

    def linear_fwd():
        return moe_linear(x, index, gate, w_v, index_bound=w_v.shape[0])

    def linear_step():
        linear_fwd().sum().backward()

    def mlp_fwd():
        return moe_mlp(x, ff_index, ff_gate, w_up, w_down, "relu", index_bound=ff_e)

    def mlp_step():
        mlp_fwd().sum().backward()

    model = MoEUTLM(VOCAB, **TINY).cuda().train()
    layer = model.transformer.layers[0]
    h = torch.randn(BATCH, SEQ, 128, device=dev, requires_grad=True)

    def attention_fwd():
        with torch.autocast("cuda", dtype=bf16):
            return layer.attention(h, h, h)[0]  # (output, kv cache)

    def attention_step():
        attention_fwd().float().sum().backward()

    def ffn_fwd():
        with torch.autocast("cuda", dtype=bf16):
            return layer.ffn(h)

    def ffn_step():
        ffn_fwd().float().sum().backward()

    def layer_fwd():
        with torch.autocast("cuda", dtype=bf16):
            return layer(h)

    return [
        ("build_routing (387 experts)", lambda: build_routing(flat, ff_e, 128, 64)),
        ("topk_indices (k=16 of 387)", lambda: topk_indices(logits.new_empty(tokens, ff_e), 16)),
        ("moe_linear forward (V)", linear_fwd),
        ("moe_linear forward + backward (V)", linear_step),
        ("moe_mlp forward", mlp_fwd),
        ("moe_mlp forward + backward", mlp_step),
        ("SwitchHead layer forward", attention_fwd),
        ("SwitchHead layer forward + backward", attention_step),
        ("SigmaMoE layer forward", ffn_fwd),
        ("SigmaMoE layer forward + backward", ffn_step),
        ("MoEUT layer forward (attention + feedforward)", layer_fwd),
    ]


def op_rows() -> list[dict]:
    return [{"what": name, "host_us": host_us(fn)} for name, fn in op_cases()]


def main() -> int:
    if not require_cuda(__file__):
        return 2
    torch.manual_seed(0)
    rows = []
    for name, model in (
        ("MoEUT-244M structure", MoEUTLM(VOCAB, **TINY)),
        ("dense 18 layers", DenseLM(d=128, layers=18, heads=4, ff=512)),
    ):
        fwd, bwd = step_parts(model.cuda().train())
        rows.append({"what": f"{name}: LM step forward", "host_us": fwd * 1e3})
        rows.append({"what": f"{name}: LM step backward", "host_us": bwd * 1e3})
    rows += op_rows()
    meta = metadata(setup=f"tiny widths, B={BATCH}, T={SEQ}, bf16; host time per call")
    lines = [
        f"Host time per call, {environment_line(meta)} ({meta['setup']})",
        "",
        *table_header("what", "host us"),
    ]
    lines += [f"| {r['what']} | {r['host_us']:.0f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    write_results("host_overhead", {"meta": meta, "rows": rows}, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
