"""Data as users hold it: iterables of batches or of examples, drawn into memory up to ``data.max_examples``.

Besides the mapping of arrays (:mod:`harness.data.dataset`), a data factory may return

* a mapping with a ``train`` iterable and a validation iterable under ``val`` (or ``validation``, ``valid``,
  ``test``), plus optional ``num_classes`` and ``batched``: a Hugging Face ``DatasetDict`` is such a mapping;
* a mapping with only ``train``, or a single iterable (a generator, a grain/PyTorch DataLoader, a tf.data pipeline
  as numpy, a Hugging Face ``Dataset``): a validation split is held out the way :mod:`harness.data.files` splits a
  CSV, a seeded 75/25 permutation (:func:`harness.data.builtin.split`), so it is the same on every run.

Each element is an ``(x, y)`` pair or a dict with the inputs under one of :data:`X_KEYS` and the targets under one
of :data:`Y_KEYS` (``x``/``y``, ``inputs``/``targets``, ``image``/``label``, ``input_ids``/``labels``,
``features``/``label``, ...). Values are anything ``np.asarray`` reads: numpy arrays, lists, scalars, jax arrays,
PyTorch tensors (``.detach().cpu()`` first) and TensorFlow tensors (``.numpy()`` first). Dtypes are kept: integer
inputs (token ids) stay integers.

**Batches or examples.** The first element decides, unless the mapping says ``batched: true/false``: a scalar
target, or inputs and targets without a common leading length, make it a single example; inputs and targets with
the same leading length (a batch axis) make it a batch, except that 1-D integer inputs with 1-D targets are one
token sequence with its per-token targets (a language model's example). Every later element must agree: batches
with the first batch's per-example shapes (the batch size may change, e.g. a smaller last batch), examples with
the first example's shapes. The rule misreads an example whose float inputs and targets are vectors of the same
length (an autoencoder's ``(x, x)``), or a batch of single integer features: say ``batched: false/true`` then.

**How much.** At most ``data.max_examples`` examples (default :data:`DEFAULT_MAX_EXAMPLES`) are held, train and val
together, a quarter of them at most validation: from separate iterables up to ``max_examples - val_cap`` train and
``val_cap = round(max_examples / 4)`` val examples; from a single iterable up to ``max_examples``, then split 75/25.
Iteration stops as soon as the cap is reached (a repeating grain or tf.data pipeline is never exhausted), the last
batch is truncated, and one element more is asked for to learn whether the source had more; the data check reports
the count (``data/examples_drawn``) and, when there was more, an info finding ``data.sampled``.

Other keys of the mapping (``causal``, ``pad_token``, ...) pass through to the arrays mapping.

**Classes.** ``num_classes`` in the mapping wins (``num_classes: None`` means regression); else a Hugging Face
dataset's ``ClassLabel`` feature gives it; else integer (or boolean) targets make a classification with
``max + 1`` classes (the width for one-hot rows) and float targets a regression.

Every problem is a :class:`HarnessError` naming the factory: an exception raised while iterating (with its type and
message and how many examples were drawn before it), elements that are not pairs or dicts with known keys, text
where numbers belong, shapes that change from one element to the next.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from harness.data.builtin import split
from harness.errors import HarnessError

DEFAULT_MAX_EXAMPLES = 10_000
VAL_FRACTION = 0.25  # as files.py and the builtins: a 75/25 split
X_KEYS = ("x", "inputs", "input", "features", "image", "img", "pixel_values", "input_ids")
Y_KEYS = ("y", "targets", "target", "labels", "label")
VAL_KEYS = ("val", "validation", "valid", "test")
ARRAY_KEYS = ("x_train", "y_train", "x_val", "y_val")
_MAX_EMPTY_IN_A_ROW = 10_000  # empty batches in a row before giving up (a filter that never lets anything through)


@dataclasses.dataclass(frozen=True)
class Drawn:
    """What was drawn from one iterable: ``split`` is ``train``/``val``, or ``train+val`` for a single iterable that
    was split afterwards; ``more`` says the source had more than the cap."""

    split: str
    examples: int
    elements: int
    batched: bool
    more: bool
    cap: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_iterable_result(result: Any) -> bool:
    """True for what :func:`draw_dataset` reads: a mapping with ``train`` (and none of the array keys), or a
    non-mapping iterable that is not itself an array or text."""
    if isinstance(result, Mapping):
        return "train" in result and not any(k in result for k in ARRAY_KEYS)
    if isinstance(result, (str, bytes, np.ndarray)) or result is None:
        return False
    return _iterable(result)


def _error(message: str) -> HarnessError:
    return HarnessError(message, key="data")


def _iterable(obj: Any) -> bool:
    return hasattr(obj, "__iter__") or hasattr(obj, "__getitem__")


def max_examples_from(value: Any) -> int:
    """``data.max_examples`` validated (None: the default)."""
    if value is None:
        return DEFAULT_MAX_EXAMPLES
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer)) or not float(value).is_integer():
        raise HarnessError(f"must be a whole number of examples, got {value!r}", key="data.max_examples")
    if value < 2:
        raise HarnessError(f"must be at least 2 (one train and one val example), got {value!r}",
                           key="data.max_examples")
    return int(value)


def accepts_max_examples(factory: Callable) -> bool:
    """Whether a factory names a ``max_examples`` parameter (then it gets ``data.max_examples`` too)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    p = params.get("max_examples")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def caps(max_examples: int) -> tuple[int, int]:
    """(train cap, val cap) for separate train and val iterables: a quarter of the examples at most validation."""
    val = min(max(1, int(round(max_examples * VAL_FRACTION))), max_examples - 1)
    return max_examples - val, val


