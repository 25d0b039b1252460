"""Sequence models: does an output see what it must not? Two exact tests on the first init, in eval mode.

* ``model.causal_leakage`` -- for a causal task (a language model, ``Task.causal``: detected from next-token
  targets or declared with ``causal: true``), the output at position ``t`` must not depend on the inputs after
  ``t``. For a few sequences of the training data and each cut point ``t`` (every position up to
  ``sequence_positions`` of them, spread over the sequence, first and second-to-last included), every input after
  ``t`` is replaced by a different token (``lo + (x - lo + 1 + r) mod (hi - lo + 1)`` over the data's token range,
  ``r`` random: every later token changes, every token stays a valid id; float inputs get noise of their own
  scale) and the outputs at positions ``<= t`` are compared with the original's. A missing causal mask, a mask off
  by one (``jnp.tril(..., k=1)``), a mask on the wrong axis (``triu``, or the query and key axes swapped) and a
  normalization or pooling over the sequence all make them differ. The finding names the first leaking position
  and how far ahead the leaking positions see: for a position ``s`` that leaks at cut ``t`` but not at the next
  cut, the furthest input it reads is ``t + 1`` (with every position a cut point, this is exact). With padded
  data only the real positions' outputs are compared: a padded query whose keys are all masked (left padding
  under a causal and a padding mask) gets equal logits everywhere, attends uniformly to every key, the future
  included, and is never read by the loss -- comparing it would be a false alarm on a correct model.
* ``model.padding_leakage`` -- with ``pad_token`` in the data (inputs equal to it are padding) and integer token
  inputs, the outputs at real positions must not depend on the padded positions (below).

Why the comparisons are exact. Both tests run the model twice on inputs that agree wherever a correct model
looks, and compare bitwise. Every run is an iteration of one ``lax.scan`` whose body is the whole forward pass on
the same ``(sequences, T)`` batch, the unchanged inputs being iteration 0: the same compiled code, on the same
shapes, with every example in the same row, so nothing about reduction order or tiling differs between the runs
(rows at other batch positions, or two separately compiled calls, would not guarantee that). A correct model then
gives identical bits: attention masked with ``where(mask, logits, big_negative)`` (or an additive ``-1e9``) gives
masked keys a softmax weight of exactly 0, so the differing values they carry contribute exactly ``0 * v = 0`` to
every unmasked query's sum, and per-position layers (LayerNorm, MLPs) never mix positions. Measured: NNX
``MultiHeadAttention`` with ``nnx.make_causal_mask``, Linen ``MultiHeadDotProductAttention`` with
``nn.make_causal_mask`` and Equinox ``MultiheadAttention`` with a ``tril`` mask give zero differences on CPU
(tests/test_sequence_checks.py), and so does the 2-block example of experiments/char_lm.py at T = 64.
``sequence_tolerance`` (default 0: any difference) exists for arithmetic that is not bitwise reproducible; a
small additive mask such as ``-20`` is *not* such a case -- training can learn attention logits that overcome it.

The padding test, and why it perturbs the embeddings rather than the tokens. A model that handles padding
computes its mask from the tokens (``x == pad_token``), so changing the tokens at padded positions changes what is
padding, and at a fixed length the real tokens, their positions and the padding pattern leave nothing at the
input to vary: the tokens at padded positions *are* the pad token. Changing the length (appending or cutting
padding) is not exact (another shape is another program, with other rounding), breaks models built for one
length (learned position tables), and cannot test left padding without moving the real tokens. So the test
perturbs what the model *computes* from the padded positions: the model's program (its jaxpr, the same for every
library) is evaluated by a small interpreter that adds random noise to the rows of every token-embedding lookup
at the padded positions -- a ``gather`` from a parameter table whose indices are computed from the tokens alone,
or the ``dot_general`` of a one-hot encoding of the tokens with a parameter matrix -- while the tokens, and every
mask computed from them, stay as they are. A model that masks padded keys (or zeroes padded embeddings before a
convolution or pooling) gives bitwise-identical outputs at every real position; one whose real positions attend
to the padding (a mask that is not applied, or applied to the query axis instead of the key axis), pool over it
or run a recurrence through it (left padding) does not. The interpreter binds the same primitives in the same
order as the model, so with zero noise (iteration 0) it computes the model's own outputs; it walks into
``jit``, ``checkpoint``, ``custom_jvp``/``custom_vjp`` calls, and binds ``scan``/``while``/``cond`` as they are
(an embedding looked up inside a loop body is not found). When no lookup is found (token ids used as numbers, an
embedding inside a loop) the test cannot run and says so in an info finding; it runs only on integer token inputs
and on sequences that hold both padding and real tokens (none: nothing is said). In right-padded data a correct causal model
never reads the padding at all, so a padding leak there follows from a causal leak (the message says so). One
known false alarm: a model that masks nothing but relies on the padding's embedding being exactly zero (PyTorch's
``padding_idx``, a table row zeroed in the forward pass) before summing or convolving over positions is flagged,
since the noise makes that row nonzero; masking the padded positions (``h * mask[..., None]``) is what the check
expects, and is right even when the pad row trains.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from harness.checks.model import programs
from harness.checks.model.capture import bind_equation, called_jaxpr
from harness.checks.model.noise import hash_uniform
from harness.checks.model.settings import NAME, Settings
from harness.engine import compile as compiled
from harness.findings import Finding, error, exception_message, info

CAUSAL = f"{NAME}.causal_leakage"
PADDING = f"{NAME}.padding_leakage"

CAUSAL_FIX = (
    "Mask the attention logits before the softmax so that query t sees keys <= t only: "
    "`nnx.make_causal_mask(tokens)` (Flax; combine it with a padding mask with `nnx.combine_masks`), "
    "`jnp.tril(jnp.ones((T, T), bool))` indexed [query, key], or `is_causal=True` in "
    "`jax.nn.dot_product_attention`; pass it to every attention layer. Check the mask's axes (the query axis "
    "before the key axis: `tril`, not `triu` or its transpose) and its offset (`k=0`: `jnp.tril(..., k=1)` lets "
    "each position see the next token). Anything else that mixes positions (a norm, mean or pooling over the "
    "sequence axis, a convolution that is not left-padded) must also look only backwards."
)
PADDING_FIX = (
    "Mask the padded keys in every attention layer: `nnx.make_attention_mask(x != pad, x != pad)` (combined with "
    "a causal mask by `nnx.combine_masks`), a [batch, 1, query, key] mask whose *key* axis is the padding (a mask "
    "on the query axis leaves real queries attending to the padding). Zero the padded positions' embeddings "
    "before a convolution or pooling over the sequence, and give recurrent layers the sequence lengths (or pad on "
    "the right) so that the recurrence does not run through the padding."
)

# What a value depends on: nothing (constants), the tokens only, the parameters/state only, or both.
CONST, TOKEN, PARAM, MIXED = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------------------------
# Host side: which sequences, which cut points, and the verdicts.


@dataclasses.dataclass
class Plan:
    causal_x: np.ndarray | None = None  # (k, T, ...) sequences for the causal test
    replaced: np.ndarray | None = None  # the same, every token changed
    compared: np.ndarray | None = None  # (k, T) positions whose outputs count: the real ones (not padding)
    cuts: np.ndarray | None = None  # (C,) cut points
    padding_x: np.ndarray | None = None  # (k, T) token sequences with padding
    pad_token: int | None = None


def run(ctx, settings: Settings, params, rest, x) -> tuple[list[Finding], dict[str, Any]]:
    """The sequence checks on the first init ``(params, rest)``: findings and metrics. Nothing runs (and nothing
    is said) unless the task is causal or the data is padded, and the model's outputs are per position."""
    problem = ctx.problem
    plan = make_plan(problem.task, x, ctx.arrays.x_train, settings, seed=ctx.seed)
    if plan is None:
        return [], {}
    for name in ("causal_x", "padding_x"):
        batch = getattr(plan, name)
        if batch is not None and not per_position(problem.model, params, rest, batch):
            setattr(plan, name, None)  # outputs not per position: model.forward's shape check speaks for them
    if plan.causal_x is None and plan.padding_x is None:
        return [], {}
    findings, metrics = [], {}
    try:
        result = run_program(problem, params, rest, plan, seed=ctx.seed)
    except Exception as err:  # noqa: BLE001 -- the model ran in the probe: the padding interpreter is what failed
        if plan.padding_x is None:
            raise
        findings.append(info(
            PADDING,
            f"Padding leakage was not checked: evaluating the model's program with perturbed padding embeddings "
            f"raised {type(err).__name__}: {exception_message(err)}. The causal check (if any) ran.",
            "Report this with your model's code; padding leakage is not checked for this model.",
            exception=type(err).__name__, pad_token=plan.pad_token,
        ))
        plan.padding_x = None
        if plan.causal_x is None:
            return findings, metrics
        result = run_program(problem, params, rest, plan, seed=ctx.seed)
    causal = None
    if plan.causal_x is not None:
        causal = judge_causal(result["causal_diff"], plan.cuts, plan.compared, float(result["causal_scale"]),
                              settings, problem.task.describe())
        findings += causal[0]
        metrics.update(causal[1])
    if plan.padding_x is not None:
        f, m = judge_padding(result["padding_diff"], plan.padding_x, plan.pad_token,
                             int(result["padding_sites"]), float(result["padding_scale"]), settings,
                             causal_leak=bool(causal and causal[0]))
        findings += f
        metrics.update(m)
    return findings, metrics


