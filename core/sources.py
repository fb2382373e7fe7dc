"""Where a plugin's code lives, found without importing it: the source files of a module and of what it imports
from given packages (by parsing), and a stamp of them. Imports no torch, so `vaeflow plugins` can check its cached
listing before it loads anything."""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import os
import sys
import threading
from pathlib import Path

ENTRY_POINT_GROUP = "vaeflow"  # the entry-point group of every plugin, the built-ins included
ENV_PLUGINS = "VAEFLOW_PLUGINS"  # comma-separated plugin modules loaded besides the entry points

_AST_LOCK = threading.Lock()


def _under(module: str, roots: set[str]) -> bool:
    """Whether `module` is one of the packages `roots` (dotted names) or inside one."""
    return any(module == root or module.startswith(root + ".") for root in roots)


def _find_spec(name: str):
    """The module spec of a dotted name, or None when there is none (e.g. an attribute: from x import Class).

    Unlike importlib.util.find_spec, which imports the parent package of a dotted name (and so runs it, and
    whatever it imports, torch included), this asks the import system's finders with the parent's search path,
    found the same way: nothing is executed."""
    if "." not in name:
        return importlib.util.find_spec(name)  # a top-level name: no parent to import
    parent_name, _, _ = name.rpartition(".")
    parent = sys.modules.get(parent_name)
    if parent is not None:
        locations = getattr(parent, "__path__", None)  # the live __path__ (a package may extend it)
    else:
        parent_spec = _find_spec(parent_name)
        locations = parent_spec.submodule_search_locations if parent_spec is not None else None
    if locations is None:  # the parent is a module, not a package: `name` names one of its attributes
        return None
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        spec = find(name, list(locations)) if find is not None else None
        if spec is not None:
            return spec
    return None


def module_files(module: str, roots: set[str]) -> list[Path]:
    """The source files of `module` and, transitively, of every module it imports that lies in one of the packages
    `roots` (dotted names: "vf_pkg", "vaeflow.core"), found by parsing the imports (nothing is executed)."""
    files, seen, todo = [], set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            spec = _find_spec(name)
        except (ImportError, ValueError, AttributeError):
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
            if _under(base, roots):
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


def plugin_modules() -> list[tuple[str, str, str, str | None, str]]:
    """(plugin name, source, package, version, target) of each `vaeflow` entry point (sorted; target "module" or
    "module:attribute") and VAEFLOW_PLUGINS module, without importing any of them."""
    found = []
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.dist.name if e.dist else "", e.name)):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
        package = ep.dist.name if ep.dist else ep.value.split(":")[0]
        found.append((ep.name, f"{dist} ({ep.value})", package, ep.dist.version if ep.dist else None, ep.value))
    for mod in filter(None, (m.strip() for m in os.environ.get(ENV_PLUGINS, "").split(","))):
        found.append((mod, f"{ENV_PLUGINS}:{mod}", mod, None, mod))
    return found


def plugin_files(*extra: Path) -> list[Path]:
    """The source files behind every plugin: each plugin module, what it imports from its own package and from
    vaeflow.core (module_files), and `extra`; found by parsing, without importing any plugin."""
    files: set[Path] = set(extra)
    for _, _, _, _, target in plugin_modules():
        module = target.split(":")[0].strip()
        files.update(module_files(module, {module.split(".")[0], "vaeflow.core"}))
    return sorted(files)


def file_stamps(files: list[Path]) -> list[list]:
    """[path, mtime_ns, size] of each file ([path, None, None] when it is gone): an edit changes its row."""
    rows = []
    for path in files:
        try:
            st = path.stat()
            rows.append([str(path), st.st_mtime_ns, st.st_size])
        except OSError:
            rows.append([str(path), None, None])
    return rows


def environment_stamp() -> list:
    """This interpreter, VAEFLOW_PLUGINS and (folder, mtime_ns) of each import path folder: installing, upgrading or
    removing a distribution (its .dist-info folder, hence its entry points) changes a folder's mtime."""
    folders = []
    for entry in sys.path:
        try:
            folders.append([entry, os.stat(entry or ".").st_mtime_ns])
        except OSError:
            continue
    return [sys.executable, sys.version, os.environ.get(ENV_PLUGINS, ""), folders]