def draw_dataset(result: Any, *, source: str, max_examples: int = DEFAULT_MAX_EXAMPLES) -> tuple[dict, tuple]:
    """Draw the factory's iterables into the mapping of arrays :func:`harness.data.dataset.from_mapping` reads, and
    what was drawn from each (:class:`Drawn`). ``source`` names the factory in errors."""
    options = result if isinstance(result, Mapping) else {}
    batched = options.get("batched")
    if batched is not None and not isinstance(batched, (bool, np.bool_)):
        raise _error(f"{source}: 'batched' must be true, false or absent (detect), got {batched!r}")
    batched = None if batched is None else bool(batched)
    val_key = next((k for k in VAL_KEYS if k in options), None)
    if isinstance(result, Mapping):
        train_source, train_name = result["train"], "the 'train' iterable"
    else:
        train_source, train_name = result, f"the {type(result).__name__} it returned"
    if val_key is None:
        x, y, drawn, ykey = _draw(train_source, train_name, "train+val", max_examples, batched, source)
        if len(x) < 3:
            raise _error(f"{source}: {train_name} gave {len(x)} example(s); at least 3 are needed to hold out "
                         f"a validation split")
        parts = split(x, y, val_fraction=VAL_FRACTION, seed=0)
        record = (drawn,)
    else:
        train_cap, val_cap = caps(max_examples)
        xt, yt, d_train, ykey = _draw(train_source, train_name, "train", train_cap, batched, source)
        xv, yv, d_val, _ = _draw(result[val_key], f"the {val_key!r} iterable", "val", val_cap, batched, source)
        parts = {"x_train": xt, "y_train": yt, "x_val": xv, "y_val": yv}
        record = (d_train, d_val)
    mapping: dict[str, Any] = dict(parts)
    for key, value in options.items():  # other keys of the mapping (causal, pad_token, ...) as an arrays mapping has
        if key not in ("train", "batched", "num_classes", *VAL_KEYS, *ARRAY_KEYS):
            mapping[key] = value
    if "num_classes" in options:
        if options["num_classes"] is not None:
            mapping["num_classes"] = options["num_classes"]
    else:
        num_classes = _declared_classes(train_source, ykey)
        if num_classes is None:
            num_classes = _infer_classes([parts["y_train"], parts["y_val"]])
        if num_classes is not None:
            mapping["num_classes"] = num_classes
    return mapping, record


# ----------------------------------------------------------------------------------------------------------------
# Drawing one iterable


