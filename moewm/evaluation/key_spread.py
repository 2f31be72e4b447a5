"""Key spread in tokens to detect, per design, and whether the pool design fixes bad keys.

Input: a sweep summary with one row per (design, key): ``encoder_kind``, ``pools`` (optional), ``seed``
and ``tokens_to_detect_alpha_censored`` (median tokens to detect over a key's texts, inf when half of
them are never detected; :mod:`moewm.evaluation.attack_suite`), else ``tokens_to_detect_alpha``.

Per design (encoder kind x pool design): the median key's tokens to detect, the worst-decile key's
(:func:`moewm.evaluation.tradeoff.key_spread`) and their ratio against the target (``TARGET_RATIO``, the trade-off study's target:
the worst-decile key needs at most 1.5x the median key's tokens).

Does the pool design fix bad keys? The key seed draws the hyperplanes and the pools separately, so one
seed under two pool designs has the same hyperplanes. Per encoder kind, the keys in the worst decile
under the seed's design (``anchors``) are followed to every other pool design: their tokens to detect
there over that design's median key, and the Spearman correlation over keys between the designs (near
0: what made a key bad was its pools, which the design replaced; near 1: the badness stays with the key).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from moewm.evaluation.tradeoff import key_spread

TARGET_RATIO = 1.5
BASE_POOLS = "anchors"


def _ttd(df: pd.DataFrame) -> pd.Series:
    c = df["tokens_to_detect_alpha_censored"].astype(float) if "tokens_to_detect_alpha_censored" in df else pd.Series(np.nan, index=df.index)
    if "tokens_to_detect_alpha" in df:
        c = c.where(c.notna(), df["tokens_to_detect_alpha"].astype(float))
    return c


def spread_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (encoder_kind, pools): keys, median / worst-decile tokens to detect, ratio, target met."""
    data = df.assign(ttd=_ttd(df), pools=df["pools"].astype(str) if "pools" in df else "n/a")
    rows = []
    for (enc, pools), sub in data.groupby(["encoder_kind", "pools"], sort=True):
        s = key_spread(sub["ttd"])
        rows.append({"encoder_kind": enc, "pools": pools, **{f"ttd_{k}" if k != "keys" else k: v for k, v in s.items()},
                     "never_detected_mean": float(sub["never_detected_alpha"].astype(float).mean()) if "never_detected_alpha" in sub else np.nan,
                     "target_met": bool(np.isfinite(s["ratio"]) and s["ratio"] <= TARGET_RATIO)})
    return pd.DataFrame(rows)


def bad_key_follow_up(df: pd.DataFrame) -> pd.DataFrame:
    """Per encoder kind and pool design other than ``anchors``: how the anchors design's worst-decile keys fare."""
    if "pools" not in df or BASE_POOLS not in set(df["pools"].astype(str)):
        return pd.DataFrame()
    data = df.assign(ttd=_ttd(df), pools=df["pools"].astype(str))
    rows = []
    for enc, sub in data.groupby("encoder_kind", sort=True):
        wide = sub.pivot_table(index="seed", columns="pools", values="ttd", aggfunc="first")
        if BASE_POOLS not in wide:
            continue
        base = wide[BASE_POOLS]
        cut = np.percentile(base.dropna(), 90, method="higher") if base.notna().any() else np.nan
        bad = base.index[base >= cut]
        for pools in wide.columns:
            if pools == BASE_POOLS:
                continue
            other = wide[pools]
            both = base.notna() & other.notna() & np.isfinite(base) & np.isfinite(other)
            rho = float(spearmanr(base[both], other[both]).statistic) if both.sum() >= 3 else float("nan")
            med = float(np.median(other.dropna())) if other.notna().any() else np.nan
            with np.errstate(invalid="ignore"):  # inf / inf (a design whose median key never detects): NaN
                rows.append({"encoder_kind": enc, "pools": pools, "bad_keys": ",".join(str(int(k)) for k in bad),
                             "bad_keys_ttd_base_over_median": float(np.median(base[bad]) / np.median(base.dropna())),
                             "bad_keys_ttd_over_median": float(np.median(other.reindex(bad)) / med) if med and np.isfinite(med) else np.nan,
                             "spearman_with_base": rho})
    return pd.DataFrame(rows)


