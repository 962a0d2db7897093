r"""Where the host time of an eager MoEUT training step goes, by sampling (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/host_sampling.py [--steps 60] [--interval-us 200] \
        [--py-spy PATH]

Runs the MoEUT-244M layer structure at tiny widths (``host_overhead.py``'s model: every kernel
is short, so the step's time is the host's) for ``--steps`` LM training steps, after 5 untimed
ones, while the Python stacks of its threads are sampled: by ``py-spy`` (``--py-spy``: the
path of its executable; it attaches to this process after the warm-up and reads the stacks
without stopping it, at 1000 Hz, leaving out idle threads) or else by a thread of this process
every ``--interval-us`` (``sys._current_frames``; it samples only when it holds the GIL, so a
long C call is seen at its end). Nothing is added to each Python call, unlike cProfile. The
forward runs on the main thread, the backward's Python functions on autograd's device thread.

Prints and writes (``$OUT/host_sampling.txt`` if ``$OUT`` is set, else to
``benchmarks/results/``) per thread: the share of samples per function, inclusive (on the stack)
and exclusive (the innermost frame of this workspace's packages, the library frames above it
folded into it), the lines with most samples, and the library functions called from our
innermost frames.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import torch
from ab_weight_descriptors import lm_step
from bench_harness import require_cuda, write_text
from host_overhead import BATCH, SEQ, TINY, VOCAB
from moeut import MoEUTLM

_OURS = tuple(f"{os.sep}{name}{os.sep}" for name in (
    "cvmm_kernel", "switchhead", "moeut", "benchmarks"))  # fmt: skip


class StackSampler:
    """Samples the Python stacks of the other threads every ``interval`` seconds."""

    def __init__(self, interval: float):
        self.interval = interval
        self.samples: dict[int, list[list[tuple[str, str, int]]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        own = threading.get_ident()
        while not self._stop.is_set():
            time.sleep(self.interval)
            for tid, frame in sys._current_frames().items():
                if tid == own:
                    continue
                stack = []
                while frame is not None:
                    code = frame.f_code
                    stack.append((code.co_filename, code.co_name, frame.f_lineno))
                    frame = frame.f_back
                self.samples.setdefault(tid, []).append(stack)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _ours(filename: str) -> bool:
    filename = os.sep + filename  # py-spy gives paths relative to sys.path entries
    return any(part in filename for part in _OURS)


def short_path(filename: str) -> str:
    """``filename`` from its package (this workspace's) or as its base name."""
    rooted = os.sep + filename
    for part in _OURS:
        if part in rooted:
            return part.strip(os.sep) + "/" + rooted.rsplit(part, 1)[1]
    return filename.rsplit(os.sep, 2)[-1] if os.sep in filename else filename


def report(stacks: list[list[tuple[str, str, int]]], top: int = 40) -> list[str]:
    """Inclusive and exclusive shares per function and the top lines of one thread's samples
    (stacks innermost frame first)."""
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    for stack in stacks:
        seen = set()
        for filename, name, _line in stack:
            key = f"{short_path(filename)}:{name}"
            if key not in seen:
                seen.add(key)
                inclusive[key] += 1
        # exclusive: the innermost frame of our packages (library frames above it folded in),
        # or the innermost frame where none is ours
        mine = next((f for f in stack if _ours(f[0])), stack[0])
        exclusive[f"{short_path(mine[0])}:{mine[1]}"] += 1
        lines[f"{short_path(mine[0])}:{mine[2]} ({mine[1]})"] += 1
    n = len(stacks)
    out = [f"{n} samples"]
    for title, counts in (("inclusive", inclusive), ("exclusive", exclusive), ("lines", lines)):
        out += ["", f"-- {title} (% of samples)"]
        out += [f"{100 * c / n:6.1f}  {k}" for k, c in counts.most_common(top)]
    return out


def callees(stacks: list[list[tuple[str, str, int]]], top: int = 30) -> list[str]:
    """The library functions our innermost frames spend their samples in (first non-ours frame
    below our innermost one)."""
    counts: Counter[str] = Counter()
    for stack in stacks:
        for i, (filename, _name, _line) in enumerate(stack):
            if _ours(filename):
                callee = stack[i - 1] if i > 0 else None
                counts[
                    "(own code)" if callee is None else f"{short_path(callee[0])}:{callee[1]}"
                ] += 1
                break
    n = max(1, len(stacks))
    return ["", "-- library functions called from our innermost frame (% of samples)"] + [
        f"{100 * c / n:6.1f}  {k}" for k, c in counts.most_common(top)
    ]


def py_spy_stacks(raw: str) -> dict[str, list[list[tuple[str, str, int]]]]:
    """py-spy's ``--format raw`` output (``thread (id): name;func (file:line);... count``,
    outermost frame first) as stacks per thread, innermost frame first, one per sample. Stacks
    with no Python frame (the autograd engine's C++) are counted apart."""
    samples: dict[str, list[list[tuple[str, str, int]]]] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        parsed = []
        for frame in reversed(frames):
            name, _, where = frame.rpartition(" (")
            filename, _, lineno = where.rstrip(")").rpartition(":")
            parsed.append((filename, name, int(lineno) if lineno.isdigit() else 0))
        samples.setdefault(thread, []).extend(
            [parsed or [("(no Python frame)", "(C++)", 0)]] * int(count)
        )
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--interval-us", type=float, default=200.0)
    parser.add_argument("--py-spy", help="sample with this py-spy executable instead")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    torch.manual_seed(0)
    step = lm_step(MoEUTLM(VOCAB, **TINY).cuda().train(), BATCH, SEQ)
    cpu: dict[str, float] = {}
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    spy = None
    if args.py_spy:
        raw = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"py_spy_{os.getpid()}.txt")
        spy = subprocess.Popen([args.py_spy, "record", "--pid", str(os.getpid()), "--rate",
                                "1000", "--format", "raw", "--output", raw, "--threads",
                                "--nonblocking"])  # fmt: skip
        time.sleep(3.0)  # attached
    else:
        sys.setswitchinterval(1e-4)  # the sampler gets the GIL soon after it asks
    main_clock = time.pthread_getcpuclockid(threading.get_ident())
    start_main = time.clock_gettime(main_clock)
    start = time.perf_counter()
    with contextlib.nullcontext() if spy else StackSampler(args.interval_us * 1e-6) as sampler:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps * 1e3
    cpu["main"] = (time.clock_gettime(main_clock) - start_main) / args.steps * 1e3
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        with open(raw) as f:
            samples = py_spy_stacks(f.read())
    else:
        main_id = threading.get_ident()
        samples = {("main thread" if tid == main_id else f"thread {tid}"): stacks
                   for tid, stacks in sampler.samples.items()}  # fmt: skip
    by = "py-spy at 1000 Hz" if spy else f"a sampling thread every {args.interval_us:g} us"
    out = [
        f"Host sampling of the MoEUT-244M structure's eager LM step (tiny widths, B={BATCH}, "
        f"T={SEQ}), {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.steps} steps "
        f"after 5 untimed, sampled by {by}: {wall:.1f} ms per step, main thread CPU "
        f"{cpu['main']:.1f} ms per step",
    ]
    for name, stacks in sorted(samples.items(), key=lambda kv: -len(kv[1])):
        out += ["", f"==== {name}", *report(stacks), *callees(stacks)]
    text = "\n".join(out)
    print(text)
    write_text("host_sampling.txt", text + "\n", script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
