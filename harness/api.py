"""harness from Python: ``harness.diagnose(model=..., data=..., loss=...)`` runs the checklist from a notebook or a
script and returns a :class:`Report`.

It is the command line's code path with objects instead of import paths: the packaged Hydra config is composed
with ``overrides`` exactly as ``harness <overrides>`` composes it, validated the same way
(:func:`harness.config.from_hydra`), then the groups given as objects are swapped in (a
:class:`~harness.config.FactoryConfig` holding the object), and :func:`run_checklist` runs the diagnostics and
writes report.json, report.md and the plots, as ``harness`` does (:func:`harness.cli.task` calls it too).

What each argument takes (None keeps the config's choice, so ``diagnose()`` alone is the reference job):

* ``model``: the factory a config's ``model._target_`` would name, of any supported library: a class or function
  called as the README's model contract says (``rngs=``/``key=``, ``input_shape``, ``num_outputs`` when it takes
  them). A ``functools.partial`` contributes its keyword arguments as the model's config keys, so
  ``functools.partial(MyMLP, width=64)`` lets the capacity ladder vary ``width``. A Flax Linen module or a Haiku
  transform already built is accepted as it is (it holds no arrays); a built NNX or Equinox module is not, since
  every sweep member needs its own initialization.
* ``data``: a mapping of arrays (``x_train, y_train, x_val, y_val`` and ``num_classes`` for classification), a
  factory returning one (called with no arguments, or a ``functools.partial``), or data as an iterable: anything
  a data factory may return (:mod:`harness.data.iterables`: a DataLoader, a Hugging Face dataset, ``(x, y)``
  arrays, a generator, ``{"train": ..., "val": ...}``). A one-shot iterator is recorded as it is drawn and
  replayed when the data are loaded again (the determinism checks), so it is read once.
* ``loss``: the per-example loss ``f(outputs, targets) -> (batch,)`` (a config's loss with ``_partial_: true``).

Bad input raises :class:`harness.errors.HarnessError` naming the argument or config key (``data: ...``) before any
work. In report.json an object given this way appears as ``"_target_": "<in-memory: module.Name>"``, and
``command`` is ``["harness.diagnose", *overrides]``.

Cached programs never outlive the code they were traced from: each object joins the program caches' keys by its
code (:func:`harness.engine.code_identity.code_identity`, so a class redefined in a notebook cell is traced again)
and, when it carries data the code does not show (a closure's values, a partial's arguments, a built module's
fields), by the object itself (:func:`in_memory_identity`).
"""

from __future__ import annotations

import base64
import collections.abc
import dataclasses
import functools
import inspect
import io
import json
import os
import threading
import types
from typing import Any, Callable, Iterable, Mapping, Sequence

from harness.errors import HarnessError

__all__ = ["Report", "diagnose", "in_memory_identity", "run_checklist"]

GROUPS = ("model", "data", "loss")
API_COMMAND = "harness.diagnose"  # report.json's command[0] for a run made from Python (harness.report.writer)
LOGGERS = ("none", "wandb")
_PLAIN = (int, float, str, bool, type(None))
_PLACEHOLDER = "harness.api.in_memory"  # the composed config's _target_ until the object is swapped in


# ----------------------------------------------------------------------------------------------------------------
# The report object


