"""Plugins: outside code that registers methods, models and datasets with the decorators the built-ins use
(``methods.base.register_method``, ``bench.models.register_model``, ``bench.data.register_dataset``).

Three equivalent ways to load one: a suite's ``plugins: [my_pkg.my_methods, ./my_kd.py]`` (paths relative to
the suite file), ``--plugin MODULE_OR_FILE`` on the command line (relative to the current folder), and the
``kdbench.plugins`` entry-point group of any installed package (each entry names a module; loaded at start).
A file plugin is imported as the module named after its file (``tiny_cnn.py`` → ``tiny_cnn``), so later
plugins and a suite's ``module: tiny_cnn:TinyCNN`` can import it; loading the same file again is a no-op, and
loading it after an edit replaces what it registered (notebooks).

Ray workers: :func:`carried` is what a trial needs to register the same names (file plugins travel as the
exact bytes the driver executed, module plugins by name, as do modules that registered a name outside any
plugin, and the generic models a suite declared); the trial calls :func:`ensure` before anything else.

Runs: :func:`code_digests` gives, for each part of a run that is not built in (method, student, teacher,
dataset), the sha256 of the source that defines it; ``bench.suites`` puts them in the run's hash (built-in
parts add nothing, so built-in hashes never change) and :func:`provenance` names them on the MLflow run.

A bad plugin is one ``BenchError`` line and nothing registered: file not found, import error (with the
plugin's own failing line), a name clashing with a built-in or another plugin, a class that is not a Method.

Not here: the registries themselves (``methods.base``, ``bench.models.registry``, ``bench.data``), the
generic ``nn.Module`` wrapper (``bench.models.generic``).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
import traceback
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from bench.data import _DATASETS
from bench.errors import BUILTIN_PACKAGES, BenchError, DuplicateName
from bench.models import generic
from bench.models.registry import _PREFIXES, _REGISTRY
from methods.base import _METHODS

ENTRY_POINT_GROUP = "kdbench.plugins"
_REGISTRIES: dict[str, dict[str, Any]] = {"method": _METHODS, "model": _REGISTRY, "model prefix": _PREFIXES,
                                          "dataset": _DATASETS}  # fmt: skip


@dataclass(frozen=True)
class Plugin:
    """One loaded plugin: how it was named, its module, and the source that was executed."""

    ref: str  # as given: "my_pkg.my_methods", "./my_kd.py", "entry point name=module"
    module: str  # its name in sys.modules
    digest: str  # sha256 of its source file
    path: str | None = None  # a file plugin's absolute path (None: a module plugin)
    source: bytes | None = None  # a file plugin's bytes, executed here and in every Ray worker
    version: str | None = None  # a module plugin's distribution version
    registered: tuple[tuple[str, str], ...] = ()  # (kind, name) it added to the registries
    required: bool = True  # False: imported only because it registered a name outside a plugin (best effort)

    @property
    def origin(self) -> str:
        if self.path is not None:
            return f"plugin file {self.path}"
        return f"module {self.module}" + (f" ({self.version})" if self.version else "")


@dataclass(frozen=True)
class Carried:
    """What a Ray trial loads before it resolves its job: the plugins, then the declared generic models."""

    plugins: tuple[Plugin, ...] = ()
    models: tuple[generic.ModelRef, ...] = ()


_LOADED: dict[str, Plugin] = {}  # module name → plugin, in load order
_SOURCE_DIGESTS: dict[str, str] = {}  # file path → sha256 (outside modules that are not plugins)
_entry_points_loaded = False


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def is_file_ref(ref: str) -> bool:
    return ref.endswith(".py") or "/" in ref or "\\" in ref


def load(refs: Iterable[str], base: Path | None = None, where: str = "--plugin") -> list[Plugin]:
    """Load each plugin (a module name, or a ``.py`` file relative to ``base``, default the current folder)."""
    if isinstance(refs, str) or not all(isinstance(r, str) and r for r in refs):
        raise BenchError(f"{where}: expected a list of module names or .py files, got {refs!r}")
    return [_load_file(ref, base, where) if is_file_ref(ref) else _load_module(ref, where) for ref in refs]


def load_entry_points() -> list[Plugin]:
    """The ``kdbench.plugins`` entry points of every installed package (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return []
    found = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    loaded = [_load_module(ep.module, f"entry point {ep.name!r} ({ENTRY_POINT_GROUP}, {ep.value})") for ep in found]
    _entry_points_loaded = True
    return loaded


def _load_file(ref: str, base: Path | None, where: str) -> Plugin:
    path = ((base or Path.cwd()) / Path(ref).expanduser()).resolve()
    label = f"{where}: plugin {ref}"
    if not path.is_file():
        raise BenchError(f"{label}: file not found ({path})")
    if path.suffix != ".py":
        raise BenchError(f"{label}: a plugin file must be a .py file")
    source = path.read_bytes()
    name = path.stem
    previous = _LOADED.get(name)
    if previous is not None and previous.path == str(path):
        if previous.digest == sha256(source):
            return previous
        _unload(previous)  # edited since: what it registered goes, the new version comes in
    elif name in sys.modules:
        taken = getattr(sys.modules[name], "__file__", None) or "a built-in module"
        raise BenchError(f"{label}: it would be imported as module {name!r}, which is already {taken}; rename the file")
    return _execute(Plugin(ref, name, sha256(source), str(path), source), label)


def _load_module(name: str, where: str) -> Plugin:
    label = f"{where}: plugin {name}"
    if name in _LOADED:
        return _LOADED[name]
    if not all(part.isidentifier() for part in name.split(".")):
        raise BenchError(f"{label}: not a module name (a file needs a .py suffix or a path)")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as err:
        raise BenchError(f"{label}: cannot be imported: {type(err).__name__}: {err}") from None
    if spec is None:
        raise BenchError(f"{label}: no module named {name!r} (installed? on PYTHONPATH?)")
    file = spec.origin if spec.origin and Path(spec.origin).is_file() else None
    digest = sha256(Path(file).read_bytes()) if file else sha256(name.encode())
    return _execute(Plugin(name, name, digest, version=_distribution_version(name)), label)


def _execute(plugin: Plugin, label: str) -> Plugin:
    """Import ``plugin`` (a file: its exact bytes); keep what it registered, or undo everything and raise."""
    before = _snapshot()
    try:
        if plugin.source is not None:
            module = types.ModuleType(plugin.module)
            module.__file__ = plugin.path
            sys.modules[plugin.module] = module
            exec(compile(plugin.source, plugin.path, "exec"), module.__dict__)
        else:
            importlib.import_module(plugin.module)
    except DuplicateName as err:
        _rollback(before, plugin)
        holder = _LOADED[err.holder].origin if err.holder in _LOADED else err.describe_holder()
        raise BenchError(f"{label}: {err.kind} {err.name!r} clashes with {holder}") from None
    except BenchError as err:
        _rollback(before, plugin)
        raise BenchError(f"{label}: {err}") from None
    except BaseException as err:  # SyntaxError, ImportError, anything the plugin's code raises
        _rollback(before, plugin)
        if isinstance(err, KeyboardInterrupt):
            raise
        raise BenchError(f"{label}: import failed: {_first_error_line(err, plugin)}") from None
    added = tuple((kind, name) for kind, names in _snapshot().items() for name in names if name not in before[kind])
    loaded = replace(plugin, registered=added)
    _LOADED[plugin.module] = loaded
    return loaded


def _first_error_line(err: BaseException, plugin: Plugin) -> str:
    """``file:line: Type: message`` at the plugin's own innermost line (else the innermost line)."""
    what = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}".rstrip(": ")
    if isinstance(err, SyntaxError) and err.filename:
        return f"{Path(err.filename).name}:{err.lineno}: SyntaxError: {err.msg}"
    frames = traceback.extract_tb(err.__traceback__)
    own = plugin.path or _package_folder(plugin.module)
    mine = [f for f in frames if own and f.filename.startswith(own)] or frames[-1:]
    return f"{Path(mine[-1].filename).name}:{mine[-1].lineno}: {what}" if mine else what


