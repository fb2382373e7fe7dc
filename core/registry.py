"""Plugin discovery and the component registry.

Plugins come from the ``vaeflow`` entry-point group (built-ins included) and
from ``VAEFLOW_PLUGINS=module1,module2``. Each plugin module is registered with
pluggy, checked with ``check_pending()`` (misspelled hooks), then its hooks are
called with a ``register`` callback bound to the plugin's source so that a
name clash can name both sources. A plugin that fails is recorded by name and
the others still load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from vaeflow.core import hookspecs
from vaeflow.core.errors import PluginError
from vaeflow.core.sources import ENTRY_POINT_GROUP, ENV_PLUGINS, module_files, plugin_modules  # noqa: F401
from vaeflow.core.interfaces import FAMILIES, HOOKS, TAGS, Component



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


CODE_ROOTS = ("vaeflow.core",)  # besides the plugin's own top-level package, imports of these count as its code


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
            raise PluginError(f"{source}: {family} {cls!r} must subclass vaeflow.core.interfaces.{base.__name__}")
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
        from vaeflow.core.interfaces import form_of

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
    return [(name, source, package, version, lambda t=target: _load(t))
            for name, source, package, version, target in plugin_modules()]


def _load(target: str) -> Any:
    """Import an entry point's target, "module" or "module:attribute.path" (as EntryPoint.load does)."""
    module, _, attrs = target.partition(":")
    obj = importlib.import_module(module.strip())
    for attr in filter(None, attrs.strip().split(".")):
        obj = getattr(obj, attr)
    return obj


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
