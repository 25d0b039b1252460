"""Training diagnostics: sweeps run as vmapped, jit-compiled programs (harness.engine)."""
