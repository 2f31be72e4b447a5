"""Evaluation of one job: detection at alpha with every null measured, attacks, quality, length, geometry.

:func:`detection_metrics` turns the job's detections into flat metrics; :func:`evaluate_job` adds what
needs the job's context (``moewm.app.job.JobContext``). "wm" is the watermarked generation, "unwm" (or
``plain``) the unwatermarked temperature-1 generation of the same prompts; every rate is at the
decision threshold ``watermark.alpha`` on the (valid) p-value.

Keys of :func:`detection_metrics`
  detection_rate, false_positive_rate (plain texts), fpr_<set> / n_<set> / fp_<set> and the diagnostic
    fpr_model_null_<set> for every null set (:mod:`moewm.evaluation.nulls`), null_ok, null_failures
  auc, tpr_at_1pct_fpr, tpr_at_0p1pct_fpr: watermarked texts against every null text, scored by p-value
    (n_null_texts negatives)
  tokens_to_detect_0p02 / tokens_to_detect_alpha (median scored tokens after which p stays <= 0.02 / alpha,
    over the texts that get there), never_detected_0p02 / never_detected_alpha
  detection_rate_at_T, fpr_at_T, n_wm_at_T, n_unwm_at_T for T in eval.lengths
  p_wm_median, p_unwm_median, z_wm_mean / z_wm_std / z_unwm_mean / z_unwm_std (diagnostic z),
    green_fraction_wm_mean, green_fraction_unwm_mean, gamma_mean
  p_value_floor, reference_keys_scored_mean (per null text) and early_stop_share (null texts that
    stopped before all reference keys)
Keys of :func:`evaluate_job`
  window_detection_rate, window_fpr (eval.window tokens, p of the window maximum)
  attack_name, attack_strength; when an attack runs: detection_rate_attacked, auc_attacked,
    tpr_at_1pct_fpr_attacked, window_detection_rate_attacked, p_attacked_median, tokens_attacked_mean,
    attacked_changed_fraction, and the survival diagnostics (moewm.evaluation.survival: survival_positions,
    survival_signature, survival_greenlist, survival_bitflip, survival_green, survival_signature_dist*,
    evidence_per_token_attacked / _clean, evidence_aligned_*). Token-level attacks (substitution, insertion,
    retokenisation) edit the generated ids directly; the others edit the decoded text, which is tokenized again for detection
  quality (eval.quality): distinct_{1,2,3}_{wm,unwm}, diversity_{wm,unwm}, log_diversity_{wm,unwm},
    length_mean_{wm,unwm}, length_std_{wm,unwm}, n_texts_{wm,unwm}
  attack suite (eval.attacks, moewm.evaluation.attack_suite): the attacked-detection keys suffixed per spec
    (detection_rate_attacked_substitution_0p3, fpr_attacked_..., ...), tokens_to_detect_alpha_censored,
    the baseline's parameters (kgw_gamma, synthid_num_keys, ...) and perplexity_judge (moewm.evaluation.oracle)
  geometry (eval.geometry, MoE-LSH with calibration): the ``geo_*`` keys of :mod:`moewm.evaluation.geometry`
  eval_seconds
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moewm.engine import stats
from moewm.evaluation.attacked import attacked_detection_metrics, detected_share, p_scores
from moewm.config import EvalConfig
from moewm.engine.detection import DetectorOutput
from moewm.evaluation.geometry import capture_distributions, geometry_metrics
from moewm.evaluation.length_curve import length_metrics, tokens_to_detect_metrics
from moewm.evaluation.nulls import null_set_metrics
from moewm.evaluation.quality import quality_metrics
from moewm.schemes.base import Watermarker
from moewm.schemes.moe_lsh import MoELSHWatermark

from moewm.engine.generation import usable_tokens

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """Everything a job produced, handed to the evaluation layer."""

    cfg: Any  # moewm.app.schema.AppConfig (the app's config: evaluation reads its groups)
    model: Any
    tokenizer: Any
    watermarker: Watermarker
    prompts: list[str]
    prompt_ids: list[list[int]]
    wm_ids: list[list[int]]
    plain_ids: list[list[int]]
    wm_det: DetectorOutput
    plain_det: DetectorOutput
    calibration: Any
    out_dir: Path
    null_dets: dict[str, DetectorOutput] = field(default_factory=dict)
    wm_captures: list[Any] = field(default_factory=list)  # per watermarked text (None: empty text), from detection
    plain_captures: list[Any] = field(default_factory=list)  # per plain text, likewise


def detection_metrics(
    wm: DetectorOutput, plain: DetectorOutput, nulls: dict[str, DetectorOutput], alpha: float, lengths: Sequence[int]
) -> dict[str, Any]:
    """Rates at alpha, every null set's false-positive rate, ROC summaries and tokens to detect."""
    out: dict[str, Any] = {"detection_rate": detected_share(wm.p_value, alpha), "false_positive_rate": detected_share(plain.p_value, alpha)}
    out.update(null_set_metrics({"plain": plain, **nulls}, alpha))
    negatives = np.concatenate([plain.p_value] + [d.p_value for d in nulls.values()])
    sep = stats.separation(p_scores(wm.p_value), p_scores(negatives), threshold=-alpha - 1e-15)
    out.update(auc=sep.auc, tpr_at_1pct_fpr=sep.tpr_at_1pct_fpr,
               tpr_at_0p1pct_fpr=stats.tpr_at_fpr(p_scores(wm.p_value), p_scores(negatives), 0.001), n_null_texts=int(len(negatives)))
    if wm.prefix_p_value is not None:
        out.update(tokens_to_detect_metrics(wm.prefix_p_value, {"0p02": 0.02, "alpha": alpha}))
        out.update(length_metrics(wm.prefix_p_value, plain.prefix_p_value or [], lengths, alpha))
    out.update(
        p_wm_median=float(np.nanmedian(wm.p_value)) if np.isfinite(wm.p_value).any() else float("nan"),
        p_unwm_median=float(np.nanmedian(plain.p_value)) if np.isfinite(plain.p_value).any() else float("nan"),
        z_wm_mean=stats.nan_safe_mean(wm.z_score), z_wm_std=stats.nan_safe_std(wm.z_score),
        z_unwm_mean=stats.nan_safe_mean(plain.z_score), z_unwm_std=stats.nan_safe_std(plain.z_score),
        green_fraction_wm_mean=stats.nan_safe_mean(wm.green_fraction),
        green_fraction_unwm_mean=stats.nan_safe_mean(plain.green_fraction),
        gamma_mean=stats.nan_safe_mean(np.r_[wm.gamma_mean, plain.gamma_mean]),
        p_value_floor=float(np.nanmax(wm.p_value_floor)) if len(wm) else float("nan"),
    )
    null_keys = np.concatenate([d.num_reference_keys for d in nulls.values()] + [plain.num_reference_keys]).astype(np.float64)
    full = float(np.nanmax(np.r_[wm.num_reference_keys, null_keys])) if len(null_keys) else 0.0
    out["reference_keys_scored_mean"] = float(null_keys.mean()) if len(null_keys) else float("nan")
    out["early_stop_share"] = float(np.mean(null_keys < full)) if len(null_keys) and full > 0 else float("nan")
    return out


