"""Geometry of a keyed encoder on real features: what makes one seed's watermark better than another's.

All metrics are flat floats prefixed ``geo_`` (:func:`geometry_metrics`). Given calibration feature
vectors X (N, D), an :class:`~moewm.engine.lsh.LSHEncoder` (hyperplanes w_i, centre c, pools), the input
embeddings, and optionally next-token distributions at some positions with and without the bias:

Signature bits b_i(x) = [(x - c) . w_i > 0] over X
  ``geo_bit_balance_mean``   mean over bits of p_i = P(b_i = 1)
  ``geo_bit_imbalance``      mean |p_i - 1/2|
  ``geo_bit_entropy``        mean binary entropy H(p_i) in bits (1 = every bit balanced)
  ``geo_bit_entropy_min``    the worst bit's entropy
  ``geo_dead_bits``          share of bits constant on >= 99% of the vectors
  ``geo_joint_entropy``      plug-in entropy (bits) of the empirical distribution of whole signatures
  ``geo_joint_entropy_norm`` that entropy over its ceiling min(num_bits, log2 N)
  ``geo_unique_signatures``  distinct signatures / N
Projections (w_i normalised to unit length)
  ``geo_proj_var_mean``      mean Var_X(x . w_i)
  ``geo_proj_var_ratio_mean`` / ``_min``  Var_X(x . w_i) / (tr Sigma / D): 1 for a direction of average
                             variance, < 1 for a hyperplane that mostly sees low-variance directions
  ``geo_proj_offset_mean``   mean |E_X[(x - c) . w_i]| / std_X(x . w_i): how far the hyperplane sits from
                             the data's centre in units of its spread (large -> unbalanced / dead bits)
PCA alignment (top k = min(num_bits, D) principal directions u_j of X)
  ``geo_pca_alignment``      mean share of ||w_i||^2 inside span(u_1..u_k)
  ``geo_pca_alignment_ratio`` that share over k / D (its expectation for a random direction)
  ``geo_pca_max_cos``        mean over bits of max_j |cos(w_i, u_j)|
Pools
  ``geo_pool_split_entropy`` / ``_norm``  k-means (scikit-learn, fixed random_state) on the unit-normalised
                             input embeddings; entropy (bits) of the cluster labels of each pool's tokens,
                             averaged over pools (0: every pool inside one cluster); normalised by
                             log2 min(k, pool size)
  ``geo_green_size_mean``, ``geo_gamma_mean`` / ``geo_gamma_std``  |G(x)| and |G(x)| / usable tokens over X
Distribution shift (when distributions are given: :func:`capture_distributions` reads them from a job's captures)
  ``geo_w1_mean`` / ``geo_w1_std``  Wasserstein-1 distance between the unwatermarked and watermarked
                             next-token distributions, ground cost = Euclidean distance of input
                             embeddings, on the union of both distributions' top-k tokens (both
                             renormalised there), solved exactly as a small linear programme
  ``geo_w1_support_mass``    mean probability mass the top-k support keeps (of the two distributions)
  ``geo_green_mass_unwm`` / ``geo_green_mass_wm``  mean P(next token in G) without / with the bias
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np
import torch
from scipy.optimize import linprog
from scipy.sparse import coo_matrix, vstack
from scipy.spatial.distance import cdist
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from moewm.engine.lsh import LSHEncoder
from moewm.engine.padding import pad_id, pad_rows

log = logging.getLogger(__name__)

DEAD_BIT_SHARE = 0.99


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h, nan=0.0)


def entropy_bits(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (bits) of count vectors along ``axis``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=axis, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=axis)


def bit_statistics(bits: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Balance, entropy and dead bits of signatures (N, num_bits)."""
    b = np.asarray(bits.cpu() if isinstance(bits, torch.Tensor) else bits, dtype=bool)
    n, nb = b.shape
    p = b.mean(0)
    h = _binary_entropy(p)
    _, counts = np.unique(np.packbits(b, axis=1), axis=0, return_counts=True)
    joint = float(entropy_bits(counts))
    ceiling = min(nb, np.log2(n)) if n > 1 else 1.0
    return {
        "geo_bit_balance_mean": float(p.mean()),
        "geo_bit_imbalance": float(np.abs(p - 0.5).mean()),
        "geo_bit_entropy": float(h.mean()),
        "geo_bit_entropy_min": float(h.min()),
        "geo_dead_bits": float(np.mean(np.maximum(p, 1 - p) >= DEAD_BIT_SHARE)),
        "geo_joint_entropy": joint,
        "geo_joint_entropy_norm": float(joint / ceiling) if ceiling > 0 else float("nan"),
        "geo_unique_signatures": float(len(counts) / n),
    }


