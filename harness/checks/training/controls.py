"""Does the model learn anything from the inputs? The constant-input baseline and the shuffled-label control.

Two controls, trained exactly like the configured job (same lr, batch size, steps, seeds):

* **Constant inputs** (``input_scale = 0``: every input all zeros). Karpathy's "input-independent baseline" (A
  Recipe for Training Neural Networks, 2019) and seed 003's "fit the model on constant values ... This
  data-independent model should perform worse than the one fitted on the real data". It can only learn the label
  frequencies (the mean target for regression).
* **Shuffled labels** (``label_seed >= 0``: the training labels randomly permuted). The labels keep their
  frequencies but lose any relation to the inputs (Zhang et al. 2017, "Understanding deep learning requires
  rethinking generalization"). A big model memorizes them on the training set, so the comparison is on the
  validation set, where memorized noise does not help.

The real-data runs must beat both on validation loss by a margin: ``margin_std`` times the seed-to-seed standard
deviation of the real runs' validation loss (the noise floor, from the seeds diagnostic), and at least
``margin_fraction`` of the control's loss, a minimum effect size: with only a few seeds the measured spread can be
tiny, and a model within 1% of the input-independent loss has learned nothing useful from its inputs. For
classification, a validation accuracy clearly above the control's also counts as signal: an over-confident model
can have a worse cross-entropy than the label prior while classifying far better. "Clearly" is strict, because
the constant baseline's accuracy (always the training set's majority class) can sit below chance, and because a
model trained on labels unrelated to its inputs still sorts its inputs into their clusters and gives each cluster
one label: its validation accuracy is then a draw over classes, not over examples (on digits, 2 of 10 classes
given their own label score 20% where chance is 10%). So the real accuracy must beat the best accuracy of any
predictor without signal, chance (``sum_c p_train(c) p_val(c)``) and both controls' (the shuffled-label control
is one such draw), by 3 standard errors of a difference of two accuracies on the validation set (the case that
motivated it: ``zoo/results_budget.md``). On digits with misaligned labels, a real run at 13% against a constant
baseline at 9% is within it (chance is 10%). Otherwise
``train.no_signal``: labels misaligned with the inputs, labels that are noise, or a model that does not use its
inputs.

Costs: the real-data runs are the seeds diagnostic's request (same members, same TrainSpec), so the memo makes them
free; the controls are one request of 2 + 2 members with that TrainSpec, the same width as the seed runs (4
members), so they reuse its compiled program: the whole diagnostic is one run and no compile.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from harness.checks.base import Context, Outcome, Plot, require_at_least
from harness.checks.training import seeds
from harness.engine import devices
from harness.engine.table import Request
from harness.engine.core import Hparams
from harness.engine.driver import SweepResult, eval_size
from harness.errors import HarnessError
from harness.findings import Finding, error

CONTROLS = ("constant_input", "shuffled_labels")
LABELS = {"real": "real data", "constant_input": "constant inputs", "shuffled_labels": "shuffled labels"}


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 500
    members_per_control: int = 2
    margin_std: float = 2.0
    margin_fraction: float = 0.01

    def validate(self, key: str):
        require_at_least(self, key, "steps", 1)
        require_at_least(self, key, "members_per_control", 1)
        if self.margin_std < 0:
            raise HarnessError(f"must be zero or more, got {self.margin_std}", key=f"{key}.margin_std")
        if not 0 <= self.margin_fraction < 1:
            raise HarnessError(f"must be in [0, 1), got {self.margin_fraction}", key=f"{key}.margin_fraction")


def control_hparams(ctx: Context, per_control: int) -> tuple[Hparams, list[str]]:
    """Constant-input members then shuffled-label members (seeds ``seed, seed+1, ...`` for init, batch order and
    the label permutation), padded to a block of members so the request has the seed runs' program width."""
    k = per_control
    member_seeds = ctx.seed + np.tile(np.arange(k), 2)
    hp = Hparams.make(
        lr=ctx.optim.lr, weight_decay=ctx.optim.weight_decay, init_seed=member_seeds, data_seed=member_seeds,
        input_scale=np.r_[np.zeros(k), np.ones(k)],
        label_seed=np.r_[-np.ones(k), ctx.seed + np.arange(k)],
    )
    hp = Hparams(*devices.pad_members(hp, seeds.round_up(2 * k)))  # padding repeats the last member; dropped
    return hp, [CONTROLS[0]] * k + [CONTROLS[1]] * k


