"""Regenerate the README's sweep numbers from the current code, with the wall time and the machine they come from.

    python scripts/readme_numbers.py                 # the README's sweep: python -m moewm -m 'seed=range(10)'
    python scripts/readme_numbers.py --seeds 4       # fewer keys (the README says how many it quotes)

Runs the README's key sweep on the shipped tiny_moe (W&B off), then the round trip on the first job: ``mode=detect``
on its ``samples.jsonl`` (verdicts by token ids against the run's, and detection from the text alone). Writes
``benchmarks/readme_sweep_tiny_moe.json``: the commands, wall times, the machine (CPU model, cores, load), the git
commit, the means / ranges over keys the README quotes, and the per-job rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["seed", "detection_rate", "false_positive_rate", "null_ok", "tokens_to_detect_alpha", "never_detected_alpha", "auc",
           "ppl_wm_mean", "ppl_unwm_mean", "z_wm_mean", "z_unwm_mean", "job_seconds"]


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "load_average_at_start": os.getloadavg()}


def run(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moewm", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    return proc, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="keys of the sweep (the README's command: 10)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "readme_sweep_tiny_moe.json")
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d/%H-%M-%S")
    sweep = Path("outputs/readme_numbers") / stamp
    info = {"date_utc": stamp, "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                            text=True).stdout.strip(), "machine": machine()}
    sweep_args = ["-m", f"seed=range({args.seeds})", "logger=none", "progress=false", f"hydra.sweep.dir={sweep}"]
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
    args.out.write_text(json.dumps(info, indent=1) + "\n")
    s, r = info["sweep"], info["round_trip"]
    print(f"sweep ({s['jobs_ok']}/{s['jobs']} ok, {s['wall_seconds']:.0f} s): detection {s['mean']['detection_rate']:.3f} "
          f"[{s['min']['detection_rate']:.3f}, {s['max']['detection_rate']:.3f}], ppl {s['mean']['ppl_wm_mean']:.1f} vs "
          f"{s['mean']['ppl_unwm_mean']:.1f}, job {s['mean']['job_seconds']:.0f} s; round trip: {r['agreement_ids']} agreement by ids, "
          f"text {r['detection_rate_text_wm']} vs ids {r['detection_rate_ids_wm']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
