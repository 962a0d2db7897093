"""Every benchmark script (``packages/*/benchmarks/*.py``) imports on CPU without running its
``main()``, uses the benchmark harness (``tools/bench-harness``), and without CUDA its ``main()``
stops at the CUDA check, before any work and without writing results. The scripts only run on a
GPU machine, so this is what catches, in the CPU tests, a refactor that breaks one of them."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(ROOT.glob("packages/*/benchmarks/*.py"))
BENCHMARK_DIRS = {path.parent for path in SCRIPTS}


def _is_benchmark_script(module: ModuleType | None) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve().parent in BENCHMARK_DIRS


@pytest.fixture
def import_script(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], ModuleType]]:
    """Imports a script as its module name, with its folder first on ``sys.path`` as when it runs
    (scripts import their siblings: ``from bench_cvmm import ...``). Skips a script that imports
    Triton at module level where Triton is not installed. The scripts' modules are removed from
    ``sys.modules`` afterwards, so every test imports them afresh."""

    def load(path: Path) -> ModuleType:
        monkeypatch.syspath_prepend(str(path.parent))
        try:
            return importlib.import_module(path.stem)
        except ModuleNotFoundError as exc:
            if exc.name != "triton":
                raise
            pytest.skip(f"{path.name} imports triton at module level; triton is not installed")

    yield load
    for name in [n for n, m in sys.modules.items() if _is_benchmark_script(m)]:
        del sys.modules[name]


def _script_id(path: Path) -> str:
    return f"{path.parent.parent.name}/{path.name}"


def test_every_package_has_benchmark_scripts() -> None:
    packages = {p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists()}
    assert packages == {path.parent.parent.name for path in SCRIPTS}


@pytest.mark.parametrize("path", SCRIPTS, ids=_script_id)
def test_script_imports_without_running_main(
    path: Path, import_script: Callable[[Path], ModuleType]
) -> None:
    module = import_script(path)
    assert module.__file__ == str(path)
    assert callable(module.main)
    harness = [v for v in vars(module).values() if getattr(v, "__module__", "") == "bench_harness"]
    assert harness, f"{path.name} takes nothing from bench_harness"


@pytest.mark.parametrize("path", SCRIPTS, ids=_script_id)
def test_script_without_cuda_stops_at_the_cuda_check(
    path: Path,
    import_script: Callable[[Path], ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    module = import_script(path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    monkeypatch.setattr(sys, "argv", [str(path)])  # no arguments: each script's defaults
    monkeypatch.setenv("OUT", str(tmp_path))
    assert module.main() != 0
    assert f"{path.name} needs a CUDA device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
