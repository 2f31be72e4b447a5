"""What both stores of quantized weights share: :class:`moewm.models.quantize.QuantizedTensor` (the own module)
and :class:`moewm.models.quantize_bnb.BnbTensor` (bitsandbytes' layout and kernels).

Each holds a 2-D weight, or a fused 3-D stack of expert weights, as ``groups`` matrices (one per expert) in
int8 or NF4; a store provides ``dequantize(g, dtype)`` and ``linear(x, g, dtype, ...)`` in its own way, and
this base gives both the same shape bookkeeping, size, whole-tensor dequantization and printed form.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


def group_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """(groups, rows, cols): a 2-D weight is one group, a 3-D expert tensor has one group per expert."""
    if len(shape) == 2:
        return 1, int(shape[0]), int(shape[1])
    if len(shape) == 3:
        return int(shape[0]), int(shape[1]), int(shape[2])
    raise ValueError(f"can only quantize 2-D or 3-D weights, got shape {tuple(shape)}")


def quantize_device(weight: torch.Tensor, device: Optional[torch.device | str]) -> torch.device:
    """Where a weight is quantized: ``device``, or the weight's own; a weight on the meta device has no values to quantize."""
    if weight.device.type == "meta":
        raise ValueError("cannot quantize a weight on the meta device (load or initialise the weights first)")
    return torch.device(device) if device is not None else weight.device


class QuantizedGroups(nn.Module):
    """Base of the quantized weight stores: the weight's ``shape``, its ``groups`` of (``rows``, ``cols``) source
    matrices, ``scheme`` (int8 / nf4) and ``double_quant`` (NF4 only). Every stored tensor is a registered buffer,
    so :meth:`nbytes` is exact and ``.to(device)`` moves it."""

    repr_prefix = ""  # names the store in the printed module

    def __init__(self, shape: Sequence[int], scheme: str, double_quant: bool) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.scheme = scheme
        self.double_quant = bool(double_quant) and scheme == "nf4"
        self.groups, self.rows, self.cols = group_shape(shape)

    def dequantize(self, g: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def full(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole dequantized tensor in its original shape (tests and diagnostics; allocates it all)."""
        return torch.stack([self.dequantize(g, dtype) for g in range(self.groups)]).view(self.shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return f"{self.repr_prefix}{self.scheme}, shape={self.shape}{dq}"
