"""Does the data factory return the same data twice (``data.nondeterministic``)?

A factory that shuffles or subsamples with an unseeded random generator gives every run (and every member of a
sweep, every rerun of a failing experiment) different data, so results cannot be reproduced or compared. The check
calls the factory a second time and compares the arrays bit for bit; when the rows are the same in another order it
says so (the signature of an unseeded shuffle). Seeds: "Data not shuffled / Shuffle each epoch" and "Standardize
pipeline" (seeds 000, 001) and big_vision's practice of deterministic input pipelines.
"""

from __future__ import annotations

import numpy as np

from harness.checks.data import stats
from harness.checks.data.common import Part
from harness.data.dataset import ARRAY_KEYS, Dataset
from harness.engine.core import Arrays
from harness.findings import error


def check_nondeterministic(ctx, settings) -> Part:
    part = Part()
    if not settings.check_determinism:
        part.metrics["data/nondeterministic/status"] = "skipped: diagnostics.data.check_determinism=false"
        return part
    if ctx.reload_data is None:
        part.metrics["data/nondeterministic/status"] = "skipped: the data cannot be reloaded here"
        return part
    try:
        again = ctx.reload_data()
    except Exception as err:  # a factory that works once and fails the second time is itself not reproducible
        part.metrics["data/nondeterministic/status"] = "reload failed"
        part.findings.append(error(
            "data.nondeterministic",
            f"calling the data factory a second time failed ({type(err).__name__}: {err}), although the first call "
            f"worked.",
            "Make the factory repeatable: no state kept between calls (consumed iterators, files moved or deleted "
            "after reading).", exception=type(err).__name__))
        return part
    differences = compare(ctx.dataset, again)
    # Later diagnostics that compare two loads (training determinism, Context.reloaded_arrays) reuse this second
    # load instead of calling the factory a third time. Bitwise-equal data gives bitwise-equal training arrays, so
    # then the run's own arrays stand in (converting 100k x 1k again would cost seconds).
    if "_reloaded_arrays" not in ctx.shared:
        same = not differences and ctx.arrays is not None
        ctx.shared["_reloaded_arrays"] = ctx.arrays if same else Arrays(*again.training_arrays())
    part.metrics["data/nondeterministic/differing_keys"] = len(differences)
    part.metrics["data/nondeterministic/status"] = "differs" if differences else "identical"
    if differences:
        keys = ", ".join(differences)
        reordered = [k for k, d in differences.items() if d.get("same_rows_reordered")]
        detail = "; ".join(_describe(k, d) for k, d in differences.items())
        shuffled = (f" {', '.join(reordered)} hold the same examples in a different order: an unseeded shuffle."
                    if reordered else "")
        part.findings.append(error(
            "data.nondeterministic",
            f"two calls of the data factory returned different data ({keys}): {detail}.{shuffled} Runs, sweep "
            f"points and reruns each see different data, so their results cannot be compared.",
            "Seed every random choice in the factory (np.random.default_rng(seed), a seeded split such as "
            "harness.data.builtin.split) and load files in a fixed, sorted order.",
            differing=list(differences), **{k: d for k, d in differences.items()}))
    return part


def compare(first: Dataset, second: Dataset) -> dict[str, dict]:
    """The keys whose arrays differ bitwise between two loads, with how (shape, dtype, changed rows)."""
    out: dict[str, dict] = {}
    for key in ARRAY_KEYS:
        a, b = getattr(first, key), getattr(second, key)
        if a.shape != b.shape or a.dtype != b.dtype:
            out[key] = {"shape": [list(a.shape), list(b.shape)], "dtype": [str(a.dtype), str(b.dtype)]}
            continue
        ra = stats.flat(np.ascontiguousarray(a)).view(np.uint8) if a.size else a.reshape(len(a), -1)
        rb = stats.flat(np.ascontiguousarray(b)).view(np.uint8) if b.size else b.reshape(len(b), -1)
        changed = np.zeros(len(a), bool)
        for rows in stats.row_chunks(len(a), ra.shape[1]):
            changed[rows] = np.any(ra[rows] != rb[rows], axis=1)
        if changed.any():
            ha, hb = stats.row_hashes(a), stats.row_hashes(b)
            out[key] = {"changed_rows": int(changed.sum()), "rows": len(a),
                        "same_rows_reordered": bool(np.array_equal(np.sort(ha), np.sort(hb)))}
    if first.num_classes != second.num_classes:
        out["num_classes"] = {"values": [first.num_classes, second.num_classes]}
    return out


def _describe(key: str, d: dict) -> str:
    if "changed_rows" in d:
        return f"{key} differs in {d['changed_rows']} of {d['rows']} rows"
    if "shape" in d:
        return f"{key} has shape {tuple(d['shape'][0])} then {tuple(d['shape'][1])}"
    return f"{key} is {d['values'][0]} then {d['values'][1]}"
