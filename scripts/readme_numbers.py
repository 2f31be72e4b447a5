"""The README's numbers, each from a file in ``benchmarks/``, and the runs that write those files.

    python scripts/readme_numbers.py                    # check: README.md's numbers are what benchmarks/ gives (exit 1 if not)
    python scripts/readme_numbers.py --write            # rewrite README.md's generated blocks from benchmarks/
    python scripts/readme_numbers.py --run default_job  # run `python -m moewm` again: benchmarks/readme_default_job.json
    python scripts/readme_numbers.py --run sweep        # the key sweep and its round trip: benchmarks/readme_sweep_tiny_moe.json
    python scripts/readme_numbers.py --run sweep --seeds 4   # fewer keys

README.md holds generated blocks, ``<!-- numbers:NAME -->`` ... ``<!-- /numbers:NAME -->``, each rendered here from
benchmark files only (:data:`BLOCKS`); the prose around a block may quote a number only as one of the block's
phrases (:data:`PHRASES`), which the check finds verbatim. ``tests/test_readme.py`` runs the check, so a README number
that no benchmark file gives, or one that a new benchmark file changed, fails the suite. A run records the command,
its wall time, the machine (CPU model, cores, load) and the git commit beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
README = ROOT / "README.md"
COLUMNS = ["seed", "detection_rate", "false_positive_rate", "null_ok", "tokens_to_detect_alpha", "never_detected_alpha", "auc",
           "ppl_wm_mean", "ppl_unwm_mean", "z_wm_mean", "z_unwm_mean", "job_seconds"]

# -- the headline: what routing adds, on both embedded models (experiment=routing_study, the stealing study) ---------
HEADLINE_MODELS = ("tiny_moe", "tiny_olmoe")
HEADLINE_POINTS = {  # routing-study point (also its corpus in the stealing study) -> its row label
    "tournament_m20_b8_ctx2": "**routing tournament + 2 tokens (shipped)**",
    "tournament_m20_b8_ctx2_twin": "its routing-free twin: the same tournament keyed by the 2 tokens alone",
    "tournament_m20_b8_ctx2_r10": "10 of its 20 layers routed, 10 keyed by the tokens alone",
    "tournament_m20_b8_ctx2_common16k": "routing read only after the 16,384 most common token pairs of the human corpora",
    "synthid_n2_k20": "SynthID ngram_len 2 (transformers)",
    "synthid_n3_k20": "SynthID ngram_len 3: the twin's two tokens, no routing",
    "synthid_n4_k20": "SynthID ngram_len 4",
    "synthid_k20": "SynthID ngram_len 5",
    "kgw_g025_d2": "KGW lefthash h = 1, gamma 0.25, delta 2",
}
HEADLINE_ATTACKS = {"substitution_0p1": "subst. 0.1", "substitution_0p3": "subst. 0.3", "copy_paste_0p5": "copy-paste 0.5"}
VALIDITY = {"tiny_moe": "validity_tiny_moe_tournament_b8ctx2.json", "tiny_olmoe": "validity_tiny_olmoe_tournament_b8ctx2.json"}
SYNTHID_N4_VALIDITY = {"tiny_moe": "validity_tiny_moe_synthid_n4.json", "tiny_olmoe": "validity_tiny_olmoe_synthid_n4.json"}
COMMON = "tournament_m20_b8_ctx2_common16k"  # routing read only after the most common token pairs
COMMON_VALIDITY = {"tiny_moe": "validity_tiny_moe_common16k.json", "tiny_olmoe": "validity_tiny_olmoe_common16k.json"}
# Key validity over many keys (python -m moewm.evaluation.key_validity, scripts/key_validity.sh): design -> its tiny_moe file
KEY_VALIDITY = {name: f"key_validity_{name}_tiny_moe.json" for name in ("shipped", "twin", "synthid_n3", "synthid_n4")}


def routing_study(model: str) -> pd.DataFrame:
    return pd.read_csv(BENCH / f"routing_study_{model}.csv").set_index("point")


def spoofing(model: str) -> dict[str, tuple[int, float]]:
    """Per design (trade-off point): (the largest N it was attacked with, the text-only attacker's best spoofing success there)."""
    path = BENCH / f"stealing_{model}.csv"
    if not path.exists():
        return {}
    df = pd.read_csv(path, keep_default_na=False)
    spoof = df[(df["mode"] == "spoof") & (df["attacker"] == "text_only")]
    out = {}
    for scheme, rows in spoof.groupby("scheme"):
        top = int(rows["count"].max())
        out[str(scheme)] = (top, float(rows[rows["count"] == top]["detected"].max()))
    return out


def _mean_se(r: pd.Series, column: str, digits: int, scale: float = 1.0, suffix: str = "") -> str:
    se = r.get(f"{column}_sem", float("nan"))
    body = f"{scale * r[column]:+.0f}" if suffix == " %" else f"{scale * r[column]:.{digits}f}"
    return body + (f" ± {scale * se:.{digits}f}" if pd.notna(se) else "") + suffix


def headline_table() -> str:
    head = ("| model | design | perplexity cost | tokens to detect | " + " | ".join(HEADLINE_ATTACKS.values())
            + " | spoofed (text-only attacker, largest N) |")
    lines = [head, "|" + "---|" * (5 + len(HEADLINE_ATTACKS))]
    for model in HEADLINE_MODELS:
        df, spoof = routing_study(model), spoofing(model)
        for point, label in HEADLINE_POINTS.items():
            if point not in df.index:
                continue
            r = df.loc[point]
            cells = [model, label, _mean_se(r, "ppl_cost", 0, 100, " %"), _mean_se(r, "tokens_to_detect", 1)]
            cells += [_mean_se(r, f"attacked_{a}", 2) for a in HEADLINE_ATTACKS]
            cells.append(f"{spoof[point][1]:.2f} (N = {spoof[point][0]:,})" if point in spoof else "not run")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _validity(model: str, files: dict[str, str] = VALIDITY) -> dict:
    result = json.loads((BENCH / files[model]).read_text())
    summary = {(s["detector"], s["level"], s["origin"]): s for s in result["summary"]}
    return {"result": result, "summary": summary}


def _key_validity(name: str) -> tuple[dict, dict]:
    result = json.loads((BENCH / KEY_VALIDITY[name]).read_text())
    return result, {(r["origin"], r["level"]): r for r in result["rows"]}


def key_validity_phrases() -> list[str]:
    """The per-key validity sentence: how wide a fixed key's false-positive share spreads over many keys."""
    (shipped, s), (twin, t), (n3, n), (n4, f) = (_key_validity(k) for k in ("shipped", "twin", "synthid_n3", "synthid_n4"))
    kjv = ("kjv_narrative", 0.01)
    return [
        f"every one of {s[('all', 0.01)]['keys']:,} public keys deployed in turn on {shipped['n_texts']:,} human texts; "
        f"SynthID: {n[('all', 0.01)]['keys']} keys",
        f"on tiny_moe a 10-key gate passes with chance {shipped['gate_pass_chance']:.2f} for the shipped design, "
        f"{twin['gate_pass_chance']:.2f} for its twin, {n3['gate_pass_chance']:.2f} for SynthID ngram_len 3 and "
        f"{n4['gate_pass_chance']:.2f} for SynthID ngram_len 4",
        f"the keys' shares at p <= 0.01 spread {s[('all', 0.01)]['dispersion_ratio']:.2f}, {t[('all', 0.01)]['dispersion_ratio']:.2f}, "
        f"{n[('all', 0.01)]['dispersion_ratio']:.2f} and {f[('all', 0.01)]['dispersion_ratio']:.2f} times as wide as independent texts "
        f"would make them",
        f"{100 * s[kjv]['keys_above'] / s[kjv]['keys']:.1f} % of the shipped design's keys and "
        f"{100 * t[kjv]['keys_above'] / t[kjv]['keys']:.1f} % of its twin's lie above their 99 % interval there (0.5 % expected)",
    ]


def headline_phrases() -> list[str]:
    """The headline paragraph's numbers, as the phrases it quotes."""
    out = []
    for model in HEADLINE_MODELS:
        df, spoof = routing_study(model), spoofing(model)
        shipped, twin = df.loc["tournament_m20_b8_ctx2"], df.loc["tournament_m20_b8_ctx2_twin"]
        out.append(f"{model}: 30 % substitution keeps {shipped.attacked_substitution_0p3:.2f} with routing and "
                   f"{twin.attacked_substitution_0p3:.2f} without")
        shipped_p, twin_p, synthid_p = "tournament_m20_b8_ctx2", "tournament_m20_b8_ctx2_twin", "synthid_n3_k20"
        if {shipped_p, twin_p, synthid_p} <= set(spoof):
            out.append(f"at N = {spoof[shipped_p][0]:,} on {model}")
            out.append(f"spoofed texts pass the shipped design's detector {spoof[shipped_p][1]:.2f}, its twin's "
                       f"{spoof[twin_p][1]:.2f} and SynthID ngram_len 3's {spoof[synthid_p][1]:.2f}")
    out.append(f"{routing_study('tiny_moe').loc['tournament_m20_b8_ctx2', 'keys']:.0f} keys per point")
    pred = pd.read_csv(BENCH / "routing_predictability_tiny_moe.csv").set_index("block_bits").loc[8]
    out.append(f"the same block in {100 * pred.collision_ctx2:.0f} % of pairs of positions that share the two tokens before "
               f"({100 * pred.collision_ctx0:.0f} % at random)")
    for model in HEADLINE_MODELS:
        v = _validity(model)
        s = v["summary"]
        a, b = s[("moe_tournament", 0.01, "all")], s[("moe_tournament", 0.001, "all")]
        out.append(f"{model}: {a['keys_inside']}/{a['keys']} keys inside at p <= 0.01 and {b['keys_inside']}/{b['keys']} at 1e-3")
    out += key_validity_phrases()
    inside = [_validity(m, SYNTHID_N4_VALIDITY)["summary"] for m in SYNTHID_N4_VALIDITY]
    if all(s[("synthid", level, "all")]["keys_inside"] == s[("synthid", level, "all")]["keys"] for s in inside for level in (0.01, 0.001)):
        keys = "/".join(str(s[("synthid", 0.01, "all")]["keys"]) for s in inside[:1])
        out.append(f"valid per key on both models: {keys}/{keys} keys inside at p <= 0.01 and at 1e-3")
    for model in HEADLINE_MODELS:
        df, spoof = routing_study(model), spoofing(model)
        out.append(f"{df.loc['synthid_n3_k20', 'attacked_substitution_0p3']:.2f} against "
                   f"{df.loc['tournament_m20_b8_ctx2', 'attacked_substitution_0p3']:.2f} on {model}")
        if "synthid_n4_k20" in df.index and {"synthid_n4_k20", "tournament_m20_b8_ctx2"} <= set(spoof):
            out.append(f"{df.loc['synthid_n4_k20', 'attacked_substitution_0p3']:.2f} against "
                       f"{df.loc['tournament_m20_b8_ctx2', 'attacked_substitution_0p3']:.2f} after substitution and spoofed "
                       f"{spoof['synthid_n4_k20'][1]:.2f} against {spoof['tournament_m20_b8_ctx2'][1]:.2f} on {model}")
        if "synthid_n4_k20" in df.index:
            phrase = f"SynthID ngram_len 4 keeps {df.loc['synthid_n4_k20', 'attacked_substitution_0p3']:.2f} on {model}"
            if "synthid_n4_k20" in spoof:
                n, share = spoof["synthid_n4_k20"]
                phrase += f" and is spoofed {share:.2f} at N = {n:,}"
            out.append(phrase)
    for model in HEADLINE_MODELS:
        df, spoof = routing_study(model), spoofing(model)
        if COMMON in df.index and {COMMON, "synthid_n3_k20"} <= set(spoof) and (BENCH / COMMON_VALIDITY[model]).exists():
            a = _validity(model, COMMON_VALIDITY)["summary"][("moe_tournament", 0.01, "all")]
            out.append(f"{df.loc[COMMON, 'attacked_substitution_0p3']:.2f} after 30 % substitution on {model}, spoofed "
                       f"{spoof[COMMON][1]:.2f} against SynthID ngram_len 3's {spoof['synthid_n3_k20'][1]:.2f} at N = "
                       f"{spoof[COMMON][0]:,}, {a['keys_inside']}/{a['keys']} keys inside at p <= 0.01 (dispersion "
                       f"{a['dispersion_ratio']:.2f})")
    return out


# -- what `python -m moewm` prints: benchmarks/readme_default_job.json -----------------------------------------------
DEFAULT_JOB = BENCH / "readme_default_job.json"


def default_job_output() -> str:
    info = json.loads(DEFAULT_JOB.read_text())
    m = info["machine"]
    return ("```text\n$ " + info["command"] + "\n" + info["stdout"].rstrip("\n") + "\n```\n\n"
            f"(measured {info['date_utc'][:10]}: {info['wall_seconds']:.0f} s on {m['cores']} CPU cores, {m['torch_threads']} torch "
            f"thread(s), load average {m['load_average_at_start'][0]:.1f} at the start; `{DEFAULT_JOB.relative_to(ROOT)}`)")


BLOCKS: dict[str, Callable[[], str]] = {"headline": headline_table, "default_job": default_job_output}
PHRASES: dict[str, Callable[[], list[str]]] = {"headline": headline_phrases}
# Numbers the headline's prose may quote besides its phrases: the decision levels (configuration, not measurements).
LEVELS = {"0.01", "1e-3"}
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?:e-\d+)?")


