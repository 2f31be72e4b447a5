"""Routing-keyed tournament sampling: SynthID's tournament with g-values keyed by routing sub-signatures.

SynthID-Text (Dathathri et al., 2024) samples through a tournament of ``m`` layers; layer l scores every
token v with a pseudo-random bit g_l(v) keyed by the n-gram before it, and the 2-candidate tournament has
the closed form ``p_l(v) = p_{l-1}(v) (1 + g_l(v) - sum_u p_{l-1}(u) g_l(u))``. Here the context is the
routing instead of the n-gram: layer l's g-values are a keyed hash of (key salt, l, the layer's block of
``b`` routing-signature bits, token), the block being bits ``l*b .. l*b+b-1`` taken cyclically over the
signature. One flipped signature bit therefore changes only the layers whose block holds it (with 32
bits, 20 layers and b = 4 about 2.5 of 20), where a hash of the whole signature changes every green list.

The signature bits are MoE-LSH's (:func:`moewm.engine.scoring.signatures` of a :class:`~moewm.engine.keybank.KeyBank`),
so the deployed key and the reference keys come from the same bank code and the detector ranks the
deployed key's statistic among the reference keys' (:func:`moewm.engine.scoring.calibrated` with
:meth:`TournamentScorer.draws`): exact p-values whatever wrote the text. The g-value salt of each key is a
public function of the bank's keyed salt (domain-separated from the hashed green lists), so nothing new
is drawn per key.

Statistics (``watermark.statistic``), each summed over scored (position, layer) units:

* ``green``: g_l(x_t), SynthID's mean-score numerator;
* ``z``: g_l(x_t) - E_p[g_l], centred on the model's own next-token distribution p (captured top-K tokens
  exactly, the tail at 1/2): positions where the model was sure add nothing but noise otherwise;
* ``llr``: log(1 + g_l(x_t) - G_l), the exact log-likelihood ratio of the tournament against the model,
  G_l computed on the intermediate distributions p_{l-1} of the captured top-K (tail at g = 1/2).

With ``watermark.tournament.context_tokens=c`` (1 or 2; the default is 2) each layer's context is (its block of signature bits, the c tokens
before): a 32-bit hash of both (:func:`context_codes`), so a fixed key's g-values are drawn afresh for every
(routing block, previous tokens) pair, as KGW's are for every previous token, instead of once per block code.
Two tokens make a context rarer across texts (a fixed key's genre luck shrinks) and let one substituted token
break three positions' contexts instead of two.

Hashing is integer arithmetic (:func:`moewm.engine.lsh._mix32`), exact on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moewm.engine.lsh import _MASK32, _ROUND, _mix32, mix32_int32_
from moewm.engine.scoring import BankTables, CaptureBatch, KeyDraws, StatisticSpec, first_occurrences, signatures
from moewm.engine.tournament_sampling import (
    Candidates,
    TournamentRatios,
    Workspace,
    as_int32,
    candidates,
    tournament_ratios,
    whole_vocabulary_log_ratios,
)

# Domain separation of the tournament's salts from the hashed green lists' (public constant).
_DOMAIN = 0x7F4A7C15
_HALF = 0x7FFFFFFF
# Public constant of the token hash.
_TOKEN = 0x2545F491
# Public constants separating the previous tokens' hashes from the block code's.
_PREVIOUS = 0x5851F42D
_EARLIER = 0x14057B7E
# The token id standing for "no token here" (a context reaching before the text's first token).
NO_TOKEN = -1
# Contexts remembered per text and layer for ``skip_repeated``: 2^16 slots at most.
REPEAT_TABLE_BITS = 16
# Default total-variation tolerance of the generation tournament's candidate set (TournamentConfig.sample_tolerance).
SAMPLE_TOLERANCE = 1e-6


def layer_blocks(num_bits: int, layers: int, block_bits: int) -> torch.Tensor:
    """(layers, block_bits) long: the signature bits keying each layer, l*b + j mod num_bits."""
    l = torch.arange(layers).view(-1, 1)
    j = torch.arange(block_bits).view(1, -1)
    return (l * block_bits + j) % num_bits


def block_codes(bits: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(..., m) long in [0, 2^b): each layer's block of signature bits (..., nb) read as an integer."""
    starts = _cyclic_starts(blocks, bits.shape[-1])
    if starts is not None and bits.dtype == torch.bool and bits.shape[-1] % 8 == 0 and bits.shape[-1] <= 32:
        # The blocks are runs of consecutive bits (cyclically): pack each signature into one integer once,
        # then every layer's block is a shift and a mask of it (doubled, so that a run may wrap around).
        nb = bits.shape[-1]
        packed = pack_signatures(bits)
        doubled = (packed | (packed << nb)).unsqueeze(-1)
        return (doubled >> starts.to(bits.device)) & ((1 << blocks.shape[1]) - 1)
    picked = bits[..., blocks.to(bits.device)].long()  # (..., m, b)
    shifts = torch.arange(blocks.shape[1], device=bits.device, dtype=torch.long)
    return (picked << shifts).sum(-1)


