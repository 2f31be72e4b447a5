"""What the terminal shows: the handful of numbers a researcher reads first, then where the files are.

A single run prints a block of about ten lines; a sweep prints one line per job as it finishes and,
at the end, one table with a row per job named by its swept values. Everything else stays in
metrics.json, summary.csv and W&B. Every number is read from the job's own metrics; a key the job did
not write is left out of the line, never filled in from another job.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pandas as pd

from moewm.app.sweep import value_text, varying_keys

NULL_SET = re.compile(r"^fpr_(?!at_\d)(?!model_null_)(?P<set>.+)$")  # fpr_plain, fpr_greedy, ...; not fpr_at_64 nor the diagnostic fpr_model_null_*
MAX_TABLE_ROWS = 40
FILES = ("metrics.json", "samples.jsonl", "nulls.jsonl", "length_curve.json", "detections.jsonl")


class OncePerProcess(logging.Filter):
    """Lets each distinct message through once per process: a sweep's ten jobs warn about a demo secret once.

    Hydra builds new handlers (and filters) for every job, so what was seen is kept on the class. The
    job's main.log has no such filter and keeps every line.
    """

    seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in OncePerProcess.seen:
            return False
        OncePerProcess.seen.add(key)
        return True


def shown_path(path: Path) -> Path:
    """A path as the user should see it: relative to the working directory when under it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return Path(path)


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _g(value: Any, digits: int = 3) -> str:
    number = _num(value)
    return "-" if number is None else f"{number:.{digits}g}"


def _f2(value: Any) -> str:
    number = _num(value)
    return "-" if number is None else f"{number:.2f}"


def _pct(rate: float) -> str:
    return f"{100 * rate:.0f} %" if rate == 0 or rate >= 0.01 else f"{100 * rate:.2g} %"


def _count(rate: Any, n: Any) -> str:
    """``3/320`` when the sample size is known, else a percentage."""
    r, size = _num(rate), _num(n)
    if r is None:
        return "-"
    if size:
        return f"{round(r * size)}/{int(size)}"
    return _pct(r)


def threshold_text(metrics: Mapping[str, Any]) -> str:
    """The decision rule the rates refer to: ``p <= 0.001`` (or ``z > 4`` from a job that reports no alpha)."""
    alpha = _num(metrics.get("alpha"))
    if alpha is not None:
        return f"p <= {alpha:g}"
    z = _num(metrics.get("z_threshold"))
    return f"z > {z:g}" if z is not None else "the job's threshold"


def null_rates(metrics: Mapping[str, Any]) -> dict[str, tuple[float, Optional[float]]]:
    """False-positive rate (and size) per null set; the job's own plain texts when it reports no sets."""
    sets: dict[str, tuple[float, Optional[float]]] = {}
    for key, value in metrics.items():
        match = NULL_SET.match(str(key))
        rate = _num(value)
        if match and rate is not None:
            sets[match["set"]] = (rate, _num(metrics.get(f"n_{match['set']}")))
    if not sets and _num(metrics.get("false_positive_rate")) is not None:
        sets["plain"] = (float(metrics["false_positive_rate"]), _num(metrics.get("n_samples")))
    return sets


def _null_verdict(metrics: Mapping[str, Any]) -> str:
    ok = metrics.get("null_ok")
    if ok is None or (isinstance(ok, float) and math.isnan(ok)):
        return ""
    return "null calibrated" if bool(ok) else "NULL NOT CALIBRATED (null_ok=false): p-values overstate significance"


def _describe_scheme(m: Mapping[str, Any]) -> str:
    kind = str(m.get("watermark_kind", "?"))
    if kind == "moe_lsh":
        pools = m.get("pools", "anchors")
        shape = f"{m.get('num_bits', '?')} {pools} pools" if pools in ("partition", "random_partition") else f"{m.get('num_bits', '?')} {pools} pools of {m.get('pool_size', '?')}"
        rule = m.get("green_lists", "bits") + (f", {m['green_bits']} bits per pool" if m.get("green_bits", 1) != 1 else "")
        return f"moe_lsh {shape} ({rule} green lists), delta {_g(m.get('delta'))}"
    if "tournament_layers" in m:  # a tournament has no delta: its depth and the signature bits per layer
        tokens = int(m.get("tournament_context_tokens", 0) or 0)
        context = f" + {tokens} token{'s' if tokens > 1 else ''} before" if tokens else ""
        return f"{kind}, {m['tournament_layers']} layers x {m.get('tournament_block_bits', '?')} signature bits{context}"
    return kind if kind == "none" else f"{kind}, delta {_g(m.get('delta'))}"


