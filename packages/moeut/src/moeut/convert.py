"""Convert the MoEUT authors' training-code checkpoints into ``moeut`` (``MoEUTLM``) weights.

The authors trained MoEUT with the code of ``github.com/RobertCsordas/moeut_training_code``. A
checkpoint of that code is one ``torch.save`` of a dict with, among other entries:

- ``"model"``: the language model's ``state_dict()`` (their ``TransformerLanguageModel``);
- ``"run_invariants"``: ``{"args": {...}, "wandb_id": ...}``, the flat dict of the run's
  command-line arguments (``"state_size"``, ``"transformer.encoder_n_layers"``, ``"pkm.n_heads"``,
  ...), as their argument parser stores them (numbers, ``0``/``1`` for booleans, strings such as
  ``"82"`` or ``"none"`` for the arguments with optional values);
- ``"state"`` (iteration counters, pickled as their ``DotDict`` class), ``"scaler"``,
  ``"interface"``, ``"sampler"``, and ``"optimizer"`` (absent from the released checkpoints).

Only ``"model"`` and ``"run_invariants"["args"]`` are read. The file is loaded with
``torch.load(weights_only=True)``, the training code's ``DotDict`` being read as a plain dict, so
neither their code nor a trusted pickle is needed. ``trust_pickle=True`` (CLI ``--trust-pickle``)
falls back to ``weights_only=False`` for files holding other Python objects: that runs code from
the file, so use it only for files you trust.

Their MoEUT is the ``"preln_moe_universal"`` variant (``"preln_moe"``: no sharing) with
SwitchHead attention (``moe.att.enable``, experts on V and O only) and peri-layernorm
(``moe.nonorm``). Its parameters map one to one, with the same layouts (no transposes), onto
``MoEUTLM``'s: ``unique_layers.{i}`` (the ``group_size`` distinct layers, in the order of the
first group) becomes ``transformer.layers.{i}``, and

==============================================  ==============================================
theirs (``unique_layers.{i}.``)                 ours (``transformer.layers.{i}.``)
==============================================  ==============================================
``self_attn.projections.q`` [H*dh, d]           ``attention.q.weight``
``self_attn.projections.k`` [H*dh, d]           ``attention.k.weight``
``self_attn.projections.v`` [H*E, d, dh]        ``attention.v`` (row ``h*E + e``: head h, expert e)
``self_attn.projections.o`` [H*E, dh, d]        ``attention.o``
``self_attn.selections.v`` [H*E, d]             ``attention.sel_v``
``self_attn.selections.o`` [H*E, d]             ``attention.sel_o``
``self_attn.norm.{weight,bias}``                ``ln1.*`` (LayerNorm of q, k and selections)
``pkm.keys`` [E, d, expert_size]                ``ffn.keys``
``pkm.values`` [E, expert_size, d]              ``ffn.values``
``pkm.expert_sel`` [E, d]                       ``ffn.expert_sel``
``pkm.norm.{weight,bias}``                      ``ln2.*`` (LayerNorm of the FFN selection)
``pkm.iter``, ``pkm.kv_sel_counts_100``         dropped (training statistics)
==============================================  ==============================================

and ``embedding.weight`` -> ``embedding.weight``, ``output.{weight,bias}`` ->
``lm_head.{weight,bias}``, ``out_norm.{weight,bias}`` -> ``out_norm.{weight,bias}``. A non-default
``transformer.embedding_scale`` is folded into the embedding. Options that change the
architecture beyond this (other variants, biases in the MoE, other activations or selection
functions, other RoPE settings, ``"aabb"`` layer grouping, ...) are refused with a
``ValueError`` naming the argument.

``lm.trafo.context_blocks > 0`` (attending to the previous segment's states, as in
Transformer-XL) does not change the weights and is accepted; ``MoEUTLM`` does not carry states
across segments.

Usage::

    python -m moeut.convert C4_44M.ckpt moeut_44m.safetensors   # our state dict + config
    python -m moeut.convert C4_44M.ckpt moeut_44m_hf/            # HF folder (moeut[hf])
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "DEFAULT_TRAINING_ARGS",
    "convert_state_dict",
    "convert_training_checkpoint",
    "load_training_checkpoint",
    "main",
    "read_converted",
    "to_moeut_lm",
    "training_args_to_config",
    "write_converted",
]

StateDict = dict[str, torch.Tensor]

# The training code's defaults (its argument parser's) for the arguments read here, used when a
# checkpoint's argument dict lacks them. The structural sizes are inferred from the tensors
# instead, and the depth and the top-k sizes must be given.
DEFAULT_TRAINING_ARGS: dict[str, Any] = {
    "transformer.variant": "standard",
    "transformer.universal.group_size": 1,
    "transformer.universal.group_type": "abab",
    "transformer.activation": "relu",
    "transformer.embedding_scale": None,
    "embedding_size": None,
    "dropout": 0.0,
    "lm.trafo.norm_input": False,
    "rope.rotate_fraction": 0.5,
    "rope.base": 10000.0,
    "moe.att.enable": False,
    "moe.att.q_expert": True,
    "moe.att.k_expert": True,
    "moe.att.v_expert": True,
    "moe.att.o_expert": True,
    "moe.att.same_sel": False,
    "moe.att.selection_mode": "sigmoid",
    "moe.att.v_size": None,
    "moe.att.drop_expert": None,
    "moe.att.perplexity_reg": None,
    "moe.nonorm": False,
    "moe.bias": False,
    "moe.sel_bias": False,
    "moe.selection_mode": "sigmoid",
    "moe.drop_expert": 0.0,
    "moe.perplexity_reg": 0.0,
}

# Needed, and not recoverable from the tensors.
_REQUIRED_ARGS = ("transformer.encoder_n_layers", "pkm.n_heads", "moe.att.k")

# Buffers of their MoE layer that hold training statistics only.
_DROPPED_SUFFIXES = ("pkm.iter", "pkm.kv_sel_counts_100")

_ATTENTION_MAP = {
    "self_attn.projections.q": "attention.q.weight",
    "self_attn.projections.k": "attention.k.weight",
    "self_attn.projections.v": "attention.v",
    "self_attn.projections.o": "attention.o",
    "self_attn.selections.v": "attention.sel_v",
    "self_attn.selections.o": "attention.sel_o",
    "self_attn.norm.weight": "ln1.weight",
    "self_attn.norm.bias": "ln1.bias",
    "pkm.keys": "ffn.keys",
    "pkm.values": "ffn.values",
    "pkm.expert_sel": "ffn.expert_sel",
    "pkm.norm.weight": "ln2.weight",
    "pkm.norm.bias": "ln2.bias",
}
_TOP_LEVEL_MAP = {
    "embedding.weight": "embedding.weight",
    "output.weight": "lm_head.weight",
    "output.bias": "lm_head.bias",
    "out_norm.weight": "out_norm.weight",
    "out_norm.bias": "out_norm.bias",
}


# ----- loading -----


class _DotDict:
    """Stands for the training code's ``framework.data_structures.dotdict.DotDict`` (a ``dict``
    subclass with attribute access) while unpickling: it is rebuilt as a plain ``dict``."""

    def __new__(cls, *args: Any) -> dict:  # type: ignore[misc]
        return {}


_DotDict.__module__ = "framework.data_structures.dotdict"
_DotDict.__name__ = _DotDict.__qualname__ = "DotDict"


class _StandInUnpickler(pickle.Unpickler):
    """The full unpickler (``trust_pickle=True``), with the ``DotDict`` stand-in."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("framework.data_structures.dotdict", "DotDict"):
            return dict
        return super().find_class(module, name)


