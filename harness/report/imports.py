"""Heavy optional packages imported from background threads, one thread at a time.

CPython makes each module's import thread-safe, but two threads importing large packages that share modules
(wandb and matplotlib both pull in PIL, packaging and more) can run into each other's partially initialized
modules through circular imports: "cannot import name ... (most likely due to a circular import)". This was seen
once, in a fresh virtual environment without bytecode caches, where imports are slow and the window is wide: the
W&B warmup thread and the plot worker were importing at the same time. The background workers
(:mod:`harness.report.wandb_logger`'s warmup, :class:`harness.report.plots.BackgroundPlots`) take this lock around
their imports.
"""

from __future__ import annotations

import threading

BACKGROUND_IMPORT_LOCK = threading.RLock()


def matplotlib_pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display), imported under the lock."""
    with BACKGROUND_IMPORT_LOCK:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    return plt
