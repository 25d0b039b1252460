"""``harness sync DIR...``: upload every offline W&B run below some directories with one ``wandb sync``.

Runs log offline by default (no account or network needed while diagnosing), and a sweep leaves many offline runs:
one per point plus one per sweep member. A shell loop ``for d in .../offline-run-*; do wandb sync $d; done`` pays
the ``wandb`` start-up (about 1.4 s per run on a 2-core machine, measured) and uploads one run at a time. Since
wandb 0.30, ``wandb sync`` takes many run directories and uploads them concurrently (``-n``, wandb's
``cli/beta_sync.py``), so this command finds the runs and makes a single call: one start-up for the whole sweep.

Runs already uploaded (wandb leaves a ``.wandb.synced`` marker) are skipped unless ``--include-synced``.
``--dry-run`` lists the runs and the command without touching the network.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import shlex
import subprocess
import sys
import time

from harness.errors import HarnessError
from harness.sweeps.runs import natural_key

OFFLINE_PREFIX = "offline-run-"
# Never holds W&B runs (Hydra/submitit bookkeeping, plots); a run's own files/ and logs/ are not walked either.
SKIP_DIRS = {".hydra", ".submitit", ".groups", "plots", "__pycache__", ".git"}
# Paths per wandb invocation: far below any ARG_MAX, and still one start-up per thousand runs.
MAX_PATHS_PER_CALL = 1000


@dataclasses.dataclass
class OfflineRun:
    dir: str
    files: list[str]  # the run's .wandb transaction logs (a resumed run has several)
    synced: bool  # every file has wandb's .synced marker

    @property
    def run_id(self) -> str:
        return os.path.basename(self.dir).rsplit("-", 1)[-1]

    @property
    def size(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)


def _offline_run(path: str) -> OfflineRun | None:
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.wandb")))
    if not files:
        return None
    synced = all(os.path.exists(f + ".synced") for f in files)
    return OfflineRun(os.path.abspath(path), files, synced)


def find_offline_runs(paths: list[str]) -> list[OfflineRun]:
    """Every offline run directory (``offline-run-*`` holding a ``.wandb`` file) at or below ``paths``."""
    found: dict[str, OfflineRun] = {}
    for path in paths:
        if not os.path.isdir(path):
            raise HarnessError(f"{path}: no such directory")
        if os.path.basename(os.path.normpath(path)).startswith(OFFLINE_PREFIX):
            run = _offline_run(path)
            if run is None:
                raise HarnessError(f"{path}: an offline run directory without a .wandb file")
            found[run.dir] = run
            continue
        for root, dirs, _ in os.walk(path):
            keep = []
            for d in dirs:
                if d.startswith(OFFLINE_PREFIX):
                    run = _offline_run(os.path.join(root, d))
                    if run is not None:
                        found[run.dir] = run
                elif d not in SKIP_DIRS and not (os.path.basename(root) == "wandb" and d.startswith("run-")):
                    keep.append(d)  # online runs (wandb/run-*) were uploaded as they ran
            dirs[:] = keep
    return sorted(found.values(), key=lambda r: natural_key(r.dir))


def wandb_base(*, jobs: int | None = None, project: str | None = None, entity: str | None = None,
               include_synced: bool = False) -> list[str]:
    """``wandb sync`` and its options, before the run directories."""
    base = [sys.executable, "-m", "wandb", "sync"]  # this environment's wandb, whatever is first on PATH
    if jobs:
        base += ["-n", str(jobs)]
    if project:
        base += ["--project", project]
    if entity:
        base += ["--entity", entity]
    if include_synced:
        base += ["--include-synced"]
    return base


def wandb_commands(runs: list[OfflineRun], **options) -> list[list[str]]:
    """The ``wandb sync`` invocations for ``runs``: one per :data:`MAX_PATHS_PER_CALL` runs."""
    base = wandb_base(**options)
    dirs = [r.dir for r in runs]
    return [base + dirs[i:i + MAX_PATHS_PER_CALL] for i in range(0, len(dirs), MAX_PATHS_PER_CALL)]


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness sync",
                                description="Upload every offline W&B run below the given directories with one "
                                            "`wandb sync` call.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run, sweep or wandb directories")
    p.add_argument("--dry-run", action="store_true", help="list the runs and the command; upload nothing")
    p.add_argument("-n", "--jobs", type=int, metavar="N", help="runs uploaded at a time (wandb's default: 5)")
    p.add_argument("--project", help="upload into this W&B project instead of each run's own")
    p.add_argument("--entity", help="upload under this W&B entity instead of each run's own")
    p.add_argument("--include-synced", action="store_true", help="upload runs already marked as synced again")
    return p


def main(args: list[str]) -> int:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from harness.sweeps.runs import make_console

    opts = parser().parse_args(args)
    if opts.jobs is not None and opts.jobs < 1:
        raise HarnessError(f"--jobs must be at least 1, got {opts.jobs}")
    console = make_console()
    runs = find_offline_runs(opts.dirs)
    pending = [r for r in runs if opts.include_synced or not r.synced]
    skipped = len(runs) - len(pending)
    note = f" ({skipped} already synced, skipped; --include-synced to upload again)" if skipped else ""
    if not pending:
        console.print(f"nothing to sync: {len(runs)} offline W&B runs below {escape(', '.join(opts.dirs))}{note}")
        return 0
    options = dict(jobs=opts.jobs, project=opts.project, entity=opts.entity, include_synced=opts.include_synced)
    commands = wandb_commands(pending, **options)
    if opts.dry_run:
        table = Table(title=f"would sync {len(pending)} offline W&B runs{note}")
        for col in ("run", "id", "size"):
            table.add_column(col, overflow="fold")
        cwd = os.getcwd()
        for r in pending:
            table.add_row(Text(os.path.relpath(r.dir, cwd)), Text(r.run_id), _size(r.size))
        console.print(table)
        console.print(f"command: {escape(shlex.join(wandb_base(**options)))} <{len(pending)} run directories>"
                      + (f" (in {len(commands)} calls)" if len(commands) > 1 else ""), soft_wrap=True)
        return 0
    console.print(f"syncing {len(pending)} offline W&B runs with {len(commands)} `wandb sync` call(s){note}")
    start = time.perf_counter()
    for command in commands:
        try:
            code = subprocess.run(command).returncode
        except OSError as err:
            raise HarnessError(f"cannot run wandb: {err}") from None
        if code != 0:
            console.print(f"[red]wandb sync failed (exit {code}); see its message above. `harness sync --dry-run` "
                          f"lists the runs without uploading.[/]")
            return 1
    console.print(f"synced {len(pending)} runs in {time.perf_counter() - start:.1f} s")
    return 0
