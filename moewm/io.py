"""Files a job writes: atomic JSON / JSONL, and scrubbing a secret out of files Hydra already wrote."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (NaN becomes null, so the file is strict JSON)."""
    _atomic_write(Path(path), json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write JSON lines atomically."""
    _atomic_write(Path(path), "".join(json.dumps(_jsonable(r), ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def scrub_secret(directory: str | Path, secret: str | None, replacement: str) -> int:
    """Replace ``secret`` by ``replacement`` in every text file under ``directory``; returns files changed."""
    if not secret:
        return 0
    changed = 0
    for path in Path(directory).rglob("*"):
        if not path.is_file() or path.suffix not in (".yaml", ".yml", ".log", ".json", ".jsonl", ".txt", ".csv"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if secret in text:
            _atomic_write(path, text.replace(secret, replacement))
            changed += 1
    return changed
