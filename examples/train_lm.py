"""Train a byte-level language model built from the workspace packages (the main demo).

    uv run python examples/train_lm.py                 # MoEUT + SwitchHead, CPU-sized defaults
    uv run python examples/train_lm.py --attention colt5   # CoLT5 routed attention + sigma-MoE
    uv run python examples/train_lm.py --resume runs/<time>   # continue a run where it stopped
    uv run python examples/train_lm.py --help
    uv run torchrun --standalone --nproc_per_node 2 examples/train_lm.py   # data parallel (DDP)
    uv run torchrun --standalone --nproc_per_node 2 examples/train_lm.py --fsdp   # sharded (FSDP2)
    uv run python examples/train_lm.py --log-dir runs/tb   # also log to TensorBoard

By default the corpus is the Python standard library's own source (offline, on any machine).
Writes to the run folder: the checkpoint (checkpoint.json, the weights in safetensors and the
training state; see lm_demo/checkpoint.py), loss.png, experts.png, sample.txt, history.json and
metrics.jsonl (at every validation: losses, tokens/s, MFU, and per MoE layer the entropy of
its expert usage and its dead experts; see lm_demo/metrics.py).

The helpers (``lm_demo``, next to this file) are an installed package: examples/ is a workspace
member (``lm-demo-examples``, examples/pyproject.toml) that ``uv run`` installs with what the
demo imports.

Under torchrun every process trains on its own batches. By default each holds the whole model and
DDP averages the gradients; with --fsdp (MoEUT models, 2 or more processes) FSDP2 shards the
parameters, gradients and optimizer state over the processes (lm_demo/distributed.py). Either
way the MoE regularisers average expert usage over all processes, rank 0 alone logs, shows
progress and writes the run folder, and the checkpoint has the single-process format.
--activation-checkpointing recomputes each layer application in the backward pass instead of
keeping its activations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_demo.data import decode, encode, load_corpus, sample_batch
from lm_demo.metrics import (
    ExpertUsage,
    MetricsLogger,
    device_peak_flops,
    expert_metrics,
    flops_per_token,
    mfu,
    tensorboard_writer_class,
)
from lm_demo.plots import plot_expert_usage, plot_losses

try:  # optional: without tqdm the demo prints its own one-line progress
    from tqdm.auto import tqdm
except ImportError:
    tqdm = None

PROFILES = {
    # CPU-sized: a few minutes on 2 cores.
    "tiny": dict(
        d_model=128,
        n_layers=4,
        n_heads=4,
        ff_n_experts=16,
        ff_expert_size=32,
        att_n_experts=4,
        d_head=32,
        ff_k=4,
        group_size=2,
    ),
    # GPU-sized.
    "small": dict(
        d_model=512,
        n_layers=8,
        n_heads=4,
        ff_n_experts=64,
        ff_expert_size=128,
        att_n_experts=8,
        d_head=64,
        ff_k=8,
        group_size=2,
    ),
}


# The wider GPU profile diverges (colt5) or learns slowly at the tiny profile's rate.
DEFAULT_LR = {"tiny": 3e-3, "small": 1e-3}


# Settings that define a run: stored in its checkpoints, restored by --resume. The other flags
# (--out, --device, --compile, --resume, --log-dir, --peak-tflops, --fsdp,
# --activation-checkpointing) only say where and how this process runs and reports.
SETTINGS = (
    "profile",
    "attention",
    "softmax_n",
    "steps",
    "batch_size",
    "seq_len",
    "grad_accum",
    "lr",
    "warmup",
    "weight_decay",
    "clip",
    "seed",
    "data",
    "eval_every",
    "sample_tokens",
)


def _number(kind, low: float, low_ok: bool = True):
    """An argparse ``type``: a finite ``kind`` >= ``low`` (> ``low`` unless ``low_ok``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not low_ok):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'>=' if low_ok else '>'} {low}, got {text!r}"
            )
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--grad-accum",
        type=_number(int, 1),
        default=1,
        metavar="K",
        help="micro-batches per optimizer step (gradient accumulation; default 1)",
    )
    p.add_argument(
        "--lr",
        type=_number(float, 0, low_ok=False),
        default=None,
        help="peak learning rate (default: the profile's, 3e-3 tiny, 1e-3 small)",
    )
    p.add_argument(
        "--warmup",
        type=_number(int, 0),
        default=None,
        metavar="STEPS",
        help="linear warmup steps, then cosine decay to a tenth of --lr at the last step "
        "(default: a tenth of --steps, at most 100)",
    )
    p.add_argument(
        "--weight-decay",
        type=_number(float, 0),
        default=0.01,
        help="AdamW weight decay (default 0.01); never on norms, embeddings and biases",
    )
    p.add_argument(
        "--clip",
        type=_number(float, 0),
        default=1.0,
        help="clip the gradient norm to this (default 1.0; 0: no clipping)",
    )
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=None,
        help="model size (default: tiny on CPU, small on CUDA)",
    )
    p.add_argument(
        "--attention",
        choices=["switchhead", "switchhead-xl", "dense", "colt5"],
        default="switchhead",
        help="attention (dense = SwitchHead with one expert, plain heads; colt5 = not MoEUT but "
        "a causal CoLT5 LM: local attention plus heavy attention to keys routed from earlier "
        "windows of 32 tokens, with sigma-MoE feedforwards)",
    )
    p.add_argument(
        "--softmax-n",
        type=_number(float, 0),
        default=None,
        metavar="N",
        help="use softmax_n attention with this n, a finite number >= 0 (e.g. 1.0)",
    )
    p.add_argument("--data", default=None, help="text file or folder (default: Python's stdlib)")
    p.add_argument(
        "--out", default=None, help="run folder (default: runs/<time>; on --resume, its folder)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="train through torch.compile(model) (off by default; on CPU it needs a C++ "
        "compiler and compiles for a while first)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun with 2 or more processes: shard the parameters, gradients and "
        "optimizer state over the processes with FSDP2 (fully_shard on each distinct MoEUT "
        "layer, then on the whole model) instead of replicating the model with DDP; the "
        "checkpoint keeps the single-process format (MoEUT models only; fails without torchrun)",
    )
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each layer application in the backward pass instead of keeping its "
        "activations: less memory, one more forward of the layers per step (MoEUT models only)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-every", type=int, default=50, help="validate and checkpoint every N steps"
    )
    p.add_argument("--sample-tokens", type=int, default=200, help="bytes to generate at the end")
    p.add_argument(
        "--log-dir",
        default=None,
        metavar="DIR",
        help="also write TensorBoard event files to DIR (needs the tensorboard package): "
        "training loss, learning rate, tokens/s and MFU every step; validation loss and, per "
        "MoE layer, expert-usage entropy and dead experts at every validation",
    )
    p.add_argument(
        "--peak-tflops",
        type=_number(float, 0, low_ok=False),
        default=None,
        metavar="TFLOPS",
        help="peak bf16 TFLOP/s of one device, for the MFU (default: from the table in "
        "lm_demo/metrics.py for known GPUs; on CPU, MFU is reported only with this flag)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="CHECKPOINT",
        help="continue a run from its checkpoint (run folder or its checkpoint.json); restores "
        "every setting stored there, flags given again must agree (only --out, --device, "
        "--compile, --log-dir, --peak-tflops, --fsdp and --activation-checkpointing may "
        "change)",
    )
    return p


