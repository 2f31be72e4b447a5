"""The second shipped model, tiny_olmoe (moewm/assets/tiny_olmoe): OLMoE's routing style, tiny_moe's tokenizer.

It must load like tiny_moe, route where the extractor looks, carry its quality floor in its build log, take
and reveal a watermark, and judge tiny_moe's perplexity on the same token ids (and be judged by it).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_tiny_moe import _check_router_logits, load_build_script

REPO = Path(__file__).resolve().parents[1]
OLMOE = REPO / "moewm" / "assets" / "tiny_olmoe"
TINY = REPO / "moewm" / "assets" / "tiny_moe"


@pytest.fixture(scope="module")
def olmoe():
    assert (OLMOE / "config.json").exists(), f"shipped model missing at {OLMOE}: run scripts/build_tiny_moe.py --model tiny_olmoe"
    from moewm import ModelConfig, load_model

    return load_model(ModelConfig(name="tiny_olmoe", path="builtin:tiny_olmoe", device="cpu"))


def test_tiny_olmoe_is_olmoe_routing_with_tiny_moe_tokens(olmoe):
    model, tok = olmoe
    cfg = model.config
    assert cfg.model_type == "olmoe" and type(model).__name__ == "OlmoeForCausalLM" and model.dtype == torch.float32
    # OLMoE's routing style: many small experts, top-8, no shared expert, top-k weights not renormalised
    assert cfg.num_experts == 64 and cfg.num_experts_per_tok == 8 and cfg.norm_topk_prob is False
    assert not any("shared_expert" in n for n, _ in model.named_parameters())
    assert cfg.num_hidden_layers == 8 and cfg.hidden_size == 128 and cfg.tie_word_embeddings
    assert (OLMOE / "model.safetensors").stat().st_size <= 25 * 2**20
    # the same tokenizer files as tiny_moe, byte for byte: both models read and write the same token ids
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (OLMOE / name).read_bytes() == (TINY / name).read_bytes(), name
    assert tok.eos_token_id == cfg.eos_token_id == AutoTokenizer.from_pretrained(TINY).eos_token_id
    _check_router_logits(model, tok, "Return the number of")


def test_tiny_olmoe_build_log_records_a_passed_quality_floor():
    log = json.loads((OLMOE / "build_log.json").read_text())
    a, r = log["recipe"], log["results"]
    floor = log["quality_floor"]
    assert floor["checked"] and floor["passed"] and floor["failures"] == []
    assert "0.004" in floor["note"]  # the floor it was first checked against, and missed, is on record
    assert a["model"] == "tiny_olmoe" and a["arch"] == "olmoe" and a["tokenizer"] == "moewm/assets/tiny_moe"
    assert log["tokenizer"]["reused_from"] == "moewm/assets/tiny_moe"
    assert r["heldout_ppl"] < a["min_ppl_ratio"] * r["unigram_ppl"] and a["min_ppl_ratio"] <= 0.5
    u = r["expert_utilisation"]
    assert a["min_expert_share"] == 0.0025 and u["min"] >= a["min_expert_share"] and u["uniform"] == round(1 / 64, 4)
    assert len(u["share_matrix"]) == 8 and all(len(row) == 64 and min(row) >= 0.0025 for row in u["share_matrix"])
    cd = r["context_dependence"]
    assert cd["mean_tv_distance"] >= a["min_context_tv"] >= 0.05 and cd["top1_switch_rate"] >= a["min_context_switch"] >= 0.05
    assert r["checkpoint_mb"] <= a["max_size_mb"] <= 25
    # the same held-out tokens as tiny_moe (same corpus, split and tokenizer), so the two perplexities compare
    tiny = json.loads((TINY / "build_log.json").read_text())
    assert log["corpus"] == tiny["corpus"] and r["heldout_predicted_tokens"] == tiny["results"]["heldout_predicted_tokens"]
    assert r["unigram_ppl"] == tiny["results"]["unigram_ppl"]


def test_both_model_cards_are_their_build_logs():
    """One card template for both models: each shipped README.md is what the build script writes from its log."""
    build = load_build_script()
    for folder in (TINY, OLMOE):
        card = build.model_card(json.loads((folder / "build_log.json").read_text()))
        assert card == (folder / "README.md").read_text(), folder.name
    assert "OlmoeForCausalLM" in (OLMOE / "README.md").read_text()


def test_router_slices_are_valid_on_tiny_olmoe(olmoe):
    """The app's extractor (all 8 MoE layers) and the middle slice [2, 6) that the README's API example once used both hook it."""
    from composing import app_config
    from moewm.config import ExtractorConfig
    from moewm.engine.routing import FeatureCapture, check_extractor, feature_layout

    model, tok = olmoe
    layout = feature_layout(model, "router")
    assert layout.kind == "router" and layout.num_layers == 8 and layout.width == 64
    app = app_config(["model=tiny_olmoe"])
    assert app.extractor.kind == "router" and check_extractor(app.extractor, layout) == (0, 8)
    cfg = ExtractorConfig(start_layer_idx=2, end_layer_idx=6)
    assert check_extractor(cfg, layout) == (2, 6)
    with FeatureCapture(model, cfg) as cap:
        ids = tok("Return the number of items", return_tensors="pt").input_ids
        with torch.no_grad():
            model(input_ids=ids)
        feats = cap.features(1)
    assert feats.shape[-1] == cap.dim == 4 * 64 and torch.isfinite(feats).all()
    probs = feats.reshape(*feats.shape[:-1], 4, 64)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-4)  # a softmax per selected layer


def test_a_watermarked_tiny_olmoe_generation_is_detected(olmoe, tmp_path):
    from moewm import MoELSHWatermark, WatermarkKey
    from moewm.config import EncoderConfig, ExtractorConfig, GenerationConfig, WatermarkConfig

    model, tok = olmoe
    prompts = ["Return the number of items in the"]  # one text each way: the 999-key reference bank is most of the cost
    with MoELSHWatermark(model, tok, ExtractorConfig(start_layer_idx=2, end_layer_idx=6), EncoderConfig(num_bits=32, pool_size=64),
                         WatermarkConfig(delta=2.0), WatermarkKey("tiny-olmoe-test-secret", 0), cache_dir=tmp_path) as wm:
        torch.manual_seed(0)
        texts = wm.generate(prompts, GenerationConfig(max_new_tokens=128, min_new_tokens=128))
        results = wm.detect(texts, prompts=prompts)
        plain = [tok.decode(model.generate(tok(p, return_tensors="pt").input_ids, do_sample=True, max_new_tokens=128,
                                           min_new_tokens=128, pad_token_id=tok.pad_token_id)[0, len(tok(p).input_ids):],
                            skip_special_tokens=True) for p in prompts]
        plain_results = wm.detect(plain, prompts=prompts)
    [wm_result], [plain_result] = results, plain_results
    assert wm_result.prediction and wm_result.p_value <= 1e-3, (wm_result.z_score, wm_result.p_value)
    assert not plain_result.prediction and plain_result.p_value > 1e-3, (plain_result.z_score, plain_result.p_value)


def test_shared_tokenizer_is_recognised_and_different_ones_are_not(olmoe, tokenizer):
    from moewm.evaluation.oracle import same_tokenizer

    _, tok = olmoe
    assert same_tokenizer(tok, AutoTokenizer.from_pretrained(TINY))
    assert not same_tokenizer(tok, tokenizer)  # the byte-level tokenizer of the micro models


@pytest.mark.parametrize("generator,judge", [("tiny_moe", "tiny_olmoe"), ("tiny_olmoe", "tiny_moe")])
def test_the_shipped_models_judge_each_other_on_the_generated_ids(generator, judge):
    """Same tokenizer: the judge scores the generator's ids as they are, and its perplexity is its own
    model's perplexity of those ids (not of a decode / re-encode of them)."""
    from moewm import ModelConfig, load_model
    from moewm.engine.padding import pad_id
    from moewm.evaluation.oracle import load_oracle, oracle_metrics
    from moewm.evaluation.quality import perplexity

    _, gen_tok = load_model(ModelConfig(name=generator, path=f"builtin:{generator}", device="cpu"))
    prompts = [gen_tok("Return the number of", add_special_tokens=False).input_ids] * 2
    # ids a decode / encode round trip would change: "Ġthe" split into "Ġ" + "the" decodes to " the" but re-encodes as one token
    space, the, whole = (gen_tok.convert_tokens_to_ids(t) for t in ("Ġ", "the", "Ġthe"))
    wm = [[space, the, *gen_tok(" items in the list.", add_special_tokens=False).input_ids]] * 2
    plain = [gen_tok(" the items of the list.", add_special_tokens=False).input_ids] * 2
    assert gen_tok(gen_tok.decode(wm[0]), add_special_tokens=False).input_ids[0] == whole != space
    cfg = SimpleNamespace(model=SimpleNamespace(name=generator), memory=None, generation=SimpleNamespace(batch_size=2))
    ctx = SimpleNamespace(cfg=cfg, tokenizer=gen_tok, prompt_ids=prompts, wm_ids=wm, plain_ids=plain)
    m = oracle_metrics(ctx, SimpleNamespace(oracle_model=judge))
    assert m["perplexity_judge"] == f"oracle:{judge}" and m["perplexity_judge_input"] == "generator_ids"
    judge_model, judge_tok = load_oracle(judge)
    assert m["ppl_oracle_wm_mean"] == pytest.approx(float(perplexity(judge_model, prompts, wm, 2, pad_id(judge_tok)).mean()))
    assert m["ppl_oracle_unwm_mean"] == pytest.approx(float(perplexity(judge_model, prompts, plain, 2, pad_id(judge_tok)).mean()))
    assert 1 < m["ppl_oracle_unwm_mean"] < m["ppl_oracle_wm_mean"]  # a split "Ġ" + "the" is unlikely text to any model


