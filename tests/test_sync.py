"""``harness sync``: finds every offline W&B run below a sweep (not online or already-synced ones), lists them with
``--dry-run`` without touching the network, and uploads them with one ``wandb sync`` call, whose failure (here:
no API key, no network) is reported with exit 1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness.errors import HarnessError
from harness.sweeps import sync


def fake_run(parent, name, *, synced=False, files=1):
    """An offline run directory as wandb leaves it: ``run-<id>.wandb`` (+ ``.synced`` once uploaded)."""
    run_dir = os.path.join(parent, "wandb", name)
    os.makedirs(os.path.join(run_dir, "files"), exist_ok=True)
    run_id = name.rsplit("-", 1)[-1]
    for i in range(files):
        path = os.path.join(run_dir, f"run-{run_id}{'' if i == 0 else f'-{i}'}.wandb")
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        if synced:
            open(path + ".synced", "w").close()
    return run_dir


@pytest.fixture
def sweep(tmp_path):
    """A sweep of 3 points: 8 offline runs to upload, one already synced, one online run, and noise."""
    root = tmp_path / "multirun" / "sweep-x"
    runs = []
    for point in range(3):
        for m in range(3 if point < 2 else 2):
            runs.append(fake_run(root / str(point), f"offline-run-20260101_00000{m}-p{point}m{m}"))
    fake_run(root / "0", "offline-run-20251231_000000-done", synced=True)
    fake_run(root / "1", "run-20260101_000000-online")
    os.makedirs(root / "2" / "wandb" / "offline-run-20260101_000009-empty")  # crashed before writing: no .wandb
    os.makedirs(root / ".submitit" / "1")
    return root, sorted(runs)


def test_finds_offline_runs_only(sweep):
    root, runs = sweep
    found = sync.find_offline_runs([str(root)])
    pending = [r.dir for r in found if not r.synced]
    assert sorted(pending) == runs and len(pending) == 8
    assert [r.run_id for r in found if r.synced] == ["done"]
    assert not any("online" in r.dir for r in found)


def test_a_run_directory_itself_and_resumed_runs(tmp_path):
    run = fake_run(tmp_path, "offline-run-20260101_000000-abc", files=3)
    (found,) = sync.find_offline_runs([run])
    assert found.run_id == "abc" and len(found.files) == 3 and found.size == 300


def test_one_wandb_call_for_all_runs(sweep, monkeypatch):
    root, runs = sweep
    found = [r for r in sync.find_offline_runs([str(root)]) if not r.synced]
    (command,) = sync.wandb_commands(found, jobs=8, project="p")
    assert command[:4] == [sys.executable, "-m", "wandb", "sync"]
    assert command[4:8] == ["-n", "8", "--project", "p"] and command[8:] == runs
    monkeypatch.setattr(sync, "MAX_PATHS_PER_CALL", 3)
    assert [len(c) - 4 for c in sync.wandb_commands(found)] == [3, 3, 2]


def test_wandb_accepts_the_directories(sweep):
    """wandb's own dry run sees the same 8 runs in our directories (its CLI takes many paths in one call)."""
    root, runs = sweep
    done = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", *runs], capture_output=True,
                          text=True, timeout=60)
    assert "Would sync 8 run(s)" in done.stdout + done.stderr


def test_bad_input(tmp_path):
    with pytest.raises(HarnessError, match="nowhere: no such directory"):
        sync.find_offline_runs([str(tmp_path / "nowhere")])
    os.makedirs(tmp_path / "offline-run-20260101_000000-x")
    with pytest.raises(HarnessError, match="without a .wandb file"):
        sync.find_offline_runs([str(tmp_path / "offline-run-20260101_000000-x")])


def test_cli_dry_run_then_upload_without_credentials(sweep, tmp_path):
    from helpers import cli_env, run_cli

    root, runs = sweep
    dry = run_cli(["sync", str(root), "--dry-run"], cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "would sync 8 offline W&B runs (1 already synced, skipped" in dry.stdout
    assert all(os.path.basename(r) in dry.stdout for r in runs)
    assert "-m wandb sync <8 run directories>" in dry.stdout

    # No API key and a fresh W&B config: wandb refuses at once; we say so and exit 1.
    env = cli_env(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    env.pop("WANDB_API_KEY", None)
    up = run_cli(["sync", str(root)], cwd=tmp_path, env=env)
    assert up.returncode == 1
    assert "syncing 8 offline W&B runs with 1 `wandb sync` call" in up.stdout
    assert "wandb sync failed" in up.stdout

    nothing = run_cli(["sync", str(root / "0" / "wandb" / "offline-run-20251231_000000-done")], cwd=tmp_path)
    assert nothing.returncode == 0 and "nothing to sync" in nothing.stdout
