"""Vectorized numpy statistics the data checks share: one chunked pass per array, bounded memory.

Everything here works on inputs viewed as ``(examples, features)`` (images flattened) and visits them in chunks of
about :data:`CHUNK_ELEMENTS` values, so a 100k x 1k float32 split (400 MB) costs a few hundred MB of temporaries
at most and about a second per pass on the 2-core machines here (measured: per-feature moments 0.3 s, row hashes
0.5 s).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# ~4M values per chunk: 32 MB in float64, large enough that numpy's per-call overhead is negligible.
CHUNK_ELEMENTS = 1 << 22


def flat(x: np.ndarray) -> np.ndarray:
    """Examples as rows, features as columns (a view when possible)."""
    return x.reshape(len(x), -1)


def row_chunks(n_rows: int, n_cols: int):
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def first(indices, k: int) -> list[int]:
    """The first ``k`` indices as plain ints (for messages and evidence)."""
    return [int(i) for i in np.asarray(indices).ravel()[:k]]


def listing(values, k: int) -> str:
    """``0, 3, 17`` or ``0, 3, 17, ... (40 in all)``."""
    values = list(values)
    shown = ", ".join(_short(v) for v in values[:k])
    return shown if len(values) <= k else f"{shown}, ... ({len(values)} in all)"


def _short(v) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


# ----------------------------------------------------------------------------------------------------------------
# Non-finite values


@dataclasses.dataclass(frozen=True)
class NonFinite:
    """Where an array is not finite: NaN and inf counts, the bad rows, and per-column counts."""

    nan: int
    inf: int
    bad_rows: np.ndarray  # bool (examples,)
    column_counts: np.ndarray  # int (features,)

    @property
    def values(self) -> int:
        return self.nan + self.inf

    @property
    def rows(self) -> np.ndarray:
        return np.flatnonzero(self.bad_rows)

    @property
    def columns(self) -> np.ndarray:
        return np.flatnonzero(self.column_counts)


def nonfinite(x: np.ndarray) -> NonFinite:
    x2 = flat(x)
    n, d = x2.shape
    bad_rows = np.zeros(n, bool)
    columns = np.zeros(d, np.int64)
    if x2.dtype.kind != "f":  # integers cannot hold NaN or inf
        return NonFinite(0, 0, bad_rows, columns)
    nan = inf = 0
    for rows in row_chunks(n, d):
        bad = ~np.isfinite(x2[rows])
        if not bad.any():
            continue
        bad_rows[rows] = bad.any(axis=1)
        columns += bad.sum(axis=0)
        n_nan = int(np.isnan(x2[rows][bad]).sum())
        nan += n_nan
        inf += int(bad.sum()) - n_nan
    return NonFinite(nan, inf, bad_rows, columns)


# ----------------------------------------------------------------------------------------------------------------
# Per-feature moments


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Per-feature statistics over the finite rows of one split (float64)."""

    count: int
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @property
    def range(self) -> np.ndarray:
        return self.max - self.min

    @property
    def rms(self) -> float:
        """Root mean square over all values: the scale a fan-in initialized first layer sees (its pre-activation
        variance is the mean of x**2 over features, LeCun et al. 1998 "Efficient BackProp")."""
        return float(np.sqrt(np.mean(self.std ** 2 + self.mean ** 2))) if self.mean.size else 0.0

    @property
    def overall_mean(self) -> float:
        return float(np.mean(self.mean)) if self.mean.size else 0.0

    @property
    def overall_std(self) -> float:
        """Standard deviation of all values pooled (between- and within-feature variance)."""
        if not self.mean.size:
            return 0.0
        second = np.mean(self.std ** 2 + self.mean ** 2)
        return float(np.sqrt(max(second - self.overall_mean ** 2, 0.0)))


def feature_stats(x: np.ndarray, keep: np.ndarray | None = None) -> FeatureStats:
    """Mean, std, min, max of every feature over the rows in ``keep`` (all rows by default), in one chunked pass.

    Sums are taken around the first kept row (a shifted two-pass-free estimate), which keeps float64 exact enough
    for features whose mean is large relative to their spread (years, prices)."""
    x2 = flat(x)
    n, d = x2.shape
    keep = np.ones(n, bool) if keep is None else keep
    count = int(keep.sum())
    if count == 0:
        empty = np.full(d, np.nan)
        return FeatureStats(0, empty, empty, empty, empty)
    shift = x2[int(np.argmax(keep))].astype(np.float64)
    s1 = np.zeros(d)
    s2 = np.zeros(d)
    lo = np.full(d, np.inf)
    hi = np.full(d, -np.inf)
    for rows in row_chunks(n, d):
        chunk = x2[rows][keep[rows]]
        if not len(chunk):
            continue
        lo = np.minimum(lo, chunk.min(axis=0))
        hi = np.maximum(hi, chunk.max(axis=0))
        centred = chunk.astype(np.float64) - shift
        s1 += centred.sum(axis=0)
        s2 += np.einsum("ij,ij->j", centred, centred)
    mean_shifted = s1 / count
    var = np.maximum(s2 / count - mean_shifted ** 2, 0.0)
    return FeatureStats(count, mean_shifted + shift, np.sqrt(var), lo.astype(np.float64), hi.astype(np.float64))


