r"""How much host work an eager MoEUT training step issues, counted (CUDA): deterministic where
host times are not.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/step_counts.py [--label NAME]

The shared machine's host speed moves by tens of percent within minutes, which hides a saving
of a few percent in any timing (``ab_host_savings.md``). What the host does per step can be
counted instead: for the MoEUT-244M structure at tiny widths (``host_overhead.py``'s model) and
its dense baseline, per LM training step (forward + backward, bf16 autocast): driver calls
(kernel launches, memsets, copies) and ATen ops (nested ones included) from the torch profiler,
the autograd graph's nodes, and the Python function calls (Python and builtin, all threads,
``threading.setprofile_all_threads``), with the most called functions. Run it on two checkouts
to compare them. Writes ``step_counts[_LABEL].json`` and ``.md`` to ``$OUT`` if set, else to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections import Counter
from typing import Any

import torch
from ab_weight_descriptors import lm_step
from bench_harness import environment_line, metadata, require_cuda, table_header, write_results
from bench_moeut import DenseLM
from host_overhead import BATCH, SEQ, TINY, VOCAB
from host_profile import _DRIVER_CALLS, profiled_events
from moeut import MoEUTLM
from torch.utils._python_dispatch import TorchDispatchMode


def _graph_nodes(root) -> int:
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo += [next_fn for next_fn, _ in node.next_functions]
    return len(seen)


def counts(model: torch.nn.Module, steps: int = 5) -> dict[str, Any]:
    """Per LM training step of ``model``: driver calls, ATen ops, autograd nodes and Python
    calls, averaged over ``steps`` steps after two untimed ones."""
    nodes: list[int] = []
    step = lm_step(model, BATCH, SEQ, lambda loss: nodes.append(_graph_nodes(loss.grad_fn)))
    step()
    events, _own_us, prof = profiled_events(step, steps)
    top_level: Counter[str] = Counter()  # ATen ops not called by another ATen op
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and not (parent and parent.name.startswith("aten::")):
            top_level[event.name] += 1
    python_calls: Counter[str] = Counter()

    def count_calls(frame, event, arg) -> None:
        python_calls[event] += 1
        if event == "call":
            code = frame.f_code
            python_calls[f"{_short(code.co_filename)}:{code.co_qualname}"] += 1
        elif event == "c_call":
            python_calls[f"(builtin) {getattr(arg, '__qualname__', arg)}"] += 1

    threading.setprofile_all_threads(count_calls)
    try:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    finally:
        threading.setprofile_all_threads(None)
    row = {name: events[name] / steps for name in _DRIVER_CALLS}
    row["driver calls"] = sum(row.values())
    row["ATen ops"] = sum(v for k, v in events.items() if k.startswith("aten::")) / steps
    row["ATen ops called from Python or autograd"] = sum(top_level.values()) / steps
    row["autograd nodes"] = nodes[-1]
    row["Python calls"] = python_calls["call"] / steps
    row["builtin calls"] = python_calls["c_call"] / steps
    top = [(k, v) for k, v in python_calls.most_common() if k not in ("call", "c_call", "return",
           "c_return", "c_exception")][:TOP]  # fmt: skip
    row["most called"] = {k: v / steps for k, v in top}
    row["ATen ops by name"] = {
        k: (v / steps, top_level[k] / steps)
        for k, v in events.most_common()
        if k.startswith("aten::")
    }
    return row


TOP = 60  # functions listed per model
TOP_OPS = 40  # ATen ops listed per model


def _short(filename: str) -> str:
    parts = filename.split("/")
    for i, part in enumerate(parts):
        if part in ("cvmm_kernel", "switchhead", "moeut", "torch", "triton"):
            return "/".join(parts[i:])
    return parts[-1]


class _CallSites(TorchDispatchMode):
    """Counts the ATen ops dispatched (below autograd: views as ``view``, the backward's ops
    too) by the innermost line of this workspace's packages on the Python stack."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame, site = sys._getframe(1), "(no frame of this workspace: autograd's C++)"
        while frame is not None:
            name = frame.f_code.co_filename
            if any(f"/{package}/" in name for package in _PACKAGES) and "/benchmarks/" not in name:
                site = f"{_short(name)}:{frame.f_lineno} ({frame.f_code.co_name})"
                break
            frame = frame.f_back
        self.sites[f"{func.overloadpacket.__name__} @ {site}"] += 1
        return func(*args, **(kwargs or {}))


def call_sites(model: torch.nn.Module, steps: int = 2) -> Counter[str]:
    """ATen ops per LM training step of ``model`` by call site (:class:`_CallSites`)."""
    step = lm_step(model, BATCH, SEQ)
    step()
    with _CallSites() as counter:
        for _ in range(steps):
            step()
    torch.cuda.synchronize()
    return Counter({k: v // steps for k, v in counter.sites.items()})


_PACKAGES = ("cvmm_kernel", "switchhead", "moeut")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="", help="suffix of the result files")
    parser.add_argument(
        "--sites",
        action="store_true",
        help="also the MoEUT step's ATen ops by call site (torch profiler stacks)",
    )
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    torch.manual_seed(0)
    models = {
        "MoEUT-244M structure": MoEUTLM(VOCAB, **TINY),
        "dense 18 layers": DenseLM(d=128, layers=18, heads=4, ff=512),
    }
    rows = {name: counts(model.cuda().train()) for name, model in models.items()}
    setup = f"tiny widths, B={BATCH}, T={SEQ}, bf16 autocast; per LM training step"
    meta = metadata(setup=setup, label=args.label)
    label = f" ({args.label})" if args.label else ""
    lines = [f"Host work per eager step{label}, {environment_line(meta)} ({meta['setup']})", ""]
    lines += table_header("what", *models)
    for key in next(iter(rows.values())):
        if key not in ("most called", "ATen ops by name"):
            lines.append(f"| {key} | " + " | ".join(f"{r[key]:.0f}" for r in rows.values()) + " |")
    for name, row in rows.items():
        lines += ["", f"{name}: ATen ops per step (all; called from Python or autograd)", ""]
        lines += table_header("op", "all", "outermost")
        ops = list(row["ATen ops by name"].items())[:TOP_OPS]
        lines += [f"| {k[6:]} | {v:.0f} | {t:.0f} |" for k, (v, t) in ops]
    for name, row in rows.items():
        lines += ["", f"{name}: the most called functions, calls per step", ""]
        lines += table_header("function", "calls")
        lines += [f"| `{k}` | {v:.0f} |" for k, v in row["most called"].items()]
    if args.sites:
        torch.manual_seed(0)
        sites = call_sites(MoEUTLM(VOCAB, **TINY).cuda().train())
        lines += ["", "MoEUT-244M structure: ATen ops dispatched per step by call site", ""]
        lines += table_header("op @ innermost line of this workspace", "per step")
        lines += [f"| `{k}` | {v} |" for k, v in sites.most_common(TOP)]
    table = "\n".join(lines)
    print(table)
    name = f"step_counts_{args.label}" if args.label else "step_counts"
    write_results(name, {"meta": meta, "rows": rows}, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
