"""The watermark-stealing study: spoofing and scrubbing success over schemes, attackers and corpus sizes.

    python -m moewm.evaluation.stealing --model tiny_moe --corpora outputs/stealing/corpora \\
        --schemes shipped,twin,kgw_h1 --counts 250,1000,4000 --out outputs/stealing/tiny_moe

For every scheme (a corpus ``CORPORA/<model>/<scheme>.jsonl`` of the deployed model's watermarked responses,
whose ``.meta.json`` gives the scheme's WatermarkConfig and key fingerprint), every attacker (``text_only``,
``weights_holder``) and every corpus size N (the corpus's first N rows, against the first N rows of the
attacker model's ``plain`` corpus), the attacker estimates its scores (:mod:`moewm.evaluation.stealing_scores`), then

* spoofs: its model writes answers to :func:`~moewm.evaluation.stealing_corpus.spoof_prompts` with
  ``+delta_att * score`` for every delta_att of the grid; the deployed key's detector (``detect_ids``) decides
  at the scheme's alpha (1e-3), and both embedded models judge perplexity. The null beside every row: the same
  detector on the attacker model's plain answers to the same prompts (delta_att = 0);
* scrubs: the deployed model's watermarked answers to the first ``scrub_count`` spoof prompts, paraphrased
  (:func:`moewm.evaluation.attacks.paraphrase`) with ``-delta_att * score``, against the unsteered paraphrase.

Every row carries its wall time; all sampling is seeded (``--sampling-seed``), so a rerun repeats the table.
The deployed key is ``WatermarkKey(--secret, seed)``, seed from the corpus's meta (else ``--seed``); a corpus
whose fingerprint differs is refused, and only fingerprints are written. Arguments are checked before any
weights load. Output: ``OUT/stealing.csv``, ``OUT/stealing.md`` and ``OUT/stealing.png``
(:mod:`moewm.evaluation.stealing_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from moewm.config import AttackConfig, ConfigError, EncoderConfig, ExtractorConfig, GenerationConfig, ModelConfig, WatermarkConfig
from moewm.engine.keys import WatermarkKey
from moewm.evaluation.stealing_scores import (ATTACKERS, RoutingClusters, StealingConfig, StealingProcessor, estimate_scores,
                                       previous_clusters, routing_features)
from moewm.evaluation.stealing_corpus import CorpusRow, read_corpus, read_meta, rows_done, spoof_prompts

log = logging.getLogger("moewm.stealing")
MODELS = ("tiny_moe", "tiny_olmoe")  # the embedded models (one tokenizer: each judges the other's ids)
DEFAULT_SECRET = "stealing-study-secret"


@dataclass
class StudyConfig:
    """One run of the study (the CLI's arguments)."""

    model: str = "tiny_moe"
    corpora: str = "outputs/stealing/corpora"
    schemes: tuple[str, ...] = ("shipped",)
    counts: tuple[int, ...] = (250, 1000, 4000)
    attackers: tuple[str, ...] = ATTACKERS
    deltas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    scrub_deltas: tuple[float, ...] = (8.0,)
    out: str = "outputs/stealing"
    attacker_model: Optional[str] = None  # None: the deployed model's own (open) weights
    spoof_count: int = 64
    scrub_count: int = 32
    scrub_strength: float = 1.0
    new_tokens: int = 64
    seed: int = 0
    secret: str = DEFAULT_SECRET
    sampling_seed: int = 1234
    context_tokens: int = 4
    min_count: int = 2
    routing_clusters: int = 32
    weighting: str = "equal"
    ppl_factor: float = 3.0
    batch_size: int = 32
    threads: int = 1
    cache_dir: Optional[str] = "outputs/cache/reference_keys"
    append: bool = False  # keep the rows of OUT/stealing.csv (runs split by scheme, attacker or N make one report)

    @property
    def attacker_model_name(self) -> str:
        return self.attacker_model or self.model

    @property
    def other_model(self) -> str:
        return next(m for m in MODELS if m != self.model)

    def corpus_path(self, model: str, name: str) -> Path:
        return Path(self.corpora) / model / f"{name}.jsonl"

    def stealing(self, attacker: str) -> StealingConfig:
        return StealingConfig(context_tokens=self.context_tokens, min_count=self.min_count, weighting=self.weighting,
                              routing_clusters=self.routing_clusters if attacker == "weights_holder" else 0)

    def validate(self) -> None:
        """Every argument, and the corpora's presence, size and key fingerprints, before any weights load."""
        if self.model not in MODELS:
            raise ConfigError(f"--model={self.model!r}: allowed values are {MODELS}")
        if self.attacker_model is not None and self.attacker_model not in MODELS:
            raise ConfigError(f"--attacker-model={self.attacker_model!r}: allowed values are {MODELS} (default: --model)")
        if not self.schemes or "plain" in self.schemes:
            raise ConfigError(f"--schemes={','.join(self.schemes)}: give one or more watermarked corpora of CORPORA/{self.model}/ "
                              "(not 'plain', the attacker's own corpus)")
        bad = [a for a in self.attackers if a not in ATTACKERS]
        if not self.attackers or bad:
            raise ConfigError(f"--attackers={','.join(self.attackers)}: allowed values are {ATTACKERS}")
        if "weights_holder" in self.attackers and self.attacker_model not in (None, self.model):
            raise ConfigError(f"--attackers weights_holder with --attacker-model={self.attacker_model}: allowed only with the deployed "
                              f"model's own weights ({self.model}): the attacker reads the routing from its generating model's routers")
        if not self.counts or min(self.counts) < 1:
            raise ConfigError(f"--counts={self.counts}: allowed values are integers >= 1 (corpus prefixes)")
        if any(d <= 0 for d in self.deltas) or not (self.deltas or (self.scrub_count and self.scrub_deltas)):
            raise ConfigError(f"--deltas={self.deltas}: allowed values are numbers > 0 (delta_att; the null, 0, is always run); "
                              "empty only when the run scrubs (--scrub-count and --scrub-deltas)")
        if any(d <= 0 for d in self.scrub_deltas):
            raise ConfigError(f"--scrub-deltas={self.scrub_deltas}: allowed values are numbers > 0 (steered away by -delta), or none")
        spoof_prompts(self.spoof_count)  # range error names the count
        if not 0 <= self.scrub_count <= self.spoof_count:
            raise ConfigError(f"--scrub-count={self.scrub_count}: allowed range is [0, {self.spoof_count}] (--spoof-count; 0: no scrubbing)")
        if not 0 < self.scrub_strength <= 1:
            raise ConfigError(f"--scrub-strength={self.scrub_strength}: allowed range is (0, 1]")
        if self.new_tokens < 1 or self.batch_size < 1 or self.threads < 1:
            raise ConfigError(f"--new-tokens={self.new_tokens}, --batch-size={self.batch_size}, --threads={self.threads}: allowed range is [1, inf)")
        if self.ppl_factor <= 1:
            raise ConfigError(f"--ppl-factor={self.ppl_factor}: must be > 1 (the perplexity cap relative to the plain answers')")
        for attacker in self.attackers:
            self.stealing(attacker).validate(8192)
        plain = self.corpus_path(self.attacker_model_name, "plain")
        for path in [plain] + [self.corpus_path(self.model, s) for s in self.schemes]:
            if not path.exists():
                raise ConfigError(f"corpus {path} does not exist (--corpora={self.corpora}, --model / --schemes; write it with "
                                  "scripts/stealing_corpora.py)")
            have = rows_done(path)
            if max(self.counts) > have:
                raise ConfigError(f"--counts={','.join(map(str, self.counts))}: allowed range is [1, {have}] ({path} holds {have} responses)")
        for scheme in self.schemes:
            scheme_setup(self, scheme)  # fingerprint and config checks


def _known(cls: Any, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` restricted to the dataclass's fields. A field this version does not know is dropped when it is
    null (a later version's default) and refused otherwise: the scheme would not be the one that wrote the corpus."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for k, v in values.items():
        if k not in names:
            if v is not None:
                raise ConfigError(f"{where}.{k}={v!r}: this moewm does not know the field, so it cannot rebuild the scheme that "
                                  "wrote the corpus (update moewm)")
            continue
        sub = names[k].default_factory
        if isinstance(v, dict) and isinstance(sub, type) and dataclasses.is_dataclass(sub):
            out[k] = sub(**_known(sub, v, f"{where}.{k}"))
        else:
            out[k] = v
    return out


def watermark_from_meta(meta: dict[str, Any], path: Path) -> WatermarkConfig:
    if not meta.get("watermarked") or not isinstance(meta.get("watermark"), dict):
        raise ConfigError(f"{path}: not a watermarked corpus (its meta names no watermark); --schemes takes watermarked corpora")
    cfg = WatermarkConfig(**_known(WatermarkConfig, meta["watermark"], "watermark"))
    cfg.validate()
    return cfg


def design_from_meta(meta: dict[str, Any]) -> tuple[ExtractorConfig, EncoderConfig]:
    """The extractor and encoder that wrote a corpus (the defaults for a corpus whose meta names none)."""
    extractor = meta.get("extractor") if isinstance(meta.get("extractor"), dict) else {}
    encoder = meta.get("encoder") if isinstance(meta.get("encoder"), dict) else {}
    out = ExtractorConfig(**_known(ExtractorConfig, extractor, "extractor")), EncoderConfig(**_known(EncoderConfig, encoder, "encoder"))
    out[0].validate()
    out[1].validate()
    return out


def scheme_setup(cfg: StudyConfig, scheme: str) -> tuple[WatermarkConfig, WatermarkKey, ExtractorConfig, EncoderConfig]:
    """The deployed scheme's WatermarkConfig, key, extractor and encoder for a corpus (from its meta); a ConfigError
    when the fingerprint differs."""
    path = cfg.corpus_path(cfg.model, scheme)
    meta = read_meta(path)
    if meta.get("model") not in (None, cfg.model):
        raise ConfigError(f"{path}: written by model {meta.get('model')!r}, not --model={cfg.model}")
    wm_cfg = watermark_from_meta(meta, path)
    extractor, encoder = design_from_meta(meta)
    seed = int(meta.get("seed", cfg.seed)) if meta.get("seed") is not None else cfg.seed
    key = WatermarkKey(cfg.secret, seed)
    if meta.get("key_fingerprint") != key.fingerprint:
        raise ConfigError(f"{path}: key fingerprint {meta.get('key_fingerprint')!r} does not match the deployed key's "
                          f"{key.fingerprint!r} (--secret / --seed): refusing to score a corpus written under another key")
    return wm_cfg, key, extractor, encoder


# -- the run -------------------------------------------------------------------------------------
@dataclass
class Texts:
    """Prompt ids and answer ids of one set of texts."""

    prompt_ids: list[list[int]]
    ids: list[list[int]]


@dataclass
class Models:
    deployed: Any
    tokenizer: Any
    other: Any
    attacker: Any
    capture: Any = None  # router hooks on the attacker's model (weights_holder)
    loaded: dict[str, Any] = field(default_factory=dict)


def _generation(cfg: StudyConfig) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, batch_size=cfg.batch_size,
                            sampling_seed=cfg.sampling_seed)


def _detect(wm: Any, texts: Texts) -> np.ndarray:
    out = wm.detect_ids(texts.ids, texts.prompt_ids)
    return np.nan_to_num(np.asarray(out.p_value, dtype=float), nan=1.0)


def _ppl(model: Any, texts: Texts, pad: int, batch_size: int) -> float:
    from moewm.evaluation.quality import perplexity

    return float(np.nanmean(perplexity(model, texts.prompt_ids, texts.ids, batch_size, pad)))


def _row(cfg: StudyConfig, scheme: str, wm_cfg: WatermarkConfig, key: WatermarkKey, mode: str, attacker: str, count: int,
         delta: float, p: np.ndarray, start: float, **extra: Any) -> dict[str, Any]:
    return {"model": cfg.model, "attacker_model": cfg.attacker_model_name, "scheme": scheme, "kind": wm_cfg.kind,
            "key_fingerprint": key.fingerprint, "attacker": attacker, "count": count, "mode": mode, "delta_att": delta,
            "texts": len(p), "detected": float(np.mean(p <= wm_cfg.alpha)) if len(p) else float("nan"),
            "median_p": float(np.median(p)) if len(p) else float("nan"), **extra, "wall_s": round(time.perf_counter() - start, 1)}


class Cache:
    """Arrays that a rerun with the same settings would compute again (the null answers, routing clusters), kept
    as ``.npz`` files under ``OUT/cache`` and named by the settings they depend on; None: no cache."""

    def __init__(self, folder: Optional[Path]) -> None:
        self.folder = folder

    def get(self, name: str, compute: Any) -> dict[str, np.ndarray]:
        path = None if self.folder is None else self.folder / f"{name}.npz"
        if path is not None and path.exists():
            with np.load(path) as f:
                return dict(f)
        value = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **value)
        return value


def _ragged(ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    return {"flat": np.asarray([t for x in ids for t in x], np.int64), "lengths": np.asarray([len(x) for x in ids], np.int64)}


def _unragged(d: dict[str, np.ndarray]) -> list[list[int]]:
    return [x.tolist() for x in np.split(d["flat"], np.cumsum(d["lengths"])[:-1])] if len(d["lengths"]) else []


def run_study(cfg: StudyConfig, on_row: Any = None, cache: Optional[Cache] = None) -> list[dict[str, Any]]:
    """All rows of the study (spoof, null, scrub); see the module docstring. ``on_row(rows)`` runs after every
    new row (the CLI writes the CSV as it goes)."""
    from moewm.engine.generation import encode_prompt, generate_batched
    from moewm.engine.padding import pad_id
    from moewm.engine.routing import FeatureCapture
    from moewm.evaluation.attacks import paraphrase
    from moewm.evaluation.quality import distinct_n
    from moewm.models.loading import load_model
    from moewm.schemes.registry import build_watermarker

    cfg.validate()
    torch.set_num_threads(cfg.threads)
    loaded = {m: load_model(ModelConfig(name=m, path=f"builtin:{m}")) for m in MODELS}
    tokenizer = loaded[cfg.model][1]
    pad = pad_id(tokenizer)
    deployed, other = loaded[cfg.model][0], loaded[cfg.other_model][0]
    attacker_model = loaded[cfg.attacker_model_name][0]
    vocab = int(deployed.get_output_embeddings().weight.shape[0])
    gen = _generation(cfg)
    prompts = [encode_prompt(tokenizer, p) for p in spoof_prompts(cfg.spoof_count)]
    plain_rows = read_corpus(cfg.corpus_path(cfg.attacker_model_name, "plain"), max(cfg.counts))
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(rows)

    def judge(texts: Texts) -> dict[str, float]:
        """Perplexity under both embedded models, and distinct bigrams (a spoof that loops would have low perplexity too)."""
        d2 = [distinct_n(np.asarray(x, np.int64), 2) for x in texts.ids]
        return {f"ppl_{cfg.model}": _ppl(deployed, texts, pad, cfg.batch_size), f"ppl_{cfg.other_model}": _ppl(other, texts, pad, cfg.batch_size),
                "distinct_2": float(np.nanmean(d2)) if len(d2) else float("nan")}

    start = time.perf_counter()
    cache = cache or Cache(None)
    tag = f"{cfg.attacker_model_name}_n{cfg.spoof_count}_t{cfg.new_tokens}_s{cfg.sampling_seed}"
    null = Texts(prompts, _unragged(cache.get(f"null_{tag}", lambda: _ragged(generate_batched(attacker_model, tokenizer, prompts, gen, [])))))
    null_quality = judge(null)
    null_s = time.perf_counter() - start
    capture = clusters = None
    plain_clusters = None
    if "weights_holder" in cfg.attackers:
        start = time.perf_counter()
        capture = FeatureCapture(attacker_model, ExtractorConfig())

        def fit() -> dict[str, np.ndarray]:
            feats = routing_features(attacker_model, capture, plain_rows, cfg.batch_size, pad)
            prev = [f[len(r.prompt_ids) - 1 : len(r.prompt_ids) - 1 + len(r.ids)] for f, r in zip(feats, plain_rows)]
            fitted = RoutingClusters.fit(np.concatenate(prev), cfg.routing_clusters, seed=cfg.sampling_seed)
            return {"centroids": fitted.centroids.numpy(), "assigned": previous_clusters(feats, plain_rows, fitted)}

        fitted = cache.get(f"clusters_{cfg.attacker_model_name}_plain{len(plain_rows)}_k{cfg.routing_clusters}_s{cfg.sampling_seed}", fit)
        clusters, plain_clusters = RoutingClusters(fitted["centroids"]), fitted["assigned"]
        log.info("weights_holder: %d routing clusters fitted on the attacker's plain corpus (%.0f s)", cfg.routing_clusters,
                 time.perf_counter() - start)
    for scheme in cfg.schemes:
        wm_cfg, key, extractor, encoder = scheme_setup(cfg, scheme)
        wm_rows = read_corpus(cfg.corpus_path(cfg.model, scheme), max(cfg.counts))
        with build_watermarker(wm_cfg.kind, deployed, tokenizer, wm_cfg, key, extractor=extractor, encoder=encoder,
                               cache_dir=cfg.cache_dir) as wm:
            start = time.perf_counter()
            p_null = _detect(wm, null)
            add(_row(cfg, scheme, wm_cfg, key, "plain", "none", 0, 0.0, p_null, start - null_s, **null_quality))
            fpr = rows[-1]["detected"]
            log.info("%s: null (plain answers) detected %.3f", scheme, fpr)
            scrub_texts = None
            if cfg.scrub_count and cfg.scrub_deltas:
                start = time.perf_counter()
                sp = prompts[: cfg.scrub_count]
                marked = Texts(sp, wm.generate_from_ids(sp, gen))
                add(_row(cfg, scheme, wm_cfg, key, "watermarked", "none", 0, 0.0, _detect(wm, marked), start, **judge(marked)))
                scrub_texts = [tokenizer.decode(x, skip_special_tokens=True) for x in marked.ids]
                start = time.perf_counter()
                para = _paraphrased(paraphrase(scrub_texts, _attack(cfg), attacker_model, tokenizer, cfg.sampling_seed, cfg.batch_size), sp, tokenizer)
                add(_row(cfg, scheme, wm_cfg, key, "paraphrase", "none", 0, 0.0, _detect(wm, para), start, **judge(para)))
            wm_clusters = None
            if capture is not None:
                start = time.perf_counter()
                wm_clusters = cache.get(
                    f"clusters_{cfg.model}_{scheme}{len(wm_rows)}_on_plain{len(plain_rows)}_k{cfg.routing_clusters}_s{cfg.sampling_seed}",
                    lambda: {"assigned": previous_clusters(routing_features(attacker_model, capture, wm_rows, cfg.batch_size, pad), wm_rows, clusters)},
                )["assigned"]
                log.info("%s: routing of %d watermarked responses (%.0f s)", scheme, len(wm_rows), time.perf_counter() - start)
            for attacker in cfg.attackers:
                for count in sorted(cfg.counts):
                    start = time.perf_counter()
                    steal = cfg.stealing(attacker)
                    cw = cb = None
                    if steal.routing_clusters:
                        cw = wm_clusters[: sum(len(r.ids) for r in wm_rows[:count])]
                        cb = plain_clusters[: sum(len(r.ids) for r in plain_rows[:count])]
                    table = estimate_scores(wm_rows[:count], plain_rows[:count], steal, vocab, cw, cb)
                    estimate_s = time.perf_counter() - start
                    extra = {"contexts": table.num_contexts, "entries": table.num_entries, "estimate_s": round(estimate_s, 1), "fpr": fpr}
                    use_capture = capture if steal.routing_clusters else None
                    use_clusters = clusters if steal.routing_clusters else None
                    for delta in cfg.deltas:
                        start = time.perf_counter()
                        proc = StealingProcessor(table, delta, use_capture, use_clusters)
                        spoof = Texts(prompts, generate_batched(attacker_model, tokenizer, prompts, gen, [proc]))
                        add(_row(cfg, scheme, wm_cfg, key, "spoof", attacker, count, delta, _detect(wm, spoof), start, **extra, **judge(spoof)))
                        log.info("%s %s N=%d delta=%g: spoof detected %.3f (null %.3f), ppl %.1f (%.0f s)", scheme, attacker, count, delta,
                                 rows[-1]["detected"], fpr, rows[-1][f"ppl_{cfg.model}"], rows[-1]["wall_s"])
                    for delta in cfg.scrub_deltas if scrub_texts is not None else ():
                        start = time.perf_counter()
                        proc = StealingProcessor(table, -delta, use_capture, use_clusters)
                        para = _paraphrased(paraphrase(scrub_texts, _attack(cfg), attacker_model, tokenizer, cfg.sampling_seed, cfg.batch_size, processors=[proc]),
                                            prompts[: cfg.scrub_count], tokenizer)
                        add(_row(cfg, scheme, wm_cfg, key, "scrub", attacker, count, delta, _detect(wm, para), start, **extra, **judge(para)))
                        log.info("%s %s N=%d scrub delta=%g: still detected %.3f (%.0f s)", scheme, attacker, count, delta,
                                 rows[-1]["detected"], rows[-1]["wall_s"])
    if capture is not None:
        capture.detach()
    return rows


def _attack(cfg: StudyConfig) -> AttackConfig:
    return AttackConfig(name="paraphrase", strength=cfg.scrub_strength, seed=cfg.sampling_seed)


def _paraphrased(texts: Sequence[str], prompts: list[list[int]], tokenizer: Any) -> Texts:
    """Paraphrased texts as the detector sees them (encoded again); an empty rewrite keeps one eos-free token."""
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return Texts(prompts, [x if x else [int(tokenizer.eos_token_id or 0) + 1] for x in ids])


# -- command line --------------------------------------------------------------------------------
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_args(argv: Optional[list[str]] = None) -> StudyConfig:
    d = StudyConfig()
    parser = argparse.ArgumentParser(prog="python -m moewm.evaluation.stealing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=d.model, help=f"the deployed model, one of {MODELS}")
    parser.add_argument("--corpora", default=d.corpora, help="folder of CORPORA/<model>/<name>.jsonl (scripts/stealing_corpora.py)")
    parser.add_argument("--schemes", default=",".join(d.schemes), help="watermarked corpora (their file names), comma-separated")
    parser.add_argument("--counts", default=",".join(map(str, d.counts)), help="corpus sizes N (prefixes), comma-separated")
    parser.add_argument("--attackers", default=",".join(d.attackers), help=f"comma-separated, of {ATTACKERS}")
    parser.add_argument("--deltas", default=",".join(map(str, d.deltas)), help="delta_att grid of spoofing")
    parser.add_argument("--scrub-deltas", default=",".join(map(str, d.scrub_deltas)), help="delta_att grid of scrubbing ('' for none)")
    parser.add_argument("--attacker-model", default=None, help=f"the attacker's own model, one of {MODELS} (default: --model's open weights)")
    parser.add_argument("--spoof-count", type=int, default=d.spoof_count)
    parser.add_argument("--scrub-count", type=int, default=d.scrub_count)
    parser.add_argument("--scrub-strength", type=float, default=d.scrub_strength)
    parser.add_argument("--new-tokens", type=int, default=d.new_tokens)
    parser.add_argument("--seed", type=int, default=d.seed, help="the deployed key's seed when the corpus meta has none")
    parser.add_argument("--secret", default=d.secret, help="the deployed key's secret (a study key; never written)")
    parser.add_argument("--sampling-seed", type=int, default=d.sampling_seed)
    parser.add_argument("--context-tokens", type=int, default=d.context_tokens, help="h: tokens before (all subsets are contexts)")
    parser.add_argument("--min-count", type=int, default=d.min_count)
    parser.add_argument("--routing-clusters", type=int, default=d.routing_clusters, help="weights_holder's k-means clusters")
    parser.add_argument("--weighting", default=d.weighting)
    parser.add_argument("--ppl-factor", type=float, default=d.ppl_factor, help="best delta: perplexity at most this times the plain answers'")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--cache-dir", default=d.cache_dir, help="reference-key bank cache ('none': memory only)")
    parser.add_argument("--out", default=d.out)
    parser.add_argument("--append", action="store_true", help="keep OUT/stealing.csv's rows (a rerun of the same row replaces it)")
    a = parser.parse_args(argv)
    try:
        cfg = StudyConfig(model=a.model, corpora=a.corpora, schemes=_names(a.schemes), counts=_ints(a.counts), attackers=_names(a.attackers),
                          deltas=_floats(a.deltas), scrub_deltas=_floats(a.scrub_deltas), out=a.out, attacker_model=a.attacker_model,
                          spoof_count=a.spoof_count, scrub_count=a.scrub_count, scrub_strength=a.scrub_strength, new_tokens=a.new_tokens,
                          seed=a.seed, secret=a.secret, sampling_seed=a.sampling_seed, context_tokens=a.context_tokens, min_count=a.min_count,
                          routing_clusters=a.routing_clusters, weighting=a.weighting, ppl_factor=a.ppl_factor, batch_size=a.batch_size,
                          threads=a.threads, cache_dir=None if a.cache_dir == "none" else a.cache_dir, append=a.append)
        cfg.validate()
    except ValueError as err:  # ConfigError included: named before any weights load
        parser.error(str(err))
    return cfg


def main(argv: Optional[list[str]] = None) -> None:
    from moewm.evaluation.stealing_report import merge_rows, read_rows, write_report

    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    out = Path(cfg.out)

    def merged(new: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # read again at every write: another run appending to the same folder meanwhile keeps its rows
        return merge_rows(read_rows(out / "stealing.csv") if cfg.append else [], new)

    rows = run_study(cfg, on_row=lambda new: write_report(merged(new), cfg, out, plot=False), cache=Cache(out / "cache"))
    paths = write_report(merged(rows), cfg, out)
    log.info("wrote %s in %.0f s", ", ".join(map(str, paths)), time.perf_counter() - start)


if __name__ == "__main__":
    main()
