"""Sweep summaries: ``summary.csv`` (one row per job) and plots; ``python -m moewm.report SWEEP_DIR`` rebuilds them."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import pandas as pd
import yaml

from moewm.app.console import sweep_report
from moewm.app.plots import Plot
from moewm.app.sweep import OVERRIDE_PREFIX, job_labels, parse_overrides
from moewm.app.tracking import sync_command

log = logging.getLogger(__name__)


def _overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    return {f"{OVERRIDE_PREFIX}{k}": v for k, v in parse_overrides(yaml.safe_load(path.read_text()) or []).items()}


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders of a sweep: those with a metrics.json or a Hydra record of the job."""
    found = {p.parent for p in sweep_dir.rglob("metrics.json")}
    found |= {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    return sorted((d for d in found if d != sweep_dir), key=lambda d: (len(d.parts), _num(d.name), str(d)))


def _num(name: str) -> int:
    return int(name) if name.isdigit() else 10**9


def collect(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job: its label (swept values), its overrides as columns, every metrics.json key; a job without metrics is failed."""
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
    df = pd.DataFrame(rows)
    if len(df):
        df.insert(1, "label", job_labels(df))
    return df


def plot(sweep_dir: str | Path, df: pd.DataFrame) -> list[Plot]:
    """The sweep's PNG plots (see :mod:`moewm.app.plots`), each labelled by the swept values."""
    from moewm.app.plots import make_plots

    return make_plots(Path(sweep_dir), df)


SEED_REPORT_PLOTS = ("detection_rate_by_seed.png", "ppl_by_seed.png", "best_predictor.png")


def summarize(sweep_dir: str | Path) -> tuple[pd.DataFrame, list[Plot]]:
    """Write summary.csv and plots (and the seed-sensitivity view when seeds were swept, the trade-off
    view (moewm.evaluation.tradeoff: tradeoff.csv, tradeoff.md, Pareto plots) when the jobs are trade-off points)."""
    sweep_dir = Path(sweep_dir)
    df = collect(sweep_dir)
    df.to_csv(sweep_dir / "summary.csv", index=False)
    plots = plot(sweep_dir, df) if len(df) else []
    from moewm.evaluation.tradeoff import is_tradeoff_sweep

    tradeoff = bool(len(df)) and is_tradeoff_sweep(df)
    if len(df) and "seed" in df and df["seed"].nunique() > 1 and (df.get("status") == "ok").sum() > 2 and not tradeoff:
        try:
            from moewm.evaluation.seed_report import seed_sensitivity_report

            seed_sensitivity_report(df, sweep_dir)
            plots += [Plot(sweep_dir / name, caption=f"seed sensitivity: {name[:-4]}") for name in SEED_REPORT_PLOTS
                      if (sweep_dir / name).exists()]
        except Exception as err:  # noqa: BLE001 - the summary must survive a failing extra view
            _report_failed("seed-sensitivity", err)
    if tradeoff and (df.get("status") == "ok").any():  # the trade-off study's view instead of the seed report
        try:
            from moewm.evaluation.tradeoff import tradeoff_report

            _, paths = tradeoff_report(df, sweep_dir)
            plots += [Plot(p, caption=f"trade-off: {p.stem[len('tradeoff_'):]}") for p in paths]
        except Exception as err:  # noqa: BLE001 - the summary must survive a failing extra view
            _report_failed("trade-off", err)
    return df, plots


def _report_failed(view: str, err: Exception) -> None:
    """An extra view that failed is said on the console too (a sweep's log handlers may write to files only)."""
    log.warning("%s report failed: %s: %s", view, type(err).__name__, err)
    print(f"[WARNING] moewm: the {view} report failed ({type(err).__name__}: {err}); summary.csv and the plots are complete",
          file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moewm.report", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (outputs/sweeps/...)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir}: not a folder")
    df, plots = summarize(args.sweep_dir)
    print(sweep_report(df, args.sweep_dir, [p.path for p in plots], sync=sync_command(args.sweep_dir)))
    ok = int((df.get("status") == "ok").sum()) if len(df) else 0
    return 0 if ok == len(df) else 1


if __name__ == "__main__":
    raise SystemExit(main())
