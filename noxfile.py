"""Sessions of the workspace: ``uv run nox -l`` lists them.

- ``tests``: CPU tests of all packages and the integration tests, in the locked environment.
- ``interpret``: the Triton kernels on CPU under ``TRITON_INTERPRET=1`` (``interpret`` marker).
  Both run in pytest-xdist workers, one per core, one CPU thread each (``PARALLEL``).
- ``gpu``: everything, ``gpu``-marked tests included, against the *current* interpreter; creates no
  virtual environment and installs nothing, so it runs on a CUDA machine without network that
  already has torch and triton. The packages, the development tools (``tools/*/src``) and the
  demo's helpers (``examples/lm_demo``) are imported from the checkout (``PYTHONPATH``).
- ``matrix``: the CPU tests against (torch, triton) pairs from the oldest supported to the newest.
- ``lint``: ruff format --check, ruff check (complexity included) and mypy over every
  ``packages/*/src`` and ``tools/*/src``, in the locked environment (``.pre-commit-config.yaml``
  runs the same).
- ``bench``: every package's benchmark scripts (needs CUDA; writes JSON under ``results/``), with
  the development-only harness ``tools/bench-harness`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ["cvmm-kernel", "switchhead", "moeut", "colt5-routing", "softmax-n"]
# development-only workspace members (never published): the benchmark scripts' harness
TOOLS = ["bench-harness"]
SRC_DIRS = [str(ROOT / "packages" / p / "src") for p in PACKAGES]
SRC_DIRS += [str(ROOT / "tools" / t / "src") for t in TOOLS]
# the demo (workspace member lm-demo-examples, never published): its lm_demo package, flat layout
EXAMPLES = ROOT / "examples"
SRC_DIRS.append(str(EXAMPLES))

# (torch, triton) pairs: the oldest supported and the newest released.
MATRIX = [("2.5.1", "3.1.0"), ("2.15.0", "3.9.0")]

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "tests", "interpret"]


# pytest-xdist workers, one per core (``-n 0`` among the arguments turns them off), each with one
# CPU thread unless OMP_NUM_THREADS says otherwise: on the 2-core CI machine the CPU tests took
# 324 instead of 411 s, the interpreter's 174 instead of 263 s; with torch's default threads per
# worker the cores were oversubscribed and the CPU tests gained nothing (414 s).
PARALLEL = ["-n", "auto"]


def _hypothesis_profile() -> dict[str, str]:
    """Hypothesis' ``derandomized`` profile (conftest.py: the same examples on every run;
    ``HYPOTHESIS_PROFILE=default`` draws new ones)."""
    return {"HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "derandomized")}


def _test_env() -> dict[str, str]:
    """One CPU thread per worker, and :func:`_hypothesis_profile`."""
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **_hypothesis_profile()}


def _sync_locked(session: nox.Session) -> None:
    """Install the locked workspace (all packages, extras and dev tools) into the session venv."""
    session.run_install(
        "uv",
        "sync",
        "--locked",
        "--all-packages",
        "--all-extras",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
    )


@nox.session
def tests(session: nox.Session) -> None:
    """CPU tests of every package and the integration tests (locked environment)."""
    _sync_locked(session)
    session.run("pytest", *PARALLEL, "-m", "not interpret", *session.posargs, env=_test_env())


@nox.session
def interpret(session: nox.Session) -> None:
    """Triton kernels on CPU tensors through the Triton interpreter."""
    _sync_locked(session)
    env = {**_test_env(), "TRITON_INTERPRET": "1"}
    session.run("pytest", *PARALLEL, "-m", "interpret", *session.posargs, env=env)


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """All tests, GPU ones included, on the current interpreter (no venv, no network)."""
    pythonpath = os.pathsep.join([*SRC_DIRS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    python = os.environ.get("NOX_GPU_PYTHON", "python3")
    session.run(python, "-c", "import torch; assert torch.cuda.is_available(), 'no CUDA device'")
    session.run(
        python,
        "-m",
        "pytest",
        "-m",
        "not interpret",
        *session.posargs,
        env={"PYTHONPATH": pythonpath},
    )


@nox.session
@nox.parametrize(("torch_version", "triton_version"), MATRIX, ids=[f"torch{t}" for t, _ in MATRIX])
def matrix(session: nox.Session, torch_version: str, triton_version: str) -> None:
    """CPU tests against one (torch, triton) pair, installed over the workspace packages."""
    session.install(
        f"torch=={torch_version}",
        f"triton=={triton_version}",
        "setuptools",  # triton < 3.2 imports it at start-up
        *[f"-e{ROOT / 'packages' / p}" for p in PACKAGES],
        *[f"-e{ROOT / 'tools' / t}" for t in TOOLS],  # tools/*/tests are test paths too
        f"-e{EXAMPLES}",  # the demo's lm_demo, with its plots' and checkpoints' dependencies
        "pytest",
        "pytest-xdist",
        "hypothesis",
        "numpy",
    )
    session.run(
        "python",
        "-c",
        "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)",
    )
    # torch's own threads (one process, no workers)
    session.run(
        "pytest", "-m", "not interpret and not slow", *session.posargs, env=_hypothesis_profile()
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff format --check and ruff check over the whole workspace, and mypy over every
    ``packages/*/src`` and ``tools/*/src`` (``[tool.mypy]`` in pyproject.toml), with the locked
    tools. mypy needs the packages' dependencies (torch's annotations), hence the locked
    environment."""
    _sync_locked(session)
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")
    session.run("mypy")


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Run every package's benchmark scripts on the current interpreter (CUDA machine); the
    packages and ``bench_harness`` are imported from the checkout (``PYTHONPATH``)."""
    pythonpath = os.pathsep.join([*SRC_DIRS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    python = os.environ.get("NOX_GPU_PYTHON", "python3")
    scripts = sorted(ROOT.glob("packages/*/benchmarks/bench_*.py"))
    if not scripts:
        session.error("no benchmark scripts found")
    for script in scripts:
        session.run(python, str(script), *session.posargs, env={"PYTHONPATH": pythonpath})
