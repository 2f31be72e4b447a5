"""The routing goal's verdicts, design by design, from small hand-made tables (each criterion can fail alone)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from moewm.evaluation.routing_goal import REFERENCE, goal_table, markdown, spoofing_extras, stopped_by, validity_verdict


def sweep_table() -> pd.DataFrame:
    rows = {
        "good": ("moe_tournament", 4, 0.95, 0.02),
        "fragile": ("moe_tournament", 20, 0.70, 0.05),
        "twin": ("moe_tournament", 0, 0.97, 0.01),
        "unmeasured": ("moe_tournament", 10, 0.92, 0.03),
        REFERENCE: ("synthid", np.nan, 0.98, 0.01),
    }
    return pd.DataFrame({p: {"scheme": s, "tournament_routing_layers": r, "tournament_layers": 20, "tournament_block_bits": 8,
                             "attacked_substitution_0p3": v, "attacked_substitution_0p3_sem": e} for p, (s, r, v, e) in rows.items()}).T


def stealing_rows() -> pd.DataFrame:
    rows = []
    for scheme, shares in {"good": (0.0, 0.02, 0.05), "fragile": (0.0, 0.01, 0.02), "twin": (0.3, 0.5, 0.7), REFERENCE: (0.3, 0.6, 0.75)}.items():
        for count, share in zip((250, 1000, 4000), shares):
            rows.append({"scheme": scheme, "mode": "spoof", "attacker": "text_only", "delta_att": 8.0, "count": count, "texts": 64, "detected": share})
        rows.append({"scheme": scheme, "mode": "plain", "attacker": "none", "delta_att": 0.0, "count": 0, "texts": 64, "detected": 0.0})
    return pd.DataFrame(rows)


def validity(kind: str, inside: int) -> dict:
    rows = [{"detector": kind, "origin": "all", "held_out": False, "level": level, "keys": 10, "keys_inside": inside,
             "dispersion_ratio": 1.1, "dispersion_p": 0.3} for level in (0.01, 0.001)]
    rows.append({"detector": kind + "_model_null", "origin": "all", "held_out": False, "level": 0.01, "keys": 10, "keys_inside": 3,
                 "dispersion_ratio": 9.0, "dispersion_p": 0.0})  # another detector's row: not the deployed one's gate
    return {"watermark": {"kind": kind}, "summary": rows}


def test_spoofing_is_read_at_the_largest_corpus_with_its_binomial_error():
    extras = spoofing_extras(stealing_rows())
    assert extras.loc["twin", "spoof_text_only"] == 0.7 and extras.loc["twin", "spoof_n"] == 4000
    assert extras.loc["twin", "spoof_text_only_sem"] == pytest.approx(np.sqrt(0.7 * 0.3 / 64))


def test_the_validity_gate_reads_the_deployed_detector_only():
    assert validity_verdict(validity("moe_tournament", 10))["valid"]
    assert not validity_verdict(validity("moe_tournament", 9))["valid"]


def test_a_key_below_its_interval_is_conservative_and_one_above_is_not_valid():
    below = validity("moe_tournament", 9)
    for r in below["summary"]:
        r["keys_above"] = 0
    verdict = validity_verdict(below)
    assert verdict["valid"] and verdict["keys_inside"] == 9 and verdict["keys_above"] == 0
    above = validity("moe_tournament", 9)
    above["summary"][1]["keys_above"] = 1  # one key flags too much at 1e-3
    above["summary"][0]["keys_above"] = 0
    assert not validity_verdict(above)["valid"]


def test_each_criterion_stops_a_design_on_its_own():
    valid = pd.DataFrame({p: {"valid": True, "keys_inside": 10, "keys": 10, "dispersion": 1.0} for p in ("good", "fragile", "twin")}).T
    goal = goal_table("m", sweep_table(), stealing_rows(), valid).set_index("point")
    assert stopped_by(goal.loc["good"]) == ""  # 0.95 >= 0.90, 0.05 <= 0.1 x 0.75, valid
    assert stopped_by(goal.loc["fragile"]) == "robust"  # secret and valid, but 0.70 after substitution
    assert stopped_by(goal.loc["twin"]) == "secret"  # robust, but spoofed as often as the reference
    assert stopped_by(goal.loc["unmeasured"]) == "secret (not run), valid (not run)"  # never a pass by default
    assert goal.loc["good", "spoof_ratio"] == pytest.approx(0.05 / 0.75)
    invalid = valid.copy()
    invalid.loc["good", "valid"] = False
    assert stopped_by(goal_table("m", sweep_table(), stealing_rows(), invalid).set_index("point").loc["good"]) == "valid"


def test_the_verdict_needs_every_model():
    valid = pd.DataFrame({"good": {"valid": True, "keys_inside": 10, "keys": 10, "dispersion": 1.0}}).T
    one = goal_table("a", sweep_table(), stealing_rows(), valid)
    assert "Meets the goal on every model: `good`." in markdown(one)
    other = sweep_table()
    other.loc["good", "attacked_substitution_0p3"] = 0.8
    both = pd.concat([one, goal_table("b", other, stealing_rows(), valid)], ignore_index=True)
    assert "No design meets the goal on every model." in markdown(both)


def test_a_stealing_corpus_names_its_design_by_trade_off_point_before_any_weights_load():
    run = subprocess.run([sys.executable, "scripts/stealing_corpora.py", "--point", "tournament_m20_b8_nope", "--count", "1"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "trade-off point 'tournament_m20_b8_nope' does not exist: allowed values" in run.stderr
    run = subprocess.run([sys.executable, "scripts/stealing_corpora.py", "--point", "synthid_n3_k20", "--watermark", "{}"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "--point and --watermark both name the design" in run.stderr


def test_a_point_leaves_the_front_only_beyond_the_noise_on_some_axis():
    from moewm.evaluation.tradeoff import noisy_front

    axes = np.array([[0.0, 0.0, 0.0], [0.05, 0.05, 0.05], [0.5, 0.0, 0.0], [np.nan, 0.0, 0.0]])  # lower is better
    assert noisy_front(axes, np.zeros_like(axes)).tolist() == [True, False, False, False]
    se = np.full_like(axes, 0.1)  # the second point is within the noise of the first everywhere: tied, kept
    assert noisy_front(axes, se).tolist() == [True, True, False, False]


def test_the_spoofing_front_compares_points_at_the_largest_corpus_only():
    from moewm.evaluation.routing_goal import spoofing_front

    table = sweep_table().assign(ppl_cost=0.0, ppl_cost_sem=0.01)
    rows = stealing_rows()
    rows = rows[~((rows["scheme"] == "fragile") & (rows["count"] == 4000))]  # its curve stops at 1,000
    front = spoofing_front("m", table, rows).set_index("point")
    assert "fragile" not in front.index and set(front["spoof_n"]) == {4000}
    assert front.loc["good", "on_front"] and front.loc[REFERENCE, "on_front"]  # secret vs robust: both kept
    assert not front.loc["twin", "on_front"]  # as robust as the reference within the noise, no less spoofed


def test_spoofing_is_compared_at_the_same_corpus_size():
    from moewm.evaluation.routing_goal import spoofing_by_count

    rows = stealing_rows()
    rows = rows[~((rows["scheme"] == "good") & (rows["count"] == 4000))]
    wide = spoofing_by_count(rows)
    assert list(wide.columns[:2]) == ["spoof_text_only_n250", "spoof_text_only_n250_sem"]
    assert np.isnan(wide.loc["good", "spoof_text_only_n4000"]) and wide.loc["twin", "spoof_text_only_n4000"] == 0.7
    assert wide.loc["good", "spoof_text_only_n1000"] == 0.02
