"""Formatting shared by the terminal, report.md and W&B: numbers, evidence summaries, checklist stages.

Everything here works on the JSON-able report (``writer.build_report``), so a report read back from disk renders
exactly like the one just computed.
"""

from __future__ import annotations

import json
import math
import shlex
from typing import Any, Iterable

from harness.findings import FINDING_IDS

STAGES = ("data", "model", "training", "hyperparameters")
STAGE_TITLES = {"data": "Data", "model": "Model", "training": "Training", "hyperparameters": "Hyperparameters"}
# When a finding's diagnostic is unknown (a report from elsewhere), its id prefix says where it belongs.
_PREFIX_STAGE = {"data": "data", "model": "model", "train": "training"}
_SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}
_ID_RANK = {fid: i for i, fid in enumerate(FINDING_IDS)}


def stage_of(diagnostic: str | None, finding_id: str) -> str:
    """The checklist stage a finding belongs to: its diagnostic's stage, else its id's prefix."""
    from harness.checks.registry import DIAGNOSTICS

    if diagnostic in DIAGNOSTICS:
        return DIAGNOSTICS[diagnostic][1]
    return _PREFIX_STAGE.get(finding_id.split(".", 1)[0], "training")


def causal_lines(f: dict) -> list[str]:
    """How a finding sits among the others (:mod:`harness.causes`): the symptoms it explains, the cause that
    explains it, and why its severity is what it is."""
    lines = []
    if f.get("explained_by"):
        lines.append(f"symptom of {f['explained_by']}: fix that first")
    if f.get("explains"):
        lines.append(f"explains: {', '.join(f['explains'])}")
    if f.get("note"):
        lines.append(f["note"])
    return lines


def by_stage(findings: Iterable[dict]) -> list[tuple[str, list[dict]]]:
    """Findings grouped by checklist stage (data -> model -> training -> hyperparameters); within a stage the most
    severe first, then in the checklist's id order. Stages without findings are left out."""
    groups: dict[str, list[dict]] = {s: [] for s in STAGES}
    for f in findings:
        groups.setdefault(f.get("stage") or stage_of(f.get("diagnostic"), f["id"]), []).append(f)
    key = lambda f: (_SEVERITY_RANK.get(f["severity"], 9), _ID_RANK.get(f["id"], len(_ID_RANK)))  # noqa: E731
    return [(s, sorted(fs, key=key)) for s, fs in groups.items() if fs]


def counts(findings: Iterable[dict]) -> dict[str, int]:
    out = {"error": 0, "warning": 0, "info": 0}
    for f in findings:
        out[f["severity"]] = out.get(f["severity"], 0) + 1
    return out


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def counts_text(c: dict[str, int]) -> str:
    """'1 error, 2 warnings' (info only when there is nothing worse); 'no findings' when empty."""
    parts = [plural(c.get("error", 0), "error") if c.get("error") else "",
             plural(c.get("warning", 0), "warning") if c.get("warning") else ""]
    parts = [p for p in parts if p]
    if c.get("info"):
        parts.append(f"{c['info']} info")
    return ", ".join(parts) or "no findings"


def number(x: Any) -> str:
    """A value as a person reads it: 4 significant digits, integers whole, booleans yes/no, None as a dash."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3g}"
        return f"{x:.4g}"
    return str(x)


def value(x: Any, *, max_items: int = 6, max_chars: int = 120) -> str:
    """A compact one-line rendering of any JSON-able value (lists are shortened, long strings cut)."""
    if isinstance(x, (list, tuple)):
        flat = list(x)
        if flat and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat) and len(flat) > max_items:
            finite = [v for v in flat if isinstance(v, int) or math.isfinite(v)]
            span = f", min {number(min(finite))}, max {number(max(finite))}" if finite else ""
            return f"[{len(flat)} values{span}]"
        shown = ", ".join(value(v, max_items=max_items, max_chars=40) for v in flat[:max_items])
        more = f", … {len(flat) - max_items} more" if len(flat) > max_items else ""
        return _cut(f"[{shown}{more}]", max_chars)
    if isinstance(x, dict):
        inner = ", ".join(f"{k}={value(v, max_items=3, max_chars=40)}" for k, v in list(x.items())[:max_items])
        return _cut("{" + inner + (", …" if len(x) > max_items else "") + "}", max_chars)
    if isinstance(x, str):
        return _cut(x, max_chars)
    return number(x)


def _cut(text: str, max_chars: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def evidence_items(evidence: dict[str, Any], *, max_items: int = 8) -> list[tuple[str, str]]:
    """(key, rendered value) pairs for a finding's evidence, in the order the check gave them."""
    return [(str(k), value(v)) for k, v in list(evidence.items())[:max_items]]


