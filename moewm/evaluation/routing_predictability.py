"""How much of the routing key can text alone predict? The secrecy a routing tournament could add, measured.

A routing tournament keys layer l's g-value for token t by (the layer's block of routing-signature bits at the
position before t, the tokens before t). Its twin keys it by the tokens alone. Routing can only make the key harder
to learn from text (watermark stealing) if the block is *not* a function of the tokens an attacker sees: if the
same two tokens before are always followed by the same block code, a text-only attacker's per-context statistics
are exactly as sharp for the routing design as for its twin.

The measure is the collision rate: among pairs of positions that share a context (the c tokens before), the share
whose layer block codes are equal, an unbiased estimate of E[sum_code p(code | context)^2]; beside it the same rate
for pairs of positions drawn at random (sum_code p(code)^2, what routing would give if it were unpredictable) and
for pairs that share no context at all (c = 0). Per layer, averaged over the design's layers. A collision rate of 1
at c tokens means routing is determined by those tokens, and the routing part of the key hides nothing from an
attacker who conditions on them; near the random rate it hides everything.

The block codes are the deployed key's (they depend on the key's hyperplanes), from one capture of the texts.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from moewm.engine.scoring import CaptureBatch, signatures
from moewm.engine.tournament import block_codes, layer_blocks


def collision_rate(context: np.ndarray, codes: np.ndarray) -> float:
    """Among pairs of rows with the same ``context`` (an integer per row), the share with equal ``codes``."""
    frame = pd.DataFrame({"ctx": context, "code": codes})
    per_ctx = frame.groupby("ctx").size().to_numpy(np.float64)
    per_pair = frame.groupby(["ctx", "code"]).size().to_numpy(np.float64)
    pairs = (per_ctx * (per_ctx - 1)).sum()
    return float((per_pair * (per_pair - 1)).sum() / pairs) if pairs > 0 else float("nan")


def context_ids(before: np.ndarray, count: int) -> np.ndarray:
    """One integer per row for its last ``count`` tokens before (0 for none: every row shares the empty context)."""
    if count == 0:
        return np.zeros(len(before), dtype=np.int64)
    cols = before[:, before.shape[1] - count :].astype(np.int64) + 1  # -1 (no token) -> 0
    out = np.zeros(len(before), dtype=np.int64)
    for c in range(count):  # a handful of columns, not a loop over rows
        out = out * 1_000_003 + cols[:, c]
    return out


def block_code_table(wm: Any, captures: Sequence[Any], block_bits: int, layers: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, layers) block codes under the deployed key and (positions, 2) the two tokens before each position,
    for every scored position of ``captures`` (a routing scheme's :meth:`capture` output)."""
    codes, befores = [], []
    blocks = layer_blocks(wm._true_tables.bank.num_bits, layers, block_bits)
    step = max(1, int(wm.watermark_cfg.detect_batch_size))
    for s in range(0, len(captures), step):
        batch = CaptureBatch.stack(list(captures[s : s + step]))
        bits = signatures(batch.features, wm._true_tables.bank)[0]  # (B, n, nb) under the deployed key
        valid = batch.valid
        codes.append(block_codes(bits, blocks)[valid].numpy())
        befores.append(batch.tokens_before(2)[valid].numpy())
    return np.concatenate(codes), np.concatenate(befores)


def predictability(codes: np.ndarray, before: np.ndarray, contexts: Sequence[int] = (0, 1, 2)) -> dict[str, Any]:
    """Collision rates of the block codes (mean over layers) given 0, 1, 2 tokens before, and how many positions and
    repeated contexts they rest on. Rows are positions, ``codes`` (positions, layers), ``before`` (positions, 2)."""
    out: dict[str, Any] = {"positions": int(len(codes)), "layers": int(codes.shape[1])}
    for c in contexts:
        ctx = context_ids(before, c)
        rates = [collision_rate(ctx, codes[:, l]) for l in range(codes.shape[1])]
        _, counts = np.unique(ctx, return_counts=True)
        out[f"collision_ctx{c}"] = float(np.nanmean(rates))
        out[f"repeated_contexts_ctx{c}"] = int((counts > 1).sum())
        out[f"positions_in_repeated_ctx{c}"] = int(counts[counts > 1].sum())
    return out


def study(wm: Any, text_ids: Sequence[Sequence[int]], prompt_ids: Sequence[Sequence[int]], block_bits: Sequence[int] = (1, 2, 4, 8),
          layers: int = 20) -> pd.DataFrame:
    """One row per block size: how predictable each layer's block code is from 0, 1, 2 tokens before."""
    with torch.no_grad():
        captures = wm.capture(text_ids, prompt_ids)
    rows = []
    for b in block_bits:
        codes, before = block_code_table(wm, captures, b, layers)
        rows.append({"block_bits": b, "random_code_rate": 2.0 ** -b, **predictability(codes, before)})
    return pd.DataFrame(rows)
