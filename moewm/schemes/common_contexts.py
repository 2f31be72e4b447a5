"""The token contexts that text shares most (``watermark.tournament.routed_contexts``): where routing is worth its cost.

A text-only attacker learns a token-keyed tournament one context at a time, from how often each token follows it in
watermarked text: the contexts it sees most are the ones it learns, and the rare ones stay unknown to it. Routing in
the key hides a context's g-values but moves under edits. So a design may read the routing only at the common
contexts and key the rare ones by the tokens alone. "Common" has to be public and key-free, the same at generation
and detection: the most frequent contexts of the shipped human corpora that jobs may read
(:data:`moewm.null_corpora.HUMAN_CORPORA`) under the model's own tokenizer; the validity study's held-out corpora stay
unseen by every part of the detector. The table depends on no key, so calibrated p-values stay exact on any text,
these corpora included.
"""

from __future__ import annotations

from typing import Any

import torch

from moewm.engine.tournament import tokens_hash
from moewm.null_corpora import HUMAN_CORPORA, human_texts

# The corpora counted: the ones a job may read, never the validity study's held-out ones.
REFERENCE_CORPORA = HUMAN_CORPORA


def context_counts(tokenizer: Any, context_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every distinct context of ``context_tokens`` tokens in the reference corpora, as :func:`tokens_hash`
    values (int64), with how often it occurs, most frequent first (ties: the smaller hash first)."""
    texts = [text for name in REFERENCE_CORPORA for text in human_texts(name)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    flat = torch.tensor([t for row in ids for t in row], dtype=torch.long)
    text_of = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(row) for row in ids]))
    if flat.numel() < context_tokens:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    windows = flat.unfold(0, context_tokens, 1)  # (N - c + 1, c): every run of c tokens, oldest first
    inside = text_of[: windows.shape[0]] == text_of[context_tokens - 1 :]  # not across two texts
    hashes, counts = torch.unique(tokens_hash(windows[inside]), return_counts=True)  # sorted by hash
    order = torch.sort(counts, descending=True, stable=True).indices  # ties keep the hash order
    return hashes[order], counts[order]


def common_contexts(tokenizer: Any, context_tokens: int, count: int) -> torch.Tensor:
    """The sorted :func:`tokens_hash` values of the ``count`` most frequent contexts (all of them if fewer)."""
    hashes, _ = context_counts(tokenizer, context_tokens)
    return torch.sort(hashes[:count]).values
