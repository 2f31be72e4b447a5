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

from moewm import stats
from moewm.config import ConfigError, WatermarkConfig
from moewm.keys import WatermarkKey
from moewm.length_curve import PositionScores, position_scores
from moewm.watermark import (
    MoEDetectorOutput,
    MoELSHWatermark,
    TextGeneration,
    _first_occurrences,
    encode_prompt,
    model_vocab_size,
)

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


def output_from_scores(ps: PositionScores, cfg: WatermarkConfig, notes_prefix: str = "") -> MoEDetectorOutput:
    """A :class:`MoEDetectorOutput` from per-position Bernoulli draws (z, min_tokens, window as MoE-LSH)."""
    z = stats.exact_gamma_z(ps.green, ps.gamma, ps.scored)
    arrays = {k: v.cpu().numpy() for k, v in z.items()}
    n_tokens = ps.tokens_scored()
    short = n_tokens < cfg.min_tokens
    zs = np.where(short, np.nan, arrays["z_score"])
    notes = [f"{notes_prefix}too few scored tokens ({k} < watermark.min_tokens={cfg.min_tokens})" if s else "" for k, s in zip(n_tokens, short)]
    wz = wp = None
    if cfg.window is not None:
        best, count = ps.window_z(cfg.window)
        wz = np.where(short, np.nan, best)
        wp = stats.bonferroni(stats.p_value(wz), count)
    return MoEDetectorOutput(
        num_tokens_scored=n_tokens,
        num_green_tokens=arrays["num_green_tokens"],
        green_fraction=arrays["green_fraction"],
        gamma_mean=arrays["gamma_mean"],
        z_score=zs,
        p_value=stats.p_value(zs),
        prediction=np.nan_to_num(zs, nan=-np.inf) > cfg.z_threshold,
        window_z_score=wz,
        window_p_value=wp,
        notes=notes,
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
        self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None, progress: bool = False
    ) -> MoEDetectorOutput:
        """transformers' ``WatermarkDetector`` per text on (prompt tail + text): only continuation tokens are scored."""
        _check_ids(text_ids, self.vocab_size)
        prompts = self._prompts(text_ids, prompt_ids)
        cfg = self.watermark_cfg
        n = np.zeros(len(text_ids), dtype=np.int64)
        g = np.zeros(len(text_ids), dtype=np.int64)
        rows = self._rows(text_ids, prompts)
        iterator: Any = rows
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(rows, desc="detect (kgw)", unit="text", leave=False)
        for i, (row, _) in enumerate(iterator):
            if len(row) - self.detector.processor.context_width < 1:
                continue  # nothing the detector can score; n = 0 -> NaN below
            ids = torch.tensor([[self._sentinel] + row], device=self.device)
            out = self.detector(ids, z_threshold=cfg.z_threshold, return_dict=True)
            n[i] = int(out.num_tokens_scored[0])
            g[i] = int(out.num_green_tokens[0])
        gamma = self.gamma
        with np.errstate(invalid="ignore", divide="ignore"):
            z = (g - gamma * n) / np.sqrt(n * gamma * (1 - gamma))
        short = n < cfg.min_tokens
        z = np.where(short | (n == 0), np.nan, z)
        wz = wp = None
        if cfg.window is not None:
            ps = self.position_scores(text_ids, prompts)
            best, count = ps.window_z(cfg.window)
            wz = np.where(short, np.nan, best)
            wp = stats.bonferroni(stats.p_value(wz), count)
        return MoEDetectorOutput(
            num_tokens_scored=n,
            num_green_tokens=g,
            green_fraction=g / np.maximum(n, 1),
            gamma_mean=np.full(len(n), gamma),
            z_score=z,
            p_value=stats.p_value(z),
            prediction=np.nan_to_num(z, nan=-np.inf) > cfg.z_threshold,
            window_z_score=wz,
            window_p_value=wp,
            notes=[f"too few scored tokens ({k} < watermark.min_tokens={cfg.min_tokens})" if s else "" for k, s in zip(n, short)],
        )

    @torch.no_grad()
    def position_scores(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None) -> PositionScores:
        """Green flag of every scored continuation token, from the detector's own processor.

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
            if self.watermark_cfg.ignore_repeated:  # the detector counts each distinct n-gram once per text
                _, gram_id = torch.unique(grams, dim=0, return_inverse=True)
                keys = torch.full((len(rows), length), -1, dtype=torch.long)
                keys[at[:, 0], at[:, 1]] = gram_id
                scored = _first_occurrences(keys, scored)
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
        pad = eos if eos is not None else 0
        length = max(len(t) for t in text_ids)
        ids = torch.full((len(text_ids), ctx + length), pad, dtype=torch.long)
        real = torch.zeros(len(text_ids), length, dtype=torch.bool)
        ids[:, :ctx] = 0  # the processor's initial all-zero context
        for i, t in enumerate(text_ids):
            ids[i, ctx : ctx + len(t)] = torch.tensor(list(t), dtype=torch.long)
            real[i, : len(t)] = True
        ids = ids.to(proc.device)
        g = proc.compute_g_values(ids).cpu().bool()  # (B, length, depth)
        mask = proc.compute_context_repetition_mask(ids).cpu().bool() & real
        if eos is not None:
            mask &= proc.compute_eos_token_mask(ids, eos)[:, ctx:].cpu().bool()
        m = g.shape[-1]
        scored = mask.unsqueeze(-1).expand(-1, -1, m)
        gamma = torch.full(g.shape, self.p0, dtype=torch.float64)
        return PositionScores.from_positions(
            (g & scored).reshape(len(text_ids), -1), gamma.reshape(len(text_ids), -1), scored.reshape(len(text_ids), -1), draws_per_token=m
        )

    def detect_ids(
        self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None, progress: bool = False
    ) -> MoEDetectorOutput:
        """Mean-g z-test per text (batched; no model forward needed)."""
        bs = max(self.watermark_cfg.detect_batch_size, 64)
        prompts = self._prompts(text_ids, prompt_ids)
        parts = [
            output_from_scores(self.position_scores(text_ids[s : s + bs], prompts[s : s + bs]), self.watermark_cfg)
            for s in range(0, len(text_ids), bs)
        ]
        if not parts:
            return MoEDetectorOutput(*(np.zeros(0) for _ in range(7)))
        return MoEDetectorOutput.concat(parts)


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

    def detect_ids(self, text_ids, prompt_ids=None, progress: bool = False) -> MoEDetectorOutput:
        return self.inner.detect_ids(text_ids, prompt_ids, progress=progress)

    def position_scores(self, text_ids, prompt_ids=None) -> PositionScores:
        return position_scores(self.inner, text_ids, prompt_ids)

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
    unknown = set(kw) - {"extractor", "encoder", "calibration"}
    if unknown:
        raise TypeError(f"build_watermarker(kind={kind!r}): unexpected arguments {sorted(unknown)}")
    if kind == "kgw":
        return KGWWatermark(model, tokenizer, watermark_cfg, key)
    if kind == "synthid":
        return SynthIDWatermark(model, tokenizer, watermark_cfg, key)
    calibration = kw.get("calibration")
    calibration = getattr(calibration, "stats", calibration)  # a moewm.calibration.Calibration or its stats
    inner = MoELSHWatermark(model, tokenizer, kw.get("extractor"), kw.get("encoder"), watermark_cfg, key, calibration)
    return inner if kind == "moe_lsh" else NoWatermark(inner)
