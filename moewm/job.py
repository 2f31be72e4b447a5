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
from dataclasses import dataclass, field
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
from moewm.padding import pad_id
from moewm.quality import perplexity
from moewm.schema import AppConfig
from moewm.tracking import Tracker
from moewm.capture import cached_captures, capture_cache_key
from moewm.detection import DetectorOutput, detect_nonempty
from moewm.evaluation import detection_metrics
from moewm.nulls import build_null_sets
from moewm.watermark import encode_prompt

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
    wm_det: DetectorOutput
    plain_det: DetectorOutput
    calibration: Any
    out_dir: Path
    null_dets: dict[str, DetectorOutput] = field(default_factory=dict)


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

    return build(app.watermark.kind, model, tokenizer, app.watermark, key, extractor=app.extractor, encoder=app.encoder,
                 calibration=calibration, cache_dir=cache_root() / "reference_keys", model_id=_cache_key(app.model, app.memory))


def cache_root() -> Path:
    """Caches shared by the jobs of every sweep: reference-key banks, calibration, null-text captures."""
    return Path(app_output_root()) / "cache"


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
        "pools": app.encoder.pool_design,
        "green_lists": app.encoder.green_lists,
        "green_bits": app.encoder.green_bits,
        "delta": app.watermark.delta,
        "alpha": app.watermark.alpha,
        "statistic": app.watermark.statistic,
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
                                cache_dir=cache_root() / "calibration", model_id=_cache_key(app.model, app.memory))

    watermarker = build_watermarker(app, model, tokenizer, key, calibration)
    try:
        t0 = time.perf_counter()
        wm_ids = watermarker.generate_from_ids(prompt_ids, app.generation, progress=progress)
        wm_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        nulls = build_null_sets(app.eval.null_sets, model, tokenizer, prompt_ids, app.generation, app.eval.null_texts,
                                encode_prompt(tokenizer, None), _cache_key(app.model, app.memory), progress=progress)
        null_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        detected = detect_job_texts(watermarker, app, prompt_ids, wm_ids, plain_ids, nulls, progress)
        detect_seconds = time.perf_counter() - t0
        wm_det, plain_det = detected.wm, detected.plain
        if detected.wm_captures is not None:
            ppl_wm, ppl_plain = capture_perplexity(detected.wm_captures), capture_perplexity(detected.plain_captures)
        else:
            pad = pad_id(tokenizer)
            ppl_wm = perplexity(model, prompt_ids, wm_ids, app.generation.batch_size, pad)
            ppl_plain = perplexity(model, prompt_ids, plain_ids, app.generation.batch_size, pad)
        peak, peak_kind = _peak_memory_mb(device)
        scored = int(sum(int(d.num_tokens_scored.sum()) for d in [wm_det, plain_det, *detected.nulls.values()]))
        metrics = dict(
            base,
            status="ok",
            n_samples=len(prompts),
            **detection_metrics(wm_det, plain_det, detected.nulls, app.watermark.alpha, app.eval.lengths),
            ppl_wm_mean=stats.nan_safe_mean(ppl_wm),
            ppl_unwm_mean=stats.nan_safe_mean(ppl_plain),
            tokens_wm_mean=float(np.mean([len(x) for x in wm_ids])),
            tokens_unwm_mean=float(np.mean([len(x) for x in plain_ids])),
            generate_seconds=wm_seconds,
            null_sets_seconds=null_seconds,
            detect_seconds=detect_seconds,
            detect_tokens_per_s=scored / max(detect_seconds, 1e-9),
            peak_memory_mb=peak,
            peak_memory_kind=peak_kind,
            model_loads_in_process=LOAD_COUNT["loads"],
        )
        ctx = JobContext(app, model, tokenizer, watermarker, prompts, prompt_ids, wm_ids, plain_ids, wm_det, plain_det,
                         calibration, out_dir, detected.nulls)
        metrics.update(_evaluate(ctx))
        metrics["job_seconds"] = time.perf_counter() - t_start
    finally:
        watermarker.close()

    samples = _samples(tokenizer, prompts, wm_ids, plain_ids, wm_det, plain_det, ppl_wm, ppl_plain)
    write_jsonl(out_dir / "samples.jsonl", samples)
    write_jsonl(out_dir / "nulls.jsonl", null_rows(detected.nulls, plain_det))
    write_json(out_dir / "length_curve.json", length_curve_table(wm_det, plain_det, app.eval.lengths, app.watermark.alpha))
    write_json(out_dir / "metrics.json", metrics)
    tracker.summary(metrics)
    tracker.histograms({"z_wm": wm_det.z_score, "z_unwm": plain_det.z_score, "p_wm": wm_det.p_value, "p_unwm": plain_det.p_value})
    tracker.table("samples", samples)
    return metrics


@dataclass
class JobDetections:
    """Every detection of a job: its own texts (with per-prefix p-values) and the null sets."""

    wm: DetectorOutput
    plain: DetectorOutput
    nulls: dict[str, DetectorOutput]
    wm_captures: Optional[list[Any]] = None
    plain_captures: Optional[list[Any]] = None