def make_plan(task, x, x_train, settings: Settings, *, seed: int) -> Plan | None:
    plan = Plan()
    x = np.asarray(x)
    if task.causal and x.ndim >= 2 and x.shape[1] >= 2:
        k = min(settings.sequence_examples, len(x))
        padded = task.pad_token is not None and task.integer_inputs
        order = np.arange(len(x))
        if padded:  # the sequences with the most real positions (stable: the batch's order among equals)
            order = np.argsort(-(x != task.pad_token).sum(axis=1), kind="stable")
        plan.causal_x = x[order[:k]]
        plan.replaced = replace_all(plan.causal_x, x_train, seed)
        plan.compared = plan.causal_x != task.pad_token if padded else np.ones(plan.causal_x.shape[:2], bool)
        if plan.replaced is None:
            plan.causal_x = None
        else:
            plan.cuts = cut_points(x.shape[1], settings.sequence_positions)
    if task.pad_token is not None and task.integer_inputs and x.ndim == 2 and x.shape[1] >= 2:
        plan.padding_x = padded_examples(x, x_train, task.pad_token, settings.sequence_examples)
        plan.pad_token = task.pad_token
    return plan if plan.causal_x is not None or plan.padding_x is not None else None


def cut_points(length: int, count: int) -> np.ndarray:
    """Positions after which the inputs change: all of ``0 .. T-2`` when there are at most ``count``, else
    ``count`` of them spread evenly, the first and the second-to-last included."""
    last = length - 2
    if last + 1 <= count:
        return np.arange(last + 1, dtype=np.int32)
    return np.unique(np.linspace(0, last, count).round().astype(np.int32))


