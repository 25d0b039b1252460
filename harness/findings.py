"""Findings: what every check yields, and the stable ids they use.

A finding names a problem (``id``), how bad it is (``severity``), what was seen (``message`` and ``evidence``) and
what to do about it (``suggestion``). Ids are public interface: users filter on them in CI and W&B.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        return {"error": 0, "warning": 1, "info": 2}[self.value]


# The stable ids, in the checklist's order (data -> model -> training -> hyperparameters). The report sorts the
# first thing to fix by this order, so a data problem is named before the training symptom it causes.
FINDING_IDS: tuple[str, ...] = (
    "data.nonfinite",
    "data.shape",
    "data.label_range",
    "data.label_distribution",
    "data.class_imbalance",
    "data.feature_scale",
    "data.target_scale",
    "data.leakage",
    "data.conflicting_labels",
    "data.nondeterministic",
    "data.constant_features",
    "data.sampled",
    "model.forward",
    "model.initial_loss",
    "model.output_range",
    "model.gradient_flow",
    "model.gradient_check",
    "model.batch_dependence",
    "model.causal_leakage",
    "model.padding_leakage",
    "model.exploding_activations",
    "model.dead_units",
    "model.saturated_units",
    "train.overfit_batch",
    "train.loss_increasing",
    "train.divergence",
    "train.nondeterministic",
    "train.precision",
    "train.no_signal",
    "train.capacity",
    "train.learning_rate",
    # The training monitor (harness.monitor): a run's own steps.
    "train.nonfinite",
    "train.grad_spike",
    "train.loss_spike",
    "train.update_ratio",
    "train.overfitting",
    "train.underfitting",
    "train.oscillation",
    "train.plateau",
    # With train.activations (harness.monitor.activations).
    "train.dead_units",
    "train.saturated_units",
    "train.attention_logits",
    "train.output_logits",
)
_ORDER = {fid: i for i, fid in enumerate(FINDING_IDS)}


@dataclasses.dataclass(frozen=True)
class Finding:
    id: str
    severity: Severity
    message: str
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)
    suggestion: str = ""
    # Set by harness.causes.reconcile once every diagnostic has run: the findings this one explains (it is their
    # cause), the root cause that explains this one (it is a symptom), and why its severity differs from the
    # diagnostic's own judgement (it explains an error; or training as configured recovered from it).
    explains: tuple[str, ...] = ()
    explained_by: str | None = None
    note: str = ""

    def __post_init__(self):
        if self.id not in _ORDER:
            raise ValueError(f"unknown finding id {self.id!r}; known ids: {', '.join(FINDING_IDS)}")
        object.__setattr__(self, "severity", Severity(self.severity))
        object.__setattr__(self, "explains", tuple(self.explains))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "severity": self.severity.value,
            "message": self.message,
            "evidence": to_jsonable(self.evidence),
            "suggestion": self.suggestion,
            "explains": list(self.explains),
            "explained_by": self.explained_by,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Finding":
        return cls(d["id"], Severity(d["severity"]), d["message"], d.get("evidence", {}), d.get("suggestion", ""),
                   tuple(d.get("explains") or ()), d.get("explained_by"), d.get("note", ""))


# JAX appends this note to an exception whose traceback it filtered: it is not the error's message.
_JAX_FILTER_NOTE = "For simplicity, JAX has removed its internal frames"


@dataclasses.dataclass(frozen=True)
class InternalError:
    """A diagnostic that crashed on something unforeseen: a bug in harness (or in what it ran), not a finding about
    the user's setup. The run goes on, but its status is ``internal_error`` and the CLI exits 3.

    ``message`` is the first line of the exception's own message (never JAX's traceback-filtering note), and
    ``traceback`` the full formatted traceback (it goes to ``harness.log`` and report.json)."""

    diagnostic: str
    type: str
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, diagnostic: str, err: BaseException) -> "InternalError":
        import traceback

        return cls(diagnostic, type(err).__name__, exception_message(err),
                   "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip())

    @property
    def summary(self) -> str:
        """``TraceContextError: Cannot mutate RngCount from a different trace level``."""
        return f"{self.type}: {self.message}" if self.message else self.type

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InternalError":
        return cls(d["diagnostic"], d["type"], d.get("message", ""), d.get("traceback", ""))


def exception_message(err: BaseException, max_chars: int = 500) -> str:
    """The first line of an exception's own message: ``str(err)``, without notes added to it (JAX's "For
    simplicity, JAX has removed its internal frames ..." is a note, and some versions put it in the message)."""
    for line in str(err).splitlines():
        line = line.strip()
        if line and not line.startswith(_JAX_FILTER_NOTE) and set(line) != {"-"}:
            return line if len(line) <= max_chars else line[: max_chars - 1] + "…"
    return ""


def error(fid: str, message: str, suggestion: str = "", **evidence) -> Finding:
    return Finding(fid, Severity.ERROR, message, evidence, suggestion)


def warning(fid: str, message: str, suggestion: str = "", **evidence) -> Finding:
    return Finding(fid, Severity.WARNING, message, evidence, suggestion)


def info(fid: str, message: str, suggestion: str = "", **evidence) -> Finding:
    return Finding(fid, Severity.INFO, message, evidence, suggestion)


def checklist_order(findings: list[Finding]) -> list[Finding]:
    """Most severe first; within a severity, in the checklist's order (data before model before training)."""
    return sorted(findings, key=lambda f: (f.severity.rank, _ORDER[f.id]))


def first_to_fix(findings: list[Finding]) -> Finding | None:
    """The first thing to fix: the most severe root cause (a finding no other finding explains, see
    :mod:`harness.causes`), the earliest in checklist order among equals; never info."""
    ranked = [f for f in checklist_order(findings) if f.severity is not Severity.INFO and f.explained_by is None]
    return ranked[0] if ranked else None


def to_jsonable(x: Any) -> Any:
    """Numpy/JAX scalars and arrays to plain Python so evidence can go to JSON, W&B and the terminal."""
    import numpy as np

    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if isinstance(x, float):
        return x if np.isfinite(x) else str(x)
    if isinstance(x, np.generic):
        return to_jsonable(x.item())
    if hasattr(x, "shape") and hasattr(x, "tolist"):
        return to_jsonable(np.asarray(x).tolist())
    return str(x)
