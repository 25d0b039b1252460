"""The traced-program cache (harness.engine.exported): a later process reuses a stored program instead of tracing
it, gets bitwise the same results, and never a stale program: editing the user's code retraces, and whatever
cannot be stored or read falls back to tracing.

"A later process" is simulated in-process by clearing the in-memory executables (``programs.clear_cache``): what
remains is what a new process would find on disk. A counter in the user's loss shows whether a trace happened (the
loss only runs while a program is traced). The end-to-end test runs the CLI twice for real.

User code is identified by content (harness.engine.code_identity): a same-size edit with the mtime set back
retraces, and code without a source file (a notebook's ``__main__``, ``python -c``) is keyed by the object in the
process and never stored across processes; a notebook's edit-and-rerun is simulated with a fresh ``__main__``
module that cells are exec'd into, and ``python -c`` runs for real.
"""

import functools
import importlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import TESTS_DIR, cli_env, compose, replace_group, run_cli, tiny_classification

from harness import pipeline
from harness.engine import compile as programs
from harness.engine import exported
from harness.engine.code_identity import code_identity, file_digest
from harness.engine.core import Arrays, Hparams, Problem, TrainSpec
from harness.engine.driver import train_members
from harness.errors import HarnessError
from harness.models.adapters import nnx as nnx_adapter
from harness.models.mlp import MLP
from harness.optim import OptimSpec
from harness.tasks import Task

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
    """A loss in a module of the user's own (outside site-packages); ``write(scale, body, keep_mtime)`` rewrites it
    (``keep_mtime``: set the file's mtime back afterwards)."""
    name = f"user_loss_{abs(hash(str(tmp_path)))}"
    path = tmp_path / f"{name}.py"
    monkeypatch.syspath_prepend(str(tmp_path))
    # Python's own bytecode cache trusts (size, mtime): without this a reload after an edit that keeps both would
    # run the old bytecode.
    monkeypatch.setattr(sys, "dont_write_bytecode", True)

    def write(scale="1.0", body=PLAIN_BODY, keep_mtime=False):
        before = path.stat() if path.exists() else None
        path.write_text(LOSS_SOURCE.format(scale=scale, body=body))
        if keep_mtime:
            assert path.stat().st_size == before.st_size
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        importlib.invalidate_caches()
        module = sys.modules.get(name)
        return importlib.reload(module) if module else importlib.import_module(name)

    yield write
    sys.modules.pop(name, None)


def problem_with(loss_fn, fingerprint=("tiny-mlp", "user_loss")) -> tuple[Problem, Arrays]:
    data = tiny_classification(n_train=64, n_val=32, features=6, classes=3)

    def build(key):
        return MLP(rngs=nnx.Rngs(key), input_shape=(6,), num_outputs=3, width=16, depth=1)

    problem = Problem(nnx_adapter.adapt(build), loss_fn, OptimSpec(optax.adam), Task(num_classes=3, target_shape=()),
                      fingerprint=fingerprint)
    return problem, Arrays(data["x_train"], data["y_train"], data["x_val"], data["y_val"])


def train(loss_fn):
    problem, arrays = problem_with(loss_fn)
    return train_members(problem, SPEC, HPARAMS, arrays)


def new_process():
    programs.clear_cache()


def entries(directory) -> list[str]:
    """The stored programs (each traced one also has a ``<key>.seconds`` file: what tracing and compiling it took)."""
    return [n for n in os.listdir(directory) if not n.endswith(".seconds")]


def test_a_later_process_reuses_the_stored_program_bitwise(program_cache, user_loss):
    module = user_loss()
    reused0 = programs.STATS.traces_reused
    first = train(module.loss)
    assert module.TRACES and programs.STATS.traces_reused == reused0
    assert len(entries(program_cache)) == 1  # one program: initialization fused with the only chunk

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