def _package_folder(module: str) -> str:
    """The folder of a module plugin's top-level package (its "own" lines), or "" when unknown."""
    try:
        spec = importlib.util.find_spec(module.split(".")[0])
    except (ImportError, ValueError):
        return ""
    return str(Path(spec.origin).parent) if spec is not None and spec.origin else ""


def _snapshot() -> dict[str, dict[str, Any]]:
    return {kind: dict(registry) for kind, registry in _REGISTRIES.items()}


def _rollback(before: dict[str, dict[str, Any]], plugin: Plugin) -> None:
    for kind, registry in _REGISTRIES.items():
        registry.clear()
        registry.update(before[kind])
    if plugin.source is not None:
        sys.modules.pop(plugin.module, None)


def _unload(plugin: Plugin) -> None:
    for kind, name in plugin.registered:
        _REGISTRIES[kind].pop(name, None)
    sys.modules.pop(plugin.module, None)
    del _LOADED[plugin.module]


def _distribution_version(module: str) -> str | None:
    top = module.split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def loaded() -> list[Plugin]:
    return list(_LOADED.values())


# --------------------------------------------------------------------------------------------------
# Ray workers
# --------------------------------------------------------------------------------------------------
def carried() -> Carried:
    """Everything a Ray worker must load to know the names this process knows (see module docstring)."""
    plugins = list(_LOADED.values())
    modules = {p.module for p in plugins}
    for kind, registry in _REGISTRIES.items():
        for obj in registry.values():
            module = getattr(obj, "__module__", None) or ""
            if module.split(".")[0] not in BUILTIN_PACKAGES and module not in modules and module != "__main__":
                modules.add(module)
                plugins.append(Plugin(module, module, "", required=False))
    return Carried(tuple(plugins), generic.declared())