@dataclasses.dataclass(eq=False)
class Report:
    """A finished run: what :func:`harness.diagnose` returns (and :meth:`Report.load` reads back from disk).

    ``status``: ``healthy`` | ``unhealthy`` (an error finding) | ``internal_error`` (a diagnostic crashed: a bug in
    harness, see ``internal_errors``). ``findings``: most severe first, in the checklist's order within a severity.
    ``metrics``: flat ``<diagnostic>/<quantity>`` values. ``plots``: plot key -> PNG path. ``record``: report.json's
    content. ``result``: the pipeline's :class:`~harness.pipeline.RunResult` (outcomes with curves and members;
    None for a report read from disk).

    Shows itself as the terminal view (``print(report)``, ``rich.print(report)``, :meth:`show`) and, in Jupyter, as
    report.md with the plots inline.
    """

    status: str
    findings: list
    metrics: dict[str, Any]
    plots: dict[str, str]
    output_dir: str | None
    record: dict[str, Any] = dataclasses.field(repr=False)
    result: Any = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_record(cls, record: dict[str, Any], output_dir: str | None = None, result=None) -> "Report":
        output_dir = output_dir or record.get("output_dir")
        plots = {key: (os.path.join(output_dir, p["path"]) if output_dir else p["path"])
                 for key, p in (record.get("plots") or {}).items()}
        return cls(status=record["status"], findings=[_finding(f) for f in record.get("findings") or []],
                   metrics=dict(record.get("metrics") or {}), plots=plots, output_dir=output_dir, record=record,
                   result=result)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Report":
        """A finished run's report: its directory or its report.json."""
        path = os.fspath(path)
        file = os.path.join(path, "report.json") if os.path.isdir(path) else path
        try:
            with open(file, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError) as err:
            raise HarnessError(f"cannot read {file}: {err}") from None
        if not isinstance(record, dict) or "status" not in record:
            raise HarnessError(f"{file}: not a harness report")
        return cls.from_record(record, os.path.dirname(os.path.abspath(file)))

    # What to look at first.

    @property
    def has_error(self) -> bool:
        """An error finding (the CLI's ``fail_on_error=true`` exits 1 on it)."""
        return any(_severity(f) == "error" for f in self.findings)

    @property
    def headline(self):
        """The first thing to fix: the earliest error in the checklist's order, else the earliest warning (a
        :class:`~harness.findings.Finding`), or None."""
        first = self.record.get("first_to_fix")
        if not first:
            return None
        return next((f for f in self.findings if f.id == first["id"] and f.message == first["message"]),
                    _finding(first))

    @property
    def errors(self) -> list:
        return [f for f in self.findings if _severity(f) == "error"]

    @property
    def warnings(self) -> list:
        return [f for f in self.findings if _severity(f) == "warning"]

    @property
    def internal_errors(self) -> list[dict[str, Any]]:
        """Diagnostics that crashed: diagnostic, exception type and message, traceback."""
        return list(self.record.get("internal_errors") or [])

    @property
    def diagnostics(self) -> dict[str, dict[str, Any]]:
        """Per diagnostic: status, time, findings, metrics, curves (``series``), sweep ``members``."""
        return self.record.get("diagnostics") or {}

    def finding(self, finding_id: str):
        """The (most severe) finding with this id, or None: ``report.finding("model.output_range")``."""
        return next((f for f in self.findings if f.id == finding_id), None)

    def __contains__(self, finding_id: str) -> bool:
        return self.finding(finding_id) is not None

    @property
    def files(self) -> dict[str, str]:
        """The report files written: ``json``, ``markdown`` (empty for a run that wrote none)."""
        if not self.output_dir:
            return {}
        found = {kind: os.path.join(self.output_dir, name)
                 for kind, name in (("json", "report.json"), ("markdown", "report.md"))}
        return {kind: path for kind, path in found.items() if os.path.isfile(path)}

    def to_dict(self) -> dict[str, Any]:
        """report.json's content."""
        return self.record

    # Rendering.

    def to_markdown(self, *, embed_images: bool = False) -> str:
        """report.md's text; ``embed_images``: the plots as data URIs, readable wherever the text goes."""
        from harness.report.writer import render_markdown

        image_src = self._data_uri if embed_images else None
        return render_markdown(self.record, image_src=image_src)

    def _data_uri(self, path: str) -> str:
        full = os.path.join(self.output_dir, path) if self.output_dir else path
        try:
            with open(full, "rb") as f:
                return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")
        except OSError:
            return full

    def _repr_markdown_(self) -> str:  # Jupyter
        return self.to_markdown(embed_images=True)

    def __rich_console__(self, console, options):  # rich.print(report), a rich console, Jupyter with rich
        from harness.report import terminal

        yield from terminal.renderables(self.record, self.output_dir)

    def show(self, console=None) -> None:
        """Print the terminal view (in colour on a terminal) on ``console`` or stdout."""
        from harness.report import terminal

        (console or terminal.make_console()).print(self)

    def __str__(self) -> str:
        """The terminal view as plain text (what ``print(report)`` shows)."""
        import shutil

        from harness.report import terminal

        buffer = io.StringIO()
        width = max(100, shutil.get_terminal_size((120, 24)).columns)
        console = terminal.make_console(file=buffer, width=width, color_system=None, force_terminal=False,
                                        force_jupyter=False)
        terminal.print_report(console, self.record, self.output_dir)
        return buffer.getvalue().rstrip("\n")

    def __repr__(self) -> str:
        from harness.report import format as fmt

        first = self.headline
        parts = [f"status={self.status!r}", fmt.counts_text(fmt.counts(self.record.get("findings") or []))]
        if first is not None:
            parts.append(f"root cause: {first.id}")
        if self.output_dir:
            parts.append(f"output_dir={self.output_dir!r}")
        return f"Report({', '.join(parts)})"


