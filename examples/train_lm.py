"""Train a byte-level language model built from the workspace packages (the main demo).

    uv run python examples/train_lm.py                 # MoEUT + SwitchHead, CPU-sized defaults
    uv run python examples/train_lm.py --attention colt5   # CoLT5 routed attention + sigma-MoE
    uv run python examples/train_lm.py --help
    uv run torchrun --standalone --nproc_per_node 2 examples/train_lm.py   # data parallel (DDP)

By default the corpus is the Python standard library's own source (offline, on any machine).
Writes to the run folder: checkpoint.pt, loss.png, experts.png, sample.txt, history.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lm_demo.data import decode, encode, load_corpus, sample_batch
from lm_demo.plots import plot_expert_usage, plot_losses

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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate, cosine decay (default: the profile's, 3e-3 tiny, 1e-3 small)",
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
        type=float,
        default=None,
        metavar="N",
        help="use softmax_n attention with this n (e.g. 1.0)",
    )
    p.add_argument("--data", default=None, help="text file or folder (default: Python's stdlib)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<time>)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50, help="validate every N steps")
    p.add_argument("--sample-tokens", type=int, default=200, help="bytes to generate at the end")
    p.add_argument("--resume", default=None, help="checkpoint.pt to continue from")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 2:
        p.error("--steps, --batch-size must be >= 1 and --seq-len >= 2")
    if args.softmax_n is not None and args.softmax_n < 0:
        p.error("--softmax-n must be >= 0")
    if args.resume is not None and not Path(args.resume).is_file():
        p.error(f"--resume: no such checkpoint: {args.resume}")
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


@torch.no_grad()
def expert_usage(model, data, args, device, generator) -> dict[str, torch.Tensor]:
    """Selection counts per expert of every feedforward MoE layer on one validation batch."""
    from moeut import SigmaMoE

    counts: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, SigmaMoE):

            def hook(mod, inputs, output, name=name):
                sel_in = inputs[1] if len(inputs) > 1 and inputs[1] is not None else inputs[0]
                index = F.linear(sel_in.float(), mod.expert_sel.float()).topk(mod.n_heads).indices
                used = torch.bincount(index.flatten().cpu(), minlength=mod.n_experts)
                counts[name] = counts.get(name, 0) + used

            hooks.append(module.register_forward_hook(hook))
    model.eval()
    x, _ = sample_batch(data, args.batch_size, args.seq_len, generator)
    model(x.to(device))
    model.train()
    for h in hooks:
        h.remove()
    return {
        name.replace("transformer.layers.", "layer ")
        .replace("layers.", "layer ")
        .replace(".ffn", ""): c
        for name, c in counts.items()
    }


def progress(step: int, total: int, loss: float, tok_s: float, eta: float) -> None:
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
    for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.profile is None:
        args.profile = "small" if device.type == "cuda" else "tiny"
    if args.lr is None:
        args.lr = DEFAULT_LR[args.profile]
    rank, world, device = setup_distributed(device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    corpus = load_corpus(args.data)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    log = print if rank == 0 else (lambda *a, **k: None)

    model = build_model(args, corpus.vocab_size).to(device)
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    history: dict[str, list] = {"train": [], "validation": []}
    start = 0
    if args.resume:
        state = torch.load(args.resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
    n_params = sum(p.numel() for p in model.parameters())
    kind = "CoLT5 LM" if args.attention == "colt5" else f"{args.attention} MoEUT"
    log(
        f"{kind} '{args.profile}' ({n_params / 1e6:.2f}M parameters) on {device}"
        f"{f' x {world} processes' if world > 1 else ''}; data {corpus.source} "
        f"({corpus.train.numel():,} bytes); run folder {out}"
    )

    gen = torch.Generator().manual_seed(args.seed + start + 1000 * rank)  # own batches per rank
    val_gen = torch.Generator().manual_seed(1234)
    schedule = lambda s: args.lr * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0)))
    t0, tokens_seen = time.time(), 0
    for step in range(start + 1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        x, y = sample_batch(corpus.train, args.batch_size, args.seq_len, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            res = train_model(x.to(device))
            loss = F.cross_entropy(res.outputs.float().flatten(0, 1), y.to(device).flatten())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss is {loss.item()} at step {step}: the run diverged; "
                "try a lower --lr"
            )
        opt.zero_grad(set_to_none=True)
        (loss + res.reg_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += x.numel() * world
        history["train"].append((step, loss.item()))
        elapsed = time.time() - t0
        if rank == 0:
            progress(
                step,
                args.steps,
                loss.item(),
                tokens_seen / elapsed,
                elapsed / (step - start) * (args.steps - step),
            )
        if step % args.eval_every == 0 or step == args.steps:
            val = evaluate(model, corpus.val, args, device, val_gen)
            history["validation"].append((step, val))
            log(
                f"\nstep {step}: validation loss {val:.3f} nats/byte, "
                f"perplexity {math.exp(val):.2f}",
                file=sys.stderr,
            )
            if rank == 0:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "step": step,
                        "history": history,
                        "args": vars(args),
                    },
                    out / "checkpoint.pt",
                )
    tok_s = tokens_seen / max(time.time() - t0, 1e-9)
    log(f"trained {args.steps - start} steps at {tok_s:,.0f} tokens/s")
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    print(f"rank {rank} parameter checksum {checksum:.10e}", flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return {"history": history, "out": out, "tokens_per_s": tok_s, "sample": ""}

    plot_losses(history, out / "loss.png")
    plot_expert_usage(expert_usage(model, corpus.val, args, device, val_gen), out / "experts.png")
    prompt = encode("def ").unsqueeze(0).to(device)
    sampler = torch.Generator(device=device).manual_seed(args.seed)
    tokens = model.generate(
        prompt, args.sample_tokens, temperature=0.8, top_k=40, generator=sampler
    )
    text = decode(tokens[0].cpu())
    (out / "sample.txt").write_text(text)
    (out / "history.json").write_text(json.dumps(history))
    print("sample:\n" + text)
    return {"history": history, "out": out, "tokens_per_s": tok_s, "sample": text}


if __name__ == "__main__":
    main()
