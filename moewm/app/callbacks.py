"""Hydra callbacks: scrub a literal secret from files Hydra writes, and summarise a sweep when it ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("moewm")


def _secret_and_fingerprint(config: DictConfig) -> tuple[str | None, str]:
    from moewm.engine.keys import WatermarkKey

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


class WeightsCheckCallback(Callback):
    """A sweep of one model whose weights cannot be had stops before its first job, with one message and no traceback.

    A sweep over models checks each job instead: the jobs of a model without weights are skipped (status
    ``skipped`` in the table), once per process and without asking the hub again (moewm.app.services.check_weights).
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from moewm.app.sweep import swept_keys
        from moewm.config import ModelConfig
        from moewm.models.architecture import WeightsUnavailableError, check_weights_reachable

        if config.get("mode", "run") == "estimate":
            return
        params = config.hydra.sweeper.get("params")
        keys = swept_keys(list(config.hydra.overrides.task), OmegaConf.to_container(params) if params is not None else None)
        if any(k == "model" or k.startswith("model.") for k in keys):
            return
        try:
            model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.to_container(config.model, resolve=True)))
            check_weights_reachable(model)  # type: ignore[arg-type]
        except WeightsUnavailableError as err:
            print(f"[ERROR] moewm: {err}\nThe sweep stops before its first job: every job needs these weights (nothing was run or written).",
                  flush=True)
            raise SystemExit(2) from None
        except Exception:  # noqa: BLE001 - a config this check cannot read: each job checks and reports it itself
            return


class SweepSummaryCallback(Callback):
    """When a multirun ends (any launcher): summary.csv, plots, the sweep table, a sweep-level W&B run; exit 1 if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from moewm.app.console import SKIPPED, sweep_report
        from moewm.app.report import summarize
        from moewm.app.tracking import sync_command

        sweep_dir = Path(config.hydra.sweep.dir)
        df, plots = summarize(sweep_dir)
        failed = int((df.get("status") != "ok").sum()) if len(df) else 0
        ran = bool(len(df)) and bool((df.get("status") != SKIPPED).any())
        url = self._log_to_wandb(config, sweep_dir, df, plots) if ran else None  # no job ran: nothing to log
        print(sweep_report(df, sweep_dir, [p.path for p in plots], sync=None if url or not ran else sync_command(sweep_dir), url=url))
        if failed:
            raise SystemExit(1)

    @staticmethod
    def _log_to_wandb(config: DictConfig, sweep_dir: Path, df: Any, plots: list[Any]) -> Optional[str]:
        """The sweep-level run, in the jobs' group: the summary table, the plots, the means over ok jobs; its URL when online."""
        from moewm.config import LoggerConfig
        from moewm.app.sweep import group_name, swept_keys
        from moewm.app.tracking import Tracker, run_tags

        logger = config.get("logger")
        if logger is None or logger.get("kind") == "none":
            return None
        tags = run_tags(config.get("tags") or [], logger.get("tags") or [])
        cfg = LoggerConfig(kind=logger.kind, project=logger.project, entity=logger.get("entity"), mode=logger.get("mode"), tags=tags)
        params = config.hydra.sweeper.get("params")
        keys = swept_keys(list(config.hydra.overrides.task), OmegaConf.to_container(params) if params is not None else None)
        experiment = config.hydra.runtime.choices.get("experiment")
        tracker = Tracker.start(cfg, run_dir=sweep_dir, name="sweep summary", group=group_name(experiment, keys, sweep_dir),
                                config={"sweep_dir": str(sweep_dir), "jobs": len(df), "swept": keys, "experiment": experiment},
                                job_type="sweep-summary")
        rows = df.astype(object).where(df.notna(), None).to_dict("records")
        tracker.table("summary", rows)
        ok = df[df["status"] == "ok"] if "status" in df else df
        means = {f"mean_{c}": float(ok[c].mean()) for c in ok.select_dtypes("number").columns if ok[c].notna().any()}
        tracker.summary({"jobs": len(df), "jobs_ok": len(ok), **means})
        if (sweep_dir / "tradeoff.csv").exists():  # moewm.evaluation.tradeoff's per-configuration table
            import pandas as pd

            trade = pd.read_csv(sweep_dir / "tradeoff.csv")
            tracker.table("tradeoff", trade.astype(object).where(trade.notna(), None).to_dict("records"))
        tracker.images([p.path for p in plots], [p.caption for p in plots])
        url = tracker.url
        tracker.finish()
        return url