# Gathers the lowest bit of each of a word's 8 bytes into its top byte (no two products share a bit, so no carries).
_BYTE_GATHER = 0x0102040810204080


def pack_signatures(bits: torch.Tensor) -> torch.Tensor:
    """(...,) long: signature bits (..., nb) bool, nb a multiple of 8 up to 32, as the integer sum of bit i << i.

    A bool is one byte holding 0 or 1: eight of them read as one int64 word, times :data:`_BYTE_GATHER` (modulo
    2^64), carry those bytes' bits into the top byte, so a signature packs with a few operations per 8 bits
    instead of one per bit."""
    nb = bits.shape[-1]
    words = bits.contiguous().view(torch.uint8).view(*bits.shape[:-1], nb // 8, 8).view(torch.int64).squeeze(-1)  # (..., nb / 8)
    top = ((words * _signed64(_BYTE_GATHER)) >> 56) & 0xFF
    shifts = torch.arange(0, nb, 8, device=bits.device, dtype=torch.long)
    return (top << shifts).sum(-1)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _cyclic_starts(blocks: torch.Tensor, num_bits: int) -> Optional[torch.Tensor]:
    """(m,) first bit of each layer's block when every block is consecutive bits (cyclically), else None."""
    b = blocks.shape[1]
    start = blocks[:, :1]
    if not bool((blocks == (start + torch.arange(b, device=blocks.device)) % num_bits).all()):
        return None
    return start.view(-1)


def context_codes(codes: torch.Tensor, before: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., m) long: each layer's context code. Routing alone (``before`` None): the block codes themselves;
    routing + tokens (``before`` (..., c), the c tokens before each position, oldest first, :data:`NO_TOKEN`
    where the text has none): a 32-bit hash of (block code, those tokens), a bijection of the block code for
    fixed tokens, so distinct blocks stay distinct contexts."""
    if before is None:
        return codes
    token = tokens_hash(before.to(codes.device))
    return _mix32((codes ^ token.unsqueeze(-1)) & _MASK32)


def tokens_hash(before: torch.Tensor) -> torch.Tensor:
    """(...,) long 32-bit hash of the c tokens before each position (..., c), oldest first: what a layer's block code
    is hashed with in :func:`context_codes`."""
    before = before.long()
    token = _mix32((before[..., -1] ^ _PREVIOUS) & _MASK32)
    if before.shape[-1] > 1:  # the token two before, folded in (c = 1 keeps its own hash)
        token = _mix32(token ^ ((before[..., -2] ^ _EARLIER) & _MASK32))
    return token


def routed_positions(before: torch.Tensor, routed_contexts: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(...,) bool: the positions whose tokens before (..., c) are one of ``routed_contexts`` (sorted
    :func:`tokens_hash` values, public), the only ones whose layers read the routing; None: every position."""
    if routed_contexts is None:
        return None
    return torch.isin(tokens_hash(before), routed_contexts.to(before.device))


def layer_codes(bits: torch.Tensor, blocks: torch.Tensor, routing_layers: int, before: Optional[torch.Tensor] = None,
                routed_contexts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., m) each layer's context code: its routing block (the first ``routing_layers`` layers; the others'
    blocks are 0, so their context is the tokens before alone) with the tokens before hashed in (:func:`context_codes`).
    ``routing_layers=0`` is the design's routing-free twin: SynthID's tournament keyed by the token context only.
    ``routed_contexts``: the routing is read only at positions whose tokens before are one of these
    (:func:`routed_positions`); elsewhere every layer is keyed by the tokens alone, as in the twin."""
    codes = block_codes(bits, blocks)
    if routing_layers < codes.shape[-1]:
        routed = torch.arange(codes.shape[-1], device=codes.device) < routing_layers
        codes = codes * routed
    if routed_contexts is not None and before is not None:
        codes = codes * routed_positions(before, routed_contexts).unsqueeze(-1)
    return context_codes(codes, before)


def layer_contexts32(bits: torch.Tensor, blocks: torch.Tensor, routing_layers: int, salts: torch.Tensor,
                     before: Optional[torch.Tensor] = None, routed_contexts: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every key's context codes and keyed layer contexts, layers before positions: (R, B, m, n) int32 each.

    The bits of :func:`layer_codes` (the 32-bit code as two's complement) and of :func:`context_hash`, computed
    where detection spends its time (keys x texts x positions x layers) with half the memory traffic: the block
    codes only for the distinct blocks (with 32 signature bits and 8-bit blocks, 4 of 20 layers) and gathered per
    layer, the tokens' hash and the mixers in int32 in place, and the layout the first-occurrence sort reads
    without a copy. ``bits`` (R, B, n, nb) bool, ``salts`` (R, m) from :func:`layer_salts`, ``before`` (B, n, c),
    ``routed_contexts`` as in :func:`layer_codes`.
    """
    m = blocks.shape[0]
    distinct, layer_of = torch.unique(blocks, dim=0, return_inverse=True)
    codes = block_codes(bits, distinct).to(torch.int32)  # (R, B, n, u): block codes < 2^b
    if routed_contexts is not None and before is not None:
        codes = codes * routed_positions(before.to(codes.device), routed_contexts).unsqueeze(-1)
    if routing_layers < m:  # the layers keyed by tokens alone read a block code of 0
        codes = torch.cat([codes, torch.zeros_like(codes[..., :1])], -1)
        layer_of = torch.where(torch.arange(m) < routing_layers, layer_of, distinct.shape[0])
    codes = codes.permute(0, 1, 3, 2).contiguous().index_select(2, layer_of.to(codes.device))  # (R, B, m, n)
    if before is not None:
        token = tokens_hash(before.to(codes.device))
        mix32_int32_(codes.bitwise_xor_(as_int32(token).unsqueeze(-2)))  # context_codes, bit for bit
    r = codes.shape[0]
    ctx = as_int32(salts.to(codes.device)).view(r, 1, m, 1) ^ codes
    mix32_int32_(ctx).bitwise_and_(_HALF).bitwise_or_(1)  # context_hash, bit for bit
    return codes, ctx


