"""What identifies the user's code in a cache key: the content of its source file, or, for code without one, the
code object itself.

Two caches reuse programs traced from the user's code: the in-process cache of compiled programs
(:mod:`harness.engine.compile`, keyed by a Problem's fingerprint) and the traced-program store shared by processes
(:mod:`harness.engine.exported`). A program may only be reused while the code it was traced from is the same, and
names and mtimes do not say so: a class defined in a notebook keeps its name when the cell is edited and run
again, has no file to take an mtime from, and an mtime can be restored while the content differs.

:func:`code_identity` answers for a factory, class, ``functools.partial``, loss function or model instance:

* code defined in a real source file is named by its module and qualname and identified by a sha256 of the bytes
  of the files its code comes from (methods, base classes, wrapped and partially applied functions included);
  that identity means the same thing in any process;
* code without a source file (a notebook cell or ``python -c``: ``__main__`` without a file, ``<stdin>``,
  ``<string>``, ``<ipython-input-...>``, an IPython cell file; a class exec'd from text) is identified by the
  object itself plus a hash of its bytecode and constants (for a class: its methods'), and of the notebook-level
  names that code refers to. A re-definition is a new object, so it gets a new key in this process, and such an
  identity raises :class:`~harness.engine.exported.Unkeyable` for the cross-process store: its programs are never
  stored nor loaded across processes.

A ``__main__`` module run from a real file (``python script.py``) is a file like any other.
"""

from __future__ import annotations

import dataclasses
import dis
import functools
import hashlib
import os
import sys
import threading
import types
from typing import Any

# Values a notebook global may hold whose repr is their meaning (for the hash of code without a source file).
_PLAIN = (int, float, complex, bool, str, bytes, type(None))


# --------------------------------------------------------------------------------------------------------------
# File contents.

_DIGESTS: dict[str, tuple[tuple, str]] = {}  # path -> (its stat when hashed, sha256 of its bytes)
_FIRST_SEEN: dict[str, str] = {}  # path -> the digest this process saw first
_LOCK = threading.Lock()


def file_digest(path: str) -> str | None:
    """sha256 of the file's bytes (None when it cannot be read). Validity is decided by content; the stat (size,
    mtime, ctime, inode) only decides whether this process must read the file again, so a warm lookup costs a
    ``stat``. The ctime and inode change on every write or replacement, even when the mtime is set back."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    known = _DIGESTS.get(path)
    if known is not None and known[0] == stamp:
        return known[1]
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None
    with _LOCK:
        _DIGESTS[path] = (stamp, digest)
        _FIRST_SEEN.setdefault(path, digest)
    return digest


def changed_in_process(path: str, digest: str | None = None) -> bool:
    """Whether ``path`` now differs from what this process first read of it. Python does not re-read an edited
    module, so code loaded from such a file may be the old code: a program traced now must not be stored as the
    new content's."""
    digest = file_digest(path) if digest is None else digest
    first = _FIRST_SEEN.get(path)
    return first is not None and digest != first


# --------------------------------------------------------------------------------------------------------------
# Identities.


