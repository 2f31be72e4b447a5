"""One job of the app: prompts -> generate (plain, watermarked) -> detect -> metrics -> files and W&B.

Data flows one way. The model and the key-independent plain generations are cached per process, so
an in-process multirun over seeds loads the model once and generates the unwatermarked baseline once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from moewm import stats
from moewm.config import ConfigError
from moewm.data import load_prompts
from moewm.io import write_json, write_jsonl
from moewm.keys import WatermarkKey
from moewm.models import load_model
from moewm.quality import pad_id, perplexity
from moewm.schema import AppConfig
from moewm.tracking import Tracker
from moewm.watermark import MoEDetectorOutput, encode_prompt

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """Everything a job produced, handed to the evaluation layer."""

    cfg: AppConfig
    model: Any
    tokenizer: Any
    watermarker: Any
    prompts: list[str]
    prompt_ids: list[list[int]]
    wm_ids: list[list[int]]
    plain_ids: list[list[int]]
    wm_det: MoEDetectorOutput
    plain_det: MoEDetectorOutput
    calibration: Any
    out_dir: Path


# -- per-process caches ---------------------------------------------------------------------------
_MODELS: dict[str, tuple[Any, Any]] = {}
_PLAIN: dict[str, tuple[list[list[int]], list[list[int]], float]] = {}
LOAD_COUNT = {"loads": 0}


def _cache_key(*parts: Any) -> str:
    return json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str)


def get_model(app: AppConfig) -> tuple[Any, Any]:
    """Load the model, or reuse it when an earlier job in this process loaded the same one."""
    key = _cache_key(app.model, app.memory)
    if app.reuse_model and key in _MODELS:
        return _MODELS[key]
    _MODELS.clear()  # one model in memory at a time
    _PLAIN.clear()
    model, tokenizer = load_model(app.model, app.memory)
    LOAD_COUNT["loads"] += 1
    if app.reuse_model:
        _MODELS[key] = (model, tokenizer)
    return model, tokenizer


def format_prompt(tokenizer: Any, prompt: str, chat: bool) -> str:
    """Chat checkpoints get their chat template around the prompt; base models the prompt itself."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt


def _tokens(ids: list[list[int]]) -> int:
    return int(sum(len(x) for x in ids))


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def build_watermarker(app: AppConfig, model: Any, tokenizer: Any, key: WatermarkKey, calibration: Any) -> Any:
    """The configured scheme (moe_lsh, or a baseline) behind one duck-typed interface."""
    from moewm.baselines import build_watermarker as build

    return build(app.watermark.kind, model, tokenizer, app.watermark, key,
                 extractor=app.extractor, encoder=app.encoder, calibration=calibration)


def _needs_calibration(app: AppConfig) -> bool:
    return app.watermark.kind in ("moe_lsh", "none") and (app.encoder.kind != "simhash" or app.eval.geometry)


