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


def layer_codes(contexts32: torch.Tensor, hashed32: torch.Tensor, start: int, stop: int,
                work: Optional["Workspace"] = None) -> torch.Tensor:
    """(B, k) long: bit j of a token's code is its g-value at layer ``start + j`` (layers start..stop-1).

    ``contexts32`` (B, m) int32 keyed layer contexts (odd, < 2^31), ``hashed32`` (B or 1, k) int32 token hashes. The
    int32 product wraps modulo 2^32, so its sign bit is bit 31 of ``context x hash mod 2^32``: the g-value; an
    arithmetic shift by 31 makes it 0 or -1, subtracted at weight 2^j. One layer at a time, so that every
    intermediate stays the size of the output (``work``: reused buffers, the result included).
    """
    b, k = contexts32.shape[0], hashed32.shape[-1]
    device = contexts32.device
    fresh = work if work is not None else Workspace()
    code = fresh.buffer("code32", (b, k), torch.int32, device).zero_()
    part = fresh.buffer("part32", (b, k), torch.int32, device)
    for j in range(stop - start):
        torch.mul(contexts32[:, start + j : start + j + 1].contiguous(), hashed32, out=part)
        part.bitwise_right_shift_(31)  # arithmetic shift: -1 where the sign bit (the g-value) is set, else 0
        code.sub_(part, alpha=1 << j)
    return fresh.buffer("codes", (b, k), torch.long, device).copy_(code)


class Workspace:
    """Buffers the size of the vocabulary, kept between decoding steps: the whole-vocabulary path allocates none.

    On the 2-core CPU VM a fresh 1 MiB tensor can cost more in page faults than the arithmetic on it
    (``process_scores`` on 16 x 8,192 flat rows, one thread: 17.7 ms with fresh tensors, 7.8 ms with the same code
    and glibc told to keep freed memory, 5.8 ms with these buffers); reusing them saves that without touching the
    process's allocator. Not for two threads at once: one key, one decoding loop.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The named buffer of this shape, dtype and device (contents left from its last use)."""
        held = self._buffers.get(name)
        if held is None or held.shape != torch.Size(shape) or held.dtype != dtype or held.device != torch.device(device):
            held = torch.empty(shape, dtype=dtype, device=device)
            self._buffers[name] = held
        return held

    def bin_bits(self, width: int, device: torch.device) -> torch.Tensor:
        held = self._buffers.get(f"bits{width}")
        if held is None or held.device != torch.device(device):
            held = self._buffers[f"bits{width}"] = _bin_bits(width, device)
        return held


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
        group_active = None if active is None else active[:, start:stop]
        if tail is None:
            w = _group_weights(bins, mass, bits, group_active)
        else:
            w, tail_ratio, share, d = _group_weights_with_tail(bins, mass, bits, group_active, tail_ratio, share, d)
        factor = w.gather(1, codes)
        ratio = ratio * factor
        current = current * factor
    return TournamentRatios(ratio, tail_ratio.view(-1), d.view(-1) / 2)


def whole_vocabulary_log_ratios(mass: torch.Tensor, hashed32: torch.Tensor, contexts32: torch.Tensor,
                                active: Optional[torch.Tensor], work: Workspace) -> torch.Tensor:
    """(B, V) float64 log of each token's tournament multiplier, for unnormalised masses (B, V) float64 (0 where a
    token cannot be drawn; overwritten) over the whole vocabulary, with no tail: :func:`tournament_ratios`' arithmetic
    group by group, the log of each group's bin weights gathered and summed, every (B, V) tensor a ``work`` buffer
    (the result too)."""
    b, v = mass.shape
    m = contexts32.shape[1]
    device = mass.device
    total = mass.sum(-1, keepdim=True).clamp_(min=1e-300)
    log_ratio = work.buffer("log_ratio", (b, v), torch.float64, device)
    factor = work.buffer("factor", (b, v), torch.float64, device)
    starts = list(range(0, m, GROUP_BITS))
    for start in starts:
        stop = min(m, start + GROUP_BITS)
        codes = layer_codes(contexts32, hashed32, start, stop, work)
        bins = torch.zeros(b, 1 << (stop - start), dtype=torch.float64, device=device).scatter_add_(1, codes, mass)
        w = _group_weights(bins, total, work.bin_bits(stop - start, device), None if active is None else active[:, start:stop])
        torch.gather(torch.log(w), 1, codes, out=log_ratio if start == 0 else factor)
        if start:
            log_ratio.add_(factor)
        if start != starts[-1]:
            torch.gather(w, 1, codes, out=factor)
            mass.mul_(factor)
    return log_ratio


def _group_weights(bins: torch.Tensor, total: torch.Tensor, bits: torch.Tensor, active: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, 2^K) each bin's multiplier over a group of K layers without a tail (bins: the group's input mass per code;
    ``bits`` (K, 2^K) from :func:`_bin_bits`).

    The bins' share of the row is carried from layer to layer (G is then one matrix-vector product) and the
    multiplier read off at the end; four small operations a layer, where the cost is the number of operations,
    not their size. A bin without mass gets 1 (only tokens of zero mass read it).
    """
    current = bins / total
    steps = bits + 1  # 1 + g
    for j in range(bits.shape[0]):
        played = torch.mv(current, bits[j]).unsqueeze(-1)  # (B, 1): the layer's G
        step = (steps[j] - played).clamp_(min=0.0)  # G a rounding above 1 leaves no negative mass
        current.mul_(step if active is None else torch.where(active[:, j : j + 1], step, 1.0))
    return torch.where(bins > 0, current * total / bins, 1.0)


def _group_weights_with_tail(bins: torch.Tensor, mass: torch.Tensor, bits: torch.Tensor, active: Optional[torch.Tensor],
                             tail_ratio: torch.Tensor, share: torch.Tensor, d: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_group_weights` beside a tail at g = 1/2: the bins' multipliers, and the tail's ratio, share and the
    bound's L1 distance (module docstring) carried through the group's layers."""
    w = torch.ones_like(bins)
    for j in range(bits.shape[0]):
        played = torch.mm(bins * w, bits[j].view(-1, 1)).div_(mass).add_(share, alpha=0.5)  # (B, 1): the layer's G
        # the bound's recurrence (module docstring), before this layer's tail update
        d_next = ((2 - played + (d + share) / 2).clamp_(max=2.0) * d + share).clamp_(max=2.0)
        tail_step = 1.5 - played
        step = (bits[j] + (1 - played)).clamp_(min=0.0)  # (B, 2^K); G a rounding above 1 leaves no negative mass
        if active is not None:
            on = active[:, j : j + 1]
            step = torch.where(on, step, 1.0)
            tail_step = torch.where(on, tail_step, 1.0)
            d_next = torch.where(on, d_next, d)
        w.mul_(step)
        tail_ratio = tail_ratio * tail_step
        share = share * tail_step
        d = d_next
    return w, tail_ratio, share, d


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