# ---------------------------------------------------------------------------------------------------------------
# The comparison (host arrays in, verdict out).


@dataclasses.dataclass(frozen=True)
class Comparison:
    control: str
    control_loss: float
    real_loss: float
    loss_gap: float  # control - real: positive when the real data do better
    loss_margin: float
    control_accuracy: float | None = None
    real_accuracy: float | None = None
    accuracy_gap: float | None = None
    accuracy_margin: float | None = None

    @property
    def beaten_on_loss(self) -> bool:
        return self.loss_gap > self.loss_margin

    @property
    def beaten_on_accuracy(self) -> bool:
        return self.accuracy_gap is not None and self.accuracy_gap > self.accuracy_margin

    @property
    def beaten(self) -> bool:
        return self.beaten_on_loss or self.beaten_on_accuracy


def finite_mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def accuracy_noise(p: float, n_val: int) -> float:
    """Three standard errors of the difference of two accuracies near ``p``, each measured on ``n_val`` predictions
    (binomial): smaller accuracy differences are within the validation set's sampling noise."""
    p = min(max(p, 0.0), 1.0)
    return 3.0 * math.sqrt(2.0 * max(p * (1.0 - p), 1e-12) / max(n_val, 1))


def chance_accuracy(y_train, y_val, num_classes: int) -> float:
    """The expected accuracy of predictions unrelated to the inputs that follow the training label frequencies:
    ``sum_c p_train(c) p_val(c)``, over real positions for per-position labels (negative labels are padding, which
    accuracy ignores)."""
    def frequencies(y):
        y = np.asarray(y, np.int64).ravel()
        y = y[y >= 0]
        return np.bincount(y, minlength=num_classes)[:num_classes] / max(len(y), 1)

    return float(np.dot(frequencies(y_train), frequencies(y_val)))


def compare(control: str, real_loss: np.ndarray, control_loss: np.ndarray, loss_std: float, settings: Settings,
            real_acc: np.ndarray | None = None, control_acc: np.ndarray | None = None, acc_std: float = 0.0,
            n_val: int = 0, unrelated: float = 0.0) -> Comparison:
    """The real runs against one control. ``unrelated``: the best accuracy of predictions unrelated to the labels
    (chance, and the other controls'), which the real accuracy must beat as well as this control's."""
    real, ctrl = finite_mean(real_loss), finite_mean(control_loss)
    std = loss_std if np.isfinite(loss_std) else 0.0
    margin = max(settings.margin_std * std, settings.margin_fraction * abs(ctrl))
    fields: dict[str, Any] = {}
    if real_acc is not None and control_acc is not None:
        ra, ca = finite_mean(real_acc), finite_mean(control_acc)
        baseline = max(ca, unrelated)
        acc_std = acc_std if np.isfinite(acc_std) else 0.0
        fields = dict(control_accuracy=ca, real_accuracy=ra, accuracy_gap=ra - baseline,
                      accuracy_margin=max(settings.margin_std * acc_std, accuracy_noise(baseline, n_val)))
    return Comparison(control, ctrl, real, ctrl - real, margin, **fields)


