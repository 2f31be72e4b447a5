"""The benchmark runs end to end in smoke mode and writes a complete, well-formed bench.json (no timing assertions)."""

import json
import math
import statistics

import pytest
import torch

from moewm.bench import cli, harness, sections
from moewm.config import ModelConfig
from moewm.models.micro import MICRO_ARCHITECTURES

SECTIONS = ("generation", "detection", "calibrated", "schemes", "reference", "capture", "scaling", "memory", "quantization")
POSITIVE_SUFFIXES = ("median_s", "min_s", "tokens_per_s", "_s_per_text")


def _positive_numbers(node, path=""):
    """(path, value) of every timing, throughput, ratio and speedup in the result."""
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{path}.{k}"
            if isinstance(v, (dict, list)):
                yield from _positive_numbers(v, here)
            elif k.endswith(POSITIVE_SUFFIXES) or k.endswith("_s") or k.startswith(("ratio", "speedup")):
                yield here, v
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _positive_numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    md = out.with_suffix(".md")
    torch_threads = torch.get_num_threads()
    try:
        cli.main(["--model", "micro", "--smoke", "--threads", "1", "--cache-dir", "none", "--out", str(out), "--markdown", str(md)])
    finally:
        torch.set_num_threads(torch_threads)
    return json.loads(out.read_text()), md.read_text()


def test_smoke_writes_every_section(smoke):
    result, _ = smoke
    for key in ("command", "settings", "model", "machine", "watermark", "load_average", "targets", *SECTIONS):
        assert key in result, key
    assert result["settings"]["smoke"] is True
    assert result["model"]["name"] == "micro-qwen2_moe"
    gen = result["generation"]
    assert set(gen["timings"]) == {"plain", "moe_lsh", "kgw"}
    # The timed output is checked for the watermark (calibrated p, diagnostic z), with temperature-1 samples beside it.
    sanity = gen["sanity"]
    assert sanity["null"] == "model" and sanity["reference_keys"] == s_refs(result)
    for name in ("moe_lsh_greedy", "plain_greedy", "plain_sampled"):
        # Greedy loops on the micro model repeat the same (green pools, token) units, which are scored once:
        # too few distinct units leave z undefined (None), never a number made up.
        if sanity[f"z_{name}_mean"] is None:
            assert "greedy" in name and sanity[f"z_{name}_std"] is None, name
            continue
        assert math.isfinite(sanity[f"z_{name}_mean"]) and (sanity[f"z_{name}_std"] is None or sanity[f"z_{name}_std"] >= 0), name
        assert 1 / (sanity["reference_keys"] + 1) <= sanity[f"p_{name}_median"] <= 1, name
        assert 0 <= sanity[f"detected_{name}"] <= sanity["texts"], name
    det = result["detection"]
    assert set(det["timings"]) == {"detect", "capture", "forward", "forward_full_logits"}
    assert 1 <= det["mean_reference_keys_scored"] <= det["reference_keys"]
    assert det["capture_bytes_per_scored_token"] > 4 * result["watermark"]["feature_dim"]
    assert set(result["capture"]["forward"]["timings"]) == {"no_capture", "hooks", "hooks_and_features", "output_router_logits"}
    assert set(result["capture"]["generation"]["timings"]) == {"no_capture", "hooks", "output_router_logits"}
    # The smoke grid is the full cross product of its batch sizes and lengths.
    s = result["settings"]
    assert {(r["batch_size"], r["text_len"]) for r in result["scaling"]["detection"]} == {
        (b, n) for b in s["scale_batches"] for n in s["scale_lengths"]
    }
    assert [r["text_len"] for r in result["scaling"]["detection_defaults"]] == s["scale_lengths"]
    assert {(r["batch_size"], r["new_tokens"]) for r in result["scaling"]["generation"]} == {
        (b, n) for b in s["gen_scale_batches"] for n in s["gen_scale_lengths"]
    }
    assert [r["text_len"] for r in result["reference"]["rows"]] == s["reference_lengths"]


def s_refs(result):
    return result["settings"]["reference_keys"]


def _check_cell(cell, refs, texts):
    assert cell["reference_keys"] == refs and cell["texts"] == texts
    assert cell["watermarked_texts"] == texts // 2
    assert sum(cell["forward_batches"]) == texts
    assert cell["scored_tokens"] > 0
    for half in ("watermarked", "unwatermarked"):
        assert 1 <= cell[f"mean_keys_{half}"] <= refs, half
        assert 0 <= cell[f"early_stop_share_{half}"] <= 1, half
    assert 0 <= cell["detected_share_watermarked"] <= 1 and 0 <= cell["false_positive_share_unwatermarked"] <= 1
    assert cell["alpha"] >= 1 / (refs + 1)
    assert cell["ratio_detect_over_forward_full_logits"] > 0 and cell["repeats"] >= 1


