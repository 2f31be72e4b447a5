"""Many watermark keys as one bank: the deployed key's encoder and the reference keys that calibrate p-values.

A p-value is a promise about text written *without* the key. When the deployed key is drawn at random,
such text's statistic under that key is exchangeable with its statistic under independently drawn keys,
so its rank among R reference keys gives an exact p-value whatever wrote the text (a person, greedy
decoding, another model). That holds only if the reference keys are drawn exactly like the deployed
key, so :func:`build_bank` makes both: the deployed key is a bank of one. The reference keys come from
a public secret, so a bank on disk reveals nothing about the deployed secret.

Everything is stacked over keys: projections (R, D, bits), centres (R, D), pools (R, bits, pool_size),
and what :func:`moewm.engine.lsh.pool_mask` needs (bit mixings, hash salts). A ``partition`` bank stores the
key-independent partition once and, per key, which group each bit owns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from moewm.config import ConfigError, EncoderConfig
from moewm.engine.keys import WatermarkKey
from moewm.engine.lsh import CalibrationStats, LSHEncoder, projection_for

log = logging.getLogger(__name__)

# Reference keys are public: anyone can rebuild them, and they never depend on the deployed secret.
REFERENCE_SECRET = "moewm-public-reference-keys/v1"
BANK_VERSION = 3
# Extra candidates per pool found in float32 before the exact float64 re-ranking (see semantic_pools).
_RERANK_MARGIN = 16
_ANCHOR_CHUNK_BYTES = 1 << 27


def reference_keys(count: int) -> list[WatermarkKey]:
    """The first ``count`` public reference keys (seed i of the public reference secret)."""
    if count < 1:
        raise ConfigError(f"watermark.reference_keys={count}: must be >= 1")
    return [WatermarkKey(REFERENCE_SECRET, i) for i in range(count)]


@dataclass
class KeyBank:
    """Encoders of several keys, stacked; ``encoder(i)`` is the generation-time view of key i."""

    projection: torch.Tensor  # (R, D, nb) float32
    center: torch.Tensor  # (R, D) float32
    pools: Optional[torch.Tensor]  # (R, nb, pool_size) long; None for a partition
    usable: torch.Tensor  # (V,) bool: tokens that may occur in text
    fingerprints: list[str]
    kind: str
    mixing: torch.Tensor  # (R, m, nb) long: pool i is green when bits mixing[r, :, i] are all 1
    salt: torch.Tensor  # (R,) long: each key's 32-bit salt for hashed green lists
    green_lists: str = "bits"
    groups: Optional[torch.Tensor] = None  # (nb, P) long, -1 padded: a partition's groups (key-independent)
    owner: Optional[torch.Tensor] = None  # (R, nb) long: the group bit i of key r owns
    vote_lists: int = 1  # green_lists=vote: sub-signature lists voting on each pool
    context_tokens: int = 0  # 1: the previous token is hashed into every green list

    @property
    def num_keys(self) -> int:
        return int(self.projection.shape[0])

    @property
    def num_bits(self) -> int:
        return int(self.projection.shape[2])

    @property
    def vocab_size(self) -> int:
        return int(self.usable.numel())

    @property
    def num_usable(self) -> int:
        return int(self.usable.sum())

    def key_pools(self, i: int) -> torch.Tensor:
        """(nb, P) pools of key i (-1 pads short pools)."""
        if self.groups is not None and self.owner is not None:
            return self.groups[self.owner[i]]
        assert self.pools is not None
        return self.pools[i]

    def pool_sizes(self) -> torch.Tensor:
        """(R, nb) float: tokens in each key's pools."""
        if self.groups is not None and self.owner is not None:
            return (self.groups >= 0).sum(-1).double()[self.owner]
        assert self.pools is not None
        return (self.pools >= 0).sum(-1).double()

    def encoder(self, i: int = 0) -> LSHEncoder:
        return LSHEncoder(self.projection[i], self.center[i], self.key_pools(i), self.vocab_size, self.fingerprints[i], self.kind,
                          usable=self.usable, green_lists=self.green_lists, mixing=self.mixing[i], salt=self.salt[i],
                          vote_lists=self.vote_lists, context_tokens=self.context_tokens)

    def select(self, start: int, stop: int) -> "KeyBank":
        """Keys ``start`` .. ``stop - 1`` as a bank of their own (views, no copy)."""
        return KeyBank(self.projection[start:stop], self.center[start:stop], None if self.pools is None else self.pools[start:stop],
                       self.usable, self.fingerprints[start:stop], self.kind, self.mixing[start:stop], self.salt[start:stop],
                       self.green_lists, self.groups, None if self.owner is None else self.owner[start:stop],
                       self.vote_lists, self.context_tokens)

    def tensors(self) -> dict[str, Optional[torch.Tensor]]:
        return {"projection": self.projection, "center": self.center, "pools": self.pools, "usable": self.usable,
                "mixing": self.mixing, "salt": self.salt, "groups": self.groups, "owner": self.owner}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for name, t in self.tensors().items() if t is not None and name != "usable")


