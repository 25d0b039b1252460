"""report.json and report.md, written atomically into the run directory."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from harness.engine.compile import STATS
from harness.findings import checklist_order, first_to_fix, to_jsonable
from harness.pipeline import RunResult, flat_metrics


def atomic_write(path: str, text: str):
    """Write then rename, so a killed run never leaves a half-written report behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def build_report(result: RunResult, *, config: dict, command: list[str], environment: dict,
                 plots: dict[str, str] | None = None) -> dict[str, Any]:
    first = first_to_fix(result.findings)
    return to_jsonable({
        "status": result.status,
        "first_to_fix": first.to_dict() if first else None,
        "findings": [f.to_dict() for f in checklist_order(result.findings)],
        "metrics": flat_metrics(result.outcomes),
        "diagnostics": {
            o.name: {"seconds": round(o.seconds, 3), "skipped": o.skipped, "metrics": o.metrics,
                     "series": o.series, "members": o.members}
            for o in result.outcomes
        },
        "programs": {"compiles": STATS.compiles, "compile_seconds": round(STATS.compile_seconds, 3),
                     "run_seconds": round(STATS.run_seconds, 3), "by_program": STATS.by_program},
        "plots": plots or {},
        "seconds": round(result.seconds, 3),
        "config": config,
        "command": command,
        "environment": environment,
    })


def write_json(report: dict, output_dir: str) -> str:
    path = os.path.join(output_dir, "report.json")
    atomic_write(path, json.dumps(report, indent=2, allow_nan=False, default=str))
    return path


def write_markdown(report: dict, output_dir: str) -> str:
    lines = [f"# harness report: {report['status']}", ""]
    first = report.get("first_to_fix")
    if first:
        lines += [f"**First to fix:** `{first['id']}`: {first['message']}", ""]
        if first["suggestion"]:
            lines += [f"Fix: {first['suggestion']}", ""]
    lines += ["## Findings", ""]
    if not report["findings"]:
        lines += ["No findings.", ""]
    for f in report["findings"]:
        lines += [f"- **{f['severity']}** `{f['id']}`: {f['message']}"]
        if f["suggestion"]:
            lines += [f"  - fix: {f['suggestion']}"]
        if f["evidence"]:
            lines += [f"  - evidence: `{json.dumps(f['evidence'], default=str)[:800]}`"]
    lines += [""]
    for name, path in report.get("plots", {}).items():
        lines += [f"![{name}]({path})", ""]
    path = os.path.join(output_dir, "report.md")
    atomic_write(path, "\n".join(lines))
    return path
