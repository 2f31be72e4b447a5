"""The null control ``none``: plain generation, scored by the MoE-LSH detector of the same key and configuration."""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import torch

from moewm.config import WatermarkConfig
from moewm.engine.detection import DetectorOutput
from moewm.engine.keys import WatermarkKey
from moewm.engine.positions import PositionContexts
from moewm.schemes.base import TextGeneration
from moewm.schemes.moe_lsh import MoELSHWatermark


class NoWatermark(TextGeneration):
    """Null control: plain generation, scored by the MoE-LSH detector of the same key and configuration."""

    name = "none"
    generation_label = "plain"
    default_statistic: ClassVar[Optional[str]] = MoELSHWatermark.default_statistic  # scored by MoE-LSH's detector

    capture_runs_model: ClassVar[bool] = True

    @classmethod
    def build(cls, model: torch.nn.Module, tokenizer: Any, watermark: WatermarkConfig, key: WatermarkKey, **settings: Any) -> "NoWatermark":
        """The MoE-LSH detector of the same settings around plain generation."""
        return cls(MoELSHWatermark.build(model, tokenizer, watermark, key, **settings))

    @classmethod
    def check_config(cls, watermark: WatermarkConfig) -> None:
        watermark.check_calibrated_alpha()

    def __init__(self, inner: MoELSHWatermark) -> None:
        self.inner = inner

    @property
    def key(self) -> WatermarkKey:
        return self.inner.key

    @property
    def watermark_cfg(self) -> WatermarkConfig:
        return self.inner.watermark_cfg

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    @property
    def model(self) -> torch.nn.Module:
        return self.inner.model

    def encode_prompt(self, prompt: Optional[str]) -> list[int]:
        return self.inner.encode_prompt(prompt)

    def watermark_generate_kwargs(self) -> dict[str, Any]:
        """Nothing: generation is always unwatermarked (``watermark=True`` is accepted and changes nothing)."""
        return {}

    def capture(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None, progress: bool = False) -> Any:
        return self.inner.capture(text_ids, prompt_ids, progress=progress)

    def score(self, captures: Any, prefixes: bool = False, progress: bool = False, window: Optional[int] = None) -> DetectorOutput:
        return self.inner.score(captures, prefixes=prefixes, progress=progress, window=window)

    def detect_ids(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None,
                   progress: bool = False, prefixes: bool = False, window: Optional[int] = None) -> DetectorOutput:
        return self.inner.detect_ids(text_ids, prompt_ids, progress=progress, prefixes=prefixes, window=window)

    def position_contexts(self, captures: Sequence[Any]) -> list[PositionContexts]:
        return self.inner.position_contexts(captures)

    def null_description(self) -> dict[str, Any]:
        return self.inner.null_description()

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> "NoWatermark":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