def test_smoke_calibrated_detection_section(smoke):
    result, md = smoke
    s = result["settings"]
    cal = result["calibrated"]
    refs = s_refs(result)
    assert cal["reference_keys"] == refs and cal["stop_after"] == s["stop_after"] and cal["statistic"] == "llr"
    assert cal["texts"] == s["cal_texts"] and cal["text_lengths"] == [min(s["cal_lengths"]), max(s["cal_lengths"])]
    assert set(cal["timings"]) == {"detect", "capture", "score", "forward_full_logits"}
    # Paired rounds: every method timed once per repeat.
    assert {len(t["times_s"]) for t in cal["timings"].values()} == {s["repeats"]}
    for key in ("ratio_detect_over_forward_full_logits", "ratio_capture_over_forward_full_logits", "ratio_score_over_forward_full_logits"):
        assert cal[key] > 0, key
    assert 0 < cal["score_share_of_capture_plus_score"] < 1
    _check_cell({**cal, "reference_keys": refs, "texts": cal["texts"]}, refs, s["cal_texts"])
    bank = cal["bank"]
    assert bank["reference_keys"] == refs and bank["build_s"] > 0 and bank["bank_bytes"] > 0
    assert bank["token_table_bytes"] > 0 or bank["pools"] == "partition"  # a partition needs no token table
    # The scaling tables: one row per R (at cal_texts texts) and per number of texts (at the run's R).
    assert [r["reference_keys"] for r in cal["by_reference_keys"]] == s["cal_reference_keys"]
    for r in cal["by_reference_keys"]:
        _check_cell(r, r["reference_keys"], s["cal_texts"])
    assert [r["texts"] for r in cal["by_texts"]] == sorted(s["cal_texts_grid"])
    for r in cal["by_texts"]:
        _check_cell(r, refs, r["texts"])
    assert "### Calibrated detection" in md and "Scaling with the number of reference keys" in md and "Scaling with the number of texts" in md


def test_smoke_schemes_section_covers_every_registered_scheme_shipped_first(smoke):
    from moewm.schemes.registry import scheme_kinds

    result, md = smoke
    sch = result["schemes"]
    s = result["settings"]
    assert sch["batch_size"] == s["scheme_batch"] and sch["new_tokens"] == s["scheme_new_tokens"]
    kinds = [r["kind"] for r in sch["rows"]]
    assert kinds[0] == "moe_tournament" and sorted(kinds) == sorted(scheme_kinds())
    for r in sch["rows"]:
        # Paired rounds: plain and watermarked sampling once per repeat, detection beside one forward.
        assert set(r["generation_timings"]) == {"plain", "watermarked"} and set(r["detection_timings"]) == {"detect", "forward_full_logits"}
        assert {len(t["times_s"]) for t in r["generation_timings"].values()} == {s["repeats"]}
        assert r["ratio_generation_over_plain"] > 0 and r["ratio_detect_over_forward_full_logits"] > 0
        assert sum(r["forward_batches"]) == s["scheme_batch"]
        if r["routing"]:  # calibrated among the run's reference keys
            assert 1 <= r["mean_keys_watermarked"] <= sch["reference_keys"]
    assert next(r for r in sch["rows"] if r["kind"] == "moe_tournament")["statistic"] == "green"  # the shipped design
    assert "### Every scheme" in md and "| moe_tournament | green |" in md


