"""Seed-sensitivity report on a synthetic sweep whose answers are known by construction."""

import numpy as np
import pandas as pd
import pytest

from moewm.evaluation.seed_report import seed_sensitivity_report


def _sweep(seeds=12):
    rng = np.random.default_rng(0)
    rows = []
    # encoder -> (detection spread, perplexity spread): "whitened" is the steadiest in detection,
    # "pca" the steadiest in perplexity, "simhash" the worst in both
    spreads = {"simhash": (0.20, 3.0), "centered": (0.08, 1.0), "whitened": (0.01, 0.8), "pca": (0.05, 0.05)}
    for enc, (det_sd, ppl_sd) in spreads.items():
        for s in range(seeds):
            entropy = rng.uniform(0.5, 1.0)  # the bit entropy of this seed's hyperplanes ...
            det = 0.5 + det_sd * (entropy - 0.75) / 0.15  # ... drives its detection rate (monotone)
            rows.append({
                "seed": s,
                "encoder_kind": enc,
                "status": "ok",
                "detection_rate": det,
                "auc": 0.9 + 0.1 * (det - 0.5),
                "ppl_wm_mean": 10 + ppl_sd * rng.normal(),
                "geo_bit_entropy": entropy,
                "geo_noise": rng.normal(),  # unrelated to anything
                "geo_dead_bits": 1.0 - entropy + 0.3 * rng.normal(),  # a noisy, negative echo
            })
    rows.append({"seed": 99, "encoder_kind": "simhash", "status": "failed", "detection_rate": np.nan})
    rows.append({"seed": 98, "encoder_kind": "pca", "status": "failed", "detection_rate": 0.0, "geo_bit_entropy": 0.0})
    return pd.DataFrame(rows)


def test_report_answers_from_the_numbers(tmp_path):
    df = _sweep()
    table = seed_sensitivity_report(df, tmp_path)
    assert set(table.index) == {"simhash", "centered", "whitened", "pca", "pooled"}
    assert (table.loc[["simhash", "centered", "whitened", "pca"], "n_seeds"] == 12).all()  # failed jobs left out
    # spread statistics are the plain ones
    sub = df[(df.encoder_kind == "centered") & (df.status == "ok")]
    assert table.loc["centered", "detection_rate_std"] == pytest.approx(sub.detection_rate.std(ddof=1))
    assert table.loc["centered", "detection_rate_p10"] == pytest.approx(np.percentile(sub.detection_rate, 10))
    assert table.loc["centered", "ppl_wm_mean_p90"] == pytest.approx(np.percentile(sub.ppl_wm_mean, 90))
    # the entropy drives detection monotonically inside every encoder: rank correlation 1
    for enc in ("simhash", "centered", "whitened", "pca"):
        assert table.loc[enc, "spearman_geo_bit_entropy"] == pytest.approx(1.0)
        assert abs(table.loc[enc, "spearman_geo_noise"]) < 0.8
    md = (tmp_path / "seed_sensitivity.md").read_text()
    assert "**Smallest seed-to-seed spread in detection rate:** `whitened`" in md
    assert "**Smallest seed-to-seed spread in perplexity:** `pca`" in md
    assert "**Best predictor of a bad seed:** `geo_bit_entropy`" in md
    assert "a low value flags a bad seed" in md
    assert "left out" in md and "2 left out" in md
    csv = pd.read_csv(tmp_path / "seed_sensitivity.csv", index_col=0)
    assert csv.loc["whitened", "detection_rate_std"] == pytest.approx(table.loc["whitened", "detection_rate_std"])
    for png in ("detection_rate_by_seed.png", "ppl_by_seed.png", "best_predictor.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_the_answer_follows_the_data(tmp_path):
    df = _sweep()
    df = df[df.status == "ok"].copy()
    # make dead bits the exact (negative) driver instead, and swap which encoder is steady
    df["geo_dead_bits"] = -df["geo_bit_entropy"]
    df["geo_bit_entropy"] = np.random.default_rng(1).normal(size=len(df))
    steady = df.encoder_kind == "whitened"
    df.loc[steady, "detection_rate"] = 0.5 + 10 * (df.loc[steady, "detection_rate"] - 0.5)
    seed_sensitivity_report(df, tmp_path)
    md = (tmp_path / "seed_sensitivity.md").read_text()
    assert "**Best predictor of a bad seed:** `geo_dead_bits`" in md
    assert "a high value flags a bad seed" in md
    assert "detection rate:** `pca`" in md


def test_without_geometry_or_seeds(tmp_path):
    df = pd.DataFrame({"seed": [0], "encoder_kind": ["simhash"], "detection_rate": [0.9], "auc": [0.95], "ppl_wm_mean": [12.0]})
    table = seed_sensitivity_report(df, tmp_path)
    md = (tmp_path / "seed_sensitivity.md").read_text()
    assert "not measurable" in md and "No `geo_*` metrics" in md
    assert table.loc["simhash", "n_seeds"] == 1
    with pytest.raises(ValueError, match="encoder_kind"):
        seed_sensitivity_report(pd.DataFrame({"seed": [0], "detection_rate": [1.0]}), tmp_path)


def test_holm_adjusts_for_every_metric_looked_at():
    from moewm.evaluation.seed_report import holm

    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")})
    assert adjusted["a"] == pytest.approx(0.03) and adjusted["c"] == pytest.approx(0.06) and adjusted["b"] == pytest.approx(0.06)
    assert np.isnan(adjusted["d"])


def test_a_best_predictor_found_among_noise_is_reported_with_n_and_its_corrected_p(tmp_path):
    rng = np.random.default_rng(3)
    rows = [{"seed": s, "encoder_kind": "simhash", "status": "ok", "detection_rate": rng.uniform(),
             **{f"geo_noise_{i}": rng.normal() for i in range(20)}} for s in range(10)]
    seed_sensitivity_report(pd.DataFrame(rows), tmp_path)
    md = (tmp_path / "seed_sensitivity.md").read_text()
    assert "20 metrics looked at" in md and "n = 10 seeds" in md and "Holm-adjusted over 20 metrics" in md
    assert "not significant" in md
    assert (tmp_path / "best_predictor.png").stat().st_size > 1000
