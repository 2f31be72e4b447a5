"""The routing-keyed tournament (``watermark.kind=moe_tournament``): SynthID's sampling tournament keyed by routing.

Generation: at each step the routing signature of the current position (MoE-LSH's hooks and hyperplanes)
keys ``watermark.tournament.layers`` layers of g-values over the whole vocabulary, each layer by its own
block of ``watermark.tournament.block_bits`` signature bits, and the token is sampled from the tournament's
output distribution (:class:`moewm.engine.tournament.TournamentKey`). Detection: MoE-LSH's capture (one
forward per text, key-free), the g-values of the observed tokens under every key
(:class:`moewm.engine.tournament.TournamentScorer`), and the same rank calibration among the public
reference keys (:func:`moewm.engine.scoring.calibrated`), so p-values are exact for text of any origin.
``watermark.delta`` is unused; ``watermark.statistic`` picks green (the sum of g-values, its own: null means it) / z / llr
(see the engine module).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import torch

from moewm.config import ConfigError, EncoderConfig, GenerationConfig, WatermarkConfig
from moewm.engine.capture import TextCapture
from moewm.engine.detection import DetectorOutput
from moewm.engine.poisson_binomial import upper_tail
from moewm.engine.positions import PositionContexts
from moewm.engine.routing import FeatureCapture
from moewm.engine.lsh import LSHEncoder
from moewm.engine.scoring import BankTables, CaptureBatch, StatisticSpec, calibrated, signatures
from moewm.engine.tournament import REPEAT_TABLE_BITS, TournamentKey, TournamentScorer, repeat_slot, tokens_before
from moewm.schemes.common_contexts import common_contexts
from moewm.schemes.moe_lsh import MoELSHWatermark, RoutingWatermarkProcessor


class TournamentProcessor(RoutingWatermarkProcessor):
    """Samples through the routing-keyed tournament: the returned scores' softmax (at the generation's
    temperature) is the tournament of the model's distribution."""

    def __init__(self, capture: FeatureCapture, encoder: LSHEncoder, tournament: TournamentKey, token_idx: int = -1,
                 skip_repeated: bool = False) -> None:
        super().__init__(capture, encoder, 0.0, token_idx)
        self.tournament = tournament
        self.temperature = 1.0
        self.skip_repeated = skip_repeated
        self._seen: Optional[torch.Tensor] = None  # (B, m, slots): layer contexts played so far in each row
        self._step_length = -1

    def reset(self) -> None:
        super().reset()
        self._seen = None
        self._step_length = -1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, length = input_ids.shape
        if self._seen is not None and (length != self._step_length + 1 or self._seen.shape[0] != batch):
            self._seen = None  # a new generate call
        self._step_length = length
        return super().__call__(input_ids, scores)

    def token_context(self, input_ids: torch.LongTensor) -> Optional[torch.Tensor]:
        """(B, c) the c tokens before (``watermark.tournament.context_tokens``), oldest first, or None."""
        count = self.tournament.context_tokens
        return tokens_before(input_ids, count) if count else None

    def apply(self, scores: torch.FloatTensor, bits: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.FloatTensor:
        active = None
        if self.skip_repeated:
            key = self.tournament
            slot = repeat_slot(key.codes(bits, context), key.code_bits).unsqueeze(-1)  # (B, m, 1)
            if self._seen is None:
                slots = 1 << min(key.code_bits, REPEAT_TABLE_BITS)
                self._seen = torch.zeros(bits.shape[0], key.layers, slots, dtype=torch.bool, device=slot.device)
            active = ~self._seen.gather(2, slot).squeeze(-1)
            self._seen.scatter_(2, slot, True)
        return self.tournament.process_scores(scores, bits, self.temperature, active, context, inplace=True)


class MoETournamentWatermark(MoELSHWatermark):
    """Routing-keyed tournament sampling for one model and key; capture, bank and calibration are MoE-LSH's."""

    name = "moe_tournament"
    green_list_geometry: ClassVar[bool] = False  # g-values per layer, no green lists of pools
    default_statistic: ClassVar[Optional[str]] = "green"  # the sum of g-values, the statistic its validity study measured

    @classmethod
    def check_encoder(cls, watermark: WatermarkConfig, encoder: EncoderConfig) -> None:
        watermark.tournament.validate(num_bits=encoder.num_bits)
        if encoder.routing_free:
            raise ConfigError("encoder.routing_free=true: allowed value is false with watermark.kind=moe_tournament (the "
                              "tournament's routing-free twin is watermark.tournament.routing_layers=0)")
        if encoder.context_tokens:
            raise ConfigError(f"encoder.context_tokens={encoder.context_tokens}: allowed value is 0 with watermark.kind=moe_tournament "
                              "(encoder.context_tokens keys MoE-LSH's green lists; the tournament's token context is "
                              "watermark.tournament.context_tokens, allowed values 0, 1, 2)")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.watermark_cfg
        t = cfg.tournament
        bank = self._true_tables.bank
        context_tokens = t.context_tokens
        routed = None if t.routed_contexts is None else common_contexts(self.tokenizer, context_tokens, t.routed_contexts)
        key = TournamentKey(bank.salt[0], bank.num_bits, t.layers, t.block_bits, bank.usable, context_tokens, t.routed_layers,
                            t.sample_tolerance, routed).to(self.device)
        self.logits_processor = TournamentProcessor(self.capture_hooks, self.encoder, key, self.extractor_cfg.token_idx, t.skip_repeated)
        self.scorer = TournamentScorer(bank.num_bits, t.layers, t.block_bits, cfg.statistic, cfg.ignore_repeated, self.vocab_size,
                                       t.skip_repeated, context_tokens, t.routed_layers, routed)

    def settings_metrics(self) -> dict[str, Any]:
        t = self.watermark_cfg.tournament
        return {"tournament_layers": int(t.layers), "tournament_block_bits": int(t.block_bits), "tournament_skip_repeated": bool(t.skip_repeated),
                "tournament_context_tokens": int(t.context_tokens), "tournament_routing_layers": t.routed_layers,
                "tournament_routed_contexts": t.routed_contexts}

    def null_description(self) -> dict[str, Any]:
        out = super().null_description()
        out["statistic"] = f"tournament {self.watermark_cfg.statistic}"
        return out

    def generate_from_ids(self, prompt_ids: Sequence[Sequence[int]], generation: Optional[GenerationConfig] = None,
                          watermark: bool = True, progress: bool = False) -> list[list[int]]:
        generation = generation or GenerationConfig()
        self.logits_processor.temperature = float(generation.temperature) if generation.do_sample else 1.0
        return super().generate_from_ids(prompt_ids, generation, watermark, progress)

    @property
    def statistic_spec(self) -> StatisticSpec:
        # The scorer's evidence is per position already: ``green`` sums it.
        return StatisticSpec(kind="green", ignore_repeated=self.watermark_cfg.ignore_repeated)

    def position_contexts(self, captures: Sequence[TextCapture]) -> list[PositionContexts]:
        """Per captured text, under the deployed key: each token's routing signature (the context), its layers'
        block codes (what keys each layer's g-value), its g-values (one draw per tournament layer), whether
        detection counts it, and its standardised excess of g over the model's null mean, from the capture
        alone. MoE-LSH's version would report its partition's green pools, which the tournament never uses."""
        if not captures:
            return []
        cfg = self.watermark_cfg
        out = []
        for s in range(0, len(captures), max(1, cfg.detect_batch_size)):
            chunk = list(captures[s : s + cfg.detect_batch_size])
            batch = CaptureBatch.stack(chunk, self.device)
            bits = signatures(batch.features, self._true_tables.bank)[0]  # (B, n, nb)
            codes = self.scorer.contexts(batch, self._true_tables)[0][0]  # (B, n, m)
            units = self.scorer.units(batch, self._true_tables)
            g, expected, unit_scored = units.g[0], units.expected[0], units.scored[0]  # (B, n, m)
            p = torch.where(unit_scored, expected, torch.zeros_like(expected))  # an unscored unit adds nothing
            evidence = PositionContexts.standardised(g & unit_scored, p, unit_scored.any(-1))
            out += PositionContexts.of_routing_batch(chunk, bits, codes, g, unit_scored.any(-1), evidence)
        return out

    def _draws_fn(self) -> Any:
        return self.scorer.draws

    def _positions_scored(self, batch: CaptureBatch, tables: BankTables, result: Any) -> torch.Tensor:
        return self.scorer.units(batch, tables).scored.any(-1).sum(-1)  # positions with at least one scored layer

    def _score_batch(self, captures: list[TextCapture], ref: BankTables, prefixes: bool, window: Optional[int]) -> DetectorOutput:
        cfg = self.watermark_cfg
        batch = CaptureBatch.stack(captures, self.device)
        result = calibrated(batch, self._true_tables, ref, self.statistic_spec, stop_after=cfg.stop_after, window=window,
                            prefixes=prefixes, top_k=cfg.statistic_top_k, draws=self._draws_fn())
        # Diagnostics of the deployed key: g-values against their means under the model (all captured top tokens).
        units = self.scorer.units(batch, self._true_tables)
        g, expected, scored = units.g[0], units.expected[0], units.scored[0]  # (B, n, m)
        b = g.shape[0]
        count = scored.sum((-2, -1)).double()
        num_green = (g & scored).sum((-2, -1))
        mean = (expected * scored).sum((-2, -1))
        var = (expected * (1 - expected) * scored).sum((-2, -1))
        z = ((num_green.double() - mean) / var.clamp(min=1e-300).sqrt()).where(var > 0, torch.full_like(var, float("nan")))
        model_null_p = upper_tail(expected.reshape(b, -1), scored.reshape(b, -1), num_green)
        n_np = scored.any(-1).sum(-1).cpu().numpy()  # positions with at least one scored layer (as _positions_scored)
        return self._detector_output(captures, ref, result, n_np, num_green, count, mean, z.cpu().numpy(), model_null_p)
