"""Score captured texts under many keys at once: green draws, their null mass, statistics, calibrated p.

A capture (:mod:`moewm.engine.capture`) holds, per scored token, the routing features that key its green list
and the model's next-token distribution (top-K tokens and the mass left over). Scoring under a bank of
keys (:mod:`moewm.engine.keybank`) is then tensor algebra over (keys, texts, positions):

* signatures: one matrix product of the features with every key's hyperplanes; their green pools
  (:func:`moewm.engine.lsh.pool_mask`), packed into 32-bit words;
* green membership: each key's pools become a per-token bit mask; a token is green when its mask shares
  a bit with the green pools (pools overlap, so this is the exact union);
* gamma, the token's null chance of being green: ``model`` = the distribution's mass on the green list
  (top-K exactly, the rest spread evenly over the remaining usable tokens, using the exact green-list
  size); ``uniform`` = |G| / usable tokens;
* the statistic (``z``, ``llr`` or ``green``) of every key, over the whole text, sliding windows or
  every prefix.

:func:`calibrated` ranks the deployed key's statistic among R public reference keys: for text written
without the key, ``p = (1 + #{S_r >= S}) / (R + 1)`` is exact (Besag-Clifford sequential stopping: a text
stops once ``stop_after`` reference keys reach its statistic, with ``p = h / r``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from moewm.config import STATISTICS  # noqa: F401  (the allowed statistic kinds)
from moewm.engine.capture import TextCapture
from moewm.engine.keybank import KeyBank
from moewm.engine.lsh import WORD_BITS, num_words, pack_bits, pool_mask

# Elements of the largest per-block intermediate (keys x texts x positions x top-K x words).
_BLOCK_ELEMENTS = 1 << 23

# Fixed (public) coefficients for hashing (signature, token) into one integer; only used to find repeats.
_HASH_COEFFS = torch.randint(-(2**40), 2**40, (4097,), generator=torch.Generator().manual_seed(0x5EED), dtype=torch.long)


@dataclass
class CaptureBatch:
    """Captures padded to one width: features (B, n, D), tokens (B, n), top_ids / top_probs (B, n, K),
    tail (B, n), valid (B, n) marks real positions, previous (B, n) the token before each one, earlier (B, n)
    the token before that (-1 where the text has none)."""

    features: torch.Tensor
    tokens: torch.Tensor
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    tail: torch.Tensor
    valid: torch.Tensor
    previous: Optional[torch.Tensor] = None
    earlier: Optional[torch.Tensor] = None

    def tokens_before(self, count: int) -> torch.Tensor:
        """(B, n, count) the ``count`` (1 or 2) tokens before each position, oldest first."""
        if self.previous is None or (count > 1 and self.earlier is None):
            raise ValueError(f"these captures do not carry the {count} token(s) before each position (a token context of {count}): capture the texts again")
        if count == 1:
            return self.previous.unsqueeze(-1)
        return torch.stack([self.earlier, self.previous], -1)

    @staticmethod
    def stack(captures: Sequence[TextCapture], device: torch.device | str = "cpu") -> "CaptureBatch":
        n = max(1, max(c.tokens.numel() for c in captures))
        b = len(captures)
        first = captures[0]
        k = first.top_ids.shape[1]
        d = first.features.shape[1]
        features = torch.zeros(b, n, d, dtype=torch.float32)
        tokens = torch.zeros(b, n, dtype=torch.long)
        top_ids = torch.zeros(b, n, k, dtype=torch.long)
        top_probs = torch.zeros(b, n, k, dtype=torch.float32)
        tail = torch.zeros(b, n, dtype=torch.float32)
        valid = torch.zeros(b, n, dtype=torch.bool)
        previous = torch.zeros(b, n, dtype=torch.long)
        earlier = torch.full((b, n), -1, dtype=torch.long)
        for i, c in enumerate(captures):  # one copy per text into the padded block
            m = c.tokens.numel()
            features[i, :m] = c.features
            tokens[i, :m] = c.tokens
            top_ids[i, :m] = c.top_ids.long()
            top_probs[i, :m] = c.top_probs
            tail[i, :m] = c.tail
            valid[i, :m] = True
            if c.previous is not None:
                previous[i, :m] = c.previous
            if c.earlier is not None:
                earlier[i, :m] = c.earlier
        parts = (features, tokens, top_ids, top_probs, tail, valid, previous, earlier)
        return CaptureBatch(*(t.to(device) for t in parts))

    def with_top_k(self, k: int) -> "CaptureBatch":
        """The same batch keeping only the first ``k`` top tokens (their dropped mass joins the tail)."""
        if k >= self.top_ids.shape[-1]:
            return self
        dropped = self.top_probs[..., k:].sum(-1)
        return CaptureBatch(self.features, self.tokens, self.top_ids[..., :k], self.top_probs[..., :k], self.tail + dropped, self.valid,
                            self.previous, self.earlier)

    def select(self, rows: torch.Tensor) -> "CaptureBatch":
        return CaptureBatch(self.features[rows], self.tokens[rows], self.top_ids[rows], self.top_probs[rows], self.tail[rows], self.valid[rows],
                            None if self.previous is None else self.previous[rows], None if self.earlier is None else self.earlier[rows])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.tokens.shape[0]), int(self.tokens.shape[1])


@dataclass(frozen=True)
class StatisticSpec:
    """Which statistic a detector computes; the same spec scores the deployed and the reference keys."""

    kind: str = "z"
    null: str = "model"
    delta: float = 2.0
    ignore_repeated: bool = False
    margin_bits: int = 0  # margin-aware scoring: also score each position with its least certain bits flipped
    margin_scale: float = 0.5


@dataclass
class KeyDraws:
    """Per key, text and position: is the token green, its null chance of being green, is it scored."""

    green: torch.Tensor  # (R, B, n) bool (another scheme's per-position evidence, float64, summed by the ``green`` statistic)
    gamma: torch.Tensor  # (R, B, n) float64
    scored: torch.Tensor  # (R, B, n) bool
    # Margin-aware scoring: green flag and gamma averaged over a position's likely signatures (float64).
    soft_green: Optional[torch.Tensor] = None
    soft_gamma: Optional[torch.Tensor] = None


# -- the keys' green pools and token tables ---------------------------------------------------------
def projections(features: torch.Tensor, bank: KeyBank) -> torch.Tensor:
    """(R, B, n, nb) float: each key's signed distance-like projection (x - c_r) . h_r,i for every feature vector."""
    b, n, d = features.shape
    r, _, nb = bank.projection.shape
    planes = bank.projection.to(features.device)
    proj = features.reshape(b * n, d) @ planes.permute(1, 0, 2).reshape(d, r * nb)  # (B n, R nb)
    offset = torch.einsum("rd,rdk->rk", bank.center.to(features.device), planes)  # (R, nb)
    return proj.reshape(b, n, r, nb).permute(2, 0, 1, 3) - offset[:, None, None, :]


