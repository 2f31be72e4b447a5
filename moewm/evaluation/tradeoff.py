"""The trade-off study's view of a sweep: strength against quality cost, per configuration, over keys.

Input: the sweep's summary (one row per job, :func:`moewm.app.report.collect`) of ``experiment=tradeoff``:
each job is one named point (``override.tradeoff``, a file of ``conf/tradeoff``) and one key (``seed``).
Jobs of one point are aggregated over keys (:func:`aggregate`); the spread over keys is kept as min and
max, drawn as error bars.

Per point (``tradeoff.csv``): scheme and parameters; ``tokens_to_detect`` = median over keys of the
censored median tokens to detect at alpha (``tokens_to_detect_alpha_censored`` of
:mod:`moewm.evaluation.attack_suite`, inf when half a key's texts are never detected; the uncensored
``tokens_to_detect_alpha`` when a job lacks it) with key min / max; ``never_detected``; detection at
64 tokens; ``ppl_cost`` = watermarked / plain perplexity - 1 under the judge (the oracle's when the jobs
had ``eval.oracle_model``, else the generator's; ``perplexity_judge`` says which), per job the ratio of
the geometric means over texts when the job's samples.jsonl is in the sweep folder (robust to one
text with a huge perplexity), else of the arithmetic means (``ppl_*_mean``); distinct-2 of
watermarked and plain text; per attack of ``eval.attacks`` the detection rate (mean, key min / max) and
the false-positive rate of the same attack on plain text, and the attack's survival diagnostics
(:mod:`moewm.evaluation.survival`: ``survival_signature_<attack>`` ..., mean over keys; also in ``tradeoff.md``);
and the pooled false-positive rate over every null set of the jobs (``null_fp`` of ``null_n`` texts, ``null_fpr``).

Pareto fronts (:func:`pareto_front`): lower cost and lower tokens to detect (no attack), or lower
cost and higher detection rate (each attack); a point is on the front when no other point is at least
as good in both and better in one.

The headline (:func:`headline`): does some routing point (not a routing-free twin), at no more perplexity cost than the
reference KGW point (gamma 0.25, delta 2), need fewer tokens to detect and keep more detection under 30 %
substitution? Computed from the key means / medians; the answer and the numbers go into ``tradeoff.md``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from moewm.evaluation.routing_adds import markdown as routing_adds_markdown
from moewm.evaluation.routing_adds import holds_no_routing, routing_adds

log = logging.getLogger(__name__)

POINT_COLUMN = "override.tradeoff"
ATTACK_PREFIX = "detection_rate_attacked_"
OK = "ok"
REFERENCE = {"watermark_kind": "kgw", "kgw_gamma": 0.25, "delta": 2.0}
HEADLINE_ATTACK = "substitution_0p3"
ROUTING_SCHEMES = ("moe_lsh", "moe_tournament")
# The tournament's settings as the jobs report them (MoETournamentWatermark.settings_metrics): what pairs a routing point with its twin.
TOURNAMENT_COLUMNS = ("tournament_layers", "tournament_block_bits", "tournament_context_tokens", "tournament_skip_repeated",
                      "tournament_routing_layers")  # the routing-keyed family the headline asks about
SCHEME_COLOURS = {"moe_lsh": "tab:blue", "moe_tournament": "tab:purple", "kgw": "tab:orange", "synthid": "tab:green", "none": "tab:gray"}
RETOKENISATION = "retokenisation_1"  # the suite's text-level detection: the generated ids decoded and encoded again
NULL_SETS = ("plain", "greedy", "top_p", "human_docstrings", "devils_dictionary", "kjv_narrative")
OUTPUT_FILES = ("tradeoff.csv", "tradeoff.md", "routing_adds.csv")
DISTANCES = (("2", "2"), ("3to4", "3-4"), ("5to8", "5-8"), ("9to16", "9-16"), ("17up", "17+"), ("before", "before"))
SURVIVAL_COLUMNS = ("survival_positions", "survival_signature", "survival_greenlist", "survival_bitflip", "survival_green",
                    "evidence_per_token_attacked", "evidence_aligned_clean", "evidence_aligned_attacked",
                    "evidence_changed_clean", "evidence_changed_attacked",
                    *[f"survival_signature_dist{d}" for d, _ in DISTANCES])


def is_tradeoff_sweep(df: pd.DataFrame) -> bool:
    """A trade-off study: jobs named by trade-off points, or jobs that scored an attack suite."""
    return POINT_COLUMN in df.columns or any(c.startswith(ATTACK_PREFIX) for c in df.columns)


def attack_suffixes(df: pd.DataFrame) -> list[str]:
    """Attack-suite suffixes present in the summary (``substitution_0p3``), in column order."""
    return [c[len(ATTACK_PREFIX):] for c in df.columns if c.startswith(ATTACK_PREFIX)]


def _col(df: pd.DataFrame, name: str, default: Any = np.nan) -> pd.Series:
    return df[name] if name in df else pd.Series(default, index=df.index)


def _point_names(df: pd.DataFrame) -> pd.Series:
    """The trade-off point of each job; jobs run without one are named by their scheme settings."""
    kind = _col(df, "watermark_kind", "?").astype(str)
    described = kind + " delta=" + _col(df, "delta").astype(float).map("{:g}".format)
    lsh = (kind == "moe_lsh") & ("pools" in df)
    described = described.where(~lsh, described + " " + _col(df, "pools").astype(str) + " m=" + _col(df, "green_bits", 1).astype(str)
                                + " layers=" + _col(df, "start_layer_idx", 0).astype(str) + ":" + _col(df, "end_layer_idx", "").astype(str))
    for col in ("kgw_gamma", "synthid_num_keys"):
        described = described.where(_col(df, col).isna(), described + f" {col}=" + _col(df, col).astype(str))
    if POINT_COLUMN not in df:
        return described
    return df[POINT_COLUMN].astype("string").fillna(described.astype("string")).astype(str)


def log_ppl_means(sweep_dir: Path, jobs: pd.Series) -> pd.DataFrame:
    """Per job (a folder of ``sweep_dir``), the mean over texts of log perplexity of its watermarked and plain
    texts, read from its samples.jsonl (NaN where there is none)."""
    out = np.full((len(jobs), 2), np.nan)
    for i, job in enumerate(jobs.astype(str)):  # one file per job
        path = Path(sweep_dir) / job / "samples.jsonl"
        if path.exists():
            rows = pd.read_json(path, lines=True)
            if {"ppl_wm", "ppl_unwm"} <= set(rows.columns):
                logs = np.log(rows[["ppl_wm", "ppl_unwm"]].astype(float).to_numpy())
                out[i] = np.nanmean(np.where(np.isfinite(logs), logs, np.nan), axis=0)
    return pd.DataFrame(out, index=jobs.index, columns=["log_ppl_wm", "log_ppl_unwm"])


def _ppl_cost(df: pd.DataFrame) -> pd.Series:
    """Per job, the perplexity cost under the oracle when it scored, else the generator: the ratio of the
    geometric means over texts - 1 when per-text perplexities were read (``log_ppl_*``: one text with a huge
    perplexity cannot swing it), else the ratio of the means - 1."""
    gen = df["ppl_wm_mean"].astype(float) / df["ppl_unwm_mean"].astype(float) - 1.0
    if "log_ppl_wm" in df:
        geo = np.exp(df["log_ppl_wm"].astype(float) - df["log_ppl_unwm"].astype(float)) - 1.0
        gen = geo.where(geo.notna(), gen)
    if "ppl_oracle_wm_mean" in df and "ppl_oracle_unwm_mean" in df:
        oracle = df["ppl_oracle_wm_mean"].astype(float) / df["ppl_oracle_unwm_mean"].astype(float) - 1.0
        return oracle.where(oracle.notna(), gen)
    return gen


def _judge(df: pd.DataFrame) -> pd.Series:
    if "perplexity_judge" in df:
        return df["perplexity_judge"].astype("string").fillna("generator:" + _col(df, "model", "?").astype(str)).astype(str)
    return "generator:" + _col(df, "model", "?").astype(str)


def job_table(df: pd.DataFrame, sweep_dir: Optional[Path] = None) -> pd.DataFrame:
    """The successful jobs with the study's per-job columns added: point, ppl_cost, judge, ttd (and the
    per-text log perplexities of the jobs' samples.jsonl when ``sweep_dir`` holds them)."""
    ok = df[df["status"].astype(str) == OK].copy() if "status" in df else df.copy()
    if sweep_dir is not None and "job" in ok:
        ok = ok.join(log_ppl_means(Path(sweep_dir), ok["job"]))
    ok["point"] = _point_names(ok)
    ok["ppl_cost"] = _ppl_cost(ok)
    ok["judge"] = _judge(ok)
    ttd = _col(ok, "tokens_to_detect_alpha_censored").astype(float)
    ok["ttd"] = ttd.where(ttd.notna(), _col(ok, "tokens_to_detect_alpha").astype(float))
    sets = [s for s in NULL_SETS if f"fp_{s}" in ok and f"n_{s}" in ok]
    ok["null_fp"] = ok[[f"fp_{s}" for s in sets]].astype(float).sum(axis=1) if sets else np.nan
    ok["null_n"] = ok[[f"n_{s}" for s in sets]].astype(float).sum(axis=1) if sets else np.nan
    return ok


