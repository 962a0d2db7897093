"""What every benchmark script of the workspace does the same way (development only, never
shipped with a package).

A script under ``packages/*/benchmarks/`` keeps its shapes, its callables, its rows and its table
columns; it takes from here the CUDA check, the timings (medians of ``triton.testing.do_bench``,
eager or replayed from a CUDA graph), peak memory, the run's metadata (GPU, torch, triton, date),
like-for-like ratios and the writing of its JSON, markdown or text results. Timing budgets
(``warmup``, ``rep``) have no defaults: each script passes its own, so they stay visible there.

Triton is imported inside the functions that need it, so this module imports on any machine.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "environment_line",
    "graph_replay",
    "host_launch_us",
    "host_us",
    "median_ms",
    "median_ms_and_peak_mib",
    "metadata",
    "peak_mib",
    "profile_steps",
    "python_profile",
    "ratios_to_baseline",
    "require_cuda",
    "results_dir",
    "table_header",
    "write_results",
    "write_text",
]

_MIB = 2**20


def require_cuda(script: str | os.PathLike[str]) -> bool:
    """Whether a CUDA device is available. Without one, prints ``"<script> needs a CUDA device"``
    to stderr and returns False (the script then returns its exit code).

    ``script``: the script's ``__file__`` or file name; only its name is printed.
    """
    if torch.cuda.is_available():
        return True
    print(f"{Path(script).name} needs a CUDA device", file=sys.stderr)
    return False


def metadata(**extra: Any) -> dict[str, Any]:
    """The run's environment: ``gpu`` (CUDA device name; None without CUDA), ``torch`` and
    ``triton`` versions (``triton`` None when it does not import), ``date`` (today, ISO
    ``YYYY-MM-DD``) and, with CUDA, ``host_us_per_launch`` (:func:`host_launch_us`: how fast
    this run's host issues work), followed by ``extra`` (setup, dtype, ...). A key of ``extra``
    that names one of these replaces its value in place (e.g. ``date=`` a UTC timestamp)."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    meta: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.date.today().isoformat(),
    }
    launch_us = host_launch_us()
    if launch_us is not None:
        meta["host_us_per_launch"] = round(launch_us, 2)
    meta.update(extra)
    return meta


def host_launch_us() -> float | None:
    """Host microseconds per launch of a tiny CUDA kernel (``add_`` on one element;
    :func:`host_us`), None without CUDA. Eager and compiled steps that are host-bound run
    slower on a slower host; this number, recorded with every result, tells runs on a fast and
    a slow host apart."""
    if not torch.cuda.is_available():
        return None
    one = torch.zeros(1, device="cuda")
    return host_us(lambda: one.add_(1), calls=200, rounds=5)


def environment_line(meta: Mapping[str, Any]) -> str:
    """``"<gpu>, torch <version>, triton <version>, <date>"``: the part of a results title that
    names where and when it was measured (``meta`` from :func:`metadata`), and the host's speed
    where it was recorded (``", host <us> us per launch"``)."""
    line = f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}"
    launch_us = meta.get("host_us_per_launch")
    return line if launch_us is None else f"{line}, host {launch_us:.1f} us per launch"


def graph_replay(step: Callable[[], object], *, warmup_steps: int = 3) -> Callable[[], None]:
    """``step`` captured once in a CUDA graph; returns the graph's replay.

    ``step`` first runs ``warmup_steps`` times on a side stream (lazy initialisation, autotuning
    and allocator warm-up stay out of the graph), then once under capture. Replaying removes the
    host's launch overhead, so its time is the GPU-bound time of the step. A step under autocast
    must run with ``cache_enabled=False`` (the weight cache would not survive the capture).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_steps):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def median_ms(
    fn: Callable[[], object], *, warmup: int, rep: int, cuda_graph: bool = False
) -> float:
    """Median time of one call of ``fn`` in milliseconds (``triton.testing.do_bench``,
    ``return_mode="median"``).

    ``warmup`` and ``rep``: do_bench's budgets in milliseconds of warm-up and of timed calls
    (not call counts). ``cuda_graph``: time the replay of ``fn`` captured by
    :func:`graph_replay` instead of ``fn`` itself.
    """
    import triton.testing

    timed = graph_replay(fn) if cuda_graph else fn
    return float(triton.testing.do_bench(timed, warmup=warmup, rep=rep, return_mode="median"))


def kernel_us_twice(
    cases: Sequence[tuple[str, Callable[[], object]]], *, label_width: int = 48
) -> list[dict[str, Any]]:
    """Median microseconds of each ``(name, fn)`` of ``cases`` (:func:`median_ms`, eager), all
    timed once in turn and then again; returns and prints the second round, ``{"case", "us"}``
    per case (the first warms caches and clocks, so the cases are compared alike)."""
    rows = []
    for rep in range(2):
        for name, fn in cases:
            fn()
            us = median_ms(fn, warmup=20, rep=100) * 1e3
            if rep:
                rows.append({"case": name, "us": us})
                print(f"{name:{label_width}s} {us:7.1f} us")
    return rows


def median_ms_and_peak_mib(
    fn: Callable[[], object], *, warmup: int, rep: int, cuda_graph: bool = False
) -> tuple[float, float]:
    """:func:`median_ms` of ``fn`` and the peak CUDA memory allocated while it was timed, in MiB.

    Synchronises and resets the peak statistics, times ``fn`` as :func:`median_ms` does
    (``warmup``, ``rep`` and ``cuda_graph`` as there), then reads the peak. Unlike
    :func:`peak_mib` the peak counts everything allocated: ``fn``'s inputs and whatever else is
    alive, and the timer's own buffers (``do_bench`` allocates a 256 MiB buffer to flush the L2
    cache, a CUDA graph its memory pool), so compare it only between rows timed alike.
    """
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = median_ms(fn, warmup=warmup, rep=rep, cuda_graph=cuda_graph)
    torch.cuda.synchronize()
    return ms, torch.cuda.max_memory_allocated() / _MIB


def host_us(fn: Callable[[], object], *, calls: int = 50, rounds: int = 5) -> float:
    """Host time to issue one call of ``fn``, in microseconds: the median over ``rounds`` of
    ``calls`` back-to-back calls, after one untimed call (compilation and caches), each round
    started with the device idle and timed until the last call returns (its kernels queued, not
    run). For small inputs whose kernels take less than the host to issue them."""

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    sync()
    return statistics.median(times)


def profile_steps(
    step: Callable[[], object], *, warmup_steps: int = 3, timed_steps: int = 10
) -> tuple[float, float, Any]:
    """Wall time per ``step`` in milliseconds (``timed_steps`` back to back after
    ``warmup_steps``, synchronised), then one step under ``torch.profiler`` (CPU and CUDA).
    Returns ``(wall_ms, kernel_ms, events)``: ``kernel_ms`` the summed GPU time of that step's
    kernels, ``events`` its ``key_averages()`` for tables. Wall time well above kernel time means
    the host bounds the step."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup_steps):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(timed_steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / timed_steps * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    return wall_ms, kernel_us / 1e3, events


