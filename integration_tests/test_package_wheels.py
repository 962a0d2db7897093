"""Each package, built as a wheel and installed alone (plus only its declared siblings) into a
fresh virtual environment, imports, runs its README's example on CPU, and cannot import the
siblings it does not depend on.

The fresh environments see this interpreter's third-party packages (torch, triton, ...)
through a ``.pth`` file naming its site-packages directories. ``.pth`` files *inside* a directory
added that way are not processed, so the workspace's editable installs (``.pth`` files) do not
leak in; ``PYTHONPATH`` (the nox ``gpu`` session puts ``packages/*/src`` there) is removed from
the environment. Everything is offline: ``uv build`` uses the cached ``uv_build`` backend and
``uv pip install --no-index`` installs the local wheels only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES_DIR = ROOT / "packages"

# distribution -> the workspace siblings it depends on (the design graph)
SIBLINGS = {
    "cvmm-kernel": [],
    "switchhead": ["cvmm-kernel"],
    "moeut": ["cvmm-kernel", "switchhead"],
    "colt5-routing": [],
    "softmax-n": [],
}
MODULES = {dist: dist.replace("-", "_") for dist in SIBLINGS}

UV = os.environ.get("UV") or shutil.which("uv")
pytestmark = pytest.mark.skipif(UV is None, reason="needs the uv executable")


def _readme_example(dist: str) -> str:
    """The first example of the package's README (CPU-sized: test_readme_examples.py runs them
    all)."""
    text = (PACKAGES_DIR / dist / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def _declared_version(dist: str) -> str:
    text = (PACKAGES_DIR / dist / "pyproject.toml").read_text()
    return re.search(r'(?m)^version = "([^"]+)"', text).group(1)


def _third_party_dirs() -> list[str]:
    """The directories this interpreter imports third-party packages from."""
    paths = sysconfig.get_paths()
    dirs = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env["CUDA_VISIBLE_DEVICES"] = ""  # the README examples are CPU examples
    return env


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_clean_env())
    assert run.returncode == 0, f"{cmd}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    return run


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """One wheel per package, built once for the module into a shared folder."""
    out = tmp_path_factory.mktemp("wheels")
    built = {}
    for dist in SIBLINGS:
        _run([UV, "build", "--offline", "--package", dist, "--wheel", "--out-dir", str(out)])
        (wheel,) = out.glob(f"{MODULES[dist]}-{_declared_version(dist)}-*.whl")
        built[dist] = wheel
    return built


def _fresh_venv(path: Path) -> Path:
    """A new virtual environment that sees this interpreter's third-party packages only."""
    _run([UV, "venv", "--offline", "--python", sys.executable, str(path)])
    python = path / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
    (Path(purelib) / "_dev_third_party.pth").write_text("\n".join(_third_party_dirs()) + "\n")
    return python


# Runs inside the fresh environment: where each module comes from (None: not importable).
PROBE = """
import importlib.util, json, sys
out = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    out[name] = None if spec is None else spec.origin
print(json.dumps(out))
"""

# Runs inside the fresh environment: import the package, check its version, run the example.
CHECK = """
import importlib, json, sys
module_name, version, code = sys.argv[1], sys.argv[2], sys.stdin.read()
module = importlib.import_module(module_name)
assert module.__version__ == version, (module.__version__, version)
exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
print(json.dumps({"file": module.__file__}))
"""


def _probe(python: Path, names: list[str]) -> dict[str, str | None]:
    return json.loads(_run([str(python), "-c", PROBE, *names]).stdout.strip().splitlines()[-1])


def test_fresh_environment_sees_dependencies_but_no_workspace_package(tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    found = _probe(python, ["torch", *MODULES.values()])
    assert found["torch"] is not None
    leaked = {name: origin for name, origin in found.items() if name in MODULES.values() and origin}
    assert not leaked, f"workspace packages visible without installation: {leaked}"


@pytest.mark.parametrize("dist", list(SIBLINGS))
def test_wheel_installs_alone_and_runs_its_readme_example(dist, wheels, tmp_path):
    venv = tmp_path / "venv"
    python = _fresh_venv(venv)
    needed = [dist, *SIBLINGS[dist]]
    _run(
        [UV, "pip", "install", "--offline", "--no-index", "--no-deps", "--python", str(python)]
        + [str(wheels[d]) for d in needed]
    )

    run = subprocess.run(
        [str(python), "-c", CHECK, MODULES[dist], _declared_version(dist)],
        input=_readme_example(dist),
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(),
    )
    assert run.returncode == 0, run.stderr[-4000:]
    origin = Path(json.loads(run.stdout.strip().splitlines()[-1])["file"]).resolve()
    assert venv.resolve() in origin.parents  # the installed wheel, not the source tree

    found = _probe(python, list(MODULES.values()))
    for other, module in MODULES.items():
        if other in needed:
            assert found[module] is not None, f"{dist} needs {other}, which is not importable"
            assert venv.resolve() in Path(found[module]).resolve().parents
        else:
            assert found[module] is None, f"{other} is importable next to {dist} alone"
