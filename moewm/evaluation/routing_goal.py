"""The routing watermark's goal, checked design by design: is some routing design valid per key, robust to
edits, and harder to steal than a token key?

A routing key can only cost robustness (the routing moves when distant tokens are edited); what it might buy is
a key the text alone does not reveal. The goal makes that concrete, per model:

* **valid**: no deployed key above its binomial interval at any level of the validity study
  (:mod:`moewm.evaluation.validity`, origin "all"): a key above flags unwatermarked text more often than the level
  says; a key below is conservative (valid, less powerful) and is reported as such;
* **robust**: detection after 30 % substitution at least :data:`GOAL_SURVIVAL` (the trade-off sweep's mean over keys);
* **secret**: text-only spoofing at the largest corpus size measured at most :data:`GOAL_SPOOF_RATIO` times the
  spoofing of :data:`REFERENCE` (SynthID's tournament over the same two tokens, no routing) at that size
  (:mod:`moewm.evaluation.stealing`).

Every design gets a verdict per criterion ("not run" where a study is missing, never a pass) and the table says
which criterion stopped it, with the numbers. Three inputs, all keyed by trade-off point name: the sweep's
per-point table (:func:`moewm.evaluation.tradeoff.aggregate`), the stealing study's rows, validity summaries.
:func:`spoofing_extras` and :func:`validity_extras` also feed "what routing adds"
(:func:`moewm.evaluation.routing_adds.routing_adds`'s ``extras``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from moewm.evaluation.tradeoff import noisy_front

GOAL_SURVIVAL = 0.90
GOAL_SPOOF_RATIO = 0.10
REFERENCE = "synthid_n3_k20"
ATTACK = "attacked_substitution_0p3"
ATTACKER = "text_only"
DELTA = 8.0


def _spoof_rows(stealing: pd.DataFrame, attacker: str, delta: float) -> pd.DataFrame:
    """The stealing study's spoofing rows of one attacker at one delta_att."""
    return stealing[(stealing["mode"] == "spoof") & (stealing["attacker"] == attacker) & (stealing["delta_att"].astype(float) == delta)]


def _binomial_sem(share: float, texts: int) -> float:
    return float(np.sqrt(share * (1 - share) / max(texts, 1)))


def spoofing_extras(stealing: pd.DataFrame, attacker: str = ATTACKER, delta: float = DELTA) -> pd.DataFrame:
    """Per point (the stealing rows' ``scheme``): the share of spoofed texts detected at the largest N measured
    (``spoof_<attacker>``), its binomial standard error over texts and that N (``spoof_n``)."""
    out = {}
    for scheme, part in _spoof_rows(stealing, attacker, delta).groupby("scheme"):
        last = part.loc[part["count"].astype(int).idxmax()]
        share = float(last["detected"])
        out[scheme] = {f"spoof_{attacker}": share, f"spoof_{attacker}_sem": _binomial_sem(share, int(last["texts"])), "spoof_n": int(last["count"])}
    return pd.DataFrame.from_dict(out, orient="index")


def spoofing_by_count(stealing: pd.DataFrame, attacker: str = ATTACKER, delta: float = DELTA) -> pd.DataFrame:
    """Per point, one column per corpus size N: ``spoof_<attacker>_n<N>`` and its binomial standard error, so that
    two designs are compared at the same N (a design whose curve stops earlier has no value at the larger N)."""
    out: dict[str, dict[str, float]] = {}
    for _, r in _spoof_rows(stealing, attacker, delta).iterrows():
        share, name = float(r["detected"]), f"spoof_{attacker}_n{int(r['count'])}"
        out.setdefault(str(r["scheme"]), {}).update({name: share, f"{name}_sem": _binomial_sem(share, int(r["texts"]))})
    frame = pd.DataFrame.from_dict(out, orient="index")
    return frame[sorted(frame.columns, key=lambda c: (int(c.split("_n")[-1].split("_")[0]), c))] if len(frame) else frame


def spoof_at(stealing: pd.DataFrame, scheme: str, count: int, attacker: str = ATTACKER, delta: float = DELTA) -> float:
    """The spoofing share of ``scheme`` at corpus size ``count`` (NaN when not measured)."""
    rows = _spoof_rows(stealing, attacker, delta)
    hit = rows[(rows["scheme"] == scheme) & (rows["count"].astype(int) == int(count))]
    return float(hit["detected"].iloc[-1]) if len(hit) else float("nan")


