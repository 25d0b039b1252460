"""Finished runs on disk: find every report.json below some directories, read it, and recover the run's overrides.

A run directory is whatever holds a ``report.json``: a single run (``outputs/<date>/<time>``), a sweep point
(``multirun/<sweep>/<n>``), or a reproduction. ``compare`` and ``reproduce`` start here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable

from harness.errors import HarnessError

REPORT = "report.json"
# Directories that never hold a run's own report: Hydra's and submitit's bookkeeping, W&B files, plots.
SKIP_DIRS = {".hydra", ".submitit", ".groups", "wandb", "plots", "__pycache__", ".git"}


@dataclasses.dataclass
class Run:
    dir: str  # absolute path of the run directory
    report: dict[str, Any]
    overrides: list[str]  # the command-line overrides that made this run (hydra.* left out)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.report.get("metrics") or {}


def natural_key(text: str) -> list:
    """Sort key that orders ``2`` before ``10`` (sweep points are numbered directories)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_reports(paths: Iterable[str]) -> list[str]:
    """Every ``report.json`` at or below ``paths`` (files or directories), in natural order, without duplicates.

    A path that does not exist, or holds no report, is an error naming it: a typo in one of many directories
    should not silently shrink a comparison.
    """
    found: dict[str, None] = {}
    for path in paths:
        if not os.path.exists(path):
            raise HarnessError(f"{path}: no such file or directory")
        if os.path.isfile(path):
            if os.path.basename(path) != REPORT:
                raise HarnessError(f"{path}: not a {REPORT} (give a run or sweep directory)")
            found[os.path.abspath(path)] = None
            continue
        before = len(found)
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted((d for d in dirs if d not in SKIP_DIRS), key=natural_key)
            if REPORT in files:
                found[os.path.abspath(os.path.join(root, REPORT))] = None
        if len(found) == before:
            raise HarnessError(f"{path}: no {REPORT} below it (not a harness run or sweep directory, or its runs "
                               f"have not finished)")
    return sorted(found, key=natural_key)


def load_report(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            report = json.load(f)
    except OSError as err:
        raise HarnessError(f"{path}: cannot read: {err.strerror}") from None
    except ValueError as err:
        raise HarnessError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(report, dict) or "metrics" not in report:
        raise HarnessError(f"{path}: not a harness report (no 'metrics')")
    return report


def overrides_of(run_dir: str, report: dict[str, Any]) -> list[str]:
    """The run's overrides: Hydra's record (``.hydra/overrides.yaml``) when present, else the recorded command."""
    recorded = os.path.join(run_dir, ".hydra", "overrides.yaml")
    overrides: list[str] | None = None
    if os.path.isfile(recorded):
        try:
            from omegaconf import OmegaConf

            overrides = [str(o) for o in OmegaConf.load(recorded)]
        except Exception:  # unreadable: fall back to the command line
            overrides = None
    if overrides is None:
        command = report.get("command") or []
        overrides = [a for a in command[1:] if "=" in a and not a.startswith("-")]
    return [o for o in overrides if not split_override(o)[0].startswith("hydra.")]


def split_override(override: str) -> tuple[str, str]:
    """``+optim.lr=0.1`` -> ``("optim.lr", "0.1")``; a deletion ``~data`` -> ``("data", "~")``."""
    text = override.strip()
    if text.startswith("~"):
        key, _, value = text[1:].partition("=")
        return key, "~" + value
    key, _, value = text.lstrip("+").partition("=")
    return key, value


def load_runs(paths: Iterable[str]) -> list[Run]:
    runs = []
    for report_path in find_reports(paths):
        run_dir = os.path.dirname(report_path)
        report = load_report(report_path)
        runs.append(Run(run_dir, report, overrides_of(run_dir, report)))
    return runs


def make_console():
    """A rich console for the subcommands' tables: the terminal's width, or 160 columns when the output goes to a
    file or CI log (rich's 80-column default folds run paths and metric names)."""
    import sys

    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def display_names(dirs: list[str]) -> list[str]:
    """Short names for run directories: paths relative to their common parent (a sweep's points become 0, 1, ...)."""
    if len(dirs) == 1:
        return [os.path.basename(dirs[0]) or dirs[0]]
    common = os.path.commonpath(dirs)
    return [os.path.relpath(d, common) for d in dirs]
