"""Compiled programs, counted and timed.

Every diagnostic runs through ``compiled(name, fn, *args)``: it lowers and compiles ``fn`` once per (name, input
shapes/dtypes/shardings, static options) and reuses the executable afterwards, so diagnostics that share a program
shape share its compile. It records how many compiles happened and how long compiling vs running took; the report
and ``scripts/bench.py`` print those figures, and tests assert "no recompile on a second call".
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import time
from typing import Any, Callable

import jax

from harness.engine import exported


@dataclasses.dataclass
class ProgramStats:
    """Compile and run seconds, summed over programs (and over threads: a collapsed sweep's points run side by side,
    so the sums can exceed the wall time; ``compile_wall_seconds`` is the time during which anything was compiling)."""

    compiles: int = 0
    traces_reused: int = 0  # compiles whose traced program came from harness.engine.exported's cache
    compile_seconds: float = 0.0
    run_seconds: float = 0.0
    by_program: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    compile_intervals: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    def add(self, name: str, field: str, value: float):
        # cold_compile_seconds: what its compiles cost with no cache (recorded by the process that traced them)
        entry = self.by_program.setdefault(name, {"compiles": 0, "compile_seconds": 0.0, "cold_compile_seconds": 0.0,
                                                  "runs": 0, "run_seconds": 0.0})
        entry[field] += value

    @property
    def compile_wall_seconds(self) -> float:
        """The length of the union of the compile intervals."""
        total, end = 0.0, float("-inf")
        for a, b in sorted(self.compile_intervals):
            if b > end:
                total += b - max(a, end)
                end = b
        return total


STATS = ProgramStats()
_CACHE: dict[Any, Any] = {}
# A collapsed sweep's points run in threads (harness.sweeps.collapse). A program that several threads want compiles once:
# the first compiles it, the others wait for its future; different programs compile side by side.
_LOCK = threading.RLock()
_IN_FLIGHT: dict[Any, concurrent.futures.Future] = {}
_LAST_BY_NAME: dict[str, Any] = {}


def _signature(args) -> Any:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(
        (getattr(x, "shape", None), str(getattr(x, "dtype", type(x))), str(getattr(x, "sharding", "")))
        for x in leaves
    )


def compiled(name: str, fn: Callable, *args, static_key: Any = None, opt_level: int | None = None,
             options: dict[str, Any] | None = None):
    """The compiled executable of ``jax.jit(fn)`` for these arguments, from cache when the shapes were seen before.

    ``static_key`` must identify everything ``fn`` closes over that changes its program (a frozen spec), the user's
    code included: harness's Problem keys it by :func:`harness.engine.code_identity.code_identity` (file contents,
    or for code without a source file the object itself), so a notebook class that is edited and run again is a
    new key, never a cached program of its old definition.
    ``opt_level`` sets XLA's backend optimization level: 0 compiles several times faster and runs slower, the
    right trade for short diagnostics on a CPU (see ../shared/ECOSYSTEM.md); None keeps XLA's default.
    ``options``: further XLA compile options (``DebugOptions`` fields, e.g. ``xla_cpu_use_fusion_emitters``),
    part of the cache key.
    """
    # The name is only a label for the statistics: two diagnostics that build the same program share it.
    key = (static_key, opt_level, tuple(sorted((options or {}).items())), _signature(args))
    with _LOCK:
        exe = _CACHE.get(key)
        if exe is not None:
            return exe
        pending = _IN_FLIGHT.get(key)
        owner = pending is None
        if owner:
            pending = _IN_FLIGHT[key] = concurrent.futures.Future()
    if not owner:
        return pending.result()
    try:
        exe = _compile(name, fn, args, key, opt_level, options)
        pending.set_result(exe)
        return exe
    except BaseException as err:
        pending.set_exception(err)
        raise
    finally:
        with _LOCK:
            _IN_FLIGHT.pop(key, None)


def _compile(name, fn, args, key, opt_level, extra_options=None):
    start = time.perf_counter()
    options = {"xla_backend_optimization_level": opt_level} if opt_level is not None else None
    if extra_options:
        options = {**(options or {}), **extra_options}
    exe, reused, entry = _through_program_cache(name, fn, args, key, options)
    if exe is None:
        lowered = jax.jit(fn).lower(*args)
        exe = lowered.compile(options) if options else lowered.compile()
    elapsed = time.perf_counter() - start
    # What this program costs with no cache (budget=: a program the cache does not hold costs that much): measured
    # now when it was traced, else what the process that traced it measured.
    cold = elapsed
    if entry is not None:
        if reused:
            cold = max(elapsed, exported.recorded_seconds(entry) or 0.0)
        else:
            exported.record_seconds(entry, elapsed)
    with _LOCK:
        STATS.compiles += 1
        STATS.traces_reused += int(reused)
        STATS.compile_seconds += elapsed
        STATS.compile_intervals.append((start, start + elapsed))
        STATS.add(name, "compiles", 1)
        STATS.add(name, "compile_seconds", elapsed)
        STATS.add(name, "cold_compile_seconds", cold)
        _CACHE[key] = exe
        _LAST_BY_NAME[name] = exe
    return exe


def _through_program_cache(name, fn, args, key, options):
    """(executable, whether its trace was reused, its entry's key) through harness.engine.exported, or (None,
    False, None) when that cache is off, the program cannot be keyed across processes, or JAX cannot export it:
    then trace as usual."""
    if not exported.enabled():
        return None, False, None
    static_key, opt_level, _, signature = key
    try:
        entry = exported.entry_key(static_key, signature, opt_level, options)
    except exported.Unkeyable:
        return None, False, None
    found = exported.load(entry)
    if found is exported.UNEXPORTABLE:
        return None, False, None
    reused = found is not None
    try:
        if found is None:
            found = exported.export_and_store(entry, fn, args, name)
        return exported.compile_exported(*found, args, options), reused, entry
    except Exception as err:  # noqa: BLE001 - host callbacks, custom calls without a stable ABI, ...
        # The plain path traces again: a genuine error in the user's model surfaces from there, unchanged. The
        # record keeps later processes from paying for the failed attempt again.
        exported.store_unexportable(entry, name, f"{type(err).__name__}: {err}"[:500])
        return None, False, None


def last_executable(name: str):
    """The most recently compiled executable labelled ``name`` (for cost analysis in benchmarks)."""
    return _LAST_BY_NAME.get(name)


def run(name: str, fn: Callable, *args, static_key: Any = None, opt_level: int | None = None,
        options: dict[str, Any] | None = None):
    """Compile (or reuse) and execute, blocking until the result is ready so the timing is honest."""
    exe = compiled(name, fn, *args, static_key=static_key, opt_level=opt_level, options=options)
    start = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    elapsed = time.perf_counter() - start
    with _LOCK:
        STATS.run_seconds += elapsed
        STATS.add(name, "run_seconds", elapsed)
        STATS.add(name, "runs", 1)
    return out


def clear_cache():
    """Forget compiled executables (tests use this to count compiles from a clean slate)."""
    _CACHE.clear()


CACHE_MAX_BYTES = 4 << 30  # JAX's persistent compilation cache: least recently used entries go beyond this


def index_unindexed_entries(directory: str) -> int:
    """Give every entry of JAX's cache its last-use file; returns how many it gave one. With a size limit JAX
    keeps a ``<key>-atime`` file beside each ``<key>-cache`` entry and reads *every* entry's before each write
    (jax._src.lru_cache.LRUCache._evict_if_needed): one entry written without a size limit (by a harness before
    2026-11-30, or by JAX on its own in the same directory) fails every later write with a warning, so nothing new
    is cached. The entry's modification time stands in for its last use (JAX's format: nanoseconds, 8 bytes
    little-endian)."""
    given = 0
    try:
        names = set(os.listdir(directory))
        for name in names:
            key = name.removesuffix("-cache")
            if key != name and f"{key}-atime" not in names:
                mtime = os.stat(os.path.join(directory, name)).st_mtime_ns
                with open(os.path.join(directory, f"{key}-atime"), "wb") as f:
                    f.write(int(mtime).to_bytes(8, "little"))
                given += 1
    except OSError:  # a read-only or vanishing directory: JAX reports its own trouble with it
        pass
    return given


def enable_persistent_cache(directory: str | None, *, programs: bool = True, code_roots=()):
    """Turn on JAX's persistent compilation cache so a second process skips XLA compiles, and with ``programs``
    harness's cache of traced programs in its ``programs/`` subdirectory, so it skips tracing too
    (harness.engine.exported; ``code_roots``: top-level packages of the user's factories).

    ``JAX_COMPILATION_CACHE_DIR`` (JAX's own variable) wins over the config key, as users of JAX expect.
    """
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or directory
    if not directory:
        exported.enable(None)
        return None
    directory = os.path.expanduser(directory)
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache every program: ours are small and compile in about a second, below JAX's default 1 s threshold.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # Several processes share the directory (pytest-xdist workers, a sweep's jobs, runs side by side). JAX's cache
    # writes an entry unlocked unless it evicts, and a process that reads an entry another one is still writing
    # aborts inside XLA's deserialization (seen here: "Fatal Python error: Aborted" in get_executable_and_time). A
    # size limit turns on its file lock (the filelock package) and bounds the directory too.
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    index_unindexed_entries(directory)
    exported.enable(os.path.join(directory, "programs") if programs else None, code_roots)
    return directory
