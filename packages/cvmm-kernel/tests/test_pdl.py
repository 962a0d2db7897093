"""Routing launches chained by programmatic dependent launch (``cvmm_kernel.pdl``): each kernel
may start while the one before ends and waits for it first, so the maps are those of launches
one after the other, eager and replayed from a CUDA graph, at sizes of many programs."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl


def _routings(flat_slots, flat_items):
    from cvmm_kernel.moe_ops import BLOCK_M, n_tiles
    from cvmm_kernel.moe_triton import build_routing
    from cvmm_kernel.pair_triton import build_pair_routing

    slots = build_routing(flat_slots, 387, BLOCK_M, n_tiles(flat_slots.numel(), 387, BLOCK_M))
    return [*slots, *build_pair_routing(flat_items, 32, BLOCK_M)]


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
def test_chained_routing_same_maps(graph, monkeypatch):
    from cvmm_kernel import pdl

    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(5)
    slots = torch.randn(8192, 387, device=device, generator=g).topk(16, dim=-1).indices
    per_head = torch.randn(8192, 4, 8, device=device, generator=g).topk(2, dim=-1).indices
    items = per_head + 8 * torch.arange(4, device=device).view(1, -1, 1)
    flat_slots, flat_items = slots.reshape(-1).contiguous(), items.reshape(-1).contiguous()
    results = []
    for enabled in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", [enabled])
        capable = torch.cuda.get_device_capability()[0] >= 9
        assert pdl.chained(device) == (
            enabled and pdl.AVAILABLE and capable and pdl.driver_version() >= pdl.MIN_DRIVER
        )
        out = _routings(flat_slots, flat_items)
        if graph:
            torch.cuda.synchronize()
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                out = _routings(flat_slots, flat_items)
            for t in out:
                t.fill_(-7)  # poison, then replay
            captured.replay()
        torch.cuda.synchronize()
        results.append([t.clone() for t in out])
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), i


def test_not_chained_off_cuda():
    from cvmm_kernel import pdl

    assert not pdl.chained(torch.device("cpu"))


@triton.jit
def _store_pdl(out_ptr, PDL: tl.constexpr = False):
    tl.store(out_ptr, PDL)


@triton.jit
def _store_one(out_ptr):
    tl.store(out_ptr, 1)


@pytest.mark.interpret
def test_launch_passes_pdl_only_to_kernels_that_end_with_it():
    """``launch`` appends ``PDL`` (false off CUDA) where the kernel's last parameter is ``PDL``
    and the caller stopped before it; a value passed is kept, and other kernels get nothing."""
    from cvmm_kernel.launcher import _takes_pdl, launch

    out = torch.full((1,), 7, dtype=torch.int32)
    launch(_store_pdl, (1,), out)
    assert out.item() == 0
    assert _takes_pdl(_store_pdl, 1) and not _takes_pdl(_store_pdl, 2)
    assert not _takes_pdl(_store_one, 1)
    launch(_store_one, (1,), out)
    assert out.item() == 1
