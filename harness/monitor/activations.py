"""Activation statistics of a training run (``harness train`` with ``train.activations=true``): recorded in the
compiled step, judged on the host.

In the graph (:func:`forward`): the step's forward pass runs through
:func:`harness.checks.model.capture.record_activations` (the same primitives in the same order, so the same values
train, for every model library), and per step it records, per rectifier / tanh / sigmoid layer, the fraction of its
units that are dead or saturated on the step's batch (the definitions of :mod:`harness.checks.model.units`, so
``train.dead_units`` means what ``model.dead_units`` means, measured along the run instead of at init), and for the
model the largest attention logit (the largest input to a ``jax.nn.softmax`` inside the model, a softmax head
excepted) and the scale of its outputs (RMS and largest magnitude). The chunk returns them per step, like the
losses (:class:`harness.train.loop.Records`).

On the host (:class:`ActivationLog`): the series, kept across checkpoints, and four detectors, each naming the
step and the layer: :func:`dead_units`, :func:`saturated_units`, :func:`attention_logits`, :func:`output_logits`.
Thresholds and what they were measured on are with the constants below.

Recording costs no measurable time per step on the CPU (the statistics are a few reductions next to the layers'
matmuls: reference MLP 0.31 ms/step either way, char transformer 94 ms/step either way) and about 0.2 s of
tracing and compiling; the values trained are the same, since the recorder binds the model's own primitives (the
derivative of a ``custom_jvp`` / ``custom_vjp`` function that is not an activation is taken through its forward
primitives: see :mod:`harness.checks.model.capture`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from harness.checks.model import capture
from harness.checks.model.settings import Settings
from harness.findings import Finding, error, warning

JUDGED_KINDS = ("rectifier", "tanh", "sigmoid")  # layers with a per-unit statistic (units.py's: dead or pinned)
_UNITS = Settings()  # the model checks' defaults: the same definitions of dead and saturated units


class ActivationRecord(NamedTuple):
    """One step's statistics (a leading steps axis in a chunk's records)."""

    dead: Any  # (layers,) fraction of a rectifier layer's units exactly 0 for every example; NaN for the others
    saturated: Any  # (layers,) fraction of a tanh/sigmoid layer's units pinned at an asymptote; NaN for the others
    attention_logit: Any  # (softmaxes,) the largest input to each softmax inside the model (a softmax head excepted)
    output_rms: Any  # () root mean square of the output logits: the model's floating outputs, or the input of the
    # softmax that makes them (a model that returns probabilities)
    output_max: Any  # () their largest magnitude


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    function: str
    kind: str


def _unit_rows(y):
    y = jnp.asarray(y, jnp.float32)
    return y[:, None] if y.ndim == 1 else jnp.reshape(y, (-1, y.shape[-1]))


def _judged(activations: list[capture.Activation], outputs) -> tuple[list, list, list]:
    """The per-unit layers, the softmaxes inside the model (attention) and the output logits: the model's floating
    outputs, or for an output that is a softmax (a model that returns probabilities), that softmax's input."""
    out_leaves = jax.tree.leaves(outputs)
    heads = {id(a.output): a.input for a in activations if a.kind == capture.SOFTMAX_KIND and a.input is not None
             and any(a.output is o for o in out_leaves)}
    layers = [a for a in activations if a.kind in JUDGED_KINDS]
    softmaxes = [a for a in activations if a.kind == capture.SOFTMAX_KIND and a.input is not None
                 and id(a.output) not in heads]
    logits = [heads.get(id(o), o) for o in out_leaves if jnp.issubdtype(jnp.asarray(o).dtype, jnp.floating)]
    return layers, softmaxes, logits


