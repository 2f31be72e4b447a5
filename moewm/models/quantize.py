"""Weight quantization that reaches the experts: int8 (``memory=low``) and NF4 (``memory=ultra_low``).

In transformers 5 the experts of an MoE layer are one module holding fused 3-D parameters
(``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I) for Qwen2-MoE, Mixtral, OLMoE, GraniteMoE, ...).
bitsandbytes' ``load_in_4bit`` / ``load_in_8bit`` only replace ``nn.Linear`` layers, so those 3-D
parameters, which are ~90 % of an MoE checkpoint, stay in bf16. This module replaces

* each fused experts module by :class:`QuantizedExperts` (same ``forward(hidden_states, top_k_index,
  top_k_weights)`` signature, so the family's own MoE block calls it unchanged), which keeps every
  expert's weights in 8 or 4 bits and dequantizes only the experts that the router hit, one at a time;
* each other ``nn.Linear`` (attention, shared experts, dense MLPs) by :class:`QuantizedLinear`.

It is plain PyTorch, so the same code runs on the CPU and on CUDA. With ``memory.backend=bitsandbytes``
(the default where bitsandbytes is installed and works: ``auto``) the same modules hold
:class:`moewm.models.quantize_bnb.BnbTensor` instead of :class:`QuantizedTensor`, i.e. bitsandbytes'
storage and matmul kernels, experts split per expert; this module's own storage stays the fallback and
the reference. Never quantized: the router gates
(the watermark key is computed from them), the shared-expert gate, embeddings, the LM head and norms.
See docs/quantization.md for the formats, the measurements and why this path was chosen.

Formats (``nbytes`` below is exact; :func:`quantized_nbytes` gives it from a shape for the estimator):

* ``int8``: symmetric, one float32 scale per output row (absmax / 127): ``R*C + 4*R`` bytes per matrix.
* ``nf4``: the 4-bit NormalFloat code of QLoRA (16 quantiles of N(0, 1), computed below from that
  definition), blocks of 64 weights with one absmax each, two codes per byte. With double quantization
  the absmax values are stored as a uint8 exponent code (16 steps per octave) relative to one float32
  scale per 256 blocks (``C*R/2 + nblocks + 4*ceil(nblocks/256)`` bytes, about 4.13 bits per weight),
  without it as float32 (4.5 bits per weight).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from moewm.config import ConfigError, MemoryConfig
from moewm.models.footprint import model_nbytes
from moewm.models.quantize_bnb import BnbTensor, availability, bnb_nbytes, int8_kernel
from moewm.models.quantized_groups import QuantizedGroups, group_shape, quantize_device
from moewm.engine.routing import find_router_modules

log = logging.getLogger(__name__)

SCHEMES = ("int8", "nf4")
NF4_BLOCKSIZE = 64
DQ_GROUP = 256  # blocks per float32 scale of the double-quantized absmax values
# Double-quantized absmax: a uint8 exponent code, absmax = group max * 2 ** ((code - 255) / 16), i.e. 16
# steps per octave (at most 4.4 % above the true absmax) over 16 octaves below the group's largest block,
# so a block much smaller than its neighbours keeps its own scale instead of rounding to zero.
DQ_STEPS_PER_OCTAVE = 16
_CHUNK_ELEMENTS = 1 << 22  # work on at most ~4M weights at a time while (de)quantizing


def _nf4_code() -> torch.Tensor:
    """The 16 NF4 values: quantiles of N(0, 1) with an exact zero, scaled to [-1, 1] (QLoRA, Dettmers et al. 2023).

    8 positive values from the quantiles at ``linspace(offset, 0.5, 9)[:-1]`` and 7 negative ones from
    ``linspace(offset, 0.5, 8)[:-1]``, with ``offset = 0.9677083`` (the midpoint of the two largest
    quantiles' probabilities for 15 and 16 bins), so that the code is asymmetric but contains 0.
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    values = torch.sort(values / values.abs().max()).values
    return values.float()


NF4_CODE = _nf4_code()
_NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2


def _absmax_from_code(code: torch.Tensor, group_max: torch.Tensor) -> torch.Tensor:
    return group_max * torch.exp2((code - 255.0) / DQ_STEPS_PER_OCTAVE)


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"memory.quantization={scheme!r}: allowed values are none, {', '.join(SCHEMES)}")