def semantic_pools(embeddings: torch.Tensor, valid: torch.Tensor, cfg: EncoderConfig, keys: Sequence[WatermarkKey]) -> torch.Tensor:
    """(R, nb, pool_size): pool i of key r = the usable tokens nearest (cosine of input embeddings) to a
    keyed anchor, anchor first.

    Candidates come from a float32 product on the embeddings' device, a margin wider than the pool;
    their exact float64 similarities, recomputed on the CPU, decide the pool, so a key gives the same
    pools on any machine (a float32 rounding can only reorder tokens far inside the margin).
    """
    valid = valid.cpu()
    valid_ids = torch.nonzero(valid, as_tuple=True)[0]
    n_valid = valid_ids.numel()
    if cfg.pool_size > n_valid:
        raise ConfigError(f"encoder.pool_size={cfg.pool_size}: allowed range is [1, {n_valid}] (usable tokens)")
    anchors = []
    for key in keys:  # one keyed draw per key (HMAC-seeded generators cannot be batched)
        gen = key.generator("anchors")
        if cfg.num_bits <= n_valid:
            anchors.append(torch.randperm(n_valid, generator=gen)[: cfg.num_bits])
        else:
            anchors.append(torch.randint(n_valid, (cfg.num_bits,), generator=gen))
    anchor_ids = valid_ids[torch.stack(anchors)].reshape(-1)  # (R * nb,)
    emb = embeddings.detach()
    device = emb.device
    unit = torch.nn.functional.normalize(emb.float(), dim=-1)
    penalty = torch.zeros(emb.shape[0], device=device)
    penalty[~valid.to(device)] = float("-inf")
    width = min(cfg.pool_size + _RERANK_MARGIN, n_valid)
    rows = max(1, _ANCHOR_CHUNK_BYTES // (4 * emb.shape[0]))
    candidates = []
    for start in range(0, anchor_ids.numel(), rows):
        sims = unit[anchor_ids[start : start + rows].to(device)] @ unit.T + penalty
        candidates.append(torch.topk(sims, width, dim=1).indices.cpu())
    cand = torch.cat(candidates)  # (R * nb, width)
    exact_unit = torch.nn.functional.normalize(emb.cpu().double(), dim=-1)
    anchor_ids = anchor_ids.cpu()
    step = max(1, _ANCHOR_CHUNK_BYTES // (8 * width * emb.shape[1]))
    pools = torch.empty(cand.shape[0], cfg.pool_size, dtype=torch.long)
    for start in range(0, cand.shape[0], step):  # chunks bound the (anchors, width, hidden) float64 copy
        c = cand[start : start + step]
        exact = torch.einsum("ah,awh->aw", exact_unit[anchor_ids[start : start + step]], exact_unit[c])
        order = torch.sort(exact, dim=1, descending=True, stable=True).indices[:, : cfg.pool_size]
        pools[start : start + step] = torch.gather(c, 1, order)
    return pools.reshape(len(keys), cfg.num_bits, cfg.pool_size)


def random_pools(valid: torch.Tensor, cfg: EncoderConfig, keys: Sequence[WatermarkKey]) -> torch.Tensor:
    """(R, nb, pool_size) pools of uniformly drawn usable tokens (``encoder.pools=random``)."""
    valid_ids = torch.nonzero(valid.cpu(), as_tuple=True)[0]
    if cfg.pool_size > valid_ids.numel():
        raise ConfigError(f"encoder.pool_size={cfg.pool_size}: allowed range is [1, {valid_ids.numel()}] (usable tokens)")
    out = []
    for key in keys:
        scores = torch.rand(cfg.num_bits, valid_ids.numel(), generator=key.generator("random-pools"))
        out.append(valid_ids[torch.topk(scores, cfg.pool_size, dim=1).indices])
    return torch.stack(out)


def balanced_partition(embeddings: torch.Tensor, valid: torch.Tensor, parts: int, refine: int = 4) -> torch.Tensor:
    """(parts, P) long, -1 padded: the usable tokens split into ``parts`` groups of sizes differing by at
    most one, each semantically coherent.

    Recursive balanced 2-means on unit input embeddings: a group is split at the median (or the
    proportional quantile) of its projection on the top principal direction, then the split is refined
    by a few balanced 2-means steps (project on the difference of the halves' centroids, split at the
    same quantile). Float64 on the CPU, signs fixed, stable sorts: the same groups on any machine.
    """
    ids = torch.nonzero(valid.cpu(), as_tuple=True)[0]
    if parts > ids.numel():
        raise ConfigError(f"encoder.num_bits={parts}: a partition needs at most one group per usable token ({ids.numel()})")
    unit = torch.nn.functional.normalize(embeddings.detach().cpu().double(), dim=-1)
    out: list[torch.Tensor] = []

    def direction(x: torch.Tensor) -> torch.Tensor:
        v = torch.ones(x.shape[1], dtype=torch.float64) / x.shape[1] ** 0.5
        for _ in range(30):  # power iteration from a fixed start: deterministic, no LAPACK sign choices
            v = x.T @ (x @ v)
            v = v / v.norm().clamp(min=1e-300)
        return v

    def split(members: torch.Tensor, k: int) -> None:
        if k == 1:
            out.append(members)
            return
        left_k = k // 2
        n_left = (members.numel() * left_k + k // 2) // k
        x = unit[members]
        x = x - x.mean(0)
        proj = x @ direction(x)
        for _ in range(refine + 1):
            order = torch.sort(proj, stable=True).indices
            left, right = order[:n_left], order[n_left:]
            axis = x[right].mean(0) - x[left].mean(0)
            proj = x @ axis
        order = torch.sort(proj, stable=True).indices
        split(members[order[:n_left]], left_k)
        split(members[order[n_left:]], k - left_k)

    split(ids, parts)
    width = max(g.numel() for g in out)
    groups = torch.full((parts, width), -1, dtype=torch.long)
    for i, g in enumerate(out):
        groups[i, : g.numel()] = torch.sort(g).values
    return groups


# The random partition is public and fixed: a seed of its own, never a key's.
RANDOM_PARTITION_SEED = 0x5EEDC0DE


def random_partition(valid: torch.Tensor, parts: int) -> torch.Tensor:
    """(parts, P) long, -1 padded: the usable tokens dealt into ``parts`` groups of sizes differing by at most
    one in a uniformly random order drawn from a public seed (``encoder.pools=random_partition``): like the
    semantic partition every usable token is in exactly one group, but a group's tokens are unrelated."""
    ids = torch.nonzero(valid.cpu(), as_tuple=True)[0]
    if parts > ids.numel():
        raise ConfigError(f"encoder.num_bits={parts}: a partition needs at most one group per usable token ({ids.numel()})")
    shuffled = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(RANDOM_PARTITION_SEED))]
    width = (ids.numel() + parts - 1) // parts
    groups = torch.full((parts, width), -1, dtype=torch.long)
    for i in range(parts):  # group i takes every parts-th token of the shuffled order
        members = torch.sort(shuffled[i::parts]).values
        groups[i, : members.numel()] = members
    return groups


_PARTITIONS: dict[str, torch.Tensor] = {}


def model_partition(embeddings: torch.Tensor, valid: torch.Tensor, parts: int) -> torch.Tensor:
    """:func:`balanced_partition`, built once per (embeddings, usable tokens, parts) in this process."""
    name = f"{_digest(embeddings)}-{_digest(valid.bool())}-{parts}"
    if name not in _PARTITIONS:
        if len(_PARTITIONS) >= _MEMORY_LIMIT:
            _PARTITIONS.pop(next(iter(_PARTITIONS)))
        _PARTITIONS[name] = balanced_partition(embeddings, valid, parts)
    return _PARTITIONS[name]


def _keyed_draws(cfg: EncoderConfig, keys: Sequence[WatermarkKey]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, m, nb) bit mixings (identity first) and (R,) hash salts, from each key's own streams."""
    nb, m = cfg.num_bits, cfg.green_bits
    mixings, salts = [], []
    for key in keys:
        rows = [torch.arange(nb)]
        if m > 1:
            gen = key.generator("green-mixing")
            rows += [torch.randperm(nb, generator=gen) for _ in range(m - 1)]
        mixings.append(torch.stack(rows))
        salts.append(torch.randint(0, 2**32, (1,), generator=key.generator("green-salt"), dtype=torch.long)[0])
    return torch.stack(mixings), torch.stack(salts)


def build_bank(
    cfg: EncoderConfig,
    keys: Sequence[WatermarkKey],
    feature_dim: int,
    embeddings: torch.Tensor,
    valid_tokens: torch.Tensor,
    vocab_size: int,
    calibration: Optional[CalibrationStats] = None,
    partition: Optional[torch.Tensor] = None,
) -> KeyBank:
    """Hyperplanes and pools of every key, drawn from each key's HMAC streams (deterministic anywhere).

    ``partition`` passes an already built :func:`balanced_partition` (it does not depend on the key)."""
    cfg.validate(vocab_size=vocab_size)
    if not keys:
        raise ValueError("build_bank: no keys")
    planes = [projection_for(cfg, key, feature_dim, calibration) for key in keys]
    projection = torch.stack([p for p, _ in planes]).float()
    center = torch.stack([c for _, c in planes]).float()
    mixing, salt = _keyed_draws(cfg, keys)
    usable = valid_tokens.bool().cpu()
    fingerprints = [k.fingerprint for k in keys]
    design = cfg.pool_design
    if design in ("partition", "random_partition"):
        if design == "random_partition":
            groups = random_partition(valid_tokens, cfg.num_bits)
        else:
            groups = partition if partition is not None else model_partition(embeddings, valid_tokens, cfg.num_bits)
        owner = torch.stack([torch.randperm(cfg.num_bits, generator=key.generator("partition-owner")) for key in keys])
        return KeyBank(projection, center, None, usable, fingerprints, cfg.kind, mixing, salt, cfg.green_lists, groups, owner,
                       cfg.vote_lists, cfg.context_tokens)
    pools = semantic_pools(embeddings, valid_tokens, cfg, keys) if design == "anchors" else random_pools(valid_tokens, cfg, keys)
    return KeyBank(projection, center, pools.long(), usable, fingerprints, cfg.kind, mixing, salt, cfg.green_lists,
                   vote_lists=cfg.vote_lists, context_tokens=cfg.context_tokens)


def build_encoder(
    cfg: EncoderConfig,
    key: WatermarkKey,
    feature_dim: int,
    embeddings: torch.Tensor,
    valid_tokens: torch.Tensor,
    vocab_size: int,
    calibration: Optional[CalibrationStats] = None,
) -> LSHEncoder:
    """One key's encoder, drawn by the same code as the reference keys (a bank of one)."""
    return build_bank(cfg, [key], feature_dim, embeddings, valid_tokens, vocab_size, calibration).encoder(0)


# -- the reference bank, cached in memory and on disk ---------------------------------------------
_MEMORY: dict[str, KeyBank] = {}
_MEMORY_LIMIT = 2


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def bank_cache_key(
    cfg: EncoderConfig, count: int, feature_dim: int, embeddings: torch.Tensor, valid_tokens: torch.Tensor,
    calibration: Optional[CalibrationStats], model_id: str,
) -> str:
    """Names a reference bank by everything it is drawn from (never by a secret: the keys are public)."""
    meta = {
        "version": BANK_VERSION,
        "secret": REFERENCE_SECRET,
        "count": count,
        "encoder": {k: v for k, v in asdict(cfg).items() if k not in ("calibration_texts", "calibration_max_tokens")},
        "dim": feature_dim,
        "model": model_id,
        "embeddings": _digest(embeddings),
        "usable": _digest(valid_tokens.bool()),
        "calibration": _digest(calibration.mean, calibration.cov) if calibration is not None and cfg.kind != "simhash" else None,
    }
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]


