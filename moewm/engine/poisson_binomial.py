"""Exact Poisson-binomial pmf and upper tail, vectorised over texts.

Under the null hypothesis the number of green tokens in a text is X = sum_t Bernoulli(gamma_t) with a
different gamma_t at each scored position. Expected counts are often only 2-4 tokens, where the normal
approximation behind the z-test is badly wrong in the tail, so detection diagnostics need the exact
P(X >= k).

Method: the probability generating function of X is prod_t (1 - gamma_t + gamma_t x). The product is
formed by divide and conquer: about log2(L) levels, each multiplying adjacent pairs of polynomials for all
rows and pairs at once. Every multiplication is a direct (non-FFT) convolution in float64 whose terms are
all non-negative, so each coefficient, and every tail sum, keeps a relative error of ~1e-12 or better
however small it is; an FFT would leave an absolute error of ~1e-16 and make p-values below that meaningless.
Short polynomials are multiplied as batched outer products summed along anti-diagonals; long ones as
chunked Toeplitz matrix products (one batched matmul per level), which costs the same number of
multiply-adds but runs at BLAS speed and needs about d^2/c instead of d^2 memory (d coefficients, chunk c).
The work is O(L^2) per row, a few milliseconds for L = 4096.

Underflow: after every level, coefficients below the smallest normal double (``_TINY`` ~ 2.2e-308) are set
to exactly 0 (this also keeps slow subnormal arithmetic out of the loop). Each flushed term is below
``_TINY``, so a returned probability carries an absolute error of at most about L * log2(L) * 2.2e-308
(~1e-303 for L = 4096) on top of the relative rounding error: values above ~1e-290 are accurate to ~1e-12
relative, values near 1e-300 only to a few digits, and a probability below ``_TINY`` is returned as
exactly 0.0 (never floored to the smallest normal double). Read 0.0 as "below ~1e-300".

Memory: rows are processed in blocks whose working memory stays within ``_BLOCK_BYTES`` (256 MiB; a single
row alone exceeds it only for L > 65536), on top of a float64 copy of gamma and the (B,) or (B, L+1)
result. Rows are grouped by their number of nonzero gammas, so short rows are not padded to the longest.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from scipy.stats import binom

__all__ = ["pmf", "upper_tail"]

_TINY = torch.finfo(torch.float64).tiny  # smallest normal double; anything below is flushed to 0
_BLOCK_BYTES = 256 * 2**20  # working-memory budget of one block of rows
_DIRECT_MAX = 32  # polynomials of at most this many coefficients are multiplied as outer products


def _chunk(d: int) -> int:
    """Chunk size of the Toeplitz product: big enough for BLAS, small enough to waste little padding."""
    return 16 if d <= 128 else 32 if d <= 512 else 64 if d <= 4096 else 128


def _mul_direct(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, d) x (N, d) -> (N, 2d-1) coefficients of the products, via outer products.

    The outer product is written into rows of length 2d; read back with row length 2d-1, entry (i, j)
    lands in column i + j, so a sum over rows gives the anti-diagonal sums (a deterministic reduction,
    unlike index_add's atomics on CUDA).
    """
    n, d = a.shape
    buf = a.new_zeros(n, d, 2 * d)
    torch.mul(a.unsqueeze(-1), b.unsqueeze(-2), out=buf[..., :d])
    return buf.view(n, 2 * d * d)[:, : d * (2 * d - 1)].view(n, d, 2 * d - 1).sum(1)


