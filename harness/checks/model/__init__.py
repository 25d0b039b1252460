"""Model checks (placeholder: being implemented)."""
import dataclasses

from harness.checks.base import Outcome


@dataclasses.dataclass(frozen=True)
class Settings:
    enabled_note: str = ""


def run(ctx, settings) -> Outcome:
    return Outcome("model", skipped="not implemented yet")
