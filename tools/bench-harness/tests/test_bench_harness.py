"""The benchmark harness: what runs without CUDA on CPU, the timing and memory helpers on a GPU
(``gpu`` marker)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch
from bench_harness import (
    environment_line,
    graph_replay,
    host_us,
    median_ms,
    median_ms_and_peak_mib,
    metadata,
    peak_mib,
    profile_steps,
    ratios_to_baseline,
    require_cuda,
    results_dir,
    table_header,
    write_results,
    write_text,
)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    """A benchmark script's path (the file itself need not exist)."""
    return tmp_path / "pkg" / "benchmarks" / "bench_something.py"


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA reported unavailable, also on a GPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("out", [None, ""])
def test_results_dir_is_next_to_the_script_without_out(
    monkeypatch: pytest.MonkeyPatch, script: Path, out: str | None
) -> None:
    if out is None:
        monkeypatch.delenv("OUT", raising=False)
    else:
        monkeypatch.setenv("OUT", out)  # empty: as if unset
    assert results_dir(script) == script.parent / "results"
    assert results_dir(str(script)) == script.parent / "results"
    assert not (script.parent / "results").exists()  # created by the writers only


def test_results_dir_is_out_when_set(
    monkeypatch: pytest.MonkeyPatch, script: Path, tmp_path: Path
) -> None:
    monkeypatch.setenv("OUT", str(tmp_path / "elsewhere"))
    assert results_dir(script) == tmp_path / "elsewhere"


