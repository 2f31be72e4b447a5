"""What the transformers-backed n-gram schemes (KGW, SynthID) share: key-derived integers, id checks, and the
exact binomial test of per-position Bernoulli draws (:func:`output_from_scores`).

Their capture is the token ids themselves (detection needs no forward pass): :class:`IdsCapture`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from moewm.config import WatermarkConfig
from moewm.engine.detection import DetectorOutput, decide
from moewm.engine.generation import check_text_ids, encode_prompt, model_vocab_size
from moewm.engine.keys import WatermarkKey
from moewm.engine.poisson_binomial import upper_tail
from moewm.engine.positions import PositionScores
from moewm.schemes.base import TextGeneration

log = logging.getLogger(__name__)


def key_int(key: WatermarkKey, purpose: str, bits: int = 32) -> int:
    """A non-negative integer of ``bits`` bits derived from the key for ``purpose``."""
    return int.from_bytes(key.derive(purpose)[:8], "little") & ((1 << bits) - 1)


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


@dataclass(frozen=True)
class IdsCapture:
    """What an n-gram scheme's detector needs of a text: its ids and the prompt in front of it (no forward pass)."""

    text_ids: tuple[int, ...]
    prompt_ids: tuple[int, ...]


class TransformersWatermark(TextGeneration):
    """Shared path of KGW and SynthID: transformers builds the watermark processor from ``watermarking_config``
    at generation time; detection turns each text's per-position draws (:meth:`draws`) into an exact test."""

    name = "baseline"
    capture_runs_model = False

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

    def null_description(self) -> dict[str, Any]:
        return {"statistic": "green count", "reference_keys": 0,
                "p_value_null": "exact binomial tail of the green count, repeated n-grams / contexts scored once"}

    def close(self) -> None:
        """Nothing to remove: transformers builds (and drops) its processor inside each ``generate`` call."""

    def __enter__(self) -> "TransformersWatermark":
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

    def draws(self, text_ids: Sequence[Sequence[int]], prompt_ids: list[list[int]]) -> PositionScores:
        """The Bernoulli draws detection tests, per text (a subclass defines them)."""
        raise NotImplementedError

    def capture(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None,
                progress: bool = False) -> list[IdsCapture]:
        """The ids themselves: detection needs no forward pass."""
        check_text_ids(text_ids, self.vocab_size)
        prompts = self._prompts(text_ids, prompt_ids)
        return [IdsCapture(tuple(int(x) for x in t), tuple(int(x) for x in p)) for t, p in zip(text_ids, prompts)]

    def score(self, captures: Sequence[IdsCapture], prefixes: bool = False, progress: bool = False,
              window: Optional[int] = None) -> DetectorOutput:
        """The exact binomial test of each text's draws, in batches."""
        if not captures:
            return DetectorOutput.empty(0)
        step = max(self.watermark_cfg.detect_batch_size, 64)
        parts = []
        for s in range(0, len(captures), step):
            chunk = captures[s : s + step]
            ps = self.draws([list(c.text_ids) for c in chunk], [list(c.prompt_ids) for c in chunk])
            parts.append(output_from_scores(ps, self.watermark_cfg, prefixes=prefixes, window=window))
        return DetectorOutput.concat(parts)

    def detect_ids(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None,
                   progress: bool = False, prefixes: bool = False, window: Optional[int] = None) -> DetectorOutput:
        return self.score(self.capture(text_ids, prompt_ids), prefixes=prefixes, window=window)
