"""Compose the app's config as ``python -m moewm`` would, without running it (shared by the tests)."""

from __future__ import annotations

from moewm.app.compose import compose_dict
from moewm.app.schema import AppConfig, to_app_config


def compose_config(overrides: list[str], hydra_config: bool = False):
    """The composed DictConfig (with ``hydra.*`` when ``hydra_config``)."""
    return compose_dict(overrides, hydra_config)


def app_config(overrides: list[str]) -> AppConfig:
    """The typed AppConfig a job receives."""
    return to_app_config(compose_config(overrides))
