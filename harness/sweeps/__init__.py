"""Sweeps from the command line: multirun collapsing, compare, reproduce, sync."""