def no_signal_finding(comparisons: list[Comparison], loss_std: float, settings: Settings) -> Finding | None:
    failed = [c for c in comparisons if not c.beaten]
    if not failed:
        return None
    real = comparisons[0].real_loss
    parts = ", ".join(f"{LABELS[c.control]} {c.control_loss:.4g}" for c in comparisons)
    names = " or ".join(LABELS[c.control] for c in failed)
    # The seed spread counts only runs that trained (seeds.spread); when none did there is no noise floor and the
    # margin is the minimum effect size alone.
    spread = f"seed std {loss_std:.2g}" if np.isfinite(loss_std) else "no seed run trained, so no seed std"
    message = (f"Training on the real data does no better than training on {names}: validation loss {real:.4g} "
               f"({spread}) vs {parts}; the real data had to be lower by at least "
               f"{max(c.loss_margin for c in failed):.3g}.")
    accuracy = [c for c in failed if c.accuracy_gap is not None]
    if accuracy:
        message += (f" Validation accuracy {accuracy[0].real_accuracy:.3f} vs "
                    + ", ".join(f"{LABELS[c.control]} {c.control_accuracy:.3f}" for c in accuracy) + ".")
    message += (" The model gets nothing from the inputs beyond the label frequencies: the labels carry no "
                "information it can learn.")
    suggestion = ("Check that inputs and labels are aligned (shuffle them with one permutation; inspect a few "
                  "(input, label) pairs and the label column), that the labels are not noise, and that the model "
                  "uses its input (a dropped or zeroed input gives the same symptom).")
    evidence: dict[str, Any] = {"real_val_loss": real, "real_val_loss_std": loss_std, "steps": settings.steps}
    for c in comparisons:
        evidence[f"{c.control}_val_loss"] = c.control_loss
        evidence[f"{c.control}_loss_margin"] = c.loss_margin
        if c.accuracy_gap is not None:
            evidence[f"{c.control}_val_accuracy"] = c.control_accuracy
            evidence["real_val_accuracy"] = c.real_accuracy
    evidence["failed_controls"] = [c.control for c in failed]
    return error("train.no_signal", message, suggestion, **evidence)


# ---------------------------------------------------------------------------------------------------------------
# The diagnostic.


def requests(ctx: Context, settings: Settings) -> list[Request]:
    """What :func:`run` is about to train (the pipeline merges it with the other diagnostics'): the controls; the
    real-data runs are the seeds diagnostic's request."""
    return [Request("controls", seeds.seed_spec(ctx, settings.steps),
                    control_hparams(ctx, settings.members_per_control)[0])]