def test_an_edit_that_keeps_the_size_and_mtime_retraces(program_cache, user_loss):
    """Validity is decided by the sources' content: an edit of the same length whose mtime is set back (a
    checkout, a copy with preserved times) is traced again, in the same process as in a later one."""
    module = user_loss(scale="1.0")
    first = train(module.loss)
    module = user_loss(scale="2.0", keep_mtime=True)
    new_process()
    module.TRACES.clear()
    edited = train(module.loss)
    assert module.TRACES, "an edit with the same size and mtime must be traced, not served from the cache"
    np.testing.assert_allclose(edited.loss[:, 0], 2.0 * first.loss[:, 0], rtol=1e-5)


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


def test_a_reused_program_reports_what_it_cost_with_no_cache(program_cache, user_loss):
    """budget= sizes the suite with what a program costs to compile when the cache does not hold it: a reused
    program reports what the process that traced it measured, not its own (much shorter) load."""
    module = user_loss()
    before = dict(programs.STATS.by_program.get("train/train", {}))
    train(module.loss)
    traced = programs.STATS.by_program["train/train"]
    cold = traced["cold_compile_seconds"] - before.get("cold_compile_seconds", 0.0)
    assert cold == traced["compile_seconds"] - before.get("compile_seconds", 0.0) > 0
    [entry] = entries(program_cache)
    assert exported.recorded_seconds(entry) == pytest.approx(cold)
    exported.record_seconds(entry, 1234.5)  # as if tracing and compiling it had taken that long
    new_process()
    reloaded = dict(programs.STATS.by_program["train/train"])
    train(module.loss)
    after = programs.STATS.by_program["train/train"]
    assert after["cold_compile_seconds"] - reloaded["cold_compile_seconds"] == pytest.approx(1234.5)
    assert after["compile_seconds"] - reloaded["compile_seconds"] < 1234.5


def test_an_unreadable_entry_is_traced_again_and_replaced(program_cache, user_loss):
    module = user_loss()
    first = train(module.loss)
    [entry] = entries(program_cache)
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
    assert len(entries(cache / "programs")) == first["compiles"]
    assert reports[0]["metrics"] == reports[1]["metrics"]
    # The status line and report.md say so.
    n = second["compiles"]
    assert "traces reused" not in stdouts[0] and f"{n} traces reused" in stdouts[1]
    assert f"{n} traces reused" in (tmp_path / "run1" / "report.md").read_text()


# --------------------------------------------------------------------------------------------------------------
# Code identity: by content where there is a source file; by the object, in this process only, where there is none.

NET_SOURCE = '''
import jax
from flax import nnx


class Net(nnx.Module):
    def __init__(self, *, rngs, input_shape, num_outputs, width=8):
        self.hidden = nnx.Linear(input_shape[-1], width, rngs=rngs)
        self.out = nnx.Linear(width, num_outputs, rngs=rngs)

    def __call__(self, x):
        {body}
'''
HEALTHY_BODY = "return self.out(jax.nn.relu(self.hidden(x)))"
SOFTMAX_BODY = "return jax.nn.softmax(self.out(jax.nn.relu(self.hidden(x))))"  # the bug: probabilities


def net_source(body: str) -> str:
    """The model with ``body`` as its forward pass, padded to one length for every body (a same-size edit)."""
    width = max(len(HEALTHY_BODY), len(SOFTMAX_BODY))
    return NET_SOURCE.format(body=f"{body}  # {'.' * (width - len(body))}")


@pytest.fixture
def notebook(monkeypatch, tmp_path):
    """A kernel's ``__main__`` (no ``__file__``); ``run_cell(source)`` executes a cell into it, the way IPython
    does (``cell_file=True``: compiled from a cell file of ipykernel's kind, ``<tmp>/ipykernel_<pid>/<n>.py``,
    which exists, but is not ``__main__``'s file)."""
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    monkeypatch.setitem(sys.modules, "__main__", main)
    counter = itertools.count(1)

    def run_cell(source: str, cell_file: bool = False):
        n = next(counter)
        filename = f"<ipython-input-{n}-{n:012x}>"
        if cell_file:
            path = tmp_path / "ipykernel_4242" / f"{n}.py"
            path.parent.mkdir(exist_ok=True)
            path.write_text(source)
            filename = str(path)
        exec(compile(source, filename, "exec"), main.__dict__)
        return main

    return run_cell


