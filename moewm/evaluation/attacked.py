"""Detection of edited texts, shared by the ``attack=`` group and the attack suite (``eval.attacks``).

An edit is made on token ids (substitution, insertion) or on decoded text (the others); a text the edit left
unchanged keeps its ids and is scored from the capture the job already has, so the model never sees a text
twice. Rates are at the decision threshold alpha; ROC summaries put the attacked texts against every null
text of the job. Every attacked row also gets the survival diagnostics (:mod:`moewm.evaluation.survival`),
from the same two captures per text: the job's original one and the edited text's.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from moewm.config import AttackConfig
from moewm.engine import stats
from moewm.engine.detection import DetectorOutput
from moewm.evaluation.attacks import TOKEN_ATTACKS, apply_attack, attack_token_ids
from moewm.evaluation.survival import survival_metrics
from moewm.schemes.base import Watermarker


def p_scores(p: np.ndarray) -> np.ndarray:
    """Detection scores from p-values for ROC metrics: lower p is more watermarked; no p counts as p = 1."""
    return -np.nan_to_num(np.asarray(p, dtype=np.float64), nan=1.0)


def detected_share(p: Optional[np.ndarray], alpha: float) -> float:
    """Share of texts with p <= alpha (no p: not detected); NaN for no texts."""
    if p is None or len(p) == 0:
        return float("nan")
    return float(np.mean(np.nan_to_num(np.asarray(p, dtype=np.float64), nan=np.inf) <= alpha))


def edited_ids(ctx: Any, attack: AttackConfig, ids: Sequence[Sequence[int]],
               unwatermarked: Optional[list[str]]) -> tuple[list[list[int]], list[bool]]:
    """The attacked token ids of ``ids`` and which texts changed (token attacks edit ids, the others text)."""
    tok = ctx.tokenizer
    ids = [list(x) for x in ids]
    if attack.name in TOKEN_ATTACKS:  # on the ids themselves (retokenisation is the decode / encode round trip)
        att = attack_token_ids(ids, attack, tokenizer=tok, model=ctx.model, seed=attack.seed)
        return att, [list(a) != t for a, t in zip(att, ids)]
    texts = [tok.decode(x, skip_special_tokens=True) for x in ids]
    attacked = apply_attack(texts, attack, tokenizer=tok, model=ctx.model, unwatermarked=unwatermarked, seed=attack.seed)
    changed = [a != t for a, t in zip(attacked, texts)]
    # an unchanged text keeps its original ids (decode / encode need not round-trip exactly)
    return [list(tok(a, add_special_tokens=False)["input_ids"]) if c else ids[i] for i, (a, c) in enumerate(zip(attacked, changed))], changed


def edited_captures(scheme: Watermarker, captures: Sequence[Any], text_ids: Sequence[Sequence[int]], prompt_ids: Sequence[Sequence[int]],
                    changed: Sequence[bool]) -> list[Any]:
    """Captures of edited texts: an unchanged text keeps the capture the job already has, only the changed ones
    are captured (the model never sees a text twice); None for an empty text."""
    caps: list[Any] = list(captures) if len(captures) == len(text_ids) else [None] * len(text_ids)
    redo = [i for i, c in enumerate(changed) if len(text_ids[i]) > 0 and (c or caps[i] is None)]
    if redo:
        for i, cap in zip(redo, scheme.capture([text_ids[i] for i in redo], [prompt_ids[i] for i in redo])):
            caps[i] = cap
    return [c if len(t) > 0 else None for c, t in zip(caps, text_ids)]


def score_captures(scheme: Watermarker, caps: Sequence[Any], window: Optional[int] = None) -> DetectorOutput:
    """Detection of captures (None: an empty text, which gets the empty-text note)."""
    keep = [i for i, c in enumerate(caps) if c is not None]
    if not keep:
        return DetectorOutput.empty(len(caps))
    return DetectorOutput.scatter(len(caps), keep, scheme.score([caps[i] for i in keep], window=window))


def score_edited(scheme: Watermarker, captures: Sequence[Any], text_ids: Sequence[Sequence[int]], prompt_ids: Sequence[Sequence[int]],
                 changed: Sequence[bool], window: Optional[int] = None) -> DetectorOutput:
    """Detection of edited texts from :func:`edited_captures`."""
    return score_captures(scheme, edited_captures(scheme, captures, text_ids, prompt_ids, changed), window=window)


def survival_of(scheme: Watermarker, original: Sequence[Any], edited: Sequence[Any], original_ids: Sequence[Sequence[int]],
                edited_ids_: Sequence[Sequence[int]], suffix: str = "") -> dict[str, Any]:
    """The survival diagnostics (:mod:`moewm.evaluation.survival`) of edited texts against their originals, from
    both texts' captures (those the detections made); texts without an original capture are left out."""
    rows = [i for i, c in enumerate(original) if c is not None]
    if not rows or len(original) != len(edited):
        return {}
    before = scheme.position_contexts([original[i] for i in rows])
    present = [i for i in rows if edited[i] is not None]
    after_of = dict(zip(present, scheme.position_contexts([edited[i] for i in present])))
    return survival_metrics(before, [after_of.get(i) for i in rows], [original_ids[i] for i in rows],
                            [edited_ids_[i] for i in rows], suffix=suffix)


def attacked_detection_metrics(ctx: Any, attack: AttackConfig, window: Optional[int], suffix: str = "") -> dict[str, Any]:
    """``attack`` on the job's watermarked texts, detected: rates at alpha and ROC against every null text."""
    alpha = ctx.cfg.watermark.alpha
    unwm_texts = [ctx.tokenizer.decode(x, skip_special_tokens=True) for x in ctx.plain_ids]
    ids, changed = edited_ids(ctx, attack, ctx.wm_ids, unwm_texts)
    caps = edited_captures(ctx.watermarker, ctx.wm_captures, ids, ctx.prompt_ids, changed)
    det = score_captures(ctx.watermarker, caps, window=window)
    negatives = np.concatenate([ctx.plain_det.p_value] + [d.p_value for d in ctx.null_dets.values()])
    sep = stats.separation(p_scores(det.p_value), p_scores(negatives), threshold=-alpha - 1e-15)
    return {
        f"detection_rate_attacked{suffix}": detected_share(det.p_value, alpha),
        f"auc_attacked{suffix}": sep.auc,
        f"tpr_at_1pct_fpr_attacked{suffix}": sep.tpr_at_1pct_fpr,
        f"window_detection_rate_attacked{suffix}": detected_share(det.window_p_value, alpha),
        f"p_attacked_median{suffix}": float(np.nanmedian(det.p_value)) if np.isfinite(det.p_value).any() else float("nan"),
        f"tokens_attacked_mean{suffix}": float(np.mean([len(x) for x in ids])) if ids else float("nan"),
        f"attacked_changed_fraction{suffix}": float(np.mean(changed)) if changed else float("nan"),
        **survival_of(ctx.watermarker, ctx.wm_captures, caps, ctx.wm_ids, ids, suffix=suffix),
    }


def attacked_null_metrics(ctx: Any, attack: AttackConfig, window: Optional[int], suffix: str = "") -> dict[str, Any]:
    """The same edit on the job's plain texts, detected: an edit made without the key must not look watermarked."""
    ids, changed = edited_ids(ctx, attack, ctx.plain_ids, None)
    det = score_edited(ctx.watermarker, ctx.plain_captures, ids, ctx.prompt_ids, changed, window=window)
    return {f"fpr_attacked{suffix}": detected_share(det.p_value, ctx.cfg.watermark.alpha),
            f"n_attacked_null{suffix}": int(np.isfinite(det.p_value).sum())}
