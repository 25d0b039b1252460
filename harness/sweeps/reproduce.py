"""``harness reproduce RUN_DIR``: rerun a finished run from its report.json and say whether the numbers match.

The report stores the full resolved config, the command and the environment (package versions, backend, device
kind and count, git revision, the XLA/JAX variables). The rerun validates that config again
(:func:`harness.config.from_hydra`) and runs the same diagnostics in this process into a fresh directory, then
compares every metric and every curve:

* **bitwise** (exact equality) when the environment is the same: same versions, backend, device kind and count,
  git revision and numerics-relevant variables. A compiled XLA program rerun on the same inputs and devices is
  deterministic (see ../shared/ECOSYSTEM.md: reruns of one program are bitwise identical on CPU), so any
  difference is a real change: code, data, or a nondeterministic input pipeline.
* **within tolerance** otherwise (``|a - b| <= atol + rtol * |b|``, numpy's ``allclose`` rule; rtol 1e-3 by
  default, the float32 noise of a different vmap width or device layout), with a warning naming what differs.

Exit 0 when everything matches, 1 when something does not (a table lists the mismatches), 2 for bad input. The
verdict is also written to ``reproduction.json`` beside the rerun's report.
W&B logging is off for the rerun unless ``--wandb``: a reproduction should not add runs to the project.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
from typing import Any

from harness.errors import HarnessError
from harness.sweeps.runs import REPORT, find_reports, load_report

# Metrics that say how a run went rather than what it computed: a harness train run resumed from a checkpoint
# computes bitwise what the uninterrupted run does.
BOOKKEEPING = ("resumed_from_step", "interrupted")
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-6
# Environment entries that can change the numbers; the others (cwd, interpreter path, W&B mode, cache directory)
# are shown when they differ but do not demand a tolerance.
NUMERIC_ENV_KEYS = ("versions", "backend", "device_kind", "device_count", "git_revision", "harness_git_revision")
NUMERIC_ENV_VARS = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "JAX_DEFAULT_MATMUL_PRECISION",
                    "CUDA_VISIBLE_DEVICES")


# ----------------------------------------------------------------------------------------------------------------
# The environment


def environment_differences(original: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any, bool]]:
    """``(what, original, now, affects_numbers)`` for every environment entry that differs."""
    out = []
    keys = list(dict.fromkeys([*NUMERIC_ENV_KEYS, *original, *current]))
    for key in keys:
        a, b = original.get(key), current.get(key)
        if key == "versions":
            for pkg in dict.fromkeys([*(a or {}), *(b or {})]):
                va, vb = (a or {}).get(pkg), (b or {}).get(pkg)
                if va != vb:
                    out.append((f"{pkg} version", va, vb, True))
        elif key == "env":
            for var in dict.fromkeys([*(a or {}), *(b or {})]):
                va, vb = (a or {}).get(var), (b or {}).get(var)
                if va != vb:
                    out.append((f"${var}", va, vb, var in NUMERIC_ENV_VARS))
        elif a != b:
            out.append((key.replace("_", " "), a, b, key in NUMERIC_ENV_KEYS))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Comparing numbers


@dataclasses.dataclass
class Mismatch:
    key: str
    original: Any
    rerun: Any
    count: int = 1  # differing elements (a curve counts each step)
    total: int = 1
    max_abs: float | None = None
    max_rel: float | None = None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def values_match(a: Any, b: Any, *, exact: bool, rtol: float, atol: float) -> bool:
    """One leaf: numbers bitwise or within tolerance; anything else (booleans, strings such as 'nan' or a
    verdict, None) must be equal."""
    if _number(a) and _number(b):
        if exact:
            return a == b
        if math.isinf(a) or math.isinf(b):
            return a == b
        return abs(a - b) <= atol + rtol * abs(b)
    return a == b and type(a) is type(b)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested dicts and lists under slash/bracket paths: ``{"a": [{"b": 1}]}`` -> ``{"a[0]/b": 1}``."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        if not obj:
            out[prefix] = []
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


def _group(path: str) -> str:
    """The curve a leaf belongs to: its path without list indices (``seeds/series/loss[3][17]`` -> ``.../loss``)."""
    import re

    return re.sub(r"\[\d+\]", "", path)


def compared_leaves(report: dict[str, Any]) -> dict[str, Any]:
    """What a reproduction must reproduce: status, finding ids, every flat metric, every diagnostic's curves and
    member rows. Timings are left out: they are never equal."""
    leaves = {"status": report.get("status"),
              "findings": sorted(f"{f.get('severity')}:{f.get('id')}" for f in report.get("findings", []))}
    leaves["findings"] = " ".join(leaves["findings"]) or "(none)"
    for key, value in (report.get("metrics") or {}).items():
        if key.rsplit("/", 1)[-1] not in BOOKKEEPING:
            leaves.update(flatten(value, f"metrics/{key}"))
    for name, diag in (report.get("diagnostics") or {}).items():
        for part in ("series", "members"):
            if diag.get(part):
                leaves.update(flatten(diag[part], f"{name}/{part}"))
        if diag.get("skipped") is not None:
            leaves[f"{name}/skipped"] = diag["skipped"]
    return leaves


def compare_reports(original: dict, rerun: dict, *, exact: bool, rtol: float = DEFAULT_RTOL,
                    atol: float = DEFAULT_ATOL) -> tuple[int, list[Mismatch]]:
    """(number of leaves compared, mismatches grouped per metric or curve)."""
    a, b = compared_leaves(original), compared_leaves(rerun)
    groups: dict[str, Mismatch] = {}
    totals: dict[str, int] = {}
    for path in dict.fromkeys([*a, *b]):
        group = _group(path)
        totals[group] = totals.get(group, 0) + 1
        if path not in a or path not in b:
            m = groups.setdefault(group, Mismatch(group, a.get(path, "(missing)"), b.get(path, "(missing)"), 0))
            m.count += 1
            continue
        va, vb = a[path], b[path]
        if values_match(va, vb, exact=exact, rtol=rtol, atol=atol):
            continue
        m = groups.setdefault(group, Mismatch(group, va, vb, 0))
        m.count += 1
        if _number(va) and _number(vb) and math.isfinite(va) and math.isfinite(vb):
            diff = abs(va - vb)
            rel = diff / abs(vb) if vb else math.inf
            if m.max_abs is None or diff > m.max_abs:
                m.max_abs, m.original, m.rerun = diff, va, vb  # show the worst element
            m.max_rel = rel if m.max_rel is None else max(m.max_rel, rel)
    for m in groups.values():
        m.total = totals[m.key]
    return len(a.keys() | b.keys()), list(groups.values())


# ----------------------------------------------------------------------------------------------------------------
# Rerunning


def locate_report(run_dir: str) -> str:
    """The run's report.json; a sweep directory (many reports) is an error listing how to pick one."""
    if os.path.isfile(run_dir) and os.path.basename(run_dir) == REPORT:
        return run_dir
    path = os.path.join(run_dir, REPORT)
    if os.path.isfile(path):
        return path
    reports = find_reports([run_dir])  # raises for a missing directory or one with no report below
    if len(reports) == 1:
        return reports[0]
    examples = ", ".join(os.path.relpath(os.path.dirname(r)) for r in reports[:3])
    raise HarnessError(f"{run_dir}: holds {len(reports)} runs; reproduce one of them, e.g. {examples}")


