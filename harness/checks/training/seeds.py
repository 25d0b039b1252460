"""Seed-to-seed spread (the noise floor) and training determinism.

**Spread.** The configured job (``optim.lr``, ``batch_size``) trained from several seeds (init and batch order
``seed, seed+1, ...``) as members of one vmapped program. The standard deviation of their final validation loss is
the noise floor later diagnostics compare against (controls, lr_range, capacity): a difference smaller than the
run-to-run scatter of one configuration is not evidence of anything. Shared as ``ctx.shared["seed_spread"]``.
Only members that trained count (finite, final validation loss clearly below the untrained level): a broken
configuration (``optim.lr=3``) has no noise floor, not an enormous one, and its readers fall back to their
relative margins, so the LR range test can still say which learning rate works.

**Determinism.** "Fix random seeds to make sure running the same code twice results in the same result, it makes
debugging easier because it excludes some of the randomness from the picture" (seed 003, the checklist's
"Reproducibility"). The same seeds are trained again, on data loaded again from the user's factory
(``ctx.reloaded_arrays()``), as a request of the same member count and :class:`TrainSpec`: reruns of one compiled
program are bitwise identical on CPU (a member in a differently sized batch differs by ~1e-3, ../shared/ECOSYSTEM.md,
so only like is compared with like). In a full run the pipeline's member table (:mod:`harness.engine.table`)
trains the rerun as duplicate rows of the same call (identical members of one call must come out identical), so it
costs no program of its own; only data that came back different from the factory are trained on again, alone.
Losses at every step and final parameters must be bitwise equal; otherwise
``train.nondeterministic`` names the first differing step, by how much, and the likely cause: a data factory that
returns different arrays on each call (an unseeded shuffle), else nondeterministic ops. A model whose
initialization draws randomness outside its PRNG key (``np.random`` at construction) is caught separately: that
randomness is frozen into a compiled program when it is traced, so a rerun of the program cannot see it, but a
fresh process would; building the model twice from one key must give equal parameters.

Member counts: the seed request is rounded up to a multiple of :data:`MEMBER_BLOCK` members (the extra members are
extra seeds, used in the spread) so the controls' request (2 constant-input + 2 shuffled-label members) has the same
width and TrainSpec and reuses this compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from harness.checks.base import Context, Outcome, Plot, require_at_least
from harness.models.adapters import Model
from harness.engine.table import Request
from harness.engine.core import Arrays, Hparams, TrainSpec
from harness.engine.driver import SweepResult
from harness.findings import Finding, error

# Seeds and controls requests are padded to a multiple of this many members, so both are one program width
# (devices.padded_size then rounds up to the device count, which 4 already is for 1, 2 and 4 devices).
MEMBER_BLOCK = 4


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 500
    num_seeds: int = 3
    check_determinism: bool = True

    def validate(self, key: str):
        require_at_least(self, key, "steps", 1)
        require_at_least(self, key, "num_seeds", 2, "a spread needs two runs")


# ---------------------------------------------------------------------------------------------------------------
# The requests (controls builds the identical ones, so the memo makes them free).


def round_up(n: int, block: int = MEMBER_BLOCK) -> int:
    return -(-n // block) * block


def seed_values(ctx: Context, num_seeds: int) -> np.ndarray:
    """The seeds of the configured job's runs: ``seed, seed+1, ...``, rounded up to a block of members."""
    return ctx.seed + np.arange(round_up(num_seeds))


def seed_hparams(ctx: Context, num_seeds: int) -> Hparams:
    """The configured job (its LR and weight decay), one member per seed (init and batch order)."""
    seeds = seed_values(ctx, num_seeds)
    return Hparams.make(lr=ctx.optim.lr, weight_decay=ctx.optim.weight_decay, init_seed=seeds, data_seed=seeds)


def seed_spec(ctx: Context, steps: int) -> TrainSpec:
    """The seed runs' TrainSpec. Final parameters are returned (the determinism check compares them); the
    controls use this same spec, so one compiled program serves both diagnostics."""
    return ctx.spec(steps, return_params=True)


