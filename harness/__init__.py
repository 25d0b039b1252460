"""harness: finds out why a neural network does not train.

The debugging checklist (data -> model -> training -> hyperparameters) run against a user's own Flax NNX model,
data and loss, as jit-compiled JAX programs whose sweeps are vmapped over members.
"""

__version__ = "0.1.0"
