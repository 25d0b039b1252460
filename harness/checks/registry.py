"""Diagnostics by name, in the checklist's order (data -> model -> training -> hyperparameters).

Each module exposes a frozen ``Settings`` dataclass (its config is ``diagnostics.<name>``, file
``harness/conf/diagnostics/<name>/default.yaml``) and ``run(ctx, settings) -> Outcome``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from harness.errors import HarnessError

# name -> (module, checklist stage). Order matters: later diagnostics use what earlier ones share
# (seeds gives the noise floor that controls, lr_range and capacity compare against).
DIAGNOSTICS: dict[str, tuple[str, str]] = {
    "data": ("harness.checks.data", "data"),
    "model": ("harness.checks.model", "model"),
    "overfit_batch": ("harness.checks.training.overfit_batch", "training"),
    "seeds": ("harness.checks.training.seeds", "training"),
    "precision": ("harness.checks.training.precision", "training"),
    "controls": ("harness.checks.training.controls", "training"),
    "lr_range": ("harness.checks.training.lr_range", "hyperparameters"),
    "capacity": ("harness.checks.training.capacity", "hyperparameters"),
}


def diagnostic_module(name: str) -> ModuleType:
    if name not in DIAGNOSTICS:
        raise HarnessError(f"unknown diagnostic {name!r}; valid: {', '.join(DIAGNOSTICS)}", key="diagnostics.run")
    return importlib.import_module(DIAGNOSTICS[name][0])


def stage(name: str) -> str:
    return DIAGNOSTICS[name][1]


def announced(ctx, settings: dict) -> dict[str, list]:
    """The training requests (:class:`harness.engine.table.Request`) each diagnostic in ``settings`` (name ->
    its Settings) announces through its ``requests(ctx, settings)``: none where it announces nothing, or fails to
    (the diagnostic will meet, and report, the same problem when it runs)."""
    out = {}
    for name, s in settings.items():
        announce = getattr(diagnostic_module(name), "requests", None)
        try:
            out[name] = [] if announce is None else list(announce(ctx, s))
        except Exception:  # noqa: BLE001
            out[name] = []
    return out
