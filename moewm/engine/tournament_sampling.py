"""The routing tournament at generation time, fast: tokens grouped by their g-values, and a bounded candidate set.

The tournament's closed form multiplies a token's mass at layer l by ``1 + g_l(v) - G_l``, where ``G_l`` is the
g = 1 share of the layer's input distribution. Run naively it touches every (token, layer) pair with several
float64 passes over the whole vocabulary per layer; two changes make it cheap without changing what is sampled.

**Grouping (exact).** A token's multiplier after layers ``a..b`` depends only on its g-values at those layers,
i.e. on one ``b - a``-bit code. Per group of :data:`GROUP_BITS` layers, each token's code is formed with int32
arithmetic (bit 31 of ``context x token hash mod 2^32`` is the int32 sign bit, :func:`moewm.engine.tournament.g_values`),
the masses are summed into ``2^GROUP_BITS`` bins, the group's layers run on the bins, and every token is
multiplied once by its bin's product. Only the summation order differs from the layer-by-layer form: the
sampled distribution is the same up to float64 rounding.

**Candidates (bounded).** First the usable tokens within ``e^-80`` of the row's largest mass: the others hold less
than 1e-30 of the mass all together, below float64 resolution, so nothing is approximated (and tokens of
probability exactly zero, an earlier processor's -inf or a tokenizer's spare ids, are never candidates). Where that
is most of the vocabulary, tokens below ``tolerance * 2^-m / V`` of the largest mass (m layers, V tokens) form the
tail; its total share is then at most ``tolerance * 2^-m``. The tail is treated exactly as the
detector treats it (:meth:`moewm.engine.tournament.TournamentScorer.draws`: g = 1/2 at every layer, so its mass
is scaled by ``1.5 - G_l`` and kept in its own proportions). Bound on the change, in total variation against
the tournament over the whole vocabulary: write d_l for the L1 distance after layer l and t_l for the tail's
share. The layer map p -> p(1 + g - G(p)) is Lipschitz in L1 with constant 2 - G(p) (worst case: the
difference sits on g = 1 tokens), and replacing the tail's g-values by 1/2 moves the distribution by at most
t_{l-1} in L1, so

    d_l <= min(2, 2 - H_l + (d_{l-1} + t_{l-1}) / 2) d_{l-1} + t_{l-1},   d_0 = 0,   TV = d_m / 2,

with H_l the candidates' own G (computed). A priori (every factor at most 2, the tail growing at most by 1.5
per layer) TV < t_0 2^m <= ``tolerance``; :func:`tournament_ratios` also returns the run-time bound, which is
usually far smaller. Where the candidates would still be most of the vocabulary (a flat distribution) every
usable token plays, grouped, and nothing is approximated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# Layers whose g-values are read as one integer code: 2^10 bins per group.
GROUP_BITS = 10
# Below this share of the vocabulary the candidates are gathered; above it every usable token is a candidate.
CANDIDATE_SHARE = 0.25
# Natural-log distance below a row's largest mass past which a token's mass is not summed into the tail.
NEGLIGIBLE = 80.0


def as_int32(values: torch.Tensor) -> torch.Tensor:
    """32-bit values (int64 in [0, 2^32)) as int32 with the same bits (two's complement)."""
    return (((values.long() + 2**31) & 0xFFFFFFFF) - 2**31).to(torch.int32)


def layer_codes(contexts32: torch.Tensor, hashed32: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(B, k) long: bit j of a token's code is its g-value at layer ``start + j`` (layers start..stop-1).

    ``contexts32`` (B, m) int32 keyed layer contexts (odd, < 2^31), ``hashed32`` (B or 1, k) int32 token hashes. The
    int32 product wraps modulo 2^32, so its sign bit is bit 31 of ``context x hash mod 2^32``: the g-value. One
    layer at a time, so that every intermediate stays the size of the output.
    """
    b, k = contexts32.shape[0], hashed32.shape[-1]
    code = torch.zeros(b, k, dtype=torch.int32, device=contexts32.device)
    part = torch.empty_like(code)
    for j in range(stop - start):
        torch.mul(contexts32[:, start + j : start + j + 1], hashed32, out=part)
        part.bitwise_right_shift_(31 - j)  # arithmetic shift: bit j now holds the sign bit
        part.bitwise_and_(1 << j)
        code.bitwise_or_(part)
    return code.long()


def _bin_bits(width: int, device: torch.device) -> torch.Tensor:
    """(width, 2^width) float64: bit j of every bin index."""
    index = torch.arange(1 << width, device=device)
    return ((index.view(1, -1) >> torch.arange(width, device=device).view(-1, 1)) & 1).double()


@dataclass
class TournamentRatios:
    """What the tournament does to a row: each candidate's mass multiplier, the tail's, and the bound."""

    candidates: torch.Tensor  # (B, k) float64: final / initial mass of each candidate
    tail: torch.Tensor  # (B,) float64: final / initial mass of every tail token
    bound: torch.Tensor  # (B,) float64: run-time bound on the total variation from the whole-vocabulary tournament


def tournament_ratios(masses: torch.Tensor, hashed32: torch.Tensor, contexts32: torch.Tensor, tail: Optional[torch.Tensor] = None,
                      active: Optional[torch.Tensor] = None) -> TournamentRatios:
    """The closed-form tournament on candidate masses (B, k) float64 (unnormalised; padding at 0) with token
    hashes (B or 1, k) int32, layer contexts (B, m) int32, the tail's mass (B,) in the same units (None: no
    tail) and the layers played (B, m) bool (None: all)."""
    b, _ = masses.shape
    m = contexts32.shape[1]
    device = masses.device
    tail_mass = torch.zeros(b, 1, dtype=torch.float64, device=device) if tail is None else tail.double().view(b, 1)
    mass = (masses.sum(-1, keepdim=True) + tail_mass).clamp(min=1e-300)
    share = tail_mass / mass  # the tail's share of the current distribution
    tail_ratio = torch.ones_like(share)
    ratio = torch.ones_like(masses)
    current = masses
    d = torch.zeros(b, 1, dtype=torch.float64, device=device)
    for start in range(0, m, GROUP_BITS):
        stop = min(m, start + GROUP_BITS)
        codes = layer_codes(contexts32, hashed32, start, stop)
        bins = torch.zeros(b, 1 << (stop - start), dtype=torch.float64, device=device).scatter_add_(1, codes, current)
        bits = _bin_bits(stop - start, device)
        w = torch.ones_like(bins)
        for j in range(stop - start):
            played = torch.mm(bins * w, bits[j].view(-1, 1)).div_(mass)  # (B, 1): the layer's G
            if tail is not None:
                played.add_(share, alpha=0.5)
                # the bound's recurrence (module docstring), before this layer's tail update
                d_next = ((2 - played + (d + share) / 2).clamp_(max=2.0) * d + share).clamp_(max=2.0)
                tail_step = 1.5 - played
            step = (bits[j] + (1 - played)).clamp_(min=0.0)  # (B, 2^K); G a rounding above 1 leaves no negative mass
            if active is not None:
                on = active[:, start + j : start + j + 1]
                step = torch.where(on, step, 1.0)
                if tail is not None:
                    tail_step = torch.where(on, tail_step, 1.0)
                    d_next = torch.where(on, d_next, d)
            w.mul_(step)
            if tail is not None:
                tail_ratio = tail_ratio * tail_step
                share = share * tail_step
                d = d_next
        factor = w.gather(1, codes)
        ratio = ratio * factor
        current = current * factor
    return TournamentRatios(ratio, tail_ratio.view(-1), d.view(-1) / 2)


@dataclass
class Candidates:
    """Which tokens of each row the tournament plays exactly: all usable ones (``index`` None) or a gathered set."""

    index: Optional[torch.Tensor]  # (B, k) long token ids (padding repeats a row's first id, with ``valid`` False)
    valid: Optional[torch.Tensor]  # (B, k) bool
    tail: Optional[torch.Tensor]  # (B,) float64: the usable tokens left out, their mass over the row's largest
    top: torch.Tensor  # (B, 1): log of the row's largest usable mass

    @property
    def gathered(self) -> bool:
        return self.index is not None


def _gather(rows: torch.Tensor, cols: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) ids and validity of row-sorted (row, col) pairs, padding repeating each row's first id."""
    counts = torch.bincount(rows, minlength=b)
    k = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    index = torch.zeros(b, k, dtype=torch.long, device=rows.device)
    valid = torch.zeros(b, k, dtype=torch.bool, device=rows.device)
    index[rows, slot] = cols
    valid[rows, slot] = True
    return torch.where(valid, index, index[:, :1]), valid


def _pairs(mask: torch.Tensor, vocab: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The (row, col) pairs of ``mask``, or None when some row has more than :data:`CANDIDATE_SHARE` of the
    vocabulary (counted first: a flat row then costs one pass, not a list of every token)."""
    if int(torch.count_nonzero(mask, -1).max()) > CANDIDATE_SHARE * vocab:
        return None
    return mask.nonzero(as_tuple=True)


def candidates(log_mass: torch.Tensor, usable: torch.Tensor, layers: int, tolerance: float,
               usable_index: Optional[torch.Tensor] = None) -> Candidates:
    """The candidate set of rows of log-masses (B, V) (-inf where the token cannot be drawn).

    First every usable token within ``exp(-NEGLIGIBLE)`` of the row's largest usable mass (the rest holds less than
    1e-30 of the mass, below float64 resolution: nothing is approximated). Where that is more than
    :data:`CANDIDATE_SHARE` of the vocabulary, the tokens above ``tolerance * 2^-layers / V`` of the largest mass
    (so below that share of the usable mass) with the others as the tail, whose mass comes in units of the
    largest mass (``tail``). Where that too is most of the vocabulary, every usable token plays (``gathered`` False).
    ``usable_index``: the ids of the usable tokens, when they are not all (only their columns are read then;
    derived from ``usable`` when not given).
    """
    b, v = log_mass.shape
    if usable_index is None and not bool(usable[:v].all()):
        usable_index = torch.nonzero(usable[:v]).view(-1)
    x = log_mass if usable_index is None else log_mass.index_select(1, usable_index)  # (B, U)
    top = x.max(-1, keepdim=True).values.clamp(min=-1e30)  # a row without usable mass: nothing but zeros
    near = x > top - NEGLIGIBLE
    pairs = _pairs(near, v)
    tail = torch.zeros(b, dtype=torch.float64, device=log_mass.device)
    if pairs is None and tolerance > 0:
        cut = top + math.log(tolerance * 2.0 ** -layers / v)
        keep = x > cut
        pairs = _pairs(keep, v)
        if pairs is not None:
            rows, cols = (near & ~keep).nonzero(as_tuple=True)
            tail.index_add_(0, rows, torch.exp(x[rows, cols].double() - top[rows, 0].double()))
    if pairs is None or pairs[0].numel() == 0:
        return Candidates(None, None, None, top)
    rows, cols = pairs
    index, valid = _gather(rows, cols if usable_index is None else usable_index[cols], b)
    return Candidates(index, valid, tail, top)
