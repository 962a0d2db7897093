"""The training demo's metrics (issue #18, items 2 and 4): expert usage counted from the logits
the MoE layers record in the training forward, MFU, metrics.jsonl / TensorBoard, experts.png."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

DATA = argparse.__file__  # one standard-library source file (~100 KB)
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def metrics():
    from lm_demo import metrics

    return metrics


@pytest.fixture(scope="module")
def plots():
    from lm_demo import plots

    return plots


def tiny_model(demo, attention: str):
    torch.manual_seed(0)
    args = demo.parse_args(["--profile", "tiny", "--attention", attention])
    return demo.build_model(args, 256).train()


def test_mfu_formula_and_peak_table(demo, metrics):
    assert metrics.mfu(1000.0, 6e6, 1e12) == pytest.approx(6e-3)
    assert metrics.mfu(1000.0, 6e6, 1e12, devices=2) == pytest.approx(3e-3)
    assert metrics.peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.4
    assert metrics.peak_tflops_of("NVIDIA H100 PCIe") == 756.0
    assert metrics.peak_tflops_of("NVIDIA H200") == 989.4
    assert metrics.peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312.0
    assert metrics.peak_tflops_of("Some Future GPU") is None
    cpu = torch.device("cpu")
    assert metrics.device_peak_flops(cpu, None) is None  # CPU: MFU only with --peak-tflops
    assert metrics.device_peak_flops(cpu, 2.5) == 2.5e12

    # Active parameters of the tiny MoEUT, by hand: per layer application the attention's q, k
    # and both selection matrices, moe_k of E value/output experts per head; the feedforward's
    # selection matrix and k of E experts; 2 shared layers applied 2 times; plus the LM head.
    p = demo.PROFILES["tiny"]
    d, hd = p["d_model"], p["n_heads"] * p["d_head"]
    e_att, e_ff = p["att_n_experts"], p["ff_n_experts"]
    attention = 2 * d * hd + 2 * p["n_heads"] * e_att * d + (2 / e_att) * 2 * e_att * d * hd
    ffn = e_ff * d + (p["ff_k"] / e_ff) * 2 * e_ff * d * p["ff_expert_size"]
    expected = (attention + ffn) * p["n_layers"] + 256 * d
    model = tiny_model(demo, "switchhead")
    assert metrics.active_params_per_token(model) == expected
    assert metrics.flops_per_token(model) == 6 * expected
    assert expected < sum(q.numel() for q in model.parameters())  # only k experts are active


def test_usage_metrics_bounds(metrics):
    uniform = metrics.usage_metrics(torch.full((16,), 10))
    assert uniform["entropy"] == pytest.approx(math.log(16))
    assert uniform["dead"] == 0 and uniform["n_experts"] == 16
    collapsed = metrics.usage_metrics(torch.tensor([0, 7, 0, 0]))
    assert collapsed["entropy"] == pytest.approx(0.0) and collapsed["dead"] == 3


def test_sigma_moe_usage_is_the_layers_own_top_k(demo, metrics):
    """The counts are the experts the layer chose (here: the top-k of its logits, a reference
    routing done here), also with the regulariser's logit recording off."""
    from moeut import SigmaMoE

    torch.manual_seed(0)
    moe = SigmaMoE(32, 8, 16, k=3).train()
    usage = metrics.ExpertUsage(moe)
    x = torch.randn(5, 7, 32)
    moe(x)
    (layer,) = usage.take()
    index = torch.nn.functional.linear(x, moe.expert_sel).topk(3).indices
    assert torch.equal(layer.counts, torch.bincount(index.flatten(), minlength=8))
    moe.eval()
    moe(x)
    assert usage.take() == []  # eval forwards: nothing recorded, nothing counted
    usage.close()
    assert not moe.record_selection_index  # the recording is off again


@pytest.mark.parametrize(
    "attention, rows, kinds, applications",
    [
        ("switchhead", 2, ["feedforward", "attention V", "attention O"], 2),
        ("dense", 2, ["feedforward"], 2),  # one attention expert: not an MoE
        ("colt5", 4, ["feedforward"], 1),  # no shared layers, no attention experts
    ],
)
def test_expert_usage_and_plot_panels(
    demo, metrics, plots, tmp_path, one_thread, attention, rows, kinds, applications
):
    model = tiny_model(demo, attention)
    usage = metrics.ExpertUsage(model)
    batch, length = 2, 40
    model(torch.randint(0, 256, (batch, length)))
    layers = usage.take()
    usage.close()
    assert len(layers) == rows * len(kinds)
    for u in layers:
        per_token = u.k * u.groups  # experts chosen per token in one application
        assert u.applications == applications
        assert int(u.counts.sum()) == batch * length * applications * per_token
    panels, row_labels, columns = plots.expert_usage_panels(layers)
    assert row_labels == [f"layer {i}" for i in range(rows)] and columns == kinds
    assert sorted((p.row, p.column) for p in panels) == [
        (r, c) for r in range(rows) for c in range(len(kinds))
    ]
    for p in panels:
        assert p.relative.mean().item() == pytest.approx(1.0)  # relative to uniform use
        assert ("applied 2x" in p.title) == (applications == 2)
    assert plots.USAGE_COLOUR_RANGE == (0.0, 2.0)
    path = plots.plot_expert_usage(layers, tmp_path / "experts.png", window="test")
    assert path.is_file() and path.stat().st_size > 10_000


def run_flags(out: Path, *extra: str) -> list[str]:
    return [
        *("--profile", "tiny", "--steps", "4", "--eval-every", "2"),
        *("--batch-size", "4", "--seq-len", "32", "--sample-tokens", "4"),
        *("--data", DATA, "--out", str(out), "--device", "cpu"),
        *extra,
    ]


def test_short_run_reports_metrics(demo, tmp_path, one_thread):
    result = demo.main(run_flags(tmp_path, "--peak-tflops", "0.5"))
    records = result["metrics"]
    assert [r["step"] for r in records] == [2, 4]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(records))
    names = {
        f"layer_{i}_{k}" for i in (0, 1) for k in ("feedforward", "attention_V", "attention_O")
    }
    for r in records:
        assert set(r["experts"]) == names
        for m in r["experts"].values():
            assert m["n_experts"] == 16  # 16 feedforward experts; 4 heads x 4 attention experts
            assert 0.0 <= m["entropy"] <= math.log(m["n_experts"]) + 1e-9
            assert 0 <= m["dead"] <= m["n_experts"]
            # a fresh router is near uniform: well above the entropy of a single expert
            assert m["entropy"] > 0.5 * math.log(m["n_experts"])
        assert r["tokens_per_s"] > 0 and math.isfinite(r["validation_loss"])
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 0.5e12)
    assert (tmp_path / "experts.png").is_file()


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_log_dir_writes_tensorboard_events(demo, tmp_path, one_thread):
    demo.main(run_flags(tmp_path / "run", "--log-dir", str(tmp_path / "tb")))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed")
def test_log_dir_without_tensorboard_fails_clearly(demo, tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--log-dir", str(tmp_path / "tb")])
    assert "--log-dir needs the tensorboard package" in capsys.readouterr().err