def _severity(f) -> str:
    return getattr(f.severity, "value", f.severity)


def _finding(d: dict[str, Any]):
    """A report.json finding as a :class:`~harness.findings.Finding` (one with an id this version does not know,
    from another version's report, is kept as it is)."""
    from harness.findings import Finding, Severity

    try:
        return Finding.from_dict(d)
    except ValueError:
        f = object.__new__(Finding)
        for name, value in (("id", d.get("id")), ("severity", Severity(d.get("severity", "info"))),
                            ("message", d.get("message", "")), ("evidence", d.get("evidence") or {}),
                            ("suggestion", d.get("suggestion", ""))):
            object.__setattr__(f, name, value)
        return f


# ----------------------------------------------------------------------------------------------------------------
# One code path for the command line and Python


def run_checklist(rc, output_dir: str, *, command: list[str], console=None, run_name: str | None = None,
                  group: str | None = None, show: bool = True) -> Report:
    """Run the checklist on a validated :class:`~harness.config.RunConfig` and write its report into
    ``output_dir`` (report.json, report.md, plots, then W&B when the logger says so); a crashed diagnostic's
    traceback goes to ``harness.log`` there, with a line on stderr. ``show``: print the terminal view.

    ``harness`` (:func:`harness.cli.task`) and :func:`diagnose` both end here.
    """
    from harness.app import run_and_write
    from harness.cli import report_internal_errors
    from harness.engine.devices import is_primary

    result, record = run_and_write(rc, output_dir, command=command, console=console, run_name=run_name,
                                   group=group, show_report=show)
    if result.internal_errors:
        report_internal_errors(result, output_dir, write_log=is_primary())
    if record is None:  # not process 0 of a multi-process run: nothing was written here
        from harness.report import environment, writer

        record = writer.build_report(result, config=rc.raw, command=command, environment=environment.environment(),
                                     choices=rc.choices, output_dir=os.path.abspath(output_dir))
        return Report.from_record(record, None, result)
    return Report.from_record(record, os.path.abspath(output_dir), result)


# ----------------------------------------------------------------------------------------------------------------
# diagnose


