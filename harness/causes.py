"""What explains what: the findings of one run turned into root causes with the symptoms they explain.

Diagnostics judge one thing each and do not see each other, so one defect shows up several times: unscaled inputs
are a ``data.feature_scale`` warning, and also the ``train.overfit_batch`` error they cause; a learning rate of 3
is ``train.divergence``, and also the failed controls. The report must name the cause first (the checklist's rule:
data, then model, then training, then hyperparameters -- seed 001, and Karpathy's "A Recipe for Training Neural
Networks", 2019), with the symptoms it explains under it. :func:`reconcile` does that once every diagnostic has
run, from a fixed table of mechanisms (:data:`EXPLAINS`: "unscaled inputs can make one batch impossible to fit",
never "any data finding explains any training finding"), and fixes severities so that they mean one thing:

* ``error`` -- training as configured is broken by it. A cause that explains an error is an error (unscaled
  inputs that make the overfit test fail break training, whatever the data check alone could tell).
* ``warning`` -- a real pathology that the configured training happens to survive. An init pathology the model
  stage calls an error (activations exploding across depth, a loss at init orders of magnitude off) becomes a
  warning, with the reason, when the training diagnostics ran and found training as configured working: Adam
  recovers from a bad init scale that plain SGD would not.
* ``info`` -- context. Info findings neither explain nor are explained.
"""

from __future__ import annotations

import dataclasses

from harness.findings import Finding, Severity, checklist_order

# What the training diagnostics report when training as configured fails.
TRAINING_FAILURES = frozenset({"train.overfit_batch", "train.loss_increasing", "train.divergence", "train.no_signal",
                               "train.capacity", "train.learning_rate"})
# Model findings about the scale of the init: training can recover from them, depending on the optimizer.
INIT_SCALE = frozenset({"model.initial_loss", "model.exploding_activations", "model.saturated_units",
                        "model.dead_units", "model.gradient_flow"})

# What a monitored run shows on the way to a blow-up and after it (harness.monitor.detectors).
MONITOR_SYMPTOMS = frozenset({"train.nonfinite", "train.grad_spike", "train.loss_spike", "train.oscillation",
                              "train.plateau", "train.update_ratio", "train.underfitting", "train.dead_units",
                              "train.saturated_units"})

