"""The command as users type it: the design card's line, quoted for bash, with ``-m`` after the groups.

``python -m moewm model=qwen_moe memory=ultra_low -m 'seed=range(10)'`` runs on the shipped model and on
qwen_moe with random weights, and without weights fails at once: one message with the installed hub CLI's
command, no traceback, no job started.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from moewm.app.main import hydra_argv

ROOT = Path(__file__).resolve().parent.parent
DESIGN_CARD = "python -m moewm model=qwen_moe memory=ultra_low -m 'seed=range(10)'"
SMALL = ["data.num_prompts=2", "generation.max_new_tokens=16", "eval=minimal", "eval.null_texts=2", "logger=none", "progress=false"]
# qwen_moe's own architecture, shrunk in width and depth (8 MoE layers: memory=ultra_low reads layers [6, 8))
SHRUNK_QWEN = ["model.random_init=true", "model.device=cpu", "model.dtype=float32", "model.architecture.hidden_size=64",
               "model.architecture.intermediate_size=128", "model.architecture.moe_intermediate_size=32",
               "model.architecture.shared_expert_intermediate_size=64", "model.architecture.num_experts=8",
               "model.architecture.num_attention_heads=4", "model.architecture.num_key_value_heads=2",
               "model.architecture.num_hidden_layers=8"]


def _bash(line: str, cwd: Path, env_extra=None, timeout=900) -> subprocess.CompletedProcess:
    """Run a command line through bash, quoting and all, with this interpreter as ``python``."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "MOEWM_SECRET_KEY": "command-line-test-secret",
           "PYTHONPATH": str(ROOT), **(env_extra or {})}
    line = line.replace("python ", f"{shlex.quote(sys.executable)} ", 1)
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _card(model: str, seeds: int, extra: list[str]) -> str:
    """The design card's line with another model / number of seeds, the rest appended."""
    line = DESIGN_CARD.replace("model=qwen_moe", f"model={model}").replace("range(10)", f"range({seeds})")
    return " ".join([line, *(shlex.quote(e) for e in extra)])


@pytest.mark.parametrize("argv,expected", [
    (["model=qwen_moe", "memory=ultra_low", "-m", "seed=range(10)"], ["--multirun", "model=qwen_moe", "memory=ultra_low", "seed=range(10)"]),
    (["-m", "seed=0,1"], ["--multirun", "seed=0,1"]),
    (["seed=0,1", "--multirun", "x=1"], ["--multirun", "seed=0,1", "x=1"]),
    (["seed=1"], ["seed=1"]),
    (["--cfg", "job", "seed=1"], ["--cfg", "job", "seed=1"]),
    (["seed=1", "--", "-m"], ["seed=1", "--", "-m"]),  # after --, nothing is a flag of ours
])
def test_the_multirun_flag_may_stand_anywhere(argv, expected):
    assert hydra_argv(argv) == expected


def test_the_design_card_line_runs_on_the_shipped_model(tmp_path):
    proc = _bash(_card("tiny_moe", 2, [*SMALL, "hydra.sweep.dir=sweep"]), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert list(df.label) == ["seed=0", "seed=1"] and (df.status == "ok").all() and (df.memory_profile == "ultra_low").all()
    assert "sweep: 2 jobs, 2 ok, 0 failed; swept seed" in proc.stdout


def test_the_design_card_line_runs_on_qwen_moe_with_random_weights(tmp_path):
    proc = _bash(_card("qwen_moe", 2, [*SHRUNK_QWEN, *SMALL, "hydra.sweep.dir=sweep"]), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert list(df.label) == ["seed=0", "seed=1"] and (df.status == "ok").all()
    assert (df.model == "qwen_moe").all() and (df.start_layer_idx == 6).all() and (df.end_layer_idx == 8).all()


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_without_weights_the_design_card_line_stops_at_once_with_the_hub_cli_command(tmp_path, hub):
    """Not cached and no hub: one message naming `hf download` (huggingface_hub >= 0.34), no retries, no traceback,
    and the sweep stops before its first job (nothing written)."""
    env = {"HF_HOME": str(tmp_path / "hf")}  # an empty hub cache
    if hub == "unreachable":  # online, but nothing answers: the one probe fails at once, the hub client never retries
        env.update(HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    proc = _bash(DESIGN_CARD + " hydra.sweep.dir=sweep", tmp_path, env_extra=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count("weights for 'Qwen/Qwen1.5-MoE-A2.7B-Chat' are not available") == 1, out
    assert "hf download Qwen/Qwen1.5-MoE-A2.7B-Chat" in out and "huggingface-cli" not in out
    assert ("HF_HUB_OFFLINE=1" in out) == (hub == "offline")
    assert "The sweep stops before its first job" in out
    assert "Traceback" not in out and "Retrying" not in out
    assert not (tmp_path / "sweep").exists()


def test_without_weights_a_single_run_is_one_message_and_exit_code_2(tmp_path):
    proc = _bash(f"python -m moewm model=qwen_moe memory=ultra_low logger=none hydra.run.dir=run", tmp_path,
                 env_extra={"HF_HOME": str(tmp_path / "hf")}, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out and out.count("are not available") == 1, out
    assert "hf download" in out


def test_a_sweep_over_models_skips_the_jobs_of_the_one_without_weights_and_says_so(tmp_path, monkeypatch):
    """The per-job path (a swept model): the hub is asked once per process, the other jobs of that model are skipped at once."""
    from moewm.app import services
    from moewm.models import architecture
    from composing import app_config

    calls = []
    monkeypatch.setattr(architecture, "hub_unreachable", lambda timeout_s=5.0: calls.append(1) or "the hub could not be reached (test)")
    monkeypatch.setattr(services, "_UNAVAILABLE", {})
    app = app_config(["model=qwen_moe", "memory=ultra_low"])
    for _ in range(3):
        with pytest.raises(architecture.WeightsUnavailableError, match="hf download Qwen/Qwen1.5-MoE-A2.7B-Chat"):
            services.check_weights(app)
    assert len(calls) == 1
    services.check_weights(app_config(["model=tiny_moe"]))  # shipped: never asks the hub
    assert len(calls) == 1

    from moewm.app.console import sweep_report

    df = pd.DataFrame([{"job": "0", "override.model": "qwen_moe", "status": "skipped", "error": "WeightsUnavailableError: ..."},
                       {"job": "1", "override.model": "tiny_moe", "status": "ok", "detection_rate": 1.0}])
    text = sweep_report(df, tmp_path, [])
    assert "sweep: 2 jobs, 1 ok, 0 failed, 1 skipped; swept model" in text and "skipped without running" in text


@pytest.mark.parametrize("version,command", [("2.4.0", "hf download x/y"), ("0.34.1", "hf download x/y"),
                                             ("0.30.2", "huggingface-cli download x/y")])
def test_the_download_command_is_the_installed_clis(monkeypatch, version, command):
    import huggingface_hub

    from moewm.models.architecture import download_command

    monkeypatch.setattr(huggingface_hub, "__version__", version)
    assert download_command("x/y") == command


def test_the_readme_says_how_to_quote_the_sweep():
    readme = (ROOT / "README.md").read_text()
    assert DESIGN_CARD in readme
    assert "syntax error" in readme  # an unquoted range(10) never reaches the program