class _StandInPickleModule:
    """A ``pickle_module`` for ``torch.load`` whose unpickler reads ``DotDict`` as ``dict``."""

    Unpickler = _StandInUnpickler
    load = staticmethod(pickle.load)
    __name__ = "pickle"


def load_training_checkpoint(
    path: str | os.PathLike, *, trust_pickle: bool = False
) -> dict[str, Any]:
    """Load a training-code checkpoint file on the CPU, without the training code.

    Args:
        path: the file ``torch.save`` wrote (``model-<iter>.pth``, or a released ``*.ckpt``).
        trust_pickle: if the file holds Python objects other than tensors, containers and the
            training code's ``DotDict``, load it with ``weights_only=False``. That executes code
            from the file: only for files you trust.

    Returns:
        The checkpoint's top-level dict (``"model"``, ``"run_invariants"``, ...).

    Raises:
        ValueError: the file is not loadable with ``weights_only=True`` (and ``trust_pickle`` is
            off), or is not a dict.
    """
    try:
        with _allow_dotdict():
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise ValueError(
                f"{os.fspath(path)} holds Python objects that torch.load(weights_only=True) "
                "refuses. If you trust the file, pass trust_pickle=True (CLI: --trust-pickle), "
                "which loads it with weights_only=False. The unpickler said: "
                f"{_first_line(str(e))}"
            ) from e
        data = torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_StandInPickleModule
        )
    if not isinstance(data, Mapping):
        raise ValueError(f"{os.fspath(path)} is not a checkpoint dict (got {type(data).__name__})")
    return dict(data)


