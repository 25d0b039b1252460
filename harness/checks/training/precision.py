"""float32 against bfloat16: what only bfloat16 gets wrong on this setup.

The configured job (its learning rate, batch size and seeds ``seed, seed+1, ...``) trained for ``steps`` steps
twice: with the model computing in float32, and in bfloat16 (:func:`harness.models.adapters.with_precision`:
float32 parameters cast to bfloat16 inside the model together with floating inputs, outputs cast back to float32
before the loss). The run's own precision is the seed runs' request, so the memo answers it; the other precision is
one more request of the same members and TrainSpec, a program of its own (a Problem of its own: the compute dtype
is in the fingerprint). It runs by itself when ``precision=bfloat16`` (:func:`harness.config.from_hydra` adds it to
the run), and on request (``diagnostics.run=[...,precision]``) to ask what switching to bfloat16 would cost.

What it names (``train.precision``), each compared seed for seed with float32 so that only bfloat16's doing counts:

* **Non-finite only in bfloat16**: a member whose bfloat16 run goes NaN or inf while the same seed in float32
  stays finite. bfloat16 has float32's exponent range (largest value about 3.4e38), so this is almost never an
  overflow that float32 would survive; it is precision: bfloat16 keeps 8 significant bits (relative spacing 2^-8 to
  2^-7), so a difference of large numbers -- a variance as E[x^2] - E[x]^2, ``x - mean`` with ``|mean| >> std`` --
  rounds to 0 or below, and the sqrt, log or division after it gives inf or NaN. The first failing step is replayed
  from the member's last finite weights (:func:`harness.monitor.replay.locate`: inputs, each activation, outputs,
  loss, gradients) to say where it started, and again in float32 to show the same step is finite there.
* **A higher plateau in bfloat16**: both finite, but bfloat16's final training loss (mean over the seeds, on the
  fixed training subset) above float32's by more than ``margin_std`` standard errors of that difference (the seeds'
  scatter in each precision: the two runs of one seed decorrelate within a few hundred steps, so they are compared
  as two samples), by more than ``margin_fraction`` of float32's final loss (an effect size), and by more than 2%
  of the untrained loss (:data:`harness.checks.training.seeds.TRAINED_FRACTION`: a model that memorized its
  training set in both precisions, at 0.001 against 0.003, lost nothing that matters). Precision lost in the forward
  or backward pass (inputs with a large offset stored in steps of their spread, long sums) caps what training
  reaches.

What it does not name, and why:

* **Updates below bfloat16's resolution.** An update smaller than 2^-8 of its parameter would be rounded away if the
  parameters were stored in bfloat16. harness keeps float32 master weights (the optimizer adds each update in
  float32), so the parameters keep moving whatever the ratio; the ratio is measured (``update_ratio_bfloat16``,
  median over the second half of the run, and the fraction of steps under 2^-8) but not judged. Whatever the cast
  does cost shows in the loss, which the plateau rule compares.
* **Loss scaling.** harness applies no loss scale. A scale is float16's remedy for gradients that underflow its
  narrow range (smallest normal 6e-5); bfloat16's range is float32's, so bfloat16 training needs none, and there is
  no scale to be too large (overflow) or too small (underflow) to report. ``loss_scale`` says ``none``.
* Divergence in both precisions is not bfloat16's: the seeds, the controls and the LR range test report it.

Severity: with ``precision=bfloat16`` the bfloat16 runs are training as configured, so a non-finite bfloat16 run
is an ``error`` (and the cause of the training failures it makes elsewhere: :mod:`harness.causes`) and a higher
plateau a ``warning``; with ``precision=float32`` training as configured is unaffected, so they are a ``warning``
(a computation that breaks in bfloat16 is a real defect of the model code) and an ``info`` (what switching costs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harness.checks.base import Context, Outcome, Plot, require_at_least
from harness.checks.training import seeds
from harness.engine.core import Hparams, TrainSpec, scale_inputs
from harness.engine.driver import SweepResult
from harness.engine.table import Request
from harness.errors import HarnessError
from harness.findings import Finding, Severity

NAME = "precision"
BF16_SPACING = 2.0 ** -8  # bfloat16's relative spacing: 8 significant bits (2^-8 to 2^-7 of the value)


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 500
    num_seeds: int = 3
    margin_std: float = 2.0
    margin_fraction: float = 0.25

    def validate(self, key: str):
        require_at_least(self, key, "steps", 1)
        require_at_least(self, key, "num_seeds", 2, "a standard error needs two runs per precision")
        if self.margin_std < 0:
            raise HarnessError(f"must be zero or more, got {self.margin_std}", key=f"{key}.margin_std")
        if not self.margin_fraction >= 0:
            raise HarnessError(f"must be zero or more, got {self.margin_fraction}", key=f"{key}.margin_fraction")


def configured(ctx: Context) -> str:
    """The precision training as configured computes in."""
    return ctx.problem.model.precision


def other(precision: str) -> str:
    return "bfloat16" if precision == "float32" else "float32"


def run_spec(ctx: Context, settings: Settings) -> tuple[TrainSpec, Hparams]:
    """The seed runs' TrainSpec and members (final parameters returned: the replay starts from them): at the run's
    own precision this is the seeds diagnostic's request, trained once for both."""
    return seeds.seed_spec(ctx, settings.steps), seeds.seed_hparams(ctx, settings.num_seeds)


