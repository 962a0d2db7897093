"""A vision transformer built from CoLT5 routed attention and feedforward blocks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import ConditionalRoutedFeedForward, ConditionalRoutedImageAttention

__all__ = ["ConditionalRoutedViT"]


class ConditionalRoutedViT(nn.Module):
    """``images [b, channels, image_size, image_size] -> logits [b, num_classes]``.

    Patches of ``patch_size`` are embedded, given learned positions, passed through ``depth``
    residual pairs of routed image attention and routed feedforward, mean-pooled and classified.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        attn_num_heavy_tokens_q: int,
        attn_num_heavy_tokens_kv: int,
        attn_light_dim_head: int = 64,
        attn_light_heads: int = 8,
        attn_light_window_size: int = 32,
        attn_heavy_dim_head: int = 64,
        attn_heavy_heads: int = 8,
        ff_num_heavy_tokens: int,
        ff_light_mult: float = 2.0,
        ff_heavy_mult: float = 4.0,
        router_straight_through: bool = True,
        router_kwargs: dict | None = None,
        channels: int = 3,
        use_triton: bool | None = None,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError("image_size must be divisible by patch_size")
        self.grid = image_size // patch_size
        self.image_size, self.channels = image_size, channels
        self.to_patches = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.pos_emb = nn.Parameter(torch.randn(self.grid, self.grid, dim) * 0.02)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            attn = ConditionalRoutedImageAttention(
                dim,
                num_heavy_tokens_q=attn_num_heavy_tokens_q,
                num_heavy_tokens_kv=attn_num_heavy_tokens_kv,
                light_window_size=attn_light_window_size,
                light_dim_head=attn_light_dim_head,
                light_heads=attn_light_heads,
                heavy_dim_head=attn_heavy_dim_head,
                heavy_heads=attn_heavy_heads,
                router_straight_through=router_straight_through,
                router_kwargs=router_kwargs,
                use_triton=use_triton,
                channel_first=False,
            )
            ff = ConditionalRoutedFeedForward(
                dim,
                num_heavy_tokens=ff_num_heavy_tokens,
                light_ff_mult=ff_light_mult,
                heavy_ff_mult=ff_heavy_mult,
                router_straight_through=router_straight_through,
                router_kwargs=router_kwargs,
                use_triton=use_triton,
            )
            self.layers.append(nn.ModuleList([attn, ff]))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        size, c = self.image_size, self.channels
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a tensor, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1:] != (c, size, size):
            raise ValueError(
                f"images must be [batch, {c}, {size}, {size}], got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating point tensor, got {images.dtype}")
        x = self.to_patches(images).permute(0, 2, 3, 1) + self.pos_emb  # [b, gh, gw, dim]
        b, gh, gw, d = x.shape
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x.reshape(b, gh * gw, d)).view(b, gh, gw, d)
        return self.head(x.mean(dim=(1, 2)))
