"""``python -m moewm``: the Hydra app (modes run / detect / estimate)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from moewm.config import ConfigError
from moewm.app.schema import AppConfig, register, to_app_config

log = logging.getLogger("moewm")
CONF_DIR = str(Path(__file__).resolve().parent.parent.parent / "conf")

register()


def job_name(overrides: list[str]) -> str:
    """A readable run name from the job's overrides, with any literal secret left out."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("secret_key")]
    return ",".join(kept) or "defaults"


def run_identity(hc: Any) -> tuple[str, Optional[str]]:
    """(name, group) of a job's W&B run: named after its swept values, grouped by experiment and sweep.

    A single run is named by its overrides and grouped by its experiment preset, if any.
    """
    from moewm.app.sweep import group_name, label, parse_overrides, read_swept_keys

    overrides = list(hc.overrides.task)
    experiment = hc.runtime.choices.get("experiment")
    if hc.mode != RunMode.MULTIRUN:
        return job_name(overrides), experiment
    sweep_dir = Path(hc.sweep.dir)
    keys = read_swept_keys(sweep_dir)
    name = label(parse_overrides(overrides), keys) if keys else job_name(overrides)
    return name, group_name(experiment, keys, sweep_dir)


def _run_mode(app: AppConfig, out_dir: Path, name: str, group: Optional[str], multirun: bool) -> None:
    from moewm.app.console import job_line, job_summary
    from moewm.app.job import run_job

    metrics = run_job(app, out_dir, run_name=name, group=group)
    print(job_line(metrics, out_dir, name) if multirun else job_summary(metrics, out_dir, name))


def _detect_mode(app: AppConfig, out_dir: Path) -> None:
    from moewm.app.detect import detect_file

    detect_file(app, out_dir)


def _estimate_mode(app: AppConfig, out_dir: Path) -> None:
    from moewm.io import write_json
    from moewm.models.memory import estimate_from_app_config

    estimate = estimate_from_app_config(app)
    write_json(out_dir / "estimate.json", estimate.to_dict())
    print(estimate.table())


def _dispatch(cfg: DictConfig) -> None:
    from moewm.app.tracking import run_tags

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out_dir = Path(hc.runtime.output_dir)
    name, group = run_identity(hc)
    try:
        app = to_app_config(cfg)
    except Exception as err:  # a type error in a value Hydra could not check (e.g. an interpolation)
        raise ConfigError(str(err)) from None
    app.logger.tags = run_tags(app.tags, app.logger.tags)  # a preset's top-level tags reach W&B too
    if app.mode == "estimate":
        _estimate_mode(app, out_dir)
    elif app.mode == "detect":
        _detect_mode(app, out_dir)
    else:
        _run_mode(app, out_dir, name, group, multirun)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """Run one job; in a multirun a failed job is recorded (metrics.json status=failed) and the sweep goes on."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        _dispatch(cfg)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        _record_failure(cfg, err)
        if not multirun:
            sys.exit(2)
    except Exception as err:  # noqa: BLE001 - recorded in metrics.json; the sweep goes on
        from moewm.models.architecture import WeightsUnavailableError

        if isinstance(err, WeightsUnavailableError):  # expected without weights: one message, no traceback
            log.error("%s", err)
            from moewm.app.console import SKIPPED

            _record_failure(cfg, err, status=SKIPPED)
            if not multirun:
                sys.exit(2)
            return
        _record_failure(cfg, err)
        if not multirun:
            raise
        log.error("job failed: %s: %s (recorded in metrics.json; the sweep goes on)", type(err).__name__, err)


def _record_failure(cfg: DictConfig, err: BaseException, status: str = "failed") -> None:
    """Make sure a failed job leaves a metrics.json row even if it failed before run_job wrote one."""
    from moewm.io import write_json

    path = Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
    if path.exists() or cfg.get("mode", "run") != "run":
        return
    write_json(path, {"status": status, "error": f"{type(err).__name__}: {err}", "seed": cfg.get("seed")})


MULTIRUN_FLAGS = ("-m", "--multirun")


def hydra_argv(argv: list[str]) -> list[str]:
    """``-m`` / ``--multirun`` wherever the user wrote it, moved before the overrides where Hydra's parser wants it.

    ``python -m moewm model=qwen_moe memory=ultra_low -m seed='range(10)'`` (flag after the groups) and Hydra's
    own ``python -m moewm -m model=... seed=...`` are the same command. Hydra's other flags keep their places
    (some take a value); only ``--`` ends the search.
    """
    head = argv[: argv.index("--")] if "--" in argv else argv
    if not any(a in MULTIRUN_FLAGS for a in head):
        return list(argv)
    rest = [a for a in head if a not in MULTIRUN_FLAGS] + list(argv[len(head):])
    return ["--multirun", *rest]


def main(argv: Optional[list[str]] = None) -> Any:
    """Console entry point (``moewm``) and ``python -m moewm``."""
    sys.argv = [sys.argv[0], *hydra_argv(list(sys.argv[1:] if argv is None else argv))]
    return hydra_main()


if __name__ == "__main__":
    main()
