"""The reference job (MLP 64-128-128-10 on digits / 16, Adam 1e-3, batch 128) as one Context per test session.

The seeds, controls and capacity tests share it: one Problem object, so requests of equal shapes share compiled
programs across those test files (a compile costs seconds here; the runs cost less). Each test takes
:func:`fresh` copies, so results are never served from another test's memo.
"""

from __future__ import annotations

import dataclasses
import functools

from helpers import compose


@functools.cache
def reference_context():
    from harness.pipeline import build_context

    return build_context(compose(["logger=none"]))


def fresh(ctx=None, **changes):
    """A copy of ``ctx`` (default: the reference) with an empty memo and shared results, same Problem."""
    return dataclasses.replace(ctx or reference_context(), shared={}, **changes)
