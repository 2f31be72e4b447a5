"""Evaluation of one job: attack robustness, quality, detection vs length, null calibration, geometry.

:func:`evaluate_job` takes the job's context (``moewm.job.JobContext``: config, model, tokenizer,
watermarker, prompt / watermarked / unwatermarked token ids and their detections, calibration) and
returns flat metrics (snake_case keys; floats, ints, strs and the bool ``null_ok``). "unwm" is the
unwatermarked generation of the same prompts, the negatives of every ROC metric.

Keys
  attack_name, attack_strength; when an attack runs (name != none): z_attacked_mean,
    detection_rate_attacked, auc_attacked, tpr_at_1pct_fpr_attacked (attacked watermarked vs unwm),
    window_z_attacked_mean, window_detection_rate_attacked (Bonferroni-corrected max-over-windows
    p-value below the threshold's), window_auc_attacked (max-window z, attacked vs unwm),
    tokens_attacked_mean, attacked_changed_fraction (texts the attack changed). Token-level attacks
    (substitution, insertion) edit the generated ids directly; the others edit the decoded text,
    which is tokenized again for detection
  window_z_wm_mean, window_z_unwm_mean (eval.window scored tokens)
  quality (eval.quality): distinct_{1,2,3}_{wm,unwm}, diversity_{wm,unwm}, log_diversity_{wm,unwm},
    length_mean_{wm,unwm}, length_std_{wm,unwm}, n_texts_{wm,unwm}
  detection vs length, per T in eval.lengths that at least half the texts reach:
    z_wm_at_T, z_unwm_at_T, tpr_at_T, detection_rate_at_T, fpr_at_T, n_wm_at_T, n_unwm_at_T
  null calibration: null_n, null_z_mean, null_z_std, null_z_mean_se, null_z_p99,
    false_positive_rate_empirical, false_positive_rate_nominal, null_fpr_pvalue, null_dispersion_pvalue,
    null_ok (False, with a logged warning, when the null z mean is more than 3 standard errors from 0,
    the empirical FPR at the threshold is significantly above the nominal one (binomial test,
    p < 1e-3), or the z variance is significantly above 1 (chi-square test, p < 1e-3))
  geometry (eval.geometry, MoE-LSH with calibration): the ``geo_*`` keys of :mod:`moewm.geometry`
  eval_seconds
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Sequence

import numpy as np
import torch
from scipy.stats import binomtest, chi2, norm

from moewm import stats
from moewm.attacks import TOKEN_ATTACKS, apply_attack, attack_token_ids
from moewm.config import EvalConfig
from moewm.geometry import geometry_metrics
from moewm.length_curve import PositionScores, length_curve, position_scores
from moewm.quality import quality_metrics
from moewm.watermark import MoEDetectorOutput, MoELSHWatermark, usable_tokens

log = logging.getLogger(__name__)

NULL_SIGMAS = 3.0
NULL_ALPHA = 1e-3


# -- helpers that tolerate empty texts -----------------------------------------------------------
def detect_rows(watermarker: Any, text_ids: Sequence[Sequence[int]], prompt_ids: Sequence[Sequence[int]]) -> MoEDetectorOutput:
    """``watermarker.detect_ids`` where empty texts get z = NaN instead of an error."""
    idx = [i for i, t in enumerate(text_ids) if len(t) > 0]
    n = len(text_ids)
    full = MoEDetectorOutput(
        num_tokens_scored=np.zeros(n, dtype=np.int64),
        num_green_tokens=np.zeros(n, dtype=np.int64),
        green_fraction=np.full(n, np.nan),
        gamma_mean=np.full(n, np.nan),
        z_score=np.full(n, np.nan),
        p_value=np.full(n, np.nan),
        prediction=np.zeros(n, dtype=bool),
        notes=["empty text"] * n,
    )
    if not idx:
        return full
    det = watermarker.detect_ids([text_ids[i] for i in idx], [prompt_ids[i] for i in idx])
    for name in ("num_tokens_scored", "num_green_tokens", "green_fraction", "gamma_mean", "z_score", "p_value", "prediction"):
        values = getattr(det, name)
        target = getattr(full, name)
        if target.dtype != values.dtype:
            target = target.astype(np.result_type(target.dtype, values.dtype))
            setattr(full, name, target)
        target[idx] = values
    for j, i in enumerate(idx):
        full.notes[i] = det.notes[j] if det.notes else ""
    return full


def scores_rows(watermarker: Any, text_ids: Sequence[Sequence[int]], prompt_ids: Sequence[Sequence[int]]) -> PositionScores:
    """:func:`moewm.length_curve.position_scores` where empty texts get no scored draws."""
    idx = [i for i, t in enumerate(text_ids) if len(t) > 0]
    if not idx:
        z = torch.zeros(len(text_ids), 0)
        return PositionScores(z.bool(), z.double(), z.bool())
    ps = position_scores(watermarker, [text_ids[i] for i in idx], [prompt_ids[i] for i in idx])
    if len(idx) == len(text_ids):
        return ps
    width = ps.green.shape[1]
    green = torch.zeros(len(text_ids), width, dtype=torch.bool)
    gamma = torch.zeros(len(text_ids), width, dtype=torch.float64)
    scored = torch.zeros(len(text_ids), width, dtype=torch.bool)
    at = torch.tensor(idx)
    green[at], gamma[at], scored[at] = ps.green, ps.gamma, ps.scored
    return PositionScores(green, gamma, scored, ps.draws_per_token)


def windowed(ps: PositionScores, window: int, min_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Max-over-windows z and its Bonferroni-corrected p-value; NaN for texts under ``min_tokens``."""
    best, count = ps.window_z(window)
    best = np.where(ps.tokens_scored() < min_tokens, np.nan, best)
    return best, stats.bonferroni(stats.p_value(best), count)


