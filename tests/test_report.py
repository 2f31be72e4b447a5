"""Sweep summary and plots on synthetic sweep folders: every plot names its points by what varied."""

import itertools

import pandas as pd
import pytest

from moewm.app.report import main as report_main
from moewm.app.report import summarize
from moewm.app.sweep import group_name, job_labels, swept_keys
from sweep_fixtures import NULL_SETS, write_sweep

GRID = [{"seed": s, "encoder": e} for s, e in itertools.product((0, 1), ("simhash", "centered", "whitened", "pca"))]


def _plots(sweep_dir):
    df, plots = summarize(sweep_dir)
    return df, {p.path.name: p for p in plots}


@pytest.mark.parametrize("calibrated", [True, False], ids=["p-values and nulls.jsonl", "z only (older jobs)"])
def test_every_sweep_plot_labels_its_points_by_the_swept_values(tmp_path, calibrated):
    write_sweep(tmp_path, GRID, calibrated=calibrated)
    df, plots = _plots(tmp_path)
    expected = {f"seed={g['seed']} encoder={g['encoder']}" for g in GRID}
    assert set(df["label"]) == expected  # 2 seeds x 4 encoders: 8 distinct labels, no "seed 0, seed 0, ..."
    assert {"z_per_job.png", "roc.png", "detection_vs_length.png", "null_calibration.png", "detection_vs_encoder.png"} <= set(plots)
    for name, plot in plots.items():
        assert plot.path.stat().st_size > 1000, name
        assert plot.labels, f"{name} names nothing"
        assert len(plot.labels) == len(set(plot.labels)), f"{name}: {plot.labels}"
    assert set(plots["z_per_job.png"].labels) == expected
    assert set(plots["roc.png"].labels) == expected
    assert set(plots["detection_vs_length.png"].labels) == expected
    assert {"simhash", "centered", "whitened", "pca"} <= set(plots["detection_vs_encoder.png"].labels)
    null_sets = {label.split(" (")[0] for label in plots["null_calibration.png"].labels}
    assert null_sets == (set(NULL_SETS) if calibrated else {"plain"})


def test_large_sweeps_pool_curves_per_non_seed_value_with_distinct_labels(tmp_path):
    grid = [{"seed": s, "encoder": e} for s, e in itertools.product(range(6), ("simhash", "pca"))]
    write_sweep(tmp_path, grid)
    _, plots = _plots(tmp_path)
    assert plots["roc.png"].labels == ["encoder=simhash (6 jobs)", "encoder=pca (6 jobs)"]
    assert len(plots["z_per_job.png"].labels) == 12


def test_labels_stay_distinct_when_nothing_varies_or_values_repeat(tmp_path):
    df = pd.DataFrame({"job": ["0", "1"], "override.seed": ["3", "3"]})
    assert job_labels(df) == ["job 0", "job 1"]
    df = pd.DataFrame({"job": ["0", "1", "2"], "override.seed": ["3", "3", "4"]})
    assert job_labels(df) == ["seed=3 (job 0)", "seed=3 (job 1)", "seed=4"]


def test_summary_keeps_failed_jobs_and_the_cli_prints_the_table(tmp_path, capsys):
    write_sweep(tmp_path, [{"seed": 0}, {"seed": 1}])
    write_sweep(tmp_path / "x", [])  # an empty folder is not a job
    from sweep_fixtures import write_job

    write_job(tmp_path / "2", ["seed=2", "data.num_prompts=16"], 2, status="failed")
    assert report_main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "sweep: 3 jobs, 2 ok, 1 failed; swept seed" in out
    assert "failed" in out and "allowed range" in out
    df = pd.read_csv(tmp_path / "summary.csv")
    assert list(df["label"]) == ["seed=0", "seed=1", "seed=2"]
    assert not any(c.startswith("gen_tokens_per_s") for c in df.columns)


def test_swept_keys_and_group_name_come_from_presets_and_the_command_line():
    assert swept_keys(["seed=0,1", "data.num_prompts=4", "encoder=pca", "+x=range(3)", "secret_key=a,b"],
                      {"encoder.num_bits": "8,16", "seed": "range(5)"}) == ["encoder.num_bits", "seed", "x"]
    # a preset's sweep fixed to one value on the command line is no longer swept (nor in the jobs' names)
    assert swept_keys(["encoder.pools=partition"], {"encoder.pools": "partition,anchors", "seed": "range(5)"}) == ["seed"]
    from pathlib import Path

    group = group_name("seed_sensitivity", ["seed", "encoder"], Path("outputs/sweeps/2026-11-28/08-22-03"))
    assert group == "seed_sensitivity: seed x encoder (2026-11-28/08-22-03)"
    assert len(group_name(None, [f"key{i}" for i in range(60)], Path("a/b"))) <= 128


def _rewrite_nulls(sweep_dir, draw):
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    for nulls in sweep_dir.glob("*/nulls.jsonl"):
        rows = [json.loads(line) for line in nulls.read_text().splitlines()]
        for r in rows:
            r["p_value"] = float(draw(rng))
        nulls.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_null_plot_is_one_sided_conservative_nulls_pass_and_anti_conservative_ones_do_not(tmp_path):
    """Rank p-values put their mass near 1 (conservative): valid, which a two-sided uniformity test would call a failure."""
    write_sweep(tmp_path / "conservative", [{"seed": s} for s in range(4)], n=64)
    _rewrite_nulls(tmp_path / "conservative", lambda rng: min(1.0, 0.3 + rng.uniform()))  # no p below 0.3
    _, plots = _plots(tmp_path / "conservative")
    labels = plots["null_calibration.png"].labels
    assert labels and all(label.endswith(": ok)") for label in labels), labels
    write_sweep(tmp_path / "liberal", [{"seed": s} for s in range(4)], n=64)
    _rewrite_nulls(tmp_path / "liberal", lambda rng: rng.uniform(0, 0.01))  # every null text at p <= 0.01
    _, plots = _plots(tmp_path / "liberal")
    assert all("ABOVE" in label for label in plots["null_calibration.png"].labels)


def test_a_roc_of_ten_jobs_gives_each_its_own_panel(tmp_path):
    write_sweep(tmp_path, [{"seed": s} for s in range(10)])
    _, plots = _plots(tmp_path)
    roc = plots["roc.png"]
    assert roc.labels == [f"seed={s}" for s in range(10)] and "one panel per job" in roc.caption
    write_sweep(tmp_path / "few", [{"seed": s} for s in range(2)])
    _, plots = _plots(tmp_path / "few")
    assert "panel" not in plots["roc.png"].caption  # a few curves share one axis


def test_a_failing_trade_off_report_is_said_on_the_console_and_the_summary_stays(tmp_path, capsys, monkeypatch):
    import moewm.evaluation.tradeoff as tradeoff

    write_sweep(tmp_path, [{"seed": s, "tradeoff": p} for s in (0, 1) for p in ("kgw_g025_d2", "synthid_k20")])

    def broken(*args, **kwargs):
        raise TypeError("Invalid value 'nan' for dtype 'bool'")

    monkeypatch.setattr(tradeoff, "tradeoff_report", broken)
    df, _ = summarize(tmp_path)
    assert len(df) == 4 and (tmp_path / "summary.csv").exists()
    err = capsys.readouterr().err
    assert "[WARNING] moewm: the trade-off report failed (TypeError: Invalid value 'nan' for dtype 'bool')" in err
