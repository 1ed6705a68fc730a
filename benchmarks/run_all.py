"""Run every benchmark in one process and rewrite docs/performance.md.

    python benchmarks/run_all.py                  # full run (~10 min), rewrites the doc
    python benchmarks/run_all.py --quick          # smoke run (<1 min), prints, writes nothing
    python benchmarks/run_all.py --only overhead  # one benchmark (repeatable); the others'
                                                  # last results are kept from results.json

Each ``benchmarks/bench_<name>.py`` has ``run(quick) -> dict``. The raw records go
to ``benchmarks/results.json``; ``docs/performance.md`` is rendered from it and from
the hand-written explanations in ``benchmarks/why.md``, whose numbers are fields
filled from the results (see ``_report.py``). ``--render`` re-renders the doc from
those two files without running anything.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import _common as c  # before anything imports numpy: it pins the BLAS threads
from _report import ORDER, parse_whys, render

HERE = Path(__file__).resolve().parent
DOC = c.ROOT / "docs" / "performance.md"
RESULTS = HERE / "results.json"
WHY = HERE / "why.md"


def available() -> list[str]:
    found = {p.stem[len("bench_"):] for p in HERE.glob("bench_*.py")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def run_one(name: str, quick: bool) -> dict[str, Any]:
    print(f"== {name}{' (quick)' if quick else ''} ...", file=sys.stderr, flush=True)
    t = time.monotonic()
    try:
        rec = importlib.import_module(f"bench_{name}").run(quick)
    except Exception as exc:
        rec = c.result(name, name, "", goals=[c.goal("the benchmark runs", "it raised", False,
                                                      f"ERROR: {exc!r}")],
                       notes=["```\n" + traceback.format_exc() + "```"])
    rec["seconds"] = round(time.monotonic() - t, 1)
    rec["quick"] = quick
    rec["machine"] = c.machine()
    for g in rec["goals"]:
        print(f"   {g['status']:7} {g['goal']}: {g['measured']}"
              f"{'  [' + g['miss'] + ']' if g['miss'] else ''}", file=sys.stderr)
    print(f"   ({rec['seconds']} s)", file=sys.stderr, flush=True)
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run (<1 min); prints the report, writes nothing "
                             "unless --output is given")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(available())}")
    parser.add_argument("--output", type=Path,
                        help=f"where to write the report (default: {DOC.relative_to(c.ROOT)}, "
                             "none for --quick)")
    parser.add_argument("--render", action="store_true",
                        help="only re-render the doc from results.json and why.md")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(RESULTS.read_text())
        DOC.write_text(render(saved["benchmarks"], parse_whys(WHY), saved["command"]))
        print(f"== wrote {DOC}", file=sys.stderr)
        return
    names = available()
    selected = names
    if args.only:
        wanted = [w for o in args.only for w in o.split(",") if w]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; available: {names}")
        selected = [n for n in names if n in wanted]
    output = args.output if args.output else (None if args.quick else DOC)

    t = time.monotonic()
    records: dict[str, Any] = {}
    if args.only and not args.quick and RESULTS.exists():
        records = json.loads(RESULTS.read_text()).get("benchmarks", {})
    for name in selected:
        records[name] = run_one(name, args.quick)
    total = time.monotonic() - t
    print(f"== done in {total:.0f} s", file=sys.stderr)

    command = "python benchmarks/run_all.py" + (" --quick" if args.quick else "") + \
        "".join(f" --only {n}" for n in (selected if args.only else []))
    text = render(records, parse_whys(WHY), command)
    if not args.quick:
        RESULTS.write_text(json.dumps({"command": command, "benchmarks": records}, indent=1,
                                      default=str) + "\n")
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        print(f"== wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
