"""Several attacks in one job (``eval.attacks``), each scored against the job's nulls.

``eval.attacks`` is a list of ``name:strength`` specs (``substitution:0.3``, ``copy_paste:0.75``); a
spec without ``:strength`` takes the strength of the attack's own ``conf/attack`` file default (0.2).
Every spec edits the job's watermarked texts exactly as ``attack=<name> attack.strength=<s>`` would
(same generators, same seed ``attack.seed``), so the single ``attack=`` group and the suite agree.

Metrics, suffixed by the spec (``substitution:0.3`` -> ``_substitution_0p3``):
  detection_rate_attacked, auc_attacked, tpr_at_1pct_fpr_attacked (against every null text of the job),
  p_attacked_median, tokens_attacked_mean, attacked_changed_fraction, the survival diagnostics
  (moewm.evaluation.survival: survival_signature, survival_bitflip, survival_green, ...), and fpr_attacked: the same attack
  applied to the job's plain texts and detected (its own null: an edit made without the key must not
  make text look watermarked). copy_paste has no such null (its input already is plain text) and
  paraphrase skips it (a second paraphrasing pass; the paraphraser never sees the key, so the
  calibrated p-value is valid for its output by construction).
``tokens_to_detect_alpha_censored``: the median over all watermarked texts of the tokens after which p
stays <= alpha, a text never detected counting as infinitely long (inf when half the texts never get
there). Unlike ``tokens_to_detect_alpha`` (median over the texts that get there) it cannot hide a bad
key behind its undetected texts, which is what the key-spread target compares.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np

from moewm.config import AttackSpec, parse_attack_specs
from moewm.evaluation.attacked import attacked_detection_metrics, attacked_null_metrics
from moewm.evaluation.length_curve import tokens_to_detect

NO_ATTACKED_NULL = ("copy_paste", "paraphrase")


def suite_metrics(ctx: Any, specs: Sequence[AttackSpec], window: int | None = None) -> dict[str, Any]:
    """Per spec: detection of the attacked watermarked texts, and of the attacked plain texts (its null)."""
    if not specs:
        return {}
    t0 = time.perf_counter()
    out: dict[str, Any] = {"attack_suite": ",".join(f"{a.name}:{a.strength:g}" for a in specs)}
    for spec in specs:
        attack = dataclasses.replace(ctx.cfg.attack, name=spec.name, strength=spec.strength)
        out.update(attacked_detection_metrics(ctx, attack, window, suffix=f"_{spec.suffix}"))
        if spec.name not in NO_ATTACKED_NULL:
            out.update(attacked_null_metrics(ctx, attack, window, suffix=f"_{spec.suffix}"))
    out["attack_suite_seconds"] = time.perf_counter() - t0
    return out


def censored_tokens_to_detect(prefix_p: Sequence[np.ndarray], alpha: float) -> float:
    """Median tokens to detect over all texts, a never-detected text counting as infinitely long."""
    t = tokens_to_detect(prefix_p, alpha)
    if not len(t):
        return float("nan")
    return float(np.median(np.where(np.isfinite(t), t, np.inf)))


def tradeoff_job_metrics(ctx: Any, ev: Any) -> dict[str, Any]:
    """What a trade-off study needs of a job beyond the standard metrics: the attack suite, the censored
    tokens-to-detect, the baseline's parameters and the perplexity judge (moewm.evaluation.oracle)."""
    from moewm.evaluation.oracle import oracle_metrics

    out: dict[str, Any] = dict(ctx.watermarker.settings_metrics())
    if ctx.wm_det.prefix_p_value is not None:
        out["tokens_to_detect_alpha_censored"] = censored_tokens_to_detect(ctx.wm_det.prefix_p_value, ctx.cfg.watermark.alpha)
    out.update(suite_metrics(ctx, parse_attack_specs(getattr(ev, "attacks", None) or []), getattr(ev, "window", None)))
    out.update(oracle_metrics(ctx, ev))
    return out