# cause id -> the ids of findings it can cause. Acyclic (checked below); a finding explains only findings that the
# mechanism in the comment can produce.
EXPLAINS: dict[str, frozenset[str]] = {
    # Labels outside [0, C): the loss at init and every training result are computed on wrong targets.
    "data.label_range": frozenset({"model.initial_loss"}) | TRAINING_FAILURES,
    # Unscaled inputs blow up pre-activations (saturation, dead ReLUs, exploding activations, a huge loss at init)
    # and make the usable learning rate tiny (LeCun et al., "Efficient BackProp", 1998, section 4.3).
    "data.feature_scale": INIT_SCALE | TRAINING_FAILURES,
    # Targets in the thousands: a squared error at init in the millions, gradients to match, divergence.
    "data.target_scale": frozenset({"model.initial_loss"}) | TRAINING_FAILURES,
    # Inputs that carry no information (every feature constant): every validation row equals a training row and
    # every label conflicts with another; nothing can be learned, one batch cannot be memorized.
    "data.constant_features": frozenset({"data.leakage", "data.conflicting_labels", "train.overfit_batch",
                                         "train.no_signal", "train.capacity", "train.learning_rate"}),
    # Identical inputs with different labels cannot all be memorized, and cap what any model can learn.
    "data.conflicting_labels": frozenset({"train.overfit_batch", "train.no_signal"}),
    # Probabilities handed to a logits loss: a squashed loss surface, small gradients, slow or no learning.
    # In a monitored run, the logits under the second softmax grow while the loss stalls (train.output_logits).
    "model.output_range": frozenset({"model.initial_loss", "model.gradient_flow", "train.output_logits"})
    | TRAINING_FAILURES,
    # A wrong gradient: training follows a direction that is not downhill.
    "model.gradient_check": frozenset({"model.gradient_flow"}) | TRAINING_FAILURES,
    # Activations growing across depth: a huge loss at init, saturated or dead units, huge or vanishing gradients.
    "model.exploding_activations": frozenset({"model.initial_loss", "model.saturated_units", "model.dead_units",
                                              "model.gradient_flow"}) | TRAINING_FAILURES,
    # Saturated or dead units pass no gradient back (Glorot & Bengio, 2010).
    "model.saturated_units": frozenset({"model.gradient_flow"}) | TRAINING_FAILURES,
    "model.dead_units": frozenset({"model.gradient_flow"}) | TRAINING_FAILURES,
    "model.gradient_flow": TRAINING_FAILURES,
    # A model or loss that mixes the examples of a batch fits batch statistics, not examples.
    "model.batch_dependence": TRAINING_FAILURES,
    # Hidden weights all zero at init (a zero-init MLP): every unit computes 0 -- dead or saturated by construction --
    # and training never breaks their symmetry. The cause, not a symptom of the dead units it makes.
    "model.gradient_flow:zero_init": frozenset({"model.dead_units", "model.saturated_units",
                                                "model.initial_loss"}) | TRAINING_FAILURES,
    "model.initial_loss": TRAINING_FAILURES,
    # A loss whose sign is flipped is driven to -inf: training diverges and every control fails.
    "train.loss_increasing": TRAINING_FAILURES - {"train.loss_increasing"},
    # The configured run diverging explains every other training failure at the configured learning rate; in a
    # monitored run (harness train) also what a blow-up looks like on the way (spikes, swings), where it ends
    # (non-finite values; a ReLU network killed by it: leaves that no longer get a gradient, a stalled loss).
    "train.divergence": TRAINING_FAILURES - {"train.divergence", "train.loss_increasing"} | MONITOR_SYMPTOMS,
    # A monitored run whose learning rate is too low (plateau) or at the edge of stability (oscillation) ends
    # with a high loss for that reason.
    "train.plateau": frozenset({"train.underfitting"}),
    # Units killed or pinned during training (train.activations) leave the run underfitting; attention logits
    # grown into one-hot softmaxes are what makes a transformer's loss spike and diverge (Dehghani et al. 2023).
    "train.dead_units": frozenset({"train.underfitting"}),
    "train.saturated_units": frozenset({"train.underfitting"}),
    "train.attention_logits": frozenset({"train.divergence", "train.underfitting", "train.loss_spike",
                                         "train.grad_spike"}),
    "train.oscillation": frozenset({"train.underfitting"}),
    # A configured LR far outside the usable range: nothing else trains well at it.
    "train.learning_rate": frozenset({"train.overfit_batch", "train.no_signal", "train.capacity"}),
    # Non-finite values only in bfloat16, training as configured in bfloat16: every training diagnostic's runs go
    # non-finite with it (a higher bfloat16 plateau, "train.precision:plateau", explains nothing).
    "train.precision": TRAINING_FAILURES,
}


def kind(f: Finding) -> str:
    """The finding's key in :data:`EXPLAINS`: its id, refined where one id covers a cause and a symptom
    (``model.gradient_flow`` is a symptom of dead units, but a zero-initialized hidden layer is their cause)."""
    if f.id == "model.gradient_flow" and f.evidence.get("zero_initialized"):
        return "model.gradient_flow:zero_init"
    if f.id == "train.precision" and not f.evidence.get("nonfinite_only_bfloat16"):
        return "train.precision:plateau"
    return f.id


def _check_acyclic(table: dict[str, frozenset[str]]) -> None:
    state: dict[str, int] = {}

    def visit(node: str, path: tuple[str, ...]):
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            raise AssertionError(f"harness.causes.EXPLAINS has a cycle: {' -> '.join(path + (node,))}")
        state[node] = 1
        for child in table.get(node, ()):
            if child != node:
                visit(child, path + (node,))
        state[node] = 2

    for node in table:
        visit(node, ())


_check_acyclic(EXPLAINS)
_RANK = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


