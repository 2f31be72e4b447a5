"""moewm: watermark the text of Mixture-of-Experts language models with a key taken from their routing."""

from moewm.config import (
    EncoderConfig,
    ExtractorConfig,
    GenerationConfig,
    MemoryConfig,
    ModelConfig,
    WatermarkConfig,
)
from moewm.keys import WatermarkKey
from moewm.models import load_model
from moewm.watermark import DetectionResult, MoEDetectorOutput, MoELSHWatermark

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
    "load_model",
]