def requests(ctx: Context, settings: Settings) -> list[Request]:
    """What :func:`run` is about to train (the pipeline merges it with the other diagnostics')."""
    spec, hparams = seed_spec(ctx, settings.steps), seed_hparams(ctx, settings.num_seeds)
    first = [Request("seeds", spec, hparams)]
    if not settings.check_determinism:
        return first
    # The determinism check's second run, as rows of the same program beside the first: identical members of one
    # call are computed alike, so any difference is nondeterminism. Data loaded again are compared on the host;
    # only when they differ does the rerun train on them, by itself.
    return first + [Request("seeds/rerun", spec, hparams, rerun=True)]


def train_seeds(ctx: Context, steps: int, num_seeds: int) -> SweepResult:
    return ctx.train("seeds", seed_spec(ctx, steps), seed_hparams(ctx, num_seeds))


def real_runs(ctx: Context, steps: int) -> SweepResult:
    """The configured job's seed runs, for the diagnostics that compare against them (controls, the capacity
    ladder's configured rung): the seeds diagnostic's own request when it ran (so the memo answers), else the same
    request with its default seed count."""
    noise = ctx.shared.get("seed_spread")
    num_seeds = int(noise["num_seeds"]) if noise else Settings().num_seeds
    return train_seeds(ctx, steps, num_seeds)


# ---------------------------------------------------------------------------------------------------------------
# Spread.


# A member "trained" when its final validation loss is below the untrained level by this fraction of it: the
# untrained level is estimated from the first minibatches (128 examples each by default), whose sampling error is
# about 1% of the loss at init for cross-entropy on digits, so 2% (lr_range's relative margin too) keeps a member
# that stayed at the start, or died at the label prior, out of the noise floor.
TRAINED_FRACTION = 0.02


def untrained_level(result: SweepResult) -> float:
    """The loss before any update: the mean over members of the first step's minibatch loss (the engine records
    the loss at the parameters the step starts from, so step 0 is the freshly initialized model). NaN when no
    member has a finite first loss."""
    first = np.asarray(result.loss[:, 0], dtype=np.float64)
    first = first[np.isfinite(first)]
    return float(first.mean()) if first.size else float("nan")


def trained_members(result: SweepResult) -> np.ndarray:
    """Which members trained: finite throughout, and a final validation loss clearly below the untrained level.
    Only these measure the noise floor: a diverged or dead member's loss is the failure's size, not run-to-run
    scatter (with ``optim.lr=3`` on the reference job the runs end finite but blown up, at validation losses of
    2.4 to 47: a "standard deviation" of 22 on an untrained loss of 2.4, which put every later comparison "within
    noise")."""
    finite = ~result.diverged & np.isfinite(result.final_val_loss)
    untrained = untrained_level(result)
    if not np.isfinite(untrained):
        return finite
    below = np.asarray(result.final_val_loss, dtype=np.float64) < untrained - TRAINED_FRACTION * abs(untrained)
    return finite & below