def test_smoke_numbers_are_finite_and_positive(smoke):
    result, _ = smoke
    found = list(_positive_numbers(result))
    assert len(found) > 50  # every section contributed
    bad = [(p, v) for p, v in found if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
    assert not bad, bad
    # Each repeat was timed once per method: 1 repeat in smoke mode.
    assert all(len(t["times_s"]) == 1 for t in result["generation"]["timings"].values())
    mem = result["memory"]
    assert mem["model_parameter_bytes"] > 0 and mem["watermark_encoder_bytes"] > 0
    assert mem["watermark_fraction_of_model"] == pytest.approx(mem["watermark_encoder_bytes"] / mem["model_parameter_bytes"])
    assert all(isinstance(v, int) and v >= 0 for v in mem["peak_bytes_above_start"].values())


def test_smoke_targets_and_markdown(smoke):
    result, md = smoke
    names = [t["target"] for t in result["targets"]]
    assert any(n.startswith("generation moe_lsh/plain") for n in names)
    assert any(n.startswith("capture (detection's forward)") for n in names)
    assert any(n.startswith("calibrated detection (R=") for n in names)
    assert any(n.startswith("batched detection / reference") for n in names)
    assert any(n.startswith("watermark tensors") for n in names)
    assert any(n.startswith("shipped tournament generation / plain sampling") for n in names)
    assert any(n.startswith("shipped tournament calibrated detection") for n in names)
    for t in result["targets"]:
        value = t["value"]
        assert t["met"] == (value >= t["limit"] if t["higher_is_better"] else value <= t["limit"])
    for heading in ("### Generation", "### Detection (", "### Calibrated detection", "### Batched detector", "### Routing capture",
                    "### Detection scaling", "### Memory", "### Every scheme", "### Targets"):
        assert heading in md, heading
    assert "| KGW (transformers WatermarkingConfig) |" in md


def test_targets_are_judged_against_their_limits():
    result = {
        "generation": {"ratio_moe_lsh_over_plain": 1.2, "ratio_kgw_over_plain": 1.5},
        "model": {"name": "tiny_moe", "num_layers": 4},
        "detection": {"ratio_capture_over_forward_full_logits": 1.1},
        "calibrated": {"reference_keys": 999, "stop_after": 10, "ratio_detect_over_forward_full_logits": 5.5},
        "reference": {
            "rows": [
                {"text_len": 128, "speedup_batched": 12.0, "speedup_batch1": 9.0, "batched_batch_size": 16},
                {"text_len": 64, "speedup_batched": 8.0, "speedup_batch1": 10.0, "batched_batch_size": 16},
            ]
        },
        "memory": {"watermark_fraction_of_model": 0.2},
    }
    met = {t["target"]: t["met"] for t in sections.targets(result)}
    assert met == {
        "generation moe_lsh/plain": False,
        "generation moe_lsh/plain below kgw/plain": True,
        "capture (detection's forward) / forward with full logits": True,
        "calibrated detection (R=999, stop_after=10, half watermarked) / full-logits forward": False,
        "batched detection / reference speed at 128 tokens": True,
        "batch-1 speedup grows with length (64 -> 128 tokens)": False,
        "batch-16 speedup grows with length (64 -> 128 tokens)": True,
        "watermark tensors / model parameters": False,
    }


def test_calibrated_target_depends_on_the_model():
    def limit(name):
        result = {"model": {"name": name}, "calibrated": {"reference_keys": 999, "stop_after": 10, "ratio_detect_over_forward_full_logits": 1.5}}
        (row,) = sections.targets(result)
        return row["limit"], row["met"]

    assert limit("tiny_moe") == (5.0, True)
    assert limit("qwen_moe") == (1.2, False)
    assert limit("micro-qwen2_moe") == (sections.CALIBRATED_TARGET_DEFAULT, True)


def test_the_shipped_tournaments_targets_depend_on_the_model():
    def judged(name, gen, det):
        row = {"kind": "moe_tournament", "ratio_generation_over_plain": gen, "ratio_detect_over_forward_full_logits": det}
        result = {"model": {"name": name}, "schemes": {"batch_size": 16, "new_tokens": 64, "reference_keys": 999, "rows": [row]}}
        return {t["target"].split(" (")[0]: (t["limit"], t["met"]) for t in sections.targets(result)}

    assert judged("tiny_moe", 1.08, 4.9) == {"shipped tournament generation / plain sampling": (1.10, True),
                                             "shipped tournament calibrated detection": (5.0, True)}
    assert judged("qwen_moe", 1.05, 1.1) == {"shipped tournament generation / plain sampling": (1.03, False),
                                             "shipped tournament calibrated detection": (1.2, True)}
    assert judged("tiny_moe", 1.2, 6.0) == {"shipped tournament generation / plain sampling": (1.10, False),
                                            "shipped tournament calibrated detection": (5.0, False)}


def test_sections_are_chosen_and_skipped_in_order():
    parse = cli.build_parser().parse_args
    assert cli.selected_sections(parse([])) == list(sections.SECTIONS)
    assert cli.selected_sections(parse(["--sections", "memory,calibrated"])) == ["calibrated", "memory"]
    assert cli.selected_sections(parse(["--sections", "calibrated,detection", "--skip", "detection"])) == ["calibrated"]
    with pytest.raises(SystemExit, match="unknown sections"):
        cli.selected_sections(parse(["--sections", "calibration"]))
    assert parse(["--stop-after", "none"]).stop_after is None and parse(["--stop-after", "5"]).stop_after == 5


def test_forward_batches_follow_the_capture_batching():
    from moewm.models.micro import micro_model

    model = micro_model("qwen2_moe")
    rows = [[5] * n for n in (10, 30, 20, 40, 25)]
    run, sizes = harness.forward_batches_fn(model, rows, 0, batch_size=2, max_tokens=None)
    assert sizes == [2, 2, 1]
    run()
    # A token budget splits the longest rows first: 40 tokens x 2 rows > 60.
    _, sizes = harness.forward_batches_fn(model, rows, 0, batch_size=4, max_tokens=60)
    assert sizes == [1, 2, 2]


def test_half_marked_takes_half_of_each_kind():
    half = sections.HalfMarked([[1], [2]], [[3], [4], [5]], [[9], [8], [7]])
    texts, prompts, marked = half.take(5)
    assert texts == [[1], [2], [3], [4], [5]] and prompts == [[9], [8], [9], [8], [7]] and marked == [True, True, False, False, False]
    assert half.take(2) == ([[1], [3]], [[9], [9]], [True, False])
    with pytest.raises(ValueError):
        half.take(8)


def test_model_yaml_merges_into_model_config(tmp_path):
    arch = dict(MICRO_ARCHITECTURES["qwen2_moe"], vocab_size=259)
    yaml = tmp_path / "micro.yaml"
    lines = ["name: micro_yaml", "path: /nonexistent/micro_yaml", "architecture:"] + [f"  {k}: {v}" for k, v in arch.items()]
    yaml.write_text("\n".join(lines) + "\n")
    args = cli.build_parser().parse_args(
        ["--model-config", str(yaml), "--random-init", "--device", "cpu", "--set", "architecture.num_hidden_layers=2"]
    )
    cfg = sections.model_config_from_args(args)
    assert isinstance(cfg, ModelConfig)
    assert cfg.name == "micro_yaml" and cfg.random_init and cfg.device == "cpu"
    assert cfg.architecture["model_type"] == "qwen2_moe"
    assert cfg.architecture["num_hidden_layers"] == 2 and cfg.architecture["num_experts"] == 8

    yaml.write_text(yaml.read_text() + "not_a_model_key: 1\n")
    with pytest.raises(Exception, match="not_a_model_key"):
        sections.model_config_from_args(args)


def test_random_init_yaml_model_runs(tmp_path):
    arch = dict(MICRO_ARCHITECTURES["mixtral"], vocab_size=259)
    yaml = tmp_path / "mixtral_micro.yaml"
    yaml.write_text("\n".join(["name: mixtral_micro", "path: /nonexistent/mixtral_micro", "architecture:"] + [f"  {k}: {v}" for k, v in arch.items()]) + "\n")
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        result = cli.main(
            ["--model-config", str(yaml), "--random-init", "--device", "cpu", "--smoke", "--threads", "1", "--cache-dir", "none",
             "--pools", "random", "--sections", "detection,calibrated", "--out", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    assert result["model"]["model_type"] == "mixtral" and result["model"]["random_init"]
    data = json.loads(out.read_text())
    assert "scaling" not in data and "generation" not in data and data["detection"]["ratio_capture_over_forward_full_logits"] > 0
    assert data["calibrated"]["ratio_detect_over_forward_full_logits"] > 0 and data["calibrated"]["bank"]["pools"] == "random"


def test_peak_memory_sees_a_large_tensor():
    with harness.PeakMemory(torch.device("cpu")) as pm:
        block = torch.ones(16 * 2**20, dtype=torch.float32)  # 64 MiB, every page touched
        assert block.sum().item() == 16 * 2**20
    assert pm.peak_bytes >= 60 * 2**20


def test_ratios_pair_the_rounds_so_a_speed_drift_cancels():
    # Measured on 2 CPU cores: the machine slowed by 20 % after round 3 (hooks vs none in generation).
    # The ratio of the medians takes "b" from a slow round and "a" from a fast one; the paired ratio does not.
    t = {"a": {"times_s": [0.865, 0.834, 0.867, 1.042, 1.052]}, "b": {"times_s": [0.869, 0.851, 1.002, 1.034, 1.042]}}
    assert statistics.median(t["b"]["times_s"]) / statistics.median(t["a"]["times_s"]) == pytest.approx(1.156, abs=1e-3)
    assert harness.ratio(t, "b", "a") == pytest.approx(1.0046, abs=1e-3)


def test_compare_rotates_the_order_within_rounds():
    order = []
    fns = {name: (lambda n=name: order.append(n)) for name in "xyz"}
    harness.compare(fns, repeats=3, warmup=0, device=torch.device("cpu"))
    assert order == list("xyz" "yzx" "zxy")
