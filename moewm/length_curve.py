"""Detection versus text length, tokens to detect, and the baselines' per-position draws.

Every detector can give the p-value of each prefix of a text (MoE-LSH by ranking each prefix's
statistic among the reference keys, the baselines by the exact binomial tail of each prefix's count).
From those: the detection rate and false-positive rate at alpha after T scored tokens
(:func:`length_metrics`), and MarkMyWords' "watermark size", the tokens after which a text's p-value
stays at or below a threshold (:func:`tokens_to_detect`).

:class:`PositionScores` holds the baselines' Bernoulli draws left-aligned in reading order (KGW one per
scored token, SynthID one per token and tournament layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from scipy.stats import binom

from moewm import stats


@dataclass
class PositionScores:
    """Bernoulli draws per text, scored draws first and in reading order (padding after them).

    ``green`` (B, L) bool, ``gamma`` (B, L) float64 null probability, ``scored`` (B, L) bool;
    ``draws_per_token`` draws belong to each scored token (1, or SynthID's number of layers).
    """

    green: torch.Tensor
    gamma: torch.Tensor
    scored: torch.Tensor
    draws_per_token: int = 1

    @staticmethod
    def from_positions(green: torch.Tensor, gamma: torch.Tensor, scored: torch.Tensor, draws_per_token: int = 1) -> "PositionScores":
        """Compact per-position arrays (any padding / unscored positions) into the left-aligned form."""
        green, gamma, scored = green.cpu(), gamma.cpu().to(torch.float64), scored.cpu().bool()
        order = torch.argsort((~scored).to(torch.int8), dim=-1, stable=True)
        width = int(scored.sum(-1).max()) if scored.numel() else 0
        order = order[:, :width]
        s = torch.gather(scored, -1, order)
        return PositionScores(
            green=torch.gather(green.bool(), -1, order) & s,
            gamma=torch.where(s, torch.gather(gamma, -1, order), torch.zeros((), dtype=torch.float64)),
            scored=s,
            draws_per_token=int(draws_per_token),
        )

    @staticmethod
    def concat(parts: Sequence["PositionScores"]) -> "PositionScores":
        width = max(p.green.shape[1] for p in parts)
        m = parts[0].draws_per_token

        def pad(x: torch.Tensor, value: Any) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        return PositionScores(
            green=torch.cat([pad(p.green, False) for p in parts]),
            gamma=torch.cat([pad(p.gamma, 0.0) for p in parts]),
            scored=torch.cat([pad(p.scored, False) for p in parts]),
            draws_per_token=m,
        )

    def take(self, order: np.ndarray) -> "PositionScores":
        idx = torch.as_tensor(np.asarray(order), dtype=torch.long)
        return PositionScores(self.green[idx], self.gamma[idx], self.scored[idx], self.draws_per_token)

    def __len__(self) -> int:
        return int(self.green.shape[0])

    def tokens_scored(self) -> np.ndarray:
        return (self.scored.sum(-1) // self.draws_per_token).numpy()

    def z(self) -> np.ndarray:
        """z of all scored draws (equals the detector's z)."""
        return stats.exact_gamma_z(self.green, self.gamma, self.scored)["z_score"].numpy()

    def window_exact(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Max z over windows of ``window`` scored tokens and its p-value: the exact binomial tail of the
        best window times the number of windows (Bonferroni). Needs one gamma per text (the baselines)."""
        best, count = stats.window_z(self.green, self.gamma, self.scored, int(window) * self.draws_per_token)
        m = self.draws_per_token
        draws = self.scored.sum(-1).numpy()
        size = np.minimum(int(window) * m, draws)
        gamma = self._constant_gamma()
        # the best window's green count, recovered from its z (same size, one gamma)
        with np.errstate(invalid="ignore"):
            greens = np.round(best.numpy() * np.sqrt(size * gamma * (1 - gamma)) + size * gamma)
        tail = binom.sf(greens - 1, size, gamma)
        p = np.minimum(1.0, tail * count.numpy())
        return best.numpy(), np.where(np.isfinite(best.numpy()), p, np.nan)

    def _constant_gamma(self) -> np.ndarray:
        """Each text's one gamma (NaN for a text with no draws); refuses texts whose gammas differ."""
        g = self.gamma.numpy()
        s = self.scored.numpy()
        first = np.where(s.any(-1), g[np.arange(len(g)), s.argmax(-1)] if len(g) else np.zeros(0), np.nan)
        if not np.allclose(np.where(s, g, first[:, None]), first[:, None], equal_nan=True):
            raise ValueError("PositionScores: exact window and prefix tails need one gamma per text")
        return first

    def prefix_p_values(self) -> list[np.ndarray]:
        """Per text, the exact binomial p-value after each scored token (one gamma per text)."""
        m = self.draws_per_token
        gamma = self._constant_gamma()
        green = self.green.to(torch.int64).cumsum(-1).numpy()
        n = self.scored.to(torch.int64).cumsum(-1).numpy()
        out = []
        for i in range(len(self)):  # one vectorised tail per text
            tokens = int(self.scored[i].sum()) // m
            ends = np.arange(1, tokens + 1) * m - 1
            out.append(binom.sf(green[i, ends] - 1, n[i, ends], gamma[i]) if tokens else np.zeros(0))
        return out


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