def replace_all(x: np.ndarray, x_train, seed: int) -> np.ndarray | None:
    """``x`` with every element changed: integer tokens to another id of the data's range, floats by noise of the
    data's scale. None when the data holds a single token id (nothing to change it to)."""
    rng = np.random.default_rng([seed % 2**32, 0x5E0])
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(np.min(x_train)), int(np.max(x_train))
        span = hi - lo + 1
        if span < 2:
            return None
        shift = 1 + rng.integers(0, span - 1, size=x.shape)  # in [1, span - 1]: never back to the same token
        return (lo + (x.astype(np.int64) - lo + shift) % span).astype(x.dtype)
    scale = float(np.std(x_train)) or 1.0
    return (x + rng.normal(0.0, scale, size=x.shape) + scale).astype(x.dtype)


def padded_examples(x: np.ndarray, x_train, pad: int, count: int) -> np.ndarray | None:
    """Up to ``count`` sequences with both padded and real positions: from the checked batch, else the first ones
    of the training data. None when no sequence has both."""
    def mixed(a):
        padded = a == pad
        return padded.any(axis=1) & ~padded.all(axis=1)

    chosen = x[mixed(x)][:count]
    if len(chosen) == 0:
        train = np.asarray(x_train)
        chosen = train[mixed(train)][:count]
    return chosen if len(chosen) else None


