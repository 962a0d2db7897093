"""The demo's ``--fsdp`` and ``--activation-checkpointing`` (issue #18, item 5) on CPU.

Two gloo processes (spawned as in ``test_fsdp.py``) run the demo's ``main`` three times in one
process group: FSDP2 with activation checkpointing trains like DDP, writes a checkpoint in the
single-process format on rank 0 alone, and resumes from it exactly where the uninterrupted run
was (``test_demo_checkpoints.py`` covers the interruption itself). In one process: expert usage
is counted once per layer application under activation checkpointing, and the flags fail
clearly where they cannot work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from integration_tests.conftest import CPU_FSDP

DATA = argparse.__file__  # one standard-library source file (~100 KB)
WORLD = 2
SHARDED = ("--fsdp", "--activation-checkpointing")


def run_flags(out: Path, *extra: str) -> list[str]:
    return [
        "--profile",
        "tiny",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--grad-accum",
        "2",
        "--warmup",
        "1",
        "--data",
        DATA,
        "--out",
        str(out),
        "--sample-tokens",
        "6",
        "--device",
        "cpu",
        *extra,
    ]


def _demo_worker(rank: int, port: int, tmp: str) -> None:
    """A ``--fsdp --activation-checkpointing`` run (its step-2 checkpoint copied aside, as a run
    stopped there leaves it), the same run with DDP, and ``--resume`` from the copy."""
    torch.set_num_threads(1)
    # As torchrun sets them (the demo reads WORLD_SIZE and, on CUDA, LOCAL_RANK).
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),  # a failing rank must not hang the other
    )
    try:
        from integration_tests.conftest import load_demo

        demo = load_demo("train_lm_demo_fsdp")
        tmp = Path(tmp)
        real_save = demo.save_run_checkpoint

        def save_and_copy(out, step, *args, **kwargs):
            path = real_save(out, step, *args, **kwargs)
            if step == 2 and path is not None:  # rank 0, which alone writes
                shutil.copytree(out, tmp / "resumed")
            return path

        # No plots: they take seconds, and test_demo.py checks them.
        demo.plot_losses = demo.plot_expert_usage = lambda *args, **kwargs: None
        demo.save_run_checkpoint = save_and_copy
        straight = demo.main(run_flags(tmp / "straight", *SHARDED))
        demo.save_run_checkpoint = real_save
        ddp = demo.main(run_flags(tmp / "ddp"))
        dist.barrier()  # the copy is complete before any rank reads it
        resumed = demo.main(["--resume", str(tmp / "resumed"), "--device", "cpu", *SHARDED])
        if rank == 0:
            torch.save(
                {
                    name: {"history": r["history"], "sample": r["sample"]}
                    for name, r in (("straight", straight), ("ddp", ddp), ("resumed", resumed))
                },
                tmp / "result.pt",
            )
        else:
            assert straight["sample"] == resumed["sample"] == ""  # rank 0 alone reports
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """The runs of :func:`_demo_worker` (one spawn for all tests of this module)."""
    tmp = tmp_path_factory.mktemp("demo_fsdp")
    # The spawned processes unpickle the worker as ``integration_tests.test_demo_fsdp._...``.
    mp_path = pytest.MonkeyPatch()
    mp_path.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    try:
        from integration_tests.conftest import free_port

        mp.spawn(_demo_worker, args=(free_port(), str(tmp)), nprocs=WORLD, join=True)
    finally:
        mp_path.undo()
    return tmp, torch.load(tmp / "result.pt")


needs_dist = pytest.mark.skipif(
    not dist.is_available() or not CPU_FSDP,
    reason="torch.distributed is not available, or FSDP2 on CPU needs torch >= 2.6",
)


@needs_dist
def test_fsdp_run_writes_a_single_process_checkpoint(demo, fsdp_runs):
    """Rank 0 alone writes the run folder; the checkpoint has the single-process format (the
    same files, tensor names and shapes, integer optimizer ids as a DDP run's) and loads into
    a plain model."""
    from lm_demo.checkpoint import load_checkpoint

    tmp, _ = fsdp_runs
    folder = tmp / "straight"
    for name in ("checkpoint.json", "sample.txt", "history.json"):
        assert (folder / name).is_file(), name
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2  # not once per rank
    sharded, replicated = load_checkpoint(folder), load_checkpoint(tmp / "ddp")
    assert sharded.step == replicated.step == 4
    assert sharded.settings == replicated.settings
    assert sharded.model.keys() == replicated.model.keys()
    for name, tensor in replicated.model.items():
        assert sharded.model[name].shape == tensor.shape, name
    opt_a, opt_b = sharded.state["optimizer"], replicated.state["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    assert all(isinstance(k, int) for k in opt_a["state"])
    model = demo.load_model(folder)  # one process, no process group
    assert sum(p.numel() for p in model.parameters()) > 0


@needs_dist
def test_fsdp_with_activation_checkpointing_trains_like_ddp(demo, fsdp_runs):
    """The same batches per rank, gradients averaged either way (here over 2 micro-batches):
    FSDP2 with activation checkpointing ends where DDP does, up to float32 rounding."""
    from lm_demo.checkpoint import load_checkpoint

    tmp, r = fsdp_runs
    for (step_a, loss_a), (step_b, loss_b) in zip(
        r["straight"]["history"]["train"], r["ddp"]["history"]["train"], strict=True
    ):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-4)
    sharded, replicated = load_checkpoint(tmp / "straight"), load_checkpoint(tmp / "ddp")
    for name, tensor in replicated.model.items():
        torch.testing.assert_close(sharded.model[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for key, state in replicated.state["optimizer"]["state"].items():
        for field, value in state.items():
            torch.testing.assert_close(
                sharded.state["optimizer"]["state"][key][field], value, rtol=1e-3, atol=1e-7
            )
    torch.manual_seed(0)  # the demo's initial weights (seed 0)
    initial = demo.build_model(demo.parse_args(["--profile", "tiny"]), 256).state_dict()
    moved = max((replicated.model[n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 1e-3  # the runs did train


@needs_dist
def test_fsdp_resume_continues_exactly(fsdp_runs):
    """Resumed under FSDP from the checkpoint of step 2: the same losses, sample, final weights
    and optimizer state as the uninterrupted run, bit for bit."""
    from lm_demo.checkpoint import load_checkpoint

    tmp, r = fsdp_runs
    assert r["resumed"]["history"] == r["straight"]["history"]
    assert len(r["resumed"]["history"]["train"]) == 4
    assert r["resumed"]["sample"] == r["straight"]["sample"] != ""
    a, b = load_checkpoint(tmp / "straight"), load_checkpoint(tmp / "resumed")
    assert a.step == b.step == 4
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
    for key, state in a.state["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(value, b.state["optimizer"]["state"][key][field]), (key, field)
    assert a.state["scheduler"] == b.state["scheduler"]
    assert json.loads((tmp / "resumed" / "history.json").read_text()) == json.loads(
        json.dumps(r["straight"]["history"])
    )


def test_expert_usage_counted_once_under_activation_checkpointing(demo, one_thread):
    """The demo's usage counter (hooks reading the logits the layers record) gives the same
    counts with activation checkpointing, although the backward pass reruns the layers."""
    import torch.nn.functional as F
    from lm_demo.metrics import ExpertUsage

    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    counts = {}
    for ac in (False, True):
        torch.manual_seed(0)
        model = demo.build_model(demo.parse_args(["--profile", "tiny"]), 256).train()
        model.activation_checkpointing = ac
        usage = ExpertUsage(model)
        calls = []
        for name, module in model.named_modules():
            if name.endswith((".ffn", ".attention")):  # the hooked MoE layers
                module.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        out = model(x[:, :-1])
        loss = F.cross_entropy(out.outputs.flatten(0, 1), x[:, 1:].flatten())
        (loss + out.reg_loss).backward()
        counts[ac] = ({u.name: (u.counts, u.applications) for u in usage.take()}, len(calls))
        usage.close()
    (plain, plain_calls), (checkpointed, checkpointed_calls) = counts[False], counts[True]
    assert checkpointed_calls > plain_calls  # the layers did run again in backward
    assert plain.keys() == checkpointed.keys() and plain
    for name, (count, applications) in plain.items():
        assert torch.equal(checkpointed[name][0], count), name
        assert checkpointed[name][1] == applications == 2, name  # 2 repeats of each layer


def test_fsdp_flags_fail_clearly(demo, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        demo.parse_args(["--fsdp"])
    err = capsys.readouterr().err
    assert "--fsdp" in err and "torchrun" in err
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1
    with pytest.raises(SystemExit):
        demo.parse_args(["--fsdp"])
    assert "2 or more" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert demo.parse_args(["--fsdp"]).fsdp
    for flag in SHARDED:
        with pytest.raises(SystemExit):
            demo.parse_args(["--attention", "colt5", flag])
        assert "not for colt5" in capsys.readouterr().err
