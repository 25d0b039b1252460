"""harness.data.iterables: data factories that return iterables of batches or examples (DataLoaders, tf.data as
numpy, grain, Hugging Face datasets), drawn up to data.max_examples. Fast: torch/tf/datasets are faked with plain
Python classes and generators yielding numpy; grain is used for real only when it is installed."""

from __future__ import annotations

import numpy as np
import pytest

from harness.checks.data.sampling import check_sampled
from harness.config import FactoryConfig
from harness.data import builtin, iterables
from harness.data.dataset import from_mapping
from harness.errors import HarnessError
from harness.pipeline import load_dataset

SOURCE = "the data factory my.factory"


def draw(result, max_examples=iterables.DEFAULT_MAX_EXAMPLES):
    mapping, drawn = iterables.draw_dataset(result, source=SOURCE, max_examples=max_examples)
    return from_mapping(mapping, source="data (my.factory)", drawn=drawn)


def batches(n, batch=8, features=3, classes=3, seed=0, dtype=np.float32):
    """n examples as (x, y) numpy batches, the last one smaller when batch does not divide n."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(dtype)
    y = rng.integers(0, classes, n)
    for start in range(0, n, batch):
        yield x[start:start + batch], y[start:start + batch]


class FakeLoader:
    """Like a PyTorch DataLoader: re-iterable, ``__len__`` in batches, dict batches, a smaller last batch."""

    def __init__(self, n, batch=16, seed=0):
        self.n, self.batch, self.seed = n, batch, seed

    def __len__(self):
        return -(-self.n // self.batch)

    def __iter__(self):
        for x, y in batches(self.n, self.batch, seed=self.seed):
            yield {"inputs": x, "targets": y}


# ----------------------------------------------------------------------------------------------------------------
# Shapes of what a factory returns


def test_single_iterable_of_batches_is_split_like_files():
    d = draw(batches(40, batch=8))
    x = np.concatenate([b[0] for b in batches(40, batch=8)])
    y = np.concatenate([b[1] for b in batches(40, batch=8)])
    expected = builtin.split(x, y, val_fraction=0.25, seed=0)  # the CSV path's split: seeded 75/25
    for key, array in expected.items():
        np.testing.assert_array_equal(getattr(d, key), array)
    assert d.num_classes == 3 and d.x_train.dtype == np.float32
    (drawn,) = d.drawn
    assert (drawn.split, drawn.examples, drawn.elements, drawn.batched, drawn.more) == ("train+val", 40, 5, True, False)


def test_train_and_val_loaders_with_dict_batches():
    d = draw({"train": FakeLoader(100, batch=16), "validation": FakeLoader(30, batch=16, seed=1), "num_classes": 5})
    assert d.x_train.shape == (100, 3) and d.x_val.shape == (30, 3)
    assert d.num_classes == 5  # the mapping's count wins over max + 1
    train, val = d.drawn
    assert (train.split, train.examples, train.elements, train.more) == ("train", 100, 7, False)
    assert (val.split, val.examples, val.more) == ("val", 30, False)


@pytest.mark.parametrize("val_key", ["val", "validation", "valid", "test"])
def test_val_key_names(val_key):
    d = draw({"train": list(batches(20)), val_key: list(batches(8, seed=1))})
    assert len(d.x_train) == 20 and len(d.x_val) == 8


def test_train_only_mapping_is_split_and_arrays_pair_is_one_batch():
    x, y = np.arange(40.0).reshape(20, 2), np.arange(20) % 2
    d = draw({"train": (x, y)})
    assert len(d.x_train) == 15 and len(d.x_val) == 5 and d.num_classes == 2
    assert sorted(np.concatenate([d.x_train, d.x_val])[:, 0].tolist()) == x[:, 0].tolist()


def test_arrays_mapping_is_unchanged():
    mapping = {"x_train": np.ones((4, 2)), "y_train": np.arange(4) % 2, "x_val": np.ones((2, 2)),
               "y_val": np.arange(2), "num_classes": 2}
    assert not iterables.is_iterable_result(mapping)
    assert from_mapping(mapping).drawn == ()
    assert iterables.is_iterable_result({"train": []}) and iterables.is_iterable_result(iter([]))
    assert not iterables.is_iterable_result("abc") and not iterables.is_iterable_result(np.ones(3))


# ----------------------------------------------------------------------------------------------------------------
# Drawing: caps, truncation, infinite sources


def test_infinite_generator_stops_at_the_cap_and_truncates_the_last_batch():
    closed = []

    def forever():
        try:
            rng = np.random.default_rng(0)
            while True:
                yield rng.normal(size=(32, 4)).astype(np.float32), rng.integers(0, 2, 32)
        finally:
            closed.append(True)

    d = draw(forever(), max_examples=100)  # 100 = 3 batches of 32 + 4 of the fourth
    (drawn,) = d.drawn
    assert (drawn.examples, drawn.elements, drawn.more, drawn.cap) == (100, 4, True, 100)
    assert len(d.x_train) + len(d.x_val) == 100 and len(d.x_val) == 25
    assert closed == [True]  # the generator was closed, not left suspended


def test_separate_iterables_share_the_cap_three_to_one():
    assert iterables.caps(10_000) == (7500, 2500) and iterables.caps(2) == (1, 1)

    def forever(seed):
        rng = np.random.default_rng(seed)
        while True:
            yield {"x": rng.normal(size=(10, 2)), "y": rng.normal(size=10)}

    d = draw({"train": forever(0), "val": forever(1)}, max_examples=40)
    assert len(d.x_train) == 30 and len(d.x_val) == 10
    assert [(s.split, s.examples, s.more) for s in d.drawn] == [("train", 30, True), ("val", 10, True)]
    assert d.num_classes is None  # float targets: regression


def test_exact_fill_peeks_one_element_to_learn_whether_there_was_more():
    d = draw({"train": list(batches(16, batch=8)), "val": list(batches(4, batch=4))}, max_examples=20)
    assert [(s.examples, s.more) for s in d.drawn] == [(15, True), (4, False)]
    d = draw(list(batches(24, batch=8)), max_examples=24)
    assert d.drawn[0].more is False and d.drawn[0].examples == 24


def test_hugging_face_style_examples_keep_integer_inputs_and_read_class_label():
    class ClassLabel:
        num_classes = 4

    class FakeHFDataset(list):  # iterates as one dict of Python values per example
        features = {"input_ids": object(), "label": ClassLabel()}

    rows = FakeHFDataset({"input_ids": [i, i + 1, i + 2], "label": i % 2} for i in range(30))
    d = draw({"train": rows, "test": rows[:6]})
    assert d.x_train.dtype.kind == "i" and d.x_train.shape == (30, 3)  # token ids stay integers
    assert d.num_classes == 4  # the ClassLabel feature, not max + 1
    assert not d.drawn[0].batched
    assert draw({"train": list(rows), "test": rows[:6]}).num_classes == 2  # without features: max + 1


def test_tensor_like_values_are_converted():
    class TorchLike:  # .detach().cpu().numpy(), like a torch tensor (np.asarray alone would fail on CUDA)
        def __init__(self, a):
            self.a = a

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.a

    class TfLike:  # EagerTensor: .numpy()
        def __init__(self, a):
            self.a = a

        def numpy(self):
            return self.a

    import jax.numpy as jnp

    data = [[TorchLike(x), TfLike(y)] for x, y in batches(12, batch=4)]  # a DataLoader yields [x, y] lists
    d = draw(data)
    assert d.x_train.dtype == np.float32 and len(d.x_train) + len(d.x_val) == 12
    d = draw([(jnp.ones((4, 2)), jnp.arange(4) % 2) for _ in range(3)])
    assert isinstance(d.x_train, np.ndarray) and d.num_classes == 2


def test_targets_decide_the_task():
    x = np.ones((8, 2), np.float32)
    assert draw([(x, np.arange(8) % 3)]).num_classes == 3
    assert draw([(x, np.eye(5, dtype=np.int64)[np.arange(8) % 5])]).num_classes == 5  # one-hot width
    assert draw([(x, np.linspace(0, 1, 8))]).num_classes is None
    assert draw({"train": [(x, np.arange(8))], "num_classes": None}).num_classes is None  # integer regression


def test_batched_override_for_examples_that_look_like_batches():
    rows = [(np.full(3, i, np.float32), np.full(3, i, np.float32)) for i in range(12)]  # autoencoder examples
    assert draw(rows).drawn[0].batched  # the rule reads (3,), (3,) as a batch of three...
    d = draw({"train": rows, "batched": False})  # ...unless told
    assert d.x_train.shape[1:] == (3,) and len(d.x_train) + len(d.x_val) == 12
    with pytest.raises(HarnessError, match="'batched' must be true, false"):
        draw({"train": rows, "batched": "yes"})


# ----------------------------------------------------------------------------------------------------------------
# Errors name the factory


def test_failure_mid_iteration_names_the_factory_type_message_and_count():
    def flaky():
        yield from batches(16, batch=8)
        raise OSError("shard 3 is unreadable")

    with pytest.raises(HarnessError) as err:
        draw(flaky())
    message = str(err.value)
    assert message.startswith("data: the data factory my.factory: ")
    assert "OSError" in message and "shard 3 is unreadable" in message and "after 16 example(s)" in message


@pytest.mark.parametrize("elements, message", [
    ([(np.ones((4, 3)), np.zeros(4)), (np.ones((4, 5)), np.zeros(4))],
     r"inconsistent shapes: element 2 has x examples of shape \(5,\)"),
    ([(np.ones((4, 3)), np.zeros(4)), (np.ones((4, 3)), np.zeros(3))], r"element 2 has x of shape \(4, 3\) and y"),
    ([{"x": [1.0, 2.0], "y": 0}, {"x": [1.0, 2.0, 3.0], "y": 1}], r"element 2 has x of shape \(3,\) but element 1"),
    ([{"text": "hello", "label": 0}], r"dict with keys 'text', 'label'; harness reads the inputs from one of"),
    ([{"x": "hello", "label": 0}], r"'x' holds text"),
    ([(1, 2, 3)], r"element 1 is a tuple of length 3; each element must be an \(x, y\) pair"),
    ([np.ones((4, 2))], r"element 1 is a ndarray"),
    ([], r"gave no examples"),
    ([(np.ones(3), 1)] * 2, r"gave 2 example\(s\); at least 3 are needed"),
])
def test_bad_iterables_are_clear_errors(elements, message):
    with pytest.raises(HarnessError, match=message) as err:
        draw(elements)
    assert "my.factory" in str(err.value)


def test_not_iterable_split():
    with pytest.raises(HarnessError, match="'val' iterable must be an iterable of batches or examples, got int"):
        draw({"train": list(batches(8)), "val": 3})


# ----------------------------------------------------------------------------------------------------------------
# Through load_dataset: data.max_examples and the factory's name


def stream(seed: int = 0, batch: int = 32):
    """An endless seeded stream of (x, y) batches, like a repeating grain or tf.data pipeline."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 4)) * 2
    while True:
        y = rng.integers(0, 3, batch)
        yield (centers[y] + rng.normal(size=(batch, 4))).astype(np.float32), y


