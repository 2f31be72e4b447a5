"""The key-validity study: each key's p-value among the others, the spread of false-positive shares over keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moewm.engine.scoring import leave_one_out_p_values
from moewm.evaluation.key_validity import gate_pass_chance, main, spread_row


def _brute_force(stats: np.ndarray) -> np.ndarray:
    r, b = stats.shape
    p = np.ones((r, b))
    for j in range(r):
        for t in range(b):
            if np.isnan(stats[j, t]):
                continue
            others = np.delete(stats[:, t], j)
            p[j, t] = (1 + np.sum(others[~np.isnan(others)] >= stats[j, t])) / r
    return p


def test_each_key_is_ranked_among_the_others_ties_and_nans_as_calibration_counts_them():
    gen = np.random.default_rng(0)
    stats = gen.integers(0, 6, size=(30, 12)).astype(float)  # many ties
    stats[3, 2] = np.nan  # a NaN statistic gets 1 and never counts as a reference
    stats[7, 5] = np.nan
    p = leave_one_out_p_values(torch.from_numpy(stats)).numpy()
    np.testing.assert_array_equal(p, _brute_force(stats))
    with pytest.raises(ValueError, match="at least 2 keys"):
        leave_one_out_p_values(torch.zeros(1, 4))


def test_independent_texts_give_a_spread_of_one_and_shared_units_a_wider_one():
    """Exchangeable keys on independent texts: every key's share near the nominal rate, dispersion about 1. Texts
    that share units (a key's luck on a unit reaches every text holding it) spread the keys' shares: the study must
    see it. Fixed seeds; either check can fail."""
    gen = np.random.default_rng(1)
    keys, texts, level = 1000, 3000, 0.01
    independent = gen.standard_normal((keys, texts))
    row = spread_row(leave_one_out_p_values(torch.from_numpy(independent)).numpy(), level)
    assert abs(row["mean_share"] - level) < 1e-3
    assert 0.9 < row["dispersion_ratio"] < 1.1, row["dispersion_ratio"]
    assert row["keys_above"] <= 15  # 0.5 % of 1000 expected
    units = gen.integers(0, 40, size=(texts, 3))  # each text holds 3 of 40 shared units, and its own noise
    luck = gen.standard_normal((keys, 40))
    shared = luck[:, units].sum(-1) + 2.0 * gen.standard_normal((keys, texts))
    wide = spread_row(leave_one_out_p_values(torch.from_numpy(shared)).numpy(), level)
    assert abs(wide["mean_share"] - level) < 1e-3  # still exact over the draw of the key
    assert wide["dispersion_ratio"] > 2.0 and wide["keys_above"] > 50, wide["dispersion_ratio"]


def test_the_gate_passes_when_ten_keys_all_fall_inside_at_every_level():
    rows = [{"inside": [True] * 9 + [False]}, {"inside": [True] * 8 + [False, True]}]
    assert gate_pass_chance(rows, keys=10) == pytest.approx(0.8**10)
    assert gate_pass_chance([{"inside": [True] * 4}]) == 1.0


def test_bad_arguments_are_named_before_any_weights_load(capsys):
    for argv, message in ((["--corpora", "kjv,nope"], "unknown"), (["--keys", "1"], "--keys=1"),
                          (["--reference-keys", "999"], "allowed range is >= 1000"),
                          (["--watermark", '{"tournament": {"layers": 0}}'], "layers")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
