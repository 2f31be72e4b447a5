"""Sweep plots, each naming its points by what varied between the jobs (``seed=3 encoder=pca``).

The plots people open first: ROC per job on a log false-positive axis (a panel per job when there are
many), detection vs text length, and the null p-values (the share of null texts at or below each alpha
against its one-sided binomial bound: a valid detector's share stays under it; conservative is allowed). Each reads the job's files and uses the best evidence present: calibrated p-values
(``samples.jsonl`` p_wm / p_unwm, ``nulls.jsonl``, ``length_curve.json``) when the job wrote them,
the z-scores and ``*_at_T`` metrics otherwise, and says which in its title.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from moewm.app.sweep import job_labels, label, varying_keys

log = logging.getLogger(__name__)

MAX_CURVES = 10  # more jobs than this: curves pooled per non-seed swept value (or one pooled curve)
MAX_BOXES = 40
P_FLOOR = 1e-300


@dataclass
class Plot:
    """A PNG and the names on it (tick labels or legend entries, read back from the figure)."""

    path: Path
    labels: list[str] = field(default_factory=list)
    caption: str = ""


# -- reading a job's files --------------------------------------------------------------------------

def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _finite(values: Iterable[Any]) -> np.ndarray:
    out = []
    for v in values:
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):
            out.append(x)
    return np.asarray(out, dtype=np.float64)


def _neglog(p: np.ndarray) -> np.ndarray:
    return -np.log10(np.clip(p, P_FLOOR, 1.0))


@dataclass
class JobScores:
    positives: np.ndarray  # watermarked texts, larger = more watermarked
    negatives: np.ndarray  # unwatermarked null texts, same scale
    kind: str  # "p" (-log10 p) or "z"


def job_scores(job_dir: Path) -> Optional[JobScores]:
    """Detector scores of a job's watermarked texts and its nulls: -log10 p when it wrote p-values, else z."""
    samples = _jsonl(job_dir / "samples.jsonl")
    nulls = _finite(r.get("p_value") for r in _jsonl(job_dir / "nulls.jsonl"))
    p_wm = _finite(r.get("p_wm") for r in samples)
    p_un = nulls if nulls.size else _finite(r.get("p_unwm") for r in samples)
    if p_wm.size and p_un.size:
        return JobScores(_neglog(p_wm), _neglog(p_un), "p")
    return job_scores_z(job_dir)


def job_scores_z(job_dir: Path) -> Optional[JobScores]:
    """z-scores of a job's watermarked and unwatermarked samples."""
    samples = _jsonl(job_dir / "samples.jsonl")
    z_wm, z_un = _finite(r.get("z_wm") for r in samples), _finite(r.get("z_unwm") for r in samples)
    return JobScores(z_wm, z_un, "z") if z_wm.size and z_un.size else None


