"""MoEUT: a universal (shared-layer) transformer of sigma-MoE feedforward and SwitchHead blocks.

``group_size`` distinct layers are applied in order, and the group is repeated
``n_layers // group_size`` times. Layer norms sit only on the inputs of selections, queries and
keys ("peri-layernorm"): values and the residual stream are not normalised. In training, the
entropy of each MoE layer's average expert choice is regularised; the loss is returned with the
outputs.

``activation_checkpointing=True`` (or setting the attribute later) recomputes each layer
application in the backward pass instead of keeping its activations (``torch.utils.checkpoint``,
non-reentrant): a shared layer applied ``n_layers // group_size`` times is checkpointed once per
application. The regularisers and the layers' recorded selection logits see each application
once; the recomputation records nothing (see ``MoEUT.forward``).

The shared layers' expert-weight gradients are summed in cvmm-kernel's weight-gradient kernels
(``cvmm_kernel.accumulate_weight_grads``); setting ``MoEUT.deferred_weight_grads = True`` (an
attribute, off by default, not in the state dict) runs one weight-gradient GEMM per shared weight
over all its applications instead (its ``deferred`` mode: more memory held during the backward).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from cvmm_kernel import accumulate_weight_grads
from switchhead import AttentionMask, SwitchHeadCore, SwitchHeadRope, check_mask
from switchhead.shared_projection import share_input_projections

from .norm_cast import norm_and_cast
from .regularization import entropy_reg
from .sampling import sample_next_token
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
            d_model,
            n_experts=ff_n_experts,
            expert_size=ff_expert_size,
            k=ff_k,
            expert_dropout=ff_expert_dropout,
        )
        self.ln1 = torch.nn.LayerNorm(d_model)
        self.ln2 = torch.nn.LayerNorm(d_model)
        self.drop = torch.nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: AttentionMask | None = None, kv_cache: KVCache = None
    ) -> tuple[torch.Tensor, KVCache]:
        """``x [B, T, d_model]`` -> same shape, and the layer's KV cache."""
        # the residual and its norm, each in the autocast dtype where that applies (one kernel)
        x, values, normed = norm_and_cast(x, self.ln1)
        att, kv_cache = self.attention(normed, normed, values, mask, kv_cache=kv_cache)
        x, ffn_input, normed = norm_and_cast(x, self.ln2, delta=self.drop(att))
        return x + self.ffn(ffn_input, normed), kv_cache


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
        reg_process_group=None,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        # None: the per-sequence regulariser of the authors' released code. A process group:
        # usage averaged over the whole batch on all its ranks (see ``entropy_reg``).
        self.reg_process_group = reg_process_group
        # True: each layer application is recomputed in the backward pass (see ``forward``).
        self.activation_checkpointing = activation_checkpointing
        # True: one weight-gradient GEMM per shared expert weight over all its applications
        # (cvmm_kernel.accumulate_weight_grads(..., deferred=True); see the module docstring).
        self.deferred_weight_grads = False
        if group_size < 1 or n_layers % group_size:
            raise ValueError(
                f"n_layers ({n_layers}) must be a multiple of group_size ({group_size})"
            )
        self.entropy_reg = entropy_reg
        self.att_entropy_reg = att_entropy_reg
        self.n_repeats = n_layers // group_size
        # a ModuleList, typed by its items for the checker (ModuleList is not generic)
        self.layers: Sequence[MoEUTLayer] = torch.nn.ModuleList(  # type: ignore[assignment]
            MoEUTLayer(
                d_model,
                n_heads,
                ff_expert_size=ff_expert_size,
                ff_n_experts=ff_n_experts,
                att_n_experts=att_n_experts,
                d_head=d_head,
                att_k=att_k,
                ff_k=ff_k,
                ff_expert_dropout=ff_expert_dropout,
                att_expert_dropout=att_expert_dropout,
                dropout=dropout,
                attention=attention,
                attention_fn=attention_fn,
            )
            for _ in range(group_size)
        )
        for layer in self.layers:  # applied n_repeats times: see the modules' attribute
            layer.ffn.weight_grads_in_compute_dtype = self.n_repeats > 1
            layer.attention.weight_grads_in_compute_dtype = self.n_repeats > 1
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

    def _check_inputs(self, x, mask, kv_cache) -> None:
        """Shapes, dtypes and the mask, checked on the host before any layer runs (the caches'
        tensors are checked by each layer's attention)."""
        d_model = self.layers[0].attention.input_size
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != d_model:
            raise ValueError(f"x must be [B, T, d_model={d_model}], got {tuple(x.shape)}")
        weight = self.layers[0].ln1.weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device}, the model on {weight.device}")
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
        if not x.dtype.is_floating_point or (x.dtype != weight.dtype and not autocast):
            raise TypeError(
                f"x must be floating point, with the parameters' dtype {weight.dtype} outside "
                f"autocast, got {x.dtype}"
            )
        self._check_mask_and_cache(x.shape[0], x.shape[1], x.device, mask, kv_cache)

    def _check_mask_and_cache(self, batch, n_new, device, mask, kv_cache) -> None:
        if kv_cache is not None and not isinstance(kv_cache, dict):
            raise TypeError(f"kv_cache must be None, {{}} or a returned cache, got {kv_cache!r}")
        first = kv_cache.get(0) if kv_cache else None
        cached = first.get("k") if isinstance(first, dict) else None
        offset = cached.shape[-2] if isinstance(cached, torch.Tensor) and cached.dim() == 4 else 0
        n_heads = self.layers[0].attention.n_heads
        check_mask(mask, batch, n_new, offset + n_new, device, n_heads)

    def _expert_weights(self) -> list[torch.Tensor]:
        """The expert matrices of the shared layers (sigma-MoE's keys and values, SwitchHead's
        value and output experts), whose gradients the MoE kernels sum over the repeats."""
        weights: list[torch.Tensor] = []
        for layer in self.layers:
            weights += [layer.ffn.keys, layer.ffn.values]
            if layer.attention.n_experts > 1:
                weights += [layer.attention.v, layer.attention.o]
        return weights

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask | None = None,
        kv_cache: MultilayerKVCache = None,
    ) -> MoEUTOutput:
        """``x [B, T, d_model]``; ``kv_cache={}`` starts a multi-layer cache (keyed by absolute
        layer index).

        ``mask`` keeps the authors' (and SwitchHead's) meaning, since the stack may also be an
        encoder: ``None`` is causal, ``AttentionMask()`` none, and a padding or position mask
        alone is *not* causal; use ``AttentionMask(src_length_mask=pad, causal=True)`` for causal
        attention over a padded batch. ``MoEUTLM`` always adds the causal mask.

        With ``activation_checkpointing`` (and gradients enabled), every layer application runs
        under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: its activations
        are recomputed in the backward pass. The recomputation runs the layer's forward (and the
        forward hooks of it and its submodules) again with ``record_selection_logits`` off, so
        ``last_selection_logits`` is ``None`` there: the regularisers, and hooks that read the
        recorded logits (e.g. to count expert usage), see each application once. Outputs,
        ``reg_loss`` and gradients equal those without checkpointing (dropout included: the
        RNG state is restored for the recomputation).
        """
        self._check_inputs(x, mask, kv_cache)
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        regularise = self.training and (self.entropy_reg > 0 or self.att_entropy_reg > 0)
        for layer in self.layers:
            layer.ffn.record_selection_logits = regularise and self.entropy_reg > 0
            layer.attention.record_selection_logits = regularise and self.att_entropy_reg > 0
        ff_logits: list[list[torch.Tensor]] = [[] for _ in self.layers]
        att_logits: list[list[dict[str, torch.Tensor]]] = [[] for _ in self.layers]
        new_cache: dict[int, KVCache] = {}
        # the shared layers' expert weights: each use's gradient added in the kernels
        shared, attention = [], []
        if self.n_repeats > 1 and not checkpointing:
            shared = self._expert_weights()
            attention = [layer.attention for layer in self.layers]
        with (
            accumulate_weight_grads(shared, deferred=self.deferred_weight_grads),
            share_input_projections(attention),
        ):
            for r in range(self.n_repeats):
                for i, layer in enumerate(self.layers):
                    index = r * len(self.layers) + i
                    cache = kv_cache.get(index, {}) if kv_cache is not None else None
                    if checkpointing:
                        x, new_cache[index] = torch.utils.checkpoint.checkpoint(
                            layer,
                            x,
                            mask,
                            kv_cache=cache,
                            use_reentrant=False,
                            context_fn=functools.partial(_recomputation_contexts, layer),
                        )
                    else:
                        x, new_cache[index] = layer(x, mask, kv_cache=cache)
                    if layer.ffn.last_selection_logits is not None:
                        ff_logits[i].append(layer.ffn.last_selection_logits)
                    if layer.attention.last_selection_logits is not None:
                        att_logits[i].append(layer.attention.last_selection_logits)
        reg_loss = torch.zeros((), device=x.device, dtype=torch.float32)
        for ff, att, layer in zip(ff_logits, att_logits, self.layers):
            if ff:  # [B, T * repeats, E], averaged over tokens and repeats
                reg_loss = reg_loss + self.entropy_reg * entropy_reg(
                    torch.cat(ff, dim=-2), -2, self.reg_process_group
                )
            if att and layer.attention.n_experts > 1:
                for key in ("o", "v"):  # [B, T * repeats, H, E]
                    stacked = torch.cat([a[key] for a in att], dim=-3)
                    reg_loss = reg_loss + self.att_entropy_reg * entropy_reg(
                        stacked, -3, self.reg_process_group
                    )
        for layer in self.layers:  # keep no logits or choices after the forward
            layer.ffn.last_selection_logits = layer.attention.last_selection_logits = None
            layer.ffn.last_selection_index = layer.attention.last_selection_index = None
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
        reg_process_group=None,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.transformer = MoEUT(
            d_model,
            n_layers,
            n_heads,
            ff_expert_size=ff_expert_size,
            ff_n_experts=ff_n_experts,
            att_n_experts=att_n_experts,
            d_head=d_head,
            att_k=att_k,
            ff_k=ff_k,
            ff_expert_dropout=ff_expert_dropout,
            att_expert_dropout=att_expert_dropout,
            dropout=dropout,
            entropy_reg=entropy_reg,
            att_entropy_reg=att_entropy_reg,
            attention=attention,
            group_size=group_size,
            attention_fn=attention_fn,
            reg_process_group=reg_process_group,
            activation_checkpointing=activation_checkpointing,
        )
        self.n_layers = n_layers
        self.embedding = torch.nn.Embedding(n_tokens, d_model)
        self.lm_head = torch.nn.Linear(d_model, n_tokens)
        self.out_norm = torch.nn.LayerNorm(d_model)
        self.reset_parameters()

    @property
    def reg_process_group(self):
        """The process group the regularisers average expert usage over (``MoEUT``'s)."""
        return self.transformer.reg_process_group

    @reg_process_group.setter
    def reg_process_group(self, group) -> None:
        self.transformer.reg_process_group = group

    @property
    def activation_checkpointing(self) -> bool:
        """Whether each layer application is recomputed in the backward pass instead of keeping
        its activations (``MoEUT``'s; see ``MoEUT.forward``). Changes no parameter or buffer:
        the state dict is the same either way."""
        return self.transformer.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        self.transformer.activation_checkpointing = bool(enabled)

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
        """``x [B, T]`` token ids -> logits ``[B, T, n_tokens]`` in ``outputs``.

        Always causal: ``mask`` may add padding (``src_length_mask [B, Tk]``) or position masks
        (see ``switchhead.AttentionMask``; ``Tk`` includes the KV cache), and is combined with the
        causal mask. (The authors' code, like ``MoEUT``, drops causality when given a mask.)

        Raises:
            TypeError, ValueError, IndexError: token ids that are not integers in
            ``[0, n_tokens)`` of shape ``[B, T]``, or a mask that is not an ``AttentionMask``,
            before any computation.
        """
        self._check_tokens(x)
        if mask is not None:
            if not isinstance(mask, AttentionMask):
                raise TypeError(f"mask must be an AttentionMask or None, got {type(mask).__name__}")
            mask = AttentionMask(mask.position_mask, mask.src_length_mask, causal=True)
        self.transformer._check_mask_and_cache(x.shape[0], x.shape[1], x.device, mask, kv_cache)
        out = self.transformer(self.embedding(x), mask, kv_cache)
        out.outputs = self.lm_head(self.out_norm(out.outputs))
        return out

    def _check_tokens(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"token ids must be a tensor, got {type(x).__name__}")
        if x.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"MoEUTLM expects integer token ids (int32/int64), got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"token ids must be [B, T], got shape {tuple(x.shape)}")
        if x.device != self.embedding.weight.device:
            raise ValueError(
                f"token ids are on {x.device}, the model on {self.embedding.weight.device}"
            )
        if x.numel() == 0 or not _can_read_back(x):
            return
        lo, hi = torch.stack([x.min(), x.max()]).tolist()  # one synchronisation
        n_tokens = self.embedding.num_embeddings
        if lo < 0 or hi >= n_tokens:
            raise IndexError(f"token ids must be in [0, {n_tokens}), got values in [{lo}, {hi}]")

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

        ``temperature=0`` picks the most likely token; ``top_k`` (``>= 1``) samples among the
        ``top_k`` most likely ones. Returns ``[B, T + max_new_tokens]`` (a copy of the prompt for
        ``max_new_tokens=0``).

        Raises:
            ValueError: negative ``max_new_tokens``, a negative or non-finite ``temperature``,
                ``top_k < 1``, an empty prompt; TypeError, IndexError: as ``forward``.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        self._check_tokens(prompt)
        if prompt.shape[1] == 0:
            raise ValueError(f"prompt must be [B, T] with T >= 1, got {tuple(prompt.shape)}")
        if max_new_tokens == 0:
            return prompt.clone()
        was_training = self.training
        self.eval()
        try:
            out = self(prompt, kv_cache={})
            tokens = [prompt]
            for step in range(max_new_tokens):
                logits = out.outputs[:, -1].float()
                nxt = sample_next_token(logits, temperature, top_k, generator)
                tokens.append(nxt)
                if step + 1 < max_new_tokens:
                    out = self(nxt, kv_cache=out.cache)
            return torch.cat(tokens, dim=1)
        finally:
            self.train(was_training)


def _recomputation_contexts(
    layer: MoEUTLayer,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` of the layer checkpoints: the first forward as usual; the recomputation
    in the backward pass records no selection logits."""
    return contextlib.nullcontext(), _not_recording(layer)


@contextlib.contextmanager
def _not_recording(layer: MoEUTLayer) -> Iterator[None]:
    """``record_selection_logits`` and ``record_selection_index`` off for the layer's MoE
    modules, restored afterwards."""
    modules: tuple[SigmaMoE | SwitchHeadCore, ...] = (layer.ffn, layer.attention)
    saved = [(m.record_selection_logits, m.record_selection_index) for m in modules]
    for m in modules:
        m.record_selection_logits = m.record_selection_index = False
    try:
        yield
    finally:
        for m, (logits, index) in zip(modules, saved):
            m.record_selection_logits, m.record_selection_index = logits, index


def _can_read_back(t: torch.Tensor) -> bool:
    """Whether values of ``t`` may be read on the host (not while compiling or capturing a CUDA
    graph, not on the meta device)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
