"""report.json and report.md, written atomically into the run directory.

``report.json`` is the machine-readable record (CI, ``harness compare``, ``harness reproduce``): the status
(``healthy``, ``unhealthy``, or ``internal_error`` when a diagnostic crashed: see ``internal_errors``), the
findings in checklist order (each with the diagnostic and stage that produced it), every diagnostic's metrics,
curves and sweep members, the compiled programs' counts and times, plots, and what is needed to rerun it (the full
resolved config, the command line, the environment). ``report.md`` is the same for a person: what to fix first,
the findings by checklist stage with their evidence, the per-diagnostic summary, the plots, and how to reproduce.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from typing import Any

from harness.api import API_COMMAND  # report.json's command for a run made from Python: [it, *overrides]
from harness.engine.compile import STATS
from harness.findings import checklist_order, first_to_fix, to_jsonable
from harness.pipeline import RunResult, flat_metrics
from harness.report import format as fmt

REPORT_VERSION = 1


def atomic_write(path: str, text: str):
    """Write then rename, so a killed run never leaves a half-written report behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the permissions of an ordinary file (0666 less the umask) so
        # colleagues on a shared cluster can read the report.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _outcome_status(outcome) -> str:
    if outcome.skipped:
        return "crashed" if outcome.skipped.startswith("crashed") else "skipped"
    severities = {f.severity.value for f in outcome.findings}
    return "error" if "error" in severities else "warning" if "warning" in severities else "ok"


def _findings(result: RunResult) -> dict[int, dict[str, Any]]:
    """Every finding as a dict with the diagnostic and checklist stage it came from, in checklist order, keyed by
    the Finding object's id()."""
    source = {}
    for outcome in result.outcomes:
        for f in outcome.findings:
            source.setdefault(id(f), outcome.name)
    out = {}
    for f in checklist_order(result.findings):
        diagnostic = source.get(id(f))
        out[id(f)] = {**f.to_dict(), "diagnostic": diagnostic, "stage": fmt.stage_of(diagnostic, f.id)}
    return out


def program_mark() -> tuple:
    """Where the process's program statistics stand now, for :func:`program_stats` of what comes after."""
    return (STATS.compiles, STATS.traces_reused, STATS.compile_seconds, STATS.run_seconds,
            len(STATS.compile_intervals), {name: dict(entry) for name, entry in STATS.by_program.items()})


def program_stats(since: tuple | None = None) -> dict[str, Any]:
    """report.json's ``programs``: sums over programs and threads since ``since`` (:func:`program_mark`; None: the
    whole process). ``compile_wall_seconds``: the time anything was compiling; ``traces_reused``: compiles whose
    traced program came from the program cache (harness.engine.exported). A process that runs several checklists
    (harness.diagnose in a notebook) reports each run's own."""
    compiles, reused, compile_s, run_s, n_intervals, by_program = since or (0, 0, 0.0, 0.0, 0, {})
    intervals = type(STATS)(compile_intervals=list(STATS.compile_intervals[n_intervals:]))
    own = {}
    for name, entry in STATS.by_program.items():
        before = by_program.get(name, {})
        delta = {k: v - before.get(k, 0) for k, v in entry.items()}
        if any(delta.values()):
            own[name] = delta
    return {"compiles": STATS.compiles - compiles, "traces_reused": STATS.traces_reused - reused,
            "compile_seconds": round(STATS.compile_seconds - compile_s, 3),
            "compile_wall_seconds": round(intervals.compile_wall_seconds, 3),
            "run_seconds": round(STATS.run_seconds - run_s, 3), "by_program": own}