def launched_world_size() -> int:
    """Processes of this run: those of an initialised ``torch.distributed`` default group, else
    torchrun's ``WORLD_SIZE`` (1 without torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _same(key: str, given, stored) -> bool:
    if key == "data" and given is not None and stored is not None:
        return Path(given).expanduser().resolve() == Path(stored)
    return given == stored


def _resume_settings(p: argparse.ArgumentParser, args: argparse.Namespace, argv) -> None:
    """``--resume``: load and verify the checkpoint into ``args.checkpoint`` and take its
    settings; a flag given again with a different value is an error naming it."""
    from lm_demo.checkpoint import CheckpointError, load_checkpoint, manifest_path

    if not manifest_path(args.resume).is_file():
        p.error(f"--resume: no such checkpoint: {args.resume}")
    try:
        args.checkpoint = load_checkpoint(args.resume)
    except CheckpointError as e:
        p.error(f"--resume: {e}")
    stored = args.checkpoint.settings
    missing = [k for k in SETTINGS if k not in stored]
    if missing:
        p.error(f"--resume: the checkpoint lacks the settings {', '.join(missing)}")
    # The flags given on this command line: argparse fills in defaults only for names the
    # namespace lacks, so a namespace preset with a marker keeps the omitted flags visible.
    unset = object()
    given = vars(p.parse_args(argv, argparse.Namespace(**dict.fromkeys(SETTINGS, unset))))
    explicit = {k: v for k, v in given.items() if v is not unset}
    flag = lambda k: "--" + k.replace("_", "-")
    differ = [
        f"{flag(k)} {explicit[k]} (checkpoint: {stored[k]})"
        for k in SETTINGS
        if k in explicit and not _same(k, explicit[k], stored[k])
    ]
    if differ:
        p.error(
            "--resume: these flags differ from the settings stored in the checkpoint: "
            + "; ".join(differ)
            + ". Leave them out to continue the run as it was, or start a new run."
        )
    for k in SETTINGS:
        setattr(args, k, stored[k])
    if args.out is None:
        args.out = str(args.checkpoint.path.parent)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line as a namespace. On ``--resume`` the checkpoint is loaded and verified
    (``args.checkpoint``), its settings replace the defaults, and a flag given again with a
    different value is an error naming it."""
    p = build_parser()
    args = p.parse_args(argv)
    args.checkpoint = None
    if args.resume is not None:
        _resume_settings(p, args, argv)
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 2:
        p.error("--steps, --batch-size must be >= 1 and --seq-len >= 2")
    if args.eval_every < 1 or args.sample_tokens < 0:
        p.error("--eval-every must be >= 1 and --sample-tokens >= 0")
    if args.warmup is None:
        args.warmup = min(100, args.steps // 10)
    if args.warmup > args.steps:
        p.error(f"--warmup {args.warmup} is longer than the run (--steps {args.steps})")
    if args.data is not None:
        args.data = str(Path(args.data).expanduser().resolve())
    if args.log_dir is not None:
        try:
            tensorboard_writer_class()
        except ImportError as e:
            p.error(str(e))
    if args.attention == "colt5" and (args.fsdp or args.activation_checkpointing):
        p.error(
            "--fsdp and --activation-checkpointing are implemented for the MoEUT models "
            "(--attention switchhead, switchhead-xl or dense), not for colt5"
        )
    if args.fsdp and launched_world_size() < 2:
        p.error(
            "--fsdp shards the model over the processes of a torchrun launch and needs 2 or "
            "more of them, e.g. `torchrun --standalone --nproc-per-node 2 "
            "examples/train_lm.py --fsdp`; without torchrun, leave --fsdp out"
        )
    return args


def build_model(args: argparse.Namespace, vocab: int) -> torch.nn.Module:
    """The model of ``args.attention`` at ``args.profile`` for a vocabulary of ``vocab``: a
    ``moeut.MoEUTLM``, or for ``colt5`` an ``lm_demo.colt5_lm.CoLT5LM`` (same interface)."""
    from moeut import MoEUTLM, SwitchHeadRope, SwitchHeadXL

    config = dict(PROFILES[args.profile])
    if args.attention == "dense":
        config["att_n_experts"] = 1
    attention_fn = None
    if args.softmax_n is not None:
        from softmax_n import softmax_n_attention_fn

        attention_fn = softmax_n_attention_fn(args.softmax_n)
    if args.attention == "colt5":
        from lm_demo.colt5_lm import CoLT5LM

        for unused in ("att_n_experts", "group_size"):  # no layer sharing, no attention experts
            config.pop(unused)
        return CoLT5LM(vocab, **config, attention_fn=attention_fn)
    attention = SwitchHeadXL if args.attention == "switchhead-xl" else SwitchHeadRope
    return MoEUTLM(vocab, **config, attention=attention, attention_fn=attention_fn)


@torch.no_grad()
def evaluate(model, data, args, device, generator, batches: int = 4) -> float:
    model.eval()
    losses = []
    for _ in range(batches):
        x, y = sample_batch(data, args.batch_size, args.seq_len, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x.to(device)).outputs
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def progress(step: int, total: int, loss: float, tok_s: float, eta: float, bar=None) -> None:
    """Progress after optimizer step ``step``: the tqdm ``bar`` when there is one, else a line
    of text (rewritten in place on a terminal, every 25 steps otherwise)."""
    if bar is not None:
        bar.update(step - bar.n)
        bar.set_postfix_str(f"loss {loss:.3f}, {tok_s:,.0f} tok/s", refresh=False)
        return
    width = 24
    done = int(width * step / total)
    line = (
        f"[{'#' * done}{'.' * (width - done)}] {step}/{total} loss {loss:.3f} "
        f"{tok_s:,.0f} tok/s ETA {eta:5.0f}s"
    )
    if sys.stderr.isatty():
        print("\r" + line, end="", file=sys.stderr, flush=True)
    elif step % 25 == 0 or step == total:
        print(line, file=sys.stderr, flush=True)


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun (gloo on CPU, NCCL on CUDA); else (0, 1, device)
    for a single process. A default process group the caller already initialised is used as it
    is."""
    if launched_world_size() == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def save_run_checkpoint(
    out: Path, step: int, model, opt, sched, history, args, sharded: bool = False
) -> Path | None:
    """The checkpoint of ``step`` (see ``lm_demo.checkpoint``): weights, settings, optimizer,
    scheduler and RNG state, loss history.

    With ``sharded`` (an FSDP model), every rank must call it: the full model and optimizer
    state are gathered on rank 0, which alone writes (the same files as one process would) and
    gets the manifest's path; the other ranks get ``None``."""
    from lm_demo.checkpoint import save_checkpoint

    if sharded:
        import torch.distributed as dist
        from lm_demo.distributed import full_state_dicts

        model_state, opt_state = full_state_dicts(model, opt)
        if dist.get_rank() != 0:
            return None
    else:
        model_state, opt_state = model.state_dict(), opt.state_dict()

    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "optimizer": opt_state,
        "scheduler": sched.state_dict(),
        "rng": rng,
        "history": history,
    }
    return save_checkpoint(out, step, model_state, state)