def _draw(src: Any, name: str, split_name: str, cap: int, batched: bool | None, source: str):
    """Up to ``cap`` examples of ``src`` as (x, y, Drawn, the targets' dict key or None)."""
    if src is None or isinstance(src, (str, bytes)) or not _iterable(src):
        raise _error(f"{source}: {name} must be an iterable of batches or examples, got {type(src).__name__}")
    pair = _array_pair(src)
    if pair is not None:  # (x, y) arrays given directly: one batch
        src = [pair]
    where = f"{source}: {name}"
    try:
        it = iter(src)
    except Exception as err:
        raise _error(f"{where}: iter() raised {type(err).__name__}: {err}") from None
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    n = elements = empty = 0
    more = False
    first: dict[str, Any] | None = None
    ykey = None
    try:
        while True:
            try:
                element = next(it)
            except StopIteration:
                break
            except Exception as err:
                raise _error(
                    f"{where} raised {type(err).__name__} while iterating: {err} (after {n} example(s) in "
                    f"{elements} element(s) were drawn)") from None
            if n >= cap:  # the element beyond the cap: the source has more
                more = True
                break
            elements += 1
            x, y, ykey = _parts(element, elements, where)
            if first is None:
                mode = batched if batched is not None else _looks_batched(x, y)
                first = {"batched": mode, "x": x.shape, "y": y.shape, "at": elements}
                if mode and (x.ndim == 0 or y.ndim == 0):
                    raise _error(f"{where}: element 1 has x of shape {x.shape} and y of shape {y.shape}; with "
                                 f"batched=true both need a leading batch axis")
            _check_consistent(x, y, first, elements, where)
            if first["batched"]:
                if len(x) == 0:
                    empty += 1
                    if empty >= _MAX_EMPTY_IN_A_ROW:
                        raise _error(f"{where}: gave {empty} empty batches in a row")
                    continue
                empty = 0
                if n + len(x) > cap:
                    x, y, more = x[: cap - n], y[: cap - n], True
            else:
                x, y = x[None], y[None]
            xs.append(np.array(x))  # a copy: a loader may reuse its buffers
            ys.append(np.array(y))
            n += len(x)
            if more:
                break
    finally:
        close = getattr(it, "close", None)  # generators: run their cleanup now, not at garbage collection
        if callable(close):
            try:
                close()
            except Exception:
                pass
    if not xs:
        raise _error(f"{where}: gave no examples (an empty iterable, or an iterator already consumed: return "
                     f"a fresh one from every call of the factory)")
    x, y = np.concatenate(xs), np.concatenate(ys)
    return x, y, Drawn(split_name, int(n), elements, bool(first["batched"]), more, cap), ykey


def _array_pair(src: Any) -> tuple | None:
    """``(x, y)`` of arrays with a common length given as a split directly, else None."""
    if not isinstance(src, tuple) or len(src) != 2:
        return None
    if not all(isinstance(v, np.ndarray) or (hasattr(v, "shape") and hasattr(v, "dtype")) for v in src):
        return None
    shapes = [tuple(v.shape) for v in src]
    return src if all(s for s in shapes) and shapes[0][0] == shapes[1][0] else None


def _parts(element: Any, index: int, where: str) -> tuple[np.ndarray, np.ndarray, str | None]:
    """The element's inputs and targets as arrays, and the targets' dict key (None for a pair)."""
    if isinstance(element, Mapping):
        xkey = next((k for k in X_KEYS if k in element), None)
        ykey = next((k for k in Y_KEYS if k in element), None)
        if xkey is None or ykey is None:
            found = ", ".join(repr(k) for k in list(element)[:20]) or "none"
            raise _error(
                f"{where}: element {index} is a dict with keys {found}; harness reads the inputs from one of "
                f"{', '.join(X_KEYS)} and the targets from one of {', '.join(Y_KEYS)} (rename them in the pipeline)")
        return (_as_array(element[xkey], f"{xkey!r}", index, where),
                _as_array(element[ykey], f"{ykey!r}", index, where), ykey)
    if isinstance(element, (tuple, list)) and len(element) == 2:
        return _as_array(element[0], "x", index, where), _as_array(element[1], "y", index, where), None
    what = f"a {type(element).__name__} of length {len(element)}" if isinstance(element, (tuple, list)) \
        else f"a {type(element).__name__}"
    raise _error(f"{where}: element {index} is {what}; each element must be an (x, y) pair or a dict with "
                 f"x/y (or inputs/targets, image/label, input_ids/labels, features/label); arrays go in a "
                 f"mapping with x_train, y_train, x_val, y_val")