def reference_bank(
    cfg: EncoderConfig,
    count: int,
    feature_dim: int,
    embeddings: torch.Tensor,
    valid_tokens: torch.Tensor,
    vocab_size: int,
    calibration: Optional[CalibrationStats] = None,
    cache_dir: str | Path | None = None,
    model_id: str = "",
) -> KeyBank:
    """The ``count`` public reference keys' bank for this model and encoder, built once per process and
    once per cache directory (every job of a sweep reuses it)."""
    name = bank_cache_key(cfg, count, feature_dim, embeddings, valid_tokens, calibration, model_id)
    if name in _MEMORY:
        return _MEMORY[name]
    path = Path(cache_dir) / f"refbank-{name}.pt" if cache_dir is not None else None
    bank = None
    if path is not None and path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            bank = KeyBank(blob["projection"], blob["center"], blob["pools"], blob["usable"], list(blob["fingerprints"]), str(blob["kind"]),
                           blob["mixing"], blob["salt"], str(blob["green_lists"]), blob["groups"], blob["owner"],
                           cfg.vote_lists, cfg.context_tokens)
            log.info("reference keys: %d from cache %s", bank.num_keys, path)
        except Exception as err:  # a truncated or foreign file: rebuild and overwrite it
            log.warning("reference keys: ignoring unreadable cache file %s (%s)", path, err)
            bank = None
    if bank is None:
        bank = build_bank(cfg, reference_keys(count), feature_dim, embeddings, valid_tokens, vocab_size, calibration)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save({**bank.tensors(), "fingerprints": bank.fingerprints, "kind": bank.kind, "green_lists": bank.green_lists}, tmp)
            tmp.replace(path)
            log.info("reference keys: built %d, cached at %s", count, path)
    while len(_MEMORY) >= _MEMORY_LIMIT:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[name] = bank
    return bank


def default_cache_dir() -> Path:
    """Where reference-key banks and null-text captures are cached: $MOEWM_CACHE_DIR or ~/.cache/moewm."""
    return Path(os.environ.get("MOEWM_CACHE_DIR") or Path.home() / ".cache" / "moewm")


def model_identity(model: nn.Module) -> str:
    """A short name for a model's weights in cache keys: its path, class and a digest of its embeddings."""
    config = getattr(model, "config", None)
    emb = model.get_input_embeddings().weight.detach()
    sample = emb.flatten()[:: max(1, emb.numel() // 65536)].float().cpu().numpy().tobytes()
    digest = hashlib.sha256(sample).hexdigest()[:12]
    return f"{getattr(config, '_name_or_path', '')}|{type(model).__name__}|{tuple(emb.shape)}|{digest}"
