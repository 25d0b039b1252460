"""The ``harness`` command: a thin Hydra entry point over :func:`harness.api.run_checklist`, which
:func:`harness.diagnose` (Python, notebooks) also ends in.

``harness [overrides]`` runs the checklist; ``harness -m ...`` runs a sweep (Hydra multirun); ``harness train
[overrides]`` trains the configured run in full with the monitor (:mod:`harness.train`); ``harness compare DIR...``, ``harness reproduce RUN_DIR`` and ``harness sync`` work on finished runs.

Exit codes (stable, for CI):

* 0: the run finished (findings or not, unless ``fail_on_error=true``);
* 1: ``fail_on_error=true`` and the report has an error finding (in a sweep: any point has one);
* 2: bad input: a wrong config value or key, an unknown option, a factory that raised, a missing file. One line
  ``harness: error: <key>: <what is wrong>`` on stderr, no traceback;
* 3: an internal error (a bug in the harness): one line naming the exception. A diagnostic that crashes is one:
  the other diagnostics still run and the report is written (status ``internal_error``, naming the diagnostic,
  the exception's type and message), and the traceback goes to ``harness.log`` in the run directory. It wins over
  1 (and, in a sweep, the worst point's code is the sweep's);
* 130: interrupted.

``debug=true`` or ``HARNESS_DEBUG=1`` also prints the Python traceback (bad input: instead of the one-line message);
an internal error still exits 3.
"""

from __future__ import annotations

import logging
import os
import sys

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

SUBCOMMANDS = ("compare", "reproduce", "sync")  # commands on finished runs (harness.sweeps.commands)


def _quiet_logs():
    # JAX logs "Unable to initialize backend 'tpu'" on CPU machines, which would leak into every run's log.
    for name in ("jax._src.xla_bridge", "jax", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _print_error(message: str):
    print(f"harness: error: {message}", file=sys.stderr)


def _fail(message: str, code: int = EXIT_BAD_INPUT):
    _print_error(message)
    sys.exit(code)


def _debug_requested(argv: list[str]) -> bool:
    return os.environ.get("HARNESS_DEBUG", "").lower() in ("1", "true", "yes") or any(
        a.lstrip("+").lower() in ("debug=true", "debug=1", "debug=yes") for a in argv)


def _internal_error(err: BaseException, log_path: str | None = None) -> str:
    from harness.findings import exception_message

    where = (f"its traceback is in {log_path}, debug=true prints it: please report it" if log_path
             else "rerun with debug=true for the traceback and report it")
    return f"internal error: {type(err).__name__}: {exception_message(err)} (this is a bug in harness; {where})"


# The format of Hydra's job log (hydra/job_logging/default.yaml), for a harness.log that harness writes itself.
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def log_to_file(log_path: str, message: str):
    """Append an ERROR record to ``log_path`` (a run's ``harness.log``) and to nothing else: through the Hydra job's
    file handler when it writes that file (same format, in order with the rest of the log), else through a handler
    made for it. Never the console: a traceback on the terminal is what ``debug=true`` asks for."""
    record = logging.LogRecord("harness", logging.ERROR, __file__, 0, message, None, None)
    target = os.path.abspath(log_path)
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.FileHandler) and os.path.abspath(h.baseFilename) == target]
    own = None
    try:
        if not handlers:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            own = logging.FileHandler(target, encoding="utf-8")
            own.setFormatter(logging.Formatter(LOG_FORMAT))
            handlers = [own]
        for handler in handlers:
            handler.handle(record)
            handler.flush()
    except OSError as err:  # an unwritable run directory must not hide the error itself
        _print_error(f"cannot write {log_path}: {err}")
    finally:
        if own is not None:
            own.close()


def report_internal_errors(result, output_dir: str, *, write_log: bool = True, label: str = "") -> None:
    """A run's crashed diagnostics: each traceback into ``<output_dir>/harness.log``, one line each on stderr."""
    from harness.report import format as fmt

    log_path = os.path.join(output_dir, "harness.log")
    for e in result.internal_errors:
        text = fmt.internal_error_text(e.to_dict())
        if write_log:
            log_to_file(log_path, f"internal error: {text}\n{e.traceback}")
        _print_error(f"internal error{label}: {text} (this is a bug in harness; the report is written, the "
                     f"traceback is in {log_path}: please report it)")


def exit_code(rc, result) -> int:
    """A finished run's exit code: 3 when a diagnostic crashed, else 1 for an error finding with
    ``fail_on_error=true``, else 0."""
    if result.internal_errors:
        return EXIT_INTERNAL
    return EXIT_FINDINGS if (rc.fail_on_error and result.has_error) else EXIT_OK


def _wandb_names(hc) -> tuple[str, str]:
    """W&B run name and group from Hydra's runtime: a run is named by its overrides; a single run is its own
    group, the points of a sweep share the sweep's group."""
    from hydra.types import RunMode

    from harness.report.wandb_logger import name_from_overrides

    name = name_from_overrides(hc.overrides.task)
    if hc.mode == RunMode.MULTIRUN:
        sweep = os.path.basename(os.path.normpath(hc.sweep.dir))
        return name, sweep if sweep.startswith("sweep") else f"sweep-{sweep}"
    run_dir = os.path.normpath(hc.runtime.output_dir)
    stamp = "_".join(run_dir.split(os.sep)[-2:])  # outputs/<date>/<time> -> <date>_<time>
    return name, f"run-{stamp}"