def _unit_columns(w: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(w, axis=0, keepdims=True)
    return w / np.where(norm > 0, norm, 1.0)


def projection_statistics(features: np.ndarray, projection: np.ndarray, center: np.ndarray) -> dict[str, float]:
    """Variance of the data along each hyperplane normal, relative to the average direction, and its offset."""
    x = np.asarray(features, dtype=np.float64)
    w = _unit_columns(np.asarray(projection, dtype=np.float64))
    proj = (x - np.asarray(center, dtype=np.float64)) @ w  # (N, nb)
    var = proj.var(axis=0, ddof=1)
    total = x.var(axis=0, ddof=1).sum()
    per_dir = total / x.shape[1]
    std = np.sqrt(var)
    offset = np.abs(proj.mean(0)) / np.where(std > 0, std, np.nan)
    ratio = var / per_dir if per_dir > 0 else np.full_like(var, np.nan)
    return {
        "geo_proj_var_mean": float(var.mean()),
        "geo_proj_var_ratio_mean": float(np.mean(ratio)),
        "geo_proj_var_ratio_min": float(np.min(ratio)),
        "geo_proj_offset_mean": float(np.nanmean(offset)) if np.isfinite(offset).any() else float("inf"),
    }


def principal_directions(features: np.ndarray, k: int, random_state: int = 0) -> np.ndarray:
    """(D, k) top principal directions of the rows of ``features`` (scikit-learn PCA; exact for small inputs)."""
    x = np.asarray(features, dtype=np.float64)
    k = int(min(k, x.shape[0], x.shape[1]))
    return PCA(n_components=k, random_state=random_state).fit(x).components_.T


def pca_alignment(features: np.ndarray, projection: np.ndarray, k: Optional[int] = None) -> dict[str, float]:
    """How much of each hyperplane normal lies in the data's top-k principal subspace."""
    w = _unit_columns(np.asarray(projection, dtype=np.float64))
    d, nb = w.shape
    u = principal_directions(features, min(k or nb, d))
    k = u.shape[1]
    coeff = u.T @ w  # (k, nb): cosines with each principal direction
    share = (coeff**2).sum(0)
    return {
        "geo_pca_alignment": float(share.mean()),
        "geo_pca_alignment_ratio": float(share.mean() / (k / d)),
        "geo_pca_max_cos": float(np.abs(coeff).max(0).mean()),
    }


def pool_split_entropy(
    pools: np.ndarray | torch.Tensor,
    embeddings: np.ndarray | torch.Tensor,
    valid: Optional[np.ndarray | torch.Tensor] = None,
    n_clusters: int = 32,
    random_state: int = 0,
    max_fit_tokens: int = 20000,
) -> dict[str, float]:
    """Entropy of k-means cluster labels within each pool (k-means fitted on a fixed token sample)."""
    pools = np.asarray(pools.cpu() if isinstance(pools, torch.Tensor) else pools, dtype=np.int64)
    emb = embeddings.detach().float().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings, np.float32)
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norm > 0, norm, 1.0)
    if valid is None:
        candidates = np.arange(len(emb))
    else:
        v = np.asarray(valid.cpu() if isinstance(valid, torch.Tensor) else valid, dtype=bool)
        candidates = np.nonzero(v)[0]
    rng = np.random.default_rng(random_state)
    fit_ids = candidates if len(candidates) <= max_fit_tokens else np.sort(rng.choice(candidates, max_fit_tokens, replace=False))
    k = int(min(n_clusters, len(fit_ids)))
    km = KMeans(n_clusters=k, random_state=random_state, n_init=3).fit(emb[fit_ids])
    labels = km.predict(emb[pools.reshape(-1)]).reshape(pools.shape)
    counts = np.zeros((pools.shape[0], k))
    np.add.at(counts, (np.repeat(np.arange(pools.shape[0]), pools.shape[1]), labels.reshape(-1)), 1)
    h = entropy_bits(counts)
    ceiling = np.log2(min(k, pools.shape[1])) if min(k, pools.shape[1]) > 1 else 1.0
    return {"geo_pool_split_entropy": float(h.mean()), "geo_pool_split_entropy_norm": float(h.mean() / ceiling)}


