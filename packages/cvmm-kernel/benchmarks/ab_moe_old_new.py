r"""A/B of moe_mlp against an earlier commit's, forward + backward, one process (bf16).

    # here, with git: the commit's package, renamed cvmm_kernel_old (its custom ops included)
    python3 packages/cvmm-kernel/benchmarks/ab_moe_old_new.py --prepare REV --into scratch
    # on the GPU, with scratch/ on the path:
    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':')scratch \
        python3 packages/cvmm-kernel/benchmarks/ab_moe_old_new.py [--old-rev REV]

For each feedforward shape of ``bench_cvmm.py``: the dense matmuls of equal FLOPs, the old and
the new ``moe_mlp`` (each twice, interleaved; CUDA-graph replays, medians), and how far the new
output and gradients are from the old ones. Writes ``ab_moe_old_new.json`` to ``$OUT`` (else
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
from bench_harness import metadata, require_cuda, write_results

PACKAGE = "packages/cvmm-kernel/src/cvmm_kernel"


def prepare(rev: str, into: Path) -> Path:
    """Extract ``rev``'s ``cvmm_kernel`` into ``into/cvmm_kernel_old``, renamed throughout."""
    archive = subprocess.run(["git", "archive", rev, PACKAGE], check=True, capture_output=True)
    target = into / "cvmm_kernel_old"
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".py"):
                text = tar.extractfile(member).read().decode()
                text = text.replace("cvmm_kernel::", "cvmm_kernel_old::")
                text = re.sub(r"\b(from|import) cvmm_kernel\b", r"\1 cvmm_kernel_old", text)
                (target / Path(member.name).name).write_text(text)
    (target / "REVISION").write_text(rev + "\n")
    return target


def compare(B, old_moe_mlp, s) -> dict:
    """One shape: times (dense, old, new, old, new, dense) and the new-vs-old differences."""
    t = B.make_inputs(s, "cuda")
    params = B.trained_tensors(t)
    new = lambda: B.ours_fused(s, t, True)
    old = lambda: old_moe_mlp(t["x"], t["index"], t["gate"], t["up"], t["down"], "relu", True,
                              index_bound=s.n_experts)  # fmt: skip
    with torch.no_grad():
        ref = old().float()
        out_diff = float((new().float() - ref).norm() / ref.norm())
    grads = []
    for fn in (new, old):
        for p in params:
            p.grad = None
        fn().backward(torch.ones(s.tokens, s.d_model, device="cuda", dtype=torch.bfloat16))
        grads.append([p.grad.float().clone() for p in params])
    grad_diff = max(float((a - b).norm() / b.norm()) for a, b in zip(*grads))
    dense_fn, dense_params = B.dense_equal_flops(s, "cuda")
    times = {}
    for name, fn, ps in [("dense", dense_fn, dense_params), ("old", old, params),
                         ("new", new, params), ("old2", old, params), ("new2", new, params),
                         ("dense2", dense_fn, dense_params)]:  # fmt: skip
        times[name] = B.time_fwd_bwd(fn, ps)[0]
    dense = min(times["dense"], times["dense2"])
    old_ms, new_ms = min(times["old"], times["old2"]), min(times["new"], times["new2"])
    row = dict(
        shape=s.name,
        out_rel_diff=out_diff,
        grad_rel_diff=grad_diff,
        **times,
        old_pct=dense / old_ms,
        new_pct=dense / new_ms,
        speedup=old_ms / new_ms,
    )
    print(
        f"{s.name:18s} dense {dense:.3f} old {old_ms:.3f} new {new_ms:.3f}: "
        f"{row['old_pct']:.1%} -> {row['new_pct']:.1%} of dense, x{row['speedup']:.3f}"
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", metavar="REV", help="extract REV's package and exit")
    parser.add_argument("--into", type=Path, default=Path("scratch"))
    args = parser.parse_args()
    if args.prepare:
        print(prepare(args.prepare, args.into))
        return 0
    if not require_cuda(__file__):
        return 2
    import bench_cvmm as B
    import cvmm_kernel_old

    old_rev = (Path(cvmm_kernel_old.__file__).parent / "REVISION").read_text().strip()
    rows = []
    for s in B.SHAPES:
        if s.kind == "ffn":
            rows.append(compare(B, cvmm_kernel_old.moe_mlp, s))
            torch.cuda.empty_cache()
    write_results("ab_moe_old_new", {"meta": metadata(old=old_rev), "rows": rows},
                  script_file=__file__, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