def task(cfg) -> int:
    """One run of the checklist on a composed config; returns the exit code."""
    from hydra.core.hydra_config import HydraConfig

    from harness.sweeps.distributed import setup_from_hydra

    setup_from_hydra(cfg)  # GPU memory policy and multi-host JAX: before anything starts a JAX backend
    from harness.api import run_checklist
    from harness.config import from_hydra

    _quiet_logs()
    hc = HydraConfig.get()
    name, group = _wandb_names(hc)
    if cfg.get("harness_collapse_group"):
        # A group of sweep points that the harness sweeper collapsed into one job; each point logs to W&B under
        # the sweep's group and is named by its own overrides.
        from harness.report.wandb_logger import use_group
        from harness.sweeps.collapse import run_group

        use_group(group)
        return run_group(cfg.harness_collapse_group, command=["harness", *sys.argv[1:]])
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    rc = from_hydra(cfg, choices)
    output_dir = cfg.get("output_dir") or hc.runtime.output_dir
    # The same code path as harness.diagnose from Python: run, write the report (and harness.log for a crash).
    report = run_checklist(rc, output_dir, command=["harness", *sys.argv[1:]], run_name=name, group=group)
    return exit_code(rc, report.result)


def train_task(cfg) -> int:
    """``harness train``: the configured run trained in full, with the monitor (:mod:`harness.train`)."""
    from hydra.core.hydra_config import HydraConfig

    from harness.sweeps.distributed import setup_from_hydra

    setup_from_hydra(cfg)
    from harness.config import from_hydra
    from harness.train.run import train

    _quiet_logs()
    hc = HydraConfig.get()
    name, group = _wandb_names(hc)
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    rc = from_hydra(cfg, choices)
    output_dir = cfg.get("output_dir") or hc.runtime.output_dir
    result, _ = train(rc, output_dir, command=["harness", "train", *sys.argv[1:]], run_name=name, group=group)
    if result.internal_errors:
        report_internal_errors(result, output_dir)
    return exit_code(rc, result)


def _job_log_path() -> str | None:
    """``harness.log`` in the Hydra job's run directory (None outside a Hydra job)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return os.path.join(HydraConfig.get().runtime.output_dir, "harness.log")
    except Exception:
        return None


def _short_hydra_message(err: BaseException) -> str:
    """Hydra's message for a bad override or group option, without the config search path listing."""
    message = str(err)
    cause = err.__cause__
    if cause is not None and str(cause) and str(cause) not in message:
        message += "\n" + str(cause)
    message = message.split("\nConfig search path:")[0]
    return message.strip()


def _hydra_main(argv: list[str], job=None) -> int:
    """Compose the config from ``argv`` and run ``job`` (default :func:`task`, the checklist) on it, once per
    point of a sweep."""
    import hydra

    from harness.config import config_dir
    from harness.errors import HarnessError

    debug = _debug_requested(argv)
    codes: list[int] = []  # one per job: a sweep runs many in this process

    @hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
    def entry(cfg):
        try:
            code = (job or task)(cfg)
        except HarnessError as err:
            if debug or cfg.get("debug"):
                raise
            _print_error(str(err))
            code = EXIT_BAD_INPUT
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except Exception as err:  # a bug in harness: one line, the traceback in harness.log (and printed on request)
            import traceback

            log_path = _job_log_path()
            if log_path:
                log_to_file(log_path, "internal error: " + "".join(
                    traceback.format_exception(type(err), err, err.__traceback__)).rstrip())
            if debug or cfg.get("debug"):
                traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
            _print_error(_internal_error(err, log_path))
            code = EXIT_INTERNAL
        codes.append(code)
        return code

    # Hydra prints its own errors (a bad override, an unknown group option) with a hint about HYDRA_FULL_ERROR and
    # exits 1, the code we keep for error findings. Asking it to raise instead lets us print one line and exit 2.
    user_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = [sys.argv[0], *argv]
    previous = sys.modules.get("hydra_plugins.harness_sweeper.harness_sweeper")
    if previous is not None:
        previous.JOB_CODES.clear()  # codes of an earlier main() in this process (tests) are not this run's
    try:
        entry()
    except Exception as err:
        if debug or user_full_error:
            raise
        _print_error(_short_hydra_message(err))
        return EXIT_BAD_INPUT
    finally:
        if not user_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    sweeper = sys.modules.get("hydra_plugins.harness_sweeper.harness_sweeper")
    job_codes = list(getattr(sweeper, "JOB_CODES", []))  # sweep jobs that ran in other processes
    if sweeper is not None:
        sweeper.JOB_CODES.clear()  # this sweep's: a later main() in this process (tests) starts afresh
    return max(codes + job_codes, default=EXIT_OK)


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
    if argv and argv[0] == "train":
        # A sweep of training runs runs each point as its own run: the collapsing sweeper merges checklists only.
        sys.exit(_hydra_main([*argv[1:], "collapse=false"] if "-m" in argv or "--multirun" in argv else argv[1:],
                             job=train_task))
    sys.exit(_hydra_main(argv))


def console_main():
    """The ``harness`` script and ``python -m harness``: :func:`main`, then a prompt exit.

    Everything a run produces is written and closed by the time ``main`` returns, but a normal interpreter exit
    then spends about half a second (measured on the reference job, 2 CPU cores) tearing down JAX's executables
    and modules one object at a time. So, like a C program's ``exit``, run the ``atexit`` handlers (W&B's
    teardown, logging's flush, jax.distributed's shutdown), flush the streams and end the process. A worker
    thread still alive at that point means something is unfinished: then exit the normal way, which waits for it.
    """
    import threading

    try:
        main()
        code = EXIT_OK
    except SystemExit as exit_:
        code = exit_.code
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    if not isinstance(code, int):  # sys.exit's own rule: None is success, other objects are printed, exit 1
        if code is not None:
            print(code, file=sys.stderr)
        code = EXIT_OK if code is None else 1
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be written anyway
            pass
    os._exit(code)


if __name__ == "__main__":
    console_main()
