"""What the run and detect modes share: the per-process model cache, prompt formatting, the configured scheme,
and where caches live. Both modes import it; it imports neither."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from moewm.app.schema import AppConfig
from moewm.engine.keys import WatermarkKey
from moewm.models.loading import load_model
from moewm.schemes.base import Watermarker
from moewm.schemes.registry import resolve_statistic


_MODELS: dict[str, tuple[Any, Any]] = {}
_UNAVAILABLE: dict[str, str] = {}  # model -> why its weights cannot be had (checked once per process)
PLAIN_GENERATIONS: dict[str, tuple[list[list[int]], list[list[int]], float]] = {}
LOAD_COUNT = {"loads": 0}


def cache_key(*parts: Any) -> str:
    return json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str)


def get_model(app: AppConfig) -> tuple[Any, Any]:
    """Load the model, or reuse it when an earlier job in this process loaded the same one."""
    key = cache_key(app.model, app.memory)
    if app.reuse_model and key in _MODELS:
        return _MODELS[key]
    _MODELS.clear()  # one model in memory at a time
    PLAIN_GENERATIONS.clear()
    model, tokenizer = load_model(app.model, app.memory)
    LOAD_COUNT["loads"] += 1
    if app.reuse_model:
        _MODELS[key] = (model, tokenizer)
    return model, tokenizer


def check_weights(app: AppConfig) -> None:
    """Raise :class:`WeightsUnavailableError` at once when the model's weights can be had neither locally nor from the hub.

    Checked once per process and model: the jobs of a sweep after the first fail without asking the hub again.
    """
    from moewm.models.architecture import WeightsUnavailableError, check_weights_reachable

    key = cache_key(app.model)
    if key in _UNAVAILABLE:
        raise WeightsUnavailableError(_UNAVAILABLE[key])
    if app.reuse_model and cache_key(app.model, app.memory) in _MODELS:
        return
    try:
        check_weights_reachable(app.model)
    except WeightsUnavailableError as err:
        _UNAVAILABLE[key] = str(err)
        raise


def run_settings(app: AppConfig, key: WatermarkKey) -> dict[str, Any]:
    """What a job's verdicts depend on besides the text (key, model, scheme and its design), as metrics.json records it:
    ``mode=detect`` on a run's samples compares them with the run's."""
    return {
        "key_fingerprint": key.fingerprint,
        "model": app.model.name,
        "watermark_kind": app.watermark.kind,
        "extractor_kind": app.extractor.kind,
        "encoder_kind": app.encoder.kind,
        "start_layer_idx": app.extractor.start_layer_idx,
        "end_layer_idx": app.extractor.end_layer_idx,
        "use_top_k": app.extractor.use_top_k,
        "k": app.extractor.k,
        "num_bits": app.encoder.num_bits,
        "pool_size": app.encoder.pool_size,
        "pools": app.encoder.pool_design,
        "green_lists": app.encoder.green_lists,
        "green_bits": app.encoder.green_bits,
        "vote_lists": app.encoder.vote_lists if app.encoder.green_lists == "vote" else 1,
        "context_tokens": app.encoder.context_tokens,
        "routing_free": app.encoder.routing_free,
        "margin_bits": app.watermark.margin_bits,
        "margin_scale": app.watermark.margin_scale,
        "delta": app.watermark.delta,
        "alpha": app.watermark.alpha,
        "statistic": resolve_statistic(app.watermark).statistic,  # null: the scheme's own, recorded by name
        "memory_profile": app.memory.name,
    }


def format_prompt(tokenizer: Any, prompt: str, chat: bool) -> str:
    """Chat checkpoints get their chat template around the prompt; base models the prompt itself."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt


def build_watermarker(app: AppConfig, model: Any, tokenizer: Any, key: WatermarkKey, calibration: Any) -> Watermarker:
    """The configured scheme (:mod:`moewm.schemes.registry`), with the app's caches for its reference keys."""
    from moewm.schemes.registry import build_watermarker as build

    return build(app.watermark.kind, model, tokenizer, app.watermark, key, extractor=app.extractor, encoder=app.encoder,
                 calibration=calibration, cache_dir=cache_root() / "reference_keys", model_id=cache_key(app.model, app.memory))


def cache_root() -> Path:
    """Caches shared by the jobs of every sweep: reference-key banks, calibration, null-text captures."""
    return Path(app_output_root()) / "cache"


def needs_calibration(app: AppConfig) -> bool:
    """A routing scheme needs feature statistics for a non-simhash encoder, or for the geometry metrics."""
    from moewm.schemes.registry import scheme_class

    return scheme_class(app.watermark.kind).capture_runs_model and (app.encoder.kind != "simhash" or app.eval.geometry)


def app_output_root() -> str:
    """Top-level outputs/ (runs, sweeps and caches live there)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(Path(HydraConfig.get().runtime.cwd) / "outputs")
    except Exception:  # outside a Hydra run (library use, tests)
        return "outputs"
