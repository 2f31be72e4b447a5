"""One job of the app: prompts -> generate (plain, watermarked) -> detect -> metrics -> files and W&B.

Data flows one way. The model and the key-independent plain generations are cached per process, so
an in-process multirun over seeds loads the model once and generates the unwatermarked baseline once.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from moewm.app.schema import AppConfig, validate_app
from moewm.app.services import (PLAIN_GENERATIONS, LOAD_COUNT, cache_key, build_watermarker, cache_root, check_weights, format_prompt,
                                get_model, needs_calibration, run_settings)
from moewm.app.tracking import Tracker
from moewm.data import load_prompts
from moewm.engine import stats
from moewm.engine.calibration import calibration_from_captures
from moewm.engine.capture import TextCapturer, cached_captures, capture_cache_key, capture_settings
from moewm.engine.detection import DetectorOutput
from moewm.engine.generation import encode_prompt, generate_batched
from moewm.engine.keys import WatermarkKey
from moewm.engine.padding import pad_id
from moewm.evaluation.job_metrics import JobContext, detection_metrics
from moewm.evaluation.nulls import build_null_sets
from moewm.evaluation.quality import perplexity
from moewm.io import write_json, write_jsonl
from moewm.schemes.base import Watermarker

log = logging.getLogger(__name__)


def _tokens(ids: list[list[int]]) -> int:
    return int(sum(len(x) for x in ids))


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def run_job(app: AppConfig, out_dir: Path, *, run_name: str, group: Optional[str]) -> dict[str, Any]:
    """Run one job and write metrics.json (+ samples.jsonl); a failure is recorded, then re-raised.

    Weights that cannot be had raise before anything starts (no W&B run, no files): moewm.app.main skips the job.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    check_weights(app)
    key = WatermarkKey.from_env(app.seed, app.secret_key)
    settings = run_settings(app, key)
    base: dict[str, Any] = {"status": "running", "seed": app.seed, "key_fingerprint": settings.pop("key_fingerprint"), **settings}
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
    validate_app(app)
    prompts = load_prompts(app.data)
    model, tokenizer = get_model(app)
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    formatted = [format_prompt(tokenizer, p, app.model.chat_template) for p in prompts]
    progress = app.progress

    # Plain generations do not depend on the key: generate once per (model, data, generation).
    plain_key = cache_key(app.model, app.memory, app.data, app.generation)
    if plain_key in PLAIN_GENERATIONS:
        prompt_ids, plain_ids, plain_seconds = PLAIN_GENERATIONS[plain_key]
    else:
        prompt_ids = [encode_prompt(tokenizer, p)[-app.data.max_prompt_tokens :] for p in formatted]
        t0 = time.perf_counter()
        plain_ids = generate_batched(model, tokenizer, prompt_ids, app.generation, [],
                                     progress="generate (plain)" if progress else None)
        plain_seconds = time.perf_counter() - t0
        PLAIN_GENERATIONS[plain_key] = (prompt_ids, plain_ids, plain_seconds)

    calibration = None
    if needs_calibration(app):  # from the captures of the plain texts, which detection then scores (one forward each)
        capturer = TextCapturer(model, tokenizer, app.extractor, capture_settings(app.extractor, app.watermark))
        try:
            _, plain_caps = capture_fixed_texts(capturer.capture, capturer.settings, app, plain_ids, prompt_ids, progress)
        finally:
            capturer.close()
        calibration = calibration_from_captures(plain_caps, app.encoder)

    watermarker = build_watermarker(app, model, tokenizer, key, calibration)
    try:
        t0 = time.perf_counter()
        wm_ids = watermarker.generate_from_ids(prompt_ids, app.generation, progress=progress)
        wm_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        nulls = build_null_sets(app.eval.null_sets, model, tokenizer, prompt_ids, app.generation, app.eval.null_texts,
                                encode_prompt(tokenizer, None), cache_key(app.model, app.memory), progress=progress)
        null_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        detected = detect_job_texts(watermarker, app, prompt_ids, wm_ids, plain_ids, nulls, progress)
        detect_seconds = time.perf_counter() - t0
        wm_det, plain_det = detected.wm, detected.plain
        if watermarker.capture_runs_model:  # the captures hold each text's log-probabilities
            ppl_wm, ppl_plain = capture_perplexity(detected.wm_captures), capture_perplexity(detected.plain_captures)
        else:  # ids-only captures: one forward per text, here
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
                         calibration, out_dir, detected.nulls, detected.wm_captures, detected.plain_captures)
        metrics.update(_evaluate(ctx))
        metrics["job_seconds"] = time.perf_counter() - t_start
    finally:
        watermarker.close()

    samples = _samples(tokenizer, prompts, prompt_ids, wm_ids, plain_ids, wm_det, plain_det, ppl_wm, ppl_plain)
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
    wm_captures: list[Any]
    plain_captures: list[Any]