def requests(ctx: Context, settings: Settings) -> list[Request]:
    """The other precision's runs (for the budget's estimate: a Problem of its own never joins the member table).
    The run's own precision is the seeds diagnostic's request: announcing it again would train it twice."""
    spec, hparams = run_spec(ctx, settings)
    precision = other(configured(ctx))
    return [Request(f"{NAME}/{precision}", spec, hparams, problem=ctx.problem.at_precision(precision))]


# ---------------------------------------------------------------------------------------------------------------
# The judgement: pure comparisons of host arrays.


def _mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def update_ratio(result: SweepResult) -> tuple[float, float]:
    """Median |update| / |params| over the second half of the steps (members that stayed finite), and the fraction
    of those steps under bfloat16's spacing."""
    if result.update_norm is None or result.param_norm is None:
        return float("nan"), float("nan")
    half = result.loss.shape[1] // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (np.asarray(result.update_norm, np.float64)[:, half:]
                 / np.asarray(result.param_norm, np.float64)[:, half:])
    ratio = ratio[np.isfinite(ratio)]
    if not ratio.size:
        return float("nan"), float("nan")
    return float(np.median(ratio)), float(np.mean(ratio < BF16_SPACING))


def compare(f32: SweepResult, bf16: SweepResult, settings: Settings) -> dict[str, Any]:
    """The numbers the verdict rests on, member for member (the two results hold the same seeds in order)."""
    only_bf16 = bf16.diverged & ~f32.diverged
    both = ~bf16.diverged & ~f32.diverged
    loss_f = np.asarray(f32.final_train_loss, np.float64)[both]
    loss_b = np.asarray(bf16.final_train_loss, np.float64)[both]
    untrained = seeds.untrained_level(f32)
    mean_f, mean_b = _mean(loss_f), _mean(loss_b)  # over the seeds finite in both: the comparison
    gap = mean_b - mean_f
    n = int(both.sum())
    if n >= 2:
        se = float(np.sqrt(np.var(loss_f, ddof=1) / n + np.var(loss_b, ddof=1) / n))
    else:
        se = float("nan")
    ratio, under = update_ratio(bf16)
    first = np.asarray(bf16.first_nonfinite)[only_bf16]
    return {
        "members": int(len(f32.hparams)),
        "nonfinite_float32": int(f32.diverged.sum()),
        "nonfinite_bfloat16": int(bf16.diverged.sum()),
        "nonfinite_only_bfloat16": int(only_bf16.sum()),
        "first_nonfinite_step_bfloat16": int(first.min()) if first.size else -1,
        "untrained_loss": untrained,
        # Each precision's own finite runs (what each reaches) ...
        "final_train_loss_float32": _mean(np.asarray(f32.final_train_loss)[~f32.diverged]),
        "final_train_loss_bfloat16": _mean(np.asarray(bf16.final_train_loss)[~bf16.diverged]),
        "final_val_loss_float32": _mean(np.asarray(f32.final_val_loss)[~f32.diverged]),
        "final_val_loss_bfloat16": _mean(np.asarray(bf16.final_val_loss)[~bf16.diverged]),
        # ... and the comparison, over the seeds finite in both.
        "compared_members": n,
        "compared_train_loss_float32": mean_f,
        "compared_train_loss_bfloat16": mean_b,
        "loss_gap": gap,
        "loss_gap_std_error": se,
        "loss_ratio": mean_b / mean_f if mean_f > 0 else float("nan"),
        "update_ratio_bfloat16": ratio,
        "update_ratio_under_spacing": under,
        "loss_scale": "none",
    }


