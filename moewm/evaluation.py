"""Evaluation of one job: detection at alpha with every null measured, attacks, quality, length, geometry.

:func:`detection_metrics` turns the job's detections into flat metrics; :func:`evaluate_job` adds what
needs the job's context (``moewm.job.JobContext``). "wm" is the watermarked generation, "unwm" (or
``plain``) the unwatermarked temperature-1 generation of the same prompts; every rate is at the
decision threshold ``watermark.alpha`` on the (valid) p-value.

Keys of :func:`detection_metrics`
  detection_rate, false_positive_rate (plain texts), fpr_<set> / n_<set> / fp_<set> and the diagnostic
    fpr_model_null_<set> for every null set (:mod:`moewm.nulls`), null_ok, null_failures
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
    attacked_changed_fraction. Token-level attacks (substitution, insertion) edit the generated ids
    directly; the others edit the decoded text, which is tokenized again for detection
  quality (eval.quality): distinct_{1,2,3}_{wm,unwm}, diversity_{wm,unwm}, log_diversity_{wm,unwm},
    length_mean_{wm,unwm}, length_std_{wm,unwm}, n_texts_{wm,unwm}
  attack suite (eval.attacks, moewm.attack_suite): the attacked-detection keys suffixed per spec
    (detection_rate_attacked_substitution_0p3, fpr_attacked_..., ...), tokens_to_detect_alpha_censored,
    the baseline's parameters (kgw_gamma, synthid_num_keys, ...) and perplexity_judge (moewm.oracle)
  geometry (eval.geometry, MoE-LSH with calibration): the ``geo_*`` keys of :mod:`moewm.geometry`
  eval_seconds
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from moewm import stats
from moewm.attacks import TOKEN_ATTACKS, apply_attack, attack_token_ids
from moewm.config import EvalConfig
from moewm.detection import DetectorOutput, detect_nonempty
from moewm.geometry import geometry_metrics
from moewm.length_curve import length_metrics, tokens_to_detect_metrics
from moewm.nulls import null_set_metrics
from moewm.quality import quality_metrics
from moewm.watermark import MoELSHWatermark, usable_tokens

log = logging.getLogger(__name__)


def _p_scores(p: np.ndarray) -> np.ndarray:
    """Detection scores from p-values for ROC metrics: lower p is more watermarked; no p counts as p = 1."""
    return -np.nan_to_num(np.asarray(p, dtype=np.float64), nan=1.0)


def _rate(p: np.ndarray | None, alpha: float) -> float:
    if p is None or len(p) == 0:
        return float("nan")
    return float(np.mean(np.nan_to_num(np.asarray(p, dtype=np.float64), nan=np.inf) <= alpha))


def detection_metrics(
    wm: DetectorOutput, plain: DetectorOutput, nulls: dict[str, DetectorOutput], alpha: float, lengths: Sequence[int]
) -> dict[str, Any]:
    """Rates at alpha, every null set's false-positive rate, ROC summaries and tokens to detect."""
    out: dict[str, Any] = {"detection_rate": _rate(wm.p_value, alpha), "false_positive_rate": _rate(plain.p_value, alpha)}
    out.update(null_set_metrics({"plain": plain, **nulls}, alpha))
    negatives = np.concatenate([plain.p_value] + [d.p_value for d in nulls.values()])
    sep = stats.separation(_p_scores(wm.p_value), _p_scores(negatives), threshold=-alpha - 1e-15)
    out.update(auc=sep.auc, tpr_at_1pct_fpr=sep.tpr_at_1pct_fpr,
               tpr_at_0p1pct_fpr=stats.tpr_at_fpr(_p_scores(wm.p_value), _p_scores(negatives), 0.001), n_null_texts=int(len(negatives)))
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


