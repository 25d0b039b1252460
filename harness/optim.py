"""Optimizers from config, built so the learning rate and weight decay are traced values.

``optax.inject_hyperparams`` moves the learning rate and weight decay into the optimizer state, so one compiled
training program serves every member of a sweep (vmapped over learning rate, weight decay, seed, ...) and a
schedule (the LR range test's exponential ramp) is a per-step write into that state.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import optax


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """The static part of an optimizer config: which optax factory and its fixed keyword arguments."""

    factory: Callable[..., optax.GradientTransformation]
    kwargs: tuple[tuple[str, Any], ...] = ()
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_norm: float | None = None
    name: str = "adam"

    @property
    def decoupled_weight_decay(self) -> bool:
        """True when the factory takes ``weight_decay`` itself (AdamW-style, Loshchilov & Hutter 2019)."""
        return "weight_decay" in inspect.signature(self.factory).parameters


def make_transform(spec: OptimSpec) -> Callable[..., optax.GradientTransformation]:
    """A factory ``(learning_rate, weight_decay) -> GradientTransformation`` suitable for ``inject_hyperparams``."""
    kwargs = dict(spec.kwargs)

    def factory(learning_rate, weight_decay):
        parts = []
        if spec.clip_norm is not None:
            parts.append(optax.clip_by_global_norm(spec.clip_norm))
        if spec.decoupled_weight_decay:
            parts.append(spec.factory(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs))
        else:
            # Coupled L2 for optimizers without their own weight decay (classic SGD/Adam + L2 penalty).
            parts.append(optax.add_decayed_weights(weight_decay))
            parts.append(spec.factory(learning_rate=learning_rate, **kwargs))
        return optax.chain(*parts)

    return factory


def make_optimizer(spec: OptimSpec, learning_rate, weight_decay) -> optax.GradientTransformation:
    """The optimizer with traced hyperparameters in its state: ``state.hyperparams['learning_rate']``."""
    return optax.inject_hyperparams(make_transform(spec))(learning_rate=learning_rate, weight_decay=weight_decay)


def set_learning_rate(opt_state, learning_rate):
    """Write the learning rate for the next update into an ``inject_hyperparams`` state (a pure update)."""
    hyperparams = dict(opt_state.hyperparams)
    hyperparams["learning_rate"] = learning_rate
    return opt_state._replace(hyperparams=hyperparams)