def detect_job_texts(scheme: Any, app: AppConfig, prompt_ids: list[list[int]], wm_ids: list[list[int]], plain_ids: list[list[int]],
                     nulls: list[Any], progress: bool) -> JobDetections:
    """Detect the job's texts and every null set. A scheme that captures (MoE-LSH) runs each text through
    the model once; captures of key-independent texts (plain, null sets) are cached for the whole sweep."""
    window = app.eval.window
    model_key = _cache_key(app.model, app.memory)
    if not hasattr(scheme, "capture"):
        wm = detect_nonempty(lambda t, p: scheme.detect_ids(t, p, progress=progress, prefixes=True, window=window), wm_ids, prompt_ids)
        plain = detect_nonempty(lambda t, p: scheme.detect_ids(t, p, progress=progress, prefixes=True, window=window), plain_ids, prompt_ids)
        out = {n.name: detect_nonempty(lambda t, p: scheme.detect_ids(t, p, progress=progress), n.text_ids, n.prompt_ids) for n in nulls}
        return JobDetections(wm, plain, out)

    def captured(texts: list[list[int]], prompts: list[list[int]], fixed: bool) -> tuple[list[int], list[Any]]:
        keep = [i for i, t in enumerate(texts) if len(t) > 0]
        t, p = [texts[i] for i in keep], [prompts[i] for i in keep]
        if not keep:
            return keep, []
        if not fixed:
            return keep, scheme.capture(t, p, progress=progress)
        rows = [list(a) + list(b) for a, b in zip(p, t)]
        name = capture_cache_key(model_key, app.extractor, scheme.capture_settings, rows, [len(x) for x in p])
        return keep, cached_captures(name, cache_root() / "captures", lambda: scheme.capture(t, p, progress=progress))

    def scored(texts: list[list[int]], prompts: list[list[int]], fixed: bool, prefixes: bool, win: Optional[int]) -> tuple[DetectorOutput, list[Any]]:
        keep, caps = captured(texts, prompts, fixed)
        if not keep:
            return DetectorOutput.empty(len(texts)), []
        det = scheme.score(caps, prefixes=prefixes, progress=progress, window=win)
        full: list[Any] = [None] * len(texts)
        for j, i in enumerate(keep):
            full[i] = caps[j]
        return DetectorOutput.scatter(len(texts), keep, det), full

    wm, wm_caps = scored(wm_ids, prompt_ids, False, True, window)
    plain, plain_caps = scored(plain_ids, prompt_ids, True, True, window)
    out = {n.name: scored(n.text_ids, n.prompt_ids, True, False, None)[0] for n in nulls}
    return JobDetections(wm, plain, out, wm_caps, plain_caps)


def capture_perplexity(captures: list[Any]) -> np.ndarray:
    """Perplexity of each text from its capture (scored tokens, under the generating model); NaN for none."""
    out = np.full(len(captures), np.nan)
    for i, c in enumerate(captures):  # one mean per text
        if c is not None and c.num_scored:
            out[i] = float(torch.exp(-c.logprob.double().mean()))
    return out


def null_rows(nulls: dict[str, DetectorOutput], plain: DetectorOutput) -> list[dict[str, Any]]:
    """One row per unwatermarked text scored: its set, p-value, statistic and tokens (for calibration plots)."""
    rows = []
    for name, det in {"plain": plain, **nulls}.items():
        for i in range(len(det)):
            rows.append({"set": name, "p_value": float(det.p_value[i]), "p_value_model_null": float(det.p_value_model_null[i]),
                         "statistic": float(det.statistic[i]), "num_tokens_scored": int(det.num_tokens_scored[i]),
                         "num_reference_keys": int(det.num_reference_keys[i])})
    return rows


def length_curve_table(wm: DetectorOutput, plain: DetectorOutput, lengths: list[int], alpha: float) -> dict[str, Any]:
    from moewm.length_curve import length_metrics

    m = length_metrics(wm.prefix_p_value or [], plain.prefix_p_value or [], lengths, alpha, min_fraction=0.0)
    kept = [t for t in lengths if f"detection_rate_at_{t}" in m]
    return {"alpha": alpha, "lengths": kept, "detection_rate": [m[f"detection_rate_at_{t}"] for t in kept],
            "fpr": [m[f"fpr_at_{t}"] for t in kept], "n_wm": [m[f"n_wm_at_{t}"] for t in kept], "n_unwm": [m[f"n_unwm_at_{t}"] for t in kept]}


def _evaluate(ctx: JobContext) -> dict[str, Any]:
    from moewm.evaluation import evaluate_job

    return evaluate_job(ctx)


def _samples(tokenizer: Any, prompts: list[str], wm_ids: list[list[int]], plain_ids: list[list[int]],
             wm_det: DetectorOutput, plain_det: DetectorOutput, ppl_wm: np.ndarray, ppl_plain: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for i, prompt in enumerate(prompts):
        rows.append({
            "prompt": prompt,
            "text_wm": tokenizer.decode(wm_ids[i], skip_special_tokens=True),
            "text_unwm": tokenizer.decode(plain_ids[i], skip_special_tokens=True),
            "p_wm": float(wm_det.p_value[i]),
            "p_unwm": float(plain_det.p_value[i]),
            "detected_wm": bool(wm_det.prediction[i]),
            "detected_unwm": bool(plain_det.prediction[i]),
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


def ensure_valid_before_load(app: AppConfig) -> None:
    """Range and cross-field checks that need no weights (a ConfigError names the key and range)."""
    from moewm.schema import validate_app

    validate_app(app)
    if app.watermark.kind == "moe_lsh" and app.model.is_moe and app.extractor.kind == "router":
        from moewm.architecture import model_layout
        from moewm.routing import check_extractor

        check_extractor(app.extractor, model_layout(app.model))
    elif app.extractor.kind == "hidden":
        from moewm.architecture import model_layout
        from moewm.routing import check_extractor

        check_extractor(app.extractor, model_layout(app.model, kind="hidden"))


__all__ = ["JobContext", "run_job", "ensure_valid_before_load", "ConfigError"]