def statistics(activations: list[capture.Activation], outputs) -> ActivationRecord:
    """The step's :class:`ActivationRecord` from what :func:`capture.record_activations` recorded."""
    layers, softmaxes, logits = _judged(activations, outputs)
    nan = jnp.float32(jnp.nan)
    dead, saturated = [], []
    for a in layers:
        rows = _unit_rows(a.output)
        if a.kind == "rectifier":  # units.py: exactly zero for every example of the batch
            dead.append(jnp.mean(jnp.all(rows == 0, axis=0)))
            saturated.append(nan)
        else:  # units.py: at the asymptote (|tanh| > 0.99, sigmoid outside [0.01, 0.99]) for 90% of the examples
            level = _UNITS.saturation_level
            pinned = jnp.abs(rows) > level if a.kind == "tanh" else jnp.abs(rows - 0.5) > level - 0.5
            saturated.append(jnp.mean(jnp.mean(pinned, axis=0) >= _UNITS.saturated_example_fraction))
            dead.append(nan)
    stack = lambda xs: jnp.stack(xs) if xs else jnp.zeros((0,), jnp.float32)  # noqa: E731
    # The largest logit of each softmax: masked entries (Flax fills them with the dtype's lowest value) do not move
    # a maximum.
    attention = stack([jnp.max(jnp.asarray(a.input, jnp.float32)) for a in softmaxes])
    floats = [jnp.asarray(o, jnp.float32) for o in logits]
    if floats:
        sq = sum(jnp.sum(jnp.square(o)) for o in floats)
        rms = jnp.sqrt(sq / sum(o.size for o in floats))
        biggest = jnp.max(jnp.stack([jnp.max(jnp.abs(o)) for o in floats]))
    else:
        rms = biggest = nan
    return ActivationRecord(stack(dead), stack(saturated), attention, rms, biggest)


def forward(apply: Callable, params, x, name_path: Callable[[tuple], str]):
    """``apply(params, x) -> (outputs, new_state)`` evaluated through the activation recorder:
    ``((outputs, new_state), ActivationRecord)``."""
    result, activations = capture.record_activations(apply, params, x, name_path=name_path, softmax=True)
    return result, statistics(activations, result[0])


def layers(apply: Callable, params, x, name_path: Callable[[tuple], str]) -> tuple[list[Layer], list[str]]:
    """The layers an :class:`ActivationRecord` of ``apply`` holds, in its order, and the softmaxes whose logits
    it reads (named after the layer they follow: ``blocks/0/attention/key``); a trace, nothing runs."""
    found: dict[str, Any] = {}

    def trace(params, x):
        result, activations = capture.record_activations(apply, params, x, name_path=name_path, softmax=True)
        judged, softmaxes, _ = _judged(activations, result[0])
        found["layers"] = [Layer(a.name, a.function, a.kind) for a in judged]
        found["attention"] = [a.name for a in softmaxes]
        return result

    jax.eval_shape(trace, params, x)
    return found["layers"], found["attention"]


def nan_record(template: ActivationRecord) -> ActivationRecord:
    """A step not taken: NaN in every statistic."""
    return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), template)


# --------------------------------------------------------------------------------------------------------------
# Host side.


@dataclasses.dataclass
class ActivationSeries:
    """A run's activation statistics, one row per step taken."""

    steps: np.ndarray  # (n,)
    layers: list[Layer]
    dead: np.ndarray  # (n, layers)
    saturated: np.ndarray  # (n, layers)
    attention: list[str]  # the softmaxes inside the model
    attention_logit: np.ndarray  # (n, softmaxes)
    output_rms: np.ndarray  # (n,)
    output_max: np.ndarray  # (n,)

    @property
    def attention_max(self) -> np.ndarray:
        """(n,) the largest attention logit of the model (NaN without a softmax)."""
        if not self.attention:
            return np.full(self.steps.shape, np.nan)
        return np.max(self.attention_logit, axis=1)


_ARRAYS = ("dead", "saturated", "attention_logit", "output_rms", "output_max")


