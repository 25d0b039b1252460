"""Traced programs kept across processes, so a warm run skips Python tracing as well as XLA's compile.

JAX's persistent compilation cache (:func:`harness.engine.compile.enable_persistent_cache`) saves the XLA
compile, but JAX finds a cache entry by the lowered module, so every run still traces and lowers every program in
Python first: measured on the reference job, 0.5-1 s per training program and about 5 s of a warm 11 s run. This
module keeps the lowered program itself. ``jax.export`` serializes a traced program (its StableHLO and calling
convention, see https://docs.jax.dev/en/latest/export/export.html); a later process deserializes it and compiles
``jax.jit(exported.call)``, whose lowering only wraps the stored module, and XLA's compile is then a persistent
cache hit as before.

A stored program is only valid for the code and settings that traced it, and the code is identified by content,
never by a file's mtime (which can be set back, and which code without a file does not have). The key holds the
caller's static key made stable across processes (:func:`stable_form`; harness's Problem answers with its
fingerprint, which holds :func:`harness.engine.code_identity.code_identity` of the user's model factory, loss and
optimizer: module, qualname and a sha256 of their source files), the argument shapes, dtypes and shardings, the
XLA options, the versions of Python, jax, jaxlib, flax, optax and numpy, JAX's tracing flags, and the paths
harness and the user's factories' packages are loaded from (another checkout is other code). A key that cannot be
made stable is not stored: one holding an object identity, and any code without a source file (a class or
function defined in a notebook, in ``python -c`` or ``<stdin>``, exec'd from text, a lambda typed at a prompt),
whose programs are therefore never stored nor loaded across processes; within a process a re-definition is a new
object and so a new key. The entry itself lists the sha256 of every source file loaded when it was traced from
harness, from the user's factories' packages and from outside site-packages (the user's own code, modules
imported while tracing included); a later process uses the entry only if all of them still hash the same. Hashes
are kept per file stat within a process, so a warm lookup reads no file twice. A process whose source files
changed while it ran (a notebook editing a module) stores nothing traced from them: the code it holds may be the
old one.
``engine.program_cache=false`` turns the cache off; deleting the directory is always safe.

Anything that fails (a program JAX cannot export, such as one with host callbacks; an unreadable entry) falls back
to tracing, so the cache can cost a miss but never a result.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import os
import pickle
import sys
import sysconfig
import tempfile
import threading
from typing import Any, Callable, Iterable

import jax

from harness.engine.code_identity import changed_in_process, code_identity, file_digest

FORMAT_VERSION = 2  # 2: sources recorded by content hash (1: by size and mtime)
# JAX flags that change what a trace produces (the rest only change where caches live or how things are logged).
TRACING_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_dtype_promotion",
                 "jax_numpy_rank_promotion", "jax_default_prng_impl", "jax_threefry_partitionable",
                 "jax_enable_custom_prng", "jax_softmax_custom_jvp", "jax_dynamic_shapes")
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")


class Unkeyable(ValueError):
    """The static key holds something whose identity does not survive the process (a lambda, an object id)."""


@dataclasses.dataclass
class _Config:
    directory: str | None = None
    code_roots: tuple[str, ...] = ()  # top-level packages whose loaded source files every entry is checked against


_CONFIG = _Config()
_LOCK = threading.Lock()


def enable(directory: str | None, code_roots: Iterable[str] = ()):
    """Store traced programs in ``directory`` (None turns the cache off). ``code_roots``: top-level packages of
    the user's factories; an entry is used only while their source files are unchanged (as for harness's and any
    code outside site-packages)."""
    with _LOCK:
        _CONFIG.directory = os.path.expanduser(directory) if directory else None
        _CONFIG.code_roots = tuple(sorted({"harness", *(r for r in code_roots if r)}))
        _environment.cache_clear()
    if _CONFIG.directory:
        os.makedirs(_CONFIG.directory, exist_ok=True)


def enabled() -> bool:
    return _CONFIG.directory is not None and jax.process_count() == 1


# --------------------------------------------------------------------------------------------------------------
# Keys.


def stable_form(value: Any) -> Any:
    """``value`` as nested tuples of strings and numbers that mean the same thing in any process, or Unkeyable.

    Objects that define ``stable_key()`` (harness's Problem: its fingerprint; a CodeIdentity) answer for
    themselves; dataclasses by their fields; functions and classes by their import path, unless they have no source
    file (a notebook's, exec'd; see :mod:`harness.engine.code_identity`); plain values by their repr, unless that
    repr holds an object address.
    """
    if hasattr(value, "stable_key") and not isinstance(value, type):
        return (type(value).__qualname__, stable_form(value.stable_key()))
    if isinstance(value, (tuple, list)):
        return tuple(stable_form(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((stable_form(k), stable_form(v)) for k, v in value.items()))
    if isinstance(value, functools.partial):
        return ("partial", stable_form(value.func), stable_form(value.args), stable_form(value.keywords))
    if isinstance(value, (str, int, float, bool, type(None), enum.Enum)):
        return repr(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__module__, type(value).__qualname__,
                tuple((f.name, stable_form(getattr(value, f.name))) for f in dataclasses.fields(value)))
    if callable(value):
        qualname = getattr(value, "__qualname__", None)
        module = getattr(value, "__module__", None)
        if not qualname or not module or "<" in qualname:  # lambdas and closures have no import path
            raise Unkeyable(f"{value!r} has no import path")
        if not code_identity(value).has_source:  # the same name may be other code in another process
            raise Unkeyable(f"{module}.{qualname} has no source file")
        return f"{module}.{qualname}"
    text = repr(value)
    if " at 0x" in text or " object at " in text:
        raise Unkeyable(f"{type(value).__name__} has no stable repr")
    return text


def _site_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(os.path.realpath(p) + os.sep for p in {paths["stdlib"], paths["platstdlib"], paths["purelib"],
                                                        paths["platlib"]})


def loaded_sources() -> list[tuple[str, str]]:
    """(path, sha256 of its bytes) of every loaded source file that can change a trace: harness's, the user's
    factories' packages (``code_roots``) and anything outside site-packages and the standard library (the user's
    own code). Read after tracing, so modules the model imports lazily, while being traced, are in it."""
    site = _site_dirs()
    roots = set(_CONFIG.code_roots)
    files = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        real = _realpath(path)
        if name.split(".")[0] in roots or not real.startswith(site):
            digest = file_digest(real)
            if digest is not None:
                files.add((real, digest))
    return sorted(files)


@functools.lru_cache(maxsize=None)
def _realpath(path: str) -> str:
    # A loaded module's path resolves the same all process long; resolving ~1000 of them anew after every trace
    # cost ~30 ms.
    return os.path.realpath(path)


def sources_unchanged(sources) -> bool:
    """Whether every recorded file still has the recorded content (decided by its hash, whatever its mtime)."""
    return all(file_digest(path) == digest for path, digest in sources)


@functools.lru_cache(maxsize=1)
def _environment() -> str:
    """Package versions, process-wide tracing flags, and where harness and the user's factories are loaded from:
    another checkout of the same code is other code (its entries' recorded files would all still be unchanged)."""
    versions = [sys.version]
    for package in VERSIONED_PACKAGES:
        module = sys.modules.get(package)
        versions.append(f"{package}={getattr(module, '__version__', None)}")
    locations = [(root, _location(root)) for root in _CONFIG.code_roots]
    return repr((FORMAT_VERSION, versions, [f"{flag}={_flag(flag)}" for flag in TRACING_FLAGS], locations))


def _location(root: str) -> str | None:
    path = getattr(sys.modules.get(root), "__file__", None)
    return os.path.realpath(path) if path else None


def _flag(name: str):
    try:
        return getattr(jax.config, name)
    except AttributeError:
        return None


def entry_key(static_key: Any, signature: Any, opt_level: int | None, options: dict | None) -> str:
    """The file name of a program's entry; raises Unkeyable when ``static_key`` cannot be made stable."""
    text = repr((stable_form(static_key), str(signature), opt_level, sorted((options or {}).items()),
                 jax.default_backend(), _environment(), _thread_flags()))
    return hashlib.sha256(text.encode()).hexdigest()


def _thread_flags():
    # Flags can be set in a thread-local context (``jax.enable_x64`` around the float64 gradient check): read
    # them here, at the caller's point, not once per process.
    return tuple(_flag(flag) for flag in ("jax_enable_x64", "jax_default_matmul_precision"))


# --------------------------------------------------------------------------------------------------------------
# Programs.


class Program:
    """A compiled exported program with the calling convention of the jitted function it came from: it takes the
    original pytree arguments and returns the original pytree outputs."""

    def __init__(self, executable, out_tree):
        self.executable = executable
        self.out_tree = out_tree

    def __call__(self, *args):
        return self.out_tree.unflatten(self.executable(*jax.tree.leaves(args)))

    def cost_analysis(self):
        return self.executable.cost_analysis()


def _flat(fn: Callable, in_tree, out_trees: list):
    def flat(*leaves):
        leaves_out, out_tree = jax.tree.flatten(fn(*jax.tree.unflatten(in_tree, leaves)))
        out_trees.append(out_tree)
        return leaves_out

    return flat


UNEXPORTABLE = "unexportable"  # what load() answers for a program JAX refused to export with this code


def load(key: str):
    """(exported, out_tree) from the entry ``key``; UNEXPORTABLE when this code's program could not be exported;
    None when there is no entry or it cannot be used."""
    from jax import export

    path = os.path.join(_CONFIG.directory, key)
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f)
        if entry.get("format") != FORMAT_VERSION or not sources_unchanged(entry["sources"]):
            return None  # traced by other code: trace again and overwrite it
        if entry.get("unexportable"):
            return UNEXPORTABLE
        return export.deserialize(bytearray(entry["exported"])), entry["out_tree"]
    except Exception:  # none yet, or a truncated or foreign file: trace again and (over)write it
        return None


