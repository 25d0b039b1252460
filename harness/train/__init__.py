"""``harness train``: the configured model, data, loss and optimizer trained in full, watched by the monitor.

* :mod:`.loop`: the compiled programs (init, a chunk of steps as one ``lax.scan`` with the monitor inside,
  validation);
* :mod:`.checkpoint`: orbax checkpoints, so a killed run resumes where it stopped;
* :mod:`.run`: the driver (progress, validation, W&B, checkpoints, the monitor's findings, the report).
"""
