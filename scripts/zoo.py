#!/usr/bin/env python
"""Run the planted-bug zoo (zoo/setups.py) through the harness CLI and score the reports.

Each setup's config groups are written as YAML files into ``<out>/<setup>/conf/<group>/<setup>.yaml`` and the real
CLI runs on them in a subprocess from the repository root, as a user runs it on their own project:

    python -m harness --config-dir <out>/<setup>/conf model=<setup> data=<setup> loss=... optim=... \\
        logger=none output_dir=<out>/<setup> hydra.run.dir=<out>/<setup> [setup overrides] [extra overrides]

Then every ``report.json`` is scored:

* **detection rate**: bugs for which a finding the setup expects (``Setup.expected``) is reported at warning or
  error level;
* **right-headline rate**: bugs whose ``first_to_fix`` id is one the setup accepts (``Setup.headline``: the cause);
* **false-alarm rate**: healthy setups with at least one error finding (healthy setups with warnings are shown too).

A crash is never a detection: internal errors (a diagnostic that crashed, a run that ended without a report, a
timeout) are counted separately. The exit code is 0 unless the runner itself fails.

Examples:

    python scripts/zoo.py --list
    python scripts/zoo.py                                   # everything, 2 setups at a time
    python scripts/zoo.py --kind healthy --workers 1
    python scripts/zoo.py --only adam_lr_3,reference -- diagnostics.seeds.steps=200
    python scripts/zoo.py --only dead_relu -- 'diagnostics.run=[data,model]'
    python scripts/zoo.py --score-only --out outputs/zoo/2026-11-30_10-00-00 --markdown zoo.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# First, even when PYTHONPATH holds it already: sys.path[0] is scripts/, where this file would shadow the package.
sys.path.insert(0, REPO)

from zoo.setups import BUG, HEALTHY, Setup, select  # noqa: E402

SERIOUS = ("warning", "error")
REPORT = "report.json"


# ----------------------------------------------------------------------------------------------------------------
# Scoring (pure: tests/test_zoo.py feeds it fake reports)


@dataclasses.dataclass
class Result:
    name: str
    kind: str
    family: str
    task: str
    description: str
    status: str  # the report's status, or what went wrong without one: no_report, timeout
    seconds: float
    rc: int | None = None
    detected: bool | None = None  # bugs only: an expected id at warning or error
    found: list[str] = dataclasses.field(default_factory=list)  # the expected ids reported (bugs)
    headline: str | None = None  # the report's first_to_fix id
    headline_severity: str | None = None
    right_headline: bool | None = None  # bugs only
    errors: int = 0
    warnings: int = 0
    error_ids: list[str] = dataclasses.field(default_factory=list)
    warning_ids: list[str] = dataclasses.field(default_factory=list)
    internal_errors: list[str] = dataclasses.field(default_factory=list)  # "diagnostic: Type: message"
    failure: str | None = None  # the run produced no usable report: why (exit code, last stderr line, timeout)
    expected: list[str] = dataclasses.field(default_factory=list)
    accepted_headlines: list[str] = dataclasses.field(default_factory=list)
    output_dir: str | None = None

    @property
    def crashed(self) -> bool:
        """An internal error: a crashed diagnostic, or no report at all."""
        return bool(self.internal_errors) or self.failure is not None


def score(setup: Setup, report: dict | None, *, seconds: float = 0.0, rc: int | None = None,
          failure: str | None = None, output_dir: str | None = None) -> Result:
    """One setup's result from its report (None when the run left none: ``failure`` says why)."""
    result = Result(setup.name, setup.kind, setup.family, setup.task, setup.description, status="no_report",
                    seconds=round(float(seconds), 1), rc=rc, expected=list(setup.expected),
                    accepted_headlines=list(setup.headline), output_dir=output_dir)
    if report is None:
        result.failure = failure or (f"no {REPORT} (exit code {rc})" if rc is not None else f"no {REPORT}")
        result.status = "timeout" if failure == "timeout" else "no_report"
    else:
        result.status = str(report.get("status", "unknown"))
        findings = [f for f in report.get("findings") or [] if isinstance(f, dict)]
        result.error_ids = list(dict.fromkeys(f.get("id") for f in findings if f.get("severity") == "error"))
        result.warning_ids = list(dict.fromkeys(f.get("id") for f in findings if f.get("severity") == "warning"))
        result.errors = sum(1 for f in findings if f.get("severity") == "error")
        result.warnings = sum(1 for f in findings if f.get("severity") == "warning")
        first = report.get("first_to_fix") or None
        if isinstance(first, dict):
            result.headline, result.headline_severity = first.get("id"), first.get("severity")
        result.internal_errors = [
            f"{e.get('diagnostic', '?')}: {e.get('type', '?')}" + (f": {e['message']}" if e.get("message") else "")
            for e in report.get("internal_errors") or []]
        reported = {f.get("id") for f in findings if f.get("severity") in SERIOUS}
        result.found = [fid for fid in setup.expected if fid in reported]
    if setup.kind == BUG:
        result.detected = bool(result.found)
        result.right_headline = result.headline is not None and result.headline in setup.headline
    return result


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def rates(results: list[Result]) -> dict[str, Any]:
    """The three rates and their counts. Every bug is in the detection and headline denominators (a bug whose run
    crashed or left no report is not detected); every healthy setup in the false-alarm one."""
    bugs = [r for r in results if r.kind == BUG]
    healthy = [r for r in results if r.kind == HEALTHY]
    detected = sum(1 for r in bugs if r.detected)
    right = sum(1 for r in bugs if r.right_headline)
    alarms = [r.name for r in healthy if r.errors > 0]
    warned = [r.name for r in healthy if r.warnings > 0]
    crashed = [r.name for r in results if r.crashed]
    return {
        "bugs": len(bugs), "healthy": len(healthy),
        "detected": detected, "detection_rate": _rate(detected, len(bugs)),
        "right_headline": right, "right_headline_rate": _rate(right, len(bugs)),
        "false_alarms": len(alarms), "false_alarm_rate": _rate(len(alarms), len(healthy)),
        "false_alarm_setups": alarms,
        "healthy_with_warnings": len(warned), "healthy_with_warnings_setups": warned,
        "internal_errors": len(crashed), "internal_error_setups": crashed,
        "missed": [r.name for r in bugs if not r.detected],
        "wrong_headline": [r.name for r in bugs if not r.right_headline],
    }


