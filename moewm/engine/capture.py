"""Capture once, score many: one forward per text gives everything any key's detector needs of it.

For every scored token (text tokens after the prompt that are not special, from position ``-token_idx``
on) a capture keeps the routing features that key its green list, the token, the model's next-token
distribution before it (the top-K usable tokens renormalised over usable tokens, plus the mass left
over) and the token's log-probability (for perplexity). None of it depends on a key, so the same
capture is scored under the deployed key, R reference keys, every window and prefix, and every seed of
a sweep; captures of fixed texts are cached per model.

Texts longer than the model's context are run in overlapping windows of the context length: every
position after the first window is taken from a window in which it has at least ``overlap`` tokens
of context, and the capture records how many windows were used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from moewm.engine.generation import check_text_ids, model_vocab_size, usable_tokens
from moewm.engine.padding import pad_id as tokenizer_pad_id
from moewm.engine.padding import pad_rows
from moewm.config import ExtractorConfig, WatermarkConfig
from moewm.engine.lm_head import SplitLMHead, split_lm_head
from moewm.engine.routing import FeatureCapture

log = logging.getLogger(__name__)

CAPTURE_VERSION = 4  # 2: captures keep each scored token's text position; 3: and the token before it; 4: and the one before that


@dataclass
class TextCapture:
    """What scoring needs of one text (CPU tensors; n scored tokens, D feature width, K top tokens)."""

    features: torch.Tensor  # (n, D) float32: the features keying each scored token's green list
    tokens: torch.Tensor  # (n,) long
    top_ids: torch.Tensor  # (n, K) int32
    top_probs: torch.Tensor  # (n, K) float32, renormalised over usable tokens
    tail: torch.Tensor  # (n,) float32: usable mass outside the top K
    logprob: torch.Tensor  # (n,) float32: log p(token | context) under the model's full softmax
    num_text_tokens: int
    windows: int = 1
    positions: Optional[torch.Tensor] = None  # (n,) long: each scored token's index in the text ids (None: cached before it was kept)
    previous: Optional[torch.Tensor] = None  # (n,) long: the token before each scored one (routing + token context)
    earlier: Optional[torch.Tensor] = None  # (n,) long: the token two before (-1 at the text's second token, which has none)

    @property
    def num_scored(self) -> int:
        return int(self.tokens.numel())

    def truncated(self, count: int) -> "TextCapture":
        """The capture of the first ``count`` scored tokens (what a prefix of the text would give)."""
        return TextCapture(self.features[:count], self.tokens[:count], self.top_ids[:count], self.top_probs[:count],
                           self.tail[:count], self.logprob[:count], self.num_text_tokens, self.windows,
                           None if self.positions is None else self.positions[:count],
                           None if self.previous is None else self.previous[:count],
                           None if self.earlier is None else self.earlier[:count])


@dataclass(frozen=True)
class CaptureSettings:
    """How captures are made: they are reusable only between detectors that agree on these."""

    back: int = 1  # -extractor.token_idx
    top_k: int = 256
    max_context: int = 0  # 0: the model's max_position_embeddings
    overlap: int = 128
    batch_size: int = 16
    max_tokens: Optional[int] = 8192


def model_context(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else 1 << 30


def windows_for(length: int, context: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, stop, keep_from) windows covering [0, length): each position is kept from exactly one
    window, where (after the first) it has at least ``overlap`` tokens of context."""
    if length <= context:
        return [(0, length, 0)]
    if not 0 < overlap < context:
        raise ValueError(f"long-text overlap={overlap}: allowed range is [1, {context - 1}] (the model's context)")
    out = []
    start = 0
    while True:
        stop = min(start + context, length)
        out.append((start, stop, 0 if start == 0 else start + overlap))
        if stop == length:
            return out
        start = stop - overlap


