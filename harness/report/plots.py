"""PNG plots for report.md and W&B, drawn after the compiled work (matplotlib, Agg backend).

Diagnostics supply :class:`harness.checks.base.Plot` objects whose ``draw(path)`` writes a PNG. Drawing is
defensive: a plot that raises, or writes nothing, costs a one-line warning and that plot only, never the report;
a draw function that builds a figure but forgets to save it still gets its figure saved. Each PNG is written to a
temporary name and renamed, so a killed run leaves no truncated images.
"""

from __future__ import annotations

import os
import re
import sys

PLOT_DIR = "plots"
# A house style applied around every draw: readable at report.md's width, a light grid, no clipped labels.
STYLE = {
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 100,
    "savefig.dpi": 110,
    "savefig.bbox": "tight",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def safe_name(text: str) -> str:
    """A file-name-safe version of a plot or diagnostic name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "plot"


def _draw_one(plot, path: str) -> None:
    """Draw ``plot`` into ``path`` atomically; raises if nothing usable was written."""
    import matplotlib.pyplot as plt

    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    try:
        plot.draw(tmp)
        if not (os.path.exists(tmp) and os.path.getsize(tmp) > 0):
            if not plt.get_fignums():
                raise RuntimeError("the draw function wrote no file and left no figure")
            plt.gcf().savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def draw_all(outcomes, output_dir: str, *, warn=None) -> dict[str, dict[str, str]]:
    """Draw every diagnostic's plots into ``output_dir/plots``.

    Returns ``{"<diagnostic>/<plot name>": {"diagnostic", "name", "title", "path"}}`` with ``path`` relative to
    ``output_dir`` (what report.md links and report.json records), in the diagnostics' order.
    """
    files: dict[str, dict[str, str]] = {}
    for outcome in outcomes:
        draw_outcome(outcome, output_dir, files, warn=warn)
    return files


def draw_outcome(outcome, output_dir: str, files: dict[str, dict[str, str]], *, warn=None) -> None:
    """Draw one diagnostic's plots, adding their entries to ``files`` (see :func:`draw_all`)."""
    if not outcome.plots:
        return  # no matplotlib import (about 0.3 s) when there is nothing to draw
    from harness.report.imports import matplotlib_pyplot

    plt = matplotlib_pyplot()

    warn = warn or (lambda message: print(f"harness: warning: {message}", file=sys.stderr))
    os.makedirs(os.path.join(output_dir, PLOT_DIR), exist_ok=True)
    for plot in outcome.plots:
        key = f"{outcome.name}/{plot.name}"
        stem = f"{safe_name(outcome.name)}-{safe_name(plot.name)}"
        n = 1
        while key in files or any(f["path"] == os.path.join(PLOT_DIR, stem + ".png") for f in files.values()):
            n += 1
            key, stem = f"{outcome.name}/{plot.name}#{n}", f"{safe_name(outcome.name)}-{safe_name(plot.name)}-{n}"
        relative = os.path.join(PLOT_DIR, stem + ".png")
        try:
            with plt.rc_context(STYLE):
                _draw_one(plot, os.path.join(output_dir, relative))
            files[key] = {"diagnostic": outcome.name, "name": plot.name, "title": plot.title or plot.name,
                          "path": relative}
        except Exception as err:  # a broken plot costs that plot only
            warn(f"plot {key!r} could not be drawn ({type(err).__name__}: {err}); the report is complete "
                 f"without it")
        finally:
            plt.close("all")


class BackgroundPlots:
    """Draws each diagnostic's plots in one worker thread as soon as the diagnostic finishes, while the next
    diagnostic computes (drawing the default suite's nine PNGs costs about 2 s of Python; the compiled programs
    release the GIL). A collapsed sweep sends every point's outcomes, each with the point's own directory. Only
    this thread touches pyplot while it runs. ``close()`` waits for the queue; ``files(outcomes, output_dir)`` then
    returns what :func:`draw_all` would have, in the diagnostics' order, whatever order the outcomes arrived in
    (an outcome never submitted is drawn then).
    """

    def __init__(self, *, warn=None):
        import queue
        import threading

        self.warn = warn
        self._queue: queue.Queue = queue.Queue()
        self._files: dict[str, dict[str, dict[str, str]]] = {}  # output_dir -> key -> file entry
        self._drawn: dict[tuple[str, str], list[str]] = {}  # (output_dir, diagnostic) -> its keys
        self._thread = threading.Thread(target=self._work, name="harness-plots", daemon=True)
        self._thread.start()

    def submit(self, outcome, output_dir: str) -> None:
        self._queue.put((outcome, output_dir))

    def _work(self):
        while (item := self._queue.get()) is not None:
            outcome, output_dir = item
            self._draw(outcome, output_dir)

    def _draw(self, outcome, output_dir: str):
        files = self._files.setdefault(output_dir, {})
        before = set(files)
        try:
            draw_outcome(outcome, output_dir, files, warn=self.warn)
        except Exception as err:  # e.g. matplotlib missing a font: the report goes on without plots
            (self.warn or print)(f"plots of {outcome.name!r} could not be drawn ({type(err).__name__}: {err})")
        self._drawn[(output_dir, outcome.name)] = [k for k in files if k not in before]

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def files(self, outcomes, output_dir: str) -> dict[str, dict[str, str]]:
        self.close()
        for outcome in outcomes:
            if (output_dir, outcome.name) not in self._drawn:  # never submitted: draw it now
                self._draw(outcome, output_dir)
        drawn = self._files.get(output_dir, {})
        return {k: drawn[k] for o in outcomes for k in self._drawn[(output_dir, o.name)]}
