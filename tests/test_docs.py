"""The docs site (mkdocs.yml, docs/): it builds with --strict, its generated references cover what the code has (every
model kind and plugin in the config reference, every command and option in the CLI reference, compared with the live
registry and typer app), it includes every plugin example from examples/ rather than a copy, it loads nothing from the
network, and README.md (a short page for newcomers) shows no figure or command that the docs pages do not."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"
SNIPPET = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$', re.M)
HAS_MKDOCS = all(importlib.util.find_spec(m) is not None for m in ("mkdocs", "material", "mkdocstrings_handlers.python"))


def anchor(*parts: str) -> str:
    """The heading ids the docs hook gives (docs/_hooks/vaeflow_docs.py: anchor)."""
    return "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once with `mkdocs build --strict` into a temporary folder."""
    if not HAS_MKDOCS:
        pytest.skip("mkdocs, mkdocs-material or mkdocstrings-python is not installed (pip install '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def page(site: Path, path: str) -> str:
    return (site / path / "index.html").read_text()


def sections(doc: str, ids: list[str]) -> dict[str, str]:
    """{heading id: the HTML from that heading to the next of the given ids}."""
    spots = sorted((doc.index(f'id="{i}"'), i) for i in ids)
    return {i: doc[start:(spots[n + 1][0] if n + 1 < len(spots) else len(doc))] for n, (start, i) in enumerate(spots)}


# --- the build ------------------------------------------------------------------------------------------------------
def test_the_site_builds_with_strict_and_has_every_page(site):
    nav_pages = re.findall(r":\s+([\w/-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert len(nav_pages) > 20
    for md in nav_pages:
        stem = md.removesuffix(".md")
        built = site / (stem.removesuffix("index") if stem.endswith("index") else stem + "/") / "index.html"
        assert built.is_file(), f"{md} was not built"
    for png in ("prefect-ui.png", "prefect-ui-run.png", "mlflow-run.png", "bench/vqvae2-samples.png"):
        assert (site / png).is_file(), png


def test_the_site_loads_nothing_from_the_network(site):
    remote = re.compile(r'<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)="(?:https?:)?//', re.I)
    for path in site.rglob("*.html"):
        text = path.read_text()
        assert not remote.search(text), f"{path.relative_to(site)} loads {remote.search(text).group(0)}"
        assert "fonts.googleapis" not in text and 'class="mermaid"' not in text, path.relative_to(site)


# --- the generated references against the live code -----------------------------------------------------------------
def test_the_config_reference_names_every_section_model_kind_and_plugin(site):
    from vaeflow.core.config import component_fields, config_model
    from vaeflow.core.registry import get_registry

    doc = page(site, "reference/config")
    registry = get_registry()
    for section in config_model(registry).model_fields:
        assert f'id="{anchor("section", section)}"' in doc, f"config section {section} is missing"
    kinds = registry.names("model")
    assert {"vae", "vqvae2"} <= set(kinds)
    for kind in kinds:
        assert f'id="{anchor("model", kind)}"' in doc, f"model kind {kind} is missing"
        for field in registry.get("model", kind).cls.Options.model_fields:
            assert f"<code>{field}</code>" in doc, f"model kind {kind}: field {field} is missing"
    for family in set(component_fields(registry).values()):
        for name in registry.names(family):
            assert f'id="{anchor(family, name)}"' in doc, f"{family} {name} is missing"
            for option in registry.get(family, name).cls.Options.model_fields:
                assert f"<code>{option}</code>" in doc, f"{family} {name}: option {option} is missing"


def cli_commands() -> list[tuple[list[str], object]]:
    """(path, command) of `vaeflow` and every visible sub-command, read from the typer app."""
    import typer

    from vaeflow.pipelines.cli import app

    out = []

    def walk(cmd, path, parent):
        ctx = cmd.context_class(cmd, info_name=path[-1], parent=parent)
        out.append((path, cmd))
        for name in (cmd.list_commands(ctx) if hasattr(cmd, "list_commands") else []):
            sub = cmd.get_command(ctx, name)
            if not getattr(sub, "hidden", False):
                walk(sub, [*path, name], ctx)

    walk(typer.main.get_command(app), ["vaeflow"], None)
    return out


def test_the_cli_reference_names_every_command_and_option(site):
    doc = html.unescape(page(site, "reference/cli"))
    commands = cli_commands()
    assert {("vaeflow", "run"), ("vaeflow", "init"), ("vaeflow", "config", "validate")} <= {tuple(p) for p, _ in commands}
    ids = [anchor(*path) for path, _ in commands]
    for i in ids:
        assert f'id="{i}"' in doc, f"command {i} is missing"
    parts = sections(doc, ids)
    for path, cmd in commands:
        part = parts[anchor(*path)]
        for param in cmd.params:
            if getattr(param, "hidden", False) or param.name == "help":
                continue
            names = [*param.opts, *param.secondary_opts] if param.param_type_name == "option" else [param.name.upper()]
            for name in names:
                assert f"<code>{name}</code>" in part, f"{' '.join(path)}: {name} is missing"
            if getattr(param, "help", None):
                shown = " ".join(html.unescape(re.sub(r"<[^>]+>", "", part)).split())
                assert " ".join(param.help.replace("`", "").split())[:40] in shown, \
                    f"{' '.join(path)} {names[0]}: its help text is missing"


# --- included, not copied -------------------------------------------------------------------------------------------
def snippets() -> dict[str, list[str]]:
    """{included file: [pages that include it]} over every page in docs/."""
    out: dict[str, list[str]] = {}
    for md in DOCS.rglob("*.md"):
        for path in SNIPPET.findall(md.read_text()):
            out.setdefault(path, []).append(str(md.relative_to(DOCS)))
    return out


def test_every_family_example_is_included_from_its_file():
    included = snippets()
    for example in sorted((ROOT / "examples" / "families").glob("*.py")):
        assert example.relative_to(ROOT).as_posix() in included, f"no docs page includes {example.name}"
    for path in included:
        assert (ROOT / path).is_file(), f"docs include {path}, which does not exist"
    for md in DOCS.rglob("*.md"):  # no page holds a copy of an example instead
        text = md.read_text()
        for example in (ROOT / "examples" / "families").glob("*.py"):
            first_def = re.search(r"^class \w+.*$", example.read_text(), re.M).group(0)
            assert first_def not in text, f"{md.relative_to(DOCS)} copies {example.name}; include it with --8<--"


# --- README.md: its figures and commands are copies of the docs pages' -----------------------------------------------
def table_rows(text: str) -> list[str]:
    return [" ".join(line.replace("\\|", "|").split()) for line in text.splitlines() if line.lstrip().startswith("|")]


def code_blocks(text: str) -> list[str]:
    blocks = re.findall(r"^([ \t]*)```[^\n]*\n(.*?)^\1```", text, re.M | re.S)
    return [textwrap.dedent(body).strip() for _, body in blocks]


def flat(block: str) -> str:
    """A code block with each line's runs of whitespace made one space, between newlines, for a whole-line match."""
    return "\n" + "\n".join(" ".join(line.split()) for line in block.splitlines()) + "\n"


def test_every_figure_row_and_code_block_of_the_readme_is_on_a_docs_page():
    """README.md is the short way in; the docs site holds the rest. Each table row of README.md with a digit in it (a
    measured figure, a default path) and each of its code blocks must appear on some page under docs/, so a figure
    or a command changed on one side only fails here. A code block may be a run of whole lines of a longer one."""
    readme = README.read_text()
    pages = [md.read_text() for md in sorted(DOCS.rglob("*.md"))]
    docs_rows = {row for text in pages for row in table_rows(text)}
    docs_blocks = [flat(block) for text in pages for block in code_blocks(text)]
    rows = [r for r in table_rows(readme) if re.search(r"\d", r) and not re.fullmatch(r"[|:\s-]+", r)]
    blocks = code_blocks(readme)
    assert rows and blocks, "README.md has no figure rows or no code blocks: this check compares nothing"
    missing = [f"table row: {row}" for row in rows if row not in docs_rows]
    missing += [f"code block:\n{block}" for block in blocks if not any(flat(block) in d for d in docs_blocks)]
    assert not missing, ("README.md shows what no page under docs/ has (change the docs page with it, or the "
                         "README back):\n\n" + "\n\n".join(missing))
