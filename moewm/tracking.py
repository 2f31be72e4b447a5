"""Weights & Biases: one run per job, grouped by sweep; offline unless the user opts in; never fatal.

The config sent to W&B is the resolved config with the secret replaced by its fingerprint. Any W&B
failure (no network, bad API key, a broken install) falls back to offline, then to no tracking, with a
warning: losing a dashboard must never lose a job's results, which are on disk first.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from moewm.config import LoggerConfig

log = logging.getLogger(__name__)


def resolve_mode(cfg: LoggerConfig) -> str:
    """logger.mode if set, else $WANDB_MODE, else offline."""
    return cfg.mode or os.environ.get("WANDB_MODE") or "offline"


class Tracker:
    """A thin, failure-proof wrapper around one W&B run (a no-op when tracking is off or broken)."""

    def __init__(self, run: Any = None) -> None:
        self.run = run

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
                return cls(run)
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
            columns = list(rows[0])
            self.run.log({key: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

        self._safe("table", do)

    def images(self, paths: Sequence[Path]) -> None:
        import wandb

        self._safe("images", lambda: self.run.log({Path(p).stem: wandb.Image(str(p)) for p in paths}))

    def finish(self, failed: bool = False) -> None:
        self._safe("finish", lambda: self.run.finish(exit_code=1 if failed else 0))
        self.run = None
