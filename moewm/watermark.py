"""The MoE-LSH watermark: a logits processor that biases the green list, and a one-pass batched detector.

Generation and detection share one green-list function (:class:`moewm.lsh.LSHEncoder` applied to the
features captured by :class:`moewm.routing.FeatureCapture`), so they cannot drift apart: the green list
for the token at position t comes from the features at position ``t + extractor.token_idx``.
"""

from __future__ import annotations

import logging
import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from moewm import scoring
from moewm.capture import CaptureSettings, TextCapture, capture_texts, detection_batches
from moewm.config import ConfigError, EncoderConfig, ExtractorConfig, GenerationConfig, WatermarkConfig
from moewm.detection import DetectionResult, DetectorOutput, decide
from moewm.keybank import build_bank, reference_bank
from moewm.keys import WatermarkKey
from moewm.lm_head import SplitLMHead, split_lm_head
from moewm.lsh import CalibrationStats, LSHEncoder
from moewm.poisson_binomial import upper_tail
from moewm.padding import pad_id, pad_rows
from moewm.routing import FeatureCapture
from moewm.scoring import BankTables, CaptureBatch, StatisticSpec, calibrated

# Kept for code written against the first release.
MoEDetectorOutput = DetectorOutput

log = logging.getLogger(__name__)

class RoutingWatermarkProcessor(LogitsProcessor):
    """Adds ``delta`` to the green list keyed by the routing of the current context position.

    The model's forward runs before the processor is called, so the hooked routing for the last
    position is already there; per step this costs one (B, D) x (D, num_bits) product and an index-add.
    """

    def __init__(self, capture: FeatureCapture, encoder: LSHEncoder, delta: float, token_idx: int = -1) -> None:
        self.capture = capture
        self.encoder = encoder
        self.delta = float(delta)
        self.back = -int(token_idx)
        self._history: Optional[torch.Tensor] = None
        self._last_length = -1

    def reset(self) -> None:
        self._history = None
        self._last_length = -1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, length = input_ids.shape
        if self.back == 1:
            features = self.capture.features(batch, positions=slice(-1, None))[:, -1]
        else:
            new = self.capture.features(batch, positions=slice(-self.back, None))
            fresh = self._history is None or length != self._last_length + 1 or self._history.shape[0] != batch
            history = new if fresh else torch.cat([self._history, new], dim=1)
            self._history = history[:, -self.back :]
            self._last_length = length
            features = self._history[:, max(-self.back, -self._history.shape[1])]
        bits = self.encoder.signature(features.to(self.encoder.device))
        return self.encoder.bias_logits(scores, bits.to(scores.device) if bits.device != scores.device else bits, self.delta)


class TokenizerVocabularyMask(LogitsProcessor):
    """Never sample ids the tokenizer does not have (padded embedding rows, or a random-init model's spare rows)."""

    def __init__(self, tokenizer_size: int) -> None:
        self.tokenizer_size = tokenizer_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.tokenizer_size :] = float("-inf")
        return scores