def wasserstein_1(p: np.ndarray, q: np.ndarray, cost: np.ndarray) -> float:
    """Exact W1 between two distributions on the same n points with an (n, n) ground cost (linear programme)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    n = len(p)
    if n == 1 or np.allclose(p, q, atol=1e-15, rtol=0):
        return 0.0
    idx = np.arange(n * n)
    rows = coo_matrix((np.ones(n * n), (idx // n, idx)), shape=(n, n * n))  # sum_j T_ij = p_i
    cols = coo_matrix((np.ones(n * n), (idx % n, idx)), shape=(n, n * n))  # sum_i T_ij = q_j
    a_eq = vstack([rows, cols.tocsr()[:-1]]).tocsr()  # one column constraint is implied by the others
    b_eq = np.r_[p, q[:-1]]
    res = linprog(np.asarray(cost, dtype=np.float64).reshape(-1), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if not res.success:
        raise RuntimeError(f"W1 linear programme failed: {res.message}")
    return float(max(res.fun, 0.0))


def topk_w1(p: np.ndarray, q: np.ndarray, embeddings: np.ndarray, k: int = 50) -> tuple[float, float]:
    """W1 of two next-token distributions on the union of their top-k tokens; also the kept mass."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    k = min(k, len(p))
    support = np.union1d(np.argpartition(-p, k - 1)[:k], np.argpartition(-q, k - 1)[:k])
    ps, qs = p[support], q[support]
    kept = 0.5 * (ps.sum() + qs.sum())
    e = np.asarray(embeddings[support], dtype=np.float64)
    return wasserstein_1(ps, qs, cdist(e, e)), float(kept)