def tokens_before(input_ids: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) the last ``count`` ids of every row, oldest first, :data:`NO_TOKEN` before a row's start."""
    width = input_ids.shape[1]
    if width >= count:
        return input_ids[:, width - count :]
    pad = torch.full((input_ids.shape[0], count - width), NO_TOKEN, dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([pad, input_ids], dim=1)


def layer_salts(salt: torch.Tensor, layers: int) -> torch.Tensor:
    """(R, m) long 32-bit salts of every key's layers, a public function of the keys' salts (R,)."""
    base = _mix32((salt.long() & _MASK32) ^ _DOMAIN)
    rounds = (_ROUND * torch.arange(1, layers + 1, device=salt.device, dtype=torch.long)) & _MASK32
    return _mix32(base.view(-1, 1) ^ rounds.view(1, -1))


def context_hash(salts: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(R, ..., m): each layer's keyed context, an odd 31-bit multiplier, from layer salts (R, m) and block codes (R, ..., m)."""
    shape = (salts.shape[0],) + (1,) * (codes.dim() - 2) + (salts.shape[1],)
    return (_mix32(salts.view(shape) ^ codes) & _HALF) | 1


def token_hash(tokens: torch.Tensor) -> torch.Tensor:
    """Public 32-bit hash of token ids (key-free: computed once per batch, not per key)."""
    return _mix32((tokens.long() ^ _TOKEN) & _MASK32)


def repeat_slot(codes: torch.Tensor, block_bits: int) -> torch.Tensor:
    """Which slot of a per-text table of 2^min(b, 16) contexts a block code occupies (``skip_repeated``):
    the code itself up to 16 bits, a public 16-bit hash of it beyond (a collision only skips a layer more)."""
    return codes if block_bits <= REPEAT_TABLE_BITS else _mix32(codes) & ((1 << REPEAT_TABLE_BITS) - 1)


def first_slots(slots: torch.Tensor, scored: torch.Tensor, slot_bits: int) -> torch.Tensor:
    """(rows, n) bool: scored positions whose slot (< 2^slot_bits) no earlier scored position of the row holds.

    :func:`moewm.engine.scoring.first_occurrences` for small integer keys, with one plain sort: every position
    sorts by (slot, position), unscored ones under a slot past all others, so the first of each slot's run is
    its first occurrence; the keys are unique, so the (unstable) sort is deterministic.
    """
    n = slots.shape[-1]
    width = max(1, (n - 1).bit_length())
    kind = torch.int32 if slot_bits + 1 + width <= 31 else torch.long
    slot = torch.where(scored, slots, 1 << slot_bits).to(kind)
    key = (slot << width) | torch.arange(n, device=slots.device, dtype=kind)
    ordered, order = torch.sort(key, dim=-1)
    run = ordered >> width
    first = torch.ones_like(run, dtype=torch.bool)
    first[..., 1:] = run[..., 1:] != run[..., :-1]
    first &= run < (1 << slot_bits)
    return torch.zeros_like(scored).scatter_(-1, order, first)


def g_values(context: torch.Tensor, hashed_tokens: torch.Tensor) -> torch.Tensor:
    """0/1 long g-values: bit 31 of context x token hash mod 2^32 (multiply-shift; shapes broadcast).

    ``context`` from :func:`context_hash` (odd, < 2^31), ``hashed_tokens`` from :func:`token_hash`, so the
    product stays below 2^63. For a fixed context the map is a bijection of the token hashes mod 2^32:
    exactly half of all hash values get g = 1. Three integer operations per value, where a full mixer
    takes ten: detection hashes every top token under every key and layer.
    """
    return ((context * hashed_tokens) >> 31) & 1


class TournamentKey:
    """One key's tournament at generation time: g-values of the whole vocabulary and the tournament itself."""

    def __init__(self, salt: torch.Tensor, num_bits: int, layers: int, block_bits: int, usable: torch.Tensor,
                 context_tokens: int = 0, routing_layers: Optional[int] = None, tolerance: float = SAMPLE_TOLERANCE,
                 routed_contexts: Optional[torch.Tensor] = None) -> None:
        self.blocks = layer_blocks(num_bits, layers, block_bits)
        # Sorted token-context hashes at which the routing is read (None: everywhere); see routed_positions.
        self.routed_contexts = routed_contexts
        self.routing_layers = layers if routing_layers is None else int(routing_layers)
        self.block_bits = block_bits
        self.context_tokens = int(context_tokens)
        # Bits of a context code (what ``repeat_slot`` sees): the block's, or a 32-bit hash with the token.
        self.code_bits = 32 if self.context_tokens else block_bits
        self.salts = layer_salts(salt.view(1), layers)  # (1, m)
        self.usable = usable.bool()
        self.layers = layers
        # Total variation allowed between the sampled distribution and the whole-vocabulary tournament.
        self.tolerance = float(tolerance)
        self._hashes: Optional[torch.Tensor] = None
        self._indices: Optional[tuple[int, Optional[torch.Tensor], torch.Tensor]] = None  # (V, usable ids, unusable ids)
        self._work = Workspace()  # the whole-vocabulary path's buffers, reused from step to step

    def to(self, device: torch.device | str) -> "TournamentKey":
        self.blocks, self.salts, self.usable = self.blocks.to(device), self.salts.to(device), self.usable.to(device)
        if self.routed_contexts is not None:
            self.routed_contexts = self.routed_contexts.to(device)
        self._hashes = None
        self._indices = None
        self._work = Workspace()
        return self

    def codes(self, bits: torch.Tensor, before: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, m) context codes of signatures (B, nb) and, with ``context_tokens`` = c, the c tokens before (B, c)."""
        if self.context_tokens:
            if before is None or before.dim() != 2 or before.shape[1] < self.context_tokens:
                raise ValueError(f"this tournament keys its layers by the {self.context_tokens} token(s) before too "
                                 f"(watermark.tournament.context_tokens={self.context_tokens}): pass them as a (B, {self.context_tokens}) tensor")
            before = before[:, before.shape[1] - self.context_tokens :]
        return layer_codes(bits.to(self.salts.device), self.blocks, self.routing_layers, before if self.context_tokens else None,
                           self.routed_contexts)

    def contexts(self, bits: torch.Tensor, before: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, m) keyed layer contexts for signatures (B, nb) (and the tokens before, (B, c))."""
        return context_hash(self.salts, self.codes(bits, before).unsqueeze(0))[0]

    def token_hashes(self, vocab: int, device: torch.device) -> torch.Tensor:
        """(1, V) int32 hashes of the whole vocabulary (key-free; computed once per size and device)."""
        cached = self._hashes
        if cached is None or cached.shape[1] != vocab or cached.device != device:
            cached = as_int32(token_hash(torch.arange(vocab, device=device))).view(1, -1)
            self._hashes = cached
        return cached

    def ratios(self, masses: torch.Tensor, index: Optional[torch.Tensor], contexts: torch.Tensor, tail: Optional[torch.Tensor],
               active: Optional[torch.Tensor]) -> TournamentRatios:
        """The tournament's mass multipliers for candidate masses (B, k) (``index`` their ids; None: the whole vocabulary)."""
        hashed = self.token_hashes(masses.shape[-1], masses.device) if index is None else as_int32(token_hash(index))
        return tournament_ratios(masses, hashed, as_int32(contexts), tail, active)

    def sample_distribution(self, probs: torch.Tensor, bits: torch.Tensor, active: Optional[torch.Tensor] = None,
                            before: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, V): the tournament's output distribution for the model's (B, V) and signatures (B, nb).

        The tournament runs on the usable tokens' renormalised mass (what a capture records); special and
        unusable tokens keep their probability exactly, so they never gain (or lose) mass. ``active`` (B, m)
        bool: the layers played at each row (a layer not played leaves the distribution as it is);
        ``before`` (B, c): the tokens before, when the context holds them. Tokens below ``tolerance * 2^-m / V``
        of the usable mass play as one tail at g = 1/2 (:mod:`moewm.engine.tournament_sampling`: total variation
        from the whole-vocabulary tournament at most ``tolerance``).
        """
        ctx = self.contexts(bits, before)
        usable = self.usable[: probs.shape[-1]]
        cand = candidates(torch.log(probs), usable, self.layers, self.tolerance, self._usable_index(probs.shape[-1]))
        if not cand.gathered:
            q = probs * usable
            return q * self.ratios(q, None, ctx, None, active).candidates + probs * ~usable
        assert cand.index is not None and cand.valid is not None and cand.tail is not None
        picked = probs.gather(1, cand.index) * cand.valid
        r = self.ratios(picked, cand.index, ctx, cand.tail * torch.exp(cand.top.double().view(-1)), active)
        out = probs * torch.where(usable, r.tail.unsqueeze(-1), 1.0)  # the tail (and zero-mass tokens) scaled alike
        return _scatter_candidates(out, cand, picked * r.candidates)

    def process_scores(self, scores: torch.Tensor, bits: torch.Tensor, temperature: float = 1.0,
                       active: Optional[torch.Tensor] = None, before: Optional[torch.Tensor] = None, inplace: bool = False) -> torch.Tensor:
        """Logits whose softmax at ``temperature`` is the tournament of softmax(scores / temperature).

        transformers applies its temperature warper after custom processors, so the output is ``scores +
        temperature * log(tournament mass / model mass)`` up to a constant per row (which softmax drops): the
        warper divides it back to exactly the tournament's distribution. With gathered candidates only they
        are handled in float64; the tail is the reference of the row's constant, so its logits stay as they are
        (``inplace``: written into ``scores``, as a logits processor may, saving a copy of the vocabulary).
        """
        ctx = self.contexts(bits, before)
        usable = self.usable[: scores.shape[-1]]
        tempered = scores.float() if temperature == 1.0 else scores.float() / temperature
        cand = candidates(tempered, usable, self.layers, self.tolerance, self._usable_index(scores.shape[-1]))
        if not cand.gathered:
            return self._whole_vocabulary_scores(scores, temperature, cand.top, ctx, active, inplace)
        assert cand.index is not None and cand.valid is not None and cand.tail is not None
        picked_scores = scores.gather(1, cand.index).double()
        picked = torch.exp(picked_scores / temperature - cand.top.double()) * cand.valid
        r = self.ratios(picked, cand.index, ctx, cand.tail, active)
        out = scores if inplace else scores.clone()
        if not bool((cand.tail > 0).any()):
            # No tail: the tokens left out (special ones, zero or below e^-80 of the top) keep their logits, and so
            # their mass (the last below float64 resolution: their scaling by the tail's ratio is not worth a pass).
            return _scatter_candidates(out, cand, (picked_scores + torch.log(r.candidates) * temperature).to(scores.dtype), inplace=True)
        # Relative to the tail (left as it is): a candidate moves by its ratio over the tail's, a special token against it.
        relative = torch.log(r.candidates / r.tail.unsqueeze(-1)) * temperature
        unusable = self._unusable_index(scores.shape[-1])
        if unusable.numel():
            shift = (torch.log(r.tail) * temperature).to(scores.dtype).unsqueeze(-1)
            out.index_copy_(1, unusable, out.index_select(1, unusable) - shift)
        return _scatter_candidates(out, cand, (picked_scores + relative).to(scores.dtype), inplace=True)

    def _whole_vocabulary_scores(self, scores: torch.Tensor, temperature: float, top: torch.Tensor, ctx: torch.Tensor,
                                 active: Optional[torch.Tensor], inplace: bool) -> torch.Tensor:
        """:meth:`process_scores` where every usable token plays (flat rows): the masses relative to the row's top,
        the log multipliers, and the shifted logits, all in the key's reused buffers (a step allocates nothing the
        size of the vocabulary but its output, and not that one ``inplace``)."""
        b, v = scores.shape
        mass = self._work.buffer("mass", (b, v), torch.float64, scores.device).copy_(scores)
        if temperature != 1.0:
            mass.div_(temperature)
        unusable = self._unusable_index(v)
        if unusable.numel():
            mass.index_fill_(1, unusable, float("-inf"))
        mass.sub_(top.double()).exp_()  # unnormalised: the tournament divides by the row's mass itself
        shift = whole_vocabulary_log_ratios(mass, self.token_hashes(v, scores.device), as_int32(ctx), active, self._work)
        if unusable.numel():
            shift.index_fill_(1, unusable, 0.0)  # special tokens keep their logits
        if temperature != 1.0:
            shift.mul_(temperature)
        shift.add_(scores)
        return scores.copy_(shift) if inplace else shift.to(scores.dtype, copy=True)  # never the buffer itself

    def _usable_index(self, vocab: int) -> Optional[torch.Tensor]:
        """Ids of the usable tokens (None when every token is usable), cached per vocabulary size."""
        if self._indices is None or self._indices[0] != vocab:
            usable = self.usable[:vocab]
            self._indices = (vocab, None if bool(usable.all()) else torch.nonzero(usable).view(-1), torch.nonzero(~usable).view(-1))
        return self._indices[1]

    def _unusable_index(self, vocab: int) -> torch.Tensor:
        self._usable_index(vocab)
        assert self._indices is not None
        return self._indices[2]


def _scatter_candidates(out: torch.Tensor, cand: Candidates, values: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``out`` with the candidates' ``values`` written in; a padding slot rewrites its row's first candidate alike."""
    assert cand.index is not None and cand.valid is not None
    first = torch.where(cand.valid[:, :1], values[:, :1], out.gather(1, cand.index[:, :1]))
    values = torch.where(cand.valid, values, first)
    return out.scatter_(1, cand.index, values) if inplace else out.scatter(1, cand.index, values)


@dataclass
class TournamentUnits:
    """Per key, text, position and layer: the observed token's g-value, its null mean, whether it is scored."""

    g: torch.Tensor  # (R, B, n, m) bool
    expected: torch.Tensor  # (R, B, n, m) float64: E_p[g_l] under the captured model distribution
    scored: torch.Tensor  # (R, B, n, m) bool


class TournamentScorer:
    """Scores captures under a bank of keys: g-values of the observed tokens and the chosen statistic.

    ``draws`` plugs into :func:`moewm.engine.scoring.calibrated` (with a ``green`` spec): it returns
    :class:`~moewm.engine.scoring.KeyDraws` whose ``green`` holds each position's evidence (the statistic's
    per-position sum over layers, float64) and ``scored`` the positions with at least one scored unit.
    """

    def __init__(self, num_bits: int, layers: int, block_bits: int, statistic: str, ignore_repeated: bool, vocab_size: int,
                 skip_repeated: bool = False, context_tokens: int = 0, routing_layers: Optional[int] = None,
                 routed_contexts: Optional[torch.Tensor] = None) -> None:
        self.blocks = layer_blocks(num_bits, layers, block_bits)
        self.routing_layers = layers if routing_layers is None else int(routing_layers)
        self.routed_contexts = routed_contexts  # as TournamentKey's
        self.block_bits = block_bits
        self.context_tokens = int(context_tokens)
        self.code_bits = 32 if self.context_tokens else block_bits
        self.skip_repeated = skip_repeated
        self.layers = layers
        self.statistic = statistic
        self.ignore_repeated = ignore_repeated
        self.vocab_size = int(vocab_size)

    def contexts(self, batch: CaptureBatch, tables: BankTables) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, B, n, m) context codes and keyed layer contexts of every key at every position (int64 views of
        :meth:`contexts32`: :func:`layer_codes` and :func:`context_hash`)."""
        codes, ctx = self.contexts32(batch, tables)
        return (codes.long() & _MASK32).permute(0, 1, 3, 2), ctx.long().permute(0, 1, 3, 2)

    def contexts32(self, batch: CaptureBatch, tables: BankTables) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, B, m, n) int32 context codes and keyed layer contexts (:func:`layer_contexts32`)."""
        bank = tables.bank
        bits = signatures(batch.features, bank)  # (R, B, n, nb)
        before = batch.tokens_before(self.context_tokens) if self.context_tokens else None
        return layer_contexts32(bits, self.blocks, self.routing_layers, layer_salts(bank.salt.to(bits.device), self.layers), before,
                                self.routed_contexts)

    def scored_units(self, batch: CaptureBatch, codes: torch.Tensor) -> torch.Tensor:
        """(R, B, n, m) bool: valid positions, each (layer, context code, token) unit once when ``ignore_repeated``;
        with ``skip_repeated`` only a layer context's first occurrence in the text (generation played no other)."""
        r, b, n, m = codes.shape
        scored = batch.valid.view(1, b, n, 1).expand(r, b, n, m)
        if self.skip_repeated:
            slots = repeat_slot(codes, self.code_bits).permute(0, 1, 3, 2).reshape(-1, n)
            rows = first_slots(slots, scored.permute(0, 1, 3, 2).reshape(-1, n), min(self.code_bits, REPEAT_TABLE_BITS))
            return rows.view(r, b, m, n).permute(0, 1, 3, 2)
        if self.ignore_repeated:
            unit = codes * self.vocab_size + batch.tokens.view(1, b, n, 1)
        else:
            return scored
        rows = first_occurrences(unit.permute(0, 1, 3, 2).reshape(-1, n), scored.permute(0, 1, 3, 2).reshape(-1, n))
        return rows.view(r, b, m, n).permute(0, 1, 3, 2)

    def units(self, batch: CaptureBatch, tables: BankTables) -> TournamentUnits:
        """Every unit's g-value and its null mean under the model (for diagnostics: one key at a time is cheap)."""
        codes, ctx = self.contexts(batch, tables)
        g = g_values(ctx, token_hash(batch.tokens).unsqueeze(0).unsqueeze(-1)).bool()
        top = token_hash(batch.top_ids).unsqueeze(0)
        expected = torch.stack([self._expected(batch, ctx[..., l], top) for l in range(self.layers)], -1).double()
        return TournamentUnits(g, expected, self.scored_units(batch, codes))

    @staticmethod
    def _expected(batch: CaptureBatch, ctx: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """(R, B, n) E_p[g] of one layer: the captured top-K exactly, the tail at 1/2 (``top``: hashed top ids)."""
        g = g_values(ctx.unsqueeze(-1), top).float()  # (R, B, n, K)
        return torch.einsum("rbnk,bnk->rbn", g, batch.top_probs.float()) + 0.5 * batch.tail.float()

    def draws(self, batch: CaptureBatch, tables: BankTables, spec: Optional[StatisticSpec] = None) -> KeyDraws:
        """Per-position evidence of every key in ``tables`` (see the class docstring); layers loop, nothing else."""
        if self.statistic == "green" and (self.skip_repeated or not self.ignore_repeated):
            return self._green_draws(batch, tables)
        codes, ctx = self.contexts(batch, tables)
        scored = self.scored_units(batch, codes)  # (R, B, n, m)
        g = g_values(ctx, token_hash(batch.tokens).unsqueeze(0).unsqueeze(-1))  # (R, B, n, m) long 0/1
        if self.statistic == "green":  # an integer count per position: summed as integers, exact as float64
            evidence = g.masked_fill_(~scored, 0).sum(-1).double()  # (R, B, n)
            return KeyDraws(evidence, torch.zeros_like(evidence), scored.any(-1))
        g = g.float()
        top = token_hash(batch.top_ids).unsqueeze(0)  # (1, B, n, K)
        if self.statistic == "z":
            terms = torch.stack([g[..., l] - self._expected(batch, ctx[..., l], top) for l in range(self.layers)], -1)
        else:  # llr: the tournament on the captured distribution, layer by layer
            r = ctx.shape[0]
            q = batch.top_probs.float().unsqueeze(0).expand(r, *batch.top_probs.shape)
            tail = batch.tail.float().unsqueeze(0).expand(r, *batch.tail.shape)
            parts = []
            for l in range(self.layers):
                hit = g_values(ctx[..., l].unsqueeze(-1), top).float()  # (R, B, n, K)
                played = (q * hit).sum(-1) + 0.5 * tail
                parts.append(torch.log1p((g[..., l] - played).clamp(min=-1 + 1e-6)))
                q = q * (1 + hit - played.unsqueeze(-1))
                tail = tail * (1.5 - played)
            terms = torch.stack(parts, -1)
        zero = torch.zeros((), dtype=torch.float64, device=terms.device)
        evidence = torch.where(scored, terms.double(), zero).sum(-1)  # (R, B, n)
        return KeyDraws(evidence, torch.zeros_like(evidence), scored.any(-1))

    def _green_draws(self, batch: CaptureBatch, tables: BankTables) -> KeyDraws:
        """The ``green`` count per position in int32, layers before positions (the shipped design's detection):
        the same evidence as the general path, bit for bit, without its int64 passes and permuted copies."""
        codes, ctx = self.contexts32(batch, tables)  # (R, B, m, n)
        r, b, m, n = codes.shape
        scored = batch.valid.to(codes.device).view(1, b, 1, n).expand(r, b, m, n)
        if self.skip_repeated:
            slots = codes if self.code_bits <= REPEAT_TABLE_BITS else mix32_int32_(codes).bitwise_and_((1 << REPEAT_TABLE_BITS) - 1)
            scored = first_slots(slots.view(-1, n), scored.reshape(-1, n), min(self.code_bits, REPEAT_TABLE_BITS)).view(r, b, m, n)
        hashed = as_int32(token_hash(batch.tokens.to(codes.device))).view(1, b, 1, n)
        green = torch.lt(ctx.mul_(hashed), 0).logical_and_(scored)  # g: bit 31 of context x token hash mod 2^32
        evidence = green.sum(-2, dtype=torch.int32).double()  # (R, B, n)
        return KeyDraws(evidence, torch.zeros_like(evidence), scored.any(-2))

