"""Every package README's first Python example runs as written (on CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGES = Path(__file__).resolve().parents[1] / "packages"
READMES = sorted(p for p in PACKAGES.glob("*/README.md") if "```python" in p.read_text())


@pytest.mark.parametrize("readme", READMES, ids=[p.parent.name for p in READMES])
def test_readme_example_runs(readme: Path) -> None:
    code = re.search(r"```python\n(.*?)```", readme.read_text(), re.S).group(1)
    exec(compile(code, str(readme), "exec"), {"__name__": "readme_example"})


def test_the_examples_are_found() -> None:
    names = {p.parent.name for p in READMES}
    assert {"cvmm-kernel", "switchhead"} <= names