def validity_verdict(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A validity study's per-key gate for its deployed detector (origin "all", every level): keys inside / keys, and
    the dispersion at the first level (the observed spread of per-key counts over the binomial one)."""
    kind = summary["watermark"]["kind"]
    rows = [r for r in summary["summary"] if r.get("origin") == "all" and not r.get("held_out") and r.get("detector") == kind]
    if not rows:
        raise ValueError("validity summary: no row for origin 'all'")
    inside = min(int(r["keys_inside"]) for r in rows)
    keys = int(rows[0]["keys"])
    above = max(int(r.get("keys_above", keys - int(r["keys_inside"]))) for r in rows)  # without the count: every key outside
    first = min(rows, key=lambda r: -float(r["level"]))
    ratio = float(first["dispersion_ratio"])
    # The ratio is a sample sd over keys / the binomial sd: its standard error is about ratio / sqrt(2 (keys - 1)).
    return {"valid": above == 0, "keys_inside": inside, "keys_above": above, "keys": keys, "dispersion": ratio,
            "dispersion_sem": ratio / np.sqrt(2 * max(keys - 1, 1)), "dispersion_p": float(first["dispersion_p"])}


def validity_extras(summaries: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per point: the validity gate and dispersion (the ``dispersion`` column is what "what routing adds" compares)."""
    return pd.DataFrame.from_dict({p: validity_verdict(s) for p, s in summaries.items()}, orient="index")


def goal_table(model: str, table: pd.DataFrame, stealing: Optional[pd.DataFrame], validity: pd.DataFrame) -> pd.DataFrame:
    """One row per routing design (and its twin and the reference) of ``table``: each criterion's value and verdict."""
    tour = table[table["scheme"] == "moe_tournament"]
    points = list(tour.index) + ([REFERENCE] if REFERENCE in table.index else [])
    spoof = spoofing_extras(stealing) if stealing is not None and len(stealing) else pd.DataFrame()
    rows = []
    for point in points:
        row = table.loc[point]
        routed = row.get("tournament_routing_layers")
        survival = float(row.get(ATTACK, np.nan))
        out: dict[str, Any] = {"model": model, "point": point,
                               "routed_layers": (int(row.get("tournament_layers", 0)) if pd.isna(routed) else int(routed)) if point != REFERENCE else 0,
                               "block_bits": row.get("tournament_block_bits") if point != REFERENCE else np.nan,
                               "survival": survival, "survival_sem": float(row.get(f"{ATTACK}_sem", np.nan))}
        out["robust"] = "n/a" if np.isnan(survival) else ("yes" if survival >= GOAL_SURVIVAL else "no")
        if point in spoof.index:
            n = int(spoof.loc[point, "spoof_n"])
            mine, ref = float(spoof.loc[point, f"spoof_{ATTACKER}"]), spoof_at(stealing, REFERENCE, n) if stealing is not None else np.nan
            out.update(spoof=mine, spoof_n=n, reference_spoof=ref, spoof_ratio=mine / ref if ref > 0 else np.nan)
            out["secret"] = "n/a" if np.isnan(ref) else ("yes" if mine <= GOAL_SPOOF_RATIO * ref else "no")
        else:
            out.update(spoof=np.nan, spoof_n=np.nan, reference_spoof=np.nan, spoof_ratio=np.nan, secret="not run")
        if point in validity.index:
            v = validity.loc[point]
            below = int(v["keys"]) - int(v["keys_inside"]) - int(v.get("keys_above", 0))
            out.update(valid="yes" if bool(v["valid"]) else "no",
                       keys_inside=f"{int(v['keys_inside'])}/{int(v['keys'])}" + (f", {below} below" if below > 0 else ""),
                       dispersion=float(v["dispersion"]))
        else:
            out.update(valid="not run", keys_inside="", dispersion=np.nan)
        rows.append(out)
    return pd.DataFrame(rows)


def spoofing_front(model: str, table: pd.DataFrame, stealing: pd.DataFrame) -> pd.DataFrame:
    """The noise-aware front of every point with a spoofing curve on (detection after 30 % substitution, higher
    better; text-only spoofing at the largest N of the study, lower better; perplexity cost, lower better), each
    with its standard error (over keys; binomial over the 64 spoofed texts for spoofing). Points whose curve stops
    below that N are left out (the report names them)."""
    spoof = spoofing_extras(stealing)
    points = [p for p in spoof.index if p in table.index]
    if not points:
        return pd.DataFrame()
    n = int(spoof.loc[points, "spoof_n"].max())
    points = [p for p in points if int(spoof.loc[p, "spoof_n"]) == n]
    rows = []
    for p in points:
        share = spoof_at(stealing, p, n)
        rows.append({"model": model, "point": p, "survival": float(table.loc[p, ATTACK]), "survival_sem": float(table.loc[p].get(f"{ATTACK}_sem", np.nan)),
                     "spoof": share, "spoof_sem": _binomial_sem(share, 64) if np.isfinite(share) else np.nan, "spoof_n": n,
                     "ppl_cost": float(table.loc[p, "ppl_cost"]), "ppl_cost_sem": float(table.loc[p].get("ppl_cost_sem", np.nan))})
    out = pd.DataFrame(rows)
    axes = np.stack([-out["survival"], out["spoof"], out["ppl_cost"]], axis=1)
    se = out[["survival_sem", "spoof_sem", "ppl_cost_sem"]].to_numpy(float)
    out["on_front"] = noisy_front(axes, se)
    return out


def front_markdown(front: pd.DataFrame) -> list[str]:
    """The front with spoofing as an axis, per model."""
    lines = []
    for model, part in front.groupby("model", sort=False):
        n = int(part["spoof_n"].iloc[0])
        lines += [f"## {model}: front with spoofing as an axis (N = {n})", "",
                  "Survival after 30 % substitution (higher better), text-only spoofing (lower better) and perplexity cost (lower better), "
                  "± standard errors; a point is dominated only beyond the combined error on one axis while within it on the others.", "",
                  "| point | survival subst 0.3 | spoof | cost | on the front |", "|---|---|---|---|---|"]
        for _, r in part.sort_values(["on_front", "survival"], ascending=[False, False]).iterrows():
            lines.append(f"| `{r['point']}` | {r['survival']:.2f} ± {r['survival_sem']:.2f} | {r['spoof']:.2f} ± {r['spoof_sem']:.2f} | "
                         f"{100 * r['ppl_cost']:+.0f} ± {100 * r['ppl_cost_sem']:.0f} % | {'yes' if r['on_front'] else ''} |")
        lines.append("")
    return lines


def stopped_by(row: pd.Series) -> str:
    """Which criteria a design misses ("" when it meets all; "not run" criteria are named as such)."""
    missed = [f"{c} ({row[c]})" if row[c] != "no" else c for c in ("robust", "secret", "valid") if row[c] != "yes"]
    return ", ".join(missed)


def markdown(goal: pd.DataFrame, front: Optional[pd.DataFrame] = None) -> str:
    """The goal table: per model and design, robustness, spoofing against the reference, validity, the verdict."""
    lines = ["# The routing watermark's goal, design by design", "",
             f"Goal: valid per key, detection after 30 % substitution >= {GOAL_SURVIVAL:.2f}, and text-only spoofing "
             f"(delta_att {DELTA:g}) at the largest N at most {GOAL_SPOOF_RATIO:g} x that of `{REFERENCE}` (no routing) at the same N, "
             "on every model. Survival: mean over keys ± standard error; spoofing: one deployed key, share of 64 spoofed texts "
             "detected at p <= 1e-3.", ""]
    for model, part in goal.groupby("model", sort=False):
        lines += [f"## {model}", "", "| design | routed layers | survival subst 0.3 | spoof (N) | reference spoof | ratio | valid per key | misses |",
                  "|---|---|---|---|---|---|---|---|"]
        for _, r in part.iterrows():
            spoof = "not run" if np.isnan(r["spoof"]) else f"{r['spoof']:.2f} ({int(r['spoof_n'])})"
            ref = "" if np.isnan(r["reference_spoof"]) else f"{r['reference_spoof']:.2f}"
            ratio = "" if np.isnan(r["spoof_ratio"]) else f"{r['spoof_ratio']:.2f}"
            valid = r["valid"] + (f" ({r['keys_inside']}, dispersion {r['dispersion']:.2f})" if r["valid"] != "not run" else "")
            misses = stopped_by(r) or "**meets the goal**"
            lines.append(f"| `{r['point']}` | {r['routed_layers']} | {r['survival']:.2f} ± {r['survival_sem']:.2f} | {spoof} | {ref} | {ratio} | {valid} | {misses} |")
        lines.append("")
    every = goal[goal["point"] != REFERENCE]
    meets = every[every.apply(lambda r: stopped_by(r) == "", axis=1)]
    robust_everywhere = {p for p, g in every.groupby("point") if (g["robust"] == "yes").all() and len(g) == goal["model"].nunique()}
    met_everywhere = {p for p, g in meets.groupby("point") if len(g) == goal["model"].nunique()}
    lines += ["## Verdict", "", (f"Meets the goal on every model: {', '.join(f'`{p}`' for p in sorted(met_everywhere))}."
                                 if met_everywhere else "No design meets the goal on every model."),
              f"Robust on every model: {', '.join(f'`{p}`' for p in sorted(robust_everywhere)) or 'none'}.", ""]
    if front is not None and len(front):
        lines += front_markdown(front)
    return "\n".join(lines)