def _allow_dotdict() -> contextlib.AbstractContextManager:
    """Let ``weights_only`` loading build the ``DotDict`` stand-in (for this load only where
    ``torch.serialization.safe_globals`` exists)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is not None:
        return safe_globals([_DotDict])
    torch.serialization.add_safe_globals([_DotDict])
    return contextlib.nullcontext()


def _first_line(text: str) -> str:
    """The unpickler's own reason, without torch's generic advice around it."""
    for line in text.splitlines():
        if "WeightsUnpickler error" in line or "Unsupported global" in line:
            return line.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else text


# ----- arguments -> config -----


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("0", "1", "true", "false", "yes", "no"):
        return value.lower() in ("1", "true", "yes")
    raise ValueError(f"training argument {name!r}: expected a boolean, got {value!r}")


def _parse_optional(name: str, value: Any, kind: type) -> Any:
    """``None``/``"none"`` -> ``None``; else ``kind(value)`` (numbers may arrive as strings)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"training argument {name!r}: expected {kind.__name__}, got {value!r}"
        ) from None


class _Args:
    """Typed access to the flat argument dict, with the defaults and the tensors' sizes."""

    def __init__(self, args: Mapping[str, Any], inferred: Mapping[str, Any]):
        self.args = dict(args)
        self.inferred = dict(inferred)

    def raw(self, name: str) -> Any:
        if name in self.args:
            return self.args[name]
        if name in self.inferred:
            return self.inferred[name]
        if name in DEFAULT_TRAINING_ARGS:
            return DEFAULT_TRAINING_ARGS[name]
        raise ValueError(
            f"training argument {name!r} is missing: the checkpoint's run_invariants['args'] "
            f"does not have it; pass it (training_args={{{name!r}: ...}}, CLI --arg {name}=...)"
        )

    def _required(self, name: str, cast: type, kind: str):
        value = _parse_optional(name, self.raw(name), cast)
        if value is None:
            raise ValueError(f"training argument {name!r} must be {kind}, got None")
        return value

    def as_int(self, name: str) -> int:
        return self._required(name, int, "an integer")

    def as_opt_int(self, name: str) -> int | None:
        return _parse_optional(name, self.raw(name), int)

    def as_float(self, name: str) -> float:
        return self._required(name, float, "a number")

    def as_opt_float(self, name: str) -> float | None:
        return _parse_optional(name, self.raw(name), float)

    def as_bool(self, name: str) -> bool:
        return _parse_bool(name, self.raw(name))

    def as_str(self, name: str) -> str:
        return str(self.raw(name))


def _unsupported(name: str, value: Any, wanted: str) -> ValueError:
    return ValueError(
        f"unsupported training configuration: {name}={value!r} ({wanted}); the converter "
        "handles the authors' MoEUT (transformer.variant preln_moe_universal with SwitchHead "
        "attention and peri-layernorm)"
    )