def diagnose(model: Any = None, data: Any = None, loss: Any = None, *, overrides: Sequence[str] = (),
             output_dir: str | os.PathLike | None = None, logger: str | None = "none", show: bool = False,
             console=None) -> Report:
    """Run the debugging checklist on ``model``, ``data`` and ``loss`` and return the :class:`Report`.

    ``model``/``data``/``loss``: objects (see :mod:`harness.api`); None keeps the config's choice (the reference
    job's MLP, digits, and the loss the data imply). ``overrides``: Hydra overrides, as on the command line
    (``["optim.lr=3e-3", "diagnostics.run=[data,model]", "model=cnn"]``); for a group given as an object,
    ``"<group>.<key>=<value>"`` adds or sets a keyword argument of its factory. ``output_dir``: where the report
    goes (default: ``outputs/<date>/<time>`` under the current directory, as the CLI; a directory that exists
    gets a ``-2``, ``-3``... suffix so runs never overwrite each other). ``logger``: ``"none"`` (the default here:
    no W&B runs from interactive use) or ``"wandb"`` (offline unless ``logger.mode=online``); None keeps the
    config's (W&B offline). ``show``: also print the terminal view when done (``print(report)`` does it later).
    ``console``: a rich Console for the progress display (and the view with ``show``).

    Raises :class:`harness.errors.HarnessError` for bad input, naming the argument or the config key.
    """
    overrides = _overrides(overrides)
    given = {group: _in_memory(group, obj) for group, obj in (("model", model), ("data", data), ("loss", loss))
             if obj is not None}
    if logger is not None and logger not in LOGGERS:
        raise HarnessError(f"must be one of {', '.join(LOGGERS)} or None (the config's), got {logger!r}",
                           key="logger")
    composed = _hydra_overrides(overrides, given, logger)
    cfg, choices, run_dir = compose(composed)

    from harness.config import from_hydra
    from harness.sweeps.distributed import setup_process

    engine = cfg.get("engine")
    setup_process(dict(engine) if engine is not None else None)  # before JAX starts a backend, as the CLI does
    rc = substitute(from_hydra(cfg, choices), given)
    if output_dir is not None:
        directory = os.fspath(output_dir)
    elif cfg.get("output_dir"):
        directory = str(cfg.get("output_dir"))
    else:
        directory = _fresh_dir(run_dir)
    return run_checklist(rc, directory, command=[API_COMMAND, *overrides], console=console, show=show)


def _overrides(overrides) -> list[str]:
    if isinstance(overrides, str):
        raise HarnessError(f"must be a list of strings, e.g. [{overrides!r}], got a string", key="overrides")
    try:
        items = list(overrides or ())
    except TypeError:
        raise HarnessError(f"must be a list of strings, got {type(overrides).__name__}", key="overrides") from None
    for item in items:
        if not isinstance(item, str):
            raise HarnessError(f"must be a list of strings like 'optim.lr=1e-3', got {item!r}", key="overrides")
    return items


def _hydra_overrides(overrides: list[str], given: dict[str, "_InMemory"], logger: str | None) -> list[str]:
    """The overrides to compose: the logger, each group given as an object replaced by a placeholder node, then
    the user's (``<group>.<key>=v`` for such a group becomes ``++<group>.<key>=v``: it sets a factory argument)."""
    out = []
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if logger is not None and not any(k == "logger" or k.startswith("logger.") for k in keys):
        out.append(f"logger={logger}")  # logger.mode=online alone keeps the config's logger (W&B)
    for group in given:
        if group in keys:
            o = overrides[keys.index(group)]
            raise HarnessError(f"{o!r} picks a {group} config, but {group}= was given as an object too; drop one",
                               key="overrides")
        out += [f"~{group}", f"+{group}={{_target_:{_PLACEHOLDER}}}"]
    for o, key in zip(overrides, keys):
        group = key.split(".", 1)[0]
        if group in given and "." in key and not o.startswith(("+", "~")):
            o = "++" + o
        out.append(o)
    return out