def store_unexportable(key: str, name: str, reason: str):
    """Remember that this program could not be exported, so later processes trace it once instead of twice
    (a failed export has already paid for a full trace). Editing the sources retries, as for any entry."""
    _store(key, name, unexportable=reason)


def export_and_store(key: str, fn: Callable, args, name: str):
    """Trace and lower ``fn`` on ``args`` as an exported program, store it under ``key``; (exported, out_tree)."""
    from jax import export

    leaves, in_tree = jax.tree.flatten(args)
    out_trees: list = []
    exported = export.export(jax.jit(_flat(fn, in_tree, out_trees)))(*leaves)
    if not _round_trips(out_trees[0]):  # a library's node that pickles into something its unflatten rejects
        store_unexportable(key, name, "its output structure does not survive pickling")
    else:
        _store(key, name, exported=exported.serialize(), out_tree=out_trees[0])
    return exported, out_trees[0]


def _round_trips(treedef) -> bool:
    """The output structure comes back from pickle equal and usable (Equinox's MISSING sentinel once did not:
    the next process failed to unflatten the outputs)."""
    try:
        again = pickle.loads(pickle.dumps(treedef))
        jax.tree.unflatten(again, [0] * treedef.num_leaves)
        return again == treedef
    except Exception:  # noqa: BLE001 -- anything that fails here would fail in the next process
        return False


