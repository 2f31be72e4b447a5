"""Seed-sensitivity report of a sweep: how much does a watermark depend on its key seed, and why?

Input: the sweep's summary (one row per job) with columns ``seed``, ``encoder_kind``,
``detection_rate``, ``auc``, ``ppl_wm_mean``, ``status`` and the ``geo_*`` metrics of
:mod:`moewm.evaluation.geometry`. Rows whose ``status`` is not a success (``OK_STATUSES``) are left out.

Per encoder variant: mean, std and worst decile across seeds (10th percentile of detection rate and
AUC, 90th percentile of perplexity), and the Spearman rank correlation of every geometric metric with
detection rate across seeds, within the encoder and pooled over all encoders. The best predictor of a
bad seed is the metric with the largest mean absolute within-encoder correlation (weighted by the
number of seeds): within-encoder, because a pooled correlation can merely tell encoders apart. Being the
best of many metrics, its pooled p-value is also reported Holm-adjusted over all of them (table, verdict
and figure), with the number of jobs it rests on.

When the sweep varied ``pools`` too, a design is ``encoder_kind/pools``. With tokens-to-detect columns
the report adds the key spread per design and whether the pool design fixes bad keys
(:mod:`moewm.evaluation.key_spread`, also written as ``key_spread.csv``).

Writes ``seed_sensitivity.csv`` (the returned table), ``seed_sensitivity.md`` (the answers, computed
from the numbers) and PNG plots (``detection_rate_by_seed.png``, ``ppl_by_seed.png``,
``best_predictor.png``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

log = logging.getLogger(__name__)

OK_STATUSES = {"ok", "success", "succeeded", "completed", "complete", "done", "finished"}
WEAK_RHO = 0.3
SIGNIFICANT = 0.05  # family-wise level of the best-predictor verdict (Holm over every geo_* metric)


def _spearman(x: pd.Series, y: pd.Series) -> tuple[float, float]:
    ok = x.notna() & y.notna()
    x, y = x[ok].astype(float), y[ok].astype(float)
    if len(x) < 3 or x.nunique() < 2 or y.nunique() < 2:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (family-wise error over every metric looked at; NaN stays NaN and is not counted)."""
    finite = sorted((p, k) for k, p in pvalues.items() if np.isfinite(p))
    m = len(finite)
    out = {k: float("nan") for k in pvalues}
    running = 0.0
    for i, (p, k) in enumerate(finite):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def _q(x: pd.Series, q: float) -> float:
    v = x.dropna().astype(float)
    return float(np.percentile(v, q)) if len(v) else float("nan")


def _spread(sub: pd.DataFrame) -> dict[str, float]:
    row: dict[str, float] = {"n_seeds": int(sub["seed"].nunique())}
    for col, worst in (("detection_rate", 10), ("auc", 10), ("ppl_wm_mean", 90)):
        if col not in sub:
            continue
        v = sub[col].astype(float)
        row[f"{col}_mean"] = float(v.mean())
        row[f"{col}_std"] = float(v.std(ddof=1)) if v.notna().sum() > 1 else float("nan")
        row[f"{col}_p{worst}"] = _q(v, worst)
    return row


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _fmt_p(p: float) -> str:
    return "n/a" if p is None or not np.isfinite(p) else f"{p:.2g}"


def _smallest(table: pd.DataFrame, std_col: str, tie_col: str, tie_ascending: bool) -> Optional[tuple[str, pd.DataFrame]]:
    if std_col not in table or table[std_col].notna().sum() == 0:
        return None
    ranked = table[table[std_col].notna()].sort_values([std_col, tie_col], ascending=[True, tie_ascending])
    return str(ranked.index[0]), ranked


