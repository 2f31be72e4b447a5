"""Baseline watermarks with the same duck-typed interface as :class:`moewm.watermark.MoELSHWatermark`.

``build_watermarker(kind, ...)`` returns, for

* ``moe_lsh``: :class:`~moewm.watermark.MoELSHWatermark` itself;
* ``kgw``: :class:`KGWWatermark`, Kirchenbauer et al.'s green/red list through transformers' own
  ``WatermarkingConfig`` (generation) and ``WatermarkDetector`` (detection);
* ``synthid``: :class:`SynthIDWatermark`, tournament sampling through transformers'
  ``SynthIDTextWatermarkingConfig``; detection by the unweighted mean g-value (below);
* ``none``: :class:`NoWatermark`, plain generation scored by the MoE-LSH detector (a null control).

Every object has ``generate_ids(prompts, generation, watermark=True, progress=False) -> (prompt_ids,
new_ids)``, ``generate_from_ids(prompt_ids, generation, watermark=True, progress=False) -> new_ids``,
``detect_ids(text_ids, prompt_ids, progress=False) -> MoEDetectorOutput``, ``position_scores(text_ids,
prompt_ids) -> moewm.length_curve.PositionScores`` (per-position Bernoulli draws, for detection-vs-length
and windowed detection), ``close()`` and ``key``.

All baseline keys derive from the :class:`~moewm.keys.WatermarkKey` (HMAC of the secret, seed and a
purpose string); they are never printed.

SynthID mean score as a z-test. Each scored token carries ``m = len(keys)`` g-values (one per
tournament layer). For a fixed key, a g-value is a table lookup ``table[hash(ngram, key_l) % size]``
into a fixed random 0/1 table, so on text that was not generated with the key every g-value is a
Bernoulli(p0) draw with p0 = the table's mean (0.5 up to the table's sampling noise, which we use
exactly). The context-repetition mask (the processor's own ``compute_context_repetition_mask``) keeps
only n-grams whose context was not seen earlier in the text, and the eos mask drops everything from the
first eos on, so the scored draws are distinct and the mean g over n tokens x m layers has mean p0 and
variance p0 (1 - p0) / (n m) under H0. ``z = (sum g - n m p0) / sqrt(n m p0 (1 - p0))``.
In :class:`MoEDetectorOutput` terms for SynthID: ``num_tokens_scored`` = n tokens,
``num_green_tokens`` = number of g-values equal to 1 (over n x m draws, not tokens),
``green_fraction`` = mean g-value, ``gamma_mean`` = p0.

The first ``ngram_len - 1`` continuation tokens are scored with the same all-zero context that
transformers' processor uses at generation time (its state starts as zeros, ``skip_first_ngram_calls``
is off), so generation and detection see identical n-grams.

KGW detection scores only the continuation: the detector gets the last ``context_width`` prompt tokens
as context (lefthash) in front of the text, plus one sentinel token that it strips as "bos". Its z uses
the nominal ``greenlist_ratio``; we recompute z with the exact green-list fraction
``int(V * ratio) / V`` that its processor uses (``gamma_mean``). ``window_z_score`` is filled when
``watermark.window`` is set, for every kind.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional, Sequence

import numpy as np
import torch
from transformers import SynthIDTextWatermarkingConfig, WatermarkDetector, WatermarkingConfig

from moewm.config import ConfigError, WatermarkConfig
from moewm.detection import DetectorOutput, decide
from moewm.keys import WatermarkKey
from moewm.length_curve import PositionScores
from moewm.padding import pad_id, pad_rows
from moewm.poisson_binomial import upper_tail
from moewm.scoring import first_occurrences
from moewm.watermark import MoELSHWatermark, TextGeneration, encode_prompt, model_vocab_size

log = logging.getLogger(__name__)

BASELINE_KINDS = ("moe_lsh", "kgw", "synthid", "none")


def key_int(key: WatermarkKey, purpose: str, bits: int = 32) -> int:
    """A non-negative integer of ``bits`` bits derived from the key for ``purpose``."""
    return int.from_bytes(key.derive(purpose)[:8], "little") & ((1 << bits) - 1)


def _check_ids(text_ids: Sequence[Sequence[int]], vocab_size: int) -> None:
    for i, t in enumerate(text_ids):
        if len(t) == 0:
            raise ValueError(f"text_ids[{i}] is empty: detection needs at least one token of text")
        if max(t) >= vocab_size or min(t) < 0:
            raise ValueError(f"text_ids[{i}]: token ids must lie in [0, {vocab_size - 1}]")


def output_from_scores(ps: PositionScores, cfg: WatermarkConfig, notes_prefix: str = "", prefixes: bool = False,
                       window: Optional[int] = None) -> DetectorOutput:
    """A :class:`DetectorOutput` from per-position Bernoulli draws with known null probabilities.

    The p-value is the exact Poisson-binomial (here binomial: one gamma) upper tail of the green count:
    valid for any text as long as the scored draws are independent under a random key, which is why
    the baselines score repeated n-grams (KGW) and repeated contexts (SynthID) once. The window p-value
    is the best window's exact tail times the number of windows (Bonferroni, conservative).
    """
    n_tokens = ps.tokens_scored()
    green = ps.green.to(torch.float64).sum(-1)
    num_green = green.long()
    p_exact = upper_tail(ps.gamma, ps.scored, num_green).cpu().numpy()
    z = ps.z()
    p, prediction, notes = decide(p_exact, n_tokens, cfg.min_tokens, cfg.alpha)
    if cfg.z_threshold is not None:  # legacy rule, kept for comparison only
        prediction = np.nan_to_num(np.where(np.isnan(p), np.nan, z), nan=-np.inf) > cfg.z_threshold
    draws = ps.scored.sum(-1).clamp(min=1).to(torch.float64)
    wz = wp = None
    window = window or cfg.window
    if window is not None:
        wz, wp = ps.window_exact(window)
        short = n_tokens < cfg.min_tokens
        wz = np.where(short, np.nan, wz)
        wp = np.where(short, np.nan, wp)
    return DetectorOutput(
        num_tokens_scored=n_tokens.astype(np.int64),
        num_green_tokens=num_green.numpy().astype(np.int64),
        green_fraction=(green / draws).numpy(),
        gamma_mean=(ps.gamma.sum(-1) / draws).numpy(),
        statistic=z,
        z_score=np.where(np.isnan(p), np.nan, z),
        p_value=p,
        p_value_floor=np.zeros(len(n_tokens)),
        num_reference_keys=np.zeros(len(n_tokens), dtype=np.int64),
        p_value_model_null=p,
        prediction=prediction,
        window_statistic=wz,
        window_p_value=wp,
        notes=[f"{notes_prefix}{note}" if note else "" for note in notes],
        prefix_p_value=ps.prefix_p_values() if prefixes else None,
    )


class _TransformersWatermark(TextGeneration):
    """Shared generation path: transformers builds the watermark processor from ``watermarking_config``."""

    name = "baseline"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, watermark_cfg: WatermarkConfig, key: WatermarkKey) -> None:
        watermark_cfg.validate()
        self.model = model
        self.tokenizer = tokenizer
        self.watermark_cfg = watermark_cfg
        self.key = key
        self.vocab_size = model_vocab_size(model)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def watermarking_config(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to remove: transformers builds (and drops) its processor inside each ``generate`` call."""

    def __enter__(self) -> "_TransformersWatermark":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def encode_prompt(self, prompt: Optional[str]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    @property
    def generation_label(self) -> str:  # type: ignore[override]
        return self.name

    def watermark_generate_kwargs(self) -> dict[str, Any]:
        return {"extra_generate_kwargs": {"watermarking_config": self.watermarking_config}}

    def _prompts(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]]) -> list[list[int]]:
        if prompt_ids is None:
            return [[] for _ in text_ids]
        if len(prompt_ids) != len(text_ids):
            raise ValueError(f"prompt_ids: got {len(prompt_ids)} prompts for {len(text_ids)} texts; they must match one to one")
        return [list(p) for p in prompt_ids]


