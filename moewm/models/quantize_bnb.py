"""bitsandbytes storage and matmuls for the quantized weights (``memory.backend=bitsandbytes``).

:mod:`moewm.models.quantize` decides *what* is quantized (experts included, routers never); this module
is the other way of storing and multiplying by a quantized matrix, through bitsandbytes' own kernels:

* ``nf4``: ``bitsandbytes.functional.quantize_4bit`` (NF4, blocks of 64, nested 8-bit absmax with
  ``double_quant``) per matrix, and ``bitsandbytes.matmul_4bit`` at each call (a fused 4-bit GEMV for
  one row on CUDA and on AVX512-BF16 CPUs; otherwise bitsandbytes' C++ dequantization, then a matmul).
* ``int8``: ``int8_vectorwise_quant`` (one absmax per output row, the LLM.int8 layout without outlier
  columns) and ``int8_scaled_mm`` at each call (the activations quantized per row too, as
  ``bnb.nn.Linear8bitLt(threshold=0)`` does).

A fused 3-D expert tensor is split per expert (one quantized matrix per expert, the only layout
bitsandbytes' matmuls take); every tensor bitsandbytes keeps, the packed weights and the quantization
statistics, is a registered buffer here, so ``model_nbytes`` counts it and ``.to(device)`` moves it.
Only the two shared code tables (16 NF4 values, 256 values of the nested absmax code) are not counted:
they are the same constants for every matrix. :func:`bnb_nbytes` gives the exact size from a shape.

bitsandbytes is an optional extra (``pip install moewm[bnb]``); nothing here imports it until a
bitsandbytes tensor is built or :func:`availability` is asked.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Optional, Sequence

import torch

from moewm.models.quantized_groups import QuantizedGroups, group_shape, quantize_device

log = logging.getLogger(__name__)

BLOCKSIZE = 64  # NF4 block (bitsandbytes' default for quantize_4bit and Linear4bit)
NESTED_BLOCKSIZE = 256  # blocks per float32 scale of the nested absmax (fixed by bitsandbytes)

_AVAILABILITY: dict[str, Optional[str]] = {}


def _bnb() -> Any:
    with warnings.catch_warnings():  # bitsandbytes warns that its optional CPU kernels package is missing
        warnings.simplefilter("ignore")
        import bitsandbytes

        return bitsandbytes


def availability(device: torch.device | str = "cpu") -> Optional[str]:
    """None when bitsandbytes is installed and multiplies correctly on ``device``'s type, else why not.

    "Works" is checked, not assumed: a 64 x 64 NF4 and int8 matmul against the float one (cached per
    device type; a few milliseconds).
    """
    kind = torch.device(device).type
    if kind in _AVAILABILITY:
        return _AVAILABILITY[kind]
    reason: Optional[str] = None
    try:
        _bnb()
    except Exception as err:  # ImportError, or a broken native library
        reason = f"bitsandbytes cannot be imported ({type(err).__name__}: {err})"
    else:
        try:
            gen = torch.Generator().manual_seed(0)
            w = torch.randn(64, 64, generator=gen)
            x = torch.randn(3, 64, generator=gen)
            want = x @ w.t()
            for scheme, tol in (("nf4", 0.2), ("int8", 0.05)):
                t = BnbTensor.from_weight(w, scheme, double_quant=True, device=torch.device(device))
                got = t.linear(x.to(device), 0, torch.float32).cpu()
                err = float((got - want).norm() / want.norm())
                if not err < tol:
                    reason = f"bitsandbytes' {scheme} matmul on {kind} is off by {err:.1%} (relative) on a test matrix"
                    break
        except Exception as err:
            reason = f"bitsandbytes failed on {kind} ({type(err).__name__}: {err})"
    _AVAILABILITY[kind] = reason
    return reason


def int8_kernel(device: torch.device | str = "cpu") -> bool:
    """Whether bitsandbytes multiplies int8 by int8 with a real kernel on ``device``: on CUDA, and on a CPU
    with AVX-512 (``torch._int_mm``, the condition bitsandbytes 0.50 itself uses); elsewhere it falls back
    to a float32 matmul of the int8 values."""
    if torch.device(device).type != "cpu":
        return True
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def bnb_nbytes(shape: Sequence[int], scheme: str, double_quant: bool = True, transposed: bool = False) -> int:
    """Bytes of the buffers that :class:`BnbTensor` keeps for a weight of ``shape`` (exact)."""
    groups, rows, cols = group_shape(shape)
    n = rows * cols
    if scheme == "int8":  # one float32 absmax per output row
        return groups * (n + 4 * (cols if transposed else rows))
    if scheme != "nf4":
        raise ValueError(f"scheme {scheme!r}: allowed values are int8, nf4")
    nblocks = math.ceil(n / BLOCKSIZE)
    stats = nblocks + 4 * math.ceil(nblocks / NESTED_BLOCKSIZE) + 4 if double_quant else 4 * nblocks
    return groups * ((n + 1) // 2 + stats)


class BnbTensor(QuantizedGroups):
    """Groups (experts) of (out, in) matrices in bitsandbytes' NF4 or int8 layout; ``linear(x, g)`` = x @ W_g^T.

    ``transposed``: the source tensor is (groups, in, out) and is used as ``x @ W`` (gpt-oss layout); it
    is stored as W^T so that bitsandbytes' ``x @ B^T`` matmuls apply unchanged.
    """

    repr_prefix = "bitsandbytes "

    def __init__(self, shape: Sequence[int], scheme: str, double_quant: bool, device: torch.device, transposed: bool = False) -> None:
        if scheme not in ("int8", "nf4"):
            raise ValueError(f"scheme {scheme!r}: allowed values are int8, nf4")
        super().__init__(shape, scheme, double_quant)
        self.transposed = bool(transposed)
        r, c = self.rows, self.cols
        self.out_features, self.in_features = (c, r) if self.transposed else (r, c)
        g, n = self.groups, r * c
        if scheme == "int8":
            self.register_buffer("qweight", torch.empty(g, self.out_features, self.in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(g, self.out_features, dtype=torch.float32, device=device))  # row absmax (SCB)
            return
        self.nblocks = math.ceil(n / BLOCKSIZE)
        self.register_buffer("qweight", torch.empty(g, (n + 1) // 2, dtype=torch.uint8, device=device))
        if self.double_quant:
            self.register_buffer("absmax_q", torch.empty(g, self.nblocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.empty(g, math.ceil(self.nblocks / NESTED_BLOCKSIZE), dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset", torch.empty(g, dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.empty(g, self.nblocks, dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, scheme: str, double_quant: bool = True, device: Optional[torch.device] = None,
                    transposed: bool = False) -> "BnbTensor":
        device = quantize_device(weight, device)
        q = cls(weight.shape, scheme, double_quant, device, transposed)
        F = _bnb().functional
        w3 = weight.reshape(q.groups, *q.shape[-2:])
        for g in range(q.groups):
            w = w3[g].to(device=device, dtype=torch.float32)
            w = (w.t() if q.transposed else w).contiguous()
            if scheme == "int8":
                cb, scb, _ = F.int8_vectorwise_quant(w)
                q.qweight[g] = cb
                q.scale[g] = scb
                continue
            packed, state = F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=q.double_quant, quant_type="nf4")
            q.qweight[g] = packed.view(-1)
            if q.double_quant:
                q.absmax_q[g] = state.absmax
                q.absmax_scale[g] = state.state2.absmax
                q.absmax_offset[g] = state.offset
            else:
                q.absmax[g] = state.absmax
        return q

    # -- using -----------------------------------------------------------------------------------
    def _state(self, g: int, dtype: torch.dtype) -> Any:
        """bitsandbytes' QuantState of group ``g``: views of the buffers (rebuilt when they move or change dtype)."""
        device = self.qweight.device
        key = (g, dtype, self.qweight.data_ptr())
        cache = self.__dict__.setdefault("_states", {})
        if key in cache:
            return cache[key]
        if len(cache) > 4 * self.groups:
            cache.clear()
        F = _bnb().functional
        code = _codes(device)
        shape = torch.Size((self.out_features, self.in_features))
        if self.double_quant:
            nested = F.QuantState(absmax=self.absmax_scale[g], code=code["nested"], blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
            state = F.QuantState(absmax=self.absmax_q[g], shape=shape, code=code["nf4"], blocksize=BLOCKSIZE, quant_type="nf4",
                                 dtype=dtype, offset=self.absmax_offset[g], state2=nested)
        else:
            state = F.QuantState(absmax=self.absmax[g], shape=shape, code=code["nf4"], blocksize=BLOCKSIZE, quant_type="nf4", dtype=dtype)
        cache[key] = state
        return state

    def linear(self, x: torch.Tensor, g: int, dtype: torch.dtype, transposed: bool = False, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x @ W_g^T + bias`` (``x @ W_g`` for a transposed source) in ``dtype`` through bitsandbytes' matmul."""
        if transposed != self.transposed:
            raise ValueError(f"BnbTensor built with transposed={self.transposed}, called with {transposed}")
        bnb = _bnb()
        x = x.to(dtype)
        if self.scheme == "int8":
            flat = x.reshape(-1, x.shape[-1])
            ca, sca, _ = bnb.functional.int8_vectorwise_quant(flat.to(torch.float16))
            y = torch.ops.bitsandbytes.int8_scaled_mm(ca, self.qweight[g], sca, self.scale[g], bias=bias, dtype=dtype)
            return y.reshape(*x.shape[:-1], self.out_features)
        return bnb.matmul_4bit(x, self.qweight[g].view(-1, 1).t(), quant_state=self._state(g, dtype), bias=bias)

    def dequantize(self, g: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Group ``g`` in the source orientation (tests and diagnostics)."""
        F = _bnb().functional
        if self.scheme == "int8":
            w = self.qweight[g].float() * (self.scale[g][:, None] / 127.0)
        else:
            w = F.dequantize_4bit(self.qweight[g].view(-1, 1), quant_state=self._state(g, torch.float32))
        return (w.t() if self.transposed else w).to(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", transposed" if self.transposed else "")


_CODES: dict[torch.device, dict[str, torch.Tensor]] = {}


def _codes(device: torch.device) -> dict[str, torch.Tensor]:
    """The shared code tables (NF4 values; the nested absmax's dynamic 8-bit map) on ``device``."""
    if device not in _CODES:
        F = _bnb().functional
        _CODES[device] = {"nf4": F.get_4bit_type("nf4", device=device), "nested": F.create_dynamic_map().to(device)}
    return _CODES[device]
