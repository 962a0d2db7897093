"""The training demo: a short run learns, its checkpoint reloads to the same logits, it samples."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[1] / "examples" / "train_lm.py"


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
    for name in ("checkpoint.json", "loss.png", "experts.png", "sample.txt", "history.json"):
        assert (tmp_path / name).is_file()

    # two models rebuilt from the checkpoint's settings and weights compute the same logits
    first, second = demo.load_model(tmp_path), demo.load_model(tmp_path / "checkpoint.json")
    x = torch.randint(0, 256, (2, 16))
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
    # the ranks share stdout, and a line of one can run into the other's (tqdm.write and print
    # write the text and its newline separately): match the number alone (`:.10e`)
    sums = dict(re.findall(r"rank (\d) parameter checksum (-?\d\.\d{10}e[-+]\d+)", run.stdout))
    assert set(sums) == {"0", "1"}
    assert sums["0"] == sums["1"]  # gradients were averaged: the replicas stayed identical
    assert "x 2 processes" in run.stdout
    assert (tmp_path / "checkpoint.json").is_file()


def test_colt5_variant_learns_and_checkpoint_reloads(demo, tmp_path):
    """``--attention colt5``: the CoLT5 LM trains, checkpoints, reloads and samples."""
    import argparse

    result = demo.main(
        [
            "--attention",
            "colt5",
            "--profile",
            "tiny",
            "--steps",
            "30",
            "--eval-every",
            "15",
            "--batch-size",
            "8",
            "--seq-len",
            "64",
            "--data",
            argparse.__file__,
            "--out",
            str(tmp_path),
            "--sample-tokens",
            "12",
            "--device",
            "cpu",
        ]
    )
    train = [loss for _, loss in result["history"]["train"]]
    # Starts near log(256) = 5.5 nats per byte; 30 steps bring a working CoLT5 LM to ~2.6
    # (observed), a broken one (no gradient through the routed attention, or a leak of the
    # future making the loss collapse towards 0) ends far from that band.
    assert train[0] > 5.0
    assert 1.0 < sum(train[-5:]) / 5 < 3.3
    assert result["sample"].startswith("def ") and len(result["sample"]) > len("def ")
    for name in ("checkpoint.json", "loss.png", "experts.png", "sample.txt", "history.json"):
        assert (tmp_path / name).is_file()

    model = demo.load_model(tmp_path)  # built from the settings stored in the checkpoint
    assert type(model).__name__ == "CoLT5LM"


def test_colt5_variant_is_causal(demo):
    """Changing the token at position p leaves every logit before p unchanged (also across the
    routing windows of 32 tokens), and changes logits at p."""
    args = demo.parse_args(["--attention", "colt5", "--profile", "tiny"])
    torch.manual_seed(0)
    model = demo.build_model(args, 256).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 75), generator=gen)  # 3 windows, the last one partial
    with torch.no_grad():
        base = model(x).outputs
        for p in (0, 20, 31, 32, 50, 70):
            changed = x.clone()
            changed[:, p] = (changed[:, p] + 1 + torch.randint(0, 254, (2,), generator=gen)) % 256
            out = model(changed).outputs
            # float32, identical computations for the earlier positions: exact up to the
            # reduction order of batched kernels (1e-5 absolute on logits of size ~1)
            torch.testing.assert_close(out[:, :p], base[:, :p], rtol=0, atol=1e-5)
            assert (out[:, p] - base[:, p]).abs().max() > 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["switchhead", "colt5"])
def test_demo_on_cuda_300_steps(demo, tmp_path, capsys, attention):
    """The demo on CUDA (bf16 autocast, as it runs there), tiny profile: the loss falls and the
    throughput is reported. (The tiny profile: 300 steps of the small one at the default
    learning rate end near 3.3 nats/byte, barely below a byte unigram model, so its loss says
    little; see the session report.)"""
    import argparse

    result = demo.main(
        [
            "--attention",
            attention,
            "--profile",
            "tiny",
            "--steps",
            "300",
            "--eval-every",
            "100",
            "--data",
            str(Path(argparse.__file__).parent),  # the standard library, as by default
            "--out",
            str(tmp_path),
            "--sample-tokens",
            "50",
            "--device",
            "cuda",
        ]
    )
    printed = capsys.readouterr()
    train = [loss for _, loss in result["history"]["train"]]
    val = [loss for _, loss in result["history"]["validation"]]
    assert len(train) == 300 and all(math.isfinite(v) for v in train)
    assert train[0] > 4.5  # untrained: near log(256) = 5.5
    # 300 steps of the tiny profile reach ~1.7 nats/byte on Python source on CPU (README); a
    # model that does not learn, or diverges in bf16, stays above 2.5 (a byte unigram model
    # of Python source is near 3)
    assert sum(train[-20:]) / 20 < 2.5
    assert val[-1] < val[0] and val[-1] < 2.5
    assert result["tokens_per_s"] > 0
    assert re.search(r"trained 300 steps at [\d,]+ tokens/s", printed.out)
    assert "tok/s" in printed.err  # the progress bar