def _files_line(out_dir: Path, metrics: Mapping[str, Any]) -> str:
    present = [name for name in FILES if (out_dir / name).exists()]
    if "metrics.json" in present:
        present[present.index("metrics.json")] = f"metrics.json ({len(metrics)} keys)"
    return f"  files            {shown_path(out_dir)}/  {', '.join(present)}"


ATTACKED = re.compile(r"^detection_rate_attacked(?P<suffix>.*)$")


def attacked_lines(m: Mapping[str, Any]) -> list[str]:
    """One line per attacked row (the ``attack=`` group's, then each of ``eval.attacks``): detection, and what of the
    watermark survived the edit (moewm.evaluation.survival): the scheme's context (routing signature / n-gram
    context) kept at positions whose token and previous token survived, its per-bit flip rate, green draws kept,
    and the evidence per scored token before -> after."""
    out = []
    for key in m:
        match = ATTACKED.match(str(key))
        if not match:
            continue
        sfx = match["suffix"]
        label = m.get("attack_name", "?") if not sfx else sfx[1:].replace("_0p", " 0.").replace("_", " ")
        parts = [f"detected {_pct(float(m[key]))}" if _num(m[key]) is not None else "detected -"]
        if _num(m.get(f"survival_signature{sfx}")) is not None:
            parts.append(f"context kept {_f2(m[f'survival_signature{sfx}'])} at {_f2(m.get(f'survival_positions{sfx}'))} of positions")
            if _num(m.get(f"survival_bitflip{sfx}")) is not None:
                parts.append(f"bit flips {_g(m[f'survival_bitflip{sfx}'], 2)}")
            parts.append(f"green kept {_f2(m.get(f'survival_green{sfx}'))}")
            parts.append(f"evidence/token {_f2(m.get('evidence_per_token_clean'))} -> {_f2(m.get(f'evidence_per_token_attacked{sfx}'))}")
        out.append(f"  attacked {str(label):<15} " + " | ".join(parts))
    return out


def job_summary(metrics: Mapping[str, Any], out_dir: Path, name: str) -> str:
    """A single job's numbers that matter, about ten lines, ending with where its files are."""
    m = metrics
    n = _num(m.get("n_samples"))
    setup = [str(m.get("model", "?")), _describe_scheme(m), f"key {m.get('key_fingerprint', '?')}"]
    if n:
        setup.append(f"{int(n)} prompts")
    lines = ["", f"moewm run: {name}", "  setup            " + " | ".join(setup)]
    if m.get("status") not in (None, "ok"):
        lines.append(f"  status           {m.get('status')}: {m.get('error', '')}")
    detection = _num(m.get("detection_rate"))
    if detection is not None:
        parts = [f"{_count(detection, n)} watermarked texts ({_pct(detection)}) at {threshold_text(m)}"]
        if _num(m.get("auc")) is not None:
            parts.append(f"AUC {_g(m['auc'])}")
        tprs = [f"{_g(m[k], 2)} at {label} FPR" for k, label in (("tpr_at_1pct_fpr", "1 %"), ("tpr_at_0p1pct_fpr", "0.1 %"))
                if _num(m.get(k)) is not None]
        if tprs:
            parts.append("TPR " + ", ".join(tprs))
        lines.append("  detected         " + " | ".join(parts))
    rates = null_rates(m)
    if rates:
        text = " | ".join(f"{s} {_count(r, size)}" for s, (r, size) in rates.items())
        verdict = _null_verdict(m)
        lines.append(f"  false positives  {text}" + (f"  -> {verdict}" if verdict else ""))
    median = _num(m.get("tokens_to_detect_alpha"))
    if median is not None:
        never = _num(m.get("never_detected_alpha"))
        lines.append(f"  tokens to detect median {median:.0f}" + (f" ({_pct(never)} never detected)" if never is not None else ""))
    if _num(m.get("z_wm_mean")) is not None:
        lines.append(f"  z-score          watermarked {_f2(m['z_wm_mean'])} +- {_f2(m.get('z_wm_std'))} | "
                     f"unwatermarked {_f2(m.get('z_unwm_mean'))} +- {_f2(m.get('z_unwm_std'))}")
    ppl_wm, ppl_un = _num(m.get("ppl_wm_mean")), _num(m.get("ppl_unwm_mean"))
    if ppl_wm is not None and ppl_un is not None:
        change = f" ({100 * (ppl_wm / ppl_un - 1):+.0f} %)" if ppl_un else ""
        lines.append(f"  perplexity       {ppl_wm:.1f} watermarked vs {ppl_un:.1f} plain{change}")
    if m.get("attack_name") not in (None, "none"):
        lines.append(f"  attack           {m['attack_name']}, strength {_g(m.get('attack_strength'))}")
    lines += attacked_lines(m)
    took = [f"{_num(m['job_seconds']):.0f} s"] if _num(m.get("job_seconds")) is not None else []
    if _num(m.get("peak_memory_mb")) is not None:
        took.append(f"peak memory {_num(m['peak_memory_mb']):.0f} MB")
    if took:
        lines.append("  took             " + ", ".join(took))
    lines.append(_files_line(Path(out_dir), m))
    return "\n".join(lines)


