"""Several attacks in one job (``eval.attacks``), each scored against the job's nulls.

``eval.attacks`` is a list of ``name:strength`` specs (``substitution:0.3``, ``copy_paste:0.75``); a
spec without ``:strength`` takes the strength of the attack's own ``conf/attack`` file default (0.2).
Every spec edits the job's watermarked texts exactly as ``attack=<name> attack.strength=<s>`` would
(same generators, same seed ``attack.seed``), so the single ``attack=`` group and the suite agree.

Metrics, suffixed by the spec (``substitution:0.3`` -> ``_substitution_0p3``):
  detection_rate_attacked, auc_attacked, tpr_at_1pct_fpr_attacked (against every null text of the job),
  p_attacked_median, tokens_attacked_mean, attacked_changed_fraction, and fpr_attacked: the same attack
  applied to the job's plain texts and detected (its own null: an edit made without the key must not
  make text look watermarked). copy_paste has no such null (its input already is plain text) and
  paraphrase skips it (a second paraphrasing pass; the paraphraser never sees the key, so the
  calibrated p-value is valid for its output by construction).
``tokens_to_detect_alpha_censored``: the median over all watermarked texts of the tokens after which p
stays <= alpha, a text never detected counting as infinitely long (inf when half the texts never get
there). Unlike ``tokens_to_detect_alpha`` (median over the texts that get there) it cannot hide a bad
key behind its undetected texts, which is what the key-spread target compares.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from moewm import stats
from moewm.config import ATTACK_KINDS, AttackConfig, ConfigError

DEFAULT_STRENGTH = 0.2
NO_ATTACKED_NULL = ("copy_paste", "paraphrase")


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
        return AttackSpec(name, DEFAULT_STRENGTH)
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


def _attacked_ids(ctx: Any, cfg: AttackConfig, ids: list[list[int]], unwm_texts: list[str] | None) -> tuple[list[list[int]], list[bool]]:
    """The attacked token ids of ``ids`` and which texts changed (token attacks edit ids, the others text)."""
    from moewm.attacks import TOKEN_ATTACKS, apply_attack, attack_token_ids

    tok = ctx.tokenizer
    if cfg.name in TOKEN_ATTACKS:
        att = attack_token_ids(ids, cfg, tokenizer=tok, model=ctx.model, seed=cfg.seed)
        return att, [list(a) != list(t) for a, t in zip(att, ids)]
    texts = [tok.decode(x, skip_special_tokens=True) for x in ids]
    attacked = apply_attack(texts, cfg, tokenizer=tok, model=ctx.model, unwatermarked=unwm_texts, seed=cfg.seed)
    changed = [a != t for a, t in zip(attacked, texts)]
    # an unchanged text keeps its original ids (decode / encode need not round-trip exactly)
    att = [list(tok(a, add_special_tokens=False)["input_ids"]) if c else list(ids[i]) for i, (a, c) in enumerate(zip(attacked, changed))]
    return att, changed


def _rate(p: np.ndarray, alpha: float) -> float:
    return float(np.mean(np.nan_to_num(np.asarray(p, dtype=np.float64), nan=np.inf) <= alpha)) if len(p) else float("nan")


def _scores(p: np.ndarray) -> np.ndarray:
    return -np.nan_to_num(np.asarray(p, dtype=np.float64), nan=1.0)


def suite_metrics(ctx: Any, specs: Sequence[AttackSpec], window: int | None = None) -> dict[str, Any]:
    """Per spec: detection of the attacked watermarked texts, and of the attacked plain texts (its null)."""
    from moewm.detection import detect_nonempty

    if not specs:
        return {}
    t0 = time.perf_counter()
    cfg, wm, tok = ctx.cfg, ctx.watermarker, ctx.tokenizer
    alpha = cfg.watermark.alpha
    negatives = np.concatenate([ctx.plain_det.p_value] + [d.p_value for d in ctx.null_dets.values()])
    unwm_texts = [tok.decode(x, skip_special_tokens=True) for x in ctx.plain_ids]

    def detect(ids: list[list[int]]) -> Any:
        return detect_nonempty(lambda t, p: wm.detect_ids(t, p, window=window), ids, ctx.prompt_ids)

    out: dict[str, Any] = {"attack_suite": ",".join(f"{a.name}:{a.strength:g}" for a in specs)}
    for spec in specs:
        attack = dataclasses.replace(cfg.attack, name=spec.name, strength=spec.strength)
        ids, changed = _attacked_ids(ctx, attack, [list(x) for x in ctx.wm_ids], unwm_texts)
        det = detect(ids)
        sep = stats.separation(_scores(det.p_value), _scores(negatives), threshold=-alpha - 1e-15)
        s = spec.suffix
        out.update({
            f"detection_rate_attacked_{s}": _rate(det.p_value, alpha),
            f"auc_attacked_{s}": sep.auc,
            f"tpr_at_1pct_fpr_attacked_{s}": sep.tpr_at_1pct_fpr,
            f"p_attacked_median_{s}": float(np.nanmedian(det.p_value)) if np.isfinite(det.p_value).any() else float("nan"),
            f"tokens_attacked_mean_{s}": float(np.mean([len(x) for x in ids])) if ids else float("nan"),
            f"attacked_changed_fraction_{s}": float(np.mean(changed)) if changed else float("nan"),
        })
        if spec.name not in NO_ATTACKED_NULL:
            null_ids, _ = _attacked_ids(ctx, attack, [list(x) for x in ctx.plain_ids], None)
            null_det = detect(null_ids)
            out[f"fpr_attacked_{s}"] = _rate(null_det.p_value, alpha)
            out[f"n_attacked_null_{s}"] = int(np.isfinite(null_det.p_value).sum())
    out["attack_suite_seconds"] = time.perf_counter() - t0
    return out


def censored_tokens_to_detect(prefix_p: Sequence[np.ndarray], alpha: float) -> float:
    """Median tokens to detect over all texts, a never-detected text counting as infinitely long."""
    from moewm.length_curve import tokens_to_detect

    t = tokens_to_detect(prefix_p, alpha)
    if not len(t):
        return float("nan")
    return float(np.median(np.where(np.isfinite(t), t, np.inf)))


def scheme_params(cfg: Any) -> dict[str, Any]:
    """The baseline's own strength settings, as metrics (MoE-LSH's are in every job's metrics already)."""
    w = cfg.watermark
    if w.kind == "kgw":
        return {"kgw_gamma": float(w.kgw_gamma), "kgw_seeding_scheme": w.kgw_seeding_scheme, "kgw_context_width": int(w.kgw_context_width)}
    if w.kind == "synthid":
        return {"synthid_num_keys": int(w.synthid_num_keys), "synthid_ngram_len": int(w.synthid_ngram_len)}
    return {}


def tradeoff_job_metrics(ctx: Any, ev: Any) -> dict[str, Any]:
    """What a trade-off study needs of a job beyond the standard metrics: the attack suite, the censored
    tokens-to-detect, the baseline's parameters and the perplexity judge (moewm.oracle)."""
    from moewm.oracle import oracle_metrics

    out: dict[str, Any] = dict(scheme_params(ctx.cfg))
    if ctx.wm_det.prefix_p_value is not None:
        out["tokens_to_detect_alpha_censored"] = censored_tokens_to_detect(ctx.wm_det.prefix_p_value, ctx.cfg.watermark.alpha)
    out.update(suite_metrics(ctx, parse_attack_specs(getattr(ev, "attacks", None) or []), getattr(ev, "window", None)))
    out.update(oracle_metrics(ctx, ev))
    return out
