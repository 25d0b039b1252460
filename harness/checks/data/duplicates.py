"""Duplicates: validation examples also in training, exactly or as near-copies (``data.leakage``), and identical
training inputs with different labels (``data.conflicting_labels``).

Seeds: "Check if validation data appears in training set: set(map(tuple, train_data)) & set(map(tuple, val_data))"
(seed 001), "Perfect training accuracy: data leakage" (seed 000), "Data leakage: are you accidentally training on
your test data?" (seed 002), "noisy data" and "labels misaligned" (seeds 003, 000). Exact copies are compared by
value (a 64-bit hash per row, then confirmed element by element), linear in the data: about a second for 100k x 1k.

Near-copies (issue 10): validation examples that are training examples plus noise, rescaled or re-encoded (uint8
vs float, 0..1 vs -1..1), or with brightness and contrast changed, which no hash finds. A validation example is one
when it lies far closer to a training example than training examples lie to each other, in the data's own spacing,
and validation has more of them than held-out training examples have (Fisher's exact test), so dense or
naturally near-duplicated but honest data stay silent: :func:`near_duplicates` gives the rule and why. Nearest
neighbours by blocked matmul over randomly projected features, a few thousand sampled queries against every
training row: about 1.5 s of one core for 100k x 1k. Out of scope: geometric augmentations (a shift, a flip, a
crop move every pixel: a digits image shifted by one pixel is 2.9 x the typical nearest-neighbour distance from its
original, per example, and nearer to other images), and integer inputs (token or category ids), where only exact
copies are compared.

Thresholds. Leakage is reported by the fraction of validation examples found in training (exact plus the estimated
near-copies): from ``leakage_error_fraction`` (1%) an error (validation metrics are inflated by up to that much
accuracy, the size of many real improvements); down to ``leakage_info_fraction`` (0.1%) a warning; below, info (a
handful of natural duplicates in a large set, like MNIST's). None of the builtins has a single duplicate row, nor a
near-copy. Conflicts are an error from ``conflicting_error_fraction`` (5% of training examples: an irreducible
error floor that size is a labelling bug, not noise), else a warning.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from harness.checks.data import stats
from harness.checks.data.common import Part, Views
from harness.findings import error, info, warning


def check_leakage(v: Views) -> Part:
    """``data.leakage``: validation examples whose inputs also appear in training, exactly or as near-copies
    (:func:`near_duplicates`), in one finding; duplicates within validation (info from ``val_duplicate_fraction``:
    they weight a few examples' errors several times)."""
    s = v.settings
    part = Part()
    if not v.has_features:
        return part  # data.shape reports it; featureless rows would all "match"
    g_train, g_val = v.groups["train"], v.groups["val"]
    part.metrics["data/duplicates/train"] = g_train.extra_copies
    part.metrics["data/duplicates/val"] = g_val.extra_copies
    if not v.same_input_shape:
        return part  # data.shape already reports it; rows of different shapes cannot match
    val_rows, train_rows = stats.matches_in(v.x("val"), v.row_hashes["val"], g_val.rows,
                                            v.x("train"), v.row_hashes["train"], g_train.rows)
    n_val = len(g_val.rows)
    leaked = len(val_rows)
    fraction = leaked / n_val if n_val else 0.0
    part.metrics["data/leakage/count"] = leaked
    part.metrics["data/leakage/fraction"] = fraction
    near = near_duplicates(v, val_rows)
    part.metrics.update(near.metrics())
    if leaked or near.significant:
        part.findings.append(_leakage_finding(v, val_rows, train_rows, near, n_val))
    dup_fraction = g_val.extra_copies / n_val if n_val else 0.0
    if dup_fraction >= s.val_duplicate_fraction:
        part.findings.append(info(
            "data.leakage",
            f"{g_val.extra_copies} of {n_val} validation examples ({dup_fraction:.1%}) are exact copies of other "
            f"validation examples: the validation metric counts them several times.",
            "Deduplicate the validation split, so each distinct example counts once.",
            val_duplicates=g_val.extra_copies, fraction=dup_fraction))
    return part


def _leakage_finding(v: Views, val_rows: np.ndarray, train_rows: np.ndarray, near: "Near", n_val: int):
    """One finding for exact and near copies together, its severity by their combined fraction of validation."""
    s = v.settings
    leaked = len(val_rows)
    total = leaked + (near.estimated if near.significant else 0)
    fraction = total / n_val if n_val else 0.0
    make = (error if fraction >= s.leakage_error_fraction else
            warning if fraction >= s.leakage_info_fraction else info)
    parts, evidence = [], {}
    if leaked:
        same_label = _same_labels(v, val_rows, train_rows)
        labels = (f"; {int(same_label.sum())} of them with the same label" if same_label is not None else "")
        parts.append(
            f"{leaked} of {n_val} validation examples ({leaked / n_val:.1%}) also appear in the training split (exact "
            f"input matches{labels}; val rows {stats.listing(val_rows, s.max_listed)} = train rows "
            f"{stats.listing(train_rows, s.max_listed)})")
        evidence.update(val_rows=stats.first(val_rows, s.max_listed), train_rows=stats.first(train_rows, s.max_listed),
                        same_label=int(same_label.sum()) if same_label is not None else None)
    if near.significant:
        parts.append(_near_message(near, n_val, s.max_listed, more=bool(leaked)))
        evidence.update(near=near.estimated, near_fraction=near.excess_fraction,
                        near_val_rows=stats.first(near.val_rows, s.max_listed),
                        near_train_rows=stats.first(near.train_rows, s.max_listed),
                        near_pair=near.pair, near_views=near.views, near_p_value=near.p_value,
                        near_checked=_checked(near))
        near_labels = _same_labels(v, near.val_rows, near.train_rows)
        evidence["near_same_label"] = int(near_labels.sum()) if near_labels is not None else None
    what = "copies" if not near.significant else "near-copies" if not leaked else "copies and near-copies"
    suggestion = ("Deduplicate before splitting (e.g. on a hash of each example), and split by the unit that must "
                  "not leak (patient, user, document) rather than by row.")
    if near.significant:
        suggestion += (" Near-copies come from augmenting, re-encoding or re-sampling before the split: split the "
                       "original examples first, then augment the training split only; drop validation examples "
                       "within the listed distance of a training example.")
    return make("data.leakage",
                "; ".join(parts) + f": validation metrics on these {what} measure memorization, not generalization.",
                suggestion, count=total, fraction=fraction, exact=leaked, **evidence)


def _near_message(near: "Near", n_val: int, k: int, more: bool) -> str:
    pair = near.pair
    view = next(w for w in near.views if w["view"] == pair["view"])
    checked = (f"{near.checked_val} sampled" if near.checked_val < near.candidates_val else
               f"the {near.checked_val} checked")
    lead = f"and about {near.estimated} more" if more else f"About {near.estimated} of {n_val} validation examples"
    return (f"{lead} ({near.estimated / n_val:.1%}) are near-copies of training examples: {len(near.val_rows)} of "
            f"{checked} lie closer to a training example than {view['limit'] / view['spacing']:.2g} x the typical "
            f"nearest-neighbour distance between training examples (against the same {near.reference} training "
            f"examples, {near.flagged_val} of them vs {near.flagged_train} of {near.checked_train} held-out training "
            f"examples: Fisher's exact test p = {near.p_value:.1g}); e.g. val row {pair['val_row']} is "
            f"{pair['distance']:.3g} from train row {pair['train_row']} where the typical distance is "
            f"{pair['spacing']:.3g} ({view['description']}); near-copies at val rows "
            f"{stats.listing(near.val_rows, k)}")


def _checked(near: "Near") -> str:
    how = (f"nearest neighbours searched in {SEARCH_DIMS} random projections, candidates measured exactly"
           if near.projected else "exact nearest neighbours")
    return (f"{near.checked_val} of {near.candidates_val} validation rows and {near.checked_train} held-out "
            f"training rows compared with the other {near.reference} training rows, validation rows also with the "
            f"held-out ones ({how})")


def _same_labels(v: Views, val_rows: np.ndarray, train_rows: np.ndarray) -> np.ndarray | None:
    yv, yt = stats.flat(v.y("val"))[val_rows], stats.flat(v.y("train"))[train_rows]
    if yv.shape[1:] != yt.shape[1:]:
        return None
    return np.all(yv == yt, axis=1)


def check_conflicting_labels(v: Views) -> Part:
    """``data.conflicting_labels`` (classification): identical training inputs labelled with different classes.
    In regression, repeated inputs with different targets are ordinary noise, so only the count is recorded.
    Per-position labels conflict when identical inputs carry different label sequences (label maps); a language
    model's identical contexts followed by different next tokens are what language is, so it is not judged."""
    s = v.settings
    part = Part()
    if not v.has_features or v.causal:
        return part
    groups = v.groups["train"]
    labels = v.labels["train"] if v.dataset.classification else None
    if labels is None:
        return part
    duplicated = groups.duplicated
    part.metrics["data/conflicting_labels/count"] = 0
    if not duplicated.any():
        return part
    idx = np.rint(labels).astype(np.int64) if labels.dtype.kind == "f" else labels.astype(np.int64)
    per_position = idx.ndim > 1
    if per_position:  # a label sequence or map per example: compare whole rows, by an exact hash of each
        idx = stats.row_hashes(np.where(idx < 0, -1, idx))
    # Per group: the smallest and largest label; a group conflicts when they differ.
    n_groups = len(groups.sizes)
    lo = np.full(n_groups, np.iinfo(np.int64).max)
    hi = np.full(n_groups, np.iinfo(np.int64).min)
    np.minimum.at(lo, groups.group, idx)
    np.maximum.at(hi, groups.group, idx)
    conflicting_group = lo != hi
    in_conflict = conflicting_group[groups.group]
    count = int(in_conflict.sum())
    part.metrics["data/conflicting_labels/count"] = count
    part.metrics["data/conflicting_labels/groups"] = int(conflicting_group.sum())
    if not count:
        return part
    n = len(groups.rows)
    fraction = count / n
    part.metrics["data/conflicting_labels/fraction"] = fraction
    rows = groups.rows[in_conflict]
    first_group = groups.group[in_conflict][0]
    example_rows = groups.rows[groups.group == first_group]
    example_labels = idx[groups.group == first_group]
    make = error if fraction >= s.conflicting_error_fraction else warning
    labelled = ("different labels at some positions" if per_position else
                f"labels {stats.listing(example_labels, 5)}")
    part.findings.append(make(
        "data.conflicting_labels",
        f"{count} of {n} training examples ({fraction:.1%}) share identical inputs with an example of a different "
        f"{'labelling' if per_position else 'class'} ({int(conflicting_group.sum())} groups; e.g. rows "
        f"{stats.listing(example_rows, 5)} have {labelled}): no model can fit them all, and a large share means "
        f"labels are misaligned with inputs.",
        "Check that inputs and labels are shuffled and filtered together (one permutation for both); if the "
        "duplicates are real, merge them under one label (majority vote) or drop them.",
        count=count, fraction=fraction, groups=int(conflicting_group.sum()),
        first_rows=stats.first(rows, s.max_listed), example_rows=stats.first(example_rows, 5),
        example_labels=None if per_position else stats.first(example_labels, 5)))
    return part


# ----------------------------------------------------------------------------------------------------------------
# Near duplicates: validation examples that are training examples plus noise, rescaled or re-encoded

# The candidate search runs in this many random projections of the features (Johnson & Lindenstrauss 1984;
# Achlioptas 2003, "Database-friendly random projections"): a projected squared distance is the true one times a
# chi-square with 64 degrees of freedom over 64, so distances keep within about +-20%, ample to find a copy ten
# times closer than anything else; every candidate is then measured exactly in the full feature space.
SEARCH_DIMS = 64
# Query x reference pairs the search may compare, over all views: about 1.5 s of one core (the matmul dominates,
# ~3 ns a pair at 64 dimensions). The number of sampled queries follows from it: all rows of a builtin, 2000 for
# 100k training rows.
SEARCH_PAIRS = 4e8
MIN_QUERIES = 300  # fewer cannot place a median or a rate; bigger data then cost proportionally more
MAX_QUERIES = 6000
# Tiles of the blocked search: 512 queries x 4096 reference rows (8 MB of scores) amortize numpy's per-call cost;
# the scores are reduced tile by tile, never held for all reference rows.
QUERY_TILE, REFERENCE_TILE = 512, 4096


# The views a near-copy is looked for in (see _Space): name and what it means, for the evidence.
VIEWS = {
    "standardized": "compared on features standardized with the training statistics",
    "per_example": "compared with each example centred and scaled to unit length, so the same example at another "
                   "scale or offset matches",
}


class _Space:
    """The two views a near-copy is looked for in.

    ``standardized``: every feature centred and scaled by its training mean and std (features constant in training
    carry no distance). The usual metric for tabular data, whose features come in unrelated units.

    ``per_example``: every example centred on its own mean and scaled to unit length (one minus half the squared
    distance is the Pearson correlation of two examples). Invariant to ``x -> a * x + b`` per example, so it finds
    the same example re-encoded (uint8 0..255 vs float 0..1 vs -1..1), rescaled, or with brightness and contrast
    changed; it also weights all features alike, as the pixels of an image should be (the standardized view blows
    up noise in a border pixel that is almost always 0). It needs three features: with two, every centred example
    is one of two points.

    :meth:`search_vectors` gives each view's vectors for the candidate search (float32, randomly projected to
    SEARCH_DIMS when there are more features), :meth:`distances` the exact distances (float64, all features)."""

    def __init__(self, st: stats.FeatureStats, dtype: np.dtype):
        constant = stats.constant_mask(st, dtype)
        self.mean = np.where(constant, 0.0, st.mean)
        self.scale = np.where(constant, 0.0, 1.0 / np.where(constant, 1.0, st.std))
        self.n_features = d = st.mean.size
        self.views = ["standardized"] + (["per_example"] if d >= 3 else [])
        self.projected = d > SEARCH_DIMS
        if self.projected:
            # One matmul per chunk serves both views. With y = x - mean (per feature, small numbers, so float32
            # keeps the differences) and x's own mean m = mean(y) + mean(mean):
            #   standardized  = (y * scale) @ G1                  = y @ (scale * G1)
            #   x - m         = (y - mean(y)) + (mean - mean(mean)) ; projected by G2 column-wise,
            #   ||x - m||^2   = ||y||^2 - d mean(y)^2 + 2 y.(mean - mean(mean)) + ||mean - mean(mean)||^2.
            rng = np.random.default_rng(0)
            g1, g2 = (rng.standard_normal((2, d, SEARCH_DIMS)) / np.sqrt(SEARCH_DIMS))
            self.offset = self.mean - self.mean.mean()
            self.columns = np.concatenate([self.scale[:, None] * g1, g2, self.offset[:, None], np.ones((d, 1))],
                                          axis=1).astype(np.float32)
            self.g2_sum = g2.sum(axis=0)
            self.offset_g2 = self.offset @ g2
            self.offset_sq = float(self.offset @ self.offset)

    def search_vectors(self, x2: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
        d, k = self.n_features, SEARCH_DIMS
        dims = k if self.projected else d
        outs = [np.empty((len(rows), dims), np.float32) for _ in self.views]
        for part in stats.row_chunks(len(rows), d):
            chunk = np.asarray(x2[rows[part]], dtype=np.float32)
            if not self.projected:
                for name, out in zip(self.views, outs):
                    out[part] = self.transform(name, chunk)
                continue
            y = np.subtract(chunk, self.mean.astype(np.float32), out=chunk)
            z = (y @ self.columns).astype(np.float64)
            outs[0][part] = z[:, :k]
            if len(self.views) > 1:
                row_mean = z[:, -1] / d
                centred = z[:, k:2 * k] - row_mean[:, None] * self.g2_sum + self.offset_g2
                norm_sq = (np.einsum("ij,ij->i", y, y, dtype=np.float64) - d * row_mean ** 2 + 2 * z[:, -2]
                           + self.offset_sq)
                norm = np.sqrt(np.maximum(norm_sq, 0.0))
                outs[1][part] = centred / np.where(norm > 0, norm, 1)[:, None]
        return outs

    def transform(self, name: str, x: np.ndarray) -> np.ndarray:
        """The view of raw rows ``x`` (float, (n, features)), all features."""
        if name == "standardized":
            return (x - self.mean.astype(x.dtype)) * self.scale.astype(x.dtype)
        centred = x - x.mean(axis=1, keepdims=True)
        norm = np.sqrt(np.einsum("ij,ij->i", centred, centred))
        return centred / np.where(norm > 0, norm, 1)[:, None]  # a constant example stays at the origin

    def distances(self, name: str, xa: np.ndarray, ia: np.ndarray, xb: np.ndarray, ib: np.ndarray) -> np.ndarray:
        """Exact distances in a view between rows ``xa[ia[k]]`` and ``xb[ib[k]]`` (float64)."""
        out = np.empty(len(ia))
        for part in stats.row_chunks(len(ia), self.n_features):
            diff = (self.transform(name, xa[ia[part]].astype(np.float64))
                    - self.transform(name, xb[ib[part]].astype(np.float64)))
            out[part] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        return out


def _nearest(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Index of each query's nearest reference row, by blocked matmul: the largest ``q.r - ||r||^2 / 2`` is the
    smallest ``||q - r||^2`` (``||q||^2`` is the same for all of one query's candidates)."""
    half_sq = 0.5 * np.einsum("ij,ij->i", reference, reference)
    best = np.full(len(queries), -np.inf, np.float32)
    arg = np.zeros(len(queries), np.int64)
    for q0 in range(0, len(queries), QUERY_TILE):
        q = queries[q0:q0 + QUERY_TILE]
        b, a = best[q0:q0 + len(q)], arg[q0:q0 + len(q)]
        here = np.arange(len(q))
        for r0 in range(0, len(reference), REFERENCE_TILE):
            score = q @ reference[r0:r0 + REFERENCE_TILE].T
            score -= half_sq[r0:r0 + REFERENCE_TILE]
            j = np.argmax(score, axis=1)
            top = score[here, j]
            better = top > b
            b[better], a[better] = top[better], j[better] + r0
    return arg


def hypergeometric_tail(k: int, population: int, marked: int, drawn: int) -> float:
    """P(X >= k) for X ~ Hypergeometric: ``drawn`` items from ``population`` of which ``marked`` are marked. As
    the one-sided p-value of Fisher's exact test (Fisher 1935, "The logic of inductive inference"): are the marked
    items over-represented among the drawn ones?"""
    if k <= 0:
        return 1.0
    hi = min(marked, drawn)
    if k > hi:
        return 0.0
    log_total = _log_comb(population, drawn)
    terms = [_log_comb(marked, j) + _log_comb(population - marked, drawn - j) - log_total for j in range(k, hi + 1)]
    top = max(terms)
    return float(min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms)))


def _log_comb(n: int, k: int) -> float:
    if k < 0 or k > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


@dataclasses.dataclass
class Near:
    """What the near-duplicate search found (see :func:`near_duplicates`)."""

    status: str  # "checked" or "skipped: why"
    checked_val: int = 0
    candidates_val: int = 0  # validation rows that could be checked (finite, not exact copies)
    checked_train: int = 0  # held-out training rows, the control
    reference: int = 0  # the other training rows, which both are compared with
    train: int = 0  # all finite training rows (a validation row's partner is looked for among all of them)
    projected: bool = False
    views: list[dict] = dataclasses.field(default_factory=list)
    significant: bool = False
    val_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    train_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    flagged_val: int = 0  # within the distance of a reference row, in a view that found copies
    flagged_train: int = 0
    p_value: float = 1.0  # the smallest over the views, Bonferroni-adjusted
    excess_fraction: float = 0.0
    estimated: int = 0
    pair: dict | None = None

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"data/leakage/near/status": self.status}
        if self.status == "checked":
            out.update({"data/leakage/near/count": self.estimated,
                        "data/leakage/near/fraction": self.excess_fraction,
                        "data/leakage/near/checked_val": self.checked_val,
                        "data/leakage/near/checked_train": self.checked_train,
                        "data/leakage/near/p_value": self.p_value})
            for view in self.views:  # the natural rate in each view: how dense the data are at this distance
                out[f"data/leakage/near/{view['view']}/flagged_val"] = view["flagged_val"]
                out[f"data/leakage/near/{view['view']}/flagged_train"] = view["flagged_train"]
        return out


def near_duplicates(v: Views, exact_val_rows: np.ndarray) -> Near:
    """Validation examples far closer to a training example than training examples are to each other.

    Rule. The training rows are split at random into held-out queries and a reference. In each view (:class:`_Space`)
    the typical spacing is the median distance from a held-out training example to its nearest reference example,
    and an example is flagged when its nearest reference example is closer than ``near_duplicate_distance`` times
    that spacing (0.2). Both are scale-free (a ratio of distances in the data's own units) and the median is
    robust (up to half the examples may have natural near-copies without moving it). Honest data of intrinsic
    dimension m put a fraction of about 0.2^m of examples that close (nearest-neighbour distances scale as the 1/m
    power of volume; Levina & Bickel 2004 estimate m from exactly this): essentially none for images and most
    tabular data (digits' closest honest pair is 0.24 x its spacing), while a copy with noise a fifth of the typical
    spacing (2% pixel noise on digits, JPEG-level) is flagged.

    Test. A random split makes validation examples and held-out training examples exchangeable given the
    reference: an honest validation example is flagged exactly as often as a held-out training example (the same
    dense regions, the same natural near-copies, the same low intrinsic dimension, where nearest-neighbour distances
    reach down to zero), and independently of the others. So the finding is not the flagged count but its excess
    over the training rate, by Fisher's exact test (one-sided, at ``near_duplicate_p_value``; per view with
    Bonferroni's correction, as one view's natural rate would drown another's copies): dense but honest data flag
    both splits alike and stay silent, copies flag validation only. (Training rows compared with all the others
    instead are flagged in pairs, each the other's neighbour: measured, two to three times the false alarms the
    test allows on low-dimensional data.) The leaked fraction is estimated as the excess over the training rate,
    scaled by the share of training rows in the reference (a copy of a held-out row is not near the reference).
    The price of a control: on a small split the test needs some 15 copies (20 of digits' 449 validation
    examples are found 8 times in 10, 10 never); on 10k validation examples 1% is found.

    Work. At most half the training rows are held out (fewer on large data, where queries are sampled); the
    flagged validation rows are then listed against all training rows. At most a few thousand validation and training rows are
    queries, as many as SEARCH_PAIRS comparisons allow (sampled with a fixed seed, said in the evidence). Features
    beyond SEARCH_DIMS are randomly projected for the search and every candidate is measured exactly. Integer
    inputs (token or category ids) are not compared by distance: only exact copies count there."""
    s = v.settings
    if v.integer_inputs:
        return Near("skipped: integer inputs are ids (tokens, categories), not magnitudes; only exact copies are "
                    "compared")
    if s.near_duplicate_distance == 0:
        return Near("skipped: diagnostics.data.near_duplicate_distance is 0")
    train = v.groups["train"]
    candidates = np.setdiff1d(np.flatnonzero(v.finite["val"]), exact_val_rows)
    n_train = len(train.rows)
    if n_train < 4 or not len(candidates):
        return Near(f"skipped: {n_train} finite training rows and {len(candidates)} validation rows to compare")
    space = _Space(v.x_stats["train"], v.x("train").dtype)
    budget = int(np.clip(SEARCH_PAIRS // (n_train * len(space.views)), MIN_QUERIES, MAX_QUERIES))
    # Sample sizes: all rows when they fit; else a third of the queries to validation, the rest to training (with
    # the training rate near zero, the test's p-value is about x ** flagged for a fraction x of queries on
    # validation, and the flagged count grows with x: x * log(1 / x) is largest near 1/3).
    n_val = min(len(candidates), max(budget // 3, budget - n_train // 2))
    n_held = min(n_train // 2, max(budget - n_val, MIN_QUERIES))
    rng = np.random.default_rng(0)
    val_q = np.sort(rng.choice(candidates, n_val, replace=False)) if n_val < len(candidates) else candidates
    order = rng.permutation(n_train)  # positions in train.rows
    held = np.sort(order[:n_held])
    # A training row with an exact copy in training is not a query (as a validation row with an exact copy in
    # training is check_leakage's, not a near-copy); it stays in the reference.
    exact = train.duplicated[held]
    reference = np.sort(np.concatenate([order[n_held:], held[exact]]))
    held = held[~exact]
    if not len(held):
        return Near("skipped: every held-out training row has an exact copy in training")
    from threadpoolctl import threadpool_limits  # comes with scikit-learn, a dependency

    # One BLAS thread: the search is hundreds of mid-sized matmuls, and OpenBLAS's threads spin-wait for each
    # other; on the shared 2-core machines here (load ~7) two threads were 5x slower than one (5.8 s vs 1.1 s for
    # 2e8 pairs).
    with threadpool_limits(limits=1, user_api="blas"):
        return _search(v, space, train.rows[reference], train.rows[held], val_q, len(candidates), n_train)


def _search(v: Views, space: _Space, reference: np.ndarray, held: np.ndarray, val_q: np.ndarray, n_candidates: int,
            n_train: int) -> Near:
    """The search and the test of :func:`near_duplicates`, for its sampled rows (row indices of the splits)."""
    s = v.settings
    xt, xv = stats.flat(v.x("train")), stats.flat(v.x("val"))
    emb_ref = space.search_vectors(xt, reference)
    emb_held = space.search_vectors(xt, held)
    emb_val = space.search_vectors(xv, val_q)
    near = Near("checked", checked_val=len(val_q), candidates_val=n_candidates, checked_train=len(held),
                reference=len(reference), train=n_train, projected=space.projected)
    hit_v = np.zeros(len(val_q), bool)  # within the distance of a reference row, in a view that found copies
    hit_t = np.zeros(len(held), bool)
    limits = []
    for k, name in enumerate(space.views):
        d_t = space.distances(name, xt, held, xt, reference[_nearest(emb_held[k], emb_ref[k])])
        spacing = float(np.median(d_t))
        limit = s.near_duplicate_distance * spacing
        d_v = space.distances(name, xv, val_q, xt, reference[_nearest(emb_val[k], emb_ref[k])])
        flag_v, flag_t = d_v < limit, d_t < limit
        # Each view is tested on its own: their natural rates differ (the per-example view of low-dimensional
        # data is lower-dimensional still), and one view's natural near-copies would drown the other's copies.
        # Bonferroni over the views.
        p = min(1.0, len(space.views) * hypergeometric_tail(int(flag_v.sum()), len(val_q) + len(held),
                                                            int(flag_v.sum() + flag_t.sum()), len(val_q)))
        limits.append(limit)
        near.views.append({"view": name, "description": VIEWS[name], "spacing": spacing, "limit": limit,
                           "flagged_val": int(flag_v.sum()), "flagged_train": int(flag_t.sum()), "p_value": p})
        near.p_value = min(near.p_value, p)
        if p < s.near_duplicate_p_value:
            near.significant = True
            hit_v |= flag_v
            hit_t |= flag_t
    if not near.significant:
        return near
    near.flagged_val, near.flagged_train = int(hit_v.sum()), int(hit_t.sum())
    excess = (hit_v.mean() - hit_t.mean()) * n_train / len(reference)
    near.excess_fraction = float(np.clip(excess, 0.0, 1.0))
    near.estimated = int(round(near.excess_fraction * n_candidates))
    # The listing: each validation row's closest training row (reference or held out) in each view, as a fraction
    # of that view's spacing.
    train_all = np.concatenate([reference, held])
    best = np.full(len(val_q), np.inf)
    partner = np.zeros(len(val_q), np.int64)
    best_view = np.zeros(len(val_q), np.int64)
    for k, name in enumerate(space.views):
        if near.views[k]["p_value"] >= s.near_duplicate_p_value:
            continue
        nn = train_all[_nearest(emb_val[k], np.concatenate([emb_ref[k], emb_held[k]]))]
        distance = space.distances(name, xv, val_q, xt, nn)
        ratio = distance / near.views[k]["spacing"]  # > 0: this view flagged examples below a fraction of it
        closer = (distance < limits[k]) & (ratio < best)
        best[closer], partner[closer], best_view[closer] = ratio[closer], nn[closer], k
    listed = np.isfinite(best)
    order = np.argsort(best[listed], kind="stable")  # closest first
    near.val_rows = val_q[listed][order]
    near.train_rows = partner[listed][order]
    i = int(np.argmin(best))
    view = near.views[best_view[i]]
    near.pair = {"val_row": int(val_q[i]), "train_row": int(partner[i]), "distance": float(best[i]) * view["spacing"],
                 "spacing": view["spacing"], "ratio": float(best[i]), "view": view["view"]}
    return near
