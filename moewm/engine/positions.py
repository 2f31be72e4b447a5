"""Per-position Bernoulli draws of the n-gram schemes (KGW one per scored token, SynthID one per token and
tournament layer), left-aligned in reading order, with their exact binomial tails: whole text, best window,
and every prefix; and what keys each position's draw (:class:`PositionContexts`, every scheme's answer to
``position_contexts``, read by the survival diagnostics)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy.stats import binom

from moewm.engine import stats


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


@dataclass
class PositionContexts:
    """What keys the green draw of each scored position of one text under one key, in reading order: what the
    survival diagnostics (:mod:`moewm.evaluation.survival`) compare between a text and its edited version.

    ``positions`` (n,) int64: the token's index in the text ids; ``tokens`` (n,) int64; ``context`` (n, c): what
    the green list is keyed on (MoE-LSH: the routing signature's bits; KGW / SynthID: the n-gram context ids);
    ``green_list`` (n, g): the green list's own key (MoE-LSH: the green pools, which ``encoder.green_lists``
    derives from the signature; the n-gram schemes: the context again); ``green`` (n, m) bool: the token's draws
    under the key (m = 1, SynthID one per tournament layer); ``scored`` (n,) bool: counted by detection (repeats
    excluded as detection excludes them); ``evidence`` (n,) float64: the token's standardised green excess
    sum_draws (g - gamma) / sqrt(gamma (1 - gamma)) / sqrt(m), 0 where not scored, in z units for every scheme
    (a text's z is about sqrt(tokens) times its mean); ``bits``: whether ``context`` holds signature bits.
    """

    positions: np.ndarray
    tokens: np.ndarray
    context: np.ndarray
    green_list: np.ndarray
    green: np.ndarray
    scored: np.ndarray
    evidence: np.ndarray
    bits: bool = False

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @classmethod
    def of_routing_batch(cls, captures: Sequence[Any], context: torch.Tensor, green_list: torch.Tensor, green: torch.Tensor,
                         scored: torch.Tensor, evidence: torch.Tensor) -> list["PositionContexts"]:
        """One per capture of a routing scheme's batch: each batched tensor (B, n, ...) cut to the capture's scored
        positions (``context`` the signature bits, so ``bits`` is set). Captures without text positions (cache
        version 1) are refused: the diagnostics align positions between a text and its edit."""
        out = []
        for i, c in enumerate(captures):
            if c.positions is None:
                raise ValueError("position_contexts: this capture predates text positions (capture cache version 1); capture the text again")
            m = c.num_scored
            out.append(cls(positions=c.positions.numpy().astype(np.int64), tokens=c.tokens.numpy().astype(np.int64),
                           context=context[i, :m].cpu().numpy(), green_list=green_list[i, :m].cpu().numpy(),
                           green=green[i, :m].cpu().numpy(), scored=scored[i, :m].cpu().numpy(),
                           evidence=evidence[i, :m].cpu().numpy(), bits=True))
        return out

    @staticmethod
    def standardised(green: torch.Tensor, gamma: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """(..., n) evidence from draws (..., n, m) with null probabilities gamma (..., n, m); 0 where not scored."""
        g, p = green.double(), gamma.double()
        var = (p * (1 - p)).clamp(min=1e-300)
        term = torch.where(p > 0, (g - p) / var.sqrt(), torch.zeros_like(g)).sum(-1) / math.sqrt(green.shape[-1])
        return torch.where(scored, term, torch.zeros_like(term))
