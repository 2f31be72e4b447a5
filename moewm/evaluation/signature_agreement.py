"""How much a change of weights (e.g. bf16 -> NF4) moves the watermark key: LSH signatures of two models compared.

An evaluation of quantization, not part of it: it builds a watermarker on each model, so it lives above
:mod:`moewm.schemes.moe_lsh`, and :mod:`moewm.models.quantize` stays free of the watermark (docs/quantization.md
reports its numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from moewm.schemes.moe_lsh import MoELSHWatermark


@dataclass
class SignatureAgreement:
    """How the LSH signatures of two models (e.g. bf16 and NF4) differ on the same texts."""

    bit_flip_rate: float  # fraction of (position, bit) pairs that differ
    signature_change_rate: float  # fraction of positions whose signature differs in at least one bit
    positions: int
    num_bits: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def signature_flip_rate(
    model_a: nn.Module,
    model_b: nn.Module,
    tokenizer: Any,
    texts: Sequence[str] | Sequence[Sequence[int]],
    extractor: Any,
    encoder: Any,
    key: Any,
    batch_size: int = 8,
) -> SignatureAgreement:
    """Signatures of both models on the same token sequences under one key, compared position by position.

    ``texts`` are strings (tokenized with ``tokenizer``) or token id lists used as they are.
    """
    if not texts:
        raise ValueError("texts: need at least one text to compare signatures")
    rows = [list(t) if not isinstance(t, str) else list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
    wa = MoELSHWatermark(model_a, tokenizer, extractor, encoder, key=key)
    wb = MoELSHWatermark(model_b, tokenizer, extractor, encoder, key=key)
    try:
        if not torch.equal(wa.encoder.projection.cpu(), wb.encoder.projection.cpu()):
            raise ValueError("the two models give different feature dimensions or keys; signatures are not comparable")
        flips = changed = positions = 0
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            empty = [[] for _ in chunk]
            for ca, cb in zip(wa.capture(chunk, empty), wb.capture(chunk, empty)):  # the same scored positions
                diff = wa.encoder.signature(ca.features.to(wa.encoder.device)) != wb.encoder.signature(cb.features.to(wb.encoder.device))
                flips += int(diff.sum())
                changed += int(diff.any(-1).sum())
                positions += ca.num_scored
    finally:
        wa.close()
        wb.close()
    if positions == 0:
        raise ValueError("texts: too short to score any position")
    nb = wa.encoder.num_bits
    return SignatureAgreement(flips / (positions * nb), changed / positions, positions, nb)
