"""Compose the app's config as ``python -m moewm`` would, without running a job: for tools that take a trade-off
point or a preset by name (the stealing corpora, the tests) instead of repeating its settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from moewm.app.main import CONF_DIR
from moewm.app.schema import AppConfig, register, to_app_config, validate_app
from moewm.config import ConfigError


def compose_dict(overrides: list[str], hydra_config: bool = False) -> Any:
    """The composed DictConfig of ``overrides`` (with ``hydra.*`` when ``hydra_config``)."""
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_config)


def compose_app(overrides: list[str]) -> AppConfig:
    """The typed, validated AppConfig a job of ``overrides`` receives (a ConfigError names a bad key)."""
    app = to_app_config(compose_dict(overrides))
    validate_app(app)
    return app


def tradeoff_point(point: str) -> AppConfig:
    """The design of trade-off point ``point`` (``conf/tradeoff/<point>.yaml``), as ``experiment=tradeoff`` runs it."""
    names = sorted(p.stem for p in (Path(CONF_DIR) / "tradeoff").glob("*.yaml"))
    if point not in names:
        raise ConfigError(f"trade-off point {point!r} does not exist: allowed values are the files of conf/tradeoff ({', '.join(names)})")
    return compose_app(["experiment=tradeoff", f"tradeoff={point}"])
