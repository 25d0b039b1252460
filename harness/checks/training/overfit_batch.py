"""overfit_batch (placeholder: being implemented)."""
import dataclasses

from harness.checks.base import Outcome


@dataclasses.dataclass(frozen=True)
class Settings:
    enabled_note: str = ""


def run(ctx, settings) -> Outcome:
    return Outcome("overfit_batch", skipped="not implemented yet")
