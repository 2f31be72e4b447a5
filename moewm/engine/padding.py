"""Rows of token ids of different lengths as one batch: the pad id and the padded tensors with their attention mask.

Padded positions are fillers: the attention mask hides them from the real tokens, and every caller
masks or cuts them from what it reads, so the pad id only has to be a valid token id. Generation pads
on the left (the last position is each prompt's last token); one forward over whole texts pads on the
right (position i is token i).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

Side = Literal["left", "right"]


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its eos (what ``model.generate`` falls back to), else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def pad_rows(rows: Sequence[Sequence[int]], pad: int, side: Side = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (len(rows), longest row) int64 on the CPU; the mask is 1 on real tokens.

    ``side="left"`` puts each row at the end (generation), ``"right"`` at the start.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: must be 'left' or 'right'")
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        if n == 0:
            continue
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, span] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