class KGWWatermark(_TransformersWatermark):
    """Kirchenbauer et al. (2023) through ``transformers.WatermarkingConfig`` / ``WatermarkDetector``."""

    name = "kgw"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, watermark_cfg: WatermarkConfig, key: WatermarkKey) -> None:
        super().__init__(model, tokenizer, watermark_cfg, key)
        self._config = WatermarkingConfig(
            greenlist_ratio=watermark_cfg.kgw_gamma,
            bias=watermark_cfg.delta,
            hashing_key=key_int(key, "kgw"),
            seeding_scheme=watermark_cfg.kgw_seeding_scheme,
            context_width=watermark_cfg.kgw_context_width,
        )
        self._config.validate()
        # The detector strips a leading "bos" (model_config.bos_token_id) and fails when that id is None;
        # we give it a config copy whose bos is a sentinel that we always prepend, so it strips exactly that.
        model_config = copy.copy(model.config.get_text_config())
        self._sentinel = tokenizer.bos_token_id if getattr(tokenizer, "bos_token_id", None) is not None else 0
        model_config.bos_token_id = self._sentinel
        self.detector = WatermarkDetector(
            model_config=model_config,
            device=str(self.device),
            watermarking_config=self._config,
            ignore_repeated_ngrams=watermark_cfg.ignore_repeated,
        )
        proc = self.detector.processor
        if proc.vocab_size != self.vocab_size:
            raise ConfigError(
                f"KGW: model.config.vocab_size={proc.vocab_size} differs from the output head's {self.vocab_size}; "
                "the transformers KGW processor would key a different vocabulary"
            )
        self.selfhash = int(proc.seeding_scheme == "selfhash")
        self.ngram = proc.context_width + 1 - self.selfhash  # tokens per scored n-gram (the detector's n)
        self.gamma = proc.greenlist_size / proc.vocab_size  # exact green fraction

    @property
    def watermarking_config(self) -> WatermarkingConfig:
        return self._config

    def _rows(self, text_ids: Sequence[Sequence[int]], prompt_ids: list[list[int]]) -> list[tuple[list[int], int]]:
        """Context tail + text per row, and how many context tokens lead it."""
        need = self.ngram - 1
        out = []
        for p, t in zip(prompt_ids, text_ids):
            tail = p[-need:] if need > 0 else []
            out.append((tail + list(t), len(tail)))
        return out

    def detect_ids(
        self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None, progress: bool = False,
        prefixes: bool = False, window: Optional[int] = None,
    ) -> DetectorOutput:
        """Green count of the continuation's distinct n-grams (the green lists of transformers' own KGW
        processor) and its exact binomial tail. Repeated n-grams are always scored once here: a repeat
        is the same draw again, and counting it twice is what breaks KGW's p-value on greedy loops."""
        parts = []
        step = max(self.watermark_cfg.detect_batch_size, 64)
        prompts = self._prompts(text_ids, prompt_ids)
        for s in range(0, len(text_ids), step):
            ps = self.position_scores(text_ids[s : s + step], prompts[s : s + step], distinct=True)
            parts.append(output_from_scores(ps, self.watermark_cfg, prefixes=prefixes, window=window))
        if not parts:
            return DetectorOutput.empty(0)
        return DetectorOutput.concat(parts)

    @torch.no_grad()
    def position_scores(
        self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None, distinct: Optional[bool] = None
    ) -> PositionScores:
        """Green flag of every scored continuation token, from the detector's own processor
        (``distinct``: score each n-gram once; default ``watermark.ignore_repeated``).

        The green list is a seeded ``randperm`` of the vocabulary per context (not vectorisable), so it is
        drawn once per distinct context of the batch and membership is then looked up in bulk.
        """
        _check_ids(text_ids, self.vocab_size)
        prompts = self._prompts(text_ids, prompt_ids)
        proc = self.detector.processor
        n = self.ngram
        rows = self._rows(text_ids, prompts)
        length = max(len(t) for t in text_ids)
        green = torch.zeros(len(rows), length, dtype=torch.bool)
        scored = torch.zeros(len(rows), length, dtype=torch.bool)
        windows, where = [], []
        for i, (row, lead) in enumerate(rows):
            r = torch.tensor(row, dtype=torch.long)
            if r.numel() < n:
                continue
            w = r.unfold(0, n, 1)  # (num, n): n-grams ending at positions n-1 .. len-1 of the row
            ends = torch.arange(n - 1, r.numel()) - lead  # their target's index in the text
            keep = ends >= 0
            windows.append(w[keep])
            where.append(torch.stack([torch.full_like(ends[keep], i), ends[keep]], 1))
        if windows:
            grams = torch.cat(windows)
            at = torch.cat(where)
            seeds = grams if self.selfhash else grams[:, :-1]
            uniq, inverse = torch.unique(seeds, dim=0, return_inverse=True)
            hit = torch.zeros(grams.shape[0], dtype=torch.bool)
            order = torch.argsort(inverse, stable=True)
            bounds = torch.searchsorted(inverse[order], torch.arange(uniq.shape[0] + 1))
            targets = grams[:, -1]
            for u in range(uniq.shape[0]):  # one seeded randperm per distinct context (what the detector does)
                members = order[bounds[u] : bounds[u + 1]]
                greenlist = proc._get_greenlist_ids(uniq[u].to(self.device)).cpu()
                hit[members] = torch.isin(targets[members], greenlist)
            green[at[:, 0], at[:, 1]] = hit
            scored[at[:, 0], at[:, 1]] = True
            if self.watermark_cfg.ignore_repeated if distinct is None else distinct:  # each distinct n-gram once per text
                _, gram_id = torch.unique(grams, dim=0, return_inverse=True)
                keys = torch.full((len(rows), length), -1, dtype=torch.long)
                keys[at[:, 0], at[:, 1]] = gram_id
                scored = first_occurrences(keys, scored)
                green &= scored
        gamma = torch.full((len(rows), length), self.gamma, dtype=torch.float64)
        return PositionScores.from_positions(green, gamma, scored)


