"""The data stage of the checklist: is the data what the model needs, before any training?

Seeds 000-003 all start here ("most bugs are in data"): non-finite values, shapes and label encodings, labels out of
range, missing or imbalanced classes, unnormalized inputs and targets, train/val leakage, conflicting duplicates, a
data factory that is not reproducible, constant features. Every check is vectorized numpy over the raw arrays the
data factory returned (no compile, no training): about a second per pass over 100k x 1k inputs, milliseconds on the
builtins. One module per family:

* :mod:`.integrity` -- ``data.nonfinite``, ``data.shape``
* :mod:`.labels` -- ``data.label_range``, ``data.label_distribution``, ``data.class_imbalance``
* :mod:`.scale` -- ``data.feature_scale``, ``data.target_scale``, ``data.constant_features``
* :mod:`.duplicates` -- ``data.leakage``, ``data.conflicting_labels``
* :mod:`.determinism` -- ``data.nondeterministic``
* :mod:`.sampling` -- ``data.sampled`` (iterable sources drawn up to ``data.max_examples``)

Thresholds are :class:`Settings` (``diagnostics.data.*``), each justified where it is used, and measured silent on
the healthy builtins (digits flat and image, wine, breast_cancer, regression).
"""

from __future__ import annotations

from harness.checks.base import Context, Outcome, Plot
from harness.checks.data import determinism, duplicates, integrity, labels, sampling, scale
from harness.checks.data.common import NAME, Part, Settings, Views

__all__ = ["Settings", "run"]


def run(ctx: Context, settings: Settings) -> Outcome:
    views = Views(ctx.dataset, settings)
    part = Part()
    part.add(integrity.check_nonfinite(views))
    part.add(integrity.check_shapes(views))
    part.add(sampling.check_sampled(ctx.dataset))
    if ctx.dataset.classification:
        part.add(labels.check_label_range(views))
        part.add(labels.check_label_distribution(views))
        part.add(labels.check_class_imbalance(views))
        if views.class_counts["train"] is not None:
            part.plots.append(Plot("label_distribution", "Label distribution by split",
                                   lambda path: labels.draw_label_distribution(path, views.class_counts)))
    part.add(scale.check_feature_scale(views))
    part.add(scale.check_target_scale(views))
    part.add(duplicates.check_leakage(views))
    part.add(duplicates.check_conflicting_labels(views))
    part.add(determinism.check_nondeterministic(ctx, settings))
    part.add(scale.check_constant_features(views))
    return Outcome(NAME, findings=part.findings, metrics=headline_first(part.metrics), series=part.series,
                   plots=part.plots)


# The terminal's summary shows a diagnostic's first metrics: the size of the data and its scale.
HEADLINE = ("data/examples/train", "data/examples/val", "data/features", "data/feature_scale/rms")


def headline_first(metrics: dict) -> dict:
    return {**{k: metrics[k] for k in HEADLINE if k in metrics}, **metrics}