class _Same:
    """An object compared by identity (held, so its id cannot be reused while a key holds it)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)

    def __repr__(self):
        return f"<same {type(self.obj).__name__} at {id(self.obj):#x}>"


@dataclasses.dataclass(frozen=True)
class CodeIdentity:
    """What :func:`code_identity` returns; hashable, equal only for the same code.

    ``name``: module.qualname of the object asked about. ``sources``: (path, sha256) of every source file its code
    comes from. ``unsourced``: the pieces with no source file, as (name, the object, hash of its code and of the
    notebook-level values it refers to); non-empty means the identity only holds in this process.
    """

    name: str
    sources: tuple[tuple[str, str], ...]
    unsourced: tuple[tuple[str, Any, str], ...] = ()
    # What the hashes of ``unsourced`` name by address, held so that no other object can take the address while
    # this identity is in a key.
    held: tuple = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def has_source(self) -> bool:
        return not self.unsourced

    def stable_key(self):
        """The identity for harness.engine.exported's store: module, qualname and file contents; Unkeyable for
        code without a source file (nothing about it survives the process)."""
        if self.unsourced:
            from harness.engine.exported import Unkeyable

            names = ", ".join(sorted({name for name, _, _ in self.unsourced}))
            raise Unkeyable(f"{names}: no source file (defined in a notebook, `python -c` or exec)")
        return (self.name, self.sources)


def code_identity(obj: Any) -> CodeIdentity:
    """The identity of the user's code behind ``obj`` (a factory function, a class, a ``functools.partial``, a loss
    function, a bound method, a callable object or a model instance: its class).

    Equal for the same code in any process where it comes from source files (module, qualname, sha256 of the
    files), with ``stable_key()`` for harness.engine.exported; for code without a source file, equal only for the
    same objects with the same bytecode in this process, and ``stable_key()`` raises Unkeyable.
    """
    walk = _Walk()
    try:
        walk.visit(obj, top=True)
    except Exception:  # noqa: BLE001 - something this walk does not know: trust nothing about it across processes
        return CodeIdentity(_name(obj), (), ((_name(obj), _Same(obj), "unidentified"),))
    return CodeIdentity(_name(obj), tuple(sorted(walk.sources.items())), tuple(walk.unsourced),
                        tuple(walk.held))


def has_source(obj: Any) -> bool:
    """Whether every piece of code behind ``obj`` comes from a real source file."""
    return code_identity(obj).has_source


def _name(obj) -> str:
    target = obj
    if isinstance(obj, functools.partial):
        target = obj.func
    elif not isinstance(obj, type) and not hasattr(obj, "__qualname__"):
        target = type(obj)
    return f"{getattr(target, '__module__', None)}.{getattr(target, '__qualname__', None)}"


def _main_file() -> str | None:
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return os.path.realpath(path) if path else None


def _source_file(filename: str | None, module: str | None) -> str | None:
    """The real file ``filename`` names for code of ``module``, or None when the code has no source file."""
    if not filename or filename.startswith("<"):
        return None  # <stdin>, <string>, <ipython-input-...>, <frozen ...>, a console, a generated method
    real = os.path.realpath(filename)
    if module == "__main__" and real != _main_file():
        return None  # a notebook cell's file (ipykernel's temporary files), exec'd text given a file name
    if any(part.startswith("ipykernel_") for part in real.split(os.sep)):
        return None
    return real if os.path.isfile(real) else None


def _generated(fn: types.FunctionType) -> bool:
    """A method a library wrote from a class's own definition, exec'd from text it made up (dataclass, attrs and
    namedtuple methods): what it does is what the class's definition says, so it is the class's code, not code
    without a source file."""
    code = fn.__code__
    if not code.co_filename.startswith("<"):
        return False
    return (getattr(code, "co_qualname", "").startswith("__create_fn__.<locals>.")  # dataclasses
            or code.co_filename.startswith("<attrs generated")
            or str(getattr(fn, "__module__", "")).startswith("namedtuple_"))


class _Walk:
    """Collects the source files of the code behind an object, and the pieces that have none."""

    def __init__(self):
        self.sources: dict[str, str] = {}
        self.unsourced: list[tuple[str, Any, str]] = []
        self.held: list = []
        self.seen: dict[int, Any] = {}  # id -> object (held, so ids stay unique during the walk)

    def visit(self, obj, top: bool = False):
        if id(obj) in self.seen:
            return
        self.seen[id(obj)] = obj
        if isinstance(obj, functools.partial):
            for part in (obj.func, *obj.args, *obj.keywords.values()):
                self.nested(part)
        elif isinstance(obj, (staticmethod, classmethod)):
            self.visit(obj.__func__)
        elif isinstance(obj, property):
            for part in (obj.fget, obj.fset, obj.fdel):
                if part is not None:
                    self.visit(part)
        elif isinstance(obj, types.MethodType):
            self.visit(obj.__func__)
        elif isinstance(obj, types.FunctionType):
            if not _generated(obj):
                self.function(obj)
        elif isinstance(obj, type):
            self.cls(obj)
        elif isinstance(obj, (types.ModuleType, types.BuiltinFunctionType, types.BuiltinMethodType,
                              types.WrapperDescriptorType, types.MethodWrapperType, types.MethodDescriptorType)):
            return
        else:
            wrapped = getattr(obj, "__wrapped__", None)  # jax.jit(f), functools.wraps wrappers
            if wrapped is not None:
                self.visit(wrapped)
            if top or callable(obj):
                self.visit(type(obj))  # a model instance, a callable object: its class's code

    def nested(self, value):
        """A value held by code (a partial's argument, a closure cell, a default): code is followed, data is the
        caller's to key."""
        if callable(value) or isinstance(value, (staticmethod, classmethod, property)):
            self.visit(value)

    def add_file(self, path: str) -> bool:
        digest = file_digest(path)
        if digest is None:
            return False
        self.sources[path] = digest
        return True

    def function(self, fn: types.FunctionType):
        code = fn.__code__
        module = getattr(fn, "__module__", None)
        path = _source_file(code.co_filename, module)
        sourced = path is not None and self.add_file(path)
        defaults = (*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values())
        for cell in fn.__closure__ or ():
            try:
                self.nested(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        for value in defaults:
            self.nested(value)
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None:
            self.visit(wrapped)
        if not sourced:
            digest = hashlib.sha256()
            _hash_code(code, digest)
            self.hash_values(digest, defaults)
            for cell in fn.__closure__ or ():
                try:
                    self.hash_values(digest, (cell.cell_contents,))
                except ValueError:
                    pass
            self.referenced(fn, code, digest)
            self.unsourced.append((f"{module}.{fn.__qualname__}", _Same(fn), digest.hexdigest()))

    def referenced(self, fn: types.FunctionType, code: types.CodeType, digest):
        """The notebook-level names code without a source file refers to: their code is followed and their
        values hashed, so a re-run cell that redefines a helper or a constant gives a new identity too."""
        globals_ = fn.__globals__
        for name in sorted(_global_names(code)):
            if name not in globals_:
                continue
            value = globals_[name]
            if isinstance(value, types.ModuleType):
                continue
            digest.update(name.encode() + b"=")
            if callable(value) or isinstance(value, (staticmethod, classmethod, property)):
                self.visit(value)
            self.hash_values(digest, (value,))

    def hash_values(self, digest, values):
        for value in values:
            if isinstance(value, _PLAIN) or (isinstance(value, (tuple, frozenset))
                                             and all(isinstance(v, _PLAIN) for v in value)):
                digest.update(f"{type(value).__name__}:{value!r}".encode())
            else:  # code, an array, a dict, an object: by identity (an in-place edit of data is not seen)
                self.held.append(value)
                digest.update(f"{type(value).__name__}@{id(value):x}".encode())
            digest.update(b"\0")

    def cls(self, cls: type):
        module = cls.__module__
        loaded = sys.modules.get(module)
        module_file = getattr(loaded, "__file__", None)
        if module_file and not module_file.endswith(".py"):
            sourced = True  # an extension module: its Python methods, if any, are followed below
        elif module_file:
            path = _source_file(module_file, module)
            sourced = path is not None and self.add_file(path)
        else:  # builtins and namespace packages have no code of their own; __main__ without a file does
            sourced = loaded is not None and module != "__main__"
        for value in list(vars(cls).values()):
            if isinstance(value, type) and value.__module__ != module:
                continue  # a class attribute naming another module's class: not this class's code
            if isinstance(value, (types.FunctionType, staticmethod, classmethod, property, type)):
                self.visit(value)
        for base in cls.__mro__[1:]:
            if base is not object:
                self.visit(base)
        if not sourced:
            digest = hashlib.sha256()
            for name, value in sorted(vars(cls).items(), key=lambda kv: kv[0]):
                digest.update(name.encode() + b"=")
                inner = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                parts = (value.fget, value.fset, value.fdel) if isinstance(value, property) else (inner,)
                for part in parts:
                    if isinstance(part, types.FunctionType):
                        _hash_code(part.__code__, digest)
                if isinstance(value, _PLAIN + (tuple, frozenset)):
                    self.hash_values(digest, (value,))
            self.unsourced.append((f"{module}.{cls.__qualname__}", _Same(cls), digest.hexdigest()))


_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL"})


def _global_names(code: types.CodeType) -> set[str]:
    """The global names ``code`` and the code nested in it read (attribute names, also in ``co_names``, are not:
    a notebook variable that happens to share an attribute's name must not change the key)."""
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname in _GLOBAL_OPS}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return {n for n in names if isinstance(n, str)}


def _hash_code(code: types.CodeType, digest):
    """Bytecode, names and constants, nested code objects included (line numbers are not: the identity of the
    object already tells a re-definition apart)."""
    for part in (code.co_code, *(n.encode() for n in (*code.co_names, "|", *code.co_varnames, "|",
                                                        *code.co_freevars, "|", *code.co_cellvars)),
                 f"{code.co_argcount},{code.co_kwonlyargcount},{code.co_posonlyargcount},{code.co_flags}".encode()):
        digest.update(part)
        digest.update(b"\0")
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            digest.update(b"code:")
            _hash_code(const, digest)
        else:
            digest.update(f"{type(const).__name__}:{const!r}".encode())
        digest.update(b"\0")