def evidence_line(evidence: dict[str, Any], *, max_chars: int = 240) -> str:
    """Evidence as one line: ``key=value, key=value`` (cut at ``max_chars``)."""
    items = evidence_items(evidence)
    more = len(evidence) - len(items)
    text = ", ".join(f"{k}={v}" for k, v in items) + (f", … {more} more" if more > 0 else "")
    return _cut(text, max_chars)


def key_metrics(metrics: dict[str, Any], diagnostic: str, limit: int = 4) -> list[tuple[str, str]]:
    """The first ``limit`` scalar metrics of a diagnostic, in the order it reported them (diagnostics list their
    headline numbers first), with the ``<diagnostic>/`` prefix dropped for brevity."""
    out = []
    for k, v in metrics.items():
        if isinstance(v, (list, dict)):
            continue
        short = k[len(diagnostic) + 1:] if k.startswith(diagnostic + "/") else k
        out.append((short, number(v)))
        if len(out) == limit:
            break
    return out


INTERNAL_ERROR_ADVICE = ("This is a bug in harness (or in what it ran), not a finding about your setup; the other "
                         "diagnostics' results stand. Please report it with harness.log from the run directory "
                         "(it holds the traceback).")


def internal_error_text(e: dict) -> str:
    """``diagnostic seeds crashed: TraceContextError: Cannot mutate RngCount from a different trace level``."""
    what = f"{e.get('type') or 'Exception'}: {e['message']}" if e.get("message") else (e.get("type") or "Exception")
    return f"diagnostic {e.get('diagnostic') or '?'} crashed: {what}"


def internal_errors_text(crashes: list[dict]) -> str:
    return "; ".join(internal_error_text(e) for e in crashes)


def skip_reason(reason: str) -> str:
    """A skipped diagnostic's reason without the 'skipped:'/'crashed:' prefix the status already says."""
    for prefix in ("skipped:", "crashed:"):
        if reason.startswith(prefix):
            return reason[len(prefix):].strip()
    return reason


def budget_cuts(b: dict) -> list[tuple[str, str, str]]:
    """A budget's cuts (``report["budget"]``, :class:`harness.budget.Plan`): (what changed, the overrides that
    made it, what it costs in confidence)."""
    keys = b.get("change_overrides") or [[] for _ in b["changes"]]
    return [(change, " ".join(map(shlex.quote, k)), cost) for change, k, cost in zip(b["changes"], keys, b["costs"])]


def budget_rerun(b: dict) -> str | None:
    """The overrides that run a budget's chosen suite again without a budget (the same suite on any machine), or
    None when it cut nothing. Quoted for a shell (``diagnostics.run=[...]`` is a glob pattern to zsh)."""
    return " ".join(map(shlex.quote, ["budget=null", *b["overrides"]])) if b.get("overrides") else None


def seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    return f"{s // 60:.0f} min {s % 60:.0f} s"


def dumps(obj: Any, indent: int = 2) -> str:
    """JSON with nested objects indented but lists of scalars on one line, so curves and sweep columns stay
    readable instead of one number per line."""
    return _dumps(obj, indent, 0)


def _scalar_json(x: Any) -> str:
    return json.dumps(x, allow_nan=False, ensure_ascii=False)


def _dumps(obj: Any, indent: int, level: int) -> str:
    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        body = ",\n".join(f"{inner}{_scalar_json(str(k))}: {_dumps(v, indent, level + 1)}" for k, v in obj.items())
        return "{\n" + body + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[]"
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return "[" + ", ".join(_scalar_json(v) for v in obj) + "]"
        body = ",\n".join(inner + _dumps(v, indent, level + 1) for v in obj)
        return "[\n" + body + "\n" + pad + "]"
    return _scalar_json(obj)


def compiles(programs: dict, verb: str = "") -> str:
    """'7 compiles (1.5 s compiling, 7 traces reused)': the status line's program summary (``verb`` after the
    seconds; traces reused from the program cache when there were any)."""
    spent = seconds(programs.get("compile_wall_seconds", programs.get("compile_seconds")))
    reused = programs.get("traces_reused") or 0
    return (f"{plural(programs.get('compiles', 0), 'compile')} ({spent}{verb}"
            f"{f', {reused} traces reused' if reused else ''})")

