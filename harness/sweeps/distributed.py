"""What a harness process sets up before JAX starts a backend: GPU memory policy, CPU devices and multi-host JAX.

Both must happen before the first JAX computation: XLA reads ``XLA_PYTHON_CLIENT_*`` when it creates the GPU client,
and ``jax.distributed.initialize`` refuses to run once a backend exists (JAX docs, "Multi-host and multi-process
environments"). The CLI calls :func:`setup_process` first thing in every job, from two config keys:

``engine.gpu_memory``: ``auto`` | ``preallocate`` | ``no_prealloc`` | a fraction in (0, 1]
    JAX preallocates 75% of a GPU at start-up (JAX docs, "GPU memory allocation"), so a second job on the same GPU
    fails with out-of-memory. ``no_prealloc`` sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (allocate on demand), a
    fraction sets ``XLA_PYTHON_CLIENT_MEM_FRACTION``. ``auto`` (default) picks ``no_prealloc`` under launchers that
    run several jobs on one host (joblib, submitit local, ray) and leaves JAX's default otherwise. A variable
    already in the environment always wins, as JAX users expect.

``engine.distributed``: ``auto`` | ``true`` | ``false``
    ``auto`` (default) calls ``jax.distributed.initialize`` only when the environment describes more than one
    process: SLURM tasks (submitit's ``tasks_per_node``/``nodes``; JAX reads the coordinator from the node list),
    submitit's local executor with ``tasks_per_node > 1`` (coordinator on localhost), or explicit variables
    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0, JAX's own variable), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. ``true`` requires such an environment (or one JAX detects itself: Open MPI, Kubernetes,
    Cloud TPU); ``false`` never initializes. On CPU, cross-process collectives need gloo
    (``jax_cpu_collectives_implementation``), which is set before initializing.

``engine.cpu_devices``: ``auto`` | a positive integer
    How many JAX devices the CPU backend shows (``jax_num_cpu_devices``). XLA runs one program's small matmuls
    on about one core; with one device per core the member axis is sharded across cores as across GPUs. Since the
    training diagnostics became one member table (harness.engine.table), a single run is a few large programs
    too, and one device per core measured faster there as well (2 cores, reference job, side by side in one
    session: warm 12.6 vs 17.4 s, cold 21.0 vs 24.2 s; earlier, with a program per diagnostic run side by side,
    one device was faster). So ``auto`` gives one device per core (the cores this process may use, at most 8),
    except where something else already spreads work over the cores: a launcher that runs jobs side by side on
    one host, or a multi-process run. An integer is obeyed; ``--xla_force_host_platform_device_count`` in
    ``XLA_FLAGS`` always wins. No effect on GPU or TPU backends.

The member mesh then spans every process's devices (:mod:`harness.engine.devices`), every process runs the same
diagnostics on its share of the members and gathers all results, and only process 0 writes the report and logs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any, Mapping

from harness.errors import HarnessError

# Our names for what JAX needs besides its own JAX_COORDINATOR_ADDRESS (and JAX_COORDINATOR_PORT, which JAX's
# cluster detection already honours for SLURM).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_PORT = "JAX_COORDINATOR_PORT"

# Variables SLURM's srun sets for every task (JAX's SlurmCluster needs the same ones).
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
# Variables submitit's local executor sets for every task (submitit/local/local.py).
SUBMITIT_LOCAL_VARS = ("SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_LOCAL_NTASKS", "SUBMITIT_LOCAL_GLOBALID",
                       "SUBMITIT_LOCAL_LOCALID")

log = logging.getLogger(__name__)  # a Hydra job's log goes to its console and <run dir>/harness.log

GPU_MEMORY_CHOICES = ("auto", "preallocate", "no_prealloc")
PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"
MEM_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# Launchers (by the class name in hydra.launcher._target_) that run several jobs on one host at once.
SHARED_HOST_LAUNCHERS = ("JoblibLauncher", "LocalLauncher", "RayLauncher")
# engine.cpu_devices=auto: past a few devices, padding the member axis to the device count costs more than it gains.
MAX_AUTO_CPU_DEVICES = 8


# ----------------------------------------------------------------------------------------------------------------
# Settings


def distributed_setting(value: Any) -> str:
    """``engine.distributed`` as 'auto', 'true' or 'false' (YAML gives booleans for true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        return value.lower()
    raise HarnessError(f"must be auto, true or false, got {value!r}", key="engine.distributed")


def gpu_memory_setting(value: Any) -> str | float:
    """``engine.gpu_memory`` as one of :data:`GPU_MEMORY_CHOICES` or a fraction in (0, 1]."""
    if isinstance(value, str) and value in GPU_MEMORY_CHOICES:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    raise HarnessError(f"must be auto, preallocate, no_prealloc or a fraction in (0, 1], got {value!r}",
                       key="engine.gpu_memory")


def cpu_devices_setting(value: Any) -> str | int:
    """``engine.cpu_devices`` as 'auto' or a positive integer."""
    if value == "auto":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise HarnessError(f"must be auto or a positive integer, got {value!r}", key="engine.cpu_devices")


def cpu_device_count(setting: str | int, environ: Mapping[str, str], launcher_target: str | None,
                     cluster: "Cluster | None") -> int | None:
    """How many CPU devices to ask JAX for, or None to leave JAX's default (see ``engine.cpu_devices``)."""
    if "xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", ""):
        return None  # the user chose, the way JAX documents
    if setting != "auto":
        return int(setting)
    shared = bool(launcher_target) and launcher_target.rsplit(".", 1)[-1] in SHARED_HOST_LAUNCHERS
    if shared or cluster is not None:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_CPU_DEVICES))


