"""Would successive halving of the LR grid keep the LR that the full grid finds best? Simulated on real curves.

    .venv/bin/python scripts/successive_halving.py                     # digits, wine, breast_cancer, regression
    .venv/bin/python scripts/successive_halving.py --jobs digits --seeds 4

Successive halving (Jamieson & Talwalkar, AISTATS 2016) trains every grid LR for a few steps, keeps the better half
by validation loss, trains those further, and so on. Stopping a member saves nothing inside a program it shares
with others, so before building it into the engine this checks what it would cost in quality: for each job and
seed it trains the LR range test's grid (lr_range's defaults: 32 LRs, 500 steps) once with validation evaluations
every 25 steps, then replays each halving schedule on those curves (the survivors' curves are what they would have
been: halving changes no member's training). Printed per schedule: whether the grid's best final LR survives,
whether the LR test's reading (its smoothed best) does, the best survivor's final validation loss against the
grid's best, and the grid's member-steps against the full grid's.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from lr_quality import JOBS, context_for

SCHEDULES = ((125, 250), (250,))  # the steps at which the better half is kept


def replay(val: np.ndarray, eval_steps: np.ndarray, schedule: tuple[int, ...]) -> np.ndarray:
    """Indices of the grid points that survive ``schedule`` (``val``: grid points x evaluations)."""
    alive = np.arange(len(val))
    for t in schedule:
        j = int(np.argmin(np.abs(eval_steps - t)))
        alive = alive[np.argsort(val[alive, j], kind="stable")][: max(1, len(alive) // 2)]
    return alive


def member_steps(points: int, schedule: tuple[int, ...], steps: int) -> int:
    bounds = (0, *schedule, steps)
    return sum((points // 2 ** k) * (bounds[k + 1] - bounds[k]) for k in range(len(bounds) - 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="digits,wine,breast_cancer,regression")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    from harness.checks.training import lr_range

    kept = {s: [0, 0, 0] for s in SCHEDULES}  # best kept, reading kept, runs
    for job in args.jobs.split(","):
        for k in range(args.seeds):
            ctx = context_for(JOBS[job])
            settings = lr_range.Settings()
            plan, request = lr_range.train_request(ctx, settings, seed=ctx.seed + 100 * k)
            result = ctx.train("halving", dataclasses.replace(request.spec, eval_every=25), request.hparams)
            rows = np.arange(len(result.loss))[plan.grid_rows]
            val = np.asarray(result.val_loss, np.float64)[rows]
            val = np.where(np.isfinite(val), val, np.inf)
            eval_steps, final = np.asarray(result.eval_steps), val[:, -1]
            best = int(np.argmin(final))
            reading = lr_range.analyse(result, plan, ctx.shared)[1]
            read = int(np.argmin(np.abs(np.log(plan.grid_lrs / reading.best_lr))))
            line = [f"{job:14s} seed {k}  grid best lr {plan.grid_lrs[best]:.3g}"]
            for schedule in SCHEDULES:
                alive = replay(val, eval_steps, schedule)
                kept[schedule][0] += best in alive
                kept[schedule][1] += read in alive
                kept[schedule][2] += 1
                line.append(f"halving at {'/'.join(map(str, schedule))}: best {'kept' if best in alive else 'LOST'}, "
                            f"reading {'kept' if read in alive else 'LOST'}, loss {final[alive].min():.4g} against "
                            f"{final[best]:.4g}, "
                            f"{member_steps(len(val), schedule, plan.steps)}/{len(val) * plan.steps} member-steps")
            print(" | ".join(line), flush=True)
    for schedule, (b, r, n) in kept.items():
        print(f"halving at {'/'.join(map(str, schedule))}: the grid's best kept in {b}/{n} runs, the LR test's "
              f"reading in {r}/{n}")


if __name__ == "__main__":
    main()
