"""The trade-off study: its preset and points compose, one job scores several attacks (each with its
null), bad attack specs and oracles fail before weights load, and the report's Pareto fronts and headline
follow from the numbers (synthetic summaries whose answers are known by construction)."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from composing import app_config, compose_config
from moewm.app.main import CONF_DIR
from moewm.config import AttackSpec, parse_attack_specs, routing_free_twin
from moewm.evaluation.attack_suite import censored_tokens_to_detect
from moewm.config import ATTACK_KINDS, ConfigError
from moewm.app.schema import register, to_app_config, validate_app
from moewm.evaluation.routing_adds import markdown as routing_adds_markdown
from moewm.evaluation.routing_adds import holds_no_routing, routing_adds, twin_pairs
from moewm.evaluation.tradeoff import aggregate, fronts, headline, key_spread, objectives, pareto_front, ties, tradeoff_report

os.environ.setdefault("MOEWM_SECRET_KEY", "tradeoff-test-secret")
register()
POINTS = sorted(p.stem for p in (Path(CONF_DIR) / "tradeoff").glob("*.yaml"))


# -- config -----------------------------------------------------------------------------------------
def test_the_preset_sweeps_every_point_over_keys_and_scores_the_attack_suite():
    cfg = compose_config(["experiment=tradeoff"], hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["tradeoff"] == "glob(*)" and params["seed"].startswith("range(")
    app = to_app_config(compose_config(["experiment=tradeoff", f"tradeoff={POINTS[0]}"]))
    validate_app(app)
    specs = {a.suffix for a in parse_attack_specs(app.eval.attacks)}
    assert {"substitution_0p1", "substitution_0p3", "deletion_0p1"} <= specs
    assert any(s.startswith("copy_paste") for s in specs) and any(s.startswith("paraphrase") for s in specs)
    assert "retokenisation_1" in specs  # detection from the published text: the round trip as an attack
    assert app.eval.null_sets, "every detection number needs its null sets"


# Point-name tokens of the design-search families and the pool design they use.
DESIGN_POOLS = {"rpart": "random_partition", "bits": "partition", "vote5": "partition", "vote9": "partition",
                "ctx": "partition", "margin2": "partition"}


@pytest.mark.parametrize("point", POINTS)
def test_every_tradeoff_point_composes_and_validates(point):
    app = to_app_config(compose_config(["experiment=tradeoff", f"tradeoff={point}"]))
    validate_app(app)
    kind = point.split("_")[0]
    assert app.watermark.kind == {"lsh": "moe_lsh", "kgw": "kgw", "synthid": "synthid", "tournament": "moe_tournament"}[kind]
    # A point starts from its scheme's own option, not from the default scheme's: a green-list point run on top of the
    # tournament default once inherited its `green` statistic (73 tokens to detect instead of 27).
    assert app.watermark.statistic == app_config([f"watermark={app.watermark.kind}"]).watermark.statistic
    if kind == "kgw":  # kgw_g025_d2 -> gamma 0.25, delta 2
        gamma, delta = point.split("_")[1:3]
        assert app.watermark.kgw.gamma == pytest.approx(float("0." + gamma[2:]))
        assert app.watermark.delta == float(delta[1:])
    if kind == "lsh":  # lsh_<pools>_..., or lsh_<family>_... on the semantic partition (the design-search points)
        name = point.split("_")[1]
        assert app.encoder.pools == DESIGN_POOLS.get(name, name)
        if name in ("bits", "vote5", "vote9"):
            assert app.encoder.green_lists == ("bits" if name == "bits" else "vote")
            assert name == "bits" or app.encoder.vote_lists == int(name[4:])
        if "ctx" in point:
            assert app.encoder.context_tokens == 1
        if "margin2" in point:
            assert app.watermark.margin_bits == 2
    if kind == "kgw":  # kgw_g025_d2[_h<w> | _self<w>] -> lefthash / selfhash over w tokens (lefthash 1 without a suffix)
        suffix = point.split("_")[3] if point.count("_") > 2 else "h1"
        scheme, width = ("selfhash", suffix[4:]) if suffix.startswith("self") else ("lefthash", suffix[1:])
        assert (app.watermark.kgw.seeding_scheme, app.watermark.kgw.context_width) == (scheme, int(width))
    if kind == "synthid":  # synthid[_n<n>]_k<layers> -> ngram_len n (5 without it), layers tournament layers
        parts = point.split("_")[1:]
        assert app.watermark.synthid.ngram_len == (int(parts[0][1:]) if len(parts) > 1 else 5)
        assert app.watermark.synthid.num_keys == int(parts[-1][1:])
    if kind == "tournament":  # tournament_m20_b4[_ctx<c>][_noskip][_twin | _r<k> | _top1 | _common<k>k] -> 20 layers of 4 bits, ...
        base, routed = point, None
        common = None  # _common<k>k: the routing read only after the k x 1,024 most common token contexts
        if "_common" in point:
            base, count = point.split("_common")
            common = int(count[:-1]) * 1024
            point = base
        assert app.watermark.tournament.routed_contexts == common
        top1 = point.endswith("_top1")  # the routing feature: each MoE layer's top-1 expert, not its whole distribution
        assert (app.extractor.use_top_k, app.extractor.k if top1 else 1) == (top1, 1)
        if top1:
            base = point[: -len("_top1")]
        elif point.endswith("_twin"):  # the routing-free twin: no layer keyed by routing
            base, routed = point[: -len("_twin")], 0
        elif "_r" in point:  # _r<k>: the first k layers keyed by routing, the others by the tokens alone
            base, routed = point.rsplit("_r", 1)[0], int(point.rsplit("_r", 1)[1])
        assert app.watermark.tournament.routing_layers == routed
        layers, bits = base.split("_")[1:3]
        assert (app.watermark.tournament.layers, app.watermark.tournament.block_bits) == (int(layers[1:]), int(bits[1:]))
        assert app.watermark.tournament.skip_repeated == (not base.endswith("_noskip"))
        context = base.rsplit("_ctx", 1)[1] if "_ctx" in base else None  # _ctx: the token before; _ctx2: the two before
        assert app.watermark.tournament.context_tokens == (0 if context is None else int(context or 1))
        assert app.encoder.context_tokens == 0  # the tournament's token context is its own setting


@pytest.mark.parametrize("preset", ["design_search", "routing_study"])
def test_the_routing_presets_sweep_existing_points_over_keys(preset):
    params = compose_config([f"experiment={preset}"], hydra_config=True).hydra.sweeper.params
    points = params["tradeoff"].split(",")
    assert set(points) <= set(POINTS) and {"kgw_g025_d2", "synthid_k20", "tournament_m20_b8_ctx2"} <= set(points)
    assert params["seed"].startswith("range(")


@pytest.mark.parametrize("preset", ["design_search", "routing_study", "tradeoff"])
def test_the_presets_run_every_routing_point_beside_its_routing_free_twin(preset):
    """What routing adds is measured against the same design without routing: a routing tournament with a token
    context is never swept without its twin (routing_free_twin of its config), and the baselines span their settings."""
    params = compose_config([f"experiment={preset}"], hydra_config=True).hydra.sweeper.params
    points = POINTS if params["tradeoff"] == "glob(*)" else params["tradeoff"].split(",")
    apps = {p: to_app_config(compose_config([f"experiment={preset}", f"tradeoff={p}"])) for p in points}
    configs = {p: a.watermark for p, a in apps.items()}
    twins = {p: c for p, c in configs.items() if c.kind == "moe_tournament" and c.tournament.routed_layers == 0}
    for point, cfg in configs.items():
        if cfg.kind == "moe_tournament" and cfg.tournament.routed_layers > 0 and cfg.tournament.context_tokens >= 1:
            want, _ = routing_free_twin(cfg, apps[point].encoder)
            assert any(t.tournament.context_tokens == want.tournament.context_tokens and t.tournament.layers == want.tournament.layers
                       and t.tournament.skip_repeated == want.tournament.skip_repeated and t.statistic == want.statistic
                       for t in twins.values()), f"{preset}: {point} runs without its routing-free twin"
    lsh_twins = [(a.watermark, a.encoder) for a in apps.values() if a.watermark.kind == "moe_lsh" and a.encoder.routing_free]
    for point, app in apps.items():
        if app.watermark.kind == "moe_lsh" and app.encoder.context_tokens == 1 and not app.encoder.routing_free:
            assert routing_free_twin(app.watermark, app.encoder) in lsh_twins, f"{preset}: {point} runs without its routing-free twin"
    assert {3, 5} <= {c.synthid.ngram_len for c in configs.values() if c.kind == "synthid"}
    assert {1, 4} <= {c.kgw.context_width for c in configs.values() if c.kind == "kgw"}
    if preset in ("routing_study", "design_search"):  # the whole baseline grid, tuned over its own settings
        assert {2, 3, 4, 5} <= {c.synthid.ngram_len for c in configs.values() if c.kind == "synthid"}
        grid = {(c.kgw.seeding_scheme, c.kgw.context_width) for c in configs.values() if c.kind == "kgw"}
        assert {(s, h) for s in ("lefthash", "selfhash") for h in (1, 2, 4)} <= grid
    if preset == "routing_study":
        assert params["seed"] == "range(3)"


def test_the_reference_point_of_the_headline_exists():
    assert "kgw_g025_d2" in POINTS
    assert "lsh_partition_d2" in POINTS  # the default design


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("subst:0.3", "allowed values are"),
        ("substitution:1.5", "allowed range is [0, 1]"),
        ("substitution:lots", "is not a number"),
        ("none:0.1", "allowed values are"),
    ],
)
def test_a_bad_attack_spec_fails_before_weights_load_naming_the_key(spec, needle):
    app = to_app_config(compose_config(["model=micro_moe", f"eval.attacks=[deletion:0.1,{spec}]"]))
    with pytest.raises(ConfigError) as err:
        validate_app(app)
    msg = str(err.value)
    assert "eval.attacks[1]" in msg and needle in msg
    if "values" in needle:
        assert all(a in msg for a in ATTACK_KINDS if a != "none")


def test_repeated_attack_specs_and_unknown_oracles_are_refused():
    with pytest.raises(ConfigError, match="more than once"):
        parse_attack_specs(["substitution:0.3", "substitution:0.30"])
    app = to_app_config(compose_config(["model=micro_moe", "eval.oracle_model=gpt5"]))
    with pytest.raises(ConfigError, match=r"eval.oracle_model='gpt5': allowed values are .*qwen_dense"):
        validate_app(app)
    validate_app(to_app_config(compose_config(["model=micro_moe", "eval.oracle_model=qwen_dense"])))  # a name only: no weights


def test_attack_spec_suffixes_name_the_strength():
    assert [a.suffix for a in parse_attack_specs(["substitution:0.3", "copy_paste:0.75", "deletion", "swap:1"])] == \
        ["substitution_0p3", "copy_paste_0p75", "deletion_0p2", "swap_1"]
    assert AttackSpec("deletion", 0.0).suffix == "deletion_0"


def test_censored_tokens_to_detect_counts_never_detected_texts_as_infinitely_long():
    alpha = 0.01
    detected_at_3 = np.array([0.5, 0.2, 0.001, 0.001])
    never = np.array([0.5, 0.5, 0.5, 0.5])
    assert censored_tokens_to_detect([detected_at_3, detected_at_3, never], alpha) == 3
    assert censored_tokens_to_detect([detected_at_3, never, never], alpha) == np.inf


# -- one job on tiny_moe ----------------------------------------------------------------------------
SUITE = ["substitution:0", "substitution:0.3", "deletion:0.1", "copy_paste:0.5", "paraphrase:0.5", "retokenisation"]


@pytest.fixture(scope="module")
def suite_job(tmp_path_factory):
    from moewm.app.job import run_job

    tmp = tmp_path_factory.mktemp("suite")
    old = os.getcwd()
    os.chdir(tmp)  # the job's outputs/cache lives here
    try:
        app = to_app_config(compose_config([
            "data.num_prompts=4", "generation.max_new_tokens=20", "generation.min_new_tokens=20", "eval=minimal",
            "eval.null_sets=[greedy,human_docstrings]", "eval.null_texts=2", "logger=none", "progress=false",
            "watermark.reference_keys=99", "watermark.alpha=0.01", "attack=substitution", "attack.strength=0.3",
            "attack.paraphrase_max_new_tokens=8", f"eval.attacks=[{','.join(SUITE)}]",
        ]))
        return run_job(app, tmp / "job", run_name="suite", group=None)
    finally:
        os.chdir(old)
        from moewm.app import services

        services.PLAIN_GENERATIONS.clear()  # no cached plain generations for later tests that count forwards


@pytest.mark.slow
def test_one_job_scores_every_attack_of_the_suite_with_its_null(suite_job):
    m = suite_job
    assert m["status"] == "ok"
    for a in parse_attack_specs(SUITE):
        for key in ("detection_rate_attacked", "auc_attacked", "tpr_at_1pct_fpr_attacked", "attacked_changed_fraction"):
            assert 0.0 <= m[f"{key}_{a.suffix}"] <= 1.0, (key, a.suffix)
    # edits made without the key get their own null; copy_paste's input is plain text already
    for s in ("substitution_0p3", "deletion_0p1", "retokenisation_1"):
        assert 0.0 <= m[f"fpr_attacked_{s}"] <= 1.0 and m[f"n_attacked_null_{s}"] == 4
    assert "fpr_attacked_copy_paste_0p5" not in m and "fpr_attacked_paraphrase_0p5" not in m
    assert m["perplexity_judge"] == "generator:tiny_moe"
    assert np.isfinite(m["tokens_to_detect_alpha_censored"]) or m["never_detected_alpha"] >= 0.5


@pytest.mark.slow
def test_the_suite_agrees_with_the_single_attack_group_and_strength_zero_changes_nothing(suite_job):
    m = suite_job
    # attack=substitution attack.strength=0.3 and the suite's substitution:0.3 are the same edit, same seed
    assert m["detection_rate_attacked_substitution_0p3"] == m["detection_rate_attacked"]
    assert m["p_attacked_median_substitution_0p3"] == pytest.approx(m["p_attacked_median"])
    assert m["attacked_changed_fraction_substitution_0"] == 0.0
    assert m["detection_rate_attacked_substitution_0"] == m["detection_rate"]
    assert m["attacked_changed_fraction_substitution_0p3"] == 1.0


# -- aggregation, fronts, headline ------------------------------------------------------------------
def _job(point, seed, kind, cost, ttd, sub03, **extra):
    row = {"status": "ok", "override.tradeoff": point, "seed": seed, "watermark_kind": kind, "delta": 2.0, "alpha": 1e-3,
           "ppl_unwm_mean": 100.0, "ppl_wm_mean": 100.0 * (1 + cost), "tokens_to_detect_alpha_censored": ttd,
           "tokens_to_detect_alpha": ttd if np.isfinite(ttd) else 70.0, "never_detected_alpha": 0.0, "detection_rate": 1.0,
           "detection_rate_at_64": 1.0, "distinct_2_wm": 0.9, "distinct_2_unwm": 0.9, "model": "tiny_moe",
           "perplexity_judge": "generator:tiny_moe", "detection_rate_attacked_substitution_0p3": sub03,
           "detection_rate_attacked_deletion_0p1": 1.0, "fpr_attacked_substitution_0p3": 0.0, "fp_plain": 0, "n_plain": 16,
           "fp_greedy": 1 if seed == 0 else 0, "n_greedy": 16, "pools": "partition", "green_bits": 1, "start_layer_idx": 0,
           "routing_free": False}  # a flag every job records, whatever its scheme (run_settings)
    if kind == "kgw":
        row["kgw_gamma"] = extra.pop("gamma", 0.25)
    row.update(extra)
    return row


def _summary(lsh_cost=0.02, lsh_ttd=10.0, lsh_sub=0.8):
    rows = []
    for s in range(3):
        rows.append(_job("kgw_g025_d2", s, "kgw", 0.03 + 0.01 * s, 12.0 + s, 0.6))  # cost mean 0.04, ttd median 13, sub 0.6
        rows.append(_job("kgw_g050_d2", s, "kgw", 0.01, 20.0, 0.3, gamma=0.5))
        rows.append(_job("lsh_cheap", s, "moe_lsh", lsh_cost, lsh_ttd + s, lsh_sub))
        rows.append(_job("lsh_costly", s, "moe_lsh", 0.5, 5.0, 0.9))
        rows.append(_job("synthid_k20", s, "synthid", 0.0, 30.0, 0.2, synthid_num_keys=20))
    rows.append({"status": "failed", "override.tradeoff": "lsh_cheap", "seed": 9, "watermark_kind": "moe_lsh"})
    return pd.DataFrame(rows)


def test_aggregate_takes_key_statistics_per_point_and_pools_the_nulls():
    t = aggregate(_summary())
    assert set(t.index) == {"kgw_g025_d2", "kgw_g050_d2", "lsh_cheap", "lsh_costly", "synthid_k20"}
    k = t.loc["kgw_g025_d2"]
    assert k["keys"] == 3  # the failed job is left out
    assert k["ppl_cost"] == pytest.approx(0.04) and k["ppl_cost_min"] == pytest.approx(0.03) and k["ppl_cost_max"] == pytest.approx(0.05)
    assert k["tokens_to_detect"] == 13 and k["tokens_to_detect_min"] == 12 and k["tokens_to_detect_max"] == 14
    assert k["null_fp"] == 1 and k["null_n"] == 96 and k["null_fpr"] == pytest.approx(1 / 96)
    assert np.isnan(t.loc["synthid_k20", "delta"]) and t.loc["synthid_k20", "synthid_num_keys"] == 20
    assert np.isnan(t.loc["kgw_g025_d2", "pools"])  # KGW has no pool design
    assert np.isnan(t.loc["kgw_g025_d2", "routing_free"]) and t.loc["lsh_cheap", "routing_free"] is False  # a flag, NaN where moot


def test_ppl_cost_is_the_oracles_when_one_judged():
    df = _summary()
    df["ppl_oracle_wm_mean"], df["ppl_oracle_unwm_mean"], df["perplexity_judge"] = 22.0, 20.0, "oracle:qwen_dense"
    t = aggregate(df)
    assert t["ppl_cost"].to_numpy() == pytest.approx(0.1)
    assert set(t["perplexity_judge"]) == {"oracle:qwen_dense"}


def test_pareto_front_keeps_exactly_the_undominated_points():
    cost = np.array([0.0, 0.1, 0.1, 0.2, 0.3, 0.05, np.nan])
    ttd = np.array([30.0, 10.0, 12.0, 10.0, 5.0, 30.0, 1.0])  # lower is better
    assert pareto_front(cost, ttd, higher_is_better=False).tolist() == [True, True, False, False, True, False, False]
    rate = np.array([0.1, 0.5, 0.5, 0.9, 0.9, 0.1, 1.0])  # higher is better; a tie in both keeps both
    assert pareto_front(cost, rate, higher_is_better=True).tolist() == [True, True, True, True, False, False, False]
    assert pareto_front(np.array([0.0, 0.0]), np.array([np.inf, 3.0]), False).tolist() == [False, True]


def test_a_difference_inside_the_standard_error_is_a_tie_not_a_domination():
    cost, value = np.array([0.10, 0.12, 0.30]), np.array([0.90, 0.85, 1.00])  # higher is better
    assert pareto_front(cost, value, True).tolist() == [True, False, True]  # without errors: 0 dominates 1
    se_cost, se_value = np.array([0.05, 0.05, 0.0]), np.array([0.06, 0.06, 0.0])
    assert pareto_front(cost, value, True, se_cost, se_value).tolist() == [True, True, True]  # inside the noise: a tie
    far = np.array([0.90, 0.60, 1.00])  # 0.30 apart: beyond sqrt(2) x 0.06, so 0 dominates 1 again
    assert pareto_front(cost, far, True, se_cost, se_value).tolist() == [True, False, True]
    table = pd.DataFrame({"ppl_cost": cost, "ppl_cost_sem": se_cost, "rate": value, "rate_sem": se_value}, index=["a", "b", "c"])
    assert ties(table, "rate", True) == [("a", "b")]
    close = np.array([0.90, 0.85, 0.95])  # c's 0.05 more is inside a's error, a's 0.2 lower cost is not: a dominates c
    assert pareto_front(cost, close, True, se_cost, se_value).tolist() == [True, True, False]


def _tournament_table(extra_twin_rows: bool = True) -> pd.DataFrame:
    """Aggregated points: a routing tournament (b = 8), a mixed one, their twin, and SynthID."""
    base = {"scheme": "moe_tournament", "tournament_layers": 20, "tournament_context_tokens": 2, "tournament_skip_repeated": True}
    rows = {
        "tournament_m20_b8_ctx2": {**base, "tournament_block_bits": 8, "tournament_routing_layers": 20, "tokens_to_detect": 5.8,
                                   "tokens_to_detect_sem": 0.4, "ppl_cost": -0.19, "ppl_cost_sem": 0.08,
                                   "attacked_substitution_0p3": 0.59, "attacked_substitution_0p3_sem": 0.04},
        "tournament_m20_b8_ctx2_r10": {**base, "tournament_block_bits": 8, "tournament_routing_layers": 10, "tokens_to_detect": 4.0,
                                       "tokens_to_detect_sem": 0.3, "ppl_cost": -0.17, "ppl_cost_sem": 0.08,
                                       "attacked_substitution_0p3": 0.80, "attacked_substitution_0p3_sem": 0.05},
        "synthid_k20": {"scheme": "synthid", "tokens_to_detect": 5.0, "ppl_cost": 0.0, "attacked_substitution_0p3": 0.4},
    }
    if extra_twin_rows:
        rows["tournament_m20_b8_ctx2_twin"] = {**base, "tournament_block_bits": 8, "tournament_routing_layers": 0, "tokens_to_detect": 3.8,
                                               "tokens_to_detect_sem": 0.2, "ppl_cost": -0.17, "ppl_cost_sem": 0.06,
                                               "attacked_substitution_0p3": 0.97, "attacked_substitution_0p3_sem": 0.02}
    return pd.DataFrame.from_dict(rows, orient="index")


def test_each_routing_point_is_paired_with_its_twin_and_small_differences_are_ties():
    table = _tournament_table()
    assert twin_pairs(table) == [("tournament_m20_b8_ctx2", "tournament_m20_b8_ctx2_twin"),
                                 ("tournament_m20_b8_ctx2_r10", "tournament_m20_b8_ctx2_twin")]
    adds = routing_adds(table).set_index(["point", "column"])
    shipped = adds.loc["tournament_m20_b8_ctx2"]
    assert shipped.loc["attacked_substitution_0p3", "difference"] == pytest.approx(0.59 - 0.97)
    assert shipped.loc["attacked_substitution_0p3", "se"] == pytest.approx(np.hypot(0.04, 0.02))
    assert shipped.loc["attacked_substitution_0p3", "verdict"] == "twin better"
    assert shipped.loc["tokens_to_detect", "verdict"] == "twin better"  # 2.0 more tokens, s.e. 0.45
    assert shipped.loc["ppl_cost", "verdict"] == "tie"  # -2 points, s.e. 10
    extras = pd.DataFrame({"spoof_success": [0.02, 0.9], "spoof_success_sem": [0.01, 0.03]},
                          index=["tournament_m20_b8_ctx2", "tournament_m20_b8_ctx2_twin"])
    spoof = routing_adds(table, extras).set_index(["point", "column"]).loc[("tournament_m20_b8_ctx2", "spoof_success")]
    assert spoof["difference"] == pytest.approx(-0.88) and spoof["verdict"] == "routing better"  # less spoofing is better
    md = "\n".join(routing_adds_markdown(routing_adds(table)))
    assert "`tournament_m20_b8_ctx2` against `tournament_m20_b8_ctx2_twin`" in md and "twin better" in md
    assert twin_pairs(_tournament_table(extra_twin_rows=False)) == []
    assert "No routing point of this sweep has its routing-free twin" in "\n".join(routing_adds_markdown(routing_adds(_tournament_table(False))))


def test_a_green_list_routing_point_is_paired_with_its_routing_free_twin_and_only_that():
    lsh = {"scheme": "moe_lsh", "delta": 2.0, "pools": "partition", "green_lists": "vote", "green_bits": 1.0, "vote_lists": 5.0,
           "context_tokens": 1.0, "tokens_to_detect": 9.0, "ppl_cost": 0.1, "attacked_substitution_0p3": 0.5}
    table = pd.concat([_tournament_table(), pd.DataFrame.from_dict({
        "lsh_vote5_ctx_d2": {**lsh, "routing_free": False},
        "lsh_vote5_ctx_d2_twin": {**lsh, "routing_free": True, "attacked_substitution_0p3": 0.8},
        "lsh_rpart_ctx_d2": {**lsh, "pools": "random_partition", "green_lists": "hashed", "vote_lists": 1.0, "routing_free": False},
        "kgw_g025_d2": {"scheme": "kgw", "kgw_gamma": 0.25, "delta": 2.0, "tokens_to_detect": 20.0, "ppl_cost": 0.5,
                        "attacked_substitution_0p3": 0.7},
    }, orient="index")])
    pairs = twin_pairs(table)
    assert ("lsh_vote5_ctx_d2", "lsh_vote5_ctx_d2_twin") in pairs and len(pairs) == 3  # the random partition has no twin here
    adds = routing_adds(table).set_index(["point", "column"])
    assert adds.loc[("lsh_vote5_ctx_d2", "attacked_substitution_0p3"), "difference"] == pytest.approx(-0.3)
    assert holds_no_routing(table).to_dict() == {p: p.endswith("_twin") for p in table.index}
    candidates = headline(table).candidates
    assert "lsh_vote5_ctx_d2" in candidates and not {"lsh_vote5_ctx_d2_twin", "tournament_m20_b8_ctx2_twin"} & set(candidates)


def test_fronts_per_attack_from_the_table():
    f = fronts(aggregate(_summary()))
    assert set(f) == {"none", "substitution_0p3", "deletion_0p1"}
    assert set(f["none"]) == {"synthid_k20", "kgw_g050_d2", "lsh_cheap", "lsh_costly"}
    assert set(f["substitution_0p3"]) == {"synthid_k20", "kgw_g050_d2", "lsh_cheap", "lsh_costly"}


def test_headline_is_yes_when_a_cheaper_moe_lsh_point_detects_faster_and_survives_more():
    h = headline(aggregate(_summary()))
    assert h.answer is True and h.reference == "kgw_g025_d2" and h.winners == ["lsh_cheap"]


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(lsh_cost=0.06), "no routing point is at or below"),  # costs more than KGW (0.04)
        (dict(lsh_ttd=13.0), "do not beat it on both"),  # median 14 >= KGW's 13
        (dict(lsh_sub=0.6), "do not beat it on both"),  # a tie under substitution is not "more"
    ],
)
def test_headline_can_fail(change, reason):
    h = headline(aggregate(_summary(**change)))
    assert h.answer is False and reason in h.reason and not h.winners


def test_headline_is_not_computable_without_the_reference_or_the_attack():
    df = _summary()
    assert headline(aggregate(df[df["override.tradeoff"] != "kgw_g025_d2"])).answer is None
    assert headline(aggregate(df.drop(columns=["detection_rate_attacked_substitution_0p3"]))).answer is None


def test_key_spread_is_the_worst_decile_over_the_median_key():
    s = key_spread(pd.Series(np.arange(1, 21, dtype=float)))  # 1..20
    assert s["keys"] == 20 and s["median"] == 10.5 and s["worst_decile"] == 19.0  # sorted index ceil(0.9 * 19) = 18 of 0..19
    assert s["ratio"] == pytest.approx(s["worst_decile"] / 10.5)
    bad = key_spread(np.r_[np.full(17, 10.0), np.inf, np.inf, np.inf])  # three keys never detect half their texts
    assert bad["worst_decile"] == np.inf and bad["ratio"] == np.inf


def test_report_writes_table_markdown_and_one_plot_per_view(tmp_path):
    table, plots = tradeoff_report(_summary(), tmp_path)
    csv = pd.read_csv(tmp_path / "tradeoff.csv", index_col=0)
    assert csv.loc["lsh_cheap", "ppl_cost"] == pytest.approx(table.loc["lsh_cheap", "ppl_cost"])
    md = (tmp_path / "tradeoff.md").read_text()
    assert "## Headline" in md and "**Yes**" in md and "`lsh_cheap`" in md
    assert "Perplexity judge: the generator itself" in md
    assert sorted(p.name for p in plots) == ["tradeoff_deletion_0p1.png", "tradeoff_none.png", "tradeoff_substitution_0p3.png"]
    assert all(p.stat().st_size > 5000 for p in plots)


def test_a_sweep_summary_of_tradeoff_points_gets_the_report(tmp_path):
    from moewm.app.report import summarize

    for i, row in enumerate(_summary().to_dict("records")):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"tradeoff={row.pop('override.tradeoff')}", f"seed={row['seed']}"]))
        (job / "metrics.json").write_text(json.dumps({k: v for k, v in row.items() if not (isinstance(v, float) and np.isnan(v))}))
    df, plots = summarize(tmp_path)
    assert (tmp_path / "tradeoff.md").exists() and (tmp_path / "tradeoff.csv").exists()
    assert any(p.path.name == "tradeoff_none.png" for p in plots)


# -- seed sensitivity over pool designs -------------------------------------------------------------
def _seed_sweep(keys=20):
    rng = np.random.default_rng(1)
    rows = []
    for s in range(keys):
        bad = s in (3, 11)  # bad under anchors, because of its pools ...
        for pools, ttd in (("anchors", 40.0 if bad else 10.0 + rng.uniform(0, 2)),
                           ("partition", 10.0 + rng.uniform(0, 2)),  # ... which partition replaces
                           ("random", 40.0 if bad else 10.0 + rng.uniform(0, 2))):  # ... and random does not
            rows.append({"seed": s, "encoder_kind": "simhash", "pools": pools, "status": "ok", "detection_rate": 1.0 - ttd / 100,
                         "auc": 1.0, "ppl_wm_mean": 100.0, "tokens_to_detect_alpha_censored": ttd, "never_detected_alpha": 0.0})
    return pd.DataFrame(rows)


def test_seed_report_measures_key_spread_per_pool_design_and_says_which_fixes_bad_keys(tmp_path):
    from moewm.evaluation.key_spread import bad_key_follow_up, spread_table
    from moewm.evaluation.seed_report import seed_sensitivity_report

    df = _seed_sweep()
    spread = spread_table(df).set_index("pools")
    assert spread.loc["anchors", "ttd_ratio"] > 1.5 and not spread.loc["anchors", "target_met"]
    assert spread.loc["partition", "ttd_ratio"] <= 1.5 and spread.loc["partition", "target_met"]
    follow = bad_key_follow_up(df).set_index("pools")
    assert follow.loc["partition", "bad_keys"] == "3,11" and follow.loc["random", "bad_keys"] == "3,11"
    assert follow.loc["random", "bad_keys_ttd_over_median"] > 3 and follow.loc["partition", "bad_keys_ttd_over_median"] < 1.3
    table = seed_sensitivity_report(df, tmp_path)
    assert {"simhash/anchors", "simhash/partition", "simhash/random"} <= set(table.index)
    md = (tmp_path / "seed_sensitivity.md").read_text()
    assert "`simhash`: `partition` fixes the bad keys and meets the target" in md
    assert "`simhash`: `random` does not fix the bad keys" in md
    assert (tmp_path / "key_spread.csv").exists()


def test_a_pool_design_can_fix_the_seed_designs_bad_keys_yet_have_its_own():
    from moewm.evaluation.key_spread import bad_key_follow_up, markdown, spread_table

    df = _seed_sweep()
    own = (df["pools"] == "partition") & df["seed"].isin([5, 7])  # partition's own bad keys, others than anchors'
    df.loc[own, "tokens_to_detect_alpha_censored"] = 40.0
    md = markdown(spread_table(df), bad_key_follow_up(df))
    assert "`simhash`: `partition` fixes the bad keys of the seed's design, but has bad keys of its own" in md


def test_seed_sensitivity_preset_sweeps_pool_designs_and_encoders_over_twenty_keys():
    params = compose_config(["experiment=seed_sensitivity"], hydra_config=True).hydra.sweeper.params
    assert app_config(["experiment=seed_sensitivity"]).watermark.kind == "moe_lsh"  # pools and encoders key green lists
    assert set(params["encoder"].split(",")) == {"simhash", "centered", "whitened", "pca"}
    assert set(params["encoder.pools"].split(",")) == {"partition", "anchors", "random"}
    assert params["seed"] == "range(20)"


def test_ppl_cost_uses_geometric_means_of_the_jobs_samples_when_the_sweep_folder_has_them(tmp_path):
    df = _summary()
    df["job"] = [str(i) for i in range(len(df))]
    # job 0 (kgw_g025_d2, key 0): one text with a huge perplexity swings the arithmetic mean, not the geometric one
    (tmp_path / "0").mkdir()
    rows = [{"ppl_wm": 1000.0 if i == 0 else 10.0, "ppl_unwm": 10.0} for i in range(16)]
    (tmp_path / "0" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cost = aggregate(df, tmp_path).loc["kgw_g025_d2", "ppl_cost_max"]  # keys 1 and 2 keep their summary means (0.04, 0.05)
    assert cost == pytest.approx(np.exp(np.log(100.0) / 16) - 1)
    assert aggregate(df).loc["kgw_g025_d2", "ppl_cost_min"] == pytest.approx(0.03)  # without the folder: the means in the summary


def test_a_tradeoff_sweep_gets_no_seed_sensitivity_report(tmp_path):
    from moewm.app.report import summarize

    for i, row in enumerate(_summary().to_dict("records")):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"tradeoff={row.pop('override.tradeoff')}", f"seed={row['seed']}"]))
        (job / "metrics.json").write_text(json.dumps({k: v for k, v in row.items() if not (isinstance(v, float) and np.isnan(v))}))
    summarize(tmp_path)
    assert (tmp_path / "tradeoff.md").exists() and not (tmp_path / "seed_sensitivity.md").exists()


def test_headline_slack_admits_points_just_above_the_reference_cost():
    t = aggregate(_summary(lsh_cost=0.06))  # KGW 0.04 with s.e. 0.0058 over its three keys
    assert headline(t).answer is False
    assert headline(t, slack=0.03).answer is True


def test_an_oracle_model_judges_perplexity_and_says_so(tokenizer):
    from types import SimpleNamespace

    from moewm.evaluation.oracle import oracle_metrics

    text = [list(tokenizer("the quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"])] * 2
    prompts = [list(tokenizer("Once upon a time", add_special_tokens=False)["input_ids"])] * 2
    cfg = SimpleNamespace(model=SimpleNamespace(name="tiny_moe"), memory=None, generation=SimpleNamespace(batch_size=2))
    ctx = SimpleNamespace(cfg=cfg, tokenizer=tokenizer, prompt_ids=prompts, wm_ids=text, plain_ids=text)
    m = oracle_metrics(ctx, SimpleNamespace(oracle_model="micro_moe"))  # random weights: seconds, no download
    assert m["perplexity_judge"] == "oracle:micro_moe"
    assert m["ppl_oracle_wm_mean"] > 1 and m["ppl_oracle_wm_mean"] == pytest.approx(m["ppl_oracle_unwm_mean"])
    assert oracle_metrics(ctx, SimpleNamespace(oracle_model=None)) == {"perplexity_judge": "generator:tiny_moe"}


def test_a_command_line_value_pins_a_key_the_preset_sweeps():
    from moewm.app.sweep import swept_keys

    params = {"encoder": "simhash,pca", "encoder.pools": "partition,anchors,random", "seed": "range(20)"}
    assert swept_keys(["encoder.pools=partition"], params) == ["encoder", "seed"]
    assert swept_keys([], params) == ["encoder", "encoder.pools", "seed"]


# -- the one command, end to end ----------------------------------------------------------------------
from test_tracking import _runs, fake_wandb  # noqa: E402,F401  (the W&B stand-in and its log reader)


@pytest.mark.slow
def test_the_tradeoff_sweep_ends_with_its_report_and_a_wandb_table(tmp_path, fake_wandb):  # noqa: F811
    import subprocess
    import sys

    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=tradeoff", "tradeoff=kgw_g025_d2,lsh_partition_d2", "seed=0", "model=micro_moe",
            "encoder.num_bits=16", "data.num_prompts=4", "generation.max_new_tokens=24", "generation.min_new_tokens=24",
            "generation.batch_size=4", "eval.null_sets=[greedy]", "eval.null_texts=2", "watermark.reference_keys=99",
            "watermark.alpha=0.01", "attack.paraphrase_max_new_tokens=8", "progress=false", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOEWM_SECRET_KEY": "tradeoff-e2e-secret"}
    proc = subprocess.run([sys.executable, "-m", "moewm", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = pd.read_csv(sweep / "tradeoff.csv", index_col=0)
    assert set(table.index) == {"kgw_g025_d2", "lsh_partition_d2"}
    assert {"attacked_substitution_0p3", "attacked_paraphrase_0p5", "ppl_cost", "tokens_to_detect", "null_fpr"} <= set(table.columns)
    md = (sweep / "tradeoff.md").read_text()
    assert "## Headline" in md and "generator itself" in md
    assert (sweep / "tradeoff_substitution_0p3.png").exists() and not (sweep / "seed_sensitivity.md").exists()
    [summary] = [r for r in _runs(fake_wandb()).values() if r.get("job_type") == "sweep-summary"]
    assert "point" in summary["logged"]["tradeoff"]["table_columns"] and summary["logged"]["tradeoff"]["rows"] == 2
    assert "tradeoff_none" in summary["logged"]
    assert "tradeoff-e2e-secret" not in json.dumps(_runs(fake_wandb())) + md


# qwen_moe in the default run; the other two architectures repeat the same check (slow: ~25 s each on an idle core)
@pytest.mark.parametrize("model", ["qwen_moe", pytest.param("mixtral", marks=pytest.mark.slow), pytest.param("olmoe", marks=pytest.mark.slow)])
def test_every_tradeoff_point_validates_on_a_full_size_model_before_weights_load(model):
    """The GPU run is the same command with model=<real checkpoint>: every point's layer range and settings fit
    the full-size architecture (checked on the meta device, no weights)."""
    for point in POINTS:
        validate_app(to_app_config(compose_config(["experiment=tradeoff", f"tradeoff={point}", f"model={model}", "eval.oracle_model=qwen_dense"])))


def test_the_report_has_the_survival_diagnostics_of_every_attack(tmp_path):
    df = _summary()
    lsh = df["watermark_kind"] == "moe_lsh"
    for a in ("substitution_0p3", "deletion_0p1"):
        df[f"survival_positions_{a}"] = 0.7
        df[f"survival_signature_{a}"] = np.where(lsh, 0.45, 1.0)
        df[f"survival_bitflip_{a}"] = np.where(lsh, 0.056, np.nan)
        df[f"survival_green_{a}"] = np.where(lsh, 0.71, 1.0)
        df[f"evidence_per_token_attacked_{a}"] = 0.3
        df[f"survival_signature_dist2_{a}"] = np.where(lsh, 0.4, 1.0)
        df[f"survival_signature_dist17up_{a}"] = np.where(lsh, 0.8, 1.0)
    df["evidence_per_token_clean"] = 0.9
    table, _ = tradeoff_report(df, tmp_path)
    assert table.loc["lsh_cheap", "survival_signature_substitution_0p3"] == pytest.approx(0.45)
    assert table.loc["kgw_g025_d2", "survival_green_deletion_0p1"] == 1.0
    md = (tmp_path / "tradeoff.md").read_text()
    survival = md[md.index("## Survival diagnostics"):]
    assert "### substitution 0.3" in survival and "### deletion 0.1" in survival
    row = next(line for line in survival.splitlines() if line.startswith("| `lsh_cheap`"))
    assert "| 0.45 |" in row and "0.056" in row and "| 0.71 |" in row and "0.90 -> 0.30" in row and "| 0.40 |" in row and "| 0.80 |" in row
    assert not any(name.startswith("survival") for name, *_ in objectives(table))  # no Pareto view of a diagnostic


@pytest.mark.slow
def test_every_attacked_row_has_its_survival_diagnostics(suite_job):
    m = suite_job
    for a in parse_attack_specs(SUITE):
        for key in ("survival_positions", "survival_signature", "survival_green", "survival_bitflip"):
            assert 0.0 <= m[f"{key}_{a.suffix}"] <= 1.0, (key, a.suffix)
        assert m.get(f"survival_signature_distbefore_{a.suffix}", 1.0) == 1.0  # nothing before the first edit moves
    assert m["survival_signature_substitution_0"] == m["survival_positions_substitution_0"] == 1.0
    assert m["survival_signature"] == m["survival_signature_substitution_0p3"]  # the attack= group's row too
    assert m["evidence_per_token_attacked_substitution_0"] == m["evidence_per_token_clean"]
