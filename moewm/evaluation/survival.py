"""Survival diagnostics: what of a text's watermark evidence survives an edit, position by position.

An edit (:mod:`moewm.evaluation.attacks`) changes some tokens; the others keep their ids. Whether a kept
token stays green depends on what keys its green list: for MoE-LSH the routing signature of the position,
which reads the whole prefix, so an edit can change it many tokens later; for KGW and SynthID the n-gram
context, which changes only within ``context_width`` (``ngram_len - 1``) tokens of the edit. These
diagnostics measure that, from the captures the attacked detection already made (no forward of their own):
each scheme tells, per scored position, its context, green-list key, green draws and evidence
(:meth:`moewm.schemes.base.Watermarker.position_contexts`), and this module aligns the two texts and compares.

**Alignment.** The token ids of the original and the edited text are aligned by ``difflib.SequenceMatcher``
(``autojunk=False``: no token is treated as junk), whose matching blocks are the longest common runs, found
recursively. A position *survived* the edit when its token is in a matching block and so is its previous
token, in the same block (the first token also when both texts start with it): only there can the context be
compared at all. It runs once per edited text (tens of tokens), never per key; everything after the
alignment is numpy over positions.

**Distance from the edit** (in the edited text): ``d = j - b + 1`` for a survived position j, where b is the
last position before j that did not survive (an edited token, the token after a deletion gap or after an
edited token). The first survivor after any edit has d = 2, since the token right after an edit has the
edited token before it; positions before the first edit are "before" (a causal model leaves them exactly as
they were, so their identity is a check of the capture: 1.0).

Metrics (suffixed like the attacked detection's, ``_substitution_0p3``; the ``attack=`` group has none; a share
with nothing to count, e.g. an empty distance bucket, is left out rather than written as NaN):
  survival_positions: share of the original's scored positions that survived (and are scored in both texts)
  survival_signature: share of survived positions whose context is unchanged (MoE-LSH: all signature bits;
    KGW / SynthID: the n-gram context, unchanged by construction once token and previous token survived,
    except for context_width / ngram_len beyond 2)
  survival_greenlist: share whose green list's key is unchanged (MoE-LSH: the green pools)
  survival_bitflip: per-bit flip rate of the signature at survived positions (MoE-LSH only)
  survival_green: share of green draws at survived positions still green after the edit
  survival_signature_dist<bucket>: survival_signature by distance from the edit (2, 3to4, 5to8, 9to16, 17up,
    before = no edit before the position), with survival_count_dist<bucket> survived positions in each
  evidence_per_token_attacked (suffixed), evidence_per_token_clean: mean evidence per scored token of the edited
    and the original texts (standardised green excess, z units: a text's z is about sqrt(tokens) times it)
  evidence_aligned_clean / evidence_aligned_attacked (suffixed): the same at survived positions, before and after
  evidence_changed_clean / evidence_changed_attacked (suffixed): the same at survived positions whose context
    changed. A watermark keyed by its context keeps nothing there (its expected value is 0 under a fresh green
    list); evidence that survives a changed context is tied to the token itself, not to its context
"""

from __future__ import annotations

from difflib import SequenceMatcher
from typing import Any, Optional, Sequence

import numpy as np

from moewm.engine.positions import PositionContexts

DISTANCE_BUCKETS = (("2", 2, 2), ("3to4", 3, 4), ("5to8", 5, 8), ("9to16", 9, 16), ("17up", 17, 1e18))


def survived_pairs(original: Sequence[int], edited: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) index arrays of tokens that survived: original[i] == edited[j] in one matching block of
    difflib's SequenceMatcher, with the previous token in the same block (or i == j == 0)."""
    blocks = [b for b in SequenceMatcher(None, list(original), list(edited), autojunk=False).get_matching_blocks() if b.size]
    if not blocks:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    a, b, size = (np.array(x, dtype=np.int64) for x in zip(*[(blk.a, blk.b, blk.size) for blk in blocks]))
    offset = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
    i, j = np.repeat(a, size) + offset, np.repeat(b, size) + offset
    keep = (offset > 0) | ((i == 0) & (j == 0))
    return i[keep], j[keep]


def edit_distance(survived_j: np.ndarray, length: int) -> np.ndarray:
    """For survived positions ``survived_j`` of an edited text of ``length`` tokens: j - b + 1 with b the last
    position before j that did not survive (inf when every position before j survived)."""
    ok = np.zeros(length, dtype=bool)
    ok[survived_j] = True
    idx = np.arange(length)
    last_bad = np.maximum.accumulate(np.where(~ok, idx, -1)) if length else np.zeros(0, dtype=np.int64)
    b = last_bad[survived_j]
    return np.where(b >= 0, survived_j - b + 1, np.inf).astype(np.float64)


