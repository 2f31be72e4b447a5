"""Keyed SimHash encoder: hyperplanes turn a feature vector into bits; each bit owns a pool of tokens.

The green list at a position is the union of the pools whose bit is 1. Pools overlap, so the green
list's size varies from position to position; the encoder therefore reports it exactly
(:meth:`LSHEncoder.green_size`) instead of assuming ``num_bits * pool_size / 2``.

Variants (``encoder.kind``) differ only in how features are projected, all under the same key:
``simhash`` random Gaussian hyperplanes through the origin; ``centered`` the same after subtracting the
calibration mean; ``whitened`` hyperplanes drawn in the whitened space (Sigma^-1/2); ``pca`` the top
principal directions mixed by a keyed random rotation. The pools themselves are drawn in
:mod:`moewm.keybank`, which builds the deployed key and the reference keys by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moewm.config import ConfigError, EncoderConfig
from moewm.keys import WatermarkKey



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
    ) -> None:
        self.kind = kind
        self.fingerprint = fingerprint
        self.vocab_size = int(vocab_size)
        self.projection = projection.float()
        self.center = center.float()
        self.pools = pools.long()
        # Pools touch only a few distinct tokens: work in that compact column space.
        self.pool_tokens, inverse = torch.unique(self.pools, return_inverse=True)
        membership = torch.zeros(self.num_bits, self.pool_tokens.numel())
        membership.scatter_(1, inverse, 1.0)
        self.membership = membership  # (nb, u): 1 where the token of column j is in pool i
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
        for name in ("projection", "center", "pools", "pool_tokens", "membership", "token_to_column", "usable"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def nbytes(self) -> int:
        """Memory held by the encoder's own tensors."""
        names = ("projection", "center", "pools", "pool_tokens", "membership", "token_to_column", "usable")
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    def signature(self, features: torch.Tensor) -> torch.Tensor:
        """Bits (..., num_bits) as bool; computed in float32 whatever the model's dtype."""
        return (features.float() - self.center) @ self.projection > 0

    def green_columns(self, bits: torch.Tensor) -> torch.Tensor:
        """(..., u) bool: which pool tokens are green for each signature."""
        return bits.to(self.membership.dtype) @ self.membership > 0

    def green_size(self, bits: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Exact |G| for each signature (pools overlap), chunked so memory stays bounded."""
        flat = bits.reshape(-1, self.num_bits)
        sizes = torch.cat([self.green_columns(part).sum(-1) for part in flat.split(chunk)]) if flat.numel() else flat.new_zeros(0, dtype=torch.long)
        return sizes.reshape(bits.shape[:-1])

    def gamma(self, bits: torch.Tensor) -> torch.Tensor:
        """Null probability that a token is green: |G| over the tokens that can occur in text (float64)."""
        return self.green_size(bits).to(torch.float64) / self.num_usable

    def is_green(self, bits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Whether each token is in the green list of the matching signature; bits (..., nb), tokens (...)."""
        column = self.token_to_column[tokens.clamp(0, self.vocab_size - 1)]
        in_some_pool = column >= 0
        owners = self.membership.T[column.clamp(min=0)]  # (..., nb): pools that contain the token
        hit = (owners * bits.to(owners.dtype)).sum(-1) > 0
        return hit & in_some_pool & (tokens >= 0) & (tokens < self.vocab_size)

    def bias_logits(self, scores: torch.Tensor, bits: torch.Tensor, delta: float) -> torch.Tensor:
        """Scores with ``delta`` added to the green tokens of each row (scores (B, V), bits (B, nb))."""
        green = self.green_columns(bits).to(scores.dtype) * delta
        return scores.index_add(1, self.pool_tokens, green)
