"""MkDocs hooks of the vaeflow docs (mkdocs.yml `hooks:`): the pages that are generated from the code at build time.

A page asks for generated Markdown with a marker line, replaced before the page is rendered:

    <!-- vaeflow:config-reference -->          the config reference, from config_model().model_json_schema()
    <!-- vaeflow:cli-reference -->             the CLI reference, from the typer app as a click command
    <!-- vaeflow:templates -->                 the starter configs that `vaeflow init --template NAME` copies
    <!-- vaeflow:stage-graph TEMPLATE -->      a template's stage graph and what re-runs on a change
    <!-- vaeflow:families -->                  the component families: hook, base class, config fields, plugins
    <!-- vaeflow:include PATH -->              a Markdown file of the repository, e.g. docker/README.md

An unknown marker fails the build. The hook also lets mkdocstrings find `vaeflow.core` & co in a source checkout
(they live in core/, plugins/, pipelines/, mapped by pyproject's package-dir, which griffe cannot follow), and
publishes the benchmark figures in bench/*.png without copying them into docs/.
"""

from __future__ import annotations

import atexit
import html
import inspect
import json
import logging
import re
import shutil
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, get_args

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]  # the repository: docs/_hooks/ is two levels down
MARKER = re.compile(r"^<!-- vaeflow:([a-z-]+)(?: ([^ ]+))? -->$", re.M)
PACKAGE_DIRS = {"core": "core", "plugins": "plugins", "pipelines": "pipelines", "configs": "configs"}
BENCH_IMAGES = "bench/*.png"  # published under the same path, for the benchmarks and VQ-VAE pages


# --- MkDocs events --------------------------------------------------------------------------------------------------
@event_priority(100)  # before mkdocstrings' on_config, which creates the python handler with its search paths
def on_config(config, **_):
    """Point mkdocstrings at a `vaeflow` package tree that griffe can walk (see _api_tree)."""
    plugin = config.plugins.get("mkdocstrings")
    if plugin is not None:
        python = plugin.config.handlers.setdefault("python", {})
        python["paths"] = [str(_api_tree()), *python.get("paths", [])]
    return config


def on_files(files: Files, config, **_) -> Files:
    """bench/*.png from the repository root, published as bench/NAME.png."""
    for path in sorted(ROOT.glob(BENCH_IMAGES)):
        uri = path.relative_to(ROOT).as_posix()
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, **_) -> str:
    """Replace each `<!-- vaeflow:NAME [ARG] -->` line with the Markdown it names."""

    def expand(match: re.Match) -> str:
        name, arg = match.group(1), match.group(2)
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_uri}: unknown marker vaeflow:{name}; known: {', '.join(GENERATORS)}")
        return GENERATORS[name](arg) if arg is not None else GENERATORS[name]()

    return MARKER.sub(expand, markdown)


