"""Forward hooks that keep streaming statistics of module outputs, and weight statistics."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import torch

from .moments import RunningMoments, tensor_statistics

log = logging.getLogger(__name__)


class ActivationStatistics(dict):
    """``{module name: RunningMoments}``, filled by the hooks; ``remove()`` detaches them."""

    def __init__(self) -> None:
        super().__init__()
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def remove(self) -> None:
        """Remove the forward hooks (the statistics stay)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {name: moments.as_dict() for name, moments in self.items()}


def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    if isinstance(out, dict):
        return _first_tensor(list(out.values()))
    return None


def register_activation_hooks(
    model: torch.nn.Module, layers_to_save: Iterable[str] | None = None
) -> ActivationStatistics:
    """Register forward hooks that keep statistics of the outputs of some modules.

    Args:
        model: any module.
        layers_to_save: module names (as in ``model.named_modules()``). ``None``: the modules
            whose name contains ``"attention.output"`` (as the upstream package; Hugging Face BERT
            attention outputs), or every leaf module if there is none.

    Returns:
        ``{name: RunningMoments}`` updated at every forward pass (count, mean, variance,
        skewness, kurtosis, max |x|, outlier fraction); the first tensor of a tuple/dict output is
        used. Call ``.remove()`` on it to detach the hooks.
    """
    modules = dict(model.named_modules())
    if layers_to_save is None:
        names = [name for name in modules if "attention.output" in name]
        if not names:
            names = [name for name, m in modules.items() if not any(m.children()) and name]
            log.info("no 'attention.output' modules: hooking all %d leaf modules", len(names))
    else:
        names = list(layers_to_save)
        missing = [name for name in names if name not in modules]
        if missing:
            raise ValueError(f"no such modules in the model: {missing}")
    stats = ActivationStatistics()

    def make_hook(name: str):
        def hook(module, inputs, output):
            tensor = _first_tensor(output)
            if tensor is None or not tensor.is_floating_point():
                warnings.warn(f"module {name!r} returned no float tensor; skipped", stacklevel=2)
                return
            stats[name].update(tensor)

        return hook

    for name in names:
        stats[name] = RunningMoments()
        stats.handles.append(modules[name].register_forward_hook(make_hook(name)))
    return stats


@torch.no_grad()
def compute_weight_statistics(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """``{parameter name: statistics}`` (``n_weights``, mean, variance, skewness, kurtosis,
    max |w|, outlier fraction) of every parameter."""
    results = {}
    for name, param in model.named_parameters():
        stats = tensor_statistics(param)
        stats["n_weights"] = param.numel()
        results[name] = stats
    return results
