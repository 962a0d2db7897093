"""MoEUT: a universal (shared-layer) transformer of sigma-MoE feedforward and SwitchHead blocks.

``group_size`` distinct layers are applied in order, and the group is repeated
``n_layers // group_size`` times. Layer norms sit only on the inputs of selections, queries and
keys ("peri-layernorm"): values and the residual stream are not normalised. In training, the
entropy of each MoE layer's average expert choice is regularised; the loss is returned with the
outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from switchhead import AttentionMask, SwitchHeadCore, SwitchHeadRope

from .regularization import entropy_reg
from .sigma_moe import SigmaMoE

KVCache = dict[str, torch.Tensor] | None
MultilayerKVCache = dict[int, KVCache] | None


@dataclass
class MoEUTOutput:
    """``outputs [B, T, d_model]`` (logits ``[B, T, n_tokens]`` for ``MoEUTLM``), the scalar
    ``reg_loss`` and the multi-layer KV cache (``None`` unless one was passed in)."""

    outputs: torch.Tensor
    reg_loss: torch.Tensor
    cache: MultilayerKVCache


class MoEUTLayer(torch.nn.Module):
    """SwitchHead attention then sigma-MoE, each with a residual; peri-layernorm inputs."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ff_expert_size: int,
        ff_n_experts: int,
        att_n_experts: int,
        d_head: int | None = None,
        att_k: int = 2,
        ff_k: int = 8,
        ff_expert_dropout: float = 0.0,
        att_expert_dropout: float = 0.0,
        dropout: float = 0.0,
        attention: type[SwitchHeadCore] = SwitchHeadRope,
        attention_fn=None,
    ):
        super().__init__()
        extra = {} if attention_fn is None else {"attention_fn": attention_fn}
        self.attention = attention(
            d_model,
            n_heads,
            att_n_experts,
            d_head=d_head,
            moe_k=att_k,
            expert_dropout=att_expert_dropout,
            **extra,
        )
        self.ffn = SigmaMoE(
            d_model, ff_n_experts, ff_expert_size, k=ff_k, expert_dropout=ff_expert_dropout
        )
        self.ln1 = torch.nn.LayerNorm(d_model)
        self.ln2 = torch.nn.LayerNorm(d_model)
        self.drop = torch.nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: AttentionMask | None = None, kv_cache: KVCache = None
    ) -> tuple[torch.Tensor, KVCache]:
        """``x [B, T, d_model]`` -> same shape, and the layer's KV cache."""
        normed = self.ln1(x)
        att, kv_cache = self.attention(normed, normed, x, mask, kv_cache=kv_cache)
        x = x + self.drop(att)
        return x + self.ffn(x, self.ln2(x)), kv_cache


