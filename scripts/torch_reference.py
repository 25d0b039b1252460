"""The hand-written sequential PyTorch reference that `scripts/bench.py` measures harness against.

    python scripts/torch_reference.py           # needs torch (CPU wheel: pip install torch --index-url
                                                # https://download.pytorch.org/whl/cpu); prints seconds per part
    python scripts/torch_reference.py --model cnn   # the same suite on harness's built-in CNN (or mlp_depth20)

The reference job's training diagnostics written the way a practitioner would by hand: one plain PyTorch training
loop, called once per run, one run after another. It trains the same runs as harness's default suite on the
reference job (an MLP 64-128-128-10, ReLU, Adam at 1e-3, batch 128, 500 steps on scikit-learn's digits):

  overfit one batch  32 examples, the configured LR and four probes (x0.01, x0.1, x10, x100); the first stops at
                     its target loss (0.01)
  seeds              4 seeds, then the same 4 again (bitwise determinism)
  controls           2 seeds on constant inputs, 2 on shuffled labels
  LR range           fastai's LR ramp (1e-5 to 1, stopped at 4x the best smoothed loss), a grid of 32 fixed LRs,
                     then 7 LRs around the grid's best with 5 fresh seeds each
  capacity           widths 8, 16, 32, 64 (the configured width is the seed runs)

``--model`` trains the same suite on the other models `scripts/bench.py` times: ``mlp_depth20`` (harness's
``model.depth=20``: 20 hidden layers of 128) and ``cnn`` (``data=digits_image model=cnn``: two 3x3 convolutions of
32 channels, 'same' padding, global average pooling, a dense head, on 8x8x1 images). The capacity ladder trains
the rungs harness trains on each: the smaller widths, and for the CNN, whose configured width underfits, width 64
too (on the MLPs the configured model fits, and no larger rung is trained).

Each run evaluates the validation loss every 50 steps and at its end, as harness's do. Nothing is shared between
runs but the data, which is what "sequential" means: the point of the comparison is what harness's one vmapped
program saves over this loop.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

STEPS, BATCH, LR, EVAL_EVERY = 500, 128, 1e-3, 50


def load(image: bool = False) -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].astype(np.float32) / 16.0, y[order].astype(np.int64)
    if image:
        x = x.reshape(-1, 1, 8, 8)  # PyTorch's (N, C, H, W)
    n_val = len(x) // 4
    return (torch.from_numpy(x[n_val:]), torch.from_numpy(y[n_val:]),
            torch.from_numpy(x[:n_val]), torch.from_numpy(y[:n_val]))


def mlp(width: int, seed: int, depth: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    sizes = [64] + [width] * depth
    layers = [m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def cnn(width: int, seed: int, depth: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    channels = [1] + [width] * depth
    layers = [m for a, b in zip(channels[:-1], channels[1:]) for m in (nn.Conv2d(a, b, 3, padding="same"), nn.ReLU())]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


# name -> (model builder, image inputs, configured width, the capacity ladder's rungs other than the configured one)
MODELS = {
    "mlp": (mlp, False, 128, (8, 16, 32, 64)),
    "mlp_depth20": (lambda width, seed: mlp(width, seed, depth=20), False, 128, (8, 16, 32, 64)),
    "cnn": (cnn, True, 32, (2, 4, 8, 16, 64)),
}
BUILD, _, WIDTH, RUNGS = MODELS["mlp"]  # main() sets the one --model names


def train(x, y, x_val, y_val, *, lr=LR, seed=0, width=None, steps=STEPS, batch=BATCH, target=None,
          lr_schedule=None, stop_factor=None) -> dict:
    """One run: sampled minibatches (a fresh permutation each epoch), Adam, the validation loss every EVAL_EVERY.
    It stops at a non-finite loss, at `target`, or (fastai's lr_find) once the bias-corrected EMA of the loss
    exceeds `stop_factor` times its lowest."""
    model = BUILD(WIDTH if width is None else width, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order, pos, losses, val = torch.randperm(len(x), generator=gen), 0, [], []
    smooth, best = 0.0, math.inf
    for step in range(steps):
        if lr_schedule is not None:
            for group in opt.param_groups:
                group["lr"] = lr_schedule(step)
        if pos + batch > len(x):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos:pos + batch] if batch < len(x) else order
        pos += batch
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]) or (target is not None and losses[-1] <= target):
            break
        if stop_factor is not None:
            smooth = 0.98 * smooth + 0.02 * losses[-1]
            best = min(best, smooth / (1 - 0.98 ** (step + 1)))
            if smooth / (1 - 0.98 ** (step + 1)) > stop_factor * best:
                break
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            with torch.no_grad():
                val.append(nn.functional.cross_entropy(model(x_val), y_val).item())
    return {"losses": losses, "val": val, "model": model}


def overfit_batch(x, y, x_val, y_val) -> None:
    xb, yb = x[:32], y[:32]
    train(xb, yb, x_val, y_val, batch=32, target=0.01)
    for factor in (0.01, 0.1, 10.0, 100.0):
        train(xb, yb, x_val, y_val, batch=32, lr=LR * factor)


def seeds(x, y, x_val, y_val) -> None:
    first = [train(x, y, x_val, y_val, seed=s) for s in range(4)]
    again = [train(x, y, x_val, y_val, seed=s) for s in range(4)]
    for a, b in zip(first, again):
        assert a["losses"] == b["losses"] and all(
            torch.equal(p, q) for p, q in zip(a["model"].parameters(), b["model"].parameters()))


def controls(x, y, x_val, y_val) -> None:
    for s in range(2):
        train(torch.zeros_like(x), y, x_val, y_val, seed=s)
        train(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(s))], x_val, y_val, seed=s)


def lr_range(x, y, x_val, y_val) -> None:
    ramp = lambda step: 1e-5 * (1.0 / 1e-5) ** (step / (STEPS - 1))  # noqa: E731
    train(x, y, x_val, y_val, lr_schedule=ramp, stop_factor=4.0)
    grid = np.geomspace(1e-5, 1.0, 32)
    runs = [train(x, y, x_val, y_val, lr=float(lr), seed=i) for i, lr in enumerate(grid)]
    final = [r["val"][-1] if len(r["losses"]) == STEPS and math.isfinite(r["losses"][-1]) else math.inf
             for r in runs]
    best = int(np.argmin(final))
    for lr in grid[max(best - 3, 0):best + 4]:
        for s in range(5):
            train(x, y, x_val, y_val, lr=float(lr), seed=100 + s)


def capacity(x, y, x_val, y_val) -> None:
    for width in RUNGS:
        train(x, y, x_val, y_val, width=width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the seconds per part here")
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp", help="the model the suite trains")
    args = parser.parse_args()
    global BUILD, WIDTH, RUNGS
    BUILD, image, WIDTH, RUNGS = MODELS[args.model]
    data = load(image)
    seconds = {}
    for part in (overfit_batch, seeds, controls, lr_range, capacity):
        start = time.perf_counter()
        part(*data)
        seconds[part.__name__] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())
    print(" ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), f"(torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(seconds, f)


if __name__ == "__main__":
    main()
