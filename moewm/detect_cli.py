"""``mode=detect``: score a user's texts with the configured model, key and seed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from moewm.data import read_records
from moewm.io import write_json, write_jsonl
from moewm.keys import WatermarkKey
from moewm.schema import AppConfig
from moewm.watermark import encode_prompt

log = logging.getLogger("moewm")


def detect_file(app: AppConfig, out_dir: Path) -> dict[str, Any]:
    """Write detections.jsonl (one row per text with the detector's fields) and print a summary."""
    from moewm.job import build_watermarker, ensure_valid_before_load, format_prompt, get_model

    ensure_valid_before_load(app)
    records = read_records(app.input, app.data.text_field)  # type: ignore[arg-type]
    model, tokenizer = get_model(app)
    key = WatermarkKey.from_env(app.seed, app.secret_key)
    watermarker = build_watermarker(app, model, tokenizer, key, None)
    try:
        text_ids, prompt_ids = [], []
        for i, record in enumerate(records):
            if not record.text.strip():
                raise ValueError(f"{app.input}: text {i + 1} is empty")
            text_ids.append(list(tokenizer(record.text, add_special_tokens=False)["input_ids"]))
            prompt = format_prompt(tokenizer, record.prompt, app.model.chat_template) if record.prompt else None
            prompt_ids.append(encode_prompt(tokenizer, prompt))
        output = watermarker.detect_ids(text_ids, prompt_ids, progress=app.progress)
    finally:
        watermarker.close()
    rows = []
    for record, result in zip(records, output.results()):
        rows.append({"text": record.text, "prompt": record.prompt, **result.to_dict()})
    write_jsonl(out_dir / "detections.jsonl", rows)
    z = output.z_score
    summary = {
        "input": str(app.input),
        "key_fingerprint": key.fingerprint,
        "model": app.model.name,
        "n_texts": len(rows),
        "n_watermarked": int(output.prediction.sum()),
        "n_too_short": int(np.isnan(z).sum()),
        "z_threshold": app.watermark.z_threshold,
        "z_mean": float(np.nanmean(z)) if np.isfinite(z).any() else float("nan"),
        "z_max": float(np.nanmax(z)) if np.isfinite(z).any() else float("nan"),
    }
    write_json(out_dir / "detection_summary.json", summary)
    print(f"\nmoewm detect: {len(rows)} texts from {app.input} (key {key.fingerprint}, threshold z > {app.watermark.z_threshold})")
    for i, r in enumerate(rows):
        verdict = "WATERMARKED" if r["prediction"] else ("too short" if r["note"] else "not detected")
        print(f"  [{i}] z={r['z_score']:7.2f}  p={r['p_value']:.2e}  scored={r['num_tokens_scored']:4d}  {verdict}")
    print(f"-> {out_dir / 'detections.jsonl'}")
    return summary
