"""Exact Poisson-binomial tail: against an O(L^2) dynamic programme and scipy's binomial, in the deep tail,
batch independence, and why the normal approximation is not good enough for short texts."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

import moewm.engine.poisson_binomial as pb
from moewm.engine.poisson_binomial import pmf, upper_tail

RTOL = 1e-9
FLOOR = 1e-280  # references below this are only checked to be tiny


def dp_pmf(gamma: np.ndarray) -> np.ndarray:
    """Reference pmf of sum Bernoulli(gamma): add one position at a time, float64, O(n^2)."""
    out = np.zeros(len(gamma) + 1)
    out[0] = 1.0
    for i, g in enumerate(gamma):
        out[1 : i + 2] = out[1 : i + 2] * (1 - g) + out[: i + 1] * g
        out[0] *= 1 - g
    return out


def suffix(mass: np.ndarray) -> np.ndarray:
    """tail[j] = sum_{i >= j} mass[i], small terms first; one extra entry for j = n + 1."""
    return np.append(np.cumsum(mass[::-1])[::-1], 0.0)


def assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    big = ref > FLOOR
    np.testing.assert_allclose(got[big], ref[big], rtol=RTOL, atol=0)
    assert np.all(got[~big] <= 1e-270)


def random_batch(rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random gammas (some exactly 0 or 1, some out of [0, 1] to exercise the clamp) and padded masks."""
    gen = torch.Generator().manual_seed(seed)
    gamma = torch.rand(rows, length, generator=gen, dtype=torch.float64) * 1.2 - 0.1
    n = torch.randint(0, length + 1, (rows,), generator=gen)
    n[0] = length  # one full row
    mask = torch.arange(length).unsqueeze(0) < n.unsqueeze(1)
    mask &= torch.rand(rows, length, generator=gen) > 0.1  # holes as well as right padding
    return gamma, mask