def user_module(tmp_path, monkeypatch, name: str, source: str):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    importlib.invalidate_caches()
    sys.modules.pop(name, None)
    module = importlib.import_module(name)
    monkeypatch.setitem(sys.modules, name, module)
    return path, module


def test_code_in_a_source_file_is_identified_by_module_qualname_and_content(tmp_path, monkeypatch):
    name = f"user_net_{abs(hash(str(tmp_path)))}"
    path, module = user_module(tmp_path, monkeypatch, name, net_source(HEALTHY_BODY) + textwrap.dedent('''
        import dataclasses, functools

        def make(*, rngs, input_shape, num_outputs):
            return Net(rngs=rngs, input_shape=input_shape, num_outputs=num_outputs)

        @dataclasses.dataclass(frozen=True)
        class Config:
            width: int = 8

        wide = functools.partial(Net, width=16)
        '''))
    real = os.path.realpath(path)
    ident = code_identity(module.Net)
    assert ident.has_source and ident.name == f"{name}.Net"
    assert (real, file_digest(real)) in ident.sources
    key = ident.stable_key()
    assert key[0] == f"{name}.Net" and exported.stable_form(ident) == exported.stable_form(code_identity(module.Net))
    # A function, a partial, an instance (its class) and a dataclass (its generated methods are the file's).
    for obj in (module.make, module.wide, module.Config, module.Config()):
        assert code_identity(obj).has_source and (real, file_digest(real)) in code_identity(obj).sources
    assert code_identity(module.Net) == ident and hash(code_identity(module.Net)) == hash(ident)

    # The same length, the mtime set back: another identity all the same (content, not mtime).
    before = path.stat()
    path.write_text(path.read_text().replace(net_source(HEALTHY_BODY), net_source(SOFTMAX_BODY)))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert code_identity(module.Net) != ident
    assert exported.stable_form(code_identity(module.Net)) != exported.stable_form(ident)


def test_code_without_a_source_file_is_identified_by_the_object_and_never_across_processes(notebook):
    main = notebook(net_source(HEALTHY_BODY))
    first = code_identity(main.Net)
    assert not first.has_source and first.name == "__main__.Net"
    assert code_identity(main.Net) == first  # the cell not run again: the same key, programs are reused
    with pytest.raises(exported.Unkeyable, match="no source file"):
        first.stable_key()
    with pytest.raises(exported.Unkeyable):
        exported.stable_form(("fingerprint", first))
    with pytest.raises(exported.Unkeyable):
        exported.stable_form(main.Net)  # by its import path it would look the same in every process

    # Run again unchanged, then edited, in either kind of cell: a new object each time, a new identity.
    seen = [first]
    for source, cell_file in ((net_source(HEALTHY_BODY), False), (net_source(SOFTMAX_BODY), False),
                              (net_source(SOFTMAX_BODY), True)):
        ident = code_identity(notebook(source, cell_file=cell_file).Net)
        assert not ident.has_source and all(ident != other for other in seen)
        seen.append(ident)
    assert code_identity(main.Net(rngs=nnx.Rngs(0), input_shape=(3,), num_outputs=2)) == seen[-1]  # an instance

    # A function refers to a helper and a constant of the notebook: redefining either one is a new identity.
    notebook("SCALE = 1.0\ndef act(x):\n    return x\ndef loss(o, t):\n    return SCALE * act(o).sum() + t")
    loss = main.loss
    ident = code_identity(loss)
    assert code_identity(loss) == ident and not ident.has_source
    notebook("def act(x):\n    return 2 * x")
    assert code_identity(loss) != ident
    ident = code_identity(loss)
    notebook("SCALE = 3.0")
    assert code_identity(loss) != ident
    # Partials and lambdas of the notebook, and a class of a file with a notebook method set on it.
    assert not code_identity(functools.partial(loss, t=1)).has_source
    assert not code_identity(eval("lambda x: x", main.__dict__)).has_source
    notebook("from harness.models.mlp import MLP\nclass Patched(MLP):\n    pass")
    assert not code_identity(main.Patched).has_source


