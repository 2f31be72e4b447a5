"""Configuration dataclasses: the library API takes them and the Hydra app's schema reuses them.

Each group of the app (``extractor``, ``encoder``, ``watermark``, ...) is one dataclass here, so a
misspelled key or a wrong type fails at start-up with Hydra's own message. Range checks live in the
``validate`` methods and in :func:`moewm.app.schema.validate_app` (cross-field and model-layout checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from moewm.null_corpora import HELD_OUT_CORPORA, HUMAN_CORPORA

EXTRACTOR_KINDS = ("router", "hidden")
ENCODER_KINDS = ("simhash", "centered", "whitened", "pca")
POOL_DESIGNS = ("anchors", "partition", "random", "random_partition")
GREEN_LISTS = ("bits", "hashed", "vote")
STATISTICS = ("z", "llr", "green")


GENERATED_NULL_SETS = ("greedy", "top_p")
NULL_SET_NAMES = ("plain",) + GENERATED_NULL_SETS + tuple(HUMAN_CORPORA)


class ConfigError(ValueError):
    """A configuration value is out of its allowed range; the message names the key and the range."""


def check_null_sets(names: Sequence[str]) -> None:
    held_out = [n for n in names if n in HELD_OUT_CORPORA]
    if held_out:
        raise ConfigError(f"eval.null_sets={list(names)}: {held_out} held out for the per-key validity study "
                          f"(python -m moewm.evaluation.validity) and never a job's null set; allowed values are "
                          f"{list(NULL_SET_NAMES[1:])}")
    unknown = [n for n in names if n not in NULL_SET_NAMES or n == "plain"]
    if unknown:
        raise ConfigError(f"eval.null_sets={list(names)}: unknown {unknown}; allowed values are {list(NULL_SET_NAMES[1:])} "
                          "(the job's own samples, 'plain', are always scored)")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ExtractorConfig:
    """Which routing (or hidden-state) features key the watermark.

    Layer indices count MoE layers (router extractor) or decoder layers (hidden extractor);
    ``end_layer_idx`` is exclusive and ``None`` means "through the last layer".
    """

    kind: str = "router"
    start_layer_idx: int = 0
    end_layer_idx: Optional[int] = None
    use_top_k: bool = False
    k: int = 2
    # Position whose routing keys the green list of the next token: -1 is the last context token,
    # -2 the one before it, and so on.
    token_idx: int = -1

    def validate(self) -> None:
        _require(self.kind in EXTRACTOR_KINDS, f"extractor.kind={self.kind!r}: allowed values are {EXTRACTOR_KINDS}")
        _require(self.start_layer_idx >= 0, f"extractor.start_layer_idx={self.start_layer_idx}: must be >= 0")
        if self.end_layer_idx is not None:
            _require(
                self.end_layer_idx > self.start_layer_idx,
                f"extractor.end_layer_idx={self.end_layer_idx}: must be > extractor.start_layer_idx="
                f"{self.start_layer_idx} (the range [start, end) would be empty)",
            )
        if self.use_top_k:
            _require(self.k >= 1, f"extractor.k={self.k}: must be >= 1 (and at most the experts per layer)")
        _require(-64 <= self.token_idx <= -1, f"extractor.token_idx={self.token_idx}: allowed range is [-64, -1]")


@dataclass
class EncoderConfig:
    """SimHash encoder: hyperplanes turn a feature vector into ``num_bits`` bits, each owning a pool."""

    kind: str = "simhash"
    num_bits: int = 32
    # The pools (moewm.engine.keybank): ``partition`` = a balanced semantic partition of the usable vocabulary
    # into num_bits groups, the key choosing which bit owns which group (pool_size unused); ``anchors``
    # = the seed's design, the pool_size tokens nearest a keyed anchor (pools overlap and cover part of
    # the vocabulary); ``random`` = pool_size keyed random tokens; ``random_partition`` = the usable vocabulary
    # split into num_bits equal groups at random (a public draw, like the semantic partition key-independent:
    # every token in one group, but groups are not semantic). Why partition: docs/statistics.md (History).
    pools: str = "partition"
    pool_size: int = 64
    # Which pools are green (moewm.engine.lsh.pool_mask): ``bits`` = pool i when bit i is 1 (similar routing,
    # similar green list); ``hashed`` = a keyed hash of the whole signature picks them (every distinct
    # signature gets its own green list).
    green_lists: str = "hashed"
    # A pool is green only when this many keyed bits are all 1 (green share about 2^-m of the pools).
    green_bits: int = 1
    # green_lists=vote: this many sub-signature lists (odd), list j a keyed hash of its own block of the
    # signature's bits; a pool is green when most lists choose it (one flipped bit re-draws one list).
    vote_lists: int = 5
    # 1: the token before the scored one is hashed into the green list too (hashed / vote lists): a
    # routing + token context, between pure routing (0) and KGW's token context. (The routing tournament's
    # token context is its own: watermark.tournament.context_tokens.)
    context_tokens: int = 0
    # true: MoE-LSH's routing-free twin, the green list keyed by the token before alone (every signature bit held at
    # 0: zero hyperplanes for the deployed and the reference keys), everything else equal; needs context_tokens=1.
    # The ablation of what routing adds (routing_free_twin); the tournament's twin is watermark.tournament.routing_layers=0.
    routing_free: bool = False
    # Deprecated: semantic_pools=false is pools=random, true is pools=anchors.
    semantic_pools: Optional[bool] = None
    # Only for centered / whitened / pca: how many calibration texts and tokens estimate the statistics.
    calibration_texts: int = 64
    calibration_max_tokens: int = 128
    # Ridge added to the covariance before whitening, relative to its mean eigenvalue.
    whitening_eps: float = 1e-3

    @property
    def pool_design(self) -> str:
        """``pools``, with the deprecated ``semantic_pools=false`` read as ``random``."""
        return "random" if self.semantic_pools is False else self.pools

    def validate(self, vocab_size: Optional[int] = None) -> None:
        _require(self.kind in ENCODER_KINDS, f"encoder.kind={self.kind!r}: allowed values are {ENCODER_KINDS}")
        _require(self.num_bits >= 1, f"encoder.num_bits={self.num_bits}: must be >= 1")
        _require(self.num_bits <= 4096, f"encoder.num_bits={self.num_bits}: allowed range is [1, 4096]")
        _require(self.pool_size >= 1, f"encoder.pool_size={self.pool_size}: must be >= 1")
        _require(self.pools in POOL_DESIGNS, f"encoder.pools={self.pools!r}: allowed values are {POOL_DESIGNS}")
        _require(self.green_lists in GREEN_LISTS, f"encoder.green_lists={self.green_lists!r}: allowed values are {GREEN_LISTS}")
        _require(1 <= self.green_bits <= min(8, self.num_bits),
                 f"encoder.green_bits={self.green_bits}: allowed range is [1, {min(8, self.num_bits)}] (at most encoder.num_bits, and 8)")
        _require(self.green_lists != "vote" or (self.vote_lists >= 1 and self.vote_lists % 2 == 1 and self.vote_lists <= self.num_bits),
                 f"encoder.vote_lists={self.vote_lists}: allowed values are odd numbers in [1, {self.num_bits}] (at most encoder.num_bits)")
        _require(self.context_tokens in (0, 1), f"encoder.context_tokens={self.context_tokens}: allowed values are 0, 1")
        _require(self.context_tokens == 0 or self.green_lists != "bits",
                 f"encoder.context_tokens={self.context_tokens} needs encoder.green_lists=hashed or vote (bit-switched lists have no hash to key)")
        _require(not self.routing_free or self.context_tokens == 1,
                 f"encoder.routing_free=true needs encoder.context_tokens=1 (allowed values: 1; encoder.context_tokens="
                 f"{self.context_tokens}): without routing the green list is keyed by the token before alone")
        if self.semantic_pools is not None:
            implied = "anchors" if self.semantic_pools else "random"
            _require(self.pools in ("anchors", implied),
                     f"encoder.semantic_pools={self.semantic_pools} (deprecated) contradicts encoder.pools={self.pools!r}: set only encoder.pools")
        if vocab_size is not None:
            _require(
                self.pool_size <= vocab_size,
                f"encoder.pool_size={self.pool_size}: allowed range is [1, {vocab_size}] (the vocabulary size)",
            )
        _require(self.calibration_texts >= 2, f"encoder.calibration_texts={self.calibration_texts}: must be >= 2")
        _require(self.whitening_eps > 0, f"encoder.whitening_eps={self.whitening_eps}: must be > 0")


@dataclass
class KGWConfig:
    """KGW's own settings (``watermark.kind=kgw``; its bias is ``watermark.delta``), passed to transformers' ``WatermarkingConfig``."""

    gamma: float = 0.25
    seeding_scheme: str = "lefthash"
    context_width: int = 1

    def validate(self) -> None:
        _require(0 < self.gamma < 1, f"watermark.kgw.gamma={self.gamma}: allowed range is (0, 1)")
        _require(self.seeding_scheme in ("lefthash", "selfhash"),
                 f"watermark.kgw.seeding_scheme={self.seeding_scheme!r}: allowed values are lefthash, selfhash")
        _require(self.context_width >= 1, f"watermark.kgw.context_width={self.context_width}: must be >= 1")


@dataclass
class SynthIDConfig:
    """SynthID's own settings (``watermark.kind=synthid``): n-gram length and tournament depth (its strength)."""

    ngram_len: int = 5
    num_keys: int = 20

    def validate(self) -> None:
        _require(self.ngram_len >= 2, f"watermark.synthid.ngram_len={self.ngram_len}: must be >= 2")
        _require(self.num_keys >= 1, f"watermark.synthid.num_keys={self.num_keys}: must be >= 1")


