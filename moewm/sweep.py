"""What a sweep varied: its swept keys, each job's label, and the W&B group that holds its runs.

One name per job everywhere: the console table, every plot and the job's W&B run all call a job by
its swept values (``seed=3 encoder=pca``), never by the sweep's folder name or the time of day.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import pandas as pd

log = logging.getLogger(__name__)

OVERRIDE_PREFIX = "override."
SECRET_KEYS = ("secret_key",)
GROUP_MAX_CHARS = 120  # W&B caps a group at 128 characters


def _key(raw: str) -> str:
    return raw.lstrip("+~").split("@", 1)[0]


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """``["seed=3", "+x=1"]`` -> ``{"seed": "3", "x": "1"}``, with any literal secret left out."""
    out = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        key = _key(key)
        if key not in SECRET_KEYS:
            out[key] = value
    return out


def swept_keys(task_overrides: Iterable[str], sweeper_params: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Keys a multirun sweeps over: a preset's ``hydra.sweeper.params`` and the command line's ``a,b`` / ``range()``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    candidates = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + [str(o) for o in task_overrides]
    keys: list[str] = []
    for text in candidates:
        try:
            [override] = parser.parse_overrides([text])
        except Exception:  # noqa: BLE001 - an override Hydra itself accepted but we cannot re-parse: not a sweep we can name
            continue
        key = _key(override.get_key_element())
        if override.is_sweep_override() and key not in SECRET_KEYS and key not in keys:
            keys.append(key)
        elif not override.is_sweep_override() and key in keys:  # a later single value pins it, as in Hydra's sweeper
            keys.remove(key)
    return keys


def read_swept_keys(sweep_dir: Path) -> list[str]:
    """Swept keys from the ``multirun.yaml`` Hydra's sweeper writes before any job starts ([] when absent)."""
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.exists():
        return []
    try:
        cfg = OmegaConf.load(path)
        task = OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False) or []
        params = cfg.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    except Exception as err:  # noqa: BLE001 - naming must never fail a job
        log.warning("could not read the swept keys from %s (%s: %s)", path, type(err).__name__, err)
        return []
    return swept_keys(task, params)  # type: ignore[arg-type]


def label(values: Mapping[str, Any], keys: Iterable[str]) -> str:
    """``seed=3 encoder=pca``: the job's value of each swept key, in sweep order."""
    return " ".join(f"{k}={value_text(values.get(k))}" for k in keys)


def value_text(value: Any) -> str:
    """An override value as a label shows it (NaN: the key was not set for this job)."""
    if value is None or (isinstance(value, float) and value != value):
        return "(default)"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def group_name(experiment: Optional[str], keys: list[str], sweep_dir: Path) -> str:
    """The W&B group of a sweep: what it studies (preset and swept keys), then which sweep (its folder)."""
    sweep_dir = Path(sweep_dir)
    what = " x ".join(keys) or "sweep"
    if experiment:
        what = f"{experiment}: {what}"
    where = f"{sweep_dir.parent.name}/{sweep_dir.name}" if sweep_dir.parent.name else sweep_dir.name
    if len(what) + len(where) + 3 > GROUP_MAX_CHARS:
        what = what[: max(8, GROUP_MAX_CHARS - len(where) - 6)] + "..."
    return f"{what} ({where})"


def varying_keys(df: pd.DataFrame) -> list[str]:
    """Override keys whose value differs between the sweep's jobs, in column order."""
    keys = []
    for column in df.columns:
        if str(column).startswith(OVERRIDE_PREFIX):
            values = df[column].map(value_text)
            if values.nunique(dropna=False) > 1:
                keys.append(str(column)[len(OVERRIDE_PREFIX):])
    return keys


def job_labels(df: pd.DataFrame) -> list[str]:
    """One distinct label per row: the values of the keys that vary; the job folder when nothing varies or to break ties."""
    keys = varying_keys(df)
    jobs = [str(j) for j in df["job"]] if "job" in df else [str(i) for i in range(len(df))]
    if not keys:
        return [f"job {j}" for j in jobs]
    labels = [label({k: row.get(OVERRIDE_PREFIX + k) for k in keys}, keys) for _, row in df.iterrows()]
    seen: dict[str, int] = {}
    for text in labels:
        seen[text] = seen.get(text, 0) + 1
    return [f"{text} (job {job})" if seen[text] > 1 else text for text, job in zip(labels, jobs)]