def _worst_null(metrics: Mapping[str, Any]) -> Optional[tuple[str, float, Optional[float]]]:
    rates = null_rates(metrics)
    if not rates:
        return None
    name, (rate, size) = max(rates.items(), key=lambda item: item[1][0])
    return name, rate, size


def job_line(metrics: Mapping[str, Any], out_dir: Path, name: str) -> str:
    """One line per finished job of a sweep; the table at the end has the rest."""
    m = metrics
    parts = [f"{name}:"]
    if m.get("status") not in (None, "ok"):
        parts.append(f"{m.get('status')} ({m.get('error', '')})")
    detection = _num(m.get("detection_rate"))
    if detection is not None:
        parts.append(f"detected {_pct(detection)} at {threshold_text(m)}")
    worst = _worst_null(m)
    if worst:
        parts.append(f"FP max {_count(worst[1], worst[2])} ({worst[0]})")
    if _num(m.get("auc")) is not None:
        parts.append(f"AUC {_g(m['auc'])}")
    if _num(m.get("ppl_wm_mean")) is not None and _num(m.get("ppl_unwm_mean")) is not None:
        parts.append(f"ppl {_g(m['ppl_wm_mean'])} vs {_g(m['ppl_unwm_mean'])}")
    return parts[0] + " " + " | ".join(parts[1:]) + f" -> {shown_path(out_dir)}"


SKIPPED = "skipped"  # metrics.json status of a job that did not start (moewm.app.main: weights unavailable)


# -- the sweep table ------------------------------------------------------------------------------

def _fpr_max(row: Mapping[str, Any]) -> Optional[float]:
    worst = _worst_null(row)
    return worst[1] if worst else None


def _bool_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        value = value.strip().lower() == "true"
    return "ok" if bool(value) else "NO"


def _frame(df: pd.DataFrame) -> pd.DataFrame:
    """The table's columns, from whichever metrics the jobs wrote."""
    keys = varying_keys(df)
    out = pd.DataFrame({"job": df["job"].astype(str) if "job" in df else [str(i) for i in range(len(df))]})
    for key in keys:
        out[key] = [value_text(v) for v in df[f"override.{key}"]]
    status = df["status"].fillna("failed").astype(str) if "status" in df else pd.Series(["?"] * len(df))
    out["status"] = status.values
    records = df.to_dict("records")
    numeric = {
        "detect": [_num(r.get("detection_rate")) for r in records],
        "FP max": [_fpr_max(r) for r in records],
        "tokens": [_num(r.get("tokens_to_detect_alpha")) for r in records],
        "AUC": [_num(r.get("auc")) for r in records],
        "ppl wm": [_num(r.get("ppl_wm_mean")) for r in records],
        "ppl plain": [_num(r.get("ppl_unwm_mean")) for r in records],
    }
    for column, values in numeric.items():
        if any(v is not None for v in values):
            out[column] = values
    if "null_ok" in df:
        out["null"] = [_bool_text(v) for v in df["null_ok"]]
    if (out["status"] != "ok").any() and "error" in df:
        out["error"] = [("" if s == "ok" else str(e)[:60]) for s, e in zip(out["status"], df["error"].fillna(""))]
    return out


NUMBER_FORMATS = {"detect": "{:.3f}", "FP max": "{:.4f}", "tokens": "{:.0f}", "AUC": "{:.3f}", "ppl wm": "{:.1f}", "ppl plain": "{:.1f}"}