def per_position(model, params, rest, batch) -> bool:
    """The model's outputs have a position axis matching the inputs': ``(k, T, ...)``."""
    try:
        out = jax.eval_shape(model, params, rest, jnp.asarray(batch))
    except Exception:  # noqa: BLE001 -- the probe ran the model on the checked batch; another batch size failing
        return False  # is model.forward's business, not this check's
    return len(out.shape) >= 2 and tuple(out.shape[:2]) == tuple(batch.shape[:2])


def judge_causal(diff: np.ndarray, cuts: np.ndarray, compared: np.ndarray, scale: float, settings: Settings,
                 task: str) -> tuple[list[Finding], dict[str, Any]]:
    """``diff[c, s]``: largest change of the outputs at position ``s <= cuts[c]`` when the inputs after
    ``cuts[c]`` change; ``compared``: ``(k, T)`` the positions of each sequence that count (real ones)."""
    diff = np.asarray(diff, np.float64)
    threshold = settings.sequence_tolerance * scale
    leak = diff > threshold
    last = int(cuts.max()) + 1  # positions 0 .. T-2 can leak (T-1 has no future)
    checked = int(np.asarray(compared)[:, :last].any(axis=0).sum())  # compared at least once
    largest = float(diff.max()) if diff.size else 0.0
    metrics = {f"{NAME}/causal_leakage/max_difference": largest,
               f"{NAME}/causal_leakage/positions_checked": checked}
    leaking = np.flatnonzero(leak.any(axis=0))
    metrics[f"{NAME}/causal_leakage/leaking_positions"] = int(len(leaking))
    if len(leaking) == 0:
        return [], metrics
    first = int(leaking[0])
    # Furthest input each leaking position reads: it leaks at cut t (reads something after t) and, with every
    # position a cut, not at t + 1, so it reads t + 1.
    reach = {int(s): int(cuts[leak[:, s]].max()) + 1 - int(s) for s in leaking}
    ahead = sorted(set(reach.values()))
    if ahead == [1]:
        pattern = ("every leaking position reads exactly the next input, no further: a mask off by one "
                   "(`jnp.tril(..., k=1)`, `>=` where `>` was meant, or positions shifted by one)")
    elif all(reach[s] >= last - s for s in reach):
        pattern = ("every leaking position reads to the end of the sequence: no causal mask, a mask that is not "
                   "applied, or one on the wrong axis (`triu` for `tril`, the query and key axes swapped)")
    else:
        pattern = f"leaking positions read up to {max(ahead)} inputs ahead"
    message = (
        f"The model sees the future: its output at position {first} changes when only the inputs after position "
        f"{first} change ({task}; the outputs at a position must depend on that position and earlier ones only). "
        f"{len(leaking)} of the {checked} positions checked leak; {pattern}. Largest change {largest:.3g} "
        f"(outputs' scale {scale:.3g}), on the first init in eval mode. Training on next-token targets would "
        "learn to copy the answer from the input, and the model would fail at generation time."
    )
    return [error(
        CAUSAL, message, CAUSAL_FIX,
        first_leaking_position=first, leaking_positions=int(len(leaking)), positions_checked=checked,
        leaking=[int(s) for s in leaking[: settings.max_listed]],
        inputs_ahead_read={str(s): reach[s] for s in list(reach)[: settings.max_listed]},
        max_abs_difference=largest, output_scale=scale, cut_points=cuts.tolist(),
        sequences=int(len(compared)), tolerance=settings.sequence_tolerance, mode="eval",
    )], metrics


