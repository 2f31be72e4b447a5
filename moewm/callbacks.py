"""Hydra callbacks: scrub a literal secret from files Hydra writes, and summarise a sweep when it ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("moewm")


def _secret_and_fingerprint(config: DictConfig) -> tuple[str | None, str]:
    from moewm.keys import WatermarkKey

    try:
        secret = config.get("secret_key")
    except Exception:  # an unresolvable interpolation: nothing literal to scrub
        return None, ""
    if not secret:
        return None, ""
    return str(secret), f"fingerprint:{WatermarkKey(str(secret)).secret_fingerprint}"


class SecretScrubCallback(Callback):
    """A secret given on the command line would land in .hydra/*.yaml and logs: replace it by its fingerprint."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from moewm.io import scrub_secret

        secret, fingerprint = _secret_and_fingerprint(config)
        scrub_secret(Path(HydraConfig.get().runtime.output_dir), secret, fingerprint)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        self.on_job_start(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from moewm.io import scrub_secret

        secret, fingerprint = _secret_and_fingerprint(config)
        scrub_secret(Path(config.hydra.sweep.dir), secret, fingerprint)


class SweepSummaryCallback(Callback):
    """When a multirun ends (any launcher): summary.csv, plots, a W&B summary run; exit 1 if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from moewm.report import summarize

        sweep_dir = Path(config.hydra.sweep.dir)
        df, plots = summarize(sweep_dir)
        failed = int((df.get("status") != "ok").sum()) if len(df) else 0
        log.info("sweep summary: %s (%d jobs, %d failed)", sweep_dir / "summary.csv", len(df), failed)
        print(f"\nsweep summary: {sweep_dir / 'summary.csv'} ({len(df)} jobs, {failed} failed)")
        self._log_to_wandb(config, sweep_dir, df, plots)
        if failed:
            raise SystemExit(1)

    @staticmethod
    def _log_to_wandb(config: DictConfig, sweep_dir: Path, df: Any, plots: list[Path]) -> None:
        from moewm.config import LoggerConfig
        from moewm.tracking import Tracker

        logger = config.get("logger")
        if logger is None or logger.get("kind") == "none":
            return
        cfg = LoggerConfig(kind=logger.kind, project=logger.project, entity=logger.get("entity"), mode=logger.get("mode"))
        tracker = Tracker.start(cfg, run_dir=sweep_dir, name=f"summary-{sweep_dir.name}", group=sweep_dir.name,
                                config={"sweep_dir": str(sweep_dir), "jobs": len(df)}, job_type="sweep-summary")
        rows = df.astype(object).where(df.notna(), None).to_dict("records")
        tracker.table("summary", [{k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in r.items()} for r in rows])
        tracker.images(plots)
        tracker.finish()
