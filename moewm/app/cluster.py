"""What a cluster sweep needs beyond the jobs themselves: resuming a half-finished sweep, and a row for a lost job.

A scheduler can end a job before it writes anything (``scancel``, the time limit, out of memory). The
app's own failure record (``metrics.json`` with ``status=failed``) is written by the job, so a killed
job leaves none; :func:`record_lost_job` writes it from the launcher's side, with the scheduler's
reason, so that the sweep still ends with one row per job. :func:`finished` says whether a job folder
already holds a finished run of the same overrides, so that rerunning a sweep into the same
``hydra.sweep.dir`` only sends the jobs that did not finish (``hydra_plugins.moewm_launcher``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from moewm.app.sweep import parse_overrides
from moewm.io import write_json


def _saved_overrides(job_dir: Path) -> Optional[list[str]]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return None
    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]


def finished(job_dir: Path, overrides: Sequence[str]) -> bool:
    """True when ``job_dir`` holds ``metrics.json`` with ``status=ok`` from a job with the same overrides.

    A literal ``secret_key=`` override is left out of the comparison (the saved copy holds its fingerprint).
    """
    path = Path(job_dir) / "metrics.json"
    saved = _saved_overrides(Path(job_dir))
    if not path.exists() or saved is None or parse_overrides(saved) != parse_overrides(overrides):
        return False
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def record_lost_job(job_dir: Path, overrides: Sequence[str], error: str, extra: Optional[dict[str, Any]] = None) -> bool:
    """A failed row for a job that ended without writing one; False (nothing written) when the job wrote its own."""
    job_dir = Path(job_dir)
    if (job_dir / "metrics.json").exists():
        return False
    hydra_dir = job_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    if not (hydra_dir / "overrides.yaml").exists():  # cancelled before it started: the row still carries its swept values
        (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump([str(o) for o in overrides]))
    write_json(job_dir / "metrics.json", {"status": "failed", "error": error, **(extra or {})})
    return True


def forget_failure(job_dir: Path) -> None:
    """Before a job is sent again: drop its failed ``metrics.json`` (a finished one is never touched)."""
    path = Path(job_dir) / "metrics.json"
    try:
        if json.loads(path.read_text()).get("status") != "ok":
            path.unlink()
    except (OSError, ValueError):
        pass
