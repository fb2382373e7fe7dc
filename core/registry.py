"""Plugin discovery and the component registry.

Plugins come from the ``vaeflow`` entry-point group (built-ins included) and
from ``VAEFLOW_PLUGINS=module1,module2``. Each plugin module is registered with
pluggy, checked with ``check_pending()`` (misspelled hooks), then its hooks are
called with a ``register`` callback bound to the plugin's source so that a
name clash can name both sources. A plugin that fails is recorded by name and
the others still load.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import importlib.util
import importlib.metadata as md
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from core import hookspecs
from core.errors import PluginError
from core.interfaces import FAMILIES, HOOKS, TAGS, Component

ENTRY_POINT_GROUP = "vaeflow"
ENV_PLUGINS = "VAEFLOW_PLUGINS"


class NameClash(PluginError):
    """Two plugins registered the same name in one family: an error naming both sources."""


@dataclass(frozen=True)
class Entry:
    """One registered component: its family, name, class and where it came from."""

    family: str
    name: str
    cls: type[Component]
    source: str  # "dist-name version (module)" or "VAEFLOW_PLUGINS:module"
    package: str  # the distribution to install to get it
    version: str | None = None  # the distribution's version (None for a VAEFLOW_PLUGINS module)

    def code_sha256(self) -> str:
        """sha256 of the source files behind this component (see code_sha256): an edit changes it."""
        return code_sha256(self.cls.__module__)


_AST_LOCK = threading.Lock()
CODE_ROOTS = ("core",)  # besides the plugin's own top-level package, imports of these count as its code


def module_files(module: str, roots: set[str]) -> list[Path]:
    """The source files of `module` and, transitively, of every module it imports whose top-level package is in
    `roots`, found by parsing the imports (nothing is executed)."""
    files, seen, todo = [], set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError):  # an attribute, not a module (from x import Class)
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        path = Path(spec.origin)
        files.append(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for level, base, names in _imports(path):
            if level:  # relative: from . import x, from ..y import z
                parent = package.rsplit(".", level - 1)[0] if level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base.split(".")[0] in roots:
                todo += [base] + [f"{base}.{n}" for n in names]
    return sorted(set(files))


_IMPORTS: dict[Path, tuple[tuple[int, int], list]] = {}  # path -> ((mtime_ns, size), its imports)


def _imports(path: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """[(relative level, module, imported names)] of a source file's import statements (`import a.b` is
    (0, "a.b", ())), parsed again only when the file's mtime or size changes: stage keys ask often."""
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _IMPORTS.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    with _AST_LOCK:  # CPython 3.11's parser is not thread-safe (SystemError: AST constructor recursion depth
        tree = ast.parse(path.read_bytes())  # mismatch) and stage keys are computed in parallel task threads
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(0, a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or "", tuple(a.name for a in node.names)))
    _IMPORTS[path] = (stamp, found)
    return found


def code_sha256(module: str) -> str:
    """sha256 over the source of a plugin module and what it imports from its own package and from core: the
    identity stage cache keys use, so that editing a plugin (installed or editable) re-runs what it computed."""
    digest = hashlib.sha256()
    roots = {module.split(".")[0], *CODE_ROOTS}
    for path in module_files(module, roots):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass(eq=False)  # compared and hashed by identity: config models are cached per registry
