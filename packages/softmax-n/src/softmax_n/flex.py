"""``flex_attention_n``: softmax_n attention on PyTorch's FlexAttention, so that masks and score
modifications (sliding windows, documents packed in one sequence, ALiBi, ...) run fused instead
of on the quadratic reference path.

FlexAttention (``torch.nn.attention.flex_attention``) computes ordinary attention with a
``score_mod`` (a function of one score and its batch, head, query and key index) and a
``BlockMask`` (a ``mask_mod`` plus the block sparsity it implies: blocks in which no query sees a
key are skipped), and returns the row log-sum-exp ``lse`` (natural log) on request. The identity
of ``flash.py`` then gives softmax_n:

    out_n = out0 * sigmoid(lse - log n)       (attention sinks: out0 * sigmoid(lse - sink[h]))

``n = 0`` is plain softmax (gate 1); a row that sees no key has ``lse = -inf``, gate 0 and output
0 for every ``n`` (FlexAttention's ``out0`` is 0 there too). The gate is one small autograd
function (``_SoftmaxNGate``): its backward sends ``rowsum(dout * out0) * gate * (1 - gate)`` to
``lse``, which FlexAttention's own backward takes, and ``dout * gate`` to ``out0``; the gradient
in a tensor ``n`` is ``-rowsum(dout * out_n) * exp(-lse_n)`` with ``lse_n = logaddexp(lse,
log n)`` (exact at ``n = 0``, where a gradient through ``log n`` would be ``0 * inf``), in a sink
``-rowsum(dout * out0) * gate * (1 - gate)``.

Where it runs:

- CUDA: ``torch.compile(flex_attention, dynamic=False)``, built on first use and kept for the
  process (eager FlexAttention on CUDA is an unfused implementation that materialises the
  scores). Inside a function that is itself being compiled, ``flex_attention`` is called
  directly and the enclosing compilation fuses it. Each new shape, ``score_mod`` or
  ``mask_mod`` function object compiles anew, within ``torch.compile``'s recompile limit: make
  mods and block masks once, not per step.
- CPU (and other devices) with gradients disabled (``torch.no_grad``, ``inference_mode``):
  FlexAttention eagerly (its unfused implementation; torch's "called without torch.compile"
  warning is silenced for this call).
- Everything else runs ``_dense_attention``, the same attention written out in plain PyTorch
  (scores in at least float32, the score_mod and the block mask evaluated on broadcast index
  grids), quadratic in memory, with exact gradients (also for tensors a score_mod captures):
  CPU with gradients enabled (FlexAttention refuses CPU inputs that require grad: "FlexAttention
  does not support backward on CPU", torch 2.15; torch 2.5's eager path also refuses captured
  tensors that require grad), CPU under ``torch.compile`` (compiled FlexAttention on CPU returns
  no ``lse``: "torch.compile on CPU only supports inference and `return_lse` is not supported
  yet", torch 2.15), meta tensors (shapes only) and empty inputs.

torch >= 2.5 (FlexAttention with ``return_lse`` and a gradient through ``lse``, pytorch#133159);
where torch has ``return_aux=AuxRequest(lse=True)`` it is used (``return_lse`` is deprecated
there).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from .functional import (
    _check_mask,
    _check_n,
    _check_n_rows,
    _check_qkv,
    _check_scale,
    _check_sink,
    _expand_kv,
)

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

NType = float | torch.Tensor | None
ScoreMod = Callable[..., torch.Tensor]
MaskMod = Callable[..., torch.Tensor]

MIN_TORCH = "2.5"
_DEFAULT_N = 1.0
# torch.compile(flex_attention), built on first use on CUDA (module-level, one per process)
_COMPILED: dict[str, Callable[..., Any]] = {}
# causal BlockMasks by (L, S, device), for ``flex_attention_fn(is_causal=True)``
_CAUSAL_MASKS: dict[tuple[int, int, torch.device], BlockMask] = {}
_MAX_CACHED_MASKS = 32
_EAGER_WARNING = "flex_attention called without torch.compile"


def _flex_module() -> ModuleType:
    """``torch.nn.attention.flex_attention``, imported on first use (it imports parts of
    ``torch._dynamo``: seconds, so not at ``import softmax_n``)."""
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError as exc:  # torch < 2.5
        raise RuntimeError(
            f"flex_attention_n needs torch >= {MIN_TORCH} (FlexAttention with return_lse and a "
            f"gradient through it); this is torch {torch.__version__}"
        ) from exc
    return module


def _flex_call(*args: Any, **kwargs: Any) -> Any:
    """``flex_attention`` behind a code object of its own: torch.compile keeps its compiled
    variants (and counts them against its recompile limit) per code object, so a
    ``torch.compile(flex_attention)`` elsewhere in the program does not share ours."""
    return _flex_module().flex_attention(*args, **kwargs)


def _compiled_flex() -> Callable[..., Any]:
    fn = _COMPILED.get("flex_attention")
    if fn is None:
        fn = torch.compile(_flex_call, dynamic=False)
        _COMPILED["flex_attention"] = fn
    return fn


# ---------------------------------------------------------------- argument checks ----------


def _check_sink_or_n(n: NType, sink: object, fn: str) -> NType:
    """``n`` as the checks of ``functional`` take it: ``None`` where a sink replaces it (``n``
    left at its default, or None); any other ``n`` together with a sink raises."""
    if sink is None:
        return n
    if n is None or (type(n) is float and n == _DEFAULT_N):
        return None
    raise ValueError(
        f"{fn}: sink and n are mutually exclusive (a sink is softmax_n with n = exp(sink) per "
        f"head); leave n at its default or pass n=None with a sink, got n={n!r}"
    )


def _check_mods(score_mod: object, block_mask: object, fn: str) -> None:
    """``score_mod``: None or a callable; ``block_mask``: None or a FlexAttention ``BlockMask``
    (its shape is checked against the inputs by ``_check_block_mask``)."""
    if score_mod is not None and not callable(score_mod):
        raise TypeError(
            f"{fn}: score_mod must be a function (score, b, h, q_idx, kv_idx) -> score, got "
            f"{type(score_mod).__name__}"
        )
    if block_mask is not None and not isinstance(block_mask, _flex_module().BlockMask):
        hint = (
            " (a dense bool mask goes in attn_mask of flex_attention_fn's attention function, or "
            "through create_block_mask)"
            if isinstance(block_mask, torch.Tensor)
            else ""
        )
        raise TypeError(
            f"{fn}: block_mask must be a torch.nn.attention.flex_attention.BlockMask (see "
            f"create_block_mask), got {type(block_mask).__name__}{hint}"
        )


def _check_block_mask(block_mask: BlockMask, query: torch.Tensor, n_k: int, fn: str) -> None:
    """Device, batch and heads (1 or the query's) and lengths (those the mask was made for)."""
    b, h, n_q = query.shape[:3]
    if block_mask.kv_num_blocks.device != query.device:
        raise ValueError(
            f"{fn}: block_mask is on {block_mask.kv_num_blocks.device}, the query on "
            f"{query.device} (pass device= to create_block_mask)"
        )
    bm, hm = block_mask.kv_num_blocks.shape[:2]
    if bm not in (1, b) or hm not in (1, h):
        raise ValueError(
            f"{fn}: block_mask made for B={bm}, H={hm} does not fit the query's B={b}, H={h} "
            "(pass B and H of the inputs, or None, to create_block_mask)"
        )
    seq_lengths = getattr(block_mask, "seq_lengths", None)
    if seq_lengths is not None:
        fits = tuple(seq_lengths) == (n_q, n_k)
        made_for = f"(Q_LEN, KV_LEN) = {tuple(seq_lengths)}"
    else:  # torch 2.5: no seq_lengths, and BLOCK_SIZE may not be the size the blocks were made
        # with (it says 128 for Q_LEN < 128): only that the mask covers the lengths
        bq, bk = block_mask.BLOCK_SIZE
        blocks = (block_mask.kv_num_blocks.shape[-1], block_mask.kv_indices.shape[-1])
        fits = blocks[0] * bq >= n_q and blocks[1] * bk >= n_k
        made_for = f"{blocks} blocks of {(bq, bk)}"
    if not fits:
        raise ValueError(
            f"{fn}: block_mask made for {made_for} does not fit L={n_q} queries and S={n_k} keys "
            "(build it with create_block_mask(mask_mod, B, H, L, S, device=...))"
        )


def _check_flex(
    query, key, value, n, sink, score_mod, block_mask, scale, enable_gqa, kernel_options, fn
) -> tuple[torch.Tensor, torch.Tensor, float, NType, bool]:
    """All checks of ``flex_attention_n``, before anything is computed. Returns key and value as
    4-dim views, the scale, ``n`` (None where a sink replaces it) and whether the query heads are
    grouped over fewer key/value heads."""
    _flex_module()  # torch without FlexAttention: RuntimeError on every path
    kv_3d = isinstance(key, torch.Tensor) and key.dim() == 3
    key, value = _check_qkv(query, key, value, fn)
    b, h, n_q, d = query.shape
    n_k = key.shape[-2]
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"{fn}: enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    grouped = key.shape[1] != h
    if grouped and not (enable_gqa or kv_3d):
        raise ValueError(
            f"{fn}: {key.shape[1]} key/value heads for {h} query heads needs enable_gqa=True "
            "(as flex_attention)"
        )
    n = _check_sink_or_n(n, sink, fn)
    _check_n(n, "n")
    _check_n_rows(n, (b, h, n_q), "n")
    _check_sink(sink, None, query, fn)
    scale = _check_scale(scale, d, fn)
    _check_mods(score_mod, block_mask, fn)
    if block_mask is not None:
        _check_block_mask(block_mask, query, n_k, fn)
    if kernel_options is not None and not isinstance(kernel_options, Mapping):
        raise TypeError(
            f"{fn}: kernel_options must be a dict (FlexAttention's FlexKernelOptions), got "
            f"{type(kernel_options).__name__}"
        )
    return key, value, scale, n, grouped


# ---------------------------------------------------------------- the gate ------------------


def _scaled(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x * gate`` in ``x``'s dtype with one rounding (``gate`` in float32 or float64), without
    a float32 copy of ``x`` (under ``torch.compile`` the product is fused instead)."""
    if torch.compiler.is_compiling():
        return (x * gate).to(x.dtype)
    out = torch.empty_like(x)
    return torch.mul(x, gate, out=out)


class _SoftmaxNGate(torch.autograd.Function):
    """``out0 * sigmoid(lse - c)`` per row, with ``c = log n`` or the sink logit (see the module
    docstring for the gradients)."""

    @staticmethod
    def forward(ctx, out0, lse, extra, log_n, is_sink):
        """``out0 [B, H, L, Dv]``, ``lse [B, H, L]``; ``extra``: a tensor ``n`` or the sinks
        ``[1, H, 1, 1]`` in the working dtype (broadcasting to ``[B, H, L, 1]``), or None with
        ``log_n`` a float."""
        work = torch.promote_types(out0.dtype, torch.float32)
        lse4 = lse.to(work).unsqueeze(-1)  # [B, H, L, 1]
        inv = lse4.new_empty(0)
        if extra is None:  # n > 0 a float: log n finite
            diff = lse4 - log_n
        else:
            c = extra if is_sink else torch.log(extra)  # n = 0: -inf
            # c = -inf (n = 0, or no sink for that head): gate 1, also where lse = -inf
            diff = torch.where(c == -math.inf, math.inf, lse4 - c)
            if not is_sink and ctx.needs_input_grad[2]:
                lse_n = torch.logaddexp(lse4, c)  # log(n + sum exp); -inf: no key and n = 0
                inv = torch.where(lse_n == -math.inf, 0.0, torch.exp(-lse_n))
        gate = torch.sigmoid(diff)
        ctx.save_for_backward(out0, gate, diff, inv)
        ctx.is_sink, ctx.lse_dtype = is_sink, lse.dtype
        ctx.extra_shape = None if extra is None else extra.shape
        return _scaled(out0, gate)

    @staticmethod
    def backward(ctx, grad):
        out0, gate, diff, inv = ctx.saved_tensors
        d_out0 = d_lse = d_extra = None
        if ctx.needs_input_grad[0]:
            d_out0 = _scaled(grad, gate)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            row = (grad * out0).sum(-1, keepdim=True, dtype=gate.dtype)  # <dout, out0>
            slope = torch.sigmoid(diff) * torch.sigmoid(-diff)  # gate (1 - gate), 0 at +-inf
            if ctx.needs_input_grad[1]:
                d_lse = (row * slope).squeeze(-1).to(ctx.lse_dtype)
            if ctx.needs_input_grad[2]:
                d_c = -row * slope if ctx.is_sink else -row * gate * inv
                d_extra = d_c.sum_to_size(ctx.extra_shape)
        return d_out0, d_lse, d_extra, None, None


def _apply_gate(
    out0: torch.Tensor, lse: torch.Tensor, n: NType, sink: torch.Tensor | None
) -> torch.Tensor:
    work = torch.promote_types(out0.dtype, torch.float32)
    if sink is not None:  # [1, H, 1, 1], differentiable
        extra = sink.to(out0.device, work).view(1, -1, 1, 1)
        return _SoftmaxNGate.apply(out0, lse, extra, None, True)
    if isinstance(n, torch.Tensor):  # differentiable
        return _SoftmaxNGate.apply(out0, lse, n.to(out0.device, work), None, False)
    n_float = float(n or 0.0)
    if n_float == 0.0:
        return out0  # plain softmax
    return _SoftmaxNGate.apply(out0, lse, None, math.log(n_float), False)


# ---------------------------------------------------------------- the two paths ------------


def _index_grid(
    b: int, h: int, n_q: int, n_k: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Batch, head, query and key indices as int32 tensors broadcasting to ``[B, H, L, S]``."""
    sizes = (b, h, n_q, n_k)
    return tuple(
        torch.arange(size, device=device, dtype=torch.int32).view(
            [size if i == j else 1 for j in range(4)]
        )
        for i, size in enumerate(sizes)
    )


def _block_mask_mod(block_mask: BlockMask) -> MaskMod:
    """A ``mask_mod`` for what a ``BlockMask`` lets each query see: its ``mask_mod`` within the
    blocks it lists (FlexAttention's kernels never visit the others). torch 2.5's BlockMask may
    not record the block size it was made with (no ``seq_lengths`` there): its ``mask_mod``
    alone, as FlexAttention's own eager path takes it."""
    mask_mod = block_mask.mask_mod
    if getattr(block_mask, "seq_lengths", None) is None:
        return mask_mod
    blocks = block_mask.to_dense().bool()  # [Bm, Hm, ceil(L / bq), ceil(S / bk)]
    bq, bk = block_mask.BLOCK_SIZE

    def listed(b, h, q_idx, kv_idx):
        bb = b if blocks.shape[0] > 1 else torch.zeros_like(b)
        hh = h if blocks.shape[1] > 1 else torch.zeros_like(h)
        return mask_mod(b, h, q_idx, kv_idx) & blocks[bb, hh, q_idx // bq, kv_idx // bk]

    return listed


def _dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: ScoreMod | None,
    block_mask: BlockMask | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's ``(out0, lse)`` written out in plain PyTorch (checked inputs, key and value
    ``[B, Hkv, S, D]``): scores in at least float32, ``score_mod`` and the block mask evaluated
    on broadcast index grids. A row that sees no key gives ``out0 = 0`` and ``lse = -inf`` with
    zero gradients."""
    work = torch.promote_types(query.dtype, torch.float32)
    k, v = _expand_kv(key, query), _expand_kv(value, query)
    scores = (query.to(work) @ k.to(work).transpose(-2, -1)) * scale
    b, h, n_q, n_k = scores.shape
    if score_mod is not None or block_mask is not None:
        grid = _index_grid(b, h, n_q, n_k, query.device)
        if score_mod is not None:
            scores = torch.broadcast_to(score_mod(scores, *grid), scores.shape).to(work)
        if block_mask is not None:
            scores = scores.masked_fill(~_block_mask_mod(block_mask)(*grid), -math.inf)
    if n_k == 0:  # zeros, connected to the graph (zero gradients)
        out0 = (scores @ v.to(work)).to(query.dtype)
        return out0, scores.new_full((b, h, n_q), -math.inf)
    m = scores.detach().amax(-1, keepdim=True)
    m = torch.where(m == -math.inf, 0.0, m)
    e = torch.exp(scores - m)
    total = e.sum(-1, keepdim=True)
    empty = total == 0
    total = torch.where(empty, 1.0, total)
    out0 = ((e / total) @ v.to(work)).to(query.dtype)
    lse = torch.where(empty, -math.inf, torch.log(total) + m).squeeze(-1)
    return out0, lse


def _flex_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: ScoreMod | None,
    block_mask: BlockMask | None,
    scale: float,
    enable_gqa: bool,
    kernel_options: Mapping[str, Any] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out0, lse)`` from FlexAttention: compiled on CUDA, eager elsewhere."""
    module = _flex_module()
    compiling = torch.compiler.is_compiling()
    fn = module.flex_attention
    if query.device.type == "cuda" and not compiling:
        fn = _compiled_flex()
    kwargs: dict[str, Any] = {
        "score_mod": score_mod,
        "block_mask": block_mask,
        "scale": scale,
        "enable_gqa": enable_gqa,
        "kernel_options": None if kernel_options is None else dict(kernel_options),
    }
    if hasattr(module, "AuxRequest"):
        kwargs["return_aux"] = module.AuxRequest(lse=True)
    else:
        kwargs["return_lse"] = True
    if compiling or query.device.type == "cuda":
        out0, aux = fn(query, key, value, **kwargs)
    else:  # grad mode is off here (_needs_dense); FlexAttention refuses CPU inputs that
        # require grad even then
        q, k, v = query.detach(), key.detach(), value.detach()
        with warnings.catch_warnings():  # eager on purpose: no "use torch.compile" advice
            warnings.filterwarnings("ignore", message=_EAGER_WARNING)
            out0, aux = fn(q, k, v, **kwargs)
    return out0, (aux if isinstance(aux, torch.Tensor) else aux.lse)


def _needs_dense(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Inputs that go to ``_dense_attention``: meta tensors, empty ones, and, off CUDA, anything
    computed with gradients enabled or under ``torch.compile``. FlexAttention has no CPU or MPS
    backward (deciding by the grad mode also covers tensors a score_mod captures, for which
    torch 2.5's FlexAttention has no gradient either), and compiled FlexAttention on CPU returns
    no ``lse`` (torch 2.15). Off CUDA both paths are unfused and quadratic in memory."""
    if query.device.type == "meta" or 0 in (*query.shape, *key.shape, value.shape[-1]):
        return True
    if query.device.type == "cuda":
        return False
    return torch.is_grad_enabled() or torch.compiler.is_compiling()


def flex_attention_n(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n: float | torch.Tensor | None = _DEFAULT_N,
    *,
    sink: torch.Tensor | None = None,
    score_mod: ScoreMod | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    kernel_options: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Attention with softmax_n (``exp(s_ij) / (n + sum_j exp(s_ij))``) or attention sinks on
    FlexAttention: ``score_mod`` and ``block_mask`` as ``flex_attention`` takes them, fused on
    CUDA (see the module docstring for the paths).

    Args:
        q: ``[B, H, L, D]``; k: ``[B, Hkv, S, D]`` (``Hkv != H`` needs ``enable_gqa=True``,
            ``H % Hkv == 0``) or ``[B, S, D]`` (shared by all heads); v: the same with its own
            head dim ``Dv``. One float dtype and device (CUDA: fp16, bf16, fp32; CPU: fp32, fp64,
            bf16, fp16 as FlexAttention takes them).
        n: ``None``/0 (softmax), a finite float ``>= 0`` (default 1: softmax_1), or a tensor of
            such values shaped as one of ``softmax_n.functional.N_SHAPES`` (0-dim, ``[H, 1, 1]``
            one learnable value per head, ``[H, L, 1]``, ``[B, H, L, 1]``, ...), with its
            gradient.
        sink: attention sinks, ``[H]``, one logit per query head (any float dtype, on the query's
            device, learnable, no NaN or ``+inf``; ``-inf``: no sink for that head): softmax_n
            with ``n = exp(sink)``, computed in log space. With a sink leave ``n`` at its default
            (or None): any other ``n`` raises ``ValueError``.
        score_mod: ``fn(score, b, h, q_idx, kv_idx) -> score`` applied to each scaled score (as
            ``flex_attention``; indices are int32 tensors). Off CUDA with gradients it is called
            once on broadcast index grids (``[B, 1, 1, 1]``, ``[1, H, 1, 1]``, ``[1, 1, L, 1]``,
            ``[1, 1, 1, S]``), so write it with elementwise tensor operations, as FlexAttention
            needs anyway.
        block_mask: a ``BlockMask`` from ``create_block_mask(mask_mod, B, H, L, S, device)``
            made for these lengths (``B``, ``H`` the inputs' or None), on the query's device.
            Queries see the keys its ``mask_mod`` allows within the blocks it lists.
        scale: score scale (default ``1/sqrt(D)``).
        enable_gqa: grouped-query attention (query head ``i`` uses key/value head
            ``i // (H / Hkv)``), as ``flex_attention``.
        kernel_options: passed to ``flex_attention`` (ignored by the dense path).

    Returns:
        ``[B, H, L, Dv]`` in the query's dtype. A row that sees no key is 0 for every ``n`` and
        sink, with zero gradients.

    Raises:
        TypeError: non-tensors, non-float or mixed dtypes, a ``score_mod`` that is not callable,
            a ``block_mask`` that is not a ``BlockMask``, a non-float ``sink``, a non-bool
            ``enable_gqa``, ``kernel_options`` that is not a dict.
        ValueError: bad shapes, mixed devices, grouped heads without ``enable_gqa``, a bad ``n``
            (NaN, inf, negative, or a shape not in ``N_SHAPES``), a non-finite scale, a block mask
            made for other lengths, batch or heads or on another device, a ``sink`` not shaped
            ``[H]``, on another device, with NaN or ``+inf``, or given with another ``n``.
            All before anything is computed.
        RuntimeError: torch older than 2.5 (no FlexAttention).
    """
    fn = "flex_attention_n"
    key, value, scale, n, grouped = _check_flex(
        q, k, v, n, sink, score_mod, block_mask, scale, enable_gqa, kernel_options, fn
    )
    if _needs_dense(q, key, value):
        out0, lse = _dense_attention(q, key, value, score_mod, block_mask, scale)
    else:
        out0, lse = _flex_forward(
            q, key, value, score_mod, block_mask, scale, grouped, kernel_options
        )
    return _apply_gate(out0, lse, n, sink)


# ---------------------------------------------------------------- attention_fn --------------


def _causal_mod(n_q: int, n_k: int) -> MaskMod:
    """Bottom-right aligned causality: query ``i`` sees keys ``<= i + S - L``."""
    offset = n_k - n_q

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal


def _make_block_mask(
    mask_mod: MaskMod, b: int | None, h: int | None, n_q: int, n_k: int, device: torch.device
) -> BlockMask:
    return _flex_module().create_block_mask(mask_mod, b, h, n_q, n_k, device=device)


def _cache_put(cache: dict, key: Any, value: Any) -> None:
    if len(cache) >= _MAX_CACHED_MASKS:
        cache.pop(next(iter(cache)))
    cache[key] = value


def causal_block_mask(n_q: int, n_k: int, device: torch.device | str) -> BlockMask:
    """A causal ``BlockMask`` (bottom-right aligned: query ``i`` sees keys ``<= i + S - L``) for
    ``n_q`` queries and ``n_k`` keys on ``device``, cached by ``(L, S, device)``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (n_q, n_k, device)
    mask = _CAUSAL_MASKS.get(key)
    if mask is None:
        mask = _make_block_mask(_causal_mod(n_q, n_k), None, None, n_q, n_k, device)
        _cache_put(_CAUSAL_MASKS, key, mask)
    return mask


def _mods_from_attn_mask(
    attn_mask: torch.Tensor, query: torch.Tensor, n_k: int
) -> tuple[MaskMod | None, ScoreMod | None, int | None, int | None]:
    """An SDPA mask as FlexAttention mods: a bool mask (True = attend) as a ``mask_mod``; a float
    mask as a ``score_mod`` adding it plus a ``mask_mod`` dropping its ``-inf`` entries. Also the
    batch and head sizes the block mask needs (None where the mask broadcasts)."""
    b, h, n_q = query.shape[:3]
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    mask4 = attn_mask.reshape(shape)
    mb = b if shape[0] != 1 else None
    mh = h if shape[1] != 1 else None
    if attn_mask.dtype == torch.bool:
        keep4 = mask4.expand(b, h, n_q, n_k)  # views: nothing of [B, H, L, S] is made
        added = None
    else:
        keep4 = (mask4 != -math.inf).expand(b, h, n_q, n_k)
        added = torch.where(mask4 != -math.inf, mask4, 0.0).expand(b, h, n_q, n_k)

    def inside(q_idx, kv_idx):
        # indices past the lengths (torch 2.5 evaluates mask_mods on lengths rounded up to
        # the block size) read the last row/column and are dropped
        return q_idx.clamp(max=max(n_q - 1, 0)), kv_idx.clamp(max=max(n_k - 1, 0))

    def keep(b, h, q_idx, kv_idx):
        q_in, kv_in = inside(q_idx, kv_idx)
        return keep4[b, h, q_in, kv_in] & (q_idx < n_q) & (kv_idx < n_k)

    if added is None:
        return keep, None, mb, mh

    def add(score, b, h, q_idx, kv_idx):
        q_in, kv_in = inside(q_idx, kv_idx)
        return score + added[b, h, q_in, kv_in]

    return keep, add, mb, mh


def _and_mods(*mods: MaskMod) -> MaskMod:
    def both(b, h, q_idx, kv_idx):
        keep = mods[0](b, h, q_idx, kv_idx)
        for mod in mods[1:]:
            keep = keep & mod(b, h, q_idx, kv_idx)
        return keep

    return both


def _then(first: ScoreMod | None, second: ScoreMod | None) -> ScoreMod | None:
    if first is None or second is None:
        return first or second

    def both(score, b, h, q_idx, kv_idx):
        return second(first(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)

    return both


def flex_attention_fn(
    n: float | torch.Tensor | None = _DEFAULT_N,
    *,
    sink: torch.Tensor | None = None,
    block_mask: BlockMask | None = None,
    score_mod: ScoreMod | None = None,
) -> Callable[..., torch.Tensor]:
    """An attention core with SDPA's signature for ``attention_fn`` hooks (SwitchHead, MoEUT,
    CoLT5), ``fn(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0)``, that
    runs ``flex_attention_n`` with this ``n`` (or ``sink``), ``block_mask`` and ``score_mod``.

    - ``is_causal=True`` without a block mask uses a causal ``BlockMask`` (bottom-right aligned
      for ``L != S``), built once per ``(L, S, device)`` and cached; with ``block_mask`` the
      block mask is combined with causality (built once per ``(L, S, device)``).
    - ``attn_mask`` (as SDPA: bool, True = attend, or a float mask of the query's dtype or
      float32 added to the scores, broadcastable to ``[B, H, L, S]``) becomes a block mask (and
      a score_mod for a float mask) at each call; it cannot be combined with ``block_mask``.
    - Grouped-query key/value (fewer heads than the query) are taken as they come.

    ``n``, ``sink``, ``block_mask`` and ``score_mod`` are checked here (what needs no input) and
    again at each call.

    Raises:
        ValueError: (at the call) ``attn_mask`` together with ``block_mask``, or
            ``dropout_p > 0`` (FlexAttention has no dropout); the errors of
            ``flex_attention_n``.
    """
    fn_name = "flex_attention_fn"
    n_checked = _check_sink_or_n(n, sink, fn_name)
    _check_n(n_checked, "n")
    _check_n_rows(n_checked, None, "n")
    _check_sink(sink, None, None, fn_name)
    _check_mods(score_mod, block_mask, fn_name)
    combined: dict[tuple[int, int, torch.device], BlockMask] = {}

    def attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
            raise TypeError(f"{fn_name}: dropout_p must be a float, got {type(dropout_p).__name__}")
        if dropout_p != 0:
            raise ValueError(
                f"{fn_name}: FlexAttention has no dropout, got dropout_p={dropout_p} (use "
                "softmax_n_attention_fn, whose reference path applies it)"
            )
        if attn_mask is not None and block_mask is not None:
            raise ValueError(
                f"{fn_name}: got attn_mask and this function's block_mask; pass the mask in one "
                "of them (a BlockMask may combine both patterns: and_masks)"
            )
        key, _ = _check_qkv(q, k, v, fn_name)
        n_q, n_k = q.shape[-2], key.shape[-2]
        if block_mask is not None:
            _check_block_mask(block_mask, q, n_k, fn_name)
        mask, extra_mod = block_mask, None
        if attn_mask is not None:
            _check_mask(attn_mask, "attn_mask", q, n_k, fn_name, additive=False)
            keep, extra_mod, mb, mh = _mods_from_attn_mask(attn_mask, q, n_k)
            if is_causal:
                keep = _and_mods(keep, _causal_mod(n_q, n_k))
            mask = _make_block_mask(keep, mb, mh, n_q, n_k, q.device)
        elif is_causal and block_mask is None:
            mask = causal_block_mask(n_q, n_k, q.device)
        elif is_causal:
            assert block_mask is not None
            key_ = (n_q, n_k, q.device)
            mask = combined.get(key_)
            if mask is None:
                bm, hm = block_mask.kv_num_blocks.shape[:2]
                both = _and_mods(_block_mask_mod(block_mask), _causal_mod(n_q, n_k))
                mask = _make_block_mask(
                    both, bm if bm > 1 else None, hm if hm > 1 else None, n_q, n_k, q.device
                )
                _cache_put(combined, key_, mask)
        return flex_attention_n(
            q,
            k,
            v,
            n,
            sink=sink,
            score_mod=_then(score_mod, extra_mod),
            block_mask=mask,
            scale=scale,
            enable_gqa=True,
        )

    return attention


__all__ = ["causal_block_mask", "flex_attention_fn", "flex_attention_n"]
