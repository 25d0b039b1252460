"""Multi-host JAX: detecting the process layout, the process set-up before JAX starts, and a sharded sweep over two
real CPU processes that gives the same numbers as one process.

The two-process test runs this file as a script (``python test_distributed.py OUT.npz``): each worker joins the
run from ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` through
:func:`harness.sweeps.distributed.setup_process`, trains 6 members sharded over the global mesh with
``train_members``, and saves what it gathered.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from harness.errors import HarnessError
from harness.sweeps import distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
FIELDS = ("loss", "grad_norm", "val_loss", "train_eval_loss", "val_accuracy", "first_nonfinite")


# ----------------------------------------------------------------------------------------------------------------
# Layout detection and settings (pure functions of the environment).


def test_no_environment_means_single_process():
    assert dist.detect({}) is None
    assert dist.plan("auto", {}) is None
    assert dist.plan("false", {dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "2",
                               dist.ENV_PROCESS_ID: "0"}) is None


def test_explicit_variables():
    env = {dist.ENV_COORDINATOR: "10.0.0.1:1234", dist.ENV_NUM_PROCESSES: "4", dist.ENV_PROCESS_ID: "3"}
    assert dist.detect(env) == dist.Cluster("env", 4, 3, "10.0.0.1:1234")
    assert dist.plan("auto", env).num_processes == 4


@pytest.mark.parametrize("env, message", [
    ({dist.ENV_COORDINATOR: "h:1", dist.ENV_PROCESS_ID: "0"}, "JAX_NUM_PROCESSES must be set"),
    ({dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "two", dist.ENV_PROCESS_ID: "0"}, "must be an integer"),
    ({dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "2", dist.ENV_PROCESS_ID: "2"}, "must be in [0,"),
])
def test_bad_explicit_variables_name_the_variable(env, message):
    with pytest.raises(HarnessError, match=message.replace("[", r"\[")):
        dist.detect(env)


def test_slurm_single_task_stays_single_process_under_auto():
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0"}
    assert dist.detect(env) == dist.Cluster("slurm", 1, 0)
    assert dist.plan("auto", env) is None
    # Multi-task: JAX's own SLURM detection picks the coordinator (first node of the step) and one GPU per task.
    env.update(SLURM_NTASKS="8", SLURM_PROCID="5", SLURM_LOCALID="1")
    assert dist.plan("auto", env) == dist.Cluster("slurm", 8, 5)


def test_submitit_local_tasks_agree_on_a_coordinator():
    env = {"SUBMITIT_LOCAL_JOB_ID": "31337", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
           "SUBMITIT_LOCAL_LOCALID": "1", "CUDA_VISIBLE_DEVICES": ""}
    c = dist.detect(env)
    assert (c.source, c.num_processes, c.process_id, c.local_device_ids) == ("submitit_local", 2, 1, None)
    assert c.coordinator == f"127.0.0.1:{dist.job_port('31337')}"
    assert 61440 <= dist.job_port("31337") <= 65535
    env.update(CUDA_VISIBLE_DEVICES="0,1", JAX_COORDINATOR_PORT="5555")
    c = dist.detect(env)
    assert c.coordinator == "127.0.0.1:5555" and c.local_device_ids == (1,)


def test_true_without_environment_defers_to_jax_detection():
    assert dist.plan("true", {}).source == "jax"


def test_true_without_any_cluster_is_a_clear_error():
    # JAX finds no cluster either (or this process already runs JAX): one line naming the key, no traceback.
    with pytest.raises(HarnessError, match="^engine.distributed: "):
        dist.initialize(dist.Cluster("jax", 0, 0), timeout_s=5)


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (True, "true"), (False, "false"), ("TRUE", "true")])
def test_distributed_setting(value, expected):
    assert dist.distributed_setting(value) == expected


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_distributed_setting_names_the_key(value):
    with pytest.raises(HarnessError, match="engine.distributed: must be auto, true or false"):
        dist.distributed_setting(value)


@pytest.mark.parametrize("setting, launcher, expected", [
    ("auto", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", {dist.PREALLOCATE: "false"}),
    ("auto", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", {dist.PREALLOCATE: "false"}),
    ("auto", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", {}),
    ("auto", "hydra._internal.core_plugins.basic_launcher.BasicLauncher", {}),
    ("auto", None, {}),
    ("preallocate", "x.JoblibLauncher", {}),
    ("no_prealloc", None, {dist.PREALLOCATE: "false"}),
    (0.25, None, {dist.MEM_FRACTION: "0.25"}),
])
def test_gpu_memory_env(setting, launcher, expected):
    assert dist.gpu_memory_env(dist.gpu_memory_setting(setting), launcher) == expected


@pytest.mark.parametrize("value", [0, 1.5, -0.1, "half", True])
def test_bad_gpu_memory_names_the_key(value):
    with pytest.raises(HarnessError, match="engine.gpu_memory"):
        dist.gpu_memory_setting(value)


def test_cpu_devices_auto_is_one_per_core_unless_something_else_spreads_the_work(monkeypatch):
    monkeypatch.setattr(dist.os, "sched_getaffinity", lambda pid: set(range(2)))
    assert dist.cpu_device_count("auto", {}, None, None) == 2
    assert dist.cpu_device_count("auto", {}, "hydra._internal.core_plugins.basic_launcher.BasicLauncher", None) == 2
    monkeypatch.setattr(dist.os, "sched_getaffinity", lambda pid: set(range(96)))
    assert dist.cpu_device_count("auto", {}, None, None) == dist.MAX_AUTO_CPU_DEVICES
    # Jobs side by side on one host, or one process per core of a multi-process run, already spread the work
    # over the cores: JAX's one device.
    assert dist.cpu_device_count("auto", {}, "x.JoblibLauncher", None) is None
    assert dist.cpu_device_count("auto", {}, None, dist.Cluster("env", 2, 0, "127.0.0.1:1234")) is None
    assert dist.cpu_device_count(3, {}, "x.JoblibLauncher", None) == 3  # an explicit count
    # The user's XLA flag always wins.
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert dist.cpu_device_count(4, flags, None, None) is None


def test_a_run_gets_a_device_per_core(monkeypatch):
    monkeypatch.setattr(dist, "_backend_started", lambda: False)
    applied = []
    monkeypatch.setattr(dist.os, "sched_getaffinity", lambda pid: set(range(2)))
    import jax

    monkeypatch.setattr(jax.config, "update", lambda name, value: applied.append((name, value)))
    environ = dist.os.environ
    assert dist.setup_process({}, None, environ).cpu_devices == 2  # a single run, or a collapsed sweep group
    assert dist.setup_process({"steps_per_call": 100}, None, environ).cpu_devices == 2
    assert applied == [("jax_num_cpu_devices", 2)] * 2


@pytest.mark.parametrize("value", [0, -1, 1.5, "two", True])
def test_bad_cpu_devices_names_the_key(value):
    with pytest.raises(HarnessError, match="engine.cpu_devices"):
        dist.cpu_devices_setting(value)


def test_setup_process_leaves_a_started_backend_alone():
    # This test process already runs JAX: the device count cannot change any more, and the call must not try.
    import jax

    jax.devices()
    setup = dist.setup_process({"cpu_devices": 2}, None, {})
    assert setup.cpu_devices is None


def test_setup_process_sets_memory_variables_but_user_variables_win():
    environ: dict[str, str] = {}
    setup = dist.setup_process({"gpu_memory": 0.5, "distributed": "auto"}, None, environ)
    assert setup.env == {dist.MEM_FRACTION: "0.5"} and environ[dist.MEM_FRACTION] == "0.5"
    assert setup.cluster is None
    environ = {dist.PREALLOCATE: "true"}
    setup = dist.setup_process({"gpu_memory": "no_prealloc"}, None, environ)
    assert setup.env == {} and environ[dist.PREALLOCATE] == "true"


def test_setup_process_validates_before_doing_anything():
    environ: dict[str, str] = {}
    with pytest.raises(HarnessError, match="engine.distributed"):
        dist.setup_process({"gpu_memory": "no_prealloc", "distributed": "maybe"}, None, environ)
    assert environ == {}


# ----------------------------------------------------------------------------------------------------------------
# Two real processes.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_", "SUBMITIT_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
    env.update(extra)
    return env


def _start(out, **extra):
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(out)], env=_worker_env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=180):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6-member sweep: two processes with one CPU device each, one process with two devices (the same
    per-device program as the two-process run), and this test process (all members in one program when it has one
    device)."""
    tmp = tmp_path_factory.mktemp("distributed")
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        _start(tmp / f"proc{i}.npz", JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        for i in range(2)
    ]
    procs.append(_start(tmp / "two_devices.npz", XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    # The single-process reference runs here, in pytest's own process (whatever its device count), while the
    # workers start up and wait for each other.
    one_device = _sweep()[0]
    logs = [_finish(p) for p in procs]
    results = {name: dict(np.load(tmp / f"{name}.npz")) for name in ("proc0", "proc1", "two_devices")}
    results["one_device"] = one_device
    return results, logs


def test_two_processes_form_one_global_mesh(runs):
    results, logs = runs
    for i in (0, 1):
        assert int(results[f"proc{i}"]["process_index"]) == i
        assert int(results[f"proc{i}"]["process_count"]) == 2
        assert int(results[f"proc{i}"]["device_count"]) == 2  # one CPU device per process, two in the mesh
        assert int(results[f"proc{i}"]["primary"]) == (i == 0)
    # Each process addressed only its own half of the members, yet gathered all six.
    assert results["proc0"]["loss"].shape[0] == 6


def test_every_process_sees_every_member(runs):
    results, _ = runs
    for field in FIELDS:
        np.testing.assert_array_equal(results["proc0"][field], results["proc1"][field], err_msg=field)


def test_two_processes_match_one_process_with_two_devices_bitwise(runs):
    """The SPMD program each device runs is the same (3 members per device, same inputs, same XLA CPU code), only
    the transport of the results differs, so the numbers must be identical."""
    results, _ = runs
    for field in FIELDS:
        np.testing.assert_array_equal(results["proc0"][field], results["two_devices"][field], err_msg=field)


def test_two_processes_match_one_device_within_float32_noise(runs):
    """One device vmaps all 6 members in one program: a different vmap width, so float32 noise (see
    ECOSYSTEM.md: up to ~1e-3 for a member alone) but the same training."""
    results, _ = runs
    for field in ("loss", "val_loss", "train_eval_loss"):
        np.testing.assert_allclose(results["proc0"][field], results["one_device"][field], rtol=1e-4, atol=1e-6,
                                   err_msg=field)
    np.testing.assert_array_equal(results["proc0"]["first_nonfinite"], results["one_device"]["first_nonfinite"])


# ----------------------------------------------------------------------------------------------------------------
# The worker (run as a script by the fixture above).


def _sweep(members=slice(None)):
    """Train the test sweep (or a slice of its members); returns the results and this process's layout."""
    import jax
    import optax

    from harness import losses
    from harness.engine import devices
    from harness.engine.core import Arrays, Hparams, Problem, TrainSpec
    from harness.engine.driver import train_members
    from harness.models.mlp import MLP
    from harness.optim import OptimSpec
    from helpers import tiny_classification

    data = tiny_classification(n_train=96, n_val=32, features=6, classes=3)
    arrays = Arrays(data["x_train"], data["y_train"], data["x_val"], data["y_val"])
    from harness.models.adapters import ModelFactory
    from harness.tasks import Task

    model = ModelFactory(MLP, dict(width=16, depth=1), (6,), 3, data["x_train"][:2]).adapt()
    problem = Problem(model, losses.cross_entropy, OptimSpec(optax.adam), Task(3, ()))
    spec = TrainSpec(steps=12, batch_size=16, steps_per_call=6, max_members_per_call=8)
    hp = Hparams.make(lr=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1], init_seed=[0, 1, 2, 3, 4, 5], data_seed=[5, 4, 3, 2, 1, 0])
    result = train_members(problem, spec, hp.take(members), arrays)
    layout = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                  device_count=devices.device_count(), primary=devices.is_primary())
    return {f: getattr(result, f) for f in FIELDS}, layout


def _worker(out: str):
    dist.setup_process({"distributed": "auto"})  # before anything starts a JAX backend
    from harness.engine.compile import enable_persistent_cache
    from helpers import JAX_CACHE_DIR

    enable_persistent_cache(JAX_CACHE_DIR)  # reruns of this test skip the XLA compiles
    fields, layout = _sweep()
    np.savez(out, **fields, **layout)


if __name__ == "__main__":
    _worker(sys.argv[1])
