"""Figures of a benchmark run: throughput over time and latency distribution per stream.

Needs matplotlib, the optional extra ``memryx[plot]``. Figures are drawn on
matplotlib's ``Agg`` canvas directly (no pyplot, no global state, no display).
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["BenchFigure", "bench_figure", "new_figure", "require_matplotlib", "series_figure",
           "write_html"]

#: Streams drawn with their own colour and legend entry; more are drawn thin and grey.
LABELLED_STREAMS = 8
EXTRA = "pip install 'memryx[plot]'"


class _Timeline(Protocol):
    start: float
    sent: list[list[float]]
    received: list[list[float]]

    def latencies_ms(self, stream: int) -> Any: ...


def require_matplotlib() -> None:
    """Raise ImportError naming the extra when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"plots need matplotlib: {EXTRA}") from exc


@dataclass
class BenchFigure:
    figure: Figure
    summary: list[dict[str, Any]]
    """Per stream: frames, mean frames/s, p50 and p99 latency (ms), as drawn."""

    def png(self, dpi: int = 110) -> bytes:
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()

    def save_png(self, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        target.write_bytes(self.png())
        return target


def new_figure(rows: int, height: float) -> Figure:
    """An empty figure on an Agg canvas, 9 inches wide (``rows`` is a hint only)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(i: int, n: int) -> dict[str, Any]:
    if i < LABELLED_STREAMS:
        return {"color": f"C{i % 10}", "label": f"stream {i}", "lw": 1.4}
    return {"color": "0.6", "lw": 0.6, "label": f"{n - LABELLED_STREAMS} more" if
            i == LABELLED_STREAMS else None}


def bench_figure(timeline: _Timeline, title: str = "") -> BenchFigure:
    """Throughput over time (frames/s per stream) and latency histograms with p50/p99."""
    fig = new_figure(2, 7.5)
    ax_tp, ax_lat = fig.subplots(2, 1)
    streams = len(timeline.received)
    ends = [r[-1] for r in timeline.received if r]
    span = (max(ends) - timeline.start) if ends else 0.0
    width = max(span / 60, 0.02)
    edges = np.arange(0.0, span + width, width)
    summary = []
    all_lat = [timeline.latencies_ms(s) for s in range(streams)]
    finite = np.concatenate([a for a in all_lat if a.size]) if any(a.size for a in all_lat) \
        else np.zeros(0)
    bins = np.linspace(0.0, float(np.percentile(finite, 99.9)) * 1.05 or 1.0, 60) \
        if finite.size else 10
    for s in range(streams):
        t = np.asarray(timeline.received[s]) - timeline.start
        lat = all_lat[s]
        style = _style(s, streams)
        if t.size and edges.size > 1:
            counts, _ = np.histogram(t, edges)
            ax_tp.plot(edges[:-1] + width / 2, counts / width, **style)
        if lat.size:
            p50, p99 = (float(x) for x in np.percentile(lat, [50, 99]))
            ax_lat.hist(lat, bins=bins, histtype="step", color=style["color"], lw=style["lw"],
                        label=style["label"])
            if s < LABELLED_STREAMS:
                ax_lat.axvline(p50, color=style["color"], ls="--", lw=1)
                ax_lat.axvline(p99, color=style["color"], ls=":", lw=1)
        else:
            p50 = p99 = float("nan")
        summary.append({"stream": s, "frames": int(t.size),
                        "fps": float(t.size / span) if span > 0 else 0.0,
                        "p50_ms": p50, "p99_ms": p99})
    ax_tp.set_xlabel("time since start (s)")
    ax_tp.set_ylabel("frames/s (outputs)")
    ax_tp.set_title("throughput over time, per stream")
    ax_tp.set_ylim(bottom=0)
    ax_lat.set_xlabel("latency, input callback return -> output callback (ms)")
    ax_lat.set_ylabel("frames")
    ax_lat.set_title("latency distribution per stream (dashed: p50, dotted: p99)")
    if streams > 1:
        ax_tp.legend(fontsize="small", ncol=min(streams, 4))
    ax_lat.legend(fontsize="small", ncol=min(streams, 4))
    if title:
        fig.suptitle(title)
    return BenchFigure(fig, summary)


def series_figure(title: str, series: dict[str, tuple[list[str], list[float]]],
                  ylabel: str, reference: float | None = None, *,
                  log: bool = False) -> BenchFigure:
    """Grouped horizontal bars: one group per series name, e.g. frames/s per variant."""
    n = sum(len(v[0]) for v in series.values())
    fig = new_figure(1, 1.2 + 0.35 * max(n, 1))
    ax = fig.subplots()
    labels: list[str] = []
    values: list[float] = []
    colors: list[str] = []
    for i, (_name, (names, vals)) in enumerate(series.items()):
        labels += names
        values += vals
        colors += [f"C{i % 10}"] * len(names)
    y = np.arange(len(labels))[::-1]
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, labels, fontsize="small")
    ax.set_xlabel(ylabel)
    if log:
        ax.set_xscale("log")
    if reference is not None:
        ax.axvline(reference, color="k", ls="--", lw=1)
    for yi, v in zip(y, values, strict=True):
        ax.text(v, yi, f" {v:,.0f}", va="center", fontsize="x-small")
    fig.suptitle(title)
    return BenchFigure(fig, [])


def write_html(path: str | os.PathLike[str], fig: BenchFigure, result: dict[str, Any]) -> Path:
    """A self-contained HTML report: the figure (inline PNG) and the figures' table."""
    png = base64.b64encode(fig.png()).decode("ascii")
    rows = "\n".join(
        f"<tr><td>{r['stream']}</td><td>{r['frames']}</td><td>{r['fps']:,.1f}</td>"
        f"<td>{r['p50_ms']:.2f}</td><td>{r['p99_ms']:.2f}</td></tr>" for r in fig.summary)
    lat = result.get("latency_ms", {})
    head = (f"model {result.get('model_idx')} ({result.get('model')}), {result.get('mode')} "
            f"mode, {result.get('frames')} frames over {result.get('streams')} stream(s) in "
            f"{result.get('elapsed_s', 0.0):.2f} s: {result.get('fps', 0.0):,.1f} frames/s, "
            f"latency p50 {lat.get('p50') or 0:.2f} ms, p99 {lat.get('p99') or 0:.2f} ms")
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>memryx bench</title>
<style>body{{font-family:sans-serif;max-width:60rem;margin:2rem auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.2rem .6rem;
text-align:right}}</style></head><body>
<h1>memryx bench</h1>
<p>{html.escape(head)}</p>
<img alt="throughput over time and latency distribution per stream"
 src="data:image/png;base64,{png}" style="max-width:100%">
<h2>Per stream (from the output callback's clock)</h2>
<table><tr><th>stream</th><th>frames</th><th>frames/s</th><th>p50 ms</th><th>p99 ms</th></tr>
{rows}
</table>
<h2>Figures (memryx bench --json)</h2>
<pre>{html.escape(_json(result))}</pre>
</body></html>
"""
    target = Path(path)
    target.write_text(doc)
    return target


def _json(result: dict[str, Any]) -> str:
    import json

    return json.dumps(result, indent=2, default=str)
