"""Weights & Biases: one run per job, named after its swept values and grouped by sweep; offline unless the user opts in; never fatal.

The config sent to W&B is the resolved config with the secret replaced by its fingerprint. Any W&B
failure (no network, bad API key, a broken install) falls back to offline, then to no tracking, with a
warning: losing a dashboard must never lose a job's results, which are on disk first. Only wandb's
public API is used (``init``, the run's ``summary`` / ``log`` / ``finish``, ``Table``, ``Image``,
``Histogram``), so any release from 0.19.10 on works.
"""

from __future__ import annotations

import logging
import os
import shlex
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from moewm.config import LoggerConfig

log = logging.getLogger(__name__)


def run_tags(preset_tags: Sequence[str], logger_tags: Sequence[str]) -> list[str]:
    """A run's W&B tags: the experiment preset's top-level ``tags``, then ``logger.tags``, each once.

    Presets (conf/experiment/*.yaml) set the top-level key, users ``logger.tags``; both must reach the run.
    """
    return list(dict.fromkeys([*preset_tags, *logger_tags]))


def resolve_mode(cfg: LoggerConfig) -> str:
    """logger.mode if set, else $WANDB_MODE, else offline."""
    return cfg.mode or os.environ.get("WANDB_MODE") or "offline"


class Tracker:
    """A thin, failure-proof wrapper around one W&B run (a no-op when tracking is off or broken)."""

    def __init__(self, run: Any = None, mode: Optional[str] = None) -> None:
        self.run = run
        self.mode = mode  # the mode wandb.init succeeded in: online, offline or disabled

    @property
    def active(self) -> bool:
        return self.run is not None

    @classmethod
    def start(
        cls,
        cfg: LoggerConfig,
        *,
        run_dir: Path,
        name: str,
        group: Optional[str],
        config: dict[str, Any],
        job_type: str = "job",
    ) -> "Tracker":
        if cfg.kind == "none":
            return cls(None)
        try:
            import wandb
        except ImportError:
            warnings.warn("logger=wandb but wandb is not installed: tracking is off for this job", stacklevel=2)
            return cls(None)
        mode = resolve_mode(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        for attempt in ([mode, "offline"] if mode == "online" else [mode]):
            try:
                run = wandb.init(
                    project=cfg.project,
                    entity=cfg.entity,
                    mode=attempt,
                    dir=str(run_dir),
                    name=name,
                    group=group,
                    job_type=job_type,
                    tags=list(cfg.tags) or None,
                    config=config,
                    reinit="finish_previous",
                    settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_meta=True),
                )
                return cls(run, attempt)
            except Exception as err:  # noqa: BLE001 - any W&B failure must not kill a job
                log.warning("W&B init in %s mode failed (%s: %s)%s", attempt, type(err).__name__, err,
                            "; falling back to offline" if attempt == "online" else "; tracking is off for this job")
        return cls(None)

    def _safe(self, what: str, fn: Any) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            log.warning("W&B %s failed (%s: %s); continuing without it", what, type(err).__name__, err)

    def summary(self, metrics: dict[str, Any]) -> None:
        def do() -> None:
            for key, value in metrics.items():
                if isinstance(value, (int, float, str, bool)) or value is None:
                    self.run.summary[key] = value

        self._safe("summary", do)

    def histograms(self, arrays: dict[str, Sequence[float]]) -> None:
        import wandb

        def do() -> None:
            data = {}
            for key, values in arrays.items():
                finite = np.asarray(values, dtype=np.float64)
                finite = finite[np.isfinite(finite)]
                if finite.size:
                    data[key] = wandb.Histogram(finite.tolist())
            if data:
                self.run.log(data)

        self._safe("histograms", do)

    def table(self, key: str, rows: list[dict[str, Any]]) -> None:
        import wandb

        def do() -> None:
            if not rows:
                return
            columns, data = table_cells(rows)
            self.run.log({key: wandb.Table(columns=columns, data=data)})

        self._safe("table", do)

    def images(self, paths: Sequence[Path], captions: Optional[Sequence[str]] = None) -> None:
        import wandb

        captions = list(captions) if captions is not None else [None] * len(paths)
        self._safe("images", lambda: self.run.log(
            {Path(p).stem: wandb.Image(str(p), caption=c) for p, c in zip(paths, captions)}))

    @property
    def offline(self) -> bool:
        return self.run is not None and self.mode == "offline"

    @property
    def url(self) -> Optional[str]:
        """The run's page on W&B (None offline or when tracking is off)."""
        if self.run is None or self.mode != "online":
            return None
        try:
            return self.run.url
        except Exception:  # noqa: BLE001
            return None

    def finish(self, failed: bool = False) -> None:
        self._safe("finish", lambda: self.run.finish(exit_code=1 if failed else 0))
        self.run = None


def offline_run_dirs(sweep_dir: Path) -> list[Path]:
    """Offline W&B runs of a sweep: the sweep-level run in SWEEP/wandb/, each job's in SWEEP/<job>/wandb/."""
    sweep_dir = Path(sweep_dir)
    return sorted(sweep_dir.glob("wandb/offline-run-*")) + sorted(sweep_dir.glob("*/wandb/offline-run-*"))


def sync_command(sweep_dir: Path) -> Optional[str]:
    """The exact ``wandb sync`` that uploads a sweep's offline runs (None when it has none).

    Run directories are what every wandb release's ``sync`` accepts (0.19 to the newest), so the
    command names them by two shell globs rather than by the sweep folder.
    """
    from moewm.app.console import shown_path

    sweep_dir = Path(sweep_dir)
    shown = shown_path(sweep_dir)
    globs = [pattern for pattern in ("wandb/offline-run-*", "*/wandb/offline-run-*") if any(sweep_dir.glob(pattern))]
    if not globs:
        return None
    return "wandb sync " + " ".join(f"{shlex.quote(str(shown))}/{pattern}" for pattern in globs)


_NON_FINITE_TEXT = {"inf", "-inf", "nan"}


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and cells a W&B table accepts: one type per column (a column mixing text and numbers becomes
    text), numpy scalars as Python ones, and no non-finite number (an ``inf`` that a JSON file stored as text,
    e.g. tokens to detect of a key that never detects, becomes an empty cell)."""
    import math

    columns = list(dict.fromkeys(c for r in rows for c in r))

    def cell(v: Any) -> Any:
        if hasattr(v, "item") and not isinstance(v, (str, bytes)):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, str) and v.strip().lower() in _NON_FINITE_TEXT:
            return None
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)

    data = [[cell(r.get(c)) for c in columns] for r in rows]
    for j in range(len(columns)):
        kinds = {type(row[j]) for row in data if row[j] is not None}
        if str in kinds and len(kinds) > 1:
            for row in data:
                row[j] = None if row[j] is None else str(row[j])
    return columns, data
