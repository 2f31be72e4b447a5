"""One source for defaults: the app runs the library's defaults, except for differences listed here with a reason.

Every default lives in the config dataclasses (``moewm.config``, ``moewm.app.schema.AppConfig``); the YAML
files of ``conf/`` carry only what differs from them. Two sources drift: the app once ran
``watermark.ignore_repeated=false`` while the library, the validity study and the README said ``true``.
These tests fail on a new difference between the app's composed configuration and the dataclasses, and on a
default group option that writes a dataclass default again. ``WatermarkConfig()`` is the shipped design, so
the app, the validity study and library code agree on it with no list of exceptions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from composing import app_config
from moewm.app.schema import GROUPS, AppConfig
from moewm.config import EncoderConfig, ExtractorConfig, TournamentConfig, WatermarkConfig

CONF = Path(__file__).resolve().parents[1] / "conf"

# key -> (the app's value, why the app differs from the library default)
APP_DIFFERS: dict[str, tuple[Any, str]] = {
    "generation.min_new_tokens": (
        48,
        "a job measures detection, which wants long texts, and tiny_moe ends early: the app asks for at least "
        "min(48, generation.max_new_tokens) new tokens, an interpolation of another key that a dataclass default "
        "cannot express; a library call generates what it is asked for (0)",
    ),
}
# Keys a group option may write although they equal the default: they name the option itself.
IDENTITY_KEYS = {"kind", "name", "source"}
# Groups whose options are complete records, not overrides: a model card describes one checkpoint whole
# (architecture, dtype, path), and eval.oracle_model reads it alone; the first test still catches drift.
COMPLETE_RECORDS = {"model"}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value of a dataclass or mapping (lists are leaves)."""
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def differences(app: AppConfig) -> dict[str, tuple[Any, Any]]:
    """key -> (the app's value, the library default) wherever they differ."""
    composed, library = flatten(app), flatten(AppConfig())
    return {k: (composed.get(k), library.get(k)) for k in sorted(set(composed) | set(library)) if composed.get(k) != library.get(k)}


@pytest.fixture
def no_secret(monkeypatch):
    monkeypatch.delenv("MOEWM_SECRET_KEY", raising=False)  # conf/config.yaml reads it; a path of the environment


def test_the_app_composes_the_library_defaults_except_the_listed_differences(no_secret):
    found = differences(app_config([]))
    assert {k: v[0] for k, v in found.items()} == {k: v[0] for k, v in APP_DIFFERS.items()}, (
        f"the app's defaults differ from the dataclasses' at {sorted(found)}: put the default in the dataclass "
        "(moewm/config.py, moewm/app/schema.py) and drop it from conf/, or list it in APP_DIFFERS with a reason"
    )
    assert all(len(reason) > 40 for _, reason in APP_DIFFERS.values())


def test_a_new_drift_is_caught(no_secret):
    found = differences(app_config(["watermark.ignore_repeated=false", "data.num_prompts=4"]))
    assert set(found) - set(APP_DIFFERS) == {"watermark.ignore_repeated", "data.num_prompts"}


def test_the_app_runs_the_design_the_validity_study_measured(no_secret):
    """The validity study's default design is the shipped one (WatermarkConfig() with EncoderConfig /
    ExtractorConfig defaults; reference_keys and alpha aside): the app's default job is that design."""
    import argparse

    from moewm.evaluation.validity import study_configs

    app = app_config([])
    assert app.watermark == WatermarkConfig() and app.encoder == EncoderConfig() and app.extractor == ExtractorConfig()
    assert app.watermark.kind == "moe_tournament" and app.watermark.ignore_repeated is True and app.watermark.tournament == TournamentConfig()
    args = argparse.Namespace(extractor="{}", encoder="{}", watermark=None, reference_keys=999)
    extractor, encoder, watermark = study_configs(args)
    assert (extractor, encoder, watermark) == (app.extractor, app.encoder, app.watermark)
    assert dataclasses.replace(watermark, reference_keys=999, alpha=1e-3) == WatermarkConfig()
    # the green-list scheme is one word away, in the app and in the library alike
    assert app_config(["watermark=moe_lsh"]).watermark == WatermarkConfig(kind="moe_lsh")


def test_each_scheme_scores_its_own_statistic_unless_told(no_secret):
    """watermark.statistic null means the scheme's own, resolved in one place: the tournament's sum of g-values
    (the shipped design), MoE-LSH's llr (its power study's choice), in the library and in the app."""
    from moewm.config import STATISTICS, ConfigError
    from moewm.schemes.registry import resolve_statistic

    assert WatermarkConfig().statistic is None
    assert resolve_statistic(WatermarkConfig()).statistic == "green"
    assert resolve_statistic(WatermarkConfig(kind="moe_lsh")).statistic == "llr"
    assert resolve_statistic(WatermarkConfig(kind="none")).statistic == "llr"  # scored by MoE-LSH's detector
    assert resolve_statistic(WatermarkConfig(kind="kgw")).statistic is None  # an n-gram test of its own
    assert resolve_statistic(WatermarkConfig(kind="moe_lsh", statistic="z")).statistic == "z"
    assert resolve_statistic(app_config(["watermark=moe_lsh"]).watermark).statistic == "llr"
    assert resolve_statistic(app_config(["watermark.statistic=llr"]).watermark).statistic == "llr"
    with pytest.raises(ConfigError, match=r"watermark.statistic='t': allowed values are .*or null \(the scheme's own\)"):
        WatermarkConfig(statistic="t").validate()
    assert set(STATISTICS) == {"z", "llr", "green"}


def _default_options() -> list[tuple[str, str]]:
    """(group, option) of conf/config.yaml's defaults list, for the groups of the schema."""
    out = []
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            for group, option in entry.items():
                if group in GROUPS and option is not None:
                    out.append((group, option))
    return out


def test_every_schema_group_has_a_default_option():
    assert sorted(g for g, _ in _default_options()) == sorted(GROUPS)


@pytest.mark.parametrize("group,option", [go for go in _default_options() if go[0] not in COMPLETE_RECORDS])
def test_default_group_options_write_no_default_again(group, option):
    path = CONF / group / f"{option}.yaml"
    text = path.read_text(encoding="utf-8")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    tree = raw if "@package _global_" in text.split("\n", 1)[0] else {group: raw}
    library = flatten(AppConfig())
    again = sorted(
        key for key, value in flatten(tree).items()
        if key in library and key.split(".", 1)[-1] not in IDENTITY_KEYS and value == library[key]
    )
    assert not again, f"{path.relative_to(CONF.parent)} writes the dataclass default again for {again}: drop them (one source)"
