"""moewm: watermark the text of Mixture-of-Experts language models with a key taken from their routing."""

from moewm.config import (
    EncoderConfig,
    ExtractorConfig,
    GenerationConfig,
    MemoryConfig,
    ModelConfig,
    WatermarkConfig,
)
from moewm.engine.keys import WatermarkKey
from moewm.models.loading import load_model
from moewm.schemes.base import Watermarker
from moewm.schemes.moe_lsh import DetectionResult, MoEDetectorOutput, MoELSHWatermark
from moewm.schemes.registry import build_watermarker

__version__ = "0.1.0"

__all__ = [
    "DetectionResult",
    "EncoderConfig",
    "ExtractorConfig",
    "GenerationConfig",
    "MemoryConfig",
    "ModelConfig",
    "MoEDetectorOutput",
    "MoELSHWatermark",
    "WatermarkConfig",
    "WatermarkKey",
    "Watermarker",
    "build_watermarker",
    "load_model",
]
