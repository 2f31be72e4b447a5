"""Sweep summaries: ``summary.csv`` (one row per job) and plots; ``python -m moewm.report SWEEP_DIR`` rebuilds them."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import yaml

log = logging.getLogger(__name__)


def _overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key == "secret_key":
            continue
        out[f"override.{key}"] = value
    return out


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders of a sweep: those with a metrics.json or a Hydra record of the job."""
    found = {p.parent for p in sweep_dir.rglob("metrics.json")}
    found |= {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    return sorted((d for d in found if d != sweep_dir), key=lambda d: (len(d.parts), _num(d.name), str(d)))


def _num(name: str) -> int:
    return int(name) if name.isdigit() else 10**9


def collect(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job: its overrides as columns plus every metrics.json key; a job without metrics is failed."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for job in job_dirs(sweep_dir):
        row: dict[str, object] = {"job": str(job.relative_to(sweep_dir))}
        row.update(_overrides(job))
        metrics_path = job / "metrics.json"
        if metrics_path.exists():
            row.update(json.loads(metrics_path.read_text()))
        else:
            row.update(status="failed", error="no metrics.json (the job died before writing it: killed or out of memory?)")
        rows.append(row)
    return pd.DataFrame(rows)


def _plot_z_per_seed(sweep_dir: Path, df: pd.DataFrame, plt) -> Optional[Path]:
    z_wm, z_un, labels = [], [], []
    for _, row in df.iterrows():
        samples = sweep_dir / str(row["job"]) / "samples.jsonl"
        if row.get("status") != "ok" or not samples.exists():
            continue
        data = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
        z_wm.append([d["z_wm"] for d in data if d["z_wm"] is not None])
        z_un.append([d["z_unwm"] for d in data if d["z_unwm"] is not None])
        labels.append(f"seed {row.get('seed')}" if "override.seed" in row or "seed" in row else str(row["job"]))
    if not labels:
        return None
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.6), 4))
    pos = np.arange(len(labels))
    ax.boxplot(z_un, positions=pos - 0.18, widths=0.3, patch_artist=True, boxprops=dict(facecolor="#bbbbbb"))
    ax.boxplot(z_wm, positions=pos + 0.18, widths=0.3, patch_artist=True, boxprops=dict(facecolor="#4c9be8"))
    threshold = df["z_threshold"].dropna().iloc[0] if "z_threshold" in df and df["z_threshold"].notna().any() else None
    if threshold is not None:
        ax.axhline(float(threshold), color="red", ls="--", lw=1, label=f"threshold {threshold}")
    ax.set_xticks(pos, labels, rotation=45, ha="right")
    ax.set_ylabel("z-score")
    ax.set_title("z per job: unwatermarked (grey) vs watermarked (blue)")
    if threshold is not None:
        ax.legend(loc="upper left")
    fig.tight_layout()
    out = sweep_dir / "z_per_seed.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _plot_against(sweep_dir: Path, df: pd.DataFrame, column: str, label: str, filename: str, plt) -> Optional[Path]:
    ok = df[df.get("status") == "ok"] if "status" in df else df
    if column not in ok or ok[column].nunique() < 2:
        return None
    grouped = ok.groupby(column)["detection_rate"].agg(["mean", "std"]).reset_index()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(grouped))
    ax.errorbar(x, grouped["mean"], yerr=grouped["std"].fillna(0), marker="o", capsize=3)
    ax.set_xticks(x, [str(v) for v in grouped[column]])
    ax.set_xlabel(label)
    ax.set_ylabel("detection rate (mean ± std over jobs)")
    ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    out = sweep_dir / filename
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot(sweep_dir: str | Path, df: pd.DataFrame) -> list[Path]:
    """PNG plots: z per seed/job; detection rate vs num_bits and vs layer range when those were swept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_dir = Path(sweep_dir)
    made = [_plot_z_per_seed(sweep_dir, df, plt)]
    if "num_bits" in df:
        made.append(_plot_against(sweep_dir, df, "num_bits", "encoder.num_bits", "detection_vs_num_bits.png", plt))
    if {"start_layer_idx", "end_layer_idx"} <= set(df.columns):
        df = df.copy()
        df["layer_range"] = df["start_layer_idx"].astype(str) + "-" + df["end_layer_idx"].astype(str)
        made.append(_plot_against(sweep_dir, df, "layer_range", "MoE layers [start, end)", "detection_vs_layers.png", plt))
    return [p for p in made if p is not None]


def summarize(sweep_dir: str | Path) -> tuple[pd.DataFrame, list[Path]]:
    """Write summary.csv and plots (and the seed-sensitivity view when seeds were swept)."""
    sweep_dir = Path(sweep_dir)
    df = collect(sweep_dir)
    df.to_csv(sweep_dir / "summary.csv", index=False)
    plots = plot(sweep_dir, df) if len(df) else []
    if len(df) and "seed" in df and df["seed"].nunique() > 1 and (df.get("status") == "ok").sum() > 2:
        try:
            from moewm.seed_report import seed_sensitivity_report

            seed_sensitivity_report(df, sweep_dir)
            plots += sorted(sweep_dir.glob("seed_*.png"))
        except Exception as err:  # noqa: BLE001 - the summary must survive a failing extra view
            log.warning("seed-sensitivity report failed: %s: %s", type(err).__name__, err)
    return df, plots


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moewm.report", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (outputs/sweeps/...)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir}: not a folder")
    df, plots = summarize(args.sweep_dir)
    ok = int((df.get("status") == "ok").sum()) if len(df) else 0
    print(f"{args.sweep_dir / 'summary.csv'}: {len(df)} jobs, {ok} ok, {len(df) - ok} failed; plots: {', '.join(p.name for p in plots) or 'none'}")
    return 0 if ok == len(df) else 1


if __name__ == "__main__":
    raise SystemExit(main())
