"""From the composed Hydra config to typed, frozen objects, rejecting bad values before any work.

Nothing below the entry point sees a ``DictConfig``: the numerics get dataclasses. Every error names the config
key (``optim.lr: must be a positive number, got -1``), so a typo costs one line to fix, not a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import types
import typing
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from harness.checks.base import EngineSettings
from harness.checks.registry import DIAGNOSTICS, diagnostic_module, stage
from harness.errors import HarnessError
from harness.models.adapters import FAMILIES, PRECISIONS
from harness.optim import OptimSpec

FRAMEWORKS = ("auto", *FAMILIES)  # model.framework (harness.models.adapters)
# How report.json's resolved config names an object given to harness.diagnose: "<in-memory: module.Name>".
IN_MEMORY = "<in-memory"


@dataclasses.dataclass(frozen=True)
class FactoryConfig:
    """A ``_target_`` callable and its keyword arguments (data, model, loss).

    ``obj``: an in-memory callable (given to :func:`harness.diagnose`) used instead of importing ``target``, which
    then only names it (``module.qualname``). ``identity``: what identifies that object's code and captured data in
    the program caches' keys (:func:`harness.api.in_memory_identity`); None: the code identity of the callable.
    """

    target: str
    kwargs: dict[str, Any]
    partial: bool = False
    obj: Callable | None = dataclasses.field(default=None, repr=False)
    identity: Any = dataclasses.field(default=None, repr=False)

    def resolve(self, key: str) -> Callable:
        if self.obj is not None:
            return self.obj
        return import_target(self.target, key)

    def code_key(self, key: str):
        """The identity of the code behind this factory, for the program caches' keys
        (:mod:`harness.engine.code_identity`)."""
        if self.obj is not None and self.identity is not None:
            return self.identity
        from harness.engine.code_identity import code_identity

        return code_identity(self.resolve(key))


@dataclasses.dataclass(frozen=True)
class LoggerConfig:
    kind: str = "none"
    mode: str | None = None
    project: str = "harness"
    entity: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    dir: str | None = None
    log_members: bool = False  # one W&B run per sweep member costs ~0.05 s each; see conf/logger/wandb.yaml


SCHEDULES = ("constant", "cosine", "warmup_cosine", "warmup_constant")  # train.schedule's built-in kinds


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """``train.*``: the user's own training run. Its length (``steps`` or ``epochs``) sets the horizon the LR
    range test suggests a learning rate for; ``harness train`` runs it (:mod:`harness.train`)."""

    steps: int | None = None
    epochs: float | None = None
    # The learning rate over the run, peaking at optim.lr: one of SCHEDULES, or an optax schedule factory
    # ({_target_: ..., kwargs}) returning ``step -> learning rate``.
    schedule: "str | FactoryConfig" = "constant"
    warmup_steps: int = 0
    log_every: int = 100  # steps per compiled chunk: the monitor reads, the progress bar and W&B log this often
    eval_every: int | None = None  # steps between validation losses; None: about 20 per run
    checkpoint_every: int | None = None  # steps between checkpoints; None: at every validation
    keep_checkpoints: int = 2
    checks: tuple[str, ...] = ("data",)  # diagnostics run before training, in the same report (fast ones: data)
    resume: bool = True  # continue from the output directory's last checkpoint; False: start afresh, set it aside
    # harness train: record per step each layer's dead / saturated units, the largest attention logit and the
    # output logits' scale (harness.monitor.activations), for the train.dead_units, train.attention_logits and
    # train.output_logits detectors; off by default (it costs time per step).
    activations: bool = False


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: FactoryConfig
    model: FactoryConfig
    loss: FactoryConfig
    optim: OptimSpec
    diagnostics: tuple[str, ...]
    settings: dict[str, Any]  # diagnostic name -> its frozen Settings
    engine: EngineSettings
    compilation_cache: str | None
    program_cache: bool  # also keep traced programs (harness.engine.exported); needs compilation_cache
    logger: LoggerConfig
    seed: int
    batch_size: int
    fail_on_error: bool
    debug: bool
    collapse: bool
    choices: dict[str, str]  # which config of each group was picked (data=digits, model=mlp, ...)
    raw: dict[str, Any]  # the full resolved config, for report.json and W&B
    framework: str = "auto"  # model.framework: the model's library, or detected from what the factory returns
    train: "TrainSettings" = dataclasses.field(default_factory=lambda: TrainSettings())
    budget: float | None = None  # seconds for the whole run (harness.budget); None: the configured suite
    precision: str = "float32"  # the model's compute dtype (PRECISIONS; harness.models.adapters.base.with_precision)


def import_target(path: str, key: str) -> Callable:
    """Import ``package.module.attr`` (attributes may nest), with an error naming the config key."""
    if isinstance(path, str) and path.startswith(IN_MEMORY):
        raise HarnessError(
            f"{path} was an object given to harness.diagnose in another process; it cannot be imported. Run the "
            f"notebook or script that defined it again, or set _target_ to an importable factory", key=key)
    if not isinstance(path, str) or "." not in path:
        raise HarnessError(f"_target_ must be a dotted path like 'mypkg.models.make_model', got {path!r}", key=key)
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # this prefix is not a module; try a shorter one
            raise HarnessError(f"importing {module_name!r} failed: {err}", key=key) from None
        except Exception as err:
            raise HarnessError(f"importing {module_name!r} failed: {type(err).__name__}: {err}", key=key) from None
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise HarnessError(f"module {module_name!r} has no attribute {'.'.join(parts[cut:])!r}", key=key) from None
        if not callable(obj):
            raise HarnessError(f"{path!r} is not callable", key=key)
        return obj
    raise HarnessError(
        f"cannot import {path!r}: no module {parts[0]!r} on the Python path (is your package installed, or run "
        f"from its directory?)",
        key=key,
    )


def _factory(node: Any, key: str) -> FactoryConfig:
    if not isinstance(node, dict) or "_target_" not in node:
        raise HarnessError("needs a _target_ (a dotted path to a callable) and its keyword arguments", key=key)
    kwargs = {k: v for k, v in node.items() if k not in ("_target_", "_partial_", "_convert_", "_recursive_")}
    return FactoryConfig(target=node["_target_"], kwargs=kwargs, partial=bool(node.get("_partial_", False)))


def _number(value: Any, key: str, *, positive: bool = False, nonnegative: bool = False, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if integer else "a number"
        raise HarnessError(f"must be {kind}, got {value!r}", key=key)
    if integer and not float(value).is_integer():
        raise HarnessError(f"must be an integer, got {value!r}", key=key)
    if value != value or value in (float("inf"), float("-inf")):
        raise HarnessError(f"must be finite, got {value!r}", key=key)
    if positive and value <= 0:
        raise HarnessError(f"must be positive, got {value!r}", key=key)
    if nonnegative and value < 0:
        raise HarnessError(f"must be zero or more, got {value!r}", key=key)
    return int(value) if integer else float(value)


def _optim(node: dict, key: str = "optim") -> OptimSpec:
    fc = _factory(node, key)
    kwargs = dict(fc.kwargs)
    if "lr" not in kwargs:
        raise HarnessError("missing; set the learning rate, e.g. optim.lr=1e-3", key=f"{key}.lr")
    lr = _number(kwargs.pop("lr"), f"{key}.lr", positive=True)
    wd = _number(kwargs.pop("weight_decay", 0.0), f"{key}.weight_decay", nonnegative=True)
    clip = kwargs.pop("clip_norm", None)
    if clip is not None:
        clip = _number(clip, f"{key}.clip_norm", positive=True)
    factory = import_target(fc.target, f"{key}._target_")
    try:
        params = __import__("inspect").signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise HarnessError(
                f"{fc.target} takes no argument {unknown[0]!r}; it takes {', '.join(p for p in params if p != 'learning_rate')}",
                key=f"{key}.{unknown[0]}",
            )
    name = fc.target.rsplit(".", 1)[-1]
    spec = OptimSpec(factory=factory, kwargs=tuple(sorted(kwargs.items())), lr=lr, weight_decay=wd, clip_norm=clip,
                     name=name)
    _check_optimizer_runs(spec, fc.target, key)
    return spec


def _check_optimizer_runs(spec: OptimSpec, target: str, key: str):
    """One abstract update on a two-number parameter (``jax.eval_shape``: no compile, no FLOPs), so a bad optimizer
    argument (``optim.b1=abc``, ``optim.eps=null``) is a clear error now instead of a crash inside every training
    diagnostic."""
    import jax
    import jax.numpy as jnp

    from harness.optim import make_optimizer

    def one_update():
        params = {"w": jnp.zeros(2)}
        tx = make_optimizer(spec, spec.lr, spec.weight_decay)
        return tx.update(params, tx.init(params), params)

    try:
        jax.eval_shape(one_update)
    except Exception as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        args = ", ".join(f"{k}={v!r}" for k, v in spec.kwargs)
        raise HarnessError(f"{target}({args}) does not work as an optimizer: {detail}", key=key) from None


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check one settings value against its dataclass annotation (int, float, bool, str, lists, optionals)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, key)
            except HarnessError as err:
                errors.append(err)
        raise errors[0]
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise HarnessError(f"must be a list, got {value!r}", key=key)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise HarnessError(f"must be true or false, got {value!r}", key=key)
        return value
    if annotation is int:
        return _number(value, key, integer=True)
    if annotation is float:
        return _number(value, key)
    if annotation is str:
        if not isinstance(value, str):
            raise HarnessError(f"must be a string, got {value!r}", key=key)
        return value
    return value


def settings_from(cls: type, node: dict | None, key: str):
    """Build a diagnostic's frozen Settings from its config node; unknown keys and bad types name the key.
    Settings classes may define ``validate(self, key)`` for range checks."""
    node = dict(node or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(node) - fields)
    if unknown:
        raise HarnessError(f"unknown setting; valid settings are {', '.join(sorted(fields))}", key=f"{key}.{unknown[0]}")
    values = {name: _coerce(value, hints[name], f"{key}.{name}") for name, value in node.items()}
    settings = cls(**values)
    if hasattr(settings, "validate"):
        settings.validate(key)
    return settings


def to_container(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # MissingMandatoryValue, interpolation errors
        key = getattr(err, "full_key", None)
        msg = str(err).splitlines()[0]
        if "Missing mandatory value" in msg:
            raise HarnessError("is required; set it on the command line", key=key) from None
        raise HarnessError(msg, key=key) from None


def _train_settings(node: Any) -> TrainSettings:
    """``train.*``: the length of the user's own training run (``steps`` or ``epochs``, at most one) and how
    ``harness train`` runs it."""
    node = dict(node or {})
    schedule = node.pop("schedule", "constant")
    if isinstance(schedule, dict):
        schedule = _factory(schedule, "train.schedule")
    elif schedule not in SCHEDULES:
        raise HarnessError(f"must be one of {', '.join(SCHEDULES)} or an optax schedule factory "
                           f"({{_target_: optax.linear_schedule, ...}}), got {schedule!r}", key="train.schedule")
    settings = settings_from(TrainSettings, node, "train")
    steps, epochs = settings.steps, settings.epochs
    for key in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        value = getattr(settings, key)
        if value is not None and value <= 0:
            raise HarnessError(f"must be positive, got {value}", key=f"train.{key}")
    if epochs is not None and epochs <= 0:
        raise HarnessError(f"must be positive, got {epochs}", key="train.epochs")
    for name in settings.checks:
        if name not in DIAGNOSTICS:
            raise HarnessError(f"unknown diagnostic {name!r}; valid: {', '.join(DIAGNOSTICS)}", key="train.checks")
    if settings.warmup_steps < 0:
        raise HarnessError(f"must be zero or more, got {settings.warmup_steps}", key="train.warmup_steps")
    if steps is not None and epochs is not None:
        raise HarnessError(f"give train.steps or train.epochs, not both (got steps={steps}, epochs={epochs})",
                           key="train.epochs")
    return dataclasses.replace(settings, schedule=schedule)


def from_hydra(cfg: DictConfig, choices: dict[str, str] | None = None) -> RunConfig:
    """Validate the composed config and convert it to a :class:`RunConfig`."""
    raw = to_container(cfg)
    for group in ("data", "model", "loss", "optim", "diagnostics"):
        if group not in raw or raw[group] is None:
            raise HarnessError(f"config group '{group}' is missing; pick one, e.g. {group}=...", key=group)
    diagnostics = raw["diagnostics"]
    run = diagnostics.get("run", [])
    if isinstance(run, str):
        run = [run]
    if not run:
        raise HarnessError(f"is empty; pick at least one of {', '.join(DIAGNOSTICS)}", key="diagnostics.run")
    for name in run:
        if name not in DIAGNOSTICS:
            raise HarnessError(f"unknown diagnostic {name!r}; valid: {', '.join(DIAGNOSTICS)}", key="diagnostics.run")
    train = _train_settings(raw.get("train"))  # before the settings that interpolate its length
    settings = {}
    for name in DIAGNOSTICS:
        module = diagnostic_module(name)
        settings[name] = settings_from(module.Settings, diagnostics.get(name), f"diagnostics.{name}")
    engine_node = dict(raw.get("engine") or {})
    cache = engine_node.pop("compilation_cache", None)
    program_cache = _coerce(engine_node.pop("program_cache", True), bool, "engine.program_cache")
    for process_key in ("distributed", "gpu_memory", "cpu_devices"):  # applied at process start-up: harness.sweeps.distributed
        engine_node.pop(process_key, None)
    engine = settings_from(EngineSettings, engine_node, "engine")
    logger_node = dict(raw.get("logger") or {"kind": "none"})
    logger = settings_from(LoggerConfig, logger_node, "logger")
    if logger.kind not in ("wandb", "none"):
        raise HarnessError(f"unknown logger {logger.kind!r}; use logger=wandb or logger=none", key="logger.kind")
    if logger.mode not in (None, "online", "offline", "disabled"):
        raise HarnessError(f"must be online, offline or disabled, got {logger.mode!r}", key="logger.mode")
    precision = raw.get("precision", "float32")
    if precision not in PRECISIONS:
        raise HarnessError(f"must be one of {', '.join(PRECISIONS)}, got {precision!r}", key="precision")
    if precision != "float32" and "precision" not in run and any(
            stage(name) in ("training", "hyperparameters") for name in run):
        run = [*run, "precision"]  # the training diagnostics compute in bfloat16: say what that alone costs
    model_node = dict(raw["model"]) if isinstance(raw["model"], dict) else raw["model"]
    framework = model_node.pop("framework", "auto") if isinstance(model_node, dict) else "auto"
    if framework not in FRAMEWORKS:
        raise HarnessError(f"must be one of {', '.join(FRAMEWORKS)}, got {framework!r}", key="model.framework")
    return RunConfig(
        data=_factory(raw["data"], "data"),
        model=_factory(model_node, "model"),
        loss=_factory(raw["loss"], "loss"),
        optim=_optim(raw["optim"]),
        diagnostics=tuple(n for n in DIAGNOSTICS if n in run),  # always in the checklist's order
        settings=settings,
        engine=engine,
        compilation_cache=cache,
        program_cache=program_cache,
        logger=logger,
        seed=_number(raw.get("seed", 0), "seed", integer=True, nonnegative=True),
        batch_size=_number(raw.get("batch_size", 128), "batch_size", integer=True, positive=True),
        fail_on_error=_coerce(raw.get("fail_on_error", False), bool, "fail_on_error"),
        debug=_coerce(raw.get("debug", False), bool, "debug"),
        collapse=_coerce(raw.get("collapse", True), bool, "collapse"),
        choices=dict(choices or {}),
        raw=raw,
        framework=framework,
        train=train,
        budget=None if raw.get("budget") is None else _number(raw["budget"], "budget", positive=True),
        precision=precision,
    )


@functools.cache
def config_dir() -> str:
    """The packaged Hydra config directory (``harness/conf``)."""
    import os

    return os.path.join(os.path.dirname(__file__), "conf")