def plateau_higher(stats: dict[str, Any], settings: Settings) -> bool:
    """bfloat16's final training loss above float32's beyond the seeds' scatter, by a real fraction of float32's,
    and by a material part of the untrained loss (the module docstring)."""
    gap, se, untrained = stats["loss_gap"], stats["loss_gap_std_error"], stats["untrained_loss"]
    f32 = stats["compared_train_loss_float32"]
    if not (np.isfinite(gap) and np.isfinite(f32) and np.isfinite(untrained)):
        return False
    noise = se if np.isfinite(se) else 0.0
    return (gap > settings.margin_std * noise and gap > settings.margin_fraction * abs(f32)
            and gap > seeds.TRAINED_FRACTION * abs(untrained))


def findings(stats: dict[str, Any], settings: Settings, precision: str, origin: str = "") -> list[Finding]:
    """``train.precision`` for bfloat16-only non-finite runs, else for a higher plateau; none on a healthy setup.
    ``precision``: the configured one (the severities, module docstring); ``origin``: where the replayed failing
    step started, in words."""
    as_configured = precision == "bfloat16"
    steps = settings.steps
    evidence = {k: v for k, v in stats.items() if k != "loss_scale"}
    if stats["nonfinite_only_bfloat16"]:
        k, n = stats["nonfinite_only_bfloat16"], stats["members"]
        evidence["step"] = stats["first_nonfinite_step_bfloat16"]
        seen = (f"In bfloat16 the configured job went non-finite at step {stats['first_nonfinite_step_bfloat16']} "
                f"({k} of {n} seeds) while the same seeds in float32 stayed finite")
        if np.isfinite(stats["final_train_loss_float32"]):
            seen += f" (final training loss {stats['final_train_loss_float32']:.3g} after {steps} steps)"
        seen += (": a value computed in bfloat16 lost its precision (8 significant bits; its range is float32's, "
                 "so not an overflow float32 would survive)")
        seen += f". {origin}" if origin else "."
        fix = ("Look for a difference of large numbers followed by a sqrt, log or division: a variance as "
               "E[x^2] - E[x]^2, x - mean with |mean| >> std, inputs with a large offset; in bfloat16 it rounds to "
               "0 or below. Subtract the mean before squaring (jnp.var), standardize offset inputs in the data, "
               "compute that part in float32 (x.astype(jnp.float32)), add an eps, or train with precision=float32.")
        if not as_configured:
            seen += " Training as configured computes in float32 and is unaffected."
            fix = "Before switching to bfloat16: " + fix[0].lower() + fix[1:]
        return [Finding("train.precision", Severity.ERROR if as_configured else Severity.WARNING, seen, evidence,
                        fix)]
    if plateau_higher(stats, settings):
        seen = (f"In bfloat16 training ends at a training loss of {stats['compared_train_loss_bfloat16']:.3g} "
                f"against {stats['compared_train_loss_float32']:.3g} in float32 (means over the same "
                f"{stats['compared_members']} seeds "
                f"after {steps} steps; {stats['loss_gap'] / max(stats['loss_gap_std_error'], 1e-30):.1f} standard "
                f"errors of their scatter; untrained {stats['untrained_loss']:.3g}): precision lost in the forward or "
                f"backward pass caps what training reaches (the parameters are float32: this is not updates "
                f"rounded away).")
        fix = ("Look for inputs or activations with a large offset against their spread (bfloat16 resolves about 1 "
               "part in 256: an input of 300 +/- 1 is stored in steps of 2) and for long sums; standardize the "
               "inputs, compute the sensitive part in float32, or train with precision=float32.")
        if not as_configured:
            seen += " Training as configured computes in float32 and is unaffected."
        return [Finding("train.precision", Severity.WARNING if as_configured else Severity.INFO, seen, evidence,
                        fix)]
    return []