@dataclasses.dataclass(frozen=True)
class TrainingEvidence:
    """What the training stage showed: which training diagnostics ran to the end, and the configured optimizer."""

    ran: tuple[str, ...]
    optimizer: str = "the configured optimizer"

    @classmethod
    def of(cls, outcomes, optimizer: str = "the configured optimizer") -> "TrainingEvidence":
        from harness.checks.registry import DIAGNOSTICS

        ran = tuple(o.name for o in outcomes if DIAGNOSTICS.get(o.name, ("", ""))[1] in ("training",
                                                                                          "hyperparameters")
                    and not o.skipped and o.internal_error is None)
        return cls(ran, optimizer)


def reconcile(findings: list[Finding], evidence: TrainingEvidence) -> list[Finding]:
    """The same findings (same order), with severities that mean the same thing everywhere and each symptom linked
    to the root cause that explains it (``explained_by``; the cause's ``explains`` lists them).

    1. An init-scale error (:data:`INIT_SCALE`) becomes a warning when training diagnostics ran and none failed.
    2. Every warning or error is a root unless an earlier-ranked root explains it, directly or through a chain of
       present findings; roots are taken most severe first, then in checklist order, so a symptom explained by two
       causes belongs to the more severe one.
    3. A root is at least as severe as the symptoms it explains.
    """
    training_failed = any(f.id in TRAINING_FAILURES and f.severity is Severity.ERROR for f in findings)
    out = list(findings)
    if evidence.ran and not training_failed:
        for i, f in enumerate(out):
            if f.id in INIT_SCALE and f.severity is Severity.ERROR:
                out[i] = dataclasses.replace(
                    f, severity=Severity.WARNING,
                    note=f"A warning, not an error: trained as configured ({evidence.optimizer}), the training "
                         f"diagnostics ({', '.join(evidence.ran)}) found no failure, so training recovers from it; "
                         f"it still costs steps, and another optimizer or learning rate (plain SGD) may not.")
    index = {id(f): i for i, f in enumerate(out)}
    candidates = [f for f in checklist_order(out) if f.severity is not Severity.INFO]

    def explained(g: Finding, by: Finding) -> bool:
        return by is not g and by.id != g.id and kind(g) in EXPLAINS.get(kind(by), ())

    roots = [f for f in candidates if not any(explained(f, c) for c in candidates)]
    assigned: dict[int, Finding] = {}  # id(symptom) -> its root cause
    for root in roots:  # most severe first: a root claims what it explains before less severe roots do
        frontier = [root]
        while frontier:
            cause = frontier.pop()
            for g in candidates:
                if id(g) not in assigned and explained(g, cause):
                    assigned[id(g)] = root
                    frontier.append(g)
    for root in roots:
        symptoms = [g for g in candidates if assigned.get(id(g)) is root]
        if not symptoms:
            continue
        worst = min((g.severity for g in symptoms), key=_RANK.__getitem__)
        changes: dict = {"explains": tuple(dict.fromkeys(g.id for g in symptoms))}
        if _RANK[worst] < _RANK[root.severity]:
            named = ", ".join(g.id for g in symptoms if g.severity is worst)
            changes["severity"] = worst
            changes["note"] = f"An error, not a warning: it explains {named}."
        out[index[id(root)]] = dataclasses.replace(out[index[id(root)]], **changes)
    for sid, root in assigned.items():
        out[index[sid]] = dataclasses.replace(out[index[sid]], explained_by=root.id)
    return out


def reconcile_outcomes(outcomes, optimizer: str = "the configured optimizer") -> list[Finding]:
    """:func:`reconcile` over every diagnostic's findings, written back into the outcomes (each keeps its own
    findings, reconciled); returns them flat, in the diagnostics' order."""
    flat = [f for o in outcomes for f in o.findings]
    done = reconcile(flat, TrainingEvidence.of(outcomes, optimizer))
    it = iter(done)
    for o in outcomes:
        o.findings = [next(it) for _ in o.findings]
    return done


# ---------------------------------------------------------------------------------------------------------------
# What the budgets could not rule out.

# The training diagnostics and the settings field holding their training length.
_STEPS_FIELD = {"overfit_batch": "steps", "seeds": "steps", "controls": "steps", "lr_range": "grid_steps",
                "capacity": "steps"}