class TextGeneration:
    """Text-level generation for every watermarker (MoE-LSH and the baselines): prompts in, ids or text
    out. A subclass provides ``model``, ``tokenizer``, ``encode_prompt`` and what its watermark adds to
    :func:`generate_batched` (``watermark_generate_kwargs``)."""

    model: nn.Module
    tokenizer: Any
    generation_label = "watermarked"  # for the progress bar

    def encode_prompt(self, prompt: Optional[str]) -> list[int]:
        raise NotImplementedError

    def watermark_generate_kwargs(self) -> dict[str, Any]:
        """What :func:`generate_batched` needs to add this watermark (processors, on_batch, extra_generate_kwargs)."""
        raise NotImplementedError

    def generate_from_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        generation: Optional[GenerationConfig] = None,
        watermark: bool = True,
        progress: bool = False,
    ) -> list[list[int]]:
        """New token ids (eos stripped) for already tokenized prompts."""
        generation = generation or GenerationConfig()
        generation.validate()
        label = f"generate ({self.generation_label})" if watermark else "generate (plain)"
        kwargs = self.watermark_generate_kwargs() if watermark else {}
        return generate_batched(
            self.model, self.tokenizer, prompt_ids, generation, kwargs.pop("processors", []), progress=label if progress else None, **kwargs
        )

    def generate_ids(
        self,
        prompts: Sequence[str],
        generation: Optional[GenerationConfig] = None,
        watermark: bool = True,
        progress: bool = False,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Generate continuations; returns (prompt token ids, new token ids) per prompt, eos stripped."""
        prompt_ids = [self.encode_prompt(p) for p in prompts]
        return prompt_ids, self.generate_from_ids(prompt_ids, generation, watermark, progress)

    def generate(self, prompts: Sequence[str], generation: Optional[GenerationConfig] = None, watermark: bool = True) -> list[str]:
        """Watermarked (or, with ``watermark=False``, plain) continuations of ``prompts`` as text."""
        _, new_ids = self.generate_ids(prompts, generation, watermark)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]


class MoELSHWatermark(TextGeneration):
    """Routing-keyed watermark for one model and key: ``generate`` text, ``detect`` it.

    The hooks that read the router stay on the model until :meth:`close` (or the end of a ``with``
    block), so ``logits_processor`` can also be passed to a plain ``model.generate``. Detection is a
    capture (one forward per text) scored under this key and ranked among ``watermark.reference_keys``
    public reference keys, whose bank is cached under ``cache_dir`` ("default": $MOEWM_CACHE_DIR or
    ~/.cache/moewm; None: memory only).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        extractor: Optional[ExtractorConfig] = None,
        encoder: Optional[EncoderConfig] = None,
        watermark: Optional[WatermarkConfig] = None,
        key: Optional[WatermarkKey] = None,
        calibration: Optional[CalibrationStats] = None,
        cache_dir: Optional[str | Path] = "default",
        model_id: str = "",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.extractor_cfg = extractor or ExtractorConfig()
        self.encoder_cfg = encoder or EncoderConfig()
        self.watermark_cfg = watermark or WatermarkConfig()
        self.watermark_cfg.validate()
        self.key = key or WatermarkKey.from_env(0)
        self.vocab_size = model_vocab_size(model)
        check_tokenizer(tokenizer, self.vocab_size)
        self.capture_hooks = FeatureCapture(model, self.extractor_cfg)
        embeddings = model.get_input_embeddings().weight
        usable = usable_tokens(tokenizer, self.vocab_size)
        self._calibration = calibration
        # The deployed key is a bank of one, drawn by the same code as the reference keys.
        true_bank = build_bank(self.encoder_cfg, [self.key], self.capture_hooks.dim, embeddings, usable, self.vocab_size, calibration)
        self.encoder = true_bank.encoder(0).to(embeddings.device)
        self._true_tables = BankTables.of(true_bank, embeddings.device)
        self._reference: Optional[BankTables] = None
        self.cache_dir: Optional[Path] = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
        self.model_id = model_id or model_identity(model)
        self.logits_processor = RoutingWatermarkProcessor(
            self.capture_hooks, self.encoder, self.watermark_cfg.delta, self.extractor_cfg.token_idx
        )
        self._split_head: Optional[SplitLMHead] = None
        self._split_head_checked = False

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the hooks from the model."""
        self.capture_hooks.detach()

    def __enter__(self) -> "MoELSHWatermark":
        self.capture_hooks.attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # -- generation ------------------------------------------------------------------------------
    def watermark_generate_kwargs(self) -> dict[str, Any]:
        return {"processors": [self.logits_processor], "on_batch": self.logits_processor.reset}

    # -- detection -------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Optional[str]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def detect(self, texts: Sequence[str], prompts: Optional[Sequence[Optional[str]]] = None) -> list[DetectionResult]:
        """Score texts (optionally each after its prompt). Text is tokenised again here: to score the
        exact tokens a model produced, use :meth:`detect_ids`."""
        if prompts is not None and len(prompts) != len(texts):
            raise ValueError(f"prompts: got {len(prompts)} prompts for {len(texts)} texts; they must match one to one")
        text_ids = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"texts[{i}] is empty: detection needs at least one token of text")
            text_ids.append(list(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
        prompt_ids = [self.encode_prompt(prompts[i] if prompts is not None else None) for i in range(len(texts))]
        return self.detect_ids(text_ids, prompt_ids).results()

    # -- capture once, score many ----------------------------------------------------------------
    @property
    def capture_settings(self) -> CaptureSettings:
        cfg = self.watermark_cfg
        return CaptureSettings(
            back=-self.extractor_cfg.token_idx,
            top_k=cfg.capture_top_k,
            max_context=cfg.max_context or 0,
            overlap=cfg.context_overlap,
            batch_size=cfg.detect_batch_size,
            max_tokens=cfg.detect_max_tokens,
        )

    @property
    def statistic_spec(self) -> StatisticSpec:
        cfg = self.watermark_cfg
        return StatisticSpec(kind=cfg.statistic, null=cfg.null, delta=cfg.delta, ignore_repeated=cfg.ignore_repeated)

    def capture(
        self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None, progress: bool = False
    ) -> list[TextCapture]:
        """One forward per text: what every key's detector needs of it (:mod:`moewm.capture`)."""
        if prompt_ids is None:
            prompt_ids = [self.encode_prompt(None) for _ in text_ids]
        if len(prompt_ids) != len(text_ids):
            raise ValueError(f"prompt_ids: got {len(prompt_ids)} prompts for {len(text_ids)} texts; they must match one to one")
        for i, t in enumerate(text_ids):
            if len(t) == 0:
                raise ValueError(f"text_ids[{i}] is empty: detection needs at least one token of text")
            if max(t) >= self.vocab_size or min(t) < 0:
                raise ValueError(f"text_ids[{i}]: token ids must lie in [0, {self.vocab_size - 1}]")
        rows = [list(p) + list(t) for p, t in zip(prompt_ids, text_ids)]
        split = self.split_head()
        self.capture_hooks.attach()
        return capture_texts(self.model, self.capture_hooks, self.encoder.usable, rows, [len(p) for p in prompt_ids],
                             self.capture_settings, split=split, pad_id=pad_id(self.tokenizer), progress=progress)

    def reference_tables(self, device: Optional[torch.device] = None) -> BankTables:
        """The public reference keys for this model and encoder (built once, cached in memory and on disk)."""
        device = device or self.device
        count = self.watermark_cfg.reference_keys
        if self._reference is None or self._reference.num_keys != count or self._reference.device != torch.device(device):
            embeddings = self.model.get_input_embeddings().weight
            bank = reference_bank(self.encoder_cfg, count, self.capture_hooks.dim, embeddings, self.encoder.usable,
                                  self.vocab_size, self._calibration, cache_dir=self.cache_dir, model_id=self.model_id)
            self._reference = BankTables.of(bank, device)
        return self._reference

    def score(self, captures: Sequence[TextCapture], prefixes: bool = False, progress: bool = False,
              window: Optional[int] = None) -> DetectorOutput:
        """Detection of captured texts: the statistic under the deployed key, ranked among the reference keys
        (``prefixes``: also the p-value after every scored token; ``window``: windowed detection over that
        many tokens, default ``watermark.window``)."""
        if not captures:
            return DetectorOutput.empty(0)
        cfg = self.watermark_cfg
        device = self.device
        ref = self.reference_tables(device)
        order = np.argsort([-c.num_scored for c in captures], kind="stable")
        batches = detection_batches([captures[i].num_scored for i in order], cfg.detect_batch_size, cfg.detect_max_tokens)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="score", unit="batch", leave=False)
        parts = []
        for start, stop in batches:
            idx = order[start:stop]
            parts.append(self._score_batch([captures[i] for i in idx], ref, prefixes, window or cfg.window))
        return DetectorOutput.concat(parts).take(np.argsort(order, kind="stable"))

    def _score_batch(self, captures: list[TextCapture], ref: BankTables, prefixes: bool, window: Optional[int]) -> DetectorOutput:
        cfg = self.watermark_cfg
        spec = self.statistic_spec
        batch = CaptureBatch.stack(captures, self.device)
        result = calibrated(batch, self._true_tables, ref, spec, stop_after=cfg.stop_after, window=window, prefixes=prefixes,
                            top_k=cfg.statistic_top_k)
        draws = result.draws
        assert draws is not None
        green, scored = draws.green[0], draws.scored[0]
        # Diagnostics under the parametric null, with the exact green-list size (deployed key only).
        gamma = scoring.exact_gamma(batch, self._true_tables, spec.null)[0] * scored
        n = scored.sum(-1)
        num_green = green.sum(-1)
        diag = scoring.statistic(scoring.KeyDraws(draws.green, gamma.unsqueeze(0), draws.scored), StatisticSpec(kind="z"))[0]
        model_null_p = upper_tail(gamma, scored, num_green)
        n_np = n.cpu().numpy()
        p, prediction, notes = decide(result.p_value, n_np, cfg.min_tokens, cfg.alpha)
        z = diag.cpu().numpy()
        if cfg.z_threshold is not None:  # legacy rule, kept for comparison only
            prediction = np.nan_to_num(np.where(n_np < cfg.min_tokens, np.nan, z), nan=-np.inf) > cfg.z_threshold
        window_p = None
        if result.window_p_value is not None:
            window_p = np.where(n_np < cfg.min_tokens, np.nan, result.window_p_value)
        prefix = None
        if result.prefix_p_value is not None:
            prefix = [row[: int(c.num_scored)] for row, c in zip(result.prefix_p_value, captures)]
        return DetectorOutput(
            num_tokens_scored=n_np.astype(np.int64),
            num_green_tokens=num_green.cpu().numpy().astype(np.int64),
            green_fraction=(num_green.double() / n.clamp(min=1)).cpu().numpy(),
            gamma_mean=(gamma.sum(-1) / n.clamp(min=1)).cpu().numpy(),
            statistic=result.statistic,
            z_score=np.where(n_np < cfg.min_tokens, np.nan, z),
            p_value=p,
            p_value_floor=np.full(len(captures), 1.0 / (ref.num_keys + 1)),
            num_reference_keys=result.keys_scored.astype(np.int64),
            p_value_model_null=np.where(n_np < cfg.min_tokens, np.nan, model_null_p.cpu().numpy()),
            prediction=prediction,
            window_statistic=result.window_statistic,
            window_p_value=window_p,
            notes=[note or (f"scored in {c.windows} windows of the model's context" if c.windows > 1 else "") for note, c in zip(notes, captures)],
            prefix_p_value=prefix,
        )

    def detect_ids(
        self,
        text_ids: Sequence[Sequence[int]],
        prompt_ids: Optional[Sequence[Sequence[int]]] = None,
        progress: bool = False,
        prefixes: bool = False,
        window: Optional[int] = None,
    ) -> DetectorOutput:
        """Score token sequences; ``prompt_ids`` (context, not scored) may be given per text."""
        return self.score(self.capture(text_ids, prompt_ids, progress=progress), prefixes=prefixes, progress=progress, window=window)

    def split_head(self) -> Optional[SplitLMHead]:
        """The model's decoder and output head, checked once against its own logits (see moewm.lm_head)."""
        if not self._split_head_checked:
            self.capture_hooks.detach()
            probe = self.encoder.pool_tokens[:8].to(self.device).unsqueeze(0)
            self._split_head = split_lm_head(self.model, probe)
            self._split_head_checked = True
        return self._split_head


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


