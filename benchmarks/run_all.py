"""Run every benchmark in one process and rewrite docs/performance.md.

    python benchmarks/run_all.py                  # full run (~10 min), rewrites the doc
    python benchmarks/run_all.py --quick          # smoke run (<1 min), prints, writes nothing
    python benchmarks/run_all.py --only overhead  # one benchmark (repeatable); the others'
                                                  # last results are kept from results.json
    python benchmarks/run_all.py --render-only    # redraw figures, rewrite the doc; run nothing

Each ``benchmarks/bench_<name>.py`` has ``run(quick) -> dict``. The raw records go
to ``benchmarks/results.json``; ``docs/performance.md`` is rendered from it and from
the hand-written explanations in ``benchmarks/why.md``, whose numbers are fields
filled from the results (see ``_report.py``), with figures drawn into
``docs/img/perf-NAME.png`` (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import _common as c  # before anything imports numpy: it pins the BLAS threads
from _report import ORDER, existing_figures, parse_whys, render

HERE = Path(__file__).resolve().parent
DOC = c.ROOT / "docs" / "performance.md"
FIGURES = c.ROOT / "docs" / "img"
RESULTS = HERE / "results.json"
WHY = HERE / "why.md"


def available() -> list[str]:
    # the report's benchmarks define run(quick); the others (bench_formats) are scripts of
    # their own, run by hand, with their own output
    found = {p.stem[len("bench_"):] for p in HERE.glob("bench_*.py")
             if "\ndef run(" in p.read_text()}
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


# -- figures ---------------------------------------------------------------------------------
def _num(cell: Any) -> float | None:
    """A table cell as a number ("19,451" -> 19451.0, "1.00x" -> 1.0); None if it is not one."""
    m = re.match(r"^\s*([-+]?[\d,]*\.?\d+)", str(cell))
    return float(m.group(1).replace(",", "")) if m else None


def _column(table: dict[str, Any], name: str) -> list[float | None]:
    i = table["columns"].index(name)
    return [_num(r[i]) for r in table["rows"]]


def _bars(title: str, labels: list[str], values: list[float], xlabel: str,
          reference: float | None = None) -> Any:
    from memryx._plot import series_figure

    return series_figure(title, {"": (labels, values)}, xlabel, reference).figure


def _fig_overhead(rec: dict[str, Any]) -> Any:
    t = rec["tables"][0]
    fps = _column(t, "frames/s")
    rows = [(r[0], v) for r, v in zip(t["rows"], fps, strict=True) if v is not None]
    return _bars("Runtime overhead: frames/s with a null model (dashed: the reference)",
                 [r for r, _ in rows], [v for _, v in rows], "frames/s", rows[0][1])


def _fig_pipelining(rec: dict[str, Any]) -> Any:
    t = rec["tables"][0]
    fps = _column(t, "frames/s")
    labels = [f"{r[0].split(',')[0].replace('`', '')}: {r[1]}" for r in t["rows"]]
    return _bars("Pipelining: frames/s, stages 2 / 3 / 2 ms (dashed: the 333 frames/s bound)",
                 labels, [v or 0.0 for v in fps], "frames/s", 1000 / 3)


def _fig_fidelity(rec: dict[str, Any]) -> Any:
    from memryx._plot import new_figure

    t = rec["tables"][0]
    models = [r[0] for r in t["rows"]]
    fig = new_figure(1, 3.6)
    ax_fps, ax_lat = fig.subplots(1, 2)
    x = list(range(len(models)))
    for ax, pairs, unit in (
            (ax_fps, [("forced fps", "forced"), ("frames/s", "measured")], "frames/s"),
            (ax_lat, [("forced latency ms", "forced"), ("p50 latency ms", "measured p50"),
                      ("device-reported p50 ms", "device p50")], "latency (ms)")):
        width = 0.8 / len(pairs)
        for k, (col, label) in enumerate(pairs):
            vals = [v or 0.0 for v in _column(t, col)]
            ax.bar([i + k * width for i in x], vals, width, label=label)
        ax.set_xticks([i + width * (len(pairs) - 1) / 2 for i in x], models, fontsize="small")
        ax.set_ylabel(unit)
        ax.legend(fontsize="small")
    fig.suptitle("Pacer accuracy: timed mode against the figures forced into the DFP")
    return fig


def _fig_multistream(rec: dict[str, Any]) -> Any:
    from memryx._plot import new_figure

    t = rec["tables"][0]
    fig = new_figure(1, 3.6)
    ax = fig.subplots()
    streams = _column(t, "streams")
    fps = _column(t, "aggregate frames/s")
    for device in dict.fromkeys(r[0] for r in t["rows"]):
        pts = [(s, f) for r, s, f in zip(t["rows"], streams, fps, strict=True)
               if r[0] == device and s is not None and f is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=device.replace("`", ""))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("streams")
    ax.set_ylabel("aggregate frames/s")
    ax.legend(fontsize="small")
    fig.suptitle("Multi-stream: aggregate frames/s by number of streams")
    return fig


def _fig_peers(rec: dict[str, Any]) -> Any:
    from memryx._plot import series_figure

    t = rec["tables"][0]
    fps = _column(t, "frames/s")
    series: dict[str, tuple[list[str], list[float]]] = {}
    for r, v in zip(t["rows"], fps, strict=True):
        names, vals = series.setdefault(r[0], ([], []))
        names.append(f"{re.split(r'[: ]', r[0])[0]}: {r[1]}")
        vals.append(v or 0.0)
    return series_figure("Peers: frames/s on the same model and thread budget", series,
                         "frames/s (log scale)", log=True).figure


def _fig_memory(rec: dict[str, Any]) -> Any:
    from memryx._plot import new_figure

    fig = new_figure(1, 3.6)
    ax = fig.subplots()
    for run, data in rec["raw"].items():
        samples = data.get("samples") or []
        ax.plot([p[0] for p in samples], [p[1] for p in samples], label=run)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MB)")
    ax.legend(fontsize="small")
    fig.suptitle("Memory: RSS over a long run with a slow output callback")
    return fig


FIGURE_MAKERS = {"overhead": _fig_overhead, "pipelining": _fig_pipelining,
                 "fidelity": _fig_fidelity, "multistream": _fig_multistream,
                 "peers": _fig_peers, "memory": _fig_memory}


def draw_figures(records: dict[str, Any], outdir: Path = FIGURES) -> dict[str, str]:
    """Draw the figures of the report into ``outdir``; return name -> path relative to docs/.

    Needs matplotlib (``pip install 'memryx[plot]'``); without it, or for a record whose
    shape a figure does not understand, the report simply has no figure there.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("== figures skipped: pip install 'memryx[plot]'", file=sys.stderr)
        return {}
    from memryx._plot import BenchFigure

    outdir.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    for name, make in FIGURE_MAKERS.items():
        if name not in records:
            continue
        try:
            fig = make(records[name])
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            print(f"== figure {name} skipped: {exc!r}", file=sys.stderr)
            continue
        path = outdir / f"perf-{name}.png"
        BenchFigure(fig, []).save_png(path)
        done[name] = path.relative_to(DOC.parent).as_posix()
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run (<1 min); prints the report, writes nothing "
                             "unless --output is given")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(available())}")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: redraw the figures and rewrite the report from "
                             "the last results (benchmarks/results.json)")
    parser.add_argument("--output", type=Path,
                        help=f"where to write the report (default: {DOC.relative_to(c.ROOT)}, "
                             "none for --quick)")
    args = parser.parse_args()
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
    if (args.only or args.render_only) and not args.quick and RESULTS.exists():
        records = json.loads(RESULTS.read_text()).get("benchmarks", {})
    command = "python benchmarks/run_all.py" + (" --quick" if args.quick else "") + \
        "".join(f" --only {n}" for n in (selected if args.only else []))
    for name in ([] if args.render_only else selected):
        records[name] = run_one(name, args.quick)
        if not args.quick:  # kept as it goes: an interrupted run keeps what it measured
            RESULTS.write_text(json.dumps({"command": command, "benchmarks": records},
                                          indent=1, default=str) + "\n")
    total = time.monotonic() - t
    print(f"== done in {total:.0f} s", file=sys.stderr)

    if args.render_only:
        command = json.loads(RESULTS.read_text()).get("command", command)  # the run's own
    if output is not None and not args.quick:
        draw_figures(records)
    text = render(records, parse_whys(WHY), command, existing_figures(DOC.parent, records))
    if not args.quick and not args.render_only:
        RESULTS.write_text(json.dumps({"command": command, "benchmarks": records}, indent=1,
                                      default=str) + "\n")
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        print(f"== wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
