"""Statistics of per-position Bernoulli draws (the baselines' diagnostic z, windowed z) and ROC summaries.

Each scored draw has its own null probability gamma_t; the z of a text is the green count minus
sum(gamma_t), over sqrt(sum gamma_t (1 - gamma_t)). It is a diagnostic: valid p-values come from the
calibration by reference keys (moewm.engine.scoring) or the exact tails (moewm.engine.poisson_binomial).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve


def exact_gamma_z(green: torch.Tensor, gamma: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row z statistics; green/gamma/mask are (B, T), mask marks the scored positions."""
    m = mask.to(torch.float64)
    g = green.to(torch.float64) * m
    p = gamma.to(torch.float64) * m
    n = m.sum(-1)
    num_green = g.sum(-1)
    mean = p.sum(-1)
    var = (p * (1 - p)).sum(-1)
    z = (num_green - mean) / var.sqrt()
    z = torch.where(var > 0, z, torch.full_like(z, float("nan")))
    return {
        "num_tokens_scored": n.long(),
        "num_green_tokens": num_green.long(),
        "green_fraction": num_green / n.clamp(min=1),
        "gamma_mean": mean / n.clamp(min=1),
        "z_score": z,
    }


def window_z(green: torch.Tensor, gamma: torch.Tensor, mask: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max z over sliding windows of ``window`` scored tokens, and the number of windows per row.

    Rows with fewer scored tokens than ``window`` get the z of all their tokens (one window).
    """
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)  # scored positions first, in order
    n = mask.sum(-1)
    g = torch.gather(green.to(torch.float64) * mask, -1, order)
    p = torch.gather(gamma.to(torch.float64) * mask, -1, order)
    zero = torch.zeros_like(g[:, :1])
    cg = torch.cat([zero, g.cumsum(-1)], -1)
    cp = torch.cat([zero, p.cumsum(-1)], -1)
    cv = torch.cat([zero, (p * (1 - p)).cumsum(-1)], -1)
    length = g.shape[-1]
    if length >= window:
        wg = cg[:, window:] - cg[:, :-window]
        wp = cp[:, window:] - cp[:, :-window]
        wv = cv[:, window:] - cv[:, :-window]
        z = (wg - wp) / wv.clamp(min=1e-300).sqrt()
        starts = torch.arange(length - window + 1, device=g.device)
        valid = (starts.unsqueeze(0) + window <= n.unsqueeze(-1)) & (wv > 0)
        best = torch.where(valid, z, torch.full_like(z, float("-inf"))).max(-1).values
    else:
        best = torch.full((g.shape[0],), float("-inf"), dtype=torch.float64, device=g.device)
    whole = exact_gamma_z(green, gamma, mask)["z_score"]
    short = n < window
    best = torch.where(short | torch.isinf(best), whole, best)
    num_windows = torch.where(short, torch.ones_like(n), (n - window + 1).clamp(min=1))
    return best, num_windows


@dataclass
class SeparationMetrics:
    """How well scores separate watermarked (positives) from unwatermarked text (negatives)."""

    auc: float
    tpr_at_1pct_fpr: float
    detection_rate: float
    false_positive_rate: float
    null_z_mean: float
    null_z_std: float
    null_z_p99: float  # the z above which 1% of this null sample lies: compare with the threshold


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[np.isfinite(x)]


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    """TPR at the largest ROC point with FPR <= ``fpr`` (NaN scores count as negatives' lowest)."""
    pos = np.nan_to_num(np.asarray(pos, dtype=np.float64), nan=-np.inf)
    neg = np.nan_to_num(np.asarray(neg, dtype=np.float64), nan=-np.inf)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg]
    s = np.where(np.isinf(s), -1e300, s)
    fprs, tprs, _ = roc_curve(y, s)
    ok = fprs <= fpr + 1e-12
    return float(tprs[ok].max()) if ok.any() else 0.0


def separation(pos_z: np.ndarray, neg_z: np.ndarray, threshold: float) -> SeparationMetrics:
    """AUC, TPR@1%FPR, rates at the threshold, and the null's empirical distribution."""
    pos = np.asarray(pos_z, dtype=np.float64)
    neg = np.asarray(neg_z, dtype=np.float64)
    pos_f = np.nan_to_num(pos, nan=-1e300)
    neg_f = np.nan_to_num(neg, nan=-1e300)
    if len(pos) and len(neg):
        auc = float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos_f, neg_f]))
    else:
        auc = float("nan")
    finite_neg = _finite(neg)
    return SeparationMetrics(
        auc=auc,
        tpr_at_1pct_fpr=tpr_at_fpr(pos, neg, 0.01),
        detection_rate=float(np.mean(pos_f > threshold)) if len(pos) else float("nan"),
        false_positive_rate=float(np.mean(neg_f > threshold)) if len(neg) else float("nan"),
        null_z_mean=float(finite_neg.mean()) if finite_neg.size else float("nan"),
        null_z_std=float(finite_neg.std(ddof=1)) if finite_neg.size > 1 else float("nan"),
        null_z_p99=float(np.percentile(finite_neg, 99)) if finite_neg.size else float("nan"),
    )


def nan_safe_mean(values: np.ndarray) -> float:
    x = _finite(values)
    return float(x.mean()) if x.size else float("nan")


def nan_safe_std(values: np.ndarray) -> float:
    x = _finite(values)
    return float(x.std(ddof=1)) if x.size > 1 else float("nan")
