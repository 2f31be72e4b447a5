"""The MoE-LSH watermark: a logits processor that biases the green list, and a one-pass batched detector.

Generation and detection share one green-list function (:class:`moewm.engine.lsh.LSHEncoder` applied to the
features captured by :class:`moewm.engine.routing.FeatureCapture`), so they cannot drift apart: the green list
for the token at position t comes from the features at position ``t + extractor.token_idx``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor

from moewm.config import ConfigError, EncoderConfig, ExtractorConfig, WatermarkConfig
from moewm.engine import scoring
from moewm.engine.capture import CaptureSettings, TextCapture, TextCapturer, capture_settings, detection_batches
from moewm.engine.detection import DetectionResult, DetectorOutput, decide
from moewm.engine.generation import check_tokenizer, encode_prompt, model_vocab_size, usable_tokens
from moewm.engine.keybank import build_bank, default_cache_dir, model_identity, reference_bank
from moewm.engine.keys import WatermarkKey
from moewm.engine.lm_head import SplitLMHead
from moewm.engine.lsh import CalibrationStats, LSHEncoder
from moewm.engine.poisson_binomial import upper_tail
from moewm.engine.positions import PositionContexts
from moewm.engine.routing import FeatureCapture
from moewm.engine.scoring import BankTables, CaptureBatch, StatisticSpec, calibrated
from moewm.schemes.base import TextGeneration

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
        return self.apply(scores, bits.to(scores.device) if bits.device != scores.device else bits, self.token_context(input_ids))

    def token_context(self, input_ids: torch.LongTensor) -> Optional[torch.Tensor]:
        """The token part of the context: the previous tokens (B,) when the encoder hashes one in, else None."""
        return input_ids[:, -1] if self.encoder.context_tokens else None

    def apply(self, scores: torch.FloatTensor, bits: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.FloatTensor:
        """The watermark at one step, given the current signatures (B, nb) and, for a routing + token
        context, the previous tokens (B,): ``delta`` on the green list."""
        return self.encoder.bias_logits(scores, bits, self.delta, None if context is None else context.to(self.encoder.device))


class MoELSHWatermark(TextGeneration):
    """Routing-keyed watermark for one model and key: ``generate`` text, ``detect`` it.

    The hooks that read the router stay on the model until :meth:`close` (or the end of a ``with``
    block), so ``logits_processor`` can also be passed to a plain ``model.generate``. Detection is a
    capture (one forward per text) scored under this key and ranked among ``watermark.reference_keys``
    public reference keys, whose bank is cached under ``cache_dir`` ("default": $MOEWM_CACHE_DIR or
    ~/.cache/moewm; None: memory only).
    """

    name = "moe_lsh"
    capture_runs_model: ClassVar[bool] = True
    green_list_geometry: ClassVar[bool] = True
    default_statistic: ClassVar[Optional[str]] = "llr"  # the power study's choice (docs/statistics.md)

    @classmethod
    def build(cls, model: nn.Module, tokenizer: Any, watermark: WatermarkConfig, key: WatermarkKey, *,
              extractor: Optional[ExtractorConfig] = None, encoder: Optional[EncoderConfig] = None, calibration: Any = None,
              cache_dir: Optional[str | Path] = "default", model_id: str = "") -> "MoELSHWatermark":
        """``calibration`` may be :class:`~moewm.engine.lsh.CalibrationStats` or a :class:`moewm.engine.calibration.Calibration`."""
        calibration = getattr(calibration, "stats", calibration)
        return cls(model, tokenizer, extractor, encoder, watermark, key, calibration, cache_dir=cache_dir, model_id=model_id)

    @classmethod
    def check_config(cls, watermark: WatermarkConfig) -> None:
        watermark.check_calibrated_alpha()

    @classmethod
    def check_encoder(cls, watermark: WatermarkConfig, encoder: EncoderConfig) -> None:
        if encoder.routing_free and watermark.margin_bits:
            raise ConfigError(f"watermark.margin_bits={watermark.margin_bits} with encoder.routing_free=true: allowed value is 0 "
                              "(margin-aware detection re-scores the routing's uncertain bits, and the routing-free twin has none)")

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
        self.watermark_cfg = self.resolve_statistic(watermark or WatermarkConfig(kind=self.name))
        self.watermark_cfg.validate()
        self.check_config(self.watermark_cfg)
        self.check_encoder(self.watermark_cfg, self.encoder_cfg)
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
        self.capturer = TextCapturer(model, tokenizer, self.extractor_cfg, capture_settings(self.extractor_cfg, self.watermark_cfg),
                                     hooks=self.capture_hooks)

    def null_description(self) -> dict[str, Any]:
        cfg = self.watermark_cfg
        return {"statistic": cfg.statistic, "reference_keys": cfg.reference_keys,
                "p_value_null": f"rank among {cfg.reference_keys} public reference keys (exact for text written without the key, any origin; "
                                f"floor {1 / (cfg.reference_keys + 1):.2g}; Besag-Clifford stop after {cfg.stop_after} exceedances)"}

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
        return self.capturer.settings

    @property
    def statistic_spec(self) -> StatisticSpec:
        cfg = self.watermark_cfg
        return StatisticSpec(kind=cfg.statistic, null=cfg.null, delta=cfg.delta, ignore_repeated=cfg.ignore_repeated,
                             margin_bits=cfg.margin_bits, margin_scale=cfg.margin_scale)

    def capture(
        self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None, progress: bool = False
    ) -> list[TextCapture]:
        """One forward per text: what every key's detector needs of it (:mod:`moewm.engine.capture`)."""
        if prompt_ids is None:
            prompt_ids = [self.encode_prompt(None) for _ in text_ids]
        return self.capturer.capture(text_ids, prompt_ids, progress=progress)

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
        order, batches = self._ordered_batches(captures, progress)
        parts = []
        for idx in batches:
            parts.append(self._score_batch([captures[i] for i in idx], ref, prefixes, window or cfg.window))
        return DetectorOutput.concat(parts).take(np.argsort(order, kind="stable"))

    def _ordered_batches(self, captures: Sequence[TextCapture], progress: bool = False) -> tuple[np.ndarray, Iterable[np.ndarray]]:
        """Detection batches of ``captures`` (longest first, sized by ``watermark.detect_batch_size`` and
        ``detect_max_tokens``): the order and each batch's indices into ``captures`` (with a progress bar)."""
        cfg = self.watermark_cfg
        order = np.argsort([-c.num_scored for c in captures], kind="stable")
        batches = detection_batches([captures[i].num_scored for i in order], cfg.detect_batch_size, cfg.detect_max_tokens)
        indices: Iterable[np.ndarray] = [order[start:stop] for start, stop in batches]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc="score", unit="batch", leave=False)
        return order, indices

    def _draws_fn(self) -> Optional[Any]:
        """The scheme's draws for :func:`moewm.engine.scoring.calibrated` (None: green lists, :func:`scoring.key_draws`)."""
        return None

    def _positions_scored(self, batch: CaptureBatch, tables: BankTables, result: Any) -> torch.Tensor:
        """(K, B): positions each of the K keys of ``tables`` scores per text (what ``watermark.min_tokens`` reads)."""
        return result.draws.scored.sum(-1)

    def score_keys(self, captures: Sequence[TextCapture], keys: Sequence[WatermarkKey], progress: bool = False) -> np.ndarray:
        """(K, N) calibrated p-values of the texts with each of ``keys`` as the deployed key (NaN under
        ``watermark.min_tokens``), ranked among the same reference keys scored once for all K: the validity study's
        many keys for about the cost of one. Text by text the p-values :meth:`score` gives a watermarker built with
        that key (tested)."""
        cfg = self.watermark_cfg
        out = np.full((len(keys), len(captures)), np.nan)
        if not captures or not keys:
            return out
        bank = build_bank(self.encoder_cfg, list(keys), self.capture_hooks.dim, self.model.get_input_embeddings().weight,
                          self.encoder.usable, self.vocab_size, self._calibration)
        tables = BankTables.of(bank, self.device)
        ref = self.reference_tables(self.device)
        _, batches = self._ordered_batches(captures, progress)
        for idx in batches:
            batch = CaptureBatch.stack([captures[i] for i in idx], self.device)
            result = calibrated(batch, tables, ref, self.statistic_spec, stop_after=cfg.stop_after, top_k=cfg.statistic_top_k,
                                draws=self._draws_fn())
            scored = self._positions_scored(batch, tables, result).cpu().numpy()
            for k in range(len(keys)):
                out[k, idx] = decide(result.key_p_values[k], scored[k], cfg.min_tokens, cfg.alpha)[0]
        return out

    def reference_statistics(self, captures: Sequence[TextCapture], progress: bool = False) -> np.ndarray:
        """(R, N): every public reference key's statistic on every captured text, no early stop: the key-validity
        study's input (:mod:`moewm.evaluation.key_validity`), where each reference key in turn is the deployed one.
        Public keys only: nothing of the deployed key is read."""
        ref = self.reference_tables(self.device)
        stats = np.full((ref.num_keys, len(captures)), np.nan)
        _, batches = self._ordered_batches(captures, progress)
        for idx in batches:
            batch = CaptureBatch.stack([captures[i] for i in idx], self.device)
            stats[:, idx] = scoring.reference_statistics(batch, ref, self.statistic_spec, self.watermark_cfg.statistic_top_k,
                                                         self._draws_fn()).cpu().numpy()
        return stats

    def _score_batch(self, captures: list[TextCapture], ref: BankTables, prefixes: bool, window: Optional[int]) -> DetectorOutput:
        cfg = self.watermark_cfg
        spec = self.statistic_spec
        batch = CaptureBatch.stack(captures, self.device)
        result = calibrated(batch, self._true_tables, ref, spec, stop_after=cfg.stop_after, window=window, prefixes=prefixes,
                            top_k=cfg.statistic_top_k, draws=self._draws_fn())
        draws = result.draws
        assert draws is not None
        green, scored = draws.green[0], draws.scored[0]
        # Diagnostics under the parametric null, with the exact green-list size (deployed key only).
        gamma = scoring.exact_gamma(batch, self._true_tables, spec.null)[0] * scored
        n = scored.sum(-1)
        num_green = green.sum(-1)
        diag = scoring.statistic(scoring.KeyDraws(draws.green, gamma.unsqueeze(0), draws.scored), StatisticSpec(kind="z"))[0]
        model_null_p = upper_tail(gamma, scored, num_green)
        return self._detector_output(captures, ref, result, n.cpu().numpy(), num_green, n, gamma.sum(-1), diag.cpu().numpy(), model_null_p,
                                     z_rule=True)

    def _detector_output(self, captures: list[TextCapture], ref: BankTables, result: Any, n_scored: np.ndarray, num_green: torch.Tensor,
                         units: torch.Tensor, expected: torch.Tensor, z: np.ndarray, model_null_p: torch.Tensor,
                         z_rule: bool = False) -> DetectorOutput:
        """One batch's output from its calibrated ``result`` (:func:`moewm.engine.scoring.calibrated`) and the deployed
        key's diagnostics, for every routing scheme: ``n_scored`` positions scored per text, ``num_green`` green draws
        among ``units`` scored draws whose null probabilities sum to ``expected``, the diagnostic ``z`` and
        ``model_null_p``. The p-values are decided at alpha; below ``watermark.min_tokens`` scored positions a text gets
        no verdict and NaN diagnostics. ``z_rule``: apply the legacy ``watermark.z_threshold`` decision when it is set."""
        cfg = self.watermark_cfg
        p, prediction, notes = decide(result.p_value, n_scored, cfg.min_tokens, cfg.alpha)
        short = n_scored < cfg.min_tokens
        if z_rule and cfg.z_threshold is not None:  # legacy rule, kept for comparison only
            prediction = np.nan_to_num(np.where(short, np.nan, z), nan=-np.inf) > cfg.z_threshold
        window_p = None if result.window_p_value is None else np.where(short, np.nan, result.window_p_value)
        prefix = None
        if result.prefix_p_value is not None:
            prefix = [row[: int(c.num_scored)] for row, c in zip(result.prefix_p_value, captures)]
        return DetectorOutput(
            num_tokens_scored=n_scored.astype(np.int64),
            num_green_tokens=num_green.cpu().numpy().astype(np.int64),
            green_fraction=(num_green.double() / units.clamp(min=1)).cpu().numpy(),
            gamma_mean=(expected / units.clamp(min=1)).cpu().numpy(),
            statistic=result.statistic,
            z_score=np.where(short, np.nan, z),
            p_value=p,
            p_value_floor=np.full(len(captures), 1.0 / (ref.num_keys + 1)),
            num_reference_keys=result.keys_scored.astype(np.int64),
            p_value_model_null=np.where(short, np.nan, model_null_p.cpu().numpy()),
            prediction=prediction,
            window_statistic=result.window_statistic,
            window_p_value=window_p,
            notes=[note or (f"scored in {c.windows} windows of the model's context" if c.windows > 1 else "") for note, c in zip(notes, captures)],
            prefix_p_value=prefix,
        )

    def position_contexts(self, captures: Sequence[TextCapture]) -> list[PositionContexts]:
        """Per captured text, under the deployed key: each scored token's routing signature (the context),
        its green pools (the green list's key), whether it is green, whether detection counts it, and its
        standardised green excess (with the statistic's gamma), from the capture alone (no forward)."""
        if not captures:
            return []
        cfg = self.watermark_cfg
        spec = self.statistic_spec
        bank = self._true_tables.bank
        out = []
        for s in range(0, len(captures), max(1, cfg.detect_batch_size)):
            chunk = list(captures[s : s + cfg.detect_batch_size])
            batch = CaptureBatch.stack(chunk, self.device).with_top_k(cfg.statistic_top_k)
            bits_all = scoring.signatures(batch.features, bank)  # (1, B, n, nb)
            pools = scoring.bank_pool_mask(bits_all, bank, batch.previous)[0]  # the previous token too, when keyed by it
            bits = bits_all[0]
            every = scoring.key_draws(batch, self._true_tables, dataclasses.replace(spec, ignore_repeated=False))  # every green draw
            counted = scoring.key_draws(batch, self._true_tables, spec).scored[0]  # what detection counts
            green = every.green[0]
            evidence = PositionContexts.standardised(green.unsqueeze(-1), every.gamma[0].unsqueeze(-1), counted)
            out += PositionContexts.of_routing_batch(chunk, bits, pools, green.unsqueeze(-1), counted, evidence)
        return out

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
        """The model's decoder and output head, checked once against its own logits (see moewm.engine.lm_head)."""
        return self.capturer.split_head()