def integer_valued(x: np.ndarray, keep: np.ndarray) -> bool:
    """Every kept value is a whole number (raw pixel intensities, counts, codes); stops at the first chunk that
    is not."""
    x2 = flat(x)
    if x2.dtype.kind != "f":
        return True
    for rows in row_chunks(*x2.shape):
        chunk = x2[rows][keep[rows]]
        if not np.all(chunk == np.round(chunk)):
            return False
    return True


def constant_mask(stats: FeatureStats, dtype: np.dtype) -> np.ndarray:
    """Features that take one value across the split. Float features count as constant when their range is within
    a few ulps of their magnitude (the rounding noise of a standardized constant column), integers only when
    exactly constant."""
    if stats.count == 0:
        return np.zeros(stats.mean.shape, bool)
    if np.dtype(dtype).kind == "f":
        magnitude = np.maximum(np.abs(stats.min), np.abs(stats.max))
        return stats.range <= 16 * np.finfo(dtype).eps * magnitude
    return stats.range == 0


# ----------------------------------------------------------------------------------------------------------------
# Row hashing: exact duplicates within and across splits


def row_hashes(x: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """One 64-bit hash per example over its exact values (after casting to ``dtype`` so two splits of different
    dtypes compare by value, and mapping -0.0 to 0.0). Python's bytes hash over each row: measured 0.5 s for
    100k x 1k float32 here, 4x faster than a vectorized multiply-xor hash and 14x faster than ``np.unique(axis=0)``.
    Equal rows always get equal hashes; callers confirm matches with :func:`same_rows` (collisions are ~2^-64)."""
    x2 = flat(x)
    n, d = x2.shape
    dtype = np.dtype(dtype or x2.dtype)
    out = np.empty(n, np.int64)
    if d == 0:
        out[:] = 0
        return out
    for rows in row_chunks(n, d):
        chunk = np.ascontiguousarray(x2[rows], dtype=dtype)
        if dtype.kind == "f":
            chunk = chunk + dtype.type(0)  # -0.0 + 0.0 == +0.0: equal values, equal bytes
        records = chunk.view(np.dtype((np.void, d * dtype.itemsize))).ravel()
        out[rows] = [hash(r.tobytes()) for r in records]
    return out


def same_rows(a: np.ndarray, ia: np.ndarray, b: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """``a[ia[k]] == b[ib[k]]`` elementwise over whole rows, in chunks (confirms hash matches)."""
    a2, b2 = flat(a), flat(b)
    out = np.empty(len(ia), bool)
    for rows in row_chunks(len(ia), a2.shape[1]):
        out[rows] = np.all(a2[ia[rows]] == b2[ib[rows]], axis=1)
    return out


@dataclasses.dataclass(frozen=True)
class Groups:
    """Rows grouped by identical values: ``group[i]`` is row i's group id (rows listed in ``rows``), and the
    groups with more than one member are the duplicates."""

    rows: np.ndarray  # the row indices that were grouped (e.g. the finite rows)
    group: np.ndarray  # group id per entry of ``rows``
    sizes: np.ndarray  # members per group

    @property
    def duplicated(self) -> np.ndarray:
        """Mask over ``rows``: the row shares its values with at least one other row."""
        return self.sizes[self.group] > 1

    @property
    def extra_copies(self) -> int:
        """Rows beyond the first of each group (what deduplication would remove)."""
        return int(np.sum(self.sizes - 1))


def group_rows(x: np.ndarray, hashes: np.ndarray, rows: np.ndarray) -> Groups:
    """Group ``rows`` of ``x`` by exact equality: by hash, then confirmed against each group's first row (a row
    that only collides in hash gets a group of its own)."""
    h = hashes[rows]
    _, first_of, group = np.unique(h, return_index=True, return_inverse=True)
    group = group.ravel()
    representative = rows[first_of[group]]
    suspects = np.flatnonzero(representative != rows)
    if suspects.size:
        equal = same_rows(x, rows[suspects], x, representative[suspects])
        if not equal.all():  # a hash collision: give each colliding row a group of its own
            lonely = suspects[~equal]
            group = group.copy()
            group[lonely] = group.max() + 1 + np.arange(lonely.size)
    sizes = np.bincount(group)
    return Groups(rows, group, sizes)


def matches_in(x_query: np.ndarray, h_query: np.ndarray, q_rows: np.ndarray, x_ref: np.ndarray,
               h_ref: np.ndarray, r_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``q_rows``, a row of ``r_rows`` with exactly the same values: returns (query rows that have
    one, the matching reference row for each)."""
    ref_h = h_ref[r_rows]
    order = np.argsort(ref_h, kind="stable")
    sorted_h = ref_h[order]
    qh = h_query[q_rows]
    pos = np.searchsorted(sorted_h, qh)
    pos_ok = pos < len(sorted_h)
    hit = np.zeros(len(q_rows), bool)
    hit[pos_ok] = sorted_h[pos[pos_ok]] == qh[pos_ok]
    query = q_rows[hit]
    ref = r_rows[order[pos[hit]]]
    if query.size:
        equal = same_rows(x_query, query, x_ref, ref)
        query, ref = query[equal], ref[equal]
    return query, ref