def spread(result: SweepResult, steps: int) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1) over the members that trained (:func:`trained_members`). With
    fewer than two, the standard deviations are NaN: there is no noise floor, and its readers (controls, lr_range,
    capacity) fall back to their relative margins."""
    finite = ~result.diverged & np.isfinite(result.final_val_loss)
    trained = trained_members(result)
    out: dict[str, Any] = {"steps": int(steps), "num_seeds": int(len(result.hparams)),
                           "num_finite": int(finite.sum()), "num_trained": int(trained.sum()),
                           "untrained_loss": untrained_level(result)}
    columns = {"val_loss": result.final_val_loss, "train_loss": result.final_train_loss}
    if result.val_accuracy is not None:
        columns["val_accuracy"] = result.val_accuracy[:, -1]
    for name, values in columns.items():
        values = np.asarray(values, dtype=np.float64)[trained]
        out[f"{name}_mean"] = float(values.mean()) if values.size else float("nan")
        out[f"{name}_std"] = float(values.std(ddof=1)) if values.size >= 2 else float("nan")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Determinism: pure comparisons of host arrays.


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.itemsize}") if a.dtype.kind == "f" else a


def bitwise_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(_bits(a), _bits(b)))


def first_difference(a: np.ndarray, b: np.ndarray) -> dict[str, Any] | None:
    """Where two (members, steps) loss curves first differ bitwise: the step, the largest absolute difference
    there and over the whole run. None when they are identical."""
    different = _bits(a) != _bits(b)
    steps = np.flatnonzero(different.any(axis=0))
    if steps.size == 0:
        return None
    step = int(steps[0])
    gap = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {
        "first_step": step,
        "abs_diff_at_first_step": float(np.nanmax(gap[:, step])) if np.isfinite(gap[:, step]).any() else float("nan"),
        "max_abs_diff": float(np.nanmax(gap)) if np.isfinite(gap).any() else float("nan"),
        "members_differing": int(different.any(axis=1).sum()),
    }


def params_difference(a, b) -> dict[str, Any] | None:
    """Which parameter leaves differ bitwise, the largest absolute difference and where. None when identical."""
    leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree.leaves(b)
    differing, worst, worst_path = 0, 0.0, ""
    for (path, x), y in zip(leaves_a, leaves_b):
        if bitwise_equal(x, y):
            continue
        differing += 1
        gap = float(np.nanmax(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        if gap >= worst:
            worst, worst_path = gap, leaf_name(path)
    if not differing and len(leaves_a) == len(leaves_b):
        return None
    return {"leaves_differing": differing, "leaves": len(leaves_a), "max_abs_diff": worst, "worst_leaf": worst_path}


def leaf_name(path) -> str:
    """``hidden/1/kernel`` for a tree path (dict keys, list indices, attributes; NNX's ``.value`` dropped)."""
    parts = []
    for k in path:
        part = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        if part != "value":
            parts.append(str(part))
    return "/".join(parts)


def describe_array_difference(first: Arrays, second: Arrays) -> str | None:
    """How two loads of the training data differ (None when bitwise equal): reordered, resized or changed."""
    for name in ("x_train", "y_train", "x_val", "y_val"):
        a, b = np.asarray(getattr(first, name)), np.asarray(getattr(second, name))
        if bitwise_equal(a, b):
            continue
        if a.shape != b.shape:
            return f"{name} has shape {a.shape} on one call and {b.shape} on the other"
        rows = np.flatnonzero(np.any(_bits(a).reshape(len(a), -1) != _bits(b).reshape(len(b), -1), axis=1))
        if _same_rows(first, second, name):
            return (f"{name} holds the same examples in a different order ({rows.size} of {len(a)} rows moved): "
                    f"an unseeded shuffle")
        return f"{name} differs in {rows.size} of {len(a)} rows (unseeded sampling or augmentation?)"
    return None


def _same_rows(first: Arrays, second: Arrays, name: str) -> bool:
    """True when the split holds the same (input, label) examples in another order."""
    split = "train" if name.endswith("train") else "val"

    def rows(arrays):
        x = _bits(np.asarray(getattr(arrays, f"x_{split}"))).reshape(len(getattr(arrays, f"x_{split}")), -1)
        y = _bits(np.asarray(getattr(arrays, f"y_{split}"))).reshape(len(x), -1)
        return sorted(map(bytes, np.concatenate([x.view(np.uint8), y.view(np.uint8)], axis=1)))

    return rows(first) == rows(second)


def init_difference(model: Model, x, seed: int) -> dict[str, Any] | None:
    """Build the model twice from one PRNG key and compare parameters: randomness drawn outside the key
    (``np.random``, ``random``) shows here and not in a program rerun. It is drawn while the build is traced, so it
    lands in the traced program (a constant, a shape, an equation): the build is traced twice first
    (``jax.make_jaxpr``: no FLOPs, no compile), and two identical programs given the same key build identical
    parameters. Only builds whose programs differ, or call back to the host (which draws when run), are run, eagerly,
    to name the leaves that differ: run op by op, every eager operation compiles once per process (README,
    "Performance")."""
    def build():
        return model.init(jax.random.key(seed), x).params

    def trace():  # a new function each time: JAX reuses the trace of a function it has traced
        return jax.make_jaxpr(lambda: build())()

    if same_program(trace(), trace()):
        return None
    return params_difference(jax.device_get(build()), jax.device_get(build()))


def same_program(a, b) -> bool:
    """Two closed jaxprs are the same program: the same equations (their text) and bitwise-equal constants, with
    no host callback (whose values are drawn when run, not traced)."""
    text = str(a.jaxpr)
    if text != str(b.jaxpr) or "callback" in text or len(a.consts) != len(b.consts):
        return False
    try:
        return all(bitwise_equal(np.asarray(c), np.asarray(d)) for c, d in zip(a.consts, b.consts))
    except Exception:  # noqa: BLE001 -- a constant numpy cannot hold (a typed PRNG key): run the builds instead
        return False


# ---------------------------------------------------------------------------------------------------------------
# The diagnostic.


def run(ctx: Context, settings: Settings) -> Outcome:
    out = Outcome("seeds")
    first = train_seeds(ctx, settings.steps, settings.num_seeds)
    noise = spread(first, settings.steps)
    ctx.shared["seed_spread"] = {**noise, "result": first, "spec": seed_spec(ctx, settings.steps),
                                 "hparams": first.hparams}
    seeds = seed_values(ctx, settings.num_seeds)
    out.metrics.update({f"seeds/{k}": v for k, v in noise.items()})
    out.metrics["seeds/diverged"] = int(first.diverged.sum())
    out.members = [
        {"seed": int(s), "init_seed": int(s), "data_seed": int(s), "lr": float(ctx.optim.lr),
         "final_train_loss": float(first.final_train_loss[i]), "final_val_loss": float(first.final_val_loss[i]),
         **({"final_val_accuracy": float(first.val_accuracy[i, -1])} if first.val_accuracy is not None else {}),
         "first_nonfinite": int(first.first_nonfinite[i])}
        for i, s in enumerate(seeds)
    ]
    out.series["seeds/loss"] = {"y": first.loss, "keys": [f"seed {s}" for s in seeds]}
    rerun = None
    if settings.check_determinism:
        verdict, rerun = check_determinism(ctx, settings, first)
        out.findings.extend(verdict.pop("findings"))
        out.metrics.update({f"seeds/determinism/{k}": v for k, v in verdict.items()})
    out.plots.append(Plot("seed_curves", "Training loss per seed (dashed: the rerun)",
                          lambda path: draw_curves(path, first, rerun, seeds, noise)))
    out.metrics = headline_first(out.metrics, ("seeds/val_loss_mean", "seeds/val_loss_std",
                                               "seeds/determinism/deterministic", "seeds/num_seeds"))
    return out


def headline_first(metrics: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The same metrics with ``keys`` first: the report's summary shows a diagnostic's first few."""
    return {**{k: metrics[k] for k in keys if k in metrics}, **metrics}


def check_determinism(ctx: Context, settings: Settings, first: SweepResult) -> tuple[dict[str, Any], SweepResult]:
    """Rerun the seed request on reloaded data and compare bitwise; returns metrics (+ findings) and the rerun."""
    reloadable = ctx.reload_data is not None
    arrays = ctx.reloaded_arrays() if reloadable else ctx.arrays
    data_change = describe_array_difference(ctx.arrays, arrays) if reloadable else None
    again = ctx.train("seeds/rerun", seed_spec(ctx, settings.steps), first.hparams, arrays=arrays, rerun=True)
    losses = first_difference(first.loss, again.loss)
    params = params_difference(first.params, again.params)
    init = init_difference(ctx.problem.model, ctx.arrays.x_train[:1], int(ctx.seed))
    verdict: dict[str, Any] = {
        "deterministic": losses is None and params is None and init is None,
        "data_reloaded": reloadable,
        "data_identical": data_change is None,
        "init_identical": init is None,
        "first_differing_step": losses["first_step"] if losses else -1,
        "max_abs_loss_diff": losses["max_abs_diff"] if losses else 0.0,
        "max_abs_param_diff": params["max_abs_diff"] if params else 0.0,
    }
    verdict["findings"] = nondeterminism_findings(losses, params, init, data_change, settings)
    return verdict, again


def nondeterminism_findings(losses, params, init, data_change, settings: Settings) -> list[Finding]:
    findings = []
    if losses is not None or params is not None:
        if losses is not None:
            seen = (f"Two runs of the same seeds differ: the training loss first differs at step "
                    f"{losses['first_step']} (by {losses['abs_diff_at_first_step']:.3g}; up to "
                    f"{losses['max_abs_diff']:.3g} over {settings.steps} steps)")
        else:
            seen = "Two runs of the same seeds have bitwise-equal losses but different final parameters"
        if params is not None:
            seen += (f"; {params['leaves_differing']} of {params['leaves']} parameter arrays differ (largest "
                     f"{params['max_abs_diff']:.3g} in {params['worst_leaf']})")
        if data_change is not None:
            cause = f". The data factory returned different arrays on a second call: {data_change}."
            fix = ("Seed every random choice in the data factory (np.random.default_rng(seed) for the split and the "
                   "shuffle), or leave shuffling to the training loop.")
        else:
            cause = (". The data loaded identically, so the computation itself is nondeterministic (e.g. atomic "
                     "scatter-adds or reductions on GPU).")
            fix = ("Enable deterministic ops (XLA_FLAGS=--xla_gpu_deterministic_ops=true on GPU) and avoid "
                   "host-side randomness in the model or loss.")
        evidence = {"steps": settings.steps, "data_identical": data_change is None}
        if losses is not None:
            evidence.update(losses)
        if params is not None:
            evidence.update({f"params_{k}": v for k, v in params.items()})
        if data_change is not None:
            evidence["data_difference"] = data_change
        findings.append(error("train.nondeterministic", seen + cause, fix, **evidence))
    if init is not None:
        findings.append(error(
            "train.nondeterministic",
            f"Building the model twice from the same PRNG key gave different parameters ({init['leaves_differing']} "
            f"of {init['leaves']} arrays, largest difference {init['max_abs_diff']:.3g} in {init['worst_leaf']}): "
            f"the initialization draws randomness outside its key, so every process trains a different model.",
            "Draw every initial value from the key the model is given (nnx.Rngs, key=, Linen/Haiku's init key), "
            "never from np.random or random.",
            **{f"init_{k}": v for k, v in init.items()},
        ))
    return findings


def draw_curves(path: str, first: SweepResult, rerun: SweepResult | None, seeds, noise: dict[str, Any]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    steps = np.arange(1, first.loss.shape[1] + 1)
    for i, s in enumerate(seeds):
        line, = ax.plot(steps, first.loss[i], lw=1, label=f"seed {s}")
        if rerun is not None and not bitwise_equal(first.loss[i], rerun.loss[i]):
            ax.plot(steps, rerun.loss[i], lw=1, ls="--", color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (minibatch)")
    if np.nanmin(first.loss) > 0:
        ax.set_yscale("log")
    if noise["num_trained"] >= 2:
        ax.set_title(f"final val loss {noise['val_loss_mean']:.4g} ± {noise['val_loss_std']:.2g} (std over the "
                     f"{noise['num_trained']} seeds that trained)")
    else:
        ax.set_title(f"{noise['num_trained']} of {noise['num_seeds']} seeds trained: no noise floor")
    ax.legend(fontsize="small")
    fig.savefig(path)
    plt.close(fig)
