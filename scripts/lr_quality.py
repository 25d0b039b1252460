"""How good is an LR suggestion? Judge each rule by the validation loss that training at its LR reaches.

    .venv/bin/python scripts/lr_quality.py                        # digits, wine, regression (about 10 min here)
    .venv/bin/python scripts/lr_quality.py --jobs breast_cancer --baseline HEAD~1   # with an earlier rule beside
    .venv/bin/python scripts/lr_quality.py --jobs regression --steps 2000           # a horizon past grid_steps

For every job: the LR range test (harness/checks/training/lr_range.py) runs once per ramp seed, told the horizon it
is judged at (``train.steps`` = ``--steps``; its grid trains ``min(--steps, --grid-steps)`` steps and extrapolates
beyond); every rule turns that run into a suggested LR: ours (the reported ``suggested_lr``), fastai's ``valley``
(its smoothing, 4x stop and window), torch-lr-finder's steepest slope (its ``smooth_f=0.05``, 5x stop,
``skip_start=10, skip_end=5``) and Lightning's default (steepest gradient of the raw recorded curve,
``skip_begin=10, skip_end=1``), all computed from our own ramp; with ``--baseline REV``, also the reported rule of
lr_range.py at that git revision with its own defaults ("before"). Then ONE vmapped program per job trains, for
``--steps`` steps with the job's optimizer and batch size and ``--train-seeds`` seeds each (not the ramp's: fresh
inits and batch orders): every suggestion, and a fine grid of ``--fine`` LRs log-spaced over the range.

A rule's score is the mean-over-seeds validation loss at its LR divided by the best in hindsight (1.00 = as good
as the best fixed LR), averaged over ramp seeds; the worst ramp seed is shown too. The best in hindsight is the
lowest running mean of three neighbouring fine LRs: the lowest single mean of 48 noisy ones sits below every LR's
expected loss (the winner's curse), so scores against it (printed second) overstate every rule's loss by about
the noise. ``noise`` is the relative standard error of a seed-mean validation loss near the optimum: score
differences smaller than that are seed luck (wine's 45 validation examples make it 16% with 8 seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

JOBS = {
    "digits": [],  # the reference job: MLP 64-128-128-10 on digits/16, Adam 1e-3, batch 128
    "wine": ["data=wine"],
    "breast_cancer": ["data=breast_cancer"],
    "regression": ["data=regression"],
    "cnn": ["data=digits_image", "model=cnn"],
}


def context_for(overrides):
    from hydra import compose, initialize_config_dir

    from harness.checks.registry import DIAGNOSTICS
    from harness.config import config_dir, from_hydra
    from harness.pipeline import build_context

    # Only lr_range's settings matter here: drop the other diagnostics' nodes so this script does not depend on
    # their configs (they fall back to their Settings defaults).
    others = [f"~diagnostics.{name}" for name in DIAGNOSTICS if name != "lr_range"]
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", *others, *overrides])
    return build_context(from_hydra(cfg))


def rule_suggestions(result, plan, lr_range, refinement=None) -> dict[str, float | None]:
    """Every rule's LR from one LR range run (and its second round, when it ran)."""
    from harness.checks.training import curves

    ramp, reading, _, suggestion = lr_range.analyse(result, plan, {}, refinement)
    raw = np.asarray(result.loss[0], dtype=np.float64)
    lrs = ramp.lrs
    # torch-lr-finder: its own smoothing and divergence threshold, then its skips.
    tlf = curves.ema_unbiased_start(raw, 0.05)
    tlf_stop = curves.divergence_stop(tlf, 5.0)
    tlf_i = curves.steepest_index(tlf[:tlf_stop], skip_start=10, skip_end=5)
    light_i = curves.steepest_index(raw, skip_start=10, skip_end=1)
    out = {
        "ours": suggestion.lr,
        "valley": ramp.valley_lr,
        "steepest": float(lrs[tlf_i]) if tlf_i is not None else None,
        "lightning": float(lrs[light_i]) if light_i is not None else None,
    }
    # Candidates considered while choosing the reported rule (kept so the choice can be re-checked).
    if reading.learns_at_all:
        out["measured"] = suggestion.measured_lr  # before carrying it to the horizon (same as ours when not)
        out["grid_best"] = reading.best_lr  # the best window of neighbouring seeds, at a grid point
        out["grid_argmin_raw"] = float(reading.lrs[int(np.argmin(reading.val))])
    return out