def null_pvalues(job_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    """Null p-values per set (nulls.jsonl; else the job's plain samples' p, else the normal tail of their z)."""
    rows = _jsonl(job_dir / "nulls.jsonl")
    if rows:
        sets: dict[str, list[Any]] = {}
        for r in rows:
            sets.setdefault(str(r.get("set", "?")), []).append(r.get("p_value"))
        return {k: _finite(v) for k, v in sets.items()}, "nulls.jsonl"
    samples = _jsonl(job_dir / "samples.jsonl")
    p = _finite(r.get("p_unwm") for r in samples)
    if p.size:
        return {"plain": p}, "samples p_unwm"
    z = _finite(r.get("z_unwm") for r in samples)
    if z.size:
        from scipy.stats import norm

        return {"plain": norm.sf(z)}, "normal tail of z (no calibrated p-values in these jobs)"
    return {}, ""


def length_curve(job_dir: Path, row: dict[str, Any]) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(lengths, detection rate, fpr) from length_curve.json, else from the ``detection_rate_at_T`` metrics."""
    path = job_dir / "length_curve.json"
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            lengths = np.asarray(data["lengths"], dtype=float)
            det = np.asarray([np.nan if v is None else v for v in data["detection_rate"]], dtype=float)
            fpr = np.asarray([np.nan if v is None else v for v in data.get("fpr", [None] * len(lengths))], dtype=float)
            if lengths.size:
                return lengths, det, fpr
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
            log.warning("%s: unreadable (%s); using the metrics' detection_rate_at_T", path, err)
    lengths = sorted(int(k.rsplit("_", 1)[1]) for k in row if k.startswith("detection_rate_at_") and k.rsplit("_", 1)[1].isdigit()
                     and _is_number(row[k]))
    if len(lengths) < 2:
        return None
    det = np.asarray([float(row[f"detection_rate_at_{t}"]) for t in lengths])
    fpr = np.asarray([float(row[f"fpr_at_{t}"]) if _is_number(row.get(f"fpr_at_{t}")) else np.nan for t in lengths])
    return np.asarray(lengths, dtype=float), det, fpr


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# -- which curves to draw ----------------------------------------------------------------------------

def curve_groups(df: pd.DataFrame) -> list[tuple[str, list[int]]]:
    """(label, row positions) per curve: one per job when few, else pooled over seeds per other swept value."""
    if len(df) <= MAX_CURVES:
        return [(str(df["label"].iloc[i]), [i]) for i in range(len(df))]
    others = [k for k in varying_keys(df) if k != "seed"]
    if others:
        groups: dict[str, list[int]] = {}
        for i, (_, row) in enumerate(df.iterrows()):
            groups.setdefault(label({k: row.get(f"override.{k}") for k in others}, others), []).append(i)
        if len(groups) <= MAX_CURVES:
            return [(f"{name} ({len(rows)} jobs)", rows) for name, rows in groups.items()]
    return [(f"all {len(df)} jobs pooled", list(range(len(df))))]


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return (df[df["status"] == "ok"] if "status" in df else df).reset_index(drop=True)


def _legend_labels(ax: Any) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def _save(fig: Any, path: Path, plt: Any) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _saved_with_legend(fig: Any, ax: Any, plt: Any, path: Path, caption: str) -> Plot:
    """Save a one-axis figure and name its points by its legend."""
    labels = _legend_labels(ax)
    _save(fig, path, plt)
    return Plot(path, labels, caption)


# -- the plots ----------------------------------------------------------------------------------------

def plot_z_per_job(sweep_dir: Path, df: pd.DataFrame, plt: Any) -> Optional[Plot]:
    """Box plots of z per job (per group when the sweep is large): unwatermarked grey, watermarked blue."""
    ok = _ok(df)
    per_job = []
    for _, row in ok.iterrows():
        samples = _jsonl(sweep_dir / str(row["job"]) / "samples.jsonl")
        per_job.append((_finite(r.get("z_unwm") for r in samples), _finite(r.get("z_wm") for r in samples)))
    groups = [(str(ok["label"].iloc[i]), [i]) for i in range(len(ok))] if len(ok) <= MAX_BOXES else curve_groups(ok)
    names, z_un, z_wm = [], [], []
    for name, rows in groups:
        un = np.concatenate([per_job[i][0] for i in rows]) if rows else np.array([])
        wm = np.concatenate([per_job[i][1] for i in rows]) if rows else np.array([])
        if un.size and wm.size:
            names.append(name)
            z_un.append(un)
            z_wm.append(wm)
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(min(24, max(6, len(names) * 0.6)), 4.5))
    pos = np.arange(len(names))
    ax.boxplot(z_un, positions=pos - 0.18, widths=0.3, patch_artist=True, boxprops=dict(facecolor="#bbbbbb"))
    ax.boxplot(z_wm, positions=pos + 0.18, widths=0.3, patch_artist=True, boxprops=dict(facecolor="#4c9be8"))
    threshold = ok["z_threshold"].dropna().iloc[0] if "z_threshold" in ok and ok["z_threshold"].notna().any() else None
    if threshold is not None:
        ax.axhline(float(threshold), color="red", ls="--", lw=1, label=f"z threshold {float(threshold):g}")
        ax.legend(loc="best", fontsize=8)
    ax.set_xticks(pos, names, rotation=45 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    ax.set_ylabel("z-score")
    ax.set_title("z per job: unwatermarked (grey) vs watermarked (blue)")
    labels = [t.get_text() for t in ax.get_xticklabels()]
    out = sweep_dir / "z_per_job.png"
    _save(fig, out, plt)
    return Plot(out, labels, "z-scores per job; the red line is the z threshold")


def _roc(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR at every threshold, a text counted as detected when its score is >= the threshold."""
    thresholds = np.unique(np.r_[pos, neg])[::-1]
    fpr = np.array([0.0] + [float(np.mean(neg >= t)) for t in thresholds])
    tpr = np.array([0.0] + [float(np.mean(pos >= t)) for t in thresholds])
    return fpr, tpr


ROC_SINGLE_AXIS = 3  # more curves than this: one small panel per curve (curves that reach TPR 1 at once hide each other)


def _auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * tpr[1:]))


