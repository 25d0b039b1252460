"""The member axis of a sweep, sharded over all local devices.

A sweep's members (learning rates, seeds, ...) are independent, so they split across devices with no
communication: a 1-D mesh over the local devices, the member axis sharded on it, the data replicated. The member
count is padded to a multiple of the device count. The mesh uses ``AxisType.Auto`` so ``jit(vmap(scan))`` sees
ordinary sharded inputs (``jax.make_mesh`` defaults to Explicit axes, which that composition rejects).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MEMBER_AXIS = "members"


@functools.cache
def member_mesh() -> jax.sharding.Mesh:
    devices = jax.local_devices()
    return jax.make_mesh((len(devices),), (MEMBER_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def device_count() -> int:
    return len(jax.local_devices())


def padded_size(n: int, multiple: int | None = None) -> int:
    multiple = multiple or device_count()
    return -(-n // multiple) * multiple


def pad_members(tree, size: int):
    """Pad every leaf's leading (member) axis to ``size`` by repeating the last member; results past the real
    members are dropped by the caller. Repeating a real member keeps padding finite and cheap."""

    def pad(x):
        x = np.asarray(x)
        if x.shape[0] == size:
            return x
        extra = np.repeat(x[-1:], size - x.shape[0], axis=0)
        return np.concatenate([x, extra], axis=0)

    return jax.tree.map(pad, tree)


def shard_members(tree):
    """Put the member axis (axis 0 of every leaf) across the devices."""
    sharding = NamedSharding(member_mesh(), P(MEMBER_AXIS))
    return jax.device_put(tree, sharding)


def replicate(tree):
    """Put shared inputs (the data) on every device."""
    sharding = NamedSharding(member_mesh(), P())
    return jax.device_put(tree, sharding)