def _rows(ctx: PositionContexts, length: int) -> np.ndarray:
    """Text position -> row of ``ctx`` (-1 where the position is not scored)."""
    out = np.full(max(length, int(ctx.positions.max(initial=-1)) + 1), -1, dtype=np.int64)
    out[ctx.positions] = np.arange(len(ctx))
    return out


def survival_metrics(original: Sequence[PositionContexts], edited: Sequence[Optional[PositionContexts]],
                     original_ids: Sequence[Sequence[int]], edited_ids: Sequence[Sequence[int]], suffix: str = "") -> dict[str, Any]:
    """The survival diagnostics (module docstring), pooled over texts: counts are summed over all texts
    before any share is taken. ``edited[i]`` None: the edit left no text to score (it counts as lost)."""
    n_orig = n_surv = same_ctx = same_list = flips = bits = green_before = green_kept = 0
    ev_clean: list[np.ndarray] = []
    ev_att: list[np.ndarray] = []
    ev_al_clean: list[np.ndarray] = []
    ev_al_att: list[np.ndarray] = []
    ev_ch_clean: list[np.ndarray] = []
    ev_ch_att: list[np.ndarray] = []
    dist_all: list[np.ndarray] = []
    same_all: list[np.ndarray] = []
    has_bits = any(o.bits for o in original)
    for o, e, oi, ei in zip(original, edited, original_ids, edited_ids):
        n_orig += len(o)
        ev_clean.append(o.evidence[o.scored])
        if e is None or not len(o) or not len(e):
            if e is not None:
                ev_att.append(e.evidence[e.scored])
            continue
        ev_att.append(e.evidence[e.scored])
        i, j = survived_pairs(oi, ei)
        ro, re_ = _rows(o, len(oi))[i], _rows(e, len(ei))[j]
        both = (ro >= 0) & (re_ >= 0)
        ro, re_, j = ro[both], re_[both], j[both]
        n_surv += len(ro)
        same = (o.context[ro] == e.context[re_]).all(-1) if o.context.shape[-1] else np.ones(len(ro), dtype=bool)
        same_ctx += int(same.sum())
        same_list += int((o.green_list[ro] == e.green_list[re_]).all(-1).sum()) if o.green_list.shape[-1] else len(ro)
        if o.bits:
            flips += int((o.context[ro] != e.context[re_]).sum())
            bits += int(o.context[ro].size)
        g0, g1 = o.green[ro], e.green[re_]
        green_before += int(g0.sum())
        green_kept += int((g0 & g1).sum())
        scored = o.scored[ro] & e.scored[re_]
        ev_al_clean.append(o.evidence[ro][scored])
        ev_al_att.append(e.evidence[re_][scored])
        ev_ch_clean.append(o.evidence[ro][scored & ~same])
        ev_ch_att.append(e.evidence[re_][scored & ~same])
        dist_all.append(edit_distance(j, len(ei)))
        same_all.append(same)

    def share(num: float, den: float) -> float:
        return float(num) / den if den else float("nan")

    def mean(parts: list[np.ndarray]) -> float:
        x = np.concatenate(parts) if parts else np.zeros(0)
        return float(x.mean()) if len(x) else float("nan")

    out: dict[str, Any] = {
        f"survival_positions{suffix}": share(n_surv, n_orig),
        f"survival_signature{suffix}": share(same_ctx, n_surv),
        f"survival_greenlist{suffix}": share(same_list, n_surv),
        f"survival_green{suffix}": share(green_kept, green_before),
        f"evidence_per_token_attacked{suffix}": mean(ev_att),
        f"evidence_aligned_clean{suffix}": mean(ev_al_clean),
        f"evidence_aligned_attacked{suffix}": mean(ev_al_att),
        f"evidence_changed_clean{suffix}": mean(ev_ch_clean),
        f"evidence_changed_attacked{suffix}": mean(ev_ch_att),
        "evidence_per_token_clean": mean(ev_clean),
    }
    if has_bits:
        out[f"survival_bitflip{suffix}"] = share(flips, bits)
    d = np.concatenate(dist_all) if dist_all else np.zeros(0)
    s = np.concatenate(same_all) if same_all else np.zeros(0, dtype=bool)
    for name, lo, hi in DISTANCE_BUCKETS + (("before", np.inf, np.inf),):
        inside = (d >= lo) & (d <= hi)
        out[f"survival_signature_dist{name}{suffix}"] = float(s[inside].mean()) if inside.any() else float("nan")
        out[f"survival_count_dist{name}{suffix}"] = int(inside.sum())
    return {k: v for k, v in out.items() if not (isinstance(v, float) and np.isnan(v))}  # nothing to count: no key