def resolve_backend(memory: MemoryConfig, device: torch.device | str = "cpu") -> str:
    """``bitsandbytes`` or ``moewm``: ``memory.backend``, with ``auto`` decided by whether bitsandbytes works on ``device``.

    An explicit ``bitsandbytes`` that cannot run raises :class:`ConfigError` (before any weights load
    when called from :func:`check_backend`).
    """
    memory.validate()
    if memory.backend == "moewm":
        return "moewm"
    reason = availability(device)
    if memory.backend == "bitsandbytes" and reason is not None:
        raise ConfigError(
            f"memory.backend=bitsandbytes: {reason}; install it with `pip install moewm[bnb]` or set memory.backend=moewm "
            f"(allowed values: auto, bitsandbytes, moewm)"
        )
    if memory.backend == "auto" and reason is None and memory.quantization == "int8" and not int8_kernel(device):
        # auto: bitsandbytes' int8 without its kernel (a CPU without AVX-512) multiplies in float32 after
        # quantizing the activations too, 2.3x slower than the own int8 on the micro checkpoints (docs/quantization.md)
        return "moewm"
    return "bitsandbytes" if reason is None else "moewm"


def check_backend(memory: MemoryConfig, device: torch.device | str = "cpu") -> None:
    """The backend check of a quantized profile, before weights load (nothing to check without quantization)."""
    if memory.quantization != "none":
        resolve_backend(memory, device)


