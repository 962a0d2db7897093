r"""How much host work an eager MoEUT training step issues, counted (CUDA): deterministic where
host times are not.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/step_counts.py [--label NAME] [--sites] [--switchhead]

The shared machine's host speed moves by tens of percent within minutes, which hides a saving
of a few percent in any timing (``ab_host_savings.md``). What the host does per step can be
counted instead: for the MoEUT-244M structure at tiny widths (``host_overhead.py``'s model) and
its dense baseline, per LM training step (forward + backward, bf16 autocast): driver calls
(kernel launches, memsets, copies) and ATen ops (nested ones included) from the torch profiler,
the autograd graph's nodes, and the Python function calls (Python and builtin, all threads,
``threading.setprofile_all_threads``), with the most called functions. Run it on two checkouts
to compare them. ``--sites``: also the first model's ATen ops by the line of this workspace
that issues them. ``--switchhead``: ``bench_switchhead.py``'s rope-4x4-d100 layer and dense MHA
(B=8, T=1024; switchhead's ``benchmarks`` folder on ``PYTHONPATH``) instead, their results with
``_switchhead`` in the name. Writes ``step_counts[_LABEL].json`` and ``.md`` to ``$OUT`` if set,
else to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from ab_weight_descriptors import lm_step
from bench_harness import environment_line, metadata, require_cuda, table_header, write_results
from bench_moeut import DenseLM
from host_overhead import BATCH, SEQ, TINY, VOCAB
from host_profile import _DRIVER_CALLS, profiled_events
from host_sampling import short_path
from moeut import MoEUTLM
from switchhead import SwitchHeadRope
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


def counts(make_step: Callable[..., Callable[[], None]], steps: int = 5) -> dict[str, Any]:
    """Per training step from ``make_step(before_backward)``: driver calls, ATen ops, autograd
    nodes and Python calls, averaged over ``steps`` steps after two untimed ones."""
    nodes: list[int] = []
    step = make_step(lambda loss: nodes.append(_graph_nodes(loss.grad_fn)))
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
            python_calls[f"{short_path(code.co_filename)}:{code.co_qualname}"] += 1
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
                site = f"{short_path(name)}:{frame.f_lineno} ({frame.f_code.co_name})"
                break
            frame = frame.f_back
        self.sites[f"{func.overloadpacket.__name__} @ {site}"] += 1
        return func(*args, **(kwargs or {}))


def call_sites(step: Callable[[], None], steps: int = 2) -> Counter[str]:
    """ATen ops per ``step`` by call site (:class:`_CallSites`)."""
    step()
    with _CallSites() as counter:
        for _ in range(steps):
            step()
    torch.cuda.synchronize()
    return Counter({k: v // steps for k, v in counter.sites.items()})


_PACKAGES = ("cvmm_kernel", "switchhead", "moeut")


def layer_step(layer: torch.nn.Module, dense: bool, before_backward=None) -> Callable[[], None]:
    """A SwitchHead or (``dense``) dense attention layer's training step as
    ``bench_switchhead.py`` times it: ``x [8, 1024, 1024]``, forward + backward under bf16
    autocast."""
    x = torch.randn(8, 1024, 1024, device="cuda", requires_grad=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x) if dense else layer(x, x, x)[0]
        loss = out.float().sum()
        if before_backward is not None:
            before_backward(loss)
        loss.backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="", help="suffix of the result files")
    parser.add_argument(
        "--sites",
        action="store_true",
        help="also the first model's ATen ops by call site (a dispatch mode)",
    )
    parser.add_argument(
        "--switchhead",
        action="store_true",
        help="bench_switchhead.py's rope-4x4-d100 layer and dense MHA (B=8, T=1024) instead",
    )
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    torch.manual_seed(0)
    if args.switchhead:  # (switchhead's benchmarks folder on PYTHONPATH)
        from bench_switchhead import DenseMHA

        layers = {"rope-4x4-d100": SwitchHeadRope(1024, 4, 4, d_head=100), "dense-mha-16x64":
                  DenseMHA()}  # fmt: skip
        makers = {name: functools.partial(layer_step, m.cuda(), isinstance(m, DenseMHA))
                  for name, m in layers.items()}  # fmt: skip
        setup = "bench_switchhead.py's layers, B=8, T=1024, bf16 autocast; per training step"
    else:
        models = {"MoEUT-244M structure": MoEUTLM(VOCAB, **TINY),
                  "dense 18 layers": DenseLM(d=128, layers=18, heads=4, ff=512)}  # fmt: skip
        makers = {name: functools.partial(lm_step, m.cuda().train(), BATCH, SEQ)
                  for name, m in models.items()}  # fmt: skip
        setup = f"tiny widths, B={BATCH}, T={SEQ}, bf16 autocast; per LM training step"
    rows = {name: counts(make) for name, make in makers.items()}
    meta = metadata(setup=setup, label=args.label)
    label = f" ({args.label})" if args.label else ""
    lines = [f"Host work per eager step{label}, {environment_line(meta)} ({meta['setup']})", ""]
    lines += table_header("what", *makers)
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
        first = next(iter(makers))
        sites = call_sites(makers[first]())
        lines += ["", f"{first}: ATen ops dispatched per step by call site", ""]
        lines += table_header("op @ innermost line of this workspace", "per step")
        lines += [f"| `{k}` | {v} |" for k, v in sites.most_common(TOP)]
    table = "\n".join(lines)
    print(table)
    name = "step_counts" + ("_switchhead" if args.switchhead else "")
    name += f"_{args.label}" if args.label else ""
    write_results(name, {"meta": meta, "rows": rows}, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
