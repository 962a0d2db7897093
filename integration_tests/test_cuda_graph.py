"""A whole training step (forward + backward) of MoEUTLM and of a SwitchHead layer is captured in
a CUDA graph and replayed on new inputs, giving the eager step's loss and gradients: the step
has no host synchronisation and no host-side state that a replay would freeze (GPU only)."""

from __future__ import annotations

import pytest
import torch
from bench_harness import graph_replay  # the benchmarks' warm-up-then-capture
from moeut import MoEUTLM
from switchhead import SwitchHeadRope, SwitchHeadXL, shared_projection

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")]


def _graph_matches_eager(model: torch.nn.Module, static_in: torch.Tensor, loss_of, new_inputs):
    """Capture ``loss_of(model, static_in).backward()``; for each of ``new_inputs`` compare the
    replayed loss and gradients with an eager step on the same input."""
    params = [p for p in model.parameters() if p.requires_grad]
    static_loss = torch.zeros((), device="cuda")

    def step():
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        # autocast's weight cache must be off while a graph is captured
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = loss_of(model, static_in)
        loss.backward()
        static_loss.copy_(loss.detach())

    replay = graph_replay(step)
    for x in new_inputs:
        static_in.copy_(x)
        replay()
        torch.cuda.synchronize()
        graph_loss = static_loss.clone()
        graph_grads = [p.grad.clone() for p in params]
        step()  # eager, same input
        torch.testing.assert_close(graph_loss, static_loss, rtol=1e-5, atol=1e-5)
        for g, p in zip(graph_grads, params):
            # dr/dk/dv of the XL kernels and dense atomics add in any order: tolerance, not bits
            torch.testing.assert_close(g, p.grad, rtol=2e-2, atol=1e-4)


@pytest.fixture(params=[False, True], ids=["projection-per-application", "projection-shared"])
def shared_projections(request):
    """``switchhead.shared_projection.ENABLED`` off and on."""
    shipped = shared_projection.ENABLED[0]
    shared_projection.ENABLED[0] = request.param
    yield
    shared_projection.ENABLED[0] = shipped


# an autograd graph kept alive from an earlier step (a reference cycle) breaks the capture
@pytest.mark.filterwarnings("error:The AccumulateGrad node's stream")
@pytest.mark.parametrize("attention", [SwitchHeadRope, SwitchHeadXL])
def test_moeut_lm_step_replays_from_a_cuda_graph(attention, shared_projections):
    torch.manual_seed(0)
    model = MoEUTLM(
        n_tokens=64,
        d_model=64,
        n_layers=4,
        n_heads=2,
        ff_n_experts=16,
        att_n_experts=4,
        d_head=16,
        ff_k=4,
        ff_expert_size=32,
        attention=attention,
    ).cuda()
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randint(0, 64, (2, 33), device="cuda", generator=gen) for _ in range(3)]

    def loss_of(m, seq):
        logits = m(seq[:, :-1]).outputs
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), seq[:, 1:].flatten())

    _graph_matches_eager(model, batches[0].clone(), loss_of, batches[1:])


@pytest.mark.parametrize("expert_impl", ["dense", "cvmm"])
@pytest.mark.parametrize("attention", [SwitchHeadRope, SwitchHeadXL])
def test_switchhead_layer_step_replays_from_a_cuda_graph(attention, expert_impl):
    torch.manual_seed(0)
    layer = attention(64, 4, 8, d_head=16, expert_impl=expert_impl).cuda()
    gen = torch.Generator(device="cuda").manual_seed(2)
    xs = [torch.randn(2, 40, 64, device="cuda", generator=gen) for _ in range(3)]

    def loss_of(m, x):
        out, _ = m(x, x, x)
        return out.float().square().mean()

    _graph_matches_eager(layer, xs[0].clone(), loss_of, xs[1:])


def test_moeut_lm_trains_under_reduce_overhead_compile():
    """``torch.compile(mode="reduce-overhead")`` (Inductor's CUDA-graph trees) takes a whole
    MoEUTLM training step: no step is skipped from the graphs (no host sync, CPU tensor or input
    mutation in the way), and the replayed steps give the eager losses and gradients."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = MoEUTLM(n_tokens=64, d_model=64, n_layers=4, n_heads=2, ff_n_experts=16,
                    att_n_experts=4, d_head=16, ff_k=4, ff_expert_size=32).cuda()  # fmt: skip
    params = list(model.parameters())
    gen = torch.Generator(device="cuda").manual_seed(3)
    batches = [torch.randint(0, 64, (2, 33), device="cuda", generator=gen) for _ in range(4)]

    def step(run, seq):
        for p in params:
            p.grad = None
        logits = run(seq[:, :-1]).outputs  # float32: the same expert choices compiled and eager
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
        loss.backward()
        return loss.detach().clone(), [p.grad.clone() for p in params]

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for seq in batches:
        torch.compiler.cudagraph_mark_step_begin()
        loss_c, grads_c = step(compiled, seq)
        loss_e, grads_e = step(model, seq)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
        for g_c, g_e in zip(grads_c, grads_e, strict=True):
            torch.testing.assert_close(g_c, g_e, rtol=1e-3, atol=1e-4)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