def test_main_run_from_a_file_is_a_file_like_any_other(tmp_path, monkeypatch):
    """``python script.py``: its ``__main__`` has a file, and its classes are identified by the file's content."""
    script = tmp_path / "script.py"
    script.write_text(net_source(HEALTHY_BODY))
    main = types.ModuleType("__main__")
    main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", main)
    exec(compile(script.read_text(), str(script), "exec"), main.__dict__)
    ident = code_identity(main.Net)
    assert ident.has_source and (os.path.realpath(script), file_digest(str(script))) in ident.sources
    assert ident.stable_key()[0] == "__main__.Net"
    # Text exec'd in that script is still code without a file.
    exec(compile(net_source(SOFTMAX_BODY), "<string>", "exec"), main.__dict__)
    assert not code_identity(main.Net).has_source


def notebook_run(program_cache, target: str):
    """The model stage of ``harness`` on a tiny data set, with ``target`` as the model, the way a notebook calls
    the pipeline: the report's status and its errors."""
    rc = compose(["logger=none", *replace_group("data", "helpers.tiny_classification"),
                  *replace_group("model", target), "diagnostics.run=[model]"])
    result = pipeline.run(rc)
    return result, sorted(f.id for f in result.findings if f.severity.value == "error")


def test_a_notebook_edit_and_rerun_is_diagnosed_from_the_new_code(program_cache, notebook):
    """The issue: a model defined in a notebook, diagnosed, then edited to return probabilities and run again,
    was reported healthy from the first definition's programs."""
    notebook(net_source(HEALTHY_BODY))
    compiles = programs.STATS.compiles
    result, errors = notebook_run(program_cache, "__main__.Net")
    assert result.status == "healthy" and errors == []
    traced = programs.STATS.compiles - compiles
    assert traced > 0

    result, _ = notebook_run(program_cache, "__main__.Net")  # the cell not run again: everything reused
    assert programs.STATS.compiles == compiles + traced

    notebook(net_source(SOFTMAX_BODY))  # the user edits the cell and runs it
    result, errors = notebook_run(program_cache, "__main__.Net")
    assert "model.output_range" in errors, "the edited model must be diagnosed, not the cached one"
    assert programs.STATS.compiles == compiles + 2 * traced  # traced again, every program

    notebook(net_source(HEALTHY_BODY))  # and fixed again
    result, errors = notebook_run(program_cache, "__main__.Net")
    assert errors == []
    assert os.listdir(program_cache) == []  # nothing of a notebook's code is stored for another process


# A later process: ``python -c`` (its ``__main__`` has no file) or a model in a file of the user's.
PROCESS = '''
import json, os, sys
from helpers import compose, replace_group
from harness import pipeline
from harness.engine import compile as programs, exported

cache, target = sys.argv[1], sys.argv[2]
exported.enable(cache)
{definition}
rc = compose(["logger=none", *replace_group("data", "helpers.tiny_classification"),
              *replace_group("model", target), "diagnostics.run=[model]"])
result = pipeline.run(rc)
print(json.dumps({{"compiles": programs.STATS.compiles, "reused": programs.STATS.traces_reused,
                  "stored": len([n for n in os.listdir(cache) if not n.endswith(".seconds")]),
                  "errors": sorted(f.id for f in result.findings if f.severity.value == "error")}}))
'''