def _first(x: pd.Series) -> Any:
    v = x.dropna()
    return v.iloc[0] if len(v) else np.nan


def aggregate(df: pd.DataFrame, sweep_dir: Optional[Path] = None) -> pd.DataFrame:
    """One row per trade-off point, over its keys (see the module docstring for the columns)."""
    jobs = job_table(df, sweep_dir)
    if not len(jobs):
        return pd.DataFrame()
    g = jobs.groupby("point", sort=True)
    out = pd.DataFrame({
        "scheme": g["watermark_kind"].agg(_first),
        "keys": g["seed"].nunique() if "seed" in jobs else g.size(),
    })
    lsh_columns = ("pools", "green_lists", "green_bits", "vote_lists", "context_tokens", "routing_free", "margin_bits", "start_layer_idx",
                   "end_layer_idx")
    for col in ("delta",) + lsh_columns + ("kgw_gamma", "kgw_seeding_scheme", "kgw_context_width", "synthid_num_keys", "synthid_ngram_len") + TOURNAMENT_COLUMNS:
        if col in jobs:
            out[col] = g[col].agg(_first)
            if out[col].dtype == bool:  # a flag (routing_free): NaN where the scheme has no such setting
                out[col] = out[col].astype(object)
    out.loc[out["scheme"] != "moe_lsh", [c for c in lsh_columns if c in out]] = np.nan
    if "synthid_num_keys" in out:
        out.loc[out["scheme"] == "synthid", "delta"] = np.nan  # SynthID has no delta
    stats = {
        "tokens_to_detect": ("ttd", ["median", "min", "max", "sem"]),
        "tokens_to_detect_uncensored": ("tokens_to_detect_alpha", ["median"]),
        "never_detected": ("never_detected_alpha", ["mean"]),
        "detection_rate": ("detection_rate", ["mean"]),
        "detection_at_64": ("detection_rate_at_64", ["mean", "min", "max"]),
        "ppl_cost": ("ppl_cost", ["mean", "min", "max", "sem"]),
        "ppl_wm": ("ppl_wm_mean", ["mean"]),
        "ppl_plain": ("ppl_unwm_mean", ["mean"]),
        "distinct_2_wm": ("distinct_2_wm", ["mean"]),
        "distinct_2_plain": ("distinct_2_unwm", ["mean"]),
    }
    stats["evidence_per_token_clean"] = ("evidence_per_token_clean", ["mean"])
    for a in attack_suffixes(jobs):
        stats[f"attacked_{a}"] = (f"{ATTACK_PREFIX}{a}", ["mean", "min", "max", "sem"])
        if f"fpr_attacked_{a}" in jobs:
            stats[f"fpr_attacked_{a}"] = (f"fpr_attacked_{a}", ["max"])
        for m in SURVIVAL_COLUMNS:  # the survival diagnostics (moewm.evaluation.survival), mean over keys
            stats[f"{m}_{a}"] = (f"{m}_{a}", ["mean"])
    for name, (col, funcs) in stats.items():
        if col not in jobs:
            continue
        agg = pd.to_numeric(jobs[col], errors="coerce").groupby(jobs["point"]).agg(funcs)
        for fn in funcs:
            out[name if fn in ("median", "mean") else f"{name}_{fn}"] = agg[fn]
    if f"attacked_{RETOKENISATION}" in out and "detection_rate" in out:  # detection from the published text, per id-level detection
        out["text_over_ids"] = out[f"attacked_{RETOKENISATION}"] / out["detection_rate"].replace(0, np.nan)
    out["null_fp"] = g["null_fp"].sum()
    out["null_n"] = g["null_n"].sum()
    out["null_fpr"] = out["null_fp"] / out["null_n"].replace(0, np.nan)
    out["perplexity_judge"] = g["judge"].agg(lambda x: ",".join(sorted(set(x))))
    out.index.name = "point"
    return out