TOURNAMENT_MAX_BLOCK_BITS = 32  # a layer's block of signature bits is hashed as one 32-bit word
# The most token contexts watermark.tournament.routed_contexts may route (more than the corpora hold routes them all).
MAX_ROUTED_CONTEXTS = 1_000_000


@dataclass
class TournamentConfig:
    """The routing-keyed tournament's own settings (``watermark.kind=moe_tournament``, moewm.engine.tournament).

    ``layers`` tournament layers (its strength: g-values per token); layer l's g-values are keyed by its own
    block of ``block_bits`` routing-signature bits (bits l*b .. l*b+b-1, cyclically), so one flipped bit
    changes only the layers whose block holds it.
    """

    layers: int = 20
    block_bits: int = 8
    # The tokens before the scored one hashed into every layer's context with its routing block (0: routing
    # alone). Two is the design that passed the per-key validity gate (docs/design_search.md): with fewer, the
    # contexts that the texts of one genre share make a fixed key favour or spare the whole genre.
    context_tokens: int = 2
    # SynthID's repeated-context rule: a layer is played only at its context's first occurrence in the text
    # (generation), and detection scores only those. Without it a few block codes recur all through a text,
    # the same tokens win again and again, and text repeats itself (tiny_moe, b = 4: distinct-2 0.74 against 0.94 plain).
    skip_repeated: bool = True
    # Generation plays the tournament exactly on the tokens above sample_tolerance * 2^-layers / V of the usable
    # mass and treats the rest as one tail at g = 1/2, as detection does: the sampled distribution is then within
    # this total variation of the whole-vocabulary tournament (0: only tokens of probability exactly zero are left out).
    sample_tolerance: float = 1e-6

    # How many layers (the first ones) have the routing block in their context; the others are keyed by the
    # tokens before alone. null: all of them. 0 is the design's routing-free twin (SynthID's tournament keyed by
    # the same token context), the ablation every routing design is measured against (routing_free_twin).
    routing_layers: Optional[int] = None
    # Routing only where the token context is common across texts: the routing is read only at positions whose
    # context_tokens tokens before are among this many most frequent contexts of the shipped (not held-out) human
    # corpora under the model's tokenizer, the contexts a text-only attacker sees most; elsewhere the layers are keyed
    # by the tokens alone (robust, and rare enough not to be learnt). null: routing read at every position.
    routed_contexts: Optional[int] = None

    @property
    def routed_layers(self) -> int:
        """How many layers' contexts hold the routing block."""
        return self.layers if self.routing_layers is None else int(self.routing_layers)

    def validate(self, num_bits: Optional[int] = None) -> None:
        _require(1 <= self.layers <= 64, f"watermark.tournament.layers={self.layers}: allowed range is [1, 64]")
        _require(0.0 <= self.sample_tolerance <= 1e-2,
                 f"watermark.tournament.sample_tolerance={self.sample_tolerance}: allowed range is [0, 0.01] (total variation from the exact tournament)")
        if self.routing_layers is not None:
            _require(0 <= self.routing_layers <= self.layers,
                     f"watermark.tournament.routing_layers={self.routing_layers}: allowed range is [0, {self.layers}] "
                     f"(at most watermark.tournament.layers), or null for all")
            _require(self.routing_layers == self.layers or self.context_tokens >= 1,
                     f"watermark.tournament.routing_layers={self.routing_layers} needs watermark.tournament.context_tokens >= 1 "
                     "(a layer keyed by neither routing nor tokens would play one fixed context everywhere)")
        _require(self.context_tokens in (0, 1, 2), f"watermark.tournament.context_tokens={self.context_tokens}: allowed values are 0, 1, 2")
        if self.routed_contexts is not None:
            _require(not isinstance(self.routed_contexts, bool) and isinstance(self.routed_contexts, int)
                     and 1 <= self.routed_contexts <= MAX_ROUTED_CONTEXTS,
                     f"watermark.tournament.routed_contexts={self.routed_contexts!r}: allowed range is [1, {MAX_ROUTED_CONTEXTS}] "
                     "(how many of the most common token contexts read the routing), or null for every position")
            _require(self.context_tokens >= 1,
                     f"watermark.tournament.routed_contexts={self.routed_contexts} needs watermark.tournament.context_tokens >= 1 "
                     "(the contexts it picks are the tokens before)")
            _require(self.routed_layers > 0,
                     f"watermark.tournament.routed_contexts={self.routed_contexts} needs watermark.tournament.routing_layers > 0 "
                     "(no layer reads the routing), or routed_contexts=null")
        top = TOURNAMENT_MAX_BLOCK_BITS if num_bits is None else min(TOURNAMENT_MAX_BLOCK_BITS, num_bits)
        where = "" if num_bits is None else f" (at most encoder.num_bits={num_bits}, and {TOURNAMENT_MAX_BLOCK_BITS})"
        _require(1 <= self.block_bits <= top, f"watermark.tournament.block_bits={self.block_bits}: allowed range is [1, {top}]{where}")


