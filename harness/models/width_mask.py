"""Width masking: a model built at a large width that trains exactly like a narrower one.

The capacity ladder (:mod:`harness.checks.training.capacity`) trains several widths of one model. Every width is a
different program shape, so a ladder of six widths costs six compiles (about 1-2 s each here, while the small
models train in well under a second). A *width-masked* model is built at the ladder's largest width and told its
``active_width`` as a traced value: hidden units past it are multiplied by zero after the activation, so they get
zero gradients and never move (Adam's update for a zero gradient is zero), and the live units compute exactly what
the narrow model computes. All rungs then become members of one vmapped program.

Initialization must match too: a variance-scaling initializer (He, LeCun, Glorot; He et al. 2015) draws a kernel
with variance ``scale / fan``, and the fan of a layer fed by masked units is the full width, not the live one. Drawn
at the full shape and multiplied by ``sqrt(fan_full / fan_live)``, the live block has exactly the distribution of a
kernel drawn at the narrow shape, so a masked rung trains like the real small model (not bitwise: other draws).

Protocol for a model to support the masked ladder: accept ``active_width`` (None by default: an ordinary model) and,
when given, hold a :class:`WidthMask` variable. The built-in MLP and CNN do; any other model is trained one program
per rung.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# How each built-in initializer's variance depends on the kernel's fans (jax.nn.initializers.variance_scaling
# modes); None: the initializer ignores the shape (zeros, a fixed normal), so no rescaling is needed.
FAN_MODES: dict[str, str | None] = {
    "he_normal": "fan_in",
    "he_uniform": "fan_in",
    "lecun_normal": "fan_in",
    "glorot_normal": "fan_avg",
    "glorot_uniform": "fan_avg",
    "zeros": None,
    "normal_1": None,
}


class WidthMask(nnx.Variable):
    """Which hidden units are live (1.0) or masked (0.0) in a width-masked model. Not a Param: never trained."""


def unit_mask(active_width, full_width: int):
    """1.0 for the first ``active_width`` units of ``full_width``, 0.0 after (``active_width`` may be traced)."""
    return (jnp.arange(full_width) < active_width).astype(jnp.float32)


def _fan(mode: str, fan_in, fan_out):
    return {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]


def init_rescale(mode: str | None, fan_in: tuple, fan_out: tuple):
    """The factor that turns a kernel drawn for the full shape into one distributed like a kernel drawn for the
    live shape. ``fan_in`` and ``fan_out`` are ``(full, live)`` pairs (live values may be traced)."""
    if mode is None:
        return jnp.float32(1.0)
    full = _fan(mode, jnp.float32(fan_in[0]), jnp.float32(fan_out[0]))
    live = _fan(mode, jnp.asarray(fan_in[1], jnp.float32), jnp.asarray(fan_out[1], jnp.float32))
    return jnp.sqrt(full / jnp.maximum(live, 1.0))


def rescale_kernel(kernel: nnx.Param, factor) -> None:
    kernel[...] = kernel[...] * factor.astype(kernel[...].dtype)


class MaskingUnsupported(TypeError):
    """The model cannot be width-masked faithfully (e.g. an initializer whose fan dependence is unknown)."""


def fan_mode(init: str) -> str | None:
    if init not in FAN_MODES:
        raise MaskingUnsupported(f"no known fan mode for the initializer {init!r}")
    return FAN_MODES[init]


def mask_stack(hidden, head, active_width, init: str, head_init: str = "lecun_normal") -> WidthMask:
    """Width-mask a stack of hidden layers of equal width (Linear or Conv) feeding a dense head.

    Rescales the kernels in place so the live block is distributed as if drawn at ``active_width`` (the first
    layer's input and the head's output are not masked) and returns the mask the model multiplies its hidden
    activations by.
    """
    if len(hidden) == 0:
        raise MaskingUnsupported("no hidden layers: the width changes nothing")
    # 0 (a member's default width) means every unit live: the model exactly as built (every factor 1).
    active_width = jnp.where(jnp.asarray(active_width) > 0, active_width, hidden[0].kernel[...].shape[-1])
    mode = fan_mode(init)
    for i, layer in enumerate(hidden):
        shape = layer.kernel[...].shape  # (..., in, out): a Linear is (in, out), a Conv (kh, kw, in, out)
        field = math.prod(shape[:-2])  # receptive field: fans of a conv count every kernel position
        live_in = shape[-2] if i == 0 else active_width
        factor = init_rescale(mode, (field * shape[-2], field * live_in), (field * shape[-1], field * active_width))
        rescale_kernel(layer.kernel, factor)
    width, outputs = head.kernel[...].shape
    rescale_kernel(head.kernel, init_rescale(fan_mode(head_init), (width, active_width), (outputs, outputs)))
    return WidthMask(unit_mask(active_width, width))


def is_masked(model: nnx.Module) -> bool:
    """True when ``model`` was built width-masked (it holds a :class:`WidthMask`)."""
    return len(jax.tree.leaves(nnx.state(model, WidthMask))) > 0