def _mul_toeplitz(a: torch.Tensor, b: torch.Tensor, c: int) -> torch.Tensor:
    """(N, d) x (N, d) -> (N, 2d-1) as a chunked Toeplitz matrix product, c coefficients per chunk.

    With i = p*c + r and s = u*c + v, out[s] = sum_{p, r} a[p*c + r] * b[(u - p)*c + v - r]: the c x c
    block for chunk offset m = u - p is a Hankel window of b (after flipping a's chunks), the same for
    every p, so one batched matmul gives Y[p, m, v] for all p, m; out[u*c + v] = sum_p Y[p, u - p, v] is
    then an anti-diagonal sum over (p, m), taken with the same row-length trick as in _mul_direct.
    """
    n_rows, d = a.shape
    n = -(-d // c)
    a = F.pad(a, (0, n * c - d))
    b = F.pad(b, (c - 1, n * c - d + c))  # bp[j] = b[j - (c - 1)], zero outside b
    a_rev = a.view(n_rows, n, c).flip(-1)  # a_rev[p, c-1-r] = a[p*c + r]
    # hankel[m, v, r'] = bp[m*c + v + r'] = b[m*c + v - (c-1-r')], for chunk offsets m = 0..n; materialised,
    # since reshape would keep the overlapping strides as a view, and bmm on such an operand is very slow
    hankel = b.unfold(-1, 2 * c - 1, c).unfold(-1, c, 1).contiguous().view(n_rows, (n + 1) * c, c)
    y = torch.matmul(a_rev, hankel.transpose(1, 2))  # (N, n, (n+1)*c): [p, (m, v)]
    y = F.pad(y, (0, n * c)).view(n_rows, n * (2 * n + 1) * c)[:, : 2 * n * n * c]
    return y.view(n_rows, n, 2 * n * c).sum(1)[:, : 2 * d - 1]


def _mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Coefficient-wise products of polynomial pairs (N, d) x (N, d) -> (N, 2d-1)."""
    d = a.shape[-1]
    return _mul_direct(a, b) if d <= _DIRECT_MAX else _mul_toeplitz(a, b, _chunk(d))


def _pair_elems(d: int) -> int:
    """Float64 elements one pair product of width d allocates (an upper bound)."""
    if d <= _DIRECT_MAX:
        return 2 * d * d + 2 * d
    c = _chunk(d)
    n = -(-d // c)
    return (n + 1) * c * c + n * (n + 1) * c + n * (2 * n + 1) * c + 8 * n * c


def _row_bytes(width: int) -> int:
    """Working bytes per row for a product of ``width`` (a power of two) linear factors, worst level.

    Matches measured peaks to within ~15%; the 25% margin keeps a block under ``_BLOCK_BYTES``.
    """
    worst, m, d = 0, width, 2
    while m > 1:
        m //= 2
        worst = max(worst, m * _pair_elems(d))
        d = 2 * d - 1
    return 8 * (worst * 5 // 4 + 8 * width + 64)


def _product(g: torch.Tensor) -> torch.Tensor:
    """(R, W) Bernoulli probabilities, W a power of two -> (R, D) coefficients of prod (1 - g + g x).

    D <= W + 1: trailing columns that are zero in every row are dropped after each level (zero gammas,
    padding and underflow make them common), which keeps the work close to what the data needs.
    """
    poly = torch.stack([1 - g, g], -1)  # (R, W, 2)
    while poly.shape[1] > 1:
        r, m, d = poly.shape
        prod = _mul(poly[:, 0::2].reshape(-1, d), poly[:, 1::2].reshape(-1, d))
        prod = prod.masked_fill_(prod < _TINY, 0.0).view(r, m // 2, 2 * d - 1)
        nonzero = (prod != 0).flatten(0, 1).any(0)
        width = int(nonzero.nonzero().max()) + 1 if bool(nonzero.any()) else 1
        poly = prod[..., :width]
    return poly[:, 0]


def _masked_gammas(gamma: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L) float64: gamma clamped to [0, 1], 0 where unmasked or below ``_TINY`` (a factor 1 of the product)."""
    g = torch.where(mask.to(device=gamma.device, dtype=torch.bool), gamma.to(torch.float64).clamp(0.0, 1.0), 0.0)
    return g.masked_fill_(g < _TINY, 0.0)


def _blocks(gamma: torch.Tensor, mask: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (row indices, (R, D) pmf coefficients) over blocks of rows; columns past D are exactly 0.

    Only positions with gamma > 0 matter (gamma = 0 is the factor 1): rows are grouped by the power of two
    that holds their count of such positions, each row's gammas are sorted so those come first, and the
    rest is cut off. A group is split into blocks that fit ``_BLOCK_BYTES``.
    """
    if gamma.dim() != 2 or mask.shape != gamma.shape:
        raise ValueError(f"gamma and mask must be (B, L) of the same shape, got {tuple(gamma.shape)} and {tuple(mask.shape)}")
    g = _masked_gammas(gamma, mask)
    count = (g != 0).sum(-1)  # NaN counts too, so that it propagates
    level = torch.ceil(torch.log2(count.clamp(min=1).to(torch.float64))).long()
    for lv in torch.unique(level).tolist():
        width = 2**lv
        rows = (level == lv).nonzero().squeeze(-1)
        step = max(1, _BLOCK_BYTES // _row_bytes(width))
        for start in range(0, rows.numel(), step):
            block = rows[start : start + step]
            gb = torch.sort(g[block], dim=-1, descending=True).values[:, :width]
            yield block, _product(F.pad(gb, (0, width - gb.shape[1])))


def pmf(gamma: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L+1) float64 probability mass of X per row: column j is P(X = j).

    X = sum over masked positions of Bernoulli(gamma); gamma (B, L) is clamped to [0, 1], unmasked
    positions are ignored. Computed exactly (direct convolution, float64) so tail masses keep their relative
    precision; entries below ~2.2e-308 are 0 (see the module docstring). Runs on gamma's device.
    """
    rows, length = gamma.shape[0], gamma.shape[-1]
    out = torch.zeros(rows, length + 1, dtype=torch.float64, device=gamma.device)
    for block, coef in _blocks(gamma, mask):
        coef = coef[:, : length + 1]
        out[block, : coef.shape[1]] = coef
    return out


def upper_tail(gamma: torch.Tensor, mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """P(X >= k) per row, X = sum over masked positions of Bernoulli(gamma). gamma (B, L) float, mask (B, L) bool, k (B,) int. Returns (B,) float64.

    The exact p-value of observing k green tokens, for short texts where the z-test's normal approximation
    fails. k <= 0 gives 1.0 and k above the number of masked positions gives 0.0. Suffix sums of the exact
    pmf (smallest terms first), so tiny p-values keep their relative precision down to ~1e-300; a tail
    below the smallest normal double (~2.2e-308) is returned as exactly 0.0, not floored. A row whose nonzero
    gammas are all equal (SynthID's and KGW's draws) is the plain binomial: its tail comes from scipy's
    regularised incomplete beta (the same relative precision, without the O(L^2) product).
    """
    rows = gamma.shape[0]
    k = torch.as_tensor(k, device=gamma.device).long().expand(rows)
    p = torch.zeros(rows, dtype=torch.float64, device=gamma.device)
    binomial, value, count = _binomial_rows(gamma, mask)
    if bool(binomial.any()):
        at = binomial.nonzero().squeeze(-1)
        tail = binom.sf(k[at].cpu().numpy() - 1, count[at].cpu().numpy(), value[at].cpu().numpy())
        p[at] = torch.as_tensor(tail, dtype=torch.float64, device=gamma.device)
    rest = (~binomial).nonzero().squeeze(-1)
    if rest.numel():
        for block, coef in _blocks(gamma[rest], mask[rest]):
            tail = torch.flip(torch.cumsum(torch.flip(coef, [-1]), -1), [-1])  # tail[:, j] = P(X >= j)
            tail = F.pad(tail, (0, 1))  # P(X >= D) = 0
            rows_at = rest[block]
            p[rows_at] = tail.gather(-1, k[rows_at].clamp(0, coef.shape[1]).unsqueeze(-1)).squeeze(-1)
    n = mask.to(device=gamma.device, dtype=torch.bool).sum(-1)
    p = torch.where(k <= 0, 1.0, torch.where(k > n, 0.0, p))
    return p.masked_fill_(p < _TINY, 0.0)


def _binomial_rows(gamma: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,) bool: rows whose masked gammas above ``_TINY`` share one value (a NaN never does); that value and their
    count (the gammas of :func:`_masked_gammas`, as :func:`_blocks` reads them)."""
    g = _masked_gammas(gamma, mask)
    nonzero = g != 0
    count = nonzero.sum(-1)
    if g.shape[-1] == 0:
        return torch.zeros_like(count, dtype=torch.bool), g.new_zeros(count.shape), count
    top = g.max(-1).values
    low = torch.where(nonzero, g, torch.full_like(g, float("inf"))).min(-1).values
    return (count > 0) & (low == top), top, count