class SynthIDWatermark(_TransformersWatermark):
    """SynthID-Text (Dathathri et al., 2024) through ``transformers.SynthIDTextWatermarkingConfig``.

    Detection: unweighted mean g-value turned into a z-score under its exact null (module docstring).
    transformers' Bayesian detector needs a trained model, so it is not used here.
    """

    name = "synthid"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, watermark_cfg: WatermarkConfig, key: WatermarkKey) -> None:
        super().__init__(model, tokenizer, watermark_cfg, key)
        keys = [key_int(key, f"synthid/layer{i}", bits=31) for i in range(watermark_cfg.synthid_num_keys)]
        self._config = SynthIDTextWatermarkingConfig(
            ngram_len=watermark_cfg.synthid_ngram_len,
            keys=keys,
            sampling_table_seed=key_int(key, "synthid/table", bits=31),
        )
        self._config.validate()
        self.processor = self._config.construct_processor(self.vocab_size, self.device)
        table = self.processor.sampling_table.double()
        self.p0 = float(table.mean())  # exact null probability of g = 1

    @property
    def watermarking_config(self) -> SynthIDTextWatermarkingConfig:
        return self._config

    @property
    def depth(self) -> int:
        return int(self.processor.keys.numel())

    @torch.no_grad()
    def position_scores(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None) -> PositionScores:
        """g-values (token x layer draws) of the continuation with the processor's own masks."""
        _check_ids(text_ids, self.vocab_size)
        self._prompts(text_ids, prompt_ids)  # checks the count; the prompt is not SynthID context (see module doc)
        proc = self.processor
        ctx = proc.ngram_len - 1
        eos = self.tokenizer.eos_token_id
        text, attention = pad_rows(text_ids, pad_id(self.tokenizer))
        real = attention.bool()
        start = torch.zeros(len(text_ids), ctx, dtype=torch.long)  # the processor's initial all-zero context
        ids = torch.cat([start, text], dim=1).to(proc.device)
        g = proc.compute_g_values(ids).cpu().bool()  # (B, length, depth)
        mask = proc.compute_context_repetition_mask(ids).cpu().bool() & real
        if eos is not None:  # nothing from the text's first eos on (the all-zero start context may itself be eos = 0)
            mask &= torch.cumsum((text == eos).long(), dim=1) == 0
        m = g.shape[-1]
        scored = mask.unsqueeze(-1).expand(-1, -1, m)
        gamma = torch.full(g.shape, self.p0, dtype=torch.float64)
        return PositionScores.from_positions(
            (g & scored).reshape(len(text_ids), -1), gamma.reshape(len(text_ids), -1), scored.reshape(len(text_ids), -1), draws_per_token=m
        )

    def detect_ids(
        self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None, progress: bool = False,
        prefixes: bool = False, window: Optional[int] = None,
    ) -> DetectorOutput:
        """Exact binomial test of the g-values' count (batched; no model forward needed)."""
        bs = max(self.watermark_cfg.detect_batch_size, 64)
        prompts = self._prompts(text_ids, prompt_ids)
        parts = [
            output_from_scores(self.position_scores(text_ids[s : s + bs], prompts[s : s + bs]), self.watermark_cfg, prefixes=prefixes, window=window)
            for s in range(0, len(text_ids), bs)
        ]
        if not parts:
            return DetectorOutput.empty(0)
        return DetectorOutput.concat(parts)