def _f(x: Any, d: int = 2) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    if isinstance(x, float) and np.isinf(x):
        return "inf"
    return f"{x:.{d}f}" if isinstance(x, (float, np.floating)) else str(x)


def markdown(spread: pd.DataFrame, follow: pd.DataFrame) -> str:
    """The key-spread and bad-key sections of the seed-sensitivity report (answers computed from the tables)."""
    lines = ["## Key spread in tokens to detect", "",
             f"Per design, the median key's and the worst-decile key's tokens to detect at alpha (a key's value: the median over its "
             f"texts, a never-detected text counting as infinitely long); target: worst decile <= {TARGET_RATIO}x the median.", "",
             "| encoder | pools | keys | median key | worst-decile key | ratio | target met | never detected (mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in spread.iterrows():
        lines.append(f"| {r['encoder_kind']} | {r['pools']} | {int(r['keys'])} | {_f(r['ttd_median'], 1)} | {_f(r['ttd_worst_decile'], 1)} "
                     f"| {_f(r['ttd_ratio'])} | {'yes' if r['target_met'] else 'no'} | {_f(r['never_detected_mean'])} |")
    lines += ["", "## Does the pool design fix bad keys?", ""]
    if not len(follow):
        lines.append(f"Not measurable: the sweep has no `{BASE_POOLS}` design to compare against (sweep encoder.pools).")
        return "\n".join(lines) + "\n"
    lines += [f"The worst-decile keys under `{BASE_POOLS}` (the seed's design), followed to the other pool designs with the same seeds "
              "(same hyperplanes, other pools).", "",
              f"| encoder | pools | bad keys (seeds) | their ttd / median under {BASE_POOLS} | their ttd / median here | Spearman with {BASE_POOLS} |",
              "|---|---|---|---|---|---|"]
    for _, r in follow.iterrows():
        lines.append(f"| {r['encoder_kind']} | {r['pools']} | {r['bad_keys']} | {_f(r['bad_keys_ttd_base_over_median'])} "
                     f"| {_f(r['bad_keys_ttd_over_median'])} | {_f(r['spearman_with_base'])} |")
    lines.append("")
    idx = spread.set_index(["encoder_kind", "pools"])
    for _, r in follow.iterrows():
        key = (r["encoder_kind"], r["pools"])
        base_ratio = idx.loc[(r["encoder_kind"], BASE_POOLS), "ttd_ratio"] if (r["encoder_kind"], BASE_POOLS) in idx.index else np.nan
        ratio = idx.loc[key, "ttd_ratio"] if key in idx.index else np.nan
        meets = bool(np.isfinite(ratio) and ratio <= TARGET_RATIO)
        follow_ratio = r["bad_keys_ttd_over_median"]
        fixes = bool(np.isfinite(follow_ratio) and follow_ratio <= TARGET_RATIO)  # anchors' bad keys are ordinary here
        if np.isfinite(base_ratio) and base_ratio <= TARGET_RATIO:
            verdict = f"{'meets' if meets else 'misses'} the target; `{BASE_POOLS}` has no bad keys to fix here"
        elif fixes and meets:
            verdict = "fixes the bad keys and meets the target"
        elif fixes:
            verdict = "fixes the bad keys of the seed's design, but has bad keys of its own (misses the target)"
        else:
            verdict = "does not fix the bad keys"
        lines.append(f"- `{r['encoder_kind']}`: `{r['pools']}` {verdict} (worst-decile / median {_f(ratio)} vs {_f(base_ratio)} under "
                     f"`{BASE_POOLS}`; the bad `{BASE_POOLS}` keys need {_f(r['bad_keys_ttd_over_median'])}x the median here).")
    return "\n".join(lines) + "\n"