def rerun_config(report: dict[str, Any], path: str, *, wandb: bool):
    """The stored config as a validated RunConfig (the logger switched off unless ``wandb``)."""
    from omegaconf import OmegaConf

    from harness.config import from_hydra

    config = report.get("config")
    if not isinstance(config, dict) or not config:
        raise HarnessError(f"{path}: has no stored config to rerun (written by an older harness?)")
    config = json.loads(json.dumps(config))  # a private copy
    config.pop("output_dir", None)
    if not wandb:
        config["logger"] = {**(config.get("logger") or {}), "kind": "none"}
    return from_hydra(OmegaConf.create(config), report.get("choices") or {})


def _importable_from(cwd: str | None):
    """The original run imported the user's factories from its working directory (``python -m`` puts it on the
    path); make the same modules importable when reproducing from elsewhere."""
    if cwd and os.path.isdir(cwd) and os.path.abspath(cwd) != os.getcwd() and cwd not in sys.path:
        sys.path.append(cwd)


def default_out_dir() -> str:
    now = datetime.datetime.now()
    return os.path.join("outputs", "reproduce", now.strftime("%Y-%m-%d"), now.strftime("%H-%M-%S"))


@dataclasses.dataclass
class Outcome:
    exact: bool
    compared: int
    mismatches: list[Mismatch]
    differences: list[tuple[str, Any, Any, bool]]
    out_dir: str
    rtol: float
    atol: float

    @property
    def matched(self) -> bool:
        return not self.mismatches