# Flat baseline fields of earlier releases and where they went.
RENAMED_WATERMARK_FIELDS = {
    "kgw_gamma": "kgw.gamma", "kgw_seeding_scheme": "kgw.seeding_scheme", "kgw_context_width": "kgw.context_width",
    "synthid_ngram_len": "synthid.ngram_len", "synthid_num_keys": "synthid.num_keys",
}


@dataclass
class WatermarkConfig:
    """Bias at generation time and the test at detection time.

    ``WatermarkConfig()`` is the shipped design: the routing-keyed tournament (``kind="moe_tournament"``, with
    :class:`TournamentConfig`'s defaults) scored by its own statistic, the design that passed the per-key validity
    gate and sits on the trade-off front (docs/design_search.md). The app's default (``watermark=moe_tournament``)
    and the validity study's default are this object. The green-list design is ``WatermarkConfig(kind="moe_lsh")``.
    """

    kind: str = "moe_tournament"
    delta: float = 2.0
    # The decision: a text is called watermarked when its (valid) p-value is <= alpha.
    alpha: float = 1e-3
    # Reference keys that calibrate MoE-LSH p-values (p >= 1 / (reference_keys + 1)), and the
    # Besag-Clifford stop: a text stops once this many reference keys reach its statistic (null: never).
    reference_keys: int = 999
    stop_after: Optional[int] = 10
    # The statistic ranked against the reference keys: z (model-null z), llr (log-likelihood ratio of
    # a delta-watermark against the model), green (raw green count; the tournament's sum of g-values).
    # null: the scheme's own, the one its validity study measured (the scheme class's default_statistic,
    # resolved by moewm.schemes.base.TextGeneration.resolve_statistic: moe_tournament green, moe_lsh llr).
    statistic: Optional[str] = None
    # The next-token distribution kept per scored token: the top-K usable tokens exactly, the rest as one
    # mass. The diagnostics use all capture_top_k tokens; the calibrated statistic the first
    # statistic_top_k (its cost grows with it, its power barely: docs/statistics.md).
    capture_top_k: int = 256
    statistic_top_k: int = 64
    # Texts longer than the model's context (null: its max_position_embeddings) run in overlapping windows.
    max_context: Optional[int] = None
    context_overlap: int = 128
    # Legacy decision z > z_threshold (normal approximation, no guaranteed false-positive rate); null: off.
    z_threshold: Optional[float] = None
    # Texts with fewer scored tokens get z = NaN and prediction False instead of a number.
    min_tokens: int = 16
    # Score each (green pools, token) pair once per text: a repeat is the same draw again (greedy loops).
    ignore_repeated: bool = True
    # Sliding-window detection over this many scored tokens (None: off); reported as its own statistic.
    window: Optional[int] = None
    detect_batch_size: int = 16
    # Tokens per detection forward (texts x longest row, padding included; None: no limit). Long texts
    # then go in smaller batches: on 2 CPU cores tiny_moe scores 64 x 1k-token texts at half the rate
    # of 4 x 1k (attention and memory-bound ops outgrow the cache), and GPU memory stays bounded.
    detect_max_tokens: Optional[int] = 8192
    # The null's per-token green probability: "model" = the model's own probability mass on the green
    # list (white-box, exact for the model's unwatermarked samples); "uniform" = |G_t| / usable tokens
    # (the classic KGW assumption, biased when pools are not a uniform draw of the vocabulary).
    null: str = "model"
    # Margin-aware detection (MoE-LSH): at each position the margin_bits signature bits whose projection lies
    # nearest its hyperplane are uncertain; the position is also scored under the signature with each such
    # bit flipped, weighted 0.5 * exp(-margin / (margin_scale * the position's median margin)). 0: off.
    margin_bits: int = 0
    margin_scale: float = 0.5
    # Baseline watermarks (kind=kgw / synthid) through transformers' own implementations.
    kgw: KGWConfig = field(default_factory=KGWConfig)
    synthid: SynthIDConfig = field(default_factory=SynthIDConfig)
    # The routing-keyed tournament (kind=moe_tournament): depth and signature bits per layer.
    tournament: TournamentConfig = field(default_factory=TournamentConfig)
    # Renamed: set only to get an error that names the new key (RENAMED_WATERMARK_FIELDS).
    kgw_gamma: Optional[float] = None
    kgw_seeding_scheme: Optional[str] = None
    kgw_context_width: Optional[int] = None
    synthid_ngram_len: Optional[int] = None
    synthid_num_keys: Optional[int] = None

    def validate(self) -> None:
        for old, new in RENAMED_WATERMARK_FIELDS.items():
            _require(getattr(self, old) is None, f"watermark.{old}={getattr(self, old)!r}: renamed; set watermark.{new} instead")
        _require(self.delta >= 0, f"watermark.delta={self.delta}: must be >= 0")
        _require(0 < self.alpha < 1, f"watermark.alpha={self.alpha}: allowed range is (0, 1)")
        _require(1 <= self.reference_keys <= 100_000, f"watermark.reference_keys={self.reference_keys}: allowed range is [1, 100000]")
        if self.stop_after is not None:
            _require(1 <= self.stop_after <= self.reference_keys,
                     f"watermark.stop_after={self.stop_after}: allowed range is [1, {self.reference_keys}] (watermark.reference_keys), or null")
        _require(self.statistic is None or self.statistic in STATISTICS,
                 f"watermark.statistic={self.statistic!r}: allowed values are {STATISTICS}, or null (the scheme's own)")
        _require(self.capture_top_k >= 1, f"watermark.capture_top_k={self.capture_top_k}: must be >= 1")
        _require(1 <= self.statistic_top_k <= self.capture_top_k,
                 f"watermark.statistic_top_k={self.statistic_top_k}: allowed range is [1, {self.capture_top_k}] (watermark.capture_top_k)")
        if self.max_context is not None:
            _require(self.max_context >= 2, f"watermark.max_context={self.max_context}: must be >= 2 (or null for the model's)")
        _require(self.context_overlap >= 64, f"watermark.context_overlap={self.context_overlap}: must be >= 64 (the largest extractor.token_idx lag)")
        if self.max_context is not None:
            _require(self.context_overlap < self.max_context,
                     f"watermark.context_overlap={self.context_overlap}: allowed range is [64, {self.max_context - 1}] (watermark.max_context)")
        _require(self.min_tokens >= 1, f"watermark.min_tokens={self.min_tokens}: must be >= 1")
        if self.window is not None:
            _require(self.window >= 2, f"watermark.window={self.window}: must be >= 2 (or null to turn it off)")
        _require(0 <= self.margin_bits <= 8, f"watermark.margin_bits={self.margin_bits}: allowed range is [0, 8]")
        _require(self.margin_scale > 0, f"watermark.margin_scale={self.margin_scale}: must be > 0")
        _require(self.null in ("model", "uniform"), f"watermark.null={self.null!r}: allowed values are model, uniform")
        _require(self.detect_batch_size >= 1, f"watermark.detect_batch_size={self.detect_batch_size}: must be >= 1")
        if self.detect_max_tokens is not None:
            _require(
                self.detect_max_tokens >= 1, f"watermark.detect_max_tokens={self.detect_max_tokens}: must be >= 1 (or null for no limit)"
            )
        self.kgw.validate()
        self.synthid.validate()
        self.tournament.validate()

    def check_calibrated_alpha(self) -> None:
        """A p-value ranked among R reference keys is at least 1 / (R + 1): alpha below that cannot be reached."""
        floor = 1.0 / (self.reference_keys + 1)
        _require(self.alpha >= floor - 1e-15,
                 f"watermark.alpha={self.alpha}: allowed range is [{floor:.3g}, 1) with watermark.reference_keys={self.reference_keys} "
                 f"(the smallest calibrated p-value is 1 / (reference_keys + 1); raise reference_keys to test a smaller alpha)")


