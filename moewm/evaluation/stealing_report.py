"""The watermark-stealing study's outputs: every row as CSV, a Markdown report, and success against N as a plot.

The report picks, per (scheme, attacker, N), the attacker's best spoofing delta_att: the highest detected share
among the deltas whose mean perplexity under the deployed model stays within ``ppl_factor`` times that of the
attacker model's plain answers (the strongest attacker whose text has not fallen apart); every row is in the
full table below it, so a reader sees the losers too. The null (the same detector on the plain answers to the same
prompts) stands beside every success rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd


def best_spoofs(frame: pd.DataFrame, model: str, ppl_factor: float) -> pd.DataFrame:
    """Per (scheme, attacker, count): the spoof row with the highest detected share within the perplexity cap
    (ties: the smaller delta); NaN success when no delta stays within it."""
    spoof = frame[frame["mode"] == "spoof"]
    null = frame[frame["mode"] == "plain"].drop_duplicates("scheme", keep="last").set_index("scheme")
    col = f"ppl_{model}"
    out = []
    for (scheme, attacker, count), g in spoof.groupby(["scheme", "attacker", "count"], sort=True):
        cap = ppl_factor * float(null.loc[scheme, col]) if scheme in null.index else np.inf
        ok = g[g[col] <= cap].sort_values(["detected", "delta_att"], ascending=[False, True])
        row = {"scheme": scheme, "attacker": attacker, "count": count, "ppl_cap": cap,
               "fpr": float(null.loc[scheme, "detected"]) if scheme in null.index else np.nan}
        if len(ok):
            best = ok.iloc[0]
            row |= {"best_delta": best["delta_att"], "detected": best["detected"], col: best[col], "wall_s": best["wall_s"]}
        else:
            row |= {"best_delta": np.nan, "detected": np.nan, col: np.nan, "wall_s": np.nan}
        out.append(row)
    return pd.DataFrame(out)


def _markdown(frame: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if np.isnan(v) else f"{v:.3g}"
        return str(v)

    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in frame.itertuples(index=False)]
    return "\n".join(lines)


def _plot(best: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = list(dict.fromkeys(best["scheme"]))
    fig, axes = plt.subplots(1, len(schemes), figsize=(4 * len(schemes), 3.2), squeeze=False, sharey=True)
    for ax, scheme in zip(axes[0], schemes):
        g = best[best["scheme"] == scheme]
        for attacker, a in g.groupby("attacker"):
            ax.plot(a["count"], a["detected"], marker="o", label=f"{attacker} (best delta)")
        ax.plot(g["count"], g["fpr"], ls="--", color="grey", label="null (plain)")
        ax.set_xscale("log")
        ticks = sorted(set(int(c) for c in g["count"]))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(scheme)
        ax.set_xlabel("attacker's corpus size N")
    axes[0][0].set_ylabel("spoofed texts detected (p <= alpha)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


ROW_KEY = ("model", "attacker_model", "scheme", "attacker", "count", "mode", "delta_att")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier run's CSV (none when it does not exist)."""
    if not Path(path).exists():
        return []
    # keep_default_na=False: a word such as "none" or "null" stays a word (pandas would read it as NaN)
    frame = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
    frame["mode"] = frame["mode"].replace({"null": "plain"})  # the plain answers' rows of earlier runs
    return frame.to_dict("records")


def merge_rows(earlier: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier rows, then the new ones; a new row replaces an earlier row with the same :data:`ROW_KEY`."""
    fresh = {tuple(str(r[k]) for k in ROW_KEY) for r in new}
    return [r for r in earlier if tuple(str(r[k]) for k in ROW_KEY) not in fresh] + list(new)


def write_report(rows: Sequence[dict[str, Any]], cfg: Any, out: Path, plot: bool = True) -> list[Path]:
    """``stealing.csv`` (every row), ``stealing.md`` (best spoofs, scrubbing, all rows) and ``stealing.png``."""
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(list(rows))
    csv = out / "stealing.csv"
    frame.to_csv(csv, index=False)
    best = best_spoofs(frame, cfg.model, cfg.ppl_factor)
    scrub = frame[frame["mode"].isin(["watermarked", "paraphrase", "scrub"])]
    md = out / "stealing.md"
    text = [f"# Watermark stealing on {cfg.model} (attacker model {cfg.attacker_model_name})", "",
            f"Detection at each scheme's alpha under the deployed key; spoofed answers to {cfg.spoof_count} unseen prompts, "
            f"{cfg.new_tokens} tokens each; h = {cfg.context_tokens}, min count {cfg.min_count}, weighting {cfg.weighting}, "
            f"weights_holder routing clusters {cfg.routing_clusters}. Best delta: highest detected share with mean perplexity under "
            f"{cfg.model} at most {cfg.ppl_factor} x the plain answers'. fpr: the same detector on the attacker model's plain answers.",
            "", "## Best spoofing attack per scheme, attacker and N", "", _markdown(best) if len(best) else "(no spoof rows)", ""]
    if len(scrub):
        text += ["## Scrubbing (share of watermarked answers still detected)", "", _markdown(scrub.drop(columns=["key_fingerprint"])), ""]
    text += ["## All rows", "", _markdown(frame.drop(columns=["key_fingerprint"])), ""]
    md.write_text("\n".join(text), encoding="utf-8")
    paths = [csv, md]
    if len(best) and plot:
        png = out / "stealing.png"
        _plot(best, png)
        paths.append(png)
    return paths
