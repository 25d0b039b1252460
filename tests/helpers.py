"""Shared test helpers: compose a run config like the CLI does, run the CLI in a subprocess, tiny data factories.

Import with ``from helpers import compose, run_cli`` (pytest puts ``tests/`` on ``sys.path``). The factories are
also reachable from a subprocess run as ``data._target_=helpers.tiny_classification``: :func:`run_cli` puts
``tests/`` on the child's ``PYTHONPATH``. Keep these signatures stable: other test files use them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

import numpy as np

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
# JAX's persistent compile cache for CLI subprocesses: a second run skips XLA compiles, and nothing is written to
# the home directory.
JAX_CACHE_DIR = "/tmp/harness-tests-jax-cache"
WANDB_DATA_DIR = "/tmp/harness-tests-wandb-data"


def compose_config(overrides: Sequence[str] = ()):
    """The composed Hydra config (a DictConfig, without the ``hydra`` node) and the group choices, as the CLI
    would see them for ``harness <overrides>``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from harness.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
               if not k.startswith("hydra") and v is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def replace_group(group: str, target: str, **kwargs) -> list[str]:
    """Overrides that replace a whole config group with a ``_target_`` factory and its arguments, e.g.
    ``replace_group("data", "helpers.tiny_classification", classes=4)`` ->
    ``["~data", "+data={_target_:helpers.tiny_classification,classes:4}"]`` (works on the command line too)."""
    items = ",".join([f"_target_:{target}", *(f"{k}:{v}" for k, v in kwargs.items())])
    return [f"~{group}", f"+{group}={{{items}}}"]


def compose(overrides: Sequence[str] = ()):
    """``harness <overrides>`` as a validated :class:`harness.config.RunConfig` (raises HarnessError on bad input).
    Without a persistent compilation cache unless the overrides name one: a run in this process that enables the
    default one (``harness train``, the app) would leave JAX reading and writing the user's ``~/.cache`` for every
    later test, whose code path (traced programs from harness's cache) would then depend on the tests' order."""
    from harness.config import from_hydra

    if not any(o.lstrip("+~").startswith("engine.compilation_cache") for o in overrides):
        overrides = [*overrides, "engine.compilation_cache=null"]
    cfg, choices = compose_config(overrides)
    return from_hydra(cfg, choices)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: CPU only, W&B offline and quiet, our factories importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("HARNESS_DEBUG", "HYDRA_FULL_ERROR")}
    env.update(
        JAX_PLATFORMS="cpu",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_CONSOLE="off",
        WANDB_CACHE_DIR=os.environ.get("WANDB_CACHE_DIR", "/tmp/harness-tests-wandb-cache"),
        WANDB_CONFIG_DIR=os.environ.get("WANDB_CONFIG_DIR", "/tmp/harness-tests-wandb-config"),
        WANDB_DATA_DIR=os.environ.get("WANDB_DATA_DIR", WANDB_DATA_DIR),  # artifact staging (tables), not ~/.local
        JAX_COMPILATION_CACHE_DIR=JAX_CACHE_DIR,
        PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO_DIR, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra)
    return env


def run_cli(args: Sequence[str], cwd: str, *, timeout: float = 120, env: dict[str, str] | None = None,
            module: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m harness <args>`` (or the ``harness`` script with ``module=False``) in ``cwd``; returns the
    completed process with text ``stdout``/``stderr`` and ``returncode``."""
    if module:
        command = [sys.executable, "-m", "harness", *args]
    else:
        command = [os.path.join(os.path.dirname(sys.executable), "harness"), *args]
    return subprocess.run(command, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def run_dirs(cwd: str) -> list[str]:
    """Hydra run directories under ``cwd/outputs`` (``outputs/<date>/<time>``), oldest first."""
    root = os.path.join(cwd, "outputs")
    found = []
    for date in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for time in sorted(os.listdir(os.path.join(root, date))):
            found.append(os.path.join(root, date, time))
    return found


def offline_runs(wandb_parent: str) -> list[str]:
    """The offline W&B run directories under ``<wandb_parent>/wandb``, oldest first."""
    root = os.path.join(wandb_parent, "wandb")
    if not os.path.isdir(root):
        return []
    return sorted((os.path.join(root, d) for d in os.listdir(root) if d.startswith("offline-run-")),
                  key=lambda d: (os.path.getmtime(d), d))


def _leet(run_dir: str, *flags: str) -> str:
    wandb_cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    out = subprocess.run([wandb_cli, "leet", "inspect", *flags, "--json", run_dir], capture_output=True, text=True,
                         timeout=60, env=cli_env())
    if out.returncode != 0:
        raise RuntimeError(f"wandb leet inspect failed: {out.stderr}")
    return out.stdout


def wandb_summary(run_dir: str) -> dict:
    """An offline run read back by W&B's own reader: ``wandb leet inspect --summary --json`` (config, summary,
    state, name, notes, tags). About 1 s per call: read few runs."""
    import json

    return json.loads(_leet(run_dir, "--summary"))


def wandb_records(run_dir: str) -> list[dict]:
    """Every record of an offline run (``wandb leet inspect --json``); the ``run`` record holds ``run_group``,
    ``job_type``, ``display_name`` and the initial config."""
    import json

    return [json.loads(line) for line in _leet(run_dir).splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Tiny data factories (``_target_`` targets): a few hundred numbers, so runs spend their time on what is tested.


def tiny_classification(n_train: int = 96, n_val: int = 32, features: int = 6, classes: int = 3, seed: int = 0,
                        nan_rows: int = 0):
    """Linearly separable-ish Gaussian blobs, standardized; ``nan_rows`` training rows get a NaN feature."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 2.0, size=(classes, features))

    def split(n):
        y = np.arange(n) % classes
        x = centers[y] + rng.normal(0.0, 1.0, size=(n, features))
        return x.astype(np.float32), y.astype(np.int32)

    x_train, y_train = split(n_train)
    x_val, y_val = split(n_val)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    x_train[:nan_rows, 0] = np.nan
    return {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val, "num_classes": classes}


def failing_data(message: str = "corrupt shard 3 in /data/train"):
    """A data factory that raises, like a user's loader hitting a bad file."""
    raise ValueError(message)


def failing_factory(*args, **kwargs):
    """Any factory (model, loss, optimizer) that raises when called, whatever its arguments."""
    raise RuntimeError("factory exploded on purpose")


def headline(findings, trained: bool = False) -> str | None:
    """The id a report would headline for these findings (:func:`harness.causes.reconcile`, then
    :func:`harness.findings.first_to_fix`): a planted bug's test asserts its cause is named first, not only present.
    ``findings``: a list of findings, or of outcomes (every finding of a run); ``trained``: the training stage ran."""
    from harness.causes import TrainingEvidence, reconcile
    from harness.findings import first_to_fix

    flat = [f for item in findings for f in (item.findings if hasattr(item, "findings") else [item])]
    evidence = TrainingEvidence(("seeds",) if trained else ())
    first = first_to_fix(reconcile(flat, evidence))
    return first.id if first is not None else None