def compose(overrides: Sequence[str]):
    """The packaged config composed with ``overrides`` as ``harness <overrides>`` composes it: (the config without
    its ``hydra`` node, the group choices, Hydra's run directory). A Hydra already initialized in this process (a
    Hydra app calling diagnose) is set aside and restored."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from harness.cli import _short_hydra_message
    from harness.config import config_dir

    previous = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="harness"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
                   if not k.startswith("hydra") and v is not None}
        run_dir = str(cfg.hydra.run.dir)
    except HarnessError:
        raise
    except Exception as err:  # a bad override, an unknown group option, a parse error
        raise HarnessError(_short_hydra_message(err), key="overrides") from None
    finally:
        if previous is not None:
            GlobalHydra.instance().initialize(previous)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices, run_dir


def _fresh_dir(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``... when it exists (two runs within a second); claimed by creating it."""
    candidate, n = path, 1
    while True:
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{path}-{n}"


# ----------------------------------------------------------------------------------------------------------------
# Objects in place of _target_s


@dataclasses.dataclass(frozen=True)
class _InMemory:
    group: str
    obj: Callable  # what harness calls in place of an imported _target_
    name: str  # FactoryConfig.target: module.qualname, or the type's name for data given as values
    kwargs: dict[str, Any]  # plain keyword arguments taken out of a functools.partial (config keys)
    identity: Any  # what keys its programs (in_memory_identity of the object given)
    label: str  # the group's choice in the report ("model=MyMLP")


def substitute(rc, given: dict[str, _InMemory]):
    """``rc`` with each group in ``given`` using its object: FactoryConfigs holding it, and the resolved config
    (report.json, W&B) naming it ``<in-memory: module.Name>`` with its keyword arguments."""
    from harness.config import IN_MEMORY, FactoryConfig

    raw = dict(rc.raw)
    choices = dict(rc.choices)
    replaced = {}
    for group, spec in given.items():
        fc = getattr(rc, group)
        kwargs = {**spec.kwargs, **fc.kwargs}  # an override (model.width=64) wins over the partial's keyword
        if group == "model":  # the sizes the capacity ladder varies, from the factory's own defaults
            capacity = rc.settings.get("capacity")
            keys = [getattr(capacity, "width_key", "width"), getattr(capacity, "depth_key", "depth")]
            kwargs = {**_size_defaults(spec.obj, [k for k in keys if k not in kwargs]), **kwargs}
        partial = group == "loss" or fc.partial
        replaced[group] = FactoryConfig(target=spec.name, kwargs=kwargs, partial=partial, obj=spec.obj,
                                        identity=spec.identity)
        node = {k: v for k, v in (raw.get(group) or {}).items() if k not in ("_target_", "_partial_")}
        raw[group] = {"_target_": f"{IN_MEMORY}: {spec.name}>", **({"_partial_": True} if partial else {}),
                      **node, **kwargs}
        choices[group] = spec.label
    return dataclasses.replace(rc, raw=raw, choices=choices, **replaced)


def _size_defaults(factory: Callable, keys: list[str]) -> dict[str, int]:
    """The factory's integer defaults for ``keys`` (``width``, ``depth``): what a config file would list, so that
    the capacity ladder knows the size it starts from (``MyMLP(..., width=64)`` needs no partial)."""
    try:
        # A class's own __init__: a metaclass's __call__ (Flax NNX's) hides it behind (*args, **kwargs).
        target = factory.__init__ if isinstance(factory, type) else factory
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    found = {}
    for key in keys:
        p = params.get(key)
        if (p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and isinstance(p.default, int)
                and not isinstance(p.default, bool)):
            found[key] = p.default
    return found


def _in_memory(group: str, obj: Any) -> _InMemory:
    if isinstance(obj, (str, bytes, os.PathLike)):
        text = os.fsdecode(obj) if not isinstance(obj, str) else obj
        if group == "data" and (os.sep in text or "." in text):
            hint = f"read a file with overrides=['data=file', 'data.path={text}']"
        else:
            hint = f"pick a config with overrides=['{group}={text}']"
        raise HarnessError(f"got the string {obj!r}; pass the object itself, or {hint}", key=group)
    return {"model": _model, "data": _data, "loss": _loss}[group](obj)