def routing_free_twin(watermark: "WatermarkConfig", encoder: Optional["EncoderConfig"] = None) -> tuple["WatermarkConfig", "EncoderConfig"]:
    """The design with the routing taken out of its key and everything else equal: the ablation of what routing
    adds. For the routing tournament, every layer keyed by its token context alone (``routing_layers=0``: SynthID's
    tournament on the same tokens, through the same capture and calibration); for MoE-LSH with a token context, the
    green list keyed by the token before alone (``encoder.routing_free``; margin-aware detection off, as it reads the
    routing's margins). Returns (watermark, encoder); ``encoder`` defaults to ``EncoderConfig()``."""
    from dataclasses import replace

    encoder = EncoderConfig() if encoder is None else encoder
    if watermark.kind == "moe_tournament":
        if watermark.tournament.context_tokens < 1:
            raise ConfigError("watermark.tournament.context_tokens=0: a tournament keyed by routing alone has no token context "
                              "left for its twin (allowed values for a twin: 1, 2)")
        return replace(watermark, tournament=replace(watermark.tournament, routing_layers=0, routed_contexts=None)), encoder
    if watermark.kind == "moe_lsh":
        if encoder.context_tokens != 1:
            raise ConfigError(f"encoder.context_tokens={encoder.context_tokens}: MoE-LSH keyed by routing alone has no token "
                              "context left for its twin (allowed value for a twin: 1)")
        return replace(watermark, margin_bits=0), replace(encoder, routing_free=True)
    raise ConfigError(f"watermark.kind={watermark.kind!r}: a routing-free twin exists for the routing designs "
                      "(watermark.kind=moe_tournament, moe_lsh); KGW and SynthID hold no routing to take out")


