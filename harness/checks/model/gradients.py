"""Parameter counts and gradient flow at init: does every parameter get a usable gradient?

Seed 001 ("2.2 Parameter Count", "2.3 Gradient Flow Check": "NO GRADIENT!", "ZERO GRADIENT!") and seed 003 ("plotting
gradient norms of the different layers", with a bar chart of per-layer norms). Per parameter (named by its path in
the model, ``hidden/0/kernel``), from the gradient of the mean loss in eval mode at ``init_seeds`` inits:

* zero gradient -- every element exactly zero, at the init AND after ``zero_gradient_steps`` steps of sign
  gradient descent from it (Adam's first steps: :func:`.noise.sign_step`): the parameter does not influence the
  loss (an unused layer, a ``stop_gradient``, dead units in front of it), or the init traps it. The steps spare
  legitimate zero-init designs, whose gradient is zero only until the first step moves the zero weight (a
  zero-initialized residual branch output or gate, ReZero, Fixup, LoRA's B = 0, the zero-initialized softmax
  regression), and keep what training keeps: a random perturbation would break the symmetry of a zero-initialized
  MLP's hidden units, which training never breaks (their incoming and outgoing weights stay zero: the hidden
  kernels never get a gradient). Those are reported, naming the all-zero parameters.
* non-finite gradient -- a NaN/inf anywhere (sqrt or log at 0, a division by a zero norm).
* vanishing gradient -- a layer whose gradient norm relative to its parameter norm (the relative update SGD would
  make) is orders of magnitude below the median layer's (Glorot & Bengio, 2010; Hochreiter 1991). The ratio
  removes the scale differences between layers; the median makes it a comparison with the model's typical layer.
  Measured at init on the healthy builtins (MLPs of depth 1-4 with ReLU, tanh, GELU, ELU or
  sigmoid, widths 16-512, He/Glorot/LeCun inits, on digits, wine, breast_cancer and the regression; the CNN of
  depth 2-3): no layer falls below 0.17x the median. A depth-10 sigmoid MLP puts its first layer at ~7e-4x the
  median. Hence ``vanishing_gradient_ratio`` = 1e-2: two orders of magnitude, 17x under the healthy worst case.

A model whose outputs are the same for every example even after those steps is reported here too: no signal flows
from the inputs to the outputs (a zero-initialized linear model's outputs are identical only at init, and vary
after one step: it is not).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from harness.checks.model.settings import NAME, Settings
from harness.findings import Finding, error, warning


def layer_of(path: str) -> str:
    """The module a parameter belongs to: ``hidden/0/kernel`` -> ``hidden/0`` (a root parameter is its own)."""
    return path.rsplit("/", 1)[0] if "/" in path else path


def parameter_table(shapes: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """One row per layer: its parameters, their shapes and the number of scalars."""
    layers: dict[str, dict[str, Any]] = {}
    for path, shape in shapes.items():
        row = layers.setdefault(layer_of(path), {"layer": layer_of(path), "parameters": {}, "count": 0})
        row["parameters"][path.rsplit("/", 1)[-1]] = list(shape)
        row["count"] += int(math.prod(shape))
    return list(layers.values())


def parameter_outputs(table: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics (total and per layer) and a table series for report.json / W&B."""
    total = sum(r["count"] for r in table)
    metrics = {f"{NAME}/param_count": total, **{f"{NAME}/param_count/{r['layer']}": r["count"] for r in table}}
    series = {f"{NAME}/parameters": {
        "columns": ["layer", "parameters", "count"],
        "rows": [[r["layer"], ", ".join(f"{k} {tuple(v)}" for k, v in r["parameters"].items()), r["count"]]
                 for r in table],
    }}
    return metrics, series


def no_parameters_finding() -> Finding:
    return error(f"{NAME}.gradient_flow", "The model has no trainable parameters: nothing can learn.",
                 "Hold weights where the library trains them: nnx.Param in NNX (nnx.Linear and the other layers "
                 "do; a plain array or nnx.Variable attribute is not trained), the 'params' collection in Linen, "
                 "floating-point arrays in Equinox, hk.get_parameter in Haiku.", param_count=0)