def pareto_front(cost: np.ndarray, value: np.ndarray, higher_is_better: bool, cost_se: Optional[np.ndarray] = None,
                 value_se: Optional[np.ndarray] = None) -> np.ndarray:
    """Boolean mask: points no other point dominates on (cost, value) (:func:`noisy_front` on two axes).

    Without standard errors: j dominates i when its cost is no higher and its value no worse, one strictly. With
    them (the standard error over keys of each point, NaN read as 0), a difference counts only beyond the combined
    standard error sqrt(se_i^2 + se_j^2): j dominates i when it is as good on both axes within that error and better
    than it on one by more, so two points inside each other's noise are tied and neither leaves the front.
    """
    v = np.asarray(value, dtype=np.float64)
    axes = np.stack([np.asarray(cost, dtype=np.float64), -v if higher_is_better else v], axis=1)
    c_se = np.zeros(len(v)) if cost_se is None else np.asarray(cost_se, dtype=np.float64)
    v_se = np.zeros(len(v)) if value_se is None else np.asarray(value_se, dtype=np.float64)
    return noisy_front(axes, np.stack([c_se, v_se], axis=1), finite=np.array([True, False]))


def noisy_front(axes: np.ndarray, se: np.ndarray, finite: Optional[np.ndarray] = None) -> np.ndarray:
    """Boolean mask over points (N, k axes, lower is better on each): those no other point dominates, where j
    dominates i when it is as good on every axis within the combined standard error sqrt(se_i^2 + se_j^2) and
    better beyond it on one (NaN errors read as 0). A point with a NaN value, or an infinite one on an axis of
    ``finite`` (k bools; default none), is off the front and dominates nothing."""
    x = np.asarray(axes, dtype=np.float64)
    s = np.nan_to_num(np.asarray(se, dtype=np.float64))
    need_finite = np.zeros(x.shape[1], dtype=bool) if finite is None else np.asarray(finite, dtype=bool)
    valid = ~np.isnan(x).any(axis=1) & np.isfinite(x[:, need_finite]).all(axis=1)
    e = np.sqrt(s[:, None, :] ** 2 + s[None, :, :] ** 2)  # [i, j, axis]: the noise of the difference
    with np.errstate(invalid="ignore"):  # inf - inf (never-detected points) compares as not better
        d = x[None, :, :] - x[:, None, :]  # [i, j, axis]: j's value minus i's
        le = (d <= e).all(axis=2)
        lt = (d < -e).any(axis=2)
    dominated = (le & lt & valid[None, :]).any(axis=1)
    return valid & ~dominated