# ---------------------------------------------------------------------------------------------------------------
# The replay of the first bfloat16-only failure.


def replay_origin(ctx: Context, spec: TrainSpec, bf16: SweepResult, f32: SweepResult) -> tuple[str, dict[str, Any]]:
    """Where the first bfloat16-only non-finite step started: replayed eagerly in bfloat16 from that member's last
    finite parameters (the engine stops updating a member at its first non-finite step) on the batch it drew then,
    in training mode (:func:`harness.monitor.replay.locate`), and whether the same step is finite in float32 (its
    loss and gradient). Best effort: ('', {}) when it cannot be replayed. The model's non-trainable state
    (BatchNorm statistics) is its initial one: the runs do not return it."""
    from harness.monitor.replay import locate

    only = np.flatnonzero(bf16.diverged & ~f32.diverged)
    if bf16.params is None or not only.size:
        return "", {}
    i = int(only[np.argmin(np.asarray(bf16.first_nonfinite)[only])])
    step = int(bf16.first_nonfinite[i])
    hp = bf16.hparams.take(i)
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[i]), bf16.params)
    x_train, y_train = ctx.arrays.x_train, ctx.arrays.y_train
    n = x_train.shape[0]
    index = np.asarray(jax.random.randint(jax.random.fold_in(jax.random.key(np.uint32(hp.data_seed)), step),
                                          (spec.batch_size,), 0, n))
    x = np.asarray(scale_inputs(jnp.asarray(x_train[index]), jnp.float32(hp.input_scale)))
    y = np.asarray(y_train[index])
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(np.uint32(hp.init_seed)), 0xD809), step)
    low, high = ctx.problem.at_precision("bfloat16"), ctx.problem.at_precision("float32")

    def apply(model, p, xb, rest):
        return model.apply(p, rest, xb, key=key, train=True, regularization=spec.regularization)[0]

    @jax.jit
    def float32_finite(p, xb, yb, rest):  # the same step in float32: its loss and gradient
        def loss(q):
            return jnp.mean(high.loss_fn(apply(high.model, q, xb, rest), yb))

        value, grads = jax.value_and_grad(loss)(p)
        return jnp.isfinite(value) & jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))

    try:
        init_key = jax.random.key(np.uint32(hp.init_seed))
        rest = jax.jit(lambda xb: low.model.init(init_key, xb).state)(jnp.asarray(x[:1]))
        origin = locate(lambda p, xb: apply(low.model, p, xb, rest), low.loss_fn, params, x, y,
                        name_path=low.model.name_path)
        finite32 = bool(float32_finite(params, jnp.asarray(x), jnp.asarray(y), rest))
    except Exception:  # noqa: BLE001 -- the finding stands without its location
        return "", {}
    # Not "origin": harness.causes reads that key as the cause (a "forward" origin names numerics); here the
    # cause is the precision, and the replay says where it shows.
    detail = {"replayed_step": step, "replayed_seed": int(hp.init_seed), "replay_stage": origin.stage,
              "replay_where": origin.where, "float32_step_finite": finite32}
    if origin.stage == "none":
        return "", detail
    said = f"Replaying step {step} (seed {int(hp.init_seed)}) from its last finite weights: {origin.describe()}"
    said += "; the same step in float32 is finite." if finite32 else "; in float32 the same step is not finite either."
    return said, detail


