"""``with autocast_off(device_type):``: autocast off for one device type inside, as
``torch.autocast(device_type, enabled=False)``, with less host time in eager mode.

The MoE ops switch autocast off around their autograd Functions (their kernels pick their own
dtypes; autocast would run sums and matmuls of the reference path in other ones). Entering and
leaving ``torch.autocast`` runs tens of Python lines: 4.3-7.7 us per enter and exit inside an outer
autocast region against 1.0-1.6 us for this context (timeit on a development host's CPU); an
eager MoEUT step makes about 70 such calls. Eager, this context only flips the
device type's autocast flag where it is on (and leaves the nesting count and the cast cache
alone: it only runs inside an outer autocast region, whose exit clears the cache). While
``torch.compile`` traces, it is ``torch.autocast`` itself, which Dynamo understands.
"""

from __future__ import annotations

from typing import Any

import torch


class _FlagOff:
    __slots__ = ("device_type", "was_on")

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.was_on = False

    def __enter__(self) -> None:
        self.was_on = torch.is_autocast_enabled(self.device_type)
        if self.was_on:
            torch.set_autocast_enabled(self.device_type, False)

    def __exit__(self, *exc: object) -> None:
        if self.was_on:
            torch.set_autocast_enabled(self.device_type, True)


def autocast_off(device_type: str) -> Any:
    """A context in which autocast is off for ``device_type`` (``"cuda"``, ``"cpu"``, ...)."""
    if torch.compiler.is_compiling():
        return torch.autocast(device_type, enabled=False)
    return _FlagOff(device_type)
