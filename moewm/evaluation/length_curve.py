"""Detection versus text length and tokens to detect.

Every detector can give the p-value of each prefix of a text (MoE-LSH by ranking each prefix's
statistic among the reference keys, the baselines by the exact binomial tail of each prefix's count).
From those: the detection rate and false-positive rate at alpha after T scored tokens
(:func:`length_metrics`), and MarkMyWords' "watermark size", the tokens after which a text's p-value
stays at or below a threshold (:func:`tokens_to_detect`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np



def tokens_to_detect(prefix_p: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """Per text, the number of scored tokens after which its p-value stays <= ``threshold`` (NaN: never)."""
    out = np.full(len(prefix_p), np.nan)
    for i, p in enumerate(prefix_p):  # one vectorised scan per text
        p = np.asarray(p, dtype=np.float64)
        if p.size == 0 or not p[-1] <= threshold:
            continue
        above = np.nonzero(~(p <= threshold))[0]
        out[i] = (above[-1] + 2) if above.size else 1
    return out


def tokens_to_detect_metrics(prefix_p: Sequence[np.ndarray], thresholds: dict[str, float], suffix: str = "") -> dict[str, float]:
    """Median tokens to detect (over texts that get there) and the share never detected, per threshold."""
    out: dict[str, float] = {}
    for name, thr in thresholds.items():
        t = tokens_to_detect(prefix_p, thr)
        ok = np.isfinite(t)
        out[f"tokens_to_detect_{name}{suffix}"] = float(np.median(t[ok])) if ok.any() else float("nan")
        out[f"never_detected_{name}{suffix}"] = float(1.0 - ok.mean()) if len(t) else float("nan")
    return out


def length_metrics(
    wm_prefix: Sequence[np.ndarray],
    null_prefix: Sequence[np.ndarray],
    lengths: Sequence[int],
    alpha: float,
    min_fraction: float = 0.5,
) -> dict[str, float]:
    """At each length T that at least ``min_fraction`` of both sets reach: ``detection_rate_at_T`` and
    ``fpr_at_T`` (p of the first T scored tokens <= alpha), ``n_wm_at_T`` / ``n_unwm_at_T``."""
    out: dict[str, float] = {}
    for t in (int(x) for x in lengths):
        pos = np.array([p[t - 1] for p in wm_prefix if len(p) >= t])
        neg = np.array([p[t - 1] for p in null_prefix if len(p) >= t])
        if len(pos) < max(1, min_fraction * len(wm_prefix)) or len(neg) < max(1, min_fraction * len(null_prefix)):
            continue
        out[f"detection_rate_at_{t}"] = float(np.mean(pos <= alpha))
        out[f"fpr_at_{t}"] = float(np.mean(neg <= alpha))
        out[f"n_wm_at_{t}"] = int(len(pos))
        out[f"n_unwm_at_{t}"] = int(len(neg))
    return out
