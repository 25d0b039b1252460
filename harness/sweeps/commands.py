"""Subcommands on finished runs (placeholder: being implemented)."""

from harness.errors import HarnessError


def main(name: str, args: list[str]) -> int:
    raise HarnessError(f"'harness {name}' is not implemented yet")
