"""The MoE-LSH watermark: a logits processor that biases the green list, and a one-pass batched detector.

Generation and detection share one green-list function (:class:`moewm.lsh.LSHEncoder` applied to the
features captured by :class:`moewm.routing.FeatureCapture`), so they cannot drift apart: the green list
for the token at position t comes from the features at position ``t + extractor.token_idx``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from moewm import stats
from moewm.config import ConfigError, EncoderConfig, ExtractorConfig, GenerationConfig, WatermarkConfig
from moewm.keys import WatermarkKey
from moewm.lm_head import SplitLMHead, split_lm_head
from moewm.lsh import CalibrationStats, LSHEncoder, build_encoder
from moewm.routing import FeatureCapture

log = logging.getLogger(__name__)

# Fixed (public) coefficients for hashing a signature into one integer; only used to find repeats.
_HASH_COEFFS = torch.randint(
    -(2**62), 2**62, (4096,), generator=torch.Generator().manual_seed(0x5EED), dtype=torch.long
)


@dataclass
class DetectionResult:
    """Detection statistics of one text (names follow transformers' WatermarkDetectorOutput)."""

    num_tokens_scored: int
    num_green_tokens: int
    green_fraction: float
    gamma_mean: float
    z_score: float
    p_value: float
    prediction: bool
    window_z_score: Optional[float] = None
    window_p_value: Optional[float] = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MoEDetectorOutput:
    """Batched detection output: one array entry per text."""

    num_tokens_scored: np.ndarray
    num_green_tokens: np.ndarray
    green_fraction: np.ndarray
    gamma_mean: np.ndarray
    z_score: np.ndarray
    p_value: np.ndarray
    prediction: np.ndarray
    window_z_score: Optional[np.ndarray] = None
    window_p_value: Optional[np.ndarray] = None
    notes: list[str] = field(default_factory=list)

    def results(self) -> list[DetectionResult]:
        out = []
        for i in range(len(self.z_score)):
            out.append(
                DetectionResult(
                    num_tokens_scored=int(self.num_tokens_scored[i]),
                    num_green_tokens=int(self.num_green_tokens[i]),
                    green_fraction=float(self.green_fraction[i]),
                    gamma_mean=float(self.gamma_mean[i]),
                    z_score=float(self.z_score[i]),
                    p_value=float(self.p_value[i]),
                    prediction=bool(self.prediction[i]),
                    window_z_score=None if self.window_z_score is None else float(self.window_z_score[i]),
                    window_p_value=None if self.window_p_value is None else float(self.window_p_value[i]),
                    note=self.notes[i] if self.notes else "",
                )
            )
        return out

    @staticmethod
    def concat(parts: Sequence["MoEDetectorOutput"]) -> "MoEDetectorOutput":
        def cat(name: str) -> Optional[np.ndarray]:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else np.concatenate(values)

        names = ("num_tokens_scored", "num_green_tokens", "green_fraction", "gamma_mean", "z_score", "p_value", "prediction")
        fields: dict[str, Any] = {n: cat(n) for n in names}
        fields["window_z_score"] = cat("window_z_score")
        fields["window_p_value"] = cat("window_p_value")
        fields["notes"] = [note for p in parts for note in p.notes]
        return MoEDetectorOutput(**fields)

    def take(self, order: np.ndarray) -> "MoEDetectorOutput":
        """Rows reordered by ``order`` (used to undo length-sorting)."""
        fields: dict[str, Any] = {}
        for name, value in self.__dict__.items():
            if isinstance(value, np.ndarray):
                fields[name] = value[order]
            elif name == "notes":
                fields[name] = [value[i] for i in order] if value else []
            else:
                fields[name] = value
        return MoEDetectorOutput(**fields)


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


def _first_occurrences(keys: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Mask of scored positions whose key did not occur at an earlier scored position of the same row."""
    sorted_keys, order = torch.sort(keys, dim=-1, stable=True)
    s = torch.gather(scored, -1, order).long()
    new_group = torch.ones_like(sorted_keys, dtype=torch.bool)
    new_group[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    cs = s.cumsum(-1)
    before_total = cs - s
    start = torch.where(new_group, before_total, torch.zeros_like(before_total))
    group_before = before_total - torch.cummax(start, dim=-1).values
    keep_sorted = (s > 0) & (group_before == 0)
    keep = torch.zeros_like(scored)
    keep.scatter_(-1, order, keep_sorted)
    return keep


def _signature_hash(bits: torch.Tensor) -> torch.Tensor:
    coeffs = _HASH_COEFFS[: bits.shape[-1]].to(bits.device)
    return (bits.long() * coeffs).sum(-1)


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
    block), so ``logits_processor`` can also be passed to a plain ``model.generate``.
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
        self.capture = FeatureCapture(model, self.extractor_cfg)
        embeddings = model.get_input_embeddings().weight
        self.encoder = build_encoder(
            self.encoder_cfg,
            self.key,
            self.capture.dim,
            embeddings,
            usable_tokens(tokenizer, self.vocab_size),
            self.vocab_size,
            calibration,
        ).to(embeddings.device)
        self.logits_processor = RoutingWatermarkProcessor(
            self.capture, self.encoder, self.watermark_cfg.delta, self.extractor_cfg.token_idx
        )
        self._split_head: Optional[SplitLMHead] = None
        self._split_head_checked = False

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the hooks from the model."""
        self.capture.detach()

    def __enter__(self) -> "MoELSHWatermark":
        self.capture.attach()
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
        """Score texts (optionally each after its prompt) in batched single forward passes."""
        if prompts is not None and len(prompts) != len(texts):
            raise ValueError(f"prompts: got {len(prompts)} prompts for {len(texts)} texts; they must match one to one")
        text_ids = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"texts[{i}] is empty: detection needs at least one token of text")
            text_ids.append(list(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
        prompt_ids = [self.encode_prompt(prompts[i] if prompts is not None else None) for i in range(len(texts))]
        return self.detect_ids(text_ids, prompt_ids).results()

    def detect_ids(
        self, text_ids: Sequence[Sequence[int]], prompt_ids: Optional[Sequence[Sequence[int]]] = None, progress: bool = False
    ) -> MoEDetectorOutput:
        """Score token sequences; ``prompt_ids`` (context, not scored) may be given per text."""
        if prompt_ids is None:
            prompt_ids = [self.encode_prompt(None) for _ in text_ids]
        rows = [list(p) + list(t) for p, t in zip(prompt_ids, text_ids)]
        for i, t in enumerate(text_ids):
            if len(t) == 0:
                raise ValueError(f"text_ids[{i}] is empty: detection needs at least one token of text")
            if max(t) >= self.vocab_size or min(t) < 0:
                raise ValueError(f"text_ids[{i}]: token ids must lie in [0, {self.vocab_size - 1}]")
        order = np.argsort([-len(r) for r in rows], kind="stable")  # similar lengths share a batch
        cfg = self.watermark_cfg
        batches = detection_batches([len(rows[i]) for i in order], cfg.detect_batch_size, cfg.detect_max_tokens)
        parts = []
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="detect", unit="batch", leave=False)
        for start, stop in batches:
            idx = order[start:stop]
            parts.append(self._score_batch([rows[i] for i in idx], [len(prompt_ids[i]) for i in idx]))
        if not parts:
            return MoEDetectorOutput(*(np.zeros(0) for _ in range(7)))
        return MoEDetectorOutput.concat(parts).take(np.argsort(order, kind="stable"))

    @torch.no_grad()
    def token_scores(self, rows: Sequence[Sequence[int]], prompt_lengths: Sequence[int]) -> dict[str, torch.Tensor]:
        """Per-position green / gamma / scored mask for a batch (one forward pass, right padding)."""
        device = self.device
        batch, length = len(rows), max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((batch, length), pad, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention[i, : len(r)] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
        model_null = self.watermark_cfg.null == "model"
        split = self.split_head() if model_null else None
        back = -self.extractor_cfg.token_idx
        self.capture.attach()
        if split is not None:
            # Decoder only: the output head runs later in blocks, on the scored positions alone.
            source = split.decoder(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False).last_hidden_state
            offset = 0
        else:
            # The model null needs the next-token distribution at t - 1 only for scored t >= max(prompt, back);
            # the uniform null needs no logits at all.
            offset = min(max(min(prompt_lengths), back) - 1, length - 1) if model_null else length - 1
            out = self.model(
                input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False, logits_to_keep=length - offset
            )
            source = out.logits
            del out
        features = self.capture.features(batch)  # (B, L, D)
        self.capture.clear()
        bits = self.encoder.signature(features.to(self.encoder.device))
        shifted = torch.zeros_like(bits)
        shifted[:, back:] = bits[:, :-back]
        prompt_len = torch.tensor(list(prompt_lengths), device=device).unsqueeze(1)
        # Special tokens can never be green and are not text: they are context, not scored trials.
        usable = self.encoder.usable[input_ids]
        scored = (positions >= prompt_len) & (positions >= back) & attention.bool() & usable
        green = self.encoder.is_green(shifted, input_ids) & scored
        if model_null:
            gamma = self.model_green_mass(source, shifted, scored, offset, split)
        else:
            gamma = self.encoder.gamma(shifted)
        del source
        if self.watermark_cfg.ignore_repeated:
            keys = _signature_hash(shifted) * 1_000_003 + input_ids
            scored = _first_occurrences(keys, scored)
        return {"green": green, "gamma": gamma, "scored": scored, "bits": shifted}

    def split_head(self) -> Optional[SplitLMHead]:
        """The model's decoder and output head, checked once against its own logits (see moewm.lm_head)."""
        if not self._split_head_checked:
            self.capture.detach()
            probe = self.encoder.pool_tokens[:8].to(self.device).unsqueeze(0)
            self._split_head = split_lm_head(self.model, probe)
            self._split_head_checked = True
        return self._split_head

    def model_green_mass(
        self,
        source: torch.Tensor,
        bits: torch.Tensor,
        scored: torch.Tensor,
        offset: int = 0,
        split: Optional[SplitLMHead] = None,
    ) -> torch.Tensor:
        """P(token at t is green | context, token is text) under the unwatermarked model, (B, L) float64.

        The distribution for the token at position t is the model's output at t - 1; special tokens are
        never scored, so the mass is renormalised over the usable tokens. ``source[:, p - offset]`` is,
        for model position p, the last hidden state (with ``split``: its head makes the logits here) or
        the logits. Only the ``scored`` positions are computed (others get 0), all rows together, in
        blocks (:func:`green_mass_block`); each position is computed on its own, so the blocking changes
        no value.
        """
        enc = self.encoder
        dev = source.device
        usable = enc.usable.to(device=dev, dtype=torch.float32)
        membership = enc.membership.to(device=dev, dtype=torch.float32)
        pool = enc.pool_tokens.to(dev)
        rows, cols = torch.nonzero(scored[:, 1:].to(dev), as_tuple=True)
        cols = cols + 1  # predicted position t; the model's output for it sits at t - 1
        mass = torch.zeros(bits.shape[:2], dtype=torch.float64, device=dev)
        block = green_mass_block(self.vocab_size, dev)
        for lo in range(0, rows.numel(), block):
            r, t = rows[lo : lo + block], cols[lo : lo + block]
            x = source[r, t - 1 - offset]
            logits = split.logits(x) if split is not None else x
            probs = torch.softmax(logits.float(), dim=-1)
            usable_mass = (probs @ usable).double()
            # green_columns' values as a float 0/1 mask: the count of set pools owning each column, capped at 1.
            green_cols = (bits[r, t].to(device=dev, dtype=torch.float32) @ membership).clamp_(max=1.0)
            # gather (not advanced indexing): the same copy of the pool columns, about twice as fast on CPU.
            green_mass = torch.gather(probs, 1, pool.expand(probs.shape[0], -1)).mul_(green_cols).sum(-1).double()
            mass[r, t] = green_mass / usable_mass.clamp(min=1e-30)
        return mass.clamp(0.0, 1.0)

    def _score_batch(self, rows: list[list[int]], prompt_lengths: list[int]) -> MoEDetectorOutput:
        cfg = self.watermark_cfg
        s = self.token_scores(rows, prompt_lengths)
        z = stats.exact_gamma_z(s["green"], s["gamma"], s["scored"])
        arrays = {k: v.cpu().numpy() for k, v in z.items()}
        n = arrays["num_tokens_scored"]
        short = n < cfg.min_tokens
        arrays["z_score"] = np.where(short, np.nan, arrays["z_score"])
        notes = [f"too few scored tokens ({k} < watermark.min_tokens={cfg.min_tokens})" if sh else "" for k, sh in zip(n, short)]
        p = stats.p_value(arrays["z_score"])
        prediction = np.nan_to_num(arrays["z_score"], nan=-np.inf) > cfg.z_threshold
        wz = wp = None
        if cfg.window is not None:
            best, count = stats.window_z(s["green"], s["gamma"], s["scored"], cfg.window)
            wz = np.where(short, np.nan, best.cpu().numpy())
            wp = stats.bonferroni(stats.p_value(wz), count.cpu().numpy())
        return MoEDetectorOutput(
            num_tokens_scored=n,
            num_green_tokens=arrays["num_green_tokens"],
            green_fraction=arrays["green_fraction"],
            gamma_mean=arrays["gamma_mean"],
            z_score=arrays["z_score"],
            p_value=p,
            prediction=prediction,
            window_z_score=wz,
            window_p_value=wp,
            notes=notes,
        )


def detection_batches(lengths: Sequence[int], max_texts: int, max_tokens: Optional[int]) -> list[tuple[int, int]]:
    """[start, stop) slices of rows sorted longest first: at most ``max_texts`` rows, and at most
    ``max_tokens`` padded tokens (rows x the first, longest, row), except that a row longer than
    ``max_tokens`` still gets a batch of its own."""
    out: list[tuple[int, int]] = []
    start = 0
    while start < len(lengths):
        rows = max_texts if max_tokens is None else max(1, min(max_texts, max_tokens // max(1, lengths[start])))
        stop = min(start + rows, len(lengths))
        out.append((start, stop))
        start = stop
    return out


def green_mass_block(vocab_size: int, device: torch.device) -> int:
    """Positions per block of the model null: about 2 MiB of float32 logits on CPU (cache-sized: whole
    1k-token rows were three times slower) and 16 MiB on GPU (few launches, little memory)."""
    budget = (1 << 22) if device.type == "cuda" else (1 << 19)
    return max(16, budget // vocab_size)


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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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
        width = max(len(p) for p in chunk)
        if width == 0:
            raise ValueError("prompts: a prompt encodes to no tokens (give a non-empty prompt or a tokenizer with a BOS token)")
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            if len(p):
                input_ids[i, width - len(p) :] = torch.tensor(list(p))
                attention[i, width - len(p) :] = 1
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