def not_ruled_out(outcomes, settings: dict) -> list[str]:
    """What a clean result does not cover, said plainly, so a report without findings is never read as "this run
    will train to the end": the suite trains for budgets of a few hundred steps, and some real bugs (a hand-written
    cross-entropy that reaches log(0) after thousands of steps) only show later. ``settings``: diagnostic name ->
    its Settings (:attr:`harness.config.RunConfig.settings`)."""
    ran = {o.name: o for o in outcomes if o.name in _STEPS_FIELD and not o.skipped and o.internal_error is None}
    if not ran:
        return ["No training diagnostic ran: the data and the model at init were checked, nothing about training "
                "is ruled out."]
    steps = {name: int(getattr(settings[name], _STEPS_FIELD[name])) for name in ran if name in settings}
    longest = max(steps.values(), default=0)
    seeds = ran.get("seeds")
    if seeds is not None and "seeds" in steps:
        if int(seeds.metrics.get("seeds/diverged", 0) or 0):
            return []  # training as configured diverged: that is a finding, not a limit
        runs = seeds.metrics.get("seeds/num_seeds")
        said = (f"No non-finite loss in {steps['seeds']} steps of training as configured"
                + (f" ({runs} seeds)" if runs else ""))
        length = steps["seeds"]
    else:
        said = f"The training diagnostics ran at most {longest} steps each"
        length = longest
    horizon = getattr(settings.get("lr_range"), "horizon", None)  # train.steps: the user's own training length
    yours = f"your {horizon} steps (train.steps)" if horizon else "your full length"
    if horizon and int(horizon) <= length:
        return []  # the suite trained as long as the user does
    return [f"{said}; a longer run may still diverge (a loss that reaches log(0) or overflows after thousands of "
            f"steps), and a plateau or overfitting later in training is not judged. Train {yours} with the "
            f"monitor watching: `harness train train.steps={horizon or '<steps>'}`, or `harness.monitor` in your "
            f"own loop (README)."]


# ---------------------------------------------------------------------------------------------------------------
# One root cause: the first thing to fix, placed in the seeds' decision tree.
#
# The tree (seed 002's flowchart; Karpathy's recipe and the CS231n checklist say the same): is anything NaN or inf?
# then the data, the learning rate, the precision or a log(0). Can it overfit one batch? If not: the model, the loss
# or the labels. Is the problem on validation only? Overfitting or a data mismatch. Otherwise: optimisation (the
# learning rate, its schedule, the optimizer). Each branch has a short list of alternatives; the report says which
# one the evidence names, which ones other evidence rules out (a check that ran clean), and which stay open, and
# orders the fixes accordingly: the cause's own fix first, then one for each alternative still open.

NONFINITE = frozenset({"data.nonfinite", "train.nonfinite"})
CANNOT_FIT = TRAINING_FAILURES - {"train.learning_rate"} | {"train.update_ratio", "train.underfitting"}
VALIDATION_ONLY = frozenset({"train.overfitting", "data.leakage"})

