"""What reaches W&B, checked through wandb's public API only: a recording stand-in for ``wandb`` (in
process and through the real entrypoint) and one real offline run read back from its Run object and files."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moewm.config import LoggerConfig
from moewm.app.tracking import Tracker, run_tags, sync_command

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-value-that-must-not-leak-7d1e"

# A stand-in for the wandb package: every call is appended to $FAKE_WANDB_LOG as one JSON line.
FAKE_WANDB = textwrap.dedent('''
    import itertools, json, os

    __version__ = "0.0-fake"
    _ids = itertools.count()

    def _record(**event):
        with open(os.environ["FAKE_WANDB_LOG"], "a") as handle:
            handle.write(json.dumps(event, default=str) + "\\n")

    class Settings:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class Table:
        def __init__(self, columns=None, data=None):
            self.columns, self.data = list(columns), [list(r) for r in data]

    class Image:
        def __init__(self, path, caption=None):
            self.path, self.caption = path, caption

    class Histogram:
        def __init__(self, values):
            self.values = list(values)

    class _Summary(dict):
        def __init__(self, run):
            super().__init__()
            self.run = run
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            _record(event="summary", run=self.run, key=key, value=value)

    class Run:
        def __init__(self, **kwargs):
            self.id = f"{os.getpid()}-{next(_ids)}"
            self.name, self.group, self.tags = kwargs.get("name"), kwargs.get("group"), kwargs.get("tags")
            self.summary = _Summary(self.id)
            self.url = None
        def log(self, data):
            out = {}
            for key, value in data.items():
                if isinstance(value, Table):
                    out[key] = {"table_columns": value.columns, "rows": len(value.data)}
                elif isinstance(value, Image):
                    out[key] = {"image": value.path, "caption": value.caption}
                else:
                    out[key] = type(value).__name__
            _record(event="log", run=self.id, data=out)
        def finish(self, exit_code=0):
            _record(event="finish", run=self.id, exit_code=exit_code)

    def init(**kwargs):
        if os.environ.get("FAKE_WANDB_FAIL"):
            raise RuntimeError("no network")
        run = Run(**kwargs)
        kwargs.pop("settings", None)
        _record(event="init", run=run.id, **kwargs)
        return run
''')


@pytest.fixture
def fake_wandb(tmp_path, monkeypatch):
    """The stand-in on sys.path (for this process and its subprocesses); returns a reader of its log."""
    folder = tmp_path / "fake_site" / "wandb"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb_calls.jsonl"
    monkeypatch.setenv("FAKE_WANDB_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder.parent), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(folder.parent))
    real = sys.modules.pop("wandb", None)

    def read():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    yield read
    sys.modules.pop("wandb", None)
    if real is not None:
        sys.modules["wandb"] = real


def _runs(events):
    """run id -> {init kwargs, summary, logged keys, finished}."""
    runs = {}
    for e in events:
        run = runs.setdefault(e["run"], {"summary": {}, "logged": {}, "finished": None})
        if e["event"] == "init":
            run.update(e)
        elif e["event"] == "summary":
            run["summary"][e["key"]] = e["value"]
        elif e["event"] == "log":
            run["logged"].update(e["data"])
        elif e["event"] == "finish":
            run["finished"] = e["exit_code"]
    return runs


def test_tracker_sends_name_group_tags_config_summary_and_tables(tmp_path, fake_wandb):
    tracker = Tracker.start(LoggerConfig(mode="offline", tags=["bits_sweep", "mine"]), run_dir=tmp_path / "job",
                            name="seed=3 encoder=pca", group="bits_sweep: seed x encoder (2026-11-28/08-22-03)",
                            config={"seed": 3, "secret_key": "fingerprint:abcd"})
    tracker.summary({"auc": 0.99, "status": "ok", "skipped": [1, 2]})
    tracker.table("samples", [{"z_wm": 5.0, "z_unwm": 0.1}])
    png = tmp_path / "roc.png"
    png.write_bytes(b"png")
    tracker.images([png], ["ROC per job"])
    tracker.finish()
    [run] = _runs(fake_wandb()).values()
    assert run["name"] == "seed=3 encoder=pca" and run["group"].startswith("bits_sweep: seed x encoder")
    assert run["tags"] == ["bits_sweep", "mine"] and run["mode"] == "offline" and run["job_type"] == "job"
    assert run["config"]["secret_key"] == "fingerprint:abcd"
    assert run["summary"] == {"auc": 0.99, "status": "ok"}
    assert run["logged"]["samples"] == {"table_columns": ["z_wm", "z_unwm"], "rows": 1}
    assert run["logged"]["roc"] == {"image": str(png), "caption": "ROC per job"}
    assert run["finished"] == 0


def test_a_broken_wandb_never_costs_the_job(tmp_path, fake_wandb, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_WANDB_FAIL", "1")
    tracker = Tracker.start(LoggerConfig(mode="online"), run_dir=tmp_path, name="x", group=None, config={})
    assert not tracker.active
    tracker.summary({"auc": 1.0})
    tracker.finish()
    assert sum("W&B init" in r.getMessage() for r in caplog.records) == 2  # online, then offline, then off


def test_a_real_offline_run_receives_name_group_tags_config_summary_and_table(tmp_path):
    import wandb

    tracker = Tracker.start(LoggerConfig(mode="offline", tags=["seed_sensitivity"]), run_dir=tmp_path / "sweep" / "0",
                            name="seed=0 encoder=pca", group="seed_sensitivity: seed x encoder (x/sweep)",
                            config={"seed": 0, "secret_key": "fingerprint:abcd"})
    assert tracker.active and tracker.mode == "offline" and tracker.url is None
    run = tracker.run
    assert (run.name, run.group, tuple(run.tags)) == ("seed=0 encoder=pca", "seed_sensitivity: seed x encoder (x/sweep)", ("seed_sensitivity",))
    assert run.config["secret_key"] == "fingerprint:abcd" and run.config["seed"] == 0
    tracker.summary({"auc": 0.99, "detection_rate": 0.8})
    assert run.summary["auc"] == 0.99
    tracker.table("samples", [{"z_wm": 5.0, "z_unwm": 0.1}])
    tracker.finish()
    [run_dir] = (tmp_path / "sweep" / "0" / "wandb").glob("offline-run-*")
    [table] = run_dir.glob("files/media/table/samples_*.table.json")
    assert json.loads(table.read_text())["columns"] == ["z_wm", "z_unwm"]
    assert list(run_dir.glob("run-*.wandb")), f"no transaction log in {run_dir} (wandb {wandb.__version__})"
    command = sync_command(tmp_path / "sweep")
    assert command == f"wandb sync {tmp_path / 'sweep'}/*/wandb/offline-run-*"


def test_sync_command_names_the_sweep_run_and_the_job_runs(tmp_path, monkeypatch):
    assert sync_command(tmp_path) is None
    (tmp_path / "s p" / "wandb" / "offline-run-1").mkdir(parents=True)
    (tmp_path / "s p" / "0" / "wandb" / "offline-run-2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert sync_command(tmp_path / "s p") == "wandb sync 's p'/wandb/offline-run-* 's p'/*/wandb/offline-run-*"


def test_run_tags_are_the_presets_then_the_loggers_each_once():
    assert run_tags(["bits_sweep"], ["mine", "bits_sweep", "mine"]) == ["bits_sweep", "mine"]
    assert run_tags([], ["mine"]) == ["mine"] and run_tags(["layer_sweep"], []) == ["layer_sweep"]


SMOKE = ["model=micro_moe", "encoder.num_bits=16", "encoder.pool_size=8", "data.num_prompts=4", "generation.max_new_tokens=24",
         "generation.batch_size=4", "eval=minimal", "progress=false"]


def test_a_preset_sweep_reaches_wandb_named_grouped_and_tagged(tmp_path, fake_wandb):
    """Through the real entrypoint: jobs named by their swept values, one group per sweep, the preset's tags."""
    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=seed_sensitivity", "hydra.sweeper.params.seed='0,1'", "hydra.sweeper.params.encoder=simhash", "encoder.pools=partition",
            "logger.tags=[mine,seed_sensitivity]", *SMOKE, f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOEWM_SECRET_KEY": SECRET}
    proc = subprocess.run([sys.executable, "-m", "moewm", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list(_runs(fake_wandb()).values())
    jobs = [r for r in runs if r.get("job_type") == "job"]
    [summary] = [r for r in runs if r.get("job_type") == "sweep-summary"]
    assert sorted(r["name"] for r in jobs) == ["seed=0", "seed=1"]
    groups = {r["group"] for r in runs}
    assert groups == {f"seed_sensitivity: seed ({sweep.parent.name}/sweep)"}, groups
    for run in runs:
        assert run["tags"] == ["seed_sensitivity", "mine"], run["tags"]  # the preset's first, each once
        assert run["finished"] == 0
    for run in jobs:
        assert run["config"]["seed"] in (0, 1) and run["config"]["secret_key"].startswith("fingerprint:")
        assert {"detection_rate", "auc", "status", "key_fingerprint"} <= set(run["summary"])
        assert "samples" in run["logged"]
    assert "label" in summary["logged"]["summary"]["table_columns"]
    assert {"z_per_job", "roc", "null_calibration"} <= set(summary["logged"])
    assert summary["summary"]["jobs"] == 2 and "mean_detection_rate" in summary["summary"]
    assert SECRET not in json.dumps(runs)


def test_w_and_b_tables_get_one_type_per_column_and_no_infinity():
    """A key that never detects has tokens to detect inf, stored in metrics.json as the text "inf": W&B refuses a
    column that mixes it with numbers (seen in CI), so it becomes an empty cell; text-and-number columns become text."""
    import numpy as np

    from moewm.app.tracking import table_cells

    columns, data = table_cells([{"t": "inf", "mixed": 1, "x": np.float64(2.5)}, {"t": 17.0, "mixed": "a", "x": float("nan"), "late": True}])
    assert columns == ["t", "mixed", "x", "late"]
    assert data == [[None, "1", 2.5, None], [17.0, "a", None, True]]
