"""`report.html`: one self-contained page a virologist opens after a run.

The merge writes it from the run's counts (job/summary.py) and the committed parts' times:
the summary table, matplotlib plots inlined as SVG (no script, no font or file fetched at
view time), and how the run went (throughput, workers, interruptions, cost).
"""
from __future__ import annotations

import html
import io
import re
import time
from collections.abc import Sequence

import numpy as np
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator  # no pyplot: no GUI backend, no global figure state

from job.shards import Part
from job.summary import CALLS, LENGTH_EDGES, SCORE_BINS, InputStats, RunStats

COLOURS = {"virus": "#c0392b", "others": "#2e86c1", "none": "#a6acaf"}
MAX_FILES_PLOTTED = 30
TIME_BINS = 40
_OWNER = re.compile(r"/([^/]+)-a\d+-\d+\.(?:part|json)$")  # part key: _run/parts/<shard>/<owner>-a<attempt>-<n>.part (.json: format 1)


def render_report(
    summary: dict, stats: RunStats, parts: Sequence[Part], created_at: float, gpu_hour_price: float | None,
) -> str:
    """The whole page, as text."""
    total = stats.total()
    warnings = [
        summary.get(key) for key in ("warning", "short_reads_warning", "duplicate_ids_warning", "empty_inputs_warning") if summary.get(key)
    ]
    if summary["failed_shards"]:
        failed = sum(shard["reads"] for shard in summary["failed_shards"])
        warnings.append(
            f"{len(summary['failed_shards'])} shard(s) failed ({failed} reads not scored, listed in reads.tsv "
            "with reason shard_failed); _FAILED lists their errors; rerun with --retry-failed"
        )
    threshold = summary.get("min_virus_score")
    rule = (
        f"a read is called virus when its max P(virus) &ge; {threshold} (--min-virus-score)"
        if threshold is not None else
        "a read is called virus when, in any of its chunks, max P(virus) &ge; max P(others) (the published rule)"
    )
    state = "finished with failed shards" if summary["failed_shards"] else "finished"
    body = [
        f"<h1>VirNucPro report</h1><p class=meta>run {html.escape(summary['run_id'])}, {state}; "
        f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Scores: P(virus) is the "
        f"classifier's score2, P(others) its score1; {rule}.</p>",
        *(f"<p class=warn>&#9888; {html.escape(str(text))}</p>" for text in warnings),
        "<h2>Reads per input</h2>", _summary_table(stats),
        "<h2>Calls</h2><div class=plots>",
        _figure("P(virus) of the scored reads", _score_plot(total)),
        _figure("Calls by read length", _length_plot(total)),
        _figure("Calls by input file", _file_plot(stats)),
        "</div><h2>The run</h2><div class=plots>",
        _figure("Throughput", _throughput_plot(parts, created_at)),
        _run_table(summary, parts, gpu_hour_price),
        "</div>",
    ]
    return _PAGE.format(body="\n".join(body))


def _summary_table(stats: RunStats) -> str:
    outcomes = stats.outcome_columns()
    head = ["input", "reads", *(o.replace("none:", "not called: ") for o in outcomes), "frames",
            "chunks called virus", "reads &lt; chunk length"]
    rows = []
    for name, counts in stats.rows():
        share = f"{100 * counts.shorter / counts.reads:.1f}%" if counts.reads else "-"
        cells = [counts.reads, *(counts.outcomes.get(o, 0) for o in outcomes), counts.frames, counts.virus_chunks]
        rows.append(
            f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{cell:,}</td>" for cell in cells) + f"<td>{share}</td></tr>"
        )
    return (
        "<table class=summary><thead><tr>" + "".join(f"<th>{cell}</th>" for cell in head) + "</tr></thead><tbody>"
        + "".join(rows) + "</tbody></table>"
    )


def _run_table(summary: dict, parts: Sequence[Part], price: float | None) -> str:
    workers = {match.group(1) for part in parts if (match := _OWNER.search(part.rows))}
    gpu_hours = summary["gpu_seconds"] / 3600
    rows = [
        ("reads", f"{summary['reads']:,}"), ("frames scored", f"{summary['frames']:,}"),
        ("shards", f"{summary['shards']} ({len(summary['failed_shards'])} failed)"),
        ("workers that committed results", str(len(workers))),
        # Per shard, not per stop of the job: a stop right after a commit resumes nothing
        ("shards resumed after a stop or a lost machine", str(summary["interruptions"])),
        ("reads scored again (scored, not yet committed, at a stop)", f"{summary['reads_redone']:,}"),
        ("wall time", _duration(summary["wall_seconds"])),
        ("worker time", _duration(summary["worker_seconds"])),
        ("GPU-hours", f"{gpu_hours:.3f}"),
    ]
    if price is not None:
        rows.append(("cost", f"{gpu_hours:.3f} GPU-hours &times; {price:g} per GPU-hour = {gpu_hours * price:.2f}"))
    return "<table class=run>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def _score_plot(total: InputStats) -> Figure:
    fig, ax = _axes()
    edges = np.linspace(0, 1, SCORE_BINS + 1)
    width = edges[1] - edges[0]
    ax.bar(edges[:-1], total.scores[1], width, align="edge", color=COLOURS["others"], label="called others")
    ax.bar(edges[:-1], total.scores[0], width, align="edge", bottom=total.scores[1], color=COLOURS["virus"], label="called virus")
    ax.set_xlim(0, 1)
    ax.set_xlabel("max P(virus) of the read (score2)")
    ax.set_ylabel("reads")
    _finish(ax, total.scores.sum())
    return fig


