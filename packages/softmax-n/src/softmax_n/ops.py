"""Deprecated alias of :mod:`softmax_n.custom_ops`, the ``torch.library`` registration module
(renamed so that every package of the workspace gives that role the same module name). Importing
it warns; it goes away in softmax-n 0.3."""

from __future__ import annotations

import warnings

from .custom_ops import triton_attention_bwd, triton_attention_fwd

__all__ = ["triton_attention_bwd", "triton_attention_fwd"]

warnings.warn(
    "softmax_n.ops is renamed softmax_n.custom_ops; the old name goes away in softmax-n 0.3",
    DeprecationWarning,
    stacklevel=2,
)