def seed_sensitivity_report(df: pd.DataFrame, out_dir: str | Path) -> pd.DataFrame:
    """Per-encoder spread across seeds and geometry/detection rank correlations; writes csv, md and plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = {"seed", "encoder_kind", "detection_rate"} - set(df.columns)
    if missing:
        raise ValueError(f"seed_sensitivity_report: the summary lacks column(s) {sorted(missing)}")
    total = len(df)
    data = df
    if "status" in df:
        data = df[df["status"].astype(str).str.lower().isin(OK_STATUSES)]
    data = data[data["detection_rate"].notna()].copy()
    excluded = total - len(data)
    by_key = data.copy()  # encoder_kind and pools apart, for the key-spread section (moewm.evaluation.key_spread)
    if "pools" in data and data["pools"].astype(str).nunique() > 1:  # pool designs swept too: a design is encoder/pools
        data["encoder_kind"] = data["encoder_kind"].astype(str) + "/" + data["pools"].astype(str)
    geo_cols = [c for c in data.columns if c.startswith("geo_") and pd.api.types.is_numeric_dtype(data[c])]
    encoders = sorted(data["encoder_kind"].astype(str).unique())
    data["encoder_kind"] = data["encoder_kind"].astype(str)

    rows: dict[str, dict[str, float]] = {}
    for enc in encoders:
        sub = data[data["encoder_kind"] == enc]
        row = _spread(sub)
        for g in geo_cols:
            row[f"spearman_{g}"] = _spearman(sub[g], sub["detection_rate"])[0]
        rows[enc] = row
    pooled = _spread(data) if len(data) else {"n_seeds": 0}
    pvalues: dict[str, float] = {}
    for g in geo_cols:
        pooled[f"spearman_{g}"], pvalues[g] = _spearman(data[g], data["detection_rate"])
    rows["pooled"] = pooled
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "encoder_kind"
    table.to_csv(out_dir / "seed_sensitivity.csv")

    # -- predictors: weighted mean |within-encoder rho| ----------------------------------------
    ranking = []
    per_enc = table.drop(index="pooled")
    for g in geo_cols:
        rho = per_enc[f"spearman_{g}"]
        ok = rho.notna()
        if ok.any():
            w = per_enc.loc[ok, "n_seeds"].astype(float)
            mean_abs = float(np.average(rho[ok].abs(), weights=w))
            mean_signed = float(np.average(rho[ok], weights=w))
        else:
            mean_abs = mean_signed = float("nan")
        ranking.append((g, mean_abs, mean_signed, float(table.loc["pooled", f"spearman_{g}"]), pvalues.get(g, float("nan"))))
    adjusted = holm(pvalues)  # the best of m metrics: its p-value is corrected for having looked at all m
    ranking = [(*r, adjusted.get(r[0], float("nan"))) for r in ranking]
    ranking.sort(key=lambda r: (-(r[1] if np.isfinite(r[1]) else -1), -(abs(r[3]) if np.isfinite(r[3]) else -1)))
    best = ranking[0] if ranking and (np.isfinite(ranking[0][1]) or np.isfinite(ranking[0][3])) else None

    md = _markdown(table, per_enc, ranking, best, total, excluded, encoders)
    if "tokens_to_detect_alpha" in by_key or "tokens_to_detect_alpha_censored" in by_key:
        from moewm.evaluation import key_spread

        spread, follow = key_spread.spread_table(by_key), key_spread.bad_key_follow_up(by_key)
        spread.to_csv(out_dir / "key_spread.csv", index=False)
        md += "\n" + key_spread.markdown(spread, follow)
    (out_dir / "seed_sensitivity.md").write_text(md)
    _plots(data, encoders, best, len(ranking), out_dir)
    return table


def _markdown(table: pd.DataFrame, per_enc: pd.DataFrame, ranking: list, best: Any, total: int, excluded: int, encoders: list[str]) -> str:
    lines = ["# Seed sensitivity", ""]
    lines.append(f"{total} jobs in the summary, {total - excluded} successful ones used ({excluded} left out: failed or without a detection rate); "
                 f"encoders: {', '.join(f'`{e}`' for e in encoders) or 'none'}.")
    lines += ["", "## Spread across seeds", ""]
    lines.append("| encoder | seeds | detection rate mean ± std | worst decile (p10) | AUC mean ± std | AUC p10 | ppl mean ± std | ppl p90 |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for enc, r in table.iterrows():
        lines.append(
            f"| {enc} | {int(r['n_seeds'])} | {_fmt(r.get('detection_rate_mean'))} ± {_fmt(r.get('detection_rate_std'))} | {_fmt(r.get('detection_rate_p10'))} "
            f"| {_fmt(r.get('auc_mean', np.nan))} ± {_fmt(r.get('auc_std', np.nan))} | {_fmt(r.get('auc_p10', np.nan))} "
            f"| {_fmt(r.get('ppl_wm_mean_mean', np.nan), 2)} ± {_fmt(r.get('ppl_wm_mean_std', np.nan), 2)} | {_fmt(r.get('ppl_wm_mean_p90', np.nan), 2)} |"
        )
    lines.append("")
    det = _smallest(per_enc, "detection_rate_std", "detection_rate_p10", False)
    if det is None:
        lines.append("**Smallest seed-to-seed spread in detection rate:** not measurable (fewer than two seeds per encoder).")
    else:
        name, ranked = det
        others = ", ".join(f"`{e}` {_fmt(v)}" for e, v in ranked["detection_rate_std"].iloc[1:].items())
        tie = (ranked["detection_rate_std"] == ranked["detection_rate_std"].iloc[0]).sum() > 1
        lines.append(
            f"**Smallest seed-to-seed spread in detection rate:** `{name}` (std {_fmt(ranked['detection_rate_std'].iloc[0])} across "
            f"{int(ranked['n_seeds'].iloc[0])} seeds, worst decile {_fmt(ranked['detection_rate_p10'].iloc[0])}"
            + (f"; others: {others}" if others else "") + ")"
            + (" — tied on std, broken by the higher worst decile." if tie else ".")
        )
    ppl = _smallest(per_enc, "ppl_wm_mean_std", "ppl_wm_mean_p90", True) if "ppl_wm_mean_std" in per_enc else None
    if ppl is None:
        lines.append("**Smallest seed-to-seed spread in perplexity:** not measurable (no perplexity, or fewer than two seeds per encoder).")
    else:
        name, ranked = ppl
        others = ", ".join(f"`{e}` {_fmt(v, 2)}" for e, v in ranked["ppl_wm_mean_std"].iloc[1:].items())
        lines.append(
            f"**Smallest seed-to-seed spread in perplexity:** `{name}` (std {_fmt(ranked['ppl_wm_mean_std'].iloc[0], 2)}, "
            f"worst decile (p90) {_fmt(ranked['ppl_wm_mean_p90'].iloc[0], 2)}" + (f"; others: {others}" if others else "") + ")."
        )
    lines += ["", "## Which geometric metric predicts a bad seed", ""]
    if not ranking:
        lines.append("No `geo_*` metrics in the summary (run with eval.geometry=true and an MoE-LSH watermark).")
        return "\n".join(lines) + "\n"
    lines.append(f"Spearman rank correlation with detection rate across seeds; within-encoder mean weighted by seeds. "
                 f"n = {int(table.loc['pooled', 'n_seeds']) if 'pooled' in table.index else 0} seeds, {total - excluded} jobs; "
                 f"{len(ranking)} metrics looked at, so each pooled p is also given Holm-adjusted over all {len(ranking)}.")
    lines.append("")
    lines.append("| metric | within-encoder mean \\|rho\\| | within-encoder mean rho | " + " | ".join(f"rho `{e}`" for e in per_enc.index)
                 + " | pooled rho | pooled p | pooled p, Holm |")
    lines.append("|---|---|---|" + "---|" * len(per_enc.index) + "---|---|---|")
    for g, mabs, msgn, prho, pp, padj in ranking:
        per = " | ".join(_fmt(per_enc.loc[e, f"spearman_{g}"], 2) for e in per_enc.index)
        lines.append(f"| {g} | {_fmt(mabs, 2)} | {_fmt(msgn, 2)} | {per} | {_fmt(prho, 2)} | {_fmt_p(pp)} | {_fmt_p(padj)} |")
    lines.append("")
    if best is None:
        lines.append("**Best predictor of a bad seed:** none can be computed (constant metrics or fewer than three seeds).")
    else:
        g, mabs, msgn, prho, pp, padj = best
        strength = mabs if np.isfinite(mabs) else abs(prho)
        direction = "higher values go with better detection, so a low value flags a bad seed" if (msgn if np.isfinite(msgn) else prho) > 0 else \
            "lower values go with better detection, so a high value flags a bad seed"
        verdict = (f"**Best predictor of a bad seed:** `{g}` (within-encoder mean |rho| = {_fmt(mabs, 2)}, pooled rho = {_fmt(prho, 2)}, "
                   f"p = {_fmt_p(pp)}, Holm-adjusted over {len(ranking)} metrics p = {_fmt_p(padj)}); {direction}.")
        if strength < WEAK_RHO:
            verdict += f" It is weak (|rho| < {WEAK_RHO}): no geometric metric predicts a bad seed reliably here."
        if not (np.isfinite(padj) and padj <= SIGNIFICANT):
            verdict += (f" After correcting for the {len(ranking)} metrics looked at it is not significant (adjusted p > {SIGNIFICANT:g}): "
                        "the best of many can correlate by chance.")
        lines.append(verdict)
    return "\n".join(lines) + "\n"


def _plots(data: pd.DataFrame, encoders: list[str], best_row: Optional[tuple], metrics: int, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    for col, name, label in (("detection_rate", "detection_rate_by_seed.png", "detection rate"), ("ppl_wm_mean", "ppl_by_seed.png", "perplexity (watermarked)")):
        if col not in data or not encoders:
            continue
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(encoders), 3.6))
        values = [data.loc[data["encoder_kind"] == e, col].dropna().astype(float).to_numpy() for e in encoders]
        ax.boxplot(values, showfliers=False)
        ax.set_xticks(range(1, len(encoders) + 1), encoders)
        for j, v in enumerate(values):
            ax.scatter(j + 1 + rng.uniform(-0.12, 0.12, len(v)), v, s=14, alpha=0.8, zorder=3)
        ax.set_ylabel(label)
        ax.set_title(f"{label} per seed")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
    if best_row is not None:
        best, mabs, _, prho, pp, padj = best_row
        fig, ax = plt.subplots(figsize=(5.6, 4.4))
        n = int((data[best].notna() & data["detection_rate"].notna()).sum())
        for e in encoders:
            sub = data[data["encoder_kind"] == e]
            ax.scatter(sub[best].astype(float), sub["detection_rate"].astype(float), s=16, label=e, alpha=0.8)
        ax.set_xlabel(best)
        ax.set_ylabel("detection rate")
        significant = np.isfinite(padj) and padj <= SIGNIFICANT
        ax.set_title(f"best of {metrics} metrics: {best}\n"
                     f"n = {n} jobs; within-encoder mean |rho| {_fmt(mabs, 2)}, pooled rho {_fmt(prho, 2)}\n"
                     f"p {_fmt_p(pp)}; Holm-adjusted over {metrics}: {_fmt_p(padj)}"
                     + ("" if significant else f" (not significant at {SIGNIFICANT:g})"), fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "best_predictor.png", dpi=120)
        plt.close(fig)
