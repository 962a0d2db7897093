"""A causal byte-level LM whose attention is CoLT5's routed autoregressive attention.

Each layer: ``x + ConditionalRoutedAutoregressiveAttention(x)`` (causal local attention on every
token plus heavy attention to keys routed from all earlier windows), then
``x + SigmaMoE(LayerNorm(x))`` (the sigma-MoE feedforward of ``moeut``).

Causality: the key router only looks at earlier windows, and every query of a heavy window is
routed (``num_heavy_tokens_q == heavy_window_size``). Routing only some queries would decide,
inside a window, which tokens get the heavy branch by looking at *later* tokens of that window:
a language model would learn from the future. That is also why the demo has no CoLT5 routed
feedforward: ``ConditionalRoutedFeedForward`` chooses its tokens among the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from colt5_routing import ConditionalRoutedAutoregressiveAttention
from moeut import MoEUTOutput, SigmaMoE, sample_next_token
from moeut import entropy_reg as selection_entropy_reg


class CoLT5Layer(torch.nn.Module):
    """Routed autoregressive attention and a sigma-MoE feedforward, both residual, pre-norm."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int,
        window: int,
        routed_kv: int,
        ff_n_experts: int,
        ff_expert_size: int,
        ff_k: int,
        attention_fn: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.attention = ConditionalRoutedAutoregressiveAttention(
            d_model,
            num_heavy_tokens_q=window,  # every query of a window: strictly causal
            num_heavy_tokens_kv=routed_kv,
            light_dim_head=d_head,
            light_heads=n_heads,
            light_window_size=window,
            heavy_window_size=window,
            heavy_dim_head=d_head,
            heavy_heads=n_heads,
            use_null_q_tokens=False,  # no query is left unrouted
            attention_fn=attention_fn,
        )
        self.norm = torch.nn.LayerNorm(d_model)
        self.ffn = SigmaMoE(d_model, ff_n_experts, ff_expert_size, ff_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x)
        return x + self.ffn(self.norm(x))


class CoLT5LM(torch.nn.Module):
    """Embedding, ``n_layers`` :class:`CoLT5Layer`, output norm and head.

    The interface of ``moeut.MoEUTLM`` that the demo uses: ``forward(tokens)`` returns a
    ``MoEUTOutput`` (logits, entropy regulariser of the feedforward expert choices in training,
    no cache) and ``generate`` samples. Positions are implicit (causal attention, no position
    embedding), so the model runs at any length.
    """

    def __init__(
        self,
        n_tokens: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_head: int,
        ff_n_experts: int,
        ff_expert_size: int,
        ff_k: int,
        window: int = 32,
        routed_kv: int = 32,
        entropy_reg: float = 0.01,
        attention_fn: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.entropy_reg = entropy_reg
        self.embedding = torch.nn.Embedding(n_tokens, d_model)
        self.layers = torch.nn.ModuleList(
            CoLT5Layer(
                d_model,
                n_heads,
                d_head,
                window,
                routed_kv,
                ff_n_experts,
                ff_expert_size,
                ff_k,
                attention_fn,
            )
            for _ in range(n_layers)
        )
        self.out_norm = torch.nn.LayerNorm(d_model)
        self.lm_head = torch.nn.Linear(d_model, n_tokens)

    def forward(self, tokens: torch.Tensor) -> MoEUTOutput:
        """``tokens [B, T]`` -> logits ``[B, T, n_tokens]`` (causal) and the regulariser."""
        regularise = self.training and self.entropy_reg > 0
        x = self.embedding(tokens)
        logits = []
        for layer in self.layers:
            layer.ffn.record_selection_logits = regularise
            x = layer(x)
            if regularise:
                logits.append(layer.ffn.last_selection_logits)
            layer.ffn.last_selection_logits = None
        reg_loss = torch.zeros((), device=x.device, dtype=torch.float32)
        if logits:
            flat = [lg.flatten(0, -2) for lg in logits]  # [tokens, experts] per layer
            reg_loss = (
                self.entropy_reg * sum(selection_entropy_reg(lg, -2) for lg in flat) / len(flat)
            )
        return MoEUTOutput(self.lm_head(self.out_norm(x)), reg_loss, None)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        context: int = 256,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``prompt [B, T]``; each step reruns the last
        ``context`` tokens (no KV cache). Returns ``[B, T + max_new_tokens]``."""
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be [B, T] with T >= 1, got {tuple(prompt.shape)}")
        was_training = self.training
        self.eval()
        tokens = prompt
        try:
            for _ in range(max_new_tokens):
                logits = self(tokens[:, -context:]).outputs[:, -1].float()
                nxt = sample_next_token(logits, temperature, top_k, generator)
                tokens = torch.cat([tokens, nxt], dim=1)
        finally:
            self.train(was_training)
        return tokens