# ----------------------------------------------------------------------------------------------------------------
# Running


def write_configs(setup: Setup, conf_dir: str) -> dict[str, str]:
    """The setup's own config group files under ``conf_dir``; returns group -> path."""
    import yaml

    paths = {}
    os.makedirs(conf_dir, exist_ok=True)  # Hydra rejects a missing --config-dir (setups of built-ins write nothing)
    for group, content in setup.config_files().items():
        path = os.path.join(conf_dir, group, f"{setup.name}.yaml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"# zoo setup {setup.name} ({setup.kind}, {setup.family}, {setup.task}): {setup.description}\n")
            yaml.safe_dump(content, f, sort_keys=False)
        paths[group] = path
    return paths


def command(setup: Setup, conf_dir: str, run_dir: str, extra: list[str] = ()) -> list[str]:
    """The harness command line for one setup (run from the repository root)."""
    choices = [f"{group}={option}" for group, option in setup.group_choices().items()]
    return [sys.executable, "-m", "harness", "--config-dir", conf_dir, *choices, "logger=none",
            f"output_dir={run_dir}", f"hydra.run.dir={run_dir}", *setup.overrides, *extra]


_LIVE: dict[int, subprocess.Popen] = {}
_LIVE_LOCK = threading.Lock()


def _kill_group(proc: subprocess.Popen):
    """End a run we started, and its children, by its own process group id."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    except ProcessLookupError:
        pass


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("harness: error:")]
    return (errors or lines or [""])[-1][:300]


def load_report(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, REPORT)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_one(setup: Setup, out_root: str, extra: list[str], timeout: float) -> Result:
    run_dir = os.path.abspath(os.path.join(out_root, setup.name))
    os.makedirs(run_dir, exist_ok=True)
    stale = os.path.join(run_dir, REPORT)
    if os.path.exists(stale):
        os.remove(stale)
    conf_dir = os.path.join(run_dir, "conf")
    write_configs(setup, conf_dir)
    cmd = command(setup, conf_dir, run_dir, extra)
    with open(os.path.join(run_dir, "command.txt"), "w") as f:
        f.write(f"cd {REPO} && " + " ".join(_quote(a) for a in cmd) + "\n")
    log_path = os.path.join(run_dir, "zoo.log")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    failure = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        with _LIVE_LOCK:
            _LIVE[proc.pid] = proc
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, failure = proc.returncode, "timeout"
        finally:
            with _LIVE_LOCK:
                _LIVE.pop(proc.pid, None)
    seconds = time.monotonic() - start
    report = load_report(run_dir)
    if report is None and failure is None:
        failure = f"no {REPORT}, exit code {rc}: {_last_line(log_path)}"
    return score(setup, report, seconds=seconds, rc=rc, failure=failure, output_dir=run_dir)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


# ----------------------------------------------------------------------------------------------------------------
# Output


COLUMNS = ("setup", "family", "task", "kind", "detected?", "headline", "right headline?", "errors", "warnings",
           "status", "seconds", "notes")


def _yes_no(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "no")


def row(r: Result) -> list[str]:
    notes = []
    if r.failure:
        notes.append(r.failure)
    if r.internal_errors:
        notes.append("internal error: " + "; ".join(r.internal_errors))
    if r.kind == BUG:
        if r.found:
            notes.append("found " + ", ".join(r.found))
        elif not r.failure:
            notes.append("expected " + " | ".join(r.expected))
        if r.found and not r.right_headline:
            notes.append("cause: " + " | ".join(r.accepted_headlines))
    elif r.error_ids:
        notes.append("errors: " + ", ".join(r.error_ids))
    elif r.warning_ids:
        notes.append("warnings: " + ", ".join(r.warning_ids))
    headline = r.headline or "—"
    if r.headline and r.headline_severity:
        headline = f"{r.headline} ({r.headline_severity})"
    return [r.name, r.family, r.task, r.kind, _yes_no(r.detected), headline, _yes_no(r.right_headline),
            str(r.errors), str(r.warnings), r.status, f"{r.seconds:.0f}", "; ".join(notes)]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def summary_lines(s: dict[str, Any]) -> list[str]:
    lines = [
        f"detection rate:      {_pct(s['detection_rate'])} ({s['detected']} of {s['bugs']} bugs: an expected "
        f"finding at warning or error)",
        f"right-headline rate: {_pct(s['right_headline_rate'])} ({s['right_headline']} of {s['bugs']} bugs: "
        f"first_to_fix is the cause)",
        f"false-alarm rate:    {_pct(s['false_alarm_rate'])} ({s['false_alarms']} of {s['healthy']} healthy "
        f"setups with an error finding" + (f": {', '.join(s['false_alarm_setups'])}" if s['false_alarm_setups']
                                           else "") + ")",
        f"healthy with warnings: {s['healthy_with_warnings']} of {s['healthy']}"
        + (f" ({', '.join(s['healthy_with_warnings_setups'])})" if s["healthy_with_warnings_setups"] else ""),
        f"internal errors:     {s['internal_errors']} setups (crashes count as neither detection nor alarm)"
        + (f": {', '.join(s['internal_error_setups'])}" if s["internal_error_setups"] else ""),
    ]
    return lines


def markdown(results: list[Result], s: dict[str, Any], meta: dict[str, Any]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rev = f" (git {meta['git']})" if meta.get("git") else ""
    out = [f"# harness planted-bug zoo, {meta['date']}{rev}", "",
           f"Command: `{meta['command']}`" + (f" (extra overrides: `{' '.join(meta['extra'])}`)"
                                              if meta["extra"] else ""), ""]
    out += [f"- {line}" for line in summary_lines(s)]
    out += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row(r)) + " |" for r in results]
    return "\n".join(out) + "\n"


def terminal_table(results: list[Result]) -> str:
    rows = [list(COLUMNS)] + [row(r) for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 5)
    return "\n".join(lines)


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]):
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Overrides after `--` go to every harness run, e.g. "
                                       "`-- diagnostics.seeds.steps=200` or `-- 'diagnostics.run=[data,model]'`.")
    p.add_argument("--workers", type=int, default=2, help="setups run at the same time (default 2)")
    p.add_argument("--only", default=None, help="comma-separated setup names")
    p.add_argument("--kind", choices=(BUG, HEALTHY), default=None, help="only bugs or only healthy setups")
    p.add_argument("--out", default=None, help="output folder (default outputs/zoo/<date>_<time>)")
    p.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file "
                                                "(always written to <out>/zoo.json)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per setup before it is killed")
    p.add_argument("--list", action="store_true", help="list the setups and exit")
    p.add_argument("--score-only", action="store_true", help="run nothing: score the reports already in --out")
    args = p.parse_args(argv)
    return args, extra


def list_setups(setups: list[Setup]) -> str:
    lines = []
    for s in setups:
        lines.append(f"{s.name:34s} {s.kind:8s} {s.family:8s} {s.task:15s} {s.description}")
        if s.kind == BUG:
            lines.append(f"{'':34s} expected: {', '.join(s.expected)}; headline: {', '.join(s.headline)}")
    bugs = sum(s.kind == BUG for s in setups)
    lines.append(f"{len(setups)} setups: {bugs} bugs, {len(setups) - bugs} healthy")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        setups = select(args.only, args.kind)
    except (KeyError, ValueError) as err:
        print(f"zoo: error: {err.args[0]}", file=sys.stderr)
        return 2
    if args.list:
        print(list_setups(setups))
        return 0
    if args.score_only and not args.out:
        print("zoo: error: --score-only needs --out", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = os.path.abspath(args.out or os.path.join(REPO, "outputs", "zoo", stamp))
    os.makedirs(out, exist_ok=True)
    results: dict[str, Result] = {}
    if args.score_only:
        for s in setups:
            run_dir = os.path.join(out, s.name)
            results[s.name] = score(s, load_report(run_dir), failure=f"no {REPORT} in {run_dir}",
                                    output_dir=run_dir)
    else:
        print(f"zoo: {len(setups)} setups, {args.workers} at a time, into {out}", flush=True)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.workers))
        futures = {pool.submit(run_one, s, out, extra, args.timeout): s for s in setups}
        try:
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                s = futures[future]
                try:
                    r = future.result()
                except Exception as err:  # the runner's own failure for this setup (unwritable dir, ...)
                    r = score(s, None, failure=f"runner: {type(err).__name__}: {err}")
                results[s.name] = r
                verdict = (f"detected={_yes_no(r.detected)} headline={r.headline or '—'}"
                           f"{' (right)' if r.right_headline else ''}" if r.kind == BUG
                           else f"errors={r.errors} warnings={r.warnings}")
                print(f"[{done}/{len(setups)}] {s.name}: {r.status}, {verdict}, {r.seconds:.0f} s"
                      + (f" -- {r.failure}" if r.failure else ""), flush=True)
        except KeyboardInterrupt:
            print("zoo: interrupted; stopping the runs in progress", file=sys.stderr)
            for f in futures:
                f.cancel()
            with _LIVE_LOCK:
                live = list(_LIVE.values())
            for proc in live:
                _kill_group(proc)
            pool.shutdown(wait=False, cancel_futures=True)
            return 130
        pool.shutdown()
    ordered = [results[s.name] for s in setups if s.name in results]
    s = rates(ordered)
    meta = {"date": datetime.date.today().isoformat(), "git": git_revision(), "out": out, "extra": extra,
            "command": "python scripts/zoo.py " + " ".join(_quote(a) for a in (sys.argv[1:] if argv is None
                                                                                else argv))}
    print()
    print(terminal_table(ordered))
    print()
    print("\n".join(summary_lines(s)))
    payload = {"meta": meta, "rates": s, "results": [dataclasses.asdict(r) for r in ordered]}
    json_paths = [os.path.join(out, "zoo.json")] + ([args.json] if args.json else [])
    for path in json_paths:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
    md = markdown(ordered, s, meta)
    with open(os.path.join(out, "zoo.md"), "w") as f:
        f.write(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    print(f"\nwritten: {', '.join(json_paths + [os.path.join(out, 'zoo.md')] + ([args.markdown] if args.markdown else []))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
