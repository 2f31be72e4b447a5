"""Text quality: perplexity under an oracle model, and diversity / length statistics.

Diversity (``quality_metrics``), on token ids (or on whitespace-separated words when given strings):

* ``distinct_n`` = |distinct n-grams| / |n-grams| of a text, averaged over texts (n = 1, 2, 3; texts
  shorter than n are left out of that mean);
* ``diversity`` = prod_{n=2..4} (1 - rep_n) with rep_n = 1 - distinct_n: Li et al.'s contrastive-decoding
  diversity, the one Kirchenbauer et al. ("On the Reliability of Watermarks for Large Language Models")
  report as log-diversity; averaged over texts;
* ``log_diversity`` = -log(1 - diversity) of that mean (higher is more diverse). Transforming the mean
  rather than averaging per-text logs keeps one text without any repeated bigram (diversity 1, an
  infinite log) from dominating; the value is capped at -log(1e-12) ~ 27.6.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from moewm.engine.padding import pad_rows


@torch.no_grad()
def perplexity(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    text_ids: Sequence[Sequence[int]],
    batch_size: int = 16,
    pad_token_id: int = 0,
) -> np.ndarray:
    """Perplexity of each text given its prompt (prompt tokens are context, not scored); NaN for empty texts."""
    device = model.get_input_embeddings().weight.device
    result = np.full(len(text_ids), np.nan)
    order = np.argsort([-(len(p) + len(t)) for p, t in zip(prompt_ids, text_ids)], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = [i for i in order[start : start + batch_size] if len(text_ids[i]) > 0]
        if not idx:
            continue
        rows = [list(prompt_ids[i]) + list(text_ids[i]) for i in idx]
        ids, mask = pad_rows(rows, pad_token_id)
        target = torch.zeros(ids.shape, dtype=torch.bool)
        for j, (i, r) in enumerate(zip(idx, rows)):
            target[j, max(len(prompt_ids[i]), 1) : len(r)] = True
        ids, mask, target = ids.to(device), mask.to(device), target.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        token_lp = torch.gather(logprobs, -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        scored = target[:, 1:]
        nll = -(token_lp * scored).sum(-1) / scored.sum(-1).clamp(min=1)
        ppl = torch.exp(nll).cpu().numpy()
        for j, i in enumerate(idx):
            result[i] = ppl[j] if scored[j].any() else np.nan
    return result


LOG_DIVERSITY_CAP = 1e-12


def _units(item: Any) -> np.ndarray:
    if isinstance(item, str):
        words = item.split()
        _, codes = np.unique(np.array(words, dtype=object), return_inverse=True) if words else (None, np.zeros(0, np.int64))
        return np.asarray(codes, dtype=np.int64)
    return np.asarray(list(item), dtype=np.int64)


def distinct_n(units: np.ndarray, n: int) -> float:
    """Share of distinct n-grams among the n-grams of one sequence (NaN when it has none)."""
    if len(units) < n:
        return float("nan")
    grams = np.lib.stride_tricks.sliding_window_view(units, n)
    return float(len(np.unique(grams, axis=0)) / len(grams))


def quality_metrics(
    texts_or_ids: Sequence[Any], distinct_orders: Sequence[int] = (1, 2, 3), diversity_orders: Sequence[int] = (2, 3, 4), suffix: str = ""
) -> dict[str, float]:
    """distinct_n per order, diversity, log_diversity, length_mean / length_std (tokens or words), n_texts.

    ``texts_or_ids``: token-id rows, or strings (split on whitespace). Keys get ``suffix`` appended
    (e.g. ``_wm``). See the module docstring for the definitions.
    """
    seqs = [_units(x) for x in texts_or_ids]
    lengths = np.array([len(s) for s in seqs], dtype=np.float64)
    orders = sorted(set(distinct_orders) | set(diversity_orders))
    table = {n: np.array([distinct_n(s, n) for s in seqs], dtype=np.float64) for n in orders}

    def mean(x: np.ndarray) -> float:
        return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")

    out: dict[str, float] = {f"distinct_{n}{suffix}": mean(table[n]) for n in distinct_orders}
    per_text = np.prod(np.stack([table[n] for n in diversity_orders]), axis=0) if seqs else np.zeros(0)
    diversity = mean(per_text)  # texts too short for the highest order are left out
    out[f"diversity{suffix}"] = diversity
    out[f"log_diversity{suffix}"] = float(-np.log(max(1.0 - diversity, LOG_DIVERSITY_CAP))) if np.isfinite(diversity) else float("nan")
    out[f"length_mean{suffix}"] = float(lengths.mean()) if len(lengths) else float("nan")
    out[f"length_std{suffix}"] = float(lengths.std(ddof=1)) if len(lengths) > 1 else float("nan")
    out[f"n_texts{suffix}"] = int(len(seqs))
    return out
