"""``watermark.kind`` -> the scheme's class: the one place that names the schemes.

A new scheme is one module under :mod:`moewm.schemes` (a :class:`~moewm.schemes.base.Watermarker`, usually a
:class:`~moewm.schemes.base.TextGeneration` subclass) and one line here. Entries are import paths, so checking a
kind (before any weights load) imports nothing heavy.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional

from torch import nn

from moewm.config import ConfigError, EncoderConfig, ExtractorConfig, WatermarkConfig
from moewm.engine.keys import WatermarkKey
from moewm.schemes.base import Watermarker

SCHEMES: dict[str, str] = {
    "moe_lsh": "moewm.schemes.moe_lsh:MoELSHWatermark",  # the routing-keyed watermark
    "kgw": "moewm.schemes.kgw:KGWWatermark",  # Kirchenbauer et al., transformers' WatermarkingConfig
    "synthid": "moewm.schemes.synthid:SynthIDWatermark",  # SynthID-Text, transformers' SynthIDTextWatermarkingConfig
    "moe_tournament": "moewm.schemes.moe_tournament:MoETournamentWatermark",  # SynthID's tournament keyed by routing
    "none": "moewm.schemes.none:NoWatermark",  # plain generation scored by MoE-LSH (a null control)
}


def scheme_kinds() -> tuple[str, ...]:
    return tuple(SCHEMES)


def scheme_class(kind: str) -> Any:
    """The class registered for ``kind``; a clear error naming the allowed kinds otherwise."""
    if kind not in SCHEMES:
        raise ConfigError(f"watermark.kind={kind!r}: allowed values are {scheme_kinds()}")
    module, _, name = SCHEMES[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def check_watermark_config(watermark: WatermarkConfig, encoder: Optional[EncoderConfig] = None) -> None:
    """What the chosen scheme needs of ``watermark.*`` beyond its own ``validate()`` (and, given ``encoder``, of the
    two together), before weights load."""
    scheme = scheme_class(watermark.kind)
    scheme.check_config(watermark)
    if encoder is not None:
        scheme.check_encoder(watermark, encoder)


def resolve_statistic(watermark: WatermarkConfig) -> WatermarkConfig:
    """``watermark`` with a null ``statistic`` replaced by the statistic of its scheme (``watermark.kind``): what a job
    records and what the scheme it builds scores (``WatermarkConfig()``: green; ``kind="moe_lsh"``: llr)."""
    return scheme_class(watermark.kind).resolve_statistic(watermark)


def build_watermarker(
    kind: str,
    model: nn.Module,
    tokenizer: Any,
    watermark_cfg: WatermarkConfig,
    key: WatermarkKey,
    *,
    extractor: Optional[ExtractorConfig] = None,
    encoder: Optional[EncoderConfig] = None,
    calibration: Any = None,
    cache_dir: Optional[str | Path] = "default",
    model_id: str = "",
) -> Watermarker:
    """The scheme registered as ``kind`` for one model and key. Every scheme accepts the same arguments
    (the n-gram schemes ignore extractor, encoder, calibration and caching), so a caller need not know which
    kind it builds."""
    return scheme_class(kind).build(model, tokenizer, watermark_cfg, key, extractor=extractor, encoder=encoder,
                                    calibration=calibration, cache_dir=cache_dir, model_id=model_id)
