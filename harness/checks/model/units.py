"""Dead and saturated units, and vanishing activations: statistics of every activation function's output at init.

* Dead ReLUs: a rectifier unit whose output is exactly zero for every example of the batch gets no gradient and
  will not come back (Karpathy, "Yes you should understand backprop", 2016; CS231n "dying ReLU"). He-initialized
  ReLU layers on the healthy builtins have at most 16% of such units per layer (digits, depth 4; 9-12% in the
  reference MLP, 1% in the CNN), hence the 50% warning; a large negative bias or a learning-rate blow-up makes
  most of a layer dead.
* Saturated tanh/sigmoid units: outputs pinned at the asymptotes (|tanh| > 0.99, sigmoid outside [0.01, 0.99]) for
  most examples pass back almost no gradient (LeCun et al., "Efficient BackProp", 1998; Glorot & Bengio, 2010).
  Unscaled inputs or a too-large init do this to a whole layer (seed 003: normalize inputs "to avoid saturating
  activation functions"). Also per layer, from the pre-activations (DeepDiagnosis, Wardat et al., ICSE 2022: more
  than half of a tanh/sigmoid layer's inputs beyond +-5, where tanh' < 2e-4 and sigmoid' < 7e-3): a layer whose
  pre-activations have a spread of ~10 sits mostly in the flat tails although no unit is pinned for 90% of the
  examples (the signs vary by example). Healthy builtins and LeCun/Glorot tanh and sigmoid nets: 0% beyond +-5;
  tanh on N(0, 1) kernels of width 128: 61% in its second layer. One ``model.saturated_units`` finding names each
  layer with what each rule measured.
* Vanishing activations: the spread of a layer's activations across examples, relative to the spread of the
  model's inputs, orders of magnitude below 1: the signal that distinguishes examples dies on the way forward
  (Glorot & Bengio, 2010: deep sigmoid networks). Healthy builtins stay above 0.05 (a 2-layer sigmoid MLP; ReLU,
  tanh, GELU and the CNN above 0.3); a 10-layer sigmoid MLP falls ~4x per layer, below 1e-3 from its 5th layer.
  Reported as ``model.dead_units`` (units that carry no signal).
* Exploding activations (``model.exploding_activations``), the mirror: the root mean square of the activations
  grows across depth, compounding a per-layer gain above 1 (He et al., "Delving Deep into Rectifiers", 2015,
  section 2.2: the gain that keeps the scale; an unnormalized residual network's variance doubles per block,
  Zhang et al., "Fixup", 2019). Read per layer in call order (:func:`growth`): each layer's RMS over the lowest
  level before it (the inputs' RMS first, for float inputs), that level floored at 1, the scale variance-preserving
  inits and normalization layers aim at, so a normalization lifting tiny inputs back to unit scale is not growth,
  nor are large but flat activations (unscaled inputs). The layer where the growth starts is named. Measured at init
  on 4 inits: at most 1.0x on the healthy builtins, a He-initialized 20-layer ReLU MLP, a LeCun 10-layer tanh MLP,
  Linen/Equinox/Haiku MLPs and their BatchNorm versions, the Equinox CNN and the NNX transformer (2.1x without the
  floor: BatchNorm after a small first layer); 2e4x for 20 ReLU layers with N(0, 0.3^2) kernels (1.7x per layer).
  A warning from 10x (an order of magnitude), an error from 100x: the outputs, the loss and the gradients are off
  by orders of magnitude.

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
    if activation.function in ("tanh", "sigmoid") and activation.input is not None:
        # DeepDiagnosis (Wardat et al., ICSE 2022): pre-activations beyond +-5 sit in the flat tails.
        beyond = jnp.abs(activation.input.astype(jnp.float32)) > thresholds["preactivation_saturation"]
        preactivation_saturated = jnp.mean(beyond)
    else:
        preactivation_saturated = nan
    return dict(
        function=jnp.int32(FUNCTIONS.index(activation.function)),
        units=jnp.int32(rows.shape[1]),
        dead=dead,
        saturated=saturated,
        preactivation_saturated=preactivation_saturated,
        spread=jnp.mean(jnp.std(rows, axis=0)),
        rms=jnp.sqrt(jnp.mean(jnp.square(rows))),
        finite=jnp.all(jnp.isfinite(rows)),
    )


# --------------------------------------------------------------------------------------------------------------
# Host side.


def layer_table(unit_stats: dict[str, dict[str, np.ndarray]], input_spread: np.ndarray) -> list[dict[str, Any]]:
    """One row per activation layer in call order, statistics averaged over inits."""
    rows = []
    base = float(np.mean(input_spread))
    ordered = sorted(unit_stats.items(), key=lambda item: int(np.ravel(item[1].get("order", [0]))[0]))
    for name, s in ordered:
        spread_ = float(np.mean(s["spread"]))
        rows.append(dict(
            layer=name,
            function=FUNCTIONS[int(s["function"][0])],
            units=int(s["units"][0]),
            dead_fraction=float(np.mean(s["dead"])),
            dead_everywhere=bool(np.all(s["dead"] >= 1.0)),
            saturated_fraction=float(np.mean(s["saturated"])),
            saturated_everywhere=bool(np.all(s["saturated"] >= 1.0)),
            preactivation_saturated=float(np.mean(s["preactivation_saturated"])),
            preactivation_saturated_everywhere=bool(np.all(s["preactivation_saturated"] >= 1.0)),
            spread=spread_,
            rms=float(np.mean(s["rms"])),
            spread_ratio=spread_ / base if base > 0 else float("nan"),
            finite=bool(np.all(s["finite"])),
        ))
    return rows


def judge(layers: list[dict[str, Any]], settings: Settings, seeds: int, input_rms: float | None = None
          ) -> list[Finding]:
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

    saturated = saturated_layers(layers, settings)
    if saturated:
        findings.append(saturation_finding(saturated, settings, inits))

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
    exploding = exploding_finding(layers, input_rms, settings, inits)
    if exploding is not None:
        findings.append(exploding)
    return findings


def saturated_layers(layers: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """tanh/sigmoid layers saturated by either rule, in call order: most of their units pinned at an asymptote
    for most examples, or most of their pre-activations beyond +-``preactivation_saturation``."""
    def beyond(r, key, limit):
        value = r.get(key, float("nan"))
        return bool(np.isfinite(value) and value > limit)

    return [r for r in layers if beyond(r, "saturated_fraction", settings.saturated_unit_fraction)
            or beyond(r, "preactivation_saturated", settings.saturated_preactivation_fraction)]


def saturation_finding(saturated: list[dict[str, Any]], settings: Settings, inits: str) -> Finding:
    """One ``model.saturated_units`` finding naming each saturated layer with what each rule measured there."""
    level, pre_level = settings.saturation_level, settings.preactivation_saturation
    by_units = [r for r in saturated if np.isfinite(r["saturated_fraction"])
                and r["saturated_fraction"] > settings.saturated_unit_fraction]
    by_inputs = [r for r in saturated if np.isfinite(r.get("preactivation_saturated", np.nan))
                 and r["preactivation_saturated"] > settings.saturated_preactivation_fraction]
    parts = []
    for r in saturated[: settings.max_listed]:
        said = []
        if r in by_units:
            said.append(f"{r['saturated_fraction']:.0%} of its units pinned")
        if r in by_inputs:
            said.append(f"{r['preactivation_saturated']:.0%} of its pre-activations beyond +-{pre_level:g}")
        parts.append(f"{r['layer']} ({r['function']}): {' and '.join(said)}")
    rules = []
    if by_units:
        rules.append(f"a unit is pinned when it sits at its asymptote (|tanh| > {level}, sigmoid outside "
                     f"[{1 - level:.2g}, {level}]) for at least {settings.saturated_example_fraction:.0%} of the "
                     f"examples; more than {settings.saturated_unit_fraction:.0%} of a layer's units pinned")
    if by_inputs:
        rules.append(f"more than {settings.saturated_preactivation_fraction:.0%} of a layer's inputs beyond "
                     f"+-{pre_level:g}, where tanh' < 2e-4 and sigmoid' < 7e-3 (DeepDiagnosis' rule)")
    whole = [r for r in saturated if r.get("saturated_everywhere") or r.get("preactivation_saturated_everywhere")]
    worst = max(saturated, key=lambda r: max(np.nan_to_num(r["saturated_fraction"]),
                                             np.nan_to_num(r.get("preactivation_saturated", np.nan))))
    message = (f"Saturated units at init: {'; '.join(parts)} ({inits}; {'; '.join(rules)}). Their gradient is "
               f"nearly zero: these layers barely learn.")
    if whole:
        message += f" All of {', '.join(r['layer'] for r in whole)} is saturated at every init."
    suggestion = ("Normalize the inputs (zero mean, unit variance), use a fan-in scaled init (Glorot for "
                  "tanh/sigmoid) instead of a fixed large scale, or switch to ReLU with He init.")
    make = error if whole else warning
    return make(f"{NAME}.saturated_units", message, suggestion,
                layers=_evidence(by_units, "saturated_fraction"),
                preactivation_layers=_evidence(by_inputs, "preactivation_saturated"),
                worst_layer=worst["layer"], worst_fraction=float(np.nan_to_num(worst["saturated_fraction"])),
                threshold=settings.saturated_unit_fraction, saturation_level=level,
                preactivation_level=pre_level, preactivation_threshold=settings.saturated_preactivation_fraction)


def growth(layers: list[dict[str, Any]], input_rms: float | None = None) -> list[tuple[float, int]]:
    """Per layer (call order): how far its activations' RMS has grown above the smallest level before it (the
    inputs' RMS first, when given), never counting from below 1, and the index of that level (-1: the inputs).

    The floor of 1 is the unit scale every variance-preserving init and every normalization layer aims at
    (standardized inputs, He/Glorot/LeCun, BatchNorm, LayerNorm): climbing back to it from tiny inputs is a
    normalization doing its job, growing past it is explosion."""
    out = []
    low, low_at = (float(input_rms), -1) if input_rms is not None and np.isfinite(input_rms) else (np.inf, -1)
    for j, r in enumerate(layers):
        level = r.get("rms", np.nan)  # inf where the activations overflowed: the largest growth there is
        base = max(low, 1.0) if np.isfinite(low) else np.nan
        out.append((level / base if np.isfinite(base) else np.nan, low_at))
        if np.isfinite(level) and level < low:
            low, low_at = level, j
    return out


def exploding_finding(layers: list[dict[str, Any]], input_rms: float | None, settings: Settings,
                      inits: str) -> Finding | None:
    """``model.exploding_activations``: the RMS of the activations grows by ``exploding_activation_ratio`` or more
    across depth (from the smallest earlier level, at least 1), the mirror of the vanishing rule. An error from
    ``exploding_activation_error_ratio`` (orders of magnitude: the logits, the loss and every gradient are off by
    that much; He et al. 2015, section 2.2, derive the per-layer gain that keeps the scale)."""
    grown = growth(layers, input_rms)
    peaks = [(g, j) for j, (g, _) in enumerate(grown) if np.isfinite(g) or g == np.inf]
    if not peaks:
        return None
    peak, j = max(peaks, key=lambda p: p[0])
    if not peak >= settings.exploding_activation_ratio:
        return None
    start_at = grown[j][1]
    start_name = "the inputs" if start_at == -1 else layers[start_at]["layer"]
    start_level = float(input_rms) if start_at == -1 else layers[start_at]["rms"]
    first = start_at + 1  # the first layer of the growth
    base = max(start_level, 1.0)
    over = [r for r in layers[first: j + 1] if r.get("rms", np.nan) / base >= settings.exploding_activation_ratio]
    onset = over[0]["layer"] if over else layers[j]["layer"]
    steps = j - start_at
    end = layers[j]
    # The gain per layer from the levels themselves (the floor only decides whether growth counts).
    with np.errstate(divide="ignore", over="ignore"):
        per_layer = float((end["rms"] / start_level) ** (1 / steps)) if start_level > 0 else float("inf")
    if np.isfinite(peak):
        above = f"{peak:.3g}x" + (" the unit scale" if start_level < 1 else "")
        rate = f"about {per_layer:.3g}x per layer; "
    else:
        above, rate = "overflowing float32", ""
    message = (f"Activations explode across depth at init: their RMS grows from {start_level:.3g} at "
               f"{start_name} to {end['rms']:.3g} at {end['layer']} ({end['function']}), {above}, over {steps} "
               f"layer{'s' if steps > 1 else ''} ({rate}{inits}). The growth starts at {layers[first]['layer']} and "
               f"passes {settings.exploding_activation_ratio:g}x at {onset}.")
    if peak >= settings.exploding_activation_error_ratio:
        message += (" Orders of magnitude: the outputs, the loss and the gradients are scaled by it too, so the "
                    "first steps of training are spent (or diverge) undoing the init.")
    suggestion = ("Initialize every layer with a variance-preserving, fan-in scaled init: He for ReLU-like "
                  "activations, Glorot/LeCun for tanh and linear layers (He et al. 2015; Glorot & Bengio 2010), "
                  "not a fixed standard deviation; or add normalization layers (BatchNorm, LayerNorm); in "
                  "residual networks without normalization, scale the branches down (Fixup, SkipInit).")
    make = error if peak >= settings.exploding_activation_error_ratio else warning
    return make(f"{NAME}.exploding_activations", message, suggestion,
                layers={r["layer"]: round(float(r["rms"] / base), 6) for r in layers[first: j + 1]},
                start=start_name, start_rms=start_level, start_layer=layers[first]["layer"], onset_layer=onset,
                peak_layer=end["layer"], peak_rms=float(end["rms"]), growth=float(peak),
                per_layer_growth=float(per_layer), threshold=settings.exploding_activation_ratio,
                error_threshold=settings.exploding_activation_error_ratio)


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
        out[f"{NAME}/activation_rms/{r['layer']}"] = r["rms"]
        if np.isfinite(r["preactivation_saturated"]):
            out[f"{NAME}/preactivation_saturated/{r['layer']}"] = r["preactivation_saturated"]
    return out


def draw(path: str, layers: list[dict[str, Any]], settings: Settings, input_rms: float | None = None) -> None:
    """Fraction of dead / saturated units per activation layer (bars), the activations' spread relative to the
    inputs and their growth across depth (log scale), in call order, with the thresholds the checks use."""
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
    grown = np.array([g if np.isfinite(g) and g > 0 else np.nan for g, _ in growth(layers, input_rms)])
    bottom.plot(x, ratios, "o-", color="tab:blue", label="spread / input spread")
    bottom.axhline(settings.vanishing_activation_ratio, color="tab:blue", ls="--", lw=0.8,
                   label="vanishing below this")
    bottom.plot(x, grown, "s-", color="tab:purple", label="RMS growth across depth")
    bottom.axhline(settings.exploding_activation_ratio, color="tab:purple", ls="--", lw=0.8,
                   label="exploding above this")
    bottom.set_yscale("log")
    finite = np.concatenate([ratios[np.isfinite(ratios)], grown[np.isfinite(grown)]])
    low = min([settings.vanishing_activation_ratio / 3, *finite.tolist()])
    high = max([settings.exploding_activation_ratio * 3, *finite.tolist()])
    bottom.set_ylim(low / 2, high * 2)  # always shows 1 and both thresholds: the scale stays honest
    bottom.set_ylabel("ratio")
    bottom.legend(fontsize=8, loc="lower left")
    bottom.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    fig.suptitle("Activation statistics per layer at init (dashed: thresholds)")
    fig.savefig(path)
    plt.close(fig)
