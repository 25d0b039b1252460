"""PNG plots for report.md and W&B, drawn after the compiled work (matplotlib, Agg backend)."""

from __future__ import annotations

import os
import sys


def draw_all(outcomes, output_dir: str) -> dict[str, str]:
    """Draw every diagnostic's plots into ``output_dir/plots``; returns name -> relative path. A plot that fails to
    draw is skipped with a warning: plots never cost the report."""
    import matplotlib

    matplotlib.use("Agg")
    files = {}
    plot_dir = os.path.join(output_dir, "plots")
    for outcome in outcomes:
        for plot in outcome.plots:
            os.makedirs(plot_dir, exist_ok=True)
            path = os.path.join(plot_dir, f"{plot.name}.png")
            try:
                plot.draw(path)
                files[plot.name] = os.path.relpath(path, output_dir)
            except Exception as err:
                print(f"harness: warning: plot {plot.name} failed: {err}", file=sys.stderr)
            finally:
                import matplotlib.pyplot as plt

                plt.close("all")
    return files