def stream_with_own_cap(max_examples=None):
    """A factory that takes max_examples itself (it gets data.max_examples too)."""
    stream_with_own_cap.seen = max_examples
    return {"train": stream(0), "val": stream(1)}


def broken_stream():
    def gen():
        yield np.ones((4, 2)), np.zeros(4)
        raise ValueError("decode failed")
    return gen()


def test_load_dataset_caps_and_passes_max_examples_only_when_asked():
    ds = load_dataset(FactoryConfig("test_data_iterables.stream", {"batch": 16}))
    assert sum(d.examples for d in ds.drawn) == iterables.DEFAULT_MAX_EXAMPLES
    ds = load_dataset(FactoryConfig("test_data_iterables.stream", {"max_examples": 64}))  # not passed: no TypeError
    assert len(ds.x_train) == 48 and len(ds.x_val) == 16
    ds = load_dataset(FactoryConfig("test_data_iterables.stream_with_own_cap", {"max_examples": 80}))
    assert stream_with_own_cap.seen == 80 and (len(ds.x_train), len(ds.x_val)) == (60, 20)
    load_dataset(FactoryConfig("test_data_iterables.stream_with_own_cap", {}))
    assert stream_with_own_cap.seen is None  # unset: the factory's own default


@pytest.mark.parametrize("value", [1, 0, 2.5, "many", True])
def test_bad_max_examples(value):
    with pytest.raises(HarnessError, match="data.max_examples: must be"):
        load_dataset(FactoryConfig("test_data_iterables.stream", {"max_examples": value}))