def build_report(result: RunResult, *, config: dict, command: list[str], environment: dict,
                 plots: dict[str, dict] | None = None, choices: dict[str, str] | None = None,
                 output_dir: str | None = None, programs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report as plain JSON-able data. ``plots`` is :func:`harness.report.plots.draw_all`'s result;
    ``programs``: :func:`program_stats` (default: the whole process's)."""
    by_finding = _findings(result)
    findings = list(by_finding.values())
    crashes = {o.name: o.internal_error for o in result.outcomes if o.internal_error is not None}
    first = first_to_fix(result.findings)
    plots = plots or {}
    return to_jsonable({
        "report_version": REPORT_VERSION,
        "status": result.status,
        "counts": fmt.counts(findings),
        "first_to_fix": by_finding[id(first)] if first is not None else None,
        # The same finding in the seeds' decision tree: what supports it, what is ruled out, fixes in order.
        "root_cause": result.root_cause.to_dict() if result.root_cause is not None else None,
        "findings": findings,
        "not_ruled_out": result.not_ruled_out,  # what the training budgets could not rule out
        "budget": result.budget,  # budget=: the measured step time, what was cut and what that costs
        # Diagnostics that crashed on something unforeseen (a bug, not a finding): the exception's type, its own
        # message and the traceback (also in harness.log).
        "internal_errors": [e.to_dict() for e in crashes.values()],
        "metrics": flat_metrics(result.outcomes),
        "diagnostics": {
            o.name: {
                "stage": fmt.stage_of(o.name, ""),
                "status": _outcome_status(o),
                "seconds": round(o.seconds, 3),
                "skipped": o.skipped,
                "internal_error": ({"type": crashes[o.name].type, "message": crashes[o.name].message}
                                   if o.name in crashes else None),
                "findings": [f.id for f in o.findings],
                "metrics": o.metrics,
                "series": o.series,
                "members": o.members,
                "plots": [k for k, p in plots.items() if p.get("diagnostic") == o.name],
            }
            for o in result.outcomes
        },
        "programs": programs if programs is not None else program_stats(),  # compiles and times (program_stats)
        "plots": plots,
        "seconds": round(result.seconds, 3),
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "output_dir": output_dir,
        "choices": choices or {},
        "config": config,
        "command": command,
        "environment": environment,
    })


def write_json(report: dict, output_dir: str) -> str:
    path = os.path.join(output_dir, "report.json")
    atomic_write(path, fmt.dumps(report) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# report.md

_SEVERITY_MARK = {"error": "❌ error", "warning": "⚠️ warning", "info": "ℹ️ info"}
_STATUS_MARK = {"ok": "✅ ok", "error": "❌ error", "warning": "⚠️ warning", "skipped": "⏭️ skipped",
                "crashed": "💥 crashed"}


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _run_line(report: dict) -> str:
    choices, config = report.get("choices") or {}, report.get("config") or {}
    parts = []
    for group in ("data", "model", "loss", "optim"):
        target = (config.get(group) or {}).get("_target_") if isinstance(config.get(group), dict) else None
        name = choices.get(group) or (str(target).rsplit(".", 1)[-1] if target else None)
        if name:
            parts.append(f"{group}={name}")
    optim = config.get("optim") or {}
    if "lr" in optim:
        parts.append(f"lr={fmt.number(optim['lr'])}")
    n = len(report["diagnostics"])
    programs = report.get("programs", {})
    parts += [fmt.plural(n, "diagnostic"), fmt.seconds(report.get("seconds")), fmt.compiles(programs)]
    return " · ".join(parts)


def _finding_md(f: dict) -> list[str]:
    lines = [f"#### {_SEVERITY_MARK.get(f['severity'], f['severity'])} `{f['id']}`", "", f["message"], ""]
    lines += [f"*{line}*" for line in fmt.causal_lines(f)] + ([""] if fmt.causal_lines(f) else [])
    if f.get("suggestion"):
        lines += [f"**Fix:** {f['suggestion']}", ""]
    items = fmt.evidence_items(f.get("evidence") or {}, max_items=20)
    if items:
        source = f" (from `{f['diagnostic']}`)" if f.get("diagnostic") else ""
        lines += [f"<details><summary>Evidence{source}</summary>", ""]
        lines += _table(["", "value"], [[f"`{k}`", v] for k, v in items])
        lines += ["</details>", ""]
    return lines


def _diagnostics_md(report: dict) -> list[str]:
    rows = []
    for name, d in report["diagnostics"].items():
        mark = _STATUS_MARK.get(d.get("status"), "").split(" ")[0]
        if d.get("skipped"):
            result = f"{mark} {d['status']}: {fmt.skip_reason(d['skipped'])}"
        else:
            found = [f for f in report["findings"] if f.get("diagnostic") == name]
            result = f"{mark} {fmt.counts_text(fmt.counts(found)) if found else 'ok'}"
        metrics = ", ".join(f"{k} {v}" for k, v in fmt.key_metrics(d.get("metrics") or {}, name))
        rows.append([f"`{name}`", fmt.STAGE_TITLES.get(d.get("stage"), d.get("stage", "")), result,
                     fmt.seconds(d.get("seconds")) if not d.get("skipped") else "–", metrics])
    return _table(["diagnostic", "stage", "result", "time", "key metrics"], rows)


def _members_md(name: str, members: list[dict], limit: int = 50) -> list[str]:
    columns: list[str] = []
    for row in members:
        columns += [k for k in row if k not in columns]
    rows = [[fmt.value(row.get(c), max_chars=40) for c in columns] for row in members[:limit]]
    more = f" (first {limit} of {len(members)})" if len(members) > limit else ""
    lines = [f"<details><summary><code>{name}</code>: {fmt.plural(len(members), 'member')}{more}</summary>", ""]
    return lines + _table(columns, rows) + ["</details>", ""]


def _reproduce_md(report: dict) -> list[str]:
    env = report.get("environment") or {}
    versions = env.get("versions") or {}
    recorded = report.get("command") or ["harness"]
    if recorded[0] == API_COMMAND:
        lines = ["## Reproduce", ""] + _api_call_md(report, recorded[1:])
    else:
        command = " ".join(_shell_quote(a) for a in recorded)
        lines = ["## Reproduce", "", "```sh"]
        if env.get("cwd"):
            lines.append(f"cd {_shell_quote(env['cwd'])}")
        lines += [command, "```", ""]
    pkgs = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k in ("jax", "jaxlib", "flax", "optax", "python"))
    device = f"{env.get('device_count', '?')} × {env.get('device_kind', '?')} ({env.get('backend', '?')})"
    rows = [["packages", pkgs], ["devices", device], ["git revision", env.get("git_revision") or "not a git checkout"]]
    if env.get("env"):
        rows.append(["environment", ", ".join(f"{k}={v}" for k, v in env["env"].items())])
    lines += _table(["", ""], rows)
    lines += ["The full resolved configuration is under `config` in `report.json`.", ""]
    return lines


def _api_call_md(report: dict, overrides: list[str]) -> list[str]:
    """How a run made by :func:`harness.diagnose` was called; objects it was given in memory are named by their
    ``<in-memory: ...>`` targets (they cannot be imported elsewhere, so ``harness reproduce`` cannot rerun them)."""
    from harness.config import IN_MEMORY

    config = report.get("config") or {}
    arguments, in_memory = [], []
    for group in ("model", "data", "loss"):
        target = (config.get(group) or {}).get("_target_") if isinstance(config.get(group), dict) else None
        if isinstance(target, str) and target.startswith(IN_MEMORY):
            name = target[len(IN_MEMORY):].strip(": <>") or group
            arguments.append(f"{group}={name if '.' in name else f'<{name}>'}")
            in_memory.append(group)
    if overrides:
        arguments.append("overrides=[" + ", ".join(repr(o) for o in overrides) + "]")
    cwd = (report.get("environment") or {}).get("cwd")
    lines = ["Made from Python" + (f" (in `{cwd}`)" if cwd else "") + ":", "", "```python", "import harness", "",
             f"report = harness.diagnose({', '.join(arguments)})", "```", ""]
    if in_memory:
        names = [f"`{g}`" for g in in_memory]
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        lines += [f"{listed} {'was' if len(in_memory) == 1 else 'were'} given "
                  f"as objects in memory: rerun the notebook or script that defines them (`harness reproduce` "
                  f"needs importable `_target_`s).", ""]
    return lines


def _shell_quote(arg: str) -> str:
    import shlex

    return shlex.quote(str(arg))


def _internal_errors_md(report: dict) -> list[str]:
    crashes = report.get("internal_errors") or []
    if not crashes:
        return []
    lines = [f"> **💥 Internal error:** {fmt.internal_errors_text(crashes)}.", ">",
             f"> {fmt.INTERNAL_ERROR_ADVICE}", ""]
    for e in crashes:
        if e.get("traceback"):
            lines += [f"<details><summary>Traceback of <code>{e['diagnostic']}</code></summary>", "", "```text",
                      e["traceback"], "```", "", "</details>", ""]
    return lines


def render_markdown(report: dict, *, image_src=None) -> str:
    """report.md's text. ``image_src(path)``: what a plot's image link points to (default: its path relative to
    the run directory, where report.md is; a notebook view embeds the PNG as a data URI instead)."""
    status = report["status"]
    counts = report.get("counts") or fmt.counts(report["findings"])
    icon = "✅" if status == "healthy" else "💥" if status == "internal_error" else "❌"
    lines = [f"# {icon} harness report: {status}", "", _run_line(report), ""]
    lines += _internal_errors_md(report)

    first = report.get("first_to_fix")
    cause = report.get("root_cause")
    if first:
        lines += [f"> **Root cause** ({first['severity']}, `{first['id']}`): {first['message']}"]
        if first.get("explains"):
            lines += [">", "> **It explains:** " + ", ".join(f"`{i}`" for i in first["explains"])]
        if cause:
            lines += [">", f"> **Decision tree:** {cause['question']}"]
            if cause.get("ruled_out"):
                lines += [">", "> **Ruled out:** " + "; ".join(cause["ruled_out"]) + "."]
            if cause.get("not_ruled_out"):
                lines += [">", "> **Not ruled out:** " + "; ".join(cause["not_ruled_out"]) + "."]
        fixes = (cause or {}).get("fixes") or ([first["suggestion"]] if first.get("suggestion") else [])
        if len(fixes) == 1:
            lines += [">", f"> **Fix:** {fixes[0]}"]
        elif fixes:
            lines += [">", "> **Fixes, in the order to try them:**"] + [f"> {i}. {fx}" for i, fx in
                                                                       enumerate(fixes, 1)]
        lines += [""]
    not_run = [n for n, d in report["diagnostics"].items() if d.get("skipped") and not d.get("internal_error")]
    summary = f"{fmt.counts_text(counts).capitalize()}."
    if not_run:
        summary += f" {fmt.plural(len(not_run), 'diagnostic')} did not run ({', '.join(not_run)}): see below."
    lines += [summary, ""]

    lines += ["## Findings", ""]
    if not report["findings"]:
        lines += ["No findings: every check that ran passed.", ""]
    for stage, findings in fmt.by_stage(report["findings"]):
        lines += [f"### {fmt.STAGE_TITLES.get(stage, stage)}", ""]
        for f in findings:
            lines += _finding_md(f)

    if report.get("not_ruled_out"):
        lines += ["## Not ruled out", ""] + [f"- {line}" for line in report["not_ruled_out"]] + [""]

    if report.get("budget"):
        b = report["budget"]
        lines += ["## Budget", "", b["summary"], ""]
        lines += [f"- {change} (`{keys}`): {cost}" if keys else f"- {change}: {cost}"
                  for change, keys, cost in fmt.budget_cuts(b)]
        lines += [""] if b["changes"] else []
        rerun = fmt.budget_rerun(b)
        if rerun:
            lines += [f"The same suite without a budget, whatever the machine's speed: add `{rerun}` to the "
                      "command.", ""]

    lines += ["## Diagnostics", ""] + _diagnostics_md(report)

    plots = report.get("plots") or {}
    if plots:
        lines += ["## Plots", ""]
        for key, p in plots.items():
            source = f" (`{p['diagnostic']}`)" if p.get("diagnostic") else ""
            src = image_src(p["path"]) if image_src is not None else p["path"]
            lines += [f"### {p.get('title') or key}{source}", "", f"![{_cell(p.get('title') or key)}]({src})", ""]

    swept = [(n, d["members"]) for n, d in report["diagnostics"].items() if d.get("members")]
    if swept:
        lines += ["## Sweep members", ""]
        for name, members in swept:
            lines += _members_md(name, members)

    metrics = report.get("metrics") or {}
    if metrics:
        lines += ["## All metrics", "", f"<details><summary>{fmt.plural(len(metrics), 'metric')}</summary>", ""]
        lines += _table(["metric", "value"], [[f"`{k}`", fmt.value(v)] for k, v in metrics.items()])
        lines += ["</details>", ""]

    lines += _reproduce_md(report)
    return "\n".join(lines)


def write_markdown(report: dict, output_dir: str) -> str:
    path = os.path.join(output_dir, "report.md")
    atomic_write(path, render_markdown(report))
    return path
