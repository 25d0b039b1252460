"""Test setup: CPU only, W&B offline and silent, no stray network or home-directory writes; the repository root on
the path, so tests import the planted-bug zoo (``zoo``) however pytest is started."""

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["WANDB_CONSOLE"] = "off"
os.environ.setdefault("WANDB_CACHE_DIR", "/tmp/harness-tests-wandb-cache")
os.environ.setdefault("WANDB_CONFIG_DIR", "/tmp/harness-tests-wandb-config")
