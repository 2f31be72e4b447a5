"""Check the routing watermark's goal design by design, from the routing study, the stealing study and the validity
study (moewm.evaluation.routing_goal), and rebuild each routing-study report with spoofing and per-key dispersion
in its "what routing adds" table.

    python scripts/routing_goal.py \\
        --study tiny_moe=outputs/routing_study/tiny_moe --study tiny_olmoe=outputs/routing_study/tiny_olmoe \\
        --stealing tiny_moe=benchmarks/stealing_tiny_moe.csv --stealing tiny_olmoe=benchmarks/stealing_tiny_olmoe.csv \\
        --validity tiny_moe:tournament_m20_b8_ctx2=benchmarks/validity_tiny_moe_tournament_b8ctx2.json ... --out benchmarks

Writes OUT/routing_goal.md and .csv; with --copy, each study's tradeoff.md / tradeoff.csv / routing_adds.csv as
OUT/routing_study_<model>.{md,csv} and OUT/routing_adds_<model>.csv (the README's numbers are read from those).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from moewm.app.report import collect
from moewm.evaluation.routing_goal import goal_table, markdown, spoofing_by_count, spoofing_front, validity_extras
from moewm.evaluation.tradeoff import tradeoff_report


def pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise SystemExit(f"{what} {v!r}: expected NAME=PATH")
        name, path = v.split("=", 1)
        if not Path(path).exists():
            raise SystemExit(f"{what} {v!r}: {path} does not exist")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", action="append", default=[], help="MODEL=SWEEP_DIR of experiment=routing_study")
    parser.add_argument("--stealing", action="append", default=[], help="MODEL=stealing.csv of moewm.evaluation.stealing")
    parser.add_argument("--validity", action="append", default=[], help="MODEL:POINT=validity.json of moewm.evaluation.validity")
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--copy", action="store_true", help="copy each study's report into OUT as routing_study_<model>.*")
    args = parser.parse_args(argv)
    studies, stealing = pairs(args.study, "--study"), pairs(args.stealing, "--stealing")
    validity: dict[str, dict[str, dict]] = {}
    for key, path in pairs(args.validity, "--validity").items():
        if ":" not in key:
            raise SystemExit(f"--validity {key}={path}: expected MODEL:POINT=PATH")
        model, point = key.split(":", 1)
        validity.setdefault(model, {})[point] = json.loads(Path(path).read_text())
    if not studies:
        parser.error("--study: at least one MODEL=SWEEP_DIR")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    goals, fronts = [], []
    for model, sweep in studies.items():
        steal = pd.read_csv(stealing[model]) if model in stealing else None
        valid = validity_extras(validity.get(model, {}))
        extras = []
        if steal is not None:
            extras.append(spoofing_by_count(steal))
        if len(valid):
            extras.append(valid[["dispersion", "dispersion_sem"]].astype(float))
        joined = pd.concat(extras, axis=1) if extras else None
        table, _ = tradeoff_report(collect(sweep), sweep, joined)
        goals.append(goal_table(model, table, steal, valid))
        if steal is not None:
            fronts.append(spoofing_front(model, table, steal))
        if args.copy:
            shutil.copy(Path(sweep) / "tradeoff.md", out / f"routing_study_{model}.md")
            shutil.copy(Path(sweep) / "tradeoff.csv", out / f"routing_study_{model}.csv")
            shutil.copy(Path(sweep) / "routing_adds.csv", out / f"routing_adds_{model}.csv")
    goal = pd.concat(goals, ignore_index=True)
    front = pd.concat(fronts, ignore_index=True) if fronts else pd.DataFrame()
    goal.to_csv(out / "routing_goal.csv", index=False)
    front.to_csv(out / "routing_front.csv", index=False)
    text = markdown(goal, front)
    (out / "routing_goal.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
