"""Compose the app's config as ``python -m moewm`` would, without running it (shared by the tests)."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from moewm.app.main import CONF_DIR
from moewm.app.schema import AppConfig, register, to_app_config


def compose_config(overrides: list[str], hydra_config: bool = False):
    """The composed DictConfig (with ``hydra.*`` when ``hydra_config``)."""
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_config)


def app_config(overrides: list[str]) -> AppConfig:
    """The typed AppConfig a job receives."""
    return to_app_config(compose_config(overrides))