class ActivationLog:
    """The host's copy of the records, chunk by chunk (``harness train``), saved with each checkpoint."""

    def __init__(self, layers_: list[Layer], attention: list[str]):
        self.layers, self.attention = list(layers_), list(attention)
        self._steps: list[np.ndarray] = []
        self._rows: dict[str, list[np.ndarray]] = {k: [] for k in _ARRAYS}

    def add(self, first_step: int, taken: int, record: ActivationRecord) -> None:
        """A chunk's records: ``taken`` steps from ``first_step`` (the rest of the chunk was not run)."""
        if taken <= 0:
            return
        self._steps.append(np.arange(first_step, first_step + taken))
        for k in _ARRAYS:
            self._rows[k].append(np.asarray(getattr(record, k))[:taken])

    def series(self) -> ActivationSeries:
        width = len(self.layers)

        def cat(k, shape):
            return np.concatenate(self._rows[k]) if self._rows[k] else np.zeros(shape, np.float32)

        return ActivationSeries(
            np.concatenate(self._steps) if self._steps else np.zeros(0, np.int64), self.layers,
            cat("dead", (0, width)), cat("saturated", (0, width)), self.attention,
            cat("attention_logit", (0, len(self.attention))), cat("output_rms", (0,)), cat("output_max", (0,)))

    def state(self) -> dict[str, np.ndarray]:
        s = self.series()
        return {"steps": s.steps.astype(np.int64), **{k: np.asarray(getattr(s, k), np.float32) for k in _ARRAYS}}

    def load(self, state: dict[str, np.ndarray]) -> None:
        steps = np.asarray(state["steps"], np.int64)
        self._steps = [steps] if steps.size else []
        self._rows = {k: ([np.asarray(state[k], np.float32)] if steps.size else []) for k in _ARRAYS}

    def findings(self, watch=None) -> list[Finding]:
        """The detectors' findings; ``watch`` (the run's :class:`harness.monitor.Monitor`) gives them the training
        loss (without it, the output-logit rule is not judged)."""
        runs = watch.series() if watch is not None else []
        loss_steps = loss = None
        if runs:
            keep = runs[0].loss_recorded & np.isfinite(runs[0].loss)
            loss_steps, loss = runs[0].steps[keep], runs[0].loss[keep]
        return detect(self.series(), loss_steps, loss)

    def outcome_series(self) -> dict[str, list]:
        """For the ``train`` outcome's series (report.json): per step the model-level values, and per judged
        layer its dead or saturated fraction."""
        s = self.series()
        out: dict[str, list] = {"activation_step": s.steps.tolist(), "output_logit_rms": _list(s.output_rms),
                                "output_logit_max": _list(s.output_max)}
        for j, name in enumerate(s.attention):
            out[f"attention_logit_max/{name}"] = _list(s.attention_logit[:, j])
        for j, layer in enumerate(s.layers):
            key = "dead_fraction" if layer.kind == "rectifier" else "saturated_fraction"
            out[f"{key}/{layer.name}"] = _list((s.dead if layer.kind == "rectifier" else s.saturated)[:, j])
        return out

    def metrics(self) -> dict[str, float]:
        """The final values (median of the last :data:`WINDOW` steps), for the outcome's metrics and W&B."""
        s = self.series()
        if not s.steps.size:
            return {}
        last = slice(-WINDOW, None)
        out = {"final_output_logit_rms": _median(s.output_rms[last]),
               "final_output_logit_max": _median(s.output_max[last])}
        if s.attention:
            out["final_attention_logit_max"] = _median(s.attention_max[last])
        for j, layer in enumerate(s.layers):
            if layer.kind == "rectifier":
                out[f"final_dead_fraction/{layer.name}"] = _median(s.dead[last, j])
            else:
                out[f"final_saturated_fraction/{layer.name}"] = _median(s.saturated[last, j])
        return out


def _list(x: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(x, np.float64)]


def _median(x: np.ndarray) -> float | None:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else None


# --------------------------------------------------------------------------------------------------------------
# Detectors. Each compares the run with its own start: what a layer was at init is the model checks' business
# (model.dead_units, model.saturated_units), what changed during training is the monitor's.

