"""Launcher presets (harness/conf/hydra/launcher/): they compose with the plugins' schemas, and real multiruns
through the CLI under joblib and submitit (local) write every point's report.json, Hydra's records, and the
per-job environment a shared GPU needs. The submitit run uses two tasks per job: two processes join one
multi-process JAX run and only process 0 writes the report.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
from omegaconf import OmegaConf

TINY = ["collapse=false", "diagnostics.run=[data,model]", "logger=none", "~data",
        "+data={_target_:helpers.tiny_classification}", "model.depth=1"]


def compose_launcher(*overrides):
    from hydra import compose, initialize_config_dir

    from harness.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra.launcher


# ----------------------------------------------------------------------------------------------------------------
# Presets


def test_joblib_preset_extends_the_plugin():
    launcher = compose_launcher("hydra/launcher=harness_joblib")
    assert launcher._target_.endswith("JoblibLauncher")
    assert launcher.backend == "loky" and launcher.n_jobs == 2
    assert launcher.pre_dispatch == "2*n_jobs"  # the plugin's own defaults are kept


def test_slurm_preset_runs_one_process_per_gpu():
    launcher = compose_launcher("hydra/launcher=harness_slurm", "hydra.launcher.gpus_per_node=8",
                                "hydra.launcher.partition=gpu")
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 8 and launcher.partition == "gpu" and launcher.max_num_timeout == 0


def test_submitit_local_preset():
    launcher = compose_launcher("hydra/launcher=harness_submitit_local")
    assert launcher._target_.endswith("submitit_launcher.LocalLauncher") and launcher.tasks_per_node == 1


def test_ray_preset_documents_the_per_job_environment():
    # The plugin is not installed here: the preset composes, with the environment Ray passes to each task.
    launcher = compose_launcher("hydra/launcher=harness_ray")
    assert launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert launcher.ray.remote.runtime_env.env_vars.XLA_PYTHON_CLIENT_PREALLOCATE == "false"
    assert launcher.ray.remote.max_calls == 1


def test_plugin_names_are_not_shadowed():
    assert compose_launcher("hydra/launcher=joblib").n_jobs == -1  # the plugin's own preset is still there


# ----------------------------------------------------------------------------------------------------------------
# Real multiruns


def _sweep_dir(cwd) -> str:
    (sweep,) = glob.glob(os.path.join(cwd, "multirun", "sweep-*"))
    return sweep


def _points(sweep):
    return sorted(d for d in os.listdir(sweep) if d.isdigit())


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory):
    from helpers import run_cli

    cwd = tmp_path_factory.mktemp("joblib")
    done = run_cli(["-m", "hydra/launcher=harness_joblib", *TINY, "model.width=8,16"], cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return _sweep_dir(cwd), done


def test_joblib_writes_every_point(joblib_sweep):
    sweep, done = joblib_sweep
    assert "Joblib.Parallel(n_jobs=2,backend=loky" in done.stdout + done.stderr
    multirun = OmegaConf.load(os.path.join(sweep, "multirun.yaml"))
    assert multirun.hydra.launcher._target_.endswith("JoblibLauncher")
    assert _points(sweep) == ["0", "1"]
    for point, width in zip(_points(sweep), ("8", "16")):
        overrides = list(OmegaConf.load(os.path.join(sweep, point, ".hydra", "overrides.yaml")))
        assert f"model.width={width}" in overrides
        report = json.load(open(os.path.join(sweep, point, "report.json")))
        assert report["config"]["model"]["width"] == int(width)


def test_joblib_jobs_do_not_preallocate_a_shared_gpu(joblib_sweep):
    sweep, _ = joblib_sweep
    for point in _points(sweep):
        log = open(os.path.join(sweep, point, "harness.log")).read()
        assert "engine.gpu_memory=auto: XLA_PYTHON_CLIENT_PREALLOCATE=false (JoblibLauncher" in log


def test_compare_reads_a_launcher_sweep(joblib_sweep, tmp_path):
    from helpers import run_cli

    sweep, _ = joblib_sweep
    done = run_cli(["compare", sweep, "--out", str(tmp_path / "c.png")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "model.width" in done.stdout and "healthy" in done.stdout


def test_submitit_local_two_processes_one_report(tmp_path):
    from helpers import run_cli

    done = run_cli(["-m", "hydra/launcher=harness_submitit_local", "hydra.launcher.tasks_per_node=2", *TINY,
                    "model.width=8"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = _sweep_dir(tmp_path)
    multirun = OmegaConf.load(os.path.join(sweep, "multirun.yaml"))
    assert multirun.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert list(OmegaConf.load(os.path.join(sweep, "0", ".hydra", "overrides.yaml")))[-1] == "model.width=8"
    report = json.load(open(os.path.join(sweep, "0", "report.json")))
    assert report["environment"]["device_count"] == 2  # the mesh spans both processes' CPU devices
    # Both tasks joined the run (one log per task under .submitit/<job id>/), and both wrote into the same point.
    logs = "".join(open(p).read() for p in glob.glob(os.path.join(sweep, ".submitit", "*", "*_log.*")))
    log = open(os.path.join(sweep, "0", "harness.log")).read()
    assert "process 0 of 2 (submitit_local" in log and "process 1 of 2 (submitit_local" in log, logs[-3000:]
    assert len(glob.glob(os.path.join(sweep, "*", "report.json"))) == 1