def test_load_dataset_failure_names_the_target():
    with pytest.raises(HarnessError) as err:
        load_dataset(FactoryConfig("test_data_iterables.broken_stream", {}))
    message = str(err.value)
    assert "test_data_iterables.broken_stream" in message and "ValueError" in message and "decode failed" in message
    assert "after 4 example(s)" in message


# ----------------------------------------------------------------------------------------------------------------
# What the data check says


def test_sampled_metric_and_info_finding():
    part = check_sampled(draw(stream(), max_examples=100))
    assert part.metrics == {"data/examples_drawn": 100}
    (finding,) = part.findings
    assert finding.id == "data.sampled" and finding.severity.value == "info"
    assert finding.message.startswith("drew 100 examples from an iterable (more were available)")
    assert finding.evidence["max_examples"] == 100
    part = check_sampled(draw(list(batches(20))))
    assert part.metrics == {"data/examples_drawn": 20} and not part.findings  # all of it: no finding
    arrays = {"x_train": np.ones((4, 2)), "y_train": np.arange(4) % 2, "x_val": np.ones((2, 2)), "y_val": np.arange(2)}
    assert not check_sampled(from_mapping(arrays)).metrics


def test_data_stage_end_to_end_on_an_iterable_factory():
    from helpers import compose, replace_group

    from harness import pipeline

    rc = compose([*replace_group("data", "test_data_iterables.stream", max_examples=400),
                  "diagnostics.run=[data]", "logger=none"])
    result = pipeline.run(rc)
    (outcome,) = result.outcomes
    assert outcome.metrics["data/examples_drawn"] == 400
    assert outcome.metrics["data/examples/train"] == 300 and outcome.metrics["data/examples/val"] == 100
    assert outcome.metrics["data/nondeterministic/status"] == "identical"  # a seeded stream draws the same again
    ids = {f.id: f for f in outcome.findings}
    assert ids["data.sampled"].severity.value == "info"
    assert not any(f.severity.value != "info" for f in outcome.findings), [f.message for f in outcome.findings]


