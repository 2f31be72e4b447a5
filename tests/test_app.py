"""The Hydra app: every config option composes and validates; sweeps write the output contract."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from composing import compose_config
from moewm.app.main import CONF_DIR, job_name
from moewm.config import ConfigError
from moewm.app.schema import register, to_app_config, validate_app

register()
ROOT = Path(__file__).resolve().parent.parent
GROUPS = ["model", "memory", "extractor", "encoder", "watermark", "generation", "data", "logger", "attack", "eval", "experiment"]
SECRET = "s3cr3t-value-that-must-not-leak-7d1e"
SMOKE = ["model=micro_moe", "encoder.num_bits=16", "encoder.pool_size=8", "data.num_prompts=4", "generation.max_new_tokens=24", "generation.batch_size=4", "eval=minimal", "progress=false"]


def _options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


# Options that need an extra value the user must give (marked ??? in their YAML).
NEEDS = {("data", "file"): ["data.path=conf/data/prompts.txt"], ("data", "hf"): ["data.hf_name=some/dataset"]}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}", *NEEDS.get((group, option), [])]
    if (group, option) == ("model", "qwen_dense"):
        overrides.append("extractor=hidden")
    app = to_app_config(compose_config(overrides))
    validate_app(app)


@pytest.mark.parametrize(
    "overrides,warns",
    [
        ([], False),
        (["generation.do_sample=false"], False),  # the calibrated p-value holds for any decoding
        (["generation.do_sample=false", "watermark.z_threshold=4"], True),
        (["generation.temperature=0.7", "watermark.z_threshold=4"], True),
        (["generation.top_p=0.9", "watermark.z_threshold=4"], True),
        (["generation.do_sample=false", "watermark.null=uniform", "watermark.z_threshold=4"], False),
        (["generation.do_sample=false", "watermark=kgw", "watermark.z_threshold=4"], False),
    ],
)
def test_model_null_warns_when_the_legacy_z_rule_judges_text_that_is_not_a_model_sample(overrides, warns, caplog):
    app = to_app_config(compose_config(["model=micro_moe", *overrides]))
    with caplog.at_level("WARNING", logger="moewm.app.schema"):
        validate_app(app)
    assert any("watermark.null=model assumes" in r.getMessage() for r in caplog.records) == warns


def test_dense_model_with_router_extractor_fails_before_loading():
    app = to_app_config(compose_config(["model=qwen_dense", "extractor=router"]))
    with pytest.raises(ConfigError, match="extractor=hidden"):
        validate_app(app)


def test_misspelled_key_and_wrong_type_fail_at_start_up():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_config(["encoder.num_bitz=8"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["encoder.num_bits=many"])


def test_cross_field_checks_name_the_key_and_range():
    app = to_app_config(compose_config(["model=micro_moe", "extractor.end_layer_idx=9"]))

    with pytest.raises(ConfigError, match=r"extractor.end_layer_idx=9: allowed range is \[1, 4\]"):
        validate_app(app)
    app = to_app_config(compose_config(["model=micro_moe", "extractor.use_top_k=true", "extractor.k=20"]))
    with pytest.raises(ConfigError, match=r"extractor.k=20: allowed range is \[1, 8\]"):
        validate_app(app)


def test_memory_profile_values_yield_to_command_line():
    app = to_app_config(compose_config(["memory=ultra_low"]))
    assert (app.extractor.start_layer_idx, app.extractor.end_layer_idx, app.encoder.num_bits, app.encoder.pool_size) == (6, 8, 64, 4)
    assert app.generation.max_new_tokens == 64 and app.extractor.k == 2
    app = to_app_config(compose_config(["memory=ultra_low", "encoder.num_bits=16"]))
    assert app.encoder.num_bits == 16


def test_seed_changes_only_the_key_not_sampling():
    a = to_app_config(compose_config(["seed=1"]))
    b = to_app_config(compose_config(["seed=2"]))
    assert a.generation.sampling_seed == b.generation.sampling_seed


def test_job_name_never_carries_the_secret():
    assert SECRET not in job_name(["seed=1", f"secret_key={SECRET}"])


def _run(args, tmp_path, env_extra=None, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "MOEWM_SECRET_KEY": SECRET, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "moewm", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _all_text(folder):
    for path in Path(folder).rglob("*"):
        if path.is_file():
            yield path, path.read_bytes()


def test_multirun_writes_summary_wandb_and_never_the_secret(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(["-m", "seed=0,1", "extractor.end_layer_idx=null,99", *SMOKE, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode != 0, "a failed job must make the process exit non-zero"
    df = pd.read_csv(sweep / "summary.csv")
    assert len(df) == 4
    ok, failed = df[df.status == "ok"], df[df.status == "failed"]
    assert len(ok) == 2 and len(failed) == 2
    assert failed.error.str.contains("extractor.end_layer_idx=99").all()
    assert set(ok.seed) == {0, 1}
    for column in ["label", "key_fingerprint", "z_wm_mean", "z_unwm_mean", "auc", "tpr_at_1pct_fpr", "detection_rate",
                   "false_positive_rate", "ppl_wm_mean", "null_ok", "fpr_greedy", "detect_tokens_per_s", "peak_memory_mb", "override.seed"]:
        assert column in df.columns, column
    assert len(set(df.label)) == 4 and "seed=0 extractor.end_layer_idx=null" in set(df.label)
    assert (ok.model_loads_in_process == 1).all(), "the model must be loaded once per in-process multirun"
    assert (sweep / "z_per_job.png").exists() and (sweep / "roc.png").exists()
    job = sweep / str(ok.job.iloc[0])
    metrics = json.loads((job / "metrics.json").read_text())
    samples = [json.loads(line) for line in (job / "samples.jsonl").read_text().splitlines()]
    assert metrics["n_samples"] == 4 and len(samples) == 4 and {"prompt", "text_wm", "text_unwm", "z_wm", "z_unwm"} <= set(samples[0])

    # the terminal: a line per job, the sweep table, and the exact command that uploads the offline runs
    out = proc.stdout
    assert "sweep: 4 jobs, 2 ok, 2 failed; swept seed, extractor.end_layer_idx" in out
    [sync] = [line for line in out.splitlines() if line.startswith("W&B (offline): wandb sync ")]
    assert sync == "W&B (offline): wandb sync sweep/wandb/offline-run-* sweep/*/wandb/offline-run-*"  # relative to cwd
    assert len(list(sweep.glob("wandb/offline-run-*"))) == 1  # the sweep-level run
    assert len(list(sweep.glob("*/wandb/offline-run-*"))) == 4  # one per job, failed ones included
    assert "Traceback" not in out

    # the secret appears in no file the sweep wrote (W&B folders included)
    leaks = [str(p) for p, data in _all_text(sweep) if SECRET.encode() in data]
    assert not leaks, leaks


def test_a_run_prints_one_short_block_ending_with_its_files(tmp_path):
    out_dir = tmp_path / "run"
    proc = _run([*SMOKE, "logger=none", f"hydra.run.dir={out_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) <= 30, proc.stdout
    assert lines[-1].split()[:2] == ["files", "run/"]  # relative to the working directory
    assert any(line.strip().startswith("detected") for line in lines)
    assert "INFO" not in proc.stdout + proc.stderr  # INFO lines go to the job's main.log
    assert "INFO" in (out_dir / "main.log").read_text()  # the file the README names
    assert "`main.log`" in (ROOT / "README.md").read_text()


def test_help_lists_groups_modes_and_examples(tmp_path):
    proc = _run(["--help"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in ["mode=", "detect", "estimate", "experiment: bits_sweep, design_search, layer_sweep, routing_study, seed_sensitivity",
                 "model:", "python -m moewm -m seed='range(10)'", "mode=detect input="]:
        assert text in proc.stdout, text
    assert "powered by Hydra" not in proc.stdout


def test_a_file_that_is_not_utf8_is_a_one_line_error(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    proc = _run(["mode=detect", f"input={texts}", "model=micro_moe", "logger=none", f"hydra.run.dir={tmp_path / 'd'}"], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert f"{texts}:2: not UTF-8 (byte 0xe9 at column 4)" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    proc = _run(["data=file", f"data.path={texts}", *SMOKE, "logger=none", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, timeout=120)
    assert proc.returncode == 2 and "not UTF-8" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_readme_ten_seed_sweep_ends_with_one_screen(tmp_path):
    """README's sweep, exactly: 10 keys on tiny_moe, W&B offline; the terminal ends with the table and wandb sync."""
    sweep = tmp_path / "sweep"
    proc = _run(["-m", "seed=range(10)", f"hydra.sweep.dir={sweep}"], tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_csv(sweep / "summary.csv")
    assert len(df) == 10 and (df.status == "ok").all() and list(df.label) == [f"seed={s}" for s in range(10)]
    lines = proc.stdout.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("sweep: 10 jobs"))
    assert len(lines) - start <= 25, "\n".join(lines[start:])
    assert lines[-1].startswith("W&B (offline): wandb sync ")
    assert len(lines) <= 60, proc.stdout  # 1 + 2 per job from Hydra and moewm, then the table
    assert len(list(sweep.glob("*/wandb/offline-run-*"))) == 10