def _model(obj: Any) -> _InMemory:
    from harness.models.adapters import KINDS, detect_family

    family = None if isinstance(obj, type) else detect_family(obj)
    if family in ("linen", "haiku"):  # built, but holding no arrays: harness initializes it per member
        def built():
            return obj

        name = _name(type(obj))
        return _InMemory("model", built, name, {}, in_memory_identity(obj), type(obj).__name__)
    if family is not None:
        raise HarnessError(
            f"got a built {family} model ({type(obj).__module__}.{type(obj).__qualname__}); pass its factory "
            f"instead (the class, or a function taking {'key' if family == 'equinox' else 'rngs'}), so that harness "
            f"can initialize one per sweep member: e.g. model=MyModel or functools.partial(MyModel, width=64)",
            key="model")
    if not callable(obj):
        raise HarnessError(f"must be a model factory (a class or function returning {', '.join(KINDS[:-1])} or "
                           f"{KINDS[-1]}), got {_kind(obj)}", key="model")
    factory, kwargs = _split_partial(obj)
    return _InMemory("model", factory, _name(factory), kwargs, in_memory_identity(factory), _label(factory))


def _loss(obj: Any) -> _InMemory:
    if not callable(obj):
        raise HarnessError(f"must be a per-example loss function f(outputs, targets) -> (batch,), got {_kind(obj)}",
                           key="loss")
    fn, kwargs = _split_partial(obj)
    try:
        inspect.signature(fn).bind(None, None, **kwargs)
    except TypeError as err:
        raise HarnessError(f"{_name(fn)} must take (outputs, targets): {err}", key="loss") from None
    except ValueError:  # no signature to read (a builtin): trust it
        pass
    return _InMemory("loss", fn, _name(fn), kwargs, in_memory_identity(fn), _label(fn))


def _data(obj: Any) -> _InMemory:
    import numpy as np

    if isinstance(obj, Mapping):
        value = {k: _replayable(v) for k, v in obj.items()}
        label = type(obj).__name__
        return _InMemory("data", _returning(value), label, {}, None, label)
    if callable(obj) and not isinstance(obj, np.ndarray):
        factory, kwargs = _split_partial(obj)
        return _InMemory("data", factory, _name(factory), kwargs, None, _label(factory))
    if isinstance(obj, np.ndarray) or (hasattr(obj, "shape") and hasattr(obj, "dtype")):
        raise HarnessError(f"got one array of shape {tuple(obj.shape)}; pass the inputs with their targets: "
                           f"{{'x_train': ..., 'y_train': ..., 'x_val': ..., 'y_val': ...}} or (x, y)", key="data")
    if hasattr(obj, "__iter__") or hasattr(obj, "__getitem__"):
        label = type(obj).__name__
        return _InMemory("data", _returning(_replayable(obj)), label, {}, None, label)
    raise HarnessError(
        f"must be a mapping of arrays (x_train, y_train, x_val, y_val, and num_classes for classification), a "
        f"factory returning one, or an iterable of (x, y) batches or examples; got {_kind(obj)}", key="data")


def _returning(value):
    def data():
        return value

    return data


def _replayable(value):
    """A one-shot iterator (a generator, ``iter(loader)``) as an iterable that replays what was drawn from it
    before going on, so the data can be loaded again (determinism checks); anything else as it is."""
    if isinstance(value, collections.abc.Iterator):
        cls = type(type(value).__name__, (_Replay,), {})  # errors name the user's kind of iterator
        return cls(value)
    return value


class _Replay:
    def __init__(self, source: Iterable):
        self._source = iter(source)
        self._seen: list = []
        self._done = False
        self._lock = threading.Lock()

    def __iter__(self):
        i = 0
        while True:
            with self._lock:
                if i < len(self._seen):
                    item = self._seen[i]
                elif self._done:
                    return
                else:
                    try:
                        item = next(self._source)
                    except StopIteration:
                        self._done = True
                        return
                    self._seen.append(item)
            i += 1
            yield item


