"""softmax_n and the plain-PyTorch reference attention.

``softmax_n(x)_i = exp(x_i) / (n + sum_j exp(x_j))``: with ``n > 0`` a row may put (almost) no
weight anywhere ("attention is off by one"). It equals the softmax over ``x`` extended by one
extra logit ``log n``, with that extra entry dropped. It is computed with every exponent taken
relative to the largest of the row's logits and ``log n`` (see ``_softmax_n``): stable and exact
for any finite ``n >= 0`` and any logits, with exact gradients from autograd (in ``n`` too, at
``n = 0`` included).

The argument checks of the attention functions (``_check_attention`` and its parts) live here
too; they run before any kernel.

Attention sinks (``sink``, one learnable logit per query head, as gpt-oss) are the same extra
logit given directly in log space: softmax over the scores with one extra column ``sink[h]`` that
is dropped, i.e. softmax_n with ``n = exp(sink[h])`` (``exp(sink)`` itself is never formed).
``sink`` and ``softmax_n_param`` are mutually exclusive.
"""

from __future__ import annotations

import math
import numbers

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

# The shapes of a tensor ``n`` that attention accepts (its rows are ``[B, H, L, 1]``).
N_SHAPES = (
    "a float, a 0-dim tensor, or a tensor with a trailing dim of 1 that broadcasts to "
    "[B, H, L, 1] without growing it: [H, 1, 1] (one value per head), [H, L, 1], [B, H, L, 1], "
    "[1, H, 1, 1], [B, 1, 1, 1], ... (1-dim and 2-dim tensors only with a single element: [H] "
    "would broadcast against the keys and [H, 1] against the query length)"
)


