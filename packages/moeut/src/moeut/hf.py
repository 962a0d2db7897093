"""Hugging Face ``transformers`` wrappers of ``MoEUTLM`` (the ``moeut[hf]`` extra).

Imported only explicitly (``from moeut.hf import MoEUTConfig, MoEUTForCausalLM``): ``import
moeut`` does not need ``transformers``. Importing this module registers the ``"moeut"`` model
type with ``AutoConfig`` and ``AutoModelForCausalLM``.

- ``MoEUTConfig``: ``MoEUTLM``'s constructor arguments (``vocab_size`` is ``n_tokens``;
  ``attention`` is ``"rope"`` or ``"xl"``);
  ``MoEUTConfig.from_profile("MoEUT_44M", vocab_size=...)`` builds the paper's profiles.
- ``MoEUTForCausalLM``: ``self.model`` is the ``MoEUTLM`` (state dict keys ``model.<MoEUTLM key>``);
  ``forward`` returns ``MoEUTCausalLMOutput`` (``loss`` = shifted cross-entropy + the MoE
  regularisers, ``aux_loss`` = the regularisers alone); ``generate`` runs on MoEUT's own KV cache
  (``MoEUTCache``), ``save_pretrained``/``from_pretrained`` use safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from switchhead import AttentionMask, RotaryEmbedding, SwitchHeadRope, SwitchHeadXL
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from .model import MoEUTLM
from .profiles import PROFILES

logger = logging.get_logger(__name__)

__all__ = ["ATTENTIONS", "MoEUTCache", "MoEUTCausalLMOutput", "MoEUTConfig", "MoEUTForCausalLM"]

ATTENTIONS = {"rope": SwitchHeadRope, "xl": SwitchHeadXL}

# keyword arguments the model accepts and ignores (passed by generate / Trainer)
_IGNORED_KWARGS = ("return_dict", "cache_position", "num_items_in_batch", "output_attentions")


class MoEUTConfig(PretrainedConfig):
    """``MoEUTLM``'s arguments; defaults are ``MoEUT_44M`` with an 8000-token vocabulary.

    ``attention_fn`` (a callable) cannot be stored in a config and is not supported here.
    """

    model_type = "moeut"
    keys_to_ignore_at_inference = ["past_key_values"]  # noqa: RUF012 (HF class attribute)
    attribute_map = {  # noqa: RUF012
        "n_tokens": "vocab_size",
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
    }

    def __init__(
        self,
        vocab_size: int = 8000,
        d_model: int = 412,
        n_layers: int = 16,
        n_heads: int = 4,
        ff_n_experts: int = 155,
        att_n_experts: int = 8,
        d_head: int | None = 82,
        group_size: int = 2,
        ff_k: int = 12,
        att_k: int = 2,
        ff_expert_dropout: float = 0.0,
        att_expert_dropout: float = 0.0,
        ff_expert_size: int = 128,
        dropout: float = 0.0,
        entropy_reg: float = 0.01,
        att_entropy_reg: float = 0.001,
        attention: str = "rope",
        use_cache: bool = True,
        **kwargs: Any,
    ):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {attention!r}")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.ff_n_experts = ff_n_experts
        self.att_n_experts = att_n_experts
        self.d_head = d_head
        self.group_size = group_size
        self.ff_k = ff_k
        self.att_k = att_k
        self.ff_expert_dropout = ff_expert_dropout
        self.att_expert_dropout = att_expert_dropout
        self.ff_expert_size = ff_expert_size
        self.dropout = dropout
        self.entropy_reg = entropy_reg
        self.att_entropy_reg = att_entropy_reg
        self.attention = attention
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = False  # MoEUTLM's head is not tied to the embedding
        super().__init__(**kwargs)
        self.tie_word_embeddings = False

    @classmethod
    def from_profile(cls, name: str, vocab_size: int = 8000, **overrides: Any) -> MoEUTConfig:
        """The paper's profile ``name`` (a key of ``moeut.profiles.PROFILES``, e.g.
        ``"MoEUT_44M"``) with ``vocab_size`` tokens; ``overrides`` replace any argument."""
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; known: {sorted(PROFILES)}")
        return cls(**{**PROFILES[name], "vocab_size": vocab_size, **overrides})

    def moeut_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``MoEUTLM`` for this configuration."""
        return dict(
            n_tokens=self.vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            ff_n_experts=self.ff_n_experts,
            att_n_experts=self.att_n_experts,
            d_head=self.d_head,
            group_size=self.group_size,
            ff_k=self.ff_k,
            att_k=self.att_k,
            ff_expert_dropout=self.ff_expert_dropout,
            att_expert_dropout=self.att_expert_dropout,
            ff_expert_size=self.ff_expert_size,
            dropout=self.dropout,
            entropy_reg=self.entropy_reg,
            att_entropy_reg=self.att_entropy_reg,
            attention=ATTENTIONS[self.attention],
        )