# --- mkdocstrings: a package tree griffe can read -------------------------------------------------------------------
@lru_cache(maxsize=1)
def _api_tree() -> Path:
    """A temporary folder holding `vaeflow/` as an installed wheel lays it out: vaeflow/__init__.py plus links
    vaeflow/core -> core/, vaeflow/plugins -> plugins/, ... (griffe follows links; it does not follow package-dir
    mappings or __path__ edits). Removed when the build process ends."""
    tree = Path(tempfile.mkdtemp(prefix="vaeflow-docs-api-"))
    atexit.register(shutil.rmtree, tree, ignore_errors=True)
    package = tree / "vaeflow"
    shutil.copytree(ROOT / "vaeflow", package, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name, folder in PACKAGE_DIRS.items():
        (package / name).symlink_to(ROOT / folder, target_is_directory=True)
    return tree


# --- text helpers ---------------------------------------------------------------------------------------------------
CODE_SPAN = re.compile(r"(`[^`]*`)")


def text(value: str | None) -> str:
    """Plain prose (a docstring, a field description) as inline Markdown for a table cell: one line, code spans
    kept, Markdown and HTML specials outside them escaped."""
    if not value:
        return ""
    parts = CODE_SPAN.split(" ".join(value.split()))
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(part)  # a pipe inside a code span does not split a table cell
        else:
            part = html.escape(part, quote=False)
            out.append(re.sub(r"([\\*_\[\]{}|])", r"\\\1", part))
    return "".join(out)


def code(value: Any) -> str:
    """A value as an inline code span (JSON for data, as YAML reads it)."""
    s = value if isinstance(value, str) else json.dumps(value)
    fence = "``" if "`" in s else "`"
    return f"{fence}{s}{fence}"


def anchor(*parts: str) -> str:
    return "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell or " " for cell in row) + " |" for row in rows]
    return lines + [""]


# --- the config reference -------------------------------------------------------------------------------------------
TAG_KEYS = ("name", "schedule", "kind")  # the key that selects a union member (TAGS in vaeflow.core.interfaces)
SECTION_ORDER = ("data", "model", "train", "eval", "tracking", "prior", "render", "quality", "schedules")


def _schema_with_factory_defaults(model) -> dict:
    """model.model_json_schema(), with the defaults that come from a default_factory filled in (pydantic leaves them
    out), so that e.g. render.renderers and train.beta show what a config gets when it leaves them out."""
    from pydantic.json_schema import GenerateJsonSchema

    class WithFactoryDefaults(GenerateJsonSchema):
        def get_default_value(self, schema):
            factory = schema.get("default_factory")
            if factory is not None and not schema.get("default_factory_takes_data"):
                return factory()
            return super().get_default_value(schema)

    return model.model_json_schema(schema_generator=WithFactoryDefaults)


class ConfigReference:
    """Renders the JSON schema of the discovered config model as Markdown sections and tables."""

    def __init__(self):
        from vaeflow.core.config import component_fields, config_model
        from vaeflow.core.registry import get_registry

        self.registry = get_registry()
        self.model = config_model(self.registry)
        self.schema = _schema_with_factory_defaults(self.model)
        self.defs: dict[str, dict] = self.schema.get("$defs", {})
        self.families = component_fields(self.registry)  # (section, field) -> family
        self.members: dict[str, dict[str, str]] = {}  # family -> {plugin name: $defs name}, as met in the schema

    # schema navigation
    def deref(self, node: dict) -> tuple[dict, str | None]:
        ref = node.get("$ref")
        if ref is None:
            return node, None
        name = ref.rsplit("/", 1)[-1]
        return {**self.defs[name], **{k: v for k, v in node.items() if k != "$ref"}}, name

    def tag_of(self, def_name: str) -> tuple[str, str] | None:
        """(tag key, value) of a union member: its `name`, `schedule` or `kind` const."""
        props = self.defs[def_name].get("properties", {})
        for key in TAG_KEYS:
            if "const" in props.get(key, {}):
                return key, props[key]["const"]
        return None

    def union(self, node: dict) -> tuple[list[tuple[str, str]], bool] | None:
        """[(plugin name, $defs name)] and nullable, when node is a union of tagged members (a plugin choice)."""
        members, nullable = [], False

        def collect(n: dict) -> bool:
            nonlocal nullable
            if "$ref" in n:
                name = n["$ref"].rsplit("/", 1)[-1]
                tag = self.tag_of(name)
                if tag is None:
                    return False
                members.append((tag[1], name))
                return True
            if n.get("type") == "null":
                nullable = True
                return True
            alts = n.get("oneOf") or n.get("anyOf")
            return bool(alts) and all(collect(a) for a in alts)

        if "$ref" not in node and not (node.get("oneOf") or node.get("anyOf")):
            return None
        if not collect(node) or not members:
            return None
        return members, nullable

    # cells
    def type_of(self, node: dict) -> str:
        node, ref = self.deref(node)
        if "const" in node:
            return code(node["const"])
        if "enum" in node:
            return " \\| ".join(code(v) for v in node["enum"])
        alts = node.get("anyOf") or node.get("oneOf")
        if alts:
            return " or ".join(dict.fromkeys(self.type_of(a) for a in alts))
        kind = node.get("type")
        if kind == "array":
            inner = self.type_of(node.get("items", {})) if node.get("items") else "any"
            s = f"list of {inner}"
            lo, hi = node.get("minItems"), node.get("maxItems")
            if lo is not None or hi is not None:
                s += " (" + (f"{lo}–{hi}" if lo is not None and hi is not None else
                             f"≥ {lo}" if lo is not None else f"≤ {hi}") + " items)"
            return s
        if kind == "object" or ref:
            return "mapping"
        names = {"integer": "integer", "number": "number", "string": "string", "boolean": "boolean", "null": "null"}
        s = names.get(kind, kind or "any")
        bounds = [f"{op} {node[key]}" for key, op in (("exclusiveMinimum", ">"), ("minimum", "≥"),
                                                    ("exclusiveMaximum", "<"), ("maximum", "≤")) if key in node]
        return s + (f" ({', '.join(bounds)})" if bounds else "")

    def plugin_links(self, family: str, members: list[tuple[str, str]]) -> str:
        self.members.setdefault(family, {}).update(dict(members))
        return ", ".join(f"[{code(name)}](#{anchor(family, name)})" for name, _ in members)

    def default_of(self, node: dict, required: bool) -> str:
        if required:
            return "**required**"
        return code(node["default"]) if "default" in node else ""

    # rows
    def rows(self, obj: dict, section: str, prefix: str = "", skip: tuple = ()) -> list[list[str]]:
        """[field, type, default, description] of each property; plain nested objects are flattened (a.b)."""
        out = []
        required = set(obj.get("required", ()))
        for fname, prop in obj.get("properties", {}).items():
            if fname in skip:
                continue
            path = f"{prefix}{fname}"
            family = self.families.get((section, fname)) if not prefix else None
            union = self.union(prop)
            items = self.union(prop["items"]) if prop.get("type") == "array" and "items" in prop else None
            resolved, ref = self.deref(prop)
            desc = text(prop.get("description") or resolved.get("description"))
            if union and family:
                members, nullable = union
                kind = f"one of the {family.replace('_', ' ')}s: " + self.plugin_links(family, members)
                out.append([code(path), kind + (", or `null`" if nullable else ""),
                            self.default_of(prop, fname in required), desc])
            elif items and family:
                kind = f"list of {family}s: " + self.plugin_links(family, items[0])
                out.append([code(path), kind, self.default_of(prop, fname in required), desc])
            elif ref and resolved.get("type") == "object" and self.tag_of(ref) is None:
                if desc:
                    out.append([code(path), "mapping", "", desc])
                out += self.rows(resolved, section, prefix=f"{path}.")
            else:
                out.append([code(path), self.type_of(prop), self.default_of(prop, fname in required), desc])
        return out

    # the page
    def render(self) -> str:
        props = self.schema["properties"]
        required = set(self.schema.get("required", ()))
        lines = [f"The schema below has **{len(self.defs)} definitions** from "
                 f"**{sum(len(self.registry.names(f)) for f in self.registry.entries)} registered components** "
                 "(the plugins installed where these pages were built). `vaeflow config schema` prints the same "
                 "schema as JSON for the plugins installed where you run it.", ""]
        lines += ["## Sections", ""]
        rows = []
        for section in self._sections(props):
            desc = self.section_doc(section).split("\n\n", 1)[0]
            rows.append([f"[{code(section)}](#{anchor('section', section)})",
                         "**required**" if section in required else "optional", text(desc)])
        lines += table(["section", "", "what it holds"], rows)
        for section in self._sections(props):
            lines += self.section(section, props[section], section in required)
        lines += self.components()
        return "\n".join(lines)

    def _sections(self, props: dict) -> list[str]:
        return [s for s in SECTION_ORDER if s in props] + [s for s in props if s not in SECTION_ORDER]

    def section_doc(self, section: str) -> str:
        """A section's description: the schema's, else the docstring of the section's pydantic class (a section
        typed after discovery is a subclass without its own docstring, which the schema then leaves out)."""
        node, _ = self.deref(self.schema["properties"][section])
        desc = self.schema["properties"][section].get("description") or node.get("description")
        if desc:
            return desc
        field = self.model.model_fields.get(section)
        annotation = getattr(field, "annotation", None)
        annotation = getattr(annotation, "__args__", (annotation,))[0]  # list[ScheduleConfig] -> ScheduleConfig
        return inspect.getdoc(annotation) or "" if isinstance(annotation, type) else ""

    def section(self, section: str, prop: dict, required: bool) -> list[str]:
        lines = [f"## `{section}` {{ #{anchor('section', section)} }}", ""]
        if section == "model":
            return lines + self.model_section(prop)
        node, _ = self.deref(prop)
        desc = self.section_doc(section)
        if desc:
            lines += [text(desc), ""]
        if node.get("type") == "array":
            item, _ = self.deref(node.get("items", {}))
            lines += ["A list; each entry is a mapping with these fields.", ""]
            if item.get("description"):
                lines += [text(item["description"]), ""]
            node = item
        lines += table(["field", "type", "default", "description"], self.rows(node, section))
        return lines

    def model_section(self, prop: dict) -> list[str]:
        union = self.union(prop)
        if union is None:  # no model kind registered: the static section
            node, _ = self.deref(prop)
            return table(["field", "type", "default", "description"], self.rows(node, "model"))
        members, _ = union
        lines = [text(prop.get("description")), "",
                 "`model.kind` selects a registered model kind; each kind has exactly its own fields (a field of "
                 "another kind is an error naming the kinds that have it). Kinds: "
                 + ", ".join(f"[{code(kind)}](#{anchor('model', kind)})" for kind, _ in members) + ".", ""]
        for kind, def_name in members:
            node = self.defs[def_name]
            entry = self.registry.get("model", kind)
            lines += [f"### kind `{kind}` {{ #{anchor('model', kind)} }}", ""]
            if node.get("description"):
                lines += [text(node["description"]), ""]
            lines += [f"Registered by {code(entry.source)}.", ""]
            lines += table(["field", "type", "default", "description"], self.rows(node, "model", skip=("kind",)))
        return lines

    def components(self) -> list[str]:
        """One section per plugin family met in the schema, one table of options per plugin."""
        lines = ["## Component options", "",
                 "A component field takes a mapping: the key that selects the plugin (`name`, or `schedule` for "
                 "`train.beta`) and that plugin's own options. Unknown keys are errors (`extra=\"forbid\"`).", ""]
        order = [f for f in self.registry.entries if f in self.members] + [f for f in self.members
                                                                            if f not in self.registry.entries]
        for family in order:
            title = family.replace("_", " ")
            lines += [f"### {title.capitalize()}s {{ #{anchor('family', family)} }}", ""]
            for name, def_name in sorted(self.members[family].items()):
                node = self.defs[def_name]
                key, _ = self.tag_of(def_name)
                lines += [f"#### {title} `{name}` {{ #{anchor(family, name)} }}", ""]
                summary = self._summary(family, name)
                if summary:
                    lines += [text(summary), ""]
                lines += [f"Select it with {code(f'{key}: {name}')}. Registered by "
                          f"{code(self.registry.get(family, name).source)}.", ""]
                rows = self.rows(node, family, skip=(key,))
                lines += table(["option", "type", "default", "description"], rows) if rows else ["No options.", ""]
        others = [f for f in self.registry.entries if f not in self.members and f != "model"]
        if others:
            lines += ["### Not set in the config", "",
                      "These families have no config field: the pipeline picks them by the model kind "
                      "(stages, named in `Model.stages`) or by what the model can do (metrics, by their `needs`).",
                      ""]
            rows = [[family.replace("_", " "), ", ".join(code(n) for n in self.registry.names(family)) or "none"]
                    for family in others]
            lines += table(["family", "registered"], rows)
        return lines

    def _summary(self, family: str, name: str) -> str:
        doc = inspect.getdoc(self.registry.get(family, name).cls) or ""
        return doc.split("\n\n", 1)[0]


def config_reference() -> str:
    return ConfigReference().render()


# --- the CLI reference ----------------------------------------------------------------------------------------------
# typer >= 0.24 builds its commands on a vendored copy of click (typer._click), so they are not `click.Command`
# instances: everything below goes by click's attribute names (list_commands, param_type_name, ...), which both share.
def cli_root():
    """The `vaeflow` command as typer builds it (the object `vaeflow --help` runs)."""
    import typer

    from vaeflow.pipelines.cli import app

    return typer.main.get_command(app)


def is_group(cmd) -> bool:
    return callable(getattr(cmd, "list_commands", None))


def cli_commands(root=None) -> list[tuple[list[str], Any]]:
    """(path, command) of the `vaeflow` command and every sub-command, depth first, in the order `--help` lists them;
    hidden commands left out."""
    root = root or cli_root()
    out = []

    def walk(cmd, path, parent):
        ctx = cmd.context_class(cmd, info_name=path[-1], parent=parent)
        out.append((path, cmd))
        if is_group(cmd):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not getattr(sub, "hidden", False):
                    walk(sub, [*path, name], ctx)

    walk(root, ["vaeflow"], None)
    return out


def cli_params(cmd) -> tuple[list, list]:
    """(arguments, options) of a command that `--help` shows: hidden ones and --help itself left out."""
    shown = [p for p in cmd.params if not getattr(p, "hidden", False)]
    arguments = [p for p in shown if p.param_type_name == "argument"]
    options = [p for p in shown if p.param_type_name == "option" and p.name != "help"]
    return arguments, options


NUMBER_NAMES = {int: "integer", float: "number", str: "text", bool: "boolean"}


def _param_type(param) -> str:
    """A parameter's type in words: flag, one of the choices, path, integer (≥ 1), ...; `repeatable` when it may be
    given several times. Read from typer's type descriptor, else from a click-style `type`."""
    if getattr(param, "is_flag", False) and not getattr(param, "count", False):
        return "flag"
    desc = getattr(param, "type_descriptor", None)
    click_type = getattr(param, "type", None)
    is_list = bool(getattr(desc, "is_list", False))
    choices = getattr(desc, "choices", None) if desc is not None else getattr(click_type, "choices", None)
    if choices:
        s = "one of " + ", ".join(code(str(getattr(c, "value", c))) for c in choices)
    else:
        if desc is not None:
            annotation = get_args(desc.annotation)[0] if is_list and get_args(desc.annotation) else desc.annotation
            base = "path" if desc.is_path else NUMBER_NAMES.get(annotation, getattr(annotation, "__name__", "text"))
        else:
            base = {"integer": "integer", "float": "number"}.get(getattr(click_type, "name", ""),
                                                                  getattr(click_type, "name", "text"))
        lo, hi = getattr(param, "min", None), getattr(param, "max", None)
        bounds = [f"≥ {lo}" if lo is not None else "", f"≤ {hi}" if hi is not None else ""]
        s = base + (f" ({', '.join(b for b in bounds if b)})" if lo is not None or hi is not None else "")
    if is_list or getattr(param, "multiple", False) or param.nargs == -1:
        s += ", repeatable"
    return s


def _param_default(param) -> str:
    if param.required:
        return "**required**"
    d = param.default
    if d is None or d == [] or d == () or (getattr(param, "is_flag", False) and d is False):
        return ""
    if isinstance(d, (list, tuple)):
        return ", ".join(code(str(getattr(x, "value", x))) for x in d)
    return code(str(getattr(d, "value", d)))


def _metavar(param) -> str:
    return param.name.upper() + ("..." if param.nargs == -1 else "")


def _usage(path: list[str], cmd) -> str:
    arguments, options = cli_params(cmd)
    parts = [" ".join(path)] + (["[OPTIONS]"] if options else [])
    parts += [_metavar(p) if p.required else f"[{_metavar(p)}]" for p in arguments]
    return " ".join(parts + (["COMMAND [ARGS]..."] if is_group(cmd) else []))


def _paragraphs(doc: str | None) -> list[str]:
    return [text(p) for p in inspect.cleandoc(doc).split("\n\n")] if doc else []


def cli_reference() -> str:
    commands = cli_commands()
    lines = table(["command", "what it does"],
                  [[f"[`{' '.join(path)}`](#{anchor(*path)})", (_paragraphs(cmd.help) or [""])[0]]
                   for path, cmd in commands[1:] if not is_group(cmd)])
    for path, cmd in commands:
        depth = 2 if len(path) <= 2 else min(len(path), 6)
        lines += [f"{'#' * depth} `{' '.join(path)}` {{ #{anchor(*path)} }}", ""]
        for paragraph in _paragraphs(cmd.help):
            lines += [paragraph, ""]
        lines += ["```text", _usage(path, cmd), "```", ""]
        arguments, options = cli_params(cmd)
        if arguments:
            lines += table(["argument", "type", "default", "description"],
                           [[code(_metavar(p)), _param_type(p), _param_default(p), text(getattr(p, "help", None))]
                            for p in arguments])
        if options:
            lines += table(["option", "type", "default", "description"],
                           [[", ".join(code(o) for o in [*p.opts, *p.secondary_opts]), _param_type(p),
                             _param_default(p), text(p.help)] for p in options])
        if is_group(cmd):
            subs = [sub for sub, _ in commands if len(sub) == len(path) + 1 and sub[:-1] == path]
            lines += ["Commands: " + ", ".join(f"[`{sub[-1]}`](#{anchor(*sub)})" for sub in subs) + ".", ""]
    return "\n".join(lines)


# --- templates and stage graphs -------------------------------------------------------------------------------------
def templates() -> str:
    from vaeflow.core.config import templates as shipped

    rows = []
    for name, path in shipped().items():
        comment = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("# ").strip())
        rows.append([code(name), text(" ".join(comment))])
    return "\n".join(table(["template", "what it trains (the file's leading comment)"], rows))


