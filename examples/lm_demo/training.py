"""Training hygiene of the demo: the learning-rate schedule, AdamW parameter groups, and
per-step batch seeds (so that a resumed run draws the same batches as an uninterrupted one)."""

from __future__ import annotations

import hashlib
import math

import torch

# The cosine decay ends at this share of the peak learning rate.
MIN_LR_FRACTION = 0.1

# Modules whose parameters get no weight decay (besides every parameter named ``bias``).
_NO_DECAY_MODULES = (
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.RMSNorm,
    torch.nn.LocalResponseNorm,
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.Embedding,
    torch.nn.EmbeddingBag,
)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Share of the peak learning rate used by optimizer step ``step`` (1-based): linear warmup
    ``step / warmup`` over the first ``warmup`` steps, then cosine decay from 1 at step
    ``warmup`` to ``MIN_LR_FRACTION`` at step ``total``."""
    if step < warmup:
        return step / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_scheduler(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :func:`lr_factor`: after ``k`` calls of ``scheduler.step()`` (``k``
    optimizer steps done) the groups hold the learning rate of step ``k + 1``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: lr_factor(done + 1, warmup, total)
    )


def _no_decay(module: torch.nn.Module, name: str) -> bool:
    return (
        isinstance(module, _NO_DECAY_MODULES)
        or type(module).__name__.endswith("Norm")  # custom norms (RMSNorm variants, ...)
        or name == "bias"
        or name.endswith("_bias")
    )


def split_decay(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that get weight decay, and of those that do not
    (normalisation layers, embeddings, biases). A parameter shared by several modules is
    listed once, under its first name."""
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            (no_decay if _no_decay(module, name) else decay).append(full)
    return decay, no_decay


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on weights of linear maps and experts, none on
    normalisation layers, embeddings and biases."""
    decay, no_decay = split_decay(model)
    params = dict(model.named_parameters())
    return [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]


def batch_seed(*keys: int) -> int:
    """A 64-bit generator seed from integers (run seed, rank, batch index): each batch is a
    function of its position in the run alone, not of the batches drawn before it."""
    digest = hashlib.blake2b("/".join(map(str, keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
