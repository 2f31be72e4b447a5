"""Detection versus text length, and windowed detection, from per-position scores.

Every watermark here scores a text as a sum of Bernoulli draws with known null probabilities:
MoE-LSH and KGW one draw per scored token (green or not, probability gamma_t), SynthID one draw per
token and tournament layer (g = 1 or not, probability p0). :class:`PositionScores` holds those draws
left-aligned in reading order, so the z-score of the first T scored tokens is a difference of cumulative
sums: one vectorised pass gives z at every length.

Length-curve metrics at each T (``lengths``) compare watermarked texts with unwatermarked texts cut to
the same number of scored tokens; texts with fewer than T scored tokens are left out at that T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

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

    def z_at_lengths(self, lengths: Sequence[int]) -> np.ndarray:
        """(B, len(lengths)) z of the first T scored tokens; NaN where a text has fewer than T."""
        m = self.draws_per_token
        g = self.green.to(torch.float64)
        p = self.gamma
        zero = torch.zeros(g.shape[0], 1, dtype=torch.float64)
        cg = torch.cat([zero, g.cumsum(-1)], -1)
        cp = torch.cat([zero, p.cumsum(-1)], -1)
        cv = torch.cat([zero, (p * (1 - p)).cumsum(-1)], -1)
        n = self.scored.sum(-1)
        out = np.full((g.shape[0], len(lengths)), np.nan)
        for j, t in enumerate(lengths):  # a handful of lengths, each a vectorised gather
            k = int(t) * m
            if k > g.shape[1]:
                continue
            z = (cg[:, k] - cp[:, k]) / cv[:, k].clamp(min=1e-300).sqrt()
            ok = (n >= k) & (cv[:, k] > 0)
            out[:, j] = torch.where(ok, z, torch.full_like(z, float("nan"))).numpy()
        return out

    def window_z(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Max z over windows of ``window`` scored tokens (moewm.stats.window_z) and the window count.

        Windows slide by one draw, so with several draws per token (SynthID) the count (used for the
        Bonferroni correction) is the number of draw-aligned windows actually searched.
        """
        best, count = stats.window_z(self.green, self.gamma, self.scored, int(window) * self.draws_per_token)
        return best.numpy(), count.numpy()


def _moe_position_scores(wm: Any, text_ids: Sequence[Sequence[int]], prompt_ids: Sequence[Sequence[int]], batch_size: int) -> PositionScores:
    rows = [list(p) + list(t) for p, t in zip(prompt_ids, text_ids)]
    order = np.argsort([-len(r) for r in rows], kind="stable")
    parts = []
    for start in range(0, len(rows), batch_size):
        idx = order[start : start + batch_size]
        s = wm.token_scores([rows[i] for i in idx], [len(prompt_ids[i]) for i in idx])
        parts.append(PositionScores.from_positions(s["green"], s["gamma"], s["scored"]))
    return PositionScores.concat(parts).take(np.argsort(order, kind="stable"))


def position_scores(
    watermarker: Any,
    text_ids: Sequence[Sequence[int]],
    prompt_ids: Optional[Sequence[Sequence[int]]] = None,
    batch_size: Optional[int] = None,
) -> PositionScores:
    """Per-position draws of any watermarker: its own ``position_scores`` or MoE-LSH's ``token_scores``."""
    if len(text_ids) == 0:
        raise ValueError("text_ids: no texts to score")
    if hasattr(watermarker, "position_scores"):
        return watermarker.position_scores(text_ids, prompt_ids)
    if not hasattr(watermarker, "token_scores"):
        raise TypeError(f"{type(watermarker).__name__} has neither position_scores nor token_scores")
    if prompt_ids is None:
        prompt_ids = [watermarker.encode_prompt(None) for _ in text_ids]
    bs = batch_size or watermarker.watermark_cfg.detect_batch_size
    return _moe_position_scores(watermarker, text_ids, prompt_ids, bs)


def length_curve(
    wm_scores: PositionScores,
    null_scores: PositionScores,
    lengths: Sequence[int],
    z_threshold: float,
    min_fraction: float = 0.5,
) -> dict[str, float]:
    """Metrics at each length T that at least ``min_fraction`` of both text sets reach.

    Keys per T: ``z_wm_at_T`` / ``z_unwm_at_T`` (mean z of the first T scored tokens),
    ``tpr_at_T`` (TPR at 1% FPR against the unwatermarked texts at the same T), ``detection_rate_at_T``
    and ``fpr_at_T`` (z > threshold), ``n_wm_at_T`` / ``n_unwm_at_T`` (texts long enough).
    """
    lengths = [int(t) for t in lengths]
    zw = wm_scores.z_at_lengths(lengths)
    zn = null_scores.z_at_lengths(lengths)
    out: dict[str, float] = {}
    for j, t in enumerate(lengths):
        pos = zw[:, j][np.isfinite(zw[:, j])]
        neg = zn[:, j][np.isfinite(zn[:, j])]
        if len(pos) < max(1, min_fraction * len(zw)) or len(neg) < max(1, min_fraction * len(zn)):
            continue
        out[f"z_wm_at_{t}"] = float(pos.mean())
        out[f"z_unwm_at_{t}"] = float(neg.mean())
        out[f"tpr_at_{t}"] = stats.tpr_at_fpr(pos, neg, 0.01)
        out[f"detection_rate_at_{t}"] = float(np.mean(pos > z_threshold))
        out[f"fpr_at_{t}"] = float(np.mean(neg > z_threshold))
        out[f"n_wm_at_{t}"] = int(len(pos))
        out[f"n_unwm_at_{t}"] = int(len(neg))
    return out
