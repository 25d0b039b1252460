"""The traced-program cache (harness.engine.exported): a later process reuses a stored program instead of tracing
it, gets bitwise the same results, and never a stale program: editing the user's code retraces, and whatever
cannot be stored or read falls back to tracing.

"A later process" is simulated in-process by clearing the in-memory executables (``programs.clear_cache``): what
remains is what a new process would find on disk. A counter in the user's loss shows whether a trace happened (the
loss only runs while a program is traced). The end-to-end test runs the CLI twice for real.
"""

import importlib
import json
import os
import sys

import numpy as np
import optax
import pytest
from flax import nnx
from helpers import cli_env, compose, run_cli, tiny_classification

from harness.engine import compile as programs
from harness.engine import exported
from harness.engine.train import Arrays, Hparams, Problem, TrainSpec, train_members
from harness.errors import HarnessError
from harness.models.mlp import MLP
from harness.optim import OptimSpec

SPEC = TrainSpec(steps=20, batch_size=16, steps_per_call=20)
HPARAMS = Hparams.make(lr=[1e-3, 1e-2, 3e-2], init_seed=[0, 1, 2], data_seed=[0, 1, 2])
LOSS_SOURCE = '''
import optax

TRACES = []
SCALE = {scale}


def loss(outputs, targets):
    TRACES.append(1)  # runs only while a program is traced
    {body}
'''
PLAIN_BODY = "return SCALE * optax.softmax_cross_entropy_with_integer_labels(outputs, targets)"


@pytest.fixture
def program_cache(tmp_path):
    directory = tmp_path / "programs"
    exported.enable(str(directory))
    programs.clear_cache()
    yield directory
    exported.enable(None)
    programs.clear_cache()


@pytest.fixture
def user_loss(tmp_path, monkeypatch):
    """A loss in a module of the user's own (outside site-packages); ``write(scale, body)`` rewrites it."""
    name = f"user_loss_{abs(hash(str(tmp_path)))}"
    path = tmp_path / f"{name}.py"
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(scale="1.0", body=PLAIN_BODY):
        path.write_text(LOSS_SOURCE.format(scale=scale, body=body))
        importlib.invalidate_caches()
        module = sys.modules.get(name)
        return importlib.reload(module) if module else importlib.import_module(name)

    yield write
    sys.modules.pop(name, None)


def problem_with(loss_fn, fingerprint=("tiny-mlp", "user_loss")) -> tuple[Problem, Arrays]:
    data = tiny_classification(n_train=64, n_val=32, features=6, classes=3)

    def build(key):
        return MLP(rngs=nnx.Rngs(key), input_shape=(6,), num_outputs=3, width=16, depth=1)

    problem = Problem(build, loss_fn, OptimSpec(optax.adam), classification=True, fingerprint=fingerprint)
    return problem, Arrays(data["x_train"], data["y_train"], data["x_val"], data["y_val"])


def train(loss_fn):
    problem, arrays = problem_with(loss_fn)
    return train_members(problem, SPEC, HPARAMS, arrays)


def new_process():
    programs.clear_cache()


def test_a_later_process_reuses_the_stored_program_bitwise(program_cache, user_loss):
    module = user_loss()
    reused0 = programs.STATS.traces_reused
    first = train(module.loss)
    assert module.TRACES and programs.STATS.traces_reused == reused0
    assert len(os.listdir(program_cache)) == 1  # one program: initialization fused with the only chunk

    new_process()
    module.TRACES.clear()
    again = train(module.loss)
    assert module.TRACES == []  # not traced
    assert programs.STATS.traces_reused == reused0 + 1
    np.testing.assert_array_equal(again.loss, first.loss)
    np.testing.assert_array_equal(again.val_loss, first.val_loss)

    exported.enable(None)  # and the same as tracing without the cache at all
    new_process()
    plain = train(module.loss)
    np.testing.assert_array_equal(plain.loss, first.loss)
    np.testing.assert_array_equal(plain.val_loss, first.val_loss)


def test_editing_the_users_code_retraces_instead_of_reusing_a_stale_program(program_cache, user_loss):
    module = user_loss(scale="1.0")
    first = train(module.loss)

    module = user_loss(scale="2.50")  # the user edits the loss; the run's config (fingerprint) is unchanged
    new_process()
    module.TRACES.clear()
    edited = train(module.loss)
    assert module.TRACES, "the edited loss must be traced, not served from the cache"
    # Same init and batches, twice the loss at step 0 (the training path differs afterwards).
    np.testing.assert_allclose(edited.loss[:, 0], 2.5 * first.loss[:, 0], rtol=1e-5)