def encode_prompt(tokenizer: Any, prompt: Optional[str]) -> list[int]:
    """Context tokens for a prompt; no prompt means just BOS (if the tokenizer has one)."""
    if prompt:
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None else []


def model_vocab_size(model: nn.Module) -> int:
    """Size of the distribution the model samples from (rows of the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_tokenizer(tokenizer: Any, vocab_size: int) -> None:
    """Refuse a tokenizer that can emit ids the model does not have."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary (model.config.vocab_size / output head) "
            f"has {vocab_size}: token ids must lie in [0, {vocab_size - 1}]; the tokenizer and model do not belong together"
        )


def usable_tokens(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Tokens that may join a pool: real tokenizer entries that are not special tokens."""
    valid = torch.zeros(vocab_size, dtype=torch.bool)
    valid[: min(len(tokenizer), vocab_size)] = True
    special = [i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < vocab_size]
    if special:
        valid[torch.tensor(special)] = False
    return valid


def generate_batched(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    generation: GenerationConfig,
    processors: list[LogitsProcessor],
    on_batch: Any = None,
    progress: Optional[str] = None,
    extra_generate_kwargs: Optional[dict[str, Any]] = None,
) -> list[list[int]]:
    """Left-padded batched ``model.generate``; returns the new tokens of each prompt, stopped at eos.

    ``extra_generate_kwargs`` go to ``model.generate`` as well (e.g. ``watermarking_config=`` for the
    transformers KGW / SynthID baselines).

    The global RNG is seeded per batch from ``generation.sampling_seed``, so watermarked and plain runs
    (and runs with different watermark keys) draw the same sampling noise.
    """
    device = model.get_input_embeddings().weight.device
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    if len(tokenizer) < model_vocab_size(model):
        processors = [*processors, TokenizerVocabularyMask(len(tokenizer))]
    outputs: list[list[int]] = []
    starts = range(0, len(prompt_ids), generation.batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, unit="batch", leave=False)
    for start in starts:
        chunk = prompt_ids[start : start + generation.batch_size]
        input_ids, attention = pad_rows(chunk, pad, side="left")
        width = input_ids.shape[1]
        if width == 0:
            raise ValueError("prompts: a prompt encodes to no tokens (give a non-empty prompt or a tokenizer with a BOS token)")
        if on_batch is not None:
            on_batch()
        torch.manual_seed(generation.sampling_seed + start)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                logits_processor=LogitsProcessorList(processors),
                pad_token_id=pad,
                eos_token_id=eos,
                **generation.generate_kwargs(),
                **(extra_generate_kwargs or {}),
            )
        for row in out[:, width:].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            outputs.append(row)
    return outputs