def judge_padding(diff: np.ndarray, x: np.ndarray, pad: int, sites: int, scale: float, settings: Settings, *,
                  causal_leak: bool) -> tuple[list[Finding], dict[str, Any]]:
    """``diff[i, s]``: change of the outputs of sequence ``i`` at real position ``s`` (0 at padded ones) when what
    the model computes at the padded positions changes."""
    padded = x == pad
    if sites == 0:
        return [info(
            PADDING,
            "Padding leakage was not checked: no lookup of the tokens in an embedding table was found in the "
            "model's program (the check perturbs the embeddings of the padded positions; an embedding computed "
            "inside a scan or loop, or inputs that are not token ids, hide them).",
            "Nothing to fix; mask padded keys in attention and check by hand that outputs at real positions do not "
            "change with the padding.",
            pad_token=pad,
        )], {}
    diff = np.asarray(diff, np.float64)
    threshold = settings.sequence_tolerance * scale
    leak = (diff > threshold) & ~padded
    largest = float(diff[~padded].max()) if (~padded).any() else 0.0
    metrics = {f"{NAME}/padding_leakage/max_difference": largest,
               f"{NAME}/padding_leakage/real_positions_checked": int((~padded).sum())}
    if not leak.any():
        return [], metrics
    real = int((~padded).sum())
    rows, cols = np.nonzero(leak)
    rows_padded = [row for row in padded if row.any()]
    if all(row[np.argmax(row):].all() for row in rows_padded):  # from the first pad on, all padding
        where = "right"
    elif all(not row[np.argmin(row):].any() for row in rows_padded):  # from the first real token on, none
        where = "left"
    else:
        where = "mixed"
    note = ""
    if causal_leak and where == "right":
        note = (" The padding here follows the real tokens, which a causal model never reads: this follows from "
                "the causal leakage reported above; fix that first.")
    message = (
        f"Outputs at real positions depend on the padding: changing what the model computes at the padded "
        f"positions (its embedding of pad_token {pad} there), with the tokens and the padding mask unchanged, "
        f"changed the outputs at {int(leak.sum())} of the {real} real positions of {len(x)} padded sequences "
        f"(first: sequence {int(rows[0])}, position {int(cols[0])}; largest change {largest:.3g}, outputs' scale "
        f"{scale:.3g}; {where} padding). A sequence's predictions then depend on how much padding its batch "
        f"needed, and the pad embedding is trained.{note}"
    )
    return [error(
        PADDING, message, PADDING_FIX,
        pad_token=pad, leaking_real_positions=int(leak.sum()), real_positions_checked=real,
        first_leak={"sequence": int(rows[0]), "position": int(cols[0])}, max_abs_difference=largest,
        output_scale=scale, padding=where, embedding_lookups_perturbed=sites, tolerance=settings.sequence_tolerance,
        mode="eval",
    )], metrics


# --------------------------------------------------------------------------------------------------------------
# The compiled program.


def run_program(problem, params, rest, plan: Plan, *, seed: int) -> dict[str, np.ndarray]:
    causal, padding = plan.causal_x is not None, plan.padding_x is not None
    args = dict(
        causal_x=jnp.asarray(plan.causal_x) if causal else None,
        replaced=jnp.asarray(plan.replaced) if causal else None,
        compared=jnp.asarray(plan.compared) if causal else None,
        cuts=jnp.asarray(plan.cuts, jnp.int32) if causal else None,
        padding_x=jnp.asarray(plan.padding_x) if padding else None,
        pad_token=np.int32(plan.pad_token) if padding else None,
        noise_seed=np.uint32(seed % 2**32),
    )
    program = make_program(problem)
    out = compiled.run("model/sequence", program, params, rest, args,
                       static_key=("model/sequence", problem, causal, padding),
                       opt_level=programs.RUN_ONCE_OPT_LEVEL, options=programs.compile_options())
    return jax.tree.map(np.asarray, out)


