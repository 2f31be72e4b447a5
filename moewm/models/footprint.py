"""What a model weighs: the measured bytes of its tensors and the dtype its weights load in.

The bottom of the model-loading layers: :mod:`moewm.models.quantize` reports bytes before and after,
:mod:`moewm.models.architecture` builds meta models in the load dtype, :mod:`moewm.models.loading` decides where
random weights fit, and :mod:`moewm.models.memory` estimates from the same numbers, so every one of them
counts and types weights the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moewm.config import ModelConfig


def model_nbytes(model: nn.Module) -> int:
    """Measured footprint: bytes of all parameters and buffers (tied weights counted once)."""
    return sum(t.numel() * t.element_size() for t in model.parameters()) + sum(
        t.numel() * t.element_size() for t in model.buffers()
    )


def weights_dtype(cfg: ModelConfig, config: Any) -> torch.dtype:
    """The dtype the weights load in: ``model.dtype``, or with ``auto`` the checkpoint's own (float32 if it names none)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = getattr(torch, found, None)
    return found if isinstance(found, torch.dtype) else torch.float32