def python_profile(step: Callable[[], object], *, steps: int = 5, rows: int = 45) -> str:
    """The host's Python over ``steps`` calls of ``step`` (synchronised before and after) under
    ``cProfile``: two ``pstats`` tables of ``rows`` functions, by own time and by cumulative
    time. Where the host time of a host-bound step goes."""
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return stream.getvalue()


def peak_mib(fn: Callable[[], object], *, baseline_bytes: int | None = None) -> float:
    """Peak CUDA memory allocated while ``fn`` runs, in MiB above ``baseline_bytes``.

    Synchronises, resets the peak statistics, runs ``fn`` once and synchronises again.
    ``baseline_bytes``: the allocation to count from, in bytes; by default what is allocated
    when ``fn`` starts, so the result is the extra memory of one call (its inputs excluded).
    """
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if baseline_bytes is None else baseline_bytes
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / _MIB


def ratios_to_baseline(
    rows: Sequence[Mapping[str, Any]],
    *,
    key: str,
    is_baseline: Callable[[Mapping[str, Any]], bool],
    match: Sequence[str] = (),
) -> list[float | None]:
    """Like-for-like ratios ``row[key] / baseline[key]``, one per row, in order.

    A row's baseline is the first row with ``is_baseline(row)`` true and a ``key`` value whose
    values of the ``match`` keys (shape, sequence length, mask, ...) equal the row's. None where
    the row has no ``key`` value, no such baseline exists, or the baseline's value is 0. The
    ratio is unitless (time over time: above 1 means slower than the baseline).
    """
    baselines: dict[tuple[Any, ...], float] = {}
    for row in rows:
        group = tuple(row.get(m) for m in match)
        if row.get(key) is not None and is_baseline(row):
            baselines.setdefault(group, row[key])
    ratios: list[float | None] = []
    for row in rows:
        base = baselines.get(tuple(row.get(m) for m in match))
        value = row.get(key)
        ratios.append(value / base if base and value is not None else None)
    return ratios


def table_header(*columns: str) -> list[str]:
    """The two first lines of a markdown table: ``| a | b |`` and ``|---|---|``."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def results_dir(script_file: str | os.PathLike[str]) -> Path:
    """Where a script writes its results: ``$OUT`` if set and not empty, else the folder
    ``results/`` next to the script (``script_file``: the script's ``__file__``). Not created
    here; the ``write_*`` functions create it."""
    return Path(os.environ.get("OUT") or Path(script_file).parent / "results")


def write_text(filename: str, text: str, *, script_file: str | os.PathLike[str]) -> Path:
    """Write ``text`` and a final newline to ``filename`` in :func:`results_dir`; returns the
    path."""
    out_dir = results_dir(script_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    path.write_text(text + "\n")
    return path


def write_results(
    name: str,
    document: Mapping[str, Any],
    markdown: str | None = None,
    *,
    script_file: str | os.PathLike[str],
    indent: int = 2,
    json_default: Callable[[Any], Any] | None = None,
) -> list[Path]:
    """Write ``<name>.json`` (``document``, ``json.dumps`` with ``indent`` and ``json_default``
    for values JSON does not know) and, when ``markdown`` is given, ``<name>.md`` (the text and
    a final newline) to :func:`results_dir`. Returns the paths written, JSON first."""
    out_dir = results_dir(script_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(document, indent=indent, default=json_default))
    paths = [path]
    if markdown is not None:
        paths.append(write_text(f"{name}.md", markdown, script_file=script_file))
    return paths