def later_process(cache, target: str, definition: str = "", pythonpath: str = "") -> dict:
    env = cli_env(PYTHONDONTWRITEBYTECODE="1")  # Python's bytecode cache would miss a same-size, same-mtime edit
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env["PYTHONPATH"]) if p)
    proc = subprocess.run([sys.executable, "-c", PROCESS.format(definition=definition), str(cache), target],
                          cwd=TESTS_DIR, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_later_processes_never_reuse_programs_of_code_without_a_source_file(tmp_path):
    """A model defined in ``python -c`` (``__main__``, no file), run twice: the second process traces again."""
    definition = net_source(HEALTHY_BODY)
    first, second = (later_process(tmp_path / "programs", "__main__.Net", definition) for _ in range(2))
    for run in (first, second):
        assert run["reused"] == 0 and run["stored"] == 0 and run["errors"] == []
    assert second["compiles"] == first["compiles"] > 0


def test_later_processes_reuse_programs_of_files_while_their_content_is_unchanged(tmp_path):
    """A model in a file of the user's: stored by the first process, reused by the second; after an edit of the
    same length with the mtime set back, traced again (and diagnosed from the new code)."""
    cache = tmp_path / "programs"
    package = tmp_path / "user"
    package.mkdir()
    path = package / "user_net.py"
    path.write_text(net_source(HEALTHY_BODY))
    stored, reused = (later_process(cache, "user_net.Net", pythonpath=str(package)) for _ in range(2))
    assert stored["errors"] == reused["errors"] == [] and stored["reused"] == 0 and stored["stored"] > 0
    assert reused["reused"] == reused["compiles"] == stored["compiles"]  # nothing traced

    before = path.stat()
    path.write_text(net_source(SOFTMAX_BODY))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    edited = later_process(cache, "user_net.Net", pythonpath=str(package))
    assert edited["reused"] == 0 and edited["errors"] == ["model.output_range"]


class _Sentinel:
    """Compared by identity, like Equinox's MISSING was: pickle makes a new object, so the structure changes."""


_SENTINEL = _Sentinel()


@jax.tree_util.register_pytree_node_class
class _Node:
    def __init__(self, value, aux=_SENTINEL):
        self.value, self.aux = value, aux

    def tree_flatten(self):
        return (self.value,), self.aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], aux)


def test_an_output_structure_that_does_not_survive_pickling_is_not_stored():
    from harness.engine import exported

    plain = jax.tree.structure({"a": 1, "b": (2, 3)})
    broken = jax.tree.structure(_Node(1))
    assert exported._round_trips(plain)
    assert not exported._round_trips(broken)


def test_a_program_two_threads_want_compiles_once():
    """A collapsed sweep's points run in threads (harness.sweeps.collapse): the program they all want compiles once."""
    import threading

    def program(x):
        return x * 2 + 1

    before = programs.STATS.compiles
    x = np.arange(7, dtype=np.float32)
    outs = [None, None]

    def ask(i):
        outs[i] = programs.run("test/twice", program, x, static_key=("test_program_cache", "twice"))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert programs.STATS.compiles - before == 1
    np.testing.assert_array_equal(outs[0], outs[1])


def test_compile_wall_time_counts_overlapping_compiles_once():
    stats = programs.ProgramStats(compile_intervals=[(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)])
    assert stats.compile_wall_seconds == pytest.approx(4.0)  # [0, 3] and [5, 6]
    assert programs.ProgramStats().compile_wall_seconds == 0.0


def test_entries_of_a_cache_without_a_size_limit_get_their_last_use_file(tmp_path):
    """A cache directory written without a size limit (an older harness) has entries without JAX's ``-atime``
    files; with the limit on, JAX reads every entry's before each write and fails them all. Indexed first, writes
    succeed, and the least recently used entry is still the one evicted."""
    from jax._src.lru_cache import LRUCache

    from harness.engine.compile import index_unindexed_entries

    (tmp_path / "old-cache").write_bytes(b"x" * 10)
    cache = LRUCache(str(tmp_path), max_size=25)
    with pytest.raises(FileNotFoundError):
        cache.put("new", b"y" * 10)
    assert index_unindexed_entries(str(tmp_path)) == 1 and index_unindexed_entries(str(tmp_path)) == 0
    cache.put("new", b"y" * 10)
    assert cache.get("new") == b"y" * 10
    cache.put("newer", b"z" * 10)  # over 25 bytes: the oldest entry goes
    assert cache.get("old") is None and cache.get("new") == b"y" * 10