def _render(frame: pd.DataFrame) -> list[str]:
    cells = [[str(c) for c in frame.columns]]
    for _, row in frame.iterrows():
        line = []
        for column in frame.columns:
            value = row[column]
            if column in NUMBER_FORMATS:
                value = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else NUMBER_FORMATS[column].format(value)
            line.append(str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    numeric = [c in NUMBER_FORMATS for c in frame.columns]
    return ["  " + "  ".join((v.rjust(w) if num else v.ljust(w)) for v, w, num in zip(r, widths, numeric)).rstrip() for r in cells]


def _mean_row(frame: pd.DataFrame, name: str) -> dict[str, Any]:
    ok = frame[frame["status"] == "ok"]
    row: dict[str, Any] = {c: "" for c in frame.columns}
    row["job"] = name
    for column in NUMBER_FORMATS:
        if column in frame:
            values = pd.to_numeric(ok[column], errors="coerce")
            row[column] = float(values.mean()) if values.notna().any() else None
    return row


def _grouped_by_seed(frame: pd.DataFrame, keys: list[str]) -> Optional[pd.DataFrame]:
    """Many jobs over seeds and something else: one row per value of the rest, mean over seeds."""
    others = [k for k in keys if k != "seed"]
    if "seed" not in keys or not others:
        return None
    rows = []
    for values, sub in frame.groupby(others, sort=False):
        values = values if isinstance(values, tuple) else (values,)
        row = _mean_row(sub, f"{(sub['status'] == 'ok').sum()}/{len(sub)} ok")
        row.update(dict(zip(others, values)))
        row["seed"] = f"{len(sub)} seeds"
        row["status"] = "mean"
        rows.append(row)
    grouped = pd.DataFrame(rows, columns=frame.columns)
    return grouped if len(grouped) <= MAX_TABLE_ROWS else None


def sweep_table(df: pd.DataFrame, alpha_text: str = "") -> str:
    """One screen: a row per job (its swept values, detection, worst null, tokens to detect, AUC, perplexity), then means."""
    if not len(df):
        return "  (no jobs)"
    frame = _frame(df)
    keys = varying_keys(df)
    lines = []
    if len(frame) > MAX_TABLE_ROWS:
        grouped = _grouped_by_seed(frame, keys)
        if grouped is not None:
            lines.append(f"  {len(frame)} jobs: mean over seeds per {' x '.join(k for k in keys if k != 'seed')} (every job is in summary.csv)")
            frame = grouped
        else:
            lines.append(f"  {len(frame)} jobs: the first {MAX_TABLE_ROWS} (every job is in summary.csv)")
            frame = frame.head(MAX_TABLE_ROWS)
    elif (frame["status"] == "ok").sum() > 1:
        frame = pd.concat([frame, pd.DataFrame([_mean_row(frame, "mean")])], ignore_index=True)
    lines += _render(frame)
    legend = []
    if "detect" in frame:
        legend.append(f"detect: detection rate at {alpha_text or 'the threshold'}")
    if "FP max" in frame:
        legend.append("FP max: worst null set's false-positive rate")
    if "tokens" in frame:
        legend.append("tokens: median tokens to detect")
    if legend:
        lines.append("  " + " | ".join(legend))
    pooled = pooled_null_rates(df)
    if pooled:
        lines.append("  false positives, all jobs: " + " | ".join(f"{s} {k}/{n}" for s, (k, n) in pooled.items()))
    return "\n".join(lines)


def pooled_null_rates(df: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """False positives over every ok job, per null set, as counts (only where each job's size is known)."""
    totals: dict[str, list[int]] = {}
    for record in df.to_dict("records"):
        if record.get("status") != "ok":
            continue
        for name, (rate, size) in null_rates(record).items():
            if size:
                total = totals.setdefault(name, [0, 0])
                total[0] += round(rate * size)
                total[1] += int(size)
    return {k: (v[0], v[1]) for k, v in totals.items()}


def sweep_report(df: pd.DataFrame, sweep_dir: Path, plots: Sequence[Path], sync: Optional[str] = None,
                 url: Optional[str] = None) -> str:
    """The end of a sweep: a header, the table, the files, and how to see it in W&B."""
    ok = int((df.get("status") == "ok").sum()) if len(df) else 0
    keys = varying_keys(df) if len(df) else []
    first = next((r for r in df.to_dict("records") if r.get("status") == "ok"), {}) if len(df) else {}
    skipped = int((df.get("status") == SKIPPED).sum()) if len(df) else 0
    counts = f"{ok} ok, {len(df) - ok - skipped} failed" + (f", {skipped} skipped" if skipped else "")
    lines = ["", f"sweep: {len(df)} jobs, {counts}" + (f"; swept {', '.join(keys)}" if keys else "")]
    if skipped:
        lines.append(f"  {skipped} job(s) skipped without running: their model's weights cannot be had (the message above says "
                     "why and how to get them; each job's error is in summary.csv)")
    lines.append(sweep_table(df, threshold_text(first) if first else ""))
    lines.append(f"files: {shown_path(sweep_dir)}/  summary.csv" + (f", {', '.join(Path(p).name for p in plots)}" if plots else ""))
    if url:
        lines.append(f"W&B: {url}")
    elif sync:
        lines.append(f"W&B (offline): {sync}")
    return "\n".join(lines)


__all__ = ["job_summary", "job_line", "sweep_table", "sweep_report", "null_rates", "threshold_text"]
