"""Sweeps through a real SLURM scheduler (``scripts/slurm_local.sh start``): real ``sbatch``, ``scancel``, ``sacct``.

Skipped, with the reason, when no local SLURM with accounting answers; ``.ci/run`` starts one and sets
``MOEWM_REQUIRE_SLURM=1``, which turns the skip into a failure. The jobs run this checkout's code: the
sweep is started from the repository root, which is the submitted jobs' working folder too.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from moewm.app.cluster import finished, forget_failure, record_lost_job

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["model=micro_moe", "encoder.num_bits=16", "encoder.pool_size=8", "data.num_prompts=4", "generation.max_new_tokens=24",
         "generation.batch_size=4", "eval=minimal", "progress=false", "logger=none"]


def _slurm_missing() -> str:
    """Why no SLURM job can be sent from here ("" when one can)."""
    if not shutil.which("sbatch"):
        return "no sbatch on PATH (scripts/slurm_local.sh start installs and starts a local SLURM)"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
        accounting = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM does not answer ({err}); scripts/slurm_local.sh start"
    if nodes.returncode != 0 or not any(s.strip("*~#") in {"idle", "mixed", "allocated"} for s in nodes.stdout.split()):
        return f"no SLURM node up (sinfo: {(nodes.stdout + nodes.stderr).strip()[:200]!r}); scripts/slurm_local.sh start"
    if accounting.returncode != 0:
        return "SLURM runs without accounting: sacct fails, so a killed job would never end the sweep; scripts/slurm_local.sh start"
    return ""


MISSING = _slurm_missing()
if MISSING and os.environ.get("MOEWM_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"MOEWM_REQUIRE_SLURM=1 but {MISSING}")
needs_slurm = pytest.mark.skipif(bool(MISSING), reason=MISSING)


def _sweep_args(sweep: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moewm", "-m", "hydra/launcher=slurm_local", "seed=0,1", *SMOKE, *extra, f"hydra.sweep.dir={sweep}"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MOEWM_CACHE_DIR": str(tmp_path / "cache")}


def _submitted(sweep: Path) -> list[str]:
    """SLURM ids of the jobs sent for this sweep (``12_0``, ``12_1`` for an array; ``14`` for a lone job), from submitit's folders."""
    return sorted(p.name[: -len("_submitted.pkl")] for p in (sweep / ".submitit").rglob("*_submitted.pkl"))


def _sacct_state(job_id: str) -> str:
    proc = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True, timeout=30)
    return proc.stdout.strip()