class MoEUTCache:
    """MoEUT's multi-layer KV cache (``{layer index: {"k", "v"}}``) behind the few methods of
    ``transformers``' ``Cache`` that ``generate`` uses. Not a ``transformers.Cache``: pass it only
    to ``MoEUTForCausalLM``. The model updates it in place."""

    is_compileable = False
    is_croppable = False

    def __init__(self, layers: dict[int, dict[str, torch.Tensor]] | None = None):
        self.layers: dict[int, dict[str, torch.Tensor]] = {} if layers is None else layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        layer = self.layers.get(layer_idx)
        return layer["k"].shape[-2] if layer and "k" in layer else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for layer in self.layers.values():
            for key, value in layer.items():
                layer[key] = value.index_select(0, beam_idx.to(value.device))

    def __len__(self) -> int:
        return len(self.layers)


@dataclass
class MoEUTCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` with ``aux_loss``: the MoE entropy regularisers (0 outside
    training), already included in ``loss``."""

    aux_loss: torch.FloatTensor | None = None


class MoEUTForCausalLM(PreTrainedModel, GenerationMixin):
    """``MoEUTLM`` as a ``transformers`` causal LM; ``self.model`` is the ``MoEUTLM``."""

    config_class = MoEUTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MoEUTLayer"]  # noqa: RUF012
    # the loss is a mean over the micro-batch's tokens: Trainer scales gradient accumulation
    accepts_loss_kwargs = False

    def __init__(self, config: MoEUTConfig):
        super().__init__(config)
        self.model = MoEUTLM(**config.moeut_kwargs())
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # Called on construction and, by from_pretrained, on modules not marked as loaded.
        if isinstance(module, RotaryEmbedding):
            # non-persistent buffers are not in checkpoints: from_pretrained leaves them empty
            fresh = RotaryEmbedding(module.n_rotate, module.base, module.head_size)
            module.perm.copy_(fresh.perm)
            module.inv_perm.copy_(fresh.inv_perm)
        elif isinstance(module, MoEUTLM):
            loaded = [getattr(p, "_is_hf_initialized", False) for p in module.parameters()]
            if not any(loaded):  # a new model: the authors' initialisation
                module.reset_parameters()
                module.lm_head.reset_parameters()
                module.out_norm.reset_parameters()
            elif not all(loaded):
                logger.warning(
                    "MoEUTForCausalLM: some weights were missing from the checkpoint and are "
                    "left uninitialised; load a complete checkpoint"
                )

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # MoEUT keeps its own cache (MoEUTCache), created by the first forward

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embedding

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embedding = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.lm_head = value

    @classmethod
    def from_moeut(cls, lm: MoEUTLM, config: MoEUTConfig) -> MoEUTForCausalLM:
        """Wrap a copy of the weights of ``lm``, a ``MoEUTLM`` built with ``config``'s
        arguments."""
        model = cls(config)
        model.model.load_state_dict(lm.state_dict())
        return model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: MoEUTCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> MoEUTCausalLMOutput:
        """``input_ids [B, T]``; ``attention_mask [B, Tk]`` (1 = keep, 0 = padding; ``Tk`` includes
        the cache), always combined with the causal mask; ``labels [B, T]`` (shifted inside, -100
        ignored) give ``loss`` = cross-entropy + ``aux_loss``. ``use_cache`` (default: the config's
        outside training, False in training) returns ``past_key_values`` (a ``MoEUTCache``,
        updated in place when one was passed)."""
        for key, value in kwargs.items():
            if key not in _IGNORED_KWARGS and value is not None:
                raise TypeError(f"MoEUTForCausalLM.forward got an unsupported argument {key!r}")
        if kwargs.get("output_attentions") or output_hidden_states:
            raise NotImplementedError("MoEUTForCausalLM returns no attentions or hidden states")
        if input_ids is None:
            raise ValueError("input_ids is required (inputs_embeds is not supported)")
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        if past_key_values is not None and not isinstance(past_key_values, MoEUTCache):
            raise TypeError(
                f"past_key_values must be a MoEUTCache, got {type(past_key_values).__name__}"
            )
        if past_key_values is not None:
            use_cache = True
        cache = None
        if use_cache:
            cache = past_key_values if past_key_values is not None else MoEUTCache()

        out = self.model(
            input_ids,
            mask=self._padding_mask(attention_mask),
            kv_cache=cache.layers if cache is not None else None,
        )
        if cache is not None:
            cache.layers = out.cache
        logits = out.outputs
        aux_loss = out.reg_loss
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have input_ids' shape {tuple(input_ids.shape)}, "
                    f"got {tuple(labels.shape)}"
                )
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
            loss = loss + aux_loss
        return MoEUTCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=cache,  # type: ignore[arg-type]  # duck-typed Cache (see MoEUTCache)
            aux_loss=aux_loss,
        )

    @staticmethod
    def _padding_mask(attention_mask: torch.Tensor | None) -> AttentionMask | None:
        """HF's ``[B, Tk]`` keep-mask -> MoEUT's padding mask (True = masked); ``None`` when it
        masks nothing (so the fused causal path runs)."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be [B, Tk] (1 = keep), got {tuple(attention_mask.shape)}"
            )
        pad = attention_mask == 0
        if not torch.compiler.is_compiling() and not bool(pad.any()):
            return None
        return AttentionMask(src_length_mask=pad)


def _register() -> None:
    AutoConfig.register(MoEUTConfig.model_type, MoEUTConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoEUTConfig, MoEUTForCausalLM, exist_ok=True)


_register()
