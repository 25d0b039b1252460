"""What is needed to rerun a diagnostic elsewhere: versions, devices, the git revision, the command line."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import jax


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in ("harness", "jax", "jaxlib", "flax", "optax", "hydra-core", "wandb", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = sys.version.split()[0]
    return out


def git_revision() -> str | None:
    """The project's git revision (the working directory's repository), with '-dirty' if it has changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    devices = jax.devices()
    return {
        "versions": package_versions(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind if devices else None,
        "device_count": len(devices),
        "git_revision": git_revision(),
        "cwd": os.getcwd(),
    }