def attack_metrics(ctx: JobContext, ev: EvalConfig) -> dict[str, Any]:
    """The ``attack=`` group's attack on the watermarked texts, detected against the job's nulls."""
    attack = ctx.cfg.attack
    out: dict[str, Any] = {"attack_name": attack.name, "attack_strength": float(attack.strength)}
    if attack.name == "none":
        return out
    out.update(attacked_detection_metrics(ctx, attack, ev.window))
    return out


def _python_numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars as Python numbers (NaN stays a float: the file writer, moewm.io, makes it strict JSON)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, np.bool_)):
            out[k] = bool(v)
        elif isinstance(v, (int, np.integer)):
            out[k] = int(v)
        elif isinstance(v, (float, np.floating)):
            out[k] = float(v)
        else:
            out[k] = v
    return out


def evaluate_job(ctx: JobContext) -> dict[str, Any]:
    """All evaluation metrics of one job beyond :func:`detection_metrics` (module docstring)."""
    t0 = time.perf_counter()
    cfg = ctx.cfg
    ev: EvalConfig = getattr(cfg, "eval", None) or EvalConfig()
    ev.validate()
    wm = ctx.watermarker
    alpha = cfg.watermark.alpha
    out: dict[str, Any] = {
        "window_detection_rate": detected_share(ctx.wm_det.window_p_value, alpha),
        "window_fpr": detected_share(ctx.plain_det.window_p_value, alpha),
    }
    if ev.quality:
        out.update(quality_metrics(ctx.wm_ids, suffix="_wm"))
        out.update(quality_metrics(ctx.plain_ids, suffix="_unwm"))

    out.update(attack_metrics(ctx, ev))
    from moewm.evaluation.attack_suite import tradeoff_job_metrics

    out.update(tradeoff_job_metrics(ctx, ev))

    calibration = getattr(ctx, "calibration", None)
    if ev.geometry and calibration is not None and isinstance(wm, MoELSHWatermark) and type(wm).green_list_geometry:
        features = calibration.features
        if features.shape[1] != wm.encoder.projection.shape[0]:
            log.warning("geometry skipped: calibration features have dimension %d, the encoder %d", features.shape[1], wm.encoder.projection.shape[0])
        else:
            distributions = capture_distributions(wm.encoder, wm.watermark_cfg.delta, wm.vocab_size, ctx.plain_captures, ev.w1_contexts)
            out.update(
                geometry_metrics(
                    features,
                    wm.encoder,
                    ctx.model.get_input_embeddings().weight,
                    valid_tokens=usable_tokens(ctx.tokenizer, wm.vocab_size),
                    distributions=distributions,
                    w1_top_k=ev.w1_top_k,
                    kmeans_clusters=ev.kmeans_clusters,
                )
            )
    out["eval_seconds"] = time.perf_counter() - t0
    return _python_numbers(out)