@contextmanager
def quiet_griffe():
    """Importing vaeflow.pipelines.pipeline makes Prefect parse its flow's docstring with griffe, whose warnings
    (parameters documented without an annotation griffe can see) would fail the strict build: they are not about
    these pages. Griffe logs to "griffe", or to "mkdocs.plugins.griffe" once mkdocstrings has patched its loggers;
    mkdocstrings' own griffe messages are untouched outside this block."""
    loggers = [logging.getLogger(name) for name in ("griffe", "mkdocs.plugins.griffe")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def stage_graph(template: str | None = None) -> str:
    if template is None:
        raise PluginError("vaeflow:stage-graph needs a template name, e.g. <!-- vaeflow:stage-graph vae-shapes-tiny -->")
    from vaeflow.core.config import load_config

    with quiet_griffe():
        from vaeflow.pipelines.pipeline import stage_graph as graph_of
        from vaeflow.pipelines.pipeline import what_runs_again

    cfg = load_config(template)
    graph = graph_of(cfg)
    rows = []
    for s in graph.stages:
        key = ", ".join(code(x) for x in s.sections + s.reads) or "—"
        plugin_code = ", ".join(code(x) for x in s.code) or "—"
        rows.append([code(s.id), ", ".join(code(d) for d in graph.needs[s.id]) or "—", key, plugin_code,
                     "yes" if s.heavy else "no (runs beside the next stages)"])
    lines = table(["stage", "needs", "key: config", "key: plugin code of", "heavy"], rows)
    lines += table(["change", "runs again (the rest stays cached)"],
                   [[change, ", ".join(ids)] for change, ids in what_runs_again(graph, cfg)])
    return "\n".join(lines)


def families() -> str:
    """Every component family: its hook, its base class, the config fields that select one, what is registered."""
    from vaeflow.core.config import component_fields
    from vaeflow.core.interfaces import FAMILIES, HOOKS, TAGS
    from vaeflow.core.registry import get_registry

    registry = get_registry()
    fields: dict[str, list[str]] = {}
    for (section, field), family in component_fields(registry).items():
        fields.setdefault(family, []).append(f"{section}.{field}")
    fields.setdefault("model", ["model.kind"])
    rows = []
    for family, hook in HOOKS.items():
        base = FAMILIES[family]
        selected = ", ".join(code(f) for f in fields.get(family, [])) or "—"
        key = TAGS.get(family, "name")
        rows.append([family.replace("_", " "), code(hook), f"[`{base.__name__}`][{base.__module__}.{base.__name__}]",
                     selected + (f" (by {code(key)})" if family in fields and family != "model" else ""),
                     ", ".join(code(n) for n in registry.names(family)) or "—"])
    return "\n".join(table(["family", "hook", "base class", "chosen in the config by", "registered here"], rows))


LIST_ITEM = re.compile(r"^( *)([-*+]|\d+[.)])( +)")
FENCE = re.compile(r"^( *)(```|~~~)")


def python_markdown_lists(markdown: str) -> str:
    """GitHub-style Markdown lists as Python-Markdown reads them: nested content indented by 4 spaces per level (GitHub
    nests at the marker's width, e.g. 2 for `- `), and a blank line before a list that follows a paragraph. Fenced
    code at the top level is left as it is; fenced code inside a list item moves with the item."""
    out: list[str] = []
    stack: list[int] = []  # content columns of the open list items, outermost first
    fence: tuple[str, int, int] | None = None  # (marker, old indent, new indent) of an open fence
    prev = ""
    for line in markdown.split("\n"):
        indent = len(line) - len(line.lstrip(" "))
        if fence is not None:
            marker, old, new = fence
            if line.strip().startswith(marker) and line.strip().strip(marker[0]) == "" and indent <= old + 3:
                fence = None
            out.append(" " * (new + max(0, indent - old)) + line.lstrip(" ") if line.strip() else line)
            prev = line
            continue
        if not line.strip():
            out.append(line)
            prev = line
            continue
        item = LIST_ITEM.match(line)
        while stack and stack[-1] > indent:
            stack.pop()
        if item:
            level = len(stack)
            if level == 0 and prev.strip() and not LIST_ITEM.match(prev) and not prev.startswith((" ", "|", "#")):
                out.append("")  # Python-Markdown needs a blank line between a paragraph and a list
            new = 4 * level
            stack.append(indent + len(item.group(2)) + len(item.group(3)))
        elif stack:
            new = 4 * len(stack) + max(0, indent - stack[-1])
        else:
            new = indent
        fenced = FENCE.match(line)
        if fenced and (stack or indent):
            fence = (fenced.group(2), indent, new)
        elif fenced:
            fence = (fenced.group(2), indent, indent)
        out.append(" " * new + line.lstrip(" "))
        prev = line
    return "\n".join(out)


def include(path: str | None = None) -> str:
    """A Markdown file of the repository (e.g. docker/README.md), its lists made Python-Markdown's."""
    if path is None:
        raise PluginError("vaeflow:include needs a path relative to the repository root")
    file = (ROOT / path).resolve()
    if ROOT not in file.parents or not file.is_file():
        raise PluginError(f"vaeflow:include {path}: no such file in the repository")
    return python_markdown_lists(file.read_text())


GENERATORS = {
    "include": include,
    "families": families,
    "config-reference": config_reference,
    "cli-reference": cli_reference,
    "templates": templates,
    "stage-graph": stage_graph,
}