def detect_job_texts(scheme: Watermarker, app: AppConfig, prompt_ids: list[list[int]], wm_ids: list[list[int]], plain_ids: list[list[int]],
                     nulls: list[Any], progress: bool) -> JobDetections:
    """Capture and score the job's texts and every null set. A scheme whose capture runs the model (MoE-LSH) runs
    each text through it once; those captures of key-independent texts (plain, null sets) are cached for the sweep."""
    window = app.eval.window

    def captured(texts: list[list[int]], prompts: list[list[int]], fixed: bool,
                 known: Optional[list[Any]] = None) -> tuple[list[int], list[Any]]:
        if fixed and scheme.capture_runs_model:
            return capture_fixed_texts(scheme.capture, capture_settings(app.extractor, app.watermark), app, texts, prompts, progress)
        keep = [i for i, t in enumerate(texts) if len(t) > 0]
        todo = [i for i in keep if known is None or known[i] is None]  # a text captured already is not forwarded again
        fresh = dict(zip(todo, scheme.capture([texts[i] for i in todo], [prompts[i] for i in todo], progress=progress) if todo else []))
        return keep, [fresh[i] if i in fresh else known[i] for i in keep]  # type: ignore[index]

    def scored(texts: list[list[int]], prompts: list[list[int]], fixed: bool, prefixes: bool, win: Optional[int],
               known: Optional[list[Any]] = None) -> tuple[DetectorOutput, list[Any]]:
        keep, caps = captured(texts, prompts, fixed, known)
        if not keep:
            return DetectorOutput.empty(len(texts)), [None] * len(texts)
        det = scheme.score(caps, prefixes=prefixes, progress=progress, window=win)
        full: list[Any] = [None] * len(texts)
        for j, i in enumerate(keep):
            full[i] = caps[j]
        return DetectorOutput.scatter(len(texts), keep, det), full

    plain, plain_caps = scored(plain_ids, prompt_ids, True, True, window)
    # a watermarked text equal to its plain text (scheme none, or a short greedy reply) reuses the plain capture
    same = [plain_caps[i] if list(wm_ids[i]) == list(plain_ids[i]) else None for i in range(len(wm_ids))]
    wm, wm_caps = scored(wm_ids, prompt_ids, False, True, window, same)
    out = {n.name: scored(n.text_ids, n.prompt_ids, True, False, None)[0] for n in nulls}
    return JobDetections(wm, plain, out, wm_caps, plain_caps)


def capture_fixed_texts(capture: Callable[..., list[Any]], settings: Any, app: AppConfig, texts: list[list[int]],
                        prompts: list[list[int]], progress: bool) -> tuple[list[int], list[Any]]:
    """Captures of key-independent texts (plain, null sets) through the sweep's cache; the indices of the non-empty texts."""
    keep = [i for i, t in enumerate(texts) if len(t) > 0]
    t, p = [texts[i] for i in keep], [prompts[i] for i in keep]
    if not keep:
        return keep, []
    rows = [list(a) + list(b) for a, b in zip(p, t)]
    name = capture_cache_key(cache_key(app.model, app.memory), app.extractor, settings, rows, [len(x) for x in p])
    return keep, cached_captures(name, cache_root() / "captures", lambda: capture(t, p, progress=progress))


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
    from moewm.evaluation.length_curve import length_metrics

    m = length_metrics(wm.prefix_p_value or [], plain.prefix_p_value or [], lengths, alpha, min_fraction=0.0)
    kept = [t for t in lengths if f"detection_rate_at_{t}" in m]
    return {"alpha": alpha, "lengths": kept, "detection_rate": [m[f"detection_rate_at_{t}"] for t in kept],
            "fpr": [m[f"fpr_at_{t}"] for t in kept], "n_wm": [m[f"n_wm_at_{t}"] for t in kept], "n_unwm": [m[f"n_unwm_at_{t}"] for t in kept]}


def _evaluate(ctx: JobContext) -> dict[str, Any]:
    from moewm.evaluation.job_metrics import evaluate_job

    return evaluate_job(ctx)


def _samples(tokenizer: Any, prompts: list[str], prompt_ids: list[list[int]], wm_ids: list[list[int]], plain_ids: list[list[int]],
             wm_det: DetectorOutput, plain_det: DetectorOutput, ppl_wm: np.ndarray, ppl_plain: np.ndarray) -> list[dict[str, Any]]:
    """One row per prompt: the texts and their token ids exactly as generated (``mode=detect input=<this file>`` scores
    the ids and reproduces the verdicts; the text, encoded again, need not give back the same ids), p-values, verdicts."""
    rows = []
    for i, prompt in enumerate(prompts):
        rows.append({
            "prompt": prompt,
            "text_wm": tokenizer.decode(wm_ids[i], skip_special_tokens=True),
            "text_unwm": tokenizer.decode(plain_ids[i], skip_special_tokens=True),
            "prompt_ids": [int(t) for t in prompt_ids[i]],
            "ids_wm": [int(t) for t in wm_ids[i]],
            "ids_unwm": [int(t) for t in plain_ids[i]],
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


__all__ = ["JobContext", "run_job"]
