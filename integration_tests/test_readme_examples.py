"""Every ```python block of the root README and of each package README runs as written (on CPU).

Per README, its blocks run in order in one namespace (a block may use an earlier block's names),
with torch seeded, in a fresh working directory: files the examples write land there, and
``packages/`` is linked into it, so that the repository paths they read resolve as they do from
the root of a clone.

A block that cannot run on a CPU-only machine (CUDA, network, several processes) carries a
marker with the reason on the line before its opening fence::

    <!-- no-test: needs CUDA -->
    ```python

Such a block is only compiled (a syntax check) and reported as skipped with its reason; on a
machine with CUDA (the ``gpu`` marker) a block whose reason starts with "needs CUDA" also runs,
after the README's runnable blocks above it. Nothing else is left out: a block without the
marker that raises fails the test, except that a block needing an optional dependency which is
not installed (``OPTIONAL``; the locked environment has them all, the ``matrix`` and ``gpu``
sessions may not) makes the README's test report it as skipped after running the rest. A
marker without a reason, or not right before a python block, fails
``test_no_test_markers_are_well_formed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", *sorted(ROOT.glob("packages/*/README.md"))]

# the optional dependencies (extras) that README examples may need
OPTIONAL = {"transformers", "safetensors", "accelerate", "matplotlib"}

FENCE = re.compile(r"^(```+|~~~+)\s*([^\s`]*)")
MARKER = re.compile(r"^<!--\s*no-test:(.*?)-->$")


@dataclass(frozen=True)
class Block:
    readme: Path
    name: str  # the README's path in the repository
    line: int  # the opening fence's line (1-based)
    code: str
    no_test: str | None  # the marker's reason

    @property
    def where(self) -> str:
        return f"{self.name}:{self.line}"

    def compiled(self):
        # padded so that tracebacks name the README's own line numbers; the file name in angle
        # brackets marks the code as not read from a Python file (torch 2.5's dynamo otherwise
        # tokenizes the README itself around a traced function and fails)
        return compile("\n" * self.line + self.code, f"<{self.readme}>", "exec")


def _closing_fence(lines: list[str], start: int, fence: str) -> int:
    """The index of the line that closes the fence opened at ``start`` (or past the end)."""
    for j in range(start + 1, len(lines)):
        text = lines[j].strip()
        if text.startswith(fence) and set(text) == {fence[0]}:
            return j
    return len(lines)


def parse(readme: Path, name: str) -> tuple[list[Block], list[str]]:
    """The python blocks of ``readme`` (named ``name`` in messages) and the problems with its
    ``no-test`` markers."""
    lines = readme.read_text().splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    marker: tuple[int, str] | None = None  # (line, reason) of a marker awaiting its block
    i = 0
    while i < len(lines):
        text = lines[i].strip()
        fence = FENCE.match(text)
        if fence:
            end = _closing_fence(lines, i, fence.group(1))
            if fence.group(2) == "python":
                code = "\n".join(lines[i + 1 : end]) + "\n"
                blocks.append(Block(readme, name, i + 1, code, marker[1] if marker else None))
            elif marker:
                problems.append(f"{name}:{marker[0]}: no-test marker before a non-python block")
            marker = None
            i = end + 1
            continue
        found = MARKER.match(text)
        if found:
            if marker:
                problems.append(f"{name}:{marker[0]}: no-test marker not before a python block")
            marker = (i + 1, found.group(1).strip())
            if not marker[1]:
                problems.append(f"{name}:{i + 1}: no-test marker without a reason")
        elif text.startswith("<!--") and "no-test" in text:
            problems.append(f"{name}:{i + 1}: malformed no-test marker (`<!-- no-test: why -->`)")
        elif text and marker:
            problems.append(f"{name}:{marker[0]}: no-test marker not before a python block")
            marker = None
        i += 1
    if marker:
        problems.append(f"{name}:{marker[0]}: no-test marker not before a python block")
    return blocks, problems


PARSED = {readme: parse(readme, str(readme.relative_to(ROOT))) for readme in READMES}
RUN = {r: [b for b in blocks if b.no_test is None] for r, (blocks, _) in PARSED.items()}
RUN = {r: blocks for r, blocks in RUN.items() if blocks}
MARKED = [b for blocks, _ in PARSED.values() for b in blocks if b.no_test is not None]


def _id(readme: Path) -> str:
    return str(readme.parent.relative_to(ROOT)) if readme.parent != ROOT else "root"


@pytest.mark.parametrize("readme", list(RUN), ids=[_id(r) for r in RUN])
def test_readme_examples_run(readme: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "packages").symlink_to(ROOT / "packages", target_is_directory=True)
    torch.manual_seed(0)
    namespace = {"__name__": "readme_example"}
    not_run = []
    for block in RUN[readme]:
        try:
            exec(block.compiled(), namespace)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in OPTIONAL:
                raise
            not_run.append(f"{block.where} needs {e.name}, which is not installed")
    if not_run:
        pytest.skip("; ".join(not_run))


@pytest.mark.parametrize("block", MARKED, ids=[b.where for b in MARKED])
def test_marked_example_compiles(block: Block) -> None:
    block.compiled()
    pytest.skip(f"{block.where}: not run here: {block.no_test}")


CUDA_ONLY = [b for b in MARKED if (b.no_test or "").startswith("needs CUDA")]


@pytest.mark.gpu
@pytest.mark.parametrize("block", CUDA_ONLY, ids=[b.where for b in CUDA_ONLY])
def test_cuda_example_runs(block: Block, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "packages").symlink_to(ROOT / "packages", target_is_directory=True)
    torch.manual_seed(0)
    namespace = {"__name__": "readme_example"}
    for earlier in RUN.get(block.readme, []):
        if earlier.line < block.line:  # the names the block may use
            exec(earlier.compiled(), namespace)
    exec(block.compiled(), namespace)
    torch.cuda.synchronize()


def test_no_test_markers_are_well_formed() -> None:
    assert [p for _, problems in PARSED.values() for p in problems] == []


def test_the_examples_are_found() -> None:
    packages = {p.name for p in ROOT.glob("packages/*") if (p / "pyproject.toml").is_file()}
    assert {_id(r) for r in READMES} == {"root"} | {f"packages/{p}" for p in packages}
    # every package README has an example that runs here
    assert {_id(r) for r in RUN} >= {f"packages/{p}" for p in packages}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("<!-- no-test: needs CUDA -->\n```python\nx = 1\n```\n", None),
        ("<!-- no-test: needs CUDA -->\n\n```python\nx = 1\n```\n", None),
        ("<!-- no-test: -->\n```python\nx = 1\n```\n", "without a reason"),
        ("<!-- no-test needs CUDA -->\n```python\nx = 1\n```\n", "malformed"),
        ("<!-- no-test: needs CUDA -->\n```bash\nls\n```\n", "before a non-python block"),
        ("<!-- no-test: needs CUDA -->\ntext\n```python\nx = 1\n```\n", "not before"),
        ("```python\nx = 1\n```\n<!-- no-test: needs CUDA -->\n", "not before"),
    ],
)
def test_markers_are_parsed(tmp_path: Path, text: str, problem: str | None) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(text)
    blocks, problems = parse(readme, "README.md")
    if problem is None:
        assert problems == []
        (block,) = blocks
        assert (block.code, block.no_test) == ("x = 1\n", "needs CUDA")
        assert readme.read_text().splitlines()[block.line - 1] == "```python"
    else:
        assert len(problems) == 1 and problem in problems[0], problems