def ties(table: pd.DataFrame, column: str, higher_is_better: bool) -> list[tuple[str, str]]:
    """Pairs of points within one combined standard error of each other on both cost and ``column``: neither
    dominates the other whatever their means say."""
    c, v = table["ppl_cost"].to_numpy(float), table[column].to_numpy(float)
    sc = np.nan_to_num(_col(table, "ppl_cost_sem").to_numpy(float))
    sv = np.nan_to_num(_col(table, f"{column}_sem").to_numpy(float))
    out = []
    for i in range(len(table)):
        for j in range(i + 1, len(table)):
            if not (np.isfinite(c[[i, j]]).all() and np.isfinite(v[[i, j]]).all()):
                continue
            if abs(c[i] - c[j]) <= np.hypot(sc[i], sc[j]) and abs(v[i] - v[j]) <= np.hypot(sv[i], sv[j]):
                out.append((str(table.index[i]), str(table.index[j])))
    return out


def objectives(table: pd.DataFrame) -> list[tuple[str, str, bool, str]]:
    """(name, column, higher_is_better, axis label) per Pareto view: no attack, then each attack."""
    views = [("none", "tokens_to_detect", False, "tokens to detect at alpha (median over keys)")]
    for col in table.columns:
        m = re.fullmatch(r"attacked_(.+)", col)
        if m and not col.endswith(("_min", "_max", "_sem")):
            views.append((m.group(1), col, True, f"detection rate after {m.group(1).replace('_', ' ').replace('0p', '0.')}"))
    return views