def _as_array(value: Any, name: str, index: int, where: str) -> np.ndarray:
    """numpy from numpy, lists, scalars, jax arrays, PyTorch tensors (any device) and TensorFlow tensors."""
    try:
        if not isinstance(value, np.ndarray):
            if callable(getattr(value, "detach", None)) and callable(getattr(value, "cpu", None)):
                value = value.detach().cpu()  # torch: off the autograd graph and the GPU
            to_numpy = getattr(value, "numpy", None)
            if callable(to_numpy) and not isinstance(value, (list, tuple, dict)):
                value = to_numpy()
        array = np.asarray(value)
    except Exception as err:  # ragged lists, unsupported tensor dtypes
        raise _error(f"{where}: element {index}: {name} could not be read as an array ({type(err).__name__}: "
                     f"{err}); pad sequences to a common length and give numbers") from None
    if array.dtype.kind in "OUSV":
        raise _error(f"{where}: element {index}: {name} holds {'text' if array.dtype.kind in 'US' else 'objects'}"
                     f" (dtype {array.dtype}); encode it as numbers in the pipeline (tokenize text, map class "
                     f"names to ids, pad sequences to a common length)")
    return array


def _looks_batched(x: np.ndarray, y: np.ndarray) -> bool:
    """A batch when inputs and targets share a leading length and the target is not a scalar; except 1-D integer
    inputs with 1-D targets: one token sequence and its per-token targets (a language model's example)."""
    if x.ndim == 1 and y.ndim == 1 and x.dtype.kind in "iu":
        return False
    return x.ndim >= 1 and y.ndim >= 1 and x.shape[0] == y.shape[0]


def _check_consistent(x: np.ndarray, y: np.ndarray, first: dict, index: int, where: str):
    if first["batched"]:
        if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
            raise _error(f"{where}: element {index} has x of shape {x.shape} and y of shape {y.shape}; a batch "
                         f"holds as many targets as inputs along its first axis")
        for name, a, ref in (("x", x, first["x"]), ("y", y, first["y"])):
            if a.shape[1:] != tuple(ref[1:]):
                raise _error(
                    f"{where}: inconsistent shapes: element {index} has {name} examples of shape {a.shape[1:]} (batch "
                    f"{a.shape}) but element {first['at']} had {tuple(ref[1:])} (batch {tuple(ref)}); every batch "
                    f"must hold examples of one shape (pad or resize in the pipeline)")
    else:
        for name, a, ref in (("x", x, first["x"]), ("y", y, first["y"])):
            if a.shape != tuple(ref):
                raise _error(
                    f"{where}: inconsistent shapes: element {index} has {name} of shape {a.shape} but element "
                    f"{first['at']} had {tuple(ref)}; read as single examples (element {first['at']}'s target "
                    f"{'is a scalar' if not first['y'] else 'has no batch axis shared with its inputs'}), every "
                    f"example must have one shape (pad or resize in the pipeline, or set batched: true in the "
                    f"returned mapping if the elements are batches)")


# ----------------------------------------------------------------------------------------------------------------
# Classes


def _declared_classes(src: Any, ykey: str | None) -> int | None:
    """A Hugging Face dataset's ``ClassLabel`` count for the targets' column, if it has one."""
    if ykey is None:
        return None
    try:
        features = getattr(src, "features", None)
        feature = features[ykey] if isinstance(features, Mapping) and ykey in features else None
        n = getattr(feature, "num_classes", None)
        return int(n) if isinstance(n, (int, np.integer)) and n >= 2 else None
    except Exception:
        return None


def _infer_classes(ys: Iterable[np.ndarray]) -> int | None:
    """Integer or boolean targets: ``max + 1`` classes (the width for one-hot rows); float targets: regression."""
    ys = list(ys)
    if not all(y.dtype.kind in "iub" for y in ys):
        return None
    if all(y.ndim == 2 and y.shape[1] > 1 for y in ys) and all(np.isin(y, (0, 1)).all() for y in ys):
        return int(ys[0].shape[1])
    top = max(int(y.max()) for y in ys if y.size)
    return max(top + 1, 2)
