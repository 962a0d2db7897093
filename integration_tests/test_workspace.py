"""The workspace itself: every package imports, has its own version and its declared siblings."""

from __future__ import annotations

import importlib
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

PACKAGES_DIR = Path(__file__).resolve().parents[1] / "packages"

# distribution -> the workspace siblings it must (and may only) depend on
SIBLINGS = {
    "cvmm-kernel": set(),
    "switchhead": {"cvmm-kernel"},
    "moeut": {"cvmm-kernel", "switchhead"},
    "colt5-routing": set(),
    "softmax-n": set(),
}


def _project(dist: str) -> dict:
    with open(PACKAGES_DIR / dist / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


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
    names = {re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0] for req in project["dependencies"]}
    assert names & set(SIBLINGS) == SIBLINGS[dist]
    assert "torch" in names
