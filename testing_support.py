"""Helpers shared by the tests of every package (not part of any package; see DESIGN.md "Tests and
tolerances"). The root ``conftest.py`` puts this directory on ``sys.path``, so a test imports
``from testing_support import ...`` in every session (``tests``, ``interpret``, ``gpu``,
``matrix``); it needs only torch and pytest, so a package's tests still run with that package
alone installed.

- :func:`rel_error` and :func:`assert_rel_close`: the relative Frobenius error
  ``||a - b|| / ||b||`` computed in float64, the measure of every comparison with an oracle.
- :data:`TOLERANCES` and :func:`tolerance`: DESIGN.md's table of allowed errors per dtype.
- :data:`BACKENDS` (and its parts): the ``(backend, device)`` parameter sets, with the
  ``interpret`` / ``gpu`` markers that the root ``conftest.py`` turns into skips.
- :func:`capture_cuda_graph`: a training step captured in a CUDA graph after a warm-up.
- :func:`assert_compiled_matches_eager`: ``torch.compile(fullgraph=True)`` of a module gives the
  eager outputs and parameter gradients.
- :data:`TINY_MOEUT` and :data:`TINY_VOCAB`: the sizes of the tiny MoEUT LM that moeut's tests
  and the integration tests build (fast on CPU).
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch

__all__ = [
    "BACKENDS",
    "BACKENDS_WITH_CUDA_REFERENCE",
    "DEVICES",
    "REFERENCE_CPU",
    "REFERENCE_CUDA",
    "TINY_MOEUT",
    "TINY_VOCAB",
    "TOLERANCES",
    "TRITON_CUDA",
    "TRITON_INTERPRET",
    "assert_compiled_matches_eager",
    "assert_rel_close",
    "capture_cuda_graph",
    "rel_error",
    "tolerance",
]

Kind = Literal["matmul", "attention"]

# The tiny MoEUT LM of moeut's tests and the integration tests (MoEUTLM / MoEUTConfig keywords).
TINY_VOCAB = 40
TINY_MOEUT = dict(
    d_model=32,
    n_layers=4,
    n_heads=2,
    ff_n_experts=8,
    att_n_experts=4,
    d_head=8,
    ff_k=2,
    ff_expert_size=16,
)

# ---------------------------------------------------------------- relative error -------------


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius norms) in float64, on ``expected``'s
    device. A zero ``expected`` divides by 1e-30 instead, so any nonzero ``actual`` fails."""
    expected = expected.detach().double()
    actual = actual.detach().to(device=expected.device, dtype=torch.float64)
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


# ---------------------------------------------------------------- tolerances -----------------

# DESIGN.md "Tests and tolerances": relative error allowed against the float64 oracle, per input
# dtype and kind of op. bfloat16 attention kernels round probabilities and dS to bf16 before the
# MMAs (as FlashAttention), hence their looser bound.
TOLERANCES: dict[tuple[torch.dtype, Kind], float] = {
    (torch.float64, "matmul"): 1e-12,
    (torch.float64, "attention"): 1e-12,
    (torch.float32, "matmul"): 1e-5,
    (torch.float32, "attention"): 1e-5,
    (torch.bfloat16, "matmul"): 1e-2,
    (torch.bfloat16, "attention"): 3e-2,
    (torch.float16, "matmul"): 5e-3,
    (torch.float16, "attention"): 5e-3,
}


def tolerance(dtype: torch.dtype, kind: Kind = "matmul") -> float:
    """The allowed relative error of ``dtype`` inputs for an op of ``kind`` (DESIGN.md table)."""
    try:
        return TOLERANCES[(dtype, kind)]
    except KeyError:
        raise ValueError(f"no tolerance for dtype={dtype}, kind={kind!r}") from None


def assert_rel_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tol: float | None = None,
    *,
    dtype: torch.dtype | None = None,
    kind: Kind = "matmul",
    msg: object = None,
) -> float:
    """Assert ``rel_error(actual, expected) < tol``; without ``tol``, the table's value for
    ``dtype`` (default: ``actual``'s dtype) and ``kind``. Returns the error."""
    if tol is None:
        tol = tolerance(actual.dtype if dtype is None else dtype, kind)
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    err = rel_error(actual, expected)
    where = "" if msg is None else f"{msg}: "
    assert err < tol, f"{where}relative error {err:.3e} >= {tol:.1e}"
    return err


