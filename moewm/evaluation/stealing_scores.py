"""Watermark stealing (after Jovanović, Staab and Vechev, 2024): what an attacker learns of a watermark from
text alone, and the logits processor that spoofs (or scrubs) with what it learned.

The attacker holds N responses of the deployed (watermarked) model and N responses of its own plain model to
the same prompts (:mod:`moewm.evaluation.stealing_corpus`). For every position of a response it looks at the
``h`` tokens before it and at every subset of them (a positional mask: "the token 2 back and the token 4 back",
..., and the empty context), and, as the ``weights_holder`` attacker, at a key-free discretisation of the
previous position's routing (k-means clusters of the open weights' router probabilities, fitted on its own
plain corpus; never the key's hyperplanes). Per context c and next token t it compares the conditional
frequencies under the watermark (p_w) and under its own model (p_b):

    s(t, c) = 1/2 * min(p_w / p_b, 2)  when p_w / p_b >= 1, else 0

the paper's score, for every context the watermarked corpus shows at least ``min_count`` times (trusted) and
every token it shows after it. p_b is smoothed toward the plain corpus's unigram frequency (a Dirichlet prior
of weight ``base_prior``), so a token the plain corpus never wrote after c counts as strongly boosted but a
context the plain corpus never saw does not divide by zero. At generation time the scores of the contexts of
the current position are combined, each trusted context weighing ``log(1 + its count)`` (evidence with
diminishing returns) and the sum divided by the total weight, so the combined score lies in [0, 1]:

    score(t | position) = sum_c w_c s(t, c) / sum_c w_c  over the position's trusted contexts c

:class:`StolenScores` keeps the scores as one sorted array of context codes (every context is an exact integer
code: token fields of ``ceil(log2(V + 2))`` bits, 0 where the mask leaves a token out, so masks never collide)
with a CSR list of (token, score) entries per context; :class:`StealingProcessor` looks up a whole batch's
contexts with ``torch.searchsorted`` and adds ``delta * score`` to the logits (negative delta: the scrubbing
direction) with one scatter, no Python loop over rows, contexts or tokens.

The study that runs spoofing and scrubbing over schemes and corpus sizes is :mod:`moewm.evaluation.stealing`
(``python -m moewm.evaluation.stealing``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from moewm.config import ConfigError

ATTACKERS = ("text_only", "weights_holder")
NO_TOKEN = -1  # a context position before the sequence's first token
MAX_CODE_BITS = 63
WEIGHTINGS = ("equal", "log_count", "size")


@dataclass(frozen=True)
class StealingConfig:
    """What the attacker conditions on and how much evidence it trusts."""

    context_tokens: int = 4  # h: tokens before the scored one (all their subsets are contexts)
    min_count: int = 2  # a context is trusted when the watermarked corpus shows it this many times
    routing_clusters: int = 0  # weights_holder: k-means clusters of the previous position's routing (0: text only)
    ratio_cap: float = 2.0  # the paper's cap of p_w / p_b (a score is min(ratio, cap) / cap)
    base_prior: float = 1.0  # Dirichlet weight of the plain unigram prior in p_b
    # How a trusted context weighs in the combined score: equal (1), log_count (log(1 + its count)), or
    # size (the number of fields it keeps, so the empty context drops out and specific ones lead).
    weighting: str = "equal"

    def validate(self, vocab_size: Optional[int] = None) -> None:
        if not 0 <= self.context_tokens <= 4:
            raise ConfigError(f"stealing.context_tokens={self.context_tokens}: allowed range is [0, 4]")
        if self.min_count < 1:
            raise ConfigError(f"stealing.min_count={self.min_count}: must be >= 1")
        if not 0 <= self.routing_clusters <= 127:
            raise ConfigError(f"stealing.routing_clusters={self.routing_clusters}: allowed range is [0, 127] (0: text only)")
        if self.ratio_cap <= 1:
            raise ConfigError(f"stealing.ratio_cap={self.ratio_cap}: must be > 1")
        if self.base_prior <= 0:
            raise ConfigError(f"stealing.base_prior={self.base_prior}: must be > 0")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"stealing.weighting={self.weighting!r}: allowed values are {WEIGHTINGS}")
        if vocab_size is not None:
            bits = self.context_tokens * token_bits(vocab_size) + cluster_bits(self.routing_clusters)
            if bits > MAX_CODE_BITS:
                raise ConfigError(f"stealing.context_tokens={self.context_tokens} with {self.routing_clusters} routing clusters needs "
                                  f"{bits} bits per context code for a vocabulary of {vocab_size}: allowed at most {MAX_CODE_BITS}")

    @property
    def fields(self) -> int:
        """Context fields: the h tokens, and the routing cluster when there is one."""
        return self.context_tokens + (1 if self.routing_clusters else 0)


def token_bits(vocab_size: int) -> int:
    """Bits of one token field: values 0 (masked out), 1 (no token) and id + 2."""
    return int(vocab_size + 1).bit_length()


def cluster_bits(clusters: int) -> int:
    return int(clusters).bit_length() if clusters else 0


def context_masks(fields: int) -> np.ndarray:
    """(2^fields, fields) bool: every subset of the context fields, the empty one first."""
    return np.array(list(itertools.product([False, True], repeat=fields)), dtype=bool).reshape(2**fields, fields)


class ContextCoder:
    """Exact integer codes of (mask, context) pairs, the same in numpy (estimation) and torch (generation).

    Field j (0 = the token just before) holds ``id + 2`` (1 for :data:`NO_TOKEN`) when the mask keeps it, else 0;
    the routing field (last, weights_holder only) holds ``cluster + 1``. Distinct (mask, context) pairs get
    distinct codes, so one sorted array holds every mask's contexts.
    """

    def __init__(self, cfg: StealingConfig, vocab_size: int) -> None:
        cfg.validate(vocab_size)
        self.cfg = cfg
        tb = token_bits(vocab_size)
        shifts = [tb * j for j in range(cfg.context_tokens)]
        if cfg.routing_clusters:
            shifts.append(tb * cfg.context_tokens)
        self.shifts = np.array(shifts, dtype=np.int64)
        self.masks = context_masks(cfg.fields)  # (M, F)

    def values(self, before: np.ndarray, clusters: Optional[np.ndarray]) -> np.ndarray:
        """(T, F) field values: ``before`` (T, h) the tokens before, nearest first, NO_TOKEN where none."""
        parts = [before.astype(np.int64) + 2]
        if self.cfg.routing_clusters:
            if clusters is None:
                raise ValueError("this attacker conditions on routing clusters: pass clusters (T,)")
            parts.append(clusters.astype(np.int64).reshape(-1, 1) + 1)
        return np.concatenate(parts, axis=1)

    def codes(self, values: np.ndarray) -> np.ndarray:
        """(T, M) codes of every mask's context."""
        shifted = values << self.shifts  # (T, F); fields occupy disjoint bits, so a sum is their OR
        return shifted @ self.masks.T.astype(np.int64)

    def torch_codes(self, values: torch.Tensor) -> torch.Tensor:
        """(B, M) codes (torch), the same as :meth:`codes`."""
        shifts = torch.as_tensor(self.shifts, device=values.device)
        masks = torch.as_tensor(self.masks, device=values.device).long()
        return ((values << shifts).unsqueeze(1) * masks.unsqueeze(0)).sum(-1)


