"""SynthID-Text (Dathathri et al., 2024) through transformers' ``SynthIDTextWatermarkingConfig``.

Generation passes :class:`~moewm.schemes.synthid_fast.FastSynthIDTextWatermarkingConfig`: transformers'
processor with its per-step hashing replaced by a table lookup, bit-identical scores at a fraction of the
cost (``docs/synthid_fast.md``). Detection uses transformers' processor as it is.

Detection: the count of g-values equal to 1 under its exact binomial null. Each scored token carries
``m = len(keys)`` g-values (one per tournament layer). For a fixed key, a g-value is a table lookup
``table[hash(ngram, key_l) % size]`` into a fixed random 0/1 table, so on text that was not generated with
the key every g-value is a Bernoulli(p0) draw with p0 = the table's mean (0.5 up to the table's sampling
noise, which we use exactly). The context-repetition mask (the processor's own
``compute_context_repetition_mask``) keeps only n-grams whose context was not seen earlier in the text, and
the eos mask drops everything from the first eos on, so the scored draws are distinct. In
:class:`~moewm.engine.detection.DetectorOutput` terms: ``num_tokens_scored`` = n tokens,
``num_green_tokens`` = g-values equal to 1 (over n x m draws), ``green_fraction`` = mean g-value,
``gamma_mean`` = p0.

The first ``ngram_len - 1`` continuation tokens are scored with the same all-zero context that transformers'
processor uses at generation time (its state starts as zeros, ``skip_first_ngram_calls`` is off), so
generation and detection see identical n-grams. transformers' Bayesian detector needs a trained model, so
it is not used here.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from transformers import SynthIDTextWatermarkingConfig

from moewm.config import WatermarkConfig
from moewm.engine.keys import WatermarkKey
from moewm.engine.padding import pad_id, pad_rows
from moewm.engine.positions import PositionContexts, PositionScores
from moewm.engine.generation import check_text_ids
from moewm.schemes.ngram_base import IdsCapture, TransformersWatermark, key_int
from moewm.schemes.synthid_fast import FastSynthIDTextWatermarkingConfig


class SynthIDWatermark(TransformersWatermark):
    """SynthID-Text (Dathathri et al., 2024) through ``transformers.SynthIDTextWatermarkingConfig``
    (generation through its fast twin, :mod:`moewm.schemes.synthid_fast`).

    Detection: unweighted mean g-value turned into a z-score under its exact null (module docstring).
    transformers' Bayesian detector needs a trained model, so it is not used here.
    """

    name = "synthid"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, watermark_cfg: WatermarkConfig, key: WatermarkKey) -> None:
        super().__init__(model, tokenizer, watermark_cfg, key)
        keys = [key_int(key, f"synthid/layer{i}", bits=31) for i in range(watermark_cfg.synthid.num_keys)]
        settings = dict(ngram_len=watermark_cfg.synthid.ngram_len, keys=keys, sampling_table_seed=key_int(key, "synthid/table", bits=31))
        # transformers' own config: its processor detects, and is the reference generation must match bit for bit
        self.transformers_config = SynthIDTextWatermarkingConfig(**settings)
        self.transformers_config.validate()
        self._config = FastSynthIDTextWatermarkingConfig(**settings)  # generation: the same scores, fast (synthid_fast)
        self.processor = self.transformers_config.construct_processor(self.vocab_size, self.device)
        table = self.processor.sampling_table.double()
        self.p0 = float(table.mean())  # exact null probability of g = 1

    def settings_metrics(self) -> dict[str, Any]:
        c = self.watermark_cfg.synthid
        return {"synthid_num_keys": int(c.num_keys), "synthid_ngram_len": int(c.ngram_len)}

    @property
    def watermarking_config(self) -> SynthIDTextWatermarkingConfig:
        return self._config

    @property
    def depth(self) -> int:
        return int(self.processor.keys.numel())

    @torch.no_grad()
    def _positions(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, depth) g-values of every continuation token, (B, L) real-token and scored masks (the processor's
        own context-repetition mask, nothing from the first eos on), and (B, L, ngram_len - 1) each one's context."""
        check_text_ids(text_ids, self.vocab_size)
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
        context = ids.cpu().unfold(1, ctx, 1)[:, : text.shape[1]] if ctx else torch.zeros(*text.shape, 0, dtype=torch.long)
        return g, real, mask, context

    def position_scores(self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None) -> PositionScores:
        """g-values (token x layer draws) of the continuation with the processor's own masks."""
        g, _, mask, _ = self._positions(text_ids, prompt_ids)
        m = g.shape[-1]
        scored = mask.unsqueeze(-1).expand(-1, -1, m)
        gamma = torch.full(g.shape, self.p0, dtype=torch.float64)
        return PositionScores.from_positions(
            (g & scored).reshape(len(text_ids), -1), gamma.reshape(len(text_ids), -1), scored.reshape(len(text_ids), -1), draws_per_token=m
        )

    def position_contexts(self, captures: Sequence[IdsCapture]) -> list[PositionContexts]:
        """Per text: each token's context (the ``ngram_len - 1`` ids before it, zeros before the text), its
        g-values, whether detection counts it and its standardised excess of g-values over p0."""
        if not captures:
            return []
        g, real, mask, context = self._positions([list(c.text_ids) for c in captures], [list(c.prompt_ids) for c in captures])
        evidence = PositionContexts.standardised(g, torch.full(g.shape, self.p0, dtype=torch.float64), mask)
        out = []
        for i, c in enumerate(captures):
            at = torch.nonzero(real[i], as_tuple=True)[0]
            ctx = context[i, at].numpy()
            out.append(PositionContexts(positions=at.numpy().astype(np.int64), tokens=np.asarray(c.text_ids, dtype=np.int64)[at.numpy()],
                                        context=ctx, green_list=ctx, green=g[i, at].numpy(), scored=mask[i, at].numpy(),
                                        evidence=evidence[i, at].numpy()))
        return out

    def draws(self, text_ids: Sequence[Sequence[int]], prompt_ids: list[list[int]]) -> PositionScores:
        return self.position_scores(text_ids, prompt_ids)
