"""harness.data.files.load_file: .npz and .csv, good and bad, and through the CLI once."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from harness.data.files import load_file
from harness.errors import HarnessError


def write(path, text):
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# .npz


def test_npz_with_splits_and_stored_num_classes(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.ones((10, 3)), y_train=np.arange(10) % 3, x_val=np.zeros((4, 3)),
             y_val=np.arange(4) % 3, num_classes=5)
    d = load_file(str(path))
    assert d["num_classes"] == 5  # stored count wins over max + 1
    assert d["x_train"].shape == (10, 3) and d["y_val"].tolist() == [0, 1, 2, 0]
    assert load_file(str(path), num_classes=7)["num_classes"] == 7  # the argument overrides the file


def test_npz_auto_task(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "xy.npz"
    np.savez(path, x=rng.normal(size=(20, 2)), y=rng.normal(size=20))
    d = load_file(str(path))
    assert "num_classes" not in d and len(d["x_train"]) == 15 and len(d["x_val"]) == 5  # regression, split 75/25
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=rng.normal(size=(20, 2)), y=np.arange(20) % 4)
    assert load_file(str(labels))["num_classes"] == 4
    assert "num_classes" not in load_file(str(labels), task="regression")
    text = tmp_path / "text.npz"
    np.savez(text, x=rng.normal(size=(6, 2)), y=np.array(["dog", "cat", "dog", "eel", "cat", "eel"]))
    d = load_file(str(text))
    assert d["num_classes"] == 3 and set(np.concatenate([d["y_train"], d["y_val"]])) == {0, 1, 2}
    onehot = tmp_path / "onehot.npz"
    np.savez(onehot, x=rng.normal(size=(8, 2)), y=np.eye(5)[np.arange(8) % 3])
    assert load_file(str(onehot))["num_classes"] == 5  # one-hot width, not max + 1


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p, x_train=np.ones((3, 2))), "missing y_train, x_val, y_val (found x_train)"),
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: p.write_text("not a zip"), "not a valid .npz file"),
    (lambda p: np.savez(p, x_train=np.array([{"a": 1}], dtype=object), y_train=np.ones(1), x_val=np.ones(1),
                        y_val=np.ones(1)), "holds Python objects"),
    (lambda p: np.savez(p, x_train=np.ones((3, 2)), y_train=np.ones(4), x_val=np.ones((2, 2)), y_val=np.ones(2)),
     "x_train has 3 examples but y_train has 4"),
    (lambda p: np.savez(p, x=np.ones((3, 2)), y=np.ones(2)), "x has 3 examples but y has 2"),
])
def test_bad_npz_files_name_the_file(tmp_path, make, message):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(HarnessError, match="bad.npz") as err:
        load_file(str(path))
    assert message in str(err.value)
    assert str(err.value).startswith("data.path: ")


# ----------------------------------------------------------------------------------------------------------------
# .csv


def test_csv_with_header_and_text_labels(tmp_path):
    path = write(tmp_path / "iris.csv",
                 "sepal,petal,species\n5.1,3.5,setosa\n4.9, 3.0,versicolor\n4.7,,setosa\n6.0,2.2,virginica\n")
    d = load_file(path, val_fraction=0.5)
    assert d["num_classes"] == 3 and d["x_train"].dtype == np.float32 and d["x_train"].shape == (2, 2)
    x = np.concatenate([d["x_train"], d["x_val"]])
    y = np.concatenate([d["y_train"], d["y_val"]])
    by_label = {int(label): row for row, label in zip(x.tolist(), y)}
    assert by_label[2] == [6.0, 2.2] or np.allclose(by_label[2], [6.0, 2.2])  # virginica is class 2 (sorted)
    assert int(np.isnan(x).sum()) == 1  # the empty cell is NaN, for data.nonfinite to report


def test_csv_label_selection(tmp_path):
    with_header = write(tmp_path / "h.csv", "target,a,b\n0,1.5,2\n1,3,4\n0,5,6\n1,7,8\n")
    d = load_file(with_header)  # a column named target, although it is first
    assert sorted(np.concatenate([d["y_train"], d["y_val"]]).tolist()) == [0, 0, 1, 1]
    assert sorted(np.concatenate([d["x_train"], d["x_val"]])[:, 0].tolist()) == [1.5, 3, 5, 7]
    by_name = load_file(with_header, label="b")
    assert by_name["num_classes"] == 9 and by_name["x_train"].shape[1] == 2
    no_header = write(tmp_path / "n.csv", "1,2,0\n3,4,1\n5,6,2\n7,8,1\n")
    assert load_file(no_header)["num_classes"] == 3  # the last column
    assert load_file(no_header, label=0)["num_classes"] == 8  # labels 1, 3, 5, 7
    assert load_file(no_header, label=-1)["num_classes"] == 3
    assert load_file(no_header, label=0)["y_train"].dtype == np.int64  # whole-number labels become integers


def test_csv_regression_tsv_semicolons_and_gzip(tmp_path):
    rows = "".join(f"{i},{i * 0.5},{i * 0.1 + 0.05}\n" for i in range(12))
    d = load_file(write(tmp_path / "r.csv", "a,b,y\n" + rows))
    assert "num_classes" not in d and d["y_train"].dtype == np.float64 and len(d["y_val"]) == 3
    assert load_file(write(tmp_path / "r.tsv", rows.replace(",", "\t")))["x_train"].shape == (9, 2)
    assert load_file(write(tmp_path / "s.csv", rows.replace(",", ";")))["x_train"].shape == (9, 2)
    gz = tmp_path / "r.csv.gz"
    with gzip.open(gz, "wt") as f:
        f.write(rows)
    assert load_file(str(gz))["x_val"].shape == (3, 2)
    # the same seed gives the same split; another seed another
    a, b = load_file(str(gz)), load_file(str(gz))
    assert np.array_equal(a["x_val"], b["x_val"])
    assert not np.array_equal(a["x_val"], load_file(str(gz), split_seed=1)["x_val"])


def test_csv_task_override(tmp_path):
    path = write(tmp_path / "c.csv", "a,label\n1,0\n2,1\n3,1\n4,0\n")
    assert "num_classes" not in load_file(path, task="regression")
    assert load_file(path, num_classes=4)["num_classes"] == 4
    floats = write(tmp_path / "f.csv", "a,label\n1,0.5\n2,1.5\n3,1\n4,0\n")
    assert "num_classes" not in load_file(floats)  # auto: non-integer labels are regression
    assert load_file(floats, task="classification")["num_classes"] == 3  # data.shape will report the fractions


@pytest.mark.parametrize("text, kwargs, key, message", [
    ("", {}, "data.path", "t.csv: the file is empty"),
    ("a,b,label\n", {}, "data.path", "t.csv: has a header row but no data rows"),
    ("a,b,label\n1,2,0\n3,x,1\n", {}, "data.path", "t.csv: 'b' (column 1), line 3: 'x' is not a number"),
    ("a,b,c\n1,2,3\n4,5\n", {}, "data.path", "t.csv: line 3 has 2 fields but line 1 has 3"),
    ("label\n1\n2\n", {}, "data.path", "has a single column"),
    ("a,b,label\n1,2,0\n3,4,1\n", {"label": "price"}, "data.label", "t.csv (columns: a, b, label)"),
    ("1,2,0\n3,4,1\n", {"label": "price"}, "data.label", "t.csv has no header row"),
    ("1,2,0\n3,4,1\n", {"label": 5}, "data.label", "t.csv has 3 columns (0..2)"),
    ("a,label\n1,cat\n2,dog\n", {"task": "regression"}, "data.path", "label 'label' (column 1), line 2: 'cat'"),
    ("a,label\n1,cat\n2,\n3,dog\n", {}, "data.path", "line 3 is empty"),
    ("a,label\n1,0\n", {}, "data.path", "one data row cannot be split"),
    ("a,label\n1,0\n2,1\n", {"task": "both"}, "data.task", "must be one of auto, classification, regression"),
    ("a,label\n1,0\n2,1\n", {"val_fraction": 1.0}, "data.val_fraction", "must be a number in (0, 1)"),
    ("a,label\n1,0\n2,1\n", {"num_classes": 1}, "data.num_classes", "at least 2"),
])
def test_bad_csv_files(tmp_path, text, kwargs, key, message):
    path = write(tmp_path / "t.csv", text)
    with pytest.raises(HarnessError) as err:
        load_file(path, **kwargs)
    assert err.value.key == key and message in str(err.value), str(err.value)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(HarnessError, match=r"^data.path: nope.csv: no such file") as err:
        load_file("nope.csv")
    assert "looked in" in str(err.value)
    with pytest.raises(HarnessError, match=r"unknown file type \.parquet"):
        load_file(write(tmp_path / "d.parquet", "x"))
    with pytest.raises(HarnessError, match="is a directory"):
        load_file(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# Through the config and the CLI


def test_file_config_through_the_pipeline(tmp_path):
    from helpers import compose

    from harness import pipeline

    rows = "".join(f"{i % 7},{(i * 3) % 5},{i % 2}\n" for i in range(40))
    path = write(tmp_path / "t.csv", "a,b,label\n" + rows)
    rc = compose(["data=file", f"data.path={path}", "diagnostics.run=[data]", "logger=none"])
    dataset = pipeline.load_dataset(rc.data)
    assert dataset.num_classes == 2 and dataset.x_train.shape == (30, 2)


@pytest.mark.slow
def test_cli_missing_file_is_one_line_and_exit_2(tmp_path):
    from helpers import run_cli

    out = run_cli(["data=file", "data.path=missing.csv", "logger=none", "diagnostics.run=[data]"], cwd=str(tmp_path),
                  module=False)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "missing.csv" in lines[0] and "no such file" in lines[0], out.stderr
    assert "Traceback" not in out.stderr + out.stdout
