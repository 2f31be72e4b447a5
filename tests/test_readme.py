"""The README is a door, and its numbers come from benchmarks/: every generated block equals what
``scripts/readme_numbers.py`` renders from the benchmark files, every number of the headline's prose is one the
benchmark files give, the install and test lines are CI's, and no page speaks of issues or sessions."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _numbers():
    spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "scripts" / "readme_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_numbers_are_the_benchmark_files():
    numbers = _numbers()
    assert numbers.problems(numbers.README.read_text()) == []


def test_a_stale_number_is_caught():
    numbers = _numbers()
    text = numbers.README.read_text()
    table = numbers.rendered("headline")
    row = next(line for line in table.splitlines() if "(shipped)" in line)
    stale = text.replace(row, row.replace(" %", "1 %", 1))
    assert any("headline" in p for p in numbers.problems(stale))
    phrase = next(p for p in numbers.headline_phrases() if "10/10" in p)
    wrapped = re.compile(r"\s+".join(map(re.escape, phrase.split())))  # a phrase may wrap across lines in the README
    assert wrapped.search(text)
    stale = wrapped.sub(phrase.replace("10/10", "9/10", 1), text, count=1)
    assert any("does not say" in p for p in numbers.problems(stale))
    assert any("no benchmark file gives it" in p for p in numbers.problems(text.replace("## Headline\n", "## Headline\n\n0.987\n", 1)))


def test_the_readme_is_short_and_installs_as_ci_does():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    ci = (ROOT / ".ci" / "run").read_text().replace("pip install -q ", "pip install ")  # CI keeps pip quiet
    for line in ("pip install torch==2.13.0", 'pip install -e ".[dev]"', "python -m pytest"):
        assert line in ci and line in text, line


def test_no_page_speaks_of_issues_or_sessions():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "conf").rglob("*.yaml"))]
    bad = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p in pages
           for m in re.finditer(r"\bissues? \d+|\bsessions?\b", p.read_text(), flags=re.I)]
    assert not bad, bad


def test_every_docs_link_of_the_readme_exists():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs/|BENCHMARKS)[^)#]*)", text)
    assert links and all((ROOT / link).exists() for link in links), [l for l in links if not (ROOT / l).exists()]
