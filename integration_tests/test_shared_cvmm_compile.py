"""SwitchHead's expert projections and sigma-MoE's feedforward share ``cvmm_kernel``'s routing
and kernels (``moe_linear`` and ``moe_mlp``); a model with both compiles with
``torch.compile(fullgraph=True)`` (a graph break raises) and the compiled model equals the eager
one, outputs and gradients, on CPU."""

from __future__ import annotations

import copy

import torch
from moeut import SigmaMoE
from switchhead import SwitchHeadRope


class TinyBlock(torch.nn.Module):
    """Pre-norm residual block: SwitchHead (cvmm expert projections) then sigma-MoE."""

    def __init__(self, d_model: int = 32) -> None:
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(d_model)
        self.attention = SwitchHeadRope(
            d_model, n_heads=2, n_experts=8, d_head=8, moe_k=2, expert_impl="cvmm"
        )
        self.norm2 = torch.nn.LayerNorm(d_model)
        self.ffn = SigmaMoE(d_model, n_experts=8, expert_size=8, k=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h)[0]  # causal by default
        return x + self.ffn(self.norm2(x))


def _cvmm_ops_in(graph: torch.fx.Graph) -> set[str]:
    return {
        str(node.target)
        for node in graph.nodes
        if node.op == "call_function" and "cvmm_kernel" in str(node.target)
    }


def _step(model, module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor):
    """Output of ``model`` and gradients of ``sum(out * weight)`` (input, ``module``'s params)."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    (out * weight).sum().backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}
    return out.detach(), grads


def test_switchhead_and_sigma_moe_compile_fullgraph(generator):
    torch.manual_seed(0)
    eager = TinyBlock()
    assert eager.attention.expert_impl == "cvmm"
    compiled_model = copy.deepcopy(eager)

    seen: list[set[str]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        """Inductor, after noting which cvmm ops the captured graph calls."""
        from torch._inductor.compile_fx import compile_fx

        seen.append(_cvmm_ops_in(gm.graph))
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    x = torch.randn(2, 12, 32, generator=generator)
    weight = torch.randn(2, 12, 32, generator=generator)
    out_eager, grads_eager = _step(eager, eager, x, weight)
    out_compiled, grads_compiled = _step(compiled, compiled_model, x, weight)

    assert len(seen) == 1  # one graph: fullgraph=True would have raised on a break
    # both packages' expert products went through cvmm_kernel's custom ops, not a fallback
    for op in ("moe_routing", "moe_linear_forward", "moe_mlp_forward"):
        assert any(op in name for name in seen[0]), seen[0]
    # fp32; Inductor fuses and reorders the reductions, so compiled and eager differ by
    # rounding (observed ~1e-6); 1e-4 relative is far below any real error
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
    assert grads_eager.keys() == grads_compiled.keys()
    for name, g in grads_eager.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads_compiled[name], g, rtol=1e-4, atol=1e-5, msg=name)
