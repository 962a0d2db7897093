"""Model surgery: make a model's attention use softmax_n.

``apply_attention_softmax_n(model, softmax_n_param)`` converts

- Hugging Face transformers models (``pip install softmax-n[surgery]``) through their attention
  registry (see ``softmax_n.surgery.hf`` for supported versions and families), and
- any module class registered in ``policy_registry`` (``@policy_registry.register(MyAttention)``).

A warning lists attention-like modules (class name containing ``Attention``) that were not
converted.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..functional import _check_n, _check_n_rows
from .registry import PolicyRegistry, policy_registry

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

__all__ = ["PolicyRegistry", "apply_attention_softmax_n", "policy_registry"]


def _hf_models(model: torch.nn.Module) -> list[tuple[str, PreTrainedModel]]:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PreTrainedModel)]


def _set_child(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def apply_attention_softmax_n(
    model: torch.nn.Module,
    softmax_n_param: float | torch.Tensor,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
) -> list[str]:
    """Make the attention of ``model`` use softmax_n with ``n = softmax_n_param`` (in place).

    Args:
        model: a transformers ``PreTrainedModel`` (or a module containing some) and/or modules
            whose classes are in ``policy_registry``.
        softmax_n_param: ``n``: a finite float ``>= 0``, or a tensor of such values shaped as one
            of ``softmax_n.functional.N_SHAPES`` (e.g. ``[H, 1, 1]``, one value per head);
            ``TypeError``/``ValueError`` otherwise (NaN, inf, negative, ``[H]``, ``[H, 1]``).
            Models with attention sinks (gpt-oss: ``s_aux``) keep them, on softmax-n's
            kernels, with ``n = 0``; a sink together with ``n > 0`` raises ``ValueError`` in
            the forward.
        optimizers: optimizers over ``model.parameters()``. Conversions keep the parameters, so
            they stay valid; a warning is given if a registered converter returned a new module.

    Returns:
        The names of the converted modules (``""`` for ``model`` itself).
    """
    _check_n(softmax_n_param)
    _check_n_rows(softmax_n_param, None)
    converted, replaced = _apply_registered(model, softmax_n_param)
    if replaced and optimizers is not None:
        warnings.warn(
            "a converter returned new modules; rebuild the optimizers if their parameters changed",
            stacklevel=2,
        )
    converted += _apply_hf(model, softmax_n_param)
    _warn_missed(model, converted)
    if not converted:
        warnings.warn("apply_attention_softmax_n converted nothing", stacklevel=2)
    else:
        log.info("softmax_n applied to %d modules", len(converted))
    return converted


def _apply_registered(
    model: torch.nn.Module, softmax_n_param: float | torch.Tensor
) -> tuple[list[str], bool]:
    """Run the ``policy_registry`` converters over the modules of ``model``: the names of the
    converted modules, and whether a converter returned a new module."""
    converted: list[str] = []
    replaced = False
    for index, (name, module) in enumerate(list(model.named_modules())):
        converter = policy_registry.get(type(module))
        if converter is None:
            continue
        result = converter(module, index, softmax_n_param)
        if result is None:
            continue
        if result is not module:
            if not name:
                raise ValueError("a converter cannot replace the root module; convert its children")
            _set_child(model, name, result)
            replaced = True
        converted.append(name)
    return converted, replaced


def _apply_hf(model: torch.nn.Module, softmax_n_param: float | torch.Tensor) -> list[str]:
    """Convert the outermost transformers models in ``model``: the names of those converted."""
    hf_converted: list[str] = []
    for name, hf_model in _hf_models(model):
        if any(name.startswith(done + ".") or name == done for done in hf_converted if done):
            continue
        if "" in hf_converted:
            break
        if _convert_hf_model(hf_model, softmax_n_param):
            hf_converted.append(name)
    return hf_converted


def _convert_hf_model(hf_model: PreTrainedModel, softmax_n_param: float | torch.Tensor) -> bool:
    """Route the attention of ``hf_model`` through softmax_n (its configs and sub-configs carry
    ``softmax_n_param``); ``False``, with a warning, if it kept its attention."""
    from .hf import NAME, register

    register()
    configs = [hf_model.config]
    configs += [
        getattr(hf_model.config, k)
        for k in getattr(hf_model.config, "sub_configs", {})
        if getattr(hf_model.config, k, None) is not None
    ]
    for config in configs:
        config.softmax_n_param = softmax_n_param
    # stacklevel 4: the warnings point at the caller of apply_attention_softmax_n
    try:
        hf_model.set_attn_implementation(NAME)
    except (ValueError, KeyError, AttributeError) as e:
        warnings.warn(f"{type(hf_model).__name__} kept its attention: {e}", stacklevel=4)
        return False
    if hf_model.config._attn_implementation != NAME:
        warnings.warn(
            f"{type(hf_model).__name__} does not route attention through transformers' "
            "attention registry; not converted",
            stacklevel=4,
        )
        return False
    return True


def _warn_missed(model: torch.nn.Module, converted: list[str]) -> None:
    """Warn about the attention-like modules of ``model`` outside the ``converted`` ones."""
    missed = []
    for name, module in model.named_modules():
        if "Attention" not in type(module).__name__ or name in converted:
            continue
        inside = any(name.startswith(done + ".") or done == "" for done in converted)
        if not inside:
            missed.append(f"{name or '<root>'} ({type(module).__name__})")
    if missed:
        warnings.warn(
            "not converted to softmax_n (register a converter with "
            f"softmax_n.surgery.policy_registry.register): {', '.join(missed)}",
            stacklevel=3,
        )