# ---------------------------------------------------------------- backend parameter sets -----

# (backend, device) pairs with the markers the root conftest.py turns into skips.
REFERENCE_CPU = pytest.param("reference", "cpu", id="reference-cpu")
TRITON_INTERPRET = pytest.param("triton", "cpu", id="triton-interpret", marks=pytest.mark.interpret)
TRITON_CUDA = pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu)
REFERENCE_CUDA = pytest.param("reference", "cuda", id="reference-cuda", marks=pytest.mark.gpu)

# the reference on CPU, Triton in the interpreter and on CUDA
BACKENDS = [REFERENCE_CPU, TRITON_INTERPRET, TRITON_CUDA]
BACKENDS_WITH_CUDA_REFERENCE = [*BACKENDS, REFERENCE_CUDA]
# a plain device parameter: CPU always, CUDA under the ``gpu`` marker
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


# ---------------------------------------------------------------- CUDA graphs ----------------


def capture_cuda_graph(step, leaves) -> tuple[torch.cuda.CUDAGraph, object]:
    """``step()`` (a forward + backward into ``leaves``' gradients) run twice on a side stream
    to warm up, then captured in a CUDA graph with the gradients cleared before each run.
    Returns the graph and the captured call's result (its tensors are refreshed by each
    ``graph.replay()``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for t in leaves:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


# ---------------------------------------------------------------- torch.compile --------------


def assert_compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor, loss=torch.sum) -> None:
    """``torch.compile(model, fullgraph=True)`` (a graph break raises) gives ``model``'s eager
    output for ``x`` (float32: 1e-5) and the same gradients of ``loss(out)`` for every parameter
    (1e-4 relative: Inductor reorders the reductions)."""
    eager = model(x)
    loss(eager).backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = torch.compile(model, fullgraph=True)(x)
    loss(out).backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


class TinySigmaMoE(torch.nn.Module):
    """A sigma-MoE feedforward on cvmm-kernel's ``moe_mlp`` (its compile tests)."""

    def __init__(self, d=16, n_experts=6, hid=8, k=2):
        super().__init__()
        self.k = k
        self.sel = torch.nn.Linear(d, n_experts, bias=False)
        self.w_up = torch.nn.Parameter(torch.randn(n_experts, d, hid) / d**0.5)
        self.w_down = torch.nn.Parameter(torch.randn(n_experts, hid, d) / hid**0.5)

    def forward(self, x):
        from cvmm_kernel import moe_mlp

        gate, index = self.sel(x).sigmoid().topk(self.k, dim=-1)
        return moe_mlp(
            x, index, gate, self.w_up, self.w_down, "gelu", index_bound=self.w_up.shape[0]
        )


class TinyExpertProjections(torch.nn.Module):
    """SwitchHead's value and output projections on cvmm-kernel's ``moe_linear`` (its compile
    tests)."""

    def __init__(self, d=16, heads=2, n_experts=3, d_head=8, k=2):
        super().__init__()
        self.heads, self.n_experts, self.k = heads, n_experts, k
        self.sel = torch.nn.Linear(d, heads * n_experts, bias=False)
        self.v = torch.nn.Parameter(torch.randn(heads * n_experts, d, d_head) / d**0.5)
        self.o = torch.nn.Parameter(torch.randn(heads * n_experts, d_head, d) / d_head**0.5)

    def forward(self, x):
        from cvmm_kernel import moe_linear

        scores = self.sel(x).view(*x.shape[:-1], self.heads, self.n_experts).sigmoid()
        gate, index = scores.topk(self.k, dim=-1)
        index = index + torch.arange(self.heads, device=x.device)[:, None] * self.n_experts
        bound = self.heads * self.n_experts
        v = moe_linear(x, index, gate, self.v, index_bound=bound)
        return moe_linear(v, index, gate, self.o, reduce_groups=True, index_bound=bound)
