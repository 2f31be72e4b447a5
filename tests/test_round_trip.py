"""Generate, publish, detect later: a run's samples.jsonl holds the token ids, ``mode=detect`` on it reproduces the run's
verdicts (and p-values) through the ids, and detection from the text alone is measured beside it; the suite's
``retokenisation`` attack is that text-only path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from composing import app_config
from moewm.config import AttackConfig, parse_attack_spec
from moewm.evaluation.attacks import apply_attack, attack_token_ids, retokenise

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "moewm" / "assets" / "tiny_moe"
SECRET = "round-trip-test-secret"


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(str(TINY))


def test_retokenisation_is_decode_then_encode_and_changes_ids_the_tokenizer_would_merge(tiny_tokenizer):
    tok = tiny_tokenizer
    split = [tok.convert_tokens_to_ids(c) for c in "the"]  # "the" spelled letter by letter, as a model may generate it
    whole = list(tok("the number of items", add_special_tokens=False)["input_ids"])
    cfg = AttackConfig(name="retokenisation", strength=1.0)
    out = attack_token_ids([split, whole], cfg, tokenizer=tok)
    assert out == retokenise([split, whole], tok)
    assert out[0] == list(tok("the", add_special_tokens=False)["input_ids"]) and out[0] != split
    assert out[1] == whole  # ids the tokenizer itself produced come back unchanged
    assert attack_token_ids([split], AttackConfig(name="retokenisation", strength=0.0), tokenizer=tok) == [split]
    texts = ["the number of items"]
    assert apply_attack(texts, cfg, tokenizer=tok) == texts  # the published text is unchanged; only its ids are not


def test_a_retokenisation_spec_without_strength_is_the_whole_round_trip():
    spec = parse_attack_spec("retokenisation")
    assert spec.strength == 1.0 and spec.suffix == "retokenisation_1"
    assert parse_attack_spec("substitution").strength == 0.2  # the others keep the shared default


def test_the_tradeoff_preset_scores_text_level_detection():
    app = app_config(["experiment=tradeoff", "tradeoff=lsh_partition_d2"])
    assert "retokenisation" in app.eval.attacks


def test_the_tradeoff_table_reports_text_level_detection_as_a_share_of_id_level(tmp_path):
    import pandas as pd

    from moewm.evaluation.tradeoff import tradeoff_report

    rows = []
    for seed in range(2):
        for point, kind, text_rate in (("kgw_g025_d2", "kgw", 0.9), ("lsh_partition_d2", "moe_lsh", 0.5)):
            rows.append({"status": "ok", "override.tradeoff": point, "seed": seed, "watermark_kind": kind, "alpha": 1e-3,
                         "delta": 2.0, "ppl_unwm_mean": 100.0, "ppl_wm_mean": 120.0, "tokens_to_detect_alpha_censored": 20.0,
                         "tokens_to_detect_alpha": 20.0, "never_detected_alpha": 0.0, "detection_rate": 1.0,
                         "detection_rate_attacked_retokenisation_1": text_rate, "detection_rate_attacked_substitution_0p3": 0.5,
                         "fp_plain": 0, "n_plain": 16, "perplexity_judge": "generator:tiny_moe", "model": "tiny_moe"})
    table, _ = tradeoff_report(pd.DataFrame(rows), tmp_path)
    assert table.loc["lsh_partition_d2", "text_over_ids"] == pytest.approx(0.5)
    assert table.loc["kgw_g025_d2", "text_over_ids"] == pytest.approx(0.9)
    md = (tmp_path / "tradeoff.md").read_text()
    assert "retokenisation_1" in md and "Text-level detection" in md and "`lsh_partition_d2` 0.50" in md


def _moewm(args, cwd, timeout=900):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "MOEWM_SECRET_KEY": SECRET, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "moewm", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_detect_on_a_runs_samples_reproduces_its_verdicts_by_ids_and_reports_text_level_detection(tmp_path):
    small = ["data.num_prompts=6", "generation.max_new_tokens=40", "generation.min_new_tokens=40", "eval=minimal",
             "eval.null_sets=[greedy]", "eval.null_texts=2", "logger=none", "progress=false", "seed=3"]
    run = _moewm([*small, "hydra.run.dir=run"], tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(str(TINY))
    for row in samples:  # the ids are the generated ones: the text is their decoding
        assert {"prompt_ids", "ids_wm", "ids_unwm"} <= set(row) and len(row["ids_wm"]) == row["tokens_wm"]
        assert tok.decode(row["ids_wm"], skip_special_tokens=True) == row["text_wm"]

    det = _moewm(["mode=detect", "input=run/samples.jsonl", "seed=3", "logger=none", "progress=false", "hydra.run.dir=det"], tmp_path)
    assert det.returncode == 0, det.stdout[-3000:] + det.stderr[-3000:]
    summary = json.loads((tmp_path / "det" / "detection_summary.json").read_text())
    assert summary["input_kind"] == "run samples" and summary["settings_match_run"]
    assert summary["n_verdicts_compared"] == 12 and summary["agreement_ids"] == 1.0
    assert summary["max_p_value_difference_ids"] == 0.0  # scored as the run scored them: the same p-values, not only verdicts
    assert summary["detection_rate_ids_wm"] == sum(r["detected_wm"] for r in samples) / len(samples)
    for which in ("wm", "unwm"):
        assert 0.0 <= summary[f"detection_rate_text_{which}"] <= 1.0
        assert 0.0 <= summary[f"retokenisation_changed_{which}"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "det" / "detections.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["agrees_with_run"] for r in rows)
    for r in rows:
        assert r["text_ids"] == list(tok(r["text"], add_special_tokens=False)["input_ids"])
        assert r["retokenisation_changes_ids"] == (r["text_ids"] != r["ids"])
    assert "verdicts as in the run" in det.stdout and "from the text alone" in det.stdout


def test_detecting_a_runs_samples_with_other_settings_says_so(tmp_path):
    from moewm.app.detect import settings_mismatch
    from moewm.app.services import run_settings
    from moewm.engine.keys import WatermarkKey

    run_app = app_config(["seed=3"])
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "ok", **run_settings(run_app, WatermarkKey(SECRET, 3))}))
    assert settings_mismatch(run_app, WatermarkKey(SECRET, 3), tmp_path / "samples.jsonl") == {}
    other = app_config(["seed=4", "watermark.delta=1.0"])
    diff = settings_mismatch(other, WatermarkKey(SECRET, 4), tmp_path / "samples.jsonl")
    assert set(diff) == {"key_fingerprint", "delta"} and diff["delta"] == (2.0, 1.0)


def test_a_users_texts_are_still_plain_input(tmp_path):
    from moewm.app.detect import read_run_samples

    (tmp_path / "texts.jsonl").write_text(json.dumps({"text": "hello", "prompt": "p"}) + "\n")
    assert read_run_samples(tmp_path / "texts.jsonl") is None
    (tmp_path / "run.jsonl").write_text(json.dumps({"text_wm": "a", "text_unwm": "b", "ids_wm": [1], "ids_unwm": [2]}) + "\n")
    assert read_run_samples(tmp_path / "run.jsonl")[0]["ids_wm"] == [1]
