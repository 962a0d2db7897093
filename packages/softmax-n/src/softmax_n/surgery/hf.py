"""Hugging Face transformers integration: an attention function registered as ``"softmax_n"`` in
``transformers``' ``AttentionInterface`` (``ALL_ATTENTION_FUNCTIONS``) with SDPA's mask format.

Supported: transformers >= 4.48 (the release that routes attention through the registry) up to
5.x, every model family whose attention goes through the registry with SDPA support (BERT,
RoBERTa, Llama, Mistral, Qwen2/3, Gemma, GPT-NeoX, ...). Not supported: models that pass a
``position_bias`` (T5) or logit soft-capping (Gemma 2): they raise ``NotImplementedError``.

Attention sinks: models that pass ``s_aux`` (gpt-oss's per-head ``sinks`` parameter, ``[H]``) get
it as ``flash_attention_n``'s ``sink`` (with its gradient), so a gpt-oss model computes what its
eager attention does. A sink and ``n > 0`` would be two extra logits: that is a ``ValueError``;
convert such models with ``n = 0`` (``apply_attention_softmax_n(model, 0.0)``).
"""

from __future__ import annotations

import torch

from ..flash import flash_attention_n

NAME = "softmax_n"


def softmax_n_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query [B, H, L, D]``, ``key``/``value``
    ``[B, Hkv, S, D]``; returns ``([B, L, H, D], None)``. ``n`` is ``module.softmax_n_param`` or
    else ``module.config.softmax_n_param``; ``kwargs["s_aux"]`` (``[H]``, gpt-oss's sinks), if
    given, is the attention sink, and then ``n`` must be ``None`` or 0."""
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("softmax_n attention does not take a position_bias (T5)")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("softmax_n attention does not take logit soft-capping")
    n = getattr(module, "softmax_n_param", None)
    if n is None:
        n = getattr(getattr(module, "config", None), "softmax_n_param", None)
    sink = kwargs.get("s_aux")
    if sink is not None:
        if not (n is None or (not isinstance(n, torch.Tensor) and n == 0)):
            raise ValueError(
                f"{type(module).__name__} has attention sinks (s_aux); softmax_n with n = {n} "
                "would add a second extra logit. Convert it with n = 0 to run its sinks on "
                "softmax-n's kernels"
            )
        n = None
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:
        # transformers' causal is top-left (a prefill into an empty static cache): drop the
        # empty cache slots, as its SDPA path does
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = flash_attention_n(
        query,
        key,
        value,
        softmax_n_param=n,
        scale=scaling,
        dropout_p=dropout,
        attn_mask=attention_mask,
        is_causal=is_causal,
        sink=sink,
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"softmax_n"`` in transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, softmax_n_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers < 4.53 builds the masks from the attention name
        return
    AttentionMaskInterface.register(NAME, sdpa_mask)
