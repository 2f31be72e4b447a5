"""The scheme interface: every registered kind is a Watermarker, the registry is the one place that names a
scheme, and a new kind needs nothing but its registry line to run a whole job."""

import json
import os

import pytest

from moewm.app.job import run_job
from composing import app_config
from moewm.app.schema import validate_app
from moewm.config import ConfigError, WatermarkConfig
from moewm.schemes import registry
from moewm.schemes.base import Watermarker

os.environ.setdefault("MOEWM_SECRET_KEY", "schemes-test-secret")


@pytest.mark.parametrize("kind", registry.scheme_kinds())
def test_every_registered_scheme_is_a_watermarker(kind, micro_qwen, tokenizer):
    from moewm.config import EncoderConfig, ExtractorConfig
    from moewm.engine.keys import WatermarkKey

    wm = registry.build_watermarker(kind, micro_qwen, tokenizer, WatermarkConfig(kind=kind, min_tokens=1), WatermarkKey("s", 0),
                                    extractor=ExtractorConfig(), encoder=EncoderConfig(num_bits=8, pool_size=8))
    try:
        assert isinstance(wm, Watermarker)
        assert isinstance(type(wm).capture_runs_model, bool)
        texts, prompts = [[5, 6, 7, 8, 9, 10]], [[1, 2]]
        once = wm.score(wm.capture(texts, prompts))
        assert once.p_value.shape == (1,) and once.num_tokens_scored[0] > 0
        assert set(wm.null_description()) == {"statistic", "reference_keys", "p_value_null"}
        # statistic null: the scheme scores its own (the tournament its sum of g-values, MoE-LSH and its null control llr)
        own = {"moe_tournament": "tournament green", "moe_lsh": "llr", "none": "llr"}
        assert wm.null_description()["statistic"] == own.get(kind, "green count")
    finally:
        wm.close()


def test_an_unknown_kind_is_refused_before_weights_load_naming_the_kinds():
    with pytest.raises(ConfigError, match=r"watermark.kind='dipper': allowed values are \('moe_lsh', 'kgw', 'synthid', 'moe_tournament', 'none'\)"):
        validate_app(app_config(["watermark.kind=dipper"]))


def test_a_flat_baseline_field_of_earlier_releases_names_its_new_key():
    with pytest.raises(ConfigError, match=r"watermark.kgw_gamma=0.5: renamed; set watermark.kgw.gamma instead"):
        WatermarkConfig(kgw_gamma=0.5).validate()
    app = app_config(["watermark=kgw", "watermark.kgw.gamma=0.5", "watermark.synthid.num_keys=4"])
    assert app.watermark.kgw.gamma == 0.5 and app.watermark.synthid.num_keys == 4


def test_the_calibrated_alpha_floor_is_checked_only_for_schemes_ranked_by_reference_keys():
    for kind in ("moe_lsh", "none"):
        with pytest.raises(ConfigError, match="watermark.alpha=0.0001: allowed range is"):
            validate_app(app_config([f"watermark={kind}", "watermark.alpha=1e-4", "watermark.reference_keys=99"]))
    validate_app(app_config(["watermark=kgw", "watermark.alpha=1e-4", "watermark.reference_keys=99"]))  # an exact test: no floor


def test_a_new_scheme_needs_only_its_registry_line(tmp_path, monkeypatch):
    """Register the KGW class under a new kind and nothing else: a whole job runs with it, and its results are
    KGW's (same key, same prompts), so nothing in the job or its evaluation dispatches on the kind's name."""
    monkeypatch.setenv("MOEWM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(registry.SCHEMES, "kgw_again", "moewm.schemes.kgw:KGWWatermark")  # the one line
    common = ["data.num_prompts=3", "generation.max_new_tokens=20", "eval=minimal", "eval.null_sets=[greedy]", "logger=none",
              "progress=false", "attack=substitution", "attack.strength=0.2"]
    results = {}
    for kind in ("kgw", "kgw_again"):
        app = app_config([*common, "watermark=kgw", f"watermark.kind={kind}"])
        run_job(app, tmp_path / kind, run_name=kind, group=None)
        results[kind] = json.loads((tmp_path / kind / "metrics.json").read_text())
    new, old = results["kgw_again"], results["kgw"]
    assert new["status"] == "ok" and new["watermark_kind"] == "kgw_again"
    for name in ("detection_rate", "p_wm_median", "fpr_greedy", "detection_rate_attacked", "ppl_wm_mean", "tokens_to_detect_alpha"):
        assert new[name] == old[name] or (new[name] != new[name] and old[name] != old[name]), name


def test_a_selfhash_step_with_no_green_candidate_boosts_nothing_instead_of_failing(monkeypatch):
    """transformers' selfhash KGW turns an empty green list into a float tensor and fails on indexing with it; ours
    leaves the step's scores as they are and is transformers' processor on every other step."""
    import torch
    from transformers.generation.logits_process import WatermarkLogitsProcessor

    from moewm.schemes.kgw import KGWProcessor, KGWWatermarkingConfig

    config = KGWWatermarkingConfig(greenlist_ratio=0.25, bias=2.0, hashing_key=7, seeding_scheme="selfhash", context_width=4)
    proc = config.construct_processor(64, "cpu")
    assert isinstance(proc, KGWProcessor)
    ids, scores = torch.arange(8).view(1, 8), torch.linspace(0.0, 1.0, 64).view(1, 64)
    reference = WatermarkLogitsProcessor(vocab_size=64, device="cpu", greenlist_ratio=0.25, bias=2.0, hashing_key=7,
                                         seeding_scheme="selfhash", context_width=4)
    assert torch.equal(proc(ids, scores), reference(ids, scores))  # a step with green candidates: unchanged
    monkeypatch.setattr(WatermarkLogitsProcessor, "_get_greenlist_ids", lambda self, seq: torch.tensor([0]))  # token 0 ranks last
    with pytest.raises(IndexError):
        reference(ids, scores)
    assert torch.equal(proc(ids, scores), scores)


def test_lefthash_over_several_tokens_seeds_by_all_of_them():
    """transformers' lefthash seeds by the last token whatever its context width; KGWProcessor hashes every token
    of the context (and leaves one-token lefthash exactly as transformers has it)."""
    import torch
    from transformers.generation.logits_process import WatermarkLogitsProcessor

    from moewm.schemes.kgw import KGWWatermarkingConfig

    def greens(width, context, ours=True):
        args = dict(greenlist_ratio=0.25, bias=2.0, hashing_key=11, seeding_scheme="lefthash", context_width=width)
        proc = KGWWatermarkingConfig(**args).construct_processor(512, "cpu") if ours else WatermarkLogitsProcessor(vocab_size=512, device="cpu", **args)
        return set(proc._get_greenlist_ids(torch.tensor(context)).tolist())

    assert greens(1, [5, 9]) == greens(1, [5, 9], ours=False)  # h = 1: transformers' own green list
    assert greens(4, [1, 2, 3, 9], ours=False) == greens(4, [4, 5, 6, 9], ours=False) == greens(1, [9], ours=False)  # transformers: the last token only
    assert greens(4, [1, 2, 3, 9]) != greens(4, [4, 5, 6, 9])  # ours: the earlier tokens key the list too
    assert greens(4, [1, 2, 3, 9]) == greens(4, [1, 2, 3, 9]) and len(greens(4, [1, 2, 3, 9])) == 128