def check_shippable(parts: Iterable[dict[str, tuple[str, str]]]) -> None:
    """Raise when a run's part was registered in ``__main__`` (a notebook cell, a script): no Ray worker can
    import it."""
    for run in parts:
        for kind, name in run.values():
            if getattr(_lookup(kind, name), "__module__", None) == "__main__":
                raise BenchError(f"{kind} {name!r} is defined in __main__, which Ray workers cannot import: put it "
                                 "in a file and load it as a plugin, or use the local executor")  # fmt: skip


def ensure(carried: Carried) -> None:
    """Load what ``carried`` names, where this process does not have it yet (idempotent; Ray trials)."""
    for plugin in carried.plugins:
        have = _LOADED.get(plugin.module)
        if have is not None and have.digest == plugin.digest:
            continue
        if plugin.source is not None:
            if have is not None:
                _unload(have)
            sys.modules.pop(plugin.module, None)
            _execute(plugin, f"plugin {plugin.ref}")
        elif plugin.required:
            _load_module(plugin.module, f"plugin {plugin.ref}")
        elif plugin.module not in sys.modules:
            try:  # a module that registered a name outside any plugin: the runs that use its names need it
                importlib.import_module(plugin.module)
            except Exception:
                pass  # a run using one of its names fails with "unknown ..." and says which
    for ref in carried.models:
        generic.declare(ref)


# --------------------------------------------------------------------------------------------------
# Hash and provenance
# --------------------------------------------------------------------------------------------------
def _lookup(kind: str, name: str) -> Any:
    if kind == "model" and ":" in name:
        return _PREFIXES.get(name.split(":", 1)[0])
    return _REGISTRIES[kind].get(name)


def _source_digest(module_name: str, obj: Any) -> str:
    """sha256 of the source defining ``obj``: a plugin's executed bytes, else its module's file, else its code."""
    for plugin in _LOADED.values():
        if plugin.module == module_name and plugin.source is not None:
            return plugin.digest
    file = getattr(sys.modules.get(module_name), "__file__", None)
    if file and Path(file).is_file():
        if file not in _SOURCE_DIGESTS:
            _SOURCE_DIGESTS[file] = sha256(Path(file).read_bytes())
        return _SOURCE_DIGESTS[file]
    try:
        return sha256(inspect.getsource(obj).encode())
    except (OSError, TypeError):
        raise BenchError(f"{getattr(obj, '__qualname__', obj)!r} (module {module_name}) has no source to hash; "
                         "put it in a file and load it as a plugin") from None  # fmt: skip


def code_digest(kind: str, name: str) -> str | None:
    """The source digest of a registered ``kind`` (method, model, dataset) ``name`` that is not built in."""
    ref = generic.declared_ref(name) if kind == "model" else None
    if ref is not None:
        return sha256((ref.canonical() + _source_digest(ref.module_name, ref.module_name)).encode())[:16]
    obj = _lookup(kind, name)
    module = getattr(obj, "__module__", None) or ""
    if obj is None or module.split(".")[0] in BUILTIN_PACKAGES:
        return None
    return _source_digest(module, obj)[:16]


def code_digests(parts: dict[str, tuple[str, str]]) -> dict[str, str]:
    """``{role: (kind, name)}`` → ``{role: digest}`` for the parts that are not built in."""
    digests = {role: code_digest(kind, name) for role, (kind, name) in parts.items()}
    return {role: digest for role, digest in digests.items() if digest is not None}


def provenance(parts: dict[str, tuple[str, str]], code: dict[str, str]) -> tuple[dict[str, str], dict[str, bytes]]:
    """MLflow tags ``code.<role>`` (name, origin, source sha256, a generic model's settings) and source files (file name → bytes) of a run's
    parts that are not built in (``code``: the digests its spec carries)."""
    tags: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for role, digest in code.items():
        kind, name = parts[role]
        ref = generic.declared_ref(name) if kind == "model" else None
        module = ref.module_name if ref is not None else getattr(_lookup(kind, name), "__module__", "")
        plugin = _LOADED.get(module)
        origin = plugin.origin if plugin is not None else f"module {module}"
        source = plugin.source if plugin is not None and plugin.source is not None else None
        file = getattr(sys.modules.get(module), "__file__", None)
        if source is None and file and Path(file).is_file():
            source = Path(file).read_bytes()
        where = f"source sha256 {sha256(source)[:16]}" if source is not None else f"digest {digest}"
        tags[f"code.{role}"] = f"{name} from {origin}, {where}" + (f", {ref.canonical()}" if ref else "")
        if source is not None:
            files[f"{module}.py"] = source
    return tags, files


