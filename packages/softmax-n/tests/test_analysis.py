"""softmax_n.analysis against direct numpy formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from softmax_n.analysis import (
    RunningMoments,
    compute_weight_statistics,
    load_results,
    register_activation_hooks,
    save_results,
    tensor_statistics,
)


def direct(x: np.ndarray) -> dict[str, float]:
    x = x.astype(np.float64).ravel()
    mu = x.mean()
    d = x - mu
    var = (d**2).mean()
    return {
        "count": x.size,
        "mean": mu,
        "variance": var,
        "skewness": (d**3).mean() / var**1.5,
        "kurtosis": (d**4).mean() / var**2 - 3.0,
        "max_abs": np.abs(x).max(),
        "outlier_fraction": (np.abs(d) > 6 * math.sqrt(var)).mean(),
    }


def assert_stats(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_single_tensor_matches_formulas():
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, size=(50, 40)) * 2 + 5
    x[0, :3] = [300.0, -250.0, 400.0]  # outliers
    assert_stats(tensor_statistics(torch.from_numpy(x)), direct(x))


def test_stream_equals_concatenation():
    rng = np.random.default_rng(1)
    parts = [rng.gamma(2.0, size=n) * 1e3 + 1e6 for n in (1, 7, 300, 2)]  # large offset
    moments = RunningMoments()
    for p in parts:
        moments.update(torch.from_numpy(p).float())
    want = direct(np.concatenate([p.astype(np.float32) for p in parts]))
    want.pop("outlier_fraction")  # counted against the running statistics, see the docs
    for key, value in want.items():
        assert moments.as_dict()[key] == pytest.approx(value, rel=1e-6), key


def test_hooks_collect_module_outputs_and_remove():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    xs = [torch.randn(5, 4), torch.randn(3, 4)]
    with torch.no_grad():
        outs = [model[0](x) for x in xs]
    stats = register_activation_hooks(model, {"0", "2"})
    with torch.no_grad():
        for x in xs:
            model(x)
    want = direct(torch.cat(outs).numpy())
    got = stats["0"].as_dict()
    for key in ("count", "mean", "variance", "skewness", "kurtosis", "max_abs"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    stats.remove()
    model(xs[0])
    assert stats["0"].count == 8 * 8
    with pytest.raises(ValueError, match="no such modules"):
        register_activation_hooks(model, {"nope"})


def test_weight_statistics_and_json_roundtrip(tmp_path):
    model = torch.nn.Linear(6, 3)
    results = compute_weight_statistics(model)
    assert set(results) == {"weight", "bias"}
    assert results["weight"]["n_weights"] == 18
    assert_stats(results["weight"], direct(model.weight.detach().numpy()))
    path = save_results(results, "tiny", directory=tmp_path)
    loaded = load_results(path)
    assert loaded["weight"]["kurtosis"] == pytest.approx(results["weight"]["kurtosis"])
    constant = tensor_statistics(torch.ones(4))
    assert math.isnan(constant["kurtosis"])
    path = save_results({"c": constant}, "const", directory=tmp_path)
    assert math.isnan(load_results(path)["c"]["kurtosis"])


def test_plot_writes_a_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from softmax_n.analysis import plot_statistics

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    stats = register_activation_hooks(model, {"0", "1"})
    model(torch.randn(10, 4))
    fig = plot_statistics(stats, tmp_path / "stats.png")
    assert (tmp_path / "stats.png").stat().st_size > 0
    assert len(fig.axes) == 2
