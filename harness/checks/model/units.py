"""Dead and saturated units, and vanishing activations: statistics of every activation function's output at init.

* Dead ReLUs: a rectifier unit whose output is exactly zero for every example of the batch gets no gradient and
  will not come back (Karpathy, "Yes you should understand backprop", 2016; CS231n "dying ReLU"). He-initialized
  ReLU layers on the healthy builtins have at most 16% of such units per layer (digits, depth 4; 9-12% in the
  reference MLP, 1% in the CNN), hence the 50% warning; a large negative bias or a learning-rate blow-up makes
  most of a layer dead.
* Saturated tanh/sigmoid units: outputs pinned at the asymptotes (|tanh| > 0.99, sigmoid outside [0.01, 0.99]) for
  most examples pass back almost no gradient (LeCun et al., "Efficient BackProp", 1998; Glorot & Bengio, 2010).
  Unscaled inputs or a too-large init do this to a whole layer (seed 003: normalize inputs "to avoid saturating
  activation functions").
* Vanishing activations: the spread of a layer's activations across examples, relative to the spread of the
  model's inputs, orders of magnitude below 1: the signal that distinguishes examples dies on the way forward
  (Glorot & Bengio, 2010: deep sigmoid networks). Healthy builtins stay above 0.05 (a 2-layer sigmoid MLP; ReLU,
  tanh, GELU and the CNN above 0.3); a 10-layer sigmoid MLP falls ~4x per layer, below 1e-3 from its 5th layer.
  Reported as ``model.dead_units`` (units that carry no signal).

Statistics are computed in the traced program (:func:`statistics`); :func:`judge` turns them into findings on the
host. A unit is the last axis of an activation (a hidden unit, a conv channel); examples and positions are pooled.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from harness.checks.model import capture
from harness.checks.model.settings import NAME, Settings
from harness.findings import Finding, error, warning

FUNCTIONS = tuple(capture.ACTIVATION_KINDS)  # activation names encoded as indices in the program's outputs


def spread(x) -> Any:
    """Mean over features of the standard deviation over examples."""
    rows = jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32)
    return jnp.mean(jnp.std(rows, axis=0))


def unit_rows(y):
    """(examples x positions, units) view of an activation whose first axis is the batch."""
    y = y.astype(jnp.float32)
    return y[:, None] if y.ndim == 1 else jnp.reshape(y, (-1, y.shape[-1]))


def statistics(activation: capture.Activation, thresholds: dict[str, Any]) -> dict[str, Any]:
    rows = unit_rows(activation.output)
    nan = jnp.float32(jnp.nan)
    kind = activation.kind
    dead = jnp.mean(jnp.all(rows == 0, axis=0)) if kind == "rectifier" else nan
    level = thresholds["saturation_level"]
    if kind in ("tanh", "sigmoid"):
        # At level 0.99: |tanh| > 0.99, sigmoid < 0.01 or > 0.99 (the seeds' and CS231n's rule of thumb).
        pinned = jnp.abs(rows) > level if kind == "tanh" else jnp.abs(rows - 0.5) > level - 0.5
        saturated = jnp.mean(jnp.mean(pinned, axis=0) >= thresholds["saturated_example_fraction"])
    else:
        saturated = nan
    return dict(
        function=jnp.int32(FUNCTIONS.index(activation.function)),
        units=jnp.int32(rows.shape[1]),
        dead=dead,
        saturated=saturated,
        spread=jnp.mean(jnp.std(rows, axis=0)),
        finite=jnp.all(jnp.isfinite(rows)),
    )


# --------------------------------------------------------------------------------------------------------------
# Host side.


def layer_table(unit_stats: dict[str, dict[str, np.ndarray]], input_spread: np.ndarray) -> list[dict[str, Any]]:
    """One row per activation layer in call order, statistics averaged over inits."""
    rows = []
    base = float(np.mean(input_spread))
    for name, s in unit_stats.items():
        spread_ = float(np.mean(s["spread"]))
        rows.append(dict(
            layer=name,
            function=FUNCTIONS[int(s["function"][0])],
            units=int(s["units"][0]),
            dead_fraction=float(np.mean(s["dead"])),
            dead_everywhere=bool(np.all(s["dead"] >= 1.0)),
            saturated_fraction=float(np.mean(s["saturated"])),
            saturated_everywhere=bool(np.all(s["saturated"] >= 1.0)),
            spread=spread_,
            spread_ratio=spread_ / base if base > 0 else float("nan"),
            finite=bool(np.all(s["finite"])),
        ))
    return rows


def judge(layers: list[dict[str, Any]], settings: Settings, seeds: int) -> list[Finding]:
    findings: list[Finding] = []
    over = lambda rows, key, limit: [r for r in rows if np.isfinite(r[key]) and r[key] > limit]  # noqa: E731
    inits = f"averaged over {seeds} init{'s' if seeds > 1 else ''}"

    dead = over(layers, "dead_fraction", settings.dead_unit_fraction)
    if dead:
        whole = [r for r in dead if r["dead_everywhere"]]
        worst = max(dead, key=lambda r: r["dead_fraction"])
        listed = ", ".join(f"{r['layer']} ({r['function']}) {r['dead_fraction']:.0%}"
                           for r in dead[: settings.max_listed])
        message = (f"Dead units at init: {listed} of the layer's units output exactly zero for every example of the "
                   f"batch ({inits}).")
        if whole:
            message += f" Every unit of {', '.join(r['layer'] for r in whole)} is dead: nothing flows through it."
        suggestion = ("Dead ReLUs never recover (their gradient is zero): check the bias init (a large negative "
                      "constant kills units), use He initialization, normalize the inputs, or use a leaky "
                      "activation (leaky_relu, gelu).")
        make = error if whole else warning
        findings.append(make(f"{NAME}.dead_units", message, suggestion, layers=_evidence(dead, "dead_fraction"),
                             worst_layer=worst["layer"], worst_fraction=worst["dead_fraction"],
                             threshold=settings.dead_unit_fraction))

    saturated = over(layers, "saturated_fraction", settings.saturated_unit_fraction)
    if saturated:
        whole = [r for r in saturated if r["saturated_everywhere"]]
        worst = max(saturated, key=lambda r: r["saturated_fraction"])
        listed = ", ".join(f"{r['layer']} ({r['function']}) {r['saturated_fraction']:.0%}"
                           for r in saturated[: settings.max_listed])
        level = settings.saturation_level
        message = (f"Saturated units at init: {listed} of the layer's units sit at their asymptote (|tanh| > {level}, "
                   f"sigmoid outside [{1 - level:.2g}, {level}]) for at least "
                   f"{settings.saturated_example_fraction:.0%} of the examples ({inits}); their gradient is nearly "
                   f"zero.")
        suggestion = ("Normalize the inputs (zero mean, unit variance), use a fan-in scaled init (Glorot for "
                      "tanh/sigmoid) instead of a fixed large scale, or switch to ReLU with He init.")
        make = error if whole else warning
        findings.append(make(f"{NAME}.saturated_units", message, suggestion,
                             layers=_evidence(saturated, "saturated_fraction"), worst_layer=worst["layer"],
                             worst_fraction=worst["saturated_fraction"], threshold=settings.saturated_unit_fraction,
                             saturation_level=level))

    # Vanishing signal: skip layers already reported dead or saturated (the same symptom, named more precisely).
    reported = {r["layer"] for r in dead + saturated}
    vanishing = [r for r in layers if r["layer"] not in reported and np.isfinite(r["spread_ratio"])
                 and r["spread_ratio"] < settings.vanishing_activation_ratio]
    if vanishing:
        listed = ", ".join(f"{r['layer']} ({r['function']}) {r['spread_ratio']:.1e}"
                           for r in vanishing[: settings.max_listed])
        findings.append(warning(
            f"{NAME}.dead_units",
            f"Activations vanish at init: the spread of {listed} across examples, relative to the spread of the "
            f"inputs, is below {settings.vanishing_activation_ratio:g}; deeper layers see nearly the same value for "
            f"every example ({inits}).",
            "Use an init that preserves the variance of the signal (He for ReLU, Glorot for tanh; Glorot & Bengio "
            "2010), fewer layers, residual connections or normalization layers; avoid deep sigmoid stacks.",
            layers=_evidence(vanishing, "spread_ratio"), threshold=settings.vanishing_activation_ratio,
        ))
    return findings


def _evidence(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    return {r["layer"]: round(float(r[key]), 6) for r in rows}


def metrics(layers: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in layers:
        if np.isfinite(r["dead_fraction"]):
            out[f"{NAME}/dead_fraction/{r['layer']}"] = r["dead_fraction"]
        if np.isfinite(r["saturated_fraction"]):
            out[f"{NAME}/saturated_fraction/{r['layer']}"] = r["saturated_fraction"]
        out[f"{NAME}/activation_spread/{r['layer']}"] = r["spread"]
    return out


def draw(path: str, layers: list[dict[str, Any]], settings: Settings) -> None:
    """Fraction of dead / saturated units per activation layer (bars) and the activations' spread relative to the
    inputs (log scale), in call order, with the thresholds the checks use."""
    import matplotlib.pyplot as plt

    names = [f"{r['layer']}\n{r['function']}" for r in layers]
    x = np.arange(len(layers))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(6.4, 0.6 * len(layers) + 2), 5.2))
    dead = [r["dead_fraction"] if np.isfinite(r["dead_fraction"]) else 0.0 for r in layers]
    sat = [r["saturated_fraction"] if np.isfinite(r["saturated_fraction"]) else 0.0 for r in layers]
    top.bar(x - 0.2, dead, width=0.4, label="dead (ReLU: 0 for every example)", color="tab:red")
    top.bar(x + 0.2, sat, width=0.4, label="saturated (tanh/sigmoid)", color="tab:orange")
    top.axhline(settings.dead_unit_fraction, color="tab:red", ls="--", lw=0.8)
    if settings.saturated_unit_fraction != settings.dead_unit_fraction:
        top.axhline(settings.saturated_unit_fraction, color="tab:orange", ls="--", lw=0.8)
    top.set_ylim(0, 1.05)
    top.set_ylabel("fraction of units")
    top.legend(fontsize=8, loc="upper left")
    ratios = np.array([r["spread_ratio"] if np.isfinite(r["spread_ratio"]) and r["spread_ratio"] > 0 else np.nan
                       for r in layers])
    bottom.plot(x, ratios, "o-", color="tab:blue")
    bottom.axhline(settings.vanishing_activation_ratio, color="tab:blue", ls="--", lw=0.8,
                   label="vanishing below this")
    bottom.set_yscale("log")
    finite = ratios[np.isfinite(ratios)]
    low = min([settings.vanishing_activation_ratio / 3, *finite.tolist()])
    high = max([10.0, *finite.tolist()])
    bottom.set_ylim(low / 2, high * 2)  # always shows 1 and the threshold: the scale stays honest
    bottom.set_ylabel("activation std / input std")
    bottom.legend(fontsize=8, loc="lower left")
    bottom.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    fig.suptitle("Activation statistics per layer at init (dashed: thresholds)")
    fig.savefig(path)
    plt.close(fig)