def plot_roc(sweep_dir: Path, df: pd.DataFrame, plt: Any) -> Optional[Plot]:
    """ROC per job (pooled per group in large sweeps) with a log-scale false-positive axis.

    Up to ``ROC_SINGLE_AXIS`` curves share one axis; more get one small panel each, with every other curve in light
    grey behind it, so ten curves that all reach TPR 1 at the lowest FPR stay ten legible curves.
    """
    ok = _ok(df)
    scores = [job_scores(sweep_dir / str(j)) for j in ok["job"]]
    kinds = {s.kind for s in scores if s is not None}
    if not kinds:
        return None
    kind = "p" if kinds == {"p"} else "z"
    if kind == "z":  # some jobs without p-values: compare like with like
        scores = [job_scores_z(sweep_dir / str(j)) for j in ok["job"]]
    curves: list[tuple[str, np.ndarray, np.ndarray, int]] = []
    for name, rows in curve_groups(ok):
        got = [scores[i] for i in rows if scores[i] is not None]
        if not got:
            continue
        neg = np.concatenate([s.negatives for s in got])
        fpr, tpr = _roc(np.concatenate([s.positives for s in got]), neg)
        curves.append((name, fpr, tpr, int(neg.size)))
    if not curves:
        return None
    floor = min(0.5 / max(1, n) for *_, n in curves)
    alpha = ok["alpha"].dropna().iloc[0] if "alpha" in ok and ok["alpha"].notna().any() else None
    facets = len(curves) > ROC_SINGLE_AXIS
    cols = min(5, len(curves)) if facets else 1
    rows_n = -(-len(curves) // cols) if facets else 1
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.0 * cols + 0.5, 2.7 * rows_n + 0.8) if facets else (6.5, 5),
                             squeeze=False, sharex=True, sharey=True)
    flat = list(axes.ravel())
    for k, (name, fpr, tpr, n_neg) in enumerate(curves):
        ax = flat[k] if facets else flat[0]
        if facets:
            for other, (_, f2, t2, n2) in enumerate(curves):
                if other != k:
                    ax.step(np.maximum(f2, 0.5 / max(1, n2)), t2, where="post", color="#d0d0d0", lw=0.8)
        low = 0.5 / max(1, n_neg)
        ax.step(np.maximum(fpr, low), tpr, where="post", lw=1.8, label=name, **({"color": "C0"} if facets else {}))
        if facets:
            at = float(tpr[fpr <= float(alpha)].max()) if alpha is not None and (fpr <= float(alpha)).any() else float("nan")
            ax.set_title(name, fontsize=8)
            ax.text(0.97, 0.05, f"AUC {_auc(fpr, tpr):.3f}" + (f"\nTPR {at:.2f} at FPR <= {float(alpha):g}" if np.isfinite(at) else "")
                    + f"\n{n_neg} null texts", transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    for ax in flat[: len(curves) if facets else 1]:
        ax.plot([floor, 1], [floor, 1], color="grey", ls=":", lw=1)
        if alpha is not None and float(alpha) > floor:
            ax.axvline(float(alpha), color="red", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlim(floor, 1)
        ax.set_ylim(-0.02, 1.02)
    for ax in flat[len(curves):] if facets else []:
        ax.axis("off")
    title = "ROC: watermarked texts vs nulls" + ("" if kind == "p" else " (from z: no p-values in these jobs)")
    xlabel = "false-positive rate (log; left edge: no null text above the threshold)"
    if facets:
        fig.suptitle(f"{title}; one panel per curve, the others in grey; red: alpha {float(alpha):g}" if alpha is not None else title, fontsize=10)
        fig.supxlabel(xlabel, fontsize=9)
        fig.supylabel("true-positive rate", fontsize=9)
        labels = [c[0] for c in curves]
        out = sweep_dir / "roc.png"
        _save(fig, out, plt)
        return Plot(out, labels, "ROC per job, log false-positive axis, one panel per job")
    ax = flat[0]
    if alpha is not None and float(alpha) > floor:
        ax.text(float(alpha), 0.02, f" alpha {float(alpha):g}", color="red", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _saved_with_legend(fig, ax, plt, sweep_dir / "roc.png", "ROC per job, log false-positive axis")


def plot_detection_vs_length(sweep_dir: Path, df: pd.DataFrame, plt: Any) -> Optional[Plot]:
    """Detection rate (solid) and false-positive rate (dashed) against the number of tokens scored."""
    ok = _ok(df)
    curves = [length_curve(sweep_dir / str(row["job"]), row) for row in ok.to_dict("records")]
    if not any(c is not None for c in curves):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, rows in curve_groups(ok):
        got = [curves[i] for i in rows if curves[i] is not None]
        if not got:
            continue
        lengths = np.unique(np.concatenate([c[0] for c in got]))
        det = np.array([np.nanmean([c[1][c[0] == t][0] for c in got if (c[0] == t).any()]) for t in lengths])
        fpr = np.array([np.nanmean([c[2][c[0] == t][0] for c in got if (c[0] == t).any()]) for t in lengths])
        [line] = ax.plot(lengths, det, marker="o", label=name)
        if np.isfinite(fpr).any():
            ax.plot(lengths, fpr, marker=".", ls="--", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens scored")
    ax.set_ylabel("detection rate (solid), false-positive rate (dashed)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("detection vs length", fontsize=10)
    ax.legend(fontsize=7)
    return _saved_with_legend(fig, ax, plt, sweep_dir / "detection_vs_length.png", "detection rate and false-positive rate against text length")


NULL_LEVELS = np.logspace(-3, 0, 31)  # the levels at which the null plot compares the share at or below alpha with alpha


def null_share_check(p: np.ndarray, alpha: float) -> tuple[int, int, bool]:
    """(count at or below ``alpha``, its largest allowed count, within it): the same binomial 99 % bound as a job's
    ``null_ok``. One-sided: a valid p-value may be conservative (fewer texts than alpha), never more."""
    from moewm.evaluation.nulls import binomial_bound

    k = int(np.sum(p <= alpha))
    bound = binomial_bound(int(p.size), float(alpha))
    return k, bound, k <= bound


def plot_null_calibration(sweep_dir: Path, df: pd.DataFrame, plt: Any) -> Optional[Plot]:
    """What validity means, per null set pooled over jobs: the share of null texts with p <= alpha against alpha
    (log-log), under the binomial 99 % upper bound of its count; and the histogram of the p-values.

    A valid p-value puts at most alpha of unwatermarked text at or below alpha; rank p-values against reference
    keys (``(1 + #) / (R + 1)``, Besag-Clifford stops) are conservative, with mass near 1, which a two-sided
    uniformity test would call a failure. The verdict in the legend is the one-sided check at the sweep's alpha,
    the same rule as the console's ``null calibrated``.
    """
    ok = _ok(df)
    pooled: dict[str, list[np.ndarray]] = {}
    sources = set()
    for job in ok["job"] if len(ok) else []:
        sets, source = null_pvalues(sweep_dir / str(job))
        if source:
            sources.add(source)
        for name, p in sets.items():
            pooled.setdefault(name, []).append(p)
    data = {k: np.clip(np.concatenate(v), 0, 1) for k, v in pooled.items() if sum(x.size for x in v)}
    if not data:
        return None
    alpha = float(ok["alpha"].dropna().iloc[0]) if "alpha" in ok and ok["alpha"].notna().any() else 0.01
    fig, (share_ax, hist) = plt.subplots(1, 2, figsize=(11.5, 4.8))
    levels = NULL_LEVELS
    # a share of 0 cannot sit on a log axis: it is drawn on the bottom edge, below every possible nonzero share and alpha
    floor = 0.5 * min(float(levels[0]), 1.0 / max(p.size for p in data.values()))
    for idx, (name, p) in enumerate(data.items()):
        color = f"C{idx % 10}"
        share = np.array([np.mean(p <= a) for a in levels])
        upper = np.array([null_share_check(p, a)[1] / p.size for a in levels])
        k, bound, inside = null_share_check(p, alpha)
        text = f"{name} (n={p.size}; p <= {alpha:g}: {k}, bound {bound}: {'ok' if inside else 'ABOVE'})"
        share_ax.step(levels, np.maximum(share, floor), where="post", color=color, lw=1.6, label=text)
        share_ax.plot(levels, np.maximum(upper, floor), color=color, lw=0.8, ls="--")
        hist.hist(p, bins=np.linspace(0, 1, 21), density=True, histtype="step", lw=1.5, color=color, label=name)
    share_ax.plot(levels, levels, color="black", lw=1, ls=":")
    share_ax.axvline(alpha, color="red", lw=1, ls="--")
    share_ax.set_xscale("log")
    share_ax.set_yscale("log")
    share_ax.set_ylim(floor * 0.9, 1.5)
    share_ax.set_xlabel("alpha")
    share_ax.set_ylabel("share of null texts with p <= alpha (bottom edge: none)")
    share_ax.set_title("valid: solid line under its dashed binomial 99 % bound\n(dotted: share = alpha; below it is conservative, allowed)",
                       fontsize=9)
    share_ax.legend(fontsize=6.5, loc="upper left")
    hist.axhline(1.0, color="black", lw=1, ls=":")
    hist.set_xlabel("p-value")
    hist.set_ylabel("density (uniform = 1)")
    hist.set_title("null p-values (mass near 1: conservative rank p-values)", fontsize=9)
    hist.legend(fontsize=7)
    fig.suptitle(f"{len(ok)} jobs, null sets pooled over jobs; p-values from {', '.join(sorted(sources))}; red: alpha {alpha:g}", fontsize=9)
    labels = _legend_labels(share_ax)
    out = sweep_dir / "null_calibration.png"
    _save(fig, out, plt)
    return Plot(out, labels, "null p-values per null set: share at or below alpha against its one-sided binomial bound")


def _sortable(values: list[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def plot_detection_vs(sweep_dir: Path, df: pd.DataFrame, key: str, plt: Any) -> Optional[Plot]:
    """Detection rate (mean +- std over the other jobs) against one swept key; a line per value of the rest."""
    from moewm.app.sweep import value_text

    ok = _ok(df)
    column = f"override.{key}"
    if column not in ok or "detection_rate" not in ok:
        return None
    ok = ok.assign(_x=ok[column].map(value_text))
    xs = _sortable(list(dict.fromkeys(ok["_x"])))
    if len(xs) < 2:
        return None
    others = [k for k in varying_keys(ok) if k not in (key, "seed")]
    lines: list[tuple[str, pd.DataFrame]] = [("all jobs" if not others else f"mean over {' x '.join(others)}", ok)]
    if others:
        groups = list(ok.groupby([f"override.{k}" for k in others], sort=False, dropna=False))
        if len(groups) <= 8:
            lines = [(label({k: sub[f"override.{k}"].iloc[0] for k in others}, others), sub) for _, sub in groups]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pos = np.arange(len(xs))
    for name, sub in lines:
        stats = sub.groupby("_x")["detection_rate"].agg(["mean", "std"]).reindex(xs)
        ax.errorbar(pos, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=name)
    ticks = xs
    if key == "extractor.start_layer_idx" and {"start_layer_idx", "end_layer_idx"} <= set(ok.columns):
        ends = ok.groupby("_x")["end_layer_idx"].first()
        ticks = [f"[{x}, {value_text(ends.get(x))})" for x in xs]
    ax.set_xticks(pos, ticks)
    ax.set_xlabel(key + (" (MoE layers [start, end))" if ticks is not xs else ""))
    ax.set_ylabel(f"detection rate at {_threshold(ok)} (mean +- std)")
    ax.set_ylim(-0.02, 1.02)
    if len(lines) > 1 or others:
        ax.legend(fontsize=7)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    out = sweep_dir / f"detection_vs_{key.replace('.', '_').replace('/', '_')}.png"
    _save(fig, out, plt)
    return Plot(out, labels + _legend_labels(ax), f"detection rate against {key}")


def _threshold(df: pd.DataFrame) -> str:
    from moewm.app.console import threshold_text

    return threshold_text(df.iloc[0].to_dict()) if len(df) else "the threshold"


def make_plots(sweep_dir: Path, df: pd.DataFrame) -> list[Plot]:
    """Every plot the sweep's files allow; a plot that fails is skipped with a warning, never the summary."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache INFO lines are not results
    import matplotlib.pyplot as plt

    sweep_dir = Path(sweep_dir)
    if "label" not in df:
        df = df.assign(label=job_labels(df))
    jobs = [lambda: plot_z_per_job(sweep_dir, df, plt), lambda: plot_roc(sweep_dir, df, plt),
            lambda: plot_detection_vs_length(sweep_dir, df, plt), lambda: plot_null_calibration(sweep_dir, df, plt)]
    jobs += [lambda k=k: plot_detection_vs(sweep_dir, df, k, plt) for k in varying_keys(_ok(df)) if k != "seed"]
    made = []
    for make in jobs:
        try:
            result = make()
        except Exception as err:  # noqa: BLE001 - one broken plot must not cost the summary
            log.warning("a sweep plot failed: %s: %s", type(err).__name__, err)
            plt.close("all")
            continue
        if result is not None:
            made.append(result)
    return made