@needs_slurm
def test_a_seed_sweep_goes_through_real_sbatch_and_writes_its_summary(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(_sweep_args(sweep), cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    df = pd.read_csv(sweep / "summary.csv")
    assert len(df) == 2 and (df.status == "ok").all() and set(df.seed) == {0, 1}
    assert df.key_fingerprint.nunique() == 2 and df.null_ok.all()
    jobs = _submitted(sweep)  # one sbatch array of two tasks, both finished for SLURM too
    assert len(jobs) == 2 and jobs[0].endswith("_0") and jobs[1].endswith("_1"), jobs
    assert [_sacct_state(j) for j in jobs] == ["COMPLETED", "COMPLETED"]
    assert "2 jobs, 2 ok" in proc.stdout


@needs_slurm
def test_a_cancelled_job_is_a_failed_row_the_sweep_ends_and_a_rerun_sends_only_that_job(tmp_path):
    sweep = tmp_path / "sweep"
    env = _env(tmp_path)
    proc = subprocess.Popen(_sweep_args(sweep), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cancelled = None
    try:
        deadline = time.monotonic() + 600
        while cancelled is None and time.monotonic() < deadline and proc.poll() is None:
            tasks = [j for j in _submitted(sweep) if j.endswith("_1")]
            if tasks:
                state = subprocess.run(["squeue", "-h", "-o", "%T", "-j", tasks[0]], capture_output=True, text=True).stdout.strip()
                if state == "RUNNING":
                    time.sleep(1.0)  # mid-run: python has started, nothing is written yet (a job takes tens of seconds)
                    subprocess.run(["scancel", tasks[0]], check=True)
                    cancelled = tasks[0]
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=1200)  # the sweep must end by itself
    finally:
        if proc.poll() is None:
            proc.kill()
    assert cancelled, "job 1 never ran"
    assert _sacct_state(cancelled).startswith("CANCELLED"), f"{cancelled} finished before scancel: {_sacct_state(cancelled)}"
    assert proc.returncode == 1, out[-3000:]  # a failed job: the sweep's exit status says so
    df = pd.read_csv(sweep / "summary.csv").set_index("seed")
    assert len(df) == 2
    assert df.loc[0, "status"] == "ok" and df.loc[0, "detection_rate"] >= 0  # the other row is kept, with its metrics
    assert df.loc[1, "status"] == "failed"
    assert f"SLURM job {cancelled} ended CANCELLED" in df.loc[1, "error"], df.loc[1, "error"]
    assert df.loc[1, "label"] == "seed=1"
    first_metrics = (sweep / "0" / "metrics.json").read_text()

    # Resume: the same command into the same sweep folder sends only the job that did not finish.
    rerun = subprocess.run(_sweep_args(sweep), cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    jobs = _submitted(sweep)
    assert len(jobs) == 3 and cancelled in jobs, jobs  # the first sweep's two, and one more
    assert "(finished in " in rerun.stdout + rerun.stderr and "not submitted again" in rerun.stdout + rerun.stderr
    df = pd.read_csv(sweep / "summary.csv")
    assert len(df) == 2 and (df.status == "ok").all() and set(df.seed) == {0, 1}
    assert (sweep / "0" / "metrics.json").read_text() == first_metrics  # the finished job was left alone


def _job(tmp_path, overrides, status):
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "metrics.json").write_text(json.dumps({"status": status}))
    return job


@pytest.mark.parametrize("status,saved,expected", [
    ("ok", ["seed=0", "model=micro_moe"], True),
    ("ok", ["seed=0", "model=micro_moe", "secret_key=fingerprint:ab12"], True),  # the saved copy holds the fingerprint
    ("ok", ["seed=1", "model=micro_moe"], False),  # another job's folder
    ("failed", ["seed=0", "model=micro_moe"], False),
])
def test_a_job_counts_as_finished_only_with_status_ok_and_the_same_overrides(tmp_path, status, saved, expected):
    job = _job(tmp_path, saved, status)
    assert finished(job, ["seed=0", "model=micro_moe", "secret_key=s3cr3t"] if "secret" in str(saved) else ["seed=0", "model=micro_moe"]) == expected


def test_a_lost_job_gets_a_failed_row_but_never_overwrites_what_a_job_wrote(tmp_path):
    job = tmp_path / "3"
    assert record_lost_job(job, ["seed=3"], "SLURM job 7_3 ended TIMEOUT before returning", {"seed": 3})
    assert json.loads((job / "metrics.json").read_text()) == {"status": "failed", "error": "SLURM job 7_3 ended TIMEOUT before returning", "seed": 3}
    assert "seed=3" in (job / ".hydra" / "overrides.yaml").read_text()  # the row keeps its label
    assert not record_lost_job(job, ["seed=3"], "another reason")
    forget_failure(job)  # before a rerun: the stale reason goes
    assert not (job / "metrics.json").exists()
    done = _job(tmp_path / "done", ["seed=0"], "ok")
    forget_failure(done)
    assert (done / "metrics.json").exists()


@pytest.mark.parametrize("launcher,cpus,gpus", [("slurm_local", 1, None), ("slurm_gpu", 8, 1)])
def test_both_slurm_launchers_compose_to_the_launcher_that_ends_and_resumes(launcher, cpus, gpus):
    from composing import compose_config

    cfg = compose_config([f"hydra/launcher={launcher}", "hydra.launcher.partition=batch", "hydra.launcher.account=proj",
                          "hydra.launcher.timeout_min=240"], hydra_config=True).hydra.launcher
    assert cfg._target_ == "hydra_plugins.moewm_launcher.MoewmSlurmLauncher" and cfg.skip_done is True
    assert (cfg.cpus_per_task, cfg.get("gpus_per_node"), cfg.partition, cfg.account, cfg.timeout_min) == (cpus, gpus, "batch", "proj", 240)
