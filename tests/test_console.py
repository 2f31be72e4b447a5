"""What the terminal shows: a short block per run, a line per sweep job, one table per sweep."""

import itertools
import logging

import pandas as pd

from moewm.app.console import OncePerProcess, job_line, job_summary, sweep_report, sweep_table
from moewm.app.report import collect
from sweep_fixtures import write_job, write_sweep


def test_a_run_prints_the_numbers_that_matter_and_ends_with_its_files(tmp_path):
    metrics = write_job(tmp_path, ["seed=0"], 0)
    metrics.update({f"geo_metric_{i}": 0.5 for i in range(80)}, gen_tokens_per_s_plain=16.0)
    text = job_summary(metrics, tmp_path, "seed=0")
    lines = text.strip().splitlines()
    assert len(lines) <= 14, text
    assert "at p <= 0.001" in text and "AUC 0.99" in text
    assert "plain 0/16 | greedy 1/16 | top_p 0/16 | human_docstrings 0/16" in text
    assert "tokens to detect median 38 (12 % never detected)" in text
    assert "95.0 watermarked vs 78.6 plain (+21 %)" in text
    assert "geo_metric" not in text and "tokens_per_s" not in text
    assert lines[-1].strip().startswith("files") and str(tmp_path) in lines[-1] and "nulls.jsonl" in lines[-1]


def test_a_job_without_the_new_metrics_falls_back_to_what_it_wrote(tmp_path):
    metrics = write_job(tmp_path, ["seed=0"], 0, calibrated=False)
    text = job_summary(metrics, tmp_path, "defaults")
    assert "at z > 4" in text and "false positives  plain 0/16" in text
    assert "tokens to detect" not in text and "greedy" not in text
    line = job_line(metrics, tmp_path, "seed=0")
    assert "\n" not in line and line.startswith("seed=0:") and "FP max 0/16 (plain)" in line


def test_a_ten_seed_sweep_ends_with_one_screen(tmp_path):
    write_sweep(tmp_path, [{"seed": s} for s in range(10)])
    df = collect(tmp_path)
    text = sweep_report(df, tmp_path, [tmp_path / "roc.png"], sync="wandb sync x/wandb/offline-run-*")
    lines = text.strip().splitlines()
    assert len(lines) <= 24, text
    assert lines[0] == "sweep: 10 jobs, 10 ok, 0 failed; swept seed"
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [r[1] for r in rows] == [str(s) for s in range(10)]  # one row per job, its swept value next to it
    assert "false positives, all jobs: plain 0/160 | greedy 10/160 | top_p 0/160 | human_docstrings 0/160" in text
    assert lines[-1] == "W&B (offline): wandb sync x/wandb/offline-run-*"
    assert all(len(line) <= 120 for line in lines), max(lines, key=len)


def test_eighty_jobs_are_shown_as_means_over_seeds(tmp_path):
    grid = [{"seed": s, "encoder": e} for s, e in itertools.product(range(20), ("simhash", "centered", "whitened", "pca"))]
    write_sweep(tmp_path, grid, calibrated=False)
    text = sweep_table(collect(tmp_path))
    lines = text.splitlines()
    assert len(lines) <= 10, text
    for encoder in ("simhash", "centered", "whitened", "pca"):
        assert sum(encoder in line and "20 seeds" in line for line in lines) == 1


def test_failed_jobs_show_their_error_in_the_table(tmp_path):
    write_sweep(tmp_path, [{"seed": 0}])
    write_job(tmp_path / "1", ["seed=1", "data.num_prompts=16"], 1, status="failed")
    text = sweep_table(collect(tmp_path))
    assert "failed" in text and "allowed range" in text


def test_the_terminal_shows_each_warning_once_per_process():
    OncePerProcess.seen.clear()
    records = [logging.LogRecord("moewm.engine.keys", logging.WARNING, __file__, 1, "demo secret", None, None) for _ in range(3)]
    kept = [OncePerProcess().filter(r) for r in records]  # a new filter per job, as Hydra builds them
    assert kept == [True, False, False]


def test_summary_table_reads_only_each_jobs_own_metrics(tmp_path):
    write_sweep(tmp_path, [{"seed": 0}, {"seed": 1}])
    df = collect(tmp_path)
    assert isinstance(df, pd.DataFrame) and list(df["ppl_wm_mean"]) == [95.0, 96.0]


def test_a_run_shows_each_attacked_row_with_what_survived(tmp_path):
    metrics = write_job(tmp_path, ["seed=0"], 0)
    metrics.update(attack_name="deletion", attack_strength=0.1, detection_rate_attacked=0.5, survival_positions=0.8,
                   survival_signature=0.61, survival_bitflip=0.031, survival_green=0.81, evidence_per_token_clean=0.9,
                   evidence_per_token_attacked=0.4, detection_rate_attacked_substitution_0p3=0.25)
    text = job_summary(metrics, tmp_path, "seed=0")
    deletion = next(line for line in text.splitlines() if line.strip().startswith("attacked deletion"))
    assert "detected 50 %" in deletion and "context kept 0.61 at 0.80 of positions" in deletion and "bit flips 0.031" in deletion
    assert "green kept 0.81" in deletion and "evidence/token 0.90 -> 0.40" in deletion
    sub = next(line for line in text.splitlines() if line.strip().startswith("attacked substitution 0.3"))
    assert "detected 25 %" in sub and "context kept" not in sub  # no diagnostics written for it: none shown