def make_program(problem):
    model = problem.model

    def program(params, rest, args):
        out = {}
        if args["causal_x"] is not None:
            out["causal_diff"], out["causal_scale"] = causal_differences(
                lambda x: model(params, rest, x), args["causal_x"], args["replaced"], args["compared"],
                args["cuts"])
        if args["padding_x"] is not None:
            out["padding_diff"], out["padding_scale"], out["padding_sites"] = padding_differences(
                model, params, rest, args["padding_x"], args["pad_token"], args["noise_seed"])
        return out

    return program


def _differences(out, base):
    """|out - base| per (example, position), max over the other axes, in float32; a NaN against a number is inf,
    two NaNs (or two equal infinities) are no difference."""
    out, base = out.astype(jnp.float32), base.astype(jnp.float32)
    same = (out == base) | (jnp.isnan(out) & jnp.isnan(base))
    d = jnp.where(same, 0.0, jnp.abs(out - base))
    d = jnp.where(jnp.isnan(d), jnp.inf, d)
    return jnp.max(d.reshape(d.shape[0], d.shape[1], -1), axis=-1)


def _scale(base):
    a = jnp.abs(base.astype(jnp.float32))
    return jnp.max(jnp.where(jnp.isfinite(a), a, 0.0))


def _compare_in_one_body(forward, shape_of_out, steps):
    """Run ``forward(step)`` for every step as the body of one scan, step 0 being the reference: every run is the
    same compiled code on the same shapes (see the module docstring). Returns the per-(example, position)
    differences of each later step from step 0, and the reference's scale."""
    zeros = jnp.zeros(shape_of_out.shape, jnp.float32)

    def body(reference, step):
        index, value = step
        out = forward(value).astype(jnp.float32)
        reference = jnp.where(index == 0, out, reference)
        return reference, _differences(out, reference)

    reference, diffs = jax.lax.scan(body, zeros, (jnp.arange(steps[0].shape[0]), steps[1]))
    return diffs[1:], _scale(reference)


def causal_differences(forward, x, replaced, compared, cuts):
    """``(C, T)``: for each cut ``t``, the largest change over the sequences of the outputs at each position
    ``<= t`` (0 after ``t``) when every input after ``t`` is replaced; only ``compared`` (real, not padded)
    positions count."""
    length = x.shape[1]
    position = jnp.arange(length).reshape((1, length) + (1,) * (x.ndim - 2))
    steps = jnp.concatenate([jnp.array([length - 1], jnp.int32), cuts])  # cut T-1 changes nothing: the reference

    def forward_cut(t):
        return forward(jnp.where(position > t, replaced, x))

    diffs, scale = _compare_in_one_body(forward_cut, jax.eval_shape(forward, x), (steps, steps))
    diffs = jnp.max(jnp.where(compared[None], diffs, 0.0), axis=1)  # over the sequences: (C, T)
    return jnp.where(jnp.arange(length)[None, :] <= cuts[:, None], diffs, 0.0), scale


def padding_differences(model, params, rest, x, pad_token, noise_seed):
    """``(k, T)`` change of the outputs at each real position (0 at padded ones) when noise is added to every
    token-embedding lookup at the padded positions; the outputs' scale; how many lookups were perturbed."""
    padded = x == pad_token
    sites = [0]

    def forward_noisy(amount):
        out, found = embedding_noise_forward(model, params, rest, x, padded, amount, noise_seed)
        sites[0] = found
        return out

    shape = jax.eval_shape(model, params, rest, x)
    amounts = jnp.array([0.0, 1.0], jnp.float32)
    diffs, scale = _compare_in_one_body(forward_noisy, shape, (amounts, amounts))
    return jnp.where(padded, 0.0, diffs[0]), scale, jnp.int32(sites[0])


