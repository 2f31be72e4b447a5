"""The benchmark runs end to end in smoke mode and writes a complete, well-formed bench.json (no timing assertions)."""

import json
import math
import statistics

import pytest
import torch

from moewm import bench
from moewm.config import ModelConfig
from moewm.testing import MICRO_ARCHITECTURES

SECTIONS = ("generation", "detection", "reference", "capture", "scaling", "memory")
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
        bench.main(["--model", "micro", "--smoke", "--out", str(out), "--markdown", str(md)])
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
    # The timed output is checked for the watermark, with the valid null (temperature-1 samples) beside it.
    sanity = gen["sanity"]
    assert sanity["null"] == "model"
    for name in ("moe_lsh_greedy", "plain_greedy", "plain_sampled"):
        assert math.isfinite(sanity[f"z_{name}_mean"]) and sanity[f"z_{name}_std"] >= 0, name
    assert set(result["detection"]["timings"]) == {"detect_model_null", "detect_uniform_null", "forward", "forward_full_logits"}
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
    assert any(n.startswith("detection (null=model)") for n in names)
    assert any(n.startswith("detection (null=uniform)") for n in names)
    assert any(n.startswith("batched detection / reference") for n in names)
    assert any(n.startswith("watermark tensors") for n in names)
    for t in result["targets"]:
        value = t["value"]
        assert t["met"] == (value >= t["limit"] if t["higher_is_better"] else value <= t["limit"])
    for heading in ("### Generation", "### Detection (", "### Batched detector", "### Routing capture", "### Detection scaling", "### Memory", "### Targets"):
        assert heading in md, heading
    assert "| KGW (transformers WatermarkingConfig) |" in md


def test_targets_are_judged_against_their_limits():
    result = {
        "generation": {"ratio_moe_lsh_over_plain": 1.2, "ratio_kgw_over_plain": 1.5},
        "detection": {"ratio_model_null_over_forward_full_logits": 1.1, "ratio_uniform_null_over_forward": 1.4},
        "reference": {
            "rows": [
                {"text_len": 128, "speedup_batched": 12.0, "speedup_batch1": 9.0, "batched_batch_size": 16},
                {"text_len": 64, "speedup_batched": 8.0, "speedup_batch1": 10.0, "batched_batch_size": 16},
            ]
        },
        "memory": {"watermark_fraction_of_model": 0.2},
    }
    met = {t["target"]: t["met"] for t in bench.targets(result)}
    assert met == {
        "generation moe_lsh/plain": False,
        "generation moe_lsh/plain below kgw/plain": True,
        "detection (null=model) / forward with full logits": True,
        "detection (null=uniform) / forward, logits_to_keep=1": False,
        "batched detection / reference speed at 128 tokens": True,
        "batch-1 speedup grows with length (64 -> 128 tokens)": False,
        "batch-16 speedup grows with length (64 -> 128 tokens)": True,
        "watermark tensors / model parameters": False,
    }


def test_model_yaml_merges_into_model_config(tmp_path):
    arch = dict(MICRO_ARCHITECTURES["qwen2_moe"], vocab_size=259)
    yaml = tmp_path / "micro.yaml"
    lines = ["name: micro_yaml", "path: /nonexistent/micro_yaml", "architecture:"] + [f"  {k}: {v}" for k, v in arch.items()]
    yaml.write_text("\n".join(lines) + "\n")
    args = bench.build_parser().parse_args(
        ["--model-config", str(yaml), "--random-init", "--device", "cpu", "--set", "architecture.num_hidden_layers=2"]
    )
    cfg = bench.model_config_from_args(args)
    assert isinstance(cfg, ModelConfig)
    assert cfg.name == "micro_yaml" and cfg.random_init and cfg.device == "cpu"
    assert cfg.architecture["model_type"] == "qwen2_moe"
    assert cfg.architecture["num_hidden_layers"] == 2 and cfg.architecture["num_experts"] == 8

    yaml.write_text(yaml.read_text() + "not_a_model_key: 1\n")
    with pytest.raises(Exception, match="not_a_model_key"):
        bench.model_config_from_args(args)


def test_random_init_yaml_model_runs(tmp_path):
    arch = dict(MICRO_ARCHITECTURES["mixtral"], vocab_size=259)
    yaml = tmp_path / "mixtral_micro.yaml"
    yaml.write_text("\n".join(["name: mixtral_micro", "path: /nonexistent/mixtral_micro", "architecture:"] + [f"  {k}: {v}" for k, v in arch.items()]) + "\n")
    out = tmp_path / "bench.json"
    result = bench.main(
        ["--model-config", str(yaml), "--random-init", "--device", "cpu", "--smoke", "--skip", "reference,capture,scaling,memory", "--out", str(out)]
    )
    assert result["model"]["model_type"] == "mixtral" and result["model"]["random_init"]
    data = json.loads(out.read_text())
    assert "scaling" not in data and data["detection"]["ratio_uniform_null_over_forward"] > 0


def test_peak_memory_sees_a_large_tensor():
    with bench.PeakMemory(torch.device("cpu")) as pm:
        block = torch.ones(16 * 2**20, dtype=torch.float32)  # 64 MiB, every page touched
        assert block.sum().item() == 16 * 2**20
    assert pm.peak_bytes >= 60 * 2**20


def test_ratios_pair_the_rounds_so_a_speed_drift_cancels():
    # Measured on 2 CPU cores: the machine slowed by 20 % after round 3 (hooks vs none in generation).
    # The ratio of the medians takes "b" from a slow round and "a" from a fast one; the paired ratio does not.
    t = {"a": {"times_s": [0.865, 0.834, 0.867, 1.042, 1.052]}, "b": {"times_s": [0.869, 0.851, 1.002, 1.034, 1.042]}}
    assert statistics.median(t["b"]["times_s"]) / statistics.median(t["a"]["times_s"]) == pytest.approx(1.156, abs=1e-3)
    assert bench.ratio(t, "b", "a") == pytest.approx(1.0046, abs=1e-3)


def test_compare_rotates_the_order_within_rounds():
    order = []
    fns = {name: (lambda n=name: order.append(n)) for name in "xyz"}
    bench.compare(fns, repeats=3, warmup=0, device=torch.device("cpu"))
    assert order == list("xyz" "yzx" "zxy")