def evaluate_job(name, overrides, args):
    from harness.checks.training import lr_range
    from harness.engine.core import Hparams

    ctx = context_for(overrides)
    # The LR range test as a user runs it, told the horizon it is judged at (train.steps=--steps); its grid trains
    # min(--steps, --grid-steps) steps and extrapolates beyond.
    settings = dataclasses.replace(lr_range.Settings(), horizon=args.steps, grid_steps=args.grid_steps)
    t0 = time.perf_counter()
    per_seed = []
    for seed in range(args.ramp_seeds):
        plan, result = lr_range.run_program(ctx, settings, seed=seed)
        refinement = lr_range.run_refinement(ctx, plan, result, seed=seed) if settings.refine else None
        per_seed.append(rule_suggestions(result, plan, lr_range, refinement))
    if args.baseline:
        # The reported rule of another revision of lr_range.py, with its own defaults, as a "before" column.
        old = baseline_module(args.baseline)
        for seed in range(args.ramp_seeds):
            plan, result = old.run_program(ctx, old.Settings(), seed=seed)
            per_seed[seed]["before"] = old.analyse(result, plan, {})[3].lr
    rules = list(per_seed[0])
    t_range = time.perf_counter() - t0

    fine = np.geomspace(settings.min_lr, settings.max_lr, args.fine)
    suggested = [per_seed[s].get(r) for s in range(args.ramp_seeds) for r in rules]
    suggested = [np.nan if v is None else v for v in suggested]
    lrs = np.concatenate([fine, np.nan_to_num(suggested, nan=settings.min_lr)])
    train_seeds = 100 + np.arange(args.train_seeds)  # not the ramp's seeds: judge on fresh inits and batch orders
    lr_col = np.repeat(lrs, len(train_seeds))
    seed_col = np.tile(train_seeds, len(lrs))
    hp = Hparams.make(lr=lr_col, weight_decay=ctx.optim.weight_decay, init_seed=seed_col, data_seed=seed_col)
    t1 = time.perf_counter()
    result = ctx.train("lr_quality", ctx.spec(args.steps), hp)
    val = np.where(result.diverged, np.inf, result.final_val_loss).reshape(len(lrs), len(train_seeds))
    mean_val = np.where(np.isfinite(val).all(axis=1), val.mean(axis=1), np.inf)
    curve = mean_val[: len(fine)]
    # The best in hindsight, two ways. "raw": the lowest of the fine grid's seed means, as this script always
    # reported; but the minimum of 48 noisy means is biased low (the winner's curse: on digits at 500 steps the
    # seed means scatter by ~5% around a basin flat over 1.5 decades, so the lowest sits below every LR's expected
    # loss). "smoothed" (the score): the lowest running mean of three neighbouring fine LRs (a 1.6x window of the
    # 1.27x-spaced grid), as the expected loss is smooth in log LR on that scale: three times the runs per point,
    # a third of the bias; a window touching a diverged LR is not a candidate.
    smooth = np.full(len(curve), np.inf)
    for i in range(1, len(curve) - 1):
        if np.isfinite(curve[i - 1: i + 2]).all():
            smooth[i] = curve[i - 1: i + 2].mean()
    best_i = int(np.argmin(smooth))
    best, best_raw = smooth[best_i], float(curve.min())
    # How much a seed mean moves by seed luck near the optimum: the relative standard error at the 8 best LRs.
    near = np.argsort(curve)[:8]
    noise = float(np.median(val[near].std(axis=1, ddof=1) / np.sqrt(val.shape[1]) / curve[near]))
    at = mean_val[len(fine):].reshape(args.ramp_seeds, len(rules))
    scores, raw_scores = at / best, at / best_raw
    for s in range(args.ramp_seeds):
        for j, r in enumerate(rules):
            if per_seed[s].get(r) is None:
                scores[s, j] = raw_scores[s, j] = np.inf
    t_train = time.perf_counter() - t1
    return dict(name=name, best_lr=float(fine[best_i]), best=float(best), noise=noise, rules=rules, scores=scores,
                raw_scores=raw_scores, lrs={r: [per_seed[s].get(r) for s in range(args.ramp_seeds)] for r in rules},
                seconds=(t_range, t_train))


