"""Sharded data parallelism for the demo (``--fsdp``): FSDP2 on the MoEUT model, and full
(unsharded) state dicts for its checkpoints.

``shard_model`` applies ``torch.distributed.fsdp.fully_shard`` to each distinct layer of the
MoEUT stack (each is applied ``n_layers // group_size`` times per forward; FSDP gathers its
parameters for every application and frees them after it) and then to the whole model (the
embedding, output norm and LM head). Every rank keeps a ``1 / world`` shard of every parameter,
gradient and optimizer state.

Checkpoints stay in the single-process format (``lm_demo.checkpoint``):
``full_state_dicts`` gathers the model's and the optimizer's state on rank 0 (on the CPU) with
``torch.distributed.checkpoint.state_dict``, and renames the optimizer's per-parameter state
from parameter names to the integer ids of ``Optimizer.state_dict()``. ``load_full_state_dicts``
does the reverse. A checkpoint of a ``--fsdp`` run therefore resumes with or without ``--fsdp``,
on any number of processes, and the other way round.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def sharded_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules ``shard_model`` shards on their own before the root: the distinct layers of
    a MoEUT stack (``model.transformer.layers``)."""
    stack = getattr(model, "transformer", None)
    layers = getattr(stack, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(
            f"--fsdp shards MoEUT models (model.transformer.layers); got {type(model).__name__}"
        )
    return list(layers)


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard ``model`` (already on ``device``, with the same weights on every rank) over all
    ranks of the default process group with FSDP2: each MoEUT layer, then the root. Returns
    ``model`` (now an ``FSDPModule``; parameter names and the state dict's keys are
    unchanged)."""
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cpu" and torch.__version__ < (2, 6):
        raise RuntimeError(f"--fsdp on CPU needs torch >= 2.6, got {torch.__version__}")
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.5: not yet exported there
        from torch.distributed._composable.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in sharded_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Gathered whole and moved to the CPU, on rank 0 only (the other ranks get {}).
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _names_in_optimizer_order(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> list[str]:
    """The parameter names in the order ``Optimizer.state_dict()`` numbers them (group by group,
    0, 1, 2, ...)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_by_id(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter names (``get_optimizer_state_dict``) keyed by
    the ids of ``Optimizer.state_dict()`` instead; ``names`` as ``_names_in_optimizer_order``."""
    index = {n: i for i, n in enumerate(names)}
    return {
        "state": {index[n]: v for n, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]
        ],
    }


def optimizer_state_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_by_id`."""
    return {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }


def full_state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole model's ``state_dict()`` and the optimizer's ``state_dict()`` of a sharded
    ``model``, as one process holding the full model would return them, on the CPU of rank 0.

    A collective: every rank must call it. The other ranks get two empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model_state = get_model_state_dict(model, options=_full_options())
    optim_state = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if dist.get_rank() != 0:
        return {}, {}
    return model_state, optimizer_state_by_id(
        optim_state, _names_in_optimizer_order(model, optimizer)
    )


def load_full_state_dicts(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
) -> None:
    """Load a full (single-process) model and optimizer state dict into the sharded ``model`` and
    its ``optimizer``: each rank keeps its shard. Every rank passes the full state dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    # The ranks distribute the tensors one by one in the dict's order, which must therefore be
    # the same on all of them (safetensors' loader returns the names in a per-process order).
    set_model_state_dict(model, dict(sorted(model_state.items())), options=options)
    names = _names_in_optimizer_order(model, optimizer)
    set_optimizer_state_dict(
        model, optimizer, optimizer_state_by_name(optim_state, names), options=options
    )


def parameter_sum(model: torch.nn.Module) -> float:
    """The sum of all parameters of the whole model (a checksum), on every rank: the local
    shards' sums added over the ranks (a collective) when the parameters are sharded."""
    sharded = False
    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        local = p.detach()
        if hasattr(local, "to_local"):  # a DTensor: this rank's shard
            local, sharded = local.to_local(), True
        total += local.double().sum().cpu()
    if sharded:
        device = next(model.parameters()).device
        total = total.to(device)
        dist.all_reduce(total)
    return float(total)