def section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading, without its generated block."""
    body = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.sub(r"<!-- numbers:(\w+) -->.*?<!-- /numbers:\1 -->", "", body, flags=re.S)


def unsourced_numbers(text: str) -> list[str]:
    """Numbers in the headline's prose that are neither in one of its phrases nor a decision level."""
    phrases = " ".join(headline_phrases())
    quoted = set(NUMBER.findall(phrases)) | LEVELS
    return [n for n in NUMBER.findall(section(text, "Headline")) if n not in quoted]


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- numbers:{name} -->)(.*?)(<!-- /numbers:{name} -->)", re.S)


def rendered(name: str) -> str:
    return "\n" + BLOCKS[name]() + "\n"


def problems(text: str) -> list[str]:
    """What in ``text`` (the README) disagrees with benchmarks/: a missing or stale block, a missing phrase."""
    out = []
    for name, render in BLOCKS.items():
        m = block_pattern(name).search(text)
        if m is None:
            out.append(f"block {name!r}: not in the README")
        elif m.group(2) != rendered(name):
            out.append(f"block {name!r}: differs from benchmarks/ (python scripts/readme_numbers.py --write)")
    for name, phrases in PHRASES.items():
        flat = " ".join(text.split())  # a phrase may wrap across lines
        out += [f"{name}: the README does not say {p!r}" for p in phrases() if p not in flat]
    out += [f"headline: {n} is quoted but no benchmark file gives it (make it a phrase of headline_phrases)" for n in unsourced_numbers(text)]
    return out


