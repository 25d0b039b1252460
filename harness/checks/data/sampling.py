"""How much of an iterable data source the checks see (``data.sampled``).

A data factory may return iterables (:mod:`harness.data.iterables`): harness draws at most ``data.max_examples``
examples into memory and every diagnostic runs on those. The metric ``data/examples_drawn`` says how many were
drawn; when a source had more, an info finding says so, so nobody mistakes a sample for the whole data set (a
shuffled stream gives a representative sample; a stream sorted by class does not, which the label checks show).
"""

from __future__ import annotations

from harness.checks.data.common import Part
from harness.data.dataset import Dataset
from harness.findings import info


def check_sampled(dataset: Dataset) -> Part:
    part = Part()
    drawn = tuple(getattr(dataset, "drawn", ()) or ())
    if not drawn:
        return part  # arrays: used whole, nothing drawn
    total = sum(d.examples for d in drawn)
    part.metrics["data/examples_drawn"] = total
    truncated = [d for d in drawn if d.more]
    if truncated:
        kind = "an iterable" if len(drawn) == 1 else "iterables"
        detail = ", ".join(f"{d.split} {d.examples} ({'more available' if d.more else 'all of it'})" for d in drawn)
        cap = sum(d.cap for d in drawn)
        part.findings.append(info(
            "data.sampled",
            f"drew {total} examples from {kind} (more were available): {detail}. Every diagnostic runs on these "
            f"examples, not on the whole source.",
            f"Raise data.max_examples (now {cap}; e.g. ++data.max_examples={cap * 2} on the command line) to check "
            f"more data, at the cost of memory and time; shuffle the source so the sample is representative.",
            examples_drawn=total, max_examples=cap, sources=[d.to_dict() for d in drawn],
        ))
    return part
