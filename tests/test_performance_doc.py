"""docs/performance.md is what its sources render to, and its prose types no number."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import _report  # noqa: E402

RESULTS = json.loads((ROOT / "benchmarks" / "results.json").read_text())
WHYS = _report.parse_whys(ROOT / "benchmarks" / "why.md")


def test_the_doc_is_what_results_and_whys_render_to():
    figures = _report.existing_figures(ROOT / "docs", RESULTS["benchmarks"])
    rendered = _report.render(RESULTS["benchmarks"], WHYS, RESULTS["command"], figures)
    assert (ROOT / "docs" / "performance.md").read_text() == rendered, (
        "docs/performance.md is stale or was edited by hand: run "
        "`python benchmarks/run_all.py --render-only`")


@pytest.mark.parametrize("name", sorted(WHYS))
def test_why_text_quotes_numbers_only_through_fields(name):
    assert name in RESULTS["benchmarks"], f"why.md has a section for unknown benchmark {name!r}"
    assert _report.bare_numbers(WHYS[name]) == [], (
        f"benchmarks/why.md, section {name}: write these as {{{{{name}.path}}}} fields")


def test_bare_numbers_are_found_and_fields_are_filled():
    records = {"b": {"raw": {"fps": [10.0, 12345.678]}, "tables": [{"rows": [["a", "0.5x"]]}]}}
    text = "{{b.raw.fps.1:,.0f}} frames/s, {{b.tables.0.rows.0.1}} of the reference"
    assert _report.bare_numbers(text) == []
    assert _report.fill(text, records) == "12,346 frames/s, 0.5x of the reference"
    assert _report.bare_numbers("about 160 ms, 0.97x and +5.2%, `1.5 ms` in code") == [
        "160 ms", "0.97x", "+5.2%"]
    assert _report.bare_numbers("MobileNetV1 and YOLOv7-tiny at p50, 2 cores") == []
    with pytest.raises(_report.FieldError, match="'nope' not found"):
        _report.fill("{{b.raw.nope}}", records)
    with pytest.raises(_report.FieldError, match="no results for benchmark 'c'"):
        _report.fill("{{c.raw}}", records)
