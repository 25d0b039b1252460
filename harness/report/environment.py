"""What is needed to rerun a run elsewhere: versions, devices, git revisions, the variables that change JAX's
behaviour. Recorded in report.json (``environment``) for ``harness reproduce``."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys

import jax

PACKAGES = ("harness", "jax", "jaxlib", "flax", "optax", "hydra-core", "wandb", "numpy")
# Environment variables that change what a run computes or where it runs; recorded when set.
RELEVANT_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "JAX_DEFAULT_MATMUL_PRECISION",
                "CUDA_VISIBLE_DEVICES", "JAX_COMPILATION_CACHE_DIR", "WANDB_MODE")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = sys.version.split()[0]
    return out


def git_revision(directory: str | None = None) -> str | None:
    """The git revision of the repository holding ``directory`` (default: the working directory), with '-dirty'
    when tracked files have uncommitted changes; None outside a git checkout or without git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=directory)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=directory)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    devices = jax.devices()
    cwd = os.getcwd()
    source_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    user_revision = git_revision(cwd)
    # The harness's own revision matters when it runs from a source checkout (not from site-packages, which may
    # sit inside some unrelated repository) that is not the user's project.
    harness_revision = git_revision(source_root) if os.path.exists(os.path.join(source_root, ".git")) else None
    return {
        "versions": package_versions(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind if devices else None,
        "device_count": len(devices),
        "git_revision": user_revision,
        "harness_git_revision": harness_revision if harness_revision != user_revision else None,
        "cwd": cwd,
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "env": {k: os.environ[k] for k in RELEVANT_ENV if k in os.environ},
    }