def _infer_sizes(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The sizes the tensors tell (used where the argument dict lacks them)."""
    out: dict[str, Any] = {}
    emb = state.get("embedding.weight")
    if isinstance(emb, torch.Tensor) and emb.dim() == 2:
        out["state_size"] = emb.shape[1]
    q = state.get("unique_layers.0.self_attn.projections.q")
    v = state.get("unique_layers.0.self_attn.projections.v")
    if isinstance(v, torch.Tensor) and v.dim() == 3:
        out["transformer.head_projection_size"] = v.shape[2]
        if isinstance(q, torch.Tensor) and q.dim() == 2 and q.shape[0] % v.shape[2] == 0:
            n_heads = q.shape[0] // v.shape[2]
            out["transformer.n_heads"] = n_heads
            if n_heads and v.shape[0] % n_heads == 0:
                out["moe.att.n_experts"] = v.shape[0] // n_heads
    keys = state.get("unique_layers.0.pkm.keys")
    if isinstance(keys, torch.Tensor) and keys.dim() == 3:
        out["moe.n_experts"] = keys.shape[0]
        out["moe.expert_size"] = keys.shape[2]
    layers = {k.split(".")[1] for k in state if k.startswith("unique_layers.")}
    if layers:
        out["transformer.universal.group_size"] = len(layers)
    return out


def training_args_to_config(
    args: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """``MoEUTLM`` keyword arguments for a training run's arguments.

    Args:
        args: the flat argument dict (``checkpoint["run_invariants"]["args"]``), values as the
            training code stores them (``"none"``, numeric strings and ``0``/``1`` accepted).
        state: the model state dict; gives the vocabulary size, and the sizes the arguments
            lack.

    Returns:
        A JSON-serialisable dict of ``MoEUTLM``'s arguments (the attention is SwitchHeadRope,
        ``MoEUTLM``'s default, and is not included).

    Raises:
        ValueError: an argument outside what ``MoEUTLM`` reproduces (named in the message), or a
            needed one missing.
    """
    a = _Args(args, _infer_sizes(state or {}))
    variant = a.as_str("transformer.variant")
    if variant not in ("preln_moe_universal", "preln_moe"):
        raise _unsupported("transformer.variant", variant, "needs preln_moe_universal/preln_moe")
    checks: list[tuple[str, Any, Any, str]] = [
        ("moe.att.enable", a.as_bool("moe.att.enable"), True, "SwitchHead attention"),
        ("moe.nonorm", a.as_bool("moe.nonorm"), True, "peri-layernorm"),
        ("moe.att.q_expert", a.as_bool("moe.att.q_expert"), False, "dense queries"),
        ("moe.att.k_expert", a.as_bool("moe.att.k_expert"), False, "dense keys"),
        ("moe.att.v_expert", a.as_bool("moe.att.v_expert"), True, "expert values"),
        ("moe.att.o_expert", a.as_bool("moe.att.o_expert"), True, "expert outputs"),
        ("moe.att.same_sel", a.as_bool("moe.att.same_sel"), False, "separate V and O selections"),
        ("moe.att.selection_mode", a.as_str("moe.att.selection_mode"), "sigmoid", "sigmoid"),
        ("moe.selection_mode", a.as_str("moe.selection_mode"), "sigmoid", "sigmoid"),
        ("transformer.activation", a.as_str("transformer.activation"), "relu", "ReLU experts"),
        ("moe.bias", a.as_bool("moe.bias"), False, "no expert biases"),
        ("moe.sel_bias", a.as_bool("moe.sel_bias"), False, "no selection bias"),
        ("embedding_size", a.as_opt_int("embedding_size"), None, "no embedding adapter"),
        ("lm.trafo.norm_input", a.as_bool("lm.trafo.norm_input"), False, "no input norm"),
    ]
    for name, value, wanted, what in checks:
        if value != wanted:
            raise _unsupported(name, args.get(name, value), f"needs {wanted!r}: {what}")
    if not math.isclose(a.as_float("rope.rotate_fraction"), 0.5):
        raise _unsupported("rope.rotate_fraction", a.raw("rope.rotate_fraction"), "needs 0.5")
    if not math.isclose(a.as_float("rope.base"), 10000.0):
        raise _unsupported("rope.base", a.raw("rope.base"), "needs 10000")

    d_model = a.as_int("state_size")
    n_heads = a.as_int("transformer.n_heads")
    d_head = a.as_opt_int("transformer.head_projection_size") or d_model // n_heads
    v_size = a.as_opt_int("moe.att.v_size")
    if v_size is not None and v_size != d_head:
        raise _unsupported("moe.att.v_size", v_size, f"needs the head size {d_head}")
    att_n_experts = a.as_int("moe.att.n_experts")
    if att_n_experts < 2:
        raise _unsupported("moe.att.n_experts", att_n_experts, "needs >= 2")
    n_layers = a.as_int("transformer.encoder_n_layers")
    if variant == "preln_moe_universal":
        group_size = a.as_int("transformer.universal.group_size")
        group_type = a.as_str("transformer.universal.group_type")
        if group_size < 1 or n_layers % group_size:
            raise ValueError(
                f"transformer.encoder_n_layers={n_layers} is not a multiple of "
                f"transformer.universal.group_size={group_size}"
            )
        if group_type != "abab" and 1 < group_size < n_layers:
            # "aabb" repeats each layer n_layers // group_size times in a row; MoEUTLM repeats
            # the whole group.
            raise _unsupported("transformer.universal.group_type", group_type, "needs 'abab'")
    else:
        group_size = n_layers  # no sharing: every layer distinct
    drop_expert = a.as_float("moe.drop_expert")
    att_drop = a.as_opt_float("moe.att.drop_expert")
    entropy = a.as_float("moe.perplexity_reg")
    att_entropy = a.as_opt_float("moe.att.perplexity_reg")
    emb = (state or {}).get("embedding.weight")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
        raise ValueError("the model state has no 2-d 'embedding.weight' (the vocabulary size)")
    return dict(
        n_tokens=int(emb.shape[0]),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        ff_n_experts=a.as_int("moe.n_experts"),
        att_n_experts=att_n_experts,
        d_head=d_head,
        group_size=group_size,
        ff_k=a.as_int("pkm.n_heads"),
        att_k=a.as_int("moe.att.k"),
        ff_expert_dropout=drop_expert,
        att_expert_dropout=drop_expert if att_drop is None else att_drop,
        ff_expert_size=a.as_int("moe.expert_size"),
        dropout=a.as_float("dropout"),
        entropy_reg=entropy,
        att_entropy_reg=entropy if att_entropy is None else att_entropy,
    )


# ----- state dict -----


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Their key -> (shape, our key) for ``config``."""
    d, h, dh = config["d_model"], config["n_heads"], config["d_head"]
    ea, ef, es = config["att_n_experts"], config["ff_n_experts"], config["ff_expert_size"]
    v = config["n_tokens"]
    layer_shapes = {
        "self_attn.projections.q": (h * dh, d),
        "self_attn.projections.k": (h * dh, d),
        "self_attn.projections.v": (h * ea, d, dh),
        "self_attn.projections.o": (h * ea, dh, d),
        "self_attn.selections.v": (h * ea, d),
        "self_attn.selections.o": (h * ea, d),
        "self_attn.norm.weight": (d,),
        "self_attn.norm.bias": (d,),
        "pkm.keys": (ef, d, es),
        "pkm.values": (ef, es, d),
        "pkm.expert_sel": (ef, d),
        "pkm.norm.weight": (d,),
        "pkm.norm.bias": (d,),
    }
    top_shapes = {
        "embedding.weight": (v, d),
        "output.weight": (v, d),
        "output.bias": (v,),
        "out_norm.weight": (d,),
        "out_norm.bias": (d,),
    }
    out = {k: (s, _TOP_LEVEL_MAP[k]) for k, s in top_shapes.items()}
    for i in range(config["group_size"]):
        for k, s in layer_shapes.items():
            out[f"unique_layers.{i}.{k}"] = (s, f"transformer.layers.{i}.{_ATTENTION_MAP[k]}")
    return out


def convert_state_dict(
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    embedding_scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> StateDict:
    """Rename (and check) a training-code model state dict into ``MoEUTLM``'s.

    Args:
        state: ``checkpoint["model"]``.
        config: ``MoEUTLM``'s arguments (``training_args_to_config``).
        embedding_scale: the training model's input scale, folded into the embedding.
        dtype: cast the floating-point tensors to this dtype (default: keep theirs).

    Returns:
        ``MoEUTLM``'s state dict (``load_state_dict(..., strict=True)`` takes it).

    Raises:
        ValueError: unknown keys, missing keys (each named), a tensor of the wrong shape or not
            floating point (named with both shapes).
    """
    expected = _expected_shapes(config)
    unknown = [k for k in state if k not in expected and not k.endswith(_DROPPED_SUFFIXES)]
    if unknown:
        raise ValueError(
            f"unknown key(s) in the training checkpoint's model state: {unknown} (not part of "
            "the MoEUT the converter handles; see moeut.convert's mapping table)"
        )
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"missing key(s) in the training checkpoint's model state: {missing}")
    out: StateDict = {}
    for key, (shape, ours) in expected.items():
        t = state[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{key!r}: expected a floating-point tensor, got {got}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{key!r} (-> {ours!r}): expected shape {shape} for the configuration "
                f"{_short(config)}, got {tuple(t.shape)}"
            )
        t = t.detach()
        if key == "embedding.weight" and embedding_scale != 1.0:
            t = t * embedding_scale
        if dtype is not None:
            t = t.to(dtype)
        out[ours] = t.contiguous()
    return out


def _short(config: Mapping[str, Any]) -> str:
    keys = ("d_model", "n_heads", "d_head", "att_n_experts", "ff_n_experts", "ff_expert_size")
    return ", ".join(f"{k}={config[k]}" for k in keys)


def convert_training_checkpoint(
    src: str | os.PathLike | Mapping[str, Any],
    *,
    training_args: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[StateDict, dict[str, Any]]:
    """Convert a training-code checkpoint into ``MoEUTLM`` weights and arguments.

    Args:
        src: the checkpoint file, the loaded checkpoint dict (with ``"model"``), or a bare model
            state dict (then ``training_args`` must give at least
            ``transformer.encoder_n_layers``, ``pkm.n_heads`` and ``moe.att.k``).
        training_args: training arguments that replace or complete the checkpoint's
            (``{"pkm.n_heads": 12, ...}``, their names).
        trust_pickle: see ``load_training_checkpoint``.
        dtype: cast the weights (default: keep the checkpoint's dtype).

    Returns:
        ``(state_dict, config)``: ``MoEUTLM(**config).load_state_dict(state_dict)`` loads
        strictly and computes what the training code's model computes.

    Raises:
        ValueError: see ``training_args_to_config`` and ``convert_state_dict``.

    Example::

        state, config = convert_training_checkpoint("C4_44M.ckpt")
        model = to_moeut_lm(state, config)
    """
    if isinstance(src, Mapping):
        checkpoint = src
    else:
        checkpoint = load_training_checkpoint(src, trust_pickle=trust_pickle)
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        state = checkpoint["model"]
        invariants = checkpoint.get("run_invariants")
        args = invariants.get("args") if isinstance(invariants, Mapping) else None
    elif any(k.startswith("unique_layers.") for k in checkpoint):
        state, args = checkpoint, None
    else:
        raise ValueError(
            "not a training-code checkpoint: no 'model' entry and no 'unique_layers.*' keys "
            f"(top-level keys: {sorted(map(str, checkpoint))[:10]})"
        )
    if args is None and training_args is None:
        raise ValueError(
            "the checkpoint has no run_invariants['args']: pass training_args with at least "
            f"{list(_REQUIRED_ARGS)} (CLI: --arg NAME=VALUE)"
        )
    merged = {**(args or {}), **(training_args or {})}
    if args is None:
        missing = [n for n in _REQUIRED_ARGS if n not in merged]
        if missing:
            raise ValueError(f"training_args lacks {missing} (not recoverable from the weights)")
    config = training_args_to_config(merged, state)
    scale = _Args(merged, {}).as_opt_float("transformer.embedding_scale")
    return convert_state_dict(state, config, embedding_scale=scale or 1.0, dtype=dtype), config


def to_moeut_lm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> torch.nn.Module:
    """``MoEUTLM(**config)`` with ``state`` loaded strictly, in eval mode."""
    from .model import MoEUTLM

    model = MoEUTLM(**config)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ----- output -----

_CONFIG_KEY = "moeut_config"


def _output_format(dst: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    lower = dst.lower()
    if lower.endswith(".safetensors"):
        return "safetensors"
    if lower.endswith((".pt", ".pth", ".bin")):
        return "torch"
    return "hf"


def write_converted(
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    dst: str | os.PathLike,
    fmt: str = "auto",
) -> str:
    """Write converted weights; returns the format written.

    ``fmt``: ``"safetensors"`` (the state dict, the config as JSON in the metadata key
    ``"moeut_config"``; needs ``safetensors``), ``"torch"`` (``torch.save`` of ``{"state_dict",
    "config"}``, loadable with ``weights_only=True``), ``"hf"`` (a ``save_pretrained`` folder of
    ``moeut.hf.MoEUTForCausalLM``; needs ``moeut[hf]``), or ``"auto"``: by the suffix of ``dst``
    (``.safetensors``; ``.pt``/``.pth``/``.bin``; anything else is a folder).
    """
    dst = os.fspath(dst)
    fmt = _output_format(dst, fmt)
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as e:
            raise ImportError(
                "writing .safetensors needs the safetensors package (pip install 'moeut[hf]'); "
                "or write a .pt file"
            ) from e
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_file(tensors, dst, metadata={"format": "pt", _CONFIG_KEY: json.dumps(dict(config))})
    elif fmt == "torch":
        torch.save({"state_dict": dict(state), "config": dict(config)}, dst)
    elif fmt == "hf":
        try:
            from .hf import MoEUTConfig, MoEUTForCausalLM
        except ImportError as e:
            raise ImportError(
                "writing a Hugging Face folder needs transformers (pip install 'moeut[hf]'); "
                "or write a .safetensors / .pt file"
            ) from e
        kwargs = dict(config)
        hf_config = MoEUTConfig(vocab_size=kwargs.pop("n_tokens"), **kwargs)
        model = MoEUTForCausalLM(hf_config)
        model.model.load_state_dict(state, strict=True)
        model.save_pretrained(dst)
    else:
        raise ValueError(f"unknown output format {fmt!r} (auto, safetensors, torch, hf)")
    return fmt


def read_converted(path: str | os.PathLike) -> tuple[StateDict, dict[str, Any]]:
    """Read what ``write_converted`` wrote as ``.safetensors`` or ``.pt``: ``(state, config)``."""
    path = os.fspath(path)
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if _CONFIG_KEY not in meta:
                raise ValueError(f"{path} has no {_CONFIG_KEY!r} metadata (not from moeut.convert)")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
        return state, json.loads(meta[_CONFIG_KEY])
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, Mapping) or "state_dict" not in data or "config" not in data:
        raise ValueError(f"{path} is not a moeut.convert output (no 'state_dict' and 'config')")
    return dict(data["state_dict"]), dict(data["config"])


# ----- CLI -----


def _parse_cli_arg(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--arg takes NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    return name.strip(), value.strip()


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moeut.convert SRC DST``: convert a training-code checkpoint (see the module
    docstring). Prints one line describing what was written."""
    parser = argparse.ArgumentParser(
        prog="python -m moeut.convert",
        description="Convert a MoEUT training-code checkpoint (RobertCsordas/moeut_training_code) "
        "into moeut's MoEUTLM weights.",
    )
    parser.add_argument("src", help="the training checkpoint (model-<iter>.pth, *.ckpt)")
    parser.add_argument(
        "dst",
        help="output: *.safetensors (state dict + config metadata), *.pt/*.pth (torch.save), or "
        "a folder (Hugging Face save_pretrained; needs moeut[hf])",
    )
    parser.add_argument(
        "--format", default="auto", choices=("auto", "safetensors", "torch", "hf"),
        help="output format (default: from DST's suffix)",
    )  # fmt: skip
    parser.add_argument(
        "--arg", action="append", default=[], type=_parse_cli_arg, metavar="NAME=VALUE",
        help="training argument replacing or completing the checkpoint's (their names, e.g. "
        "pkm.n_heads=12); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="cast the weights (default: keep)"
    )
    parser.add_argument(
        "--trust-pickle", action="store_true",
        help="load files holding arbitrary Python objects with weights_only=False (runs code "
        "from the file: only for files you trust)",
    )  # fmt: skip
    ns = parser.parse_args(argv)
    try:
        state, config = convert_training_checkpoint(
            ns.src,
            training_args=dict(ns.arg) or None,
            trust_pickle=ns.trust_pickle,
            dtype=_DTYPES[ns.dtype] if ns.dtype else None,
        )
        fmt = write_converted(state, config, ns.dst, ns.format)
    except (ValueError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_params = sum(t.numel() for t in state.values())
    print(
        f"wrote {ns.dst} ({fmt}): MoEUTLM with {n_params:,} parameters, "
        + json.dumps(config, sort_keys=True)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