def _split_partial(obj: Any) -> tuple[Any, dict[str, Any]]:
    """A ``functools.partial`` with keyword arguments only, all plain values: (its function, the keywords), so
    they are config keys (the capacity ladder varies ``width``; report.json records them); anything else as is."""
    if (isinstance(obj, functools.partial) and not obj.args and obj.keywords
            and all(_plain(v) for v in obj.keywords.values())):
        inner, kwargs = _split_partial(obj.func)
        return inner, {**kwargs, **obj.keywords}
    return obj, {}


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return False


def _name(obj: Any) -> str:
    """module.qualname of a factory; a lambda or a local function gets its line too (two of them in one file share
    their qualname, and the name is part of the program caches' keys)."""
    target = obj.func if isinstance(obj, functools.partial) else obj
    if not isinstance(target, type) and not hasattr(target, "__qualname__"):
        target = type(target)
    module = getattr(target, "__module__", None) or "?"
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    name = f"{module}.{qualname}"
    code = getattr(target, "__code__", None)
    if "<" in qualname and code is not None:
        name += f":{code.co_firstlineno}"
    return name


def _label(obj: Any) -> str:
    target = obj.func if isinstance(obj, functools.partial) else obj
    return getattr(target, "__name__", None) or type(target).__name__


def _kind(obj: Any) -> str:
    text = repr(obj)
    return f"{type(obj).__name__} {text if len(text) <= 40 else text[:39] + '…'}"


def in_memory_identity(obj: Any):
    """What identifies ``obj`` (a model factory or a loss given to :func:`diagnose`) in the program caches' keys:
    its code identity (:func:`harness.engine.code_identity.code_identity`: source-file contents, or for code
    without a source file the objects and their bytecode), and the object itself when it holds data its code does
    not show (a closure's values, a partial's arguments, a bound method's or a callable object's state, a built
    Linen module's fields, a class made inside a function). The object makes the key valid in this process only:
    its programs are never stored for other processes (:mod:`harness.engine.exported` refuses keys without a
    stable form)."""
    from harness.engine.code_identity import _Same, code_identity

    identity = (code_identity(obj), _first_line(obj))
    return (*identity, _Same(obj)) if _holds_data(obj, set()) else identity


def _first_line(obj: Any) -> int | None:
    """Where the code starts in its file: a code identity names code from a file by module, qualname and the file's
    contents, and a script may define two classes or functions of one name (a cell's code pasted below, a class
    redefined with the bug fixed): the line tells them apart."""
    if isinstance(obj, functools.partial):
        return _first_line(obj.func)
    code = getattr(obj, "__code__", None)
    if isinstance(code, types.CodeType):
        return code.co_firstlineno
    if isinstance(obj, type):
        lines = [v.__code__.co_firstlineno for v in vars(obj).values() if isinstance(v, types.FunctionType)]
        return min(lines) if lines else None
    return None


def _holds_data(obj: Any, seen: set[int]) -> bool:
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, type):  # a class made by a function (its qualname has <locals>) may capture its values
        return "<locals>" in obj.__qualname__
    if isinstance(obj, (types.ModuleType, types.BuiltinFunctionType)):
        return False
    if isinstance(obj, functools.partial):
        return any(_holds_data(v, seen) for v in (obj.func, *obj.args, *obj.keywords.values()))
    if isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if _holds_data(value, seen):
                return True
        return False
    wrapped = getattr(obj, "__wrapped__", None)  # jax.jit(f), functools.wraps wrappers: the wrapped code
    if wrapped is not None and callable(obj) and not isinstance(obj, types.MethodType):
        return _holds_data(wrapped, seen)
    return True  # a bound method, a callable object, a built module, a value