def fronts(table: pd.DataFrame) -> dict[str, list[str]]:
    """Per view, the points on its Pareto front (cost = ppl_cost), differences inside the standard error over keys
    counting as ties (:func:`pareto_front`)."""
    out = {}
    for name, col, higher, _ in objectives(table):
        mask = pareto_front(table["ppl_cost"].to_numpy(), table[col].to_numpy(), higher,
                            _col(table, "ppl_cost_sem").to_numpy(), _col(table, f"{col}_sem").to_numpy())
        out[name] = list(table.index[mask])
    return out


@dataclass
class Headline:
    """The answer to the headline question, with the numbers it rests on."""

    answer: Optional[bool]  # None: not computable from this sweep
    reason: str
    reference: Optional[str] = None
    winners: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)


def reference_point(table: pd.DataFrame) -> Optional[str]:
    """The KGW point with gamma 0.25 and delta 2 (the headline's reference), if the sweep has it."""
    if "kgw_gamma" not in table:
        return None
    hit = table[(table["scheme"] == REFERENCE["watermark_kind"]) & np.isclose(table["kgw_gamma"].astype(float), REFERENCE["kgw_gamma"])
                & np.isclose(table["delta"].astype(float), REFERENCE["delta"])]
    return str(hit.index[0]) if len(hit) else None


def headline(table: pd.DataFrame, attack: str = HEADLINE_ATTACK, slack: float = 0.0) -> Headline:
    """Is some routing point (twins excluded) at cost <= the reference's (+ ``slack``) both faster to detect and more robust to ``attack``?"""
    ref = reference_point(table)
    col = f"attacked_{attack}"
    if ref is None:
        return Headline(None, "the sweep has no KGW point with gamma 0.25 and delta 2 (tradeoff=kgw_g025_d2)")
    if col not in table:
        return Headline(None, f"the jobs did not score the attack {attack} (eval.attacks)", ref)
    r = table.loc[ref]
    lsh = table[table["scheme"].isin(ROUTING_SCHEMES) & ~holds_no_routing(table)]  # a routing-free twin holds no routing
    if not len(lsh):
        return Headline(None, "the sweep has no routing point", ref)
    cheap = lsh[lsh["ppl_cost"] <= r["ppl_cost"] + slack]
    wins = cheap[(cheap["tokens_to_detect"] < r["tokens_to_detect"]) & (cheap[col] > r[col])]
    if len(wins):
        reason = "routing point(s) at no more perplexity cost than KGW detect in fewer tokens and keep more detection"
    elif not len(cheap):
        reason = "no routing point is at or below KGW's perplexity cost"
    else:
        reason = "the routing points at or below KGW's perplexity cost do not beat it on both tokens to detect and detection after the attack"
    return Headline(bool(len(wins)), reason, ref, list(wins.index), list(cheap.index))


