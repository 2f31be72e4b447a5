"""What the routing adds: every routing design of a trade-off sweep against its routing-free twin.

A routing tournament keys each layer's g-values by (its block of routing-signature bits, the tokens before);
its twin (:func:`moewm.config.routing_free_twin`, ``watermark.tournament.routing_layers=0``) is the same
tournament keyed by the same tokens alone, through the same capture and calibration. MoE-LSH with a token context
keys its green list by (signature, token before); its twin (``encoder.routing_free``) by the token before alone. The difference between the
two is what routing contributes, and nothing else: the design question the framework exists to answer.

Input: the per-point table of :func:`moewm.evaluation.tradeoff.aggregate` (means over keys and their standard
errors). A routing point is paired with the twin in the same sweep whose tournament settings match except the
routing (TWIN_KEYS: for the tournament its layers, token context and repeated-context rule; for MoE-LSH its delta,
pools and green-list rule). Per pair and
measure: routing minus twin, and the standard error of that difference over keys (the two points' errors
combined); a difference inside it is reported as a tie, never as a win.

``extras`` (optional, indexed by point) adds measures that come from other studies: a spoofing success rate of
the stealing attack, the per-key dispersion of the validity study; their ``<name>_sem`` columns, when present,
are the errors.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

# What pairs a routing point with its twin: the settings that must match (the block size is moot without routing).
TWIN_KEYS = {"moe_tournament": ("tournament_layers", "tournament_context_tokens", "tournament_skip_repeated"),
             "moe_lsh": ("delta", "pools", "green_lists", "green_bits", "vote_lists", "context_tokens")}
# (column, label, higher is better): the measures of the table, in the order shown.
MEASURES = (("tokens_to_detect", "tokens to detect", False), ("ppl_cost", "perplexity cost", False))


def _value(table: pd.DataFrame, point: str, column: str) -> tuple[float, float]:
    row = table.loc[point]
    mean = float(row.get(column, np.nan))
    sem = float(row.get(f"{column}_sem", np.nan))
    return mean, (0.0 if np.isnan(sem) else sem)


def holds_no_routing(table: pd.DataFrame) -> pd.Series:
    """Per point: True for a routing-free twin (a tournament with 0 routed layers, MoE-LSH with
    ``encoder.routing_free``), False otherwise (the routing designs, and the baselines, which are not twins)."""
    routed = table["tournament_routing_layers"] if "tournament_routing_layers" in table else pd.Series(np.nan, index=table.index)
    free = table["routing_free"] if "routing_free" in table else pd.Series(np.nan, index=table.index)
    return (routed.astype(float) == 0) | ((table["scheme"] == "moe_lsh") & free.map(lambda v: str(v).lower() in ("true", "1", "1.0")))


def twin_pairs(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(routing point, its routing-free twin) for every routing point whose twin is in ``table``."""
    if "scheme" not in table:
        return []
    free = holds_no_routing(table)
    pairs = []
    for scheme, keys in TWIN_KEYS.items():
        if not all(k in table for k in keys):
            continue
        family = table["scheme"] == scheme
        twins, routed = table[family & free], table[family & ~free]
        if scheme == "moe_tournament":
            routed = routed[routed["tournament_routing_layers"].astype(float) > 0]
        for point, row in routed.iterrows():
            same = np.ones(len(twins), dtype=bool)
            for k in keys:
                same &= (twins[k].astype(str) == str(row[k])).to_numpy()
            if same.any():
                pairs.append((str(point), str(twins.index[np.argmax(same)])))
    return pairs


def measures(table: pd.DataFrame, extras: Optional[pd.DataFrame] = None) -> list[tuple[str, str, bool]]:
    """The measures compared: tokens to detect, cost, detection after each attack, then the extras' columns."""
    out = list(MEASURES)
    out += [(c, f"detection after {c[9:].replace('_', ' ').replace('0p', '0.')}", True)
            for c in table.columns if c.startswith("attacked_") and not c.endswith(("_min", "_max", "_sem"))]
    if extras is not None:
        out += [(c, c.replace("_", " "), not c.startswith(("spoof", "dispersion")))
                for c in extras.columns if not c.endswith("_sem")]
    return out


def routing_adds(table: pd.DataFrame, extras: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per (routing point, measure): routing's value, the twin's, the difference, its standard error, and
    the verdict (``routing better`` / ``twin better`` / ``tie``: a difference within one standard error)."""
    full = table if extras is None else table.join(extras, how="left")
    rows = []
    for point, twin in twin_pairs(table):
        for column, label, higher in measures(table, extras):
            if column not in full:
                continue
            (a, sa), (b, sb) = _value(full, point, column), _value(full, twin, column)
            diff = a - b if np.isfinite(a) and np.isfinite(b) else np.nan
            se = float(np.hypot(sa, sb))
            if np.isnan(diff):
                verdict = "n/a"
            elif abs(diff) <= se:
                verdict = "tie"
            else:
                verdict = "routing better" if (diff > 0) == higher else "twin better"
            rows.append({"point": point, "twin": twin, "measure": label, "column": column, "routing": a, "twin_value": b,
                         "difference": diff, "se": se, "verdict": verdict})
    return pd.DataFrame(rows)


def _fmt(x: float, column: str) -> str:
    if not np.isfinite(x):
        return "never" if np.isinf(x) else "n/a"
    return f"{100 * x:+.0f} %" if column == "ppl_cost" else (f"{x:.1f}" if column == "tokens_to_detect" else f"{x:.2f}")


def markdown(adds: pd.DataFrame) -> list[str]:
    """The section's lines: one table per routing point (measure, routing, twin, difference ± s.e., verdict)."""
    lines = ["## What routing adds (each routing design against its routing-free twin)", ""]
    if not len(adds):
        return lines + ["No routing point of this sweep has its routing-free twin in it (run `tradeoff=<point>,<point>_twin`).", ""]
    lines += ["Routing minus twin, means over keys; ± the standard error of the difference over keys. A difference inside it is a tie.", ""]
    for (point, twin), rows in adds.groupby(["point", "twin"], sort=False):
        lines += [f"`{point}` against `{twin}`:", "", "| measure | routing | twin | difference | verdict |", "|---|---|---|---|---|"]
        for _, r in rows.iterrows():
            diff = "n/a" if not np.isfinite(r["difference"]) else (
                f"{100 * r['difference']:+.0f} ± {100 * r['se']:.0f} pts" if r["column"] == "ppl_cost" else f"{r['difference']:+.2f} ± {r['se']:.2f}")
            lines.append(f"| {r['measure']} | {_fmt(r['routing'], r['column'])} | {_fmt(r['twin_value'], r['column'])} | {diff} | {r['verdict']} |")
        lines.append("")
    return lines
