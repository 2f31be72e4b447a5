"""Keyed SimHash encoder: hyperplanes turn a feature vector into bits; each bit owns a pool of tokens.

The green list at a position is the union of the green pools. Which pools are green is
:func:`pool_mask` of the signature bits: pool i when bit i is 1 (``encoder.green_lists=bits``, the
seed's design: similar routing gives a similar green list), or a keyed hash of the whole signature
(``hashed``: every distinct signature its own green list, so a text's green draws stay independent
even when its routing dwells in one region), or a majority vote of ``vote_lists`` lists, each a keyed
hash of its own block of bits (``vote``: one flipped bit re-draws one list, so most of the green list
survives a small routing change); with ``green_bits=m`` a pool needs m keyed bits at 1, and with
``context_tokens=1`` the token before the scored one is hashed in too (routing + token context). Pools overlap, so the green
list's size varies from position to position; the encoder therefore reports it exactly
(:meth:`LSHEncoder.green_size`) instead of assuming ``num_bits * pool_size / 2``.

Variants (``encoder.kind``) differ only in how features are projected, all under the same key:
``simhash`` random Gaussian hyperplanes through the origin; ``centered`` the same after subtracting the
calibration mean; ``whitened`` hyperplanes drawn in the whitened space (Sigma^-1/2); ``pca`` the top
principal directions mixed by a keyed random rotation. The pools themselves are drawn in
:mod:`moewm.engine.keybank`, which builds the deployed key and the reference keys by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moewm.config import ConfigError, EncoderConfig
from moewm.engine.keys import WatermarkKey

WORD_BITS = 32
_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2^31, so a 32-bit value times it stays inside int64
_ROUND = 0x9E3779B1


def num_words(num_bits: int) -> int:
    return (num_bits + WORD_BITS - 1) // WORD_BITS


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., nb) bool -> (..., W) int32 words of 32 bits (bit 31 is the sign bit: only & and != 0 read them)."""
    nb = bits.shape[-1]
    w = num_words(nb)
    padded = torch.nn.functional.pad(bits.to(torch.int32), (0, w * WORD_BITS - nb))
    shifts = torch.arange(WORD_BITS, device=bits.device, dtype=torch.int32)
    return (padded.reshape(*bits.shape[:-1], w, WORD_BITS) << shifts).sum(-1, dtype=torch.int32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values in [0, 2^32) (exact on any device).

    Large tensors are mixed as int32 in place (a product wraps modulo 2^32 there, and a logical shift is an
    arithmetic one masked): the same bits at half the memory traffic and without int64 multiplies, about twice
    as fast on a CPU; detection mixes every key, position and layer."""
    if x.dtype == torch.int64 and x.numel() >= _MIX_INT32_FROM:
        return mix32_int32_(x.to(torch.int32)).long().bitwise_and_(_MASK32)  # the low 32 bits, two's complement
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def mix32_int32_(y: torch.Tensor) -> torch.Tensor:
    """:func:`_mix32` in place on an int32 tensor holding 32-bit values as two's complement (the same bits): a
    product wraps modulo 2^32 there, and a logical shift is an arithmetic one masked. Returns ``y``."""
    t = torch.empty_like(y)
    for _ in range(2):
        torch.bitwise_right_shift(y, 16, out=t).bitwise_and_(0xFFFF)
        y.bitwise_xor_(t).mul_(_MIX)
    torch.bitwise_right_shift(y, 16, out=t).bitwise_and_(0xFFFF)
    return y.bitwise_xor_(t)


# Elements from which :func:`_mix32` works in int32.
_MIX_INT32_FROM = 1 << 16


def hashed_bits(bits: torch.Tensor, salt: torch.Tensor, rounds: int, context: Optional[torch.Tensor] = None,
                out_bits: Optional[int] = None) -> torch.Tensor:
    """(rounds, R, ..., out_bits) bool: pseudo-random bits from a keyed hash of each whole signature.

    ``bits`` (R, ..., nb) are R keys' signatures and ``salt`` (R,) their keyed 32-bit salts; every
    distinct (salt, signature[, context]) gives independent-looking output bits. ``context`` (...,) long,
    broadcast over keys, is mixed into the hash (the previous token of ``encoder.context_tokens``);
    ``out_bits`` (default nb) is how many bits each round gives (a sub-signature still picks every pool).
    """
    nb = bits.shape[-1]
    out_bits = nb if out_bits is None else int(out_bits)
    words = pack_bits(bits).long() & _MASK32  # (R, ..., W)
    shape = (-1,) + (1,) * (words.dim() - 2)
    h = salt.to(words.device).long().view(shape) & _MASK32
    for w in range(words.shape[-1]):
        h = _mix32(h ^ words[..., w])
    if context is not None:  # token ids < 2^31: one more mixing round keyed by the context token
        h = _mix32(h ^ ((context.to(h.device).long() * _ROUND) & _MASK32).unsqueeze(0))
    shifts = torch.arange(WORD_BITS, device=bits.device, dtype=torch.long)
    out = []
    for j in range(rounds):
        chunks = [_mix32(h ^ ((_ROUND * (j * 64 + c + 1)) & _MASK32)) for c in range(num_words(out_bits))]
        unpacked = (torch.stack(chunks, -1).unsqueeze(-1) >> shifts) & 1  # (R, ..., W, 32)
        out.append(unpacked.flatten(-2)[..., :out_bits].bool())
    return torch.stack(out)


def vote_blocks(num_bits: int, lists: int) -> list[tuple[int, int]]:
    """[start, stop) of the signature bits that key each of ``lists`` sub-signature lists (contiguous, sizes
    differing by at most one, covering every bit)."""
    edges = [round(j * num_bits / lists) for j in range(lists + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _list_salt(salt: torch.Tensor, j: int) -> torch.Tensor:
    return _mix32((salt.long() & _MASK32) ^ ((_ROUND * (7919 * (j + 1))) & _MASK32))


def pool_mask(bits: torch.Tensor, mode: str, mixing: torch.Tensor, salt: torch.Tensor,
              context: Optional[torch.Tensor] = None, lists: int = 1) -> torch.Tensor:
    """(R, ..., nb) bool: which pools are green, from R keys' signature bits (R, ..., nb).

    ``bits`` mode: pool i is green when bits mixing[r, j, i] are 1 for every j (mixing[:, 0] is the
    identity, so with one round pool i follows bit i). ``hashed`` mode: the same AND over rounds of
    bits drawn from a keyed hash of the whole signature. ``vote`` mode: ``lists`` sub-signature lists,
    list j a keyed hash of its own block of bits (:func:`vote_blocks`) choosing pools like ``hashed``;
    a pool is green when a strict majority of lists choose it, so a flipped bit re-draws one list and
    moves only the pools that list decided. ``context`` (..., ) long, when given, is hashed in too
    (``hashed`` and ``vote`` only).
    """
    rounds = mixing.shape[1]
    nb = bits.shape[-1]
    if mode == "hashed":
        return hashed_bits(bits, salt, rounds, context).all(0)
    if mode == "vote":
        votes = torch.zeros(bits.shape, dtype=torch.int16, device=bits.device)
        for j, (lo, hi) in enumerate(vote_blocks(nb, lists)):
            votes += hashed_bits(bits[..., lo:hi], _list_salt(salt, j), rounds, context, out_bits=nb).all(0)
        return votes * 2 > lists
    if context is not None:
        raise ValueError("pool_mask: a context token needs hashed or vote green lists (encoder.green_lists)")
    if rounds == 1:
        return bits
    r = bits.shape[0]
    flat = bits.reshape(r, -1, nb)
    index = mixing.to(bits.device).unsqueeze(1).expand(r, flat.shape[1], rounds, nb)
    gathered = torch.gather(flat.unsqueeze(2).expand(r, flat.shape[1], rounds, nb), 3, index)
    return gathered.all(2).view(bits.shape)


@dataclass(frozen=True)
class CalibrationStats:
    """Mean and covariance of feature vectors on a calibration set (for the geometric encoder variants)."""

    mean: torch.Tensor  # (D,)
    cov: torch.Tensor  # (D, D)
    count: int


def _gaussian(key: WatermarkKey, purpose: str, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=key.generator(purpose), dtype=torch.float64)


def _orthogonal(key: WatermarkKey, purpose: str, n: int) -> torch.Tensor:
    q, r = torch.linalg.qr(_gaussian(key, purpose, n, n))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar-distributed


def projection_for(
    cfg: EncoderConfig, key: WatermarkKey, dim: int, calibration: Optional[CalibrationStats]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hyperplanes (D, num_bits) and the centre subtracted before projecting, as float64 on the CPU."""
    nb = cfg.num_bits
    if cfg.routing_free:  # the routing-free twin: every signature bit 0 whatever the features (for every key alike)
        return torch.zeros(dim, nb, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    if cfg.kind == "simhash":
        return _gaussian(key, "hyperplanes", dim, nb), torch.zeros(dim, dtype=torch.float64)
    if calibration is None:
        raise ConfigError(f"encoder.kind={cfg.kind!r} needs calibration statistics (mean/covariance of features)")
    if calibration.mean.numel() != dim:
        raise ConfigError(f"calibration statistics have dimension {calibration.mean.numel()}, the extractor gives {dim}")
    mean = calibration.mean.double().cpu()
    if cfg.kind == "centered":
        return _gaussian(key, "hyperplanes", dim, nb), mean
    cov = calibration.cov.double().cpu()
    eigvals, eigvecs = torch.linalg.eigh(cov)
    if cfg.kind == "whitened":
        eps = cfg.whitening_eps * max(float(eigvals.clamp(min=0).mean()), 1e-12)
        inv_sqrt = eigvecs @ torch.diag((eigvals.clamp(min=0) + eps).rsqrt()) @ eigvecs.T
        return inv_sqrt @ _gaussian(key, "hyperplanes", dim, nb), mean
    # pca: the top principal directions, mixed by a keyed rotation so that each bit is a random
    # direction inside the data's principal subspace rather than a fixed, public axis.
    order = torch.argsort(eigvals, descending=True)
    rank = min(nb, dim)
    top = eigvecs[:, order[:rank]]  # (D, rank)
    rotation = _orthogonal(key, "pca-rotation", rank)
    planes = top @ rotation  # (D, rank)
    if nb > rank:  # more bits than directions: extra bits are further random mixtures of the same subspace
        extra = top @ _gaussian(key, "pca-extra", rank, nb - rank)
        planes = torch.cat([planes, extra / extra.norm(dim=0, keepdim=True)], dim=1)
    return planes, mean


class LSHEncoder:
    """Keyed hyperplanes + pools, as tensors built once; every method is batched over leading dimensions."""

    def __init__(
        self,
        projection: torch.Tensor,
        center: torch.Tensor,
        pools: torch.Tensor,
        vocab_size: int,
        fingerprint: str,
        kind: str = "simhash",
        usable: Optional[torch.Tensor] = None,
        green_lists: str = "bits",
        mixing: Optional[torch.Tensor] = None,
        salt: Optional[torch.Tensor] = None,
        vote_lists: int = 1,
        context_tokens: int = 0,
    ) -> None:
        self.kind = kind
        self.vote_lists = int(vote_lists)
        # 1: the token before the scored one is hashed into its green list (routing + token context).
        self.context_tokens = int(context_tokens)
        self.fingerprint = fingerprint
        self.vocab_size = int(vocab_size)
        self.projection = projection.float()
        self.center = center.float()
        self.pools = pools.long()  # (nb, P); -1 pads pools shorter than P
        nb = self.projection.shape[1]
        self.green_lists = green_lists
        self.mixing = torch.arange(nb).view(1, nb) if mixing is None else mixing.long().view(-1, nb)
        self.salt = torch.zeros((), dtype=torch.long) if salt is None else salt.long().view(())
        # Pools touch only a few distinct tokens: work in that compact column space.
        present = self.pools >= 0
        self.pool_tokens, inverse = torch.unique(self.pools[present], return_inverse=True)
        membership = torch.zeros(nb, self.pool_tokens.numel())
        rows = torch.arange(nb).view(nb, 1).expand_as(self.pools)[present]
        membership[rows, inverse] = 1.0
        self.membership = membership  # (nb, u): 1 where the token of column j is in pool i
        # Disjoint pools (a partition): column j's one pool, so green columns are a gather, not a product.
        self.pool_of_column = membership.argmax(0) if bool((membership.sum(0) == 1).all()) else None
        token_to_column = torch.full((self.vocab_size,), -1, dtype=torch.long)
        token_to_column[self.pool_tokens] = torch.arange(self.pool_tokens.numel())
        self.token_to_column = token_to_column
        # Tokens that can occur in text (not special, inside the tokenizer): the null's denominator.
        self.usable = torch.ones(self.vocab_size, dtype=torch.bool) if usable is None else usable.bool().cpu()
        self.num_usable = int(self.usable.sum())

    @property
    def num_bits(self) -> int:
        return int(self.projection.shape[1])

    @property
    def device(self) -> torch.device:
        return self.projection.device

    def to(self, device: torch.device | str) -> "LSHEncoder":
        for name in ("projection", "center", "pools", "pool_tokens", "membership", "token_to_column", "usable", "mixing", "salt"):
            setattr(self, name, getattr(self, name).to(device))
        if self.pool_of_column is not None:
            self.pool_of_column = self.pool_of_column.to(device)
        return self

    def nbytes(self) -> int:
        """Memory held by the encoder's own tensors."""
        names = ("projection", "center", "pools", "pool_tokens", "membership", "token_to_column", "usable")
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    def signature(self, features: torch.Tensor) -> torch.Tensor:
        """Bits (..., num_bits) as bool; computed in float32 whatever the model's dtype."""
        return (features.float() - self.center) @ self.projection > 0

    def pool_mask(self, bits: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(..., nb) bool: the green pools of each signature (:func:`pool_mask` for this key); ``context``
        (...,) holds the previous tokens when the encoder hashes one in (``encoder.context_tokens``)."""
        if self.context_tokens and context is None:
            raise ValueError("this encoder keys green lists by the previous token too (encoder.context_tokens=1): pass context")
        return pool_mask(bits.unsqueeze(0), self.green_lists, self.mixing.unsqueeze(0), self.salt.view(1),
                         context if self.context_tokens else None, self.vote_lists)[0]

    def green_columns(self, bits: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(..., u) bool: which pool tokens are green for each signature."""
        mask = self.pool_mask(bits, context)
        if self.pool_of_column is not None:
            return mask[..., self.pool_of_column]
        return mask.to(self.membership.dtype) @ self.membership > 0

    def green_size(self, bits: torch.Tensor, chunk: int = 4096, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Exact |G| for each signature (pools overlap), chunked so memory stays bounded."""
        flat = bits.reshape(-1, self.num_bits)
        ctx = None if context is None else context.reshape(-1)
        parts = [self.green_columns(flat[s : s + chunk], None if ctx is None else ctx[s : s + chunk]).sum(-1) for s in range(0, flat.shape[0], chunk)]
        sizes = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.long)
        return sizes.reshape(bits.shape[:-1])

    def gamma(self, bits: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Null probability that a token is green: |G| over the tokens that can occur in text (float64)."""
        return self.green_size(bits, context=context).to(torch.float64) / self.num_usable

    def is_green(self, bits: torch.Tensor, tokens: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Whether each token is in the green list of the matching signature; bits (..., nb), tokens (...)."""
        column = self.token_to_column[tokens.clamp(0, self.vocab_size - 1)]
        in_some_pool = column >= 0
        owners = self.membership.T[column.clamp(min=0)]  # (..., nb): pools that contain the token
        hit = (owners * self.pool_mask(bits, context).to(owners.dtype)).sum(-1) > 0
        return hit & in_some_pool & (tokens >= 0) & (tokens < self.vocab_size)

    def bias_logits(self, scores: torch.Tensor, bits: torch.Tensor, delta: float, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores with ``delta`` added to the green tokens of each row (scores (B, V), bits (B, nb), context (B,))."""
        green = self.green_columns(bits, context).to(scores.dtype) * delta
        return scores.index_add(1, self.pool_tokens, green)
