"""The collision rate that measures how much of the routing key text predicts: exact on constructed cases."""
import numpy as np
import pytest

from moewm.evaluation.routing_predictability import collision_rate, context_ids, predictability


def test_a_code_determined_by_its_context_collides_always_and_an_independent_one_at_the_random_rate():
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, 50, size=20000)
    assert collision_rate(ctx, ctx % 7) == 1.0
    random_codes = rng.integers(0, 4, size=20000)
    assert collision_rate(ctx, random_codes) == pytest.approx(0.25, abs=0.01)  # sum of p(code)^2 for 4 equal codes
    assert collision_rate(np.zeros(20000, dtype=int), random_codes) == pytest.approx(0.25, abs=0.01)
    assert np.isnan(collision_rate(np.arange(10), np.zeros(10)))  # no context repeats: nothing to measure


def test_contexts_of_more_tokens_split_positions_the_earlier_token_tells_apart():
    before = np.array([[1, 5], [2, 5], [1, 5], [-1, 5]])
    assert len(set(context_ids(before, 1))) == 1 and len(set(context_ids(before, 2))) == 3
    assert set(context_ids(before, 0)) == {0}
    codes = np.array([[0, 1], [1, 1], [0, 1], [1, 1]])  # layer 0 follows the token two before; layer 1 is constant
    out = predictability(codes, before)
    assert out["collision_ctx2"] == 1.0 and out["repeated_contexts_ctx2"] == 1 and out["positions_in_repeated_ctx2"] == 2
    assert out["collision_ctx1"] == pytest.approx((4 / 12 + 1) / 2)  # layer 0: 2 equal of 6 pairs (x2 ordered); layer 1: all
