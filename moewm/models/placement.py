"""Where loaded weights may go: the checks of ``memory.device_map`` / ``memory.max_memory`` and accelerate's limits.

Both the loader (:mod:`moewm.models.loading`) and the estimator (:mod:`moewm.models.memory`) need these before any
weights exist, so they live below both: loading never imports the estimator (nor its profiles).
"""

from __future__ import annotations

import re
from typing import Any

from moewm.config import ConfigError, MemoryConfig

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any, key: str) -> int:
    """'20GiB' / '500MB' / 1234 -> bytes; a clear error naming ``key`` otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    match = _SIZE.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{key}={value!r}: must be a positive size such as '20GiB', '500MB' or a number of bytes")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


def max_memory_for_accelerate(memory: MemoryConfig) -> dict[Any, int]:
    """``memory.max_memory`` with GPU keys as ints ('0', 'gpu', 'cuda', 'gpu1' -> 0, 0, 0, 1) and sizes in bytes.

    Hydra's override grammar cannot write a quoted '0' key, hence the ``gpu`` / ``gpuN`` spellings:
    ``++memory.max_memory={gpu:10GiB,cpu:30GiB}`` (``++``: the profiles' ``max_memory`` is an empty dict).
    """
    out: dict[Any, int] = {}
    for raw_key, value in dict(memory.max_memory or {}).items():
        key = str(raw_key).strip().lower()
        size = parse_size(value, f"memory.max_memory.{raw_key}")
        if key in ("cpu", "disk", "mps"):
            out[key] = size
        elif key.isdigit():
            out[int(key)] = size
        elif (match := re.fullmatch(r"(?:gpu|cuda)(\d*)", key)) is not None:
            out[int(match.group(1) or 0)] = size
        else:
            raise ConfigError(
                f"memory.max_memory.{raw_key}: allowed keys are GPU indices ('0', '1', ... or gpu, gpu1, ...), 'cpu' and 'disk'"
            )
    return out


def check_memory(memory: MemoryConfig) -> None:
    """All of ``memory``'s checks (the dataclass ones plus device_map / max_memory), before any weights load."""
    memory.validate()
    if memory.device_map is not None:
        dm = str(memory.device_map)
        if dm not in DEVICE_MAPS and not re.fullmatch(r"cpu|cuda(:\d+)?", dm):
            raise ConfigError(
                f"memory.device_map={dm!r}: allowed values are null, {', '.join(DEVICE_MAPS)}, cpu, cuda or cuda:N"
            )
    elif memory.max_memory:
        raise ConfigError("memory.max_memory is set but memory.device_map is null: set memory.device_map=auto to use it")
    max_memory_for_accelerate(memory)
