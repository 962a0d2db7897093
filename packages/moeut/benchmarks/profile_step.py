r"""Where the time of a MoEUT training step goes (CUDA): wall time vs GPU kernel time, top ops.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/profile_step.py [--profile MoEUT_244M] [--by-shape] \
        [--compile]

The step is the benchmark's (LM forward+backward, bf16 autocast, B=8, T=1024, vocab 8000). Prints
the wall time per step, the summed GPU kernel time of one profiled step and the ops that take the
most GPU time; writes the same text to ``$OUT/profile_<profile>.txt`` if ``$OUT`` is set, else to
``benchmarks/results/``. Wall time well above kernel time means the step is bound by the host
(launch overhead), not by the GPU. ``--by-shape`` also lists the ops per input shape (which
tensors the casts, copies and gradient additions are of). ``--python`` also profiles the host's
Python with cProfile over a few steps (the functions that cost host time, by own time).
``--idle`` also attributes the GPU's idle time in one profiled step to the host ops that
launched the kernel after each idle gap (see :func:`idle_table`): where a host-bound step makes
the GPU wait.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from bench_harness import profile_steps, python_profile, require_cuda, write_text
from moeut import MoEUTLM, profiles
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

VOCAB, BATCH, SEQ = 8000, 8, 1024


def idle_table(prof, rows: int = 40) -> str:
    """The GPU's idle time in a step profiled with ``torch.profiler``, attributed like a
    cumulative profile: each idle gap before a kernel counts towards every host op on the stack
    that launched that kernel (ops, autograd nodes, ``torch.autograd.Function`` and custom-op
    calls, compiled graphs: an outer one includes what it calls). A gap is the host's time
    between issuing the kernel before and this one, beyond the GPU's work in between: what made
    the GPU wait."""
    host = {e.id: e for e in prof.events() if e.device_type == DeviceType.CPU}
    # (start us, end us, id of the host op that launched it) per kernel, from the raw events
    # (the FunctionEvents of torch 2.11 do not keep the link)
    kernels = sorted(
        (e.start_ns() / 1e3, (e.start_ns() + e.duration_ns()) / 1e3, e.linked_correlation_id())
        for e in prof.profiler.kineto_results.events()
        if e.device_type() == DeviceType.CUDA
    )
    if not kernels:
        return "no kernels"
    idle: Counter[str] = Counter()
    gaps: Counter[str] = Counter()
    total = 0.0
    busy_until = kernels[0][1]
    for start, end, launched_by in kernels[1:]:
        gap = start - busy_until
        busy_until = max(busy_until, end)
        if gap <= 0:
            continue
        total += gap
        labels = set()
        op = host.get(launched_by)
        while op is not None:
            labels.add(op.name)
            op = op.cpu_parent
        for label in labels or {"(launch not matched to a host op)"}:
            idle[label] += gap
            gaps[label] += 1
    span = busy_until - kernels[0][0]
    lines = [
        f"GPU idle {total / 1e3:.1f} ms of the {span / 1e3:.1f} ms from the step's first kernel "
        "to its last (under the profiler, whose own host time counts in the gaps)",
        "",
        "| idle ms | gaps | host op (inclusive) |",
        "|---|---|---|",
    ]
    for label, us in idle.most_common(rows):
        lines.append(f"| {us / 1e3:.2f} | {gaps[label]} | {label} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="MoEUT_244M", choices=sorted(profiles.PROFILES))
    parser.add_argument("--by-shape", action="store_true", help="also a table per input shape")
    parser.add_argument("--python", action="store_true", help="also a cProfile host table")
    parser.add_argument("--compile", action="store_true", help="profile the torch.compile'd model")
    parser.add_argument("--idle", action="store_true", help="also where the GPU waits on the host")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    model = MoEUTLM(VOCAB, **profiles.PROFILES[args.profile]).cuda().train()
    run = torch.compile(model, fullgraph=True) if args.compile else model
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(tokens[:, :-1])
            logits = out.outputs.flatten(0, 1).float()
            loss = F.cross_entropy(logits, tokens[:, 1:].flatten()) + out.reg_loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    wall_ms, kernel_ms, events = profile_steps(step)
    if args.by_shape:  # one more profiled step, recording input shapes
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with profile(activities=activities, record_shapes=True) as prof:
            step()
            torch.cuda.synchronize()
    text = "\n".join(
        [
            f"{args.profile}{' compiled' if args.compile else ''} training step on "
            f"{torch.cuda.get_device_name()}, torch "
            f"{torch.__version__}: wall {wall_ms:.1f} ms/step, GPU kernel time {kernel_ms:.1f} ms",
            "",
            events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60),
        ]
    )
    host = events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
    text += "\n\nBy host time (self CPU, inflated by the profiler):\n" + host
    if args.by_shape:
        by_shape = prof.key_averages(group_by_input_shape=True)
        table = by_shape.table(
            sort_by="self_device_time_total", row_limit=30, max_name_column_width=40
        )
        text += "\n\nBy input shape:\n" + table
    if args.idle:
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with profile(activities=activities) as traced:
            step()
            torch.cuda.synchronize()
        text += "\n\nWhere the GPU waits on the host:\n" + idle_table(traced)
    if args.python:
        text += "\n\nHost Python (cProfile over 5 steps, by own time):\n" + python_profile(step)
    print(text)
    suffix = "_compiled" if args.compile else ""
    write_text(f"profile_{args.profile}{suffix}.txt", text, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
