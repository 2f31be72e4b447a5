"""``mode=detect``: score a user's texts with the configured model, key and seed, with valid p-values.

Two kinds of input:

- a user's texts (plain text, one per line, or JSONL with ``text`` and optional ``prompt``, ``ids``, ``prompt_ids``):
  ``detections.jsonl`` and ``detection_summary.json``, one line per text on the terminal;
- a run's own ``samples.jsonl`` (rows with ``text_wm`` / ``text_unwm`` and their token ids): the round trip. Each
  watermarked and plain text is scored twice: from its token ids exactly as generated, which must reproduce the
  run's verdicts, and from its text alone, encoded again (what a reader of the published text has; the
  ``retokenisation`` attack of the suite). The summary puts the two side by side and checks the settings against the
  run's ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from moewm.config import ConfigError
from moewm.data import read_records
from moewm.engine.detection import DetectorOutput
from moewm.io import write_json, write_jsonl
from moewm.engine.keys import WatermarkKey
from moewm.app.schema import AppConfig, validate_app
from moewm.app.services import build_watermarker, check_weights, format_prompt, get_model, run_settings
from moewm.engine.generation import encode_prompt

log = logging.getLogger("moewm")

RUN_SAMPLES_FIELDS = ("text_wm", "text_unwm")  # a row of a run's samples.jsonl (moewm.app.job)
WHICH = {"wm": "watermarked", "unwm": "plain"}


def detect_file(app: AppConfig, out_dir: Path) -> dict[str, Any]:
    """Write detections.jsonl (one row per text with the detector's fields), detection_summary.json
    (alpha, the reference keys and the null the p-values rest on) and print one line per text."""
    validate_app(app)
    samples = read_run_samples(app.input)  # type: ignore[arg-type]
    if samples is not None:
        return detect_run_samples(app, out_dir, samples)
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
    for record, ids, result in zip(records, text_ids, output.results()):
        rows.append({"text": record.text, "prompt": record.prompt, "ids": [int(t) for t in ids], **result.to_dict()})
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


# -- a run's samples.jsonl: the round trip ------------------------------------------------------------

def read_run_samples(path: str | Path) -> Optional[list[dict[str, Any]]]:
    """The rows of a run's ``samples.jsonl`` (``text_wm`` / ``text_unwm`` per prompt), or None for any other input."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return None
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return None  # not a run's file: read_records reports the line
            if not isinstance(row, dict) or not all(f in row for f in RUN_SAMPLES_FIELDS):
                return None
            for field in ("prompt_ids", "ids_wm", "ids_unwm"):
                value = row.get(field)
                if value is not None and not (isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)):
                    raise ConfigError(f"{path}:{number}: {field!r} must be a list of non-negative integer token ids")
            rows.append(row)
    return rows or None


def _scored(watermarker: Any, texts: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]], app: AppConfig) -> DetectorOutput:
    """Detection of texts as the job scores its own (every reference key, per-prefix p-values, ``eval.window``), so the
    p-values match the run's too, not only the verdicts; an empty text gets the empty-text note, no exception."""
    keep = [i for i, t in enumerate(texts) if len(t) > 0]
    if not keep:
        return DetectorOutput.empty(len(texts))
    det = watermarker.detect_ids([list(texts[i]) for i in keep], [list(prompts[i]) for i in keep], progress=app.progress,
                                 prefixes=True, window=app.eval.window)
    return DetectorOutput.scatter(len(texts), keep, det)