def attack_metrics(ctx: Any, ev: EvalConfig) -> dict[str, Any]:
    cfg = ctx.cfg
    attack = cfg.attack
    out: dict[str, Any] = {"attack_name": attack.name, "attack_strength": float(attack.strength)}
    if attack.name == "none":
        return out
    tok, wm = ctx.tokenizer, ctx.watermarker
    alpha = cfg.watermark.alpha
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in ctx.wm_ids]
    if attack.name in TOKEN_ATTACKS:  # on the generated ids themselves: no decode / encode round trip
        att_ids = attack_token_ids(ctx.wm_ids, attack, tokenizer=tok, model=ctx.model, seed=attack.seed)
        changed = [list(a) != list(t) for a, t in zip(att_ids, ctx.wm_ids)]
    else:
        unwm_texts = [tok.decode(ids, skip_special_tokens=True) for ids in ctx.plain_ids]
        attacked = apply_attack(texts, attack, tokenizer=tok, model=ctx.model, unwatermarked=unwm_texts, seed=attack.seed)
        changed = [a != t for a, t in zip(attacked, texts)]
        # an unchanged text keeps its original ids (decode / encode need not round-trip exactly)
        att_ids = [list(tok(a, add_special_tokens=False)["input_ids"]) if c else list(ctx.wm_ids[i]) for i, (a, c) in enumerate(zip(attacked, changed))]
    det = detect_nonempty(lambda t, p: wm.detect_ids(t, p, window=ev.window), att_ids, ctx.prompt_ids)
    negatives = np.concatenate([ctx.plain_det.p_value] + [d.p_value for d in ctx.null_dets.values()])
    sep = stats.separation(_p_scores(det.p_value), _p_scores(negatives), threshold=-alpha - 1e-15)
    out.update(
        detection_rate_attacked=_rate(det.p_value, alpha),
        auc_attacked=sep.auc,
        tpr_at_1pct_fpr_attacked=sep.tpr_at_1pct_fpr,
        window_detection_rate_attacked=_rate(det.window_p_value, alpha),
        p_attacked_median=float(np.nanmedian(det.p_value)) if np.isfinite(det.p_value).any() else float("nan"),
        tokens_attacked_mean=float(np.mean([len(x) for x in att_ids])),
        attacked_changed_fraction=float(np.mean(changed)),
    )
    return out


def w1_contexts(prompt_ids: Sequence[Sequence[int]], plain_ids: Sequence[Sequence[int]], count: int, seed: int = 0) -> list[list[int]]:
    """``count`` contexts: prompt + a random-length prefix of its unwatermarked continuation.

    They depend only on the prompts, the plain generations and ``seed`` (not on the watermark key),
    so every key seed of a sweep is measured on the same contexts.
    """
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    n = len(prompt_ids)
    for j in range(count * 2):  # cycle through the prompts; skip empty contexts
        if len(out) >= count or n == 0:
            break
        i = j % n
        cut = int(rng.integers(0, len(plain_ids[i]) + 1))
        ctx = list(prompt_ids[i]) + list(plain_ids[i][:cut])
        if ctx:
            out.append(ctx)
    return out


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
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


def evaluate_job(ctx: Any) -> dict[str, Any]:
    """All evaluation metrics of one job beyond :func:`detection_metrics` (module docstring)."""
    t0 = time.perf_counter()
    cfg = ctx.cfg
    ev: EvalConfig = getattr(cfg, "eval", None) or EvalConfig()
    ev.validate()
    wm = ctx.watermarker
    alpha = cfg.watermark.alpha
    out: dict[str, Any] = {
        "window_detection_rate": _rate(ctx.wm_det.window_p_value, alpha),
        "window_fpr": _rate(ctx.plain_det.window_p_value, alpha),
    }
    if ev.quality:
        out.update(quality_metrics(ctx.wm_ids, suffix="_wm"))
        out.update(quality_metrics(ctx.plain_ids, suffix="_unwm"))

    out.update(attack_metrics(ctx, ev))
    from moewm.attack_suite import tradeoff_job_metrics

    out.update(tradeoff_job_metrics(ctx, ev))

    calibration = getattr(ctx, "calibration", None)
    if ev.geometry and calibration is not None and isinstance(wm, MoELSHWatermark):
        features = calibration.features
        if features.shape[1] != wm.encoder.projection.shape[0]:
            log.warning("geometry skipped: calibration features have dimension %d, the encoder %d", features.shape[1], wm.encoder.projection.shape[0])
        else:
            contexts = w1_contexts(ctx.prompt_ids, ctx.plain_ids, ev.w1_contexts)
            out.update(
                geometry_metrics(
                    features,
                    wm.encoder,
                    ctx.model.get_input_embeddings().weight,
                    valid_tokens=usable_tokens(ctx.tokenizer, wm.vocab_size),
                    watermarker=wm,
                    contexts=contexts,
                    w1_top_k=ev.w1_top_k,
                    w1_contexts=ev.w1_contexts,
                    kmeans_clusters=ev.kmeans_clusters,
                )
            )
    out["eval_seconds"] = time.perf_counter() - t0
    return _jsonable(out)