def run_job(app: AppConfig, out_dir: Path, *, run_name: str, group: Optional[str]) -> dict[str, Any]:
    """Run one job and write metrics.json (+ samples.jsonl); a failure is recorded, then re-raised."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = WatermarkKey.from_env(app.seed, app.secret_key)
    base: dict[str, Any] = {
        "status": "running",
        "seed": app.seed,
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
        "delta": app.watermark.delta,
        "z_threshold": app.watermark.z_threshold,
        "memory_profile": app.memory.name,
    }
    tracker = Tracker.start(app.logger, run_dir=out_dir, name=run_name, group=group, config=public_config(app, key))
    try:
        metrics = _run(app, key, out_dir, base, tracker)
    except BaseException as err:
        failed = dict(base, status="failed", error=f"{type(err).__name__}: {err}")
        write_json(out_dir / "metrics.json", failed)
        (out_dir / "error.txt").write_text(traceback.format_exc().replace(app.secret_key or "\0", key.secret_fingerprint))
        tracker.summary(failed)
        tracker.finish(failed=True)
        raise
    tracker.finish()
    return metrics


def public_config(app: AppConfig, key: WatermarkKey) -> dict[str, Any]:
    """The resolved config as W&B sees it: the secret replaced by its fingerprint."""
    config = dataclasses.asdict(app)
    config["secret_key"] = f"fingerprint:{key.secret_fingerprint}"
    return config


def _run(app: AppConfig, key: WatermarkKey, out_dir: Path, base: dict[str, Any], tracker: Tracker) -> dict[str, Any]:
    t_start = time.perf_counter()
    ensure_valid_before_load(app)
    prompts = load_prompts(app.data)
    model, tokenizer = get_model(app)
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    formatted = [format_prompt(tokenizer, p, app.model.chat_template) for p in prompts]
    progress = app.progress

    # Plain generations do not depend on the key: generate once per (model, data, generation).
    plain_key = _cache_key(app.model, app.memory, app.data, app.generation)
    if plain_key in _PLAIN:
        prompt_ids, plain_ids, plain_seconds = _PLAIN[plain_key]
    else:
        prompt_ids = [encode_prompt(tokenizer, p)[-app.data.max_prompt_tokens :] for p in formatted]
        from moewm.watermark import generate_batched

        t0 = time.perf_counter()
        plain_ids = generate_batched(model, tokenizer, prompt_ids, app.generation, [],
                                     progress="generate (plain)" if progress else None)
        plain_seconds = time.perf_counter() - t0
        _PLAIN[plain_key] = (prompt_ids, plain_ids, plain_seconds)

    calibration = None
    if _needs_calibration(app):
        from moewm.calibration import calibrate

        rows = [p + t for p, t in zip(prompt_ids, plain_ids)]
        calibration = calibrate(model, tokenizer, app.extractor, app.encoder, rows,
                                cache_dir=Path(app_output_root()) / "calibration", model_id=_cache_key(app.model, app.memory))

    watermarker = build_watermarker(app, model, tokenizer, key, calibration)
    try:
        t0 = time.perf_counter()
        wm_ids = watermarker.generate_from_ids(prompt_ids, app.generation, progress=progress)
        wm_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        wm_det = watermarker.detect_ids(wm_ids, prompt_ids, progress=progress)
        plain_det = watermarker.detect_ids(plain_ids, prompt_ids, progress=progress)
        detect_seconds = time.perf_counter() - t0

        sep = stats.separation(wm_det.z_score, plain_det.z_score, app.watermark.z_threshold)
        pad = pad_id(tokenizer)
        ppl_wm = perplexity(model, prompt_ids, wm_ids, app.generation.batch_size, pad)
        ppl_plain = perplexity(model, prompt_ids, plain_ids, app.generation.batch_size, pad)
        peak, peak_kind = _peak_memory_mb(device)
        scored = int(wm_det.num_tokens_scored.sum() + plain_det.num_tokens_scored.sum())
        metrics = dict(
            base,
            status="ok",
            n_samples=len(prompts),
            z_wm_mean=stats.nan_safe_mean(wm_det.z_score),
            z_wm_std=stats.nan_safe_std(wm_det.z_score),
            z_unwm_mean=stats.nan_safe_mean(plain_det.z_score),
            z_unwm_std=stats.nan_safe_std(plain_det.z_score),
            detection_rate=sep.detection_rate,
            false_positive_rate=sep.false_positive_rate,
            auc=sep.auc,
            tpr_at_1pct_fpr=sep.tpr_at_1pct_fpr,
            null_z_p99=sep.null_z_p99,
            green_fraction_wm_mean=stats.nan_safe_mean(wm_det.green_fraction),
            green_fraction_unwm_mean=stats.nan_safe_mean(plain_det.green_fraction),
            gamma_mean=stats.nan_safe_mean(np.r_[wm_det.gamma_mean, plain_det.gamma_mean]),
            ppl_wm_mean=stats.nan_safe_mean(ppl_wm),
            ppl_unwm_mean=stats.nan_safe_mean(ppl_plain),
            tokens_wm_mean=float(np.mean([len(x) for x in wm_ids])),
            tokens_unwm_mean=float(np.mean([len(x) for x in plain_ids])),
            gen_tokens_per_s_wm=_tokens(wm_ids) / max(wm_seconds, 1e-9),
            gen_tokens_per_s_plain=_tokens(plain_ids) / max(plain_seconds, 1e-9),
            detect_tokens_per_s=scored / max(detect_seconds, 1e-9),
            peak_memory_mb=peak,
            peak_memory_kind=peak_kind,
            model_loads_in_process=LOAD_COUNT["loads"],
        )
        ctx = JobContext(app, model, tokenizer, watermarker, prompts, prompt_ids, wm_ids, plain_ids, wm_det, plain_det,
                         calibration, out_dir)
        metrics.update(_evaluate(ctx))
        metrics["job_seconds"] = time.perf_counter() - t_start
    finally:
        watermarker.close()

    samples = _samples(tokenizer, prompts, wm_ids, plain_ids, wm_det, plain_det, ppl_wm, ppl_plain)
    write_jsonl(out_dir / "samples.jsonl", samples)
    write_json(out_dir / "metrics.json", metrics)
    tracker.summary(metrics)
    tracker.histograms({"z_wm": wm_det.z_score, "z_unwm": plain_det.z_score})
    tracker.table("samples", samples)
    return metrics


def _evaluate(ctx: JobContext) -> dict[str, Any]:
    from moewm.evaluation import evaluate_job

    return evaluate_job(ctx)


def _samples(tokenizer: Any, prompts: list[str], wm_ids: list[list[int]], plain_ids: list[list[int]],
             wm_det: MoEDetectorOutput, plain_det: MoEDetectorOutput, ppl_wm: np.ndarray, ppl_plain: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for i, prompt in enumerate(prompts):
        rows.append({
            "prompt": prompt,
            "text_wm": tokenizer.decode(wm_ids[i], skip_special_tokens=True),
            "text_unwm": tokenizer.decode(plain_ids[i], skip_special_tokens=True),
            "z_wm": float(wm_det.z_score[i]),
            "z_unwm": float(plain_det.z_score[i]),
            "tokens_wm": len(wm_ids[i]),
            "tokens_unwm": len(plain_ids[i]),
            "scored_wm": int(wm_det.num_tokens_scored[i]),
            "scored_unwm": int(plain_det.num_tokens_scored[i]),
            "ppl_wm": float(ppl_wm[i]),
            "ppl_unwm": float(ppl_plain[i]),
        })
    return rows


def app_output_root() -> str:
    """Top-level outputs/ (runs, sweeps and caches live there)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(Path(HydraConfig.get().runtime.cwd) / "outputs")
    except Exception:  # outside a Hydra run (library use, tests)
        return "outputs"


def metrics_table(metrics: dict[str, Any]) -> str:
    """The metrics as a two-column text table for the terminal."""
    keys = [k for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) and k != "error"]
    width = max(len(k) for k in keys) if keys else 10
    lines = []
    for k in keys:
        v = metrics[k]
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        lines.append(f"  {k:<{width}}  {text}")
    return "\n".join(lines)


def ensure_valid_before_load(app: AppConfig) -> None:
    """Range and cross-field checks that need no weights (a ConfigError names the key and range)."""
    from moewm.schema import validate_app

    validate_app(app)
    if app.watermark.kind == "moe_lsh" and app.model.is_moe and app.extractor.kind == "router":
        try:
            from moewm.models import model_layout
        except ImportError:
            return
        from moewm.routing import check_extractor

        check_extractor(app.extractor, model_layout(app.model))
    elif app.extractor.kind == "hidden":
        from moewm.models import model_layout
        from moewm.routing import check_extractor

        check_extractor(app.extractor, model_layout(app.model, kind="hidden"))


__all__ = ["JobContext", "run_job", "ensure_valid_before_load", "metrics_table", "ConfigError"]