def quantized_nbytes(shape: Sequence[int], scheme: str, double_quant: bool = True, blocksize: int = NF4_BLOCKSIZE,
                     backend: str = "moewm", transposed: bool = False) -> int:
    """Bytes that :class:`QuantizedTensor` (``backend="moewm"``) or :class:`BnbTensor` (``"bitsandbytes"``) stores
    for a weight of ``shape`` (exact, for the estimator; ``transposed`` matters to bitsandbytes' int8 only)."""
    check_scheme(scheme)
    if backend == "bitsandbytes":
        return bnb_nbytes(shape, scheme, double_quant, transposed)
    groups, rows, cols = group_shape(shape)
    if scheme == "int8":
        return groups * rows * cols + groups * rows * 4
    nblocks = math.ceil(rows * cols / blocksize)
    scales = nblocks + 4 * math.ceil(nblocks / DQ_GROUP) if double_quant else 4 * nblocks
    return groups * (nblocks * blocksize // 2 + scales)


class QuantizedTensor(QuantizedGroups):
    """A 2-D or 3-D weight stored in int8 or NF4; ``dequantize(g)`` rebuilds group ``g`` (one expert)."""

    def __init__(self, shape: Sequence[int], scheme: str, double_quant: bool, device: torch.device, blocksize: int = NF4_BLOCKSIZE) -> None:
        check_scheme(scheme)
        super().__init__(shape, scheme, double_quant)
        self.blocksize = int(blocksize)
        g, r, c = self.groups, self.rows, self.cols
        if scheme == "int8":
            self.register_buffer("qweight", torch.empty(g, r, c, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(g, r, dtype=torch.float32, device=device))
        else:
            self.nblocks = math.ceil(r * c / self.blocksize)
            self.register_buffer("qweight", torch.empty(g, self.nblocks, self.blocksize // 2, dtype=torch.uint8, device=device))
            if self.double_quant:
                self.register_buffer("absmax_q", torch.empty(g, self.nblocks, dtype=torch.uint8, device=device))
                self.register_buffer(
                    "absmax_scale", torch.empty(g, math.ceil(self.nblocks / DQ_GROUP), dtype=torch.float32, device=device)
                )
            else:
                self.register_buffer("absmax", torch.empty(g, self.nblocks, dtype=torch.float32, device=device))

    # -- building --------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_weight(
        cls, weight: torch.Tensor, scheme: str, double_quant: bool = True, device: Optional[torch.device] = None
    ) -> "QuantizedTensor":
        """Quantize ``weight`` (any float dtype) chunk by chunk on ``device`` (default: the weight's device)."""
        device = quantize_device(weight, device)
        q = cls(weight.shape, scheme, double_quant, device)
        w3 = weight.reshape(q.groups, q.rows, q.cols)
        for g in range(q.groups):
            if scheme == "int8":
                q._quantize_int8(w3[g], g, device)
            else:
                q._quantize_nf4(w3[g].reshape(-1), g, device)
        return q

    def _quantize_int8(self, w: torch.Tensor, g: int, device: torch.device) -> None:
        step = max(1, _CHUNK_ELEMENTS // max(1, self.cols))
        for start in range(0, self.rows, step):
            rows = w[start : start + step].to(device=device, dtype=torch.float32)
            scale = (rows.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
            self.qweight[g, start : start + step] = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            self.scale[g, start : start + step] = scale

    def _quantize_nf4(self, flat: torch.Tensor, g: int, device: torch.device) -> None:
        bs = self.blocksize
        n = flat.numel()
        step = max(DQ_GROUP, (_CHUNK_ELEMENTS // bs) // DQ_GROUP * DQ_GROUP)  # blocks per chunk, whole DQ groups
        mid = _NF4_MIDPOINTS.to(device)
        for b0 in range(0, self.nblocks, step):
            b1 = min(self.nblocks, b0 + step)
            part = flat[b0 * bs : min(n, b1 * bs)].to(device=device, dtype=torch.float32)
            if part.numel() < (b1 - b0) * bs:  # the last block of a group is zero-padded
                part = F.pad(part, (0, (b1 - b0) * bs - part.numel()))
            blocks = part.view(b1 - b0, bs)
            absmax = blocks.abs().amax(dim=1)
            if self.double_quant:
                ngroups = math.ceil((b1 - b0) / DQ_GROUP)
                padded = F.pad(absmax, (0, ngroups * DQ_GROUP - absmax.numel()))
                gscale = padded.view(ngroups, DQ_GROUP).amax(dim=1).clamp_min(1e-12)
                per_block = gscale.repeat_interleave(DQ_GROUP)[: absmax.numel()]
                # ceil: the stored absmax is not below the true one (up to float rounding, which the
                # last code absorbs), so the weights stay inside the code's [-1, 1]
                ratio = (absmax / per_block).clamp_min(2.0**-20)
                aq = (torch.ceil(torch.log2(ratio) * DQ_STEPS_PER_OCTAVE) + 255).clamp_(1, 255)
                self.absmax_q[g, b0:b1] = aq.to(torch.uint8)
                self.absmax_scale[g, b0 // DQ_GROUP : b0 // DQ_GROUP + ngroups] = gscale
                absmax = _absmax_from_code(aq, per_block)  # normalise by exactly what dequantize multiplies by
            else:
                absmax = absmax.clamp_min(1e-12)
                self.absmax[g, b0:b1] = absmax
            codes = torch.bucketize(blocks / absmax[:, None], mid).to(torch.uint8)
            self.qweight[g, b0:b1] = codes[:, 0::2] | (codes[:, 1::2] << 4)

    # -- using -----------------------------------------------------------------------------------
    def _pair_table(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(256, 2): the two NF4 values (low nibble, high nibble) encoded by each byte."""
        key = (dtype, device)
        cache = self.__dict__.setdefault("_tables", {})
        if key not in cache:
            byte = torch.arange(256)
            cache[key] = torch.stack([NF4_CODE[byte & 15], NF4_CODE[byte >> 4]], dim=1).to(device=device, dtype=dtype)
        return cache[key]

    def _absmax(self, g: int) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax[g]
        per_block = self.absmax_scale[g].repeat_interleave(DQ_GROUP)[: self.nblocks]
        return _absmax_from_code(self.absmax_q[g].float(), per_block)

    def dequantize(self, g: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Group ``g`` (the weight itself for a 2-D tensor, expert ``g`` for a 3-D one) as (rows, cols)."""
        if self.scheme == "int8":
            return self.qweight[g].to(dtype) * self.scale[g].to(dtype)[:, None]
        device = self.qweight.device
        table = self._pair_table(dtype, device)
        out = torch.empty(self.nblocks, self.blocksize, dtype=dtype, device=device)
        absmax = self._absmax(g).to(dtype)
        step = max(1, _CHUNK_ELEMENTS // self.blocksize)
        for b0 in range(0, self.nblocks, step):
            packed = self.qweight[g, b0 : b0 + step]
            values = F.embedding(packed.to(torch.int32), table)  # (blocks, bs/2, 2): int32 indices, no int64 copy
            out[b0 : b0 + step] = values.view(packed.shape[0], self.blocksize) * absmax[b0 : b0 + step, None]
        return out.view(-1)[: self.rows * self.cols].view(self.rows, self.cols)

    def linear(self, x: torch.Tensor, g: int, dtype: torch.dtype, transposed: bool = False, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x @ W_g^T + bias`` (``x @ W_g`` for a transposed layout, no bias) in ``dtype``: dequantize group ``g``, then multiply."""
        weight = self.dequantize(g, dtype)
        x = x.to(dtype)
        return x @ weight if transposed else F.linear(x, weight, bias)


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with an int8 / NF4 weight, dequantized to ``compute_dtype`` at each call; bias kept as is."""

    def __init__(self, linear: nn.Linear, scheme: str, double_quant: bool, compute_dtype: torch.dtype, device: Optional[torch.device] = None,
                 backend: str = "moewm") -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.compute_dtype = compute_dtype
        self.qweight = _storage(backend).from_weight(linear.weight.data, scheme, double_quant, device)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.to(device or linear.bias.device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return self.qweight.linear(x, 0, dtype, bias=bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _storage(backend: str) -> type:
    if backend not in ("moewm", "bitsandbytes"):
        raise ValueError(f"backend {backend!r}: allowed values are moewm, bitsandbytes (resolve auto first)")
    return BnbTensor if backend == "bitsandbytes" else QuantizedTensor


def fused_experts_layout(module: nn.Module) -> Optional[tuple[str, str]]:
    """(up parameter name, down parameter name) when ``module`` holds fused 3-D expert weights."""
    down = module._parameters.get("down_proj") if hasattr(module, "_parameters") else None
    if not isinstance(down, torch.Tensor) or down.dim() != 3:
        return None
    for up_name in ("gate_up_proj", "up_proj"):
        up = module._parameters.get(up_name)
        if isinstance(up, torch.Tensor) and up.dim() == 3:
            return up_name, "down_proj"
    return None


class QuantizedExperts(nn.Module):
    """Drop-in for a transformers fused experts module (``@use_experts_implementation`` layout).

    Keeps ``gate_up_proj`` / ``down_proj`` as :class:`QuantizedTensor` (one group per expert) and, in
    ``forward``, dequantizes only the experts that ``top_k_index`` selects, one after the other, so the
    transient full-precision copy is one expert's weights. Biases (gpt-oss style) and post-expert norms
    are kept as they were; the gate activation is the original class's ``_apply_gate``.
    """

    def __init__(self, experts: nn.Module, scheme: str, double_quant: bool, compute_dtype: torch.dtype, device: Optional[torch.device] = None,
                 backend: str = "moewm") -> None:
        super().__init__()
        layout = fused_experts_layout(experts)
        if layout is None:
            raise TypeError(f"{type(experts).__name__} does not hold fused 3-D expert weights")
        up_name, down_name = layout
        self.original_class = type(experts).__name__
        self.num_experts = int(getattr(experts, "num_experts", getattr(experts, up_name).shape[0]))
        self.has_gate = bool(getattr(experts, "has_gate", up_name == "gate_up_proj"))
        self.is_transposed = bool(getattr(experts, "is_transposed", False))
        self.has_bias = bool(getattr(experts, "has_bias", False))
        self.has_post_expert_norm = bool(getattr(experts, "has_post_expert_norm", False))
        self.compute_dtype = compute_dtype
        self.up_name = up_name
        self.act_fn = getattr(experts, "act_fn", None)
        if self.act_fn is None and not (self.has_gate and hasattr(type(experts), "_apply_gate")):
            raise TypeError(f"{type(experts).__name__}: no act_fn and no _apply_gate; cannot rebuild its forward")
        # plain numbers the family's gate may read (e.g. gpt-oss' alpha and limit)
        for name, value in vars(experts).items():
            if not name.startswith("_") and isinstance(value, (int, float, bool)) and not hasattr(self, name):
                setattr(self, name, value)
        gate_fn: Optional[Callable[..., torch.Tensor]] = getattr(type(experts), "_apply_gate", None)
        self._gate_fn = gate_fn
        self.backend = backend
        if backend == "bitsandbytes":  # one matrix per expert, stored as x @ W^T wants it
            self.add_module(up_name, BnbTensor.from_weight(getattr(experts, up_name).data, scheme, double_quant, device, self.is_transposed))
            self.add_module(down_name, BnbTensor.from_weight(experts.down_proj.data, scheme, double_quant, device, self.is_transposed))
        else:
            self.add_module(up_name, QuantizedTensor.from_weight(getattr(experts, up_name).data, scheme, double_quant, device))
            self.add_module(down_name, QuantizedTensor.from_weight(experts.down_proj.data, scheme, double_quant, device))
        for bias_name in (f"{up_name}_bias", "down_proj_bias"):
            bias = getattr(experts, bias_name, None) if self.has_bias else None
            if isinstance(bias, torch.Tensor):
                self.register_parameter(bias_name, nn.Parameter(bias.data.to(device or bias.device), requires_grad=False))
        if self.has_post_expert_norm:
            self.post_expert_norm = experts.post_expert_norm.to(device) if device is not None else experts.post_expert_norm

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self._gate_fn is not None:
            return self._gate_fn(self, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def _project(self, x: torch.Tensor, name: str, expert: int, dtype: torch.dtype) -> torch.Tensor:
        y = getattr(self, name).linear(x, expert, dtype, self.is_transposed)
        bias = getattr(self, f"{name}_bias", None)
        return y if bias is None else y + bias[expert].to(dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        dtype = self.compute_dtype
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        for expert in hit:
            if expert < 0 or expert >= self.num_experts:  # sentinels (expert parallel / padding)
                continue
            token_idx, slot = torch.where(top_k_index == expert)
            x = hidden_states[token_idx].to(dtype)
            h = self._project(x, self.up_name, expert, dtype)
            h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
            y = self._project(h, "down_proj", expert, dtype)
            if self.has_post_expert_norm:
                y = self.post_expert_norm(y)
            y = y * top_k_weights[token_idx, slot, None].to(dtype)
            # index_put_ with accumulate is index_add_ without the OpenMP parallel region that makes the
            # latter cost milliseconds per call on a busy 2-core CPU (measured: ~6 ms vs ~5 us)
            out.index_put_((token_idx,), y.to(out.dtype), accumulate=True)
        return out

    def extra_repr(self) -> str:
        return f"{self.original_class}, num_experts={self.num_experts}, backend={self.backend}"


# -- which modules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanItem:
    name: str
    kind: str  # "experts" | "linear"
    shapes: tuple[tuple[int, ...], ...]


@dataclass
class QuantizationPlan:
    """What :func:`quantize_model` will do to a model (computable on the meta device)."""

    scheme: str
    double_quant: bool
    items: list[PlanItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module name, why it stays unquantized)

    def quantized_names(self) -> set[str]:
        return {item.name for item in self.items}


def is_gate_name(name: str) -> bool:
    """A module named like a router or gate layer: kept in the model dtype (and counted as router gates by the estimator)."""
    last = name.rsplit(".", 1)[-1]
    return last in ("gate", "router", "shared_expert_gate") or last.endswith("_gate")


def plan_quantization(model: nn.Module, memory: MemoryConfig) -> QuantizationPlan:
    """Decide, module by module, what the profile quantizes; routers, gates, embeddings, head and norms never."""
    check_scheme(memory.quantization)
    plan = QuantizationPlan(memory.quantization, bool(memory.double_quant))
    routers = {id(m) for m in find_router_modules(model)[0]}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, (QuantizedExperts, QuantizedLinear)):
            skip_prefixes.append(name + ".")
            continue
        if id(module) in routers:
            plan.skipped.append((name, "router gate: the watermark key is computed from it"))
            skip_prefixes.append(name + ".")
            continue
        layout = fused_experts_layout(module)
        if layout is not None:
            if memory.quantize_experts:
                shapes = tuple(tuple(module._parameters[n].shape) for n in layout)
                plan.items.append(PlanItem(name, "experts", shapes))
            else:
                plan.skipped.append((name, "experts: memory.quantize_experts=false"))
            skip_prefixes.append(name + ".")
            continue
        if isinstance(module, nn.Linear):
            if module is head:
                plan.skipped.append((name, "LM head: kept in the model dtype"))
            elif is_gate_name(name):
                plan.skipped.append((name, "gate layer: kept in the model dtype"))
            else:
                plan.items.append(PlanItem(name, "linear", (tuple(module.weight.shape),)))
    return plan


@dataclass
class QuantizationReport:
    scheme: str
    backend: str
    device: str
    quantized: dict[str, int]  # kind -> number of modules
    skipped: list[tuple[str, str]]
    bytes_before: int
    bytes_after: int

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.quantized.items()))
        return (
            f"{self.scheme} ({self.backend}) on {self.device}: quantized {kinds or 'nothing'}; kept {len(self.skipped)} modules unquantized "
            f"(routers, gates, LM head); weights {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB"
        )


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


@torch.no_grad()
def quantize_model(model: nn.Module, memory: MemoryConfig, device: Optional[torch.device | str] = None) -> QuantizationReport:
    """Replace the planned modules in place; the quantized storage is put on ``device`` (default: where the weights are)."""
    memory.validate()
    if memory.quantization == "none":
        raise ValueError("quantize_model: memory.quantization is 'none'; nothing to do")
    target = torch.device(device) if device is not None else None
    backend = resolve_backend(memory, target or next(model.parameters()).device)
    plan = plan_quantization(model, memory)
    before = model_nbytes(model)
    compute = _dtype(memory.compute_dtype)
    counts: dict[str, int] = {}
    for item in plan.items:
        parent_name, _, child = item.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if item.kind == "experts":
            new: nn.Module = QuantizedExperts(module, memory.quantization, memory.double_quant, compute, target, backend)
        else:
            new = QuantizedLinear(module, memory.quantization, memory.double_quant, compute, target, backend)
        setattr(parent, child, new)
        del module
        counts[item.kind] = counts.get(item.kind, 0) + 1
    report = QuantizationReport(
        memory.quantization,
        backend,
        str(target or next(model.parameters()).device),
        counts,
        plan.skipped,
        before,
        model_nbytes(model),
    )
    model.moewm_quantization = report  # type: ignore[attr-defined]
    log.info("quantization: %s", report.summary())
    return report


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (QuantizedExperts, QuantizedLinear, QuantizedTensor, BnbTensor))
