"""Image blocks: CoLT5 routed attention over the pixels of a feature map, and a vision
transformer built from it and the routed feedforward."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import ConditionalRoutedAttention
from .coor_descent import use_triton_backend
from .feedforward import ConditionalRoutedFeedForward
from .routed import check_router_backends
from .router import CoordinateDescentRouter, check_num_tokens

__all__ = ["ConditionalRoutedImageAttention", "ConditionalRoutedViT"]


class ConditionalRoutedImageAttention(nn.Module):
    """CoLT5 attention over the pixels of ``x [b, c, h, w]`` (``channel_first``) or
    ``[b, h, w, c]``; returns the same layout. The light branch attends within
    ``light_window_size x light_window_size`` tiles (zero padding at the borders is masked out);
    the heavy branch routes queries and keys among all pixels. ``use_rotary`` defaults to
    ``False`` here (as upstream): rotary embeddings are 1-d, and the pixels are in tile order.
    ``backend`` (and the deprecated ``use_triton``) and the other arguments are those of
    :class:`ConditionalRoutedAttention`."""

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens_q: int,
        num_heavy_tokens_kv: int,
        light_window_size: int = 8,
        channel_first: bool = False,
        use_triton: bool | None = None,
        backend: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if isinstance(light_window_size, bool) or not isinstance(light_window_size, int):
            raise TypeError(f"light_window_size must be an int, got {light_window_size!r}")
        if light_window_size < 1:
            raise ValueError(f"light_window_size must be >= 1, got {light_window_size}")
        self.channel_first = channel_first
        self.window = light_window_size
        kwargs.setdefault("use_rotary", False)
        self.attn = ConditionalRoutedAttention(
            dim,
            num_heavy_tokens_q=num_heavy_tokens_q,
            num_heavy_tokens_kv=num_heavy_tokens_kv,
            light_window_size=2 * light_window_size**2,  # one tile = one local block
            backend=use_triton_backend(backend, use_triton),
            **kwargs,
        )

    def forward(
        self,
        x: Tensor,
        *,
        num_heavy_tokens_q: int | None = None,
        num_heavy_tokens_kv: int | None = None,
    ) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of 4 dimensions, got {tuple(x.shape)}")
        dim = self.attn.dim
        if x.shape[1 if self.channel_first else 3] != dim:
            layout = "[b, dim, h, w]" if self.channel_first else "[b, h, w, dim]"
            raise ValueError(f"x must be {layout} with dim={dim}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
        attn = self.attn
        nq = check_num_tokens(num_heavy_tokens_q, attn.num_heavy_tokens_q, "num_heavy_tokens_q")
        nkv = check_num_tokens(num_heavy_tokens_kv, attn.num_heavy_tokens_kv, "num_heavy_tokens_kv")
        check_router_backends(x, attn.q_router, attn.kv_router)
        if x.numel() == 0:
            return x * 0
        if self.channel_first:
            x = x.permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        ws = self.window
        ph, pw = (-h) % ws, (-w) % ws
        xp = F.pad(x, (0, 0, 0, pw, 0, ph))
        keep = F.pad(x.new_ones(b, h, w, dtype=torch.bool), (0, pw, 0, ph), value=False)
        nh, nw = (h + ph) // ws, (w + pw) // ws
        # pixels in tile-major order: each tile of ws x ws pixels is contiguous
        tiles = xp.reshape(b, nh, ws, nw, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, c)
        tkeep = keep.reshape(b, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(b, -1)
        out = attn(
            tiles,
            mask=tkeep if (ph or pw) else None,
            num_heavy_tokens_q=nq,
            num_heavy_tokens_kv=nkv,
            light_tile_size=ws * ws,
        )
        out = out.reshape(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(b, nh * ws, nw * ws, c)[:, :h, :w]
        return out.permute(0, 3, 1, 2) if self.channel_first else out


class ConditionalRoutedViT(nn.Module):
    """``images [b, channels, image_size, image_size] -> logits [b, num_classes]``.

    Patches of ``patch_size`` are embedded, given learned positions, passed through ``depth``
    residual pairs of routed image attention and routed feedforward, mean-pooled and classified.
    ``backend`` is the routers' coordinate descent's, as in :class:`ConditionalRoutedAttention`;
    ``use_triton`` is deprecated (``FutureWarning``, until 0.3).
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
        backend: str | None = None,
    ) -> None:
        super().__init__()
        backend = use_triton_backend(backend, use_triton)
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
                backend=backend,
                channel_first=False,
            )
            ff = ConditionalRoutedFeedForward(
                dim,
                num_heavy_tokens=ff_num_heavy_tokens,
                light_ff_mult=ff_light_mult,
                heavy_ff_mult=ff_heavy_mult,
                router_straight_through=router_straight_through,
                router_kwargs=router_kwargs,
                backend=backend,
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
        routers = [m for m in self.modules() if isinstance(m, CoordinateDescentRouter)]
        check_router_backends(images, *routers)
        x = self.to_patches(images).permute(0, 2, 3, 1) + self.pos_emb  # [b, gh, gw, dim]
        b, gh, gw, d = x.shape
        # a ModuleList of (attention, feedforward) ModuleLists
        layers: Iterable[Sequence[nn.Module]] = self.layers  # type: ignore[assignment]
        for attn, ff in layers:
            x = x + attn(x)
            x = x + ff(x.reshape(b, gh * gw, d)).view(b, gh, gw, d)
        return self.head(x.mean(dim=(1, 2)))