def run(ctx: Context, settings: Settings) -> Outcome:
    out = Outcome("controls")
    real = seeds.real_runs(ctx, settings.steps)
    hp, kinds = control_hparams(ctx, settings.members_per_control)
    result = ctx.train("controls", seeds.seed_spec(ctx, settings.steps), hp)
    kinds_arr = np.array(kinds)
    rows = len(kinds)
    noise = seeds.spread(real, settings.steps)
    classification = real.val_accuracy is not None
    n_val = eval_size(len(ctx.arrays.x_val), ctx.engine.max_eval_examples, ctx.arrays.y_val)
    chance = (chance_accuracy(ctx.arrays.y_train, ctx.arrays.y_val[:n_val], ctx.dataset.num_classes)
              if classification else 0.0)
    # Accuracy is measured over predictions: one per example, or one per real (non-padding) position of a sequence.
    # Counting sequences instead put a language model's accuracy noise at 0.24 for 64 sequences of 32 tokens, and a
    # healthy one that beats the unigram control by 10 points was called "no signal".
    n_predictions = int(np.sum(np.asarray(ctx.arrays.y_val[:n_val]) >= 0)) if classification else n_val

    if noise["num_finite"] == 0:
        out.skipped = ("the real-data runs went non-finite at the configured learning rate, so there is nothing to "
                       "compare the controls with (see lr_range)")
        return out
    # The accuracy no predictor without signal beats: chance, and every control's (module docstring).
    unrelated = float(np.nanmax([chance, *(finite_mean(result.val_accuracy[:rows][kinds_arr == c, -1])
                                           for c in CONTROLS)])) if classification else 0.0
    comparisons = []
    for control in CONTROLS:
        pick = kinds_arr == control
        comparisons.append(compare(
            control, real.final_val_loss[~real.diverged], result.final_val_loss[:rows][pick],
            noise["val_loss_std"], settings,
            real.val_accuracy[~real.diverged, -1] if classification else None,
            result.val_accuracy[:rows][pick, -1] if classification else None,
            noise.get("val_accuracy_std", 0.0), n_predictions, unrelated,
        ))
    if np.isfinite(comparisons[0].control_loss):
        ctx.shared["constant_input_val_loss"] = float(comparisons[0].control_loss)
    finding = no_signal_finding(comparisons, noise["val_loss_std"], settings)
    if finding is not None:
        out.findings.append(finding)

    out.metrics["controls/val_loss/real"] = comparisons[0].real_loss
    out.metrics["controls/val_loss_std/real"] = noise["val_loss_std"]
    for c in comparisons:
        out.metrics[f"controls/val_loss/{c.control}"] = c.control_loss
        out.metrics[f"controls/gap/{c.control}"] = c.loss_gap
        out.metrics[f"controls/margin/{c.control}"] = c.loss_margin
        if c.accuracy_gap is not None:
            out.metrics[f"controls/val_accuracy/{c.control}"] = c.control_accuracy
    if classification:
        out.metrics["controls/val_accuracy/real"] = comparisons[0].real_accuracy
        out.metrics["controls/val_accuracy/chance"] = chance
    out.metrics["controls/signal"] = finding is None
    out.members = member_rows(ctx, real, result, kinds)
    groups = ["real"] * len(real.hparams) + kinds
    out.series["controls/loss"] = {"y": np.concatenate([real.loss, result.loss[:rows]]),
                                   "keys": [f"{LABELS[g]} #{i}" for i, g in enumerate(groups)]}
    out.plots.append(Plot("controls", "Real data vs constant inputs vs shuffled labels",
                          lambda path: draw(path, real, result.loss[:rows], kinds, comparisons)))
    out.metrics = seeds.headline_first(out.metrics, (
        "controls/signal", "controls/val_loss/real", "controls/val_loss/constant_input",
        "controls/val_loss/shuffled_labels"))
    return out


def member_rows(ctx: Context, real: SweepResult, result: SweepResult, kinds: list[str]) -> list[dict[str, Any]]:
    def row(control, res, i):
        h = res.hparams.rows()[i]
        r = {"control": control, "seed": int(h["init_seed"]), "input_scale": h["input_scale"],
             "label_seed": int(h["label_seed"]), "final_train_loss": float(res.final_train_loss[i]),
             "final_val_loss": float(res.final_val_loss[i])}
        if res.val_accuracy is not None:
            r["final_val_accuracy"] = float(res.val_accuracy[i, -1])
        return r

    return ([row("real", real, i) for i in range(len(real.hparams))]
            + [row(kind, result, i) for i, kind in enumerate(kinds)])


def draw(path: str, real: SweepResult, control_loss: np.ndarray, kinds: list[str], comparisons: list[Comparison]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    steps = np.arange(1, real.loss.shape[1] + 1)
    colors = {"real": "C0", "constant_input": "C1", "shuffled_labels": "C3"}
    val = {"real": comparisons[0].real_loss, **{c.control: c.control_loss for c in comparisons}}
    curves = [("real", real.loss[i]) for i in range(len(real.loss))] + list(zip(kinds, control_loss))
    labelled = set()
    for kind, curve in curves:
        label = None if kind in labelled else f"{LABELS[kind]} (val loss {val[kind]:.3g})"
        labelled.add(kind)
        ax.plot(steps, curve, color=colors[kind], lw=1, alpha=0.8, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (minibatch)")
    if np.nanmin(np.concatenate([real.loss.ravel(), np.ravel(control_loss)])) > 0:
        ax.set_yscale("log")
    ax.legend(fontsize="small")
    fig.savefig(path)
    plt.close(fig)
