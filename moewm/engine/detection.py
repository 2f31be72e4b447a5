"""What every detector returns, and the one place that turns scores into a decision.

Field names follow transformers' ``WatermarkDetectorOutput`` where they fit. ``p_value`` is always
the valid one (calibrated by reference keys for MoE-LSH, an exact test for the baselines) and
``prediction`` is ``p_value <= alpha``; ``z_score`` and ``p_value_model_null`` are diagnostics whose
null is a model of the text (docs/statistics.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Sequence

import numpy as np


@dataclass
class DetectionResult:
    """Detection of one text."""

    num_tokens_scored: int
    num_green_tokens: int
    green_fraction: float
    gamma_mean: float
    statistic: float
    z_score: float
    p_value: float
    p_value_floor: float
    num_reference_keys: int
    p_value_model_null: float
    prediction: bool
    window_statistic: Optional[float] = None
    window_p_value: Optional[float] = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ARRAYS = ("num_tokens_scored", "num_green_tokens", "green_fraction", "gamma_mean", "statistic", "z_score", "p_value",
           "p_value_floor", "num_reference_keys", "p_value_model_null", "prediction")


@dataclass
class DetectorOutput:
    """Batched detection: one array entry per text (``prefix_p_value``: one array per text, the p-value
    after each scored token, when asked for)."""

    num_tokens_scored: np.ndarray
    num_green_tokens: np.ndarray
    green_fraction: np.ndarray
    gamma_mean: np.ndarray
    statistic: np.ndarray
    z_score: np.ndarray
    p_value: np.ndarray
    p_value_floor: np.ndarray
    num_reference_keys: np.ndarray
    p_value_model_null: np.ndarray
    prediction: np.ndarray
    window_statistic: Optional[np.ndarray] = None
    window_p_value: Optional[np.ndarray] = None
    notes: list[str] = field(default_factory=list)
    prefix_p_value: Optional[list[np.ndarray]] = None

    def __len__(self) -> int:
        return int(len(self.p_value))

    def results(self) -> list[DetectionResult]:
        out = []
        for i in range(len(self)):
            values: dict[str, Any] = {name: getattr(self, name)[i].item() for name in _ARRAYS}
            values["prediction"] = bool(values["prediction"])
            for name in ("window_statistic", "window_p_value"):
                arr = getattr(self, name)
                values[name] = None if arr is None else float(arr[i])
            values["note"] = self.notes[i] if self.notes else ""
            out.append(DetectionResult(**values))
        return out

    @staticmethod
    def empty(count: int, note: str = "empty text") -> "DetectorOutput":
        """``count`` texts with nothing scored: p = NaN, never a positive."""
        nan = np.full(count, np.nan)
        zeros = np.zeros(count, dtype=np.int64)
        return DetectorOutput(zeros, zeros.copy(), nan.copy(), nan.copy(), nan.copy(), nan.copy(), nan.copy(), nan.copy(),
                              zeros.copy(), nan.copy(), np.zeros(count, dtype=bool), notes=[note] * count)

    @staticmethod
    def concat(parts: Sequence["DetectorOutput"]) -> "DetectorOutput":
        def cat(name: str) -> Optional[np.ndarray]:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        values: dict[str, Any] = {name: cat(name) for name in _ARRAYS + ("window_statistic", "window_p_value")}
        values["notes"] = [note for p in parts for note in (p.notes or [""] * len(p))]
        prefixes = [p.prefix_p_value for p in parts]
        values["prefix_p_value"] = None if any(x is None for x in prefixes) else [a for x in prefixes for a in x]  # type: ignore[union-attr]
        return DetectorOutput(**values)

    def take(self, order: Sequence[int]) -> "DetectorOutput":
        """Rows reordered (or selected) by ``order``."""
        idx = np.asarray(order, dtype=np.int64)
        values: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                values[f.name] = value[idx]
            elif isinstance(value, list):
                values[f.name] = [value[i] for i in idx] if value else []
            else:
                values[f.name] = value
        if self.prefix_p_value is None:
            values["prefix_p_value"] = None
        return DetectorOutput(**values)

    @staticmethod
    def scatter(count: int, where: Sequence[int], part: "DetectorOutput", note: str = "empty text") -> "DetectorOutput":
        """A ``count``-row output whose rows ``where`` are ``part`` and the rest are :meth:`empty`."""
        full = DetectorOutput.empty(count, note)
        idx = np.asarray(where, dtype=np.int64)
        for name in _ARRAYS + ("window_statistic", "window_p_value"):
            value = getattr(part, name)
            if value is None:
                setattr(full, name, None)
                continue
            target = getattr(full, name)
            if target is None:
                target = np.full(count, np.nan)
            target = target.astype(np.result_type(target.dtype, value.dtype))
            target[idx] = value
            setattr(full, name, target)
        for j, i in enumerate(idx):
            full.notes[i] = part.notes[j] if part.notes else ""
        if part.prefix_p_value is not None:
            prefixes = [np.zeros(0) for _ in range(count)]
            for j, i in enumerate(idx):
                prefixes[i] = part.prefix_p_value[j]
            full.prefix_p_value = prefixes
        return full


def decide(p_value: np.ndarray, num_scored: np.ndarray, min_tokens: int, alpha: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(p with NaN for texts under ``min_tokens``, prediction = p <= alpha, notes)."""
    n = np.asarray(num_scored)
    short = n < min_tokens
    p = np.where(short, np.nan, np.asarray(p_value, dtype=np.float64))
    prediction = np.nan_to_num(p, nan=np.inf) <= alpha
    notes = [f"too few scored tokens ({int(k)} < watermark.min_tokens={min_tokens})" if s else "" for k, s in zip(n, short)]
    return p, prediction, notes
