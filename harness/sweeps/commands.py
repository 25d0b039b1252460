"""Subcommands on finished runs: ``harness compare``, ``harness reproduce``, ``harness sync``.

Each lives in its own module with an argparse ``main(args) -> exit code``; bad input raises
:class:`harness.errors.HarnessError`, which the CLI prints as one line (exit 2), and argparse's own usage errors
exit 2 as well.
"""

from __future__ import annotations

import importlib

from harness.errors import HarnessError

COMMANDS = {
    "compare": "harness.sweeps.compare",
    "reproduce": "harness.sweeps.reproduce",
    "sync": "harness.sweeps.sync",
}


def main(name: str, args: list[str]) -> int:
    if name not in COMMANDS:
        raise HarnessError(f"unknown command {name!r}; valid: {', '.join(COMMANDS)}")
    return importlib.import_module(COMMANDS[name]).main(list(args))