BRANCHES = {
    "nonfinite": "Something went NaN or inf: the data, the learning rate, the precision or a log(0)?",
    "fit": "It cannot fit (one batch, or the training set): the data, the model, the loss or the labels?",
    "validation": "Training fits, validation does not: overfitting or a mismatch between the splits?",
    "optimisation": "It trains, but badly: the learning rate, its schedule or the optimizer?",
}
# Alternative -> (what it is, its fix when it stays open).
ALTERNATIVES = {
    "data": ("the data", "Check the data (`harness diagnostics.run=[data]`): NaN or inf values, feature and target "
                         "scale, labels."),
    "learning_rate": ("the learning rate", "Lower the learning rate or clip gradients (optim.clip_norm=1.0); "
                                           "`harness diagnostics.run=[lr_range]` suggests a value."),
    "precision": ("the numerical precision", "Compute in float32 (keep float32 parameters; a loss scale for "
                                             "float16)."),
    "numerics": ("a log(0), a division by zero or an overflow", "Guard log, division and sqrt in the loss and the "
                                                                 "model (log_softmax, not log(softmax))."),
    "model": ("the model", "Check the model at init (`harness diagnostics.run=[model]`): its output range, "
                           "gradients, initialization."),
    "loss": ("the loss or the labels", "Check the loss's sign and reduction and that labels line up with inputs "
                                       "(`harness diagnostics.run=[overfit_batch,controls]`)."),
    "overfitting": ("overfitting", "Regularize (weight decay, dropout, augmentation), get more data, or stop "
                                   "early at the best validation step."),
    "mismatch": ("a mismatch between the splits", "Check that training and validation data come from the same "
                                                  "distribution and preprocessing (`harness diagnostics.run=[data]`)."),
    "schedule": ("the schedule or the optimizer", "Try a warm-up, a decaying schedule or another optimizer."),
}
BRANCH_ALTERNATIVES = {
    "nonfinite": ("data", "numerics", "learning_rate", "precision"),
    "fit": ("data", "model", "loss", "learning_rate"),
    "validation": ("overfitting", "mismatch"),
    "optimisation": ("learning_rate", "schedule"),
}
# Finding id -> the alternative it names.
NAMES = {
    "data.nonfinite": "data", "data.label_range": "loss", "train.loss_increasing": "loss",
    "train.learning_rate": "learning_rate", "train.divergence": "learning_rate", "train.oscillation": "learning_rate",
    "train.plateau": "learning_rate", "train.overfitting": "overfitting", "data.leakage": "mismatch",
    "train.precision": "precision", "train.dead_units": "learning_rate", "train.saturated_units": "learning_rate",
    "train.attention_logits": "learning_rate",
}
# The replay's stage of a non-finite step -> the alternative it names (harness.monitor.replay).
ORIGINS = {"inputs": "data", "targets": "data", "loss": "numerics", "backward": "numerics", "forward": "numerics",
           "outputs": "numerics", "update": "numerics", "parameters": "learning_rate"}
LR_SYMPTOMS = frozenset({"train.divergence", "train.oscillation", "train.grad_spike", "train.loss_spike",
                         "train.learning_rate"})


@dataclasses.dataclass(frozen=True)
class RootCause:
    """The most likely cause, where it sits in the decision tree, what supports it, what rules out the other
    branches' alternatives, and the fixes in the order to try them (report.json's ``root_cause``)."""

    finding: Finding
    branch: str
    supported_by: tuple[str, ...]
    ruled_out: tuple[str, ...]
    open: tuple[str, ...]
    fixes: tuple[str, ...]

    def to_dict(self) -> dict:
        step = self.finding.evidence.get("step")
        return {"id": self.finding.id, "severity": self.finding.severity.value, "message": self.finding.message,
                "step": step if isinstance(step, int) else None, "branch": self.branch,
                "question": BRANCHES[self.branch], "supported_by": list(self.supported_by),
                "ruled_out": list(self.ruled_out), "not_ruled_out": list(self.open), "fixes": list(self.fixes)}


def _branch(root: Finding) -> str:
    if root.id in NONFINITE or (root.id == "train.divergence" and root.evidence.get("first_nonfinite_step", -1)
                                not in (-1, None)) or kind(root) == "train.precision":
        return "nonfinite"
    if root.id in ("train.divergence", "train.learning_rate"):
        return "optimisation"
    if root.id in VALIDATION_ONLY:
        return "validation"
    if root.id in CANNOT_FIT or root.id.startswith(("data.", "model.")):
        return "fit"
    return "optimisation"


def _named(root: Finding) -> str | None:
    origin = root.evidence.get("origin")
    if origin in ORIGINS:
        return ORIGINS[origin]
    if root.id in NAMES:
        return NAMES[root.id]
    if root.id.startswith("data."):
        return "data"
    if root.id.startswith("model."):
        return "model"
    return None


def _ran(outcomes, stage_name: str) -> list[str]:
    from harness.checks.registry import DIAGNOSTICS

    return [o.name for o in outcomes if DIAGNOSTICS.get(o.name, ("", ""))[1] == stage_name and not o.skipped
            and o.internal_error is None]