def test_secret_on_the_command_line_is_scrubbed_and_detect_mode_scores_a_file(tmp_path):
    texts = tmp_path / "texts.jsonl"
    ids = list(range(40, 90))
    texts.write_text(json.dumps({"text": "Return the number of items in the list and the", "prompt": "Hello"}) + "\n"
                     + json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "(ids given)", "ids": ids, "prompt_ids": [1]}) + "\n")
    out = tmp_path / "run"
    proc = _run(["mode=detect", f"input={texts}", f"secret_key={SECRET}", "model=micro_moe", "watermark.min_tokens=4",
                 "logger=none", f"hydra.run.dir={out}"], tmp_path, env_extra={"MOEWM_SECRET_KEY": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {"z_score", "p_value", "p_value_floor", "num_reference_keys", "prediction", "num_tokens_scored"} <= set(rows[0])
    assert rows[1]["p_value"] is None and "min_tokens" in rows[1]["note"]  # too short: NaN, no exception
    assert rows[2]["num_tokens_scored"] == len(ids)  # scored as given, not tokenised again
    summary = json.loads((out / "detection_summary.json").read_text())
    assert summary["alpha"] == 1e-3 and summary["reference_keys"] == 999 and "reference keys" in summary["p_value_null"]
    assert summary["n_retokenised"] == 2
    assert "p=" in proc.stdout and "tokens=" in proc.stdout
    leaks = [str(p) for p, data in _all_text(out) if SECRET.encode() in data]
    assert not leaks, leaks


def test_real_model_offline_fails_fast_with_a_clear_message(tmp_path):
    proc = _run(["model=qwen_moe", "memory=ultra_low", "logger=none", f"hydra.run.dir={tmp_path / 'q'}"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "not available" in proc.stderr + proc.stdout


def test_submitit_local_sweep_runs_the_cluster_path(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "seed=0,1", *SMOKE, "logger=none",
                 f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(sweep / "summary.csv")
    assert len(df) == 2 and (df.status == "ok").all()


def test_the_readme_api_example_runs_and_detects(monkeypatch, capsys):
    """The README's ten-line API example, exactly as printed there (the public entry points of the package)."""
    monkeypatch.setenv("MOEWM_SECRET_KEY", "readme-api-test-secret")
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## The API in ten lines"):]
    code = section[section.index("```python") + len("```python"): section.index("```", section.index("```python") + 9)]
    exec(compile(code, "README.md", "exec"), {})
    z, p, prediction = capsys.readouterr().out.split()[-3:]
    assert prediction == "True" and float(p) <= 1e-3 and float(z) > 3