def reproduce(run_dir: str, *, out_dir: str | None = None, mode: str = "auto", rtol: float = DEFAULT_RTOL,
              atol: float = DEFAULT_ATOL, wandb: bool = False, console=None) -> Outcome:
    from harness.sweeps.distributed import setup_process

    path = locate_report(run_dir)
    original = load_report(path)
    config = original.get("config") or {}
    # The rerun is one process whatever the original was; the GPU memory policy still applies.
    setup_process({**(config.get("engine") or {}), "distributed": False})
    _importable_from((original.get("environment") or {}).get("cwd"))
    rc = rerun_config(original, path, wandb=wandb)

    from harness.app import run_and_report
    from harness.report.environment import environment

    differences = environment_differences(original.get("environment") or {}, environment())
    exact = {"bitwise": True, "tolerance": False}.get(mode, not any(d[3] for d in differences))
    out_dir = out_dir or default_out_dir()
    if os.path.exists(os.path.join(out_dir, REPORT)):
        raise HarnessError(f"--out {out_dir}: already holds a report; choose a fresh directory")
    if (original.get("command") or [])[1:2] == ["train"]:  # a harness train run: train it again
        from harness.train.run import train

        train(rc, out_dir, command=["harness", "reproduce", run_dir], console=console)
    else:
        run_and_report(rc, out_dir, command=["harness", "reproduce", run_dir], console=console)
    rerun = load_report(os.path.join(out_dir, REPORT))
    compared, mismatches = compare_reports(original, rerun, exact=exact, rtol=rtol, atol=atol)
    outcome = Outcome(exact, compared, mismatches, differences, out_dir, rtol, atol)
    write_summary(outcome, os.path.abspath(os.path.dirname(path)))
    return outcome


def write_summary(outcome: Outcome, original_dir: str) -> str:
    """``reproduction.json`` beside the rerun's report: the verdict for CI and for a later look."""
    from harness.report.writer import atomic_write

    summary = {
        "original": original_dir,
        "matched": outcome.matched,
        "rule": "bitwise" if outcome.exact else {"rtol": outcome.rtol, "atol": outcome.atol},
        "compared": outcome.compared,
        "mismatches": [dataclasses.asdict(m) for m in outcome.mismatches],
        "environment_differences": [{"what": w, "original": a, "now": b, "affects_numbers": n}
                                    for w, a, b, n in outcome.differences],
    }
    path = os.path.join(outcome.out_dir, "reproduction.json")
    atomic_write(path, json.dumps(summary, indent=2, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Output


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v) if v == v else "nan"  # repr: every digit, so a bitwise difference is visible
    text = str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def print_outcome(console, outcome: Outcome, run_dir: str):
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    def shown(v):
        return "(unset)" if v is None else '""' if v == "" else v

    for what, a, b, numeric in outcome.differences:
        label = "[yellow]warning" if numeric else "[dim]note"  # notes: differences that cannot change numbers
        console.print(f"{label}: {escape(f'{what} differs: {shown(a)} (original) -> {shown(b)} (now)')}[/]",
                      soft_wrap=True)
    rule = "bitwise" if outcome.exact else f"within rtol={outcome.rtol:g}, atol={outcome.atol:g}"
    if outcome.mismatches:
        t = Table(title=f"mismatches ({rule})")
        for col in ("metric or curve", "original", "rerun", "differing", "max |diff|", "max rel diff"):
            t.add_column(col, overflow="fold", justify="right" if col.startswith(("max", "diff")) else "left")
        for m in outcome.mismatches:
            t.add_row(Text(m.key), Text(_fmt(m.original)), Text(_fmt(m.rerun)), f"{m.count}/{m.total}",
                      "–" if m.max_abs is None else f"{m.max_abs:.3g}",
                      "–" if m.max_rel is None else f"{m.max_rel:.3g}")
        console.print(t)
        n = len(outcome.mismatches)
        what = "metric or curve differs" if n == 1 else "metrics or curves differ"
        console.print(f"[bold red]not reproduced[/]: {n} {what} ({rule}) out of {outcome.compared} values "
                      f"compared; rerun in {escape(outcome.out_dir)}")
    else:
        why = "same environment" if outcome.exact and not any(d[3] for d in outcome.differences) else (
            "environment differs" if not outcome.exact else "forced")
        console.print(f"[bold green]reproduced[/]: all {outcome.compared} values match {rule} ({why}); "
                      f"rerun in {escape(outcome.out_dir)}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness reproduce",
                                description="Rerun a finished run from its report.json and check the numbers match.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holding report.json)")
    p.add_argument("--out", metavar="DIR", help="where the rerun writes (default outputs/reproduce/<date>/<time>)")
    p.add_argument("--mode", choices=("auto", "bitwise", "tolerance"), default="auto",
                   help="auto: bitwise when the environment is the same, else within tolerance")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"relative tolerance (default {DEFAULT_RTOL:g})")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"absolute tolerance (default {DEFAULT_ATOL:g})")
    p.add_argument("--wandb", action="store_true", help="log the rerun to W&B as its config says (default: off)")
    return p


def main(args: list[str]) -> int:
    from harness.sweeps.runs import make_console

    opts = parser().parse_args(args)
    if opts.rtol < 0 or opts.atol < 0:
        raise HarnessError("--rtol and --atol must be zero or more")
    console = make_console()
    outcome = reproduce(opts.run_dir, out_dir=opts.out, mode=opts.mode, rtol=opts.rtol, atol=opts.atol,
                        wandb=opts.wandb, console=console)
    print_outcome(console, outcome, opts.run_dir)
    return 0 if outcome.matched else 1