def baseline_module(rev: str):
    """harness/checks/training/lr_range.py as of git revision ``rev``, imported as a module of its own."""
    import importlib.util
    import os
    import subprocess
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "show", f"{rev}:harness/checks/training/lr_range.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "lr_range_baseline.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("lr_range_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def print_table(rows, columns, file=None, key="scores"):
    head = f"{'job':<14}{'best lr':>9}{'best loss':>10}{'noise':>7}" + "".join(f"{c:>19}" for c in columns)
    print(head, file=file)
    for row in rows:
        cells = []
        for c in columns:
            j = row["rules"].index(c)
            mean, worst = np.mean(row[key][:, j]), np.max(row[key][:, j])
            cells.append(f"{mean:7.2f}x (max {worst:5.2f})" if np.isfinite(mean) else f"{'failed':>19}")
        print(f"{row['name']:<14}{row['best_lr']:9.2g}{row['best']:10.4f}{row['noise']:6.0%} "
              + "".join(f"{c:>19}" for c in cells),
              file=file)


def lr_range_default(name):
    from harness.checks.training import lr_range

    return getattr(lr_range.Settings(), name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="digits,wine,regression", help=f"comma-separated, from {', '.join(JOBS)}")
    parser.add_argument("--ramp-seeds", type=int, default=3)
    parser.add_argument("--train-seeds", type=int, default=8)
    parser.add_argument("--fine", type=int, default=48)
    parser.add_argument("--steps", type=int, default=500, help="the horizon: steps of the judging runs, and the "
                        "LR range test's train.steps")
    parser.add_argument("--grid-steps", type=int, default=lr_range_default("grid_steps"),
                        help="the LR range test's grid_steps (its cap; longer horizons are extrapolated)")
    parser.add_argument("--all-rules", action="store_true", help="also show the candidate rules considered")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also score the reported rule of lr_range.py at this git revision (column 'before')")
    args = parser.parse_args(argv)
    if args.baseline:  # one commit for the whole run, even if the branch moves meanwhile
        import os
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        args.baseline = subprocess.run(["git", "rev-parse", args.baseline], cwd=root, check=True,
                                       capture_output=True, text=True).stdout.strip()
    rows = []
    for name in args.jobs.split(","):
        row = evaluate_job(name, JOBS[name], args)
        rows.append(row)
        print(f"{name}: LR range {row['seconds'][0]:.0f}s, judging program {row['seconds'][1]:.0f}s; suggestions "
              + ", ".join(f"{r}={[None if x is None else round(x, 5) for x in v]}" for r, v in row["lrs"].items()),
              file=sys.stderr)
        print_table([row], row["rules"], file=sys.stderr)  # as it comes: a long run keeps what it measured
    columns = rows[0]["rules"] if args.all_rules else ["ours", *(["before"] if args.baseline else []), "valley",
                                                        "steepest", "lightning"]
    print(f"\nvalidation loss after {args.steps} steps at the suggested LR / best of {args.fine} fixed LRs, the "
          f"running mean of 3 neighbours (mean of {args.train_seeds} seeds; mean over {args.ramp_seeds} ramp seeds, "
          f"worst in brackets; the LR range test trained {min(args.steps, args.grid_steps)} steps)\n")
    print_table(rows, columns)
    print("\nthe same / the lowest single fine-LR mean (biased low by the winner's curse)\n")
    print_table(rows, columns, key="raw_scores")


if __name__ == "__main__":
    main()
