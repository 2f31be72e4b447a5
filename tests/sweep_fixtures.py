"""A synthetic sweep folder laid out as the app writes one: per job .hydra/overrides.yaml, metrics.json,
samples.jsonl, and (when ``calibrated``) nulls.jsonl and length_curve.json with calibrated p-values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import yaml

NULL_SETS = ("plain", "greedy", "top_p", "human_docstrings")


def write_job(job_dir: Path, overrides: Iterable[str], seed: int, *, calibrated: bool = True, n: int = 16,
              shift: float = 4.0, status: str = "ok") -> dict:
    rng = np.random.default_rng([seed, int(job_dir.name) if job_dir.name.isdigit() else 0])
    (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if status != "ok":
        metrics = {"status": status, "seed": seed, "error": "ConfigError: extractor.end_layer_idx=99: allowed range is [1, 4]"}
        (job_dir / "metrics.json").write_text(json.dumps(metrics))
        return metrics
    z_wm, z_un = rng.normal(shift, 1.5, n), rng.normal(0, 1, n)
    from scipy.stats import norm

    samples = [{"prompt": f"p{i}", "z_wm": float(z_wm[i]), "z_unwm": float(z_un[i])} for i in range(n)]
    metrics = {"status": "ok", "seed": seed, "key_fingerprint": f"abcd1234/s{seed}", "model": "tiny_moe",
               "watermark_kind": "moe_lsh", "num_bits": 32, "pool_size": 64, "delta": 2.0, "z_threshold": 4.0,
               "n_samples": n, "detection_rate": float(np.mean(z_wm > 4)), "false_positive_rate": float(np.mean(z_un > 4)),
               "auc": 0.99, "tpr_at_1pct_fpr": 0.9, "z_wm_mean": float(z_wm.mean()), "z_wm_std": float(z_wm.std()),
               "z_unwm_mean": float(z_un.mean()), "z_unwm_std": float(z_un.std()), "ppl_wm_mean": 95.0 + seed,
               "ppl_unwm_mean": 78.6, "null_ok": True, "detection_rate_at_16": 0.3, "fpr_at_16": 0.0,
               "detection_rate_at_32": 0.6, "fpr_at_32": 0.0, "job_seconds": 5.0}
    if calibrated:
        for i, row in enumerate(samples):
            row["p_wm"], row["p_unwm"] = float(norm.sf(z_wm[i])), float(norm.sf(z_un[i]))
        nulls = [{"set": s, "p_value": float(p), "num_tokens_scored": 64} for s in NULL_SETS for p in rng.uniform(size=n)]
        (job_dir / "nulls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in nulls))
        (job_dir / "length_curve.json").write_text(json.dumps(
            {"lengths": [16, 32, 64, 128], "detection_rate": [0.2, 0.5, 0.8, 0.95], "fpr": [0.0, 0.001, 0.0, 0.0]}))
        metrics.update(alpha=1e-3, tokens_to_detect_alpha=38.0, never_detected_alpha=0.12, tpr_at_0p1pct_fpr=0.8,
                       null_ok=True, **{f"fpr_{s}": (1 / n if s == "greedy" else 0.0) for s in NULL_SETS},
                       **{f"n_{s}": n for s in NULL_SETS})
    (job_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    (job_dir / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def write_sweep(sweep_dir: Path, grid: list[dict[str, object]], common: Iterable[str] = ("data.num_prompts=16",),
                **kwargs) -> list[dict]:
    """One job per grid point, numbered like Hydra's subdirs; ``grid`` holds the swept values of each job."""
    out = []
    for num, values in enumerate(grid):
        overrides = [f"{k}={v}" for k, v in values.items()] + list(common)
        out.append(write_job(sweep_dir / str(num), overrides, int(values.get("seed", 0)), **kwargs))
    return out