# --------------------------------------------------------------------------------------------------------------
# The padding interpreter: the model's jaxpr, with noise added to token-embedding lookups at padded positions.


def embedding_noise_forward(model, params, rest, x, padded, amount, noise_seed):
    """``model(params, rest, x)`` evaluated equation by equation, with ``amount * noise`` added at the padded
    positions of every token-embedding lookup. Returns the outputs and how many lookups were perturbed."""
    fn = lambda p, r, tokens: model(p, r, tokens)  # noqa: E731
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, rest, x)
    values = jax.tree.leaves((params, rest)) + [x]
    assert len(values) == len(closed.jaxpr.invars), "the model's traced inputs do not match params, rest and x"
    kinds = [PARAM] * (len(values) - 1) + [TOKEN]
    walker = _NoiseWalker(padded, amount, noise_seed)
    outs, _ = walker.walk(closed.jaxpr, closed.consts, values, kinds)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs), walker.sites


class _NoiseWalker:
    def __init__(self, padded, amount, noise_seed):
        self.padded, self.amount, self.noise_seed = padded, amount, noise_seed
        self.sites = 0

    def walk(self, jaxpr, consts, values, kinds):
        env: dict = {}

        def read(v):
            return (v.val, CONST) if isinstance(v, Literal) else env[v]

        for var, value in zip(jaxpr.constvars, consts):
            env[var] = (value, CONST)
        for var, value, kind in zip(jaxpr.invars, values, kinds):
            env[var] = (value, kind)
        for eqn in jaxpr.eqns:
            invals, inkinds = zip(*[read(v) for v in eqn.invars]) if eqn.invars else ((), ())
            kind = max(inkinds, default=CONST)
            kind = MIXED if {TOKEN, PARAM} <= set(inkinds) or MIXED in inkinds else kind
            sub = called_jaxpr(eqn)  # the call-like equations activation capture walks into
            if sub is not None and kind in (TOKEN, MIXED):  # tokens flow in: an embedding may be inside
                outs, outkinds = self.walk(sub[0], sub[1], list(invals), list(inkinds))
            else:
                outs, outkinds = bind_equation(eqn, invals), [kind] * len(eqn.outvars)
                if self.is_lookup(eqn, inkinds):
                    noisy = self.add_noise(outs[0])
                    if noisy is not None:
                        outs = [noisy]
            for var, value, k in zip(eqn.outvars, outs, outkinds):
                env[var] = (value, k)
        results = [read(v) for v in jaxpr.outvars]
        return [r[0] for r in results], [r[1] for r in results]

    @staticmethod
    def is_lookup(eqn, inkinds) -> bool:
        """A token-embedding lookup: a parameter table gathered at indices computed from the tokens alone, or a
        function of the tokens alone (a one-hot encoding) multiplied with a parameter matrix."""
        if len(eqn.outvars) != 1 or not jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating):
            return False
        name = eqn.primitive.name
        if name == "gather":
            return inkinds[0] == PARAM and inkinds[1] == TOKEN
        if name == "dot_general":
            return sorted(inkinds[:2]) == [TOKEN, PARAM]
        return False

    def add_noise(self, value):
        """``value`` with noise of its own scale added at the padded positions, when its leading axes are the
        tokens' ``(batch, T)`` (or ``(batch * T,)``, or ``(T, batch)``); None otherwise."""
        b, t = self.padded.shape
        shape = value.shape
        if shape[:2] == (b, t):
            mask = self.padded
        elif shape[:2] == (t, b):
            mask = self.padded.T
        elif shape[:1] == (b * t,):
            mask = self.padded.reshape(b * t)
        else:
            return None
        mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
        self.sites += 1
        scale = 1.0 + jnp.sqrt(jnp.mean(jnp.square(value.astype(jnp.float32))))
        noise = hash_uniform(shape, self.noise_seed, 0x9AD0 + self.sites) * scale
        return value + (self.amount * jnp.where(mask, noise, 0.0)).astype(value.dtype)
