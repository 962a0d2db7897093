"""The workspace itself: every package imports, has its own version and its declared siblings;
the development tools (``tools/``) and the demo (``examples/``) are no package's dependency."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES_DIR = ROOT / "packages"

# distribution -> the workspace siblings it must (and may only) depend on
SIBLINGS = {
    "cvmm-kernel": set(),
    "switchhead": {"cvmm-kernel"},
    "moeut": {"cvmm-kernel", "switchhead"},
    "colt5-routing": set(),
    "softmax-n": set(),
}


def _pyproject(path: Path) -> dict:
    with open(path / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _project(dist: str) -> dict:
    return _pyproject(PACKAGES_DIR / dist)["project"]


def _names(requirements: list[str]) -> set[str]:
    """The distribution names of requirement strings (``torch>=2.5`` -> ``torch``)."""
    return {re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0] for req in requirements}


def _installed_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:  # imported from the source tree (the nox `gpu` session)
        return None


@pytest.mark.parametrize("dist", sorted(SIBLINGS))
def test_package_imports_with_its_own_version(dist: str) -> None:
    module = importlib.import_module(dist.replace("-", "_"))
    declared = _project(dist)["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", declared)
    installed = _installed_version(dist)
    if installed is None:
        assert module.__version__ == "0+unknown"
    else:
        assert module.__version__ == installed == declared


@pytest.mark.parametrize("dist", sorted(SIBLINGS))
def test_sibling_dependencies_follow_the_design_graph(dist: str) -> None:
    project = _project(dist)
    assert project["name"] == dist
    names = _names(project["dependencies"])
    assert names & set(SIBLINGS) == SIBLINGS[dist]
    assert "torch" in names


def test_benchmark_harness_is_a_development_tool_only() -> None:
    """``bench-harness`` (tools/bench-harness) is in the root's dev group, a workspace member that
    refuses an upload, and no package's dependency (required or optional)."""
    root = _pyproject(ROOT)
    assert "bench-harness" in _names(root["dependency-groups"]["dev"])
    assert "bench-harness" not in _names(root["project"]["dependencies"])
    assert "tools/*" in root["tool"]["uv"]["workspace"]["members"]
    harness = _pyproject(ROOT / "tools" / "bench-harness")["project"]
    assert harness["name"] == "bench-harness"
    assert "Private :: Do Not Upload" in harness["classifiers"]
    for dist in SIBLINGS:
        project = _project(dist)
        extras = project.get("optional-dependencies", {}).values()
        requirements = [*project["dependencies"], *(req for extra in extras for req in extra)]
        assert "bench-harness" not in _names(requirements), dist


def _imported_top_level_modules(folder: Path) -> set[str]:
    """The top-level modules that the Python files under ``folder`` import (absolute imports)."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_demo_is_a_development_member_that_declares_its_imports() -> None:
    """The demo (``examples/``, distribution ``lm-demo-examples``, package ``lm_demo``) is a
    workspace member in the root's dev group that refuses an upload and is no package's
    dependency; it declares exactly the third-party and workspace distributions its code
    imports, and TensorBoard (``--log-dir``) as an extra."""
    root = _pyproject(ROOT)
    assert "examples" in root["tool"]["uv"]["workspace"]["members"]
    assert "lm-demo-examples" in _names(root["dependency-groups"]["dev"])
    assert "lm-demo-examples" not in _names(root["project"]["dependencies"])
    demo = _pyproject(ROOT / "examples")["project"]
    assert demo["name"] == "lm-demo-examples"
    assert "Private :: Do Not Upload" in demo["classifiers"]
    imported = _imported_top_level_modules(ROOT / "examples")
    third_party = imported - set(sys.stdlib_module_names) - {"lm_demo"}
    assert {m.replace("_", "-") for m in third_party} == _names(demo["dependencies"])
    assert _names(demo["optional-dependencies"]["tensorboard"]) == {"tensorboard"}
    for dist in SIBLINGS:
        project = _project(dist)
        extras = project.get("optional-dependencies", {}).values()
        requirements = [*project["dependencies"], *(req for extra in extras for req in extra)]
        assert "lm-demo-examples" not in _names(requirements), dist
