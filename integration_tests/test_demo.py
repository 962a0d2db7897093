"""The training demo: a short run learns, its checkpoint reloads to the same logits, it samples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[1] / "examples" / "train_lm.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("train_lm_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_run_learns_and_checkpoint_reloads(demo, tmp_path):
    import argparse

    data = argparse.__file__  # one standard-library source file (~100 KB)
    result = demo.main(
        [
            "--steps",
            "40",
            "--eval-every",
            "20",
            "--batch-size",
            "8",
            "--seq-len",
            "64",
            "--data",
            str(data),
            "--out",
            str(tmp_path),
            "--sample-tokens",
            "20",
            "--device",
            "cpu",
        ]
    )
    train = [loss for _, loss in result["history"]["train"]]
    # An untrained model starts near log(256) = 5.5 nats per byte; 40 steps on Python source
    # must bring it far below that (a stuck or broken training loop stays above 4).
    assert train[0] > 5.0
    assert sum(train[-5:]) / 5 < 3.3
    assert len(result["sample"]) >= 4
    for name in ("checkpoint.pt", "loss.png", "experts.png", "sample.txt", "history.json"):
        assert (tmp_path / name).is_file()

    args = demo.parse_args(["--profile", "tiny", "--device", "cpu"])
    args.profile = "tiny"
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    first, second = demo.build_model(args, 256), demo.build_model(args, 256)
    first.load_state_dict(state["model"])
    second.load_state_dict(state["model"])
    x = torch.randint(0, 256, (2, 16))
    first.eval(), second.eval()
    torch.testing.assert_close(first(x).outputs, second(x).outputs, rtol=0, atol=0)


def test_bad_arguments_fail_clearly(demo, tmp_path):
    with pytest.raises(SystemExit):
        demo.parse_args(["--resume", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", "0"])
    with pytest.raises(FileNotFoundError, match="--data"):
        demo.main(["--data", str(tmp_path / "nothing-here"), "--out", str(tmp_path)])


def test_data_parallel_run_with_two_cpu_processes(tmp_path):
    """torchrun with 2 gloo processes: it trains, and both ranks end with identical weights."""
    import argparse
    import re
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(DEMO),
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--data",
        argparse.__file__,
        "--out",
        str(tmp_path),
        "--sample-tokens",
        "5",
        "--device",
        "cpu",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    sums = dict(re.findall(r"rank (\d) parameter checksum (\S+)", run.stdout))
    assert set(sums) == {"0", "1"}
    assert sums["0"] == sums["1"]  # gradients were averaged: the replicas stayed identical
    assert "x 2 processes" in run.stdout
    assert (tmp_path / "checkpoint.pt").is_file()