# ---------------------------------------------------------------------------------------------------------------
# The diagnostic.


def run(ctx: Context, settings: Settings) -> Outcome:
    out = Outcome(NAME)
    precision = configured(ctx)
    spec, hparams = run_spec(ctx, settings)
    runs: dict[str, SweepResult] = {}
    for p in (precision, other(precision)):  # the run's own first: the seed runs, already trained
        try:
            runs[p] = ctx.train(f"{NAME}/{p}", spec, hparams, problem=ctx.problem.at_precision(p))
        except HarnessError:
            raise
        except Exception as err:  # noqa: BLE001
            if p == "float32":
                raise
            return cannot_run(out, err, precision)
    f32, bf16 = runs["float32"], runs["bfloat16"]
    stats = compare(f32, bf16, settings)
    origin = ""
    if stats["nonfinite_only_bfloat16"]:
        origin, detail = replay_origin(ctx, spec, bf16, f32)
        stats.update(detail)
    out.findings = findings(stats, settings, precision, origin)
    out.metrics = {f"{NAME}/configured": precision,
                   **{f"{NAME}/{k}": v for k, v in stats.items() if not isinstance(v, (list, dict))}}
    seeds_ = [int(s) for s in np.asarray(hparams.init_seed)]
    out.series[f"{NAME}/loss"] = {"y": np.concatenate([f32.loss, bf16.loss]),
                                  "keys": [f"{p} seed {s}" for p in ("float32", "bfloat16") for s in seeds_]}
    out.members = [{"precision": p, "seed": s, "final_train_loss": float(r.final_train_loss[i]),
                    "final_val_loss": float(r.final_val_loss[i]), "first_nonfinite": int(r.first_nonfinite[i])}
                   for p, r in (("float32", f32), ("bfloat16", bf16)) for i, s in enumerate(seeds_)]
    out.plots.append(Plot("precision_curves", "Training loss in float32 and in bfloat16 (same seeds)",
                          lambda path: draw_curves(path, f32, bf16, seeds_)))
    return out


def cannot_run(out: Outcome, err: Exception, precision: str) -> Outcome:
    """The model does not compute in bfloat16 at all (an op that rejects mixed dtypes, a library check)."""
    from harness.findings import exception_message

    as_configured = precision == "bfloat16"
    said = (f"The model does not run in bfloat16: training it raised {type(err).__name__}: "
            f"{exception_message(err, 300)}.")
    if not as_configured:
        said += " Training as configured computes in float32 and is unaffected."
    out.findings = [Finding(
        "train.precision", Severity.ERROR if as_configured else Severity.WARNING, said,
        {"exception": type(err).__name__},
        "An op that requires equal dtypes meets a float32 constant or state: cast it to the input's dtype "
        "(c.astype(x.dtype)), or train with precision=float32.")]
    out.metrics = {f"{NAME}/configured": precision, f"{NAME}/runs_in_bfloat16": False}
    return out


def draw_curves(path: str, f32: SweepResult, bf16: SweepResult, seed_list):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    steps = np.arange(1, f32.loss.shape[1] + 1)
    for i, s in enumerate(seed_list):
        line, = ax.plot(steps, f32.loss[i], lw=1, label=f"float32, seed {s}")
        ax.plot(steps, bf16.loss[i], lw=1, ls="--", color=line.get_color(), label=f"bfloat16, seed {s}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (minibatch)")
    finite = np.concatenate([f32.loss.ravel(), bf16.loss.ravel()])
    finite = finite[np.isfinite(finite)]
    if finite.size and finite.min() > 0:
        ax.set_yscale("log")
    ax.legend(fontsize="x-small", ncol=2)
    fig.savefig(path)
    plt.close(fig)