def _share(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


def settings_mismatch(app: AppConfig, key: WatermarkKey, samples_path: Path) -> dict[str, tuple[Any, Any]]:
    """Settings that differ from the run's own (its ``metrics.json`` beside the samples): {name: (run, now)}."""
    metrics_path = samples_path.parent / "metrics.json"
    if not metrics_path.exists():
        return {}
    run = json.loads(metrics_path.read_text())
    now = run_settings(app, key)
    return {k: (run[k], v) for k, v in now.items() if k in run and run[k] != v}


def detect_run_samples(app: AppConfig, out_dir: Path, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Score a run's samples by their ids (the run's verdicts, reproduced) and by their text alone (retokenised)."""
    path = Path(app.input)  # type: ignore[arg-type]
    key = WatermarkKey.from_env(app.seed, app.secret_key)
    mismatch = settings_mismatch(app, key, path)
    if mismatch:
        log.warning("%s was written with other settings than this detection's (%s): its verdicts cannot be expected to "
                    "agree; rerun with the run's overrides (its .hydra/overrides.yaml)", path,
                    ", ".join(f"{k}: run {a!r}, now {b!r}" for k, (a, b) in mismatch.items()))
    check_weights(app)
    model, tokenizer = get_model(app)
    watermarker = build_watermarker(app, model, tokenizer, key, None)
    prompt_ids = [row["prompt_ids"] if row.get("prompt_ids") is not None
                  else encode_prompt(tokenizer, format_prompt(tokenizer, row["prompt"], app.model.chat_template) if row.get("prompt") else None)
                  for row in samples]
    has_ids = all(row.get("ids_wm") is not None and row.get("ids_unwm") is not None for row in samples)
    if not has_ids:
        log.warning("%s holds no token ids (written before they were recorded): only text-level detection is possible", path)
    by_ids: dict[str, Optional[DetectorOutput]] = {}
    by_text: dict[str, DetectorOutput] = {}
    text_ids: dict[str, list[list[int]]] = {}
    try:
        for which in ("unwm", "wm"):  # the job's order: plain texts first
            texts = [str(row[f"text_{which}"]) for row in samples]
            text_ids[which] = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            by_ids[which] = _scored(watermarker, [row[f"ids_{which}"] for row in samples], prompt_ids, app) if has_ids else None
            by_text[which] = _scored(watermarker, text_ids[which], prompt_ids, app)
        null = watermarker.null_description()
    finally:
        watermarker.close()

    rows: list[dict[str, Any]] = []
    for which in ("wm", "unwm"):
        ids_results = by_ids[which].results() if by_ids[which] is not None else [None] * len(samples)  # type: ignore[union-attr]
        for i, (row, by_id, by_txt) in enumerate(zip(samples, ids_results, by_text[which].results())):
            out: dict[str, Any] = {"row": i, "text_kind": WHICH[which], "prompt": row.get("prompt"), "text": row[f"text_{which}"]}
            run_verdict = row.get(f"detected_{which}")
            if by_id is not None:
                ids = row[f"ids_{which}"]
                out.update({"ids": ids, **by_id.to_dict(), "run_prediction": run_verdict, "run_p_value": row.get(f"p_{which}"),
                            "agrees_with_run": None if run_verdict is None else bool(by_id.prediction) == bool(run_verdict)})
                out["retokenisation_changes_ids"] = text_ids[which][i] != list(ids)
            out.update({f"text_{k}": v for k, v in by_txt.to_dict().items()})
            out["text_ids"] = text_ids[which][i]
            rows.append(out)
    write_jsonl(out_dir / "detections.jsonl", rows)

    alpha = app.watermark.alpha
    summary: dict[str, Any] = {"input": str(path), "input_kind": "run samples", "key_fingerprint": key.fingerprint,
                               "model": app.model.name, "watermark_kind": app.watermark.kind, "alpha": alpha,
                               "n_prompts": len(samples), "settings_match_run": not mismatch,
                               "settings_mismatch": {k: {"run": a, "now": b} for k, (a, b) in mismatch.items()}}
    summary["p_value_null"] = null["p_value_null"]
    for which in ("wm", "unwm"):
        text_pred = [bool(x) for x in by_text[which].prediction]
        summary[f"detection_rate_text_{which}"] = _share(text_pred)
        det = by_ids[which]
        if det is not None:
            pred = [bool(x) for x in det.prediction]
            summary[f"detection_rate_ids_{which}"] = _share(pred)
            run = [row.get(f"detected_{which}") for row in samples]
            known = [(a, b) for a, b in zip(pred, run) if b is not None]
            summary[f"agreement_ids_{which}"] = _share([a == bool(b) for a, b in known]) if known else float("nan")
            summary[f"retokenisation_changed_{which}"] = _share([text_ids[which][i] != list(row[f"ids_{which}"])
                                                                 for i, row in enumerate(samples)])
    if has_ids:
        agree = [r["agrees_with_run"] for r in rows if r.get("agrees_with_run") is not None]
        summary["agreement_ids"] = _share(agree)
        summary["n_verdicts_compared"] = len(agree)
        diffs = [abs(float(r["p_value"]) - float(r["run_p_value"])) for r in rows
                 if r.get("p_value") is not None and r.get("run_p_value") is not None and np.isfinite(r["p_value"]) and np.isfinite(r["run_p_value"])]
        summary["max_p_value_difference_ids"] = max(diffs) if diffs else float("nan")
        ids_rate = summary["detection_rate_ids_wm"]
        summary["text_over_ids"] = summary["detection_rate_text_wm"] / ids_rate if ids_rate > 0 else float("nan")
    write_json(out_dir / "detection_summary.json", summary)
    print(_round_trip_report(summary, rows, path, key, out_dir))
    return summary


def _count(rate: float, n: int) -> str:
    return "-" if not np.isfinite(rate) else f"{round(rate * n)}/{n}"


def _round_trip_report(summary: dict[str, Any], rows: list[dict[str, Any]], path: Path, key: WatermarkKey, out_dir: Path) -> str:
    n = summary["n_prompts"]
    alpha = summary["alpha"]
    lines = [f"\nmoewm detect: the {n} prompts of {path} (a run's samples; key {key.fingerprint}, watermarked when p <= {alpha:g})"]
    for r in rows:
        by_id = ("" if "p_value" not in r else
                 f"ids p={_p(r['p_value'])} (run {_p(r.get('run_p_value'))}) {'agrees' if r.get('agrees_with_run') else 'DIFFERS'}  ")
        lines.append(f"  [{r['row']}] {r['text_kind']:<11} {by_id}text p={_p(r['text_p_value'])} tokens {r['text_num_tokens_scored']}"
                     + (f" (ids {r['num_tokens_scored']})" if "num_tokens_scored" in r else "")
                     + ("  WATERMARKED" if r.get("prediction", r["text_prediction"]) else ""))
    if "agreement_ids" in summary:
        lines.append(f"by token ids: {_count(summary['agreement_ids'], summary['n_verdicts_compared'])} verdicts as in the run; "
                     f"watermarked detected {_count(summary['detection_rate_ids_wm'], n)}, plain {_count(summary['detection_rate_ids_unwm'], n)}")
    lines.append(f"from the text alone (encoded again): watermarked detected {_count(summary['detection_rate_text_wm'], n)}"
                 + (f" ({100 * summary['text_over_ids']:.0f} % of the id-level rate; {_count(summary['retokenisation_changed_wm'], n)} "
                    "texts change their ids when encoded again)" if np.isfinite(summary.get("text_over_ids", float("nan"))) else "")
                 + f", plain {_count(summary['detection_rate_text_unwm'], n)}")
    if not summary["settings_match_run"]:
        lines.append("WARNING: other settings than the run's: " + ", ".join(f"{k} (run {v['run']!r}, now {v['now']!r})"
                                                                             for k, v in summary["settings_mismatch"].items()))
    lines.append(f"-> {out_dir / 'detections.jsonl'}, {out_dir / 'detection_summary.json'}")
    return "\n".join(lines)


def _p(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{float(value):.3g}"