class NoWatermark(TextGeneration):
    """Null control: plain generation, scored by the MoE-LSH detector of the same key and configuration."""

    name = "none"
    generation_label = "plain"

    def __init__(self, inner: MoELSHWatermark) -> None:
        self.inner = inner

    @property
    def key(self) -> WatermarkKey:
        return self.inner.key

    @property
    def watermark_cfg(self) -> WatermarkConfig:
        return self.inner.watermark_cfg

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    @property
    def model(self) -> torch.nn.Module:
        return self.inner.model

    def encode_prompt(self, prompt: Optional[str]) -> list[int]:
        return self.inner.encode_prompt(prompt)

    def watermark_generate_kwargs(self) -> dict[str, Any]:
        """Nothing: generation is always unwatermarked (``watermark=True`` is accepted and changes nothing)."""
        return {}

    def capture(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None, progress: bool = False) -> Any:
        return self.inner.capture(text_ids, prompt_ids, progress=progress)

    def score(self, captures: Any, prefixes: bool = False, progress: bool = False, window: Optional[int] = None) -> DetectorOutput:
        return self.inner.score(captures, prefixes=prefixes, progress=progress, window=window)

    def detect_ids(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None,
                   progress: bool = False, prefixes: bool = False, window: Optional[int] = None) -> DetectorOutput:
        return self.inner.detect_ids(text_ids, prompt_ids, progress=progress, prefixes=prefixes, window=window)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> "NoWatermark":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def build_watermarker(
    kind: str,
    model: torch.nn.Module,
    tokenizer: Any,
    watermark_cfg: WatermarkConfig,
    key: WatermarkKey,
    **kw: Any,
) -> Any:
    """A watermarker of ``kind`` (moe_lsh | kgw | synthid | none).

    ``moe_lsh`` and ``none`` use the ``extractor=``, ``encoder=`` and ``calibration=`` (CalibrationStats)
    keyword arguments (``calibration`` may also be a :class:`moewm.calibration.Calibration`) for their
    :class:`MoELSHWatermark`; ``kgw`` and ``synthid`` accept and ignore them,
    so a caller can pass the same arguments whatever the kind.
    """
    if kind not in BASELINE_KINDS:
        raise ConfigError(f"watermark.kind={kind!r}: allowed values are {BASELINE_KINDS}")
    unknown = set(kw) - {"extractor", "encoder", "calibration", "cache_dir", "model_id"}
    if unknown:
        raise TypeError(f"build_watermarker(kind={kind!r}): unexpected arguments {sorted(unknown)}")
    if kind == "kgw":
        return KGWWatermark(model, tokenizer, watermark_cfg, key)
    if kind == "synthid":
        return SynthIDWatermark(model, tokenizer, watermark_cfg, key)
    calibration = kw.get("calibration")
    calibration = getattr(calibration, "stats", calibration)  # a moewm.calibration.Calibration or its stats
    inner = MoELSHWatermark(model, tokenizer, kw.get("extractor"), kw.get("encoder"), watermark_cfg, key, calibration,
                            cache_dir=kw.get("cache_dir", "default"), model_id=kw.get("model_id", ""))
    return inner if kind == "moe_lsh" else NoWatermark(inner)
