"""The demo's chart (``--plot FILE``): checked before the run, drawn after it."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["LOG_RATIO", "check_plot_path", "plot"]

MODES = ("naive", "batched", "bulk")
COLORS = ("#c0504d", "#4f81bd", "#9bbb59")
# A panel whose tallest bar is this many times its shortest gets a log axis: on a linear
# one the short bars (the batched and bulk modes, usually) would be invisible slivers.
LOG_RATIO = 20.0


def check_plot_path(path: str) -> str | None:
    """Return why the chart could not be saved to `path` (one line), or None.

    Run before any work: a missing matplotlib, a format matplotlib cannot write, a
    directory that does not exist or cannot be written, or a path that is a directory.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return "--plot needs matplotlib: pip install -e '.[demo]' (or pip install matplotlib)"
    target = Path(path)
    extension = target.suffix.lstrip(".").lower()
    formats = sorted(FigureCanvasAgg.get_supported_filetypes())
    if extension not in formats:
        named = f"'.{extension}'" if extension else "no extension"
        return f"--plot {path}: {named} is not a chart format; use one of {', '.join(formats)}"
    if target.is_dir():
        return f"--plot {path}: is a directory"
    folder = target.parent
    if not folder.is_dir():
        return f"--plot {path}: the directory {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK) or (
        target.exists() and not os.access(target, os.W_OK)
    ):
        return f"--plot {path}: not writable"
    return None


def _machine() -> str:
    cpus = os.cpu_count() or "?"
    return (
        f"{platform.python_implementation()} {platform.python_version()},"
        f" {platform.system()} {platform.machine()}, {cpus} CPUs"
    )


def plot(report: dict[str, Any], path: str) -> None:
    """Save a chart of the report's figures to `path` (needs matplotlib; see check_plot_path).

    One panel per figure (queries per page, time per page, requests/s, the database's
    queries/s under load, p99), the settings and the machine under the title, and, when
    the report has a load sweep (``report["sweep"]``), batch calls per request and p50
    latency against threads.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = report["modes"]
    s = report["settings"]
    panels = [
        ("queries per page", "queries_per_page"),
        ("time per page, 1 thread (ms)", "single_page_ms"),
        (f"requests/s, {s['threads']} threads", "requests_per_s"),
        (f"database queries/s, {s['threads']} threads", "queries_per_s"),
        (f"p99 latency, {s['threads']} threads (ms)", "p99_ms"),
    ]
    sweep = report.get("sweep")
    columns = len(panels) + (2 if sweep else 0)
    fig, axes = plt.subplots(1, columns, figsize=(3.2 * columns, 4.0))
    for ax, (title, field) in zip(axes, panels, strict=False):
        values = [modes[m][field] for m in MODES]
        bars = ax.bar(MODES, values, color=COLORS)
        ax.bar_label(bars, fmt="%.4g", fontsize=8)
        positive = [v for v in values if v > 0]
        if positive and max(positive) >= LOG_RATIO * min(positive):
            ax.set_yscale("log")
            title += " (log)"
        ax.set_title(title, fontsize=9)
    if sweep:
        calls_ax, p50_ax = axes[len(panels)], axes[len(panels) + 1]
        for design, style in (("batchsync", "o-"), ("fixed window", "s--")):
            rows = sweep[design]
            threads = [row["threads"] for row in rows]
            calls_ax.plot(threads, [row["calls_per_request"] for row in rows], style, label=design)
            p50_ax.plot(threads, [row["p50_ms"] for row in rows], style, label=design)
        for ax, title in (
            (calls_ax, "load sweep: batch calls per request"),
            (p50_ax, "load sweep: p50 per request (ms)"),
        ):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("threads")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        calls_ax.set_yscale("log")
    network = f"simulated +{s['rtt_ms']:g} ms RTT" if s["rtt_simulated"] else "no added RTT"
    if s.get("pooler"):
        network += f", through {s['pooler']}"
    fig.suptitle(f"batchsync N+1 demo ({network})", fontsize=12)
    settings = (
        f"{s['threads']} threads x {s['seconds']:g} s per mode; pool {s['pool_size']};"
        f" window {s['window_s'] * 1000:g} ms, max_concurrency {s['max_concurrency']};"
        f" PostgreSQL {s.get('server_version', '?')}; queries counted by"
        f" {s.get('query_count_source', '?')}; {_machine()}"
    )
    fig.text(0.5, 0.90, settings, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(path, dpi=100)
    plt.close(fig)
