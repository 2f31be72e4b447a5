"""The Hydra schema of ``python -m moewm``: one dataclass per config group, registered in the ConfigStore.

A misspelled key or a wrong type fails at start-up with Hydra's own message; :func:`validate_app`
adds the range and cross-field checks, all before any weights load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moewm.config import (
    AttackConfig,
    ConfigError,
    DataConfig,
    EncoderConfig,
    EvalConfig,
    ExtractorConfig,
    GenerationConfig,
    LoggerConfig,
    MemoryConfig,
    ModelConfig,
    WatermarkConfig,
)

MODES = ("run", "detect", "estimate")


@dataclass
class AppConfig:
    """Top level of the app; groups are filled from conf/<group>/*.yaml.

    The defaults live here and in the group dataclasses of :mod:`moewm.config`, once: ``conf/config.yaml``
    and the group options carry only what differs from them (``tests/test_defaults.py`` fails on a new
    difference that is not listed and justified there).
    """

    # run | detect (input=FILE) | estimate (memory estimator, no weights)
    mode: str = "run"
    # Selects the watermark key (hyperplanes and pools); sampling has its own generation.sampling_seed.
    seed: int = 0
    # Read from $MOEWM_SECRET_KEY by conf/config.yaml; never logged or written, only its fingerprint.
    secret_key: Optional[str] = None
    # mode=detect: a text file (one text per line) or JSONL with "text" and optional "prompt".
    input: Optional[str] = None
    # Reuse a loaded model across the jobs of an in-process multirun (same model and memory config).
    reuse_model: bool = True
    progress: bool = True
    tags: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    watermark: WatermarkConfig = field(default_factory=WatermarkConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


GROUPS: dict[str, Any] = {
    "model": ModelConfig,
    "memory": MemoryConfig,
    "extractor": ExtractorConfig,
    "encoder": EncoderConfig,
    "watermark": WatermarkConfig,
    "generation": GenerationConfig,
    "data": DataConfig,
    "logger": LoggerConfig,
    "attack": AttackConfig,
    "eval": EvalConfig,
}


def register() -> None:
    """Register the schema (conf/config.yaml names it first in its defaults) and the config resolvers."""
    cs = ConfigStore.instance()
    cs.store(name="moewm_schema", node=AppConfig)
    if not OmegaConf.has_resolver("moewm.add"):
        # Lets a preset tie keys together, e.g. end_layer_idx = start_layer_idx + 2 in a layer sweep.
        OmegaConf.register_new_resolver("moewm.add", lambda *xs: sum(int(x) for x in xs))
    if not OmegaConf.has_resolver("moewm.min"):
        OmegaConf.register_new_resolver("moewm.min", lambda *xs: min(int(x) for x in xs))


def to_app_config(cfg: DictConfig | AppConfig) -> AppConfig:
    """Typed dataclass view of a composed config (interpolations resolved)."""
    if isinstance(cfg, AppConfig):
        return cfg
    container = OmegaConf.to_container(cfg, resolve=True, structured_config_mode=None)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    merged = OmegaConf.merge(OmegaConf.structured(AppConfig), container)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def validate_app(app: AppConfig) -> None:
    """Every range and cross-field check that needs no weights."""
    if app.mode not in MODES:
        raise ConfigError(f"mode={app.mode!r}: allowed values are {MODES}")
    if app.seed < 0:
        raise ConfigError(f"seed={app.seed}: must be >= 0")
    from moewm.schemes.registry import check_watermark_config, scheme_class

    for name in GROUPS:
        getattr(app, name).validate()
    check_watermark_config(app.watermark, app.encoder)
    if app.eval.geometry and not scheme_class(app.watermark.kind).green_list_geometry:
        raise ConfigError(f"eval.geometry=true: the geometry metrics measure green lists of the encoder's pools, which "
                          f"watermark.kind={app.watermark.kind!r} does not use; allowed with watermark.kind='moe_lsh' (watermark=moe_lsh)")
    if app.eval.geometry and app.encoder.routing_free:
        raise ConfigError("eval.geometry=true with encoder.routing_free=true: the geometry metrics measure how the routing's "
                          "hyperplanes split the features, and the routing-free twin has none; allowed value is eval.geometry=false")
    from moewm.evaluation.oracle import check_oracle

    check_oracle(app.eval.oracle_model)
    if app.mode == "detect" and not app.input:
        raise ConfigError("input: mode=detect needs input=FILE (plain text, one text per line, or JSONL with a 'text' field)")
    warn_if_model_null_misfits(app)
    if scheme_class(app.watermark.kind).capture_runs_model or app.extractor.kind == "hidden":
        from moewm.models.architecture import check_model_extractor

        check_model_extractor(app.model, app.extractor)  # one meta-device model: layer range and k


def warn_if_model_null_misfits(app: AppConfig) -> bool:
    """Warn (and return True) when the legacy z rule (``watermark.z_threshold``) would judge text the model did not sample.

    The decision is the calibrated p-value, valid for text of any origin; only the legacy rule rests on the
    model null. ``null=model`` takes gamma_t from the model's own distribution, so it is exact only for text drawn
    from it at temperature 1. Greedy, low-temperature, top-k/top-p or repetition-penalised text is
    not: its tokens are likelier than their probability says, and when a key's pools hold likely tokens
    the unwatermarked z drifts above 0 (greedy tiny_moe text scored z = 3.7 with one key). The job's
    measured null (``null_ok``) shows how far; the warning says why before any weights load.
    """
    from moewm.schemes.registry import scheme_class

    if app.mode != "run" or not scheme_class(app.watermark.kind).capture_runs_model or app.watermark.null != "model" or app.watermark.z_threshold is None:
        return False
    if app.generation.samples_from_model:
        return False
    g = app.generation
    logging.getLogger(__name__).warning(
        "watermark.z_threshold (legacy rule) with watermark.null=model assumes unwatermarked text sampled from the model at temperature 1, but "
        "generation has do_sample=%s temperature=%s top_k=%s top_p=%s repetition_penalty=%s: the null z "
        "of the unwatermarked texts may be biased (check null_ok in metrics.json)",
        g.do_sample, g.temperature, g.top_k, g.top_p, g.repetition_penalty,
    )
    return True
