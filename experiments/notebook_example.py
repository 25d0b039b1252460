"""harness from Python: the checklist on a model, data and loss defined right here, as in a notebook.

Run it as a script (each step is what a notebook cell would hold):

    python experiments/notebook_example.py            # the whole checklist, twice (about a minute on a laptop)
    python experiments/notebook_example.py --quick    # only the data and model checks

Step 1 diagnoses a healthy MLP; step 2 "edits the cell": the same class, redefined with a planted bug (softmax
probabilities handed to a loss that expects logits), diagnosed again in the same process. The second report names
it (``model.output_range``), because cached programs are keyed by the code they were traced from, never by name.
Both reports are written to ``outputs/<date>/<time>/`` (report.json, report.md, plots), as the CLI writes them.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import harness

QUICK = ["diagnostics.run=[data,model]"] if "--quick" in sys.argv[1:] else []

# --- cell: data, as arrays in memory ------------------------------------------------------------------------------
digits = load_digits()
x = digits.data.astype(np.float32)
y = digits.target.astype(np.int32)
order = np.random.default_rng(0).permutation(len(x))
x, y = x[order], y[order]
n_train = int(0.75 * len(x))
mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
x = (x - mean) / std
data = {"x_train": x[:n_train], "y_train": y[:n_train], "x_val": x[n_train:], "y_val": y[n_train:],
        "num_classes": 10}


# --- cell: the loss, one value per example (optax's takes logits, which harness reads off its name) ---------------
loss = optax.softmax_cross_entropy_with_integer_labels


# --- cell: the model -----------------------------------------------------------------------------------------------
class MLP(nnx.Module):
    """harness calls it as MLP(rngs=..., input_shape=..., num_outputs=..., width=...): `width` is what the capacity
    ladder varies."""

    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 64):
        self.hidden = nnx.Linear(int(np.prod(input_shape)), width, rngs=rngs)
        self.out = nnx.Linear(width, num_outputs, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1))))


# --- cell: diagnose ------------------------------------------------------------------------------------------------
report = harness.diagnose(model=MLP, data=data, loss=loss, overrides=[*QUICK])
print(report)  # in Jupyter, `report` alone shows report.md with the plots inline


# --- cell, edited: a planted bug, run again --------------------------------------------------------------------------
class MLP(nnx.Module):  # noqa: F811 - the same cell, edited
    def __init__(self, *, rngs: nnx.Rngs, input_shape, num_outputs: int, width: int = 64):
        self.hidden = nnx.Linear(int(np.prod(input_shape)), width, rngs=rngs)
        self.out = nnx.Linear(width, num_outputs, rngs=rngs)

    def __call__(self, x):
        return jax.nn.softmax(self.out(jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))))  # the bug


report = harness.diagnose(model=MLP, data=data, loss=loss, overrides=[*QUICK])
print(report)
print(f"\nfirst to fix: {report.headline.id if report.headline else 'nothing'}")
assert report.finding("model.output_range") is not None, "the planted bug was not found"