# -- pieces --------------------------------------------------------------------------------------
def null_calibration(null_z: np.ndarray, threshold: float) -> dict[str, Any]:
    """Does the detector's null hold on this model's unwatermarked text? (keys in the module docstring)"""
    z = np.asarray(null_z, dtype=np.float64)
    z = z[np.isfinite(z)]
    n = len(z)
    nominal = float(norm.sf(threshold))
    out: dict[str, Any] = {"null_n": n, "false_positive_rate_nominal": nominal}
    if n < 2:
        out.update(null_z_mean=float("nan"), null_z_std=float("nan"), null_z_mean_se=float("nan"), null_z_p99=float("nan"),
                   false_positive_rate_empirical=float("nan"), null_fpr_pvalue=float("nan"), null_dispersion_pvalue=float("nan"),
                   null_ok=True)
        return out
    mean, std = float(z.mean()), float(z.std(ddof=1))
    se = std / math.sqrt(n)
    k = int((z > threshold).sum())
    fpr_p = float(binomtest(k, n, nominal, alternative="greater").pvalue)
    disp_p = float(chi2.sf((n - 1) * std**2, n - 1))  # H0: Var z = 1
    mean_bad = abs(mean) > NULL_SIGMAS * se
    fpr_bad = fpr_p < NULL_ALPHA
    disp_bad = disp_p < NULL_ALPHA
    ok = not (mean_bad or fpr_bad or disp_bad)
    if not ok:
        log.warning(
            "null calibration off on unwatermarked text: z mean %.3f (SE %.3f), std %.3f, empirical FPR %.4f vs nominal %.2e "
            "at z > %.2f (n=%d)%s%s%s",
            mean, se, std, k / n, nominal, threshold, n,
            "; mean off by > 3 SE" if mean_bad else "",
            f"; FPR above nominal (binomial p={fpr_p:.2e})" if fpr_bad else "",
            f"; variance above 1 (chi-square p={disp_p:.2e})" if disp_bad else "",
        )
    out.update(
        null_z_mean=mean,
        null_z_std=std,
        null_z_mean_se=se,
        null_z_p99=float(np.percentile(z, 99)),
        false_positive_rate_empirical=k / n,
        null_fpr_pvalue=fpr_p,
        null_dispersion_pvalue=disp_p,
        null_ok=bool(ok),
    )
    return out


def attack_metrics(ctx: Any, ev: EvalConfig, unwm_window_z: np.ndarray) -> dict[str, Any]:
    cfg = ctx.cfg
    attack = cfg.attack
    out: dict[str, Any] = {"attack_name": attack.name, "attack_strength": float(attack.strength)}
    if attack.name == "none":
        return out
    tok, wm = ctx.tokenizer, ctx.watermarker
    thr = cfg.watermark.z_threshold
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
    det = detect_rows(wm, att_ids, ctx.prompt_ids)
    sep = stats.separation(det.z_score, ctx.plain_det.z_score, thr)
    wz, wp = windowed(scores_rows(wm, att_ids, ctx.prompt_ids), ev.window, cfg.watermark.min_tokens)
    p_thr = float(norm.sf(thr))
    out.update(
        z_attacked_mean=stats.nan_safe_mean(det.z_score),
        detection_rate_attacked=sep.detection_rate,
        auc_attacked=sep.auc,
        tpr_at_1pct_fpr_attacked=sep.tpr_at_1pct_fpr,
        window_z_attacked_mean=stats.nan_safe_mean(wz),
        window_detection_rate_attacked=float(np.mean(np.nan_to_num(wp, nan=1.0) < p_thr)),
        window_auc_attacked=stats.separation(wz, unwm_window_z, thr).auc,
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
    """All evaluation metrics of one job (module docstring)."""
    t0 = time.perf_counter()
    cfg = ctx.cfg
    ev: EvalConfig = getattr(cfg, "eval", None) or EvalConfig()
    ev.validate()
    wm = ctx.watermarker
    thr = cfg.watermark.z_threshold
    min_tokens = cfg.watermark.min_tokens
    out: dict[str, Any] = {}

    out.update(null_calibration(ctx.plain_det.z_score, thr))

    wm_ps = scores_rows(wm, ctx.wm_ids, ctx.prompt_ids)
    unwm_ps = scores_rows(wm, ctx.plain_ids, ctx.prompt_ids)
    curve = length_curve(wm_ps, unwm_ps, ev.lengths, thr)
    out.update(curve)
    wz_wm, _ = windowed(wm_ps, ev.window, min_tokens)
    wz_unwm, _ = windowed(unwm_ps, ev.window, min_tokens)
    out["window_z_wm_mean"] = stats.nan_safe_mean(wz_wm)
    out["window_z_unwm_mean"] = stats.nan_safe_mean(wz_unwm)

    if ev.quality:
        out.update(quality_metrics(ctx.wm_ids, suffix="_wm"))
        out.update(quality_metrics(ctx.plain_ids, suffix="_unwm"))

    out.update(attack_metrics(ctx, ev, wz_unwm))

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