def load_model(checkpoint, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of a checkpoint (its folder or ``checkpoint.json``), built from its settings,
    with its weights, in eval mode."""
    from lm_demo.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model = build_model(argparse.Namespace(**ckpt.settings), 256)
    model.load_state_dict(ckpt.model)
    return model.to(device).eval()


def main(argv=None) -> dict:
    """Train as the command line ``argv`` says (see ``--help``); the result: ``history``,
    ``out``, ``tokens_per_s``, ``metrics`` and ``sample`` (empty on ranks other than 0)."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.profile is None:
        args.profile = "small" if device.type == "cuda" else "tiny"
    if args.lr is None:
        args.lr = DEFAULT_LR[args.profile]
    import torch.distributed as dist

    # A process group the caller set up is left to the caller; one made here is destroyed here.
    own_group = not (dist.is_available() and dist.is_initialized())
    rank, world, device = setup_distributed(device)
    try:
        return _train(args, rank, world, device)
    finally:
        if world > 1 and own_group and dist.is_initialized():
            dist.destroy_process_group()


def sample_text(model, args, device: torch.device) -> str:
    """``args.sample_tokens`` bytes sampled after the prompt ``def `` (temperature 0.8, top 40)."""
    prompt = encode("def ").unsqueeze(0).to(device)
    sampler = torch.Generator(device=device).manual_seed(args.seed)
    tokens = model.generate(
        prompt, args.sample_tokens, temperature=0.8, top_k=40, generator=sampler
    )
    return decode(tokens[0].cpu())


def _train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    """``main`` after the process group is set up: training, checkpoints, plots, sample."""
    from lm_demo.training import lr_scheduler, param_groups

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    corpus = load_corpus(args.data)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    log = print if rank == 0 else (lambda *a, **k: None)

    fsdp = args.fsdp and world > 1
    model = _build_training_model(args, corpus.vocab_size, world, device, fsdp)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    sched = lr_scheduler(opt, args.warmup, args.steps)
    history: dict[str, list] = {"train": [], "validation": []}
    start = 0
    if args.checkpoint is not None:
        ckpt, args.checkpoint = args.checkpoint, None
        start, history = _restore(ckpt, model, opt, sched, device, fsdp)
        del ckpt
    train_model, ddp = _training_model(model, args, world, device, fsdp)
    n_params = sum(p.numel() for p in model.parameters())
    kind = "CoLT5 LM" if args.attention == "colt5" else f"{args.attention} MoEUT"
    parallel = f" x {world} processes ({'FSDP2' if fsdp else 'DDP'})" if world > 1 else ""
    log(
        f"{kind} '{args.profile}' ({n_params / 1e6:.2f}M parameters) on {device}{parallel}"
        f"{', activation checkpointing' if args.activation_checkpointing else ''}; "
        f"data {corpus.source} "
        f"({corpus.train.numel():,} bytes); run folder {out}"
        f"{f'; resumed after step {start}' if start else ''}"
    )

    gen = torch.Generator()  # reseeded for every micro-batch: batches depend on position alone
    # Metrics: expert usage as the MoE layers report it during the training forwards (see
    # lm_demo/metrics.py), FLOPs per token for the MFU, metrics.jsonl and TensorBoard.
    usage_counter = ExpertUsage(model)
    model_flops = flops_per_token(model)
    peak = device_peak_flops(device, args.peak_tflops)
    if peak is None:
        log(
            f"MFU not reported: no peak FLOP/s known for {device} (give --peak-tflops)",
            file=sys.stderr,
        )
    metrics = MetricsLogger(out, args.log_dir, enabled=rank == 0)
    records: list[dict] = []
    last_usage, window_start = [], start + 1
    bar = None
    if rank == 0 and tqdm is not None:
        bar = tqdm(total=args.steps, initial=start, desc="training", unit="step", file=sys.stderr)
    write = bar.write if bar is not None else (lambda text: log("\n" + text, file=sys.stderr))
    t0, tokens_seen = time.time(), 0
    window_time, window_tokens = 0.0, 0
    try:
        for step in range(start + 1, args.steps + 1):
            t_step = time.time()
            opt.zero_grad(set_to_none=True)
            step_loss, step_tokens = _accumulate_gradients(
                step, args, rank, world, corpus.train, gen, model, train_model, ddp, fsdp, device
            )
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the step's time, for tokens/s and MFU
            step_time = max(time.time() - t_step, 1e-9)
            tokens_seen += step_tokens
            window_time += step_time
            window_tokens += step_tokens
            history["train"].append((step, step_loss))
            elapsed = time.time() - t0
            if rank == 0:
                step_mfu = (
                    None if peak is None else mfu(step_tokens / step_time, model_flops, peak, world)
                )
                metrics.scalars(
                    step,
                    {
                        "loss/train": step_loss,
                        "lr": lr,
                        "throughput/tokens_per_s": step_tokens / step_time,
                        "throughput/mfu": step_mfu,
                    },
                )
                progress(
                    step,
                    args.steps,
                    step_loss,
                    tokens_seen / elapsed,
                    elapsed / (step - start) * (args.steps - step),
                    bar,
                )
            if step % args.eval_every == 0 or step == args.steps:
                val = evaluate(model, corpus.val, args, device, torch.Generator().manual_seed(1234))
                history["validation"].append((step, val))
                usage = usage_counter.take()
                tok_s = window_tokens / window_time
                record = {
                    "loss": step_loss,
                    "validation_loss": val,
                    "tokens_per_s": tok_s,
                    "mfu": None if peak is None else mfu(tok_s, model_flops, peak, world),
                    "flops_per_token": model_flops,
                    "window": [window_start, step],
                    "experts": expert_metrics(usage),
                }
                records.append({"step": step, **record})
                metrics.record(step, record)
                if usage:
                    last_usage = (usage, window_start, step, window_tokens)
                window_start, window_time, window_tokens = step + 1, 0.0, 0
                dead = sum(m["dead"] for m in record["experts"].values())
                write(
                    f"step {step}: validation loss {val:.3f} nats/byte, "
                    f"perplexity {math.exp(val):.2f}, {tok_s:,.0f} tok/s"
                    + (f", MFU {record['mfu']:.1%}" if record["mfu"] is not None else "")
                    + (f", {dead} dead experts" if usage else "")
                )
                if rank == 0 or fsdp:  # under FSDP, every rank takes part in gathering it
                    save_run_checkpoint(out, step, model, opt, sched, history, args, fsdp)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        usage_counter.close()
    tok_s = tokens_seen / max(time.time() - t0, 1e-9)
    log(f"trained {args.steps - start} steps at {tok_s:,.0f} tokens/s")
    result = {"history": history, "out": out, "tokens_per_s": tok_s, "metrics": records}
    return _finish(model, args, rank, world, device, fsdp, out, history, last_usage, result)


def _build_training_model(
    args: argparse.Namespace, vocab: int, world: int, device: torch.device, fsdp: bool
) -> torch.nn.Module:
    """The model on ``device``, set up for the run: the regulariser's process group,
    activation checkpointing, and its FSDP2 shards (``fsdp``)."""
    from lm_demo.distributed import shard_model

    model = build_model(args, vocab).to(device)
    if world > 1 and hasattr(model, "reg_process_group"):
        import torch.distributed as dist

        # Expert usage averaged over the whole batch of all ranks before the entropy is taken,
        # as the authors' training code does (moeut.entropy_reg's ``group``).
        model.reg_process_group = dist.group.WORLD
    if args.activation_checkpointing:
        model.activation_checkpointing = True
    if fsdp:  # before the optimizer: it holds the shards
        shard_model(model, device)
    return model


def _restore(ckpt, model, opt, sched, device: torch.device, fsdp: bool) -> tuple[int, dict]:
    """Load the weights, optimizer, scheduler and RNG state of the checkpoint ``ckpt``; its
    step and loss history."""
    from lm_demo.distributed import load_full_state_dicts

    if fsdp:  # every rank keeps its shard of the full state dicts
        load_full_state_dicts(model, opt, ckpt.model, ckpt.state["optimizer"])
    else:
        model.load_state_dict(ckpt.model)
        opt.load_state_dict(ckpt.state["optimizer"])
    sched.load_state_dict(ckpt.state["scheduler"])
    torch.set_rng_state(ckpt.state["rng"]["torch"])
    if device.type == "cuda" and "cuda" in ckpt.state["rng"]:
        torch.cuda.set_rng_state_all(ckpt.state["rng"]["cuda"])
    return ckpt.step, ckpt.state["history"]


def _training_model(model, args: argparse.Namespace, world: int, device: torch.device, fsdp: bool):
    """``(train_model, ddp)``: what the training steps call (``model``, in
    ``DistributedDataParallel`` over several processes without FSDP, compiled with
    ``--compile``), and the DDP wrapper or ``None``."""
    train_model, ddp = model, None
    if world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        train_model = ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        train_model = torch.compile(train_model)
    return train_model, ddp


def _accumulate_gradients(
    step, args, rank, world, data, gen, model, train_model, ddp, fsdp, device
) -> tuple[float, int]:
    """The forwards and backwards of the micro-batches of optimizer step ``step``: the step's
    loss and its tokens (over all processes)."""
    from lm_demo.training import batch_seed

    step_loss, step_tokens = 0.0, 0
    for micro in range(args.grad_accum):
        gen.manual_seed(batch_seed(args.seed, rank, (step - 1) * args.grad_accum + micro))
        x, y = sample_batch(data, args.batch_size, args.seq_len, gen)
        last = micro == args.grad_accum - 1
        # DDP and FSDP average gradients over the processes once per optimizer step
        if fsdp:
            model.set_requires_gradient_sync(last)
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                res = train_model(x.to(device))
                loss = F.cross_entropy(res.outputs.float().flatten(0, 1), y.to(device).flatten())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss is {loss.item()} at step {step}: the run "
                    "diverged; try a lower --lr"
                )
            ((loss + res.reg_loss) / args.grad_accum).backward()
        step_loss += loss.item() / args.grad_accum
        step_tokens += x.numel() * world
    return step_loss, step_tokens


def _finish(model, args, rank, world, device, fsdp, out, history, last_usage, result) -> dict:
    """After the last step: the parameter checksum, the sample and, on rank 0, the plots and
    files of the run folder; ``result`` with the ``sample`` (empty on the other ranks)."""
    from lm_demo.distributed import parameter_sum

    print(f"rank {rank} parameter checksum {parameter_sum(model):.10e}", flush=True)
    # Sharded weights: every rank runs the sampling forwards (the same tokens), rank 0 writes.
    text = sample_text(model, args, device) if fsdp else None
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank != 0:
        return result | {"sample": ""}

    plot_losses(history, out / "loss.png")
    if last_usage:  # the expert usage of the last validation window (the end of training)
        usage, first, last, n_tokens = last_usage
        plot_expert_usage(
            usage, out / "experts.png", window=f"steps {first}-{last}, {n_tokens:,} tokens"
        )
    if text is None:
        text = sample_text(model, args, device)
    (out / "sample.txt").write_text(text)
    (out / "history.json").write_text(json.dumps(history))
    print("sample:\n" + text)
    return result | {"sample": text}


if __name__ == "__main__":
    main()
