"""Plugin discovery and the component registry.

Plugins come from the ``vaeflow`` entry-point group (built-ins included) and
from ``VAEFLOW_PLUGINS=module1,module2``. Each plugin module is registered with
pluggy, checked with ``check_pending()`` (misspelled hooks), then its hooks are
called with a ``register`` callback bound to the plugin's source so that a
name clash can name both sources. A plugin that fails is recorded by name and
the others still load.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from core import hookspecs
from core.errors import PluginError
from core.interfaces import FAMILIES, HOOKS, Component

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

    def add(self, family: str, cls: Any, name: str | None, source: str, package: str) -> None:
        """Validate and record one registration; a clash names both sources."""
        base = FAMILIES[family]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"{source}: {family} {cls!r} must subclass core.interfaces.{base.__name__}")
        name = name or getattr(cls, "name", None)
        if not name or not isinstance(name, str):
            raise PluginError(f"{source}: {family} {cls.__name__} has no string `name`")
        if "name" in cls.Options.model_fields:
            raise PluginError(f"{source}: {family} {name!r} has an option called `name`, which the config uses "
                              f"to select the component; rename the option")
        if name in self.entries[family]:
            other = self.entries[family][name]
            raise NameClash(f"{family} {name!r} is registered twice: by {other.source} and by {source}")
        self.entries[family][name] = Entry(family, name, cls, source, package)

    def as_json(self) -> dict[str, list[dict[str, str]]]:
        """{family: [{"name", "source"}, ...]} for `vaeflow plugins --json`."""
        return {
            fam: [{"name": e.name, "source": e.source} for _, e in sorted(items.items())]
            for fam, items in self.entries.items()
        }


def _plugin_modules() -> list[tuple[str, str, str, Any]]:
    """(plugin name, source, package, loader) for each entry point and VAEFLOW_PLUGINS module."""
    found = []
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.dist.name if e.dist else "", e.name)):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
        package = ep.dist.name if ep.dist else ep.value.split(":")[0]
        found.append((ep.name, f"{dist} ({ep.value})", package, ep.load))
    for mod in filter(None, (m.strip() for m in os.environ.get(ENV_PLUGINS, "").split(","))):
        found.append((mod, f"{ENV_PLUGINS}:{mod}", mod, lambda m=mod: importlib.import_module(m)))
    return found


def discover() -> Registry:
    """Load every plugin and collect its components; failures are recorded, not raised."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = Registry(plugin_manager=pm)
    sources: dict[str, tuple[str, str]] = {}
    for plugin_name, source, package, load in _plugin_modules():
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
        sources[plugin_name] = (source, package)
    for family, hook_name in HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            source, package = sources[impl.plugin_name]

            def register(cls: Any, name: str | None = None, _f=family, _s=source, _p=package) -> None:
                registry.add(_f, cls, name, _s, _p)

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
