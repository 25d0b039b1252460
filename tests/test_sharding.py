"""The member axis across devices: a sweep sharded over 8 (simulated) devices matches the single-device run, its
members really are spread one per device, and a sweep larger than ``max_members_per_call`` runs in chunks with the
same results as one call.

The 8-device half runs in a subprocess: ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before
JAX starts (../shared/ECOSYSTEM.md), and this test process has already started JAX with one device.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import optax
import pytest
from helpers import cli_env, tiny_classification

from harness import losses
from harness.engine.core import Arrays, Hparams, Problem, TrainSpec
from harness.engine.driver import train_members
from harness.models.mlp import MLP
from harness.optim import OptimSpec

DEVICES = 8
# One call of all steps, so each member count is one compiled program; 8 members per call.
SPEC = TrainSpec(steps=30, batch_size=16, steps_per_call=30, max_members_per_call=DEVICES)


def make_job() -> tuple[Problem, Arrays]:
    data = tiny_classification(n_train=64, n_val=32, features=6, classes=3)
    arrays = Arrays(data["x_train"], data["y_train"], data["x_val"], data["y_val"])

    from harness.models.adapters import ModelFactory
    from harness.tasks import Task

    model = ModelFactory(MLP, dict(width=16, depth=1), (6,), 3, data["x_train"][:2]).adapt()
    return Problem(model, losses.cross_entropy, OptimSpec(optax.adam), Task(3, ())), arrays


def sweep(n: int) -> Hparams:
    return Hparams.make(lr=np.geomspace(1e-3, 3e-2, n), init_seed=np.arange(n), data_seed=np.arange(n))


def child_main(out_path: str):
    """Run in the 8-device subprocess: the sweeps, and where their members were placed."""
    import jax

    from harness.engine import compile as programs
    from harness.engine import devices

    placements = []
    original = devices.shard_members

    def recording_shard_members(tree):
        placed = original(tree)
        leaf = jax.tree.leaves(placed)[0]
        placements.append({"devices": len(leaf.sharding.device_set), "members": int(leaf.shape[0]),
                           "per_device": sorted({int(s.data.shape[0]) for s in leaf.addressable_shards})})
        return placed

    devices.shard_members = recording_shard_members
    problem, arrays = make_job()
    five = train_members(problem, SPEC, sweep(5), arrays)
    hp_shardings = [jax.tree.leaves(exe.input_shardings[0][0])[0] for exe in programs._CACHE.values()]
    calls = []
    chunked = train_members(problem, SPEC, sweep(10), arrays, progress=lambda done, total: calls.append(total))
    one_call = train_members(problem, dataclasses.replace(SPEC, max_members_per_call=16), sweep(10), arrays)
    # The traced-program cache (harness.engine.exported) with members sharded over 8 devices: stored, then reused
    # by "another process" (the in-memory executables cleared), with the same results.
    from harness.engine import exported

    exported.enable(os.path.join(os.path.dirname(out_path), "programs"))
    stored_problem = dataclasses.replace(problem, fingerprint=("test_sharding", "tiny-mlp"))
    stored = train_members(stored_problem, SPEC, sweep(5), arrays)
    programs.clear_cache()
    reused_before = programs.STATS.traces_reused
    reused = train_members(stored_problem, SPEC, sweep(5), arrays)
    exported.enable(None)
    np.savez(out_path, five=five.loss, five_val=five.final_val_loss, chunked=chunked.loss, one_call=one_call.loss,
             chunked_val=chunked.final_val_loss, one_call_val=one_call.final_val_loss, stored=stored.loss,
             reused=reused.loss, reused_count=programs.STATS.traces_reused - reused_before)
    with open(out_path + ".json", "w") as f:
        json.dump({"device_count": devices.device_count(), "placements": placements, "chunk_calls": calls,
                   "hp_shardings": [str(s) for s in hp_shardings],
                   "hp_sharding_devices": [len(s.device_set) for s in hp_shardings]}, f)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharding") / "results.npz")
    env = cli_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", f"import test_sharding; test_sharding.child_main({out!r})"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out + ".json") as f:
        return dict(np.load(out)), json.load(f)


def test_members_are_sharded_one_per_device(eight_devices):
    _, info = eight_devices
    assert info["device_count"] == DEVICES
    # 5 members padded to 8, one per device; the hparams fed to the compiled program are sharded over all 8.
    assert {"devices": DEVICES, "members": DEVICES, "per_device": [1]} in info["placements"]
    assert info["hp_sharding_devices"] and all(n == DEVICES for n in info["hp_sharding_devices"])
    assert all("members" in s for s in info["hp_shardings"])


def test_sharded_sweep_matches_the_single_device_run(eight_devices):
    results, _ = eight_devices
    problem, arrays = make_job()
    alone = train_members(problem, SPEC, sweep(5), arrays)  # this process: one device
    assert results["five"].shape == alone.loss.shape == (5, SPEC.steps)
    # float32 agreement up to vmap-width noise (~1e-3 relative, ../shared/ECOSYSTEM.md); the members learn.
    np.testing.assert_allclose(results["five"], alone.loss, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(results["five_val"], alone.final_val_loss, rtol=1e-3, atol=1e-4)
    assert np.all(alone.loss[:, -5:].mean(axis=1) < alone.loss[:, :5].mean(axis=1))


def test_traced_programs_are_reused_across_processes_with_members_on_8_devices(eight_devices):
    results, _ = eight_devices
    assert int(results["reused_count"]) == 1
    np.testing.assert_array_equal(results["reused"], results["stored"])
    np.testing.assert_array_equal(results["stored"], results["five"])


def test_more_members_than_a_call_holds_run_in_chunks_with_the_same_results(eight_devices):
    results, info = eight_devices
    assert info["chunk_calls"] == [2, 2]  # 10 members, 8 per call: two calls (the second padded from 2 to 8)
    assert results["chunked"].shape == results["one_call"].shape == (10, SPEC.steps)
    np.testing.assert_allclose(results["chunked"], results["one_call"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(results["chunked_val"], results["one_call_val"], rtol=1e-3, atol=1e-4)
    # The chunks hold different members: the first 8 and the last 2 are not each other's padding.
    assert not np.allclose(results["chunked"][7], results["chunked"][9])