def test_the_same_code_from_another_checkout_is_traced_again(program_cache, tmp_path, monkeypatch):
    """Two checkouts of one project: the second must not reuse the first's programs just because the first's files
    are still there unchanged (its code may differ in what the key cannot see)."""
    name = f"user_pkg_{abs(hash(str(tmp_path)))}"
    for checkout in ("a", "b"):
        package = tmp_path / checkout / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(LOSS_SOURCE.format(scale="1.0", body=PLAIN_BODY))
    results = []
    for checkout in ("a", "b"):
        sys.modules.pop(name, None)
        monkeypatch.syspath_prepend(str(tmp_path / checkout))
        importlib.invalidate_caches()
        module = importlib.import_module(name)
        assert module.__file__.startswith(str(tmp_path / checkout))
        exported.enable(str(program_cache), code_roots=[name])
        new_process()
        results.append(train(module.loss))
        assert module.TRACES, f"checkout {checkout} must be traced"
    sys.modules.pop(name, None)
    np.testing.assert_array_equal(results[0].loss, results[1].loss)


def test_a_program_that_cannot_be_exported_is_traced_once_per_process(program_cache, user_loss):
    # A host callback has no serialized form: jax.export refuses it, and the program runs the traced way. The
    # refusal is remembered, so later processes do not pay for a second, failing trace every time.
    body = ("import jax\n    jax.debug.callback(lambda: None)\n    " + PLAIN_BODY)
    module = user_loss(body=body)
    first = train(module.loss)
    traces_with_export_attempt = len(module.TRACES)
    [entry] = os.listdir(program_cache)
    assert exported.load(entry) is exported.UNEXPORTABLE
    new_process()
    module.TRACES.clear()
    again = train(module.loss)
    assert 0 < 2 * len(module.TRACES) == traces_with_export_attempt
    np.testing.assert_array_equal(again.loss, first.loss)


def test_an_unreadable_entry_is_traced_again_and_replaced(program_cache, user_loss):
    module = user_loss()
    first = train(module.loss)
    [entry] = os.listdir(program_cache)
    (program_cache / entry).write_bytes(b"not a program")
    new_process()
    module.TRACES.clear()
    again = train(module.loss)
    assert module.TRACES
    np.testing.assert_array_equal(again.loss, first.loss)
    assert exported.load(entry) is not None  # rewritten whole


def test_problems_without_a_fingerprint_are_not_stored(program_cache, user_loss):
    module = user_loss()
    problem, arrays = problem_with(module.loss, fingerprint=None)
    train_members(problem, SPEC, HPARAMS, arrays)
    assert os.listdir(program_cache) == []


def stable_helper(x):
    return x


def test_stable_form_names_things_by_what_survives_the_process():
    import functools

    assert exported.stable_form(stable_helper) == f"{__name__}.stable_helper"
    assert exported.stable_form(optax.adam) == "optax._src.alias.adam"
    assert exported.stable_form(functools.partial(stable_helper, 2)) == (
        "partial", f"{__name__}.stable_helper", ("2",), ())
    assert exported.stable_form(SPEC) == exported.stable_form(TrainSpec(steps=20, batch_size=16, steps_per_call=20))
    assert exported.stable_form(SPEC) != exported.stable_form(TrainSpec(steps=21, batch_size=16, steps_per_call=20))
    with pytest.raises(exported.Unkeyable):
        exported.stable_form(lambda x: x)
    with pytest.raises(exported.Unkeyable):
        exported.stable_form(object())
    with pytest.raises(exported.Unkeyable):
        exported.stable_form(problem_with(stable_helper, fingerprint=None)[0])
    problem = problem_with(stable_helper, fingerprint=("model", 3))[0]
    assert exported.stable_form(problem) == ("Problem", ("'model'", "3"))


def test_program_cache_config_key():
    assert compose([]).program_cache is True
    assert compose(["engine.program_cache=false"]).program_cache is False
    with pytest.raises(HarnessError, match="engine.program_cache"):
        compose(["engine.program_cache=sometimes"])


@pytest.mark.slow
def test_the_cli_reuses_traced_programs_across_processes(tmp_path):
    cache = tmp_path / "jax-cache"
    args = ["data=wine", "model.width=16", "diagnostics.run=[model,overfit_batch]", "diagnostics.overfit_batch.steps=40",
            "diagnostics.overfit_batch.eval_every=20",
            "logger=none", f"engine.compilation_cache={cache}"]
    env = cli_env()
    env.pop("JAX_COMPILATION_CACHE_DIR")  # the config key decides here
    reports, stdouts = [], []
    for i in range(2):
        proc = run_cli([*args, f"hydra.run.dir={tmp_path}/run{i}"], str(tmp_path), env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        reports.append(json.loads((tmp_path / f"run{i}" / "report.json").read_text()))
        stdouts.append(" ".join(proc.stdout.split()))  # the terminal view wraps at 80 columns when piped
    first, second = (r["programs"] for r in reports)
    assert first["compiles"] == second["compiles"] >= 3
    assert first["traces_reused"] == 0 and second["traces_reused"] == second["compiles"]
    assert len(os.listdir(cache / "programs")) == first["compiles"]
    assert reports[0]["metrics"] == reports[1]["metrics"]
    # The status line and report.md say so.
    n = second["compiles"]
    assert "traces reused" not in stdouts[0] and f"{n} traces reused" in stdouts[1]
    assert f"{n} traces reused" in (tmp_path / "run1" / "report.md").read_text()