def test_write_results_round_trip(
    monkeypatch: pytest.MonkeyPatch, script: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "nested"
    monkeypatch.setenv("OUT", str(out))
    document = {"meta": {"gpu": None, "date": "2026-01-01"}, "rows": [{"ms": 1.5, "mib": 2.0}]}
    markdown = "\n".join(["title", "", *table_header("ms", "mib"), "| 1.500 | 2 |"])
    paths = write_results("bench", document, markdown, script_file=script)
    assert paths == [out / "bench.json", out / "bench.md"]
    assert json.loads(paths[0].read_text()) == document
    assert paths[0].read_text() == json.dumps(document, indent=2)
    assert paths[1].read_text() == markdown + "\n"
    assert not (script.parent / "results").exists()


def test_write_results_json_only_with_indent_and_default(
    monkeypatch: pytest.MonkeyPatch, script: Path
) -> None:
    monkeypatch.delenv("OUT", raising=False)
    document = {"rows": [{"config": (64, 4, 2), "where": Path("a/b")}]}
    paths = write_results("sweep", document, script_file=script, indent=1, json_default=str)
    assert paths == [script.parent / "results" / "sweep.json"]
    assert not (script.parent / "results" / "sweep.md").exists()
    text = paths[0].read_text()
    assert text == json.dumps(document, indent=1, default=str)
    assert json.loads(text) == {"rows": [{"config": [64, 4, 2], "where": "a/b"}]}


def test_write_text(monkeypatch: pytest.MonkeyPatch, script: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    path = write_text("profile.txt", "line 1\nline 2", script_file=script)
    assert path == tmp_path / "profile.txt"
    assert path.read_text() == "line 1\nline 2\n"


def test_metadata_keys_and_order() -> None:
    meta = metadata(setup="B=8", dtype="bfloat16")
    host = ["host_us_per_launch"] if torch.cuda.is_available() else []
    assert list(meta) == ["gpu", "torch", "triton", "date", *host, "setup", "dtype"]
    if host:
        assert meta["host_us_per_launch"] > 0
    assert meta["torch"] == torch.__version__
    assert meta["date"] == datetime.date.today().isoformat()
    assert meta["setup"] == "B=8"
    if torch.cuda.is_available():
        assert meta["gpu"] == torch.cuda.get_device_name()
    try:
        import triton
    except ImportError:
        assert meta["triton"] is None
    else:
        assert meta["triton"] == triton.__version__
    json.dumps(meta)  # JSON as it is


@pytest.mark.usefixtures("no_cuda")
def test_metadata_without_cuda_and_a_replaced_date() -> None:
    meta = metadata(date="2026-01-01T00:00:00+00:00", quick=True)
    assert list(meta) == ["gpu", "torch", "triton", "date", "quick"]  # replaced in place
    assert meta["gpu"] is None
    assert meta["date"] == "2026-01-01T00:00:00+00:00"


def test_environment_line() -> None:
    meta = {"gpu": "GPU X", "torch": "2.9", "triton": "3.5", "date": "2026-01-01", "setup": "-"}
    assert environment_line(meta) == "GPU X, torch 2.9, triton 3.5, 2026-01-01"
    meta["host_us_per_launch"] = 7.84
    assert environment_line(meta) == (
        "GPU X, torch 2.9, triton 3.5, 2026-01-01, host 7.8 us per launch"
    )


def test_require_cuda_says_whether_cuda_is_there(capsys: pytest.CaptureFixture[str]) -> None:
    assert require_cuda("bench_x.py") is torch.cuda.is_available()
    err = capsys.readouterr().err
    assert ("needs a CUDA device" in err) is not torch.cuda.is_available()


@pytest.mark.usefixtures("no_cuda")
def test_require_cuda_is_false_on_a_cpu_only_machine(
    capsys: pytest.CaptureFixture[str], script: Path
) -> None:
    assert require_cuda(script) is False
    captured = capsys.readouterr()
    assert captured.err == "bench_something.py needs a CUDA device\n"
    assert captured.out == ""


def test_table_header() -> None:
    assert table_header("a", "b c") == ["| a | b c |", "|---|---|"]
    assert table_header("only") == ["| only |", "|---|"]


def test_ratios_to_baseline_like_for_like() -> None:
    rows = [
        {"variant": "ours", "T": 1, "ms": 3.0},
        {"variant": "dense", "T": 1, "ms": 2.0},
        {"variant": "ours", "T": 2, "ms": 8.0},
        {"variant": "dense", "T": 2, "ms": 4.0},
        {"variant": "broken", "T": 2},  # no timing: no ratio
        {"variant": "ours", "T": 3, "ms": 1.0},  # no baseline at this T
        {"variant": "dense", "T": 4, "ms": 0.0},  # a zero baseline gives no ratio
        {"variant": "ours", "T": 4, "ms": 1.0},
    ]
    is_dense = lambda row: row["variant"] == "dense"
    ratios = ratios_to_baseline(rows, key="ms", is_baseline=is_dense, match=("T",))
    assert ratios == [1.5, 1.0, 2.0, 1.0, None, None, None, None]
    # without match keys every row is compared with the first baseline
    assert ratios_to_baseline(rows[:4], key="ms", is_baseline=is_dense) == [1.5, 1.0, 4.0, 2.0]


def test_ratios_to_baseline_skips_baselines_without_a_value() -> None:
    rows = [
        {"variant": "reference"},  # failed: no timing, so not the baseline
        {"variant": "reference", "ms": 2.0},
        {"variant": "x", "ms": 1.0},
    ]
    is_reference = lambda row: row["variant"] == "reference"
    assert ratios_to_baseline(rows, key="ms", is_baseline=is_reference) == [None, 1.0, 0.5]


@pytest.mark.gpu
def test_graph_replay_runs_the_captured_step() -> None:
    counter = torch.zeros((), device="cuda")
    replay = graph_replay(lambda: counter.add_(1), warmup_steps=3)
    assert counter.item() == 3  # the warm-up ran, the capture did not
    replay()
    replay()
    assert counter.item() == 5


@pytest.mark.gpu
def test_peak_mib_counts_one_call_above_what_is_allocated() -> None:
    kept = torch.empty(2**20, device="cuda")  # 4 MiB allocated before the call

    def allocate_8_mib() -> None:
        torch.empty(2**21, device="cuda")

    assert peak_mib(allocate_8_mib) == pytest.approx(8.0)
    assert peak_mib(allocate_8_mib, baseline_bytes=0) >= 12.0
    del kept


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_median_ms_is_a_positive_time(cuda_graph: bool) -> None:
    pytest.importorskip("triton")
    x = torch.randn(256, 256, device="cuda")
    ms = median_ms(lambda: x @ x, warmup=1, rep=5, cuda_graph=cuda_graph)
    assert isinstance(ms, float)
    assert 0 < ms < 1e3


def test_median_ms_and_peak_mib_reads_the_peak_of_the_whole_timing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CPU, with the CUDA calls and the timer recorded: the peak is reset before the timing
    and read after it, all of it (no baseline subtracted)."""
    import bench_harness

    events: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: events.append("reset"))

    def max_memory_allocated() -> int:
        events.append("peak")
        return 3 * 2**20

    def timer(fn, *, warmup: int, rep: int, cuda_graph: bool) -> float:
        events.append(("time", warmup, rep, cuda_graph))
        fn()
        return 1.5

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", max_memory_allocated)
    monkeypatch.setattr(bench_harness, "median_ms", timer)
    result = median_ms_and_peak_mib(lambda: events.append("call"), warmup=2, rep=3)
    assert result == (1.5, 3.0)
    assert events == ["sync", "reset", ("time", 2, 3, False), "call", "sync", "peak"]
    events.clear()
    median_ms_and_peak_mib(lambda: None, warmup=1, rep=1, cuda_graph=True)
    assert ("time", 1, 1, True) in events


@pytest.mark.gpu
def test_median_ms_and_peak_mib_counts_what_is_alive_while_timing() -> None:
    pytest.importorskip("triton")
    kept = torch.empty(2**22, device="cuda")  # 16 MiB alive during the timing

    def allocate_8_mib() -> None:
        torch.empty(2**21, device="cuda")

    ms, mib = median_ms_and_peak_mib(allocate_8_mib, warmup=1, rep=5)
    assert 0 < ms < 1e3
    assert mib >= 16.0 + 8.0
    del kept


def test_host_us_times_each_call_after_an_untimed_one():
    calls = []
    us = host_us(lambda: calls.append(1), calls=7, rounds=3)
    assert len(calls) == 1 + 7 * 3 and us > 0


@pytest.mark.gpu
def test_profile_steps_counts_the_kernels_of_one_step() -> None:
    x = torch.randn(512, 512, device="cuda")
    calls = []

    def step() -> None:
        calls.append(1)
        x @ x

    wall_ms, kernel_ms, events = profile_steps(step, warmup_steps=2, timed_steps=4)
    assert len(calls) == 2 + 4 + 1  # warm-up, timed, profiled
    assert wall_ms > 0 and kernel_ms > 0
    assert any("mm" in e.key for e in events)