class Registry:
    """Every component by family and name, plus the plugins that failed to load."""

    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {f: {} for f in FAMILIES})
    failures: list[tuple[str, str]] = field(default_factory=list)  # (plugin, reason)
    plugin_manager: pluggy.PluginManager | None = None

    def names(self, family: str) -> list[str]:
        """Sorted names registered in one family."""
        return sorted(self.entries[family])

    def get(self, family: str, name: str) -> Entry:
        """Look up a component, with an error that lists what is known."""
        try:
            return self.entries[family][name]
        except KeyError:
            known = ", ".join(self.names(family)) or "none"
            raise PluginError(f"unknown {family} {name!r}; known {family}s: {known}") from None

    def add(self, family: str, cls: Any, name: str | None, source: str, package: str,
            version: str | None = None) -> None:
        """Validate and record one registration; a clash names both sources."""
        base = FAMILIES[family]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"{source}: {family} {cls!r} must subclass core.interfaces.{base.__name__}")
        name = name or getattr(cls, "name", None)
        if not name or not isinstance(name, str):
            raise PluginError(f"{source}: {family} {cls.__name__} has no string `name`")
        tag = TAGS.get(family, "name")
        if tag in cls.Options.model_fields:
            raise PluginError(f"{source}: {family} {name!r} has an option called `{tag}`, which the config uses "
                              f"to select the {family}; rename the option")
        if family == "model":
            _check_model(cls, name, source)
        if name in self.entries[family]:
            other = self.entries[family][name]
            raise NameClash(f"{family} {name!r} is registered twice: by {other.source} and by {source}")
        self.entries[family][name] = Entry(family, name, cls, source, package, version)

    def as_json(self) -> dict[str, list[dict[str, str]]]:
        """{family: [{"name", "source"}, ...]} for `vaeflow plugins --json`."""
        from core.interfaces import form_of

        def describe(e: Entry) -> dict:
            out = {"name": e.name, "source": e.source}
            if form_of(e.cls):
                out["form"] = form_of(e.cls)
            if e.family == "model":
                out["capabilities"] = dataclasses.asdict(e.cls.capabilities)
                out["slots"] = {f: dataclasses.asdict(slot) for f, slot in e.cls.slots.items()}
                out["stages"] = list(e.cls.stages)
            if e.family == "stage":
                out.update(inputs=list(e.cls.inputs), optional=list(e.cls.optional))
            if e.family == "metric":
                out.update(needs=list(e.cls.needs), headline=list(e.cls.headline))
            return out

        return {fam: [describe(e) for _, e in sorted(items.items())] for fam, items in self.entries.items()}


def _check_model(cls: Any, name: str, source: str) -> None:
    """A model's slots name known families and do not clash with its own options."""
    for field_name, slot in cls.slots.items():
        if slot.family not in FAMILIES or slot.family == "model":
            raise PluginError(f"{source}: model {name!r} slot {field_name!r} names the unknown family {slot.family!r}; "
                              f"families: {', '.join(f for f in FAMILIES if f != 'model')}")
        if field_name in cls.Options.model_fields:
            raise PluginError(f"{source}: model {name!r} has both an option and a slot called {field_name!r}")


def _plugin_modules() -> list[tuple[str, str, str, str | None, Any]]:
    """(plugin name, source, package, version, loader) for each entry point and VAEFLOW_PLUGINS module."""
    found = []
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.dist.name if e.dist else "", e.name)):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
        package = ep.dist.name if ep.dist else ep.value.split(":")[0]
        found.append((ep.name, f"{dist} ({ep.value})", package, ep.dist.version if ep.dist else None, ep.load))
    for mod in filter(None, (m.strip() for m in os.environ.get(ENV_PLUGINS, "").split(","))):
        found.append((mod, f"{ENV_PLUGINS}:{mod}", mod, None, lambda m=mod: importlib.import_module(m)))
    return found


def discover() -> Registry:
    """Load every plugin and collect its components; failures are recorded, not raised."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = Registry(plugin_manager=pm)
    sources: dict[str, tuple[str, str, str | None]] = {}
    for plugin_name, source, package, version, load in _plugin_modules():
        try:
            module: ModuleType = load()
            if pm.is_registered(module):
                continue  # the same module exposed twice
            api = getattr(module, "VAEFLOW_PLUGIN_API", hookspecs.PLUGIN_API_VERSION)
            if api != hookspecs.PLUGIN_API_VERSION:
                raise PluginError(f"targets plugin API {api}, this vaeflow has {hookspecs.PLUGIN_API_VERSION}")
            pm.register(module, name=plugin_name)
        except Exception as exc:  # a broken plugin must not take the others down
            registry.failures.append((plugin_name, f"{source}: failed to load: {type(exc).__name__}: {exc}"))
            continue
        try:
            pm.check_pending()  # unknown hook names, e.g. a misspelled register_encoder
        except pluggy.PluginValidationError as exc:
            pm.unregister(module)
            registry.failures.append((plugin_name, f"{source}: {exc}"))
            continue
        sources[plugin_name] = (source, package, version)
    for family, hook_name in HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            source, package, version = sources[impl.plugin_name]

            def register(cls: Any, name: str | None = None, _f=family, _s=source, _p=package, _v=version) -> None:
                registry.add(_f, cls, name, _s, _p, _v)

            try:
                impl.function(register=register)
            except NameClash:
                raise
            except PluginError as exc:
                registry.failures.append((impl.plugin_name, str(exc)))
            except Exception as exc:
                registry.failures.append((impl.plugin_name, f"{source}: {hook_name} failed: {type(exc).__name__}: {exc}"))
    return registry


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, discovered lazily once."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = discover()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the cached registry (tests, or after installing a plugin at run time)."""
    global _REGISTRY
    _REGISTRY = None