@dataclass
class GenerationConfig:
    """Decoding settings; ``sampling_seed`` is separate from the watermark seed so a key sweep changes only the key."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    batch_size: int = 16
    sampling_seed: int = 1234

    def validate(self) -> None:
        _require(self.max_new_tokens >= 1, f"generation.max_new_tokens={self.max_new_tokens}: must be >= 1")
        _require(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            f"generation.min_new_tokens={self.min_new_tokens}: allowed range is [0, {self.max_new_tokens}]",
        )
        _require(self.temperature > 0, f"generation.temperature={self.temperature}: must be > 0")
        _require(self.top_k >= 0, f"generation.top_k={self.top_k}: must be >= 0 (0 turns it off)")
        _require(0 < self.top_p <= 1, f"generation.top_p={self.top_p}: allowed range is (0, 1]")
        _require(self.repetition_penalty > 0, f"generation.repetition_penalty={self.repetition_penalty}: must be > 0")
        _require(self.batch_size >= 1, f"generation.batch_size={self.batch_size}: must be >= 1")

    @property
    def samples_from_model(self) -> bool:
        """Pure sampling at temperature 1: the only decoding whose text is a draw from the model, which
        is what ``watermark.null=model`` assumes of unwatermarked text."""
        return (
            self.do_sample and self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0 and self.repetition_penalty == 1.0
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        return kwargs


@dataclass
class ModelConfig:
    """Where the model comes from and, for offline builds, its architecture numbers."""

    name: str = "tiny_moe"
    # A hub name, a local directory, or "builtin:tiny_moe" for the model shipped inside the package.
    path: str = "builtin:tiny_moe"
    # True: build the architecture below with random weights (no download); False: from_pretrained(path).
    random_init: bool = False
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    # Whether the model is an MoE model; the router extractor needs one.
    is_moe: bool = True
    # Prompts go through the tokenizer's chat template (instruct / chat checkpoints).
    chat_template: bool = False
    # Architecture numbers of the checkpoint (transformers config fields, model_type included).
    architecture: dict[str, Any] = field(default_factory=dict)
    # Approximate total parameters of the real checkpoint, for sanity checks of the memory estimate.
    total_params: Optional[float] = None

    def validate(self) -> None:
        _require(bool(self.path), "model.path: must name a hub model, a local directory or builtin:tiny_moe")
        _require(
            self.dtype in ("float32", "float16", "bfloat16", "auto"),
            f"model.dtype={self.dtype!r}: allowed values are float32, float16, bfloat16, auto",
        )
        _require(
            not self.random_init or bool(self.architecture),
            f"model.random_init=true needs model.architecture (model {self.name!r} has none)",
        )


QUANTIZATION_KINDS = ("none", "int8", "nf4")
# Who stores and multiplies the quantized weights: bitsandbytes' kernels, moewm's own module
# (moewm/models/quantize.py, the reference), or auto: bitsandbytes where it is installed and works.
QUANTIZATION_BACKENDS = ("auto", "bitsandbytes", "moewm")


@dataclass
class MemoryConfig:
    """A memory profile: precision of the weights and where they may live.

    Profiles that also shrink the experiment (fewer layers, bits, tokens) do so in their YAML file
    by setting other groups' keys; command-line overrides still win.
    """

    name: str = "default"
    quantization: str = "none"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    # Quantize the (fused 3-D) expert weights too, not only nn.Linear layers.
    quantize_experts: bool = True
    backend: str = "auto"
    device_map: Optional[str] = None
    max_memory: dict[str, str] = field(default_factory=dict)
    budget_gib: float = 80.0

    def validate(self) -> None:
        _require(
            self.quantization in QUANTIZATION_KINDS,
            f"memory.quantization={self.quantization!r}: allowed values are {QUANTIZATION_KINDS}",
        )
        _require(
            self.backend in QUANTIZATION_BACKENDS,
            f"memory.backend={self.backend!r}: allowed values are {QUANTIZATION_BACKENDS}",
        )
        _require(
            self.compute_dtype in ("float32", "float16", "bfloat16"),
            f"memory.compute_dtype={self.compute_dtype!r}: allowed values are float32, float16, bfloat16",
        )
        _require(self.budget_gib > 0, f"memory.budget_gib={self.budget_gib}: must be > 0")


@dataclass
class DataConfig:
    """Where prompts come from: the shipped prompts file, a text/JSONL file, or a Hugging Face dataset."""

    source: str = "builtin"  # builtin | file | hf
    path: Optional[str] = None
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    hf_split: str = "train"
    text_field: str = "text"
    num_prompts: int = 32
    max_prompt_tokens: int = 48
    # Texts longer than this are cut to their first words to make a prompt.
    prompt_words: int = 24

    def validate(self) -> None:
        _require(self.source in ("builtin", "file", "hf"), f"data.source={self.source!r}: allowed values are builtin, file, hf")
        _require(self.num_prompts >= 1, f"data.num_prompts={self.num_prompts}: must be >= 1")
        _require(self.max_prompt_tokens >= 1, f"data.max_prompt_tokens={self.max_prompt_tokens}: must be >= 1")
        _require(self.prompt_words >= 1, f"data.prompt_words={self.prompt_words}: must be >= 1")
        if self.source == "file":
            _require(bool(self.path), "data.path: data.source=file needs a path to a text or JSONL file")
        if self.source == "hf":
            _require(bool(self.hf_name), "data.hf_name: data.source=hf needs a dataset name")


@dataclass
class LoggerConfig:
    """Experiment tracking; W&B runs offline unless the user opts in (logger.mode=online or WANDB_MODE)."""

    kind: str = "wandb"  # wandb | none
    project: str = "moewm"
    entity: Optional[str] = None
    mode: Optional[str] = None  # None: $WANDB_MODE if set, else offline
    tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        _require(self.kind in ("wandb", "none"), f"logger.kind={self.kind!r}: allowed values are wandb, none")
        _require(
            self.mode in (None, "offline", "online", "disabled"),
            f"logger.mode={self.mode!r}: allowed values are offline, online, disabled (or null)",
        )


ATTACK_KINDS = ("none", "deletion", "substitution", "insertion", "swap", "truncation", "copy_paste", "paraphrase", "retokenisation")


@dataclass
class AttackConfig:
    """An edit applied to the watermarked text before detection; strength 0 is the identity."""

    name: str = "none"
    strength: float = 0.0
    seed: int = 0
    # Paraphrase attack: None uses the job's own model; otherwise a hub name or local directory.
    paraphrase_model: Optional[str] = None
    paraphrase_max_new_tokens: int = 96
    # copy_paste: how many watermarked spans are embedded in the unwatermarked text (the n of CP-n).
    copy_paste_spans: int = 3

    def validate(self) -> None:
        _require(self.name in ATTACK_KINDS, f"attack.name={self.name!r}: allowed values are {ATTACK_KINDS}")
        _require(self.copy_paste_spans >= 1, f"attack.copy_paste_spans={self.copy_paste_spans}: must be >= 1")
        _require(0.0 <= self.strength <= 1.0, f"attack.strength={self.strength}: allowed range is [0, 1]")
        _require(self.paraphrase_max_new_tokens >= 1,
                 f"attack.paraphrase_max_new_tokens={self.paraphrase_max_new_tokens}: must be >= 1")


ATTACK_DEFAULT_STRENGTH = 0.2  # a spec without ":strength" (the conf/attack files' default)
# Attacks without degrees: any strength > 0 is the whole edit (retokenisation: decode, encode again), so a spec
# without ":strength" means all of it.
ATTACK_DEFAULT_STRENGTHS = {"retokenisation": 1.0}


@dataclass(frozen=True)
class AttackSpec:
    """One entry of ``eval.attacks``."""

    name: str
    strength: float

    @property
    def suffix(self) -> str:
        """``substitution_0p3``: the metric-name suffix of this spec."""
        return f"{self.name}_{format(self.strength, 'g').replace('.', 'p').replace('-', 'm')}"


def parse_attack_spec(spec: str, where: str = "eval.attacks") -> AttackSpec:
    """``"substitution:0.3"`` -> AttackSpec; a ConfigError naming ``where`` and the allowed values otherwise."""
    text = str(spec).strip()
    name, sep, value = text.partition(":")
    name = name.strip()
    allowed = tuple(a for a in ATTACK_KINDS if a != "none")
    if name not in allowed:
        raise ConfigError(f"{where}={text!r}: unknown attack {name!r}; allowed values are {allowed}, written name:strength "
                          f"with strength in [0, 1] (e.g. substitution:0.3)")
    if not sep:
        return AttackSpec(name, ATTACK_DEFAULT_STRENGTHS.get(name, ATTACK_DEFAULT_STRENGTH))
    try:
        strength = float(value)
    except ValueError:
        raise ConfigError(f"{where}={text!r}: strength {value!r} is not a number; allowed range is [0, 1] (e.g. {name}:0.3)") from None
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"{where}={text!r}: strength {strength} out of range; allowed range is [0, 1]")
    return AttackSpec(name, strength)


def parse_attack_specs(specs: Sequence[str]) -> list[AttackSpec]:
    """All specs of ``eval.attacks`` (index in the error), refusing two specs with the same metric suffix."""
    out = [parse_attack_spec(s, f"eval.attacks[{i}]") for i, s in enumerate(specs)]
    suffixes = [a.suffix for a in out]
    dupes = sorted({s for s in suffixes if suffixes.count(s) > 1})
    if dupes:
        raise ConfigError(f"eval.attacks={list(specs)}: {dupes} listed more than once")
    return out


@dataclass
class EvalConfig:
    """Extra measurements of a job: detection vs length, quality, seed-sensitivity geometry."""

    lengths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    quality: bool = True
    # Green-list geometry (moewm.evaluation.geometry): for studies of the green-list design's keys
    # (experiment=seed_sensitivity turns it on); the shipped tournament has no green lists to measure.
    geometry: bool = False
    w1_top_k: int = 50
    w1_contexts: int = 64
    kmeans_clusters: int = 32
    window: int = 32
    # Unwatermarked text scored in every run besides the job's own samples (moewm.evaluation.nulls): greedy and
    # top-p samples of the same prompts, and human-written corpora (null_texts chunks of each).
    null_sets: list[str] = field(default_factory=lambda: ["greedy", "top_p", "human_docstrings", "devils_dictionary", "kjv_narrative"])
    null_texts: int = 64
    # Extra attacks scored in the same job, as name:strength specs (moewm.evaluation.attack_suite), e.g.
    # [substitution:0.1, substitution:0.3]; metrics get the spec as suffix (..._substitution_0p3).
    attacks: list[str] = field(default_factory=list)
    # A model config (conf/model/<name>.yaml) that judges perplexity besides the generator (moewm.evaluation.oracle); null: none.
    oracle_model: Optional[str] = None

    def validate(self) -> None:
        _require(all(n >= 1 for n in self.lengths), f"eval.lengths={list(self.lengths)}: every length must be >= 1")
        _require(self.w1_top_k >= 1, f"eval.w1_top_k={self.w1_top_k}: must be >= 1")
        _require(self.w1_contexts >= 1, f"eval.w1_contexts={self.w1_contexts}: must be >= 1")
        _require(self.kmeans_clusters >= 2, f"eval.kmeans_clusters={self.kmeans_clusters}: must be >= 2")
        _require(self.window >= 2, f"eval.window={self.window}: must be >= 2")
        _require(self.null_texts >= 1, f"eval.null_texts={self.null_texts}: must be >= 1")
        check_null_sets(self.null_sets)
        parse_attack_specs(self.attacks)  # eval.oracle_model is checked against conf/model by the app (moewm.app.schema)
