"""What every watermarking scheme is: the :class:`Watermarker` protocol, and the text generation they share.

A scheme generates from prompt ids, captures texts (what detection needs of each text: for MoE-LSH one
forward's routing and next-token distribution, for the n-gram baselines the ids themselves), scores
captures under its key into a :class:`~moewm.engine.detection.DetectorOutput` (the one output type; the
decision at alpha is :func:`moewm.engine.detection.decide`), tells from a capture what keys each position's
green draw (:meth:`Watermarker.position_contexts`, for the survival diagnostics), and closes. The job and the
evaluation talk to this protocol only; a scheme's registry entry (:mod:`moewm.schemes.registry`) is all that
names it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Optional, Protocol, Sequence, runtime_checkable

from torch import nn

from moewm.config import EncoderConfig, ExtractorConfig, GenerationConfig, WatermarkConfig
from moewm.engine.detection import DetectorOutput
from moewm.engine.generation import generate_batched
from moewm.engine.keys import WatermarkKey
from moewm.engine.positions import PositionContexts


@runtime_checkable
class Watermarker(Protocol):
    """One scheme under one key, bound to a model and tokenizer."""

    # Does capture run the model (MoE-LSH: routing and next-token distribution)? Then a capture is worth
    # caching, and it carries each text's log-probabilities (perplexity comes from it, not a second pass).
    capture_runs_model: ClassVar[bool]
    key: WatermarkKey
    watermark_cfg: WatermarkConfig
    model: nn.Module
    tokenizer: Any

    def generate_from_ids(self, prompt_ids: Sequence[Sequence[int]], generation: Optional[GenerationConfig] = None,
                          watermark: bool = True, progress: bool = False) -> list[list[int]]: ...

    def capture(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None,
                progress: bool = False) -> list[Any]: ...

    def score(self, captures: Sequence[Any], prefixes: bool = False, progress: bool = False,
              window: Optional[int] = None) -> DetectorOutput: ...

    def detect_ids(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None,
                   progress: bool = False, prefixes: bool = False, window: Optional[int] = None) -> DetectorOutput: ...

    def position_contexts(self, captures: Sequence[Any]) -> list[PositionContexts]:
        """Per capture, what keys each scored position's green draw under the key (its context: MoE-LSH the
        routing signature, KGW / SynthID the n-gram context), its green list's key, its green draws, whether
        detection counts it and its evidence: from the capture alone, never a forward. The survival diagnostics
        (:mod:`moewm.evaluation.survival`) compare these between a text and its edited version."""
        ...

    def null_description(self) -> dict[str, Any]:
        """What the p-values rest on: ``statistic``, ``reference_keys`` (0: an exact test) and ``p_value_null`` (a sentence)."""
        ...

    def settings_metrics(self) -> dict[str, Any]:
        """The scheme's own strength settings as flat metrics (``kgw_gamma``, ...), for tables across schemes."""
        ...

    def close(self) -> None: ...


class TextGeneration:
    """Text-level generation for every watermarker (MoE-LSH and the baselines): prompts in, ids or text
    out. A subclass provides ``model``, ``tokenizer``, ``encode_prompt`` and what its watermark adds to
    :func:`generate_batched` (``watermark_generate_kwargs``)."""

    model: nn.Module
    tokenizer: Any
    generation_label = "watermarked"  # for the progress bar
    capture_runs_model: ClassVar[bool] = False
    # Does the scheme bias green lists of the encoder's pools (what eval.geometry measures)?
    green_list_geometry: ClassVar[bool] = False
    # What ``watermark.statistic=null`` means for this scheme: its own statistic, the one its validity study
    # measured (None: the scheme scores one fixed statistic and ignores ``watermark.statistic``).
    default_statistic: ClassVar[Optional[str]] = None

    @classmethod
    def resolve_statistic(cls, watermark: WatermarkConfig) -> WatermarkConfig:
        """``watermark`` with a null ``statistic`` replaced by this scheme's own (:attr:`default_statistic`): the one
        place that resolves it. The same object when there is nothing to resolve."""
        if watermark.statistic is not None or cls.default_statistic is None:
            return watermark
        return dataclasses.replace(watermark, statistic=cls.default_statistic)

    @classmethod
    def build(cls, model: nn.Module, tokenizer: Any, watermark: WatermarkConfig, key: WatermarkKey, *,
              extractor: Optional[ExtractorConfig] = None, encoder: Optional[EncoderConfig] = None, calibration: Any = None,
              cache_dir: Optional[str | Path] = "default", model_id: str = "") -> "TextGeneration":
        """The scheme for one model and key from the job's settings (a scheme takes what it needs of them)."""
        return cls(model, tokenizer, watermark, key)  # type: ignore[call-arg]

    @classmethod
    def check_config(cls, watermark: WatermarkConfig) -> None:
        """Checks of ``watermark.*`` that only this scheme needs, run before any weights load."""

    @classmethod
    def check_encoder(cls, watermark: WatermarkConfig, encoder: EncoderConfig) -> None:
        """Checks of ``watermark.*`` against ``encoder.*`` that only this scheme needs, run before any weights load."""

    def settings_metrics(self) -> dict[str, Any]:
        """The scheme's own settings beyond the job's shared metrics (none by default)."""
        return {}

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


