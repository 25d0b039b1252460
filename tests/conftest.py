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


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_freed_after_each_module():
    """Every compiled XLA program keeps a few memory mappings (its JIT code) until it is freed, and Linux allows a
    process 65,530 (``vm.max_map_count``). Kept for the whole suite (harness's program cache and JAX's hold them),
    the suite's ~10,000 programs crossed that limit in test_model_checks and XLA crashed inside a compile
    (a segfault; 64,343 mappings just before it, 2026-12-01). Freed after each module, they stay far below."""
    yield
    import gc

    import jax

    from harness.engine import compile as programs

    programs.clear_cache()
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _compilation_cache_left_as_found():
    """No test leaves JAX's persistent compilation cache on in this process: every later test would read and write
    it (the user's ``~/.cache`` with harness's default config) and compile through harness's traced-program cache,
    so what they exercise would depend on the tests' order. A test about the caches uses its own directories and
    a subprocess; in-process runs compose ``engine.compilation_cache=null`` (helpers.compose)."""
    import jax

    before = jax.config.jax_compilation_cache_dir
    yield
    after = jax.config.jax_compilation_cache_dir
    if after != before:
        from jax._src import compilation_cache

        from harness.engine import exported

        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()
        exported.enable(None)
        pytest.fail(f"this test left JAX's persistent compilation cache on (at {after}): run harness in-process "
                    "with engine.compilation_cache=null", pytrace=False)
