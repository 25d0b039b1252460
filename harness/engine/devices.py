"""The member axis of a sweep, sharded over every device of the run: one process's or, multi-host, all processes'.

A sweep's members (learning rates, seeds, ...) are independent, so they split across devices with no
communication: a 1-D mesh over the devices, the member axis sharded on it, the data replicated. The member count is
padded to a multiple of the device count. The mesh uses ``AxisType.Auto`` so ``jit(vmap(scan))`` sees ordinary
sharded inputs (``jax.make_mesh`` defaults to Explicit axes, which that composition rejects).

Multi-host (after ``jax.distributed.initialize``, see :mod:`harness.sweeps.distributed`) the mesh is global: it
holds every process's devices, in ``jax.devices()`` order, so member ``i`` lands on the same global device whatever
the process layout. Every process computes the same host-side member rows (they come from the config), so each
builds a global array by contributing the shards that live on its own devices
(``jax.make_array_from_callback``, the JAX guide "Distributed arrays and automatic parallelization", section
multi-process). Results are gathered back to every process (``multihost_utils.process_allgather``) so the
host-side analysis, identical on every process, sees all members; only process 0 writes the report.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MEMBER_AXIS = "members"


@functools.cache
def member_mesh() -> jax.sharding.Mesh:
    # jax.devices() is global: with one process it is jax.local_devices(); multi-host it spans all processes.
    devices = jax.devices()
    return jax.make_mesh((len(devices),), (MEMBER_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def device_count() -> int:
    """Devices the member axis is sharded over: every process's devices."""
    return len(jax.devices())


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """True on the process that writes reports and logs to W&B (process 0; the only one without multi-host)."""
    return jax.process_index() == 0


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


def _put(x, sharding: NamedSharding):
    """One leaf onto ``sharding``. Host values go through ``make_array_from_callback`` when the sharding spans
    other processes' devices: each process hands over only its own shards (``device_put`` of a host value onto
    non-addressable devices would need every process to ship the whole array)."""
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x  # already laid out: no copy, and the compiled program sees the same input layout
        return jax.device_put(x, sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _put_tree(tree, sharding: NamedSharding):
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)  # one process: one batched transfer for the whole tree
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def shard_members(tree):
    """Put the member axis (axis 0 of every leaf) across the devices."""
    return _put_tree(tree, NamedSharding(member_mesh(), P(MEMBER_AXIS)))


def replicate(tree):
    """Put shared inputs (the data) on every device."""
    return _put_tree(tree, NamedSharding(member_mesh(), P()))


def to_host(tree):
    """Numpy copies of every leaf, whole: a multi-host array is all-gathered first, so every process gets every
    member (a plain ``np.asarray`` fails on an array with shards on other processes)."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)
