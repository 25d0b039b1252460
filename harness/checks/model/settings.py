"""Settings of the model checks (``diagnostics.model`` in the config; each threshold is justified where it is used
and measured silent on the healthy builtins)."""

from __future__ import annotations

import dataclasses

from harness.errors import HarnessError

NAME = "model"


@dataclasses.dataclass(frozen=True)
class Settings:
    batch_size: int = 64
    init_seeds: int = 4
    max_initial_loss_excess: float = 1.0
    max_initial_loss_ratio: float = 3.0
    initial_loss_error_ratio: float = 100.0
    probability_tolerance: float = 1e-3
    pinned_output_fraction: float = 0.05
    unreachable_target_fraction: float = 0.01
    vanishing_gradient_ratio: float = 1e-2
    perturbation_scale: float = 0.01
    zero_gradient_steps: int = 2
    gradient_check: bool = True
    gradient_check_examples: int = 8
    gradient_check_directions: int = 6
    gradient_check_step: float = 1e-6
    gradient_check_tolerance: float = 1e-3
    batch_dependence_rows: int = 4
    batch_dependence_tolerance: float = 1e-6
    dead_unit_fraction: float = 0.5
    saturated_unit_fraction: float = 0.5
    saturation_level: float = 0.99
    saturated_example_fraction: float = 0.9
    preactivation_saturation: float = 5.0
    saturated_preactivation_fraction: float = 0.5
    vanishing_activation_ratio: float = 1e-3
    exploding_activation_ratio: float = 10.0
    exploding_activation_error_ratio: float = 100.0
    sequence_examples: int = 4
    sequence_positions: int = 64
    sequence_tolerance: float = 0.0
    max_listed: int = 10

    def validate(self, key: str):
        def fail(name, message):
            raise HarnessError(f"{message}, got {getattr(self, name)}", key=f"{key}.{name}")

        for name in ("batch_size", "init_seeds", "gradient_check_examples", "gradient_check_directions",
                     "batch_dependence_rows", "sequence_examples", "sequence_positions", "max_listed"):
            if getattr(self, name) < 1:
                fail(name, "must be at least 1")
        if self.batch_size < 2:
            fail("batch_size", "must be at least 2 (batch dependence compares examples)")
        if self.max_initial_loss_ratio <= 1:
            fail("max_initial_loss_ratio", "is a ratio to the expected loss and must be above 1")
        if self.initial_loss_error_ratio <= self.max_initial_loss_ratio:
            fail("initial_loss_error_ratio", "must be above max_initial_loss_ratio (an error is worse than a warning)")
        if self.exploding_activation_ratio <= 1:
            fail("exploding_activation_ratio", "is a growth factor and must be above 1")
        if self.exploding_activation_error_ratio < self.exploding_activation_ratio:
            fail("exploding_activation_error_ratio", "must be at least exploding_activation_ratio")
        if self.preactivation_saturation <= 0:
            fail("preactivation_saturation", "is a pre-activation magnitude and must be positive")
        if self.zero_gradient_steps < 1:
            fail("zero_gradient_steps", "must be at least 1 (zero-initialized designs get their gradient after a step)")
        if self.max_initial_loss_excess <= 0:
            fail("max_initial_loss_excess", "is a number of nats above -log(1/C) and must be positive")
        for name in ("probability_tolerance", "vanishing_gradient_ratio", "perturbation_scale", "gradient_check_step",
                     "gradient_check_tolerance", "batch_dependence_tolerance", "vanishing_activation_ratio"):
            if not 0 < getattr(self, name) < 1:
                fail(name, "must be in (0, 1)")
        for name in ("dead_unit_fraction", "saturated_unit_fraction", "saturated_example_fraction",
                     "saturated_preactivation_fraction", "pinned_output_fraction", "unreachable_target_fraction"):
            if not 0 < getattr(self, name) <= 1:
                fail(name, "must be in (0, 1]")
        if not 0.5 < self.saturation_level < 1:
            fail("saturation_level", "must be in (0.5, 1)")
        if not 0 <= self.sequence_tolerance < 1:
            fail("sequence_tolerance", "must be in [0, 1) (0: outputs must not change at all)")
