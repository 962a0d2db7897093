"""The CoLT5 transformer block: residual routed attention, then residual routed feedforward."""

from __future__ import annotations

from torch import Tensor, nn

from .attention import AttentionFn, ConditionalRoutedAttention
from .coor_descent import use_triton_backend
from .feedforward import ConditionalRoutedFeedForward
from .routed import check_router_backends
from .router import check_num_tokens, check_token_mask, check_tokens

__all__ = ["ConditionalRoutedTransformerBlock"]


class ConditionalRoutedTransformerBlock(nn.Module):
    """Residual routed attention followed by a residual routed feedforward, ``[b, n, dim]``.
    ``causal`` and ``use_rotary`` go to :class:`ConditionalRoutedAttention`, ``backend`` (the
    routers' coordinate descent's, see :class:`ConditionalRoutedAttention`) to both;
    ``use_triton`` is deprecated (``FutureWarning``, until 0.3)."""

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_attn_tokens_q: int,
        num_heavy_attn_tokens_kv: int,
        num_routed_kv: int = 1,
        num_heavy_ff_tokens: int,
        light_dim_head: int = 64,
        light_heads: int = 8,
        light_window_size: int = 128,
        heavy_dim_head: int = 64,
        heavy_heads: int = 8,
        light_ff_mult: float = 0.5,
        heavy_ff_mult: float = 4.0,
        router_straight_through: bool = True,
        router_kwargs: dict | None = None,
        multiply_keys_by_score: bool = False,
        multiply_queries_by_score: bool = False,
        use_triton: bool | None = None,
        use_null_q_tokens: bool = True,
        use_flash_attn: bool = False,
        attention_fn: AttentionFn | None = None,
        causal: bool = False,
        use_rotary: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        backend = use_triton_backend(backend, use_triton)
        self.conditional_ff = ConditionalRoutedFeedForward(
            dim,
            num_heavy_tokens=num_heavy_ff_tokens,
            light_ff_mult=light_ff_mult,
            heavy_ff_mult=heavy_ff_mult,
            router_straight_through=router_straight_through,
            router_kwargs=router_kwargs,
            backend=backend,
        )
        self.conditional_attn = ConditionalRoutedAttention(
            dim,
            num_heavy_tokens_q=num_heavy_attn_tokens_q,
            num_heavy_tokens_kv=num_heavy_attn_tokens_kv,
            num_routed_kv=num_routed_kv,
            light_dim_head=light_dim_head,
            light_heads=light_heads,
            light_window_size=light_window_size,
            heavy_dim_head=heavy_dim_head,
            heavy_heads=heavy_heads,
            router_straight_through=router_straight_through,
            router_kwargs=router_kwargs,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            backend=backend,
            use_null_q_tokens=use_null_q_tokens,
            use_flash_attn=use_flash_attn,
            attention_fn=attention_fn,
            causal=causal,
            use_rotary=use_rotary,
        )

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        num_heavy_attn_tokens_q: int | None = None,
        num_heavy_attn_tokens_kv: int | None = None,
        num_heavy_ff_tokens: int | None = None,
    ) -> Tensor:
        attn, ff = self.conditional_attn, self.conditional_ff
        check_tokens(x, attn.dim)
        check_token_mask(mask, x)
        check_num_tokens(
            num_heavy_attn_tokens_q, attn.num_heavy_tokens_q, "num_heavy_attn_tokens_q"
        )
        check_num_tokens(
            num_heavy_attn_tokens_kv, attn.num_heavy_tokens_kv, "num_heavy_attn_tokens_kv"
        )
        check_num_tokens(num_heavy_ff_tokens, ff.num_heavy_tokens, "num_heavy_ff_tokens")
        check_router_backends(x, attn.q_router, attn.kv_router, ff.router)
        x = x + self.conditional_attn(
            x,
            mask=mask,
            num_heavy_tokens_q=num_heavy_attn_tokens_q,
            num_heavy_tokens_kv=num_heavy_attn_tokens_kv,
        )
        return x + self.conditional_ff(x, mask=mask, num_heavy_tokens=num_heavy_ff_tokens)