def gpu_memory_env(setting: str | float, launcher_target: str | None) -> dict[str, str]:
    """The XLA client variables for a GPU memory setting (empty: JAX's default, preallocate 75%)."""
    if setting == "auto":
        shared = bool(launcher_target) and launcher_target.rsplit(".", 1)[-1] in SHARED_HOST_LAUNCHERS
        setting = "no_prealloc" if shared else "preallocate"
    if setting == "preallocate":
        return {}
    if setting == "no_prealloc":
        return {PREALLOCATE: "false"}
    return {MEM_FRACTION: f"{setting:g}"}


# ----------------------------------------------------------------------------------------------------------------
# The process layout


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process fits into a multi-process run. ``coordinator`` None leaves it to JAX's own detection."""

    source: str  # "env", "slurm" or "submitit_local"
    num_processes: int
    process_id: int
    coordinator: str | None = None
    local_device_ids: tuple[int, ...] | None = None


def _int_var(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except KeyError:
        raise HarnessError(f"{ENV_COORDINATOR} is set, so {name} must be set too (an integer)") from None
    except ValueError:
        raise HarnessError(f"environment variable {name} must be an integer, got {environ[name]!r}") from None


def job_port(job_id: str) -> int:
    """A coordinator port all tasks of a job agree on without talking: derived from the job id, in the top 4096
    ports (the same rule JAX uses for SLURM, jax/_src/clusters/slurm_cluster.py)."""
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return int(digits) % 2**12 + (65535 - 2**12 + 1)


def detect(environ: Mapping[str, str] | None = None) -> Cluster | None:
    """The multi-process layout the environment describes, or None. Explicit variables win over a scheduler's."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_COORDINATOR):
        n, pid = _int_var(environ, ENV_NUM_PROCESSES), _int_var(environ, ENV_PROCESS_ID)
        if n < 1 or not 0 <= pid < n:
            raise HarnessError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={n})")
        return Cluster("env", n, pid, environ[ENV_COORDINATOR])
    if all(v in environ for v in SLURM_VARS):
        return Cluster("slurm", int(environ["SLURM_NTASKS"]), int(environ["SLURM_PROCID"]))
    if all(v in environ for v in SUBMITIT_LOCAL_VARS):
        port = int(environ.get(ENV_PORT) or job_port(environ["SUBMITIT_LOCAL_JOB_ID"]))
        # Every local task sees every GPU submitit gave the job; one GPU per process, as JAX does under SLURM.
        gpus = environ.get("CUDA_VISIBLE_DEVICES", "")
        local = (int(environ["SUBMITIT_LOCAL_LOCALID"]),) if gpus.strip() else None
        return Cluster("submitit_local", int(environ["SUBMITIT_LOCAL_NTASKS"]),
                       int(environ["SUBMITIT_LOCAL_GLOBALID"]), f"127.0.0.1:{port}", local)
    return None


def plan(setting: str, environ: Mapping[str, str] | None = None) -> Cluster | None:
    """Which layout to initialize for ``engine.distributed`` (None: stay a single process)."""
    if setting == "false":
        return None
    cluster = detect(environ)
    if setting == "auto":
        return cluster if cluster is not None and cluster.num_processes > 1 else None
    return cluster or Cluster("jax", 0, 0)  # "true" with nothing we know: let JAX detect (MPI, k8s, TPU)


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # private API moved: assume not, and let JAX raise its own error
        return False


def initialize(cluster: Cluster, *, timeout_s: int = 300) -> None:
    """``jax.distributed.initialize`` for ``cluster``; a no-op when this process already is initialized."""
    import jax

    if jax.distributed.is_initialized():
        return
    if _backend_started():
        raise HarnessError("engine.distributed: JAX already started a backend in this process, so it cannot join "
                           "a multi-process run; run each process as a fresh `harness` command")
    # CPU backends exchange data between processes (the result gathers) only through a collectives library.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {"initialization_timeout": timeout_s}
    if cluster.source != "jax":
        kwargs.update(num_processes=cluster.num_processes, process_id=cluster.process_id)
    if cluster.coordinator:
        kwargs["coordinator_address"] = cluster.coordinator
    if cluster.local_device_ids is not None:
        kwargs["local_device_ids"] = list(cluster.local_device_ids)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as err:
        where = {"env": f"{ENV_COORDINATOR}={cluster.coordinator}", "slurm": "SLURM",
                 "submitit_local": f"submitit local, coordinator {cluster.coordinator}",
                 "jax": "no cluster environment found"}[cluster.source]
        hint = ""
        if cluster.source == "jax":
            hint = (f"; set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}, run under SLURM or "
                    f"submitit, or use engine.distributed=auto")
        raise HarnessError(f"engine.distributed: jax.distributed.initialize failed ({where}): "
                           f"{str(err).splitlines()[0]}{hint}") from None


# ----------------------------------------------------------------------------------------------------------------
# The entry point's one call


@dataclasses.dataclass(frozen=True)
class ProcessSetup:
    env: dict[str, str]  # XLA variables this call set (ones already in the environment are left alone)
    cluster: Cluster | None
    cpu_devices: int | None = None  # jax_num_cpu_devices this call set


def setup_process(engine: Mapping[str, Any] | None, launcher_target: str | None = None,
                  environ: dict[str, str] | None = None) -> ProcessSetup:
    """Apply ``engine.gpu_memory``, ``engine.cpu_devices`` and ``engine.distributed`` to this process, before any
    JAX computation.

    ``engine`` is the ``engine`` config node (a mapping); ``launcher_target`` is ``hydra.launcher._target_``.
    Safe to call once per job in a process that runs several jobs (Hydra's basic launcher, joblib's workers).
    """
    engine = engine or {}
    environ = os.environ if environ is None else environ
    memory = gpu_memory_setting(engine.get("gpu_memory", "auto"))
    cluster = plan(distributed_setting(engine.get("distributed", "auto")), environ)
    cpu_devices = cpu_device_count(cpu_devices_setting(engine.get("cpu_devices", "auto")), environ,
                                   launcher_target, cluster)
    applied = {}
    for name, value in gpu_memory_env(memory, launcher_target).items():
        if name not in environ:
            if _backend_started():
                print(f"harness: warning: engine.gpu_memory: a JAX backend already runs in this process; "
                      f"{name}={value} takes effect in new processes only", file=sys.stderr)
            environ[name] = value
            applied[name] = value
    if applied:
        why = f" ({launcher_target.rsplit('.', 1)[-1]} runs jobs side by side)" if memory == "auto" else ""
        log.info("engine.gpu_memory=%s: %s%s", memory, " ".join(f"{k}={v}" for k, v in applied.items()), why)
    if cpu_devices is not None and environ is os.environ and not _backend_started():
        import jax

        jax.config.update("jax_num_cpu_devices", cpu_devices)
    else:
        cpu_devices = None  # a second job in this process: the first one's devices stand
    if cluster is not None:
        initialize(cluster)
        import jax

        log.info("engine.distributed: process %d of %d (%s%s), %d of %d devices here", jax.process_index(),
                 jax.process_count(), cluster.source, f", coordinator {cluster.coordinator}" if cluster.coordinator
                 else "", jax.local_device_count(), jax.device_count())
    return ProcessSetup(applied, cluster, cpu_devices)


def setup_from_hydra(cfg) -> ProcessSetup:
    """:func:`setup_process` for a Hydra job: the ``engine`` node and the launcher from the Hydra config."""
    from hydra.core.hydra_config import HydraConfig

    launcher = None
    if HydraConfig.initialized():
        launcher = HydraConfig.get().launcher.get("_target_")
    engine = cfg.get("engine") if hasattr(cfg, "get") else None
    return setup_process(dict(engine) if engine is not None else None, launcher)