# ----------------------------------------------------------------------------------------------------------------
# A real grain pipeline, when grain is installed (it is not a dependency)


def test_grain_map_dataset_repeating_forever():
    grain = pytest.importorskip("grain")
    features = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    ds = (grain.MapDataset.source(np.arange(50)).shuffle(seed=0).repeat()  # endless
          .map(lambda i: {"image": features[i], "label": int(i % 4)}).batch(16))
    d = draw({"train": ds, "val": grain.MapDataset.source(np.arange(10))
              .map(lambda i: {"image": features[i], "label": int(i % 4)}).batch(4)}, max_examples=200)
    assert [(s.examples, s.more, s.batched) for s in d.drawn] == [(150, True, True), (10, False, True)]
    assert d.x_train.shape == (150, 3) and d.num_classes == 4


def test_grain_data_loader_with_an_endless_sampler():
    grain = pytest.importorskip("grain")
    features = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)

    class Source:
        def __len__(self):
            return 50

        def __getitem__(self, i):
            return {"image": features[i], "label": i % 4}

    loader = grain.DataLoader(
        data_source=Source(), sampler=grain.samplers.IndexSampler(50, shuffle=True, seed=0, num_epochs=None),
        operations=[grain.transforms.Batch(batch_size=16)], worker_count=0)
    d = draw(loader, max_examples=120)
    assert (d.drawn[0].examples, d.drawn[0].more) == (120, True)
    assert len(d.x_train) == 90 and d.num_classes == 4
    np.testing.assert_array_equal(draw(loader, max_examples=120).x_train, d.x_train)  # seeded: the same draw again


def test_token_sequences_are_examples_and_extra_keys_pass_through():
    rows = [{"input_ids": np.arange(i, i + 6), "labels": np.arange(i + 1, i + 7)} for i in range(12)]
    mapping, drawn = iterables.draw_dataset({"train": rows, "val": rows[:4], "pad_token": 0, "causal": True},
                                            source=SOURCE)
    assert not drawn[0].batched and mapping["x_train"].shape == (12, 6) and mapping["x_train"].dtype.kind == "i"
    assert mapping["pad_token"] == 0 and mapping["causal"] is True and mapping["num_classes"] == 18
    batched = [{"input_ids": np.ones((4, 6), np.int64), "labels": np.ones((4, 6), np.int64)}] * 3
    assert iterables.draw_dataset(batched, source=SOURCE)[1][0].batched  # (batch, length): a batch
