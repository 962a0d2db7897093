"""``policy_registry``: converters that make the user's own attention modules use softmax_n."""

from __future__ import annotations

from collections.abc import Callable

import torch

Converter = Callable[[torch.nn.Module, int, float], "torch.nn.Module | None"]


class PolicyRegistry(dict):
    """``{module class: converter}``. A converter is called as
    ``converter(module, module_index, softmax_n_param)`` and returns the module to use in its
    place (the same one changed in place, or a new one), or ``None`` to leave it as it was."""

    def register(self, *modules: type[torch.nn.Module]) -> Callable[[Converter], Converter]:
        """Decorator: ``@policy_registry.register(MyAttention)`` over a converter."""
        if not modules:
            raise ValueError("register() needs at least one module class")
        for cls in modules:
            if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
                raise TypeError(f"{cls!r} is not a torch.nn.Module subclass")

        def decorator(converter: Converter) -> Converter:
            if not callable(converter):
                raise TypeError(f"{converter!r} is not callable")
            for cls in modules:
                self[cls] = converter
            return converter

        return decorator


policy_registry = PolicyRegistry()
