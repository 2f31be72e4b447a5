"""Calibration statistics of the extractor's feature vectors, computed once per (model, extractor, data).

A job takes them from the captures of its unwatermarked texts (:func:`calibration_from_captures`: the
features at the positions that key green lists, no second forward); :func:`calibrate` computes them from
token rows for library use.

The geometric encoder variants (centered / whitened / pca) need the mean and covariance of the routing
features, and the geometry metrics need the vectors themselves. :func:`calibrate` runs one forward pass per
batch over a calibration set of token-id rows (by default the prompts plus their unwatermarked
continuations), right-padded so that only real positions are kept. The result is cached with
``torch.save`` under ``cache_dir`` in a file named by a hash of (model id, extractor config, the caps,
the row ids): every seed and encoder of a sweep reuses it, and any change of inputs misses the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from moewm.config import EncoderConfig, ExtractorConfig
from moewm.engine.lsh import CalibrationStats
from moewm.engine.padding import pad_id, pad_rows
from moewm.engine.routing import FeatureCapture

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class Calibration:
    """Feature vectors (N, D) float32 on the CPU, their statistics, and where they are cached."""

    features: torch.Tensor
    stats: CalibrationStats
    cache_path: Optional[Path]
    from_cache: bool = False


def calibration_rows(rows: Sequence[Sequence[int]], encoder_cfg: EncoderConfig) -> list[list[int]]:
    """The rows actually used: the first ``calibration_texts`` non-empty rows, each cut to ``calibration_max_tokens``."""
    kept = [list(r)[: encoder_cfg.calibration_max_tokens] for r in rows if len(r) > 0]
    return kept[: encoder_cfg.calibration_texts]


def cache_key(model_id: str, extractor_cfg: ExtractorConfig, encoder_cfg: EncoderConfig, rows: Sequence[Sequence[int]]) -> str:
    """Hex digest naming the cache file (the encoder only contributes its calibration caps)."""
    h = hashlib.sha256()
    meta = {
        "version": CACHE_VERSION,
        "model": model_id,
        "extractor": dataclasses.asdict(extractor_cfg),
        "calibration_texts": encoder_cfg.calibration_texts,
        "calibration_max_tokens": encoder_cfg.calibration_max_tokens,
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for r in rows:
        h.update(torch.tensor(r, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:24]


def feature_stats(features: torch.Tensor) -> CalibrationStats:
    """Mean and (unbiased) covariance in float64."""
    x = features.double()
    if x.shape[0] < 2:
        raise ValueError(f"calibration: {x.shape[0]} feature vector(s); the covariance needs at least 2")
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / (x.shape[0] - 1)
    return CalibrationStats(mean=mean, cov=cov, count=int(x.shape[0]))


def calibration_from_captures(captures: Sequence[Any], encoder_cfg: EncoderConfig) -> Calibration:
    """Features and statistics from texts a job has already captured (their scored positions: the features
    that key green lists), capped like :func:`calibration_rows`; no forward pass, nothing cached."""
    feats = [c.features[: encoder_cfg.calibration_max_tokens] for c in captures if c is not None and c.num_scored > 0]
    feats = feats[: encoder_cfg.calibration_texts]
    if len(feats) < 2:
        raise ValueError(f"calibration: {len(feats)} captured text(s) with scored tokens; encoder.calibration_texts needs at least 2")
    features = torch.cat(feats).float()
    return Calibration(features, feature_stats(features), cache_path=None)


@torch.no_grad()
def collect_features(model: torch.nn.Module, tokenizer: Any, extractor_cfg: ExtractorConfig, rows: Sequence[Sequence[int]], batch_size: int = 8) -> torch.Tensor:
    """(N, D) features at every real position of ``rows`` (one forward per batch, right padding)."""
    device = model.get_input_embeddings().weight.device
    pad = pad_id(tokenizer)
    capture = FeatureCapture(model, extractor_cfg)
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, mask = pad_rows(chunk, pad)
            positions = torch.arange(ids.shape[1]).unsqueeze(0).expand(len(chunk), -1)
            model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=False,
                logits_to_keep=1,
            )
            feats = capture.features(len(chunk))  # (B, L, D)
            out.append(feats[mask.bool().to(feats.device)].float().cpu())
            capture.clear()
    finally:
        capture.detach()
    return torch.cat(out)


def calibrate(
    model: torch.nn.Module,
    tokenizer: Any,
    extractor_cfg: ExtractorConfig,
    encoder_cfg: EncoderConfig,
    rows: Sequence[Sequence[int]],
    cache_dir: str | Path | None = "outputs/calibration",
    model_id: str = "",
    batch_size: int = 8,
) -> Calibration:
    """Features and statistics of the calibration rows, from the cache when the same inputs were seen.

    ``model_id`` names the model in the cache key (e.g. its path and precision); ``cache_dir=None``
    turns caching off.
    """
    used = calibration_rows(rows, encoder_cfg)
    if len(used) < 2:
        raise ValueError(f"calibration: {len(used)} usable row(s); encoder.calibration_texts needs at least 2 non-empty rows")
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"calib-{cache_key(model_id, extractor_cfg, encoder_cfg, used)}.pt"
        if path.exists():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                stats = CalibrationStats(mean=blob["mean"], cov=blob["cov"], count=int(blob["count"]))
                log.info("calibration: cache hit %s (%d vectors)", path, stats.count)
                return Calibration(blob["features"], stats, path, from_cache=True)
            except Exception as err:  # a truncated or foreign file: recompute and overwrite it
                log.warning("calibration: ignoring unreadable cache file %s (%s)", path, err)
    features = collect_features(model, tokenizer, extractor_cfg, used, batch_size)
    stats = feature_stats(features)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"features": features, "mean": stats.mean, "cov": stats.cov, "count": stats.count, "model_id": model_id}, tmp)
        tmp.replace(path)  # atomic: parallel jobs never read a half-written file
        log.info("calibration: %d vectors of dimension %d from %d rows, cached at %s", *features.shape, len(used), path)
    return Calibration(features, stats, path, from_cache=False)
