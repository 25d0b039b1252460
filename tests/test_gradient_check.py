"""model.gradient_check on subtly wrong backward rules: a custom_vjp that forgets one term of the product rule is
off by a few percent, which a float32 tolerance alone would excuse; the step-size consistency test does not, in
float64 and in float32 alike, while correct rules stay silent (the float32 model of test_model_checks too)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import planted
from test_model_checks import Planted, run_stage
from zoo.models import swish, swish_wrong  # the same custom_vjp activations the zoo plants


def swish_mlp(*, rngs, input_shape, num_outputs):
    return planted.MLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, activation=swish)


def swish_wrong_mlp(*, rngs, input_shape, num_outputs):
    return planted.MLP(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs, activation=swish_wrong)


def swish_wrong_mlp_float32(*, rngs, input_shape, num_outputs, width: int = 64):
    model = swish_wrong_mlp(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs)
    sizes = [int(np.prod(input_shape)), width, width]
    model.hidden = nnx.List([nnx.Linear(a, b, dtype=jnp.float32, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    model.out = nnx.Linear(width, num_outputs, dtype=jnp.float32, rngs=rngs)
    return model


@pytest.mark.parametrize("factory, wrong", [("swish_mlp", False), ("swish_wrong_mlp", True),
                                            ("swish_wrong_mlp_float32", True)])
def test_a_backward_rule_missing_one_term_is_wrong_and_the_right_one_is_not(factory, wrong):
    outcome, _, _ = run_stage([Planted("model", f"test_gradient_check.{factory}")], gradient_check=True)
    found = [f for f in outcome.findings if f.id == "model.gradient_check"]
    assert bool(found) == wrong, [f.message for f in outcome.findings]
    if wrong:
        assert found[0].evidence["disagreement_between_steps"] < found[0].evidence["relative_errors"][0] or \
            np.median(found[0].evidence["relative_errors"]) > found[0].evidence["tolerance"]