def write(text: str) -> str:
    for name, render in BLOCKS.items():
        text = block_pattern(name).sub(lambda m: m.group(1) + rendered(name) + m.group(3), text)
    return text


# -- runs -------------------------------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    from moewm.bench.harness import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "load_average_at_start": os.getloadavg()}


def run(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moewm", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    return proc, time.perf_counter() - t0


def stamp_info() -> dict:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d/%H-%M-%S")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"date_utc": stamp, "git_commit": commit, "machine": machine()}


def run_default_job(env: dict) -> int:
    """``python -m moewm`` as the README shows it (W&B offline), its terminal output recorded verbatim."""
    info = stamp_info()
    out_dir = Path("outputs/readme_numbers") / info["date_utc"] / "default_job"
    proc, wall = run([f"hydra.run.dir={out_dir}"], env)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        return 1
    info.update(command="python -m moewm", run_dir_override=f"hydra.run.dir={out_dir}", wall_seconds=round(wall, 1), stdout=proc.stdout,
                metrics=json.loads((ROOT / out_dir / "metrics.json").read_text()))
    info["machine"]["load_average_at_end"] = os.getloadavg()
    DEFAULT_JOB.write_text(json.dumps(info, indent=1) + "\n")
    print(proc.stdout, f"({wall:.0f} s) -> {DEFAULT_JOB}", sep="\n")
    return 0


def run_sweep(seeds: int, out: Path, env: dict) -> int:
    """The README's key sweep on the shipped tiny_moe (W&B off), then the round trip on its first job: ``mode=detect``
    on its ``samples.jsonl`` (verdicts by token ids against the run's, and detection from the text alone)."""
    info = stamp_info()
    sweep = Path("outputs/readme_numbers") / info["date_utc"]
    sweep_args = ["-m", f"seed=range({seeds})", "logger=none", "progress=false", f"hydra.sweep.dir={sweep}"]
    proc, wall = run(sweep_args, env)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        return 1
    df = pd.read_csv(ROOT / sweep / "summary.csv")
    ok = df[df.status == "ok"]
    info["sweep"] = {
        "command": "python -m moewm " + " ".join(sweep_args), "wall_seconds": round(wall, 1), "jobs": len(df), "jobs_ok": len(ok),
        "mean": {c: float(ok[c].astype(float).mean()) for c in COLUMNS[1:] if c in ok},
        "min": {c: float(ok[c].astype(float).min()) for c in ("detection_rate", "ppl_wm_mean", "job_seconds") if c in ok},
        "max": {c: float(ok[c].astype(float).max()) for c in ("detection_rate", "ppl_wm_mean", "job_seconds") if c in ok},
        "null_ok_all": bool(ok["null_ok"].astype(bool).all()),
        "jobs_table": ok[[c for c in COLUMNS if c in ok]].to_dict("records"),
        "plots": sorted(p.name for p in (ROOT / sweep).glob("*.png")),
    }
    first = ok.iloc[0]
    detect_args = ["mode=detect", f"input={sweep}/{first['job']}/samples.jsonl", f"seed={int(first['seed'])}", "logger=none",
                   "progress=false", f"hydra.run.dir={sweep}_round_trip"]  # beside the sweep, not one of its jobs
    proc, wall = run(detect_args, env)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        return 1
    summary = json.loads((ROOT / f"{sweep}_round_trip" / "detection_summary.json").read_text())
    info["round_trip"] = {"command": "python -m moewm " + " ".join(detect_args), "wall_seconds": round(wall, 1),
                          **{k: summary.get(k) for k in ("n_prompts", "agreement_ids", "n_verdicts_compared", "max_p_value_difference_ids",
                                                         "detection_rate_ids_wm", "detection_rate_text_wm", "text_over_ids",
                                                         "retokenisation_changed_wm", "detection_rate_ids_unwm", "detection_rate_text_unwm")}}
    info["machine"]["load_average_at_end"] = os.getloadavg()
    out.write_text(json.dumps(info, indent=1) + "\n")
    s, r = info["sweep"], info["round_trip"]
    print(f"sweep ({s['jobs_ok']}/{s['jobs']} ok, {s['wall_seconds']:.0f} s): detection {s['mean']['detection_rate']:.3f} "
          f"[{s['min']['detection_rate']:.3f}, {s['max']['detection_rate']:.3f}], ppl {s['mean']['ppl_wm_mean']:.1f} vs "
          f"{s['mean']['ppl_unwm_mean']:.1f}, job {s['mean']['job_seconds']:.0f} s; round trip: {r['agreement_ids']} agreement by ids, "
          f"text {r['detection_rate_text_wm']} vs ids {r['detection_rate_ids_wm']} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite README.md's generated blocks from benchmarks/")
    parser.add_argument("--run", choices=("default_job", "sweep"), help="run the measurement again and write its benchmarks/ file")
    parser.add_argument("--seeds", type=int, default=10, help="--run sweep: keys of the sweep (default 10)")
    parser.add_argument("--out", type=Path, default=BENCH / "readme_sweep_tiny_moe.json", help="--run sweep: where it goes")
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    if args.run == "default_job":
        return run_default_job(env)
    if args.run == "sweep":
        return run_sweep(args.seeds, args.out, env)
    text = README.read_text()
    if args.write:
        text = write(text)
        README.write_text(text)
    found = problems(text)
    for line in found:
        print(line)
    if not found:
        print("README.md: every generated block and quoted number matches benchmarks/")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