@torch.no_grad()
def next_token_distributions(watermarker: Any, contexts: Sequence[Sequence[int]], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unwatermarked p and MoE-LSH-watermarked q next-token distributions, and the green masks.

    Contexts are left-padded like generation, so the last position is the last real token and the
    routing that keys the green list is read exactly as the logits processor reads it.
    """
    model, enc = watermarker.model, watermarker.encoder
    device = model.get_input_embeddings().weight.device
    pad = pad_id(watermarker.tokenizer)
    back = -int(watermarker.extractor_cfg.token_idx)
    delta = float(watermarker.watermark_cfg.delta)
    capture = watermarker.capture_hooks
    capture.attach()
    ps, qs, greens = [], [], []
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start : start + batch_size]
        ids, mask = pad_rows(chunk, pad, side="left")
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), use_cache=False, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        feats = capture.features(len(chunk), positions=slice(-back, None))[:, 0]
        capture.clear()
        bits = enc.signature(feats.to(enc.device)).to(logits.device)
        green = enc.bias_logits(torch.zeros_like(logits), bits, 1.0, ids[:, -1].to(enc.device)) > 0
        ps.append(torch.softmax(logits, -1).double().cpu())
        qs.append(torch.softmax(logits + delta * green, -1).double().cpu())
        greens.append(green.cpu())
    return torch.cat(ps).numpy(), torch.cat(qs).numpy(), torch.cat(greens).numpy()


def capture_distributions(encoder: LSHEncoder, delta: float, vocab_size: int, captures: Sequence[Any], count: int,
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p, q and green masks at ``count`` scored positions of texts a job has already captured (no forward).

    Each position's p is the capture's top-K next-token distribution over usable tokens, its left-over mass
    spread evenly over the other usable tokens (K = ``watermark.capture_top_k``, 256 by default, well above
    the top-50 that W1 reads); the green mask comes from the capture's routing features through the encoder,
    exactly as the logits processor would key that position, and q = p * exp(delta * green), renormalised.
    Positions are drawn with ``seed`` from the texts in turn, independent of the key, so every key of a
    sweep is measured at the same positions.
    """
    caps = [c for c in captures if c is not None and c.num_scored > 0]
    if not caps or count < 1:
        return np.zeros((0, vocab_size)), np.zeros((0, vocab_size)), np.zeros((0, vocab_size), dtype=bool)
    rng = np.random.default_rng(seed)
    which = np.arange(count) % len(caps)
    where = [int(rng.integers(0, caps[i].num_scored)) for i in which]  # one draw per position
    feats = torch.stack([caps[i].features[j] for i, j in zip(which, where)]).float()
    top_ids = torch.stack([caps[i].top_ids[j] for i, j in zip(which, where)]).long()
    top_probs = torch.stack([caps[i].top_probs[j] for i, j in zip(which, where)]).double()
    tail = torch.stack([caps[i].tail[j] for i, j in zip(which, where)]).double()
    bits = encoder.signature(feats.to(encoder.device))
    previous = None
    if encoder.context_tokens:
        previous = torch.stack([caps[i].previous[j] for i, j in zip(which, where)]).to(encoder.device)
    green = (encoder.bias_logits(torch.zeros(count, vocab_size, device=encoder.device), bits, 1.0, previous) > 0).cpu()
    in_top = torch.zeros(count, vocab_size, dtype=torch.bool).scatter_(1, top_ids, True)
    rest = encoder.usable.cpu()[:vocab_size].unsqueeze(0) & ~in_top
    p = torch.zeros(count, vocab_size, dtype=torch.float64).scatter_(1, top_ids, top_probs)
    p = p + rest * (tail / rest.sum(1).clamp(min=1)).unsqueeze(1)
    q = p * torch.exp(float(delta) * green.double())
    q = q / q.sum(1, keepdim=True)
    return p.numpy(), q.numpy(), green.numpy()


def w1_metrics(p: np.ndarray, q: np.ndarray, green: np.ndarray, embeddings: np.ndarray, top_k: int = 50) -> dict[str, float]:
    """Mean / std W1 over positions, support mass, and green-list probability mass without / with the bias."""
    pairs = [topk_w1(p[i], q[i], embeddings, top_k) for i in range(len(p))]  # one small LP per position
    w1 = np.array([a for a, _ in pairs])
    return {
        "geo_w1_mean": float(w1.mean()),
        "geo_w1_std": float(w1.std(ddof=1)) if len(w1) > 1 else 0.0,
        "geo_w1_support_mass": float(np.mean([b for _, b in pairs])),
        "geo_green_mass_unwm": float((p * green).sum(-1).mean()),
        "geo_green_mass_wm": float((q * green).sum(-1).mean()),
    }


def geometry_metrics(
    features: torch.Tensor | np.ndarray,
    encoder: LSHEncoder,
    embeddings: torch.Tensor | np.ndarray,
    *,
    valid_tokens: Optional[torch.Tensor] = None,
    distributions: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
    w1_top_k: int = 50,
    kmeans_clusters: int = 32,
    random_state: int = 0,
    max_vectors: int = 20000,
) -> dict[str, float]:
    """All ``geo_*`` metrics (module docstring); W1 ones only with ``distributions`` (p, q, green), e.g. from
    :func:`capture_distributions`."""
    x = features.detach().float().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float32)
    if x.shape[1] != encoder.projection.shape[0]:
        raise ValueError(f"geometry: features have dimension {x.shape[1]}, the encoder's hyperplanes {encoder.projection.shape[0]}")
    if len(x) > max_vectors:  # a fixed subsample bounds the cost; identical for every seed
        x = x[np.sort(np.random.default_rng(random_state).choice(len(x), max_vectors, replace=False))]
    projection = encoder.projection.detach().double().cpu().numpy()
    center = encoder.center.detach().double().cpu().numpy()
    bits = encoder.signature(torch.from_numpy(x).to(encoder.device)).cpu().numpy()  # exactly the encoder's bits
    out: dict[str, float] = {}
    out.update(bit_statistics(bits))
    out.update(projection_statistics(x, projection, center))
    out.update(pca_alignment(x, projection))
    out.update(pool_split_entropy(encoder.pools, embeddings, valid_tokens, kmeans_clusters, random_state))
    sizes = encoder.green_size(torch.from_numpy(bits).to(encoder.device)).double().cpu().numpy()
    out["geo_green_size_mean"] = float(sizes.mean())
    out["geo_gamma_mean"] = float(sizes.mean() / encoder.num_usable)
    out["geo_gamma_std"] = float(sizes.std(ddof=1) / encoder.num_usable) if len(sizes) > 1 else 0.0
    if distributions is not None and len(distributions[0]):
        emb = embeddings.detach().float().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
        out.update(w1_metrics(*distributions, emb, w1_top_k))
    return out