def test_build_script_quick_olmoe_reuses_the_tokenizer_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build = load_build_script()
    out = tmp_path / "olmoe"
    rc = build.main([
        "--model", "tiny_olmoe", "--quick", "--no-progress", "--out", str(out), "--tokenizer", str(TINY), "--steps", "2",
        "--max-docs", "200", "--hidden-size", "16", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--experts", "8",
        "--top-k", "4", "--moe-intermediate", "8", "--seq-len", "32", "--batch-size", "2",
    ])
    assert rc == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (TINY / name).read_bytes(), name
    log = json.loads((out / "build_log.json").read_text())
    assert log["recipe"]["arch"] == "olmoe" and log["recipe"]["shared_intermediate"] == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "OlmoeForCausalLM" and model.config.num_experts == 8 and model.config.num_experts_per_tok == 4
    _check_router_logits(model, AutoTokenizer.from_pretrained(out), "Return the")
    assert "no shared expert" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["olmoe"]


@pytest.mark.parametrize("argv,message", [
    (["--model", "tiny_olmoe", "--top-k", "65"], "--top-k=65: must be in [1, --experts=64]"),
    (["--arch", "qwen2_moe", "--shared-intermediate", "0"], "--shared-intermediate=0"),
    (["--model", "tiny_olmoe", "--tokenizer", "/nonexistent"], "--tokenizer=/nonexistent: no tokenizer.json, tokenizer_config.json"),
])
def test_build_script_rejects_bad_options_by_name(argv, message, capsys):
    build = load_build_script()
    with pytest.raises(SystemExit):
        build.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_judge_with_another_tokenizer_scores_the_decoded_text():
    from moewm.evaluation.oracle import load_oracle, oracle_metrics, oracle_perplexity

    tok = AutoTokenizer.from_pretrained(TINY)
    prompts = [tok("Return the number of", add_special_tokens=False).input_ids] * 2
    texts = [tok(" items in the list.", add_special_tokens=False).input_ids] * 2
    cfg = SimpleNamespace(model=SimpleNamespace(name="tiny_moe"), memory=None, generation=SimpleNamespace(batch_size=2))
    ctx = SimpleNamespace(cfg=cfg, tokenizer=tok, prompt_ids=prompts, wm_ids=texts, plain_ids=texts)
    m = oracle_metrics(ctx, SimpleNamespace(oracle_model="micro_moe"))  # random weights, byte-level tokenizer
    assert m["perplexity_judge"] == "oracle:micro_moe" and m["perplexity_judge_input"] == "reencoded_text"
    model, judge_tok = load_oracle("micro_moe")
    expected = oracle_perplexity(model, judge_tok, ["Return the number of"] * 2, [" items in the list."] * 2, 2)
    assert m["ppl_oracle_wm_mean"] == pytest.approx(float(expected.mean()))