WINDOW = 50  # steps: the late value of a statistic is its median over the last window (one bad batch moves nothing)
EARLY = 1  # steps: its early value, at the first step: the model as initialized (a high LR changes it within steps)
MIN_STEPS = 20  # steps recorded before anything is judged
MAX_LAYERS_NAMED = 5
# Dead / saturated units: the model checks' thresholds (harness.checks.model.settings: dead_unit_fraction and
# saturated_unit_fraction, 0.5: half of a layer's units carry nothing), reached during training: the layer's late
# fraction at least that AND at least DIED_DURING more than its early one (a layer already half dead at init is
# model.dead_units', named there with its init as the fix). Measured on 400-step digits runs of the reference MLP
# and tests/test_activations.py's: healthy runs (Adam 1e-3 and 1e-2 with ReLU, 1e-3 and 3e-2 with tanh) end at
# most 14% dead and 1% saturated, at most 8 points above their first step; Adam at 0.1 kills 98% of the ReLU MLP's
# first layer and 89% of its second within 30 steps (a run the other detectors call healthy: the loss settles at
# 0.65, validation accuracy 0.70 against 0.98) and pins 88% / 100% of the tanh MLP's units.
DEAD_FRACTION = _UNITS.dead_unit_fraction
SATURATED_FRACTION = _UNITS.saturated_unit_fraction
DIED_DURING = 0.25
# Attention logit growth (Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion Parameters", section 2,
# "QK Normalization": without normalizing queries and keys the attention logits grow without bound, the attention
# weights turn one-hot (near-zero entropy) and training diverges; Zhai et al. 2023, "Stabilizing Transformer
# Training by Preventing Attention Entropy Collapse"; Wortsman et al. 2023, "Small-scale proxies for large-scale
# Transformer training instabilities": the same growth in small models at high learning rates, removed by
# qk-layernorm). The
# largest logit of a softmax ends (its median over the last window) at least ATTENTION_GROWTH times its early value
# AND at least ATTENTION_SATURATED: a key whose logit leads the others (near 0 at init) by 20 takes e^-20 = 2e-9 of
# the weight from each of them, below float32's resolution relative to 1 (1.2e-7, reached at 16), so that
# softmax is one-hot to working precision and passes back no gradient. Measured: experiments/char_lm.py's
# transformer (width 64, 2 blocks, batch 128) at Adam's default 1e-3 for 3000 steps (overfitting from step 400)
# ends at 18.8 and 19.8, 3.4x and 4.1x its start, levelling off; the tests' small ones (1 block, width 32) stay at
# 4-7 (0.8-1.4x), at 1e-2 reach 12 (2.7x). At 3e-2 the full-size one reaches 1400 (250x); at 0.1 the small one
# 9e4 (2e4x) within 5 steps, its loss stuck near the unigram level, a run the other detectors call healthy.
ATTENTION_GROWTH = 10.0
ATTENTION_SATURATED = 20.0
# Output-logit drift (Chowdhery et al. 2022, PaLM, section 5: the auxiliary z-loss keeps the softmax normalizer
# log Z near 0 because drifting logits destabilize training): the scale of the output logits (their RMS) grows by
# OUTPUT_GROWTH or more while the training loss does not move. A classifier that becomes confident grows its logits
# too, but buys loss with them (its loss keeps falling: healthy digits runs grow 10x and their loss falls 1000x),
# so growth alone says nothing: the stretch judged is the longest tail of the run over which the training loss's
# running median stays within OUTPUT_FLAT of its final level (PLATEAU_GAIN of the trend detectors), at least
# TREND_STEPS long (theirs), and the logits' RMS must double over it (OUTPUT_GROWTH: a softmax at half the
# temperature; for one that is not saturated that moves the loss by far more than 10%, so doubling on a flat loss is
# growth the loss does not see: all logits drifting together, log Z moving away from 0, or logits pushed into a
# saturated softmax) and keep growing (the median of each third of the stretch above the one before). Measured: a
# model that applies softmax to its own outputs before the cross-entropy (a second softmax: the loss stalls at 1.47
# whatever the logits) grows them 3.1x over 920 flat steps. Healthy digits runs have no flat stretch of 150 steps
# (their loss keeps falling); the char transformer at 1e-3 flattens for its last 159 of 1000 and 327 of 3000 steps,
# its logits growing 1.06x and 1.08x there; broken runs whose loss stalls for other reasons grow them 1.46x (the
# small char transformer whose attention collapsed at LR 0.1) and 1.19x (the MLP whose ReLUs died).
OUTPUT_GROWTH = 2.0
OUTPUT_FLAT = 0.1
TREND_STEPS = 150
SMOOTH = 25


