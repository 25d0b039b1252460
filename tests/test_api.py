"""harness.diagnose: the checklist from Python, on objects instead of _target_ import paths.

Most runs here are ``diagnostics.run=[data,model]`` on tiny data (a few seconds each); the notebook test defines
its model the way a notebook cell does (exec'd text in a ``__main__`` namespace, no source file), runs it, edits
it and runs again in the same process.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import optax
import pytest
from rich.console import Console

import harness
from families import equinox_mlp, haiku_mlp, linen_mlp
from helpers import tiny_classification
from harness.errors import HarnessError

NO_CACHE = ["engine.compilation_cache=null"]
FAST = ["diagnostics.run=[data,model]", *NO_CACHE]
DATA_ONLY = ["diagnostics.run=[data]", "engine.compilation_cache=null"]


def per_example_loss(outputs, targets):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)


def nnx_mlp(*, rngs, input_shape, num_outputs, width: int = 16):
    from flax import nnx

    return nnx.Sequential(nnx.Linear(int(np.prod(input_shape)), width, rngs=rngs), nnx.relu,
                          nnx.Linear(width, num_outputs, rngs=rngs))


def test_an_nnx_factory_arrays_and_a_loss_give_a_healthy_report_with_its_files(tmp_path):
    data = tiny_classification()
    report = harness.diagnose(model=nnx_mlp, data=data, loss=per_example_loss, overrides=FAST,
                              output_dir=tmp_path / "run")

    assert report.status == "healthy" and not report.has_error and report.headline is None, str(report)
    assert report.output_dir == str(tmp_path / "run")
    assert set(report.files) == {"json", "markdown"}
    on_disk = json.load(open(tmp_path / "run" / "report.json"))
    assert on_disk["status"] == "healthy" and report.to_dict()["status"] == "healthy"
    assert report.metrics["data/examples/train"] == 96 and "model/initial_loss" in report.metrics
    # The objects are named, not importable: the resolved config says so, and the run line names them.
    config = on_disk["config"]
    # The factory's own width is a config key, as a config file would list it: the capacity ladder starts there.
    assert config["model"] == {"_target_": f"<in-memory: {__name__}.nnx_mlp>", "width": 16}
    assert config["data"]["_target_"] == "<in-memory: dict>"
    assert config["loss"] == {"_target_": f"<in-memory: {__name__}.per_example_loss>", "_partial_": True}
    assert config["logger"]["kind"] == "none"  # no W&B runs from Python unless asked
    assert not os.path.exists(tmp_path / "run" / "wandb")
    assert on_disk["command"] == ["harness.diagnose", *FAST]
    assert on_disk["choices"]["model"] == "nnx_mlp"

    # It shows itself: a short repr, the terminal view as text and to rich, report.md (plots inline) in Jupyter.
    assert repr(report).startswith("Report(status='healthy'") and len(repr(report)) < 300
    text = str(report)
    assert "status: healthy" in text and "report.md" in text
    console = Console(record=True, width=120, force_terminal=False)
    console.print(report)
    assert "status: healthy" in console.export_text()
    markdown = report._repr_markdown_()
    assert markdown.startswith("# ✅ harness report: healthy")
    assert markdown.count("](data:image/png;base64,") == len(report.plots) > 0  # Jupyter shows the plots inline
    assert all(os.path.isfile(path) for path in report.plots.values())
    assert "harness.diagnose(model=" in markdown and open(tmp_path / "run" / "report.md").read() == \
        report.to_markdown()

    # Read back from disk, the same report.
    again = harness.Report.load(tmp_path / "run")
    assert again.status == "healthy" and again.metrics == report.metrics and str(again) == text


def _batches(data, size=32):
    for i in range(0, len(data["x_train"]), size):
        yield data["x_train"][i:i + size], data["y_train"][i:i + size]


@pytest.mark.parametrize("kind", ["factory", "partial", "generator", "pairs", "split iterables"])
def test_data_as_a_factory_or_an_iterable(kind, tmp_path):
    data = tiny_classification(n_train=120)
    given = {
        "factory": tiny_classification,
        "partial": functools.partial(tiny_classification, n_train=120, classes=3),
        "generator": _batches(data),  # one-shot: drawn once, replayed for the determinism check
        "pairs": (data["x_train"], data["y_train"]),
        "split iterables": {"train": _batches(data), "val": [(data["x_val"], data["y_val"])], "num_classes": 3},
    }[kind]
    report = harness.diagnose(model=nnx_mlp, data=given, overrides=DATA_ONLY, output_dir=tmp_path)

    assert report.status == "healthy", str(report)
    assert "data.nondeterministic" not in report  # loading the data again gave the same arrays
    train = {"factory": 96, "partial": 120, "generator": 90, "pairs": 90, "split iterables": 120}[kind]
    assert report.metrics["data/examples/train"] == train
    if kind == "partial":  # plain keyword arguments are config keys, recorded like a config's
        assert report.record["config"]["data"]["n_train"] == 120


@pytest.mark.parametrize("factory", [equinox_mlp, haiku_mlp, functools.partial(linen_mlp, depth=1)],
                         ids=["equinox", "haiku", "linen"])
def test_factories_of_other_libraries(factory, tmp_path):
    report = harness.diagnose(model=factory, data=tiny_classification(), overrides=[*FAST, "model.width=8"],
                              output_dir=tmp_path)

    assert report.status == "healthy", str(report)
    model = report.record["config"]["model"]
    assert model["width"] == 8  # model.<key>=... sets an argument of the factory given as an object
    if isinstance(factory, functools.partial):
        assert model["depth"] == 1 and model["_target_"] == "<in-memory: families.linen_mlp>"


def test_a_built_linen_module_is_accepted_and_a_built_nnx_module_is_refused(tmp_path):
    from flax import nnx

    report = harness.diagnose(model=linen_mlp(3, width=8, depth=1), data=tiny_classification(), overrides=FAST,
                              output_dir=tmp_path)
    assert report.status == "healthy", str(report)

    with pytest.raises(HarnessError, match=r"^model: got a built nnx model .* pass its factory"):
        harness.diagnose(model=nnx_mlp(rngs=nnx.Rngs(0), input_shape=(6,), num_outputs=3),
                         data=tiny_classification(), overrides=FAST, output_dir=tmp_path)


NOTEBOOK_CELL = '''
import jax
import numpy as np
from flax import nnx

class Model(nnx.Module):
    def __init__(self, *, rngs, input_shape, num_outputs, width=16):
        self.hidden = nnx.Linear(int(np.prod(input_shape)), width, rngs=rngs)
        self.out = nnx.Linear(width, num_outputs, rngs=rngs)

    def __call__(self, x):
        return {output}
'''


def test_a_model_edited_in_a_notebook_gets_a_report_on_the_edited_model(tmp_path):
    """A notebook cell's class has no source file and keeps its name when the cell is edited and run again: the
    second report must be about the new code (no program traced from the old one is reused)."""
    notebook = {"__name__": "__main__"}  # a notebook's namespace: __main__, code without a file
    exec(NOTEBOOK_CELL.format(output="self.out(jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1))))"), notebook)
    data = tiny_classification()
    first = harness.diagnose(model=notebook["Model"], data=data, overrides=FAST, output_dir=tmp_path / "1")
    assert first.status == "healthy", str(first)
    assert first.record["config"]["model"]["_target_"] == "<in-memory: __main__.Model>"
    assert first.record["programs"]["compiles"] > 0
    # Run again unedited: this run's own count says its programs came from the in-process cache.
    rerun = harness.diagnose(model=notebook["Model"], data=data, overrides=FAST, output_dir=tmp_path / "1b")
    assert rerun.status == "healthy" and rerun.record["programs"]["compiles"] == 0

    # The cell edited (a planted bug: probabilities handed to the logits loss) and run again.
    exec(NOTEBOOK_CELL.format(output="jax.nn.softmax(self.out(jax.nn.relu(self.hidden(x.reshape(x.shape[0], "
                                     "-1)))))"), notebook)
    second = harness.diagnose(model=notebook["Model"], data=data, overrides=FAST, output_dir=tmp_path / "2")
    assert second.status == "unhealthy" and second.has_error
    assert second.headline.id == "model.output_range" and second.finding("model.output_range").severity == "error"
    assert "model.output_range" in second and "model.output_range" in str(second)
    assert second.record["programs"]["compiles"] > 0  # traced from the edited code


def test_bad_arguments_are_errors_naming_the_argument(tmp_path):
    data = tiny_classification()
    cases = [
        (dict(data=42), r"^data: must be a mapping of arrays"),
        (dict(data=data["x_train"]), r"^data: got one array of shape \(96, 6\)"),
        (dict(model="cnn", data=data), r"^model: got the string 'cnn'.*overrides=\['model=cnn'\]"),
        (dict(model=3, data=data), r"^model: must be a model factory"),
        (dict(model=nnx_mlp, data=data, loss=lambda outputs: outputs), r"^loss: .* must take \(outputs, targets\)"),
        (dict(model=nnx_mlp, data=data, overrides="optim.lr=1"), r"^overrides: must be a list of strings"),
        (dict(model=nnx_mlp, data=data, overrides=["model=cnn"]), r"^overrides: 'model=cnn' picks a model config"),
        (dict(data=data, overrides=["optim.lr=-1"]), r"^optim.lr: must be positive"),
        (dict(data=data, overrides=["nonsense_key=1"]), r"^overrides: .*nonsense_key"),
        (dict(data=data, logger="tensorboard"), r"^logger: must be one of none, wandb"),
        (dict(data={"x_train": data["x_train"]}), r"^data \(dict\): missing y_train, x_val, y_val"),
    ]
    for kwargs, message in cases:
        with pytest.raises(HarnessError, match=message):
            harness.diagnose(**{"overrides": NO_CACHE, **kwargs}, output_dir=tmp_path)
    assert not os.path.exists(tmp_path / "report.json")


def test_runs_without_an_output_dir_go_where_the_cli_puts_them_and_never_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = harness.diagnose(data=tiny_classification(), overrides=DATA_ONLY)
    b = harness.diagnose(data=tiny_classification(), overrides=DATA_ONLY)
    assert a.output_dir != b.output_dir
    for report in (a, b):
        assert os.path.relpath(report.output_dir, tmp_path).startswith("outputs" + os.sep)
        assert os.path.isfile(os.path.join(report.output_dir, "report.json"))


@pytest.mark.slow
def test_the_notebook_example_runs(tmp_path):
    """experiments/notebook_example.py, as the README says to run it (data and model checks only): the healthy
    model, then the same class redefined with a planted bug, named in the second report."""
    import subprocess
    import sys

    from helpers import REPO_DIR, cli_env

    script = os.path.join(REPO_DIR, "experiments", "notebook_example.py")
    proc = subprocess.run([sys.executable, script, "--quick"], cwd=tmp_path, env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("status: healthy") == 1 and "status: unhealthy" in proc.stdout
    assert "root cause: model.output_range" in proc.stdout
    reports = sorted(tmp_path.glob("outputs/*/*/report.json"), key=os.path.getmtime)
    assert [json.load(open(r))["status"] for r in reports] == ["healthy", "unhealthy"]


def test_diagnose_from_inside_a_hydra_app_leaves_its_hydra_as_it_was(tmp_path):
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        theirs = GlobalHydra.instance().hydra
        report = harness.diagnose(data=tiny_classification(), overrides=DATA_ONLY, output_dir=tmp_path)
        assert GlobalHydra.instance().hydra is theirs
    assert report.status == "healthy"


def test_what_keys_an_in_memory_object_s_programs():
    """Closures and partials carry values their code does not show: they are keyed by the object (in this
    process only, never stored for others); plain functions and classes by their code alone."""
    from harness.api import in_memory_identity
    from harness.engine.exported import Unkeyable, stable_form

    def smoothed(smoothing):
        def loss(outputs, targets):
            return per_example_loss(outputs, targets) * (1 - smoothing)

        return loss

    assert in_memory_identity(smoothed(0.1)) != in_memory_identity(smoothed(0.2))
    loss = smoothed(0.1)
    assert in_memory_identity(loss) == in_memory_identity(loss)
    with pytest.raises(Unkeyable):
        stable_form(in_memory_identity(loss))
    assert in_memory_identity(per_example_loss) == in_memory_identity(per_example_loss)
    stable_form(in_memory_identity(per_example_loss))  # a function from a file: shareable across processes
    assert in_memory_identity(functools.partial(linen_mlp, activation=np.tanh)) != \
        in_memory_identity(functools.partial(linen_mlp, activation=np.tanh))
    # A script that defines a class again under its name (the bug fixed below the broken one): same module,
    # qualname and file, other code.
    assert in_memory_identity(Twice) != in_memory_identity(FIRST_TWICE)
    stable_form(in_memory_identity(Twice))

    def make(width):
        class Local:
            def __call__(self, x):
                return x * width

        return Local

    assert in_memory_identity(make(1)) != in_memory_identity(make(2))


class Twice:
    def __call__(self, x):
        return x


FIRST_TWICE = Twice


class Twice:  # noqa: F811
    def __call__(self, x):
        return -x