def reference_rows(gamma: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    return [dp_pmf(np.clip(g[m].numpy(), 0.0, 1.0)) for g, m in zip(gamma, mask)]


@pytest.mark.parametrize("length", [1, 2, 7, 33, 100, 257])
def test_pmf_and_tail_match_dynamic_programme(length):
    gamma, mask = random_batch(5, length, seed=length)
    got = pmf(gamma, mask)
    assert got.shape == (5, length + 1) and got.dtype == torch.float64
    refs = reference_rows(gamma, mask)
    for row, ref in zip(got.numpy(), refs):
        assert_close(row[: len(ref)], ref)
        assert np.all(row[len(ref) :] == 0.0)
    # k from -2 to n + 2: every value for short rows, boundaries and a spread for long ones
    n_rows = [len(ref) - 1 for ref in refs]
    ks = [sorted({*range(-2, 4), *range(n - 2, n + 3), *np.linspace(0, n, 16).round().astype(int).tolist()}) for n in n_rows]
    ks = [list(range(-2, n + 3)) if length <= 33 else k for n, k in zip(n_rows, ks)]
    rows = torch.tensor([r for r, k in enumerate(ks) for _ in k])
    tail = upper_tail(gamma[rows], mask[rows], torch.tensor([x for k in ks for x in k])).numpy()
    start = 0
    for ref, n, k in zip(refs, n_rows, ks):
        got, k = tail[start : start + len(k)], np.array(k)
        start += len(k)
        ref_tail = suffix(ref)
        want = np.array([1.0 if x <= 0 else 0.0 if x > n else ref_tail[x] for x in k])
        assert_close(got, want)
        assert np.all(got[k <= 0] == 1.0) and np.all(got[k > n] == 0.0)


@pytest.mark.parametrize(("n", "p"), [(1, 0.3), (5, 0.5), (64, 0.06), (257, 0.25), (300, 0.9)])
def test_binomial_special_case_matches_scipy(n, p):
    length = n + 3  # padded
    ks = np.arange(-1, n + 3) if n <= 64 else np.unique(np.r_[-1:4, n - 2 : n + 3, np.linspace(0, n, 24).round()]).astype(int)
    gamma = torch.full((len(ks), length), p, dtype=torch.float64)
    mask = torch.zeros(len(ks), length, dtype=torch.bool)
    mask[:, 2 : n + 2] = True
    got = upper_tail(gamma, mask, torch.from_numpy(ks)).numpy()
    assert_close(got, binom.sf(ks - 1, n, p))
    assert_close(pmf(gamma[:1], mask[:1])[0, : n + 1].numpy(), binom.pmf(np.arange(n + 1), n, p))


def test_deep_tail_is_exact_not_zero():
    gamma = torch.full((1, 200), 0.05, dtype=torch.float64)
    mask = torch.ones(1, 200, dtype=torch.bool)
    got = upper_tail(gamma, mask, torch.tensor([60])).item()
    ref = binom.sf(59, 200, 0.05)  # ~5e-30
    assert got > 0 and ref < 1e-25
    assert got == pytest.approx(ref, rel=RTOL)
    assert upper_tail(gamma, mask, torch.tensor([200])).item() == pytest.approx(0.05**200, rel=RTOL)  # ~6e-261


def test_underflow_is_reported_as_zero():
    gamma = torch.full((1, 1200), 1e-3, dtype=torch.float64)
    mask = torch.ones(1, 1200, dtype=torch.bool)
    tail = upper_tail(gamma.expand(3, -1), mask.expand(3, -1), torch.tensor([1200, 200, 10]))
    assert binom.sf(199, 1200, 1e-3) == 0.0  # true values 1e-3600 and ~1e-367: below any double
    assert tail[0].item() == 0.0 and tail[1].item() == 0.0
    assert tail[2].item() == pytest.approx(binom.sf(9, 1200, 1e-3), rel=RTOL)


def test_batch_independence(monkeypatch):
    gamma, mask = random_batch(6, 150, seed=7)
    ks = torch.randint(0, 30, (6,), generator=torch.Generator().manual_seed(1))
    together = upper_tail(gamma, mask, ks)
    alone = torch.cat([upper_tail(gamma[i : i + 1], mask[i : i + 1], ks[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=0)
    monkeypatch.setattr(pb, "_BLOCK_BYTES", 1)  # one row per block
    torch.testing.assert_close(upper_tail(gamma, mask, ks), together, rtol=1e-12, atol=0)
    torch.testing.assert_close(pmf(gamma, mask)[3], pmf(gamma[3:4], mask[3:4])[0], rtol=1e-12, atol=0)


def test_direct_and_toeplitz_products_agree():
    gen = torch.Generator().manual_seed(3)
    for d in (1, 2, 5, 33, 70):
        a, b = torch.rand(2, 4, d, generator=gen, dtype=torch.float64)
        direct = pb._mul_direct(a, b)
        ref = torch.from_numpy(np.stack([np.convolve(x, y) for x, y in zip(a.numpy(), b.numpy())]))
        torch.testing.assert_close(direct, ref, rtol=1e-13, atol=0)
        for c in (1, 4, 16):
            torch.testing.assert_close(pb._mul_toeplitz(a, b, c), ref, rtol=1e-13, atol=0)


def test_edge_shapes():
    assert pmf(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool)).shape == (0, 5)
    empty = upper_tail(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool), torch.tensor([0, 1]))
    assert empty.tolist() == [1.0, 0.0]
    nothing_masked = upper_tail(torch.full((1, 5), 0.5), torch.zeros(1, 5, dtype=torch.bool), torch.tensor([1]))
    assert nothing_masked.item() == 0.0
    certain = upper_tail(torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool), torch.tensor([4]))
    assert certain.item() == 1.0


def test_normal_approximation_is_wrong_for_short_texts():
    """Documentation by test: 64 tokens at gamma = 0.06 expect 3.84 green; z >= 4 needs 12 green tokens,
    which under the null happens 12x more often than norm.sf(4) says (44x more than norm.sf(z))."""
    n, p = 64, 0.06
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    k = math.ceil(mean + 4 * sd)
    z = (k - mean) / sd
    assert k == 12 and z >= 4
    exact = upper_tail(torch.full((1, n), p, dtype=torch.float64), torch.ones(1, n, dtype=torch.bool), torch.tensor([k])).item()
    assert exact == pytest.approx(binom.sf(k - 1, n, p), rel=RTOL)
    assert exact > 10 * norm.sf(4) and exact > 10 * norm.sf(z)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    gamma, mask = random_batch(6, 1100, seed=11)
    ks = torch.tensor([0, 1, 5, 30, 200, 1101])
    cpu = upper_tail(gamma, mask, ks)
    gpu = upper_tail(gamma.cuda(), mask.cuda(), ks.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-11, atol=1e-300)


@pytest.mark.parametrize("n,p", [(40, 0.5), (400, 0.25), (3000, 0.5), (3000, 0.4987)])
def test_equal_gammas_take_the_binomial_and_agree_with_the_exact_product(n, p):
    """Rows whose gammas are all equal (SynthID, KGW) skip the O(L^2) product for scipy's binomial tail; the product
    (pmf's suffix sums) gives the same p-values to 1e-10, deep tails and zero-gamma positions included; a row with
    one gamma off the common value still takes the product."""
    gamma = torch.full((3, n), p, dtype=torch.float64)
    gamma[1, : n // 4] = 0.0  # zero gammas add nothing: X ~ Bin(3n/4, p)
    gamma[2, 0] = p / 2  # not binomial: the exact product
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[0, -3:] = False
    sd = (n * p * (1 - p)) ** 0.5
    ks = torch.tensor([int(n * p + 3 * sd), int(0.75 * n * p + 2.5 * sd), int(n * p - sd)])
    got = upper_tail(gamma, mask, ks)
    mass = pmf(gamma, mask)
    want = torch.stack([mass[i, int(ks[i]):].sum() for i in range(3)])
    assert (want > 0).all() and (want < 1).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    deep = upper_tail(gamma[:1], mask[:1], torch.tensor([n - 3]))  # every draw green: p^(n-3), below 1e-300 -> 0
    assert deep.item() == pytest.approx(p ** (n - 3), rel=1e-10) if p ** (n - 3) > 1e-300 else deep.item() == 0.0