def per_layer(grad_norm: dict[str, np.ndarray], param_norm: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per layer, medians over inits: gradient norm, parameter norm and their ratio."""
    grouped: dict[str, list[str]] = {}
    for path in grad_norm:
        grouped.setdefault(layer_of(path), []).append(path)
    out = {}
    for layer, paths in grouped.items():
        g = np.sqrt(sum(np.square(np.asarray(grad_norm[p], np.float64)) for p in paths))
        w = np.sqrt(sum(np.square(np.asarray(param_norm[p], np.float64)) for p in paths))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(w > 0, g / w, np.nan)
        out[layer] = {"grad_norm": float(np.median(g)), "param_norm": float(np.median(w)),
                      "ratio": float(np.median(ratio)) if np.all(np.isfinite(ratio)) else float("nan")}
    return out


def judge(stats, settings: Settings, dead_layers: list[str] = (), inputs_vary: bool = True,
          shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[list[Finding], dict[str, Any]]:
    """Findings and metrics from :class:`programs.InitStats` (host arrays). ``dead_layers``: activation layers
    whose every unit is dead (model.dead_units), named as the likely cause of zero gradients. ``inputs_vary``:
    the batch holds at least two different inputs (else identical outputs say nothing about the model).
    ``shapes``: parameter path -> shape; only weights (two or more dimensions) count as a zero init, since a zero
    bias is the ordinary init (Linen's and Haiku's default) and leaves no unit symmetric."""
    dead_note = (f" Every unit of {', '.join(dead_layers)} is dead (model.dead_units): nothing flows back through "
                 f"{'it' if len(dead_layers) == 1 else 'them'}." if dead_layers else "")
    findings: list[Finding] = []
    paths = list(stats.grad_norm)
    grad_median = {p: float(np.median(stats.grad_norm[p])) for p in paths}
    metrics: dict[str, Any] = {f"{NAME}/grad_norm/{p}": grad_median[p] for p in paths}
    seeds = len(next(iter(stats.grad_norm.values()))) if paths else 0

    nonfinite = [p for p in paths if not np.all(stats.grad_finite[p])]
    if nonfinite:
        findings.append(error(
            f"{NAME}.gradient_flow",
            f"Non-finite gradients at init for {len(nonfinite)} parameter(s): {_listed(nonfinite, settings)}, "
            f"although the loss is finite.",
            "A NaN/inf gradient with a finite loss comes from a function whose derivative blows up where it is "
            "evaluated: sqrt or a norm at 0 (use jnp.sqrt(x + eps) or optax.safe_norm), log at 0, a division by a "
            "zero denominator, or jnp.where with an unsafe branch (the double-where trick).",
            parameters=nonfinite[: settings.max_listed],
        ))

    zero = [p for p in paths if p not in nonfinite and np.all(stats.grad_zero[p])]
    steps = settings.zero_gradient_steps
    # All-zero parameters at init (every init) among them: a zero (or constant) init that training cannot leave.
    zero_init = [p for p in zero if np.all(np.asarray(stats.param_norm[p]) == 0)
                 and (shapes is None or len(shapes.get(p, ())) >= 2)]
    if zero:
        message = (f"Zero gradient for {len(zero)} of {len(paths)} parameters: {_listed(zero, settings)} (every "
                   f"element exactly 0 at init and after {steps} sign-gradient step{'s' if steps > 1 else ''} from "
                   f"it, in all {seeds} inits): they cannot learn.{dead_note}")
        suggestion = ("The loss does not depend on these parameters: a layer that is built but never called, its "
                      "output discarded or wrapped in jax.lax.stop_gradient, or dead units (all-zero ReLUs) in front "
                      "of it.")
        if zero_init:
            message += (f" {_listed(zero_init, settings)} {'is' if len(zero_init) == 1 else 'are'} all zero at init: "
                        f"the hidden units fed by zero weights all compute the same value (0) and get the same "
                        f"gradient (0), so training never breaks their symmetry.")
            suggestion = ("Initialize hidden layers randomly with a fan-in scaled init (He for ReLU, Glorot/LeCun "
                          "for tanh): zero init is fine for biases, for the output layer of a linear model and for a "
                          "residual branch's last layer, never for a layer whose units feed further hidden layers "
                          "through zero weights. " + suggestion)
        findings.append(error(
            f"{NAME}.gradient_flow", message, suggestion,
            parameters=zero[: settings.max_listed], count=len(zero), dead_layers=list(dead_layers),
            zero_initialized=zero_init[: settings.max_listed], steps=steps,
        ))

    layers = per_layer(stats.grad_norm, stats.param_norm)
    # Layers with an exactly zero gradient at init are left out: reported above when it persists, by design when it
    # does not (a zero-initialized branch); a ratio of 0 is no measure of "vanishing".
    at_init = [p for p in paths if np.any(stats.grad_zero_at_init[p])]
    ratios = {k: v["ratio"] for k, v in layers.items()
              if np.isfinite(v["ratio"]) and not any(layer_of(p) == k for p in zero + nonfinite + at_init)}
    if len(ratios) >= 2:
        median = float(np.median(list(ratios.values())))
        metrics[f"{NAME}/grad_ratio_median"] = median
        vanishing = {k: r for k, r in ratios.items() if r < settings.vanishing_gradient_ratio * median}
        if vanishing and median > 0:
            listed = ", ".join(f"{k} {r / median:.1e}x" for k, r in list(vanishing.items())[: settings.max_listed])
            findings.append(warning(
                f"{NAME}.gradient_flow",
                f"Vanishing gradients at init: the relative gradient |grad| / |param| of {listed} the median "
                f"layer's ({median:.2g}), below {settings.vanishing_gradient_ratio:g}x: these layers barely move.",
                "Gradients shrink through many saturating layers: use ReLU-family activations with He init, "
                "fewer layers, residual connections or normalization layers (Glorot & Bengio 2010; He et al. 2016).",
                layers={k: r / median for k, r in vanishing.items()}, median_ratio=median,
                threshold=settings.vanishing_gradient_ratio,
            ))
    for layer, v in layers.items():
        if np.isfinite(v["ratio"]):  # undefined for layers whose parameters are all zero at init
            metrics[f"{NAME}/grad_ratio/{layer}"] = v["ratio"]

    if inputs_vary and np.all(stats.outputs_constant):
        findings.append(error(
            f"{NAME}.gradient_flow",
            f"The outputs are identical for every example of the batch, at init and after {steps} sign-gradient "
            f"step{'s' if steps > 1 else ''} from it: no signal flows from the inputs to the outputs.{dead_note}",
            "The forward pass ignores its input: check that the input reaches the first layer (not a constant, "
            "a zeroed or overwritten tensor) and that no layer multiplies it by zero.",
            inits=len(stats.outputs_constant), dead_layers=list(dead_layers),
        ))
    return findings, metrics


def _listed(items: list[str], settings: Settings) -> str:
    more = len(items) - settings.max_listed
    return ", ".join(items[: settings.max_listed]) + (f" and {more} more" if more > 0 else "")


def draw(path: str, grad_norm: dict[str, float], zero: set[str], nonfinite: set[str]) -> None:
    """Per-parameter gradient norms at init (median over inits), log scale; zero and non-finite ones marked."""
    import matplotlib.pyplot as plt

    names = list(grad_norm)
    values = np.array([grad_norm[n] for n in names], dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    floor = positive.min() / 10 if positive.size else 1e-12
    heights = np.where(np.isfinite(values) & (values > 0), values, floor)
    colors = ["tab:red" if n in zero or n in nonfinite else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * len(names) + 2), 4.0))
    x = np.arange(len(names))
    ax.bar(x, heights, color=colors)
    for i, n in enumerate(names):
        if n in zero or n in nonfinite:
            ax.annotate("0" if n in zero else "NaN", (i, floor), ha="center", va="bottom", color="tab:red",
                        fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("gradient norm at init")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_title("Gradient norm per parameter (red: zero or non-finite)")
    fig.savefig(path)
    plt.close(fig)
