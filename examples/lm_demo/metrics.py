"""Training metrics of the demo: expert usage reported by the MoE layers, FLOPs and MFU, and the
loggers (``metrics.jsonl`` in the run folder, TensorBoard with ``--log-dir``).

Expert usage comes from the selection logits the layers already record during the training
forward (``record_selection_logits`` / ``last_selection_logits`` of ``moeut.SigmaMoE`` and
``switchhead``'s attention, set by the models for their entropy regulariser). A forward hook on
each MoE layer reads them right after the layer ran (before the model clears them) and counts
the top-k experts of every token: no second routing pass, no extra matmul, counts stay on the
device (one host transfer per logging window). Nothing is counted in eval mode or with the
entropy regulariser off, since the layers then record nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

# Peak dense (no sparsity) bf16 tensor-core throughput per GPU, TFLOP/s, from NVIDIA's data
# sheets. Matched in order against ``torch.cuda.get_device_name()`` (first substring wins, so the
# more specific names come first). ``--peak-tflops`` overrides it (and is needed for other GPUs
# and on CPU).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM / HBM3
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


def peak_tflops_of(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU named ``device_name`` from :data:`PEAK_BF16_TFLOPS`, or
    ``None`` for a GPU not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def device_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one ``device``: ``override_tflops`` if given, else the table's value for a
    known CUDA GPU; ``None`` (MFU not reported) on CPU or an unknown GPU without the override."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = peak_tflops_of(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def _is_moe(module: torch.nn.Module) -> str | None:
    """``"ffn"`` for a sigma-MoE, ``"attention"`` for SwitchHead attention with experts."""
    from moeut import SigmaMoE
    from switchhead.attention import SwitchHeadCore

    if isinstance(module, SigmaMoE):
        return "ffn"
    if isinstance(module, SwitchHeadCore) and module.n_experts > 1:
        return "attention"
    return None


def _repeats(model: torch.nn.Module, name: str) -> int:
    """How many times the forward applies the module ``name`` (MoEUT shares its layers)."""
    stack = getattr(model, "transformer", None)
    if name.startswith("transformer.") and stack is not None:
        return int(getattr(stack, "n_repeats", 1))
    return 1


def active_params_per_token(model: torch.nn.Module) -> int:
    """Parameters that multiply each token's activations once in a forward pass, counted per
    application: shared layers (MoEUT) as often as they are applied, of the MoE layers only the
    ``k`` experts a token uses (plus the selection matrices, which score all experts).

    Counts weight matrices (parameters of 2 or more dimensions, the LM head included); the
    embedding (a lookup) and vectors (norms, biases: no matmul) are left out.
    """
    total = 0.0
    inside_moe: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_moe):
            continue
        kind = _is_moe(module)
        if kind == "ffn":
            inside_moe.add(name)
            share = module.n_heads / module.n_experts  # k of E experts
            count = module.expert_sel.numel() + share * (
                module.keys.numel() + module.values.numel()
            )
        elif kind == "attention":
            inside_moe.add(name)
            share = module.moe_k / module.n_experts  # moe_k of E experts per head
            count = (
                module.q.weight.numel()
                + module.k.weight.numel()
                + module.sel_v.numel()
                + module.sel_o.numel()
                + share * (module.v.numel() + module.o.numel())
            )
        elif isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            continue
        else:
            count = sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2)
        total += count * _repeats(model, name)
    return round(total)


def flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token, ``6 * active_params_per_token`` (2 for the forward matmuls, 4 for
    the backward's). The attention scores (about ``12 * layers * n_heads * d_head * seq_len``
    per token) are left out, so the MFU is a slight underestimate at long contexts."""
    return 6.0 * active_params_per_token(model)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of ``devices`` devices."""
    return tokens_per_s * flops_per_token / (peak_flops * devices)


def usage_metrics(counts: torch.Tensor) -> dict[str, float]:
    """Of selection counts per expert ``[E]``: ``entropy`` of the usage distribution (nats,
    in ``[0, log E]``; ``log E`` is uniform use), ``max_entropy`` (``log E``), ``dead`` (experts
    never selected, in ``[0, E]``) and ``n_experts``."""
    counts = counts.detach().double().cpu()
    total = counts.sum()
    p = counts / total if total > 0 else torch.full_like(counts, 1 / counts.numel())
    entropy = float(-(p * p.clamp_min(1e-300).log()).sum())
    n = counts.numel()
    return {
        "entropy": min(max(entropy, 0.0), math.log(n)),
        "max_entropy": math.log(n),
        "dead": int((counts == 0).sum()) if total > 0 else 0,
        "n_experts": n,
    }


@dataclass
class LayerUsage:
    """Selection counts of one MoE selection (a feedforward, or an attention's V or O experts)
    over a window of training steps."""

    name: str  # e.g. "layer 0 attention O"
    kind: str  # "feedforward", "attention V" or "attention O"
    counts: torch.Tensor  # [groups * experts] (attention: heads * experts, head-major)
    groups: int  # heads of an attention (each with its own experts), 1 for a feedforward
    k: int  # experts chosen per token (per head)
    applications: float  # times the layer is applied per forward (shared layers: > 1)

    @property
    def key(self) -> str:
        return self.name.replace(" ", "_")


class ExpertUsage:
    """Counts, per MoE layer of ``model``, which experts the training forwards selected.

    Hooks every ``SigmaMoE`` and every SwitchHead attention with more than one expert and turns
    on their ``record_selection_index``: each hook counts the experts the layer itself chose in
    that call (training forwards, after expert dropout; no second routing). :meth:`take` returns
    the counts since the last call and starts a new window. :meth:`close` removes the hooks and
    turns the recording off again.
    """

    def __init__(self, model: torch.nn.Module):
        self._layers: dict[str, tuple[str, str, torch.nn.Module]] = {}  # name: label, kind
        self._counts: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._forwards = 0
        self._hooks = []
        for name, module in model.named_modules():
            kind = _is_moe(module)
            if kind is None:
                continue
            self._layers[name] = (self._label(name), kind, module)
            module.record_selection_index = True
            self._hooks.append(module.register_forward_hook(self._hook(name)))
        self._hooks.append(model.register_forward_hook(self._count_forward))

    @staticmethod
    def _label(name: str) -> str:
        parts = name.split(".")
        index = next((p for p in parts if p.isdigit()), "?")
        return f"layer {index}"

    def _count_forward(self, module, inputs, output) -> None:
        if module.training:
            self._forwards += 1

    def _add(self, key: str, index: torch.Tensor, size: int) -> None:
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = torch.zeros(size, device=index.device, dtype=torch.int64)
        flat = index.reshape(-1)
        counts.index_add_(0, flat, torch.ones_like(flat))  # no host sync (unlike bincount)

    # Under torch.compile the counting runs eagerly (a graph break at each MoE layer).
    @torch.compiler.disable
    @torch.no_grad()
    def _hook_body(self, name: str, module) -> None:
        chosen = module.last_selection_index
        if chosen is None:  # eval mode: the layer recorded nothing
            return
        label, kind, _ = self._layers[name]
        self._calls[name] = self._calls.get(name, 0) + 1
        if kind == "ffn":  # [..., k] expert numbers
            self._add(f"{label} feedforward", chosen, module.n_experts)
            return
        for key in ("v", "o"):  # [..., H, k] numbers head * E + expert
            if key in chosen:
                self._add(
                    f"{label} attention {key.upper()}",
                    chosen[key],
                    module.n_heads * module.n_experts,
                )

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self._hook_body(name, module)

        return hook

    def take(self) -> list[LayerUsage]:
        """The counts of the window that ends now (one host transfer), and a new window."""
        out = []
        forwards = max(self._forwards, 1)
        for name, (label, kind, module) in self._layers.items():
            keys = ["feedforward"] if kind == "ffn" else ["attention V", "attention O"]
            for sub in keys:
                counts = self._counts.get(f"{label} {sub}")
                if counts is None:
                    continue
                attention = kind == "attention"
                out.append(
                    LayerUsage(
                        name=f"{label} {sub}",
                        kind=sub,
                        counts=counts.cpu(),
                        groups=module.n_heads if attention else 1,
                        k=module.moe_k if attention else module.n_heads,
                        applications=self._calls.get(name, 0) / forwards,
                    )
                )
        self._counts.clear()
        self._calls.clear()
        self._forwards = 0
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for _, _, module in self._layers.values():
            module.record_selection_index = False


def expert_metrics(usage: list[LayerUsage]) -> dict[str, dict[str, float]]:
    """:func:`usage_metrics` of every MoE selection, keyed by its name (``layer_0_feedforward``)."""
    return {u.key: usage_metrics(u.counts) for u in usage}


class MetricsLogger:
    """Appends one JSON line per logging step to ``metrics.jsonl`` in the run folder and, with a
    ``log_dir``, writes the same scalars to TensorBoard (``torch.utils.tensorboard``)."""

    def __init__(self, run_folder: Path, log_dir: str | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_folder) / "metrics.jsonl"
        self.writer = None
        if enabled and log_dir is not None:
            SummaryWriter = tensorboard_writer_class()
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """TensorBoard scalars (``None`` values are skipped)."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def record(self, step: int, record: dict) -> None:
        """One line of ``metrics.jsonl`` and its numbers in TensorBoard (``experts/<layer>/…``)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        flat = {}
        for layer, values in record.get("experts", {}).items():
            flat[f"experts/{layer}/entropy"] = values["entropy"]
            flat[f"experts/{layer}/dead"] = values["dead"]
        flat["loss/validation"] = record.get("validation_loss")
        self.scalars(step, flat)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; ImportError naming the missing package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "--log-dir needs the tensorboard package, which is not installed "
            "(install it with `uv pip install tensorboard` or `pip install tensorboard`)"
        ) from e
    return SummaryWriter
