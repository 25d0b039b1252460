"""harness: finds out why a neural network does not train.

The debugging checklist (data -> model -> training -> hyperparameters) run against a user's own model, data and
loss, as jit-compiled JAX programs whose sweeps are vmapped over members.

From Python (a notebook, a script)::

    import harness
    report = harness.diagnose(model=MyModel, data={"x_train": ..., "y_train": ..., "x_val": ..., "y_val": ...})
    report            # in Jupyter: the report with its plots; print(report) in a terminal

See :mod:`harness.api`. ``import harness`` stays light: JAX loads on the first call.
"""

__version__ = "0.1.0"

__all__ = ["HarnessError", "Report", "diagnose"]


def __getattr__(name: str):
    if name in ("diagnose", "Report"):
        from harness import api

        return getattr(api, name)
    if name == "HarnessError":
        from harness.errors import HarnessError

        return HarnessError
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