def positions_of(rows: Sequence[Any], h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every response position of a corpus: (T, h) the tokens before it (prompt included, nearest first,
    NO_TOKEN before the sequence), (T,) the token itself, and (T,) its index in its row's prompt + response."""
    before, target, index = [], [], []
    for r in rows:
        seq = np.asarray(list(r.prompt_ids) + list(r.ids), dtype=np.int64)
        n_prompt = len(r.prompt_ids)
        padded = np.concatenate([np.full(h, NO_TOKEN, np.int64), seq])
        pos = np.arange(n_prompt, len(seq))
        if not len(pos):
            continue
        # padded[pos + h - j] is the token j back from position pos (j = 1..h)
        before.append(np.stack([padded[pos + h - j] for j in range(1, h + 1)], axis=1) if h else np.zeros((len(pos), 0), np.int64))
        target.append(seq[pos])
        index.append(pos)
    if not target:
        return np.zeros((0, h), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(before), np.concatenate(target), np.concatenate(index)


def context_weights(keys: np.ndarray, counts: np.ndarray, coder: ContextCoder) -> np.ndarray:
    """(C,) float32 weight of every trusted context (:attr:`StealingConfig.weighting`)."""
    kind = coder.cfg.weighting
    if kind == "equal":
        return np.ones(len(keys), np.float32)
    if kind == "log_count":
        return np.log1p(counts).astype(np.float32)
    width = np.diff(np.r_[coder.shifts, MAX_CODE_BITS + 1])  # bits of every field
    kept = ((keys[:, None] >> coder.shifts[None, :]) & ((1 << width[None, :]) - 1)) > 0
    return kept.sum(-1).astype(np.float32)


def _group(keys: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (key, token) pairs sorted by key then token, and the inverse index of every input pair."""
    order = np.lexsort((tokens, keys))
    k, t = keys[order], tokens[order]
    new = np.ones(len(k), dtype=bool)
    new[1:] = (k[1:] != k[:-1]) | (t[1:] != t[:-1])
    group = np.cumsum(new) - 1
    inverse = np.empty(len(k), dtype=np.int64)
    inverse[order] = group
    return k[new], t[new], inverse


@dataclass
class StolenScores:
    """The attacker's estimate: trusted context codes (sorted), their weights, and per context the boosted
    tokens and their scores (CSR: ``offsets[i]:offsets[i + 1]``)."""

    coder: ContextCoder
    keys: torch.Tensor  # (C,) int64, sorted
    weights: torch.Tensor  # (C,) float32
    offsets: torch.Tensor  # (C + 1,) int64
    tokens: torch.Tensor  # (E,) int64
    scores: torch.Tensor  # (E,) float32
    vocab_size: int

    @property
    def num_contexts(self) -> int:
        return int(self.keys.numel())

    @property
    def num_entries(self) -> int:
        return int(self.tokens.numel())

    def to(self, device: torch.device | str) -> "StolenScores":
        for name in ("keys", "weights", "offsets", "tokens", "scores"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def score_matrix(self, values: torch.Tensor) -> torch.Tensor:
        """(B, V) combined scores in [0, 1] for (B, F) context field values (:meth:`ContextCoder.values` layout)."""
        batch = values.shape[0]
        out = torch.zeros(batch, self.vocab_size, dtype=torch.float32, device=values.device)
        if not self.num_contexts:
            return out
        codes = self.coder.torch_codes(values.long())  # (B, M)
        idx = torch.searchsorted(self.keys, codes).clamp(max=self.num_contexts - 1)
        found = self.keys[idx] == codes
        weight = torch.where(found, self.weights[idx], torch.zeros((), device=values.device))  # (B, M)
        total = weight.sum(-1, keepdim=True)
        starts = torch.where(found, self.offsets[idx], torch.zeros_like(idx)).flatten()
        lengths = torch.where(found, self.offsets[idx + 1] - self.offsets[idx], torch.zeros_like(idx)).flatten()
        n = int(lengths.sum())
        if n:
            row = torch.arange(batch, device=values.device).repeat_interleave(codes.shape[1]).repeat_interleave(lengths)
            first = torch.cumsum(lengths, 0) - lengths
            entry = torch.arange(n, device=values.device) - first.repeat_interleave(lengths) + starts.repeat_interleave(lengths)
            contrib = self.scores[entry] * weight.flatten().repeat_interleave(lengths)
            out.index_put_((row, self.tokens[entry]), contrib, accumulate=True)
        return out / total.clamp(min=1e-12)


def estimate_scores(watermarked: Sequence[Any], plain: Sequence[Any], cfg: StealingConfig, vocab_size: int,
                    clusters_w: Optional[np.ndarray] = None, clusters_b: Optional[np.ndarray] = None) -> StolenScores:
    """The attacker's scores from its two corpora (rows with ``prompt_ids`` and ``ids``).

    ``clusters_w`` / ``clusters_b`` (weights_holder): the routing cluster of the position before every response
    position, in :func:`positions_of` order.
    """
    coder = ContextCoder(cfg, vocab_size)
    h = cfg.context_tokens
    bw, tw, _ = positions_of(watermarked, h)
    bb, tb, _ = positions_of(plain, h)
    codes_w = coder.codes(coder.values(bw, clusters_w))  # (Tw, M)
    codes_b = coder.codes(coder.values(bb, clusters_b))  # (Tb, M)
    m = codes_w.shape[1]
    # the plain corpus's unigram frequencies: the prior of p_b (add-half, so every token has mass)
    unigram = (np.bincount(tb, minlength=vocab_size)[:vocab_size] + 0.5) / (len(tb) + 0.5 * vocab_size)
    # (context, token) pairs of both corpora, every mask at once; counts per corpus over their union
    keys = np.concatenate([codes_w.reshape(-1), codes_b.reshape(-1)])
    toks = np.concatenate([np.repeat(tw, m), np.repeat(tb, m)])
    in_w = np.arange(len(keys)) < codes_w.size
    pk, pt, inv = _group(keys, toks)
    c_w = np.bincount(inv[in_w], minlength=len(pk))
    c_b = np.bincount(inv[~in_w], minlength=len(pk))
    ctx, ctx_inv = np.unique(pk, return_inverse=True)  # contexts of the union, and each pair's context
    n_w_ctx = np.bincount(ctx_inv, weights=c_w, minlength=len(ctx))
    n_b_ctx = np.bincount(ctx_inv, weights=c_b, minlength=len(ctx))
    n_w, n_b = n_w_ctx[ctx_inv], n_b_ctx[ctx_inv]
    seen = c_w > 0
    p_w = np.where(seen, c_w / np.maximum(n_w, 1), 0.0)
    p_b = (c_b + cfg.base_prior * unigram[pt]) / (n_b + cfg.base_prior)
    ratio = p_w / p_b
    score = np.where(ratio >= 1, np.minimum(ratio, cfg.ratio_cap) / cfg.ratio_cap, 0.0)
    keep = seen & (n_w >= cfg.min_count) & (score > 0)
    trusted = n_w_ctx >= cfg.min_count
    keys_t = ctx[trusted]
    weights = context_weights(keys_t, n_w_ctx[trusted], coder)
    # CSR over the trusted contexts (pairs are sorted by context then token, so entries arrive grouped)
    ek, et, es = pk[keep], pt[keep], score[keep]
    counts = np.bincount(np.searchsorted(keys_t, ek), minlength=len(keys_t)) if len(keys_t) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return StolenScores(coder, torch.as_tensor(keys_t, dtype=torch.long), torch.as_tensor(weights), torch.as_tensor(offsets),
                        torch.as_tensor(et, dtype=torch.long), torch.as_tensor(es, dtype=torch.float32), vocab_size)


class RoutingClusters:
    """The weights_holder's key-free discretisation of routing: k-means centroids of router-probability vectors
    (the previous position's, all MoE layers of the extractor's slice) fitted on the attacker's own corpus."""

    def __init__(self, centroids: np.ndarray) -> None:
        self.centroids = torch.as_tensor(centroids, dtype=torch.float32)

    @classmethod
    def fit(cls, features: np.ndarray, clusters: int, seed: int = 0, max_points: int = 50_000) -> "RoutingClusters":
        from scipy.cluster.vq import kmeans2

        rng = np.random.default_rng(seed)
        data = features if len(features) <= max_points else features[rng.choice(len(features), max_points, replace=False)]
        centroids, _ = kmeans2(data.astype(np.float64), clusters, seed=seed, minit="++", iter=20)
        return cls(centroids)

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) nearest centroid of every (N, D) feature vector."""
        c = self.centroids.to(features.device)
        dist = (features.float() ** 2).sum(-1, keepdim=True) - 2 * features.float() @ c.T + (c**2).sum(-1)
        return dist.argmin(-1)


@torch.no_grad()
def routing_features(model: Any, capture: Any, rows: Sequence[Any], batch_size: int = 32, pad: int = 0) -> list[np.ndarray]:
    """Per row, (len(prompt) + len(ids), D) router probabilities at every position of prompt + response: one
    forward per batch with ``capture`` (a :class:`moewm.engine.routing.FeatureCapture` on ``model``) attached."""
    from moewm.engine.padding import pad_rows

    device = model.get_input_embeddings().weight.device
    out: list[np.ndarray] = []
    for s in range(0, len(rows), batch_size):
        seqs = [list(r.prompt_ids) + list(r.ids) for r in rows[s : s + batch_size]]
        ids, mask = pad_rows(seqs, pad, side="right")
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        feats = capture.features(len(seqs)).cpu().numpy()
        out += [feats[i, : len(q)] for i, q in enumerate(seqs)]
    return out


def previous_clusters(features: list[np.ndarray], rows: Sequence[Any], clusters: RoutingClusters) -> np.ndarray:
    """(T,) the routing cluster of the position before every response position, in :func:`positions_of` order."""
    prev = [f[len(r.prompt_ids) - 1 : len(r.prompt_ids) - 1 + len(r.ids)] for f, r in zip(features, rows) if len(r.ids)]
    if not prev:
        return np.zeros(0, np.int64)
    return clusters.assign(torch.as_tensor(np.concatenate(prev))).numpy().astype(np.int64)


class StealingProcessor(LogitsProcessor):
    """Adds ``delta * score(t | current context)`` to the logits (delta < 0 steers away: scrubbing).

    The context is the last h ids of each row (the prompt's when the response is shorter) and, for the
    weights_holder, the routing cluster of the last position read from ``capture`` (hooks on the generating
    model, which must be the deployed model's open weights).
    """

    def __init__(self, table: StolenScores, delta: float, capture: Any = None, clusters: Optional[RoutingClusters] = None) -> None:
        cfg = table.coder.cfg
        if cfg.routing_clusters and (capture is None or clusters is None):
            raise ValueError("a routing-conditioned table needs capture= (router hooks on the generating model) and clusters=")
        self.table = table
        self.delta = float(delta)
        self.capture = capture
        self.clusters = clusters

    def values(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """(B, F) the current context's field values."""
        h = self.table.coder.cfg.context_tokens
        batch, length = input_ids.shape
        take = input_ids[:, max(0, length - h) :].flip(-1)  # nearest first
        if take.shape[1] < h:
            take = torch.cat([take, torch.full((batch, h - take.shape[1]), NO_TOKEN, dtype=take.dtype, device=take.device)], 1)
        parts = [take.long() + 2]
        if self.table.coder.cfg.routing_clusters:
            feats = self.capture.features(batch, positions=slice(-1, None))[:, -1]
            parts.append(self.clusters.assign(feats).to(take.device).long().view(-1, 1) + 1)
        return torch.cat(parts, 1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.delta == 0:
            return scores
        s = self.table.score_matrix(self.values(input_ids))
        v = min(scores.shape[-1], s.shape[-1])
        out = scores.clone()
        out[:, :v] = out[:, :v] + self.delta * s[:, :v].to(scores.dtype)
        return out