def detection_batches(lengths: Sequence[int], max_texts: int, max_tokens: Optional[int]) -> list[tuple[int, int]]:
    """[start, stop) slices of rows sorted longest first, at most ``max_texts`` rows and ``max_tokens``
    padded tokens each (a row longer than that still gets a batch of its own)."""
    out: list[tuple[int, int]] = []
    start = 0
    while start < len(lengths):
        rows = max_texts if max_tokens is None else max(1, min(max_texts, max_tokens // max(1, lengths[start])))
        stop = min(start + rows, len(lengths))
        out.append((start, stop))
        start = stop
    return out


def head_block(vocab_size: int, device: torch.device) -> int:
    """Positions per block of the output head: 16 MiB of float32 logits on GPU; on CPU 2 MiB (cache-sized)
    but at least 256 positions, so that a large head's weight is read a few times per batch and not once
    per 16 positions (full-width qwen_moe head on CPU: capture / forward 2.70 at 16 positions, 1.19 at 256)."""
    if device.type == "cuda":
        return max(16, (1 << 22) // vocab_size)
    return max(256, (1 << 19) // vocab_size)


@torch.no_grad()
def capture_texts(
    model: nn.Module,
    features: FeatureCapture,
    usable: torch.Tensor,
    rows: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    settings: CaptureSettings,
    split: Optional[SplitLMHead] = None,
    pad_id: int = 0,
    progress: bool = False,
) -> list[TextCapture]:
    """One capture per row (prompt + text); the prompt is context, never scored."""
    device = model.get_input_embeddings().weight.device
    context = settings.max_context or model_context(model)
    back = settings.back
    usable_dev = usable.to(device)
    k = min(settings.top_k, int(usable.sum()))
    segments = []  # (row, start, stop, keep_from)
    for i, row in enumerate(rows):
        for start, stop, keep in windows_for(len(row), context, settings.overlap):
            segments.append((i, start, stop, keep))
    order = sorted(range(len(segments)), key=lambda j: -(segments[j][2] - segments[j][1]))
    parts: list[list[tuple[int, dict[str, torch.Tensor]]]] = [[] for _ in rows]
    batches = detection_batches([segments[j][2] - segments[j][1] for j in order], settings.batch_size, settings.max_tokens)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="capture", unit="batch", leave=False)
    features.attach()
    for lo, hi in batches:
        chosen = [segments[j] for j in order[lo:hi]]
        ids, attention = pad_rows([rows[i][start:stop] for i, start, stop, _ in chosen], pad_id)
        width = ids.shape[1]
        # Scored: real tokens past the prompt, the window's overlap and the extractor's lag, that may join a pool.
        start_at = torch.tensor([start for _, start, _, _ in chosen], dtype=torch.long)
        first = torch.tensor([max(keep_from, prompt_lengths[i], back) for i, _, _, keep_from in chosen], dtype=torch.long)
        position = start_at[:, None] + torch.arange(width)[None, :]
        keep = attention.bool() & (position >= first[:, None]) & usable[ids]
        ids_dev, attn_dev = ids.to(device), attention.to(device)
        positions = torch.arange(width, device=device).unsqueeze(0).expand(len(chosen), -1)
        if split is not None:
            source = split.decoder(input_ids=ids_dev, attention_mask=attn_dev, position_ids=positions, use_cache=False).last_hidden_state
        else:
            source = model(input_ids=ids_dev, attention_mask=attn_dev, position_ids=positions, use_cache=False).logits
        feats = features.features(len(chosen))  # (b, width, D)
        features.clear()
        rows_b, cols = torch.nonzero(keep, as_tuple=True)
        rows_d, cols_d = rows_b.to(device), cols.to(device)
        token = ids_dev[rows_d, cols_d]
        previous = ids_dev[rows_d, cols_d - 1]  # scored positions start at >= back >= 1
        # Two before: none at a text's position 1 (a later window's scored columns are >= its overlap >= 64).
        earlier = torch.where(cols_d >= 2, ids_dev[rows_d, (cols_d - 2).clamp(min=0)], torch.full_like(previous, -1))
        feat = feats[rows_d, cols_d - back].float()
        top_ids = torch.empty(rows_b.numel(), k, dtype=torch.int32, device=device)
        top_probs = torch.empty(rows_b.numel(), k, dtype=torch.float32, device=device)
        tail = torch.empty(rows_b.numel(), dtype=torch.float32, device=device)
        logprob = torch.empty(rows_b.numel(), dtype=torch.float32, device=device)
        step = head_block(int(usable.numel()), device)
        # One (block, vocab) float32 buffer for the whole batch, and in-place passes over it: the same
        # operations in the same order (bit-identical results) without allocating, and on a CPU page-faulting,
        # three fresh block-sized tensors per block (full-width qwen_moe, 256 positions x 151,936 tokens:
        # 3.5 s -> 1.7 s of work beside a 19 s head matmul, 1 thread).
        work = torch.empty(min(step, rows_b.numel()), int(usable.numel()), dtype=torch.float32, device=device)
        for s in range(0, rows_b.numel(), step):  # the output head in blocks: no (batch, length, vocab) tensor
            r, c = rows_d[s : s + step], cols_d[s : s + step]
            x = source[r, c - 1]
            logits = (split.logits(x) if split is not None else x).float()
            logp = torch.log_softmax(logits, dim=-1, out=work[: r.numel()])
            del logits
            logprob[s : s + step] = torch.gather(logp, 1, token[s : s + step].unsqueeze(1)).squeeze(1)
            probs = logp.exp_().mul_(usable_dev)  # logp is not needed after the gather above
            probs = probs.div_(probs.sum(-1, keepdim=True).clamp(min=1e-30))
            top = torch.topk(probs, k, dim=-1)
            top_ids[s : s + step] = top.indices.int()
            top_probs[s : s + step] = top.values
            tail[s : s + step] = (1.0 - top.values.sum(-1)).clamp(min=0.0)
        del source, work
        out = dict(features=feat.cpu(), tokens=token.cpu(), top_ids=top_ids.cpu(), top_probs=top_probs.cpu(), tail=tail.cpu(),
                   logprob=logprob.cpu(), previous=previous.cpu(), earlier=earlier.cpu(), positions=cols + torch.tensor([chosen[int(b)][1] for b in rows_b], dtype=torch.long))
        for b, (i, start, _, _) in enumerate(chosen):
            sel = rows_b == b
            parts[i].append((start, {name: value[sel] for name, value in out.items()}))
    captures = []
    for i, row_parts in enumerate(parts):
        row_parts.sort(key=lambda item: item[0])
        merged = {name: torch.cat([p[name] for _, p in row_parts]) for name in row_parts[0][1]} if row_parts else {}
        captures.append(
            TextCapture(
                features=merged["features"],
                tokens=merged["tokens"],
                top_ids=merged["top_ids"],
                top_probs=merged["top_probs"],
                tail=merged["tail"],
                logprob=merged["logprob"],
                num_text_tokens=len(rows[i]) - int(prompt_lengths[i]),
                windows=len(row_parts),
                positions=merged["positions"] - int(prompt_lengths[i]),
                previous=merged["previous"],
                earlier=merged["earlier"],
            )
        )
    return captures


def capture_settings(extractor: ExtractorConfig, watermark: WatermarkConfig) -> CaptureSettings:
    """How the configured detector captures texts (captures are shared only between equal settings)."""
    return CaptureSettings(back=-extractor.token_idx, top_k=watermark.capture_top_k, max_context=watermark.max_context or 0,
                           overlap=watermark.context_overlap, batch_size=watermark.detect_batch_size, max_tokens=watermark.detect_max_tokens)


class TextCapturer:
    """Captures texts for a model and extractor, with no key at all: what a job captures before any key (or
    calibration) exists, and what :class:`moewm.schemes.moe_lsh.MoELSHWatermark` captures through."""

    def __init__(self, model: nn.Module, tokenizer: Any, extractor: ExtractorConfig, settings: CaptureSettings,
                 hooks: Optional[FeatureCapture] = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.hooks = hooks or FeatureCapture(model, extractor)
        self.vocab_size = model_vocab_size(model)
        self.usable = usable_tokens(tokenizer, self.vocab_size)
        self._split: Optional[SplitLMHead] = None
        self._split_checked = False

    def split_head(self) -> Optional[SplitLMHead]:
        """The model's decoder and output head, checked once against its own logits (see moewm.engine.lm_head)."""
        if not self._split_checked:
            self.hooks.detach()
            device = self.model.get_input_embeddings().weight.device
            probe = torch.nonzero(self.usable).flatten()[:8].to(device).unsqueeze(0)
            self._split = split_lm_head(self.model, probe)
            self._split_checked = True
        return self._split

    def close(self) -> None:
        """Take the routing hooks off the model."""
        self.hooks.detach()

    def capture(self, text_ids: Sequence[Sequence[int]], prompt_ids: Sequence[Sequence[int]], progress: bool = False) -> list[TextCapture]:
        """One forward per text (prompt + text; the prompt is context, never scored)."""
        if len(prompt_ids) != len(text_ids):
            raise ValueError(f"prompt_ids: got {len(prompt_ids)} prompts for {len(text_ids)} texts; they must match one to one")
        check_text_ids(text_ids, self.vocab_size)

        rows = [list(p) + list(t) for p, t in zip(prompt_ids, text_ids)]
        split = self.split_head()
        self.hooks.attach()
        return capture_texts(self.model, self.hooks, self.usable, rows, [len(p) for p in prompt_ids], self.settings,
                             split=split, pad_id=tokenizer_pad_id(self.tokenizer), progress=progress)


# -- a cache of captures of fixed texts (the null sets), shared by every job of a sweep ------------
_MEMORY: dict[str, list[TextCapture]] = {}


def capture_cache_key(model_id: str, extractor: Any, settings: CaptureSettings, rows: Sequence[Sequence[int]], prompt_lengths: Sequence[int]) -> str:
    h = hashlib.sha256()
    meta = {"version": CAPTURE_VERSION, "model": model_id, "extractor": repr(extractor), "settings": repr(settings)}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for row, p in zip(rows, prompt_lengths):
        h.update(torch.tensor(list(row) + [-1, int(p)], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:24]


def cached_captures(name: str, cache_dir: Optional[Path], make: Any) -> list[TextCapture]:
    """Captures under ``name`` from memory, then disk, else ``make()`` (and store them)."""
    if name in _MEMORY:
        return _MEMORY[name]
    path = cache_dir / f"capture-{name}.pt" if cache_dir is not None else None
    captures = None
    if path is not None and path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            captures = [TextCapture(**item) for item in blob["captures"]]
        except Exception as err:  # truncated or foreign: recompute
            log.warning("captures: ignoring unreadable cache file %s (%s)", path, err)
    if captures is None:
        captures = make()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save({"captures": [vars(c) for c in captures]}, tmp)
            tmp.replace(path)
    if len(_MEMORY) > 16:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[name] = captures
    return captures