def _fits(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without growing it (plain Python:
    ``torch.broadcast_shapes`` imports torch's symbolic-shape machinery on first use, seconds)."""
    if len(shape) > len(target):
        return False
    return all(a in (b, 1) for a, b in zip(reversed(shape), reversed(target)))


def _check_n(n: object, name: str = "softmax_n_param") -> None:
    """Type and values of ``n`` (not its shape): ``None``, a real number or a real tensor, finite
    and ``>= 0``. Raises ``TypeError``/``ValueError``. A CUDA tensor is checked on the device
    (without a host sync: a bad value raises at the next synchronisation); meta tensors and
    tensors under ``torch.compile`` are not read."""
    if n is None:
        return
    if isinstance(n, torch.Tensor):
        if n.dtype not in _FLOAT_DTYPES + _INT_DTYPES:
            raise TypeError(f"{name} (n) must be a real float or integer tensor, got {n.dtype}")
        if n.device.type == "meta" or torch.compiler.is_compiling() or n.numel() == 0:
            return
        ok = torch.all((n >= 0) & torch.isfinite(n)) if n.is_floating_point() else torch.all(n >= 0)
        if n.device.type == "cpu":
            if not bool(ok):
                bad = n[~((n >= 0) & torch.isfinite(n))].flatten()[0].item()
                raise ValueError(f"softmax_n needs a finite n >= 0, got {name} containing {bad}")
        else:
            torch._assert_async(ok, "softmax_n needs a finite n >= 0 (not NaN, inf or negative)")
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise TypeError(f"{name} (n) must be a float or a tensor, got {type(n).__name__}")
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"softmax_n needs a finite n >= 0, got {name}={n}")


def _check_n_rows(
    n: object, rows: tuple[int, int, int] | None, name: str = "softmax_n_param"
) -> None:
    """Shape of a tensor ``n`` for attention with ``rows = (B, H, L)``: see ``N_SHAPES``
    (``rows=None``: the checks that need no input shape)."""
    if not isinstance(n, torch.Tensor) or n.dim() == 0:
        return
    shape = tuple(n.shape)
    problem = None
    if n.dim() > 4:
        problem = "more than 4 dims"
    elif n.dim() <= 2 and n.numel() != 1:
        problem = f"a {n.dim()}-dim tensor with several elements is ambiguous"
    elif shape[-1] != 1:
        problem = "its last dim (the keys' dim) is not 1"
    elif rows is not None and not _fits(shape, (*rows, 1)):
        grows = all(a == b or 1 in (a, b) for a, b in zip(reversed(shape), reversed((*rows, 1))))
        problem = "it broadcasts to a larger shape" if grows else "it does not broadcast"
    if problem is not None:
        target = "" if rows is None else f" = {[*rows, 1]}"
        raise ValueError(
            f"{name} (n) of shape {list(shape)} does not fit the rows [B, H, L, 1]{target}: "
            f"{problem}; n must be {N_SHAPES}"
        )


def _check_sink(sink: object, n: object, query: torch.Tensor | None, fn: str) -> None:
    """``sink``: ``None`` or a float tensor ``[H]`` (one logit per query head) on the query's
    device, without NaN or ``+inf`` (``-inf``: no sink for that head); mutually exclusive with
    ``n``. ``query=None``: the checks that need no input. A CUDA tensor's values are checked on
    the device (no host sync; a bad value raises at the next synchronisation)."""
    if sink is None:
        return
    if n is not None:
        raise ValueError(
            f"{fn}: sink and softmax_n_param are mutually exclusive (a sink is softmax_n with "
            "n = exp(sink) per head); pass only one of them"
        )
    if not isinstance(sink, torch.Tensor):
        raise TypeError(f"{fn}: sink must be a torch.Tensor, got {type(sink).__name__}")
    if sink.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: sink must be a float tensor (one logit per head), got {sink.dtype}")
    if query is not None:
        if sink.device != query.device:
            raise ValueError(f"{fn}: sink is on {sink.device}, the query on {query.device}")
        if tuple(sink.shape) != (query.shape[1],):
            raise ValueError(
                f"{fn}: sink must have shape [H] = [{query.shape[1]}] (one logit per query "
                f"head), got {list(sink.shape)}"
            )
    if sink.device.type == "meta" or torch.compiler.is_compiling() or sink.numel() == 0:
        return
    ok = torch.all(sink < math.inf)  # False for NaN and +inf
    if sink.device.type == "cpu":
        if not bool(ok):
            raise ValueError(f"{fn}: sink logits must not be NaN or +inf, got {sink.tolist()}")
    else:
        torch._assert_async(ok, "sink logits must not be NaN or +inf")


def _check_n_for(n: object, x: torch.Tensor, dim: int) -> None:
    """Shape of a tensor ``n`` for ``softmax_n(x, n, dim)``: broadcasts to ``x`` without growing
    it, size 1 along ``dim``."""
    if not isinstance(n, torch.Tensor) or n.dim() == 0:
        return
    shape = tuple(n.shape)
    ok = _fits(shape, tuple(x.shape))
    offset = x.dim() - n.dim()
    if ok and dim >= offset and shape[dim - offset] != 1:
        ok = False
    if not ok:
        raise ValueError(
            f"n of shape {list(shape)} must broadcast to x {list(x.shape)} without growing it and "
            f"have size 1 along the reduced dim {dim}"
        )


def _softmax_n(
    x: torch.Tensor,
    n: float | torch.Tensor | None,
    dim: int,
    empty_rows_zero: bool,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax_n in the max-shifted form (validated inputs), computed in at least float32.

    ``m = max(max_j x_j, log n)`` (a constant for autograd), ``e = exp(x - m)``, result
    ``e / (exp(log n - m) + sum e)``: every exponent is formed relative to the row's largest term,
    so large logits keep full precision (a log-sum-exp is never formed at the logits' magnitude).
    The extra term is ``n * exp(-m)`` where ``n = 0``, so the gradient in ``n`` is exact there too.
    Rows whose terms are all 0 (every logit ``-inf`` and ``n = 0``) give 0 when
    ``empty_rows_zero`` (attention, as ``F.scaled_dot_product_attention``), else NaN (softmax).
    ``sink`` (in place of ``n``): the extra logit itself (``log n``), broadcast like ``n``.
    """
    work = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(work)
    if xw.shape[dim] == 0:
        return xw.to(x.dtype)  # empty (the shape has a 0)
    m = xw.detach().amax(dim, keepdim=True)
    extra = None
    if sink is not None:
        sw = sink.to(xw.device, work)
        m = torch.maximum(m, sw.detach())
        m = torch.where(m == -math.inf, 0.0, m)
        extra = torch.exp(sw - m)
    elif isinstance(n, torch.Tensor):
        nw = n.to(xw.device, work)
        pos = nw > 0
        log_n = torch.log(torch.where(pos, nw, 1.0))
        m = torch.maximum(m, torch.where(pos, log_n, -math.inf).detach())
        m = torch.where(m == -math.inf, 0.0, m)
        big = torch.finfo(work).max
        extra = torch.where(pos, torch.exp(log_n - m), nw * torch.exp(-m).clamp(max=big))
    else:
        if n:  # > 0
            m = m.clamp_min(math.log(n))
        m = torch.where(m == -math.inf, 0.0, m)
        if n:
            extra = torch.exp(math.log(n) - m)
    e = torch.exp(xw - m)
    denom = e.sum(dim, keepdim=True)
    if extra is not None:
        denom = denom + extra
    if empty_rows_zero:
        denom = torch.where(denom == 0, 1.0, denom)
    return (e / denom).to(x.dtype)


def softmax_n(
    x: torch.Tensor,
    n: float | torch.Tensor | None = None,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``exp(x_i) / (n + sum_j exp(x_j))`` along ``dim`` (default -1).

    Args:
        x: logits, any shape, a float dtype (or any dtype with ``dtype`` given).
        n: ``None``/0 (plain softmax), a finite float ``>= 0``, or a real tensor of finite values
            ``>= 0`` that broadcasts to ``x`` without growing it and has size 1 along ``dim``
            (e.g. one learnable value per head).
        dtype: compute (and return) in this dtype.

    Computed in the max-shifted form (see ``_softmax_n``), in at least float32, returned in
    ``x``'s dtype. A row of ``-inf`` logits gives zeros for ``n > 0`` (NaN for ``n = 0``, as
    softmax does; the attention functions give 0 there, as ``F.scaled_dot_product_attention``).

    Raises:
        TypeError: ``x`` not a float tensor, ``n`` not a real number or real tensor.
        ValueError: ``n`` negative, NaN or infinite, or of a shape that does not fit ``x``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if dtype is not None:
        x = x.to(dtype)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"softmax_n needs a float tensor (or dtype=...), got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("softmax_n needs a tensor with at least one dim")
    dim = -1 if dim is None else dim
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} out of range for a {x.dim()}-dim tensor")
    dim %= x.dim()
    _check_n(n, "n")
    _check_n_for(n, x, dim)
    return _softmax_n(x, n, dim, empty_rows_zero=False)


def _expand_kv(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Key/value ``[B, S, D]`` (shared by heads) or ``[B, Hkv, S, D]`` (grouped-query) to the
    query's heads."""
    if t.dim() == q.dim() - 1:
        t = t.unsqueeze(-3)
    heads, kv_heads = q.shape[-3], t.shape[-3]
    if kv_heads != heads:
        if kv_heads == 0 or heads % kv_heads:
            raise ValueError(f"{kv_heads} key/value heads do not divide {heads} query heads")
        if kv_heads == 1:
            t = t.expand(*t.shape[:-3], heads, *t.shape[-2:])
        else:
            t = t.repeat_interleave(heads // kv_heads, dim=-3)
    return t


def _float_tensor(t: object, name: str, fn: str) -> torch.Tensor:
    """``t`` if it is a float tensor, else ``TypeError``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be a float tensor, got {t.dtype}")
    return t


def _check_qkv(
    query: object, key: object, value: object, fn: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Types, dtypes, devices and shapes of query, key and value (SDPA's rules plus grouped-query
    and 3-dim key/value). Returns key and value as ``[B, Hkv, S, D]`` and ``[B, Hkv, S, Dv]``
    (views, not expanded to the query's heads)."""
    query = _float_tensor(query, "query", fn)
    key = _float_tensor(key, "key", fn)
    value = _float_tensor(value, "value", fn)
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            f"{fn}: query, key and value need one dtype, got {query.dtype}, {key.dtype}, "
            f"{value.dtype}"
        )
    if not query.device == key.device == value.device:
        raise ValueError(
            f"{fn}: query, key and value must be on one device, got {query.device}, "
            f"{key.device}, {value.device}"
        )
    if query.dim() != 4:
        raise ValueError(f"{fn}: query must be [B, H, L, D], got shape {tuple(query.shape)}")
    kv = []
    for name, t in (("key", key), ("value", value)):
        if t.dim() == 3:
            t = t.unsqueeze(1)
        elif t.dim() != 4:
            raise ValueError(
                f"{fn}: {name} must be [B, S, D] or [B, Hkv, S, D], got shape {tuple(t.shape)}"
            )
        kv.append(t)
    key, value = kv
    b, h = query.shape[:2]
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"{fn}: key {tuple(key.shape)} and value {tuple(value.shape)} need the same heads and "
            "length (and batch)"
        )
    if key.shape[0] != b:
        raise ValueError(f"{fn}: key/value batch {key.shape[0]} != query batch {b}")
    hk = key.shape[1]
    if (hk == 0 and h != 0) or (hk != 0 and h % hk):
        raise ValueError(f"{fn}: {hk} key/value heads do not divide {h} query heads")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"{fn}: query and key need one head dim, got {query.shape[-1]} and {key.shape[-1]}"
        )
    return key, value


def _check_scale(scale: object, head_dim: int, fn: str) -> float:
    """The score scale: ``1/sqrt(D)`` by default (1 for ``D = 0``: the scores are then 0)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{fn}: scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be finite, got {scale}")
    return float(scale)


def _check_mask(
    t: object, name: str, query: torch.Tensor, n_k: int, fn: str, additive: bool
) -> None:
    """``attn_mask`` (SDPA's dtypes: bool, the query's float dtype or float32) or ``attn_bias``
    (``additive``: any float dtype); both must broadcast to ``[B, H, L, S]`` on the query's
    device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if additive:
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{fn}: {name} is an additive float bias, got {t.dtype} (a bool keep-mask goes "
                "in attn_mask)"
            )
    elif t.dtype != torch.bool and t.dtype not in (query.dtype, torch.float32):
        hint = " (for a 0/1 keep-mask pass mask.bool())" if t.dtype in _INT_DTYPES else ""
        floats = " or ".join(dict.fromkeys(str(d) for d in (query.dtype, torch.float32)))
        raise TypeError(
            f"{fn}: {name} must be bool (True = attend) or a float mask added to the scores "
            f"({floats}: the query's dtype or float32), as F.scaled_dot_product_attention "
            f"takes; got {t.dtype}{hint}"
        )
    if t.device != query.device:
        raise ValueError(f"{fn}: {name} is on {t.device}, the query on {query.device}")
    target = (*query.shape[:3], n_k)
    if not _fits(tuple(t.shape), target):
        raise ValueError(
            f"{fn}: {name} of shape {list(t.shape)} does not broadcast to [B, H, L, S] = "
            f"{list(target)}"
        )


def _check_attention(
    query, key, value, attn_mask, attn_bias, scale, dropout_p, softmax_n_param, fn, sink=None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """All argument checks of the attention functions, before any kernel runs. Returns key and
    value as 4-dim views and the scale."""
    key, value = _check_qkv(query, key, value, fn)
    _check_mask(attn_mask, "attn_mask", query, key.shape[-2], fn, additive=False)
    _check_mask(attn_bias, "attn_bias", query, key.shape[-2], fn, additive=True)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{fn}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p < 0.0 or not dropout_p <= 1.0:  # (NaN fails the second test)
        raise ValueError(f"{fn}: dropout_p must be in [0, 1], got {dropout_p}")
    _check_n(softmax_n_param)
    _check_n_rows(softmax_n_param, tuple(query.shape[:3]))
    _check_sink(sink, softmax_n_param, query, fn)
    return key, value, _check_scale(scale, query.shape[-1], fn)


def attention_bias(
    q_len: int,
    k_len: int,
    attn_mask: torch.Tensor | None,
    attn_bias: torch.Tensor | None,
    is_causal: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """One additive float bias from an SDPA-style mask (bool: True = keep; float: added), a bias
    (e.g. ALiBi) and causality, aligned bottom-right: query ``i`` sees keys ``<= i + S - L``.
    The mask and bias have been checked (``_check_mask``)."""
    bias = None
    if is_causal:
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        bias = torch.zeros(q_len, k_len, device=device, dtype=dtype).masked_fill(~keep, -math.inf)
    for extra in (attn_mask, attn_bias):
        if extra is None:
            continue
        if extra.dtype == torch.bool:
            extra = torch.zeros(extra.shape, device=device, dtype=dtype).masked_fill(
                ~extra, -math.inf
            )
        bias = extra.to(dtype) if bias is None else bias + extra.to(dtype)
    return bias


def _reference(
    query, key, value, attn_mask, dropout_p, is_causal, scale, n, softmax_dtype, train, attn_bias,
    sink=None,
) -> torch.Tensor:  # fmt: skip
    """``slow_attention_n`` on checked arguments (key/value 3- or 4-dim, ``scale`` a float)."""
    key, value = _expand_kv(key, query), _expand_kv(value, query)
    scores = (query @ key.transpose(-2, -1)) * scale
    bias = attention_bias(
        query.shape[-2], key.shape[-2], attn_mask, attn_bias, is_causal, query.device, scores.dtype
    )
    if bias is not None:
        scores = scores + bias
    if softmax_dtype is not None:
        scores = scores.to(softmax_dtype)
    if sink is not None:
        sink = sink.view(-1, 1, 1)  # [H, 1, 1]: one extra logit per head and row
    weights = _softmax_n(scores, n, -1, empty_rows_zero=True, sink=sink).to(value.dtype)
    if dropout_p > 0 and train:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return weights @ value


def slow_attention_n(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    softmax_n_param: float | torch.Tensor | None = None,
    softmax_dtype: torch.dtype | None = None,
    train: bool = True,
    attn_bias: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference attention with softmax_n, materialising the scores; never mutates its inputs.

    Args:
        query: ``[B, H, L, D]``; key: ``[B, Hkv, S, D]`` (``H % Hkv == 0``) or ``[B, S, D]``;
            value: the same with its own head dim ``Dv``. One float dtype and device.
        attn_mask: as ``F.scaled_dot_product_attention``: bool (True = keep) or a float mask of
            the query's dtype or float32 (added to the scores), broadcastable to
            ``[B, H, L, S]``; other dtypes (e.g. a 0/1 integer mask) raise ``TypeError``.
        is_causal: bottom-right aligned when ``L != S``.
        softmax_n_param: ``n``: a finite float ``>= 0``, or a tensor of such values whose shape
            is one of ``N_SHAPES`` (a 0-dim tensor, ``[H, 1, 1]`` per head, ``[H, L, 1]``,
            ``[B, H, L, 1]``, ...).
        softmax_dtype: dtype of the softmax (default: the scores' dtype; computed in at least
            float32 either way).
        train: dropout is applied only when ``train`` is true.
        attn_bias: additive float bias, e.g. ALiBi, broadcastable to ``[B, H, L, S]``.
        sink: attention sinks, ``[H]``, one logit per query head (any float dtype, learnable):
            softmax over the scores and one extra column ``sink[h]`` that is dropped (softmax_n
            with ``n = exp(sink)``, computed in log space). Mutually exclusive with
            ``softmax_n_param``.

    Returns:
        ``[B, H, L, Dv]``. A row that sees no key is 0 (for every ``n``, as SDPA); empty inputs
        give empty (or, for ``S = 0``, zero) outputs.

    Raises:
        TypeError: non-tensors, non-float or mixed dtypes, a mask dtype SDPA refuses, a
            non-float ``sink``.
        ValueError: bad shapes, mixed devices, a bad ``n`` (NaN, inf, negative, or a shape not
            in ``N_SHAPES``), a non-finite scale, ``dropout_p`` outside ``[0, 1]``, a ``sink``
            not shaped ``[H]``, on another device, with NaN or ``+inf``, or given with
            ``softmax_n_param``.
    """
    key, value, scale = _check_attention(
        query, key, value, attn_mask, attn_bias, scale, dropout_p, softmax_n_param,
        "slow_attention_n", sink,
    )  # fmt: skip
    return _reference(
        query, key, value, attn_mask, dropout_p, is_causal, scale, softmax_n_param,
        softmax_dtype, train, attn_bias, sink,
    )  # fmt: skip
