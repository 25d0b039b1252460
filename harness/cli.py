"""The ``harness`` command: a thin Hydra entry point over :mod:`harness.pipeline`.

``harness [overrides]`` runs the checklist; ``harness -m ...`` runs a sweep (Hydra multirun);
``harness compare DIR...`` and ``harness reproduce RUN_DIR`` work on finished runs.
Bad input ends with one line naming the key or file and exit code 2 (``debug=true`` shows the traceback);
``fail_on_error=true`` makes an error finding exit with 1, for CI.
"""

from __future__ import annotations

import logging
import os
import sys

EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2

SUBCOMMANDS = ("compare", "reproduce", "sync")


def _quiet_logs():
    # JAX logs "Unable to initialize backend 'tpu'" on CPU machines, which would leak into every run's log.
    for name in ("jax._src.xla_bridge", "jax", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _fail(message: str, code: int = EXIT_BAD_INPUT):
    print(f"harness: error: {message}", file=sys.stderr)
    sys.exit(code)


def _debug_requested(argv: list[str]) -> bool:
    return os.environ.get("HARNESS_DEBUG") == "1" or any(a in ("debug=true", "debug=True", "+debug=true")
                                                          for a in argv)


def task(cfg) -> int:
    """One run of the checklist on a composed config; returns the exit code."""
    from hydra.core.hydra_config import HydraConfig

    from harness.app import run_and_report
    from harness.config import from_hydra

    _quiet_logs()
    if cfg.get("harness_collapse_group"):
        # A group of sweep points that the harness sweeper collapsed into one job.
        from harness.sweeps.collapse import run_group

        return run_group(cfg.harness_collapse_group, command=["harness", *sys.argv[1:]])
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    rc = from_hydra(cfg, choices)
    output_dir = cfg.get("output_dir") or hc.runtime.output_dir
    result = run_and_report(rc, output_dir, command=["harness", *sys.argv[1:]])
    return EXIT_FINDINGS if (rc.fail_on_error and result.has_error) else 0


def _hydra_main(argv: list[str]):
    import hydra

    from harness.config import config_dir
    from harness.errors import HarnessError

    debug = _debug_requested(argv)

    @hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
    def entry(cfg):
        try:
            code = task(cfg)
        except HarnessError as err:
            if debug:
                raise
            _fail(str(err))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        if code:
            sys.exit(code)

    sys.argv = [sys.argv[0], *argv]
    entry()


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # Users name their own factories by module path (data._target_=my_project.make_data), run from their project
    # directory: make that directory importable for the `harness` script too, as `python -m harness` does.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if argv and argv[0] in SUBCOMMANDS:
        from harness.errors import HarnessError
        from harness.sweeps import commands

        try:
            sys.exit(commands.main(argv[0], argv[1:]))
        except HarnessError as err:
            if _debug_requested(argv):
                raise
            _fail(str(err))
    _hydra_main(argv)


if __name__ == "__main__":
    main()