def detect(s: ActivationSeries, loss_steps=None, loss=None) -> list[Finding]:
    """Every detector's finding on one run (``loss_steps``, ``loss``: the recorded finite training losses)."""
    found = [dead_units(s), saturated_units(s), attention_logits(s), output_logits(s, loss_steps, loss)]
    return [f for f in found if f is not None]


def _nanmedian(x: np.ndarray, axis=0):
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(np.asarray(x, np.float64), axis=axis)


def _running_median(x: np.ndarray, k: int = SMOOTH) -> np.ndarray:
    half = k // 2
    padded = np.pad(np.asarray(x, np.float64), half, constant_values=np.nan)
    return _nanmedian(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)


def _early_late(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the median of the first EARLY rows and of the last WINDOW rows."""
    return _nanmedian(x[:EARLY]), _nanmedian(x[-WINDOW:])


def _first_at(x: np.ndarray, level: float) -> int | None:
    """The first row whose value is at least ``level``."""
    hit = np.flatnonzero(np.nan_to_num(np.asarray(x, np.float64), nan=-np.inf) >= level)
    return int(hit[0]) if hit.size else None


def _units_changed(s: ActivationSeries, values: np.ndarray, kinds: tuple[str, ...], limit: float) -> list[dict]:
    """The layers of ``kinds`` whose fraction rose during the run past ``limit`` (see DIED_DURING), worst first."""
    if len(s.steps) < MIN_STEPS:
        return []
    early, late = _early_late(values)
    out = []
    for j, layer in enumerate(s.layers):
        if layer.kind not in kinds or not (np.isfinite(late[j]) and late[j] >= limit
                                           and late[j] - early[j] >= DIED_DURING):
            continue
        onset = _first_at(values[:, j], max(limit, early[j] + DIED_DURING))
        out.append(dict(layer=layer.name, function=layer.function, early=float(early[j]), late=float(late[j]),
                        step=int(s.steps[onset if onset is not None else -1]),
                        whole=bool(np.all(values[-WINDOW:, j] >= 1.0))))
    return sorted(out, key=lambda r: (r["step"], -r["late"]))


def _listed(rows: list[dict], limit: float) -> str:
    return "; ".join(f"{r['layer']} ({r['function']}) {r['late']:.0%} of its units (median of the last steps; "
                     f"{r['early']:.0%} at the first step, past {limit:.0%} from step {r['step']})"
                     for r in rows[:MAX_LAYERS_NAMED])


def dead_units(s: ActivationSeries) -> Finding | None:
    """Rectifier layers whose units died during training: exactly 0 for every example of the batch (units.py's
    definition), for half of the layer or more, from a start well below that (see :data:`DIED_DURING`). An error
    when a whole layer is dead over the last window: nothing flows through it and its units get no gradient to come
    back with."""
    rows = _units_changed(s, s.dead, ("rectifier",), DEAD_FRACTION)
    if not rows:
        return None
    first, whole = rows[0], [r for r in rows if r["whole"]]
    message = (f"units died during training, exactly zero for every example of the batch: "
               f"{_listed(rows, DEAD_FRACTION)}")
    if whole:
        message += f"; every unit of {', '.join(r['layer'] for r in whole)} is dead: nothing flows through it"
    make = error if whole else warning
    return make(
        "train.dead_units", message,
        f"A step too large pushed these units' pre-activations negative for every input, and a dead ReLU gets no "
        f"gradient to come back with (CS231n, \"dying ReLU\"): lower the learning rate or warm it up, clip "
        f"gradients (optim.clip_norm), or use a leaky activation (leaky_relu, gelu). Step {first['step']} is where "
        f"{first['layer']} passed {DEAD_FRACTION:.0%}.",
        **_units_evidence(rows, DEAD_FRACTION))


def _units_evidence(rows: list[dict], threshold: float) -> dict:
    """The evidence of a dead / saturated units finding: the first layer past ``threshold`` and where, and each
    layer's fraction late and at the start."""
    return dict(step=rows[0]["step"], layer=rows[0]["layer"], layers={r["layer"]: round(r["late"], 4) for r in rows},
                start={r["layer"]: round(r["early"], 4) for r in rows}, threshold=threshold, rise=DIED_DURING)


def saturated_units(s: ActivationSeries) -> Finding | None:
    """tanh / sigmoid layers whose units saturated during training: pinned at an asymptote for 90% of the batch's
    examples (units.py's definition), half of the layer or more, from a start well below that. A warning: pinned
    units still pass a small gradient, so the run survives them, slowed."""
    rows = _units_changed(s, s.saturated, ("tanh", "sigmoid"), SATURATED_FRACTION)
    if not rows:
        return None
    first = rows[0]
    level = _UNITS.saturation_level
    return warning(
        "train.saturated_units",
        f"units saturated during training, at their asymptote (|tanh| > {level}, sigmoid outside "
        f"[{1 - level:.2g}, {level}]) for {_UNITS.saturated_example_fraction:.0%} of the batch's examples: "
        f"{_listed(rows, SATURATED_FRACTION)}; their gradient is nearly zero",
        f"The weights into these layers grew until their pre-activations sit in the flat tails: lower the learning "
        f"rate, add weight decay or a normalization layer before the activation, or use ReLU-like activations. "
        f"Step {first['step']} is where {first['layer']} passed {SATURATED_FRACTION:.0%}.",
        **_units_evidence(rows, SATURATED_FRACTION))


def attention_logits(s: ActivationSeries) -> Finding | None:
    """A softmax inside the model whose largest logit grew far beyond its early value and into saturation (see
    :data:`ATTENTION_GROWTH`)."""
    if not s.attention or len(s.steps) < MIN_STEPS:
        return None
    early, late = _early_late(s.attention_logit)
    rows = []
    for j, name in enumerate(s.attention):
        growth = late[j] / early[j] if early[j] > 0 else np.inf if late[j] > 0 else np.nan
        if not (np.isfinite(late[j]) and late[j] >= ATTENTION_SATURATED and growth >= ATTENTION_GROWTH):
            continue
        level = max(ATTENTION_SATURATED, ATTENTION_GROWTH * early[j]) if early[j] > 0 else ATTENTION_SATURATED
        onset = _first_at(_running_median(s.attention_logit[:, j], 5), level)
        rows.append(dict(layer=name, early=float(early[j]), late=float(late[j]), growth=float(growth),
                         peak=float(np.nanmax(s.attention_logit[:, j])),
                         step=int(s.steps[onset if onset is not None else -1])))
    if not rows:
        return None
    rows.sort(key=lambda r: r["step"])
    first = rows[0]
    listed = "; ".join(f"{r['layer']} from {r['early']:.3g} to {r['late']:.4g} ({r['growth']:.3g}x), past "
                       f"{max(ATTENTION_SATURATED, ATTENTION_GROWTH * r['early']):.3g} from step {r['step']}"
                       for r in rows[:MAX_LAYERS_NAMED])
    return warning(
        "train.attention_logits",
        f"attention logits grew into saturation: the largest input to the softmax of {listed} (the median of the "
        f"last {min(WINDOW, len(s.steps))} steps against the first step); a logit {ATTENTION_SATURATED:g} ahead of "
        f"the others makes that attention one-hot to float32 precision: its entropy collapses and it passes back "
        f"no gradient",
        "Normalize queries and keys (a LayerNorm or RMSNorm on q and k before their dot product: QK-norm, "
        "Dehghani et al. 2023), or lower the learning rate (Wortsman et al. 2023: the growth appears at high "
        "learning rates and QK-norm removes it); check the 1/sqrt(head dim) scaling of the logits. Capping them "
        "(c * tanh(logits / c)) bounds them without fixing the cause.",
        step=first["step"], layer=first["layer"], layers={r["layer"]: round(r["late"], 4) for r in rows},
        start={r["layer"]: round(r["early"], 4) for r in rows}, growth=first["growth"], peak=first["peak"],
        threshold_growth=ATTENTION_GROWTH, threshold_logit=ATTENTION_SATURATED)


def output_logits(s: ActivationSeries, loss_steps=None, loss=None) -> Finding | None:
    """The output logits' scale keeps growing over a stretch where the training loss does not move (see
    :data:`OUTPUT_GROWTH`)."""
    stats = output_stats(s, loss_steps, loss)
    if stats is None or not stats["fired"]:
        return None
    return warning(
        "train.output_logits",
        f"the output logits keep growing while the loss does not move: their RMS went from "
        f"{stats['rms_start']:.3g} at step {stats['step']} to {stats['rms_end']:.3g} at step {stats['final_step']} "
        f"({stats['growth']:.2g}x; largest magnitude {stats['max_end']:.3g}), while the training loss stayed within "
        f"{OUTPUT_FLAT:.0%} of {stats['loss']:.4g}: growth the loss does not pay for",
        "Logits that grow without improving the loss are pushed into a saturated softmax or drift together "
        "(log Z, the softmax normalizer, moving away from 0): check for a softmax applied twice (a model that "
        "returns probabilities to a loss that takes logits), add a z-loss (1e-4 * logsumexp(logits)**2, PaLM) or "
        "weight decay on the output layer, or lower the learning rate. In bfloat16, logits past 2**8 lose all "
        "resolution below 1.",
        step=stats["step"], final_step=stats["final_step"], layer="outputs", growth=stats["growth"],
        rms_start=stats["rms_start"], rms_end=stats["rms_end"], max_end=stats["max_end"], loss=stats["loss"],
        threshold_growth=OUTPUT_GROWTH, flat=OUTPUT_FLAT)


def output_stats(s: ActivationSeries, loss_steps=None, loss=None) -> dict | None:
    """What :func:`output_logits` judges: the flat stretch of the loss at the end of the run and the logits'
    growth over it; None without losses or with fewer than TREND_STEPS."""
    if loss is None or len(loss) < TREND_STEPS or len(s.steps) < TREND_STEPS:
        return None
    loss_steps, loss = np.asarray(loss_steps), np.asarray(loss, np.float64)
    smooth = _running_median(loss)
    final = float(np.median(loss[-WINDOW:]))
    band = np.abs(smooth - final) <= OUTPUT_FLAT * abs(final)
    outside = np.flatnonzero(~band)
    start = int(outside[-1]) + 1 if outside.size else 0
    first_step = int(loss_steps[min(start, len(loss_steps) - 1)])
    rows = np.flatnonzero(s.steps >= first_step)
    rms = _running_median(s.output_rms)
    out = dict(fired=False, step=first_step, final_step=int(s.steps[-1]), loss=final, flat_steps=int(rows.size),
               rms_start=float(rms[rows[0]]) if rows.size else float("nan"),
               rms_end=float(rms[-1]), max_end=float(_nanmedian(s.output_max[-WINDOW:])))
    out["growth"] = out["rms_end"] / out["rms_start"] if out["rms_start"] > 0 else float("nan")
    if rows.size < TREND_STEPS:
        return out
    thirds = [float(_nanmedian(part)) for part in np.array_split(rms[rows], 3)]
    steady = thirds[0] < thirds[1] < thirds[2]
    out["fired"] = bool(steady and out["growth"] >= OUTPUT_GROWTH)
    return out
