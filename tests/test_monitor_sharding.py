"""The monitor under sharding: a data-parallel step (the batch split over 4 simulated devices, parameters and the
monitor's state replicated) records the same statistics as one device, and vmapped members sharded one per device
are read as runs of their own.

The 4-device half runs in a subprocess: ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before
JAX starts (../shared/ECOSYSTEM.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from helpers import cli_env

DEVICES = 4


def child(out_path: str):
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import harness.monitor as hm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8 * 64, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"hidden": {"w": jax.random.normal(k1, (16, 32)) * 0.25, "b": jnp.zeros(32)},
                "out": {"w": jax.random.normal(k2, (32, 2)) * 0.2, "b": jnp.zeros(2)}}

    def loss_fn(p, xb, yb):
        h = jax.nn.relu(xb @ p["hidden"]["w"] + p["hidden"]["b"])
        logits = h @ p["out"]["w"] + p["out"]["b"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))

    tx = hm.monitor(optax.adam(1e-2), history=64)

    def chunk(params, opt_state, xs, ys):
        def body(carry, batch):
            params, opt_state = carry
            value, grads = jax.value_and_grad(loss_fn)(params, *batch)
            updates, opt_state = tx.update(grads, opt_state, params, value=value)
            return (optax.apply_updates(params, updates), opt_state), value

        return jax.lax.scan(body, (params, opt_state), (xs, ys))[0]

    xs, ys = x.reshape(8, 64, 16), y.reshape(8, 64)
    params = init(jax.random.key(0))
    results = {}
    # One device.
    single = jax.jit(chunk)(params, tx.init(params), xs, ys)
    watch = hm.Monitor(params)
    watch.read(single[1])
    results["single"] = watch.series()[0].layer_grad_norm.tolist()
    # Data parallel: each batch split over the devices.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
    sharded = jax.jit(chunk, in_shardings=(replicated, replicated, split, split))(
        params, tx.init(params), jax.device_put(xs, split), jax.device_put(ys, split))
    watch = hm.Monitor(params)
    watch.read(sharded[1])
    results["data_parallel"] = watch.series()[0].layer_grad_norm.tolist()
    results["state_devices"] = len(hm.stats.find_state(sharded[1]).layer_grad_norm.sharding.device_set)
    # Members: four seeds vmapped, one per device.
    members = jax.vmap(init)(jax.random.split(jax.random.key(1), DEVICES))
    per_member = NamedSharding(mesh, P("data"))
    members = jax.device_put(members, per_member)
    states = jax.vmap(tx.init)(members)
    out = jax.jit(jax.vmap(chunk, in_axes=(0, 0, None, None)))(members, states, xs, ys)
    watch = hm.Monitor(jax.tree.map(lambda a: a[0], members))
    watch.read(out[1])
    runs = watch.series()
    results["members"] = [r.loss.tolist() for r in runs]
    results["member_devices"] = len(hm.stats.find_state(out[1]).loss.sharding.device_set)
    json.dump(results, open(out_path, "w"))


def test_the_monitor_reads_the_same_statistics_sharded_and_per_member(tmp_path):
    out = tmp_path / "out.json"
    env = cli_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_monitor_sharding as t; " \
           f"t.child({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.load(open(out))
    assert r["state_devices"] == DEVICES and r["member_devices"] == DEVICES
    # The same statistics, up to the order of the cross-device reductions.
    np.testing.assert_allclose(r["data_parallel"], r["single"], rtol=1e-5)
    assert len(r["members"]) == DEVICES and all(len(m) == 8 for m in r["members"])
    assert len({round(m[0], 6) for m in r["members"]}) == DEVICES  # each member its own run