def _store(key: str, name: str, **content):
    """Write an entry with the sources it is valid for (read now, after the trace). Nothing is written when one of
    them changed since this process first read it: its code in memory may be the old one (an edited module that
    was not reloaded), and the program must not be stored as the new content's."""
    sources = loaded_sources()
    if any(changed_in_process(path, digest) for path, digest in sources):
        return
    entry = {"format": FORMAT_VERSION, "name": name, "sources": sources, **content}
    try:
        _write_atomically(os.path.join(_CONFIG.directory, key), pickle.dumps(entry))
    except OSError:  # a full or read-only disk: this process still has its program; the next one tries again
        pass


def record_seconds(key: str, seconds: float):
    """Remember what tracing and compiling the entry ``key``'s program took in the process that traced it (beside
    the entry: the entry is written before XLA compiles it)."""
    try:
        _write_atomically(os.path.join(_CONFIG.directory, f"{key}.seconds"), repr(float(seconds)).encode())
    except OSError:
        pass


def recorded_seconds(key: str) -> float | None:
    """What :func:`record_seconds` recorded for ``key``; None when nothing was."""
    try:
        with open(os.path.join(_CONFIG.directory, f"{key}.seconds")) as f:
            return float(f.read())
    except (OSError, ValueError):
        return None


def _write_atomically(path: str, data: bytes):
    # Several processes (a sweep's jobs, pytest workers) may store the same program: each writes a temporary file
    # and renames it, so a reader sees a whole entry or none.
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def compile_exported(exported, out_tree, args, options: dict | None) -> Program:
    """Compile a (deserialized or fresh) exported program for ``args``: lowering only wraps the stored module."""
    leaves = jax.tree.leaves(args)
    lowered = jax.jit(exported.call).lower(*leaves)
    executable = lowered.compile(options) if options else lowered.compile()
    return Program(executable, out_tree)
