"""Text quality: perplexity of continuations under an oracle model (batched, one forward per batch)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn


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
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        target = torch.zeros((len(rows), length), dtype=torch.bool)
        for j, (i, r) in enumerate(zip(idx, rows)):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
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


def pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0
