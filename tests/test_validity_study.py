"""The validity study's bookkeeping (moewm.evaluation.validity), without a model: which origins it scores,
the dispersion ratio of per-key shares, and the per-origin summary it reports."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from moewm.evaluation.validity import (
    GENERATED_ORIGINS,
    dispersion_p,
    dispersion_ratio,
    main,
    markdown,
    rate_row,
    study_origins,
    summarize,
)
from moewm.null_corpora import HELD_OUT_CORPORA, HUMAN_CORPORA


def test_held_out_corpora_are_scored_by_default_and_can_be_left_out():
    default = study_origins()
    assert default == [*GENERATED_ORIGINS, *HUMAN_CORPORA, *HELD_OUT_CORPORA]
    assert study_origins(held_out=False) == [*GENERATED_ORIGINS, *HUMAN_CORPORA]
    assert study_origins(only=list(reversed(HELD_OUT_CORPORA))) == list(HELD_OUT_CORPORA)  # the study's order
    with pytest.raises(ValueError, match="unknown \\['wikipedia'\\]"):
        study_origins(only=["wikipedia"])
    with pytest.raises(ValueError, match="held out, but --no-held-out"):
        study_origins(held_out=False, only=[HELD_OUT_CORPORA[0]])
    with pytest.raises(ValueError, match="empty"):
        study_origins(only=[])


def test_bad_origins_are_refused_before_any_model_loads(capsys):
    with pytest.raises(SystemExit):
        main(["--origins", "jargon_file,wikipedia"])
    assert "wikipedia" in capsys.readouterr().err


def test_dispersion_ratio_of_the_issue_counts_is_about_twice_the_binomial():
    """A measured case: shares 1, 9, 5, 1, 1, 4, 13, 1, 5, 14 of 495 at 0.01 have sd 5.0 counts against 2.2."""
    k = np.array([1, 9, 5, 1, 1, 4, 13, 1, 5, 14])
    n = np.full(10, 495)
    ratio = dispersion_ratio(k, n, 0.01)
    assert ratio == pytest.approx(np.std(k, ddof=1) / np.sqrt(495 * 0.01 * 0.99))
    assert 2.2 < ratio < 2.3
    assert dispersion_p(ratio, 10) < 1e-4  # far more spread than independent binomial draws give


def test_dispersion_ratio_is_one_for_binomial_draws_and_zero_for_equal_shares():
    rng = np.random.default_rng(0)
    n = rng.integers(400, 600, size=10)  # per-key n may differ
    squares = [dispersion_ratio(rng.binomial(n, 0.01), n, 0.01) ** 2 for _ in range(4000)]
    assert np.mean(squares) == pytest.approx(1.0, abs=0.05)  # E[s^2] = sigma^2: the ratio is 1 on average
    assert dispersion_ratio([5] * 10, [500] * 10, 0.01) == pytest.approx(0.0, abs=1e-12)
    # a key-by-genre effect: each key's rate itself drawn around the nominal one
    rates = rng.gamma(2.0, 0.005, size=(400, 10))
    over = [dispersion_ratio(rng.binomial(500, r), np.full(10, 500), 0.01) for r in rates]
    assert np.median(over) > 1.3
    p = [dispersion_p(dispersion_ratio(rng.binomial(500, 0.01, 10), np.full(10, 500), 0.01), 10) for _ in range(2000)]
    assert np.mean(np.array(p) <= 0.05) == pytest.approx(0.05, abs=0.02)  # the chi-square p is calibrated


def test_dispersion_ratio_refuses_bad_input():
    assert np.isnan(dispersion_ratio([3], [100], 0.01))
    with pytest.raises(ValueError, match="level=0"):
        dispersion_ratio([1, 2], [10, 10], 0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        dispersion_ratio([1, 20], [10, 10], 0.01)
    with pytest.raises(ValueError, match="same length"):
        dispersion_ratio([1, 2], [10], 0.01)


def _rows(counts: dict[str, list[int]], n: int, level: float) -> list[dict]:
    rows = []
    for origin, ks in counts.items():
        for key, k in enumerate(ks):
            p = np.ones(n)
            p[:k] = level / 2
            rows.append({"key": key, "detector": "moe_lsh", "origin": origin, "level": level, **rate_row(p, level)})
    return rows


def test_summary_counts_keys_inside_and_reports_dispersion_per_origin():
    n, level = 495, 0.01
    hi = int(binom.ppf(0.995, n, level))
    held = HELD_OUT_CORPORA[0]
    rows = _rows({"all": [5] * 10, "greedy": [5, 4, 6, 5, 5, 4, 6, 5, 5, 5], held: [1, 9, 5, 1, 1, 4, 13, 1, 5, 14]}, n, level)
    summary = {s["origin"]: s for s in summarize(rows)}
    assert summary[held]["held_out"] and not summary["greedy"]["held_out"]
    assert summary[held]["keys_above"] == sum(k > hi for k in [1, 9, 5, 1, 1, 4, 13, 1, 5, 14]) == 2
    assert summary[held]["keys_inside"] == 8 and summary["greedy"]["keys_inside"] == 10
    assert summary[held]["dispersion_ratio"] > 2 > 1 > summary["greedy"]["dispersion_ratio"]
    assert summary["all"]["dispersion_ratio"] == pytest.approx(0.0, abs=1e-12)
    table = markdown({"rows": rows, "n_texts": n, "texts": {"greedy": n, held: n}, "keys": 10, "reference_keys": 999})
    assert f"| moe_lsh | 0.01 | {held} (held out) | 495 | 8/10 (2) | [0, {hi}] | 1, 9, 5, 1, 1, 4, 13, 1, 5, 14 | 2.26" in table


def test_any_scheme_can_be_the_deployed_design_and_none_is_refused_before_weights_load(capsys):
    import argparse

    from moewm.evaluation.validity import study_configs

    def args(watermark, extractor="{}", encoder="{}"):
        return argparse.Namespace(extractor=extractor, encoder=encoder, watermark=watermark, reference_keys=999)

    _, _, synthid = study_configs(args('{"kind": "synthid", "synthid": {"ngram_len": 3}}'))
    assert (synthid.kind, synthid.synthid.ngram_len) == ("synthid", 3)
    _, _, twin = study_configs(args('{"kind": "moe_tournament", "statistic": "green", "tournament": {"routing_layers": 0}}'))
    assert twin.tournament.routed_layers == 0 and twin.tournament.context_tokens == 2
    top1, _, _ = study_configs(args(None, extractor='{"use_top_k": true, "k": 1}'))  # the top-1 expert as the routing feature
    assert top1.use_top_k and top1.k == 1
    _, free, lsh = study_configs(args('{"kind": "moe_lsh"}', encoder='{"green_lists": "vote", "context_tokens": 1, "routing_free": true}'))
    assert free.routing_free and lsh.kind == "moe_lsh"  # MoE-LSH's routing-free twin
    _, _, kgw = study_configs(args('{"kind": "kgw", "kgw": {"context_width": 4}}'))
    assert kgw.kgw.context_width == 4
    with pytest.raises(SystemExit):
        main(["--watermark", '{"kind": "none"}'])
    assert "allowed values are the watermarking schemes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--watermark", '{"kind": "moe_tournament", "tournament": {"routing_layers": 0, "context_tokens": 0}}'])
    assert "routing_layers=0 needs watermark.tournament.context_tokens >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--extractor", '{"token_idx": 0}'])
    assert "extractor.token_idx=0: allowed range is [-64, -1]" in capsys.readouterr().err
