"""``mode=detect``: score a user's texts with the configured model, key and seed, with valid p-values."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from moewm.data import read_records
from moewm.engine.detection import DetectorOutput
from moewm.io import write_json, write_jsonl
from moewm.engine.keys import WatermarkKey
from moewm.app.schema import AppConfig, validate_app
from moewm.app.services import build_watermarker, check_weights, format_prompt, get_model
from moewm.engine.generation import encode_prompt

log = logging.getLogger("moewm")


def detect_file(app: AppConfig, out_dir: Path) -> dict[str, Any]:
    """Write detections.jsonl (one row per text with the detector's fields), detection_summary.json
    (alpha, the reference keys and the null the p-values rest on) and print one line per text."""
    validate_app(app)
    records = read_records(app.input, app.data.text_field)  # type: ignore[arg-type]
    check_weights(app)
    model, tokenizer = get_model(app)
    key = WatermarkKey.from_env(app.seed, app.secret_key)
    watermarker = build_watermarker(app, model, tokenizer, key, None)
    try:
        text_ids, prompt_ids, retokenised = [], [], 0
        for i, record in enumerate(records):
            if record.ids is not None:
                ids = record.ids
            else:
                if not record.text.strip():
                    raise ValueError(f"{app.input}: text {i + 1} is empty")
                ids = list(tokenizer(record.text, add_special_tokens=False)["input_ids"])
                retokenised += 1
            if not ids:
                raise ValueError(f"{app.input}: text {i + 1} has no tokens")
            text_ids.append(ids)
            if record.prompt_ids is not None:
                prompt_ids.append(record.prompt_ids)
            else:
                prompt = format_prompt(tokenizer, record.prompt, app.model.chat_template) if record.prompt else None
                prompt_ids.append(encode_prompt(tokenizer, prompt))
        output: DetectorOutput = watermarker.detect_ids(text_ids, prompt_ids, progress=app.progress)
    finally:
        watermarker.close()
    rows = []
    for record, result in zip(records, output.results()):
        rows.append({"text": record.text, "prompt": record.prompt, **result.to_dict()})
    write_jsonl(out_dir / "detections.jsonl", rows)
    cfg = app.watermark
    null = watermarker.null_description()
    p = output.p_value
    summary = {
        "input": str(app.input),
        "key_fingerprint": key.fingerprint,
        "model": app.model.name,
        "watermark_kind": cfg.kind,
        "alpha": cfg.alpha,
        "decision": "p_value <= alpha" if cfg.z_threshold is None else f"z > {cfg.z_threshold} (legacy, no guaranteed false-positive rate)",
        "statistic": null["statistic"],
        "reference_keys": null["reference_keys"],
        "p_value_null": null["p_value_null"],
        "n_texts": len(rows),
        "n_watermarked": int(output.prediction.sum()),
        "n_too_short": int(np.isnan(p).sum()),
        "n_retokenised": retokenised,
        "p_min": float(np.nanmin(p)) if np.isfinite(p).any() else float("nan"),
    }
    write_json(out_dir / "detection_summary.json", summary)
    print(f"\nmoewm detect: {len(rows)} texts from {app.input} (key {key.fingerprint}, {cfg.kind}, watermarked when p <= {cfg.alpha:g})")
    for i, r in enumerate(rows):
        verdict = "WATERMARKED" if r["prediction"] else ("too short" if r["note"].startswith("too few") else "not detected")
        print(f"  [{i}] p={r['p_value']:.3g}  tokens={r['num_tokens_scored']:4d}  {verdict}" + (f"  ({r['note']})" if r["note"] and verdict != "too short" else ""))
    print(f"p-values: {null['p_value_null']}")
    print(f"-> {out_dir / 'detections.jsonl'}")
    return summary
