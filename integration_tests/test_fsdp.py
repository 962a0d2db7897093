"""Data parallelism on CPU (gloo, 2 processes): the rank-averaged entropy regulariser and FSDP2.

``reg_process_group`` averages expert usage over the whole batch of all ranks (the authors'
training code's "global" mode); one process with a group of its own on the concatenated batch is
the reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from moeut import MoEUTLM

from integration_tests.conftest import CPU_FSDP
from testing_support import TINY_MOEUT, TINY_VOCAB

WORLD = 2
BATCH, SEQ = 4, 9  # the full batch; each rank gets BATCH // WORLD sequences


def _tiny_lm(**kw) -> MoEUTLM:
    torch.manual_seed(0)
    return MoEUTLM(
        n_tokens=TINY_VOCAB,
        **TINY_MOEUT,
        entropy_reg=1.0,  # large, so that the regulariser matters in the comparisons
        att_entropy_reg=0.1,
        **kw,
    )


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))


def _init(rank: int, port: int):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    # Every rank takes part in creating every group; each then uses its own one-rank group.
    singletons = [dist.new_group([r]) for r in range(WORLD)]
    return singletons[rank]


def _shard(x: torch.Tensor, rank: int) -> torch.Tensor:
    n = x.shape[0] // WORLD
    return x[rank * n : (rank + 1) * n]


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad.clone() if p.grad is not None else torch.zeros_like(p)


def _regulariser_worker(rank: int, port: int, out: str) -> None:
    alone = _init(rank, port)
    try:
        model = _tiny_lm().train()
        x = _batch(0)
        model.reg_process_group = dist.group.WORLD
        reg_dp = model(_shard(x, rank)).reg_loss
        reg_dp.backward()
        grads_dp = [_grad(p) for p in model.parameters()]
        for g in grads_dp:  # what DDP/FSDP does: average over the ranks
            dist.all_reduce(g)
            g /= WORLD
        model.zero_grad()
        model.reg_process_group = alone
        reg_one = model(x).reg_loss
        reg_one.backward()
        grads_one = [_grad(p) for p in model.parameters()]
        model.zero_grad()
        model.reg_process_group = None
        reg_per_rank = model(_shard(x, rank)).reg_loss
        if rank == 0:
            torch.save(
                dict(
                    dp=reg_dp.detach(),
                    one=reg_one.detach(),
                    per_rank=reg_per_rank.detach(),
                    grads_dp=grads_dp,
                    grads_one=grads_one,
                ),
                out,
            )
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard

    alone = _init(rank, port)
    try:
        ref = _tiny_lm(reg_process_group=alone).train()
        model = _tiny_lm(reg_process_group=dist.group.WORLD).train()
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.transformer.layers:  # the shared layers, each sharded once
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
        for step in range(3):
            x = _batch(step + 1)
            for m, opt, xs in ((ref, opts[0], x), (model, opts[1], _shard(x, rank))):
                res = m(xs[:, :-1])
                # The mean over this rank's tokens; FSDP averages gradients over the ranks.
                loss = F.cross_entropy(res.outputs.flatten(0, 1), xs[:, 1:].flatten())
                (loss + res.reg_loss).backward()
                opt.step()
                opt.zero_grad()
        full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(
                dict(
                    fsdp=full,
                    ref=dict(ref.named_parameters()),
                    init=dict(_tiny_lm().named_parameters()),
                ),
                out,
            )
    finally:
        dist.destroy_process_group()


def _spawn(worker, tmp_path, monkeypatch) -> dict:
    # The spawned processes unpickle the worker as ``integration_tests.test_fsdp._...``.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    out = str(tmp_path / "result.pt")
    from integration_tests.conftest import free_port

    mp.spawn(worker, args=(free_port(), out), nprocs=WORLD, join=True)
    return torch.load(out)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_rank_averaged_regulariser_equals_full_batch(tmp_path, monkeypatch):
    r = _spawn(_regulariser_worker, tmp_path, monkeypatch)
    assert abs(r["dp"].item() - r["one"].item()) < 1e-6
    assert abs(r["per_rank"].item() - r["one"].item()) > 1e-4  # the option changes something
    for a, b in zip(r["grads_dp"], r["grads_one"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(not CPU_FSDP, reason="FSDP2 on CPU needs torch >= 2.6")
def test_fsdp2_training_equals_single_process(tmp_path, monkeypatch):
    r = _spawn(_fsdp_worker, tmp_path, monkeypatch)
    assert r["fsdp"].keys() == r["ref"].keys()
    moved = 0.0
    for name, ref in r["ref"].items():
        torch.testing.assert_close(r["fsdp"][name], ref.detach(), rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (ref.detach() - r["init"][name].detach()).abs().max().item())
    assert moved > 1e-3  # the three steps did train