def root_cause(findings: list[Finding], outcomes, *, precision: str = "float32") -> RootCause | None:
    """The first thing to fix (:func:`harness.findings.first_to_fix` over reconciled findings) as a
    :class:`RootCause`; None when nothing is to fix. ``precision``: the dtype the run computed in."""
    from harness.findings import first_to_fix

    root = first_to_fix(findings)
    if root is None:
        return None
    branch = _branch(root)
    named = _named(root)
    present = {f.id for f in findings if f.severity is not Severity.INFO}
    supported = []
    if root.explains:
        supported.append(f"it explains {', '.join(root.explains)}")
    if root.evidence.get("origin_detail"):
        replayed = ("replaying the validation set with the run's last parameters"
                    if root.evidence.get("split") == "validation" else
                    f"replaying step {root.evidence.get('step')} from the last finite state")
        supported.append(f"{replayed}: {root.evidence['origin']} ({root.evidence['origin_detail']})")
    ruled, still_open = [], []
    for alt in BRANCH_ALTERNATIVES[branch]:
        if alt == named:
            continue
        what = ALTERNATIVES[alt][0]
        reason = _rules_out(alt, root, present, outcomes, precision)
        if reason:
            ruled.append(f"{what}: {reason}")
        else:
            still_open.append(alt)
    fixes = [root.suggestion] if root.suggestion else []
    fixes += [ALTERNATIVES[alt][1] for alt in still_open if ALTERNATIVES[alt][1] not in fixes]
    opened = []
    for alt in still_open:
        why = ""
        if alt == "learning_rate" and present & LR_SYMPTOMS:
            why = f" (the run also shows {', '.join(sorted(present & LR_SYMPTOMS))})"
        opened.append(f"{ALTERNATIVES[alt][0]}{why}")
    return RootCause(root, branch, tuple(supported), tuple(ruled), tuple(opened), tuple(fixes))


def _rules_out(alt: str, root: Finding, present: set[str], outcomes, precision: str) -> str:
    """Why the evidence rules ``alt`` out ('' when it does not)."""
    data_ran, model_ran = _ran(outcomes, "data"), _ran(outcomes, "model")
    if alt == "data":
        if data_ran and not any(i.startswith("data.") for i in present):
            return "the data checks ran and found nothing to fix"
        if root.evidence.get("origin") in ORIGINS and ORIGINS[root.evidence["origin"]] != "data":
            return "the failing step's batch holds only finite inputs and targets"
        return ""
    if alt == "precision":
        return f"the run computes in {precision}" if precision == "float32" else ""
    if alt == "numerics":
        origin = root.evidence.get("origin")
        return "the replayed step stays finite through the loss and the gradient" if origin in (
            "inputs", "targets", "none") else ""
    if alt == "learning_rate":
        if present & LR_SYMPTOMS:
            return ""
        lr_ran = [o for o in outcomes if o.name == "lr_range" and not o.skipped and o.internal_error is None]
        if lr_ran:
            return "the LR range test found the configured learning rate usable"
        growth = root.evidence.get("grad_norm_growth_before")
        if isinstance(growth, (int, float)) and growth < 3:
            return (f"the gradient norm did not grow before the failure ({growth:.2g}x its median), and no "
                    f"divergence, oscillation or spike was seen")
        return ""
    if alt == "model":
        return "the model checks ran and found nothing to fix" if model_ran and not any(
            i.startswith("model.") for i in present) else ""
    if alt == "loss":
        if {"train.loss_increasing", "data.label_range"} & present:
            return ""
        ran = [o.name for o in outcomes if o.name in ("overfit_batch", "controls") and not o.skipped]
        return f"{' and '.join(ran)} found the loss falling on real labels" if ran else ""
    if alt == "overfitting":
        watched = [o for o in outcomes if o.name == "train" and len(o.series.get("val_loss") or []) >= 5]
        return "the validation loss never turned up while the training loss fell (harness train)" if watched and (
            "train.overfitting" not in present) else ""
    if alt == "mismatch":
        return "the data checks found no leakage or mismatch between the splits" if data_ran and not (
            present & {"data.leakage"}) else ""
    return ""