def signatures(features: torch.Tensor, bank: KeyBank) -> torch.Tensor:
    """(R, B, n, nb) bool: each key's hyperplane bits for every feature vector, from one matrix product."""
    return projections(features, bank) > 0


def bank_pool_mask(bits: torch.Tensor, bank: KeyBank, previous: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(R, B, n, nb) bool: each key's green pools for signature bits (R, B, n, nb); ``previous`` (B, n)
    holds the context tokens, used when the bank hashes one in."""
    if bank.context_tokens and previous is None:
        raise ValueError("the bank keys green lists by the previous token too (encoder.context_tokens=1): captures must carry it")
    return pool_mask(bits, bank.green_lists, bank.mixing, bank.salt, previous if bank.context_tokens else None, bank.vote_lists)


def green_pools(features: torch.Tensor, bank: KeyBank, previous: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(R, B, n, nb) bool: each key's green pools at every position (its signature through its pool mask)."""
    return bank_pool_mask(signatures(features, bank), bank, previous)


def margin_alternatives(features: torch.Tensor, bank: KeyBank, count: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The observed signature bits (R, B, n, nb), the ``count`` least certain bits (R, B, n, u) and their
    flip weights (R, B, n, u).

    A bit's certainty is its projection's magnitude relative to the position's median magnitude (scale-free
    across keys and features); the weight 0.5 * exp(-|m| / (scale * median)) is 0.5 on the hyperplane and
    falls off away from it, a heuristic (any fixed rule is valid once ranked among the reference keys).
    """
    proj = projections(features, bank)
    magnitude = proj.abs()
    u = min(int(count), magnitude.shape[-1])
    median = magnitude.median(-1, keepdim=True).values.clamp(min=1e-12)
    near, which = torch.topk(magnitude, u, dim=-1, largest=False)
    weight = 0.5 * torch.exp(-near / (scale * median))
    return proj > 0, which, weight.double()


def token_table(bank: KeyBank, device: torch.device | str = "cpu") -> torch.Tensor:
    """(V, R * W) int32: for every token and key, the bits of the key's pools that hold the token.

    Token-major, so that looking up the tokens of a text reads one contiguous row per token for all
    keys at once. A token sits at most once in a pool, so adding the bits is their OR.
    """
    r, nb, vocab_size = bank.num_keys, bank.num_bits, bank.vocab_size
    w = num_words(nb)
    if bank.pools is None:
        raise ValueError("token_table: a partition needs no token table (BankTables gathers by group)")
    pools = bank.pools.to(device)
    p = pools.shape[2]
    bit = torch.arange(nb, device=device).view(1, nb, 1).expand(r, nb, p)
    key = torch.arange(r, device=device).view(r, 1, 1).expand(r, nb, p)
    present = pools >= 0
    index = (pools * (r * w) + key * w + bit // WORD_BITS)[present]
    values = (torch.ones_like(bit) << (bit % WORD_BITS))[present]
    out = torch.zeros(vocab_size * r * w, dtype=torch.long, device=device)
    out.scatter_add_(0, index, values)
    # 32 distinct bits summed fit in 32 bits: keep the low word as int32 (two's complement for bit 31).
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32).view(vocab_size, r * w)


def pool_groups(pools: torch.Tensor, num_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each key's pool tokens grouped by the set of pools that hold them: (R, G, nb) float membership and
    (R, G) counts (0 for padding). |G_t| = sum of the counts of groups with a set bit, exact despite overlaps."""
    r, nb, p = pools.shape
    key_index = torch.arange(r, device=pools.device).view(r, 1, 1).expand(r, nb, p).reshape(-1)
    bits = torch.arange(nb, device=pools.device).view(1, nb, 1).expand(r, nb, p).reshape(-1)
    tokens = pools.reshape(-1)
    pair, pair_of = torch.unique(torch.stack([key_index, tokens], 1), dim=0, return_inverse=True)
    w = num_words(nb)
    masks = torch.zeros(pair.shape[0] * w, dtype=torch.long, device=pools.device)
    masks.scatter_add_(0, pair_of * w + bits // WORD_BITS, torch.ones_like(bits) << (bits % WORD_BITS))
    rows = torch.cat([pair[:, :1], masks.view(-1, w)], 1)  # (key, mask words) per distinct pool token
    groups, counts = torch.unique(rows, dim=0, return_counts=True)
    key_of = groups[:, 0]
    per_key = torch.bincount(key_of, minlength=r)
    g_max = int(per_key.max())
    slot = torch.arange(groups.shape[0], device=pools.device) - torch.cumsum(per_key, 0)[key_of] + per_key[key_of]
    shifts = torch.arange(WORD_BITS, device=pools.device)
    group_bits = ((groups[:, 1:, None] >> shifts) & 1).reshape(groups.shape[0], -1).float()
    membership = torch.zeros(r, g_max, w * WORD_BITS, device=pools.device)
    membership[key_of, slot] = group_bits
    count_table = torch.zeros(r, g_max, device=pools.device)
    count_table[key_of, slot] = counts.float()
    return membership[:, :, :num_bits], count_table


def green_list_size(masks: torch.Tensor, membership: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Exact |G| (pools overlap) for green-pool masks (R, ..., nb) of the keys whose groups are given."""
    r = masks.shape[0]
    hits = torch.bmm(masks.reshape(r, -1, masks.shape[-1]).float(), membership.transpose(1, 2)) > 0
    return (hits.float() * counts[:, None, :]).sum(-1).view(masks.shape[:-1]).double()


@dataclass
class BankTables:
    """What scoring derives once from a bank, on the scoring device: how to find a token's pools, and
    the pools' sizes. Overlapping pools use a token table (token -> each key's pool bits); a partition
    only the token's group (the same for every key) and, per key, the bit owning each group."""

    bank: KeyBank
    table: Optional[torch.Tensor]  # (V, R * W) int32, or None for a partition
    pool_sizes: torch.Tensor  # (R, nb) float64
    group_of: Optional[torch.Tensor] = None  # (V,) long, -1 outside the partition
    bit_of_group: Optional[torch.Tensor] = None  # (R, nb) long

    @staticmethod
    def of(bank: KeyBank, device: torch.device | str = "cpu") -> "BankTables":
        sizes = bank.pool_sizes().to(device)
        if bank.groups is not None and bank.owner is not None:
            groups = bank.groups.to(device)
            present = groups >= 0
            group_of = torch.full((bank.vocab_size,), -1, dtype=torch.long, device=device)
            group_of[groups[present]] = torch.arange(groups.shape[0], device=device).view(-1, 1).expand_as(groups)[present]
            return BankTables(bank, None, sizes, group_of, torch.argsort(bank.owner.to(device), dim=1))
        return BankTables(bank, token_table(bank, device), sizes)

    def select(self, start: int, stop: int) -> "BankTables":
        w = num_words(self.bank.num_bits)
        table = None if self.table is None else self.table[:, start * w : stop * w]
        bit_of_group = None if self.bit_of_group is None else self.bit_of_group[start:stop]
        return BankTables(self.bank.select(start, stop), table, self.pool_sizes[start:stop], self.group_of, bit_of_group)

    def green_size(self, masks: torch.Tensor) -> torch.Tensor:
        """(R, B, n) float64: the green list's size, the sum of its pools' sizes (exact for a partition,
        an upper bound of the union for overlapping pools)."""
        return torch.einsum("rbni,ri->rbn", masks.double(), self.pool_sizes)

    def green(self, tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, n, ..., R) bool: is each token (B, n, ...) green for each key, given the keys' green pools
        (R, B, n, nb) at its position."""
        r, b, n, nb = masks.shape
        extra = tokens.dim() - 2
        if self.group_of is not None and self.bit_of_group is not None:
            by_group = torch.gather(masks, 3, self.bit_of_group.view(r, 1, 1, nb).expand(r, b, n, nb))  # (R, B, n, G)
            group = self.group_of[tokens.reshape(b, n, -1)]  # (B, n, T)
            hit = torch.gather(by_group, 3, group.clamp(min=0).unsqueeze(0).expand(r, b, n, group.shape[-1])) & (group >= 0)
            return hit.permute(1, 2, 3, 0).reshape(*tokens.shape, r)
        assert self.table is not None
        w = num_words(nb)
        sig = pack_bits(masks).permute(1, 2, 0, 3).reshape(b, n, r * w)  # (B, n, R W)
        rows = self.table[tokens.reshape(-1)].view(*tokens.shape, r * w)
        hit = (rows & sig.view(b, n, *([1] * extra), r * w)) != 0
        return hit.view(*tokens.shape, r, w).any(-1) if w > 1 else hit

    @property
    def num_keys(self) -> int:
        return self.bank.num_keys

    @property
    def device(self) -> torch.device:
        return self.pool_sizes.device


# -- draws -------------------------------------------------------------------------------------------
def first_occurrences(keys: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Mask of scored positions whose key did not occur at an earlier scored position of the same row."""
    sorted_keys, order = torch.sort(keys, dim=-1, stable=True)
    s = torch.gather(scored, -1, order).long()
    new_group = torch.ones_like(sorted_keys, dtype=torch.bool)
    new_group[..., 1:] = sorted_keys[..., 1:] != sorted_keys[..., :-1]
    cs = s.cumsum(-1)
    before_total = cs - s
    start = torch.where(new_group, before_total, torch.zeros_like(before_total))
    group_before = before_total - torch.cummax(start, dim=-1).values
    keep_sorted = (s > 0) & (group_before == 0)
    keep = torch.zeros_like(scored)
    keep.scatter_(-1, order, keep_sorted)
    return keep


def _green_and_gamma(batch: CaptureBatch, tables: BankTables, spec: StatisticSpec, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n, R) green flags and gammas of every key for green pools ``masks`` (R, B, n, nb) at every position."""
    usable = tables.bank.num_usable
    green = tables.green(batch.tokens, masks) & batch.valid.unsqueeze(-1)  # (B, n, R)
    size = tables.green_size(masks).permute(1, 2, 0).clamp(max=usable)  # (B, n, R)
    if spec.null == "uniform":
        gamma = size / usable
    else:
        k = batch.top_ids.shape[-1]
        top_green = tables.green(batch.top_ids, masks).float()  # (B, n, K, R)
        weights = torch.stack([batch.top_probs.float(), torch.ones_like(batch.top_probs, dtype=torch.float32)], -1)  # (B, n, K, 2)
        sums = torch.matmul(top_green.transpose(2, 3), weights).double()  # (B, n, R, 2): green mass and count in the top K
        rest = max(usable - k, 1)
        gamma = sums[..., 0] + batch.tail.double().unsqueeze(-1) * (size - sums[..., 1]).clamp(min=0) / rest
    valid = batch.valid.unsqueeze(-1)
    gamma = torch.where(valid, gamma.clamp(0.0, 1.0), torch.zeros((), dtype=torch.float64, device=gamma.device))
    return green, gamma


def key_draws(batch: CaptureBatch, tables: BankTables, spec: StatisticSpec) -> KeyDraws:
    """Green flags and gammas of every key in ``tables`` for every position of ``batch``.

    Work is laid out (texts, positions, [top-K,] keys) so each token's pool bits for all keys are one
    contiguous row of the token table. The statistic's gamma counts the top-K tokens exactly and
    spreads the remaining mass over the rest of the green list, sized as the sum of the green pools'
    sizes (exact for a partition; for overlapping pools an upper bound of the union: exact sizes per key
    would cost more than everything else together, and any fixed rule is valid once calibrated, as long
    as every key gets the same one). With ``spec.margin_bits`` the statistic reads soft draws: each
    position's green flag and gamma averaged over its observed signature and the signatures with one
    uncertain bit flipped (:func:`margin_alternatives`); ``green`` stays the observed signature's.
    """
    bank = tables.bank
    b, n = batch.shape
    r = bank.num_keys
    soft_green = soft_gamma = None
    if spec.margin_bits > 0:
        bits, which, weight = margin_alternatives(batch.features, bank, spec.margin_bits, spec.margin_scale)
        masks = bank_pool_mask(bits, bank, batch.previous)  # (R, B, n, nb)
        green, gamma = _green_and_gamma(batch, tables, spec, masks)
        weight = weight.permute(1, 2, 0, 3)  # (B, n, R, u)
        stay = 1.0 - weight.sum(-1)
        soft_green, soft_gamma = stay * green.double(), stay * gamma
        for j in range(which.shape[-1]):  # a few uncertain bits: each flipped alone
            flip = torch.zeros_like(bits).scatter_(-1, which[..., j : j + 1], True)
            g_j, p_j = _green_and_gamma(batch, tables, spec, bank_pool_mask(bits ^ flip, bank, batch.previous))
            soft_green = soft_green + weight[..., j] * g_j.double()
            soft_gamma = soft_gamma + weight[..., j] * p_j
        soft_green, soft_gamma = soft_green.permute(2, 0, 1), soft_gamma.permute(2, 0, 1)
    else:
        masks = green_pools(batch.features, bank, batch.previous)  # (R, B, n, nb)
        green, gamma = _green_and_gamma(batch, tables, spec, masks)
    green, gamma = green.permute(2, 0, 1), gamma.permute(2, 0, 1)  # (R, B, n)
    scored = batch.valid.expand(r, b, n)
    if spec.ignore_repeated:  # each (green pools, token) pair once: repeats are not new draws
        w = num_words(bank.num_bits)
        words = pack_bits(masks).permute(1, 2, 0, 3)  # (B, n, R, W)
        coeffs = _HASH_COEFFS[: w + 1].to(words.device)
        h = (words.long() * coeffs[:w].view(1, 1, 1, w)).sum(-1).permute(2, 0, 1) + batch.tokens.unsqueeze(0) * coeffs[w]
        scored = first_occurrences(h.reshape(r * b, n), scored.reshape(r * b, n)).view(r, b, n)
    zero = torch.zeros((), dtype=gamma.dtype, device=gamma.device)
    draws = KeyDraws(green & scored, torch.where(scored, gamma, zero), scored)
    if soft_green is not None and soft_gamma is not None:
        draws.soft_green = torch.where(scored, soft_green, zero)
        draws.soft_gamma = torch.where(scored, soft_gamma, zero)
    return draws


def exact_gamma(batch: CaptureBatch, tables: BankTables, null: str) -> torch.Tensor:
    """(R, B, n) gamma with the exact green-list size (pools overlap): the diagnostics' null, computed
    for the deployed key only, where its cost does not matter."""
    bank = tables.bank
    masks = green_pools(batch.features, bank, batch.previous)
    if bank.pools is None:  # a partition: pools are disjoint, their sizes add up exactly
        size = tables.green_size(masks)
    else:
        membership, counts = pool_groups(bank.pools.to(masks.device), bank.num_bits)
        size = green_list_size(masks, membership, counts)  # (R, B, n)
    usable = bank.num_usable
    if null == "uniform":
        gamma = size / usable
    else:
        k = batch.top_ids.shape[-1]
        top_green = tables.green(batch.top_ids.long(), masks).permute(3, 0, 1, 2)  # (R, B, n, K)
        mass = (top_green.double() * batch.top_probs.double()).sum(-1)
        count = top_green.sum(-1).double()
        gamma = mass + batch.tail.double() * (size - count).clamp(min=0) / max(usable - k, 1)
    return torch.where(batch.valid, gamma.clamp(0.0, 1.0), torch.zeros((), dtype=torch.float64, device=gamma.device))


# -- statistics --------------------------------------------------------------------------------------
def per_token_terms(draws: KeyDraws, spec: StatisticSpec) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(score, variance) per position whose sums make the statistic; z uses both, llr and green the first."""
    g = draws.green.double() if draws.soft_green is None else draws.soft_green
    p = draws.gamma if draws.soft_gamma is None else draws.soft_gamma
    if spec.kind == "z":
        return g - p, p * (1 - p)
    if spec.kind == "llr":
        return g * spec.delta - torch.log1p(p * math.expm1(spec.delta)), None
    return g, None


def _finish(score: torch.Tensor, var: Optional[torch.Tensor]) -> torch.Tensor:
    if var is None:
        return score
    z = score / var.clamp(min=1e-300).sqrt()
    return torch.where(var > 0, z, torch.full_like(z, float("nan")))


def statistic(draws: KeyDraws, spec: StatisticSpec) -> torch.Tensor:
    """(R, B) statistic over each whole text."""
    score, var = per_token_terms(draws, spec)
    return _finish(score.sum(-1), None if var is None else var.sum(-1))


def prefix_statistic(draws: KeyDraws, spec: StatisticSpec) -> torch.Tensor:
    """(R, B, n): the statistic of the first m + 1 positions, for every m (NaN past a text's end)."""
    score, var = per_token_terms(draws, spec)
    out = _finish(score.cumsum(-1), None if var is None else var.cumsum(-1))
    return out


def window_statistic(draws: KeyDraws, spec: StatisticSpec, window: int, lengths: torch.Tensor) -> torch.Tensor:
    """(R, B): the largest statistic over windows of ``window`` consecutive positions (the whole text
    when it is shorter)."""
    score, var = per_token_terms(draws, spec)
    zero = torch.zeros_like(score[..., :1])
    cs = torch.cat([zero, score.cumsum(-1)], -1)
    cv = None if var is None else torch.cat([zero, var.cumsum(-1)], -1)
    n = score.shape[-1]
    whole = statistic(draws, spec)
    if n < window:
        return whole
    ws = cs[..., window:] - cs[..., :-window]
    wv = None if cv is None else cv[..., window:] - cv[..., :-window]
    values = _finish(ws, wv)
    starts = torch.arange(n - window + 1, device=score.device)
    inside = starts.view(1, 1, -1) + window <= lengths.view(1, -1, 1).to(score.device)
    values = torch.where(inside & ~torch.isnan(values), values, torch.full_like(values, float("-inf")))
    best = values.max(-1).values
    short = (lengths.to(score.device) < window).view(1, -1)
    return torch.where(short | torch.isinf(best), whole, best)


# -- calibration by reference keys ------------------------------------------------------------------
@dataclass
class CalibratedScores:
    """The deployed key's statistics and their calibrated p-values, per text (numpy, length B)."""

    statistic: np.ndarray
    p_value: np.ndarray
    keys_scored: np.ndarray  # reference keys scored before the text stopped
    window_statistic: Optional[np.ndarray] = None
    window_p_value: Optional[np.ndarray] = None
    prefix_p_value: Optional[np.ndarray] = None  # (B, n): p of every prefix (all R keys)
    draws: Optional[KeyDraws] = None  # the deployed keys' draws (R = K: one row per deployed key)
    key_p_values: Optional[np.ndarray] = None  # (K, B): p of each deployed key's statistic (row 0 is p_value)


def _block_keys(batch: CaptureBatch, tables: BankTables) -> int:
    b, n = batch.shape
    k = batch.top_ids.shape[-1] if batch.top_ids.numel() else 1
    per_key = b * n * max(k * num_words(tables.bank.num_bits), tables.bank.num_bits)
    return max(1, _BLOCK_ELEMENTS // max(per_key, 1))


def _exceed(ref: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Reference statistic at least the observed one; NaN references never count, a NaN observation always does."""
    return (ref >= observed) | torch.isnan(observed)


def calibrated(
    batch: CaptureBatch,
    true_tables: BankTables,
    ref_tables: BankTables,
    spec: StatisticSpec,
    stop_after: Optional[int] = 10,
    window: Optional[int] = None,
    prefixes: bool = False,
    top_k: Optional[int] = None,
    draws: Optional[Callable[[CaptureBatch, BankTables, StatisticSpec], KeyDraws]] = None,
) -> CalibratedScores:
    """Rank the deployed key's statistic (and window maximum) among the reference keys'.

    ``true_tables`` may hold K deployed keys (the validity study's): each key's statistic is ranked among the same
    reference draws, computed once, a text going on until every key has stopped; ``key_p_values`` holds the K
    p-values, each the one a bank of that key alone gives (windows and prefixes: one deployed key only).
    ``stop_after`` = h of Besag-Clifford (None: score every text under all R keys); ``prefixes`` also
    gives every prefix's p-value, which needs all R keys for every text; ``top_k`` limits the top
    tokens the statistic reads (the rest joins the tail). ``draws`` replaces :func:`key_draws` for another
    scheme on the same captures and banks (the routing-keyed tournament, :mod:`moewm.engine.tournament`).
    """
    key_draws_of = draws or key_draws
    lengths = batch.valid.sum(-1)
    if top_k is not None:
        batch = batch.with_top_k(top_k)
    true = key_draws_of(batch, true_tables, spec)
    deployed = statistic(true, spec)  # (K, B)
    if deployed.shape[0] > 1 and (window is not None or prefixes):
        raise ValueError("calibrated: windows and prefixes rank one deployed key at a time (true_tables holds "
                         f"{deployed.shape[0]})")
    s0 = deployed[0]  # (B,)
    w0 = window_statistic(true, spec, window, lengths)[0] if window is not None else None
    p0 = prefix_statistic(true, spec)[0] if prefixes else None
    b = s0.shape[0]
    total = ref_tables.num_keys
    h = None if (stop_after is None or prefixes) else int(stop_after)
    observed = list(deployed) + ([w0] if w0 is not None else [])
    counts = [torch.zeros(b, dtype=torch.long, device=s0.device) for _ in observed]
    stop_at = [torch.zeros(b, dtype=torch.long, device=s0.device) for _ in observed]  # r of the h-th exceedance
    prefix_counts = torch.zeros_like(p0, dtype=torch.long) if p0 is not None else None
    scored_keys = torch.zeros(b, dtype=torch.long, device=s0.device)
    active = torch.arange(b, device=s0.device)
    start = 0
    block = min(32, _block_keys(batch, ref_tables))
    while start < total and active.numel() > 0:
        stop = min(total, start + block)
        sub = batch.select(active)
        block_draws = key_draws_of(sub, ref_tables.select(start, stop), spec)
        stats_now = [statistic(block_draws, spec)] * deployed.shape[0]  # every deployed key against the same references
        if w0 is not None:
            stats_now.append(window_statistic(block_draws, spec, window, lengths[active]))
        for j, (ref, obs) in enumerate(zip(stats_now, observed)):
            hit = _exceed(ref, obs[active].unsqueeze(0))  # (keys, active)
            running = counts[j][active].unsqueeze(0) + hit.long().cumsum(0)
            if h is not None:
                reached = (running >= h) & hit & (stop_at[j][active] == 0).unsqueeze(0)
                first = torch.where(reached.any(0), reached.float().argmax(0) + start + 1, torch.zeros_like(active))
                stop_at[j][active] = torch.where(stop_at[j][active] == 0, first, stop_at[j][active])
            counts[j][active] = running[-1]
        if prefix_counts is not None:
            ref_prefix = prefix_statistic(block_draws, spec)
            prefix_counts[active] += _exceed(ref_prefix, p0[active].unsqueeze(0)).sum(0)
        scored_keys[active] += stop - start
        if h is not None:
            done = torch.stack([stop_at[j][active] > 0 for j in range(len(observed))]).all(0)
            active = active[~done]
        start = stop
        block = min(block * 2, _block_keys(batch, ref_tables))

    def p_of(j: int) -> np.ndarray:
        full = (1.0 + counts[j].double()) / (total + 1.0)
        if h is not None:
            bc = h / stop_at[j].clamp(min=1).double()
            full = torch.where(stop_at[j] > 0, bc, full)
        return full.cpu().numpy()

    prefix_p = None
    if prefix_counts is not None:
        prefix_p = ((1.0 + prefix_counts.double()) / (total + 1.0)).cpu().numpy()
        prefix_p[~batch.valid.cpu().numpy()] = np.nan
    return CalibratedScores(
        statistic=s0.cpu().numpy(),
        p_value=p_of(0),
        keys_scored=np.minimum(scored_keys.cpu().numpy(), total),
        window_statistic=None if w0 is None else w0.cpu().numpy(),
        window_p_value=None if w0 is None else p_of(1),
        prefix_p_value=prefix_p,
        draws=true,
        key_p_values=np.stack([p_of(j) for j in range(deployed.shape[0])]),
    )


def reference_statistics(
    batch: CaptureBatch,
    ref_tables: BankTables,
    spec: StatisticSpec,
    top_k: Optional[int] = None,
    draws: Optional[Callable[[CaptureBatch, BankTables, StatisticSpec], KeyDraws]] = None,
) -> torch.Tensor:
    """(R, B): every reference key's statistic on every text, no early stop (what :func:`calibrated` ranks against,
    all of it): the input of :func:`leave_one_out_p_values`. ``top_k`` and ``draws`` as in :func:`calibrated`."""
    key_draws_of = draws or key_draws
    if top_k is not None:
        batch = batch.with_top_k(top_k)
    block = _block_keys(batch, ref_tables)
    parts = [statistic(key_draws_of(batch, ref_tables.select(start, min(ref_tables.num_keys, start + block)), spec), spec)
             for start in range(0, ref_tables.num_keys, block)]
    return torch.cat(parts)


def leave_one_out_p_values(stats: torch.Tensor) -> torch.Tensor:
    """(R, B) float64: each key's calibrated p-value on each text, ranked among the other R - 1 keys.

    ``stats`` (R, B): R exchangeable keys' statistics (:func:`reference_statistics`). Key j deployed on text b gets
    ``(1 + #{i != j: stats[i, b] >= stats[j, b]}) / R``: the p-value :func:`calibrated` gives it with the other
    R - 1 keys as references (no early stop), so R keys are R draws of "a deployed key" on the same texts, which is
    what the spread of false-positive rates over keys needs. A NaN statistic never counts as a reference and gets 1.
    """
    r = stats.shape[0]
    if r < 2:
        raise ValueError(f"leave_one_out_p_values: need at least 2 keys, got {r}")
    s = stats.double().t().contiguous()  # (B, R)
    finite = ~torch.isnan(s)
    ordered = torch.where(finite, s, torch.full_like(s, float("-inf"))).sort(-1).values  # NaN references never count
    at_least = r - torch.searchsorted(ordered, s.nan_to_num(nan=float("inf")), side="left")  # keys with a statistic >= s
    p = at_least.double() / r  # the key itself is one of them: (1 + others at least as large) / R
    return torch.where(finite, p, torch.ones_like(p)).t()