class MoEUT(torch.nn.Module):
    """The shared-layer stack; see the module docstring. Arguments as in the authors' code."""

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_heads: int,
        ff_expert_size: int,
        ff_n_experts: int,
        att_n_experts: int,
        d_head: int | None = None,
        att_k: int = 2,
        ff_k: int = 8,
        ff_expert_dropout: float = 0.0,
        att_expert_dropout: float = 0.0,
        dropout: float = 0.0,
        entropy_reg: float = 0.01,
        att_entropy_reg: float = 0.001,
        attention: type[SwitchHeadCore] = SwitchHeadRope,
        group_size: int = 2,
        attention_fn=None,
    ):
        super().__init__()
        if group_size < 1 or n_layers % group_size:
            raise ValueError(
                f"n_layers ({n_layers}) must be a multiple of group_size ({group_size})"
            )
        self.entropy_reg = entropy_reg
        self.att_entropy_reg = att_entropy_reg
        self.n_repeats = n_layers // group_size
        self.layers = torch.nn.ModuleList(
            MoEUTLayer(
                d_model,
                n_heads,
                ff_expert_size,
                ff_n_experts,
                att_n_experts,
                d_head,
                att_k,
                ff_k,
                ff_expert_dropout,
                att_expert_dropout,
                dropout,
                attention,
                attention_fn,
            )
            for _ in range(group_size)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        scale = math.sqrt(2 / (self.n_repeats * len(self.layers)))
        for module in self.modules():
            if isinstance(module, (SwitchHeadCore, SigmaMoE)):
                module.reset_parameters(scale)
            elif isinstance(module, torch.nn.LayerNorm):
                torch.nn.init.ones_(module.weight)
                torch.nn.init.zeros_(module.bias)

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask | None = None,
        kv_cache: MultilayerKVCache = None,
    ) -> MoEUTOutput:
        """``x [B, T, d_model]``; ``mask=None`` is causal, ``AttentionMask()`` none;
        ``kv_cache={}`` starts a multi-layer cache (keyed by absolute layer index)."""
        regularise = self.training and (self.entropy_reg > 0 or self.att_entropy_reg > 0)
        for layer in self.layers:
            layer.ffn.record_selection_logits = regularise and self.entropy_reg > 0
            layer.attention.record_selection_logits = regularise and self.att_entropy_reg > 0
        ff_logits: list[list[torch.Tensor]] = [[] for _ in self.layers]
        att_logits: list[list[dict[str, torch.Tensor]]] = [[] for _ in self.layers]
        new_cache: dict[int, KVCache] = {}
        for r in range(self.n_repeats):
            for i, layer in enumerate(self.layers):
                index = r * len(self.layers) + i
                cache = kv_cache.get(index, {}) if kv_cache is not None else None
                x, new_cache[index] = layer(x, mask, kv_cache=cache)
                if layer.ffn.last_selection_logits is not None:
                    ff_logits[i].append(layer.ffn.last_selection_logits)
                if layer.attention.last_selection_logits is not None:
                    att_logits[i].append(layer.attention.last_selection_logits)
        reg_loss = torch.zeros((), device=x.device, dtype=torch.float32)
        for ff, att, layer in zip(ff_logits, att_logits, self.layers):
            if ff:  # [B, T * repeats, E], averaged over tokens and repeats
                reg_loss = reg_loss + self.entropy_reg * entropy_reg(torch.cat(ff, dim=-2), -2)
            if att and layer.attention.n_experts > 1:
                for key in ("o", "v"):  # [B, T * repeats, H, E]
                    stacked = torch.cat([a[key] for a in att], dim=-3)
                    reg_loss = reg_loss + self.att_entropy_reg * entropy_reg(stacked, -3)
        for layer in self.layers:  # keep no logits after the forward
            layer.ffn.last_selection_logits = None
            layer.attention.last_selection_logits = None
        return MoEUTOutput(x, reg_loss, new_cache if kv_cache is not None else None)


class MoEUTLM(torch.nn.Module):
    """MoEUT language model: embedding, the MoEUT stack, output LayerNorm and LM head."""

    def __init__(
        self,
        n_tokens: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        ff_n_experts: int,
        att_n_experts: int,
        d_head: int | None = None,
        group_size: int = 2,
        ff_k: int = 8,
        att_k: int = 2,
        ff_expert_dropout: float = 0.0,
        att_expert_dropout: float = 0.0,
        ff_expert_size: int = 128,
        dropout: float = 0.0,
        entropy_reg: float = 0.01,
        att_entropy_reg: float = 0.001,
        attention: type[SwitchHeadCore] = SwitchHeadRope,
        attention_fn=None,
    ):
        super().__init__()
        self.transformer = MoEUT(
            d_model,
            n_layers,
            n_heads,
            ff_expert_size,
            ff_n_experts,
            att_n_experts,
            d_head,
            att_k,
            ff_k,
            ff_expert_dropout,
            att_expert_dropout,
            dropout,
            entropy_reg,
            att_entropy_reg,
            attention,
            group_size,
            attention_fn,
        )
        self.n_layers = n_layers
        self.embedding = torch.nn.Embedding(n_tokens, d_model)
        self.lm_head = torch.nn.Linear(d_model, n_tokens)
        self.out_norm = torch.nn.LayerNorm(d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        torch.nn.init.kaiming_normal_(self.embedding.weight, mode="fan_in", nonlinearity="linear")
        self.transformer.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask | None = None,
        kv_cache: MultilayerKVCache = None,
    ) -> MoEUTOutput:
        """``x [B, T]`` token ids -> logits ``[B, T, n_tokens]`` in ``outputs``."""
        if x.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"MoEUTLM expects integer token ids, got {x.dtype}")
        out = self.transformer(self.embedding(x), mask, kv_cache)
        out.outputs = self.lm_head(self.out_norm(out.outputs))
        return out

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``prompt [B, T]`` with the KV cache.

        ``temperature=0`` picks the most likely token. Returns ``[B, T + max_new_tokens]``.
        """
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be [B, T] with T >= 1, got {tuple(prompt.shape)}")
        was_training = self.training
        self.eval()
        try:
            out = self(prompt, kv_cache={})
            tokens = [prompt]
            for step in range(max_new_tokens):
                logits = out.outputs[:, -1].float()
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = logits.softmax(-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                tokens.append(nxt)
                if step + 1 < max_new_tokens:
                    out = self(nxt, kv_cache=out.cache)
            return torch.cat(tokens, dim=1)
        finally:
            self.train(was_training)