def _length_plot(total: InputStats) -> Figure:
    fig, ax = _axes()
    labels = [f"<{_bp(LENGTH_EDGES[0])}"] + [f"{_bp(a)}-{_bp(b)}" for a, b in zip(LENGTH_EDGES, LENGTH_EDGES[1:])] + [f"≥{_bp(LENGTH_EDGES[-1])}"]
    _stacked(ax, labels, total.lengths, horizontal=False)
    ax.set_xlabel("read length (bp)")
    ax.set_ylabel("reads")
    _finish(ax, total.lengths.sum())
    return fig


def _file_plot(stats: RunStats) -> Figure:
    ranked = sorted(stats.inputs.items(), key=lambda item: -item[1].reads)[:MAX_FILES_PLOTTED]
    fig, ax = _axes(height=min(2.8, 0.35 * len(ranked) + 1.6) if len(ranked) < 6 else 0.35 * len(ranked) + 1.2)
    counts = np.array([
        [_calls(counts, call) for _name, counts in ranked]
        for call in CALLS
    ]).reshape(len(CALLS), len(ranked))
    _stacked(ax, [_short_name(name) for name, _ in ranked], counts, horizontal=True)
    ax.invert_yaxis()
    ax.set_xlabel("reads")
    if len(stats.inputs) > MAX_FILES_PLOTTED:
        ax.set_title(f"the {MAX_FILES_PLOTTED} largest of {len(stats.inputs)} inputs", fontsize=9)
    _finish(ax, counts.sum())
    return fig


def _calls(counts: InputStats, call: str) -> int:
    if call != "none":
        return counts.outcomes.get(call, 0)
    return sum(n for outcome, n in counts.outcomes.items() if outcome.startswith("none:"))


def _throughput_plot(parts: Sequence[Part], created_at: float) -> Figure:
    fig, ax = _axes()
    ax.set_xlabel("minutes since the run was planned")
    ax.set_ylabel("frames/s")
    if parts:
        times = np.array([part.committed_at - created_at for part in parts]) / 60
        frames = np.array([part.frames for part in parts], float)
        end = max(times.max(), 1e-3)
        edges = np.linspace(0, end, TIME_BINS + 1)
        per_bin, _ = np.histogram(times, edges, weights=frames)
        ax.step(edges[:-1], per_bin / ((edges[1] - edges[0]) * 60), where="post", color="#117a65")
        ax.set_xlim(0, end)
        ax.set_ylim(bottom=0)
    _finish(ax, len(parts), empty="no results committed")
    return fig


def _stacked(ax, labels: list[str], counts: np.ndarray, horizontal: bool) -> None:  # noqa: ANN001
    positions = np.arange(len(labels))
    base = np.zeros(len(labels))
    for row, call in enumerate(CALLS):
        label = {"none": "not called"}.get(call, f"called {call}")
        if horizontal:
            ax.barh(positions, counts[row], left=base, color=COLOURS[call], label=label)
        else:
            ax.bar(positions, counts[row], bottom=base, color=COLOURS[call], label=label)
        base = base + counts[row]
    (ax.set_yticks if horizontal else ax.set_xticks)(positions, labels, fontsize=8)


def _bp(length: int) -> str:
    return f"{length // 1000}k" if length >= 1000 and length % 1000 == 0 else str(length)


def _short_name(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return name if len(name) <= 32 else name[:14] + "…" + name[-17:]


def _axes(height: float = 2.8) -> tuple[Figure, object]:
    fig = Figure(figsize=(5.2, height), layout="constrained")
    return fig, fig.add_subplot()


def _finish(ax, count: float, empty: str = "no reads") -> None:  # noqa: ANN001
    ax.spines[["top", "right"]].set_visible(False)
    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_label_text() == "reads":
            axis.set_major_locator(MaxNLocator(integer=True))
    if not count:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="#7b7d7d")
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=8, ncols=3, loc="lower left", bbox_to_anchor=(0, 1.0))  # above the bars


def _figure(title: str, fig: Figure) -> str:
    buffer = io.StringIO()
    with rc_context({"svg.hashsalt": title, "svg.fonttype": "path"}):  # ids unique per figure; glyphs as paths
        fig.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{svg[svg.index('<svg'):]}</figure>"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>VirNucPro report</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em 2em; color: #1c2833; }}
h1 {{ margin-bottom: 0.2em; }} h2 {{ margin-top: 1.4em; border-bottom: 1px solid #d5d8dc; }}
.meta {{ color: #566573; }}
.warn {{ background: #fdebd0; border-left: 4px solid #e67e22; padding: 0.4em 0.8em; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ padding: 0.25em 0.7em; border-bottom: 1px solid #eaecee; text-align: right; }}
th:first-child {{ text-align: left; }} table.summary tbody tr:last-child {{ font-weight: bold; }}
table.run {{ align-self: center; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }} figcaption {{ font-weight: bold; }}
svg {{ max-width: 100%; height: auto; }}
</style></head>
<body>
{body}
</body></html>
"""
