"""The workspace itself: every package imports, has its own version and its declared siblings."""

from __future__ import annotations

import importlib
import re
from importlib.metadata import requires, version

import pytest

# distribution -> the workspace siblings it must (and may only) depend on
SIBLINGS = {
    "cvmm-kernel": set(),
    "switchhead": {"cvmm-kernel"},
    "moeut": {"cvmm-kernel", "switchhead"},
    "colt5-routing": set(),
    "softmax-n": set(),
}


@pytest.mark.parametrize("dist", sorted(SIBLINGS))
def test_package_imports_with_its_own_version(dist: str) -> None:
    module = importlib.import_module(dist.replace("-", "_"))
    assert module.__version__ == version(dist)
    assert re.fullmatch(r"\d+\.\d+\.\d+", module.__version__)


@pytest.mark.parametrize("dist", sorted(SIBLINGS))
def test_sibling_dependencies_follow_the_design_graph(dist: str) -> None:
    names = {re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0] for req in requires(dist) or []}
    assert names & set(SIBLINGS) == SIBLINGS[dist]
    assert "torch" in names
