"""OmegaConf resolvers used by harness's Hydra config."""

from __future__ import annotations

import hashlib

from omegaconf import OmegaConf


def sweep_id(overrides) -> str:
    """A stable name for a sweep from its command-line overrides: the same command finds the same directory again,
    which is what lets a killed sweep resume (see hydra_plugins/harness_sweeper)."""
    text = "\n".join(sorted(str(o) for o in (overrides or [])))
    return "sweep-" + hashlib.sha1(text.encode()).hexdigest()[:10]


def register():
    if not OmegaConf.has_resolver("harness_sweep_id"):
        OmegaConf.register_new_resolver("harness_sweep_id", sweep_id)


register()
