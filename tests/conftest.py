"""Test setup: CPU only, W&B offline and silent, no stray network or home-directory writes."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["WANDB_CONSOLE"] = "off"
os.environ.setdefault("WANDB_CACHE_DIR", "/tmp/harness-tests-wandb-cache")
os.environ.setdefault("WANDB_CONFIG_DIR", "/tmp/harness-tests-wandb-config")