def key_spread(values: pd.Series | np.ndarray, worst_percentile: float = 90.0) -> dict[str, float]:
    """Tokens to detect across keys: median key, worst-decile key (the key at the 90th percentile, rounding up:
    more tokens is worse) and their ratio; inf (a key that never detects half its texts) stays inf."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if not len(v):
        return {"keys": 0, "median": float("nan"), "worst_decile": float("nan"), "ratio": float("nan"), "max": float("nan")}
    med = float(np.median(v))
    worst = float(np.percentile(v, worst_percentile, method="higher"))  # an observed key (no interpolation toward inf)
    return {"keys": int(len(v)), "median": med, "worst_decile": worst, "ratio": worst / med if med > 0 else float("nan"), "max": float(v.max())}


# -- output -----------------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    if isinstance(x, (float, np.floating)) and np.isinf(x):
        return "never"
    if isinstance(x, (float, np.floating)):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:+.0f} %"


def _span(lo: float, hi: float, digits: int = 2) -> str:
    return f"[{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def markdown(table: pd.DataFrame, jobs: pd.DataFrame, head: Headline, front: dict[str, list[str]], alpha: float,
             adds: Optional[pd.DataFrame] = None) -> str:
    judges = sorted(set(",".join(table["perplexity_judge"]).split(","))) if len(table) else []
    lines = ["# Trade-off study: detection strength against quality cost", ""]
    lines.append(f"{len(jobs)} successful jobs, {len(table)} configurations, {int(table['keys'].min()) if len(table) else 0}–"
                 f"{int(table['keys'].max()) if len(table) else 0} keys each; decisions at p <= {alpha:g} (valid p-values).")
    if all(j.startswith("generator:") for j in judges):
        lines.append(f"**Perplexity judge: the generator itself** ({', '.join(j.split(':', 1)[1] for j in judges)}): no oracle model was "
                     "configured (eval.oracle_model=null) — on an offline tiny_moe setup none is available. The cost below is the "
                     "generator's view of its own watermarked text, not an independent judgement.")
    else:
        lines.append(f"**Perplexity judge:** {', '.join(judges)}.")
    lines += [""] + routing_adds_markdown(routing_adds(table) if adds is None else adds)
    lines += ["## Headline", ""]
    attack = HEADLINE_ATTACK.replace("_", " ").replace("0p", "0.")
    q = (f"Does any routing configuration (a routing-free twin does not count), at no more perplexity cost than KGW (gamma 0.25, delta 2), need fewer tokens to detect "
         f"at p <= {alpha:g} and keep more detection under {attack}?")
    lines.append(q)
    lines.append("")
    if head.answer is None:
        lines.append(f"**Not computable:** {head.reason}.")
    else:
        r = table.loc[head.reference]
        col = f"attacked_{HEADLINE_ATTACK}"
        lines.append(f"**{'Yes' if head.answer else 'No'}**: {head.reason}.")
        sem = float(r.get("ppl_cost_sem", np.nan))
        lines.append(f"(Perplexity cost is a mean over keys; its standard error over keys is {_fmt(100 * sem, 0)} points for the "
                     "reference: cost differences smaller than that are not resolved by this run.)")
        if np.isfinite(sem) and sem > 0:
            loose = headline(table, slack=2 * sem)
            lines.append(f"With the cost bound loosened by two standard errors (routing cost <= {_pct(r['ppl_cost'] + 2 * sem)}): "
                         f"**{'yes' if loose.answer else 'no'}**" + (f" ({', '.join(f'`{w}`' for w in loose.winners)})" if loose.winners else "")
                         + f", over {len(loose.candidates)} routing point(s) within the bound.")
        lines.append("")
        lines.append(f"- Reference `{head.reference}`: perplexity cost {_pct(r['ppl_cost'])}, tokens to detect {_fmt(r['tokens_to_detect'], 1)}, "
                     f"detection after {attack} {_fmt(r[col])} (keys {_span(r[col + '_min'], r[col + '_max'])}).")
        shown = head.winners or head.candidates
        if not shown:  # the cheapest routing points, to show how far they are
            shown = list(table[table["scheme"].isin(ROUTING_SCHEMES)].sort_values("ppl_cost").index[:3])
            lines.append("- Cheapest routing points (none is as cheap as the reference):")
        else:
            lines.append("- routing points that win:" if head.winners else "- routing points at or below the reference's cost:")
        for p in shown:
            x = table.loc[p]
            lines.append(f"  - `{p}`: cost {_pct(x['ppl_cost'])}, tokens to detect {_fmt(x['tokens_to_detect'], 1)}, "
                         f"detection after {attack} {_fmt(x[col])} (keys {_span(x[col + '_min'], x[col + '_max'])})")
    lines += ["", "## Pareto fronts (cost = perplexity cost)", "",
              "A point is dominated when another is as good on both axes within the standard error over keys and better on one "
              "by more; points inside each other's error are tied (listed per view).", ""]
    views = {name: (col, higher) for name, col, higher, _ in objectives(table)}
    for name, members in front.items():
        tied = [f"`{a}` ~ `{b}`" for a, b in ties(table, *views[name]) if a in members or b in members] if name in views else []
        lines.append(f"- {'no attack (tokens to detect)' if name == 'none' else name}: {', '.join(f'`{m}`' for m in members) or 'none'}"
                     + (f" (ties on the front: {', '.join(tied)})" if tied else ""))
    lines += ["", "## All configurations (mean over keys; [min, max] over keys)", ""]
    atk = [c for c in table.columns if c.startswith("attacked_") and not c.endswith(("_min", "_max", "_sem"))]
    header = ["point", "keys", "ppl cost ± s.e.", "tokens to detect", "never det.", "det. @64", "distinct-2", *[a[9:] for a in atk], "null FP"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for p, x in table.sort_values(["scheme", "ppl_cost"]).iterrows():
        cells = [f"`{p}`", str(int(x["keys"])), f"{_pct(x['ppl_cost'])} ± {_fmt(100 * x['ppl_cost_sem'], 0)} {_span(100 * x['ppl_cost_min'], 100 * x['ppl_cost_max'], 0)}",
                 f"{_fmt(x['tokens_to_detect'], 1)} {_span(x['tokens_to_detect_min'], x['tokens_to_detect_max'], 0)}",
                 _fmt(x.get("never_detected")), f"{_fmt(x.get('detection_at_64'))}", _fmt(x.get("distinct_2_wm"), 3)]
        cells += [f"{_fmt(x[a])} {_span(x[a + '_min'], x[a + '_max'])}" for a in atk]
        cells.append(f"{int(x['null_fp']) if np.isfinite(x['null_fp']) else 'n/a'}/{int(x['null_n']) if np.isfinite(x['null_n']) else 'n/a'}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += survival_markdown(table)
    fpr_cols = [c for c in table.columns if c.startswith("fpr_attacked_")]
    worst_null = float(np.nanmax(table["null_fpr"])) if len(table) and table["null_fpr"].notna().any() else float("nan")
    worst_att = float(np.nanmax(table[fpr_cols].to_numpy())) if fpr_cols and table[fpr_cols].notna().any().any() else float("nan")
    lines += ["", f"Nulls: pooled false-positive rate over every null set (plain, greedy, top-p, human corpora) at most {_fmt(worst_null, 4)} "
              f"per configuration; attacked plain text (same attacks, no key) at most {_fmt(worst_att, 4)}.",
              *([f"Text-level detection (`{RETOKENISATION[:-2]}`: the watermarked ids decoded to the published text and encoded again, "
                 "as a user who keeps only the text detects it): share of the id-level detection rate kept, per point: "
                 + ", ".join(f"`{p}` {_fmt(v)}" for p, v in table["text_over_ids"].items()) + "."]
                if "text_over_ids" in table else []),
              "Tokens to detect: the median over texts of the scored tokens after which p stays <= alpha, a never-detected text counting "
              "as infinitely long (\"never\" when half of a key's texts never get there), then the median over keys."]
    return "\n".join(lines) + "\n"


def survival_markdown(table: pd.DataFrame) -> list[str]:
    """Per attack, a table of the survival diagnostics of every point (mean over keys): what of the
    watermark's evidence survived the edit, and how far from the edit the signature comes back."""
    attacks = [c[len("survival_signature_"):] for c in table.columns
               if c.startswith("survival_signature_") and not c.startswith("survival_signature_dist")]
    if not attacks:
        return []
    lines = ["", "## Survival diagnostics (mean over keys)", "",
             "At positions whose token and previous token survived the edit (ids aligned by difflib.SequenceMatcher): "
             "*positions* = share of the original's scored positions that survived; *context kept* = share whose "
             "context is unchanged (MoE-LSH: the whole routing signature; KGW / SynthID: the n-gram context); *list kept* = "
             "share whose green list is unchanged; *bit flips* = per-bit flip rate of the signature; *green kept* = share "
             "of green draws still green; *evidence/token* = mean standardised green excess per scored token (z units), "
             "before -> after (in brackets: at survived positions, and at those whose context changed, where a watermark keyed by "
             "its context keeps nothing); *context kept by distance* = context kept at d tokens "
             "after the last edit (2 = the first survivor; before = no edit before it)."]
    for a in attacks:
        lines += ["", f"### {a.replace('_', ' ').replace('0p', '0.')}", "",
                  "| point | detected | positions | context kept | list kept | bit flips | green kept | evidence/token | "
                  + " | ".join(f"d {label}" for _, label in DISTANCES) + " |",
                  "|" + "---|" * (8 + len(DISTANCES))]
        for p, x in table.sort_values(["scheme", "ppl_cost"]).iterrows():
            def v(name: str, digits: int = 2) -> str:
                return _fmt(x.get(f"{name}_{a}"), digits)
            evidence = (f"{_fmt(x.get('evidence_per_token_clean'))} -> {v('evidence_per_token_attacked')} "
                        f"({v('evidence_aligned_clean')} -> {v('evidence_aligned_attacked')}; context changed "
                        f"{v('evidence_changed_clean')} -> {v('evidence_changed_attacked')})")
            cells = [f"`{p}`", _fmt(x.get(f"attacked_{a}")), v("survival_positions"), v("survival_signature"), v("survival_greenlist"),
                     v("survival_bitflip", 3), v("survival_green"), evidence, *[v(f"survival_signature_dist{d}") for d, _ in DISTANCES]]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_fronts(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One PNG per view: perplexity cost (x) against tokens to detect or attacked detection (y), one colour per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    cost = 100 * table["ppl_cost"].to_numpy(dtype=float)
    xerr = np.abs(np.vstack([cost - 100 * table["ppl_cost_min"].to_numpy(dtype=float), 100 * table["ppl_cost_max"].to_numpy(dtype=float) - cost]))
    for name, col, higher, label in objectives(table):
        y = table[col].to_numpy(dtype=float)
        lo, hi = table.get(f"{col}_min", table[col]).to_numpy(dtype=float), table.get(f"{col}_max", table[col]).to_numpy(dtype=float)
        finite = np.isfinite(y)
        fig, ax = plt.subplots(figsize=(7, 4.8))
        for scheme, colour in SCHEME_COLOURS.items():
            m = (table["scheme"].to_numpy() == scheme) & finite
            if not m.any():
                continue
            yerr = np.abs(np.vstack([y[m] - np.where(np.isfinite(lo[m]), lo[m], y[m]), np.where(np.isfinite(hi[m]), hi[m], y[m]) - y[m]]))
            ax.errorbar(cost[m], y[m], xerr=xerr[:, m], yerr=yerr, fmt="o", color=colour, label=scheme, capsize=2, alpha=0.85)
        for p, xv, yv in zip(table.index, cost, y):
            if np.isfinite(yv):
                ax.annotate(p, (xv, yv), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(table["ppl_cost"].to_numpy(), y, higher) & finite
        order = np.argsort(cost[front])
        ax.step(cost[front][order], y[front][order], where="post", color="black", lw=1, ls="--", label="Pareto front")
        ax.set_xlabel("perplexity cost, % (watermarked / plain - 1); error bars: key min-max")
        ax.set_ylabel(label)
        ax.set_title(f"trade-off: {'no attack' if name == 'none' else name}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"tradeoff_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def tradeoff_report(df: pd.DataFrame, out_dir: str | Path, extras: Optional[pd.DataFrame] = None) -> tuple[pd.DataFrame, list[Path]]:
    """Write tradeoff.csv, tradeoff.md (opening with what routing adds: routing_adds.csv) and the Pareto plots; return
    the table and the plot paths. ``extras``: per-point measures of other studies (spoofing success, ...), see
    :mod:`moewm.evaluation.routing_adds`."""
    out_dir = Path(out_dir)
    table = aggregate(df, out_dir)
    if not len(table):
        raise ValueError("tradeoff_report: no successful job in the summary")
    table.to_csv(out_dir / "tradeoff.csv")
    adds = routing_adds(table, extras)
    adds.to_csv(out_dir / "routing_adds.csv", index=False)
    alpha = float(df["alpha"].dropna().iloc[0]) if "alpha" in df and df["alpha"].notna().any() else float("nan")
    (out_dir / "tradeoff.md").write_text(markdown(table, job_table(df), headline(table), fronts(table), alpha, adds))
    return table, plot_fronts(table, out_dir)
